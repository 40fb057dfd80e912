"""Stage 07: LoRA training on the tiny presets, checkpoints and resume, saved files, bad input.

Every test trains the real loop (diffusers + peft + accelerate) on the ``tiny`` base model built in
code (random weights, tokenizer files written by the code), on the CPU, at 64 px. The dataset is
written here in the layout stage 06 exports (``dataset_items`` + ``<run>/dataset/hf/<split>/``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from notebooks import pictures
from PIL import Image, ImageDraw

from diffusion_bunny.config import load_config
from diffusion_bunny.errors import BadInputError, ConfigError, ModelError, StageError
from diffusion_bunny.pipeline.run import Run
from diffusion_bunny.stages import PIPELINE
from diffusion_bunny.stages.train.settings import TrainSettings
from diffusion_bunny.stages.train.tables import tensorboard_name

pytestmark = pytest.mark.slow

SIZES = [(96, 64), (64, 96), (80, 80), (120, 60)]


@pytest.fixture(scope="module", autouse=True)
def model_cache(tmp_path_factory):
    """One preset cache for the module (the tiny models are built once, as once per machine)."""
    folder = tmp_path_factory.mktemp("bunny_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DIFFUSION_BUNNY_CACHE", str(folder))
        yield folder


def write_image(path: Path, size: tuple[int, int], seed: int) -> None:
    """A picture with structure (a background gradient and a few shapes), not noise."""
    rng = np.random.default_rng(seed)
    w, h = size
    base = np.linspace(0, 255, w, dtype=np.float32)[None, :, None] * rng.random(3)[None, None, :]
    image = Image.fromarray(np.broadcast_to(base, (h, w, 3)).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        x, y = int(rng.integers(0, w - 10)), int(rng.integers(0, h - 10))
        colour = tuple(int(c) for c in rng.integers(0, 255, 3))
        draw.ellipse((x, y, x + int(rng.integers(8, 30)), y + int(rng.integers(8, 30))), fill=colour)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, quality=95)


def make_dataset(
    run_dir: Path, n_train: int = 6, n_val: int = 1, images: list[Path] | None = None
) -> pl.DataFrame:
    """``dataset_items`` + image files as stage 06 writes them; from ``images`` when given."""
    rows = []
    for split, count, offset in (("train", n_train, 0), ("validation", n_val, n_train)):
        for i in range(count):
            name = f"{split}_{i:03d}.jpg"
            target = run_dir / "dataset" / "hf" / split / name
            if images:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(images[(offset + i) % len(images)], target)
            else:
                write_image(target, SIZES[(offset + i) % len(SIZES)], offset + i)
            with Image.open(target) as im:
                width, height = im.size
            rows.append(
                {
                    "frame_id": f"f{offset + i:04d}",
                    "split": split,
                    "file_name": name,
                    "text": f"bunnystyle, a photo of the cat {i}",
                    "characters": ["cat"],
                    "shot_id": i,
                    "crop": "full",
                    "repeats": 1,
                    "width": width,
                    "height": height,
                }
            )
    table = pl.DataFrame(rows, schema_overrides={"characters": pl.List(pl.Utf8)})
    (run_dir / "tables").mkdir(parents=True, exist_ok=True)
    table.write_parquet(run_dir / "tables" / "dataset_items.parquet")
    return table


def make_run(tmp_path: Path, demo_movie: Path | None = None, **kw) -> Run:
    """A run folder with a dataset (the movie file only has to exist for ``Run.create``)."""
    movie = demo_movie or tmp_path / "movie.mp4"
    if demo_movie is None:
        movie.write_bytes(b"not read by stage 07")
    run = Run.create(tmp_path / "run", movie)
    make_dataset(run.run_dir, **kw)
    return run


def fast_overrides(tmp_path: Path, **extra) -> dict:
    return {
        "train.output_dir": str(tmp_path / "lora"),
        "train.resolution": 64,
        "train.max_train_steps": 4,
        "train.checkpoint_every": 2,
        "train.validation_every": 0,
        "train.validation_inference_steps": 2,
        "train.device": "cpu",
        **{f"train.{k}": v for k, v in extra.items()},
    }


def training_cfg(**kw) -> TrainSettings:
    base = {"resolution": 64, "device": "cpu", "validation_every": 0, "validation_inference_steps": 2}
    return TrainSettings(**{**base, **kw})


# ---------------------------------------------------------------------------------------------
# Pure parts


def test_buckets_keep_the_area_and_group_batches_by_bucket():
    from diffusion_bunny.stages.train.data import bucket_step, epoch_batches, make_buckets, nearest_bucket

    assert bucket_step(512, 8) == 64 and bucket_step(64, 8) == 16 and bucket_step(1024, 8) == 64
    buckets = make_buckets(512, 64)
    assert (512, 512) in buckets and (640, 384) in buckets and (384, 640) in buckets
    for w, h in buckets:
        assert w % 64 == 0 and h % 64 == 0 and w * h <= 512 * 512 and max(w / h, h / w) <= 2.0
    assert nearest_bucket(1920, 1080, buckets) == (640, 384)  # 1.67, nearest 16:9
    assert nearest_bucket(1080, 1920, buckets) == (384, 640)
    assert nearest_bucket(1000, 1000, buckets) == (512, 512)

    bucket_of = [(64, 64)] * 5 + [(80, 48)] * 3
    batches = epoch_batches(bucket_of, 2, seed=0, epoch=0)
    assert sorted(i for b in batches for i in b) == list(range(8))
    assert all(len({bucket_of[i] for i in b}) == 1 for b in batches)
    assert batches == epoch_batches(bucket_of, 2, seed=0, epoch=0)  # what resume relies on
    assert batches != epoch_batches(bucket_of, 2, seed=0, epoch=1)


# ---------------------------------------------------------------------------------------------
# Training steps, saving, loading


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A trainer after a few steps on one fixed batch (lr 5e-3, alpha != rank), the loss before and
    after on that batch with the same noise, and its LoRA saved."""
    from diffusion_bunny.stages.train.data import TrainImage
    from diffusion_bunny.stages.train.lora import LoraTrainer

    tmp = tmp_path_factory.mktemp("trained")
    make_dataset(tmp, n_train=2, n_val=0)
    images = [
        TrainImage(p, "bunnystyle, a photo of the cat") for p in sorted((tmp / "dataset/hf/train").iterdir())
    ]
    trainer = LoraTrainer(training_cfg(learning_rate=5e-3, rank=4, alpha=8.0), cache_dir=tmp)
    batch = trainer.make_batch(images, (64, 64))
    before = {k: v.clone() for k, v in trainer.peft_state()["unet"].items()}

    def fixed_loss() -> float:
        trainer.generator.manual_seed(123)
        with torch.no_grad():
            return float(trainer.loss(batch)[0])

    loss_before = fixed_loss()
    for _ in range(20):
        trainer.generator.manual_seed(123)
        trainer.step(batch)
    loss_after = fixed_loss()
    lora_path, kohya_path = trainer.save_lora(tmp / "out", kohya_name="cat")
    return trainer, before, loss_before, loss_after, lora_path, kohya_path


def test_prepared_images_are_kept_in_memory_and_prepared_again_when_edited(tmp_path):
    """Without cached latents every step encodes its batch, but a file is decoded and resized
    once: the kept copy gives the very pixels a fresh read gives, an edited file is read again,
    and past the memory budget images are prepared each time and not kept."""
    from diffusion_bunny.stages.train.data import PixelMemory, prepare_pixels, to_unit_range

    path = tmp_path / "a.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (90, 160, 3), dtype=np.uint8)).save(path)
    memory = PixelMemory()
    first, original, crop = memory.prepare(path, (64, 64))
    assert first.shape == (3, 64, 64) and first.dtype == torch.float32 and original == (90, 160)
    assert float(first.min()) >= -1.0 and float(first.max()) <= 1.0
    fresh = to_unit_range(prepare_pixels(path, (64, 64))[0])
    assert torch.equal(first, fresh) and memory.used == 3 * 64 * 64 and len(memory.items) == 1
    again, _, crop_again = memory.prepare(path, (64, 64))
    assert torch.equal(again, first) and crop_again == crop and len(memory.items) == 1
    # Another size is another entry; an edited file (new mtime) is read again.
    memory.prepare(path, (32, 64))
    assert len(memory.items) == 2
    Image.fromarray(np.zeros((90, 160, 3), np.uint8)).save(path)
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    edited, _, _ = memory.prepare(path, (64, 64))
    assert torch.equal(edited, torch.full_like(edited, -1.0))
    small = PixelMemory(budget_bytes=3 * 64 * 64 - 1)
    small.prepare(path, (64, 64))
    assert small.items == {} and small.used == 0


def test_a_batch_may_hold_one_picture_twice(tmp_path, monkeypatch):
    """A small dataset with repeats puts one picture twice in a batch, and stage 06 can export two
    files with the same bytes (they share one latent-cache file). Each distinct picture is encoded
    once, stored once, and every place in the batch gets its entry; this raised KeyError in stage
    07 on real footage before any of them was cached."""
    from diffusion_bunny.stages.train.data import TrainImage
    from diffusion_bunny.stages.train.lora import LoraTrainer

    a, copy_of_a, b = tmp_path / "a.jpg", tmp_path / "copy_of_a.jpg", tmp_path / "b.jpg"
    write_image(a, (80, 80), 0)
    shutil.copy(a, copy_of_a)
    write_image(b, (80, 80), 1)
    images = [TrainImage(p, "bunnystyle, the cat") for p in (a, copy_of_a, a, b)]
    trainer = LoraTrainer(training_cfg(), cache_dir=tmp_path / "cache")
    encoded: list[int] = []
    encode = trainer.encode_images
    monkeypatch.setattr(
        trainer, "encode_images", lambda pixels: encoded.append(len(pixels)) or encode(pixels)
    )

    parts = trainer.latent_batch(images, (64, 64))
    assert encoded == [2]  # a (and its copy) once, b once
    assert torch.equal(parts[0][0], parts[1][0]) and torch.equal(parts[0][0], parts[2][0])
    assert not torch.equal(parts[0][0], parts[3][0])
    assert len(list((tmp_path / "cache" / "latents").iterdir())) == 2
    # Another trainer reads the same numbers back from the cache without encoding; a step on such
    # a batch runs.
    again = LoraTrainer(training_cfg(), cache_dir=tmp_path / "cache")
    monkeypatch.setattr(again, "encode_images", lambda pixels: pytest.fail("encoded what the cache holds"))
    for first, second in zip(parts, again.latent_batch(images, (64, 64)), strict=True):
        assert torch.equal(first[0], second[0]) and first[1:] == second[1:]
    loss, _, stepped = again.step(again.make_batch(images, (64, 64)))
    assert np.isfinite(loss) and stepped


def test_steps_change_the_lora_and_lower_the_loss(trained):
    trainer, before, loss_before, loss_after, *_ = trained
    after = trainer.peft_state()["unet"]
    assert (
        set(after) == set(before) and len(after) == 2 * 4 * 12
    )  # A, B of q, k, v, out in 12 attention layers
    changed = [k for k in after if not torch.equal(after[k], before[k])]
    assert len(changed) == len(after)
    assert all(before[k].abs().max() == 0 for k in before if "lora_B" in k)  # B starts at zero
    assert loss_after < 0.9 * loss_before, (loss_before, loss_after)


def unet_output(unet) -> torch.Tensor:
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(1, 4, 8, 8, generator=gen)
    context = torch.randn(1, 77, 32, generator=gen)
    with torch.no_grad():
        return unet(x, torch.tensor([500]), context).sample


class _Said(logging.Handler):
    """The messages logged to a logger it is added to."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_saved_lora_reloads_to_the_same_outputs(trained):
    from diffusion_bunny.models.diffusion import load_lora, load_pipeline

    trainer, *_, lora_path, kohya_path = trained
    trainer.unet.eval()
    expected = unet_output(trainer.unet)
    plain = unet_output(load_pipeline("tiny").unet)
    assert (expected - plain).abs().max() > 1e-3  # the LoRA does something

    for path in (lora_path, kohya_path):
        pipe = load_pipeline("tiny")
        said = _Said()
        logging.getLogger("diffusers").addHandler(said)  # its own handler writes to the notebook
        try:
            assert load_lora(pipe, path) == "default"
        finally:
            logging.getLogger("diffusers").removeHandler(said)
        # A LoRA of the denoiser alone: diffusers' "No LoRA keys associated to CLIPTextModel" is
        # not printed at every load (four times in notebook 08's cell).
        assert not [m for m in said.messages if "No LoRA keys" in m]
        assert torch.allclose(unet_output(pipe.unet), expected, atol=1e-5), path
    # Plain diffusers loads the diffusers file as it is (alpha 8 / rank 4 from the file's metadata).
    pipe = load_pipeline("tiny")
    pipe.load_lora_weights(str(lora_path.parent))
    assert torch.allclose(unet_output(pipe.unet), expected, atol=1e-5)
    # Scale 0 is the base model.
    load_lora(pipe, lora_path, scale=0.0)
    assert torch.allclose(unet_output(pipe.unet), plain, atol=1e-6)
    # The LoRA's folder, as diffusers takes it (it was "LoRA file not found" of a folder there).
    pipe = load_pipeline("tiny")
    load_lora(pipe, lora_path.parent)
    assert torch.allclose(unet_output(pipe.unet), expected, atol=1e-5)
    with pytest.raises(ModelError, match=r"LoRA folder .* holds no pytorch_lora_weights.safetensors"):
        load_lora(pipe, lora_path.parent.parent)


def test_kohya_copy_has_kohya_keys_and_the_real_alpha(trained):
    from safetensors import safe_open

    *_, kohya_path = trained
    assert kohya_path.name == "cat_kohya.safetensors"
    with safe_open(str(kohya_path), "pt") as f:
        keys = list(f.keys())
        alphas = [float(f.get_tensor(k)) for k in keys if k.endswith(".alpha")]
    assert keys and all(k.startswith("lora_unet_") for k in keys)
    assert any(k.endswith(".lora_down.weight") for k in keys) and any(
        k.endswith(".lora_up.weight") for k in keys
    )
    assert len(alphas) == 4 * 12 and set(alphas) == {8.0}


def test_the_kohya_copy_of_one_text_encoder_is_named_as_sd_1x_loras_are(tmp_path):
    """diffusers' converter names every text encoder ``lora_te1_``, which kohya's sd-scripts and
    A1111 read as SDXL's first: an SD 1.x LoRA trained with ``train.train_text_encoder`` carries
    ``lora_te_`` (SDXL's two keep ``lora_te1_`` and ``lora_te2_``: the SDXL training test)."""
    import torch
    from safetensors import safe_open

    from diffusion_bunny.stages.train.lora import save_kohya

    layer = "text_model.encoder.layers.0.self_attn.q_proj"
    down, up = torch.zeros(4, 32), torch.zeros(32, 4)
    state = {
        "unet": {"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": down.clone()},
        "text_encoder": {f"{layer}.lora_A.weight": down, f"{layer}.lora_B.weight": up},
    }
    path = save_kohya(state, tmp_path / "one_kohya.safetensors", alpha=8)
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in keys
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha" in keys
    assert not any(k.startswith("lora_te1") for k in keys)


def test_lora_of_another_base_model_is_refused_before_loading(trained):
    from diffusion_bunny.models.diffusion import load_lora, load_pipeline

    *_, lora_path, _ = trained
    pipe = load_pipeline("tiny-sdxl")
    with pytest.raises(ModelError, match=r"does not match base model 'tiny-sdxl' \(sdxl\)") as err:
        load_lora(pipe, lora_path)
    assert str(lora_path) in str(err.value)
    assert not pipe.get_list_adapters()  # nothing was loaded
    broken = lora_path.with_name("broken.safetensors")
    broken.write_bytes(b"not a safetensors file")
    with pytest.raises(ModelError, match="cannot be read as a LoRA"):
        load_lora(pipe, broken)
    with pytest.raises(ModelError, match="LoRA file not found"):
        load_lora(pipe, lora_path.with_name("nope.safetensors"))


# ---------------------------------------------------------------------------------------------
# The stage


def tensorboard_events(folder: Path) -> dict[str, list]:
    """What TensorBoard shows of a run folder: ``{tag: [(step, value), ...]}`` for the scalars,
    ``{tag: [(step, (height, width)), ...]}`` for the images, ``{tag: [step, ...]}`` for text;
    read back with TensorBoard's own reader (every event kept, purges applied)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert list(folder.glob("events.out.tfevents.*")), f"no event file in {folder}"
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    out: dict[str, list] = {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in tags["scalars"]}
    out |= {t: [(e.step, (e.height, e.width)) for e in acc.Images(t)] for t in tags["images"]}
    out |= {t: [e.step for e in acc.Tensors(t)] for t in tags["tensors"]}  # text summaries
    return out


def check_tensorboard(folder: Path, log: pl.DataFrame, validation: pl.DataFrame, size: int) -> None:
    """The run's TensorBoard events hold every step of ``training_log`` once (loss, learning rate,
    epoch) and every validation picture at its step."""
    events = tensorboard_events(folder)
    steps = log["step"].to_list()
    assert [s for s, _ in events["loss"]] == steps and [s for s, _ in events["lr"]] == steps
    assert np.allclose([v for _, v in events["loss"]], log["loss"].to_list(), rtol=1e-6)
    assert np.allclose([v for _, v in events["lr"]], log["lr"].to_list(), rtol=1e-6)
    assert [v for _, v in events["epoch"]] == log["epoch"].to_list()
    for index in validation["index"].unique().to_list():
        at = validation.filter(pl.col("index") == index)["step"].to_list()
        assert events[f"validation/{index:02d}"] == [(s, (size, size)) for s in at]
    assert "settings/text_summary" in events


def test_resumed_events_are_read_after_the_killed_runs_in_the_same_second(tmp_path):
    """A resumed run whose event file is stamped with the killed run's second and a smaller pid
    would be read first by TensorBoard (name order), and the purge of the killed run's steps past
    its checkpoint would miss; waiting for the next second keeps the new file last."""
    from torch.utils.tensorboard import SummaryWriter

    from diffusion_bunny.stages.train.lora import wait_past_event_files

    killed = SummaryWriter(str(tmp_path))
    for step in range(1, 7):
        killed.add_scalar("loss", 1.0, step)
    killed.close()
    (old,) = tmp_path.glob("events.out.tfevents.*")
    parts = old.name.split(".")
    parts[3] = f"{int(time.time()):010d}"  # this very second
    parts[5] = f"{os.getpid()}9"  # a child's pid that sorts after ours
    old.rename(tmp_path / ".".join(parts))
    wait_past_event_files(tmp_path)
    resumed = SummaryWriter(str(tmp_path), purge_step=5)
    for step in (5, 6, 7):
        resumed.add_scalar("loss", 2.0, step)
    resumed.close()
    assert sorted(tmp_path.glob("events.out.tfevents.*"))[-1].name.split(".")[5] == str(os.getpid())
    assert tensorboard_events(tmp_path)["loss"] == [
        (1, 1.0),
        (2, 1.0),
        (3, 1.0),
        (4, 1.0),
        (5, 2.0),
        (6, 2.0),
        (7, 2.0),
    ]
    wait_past_event_files(tmp_path / "absent")  # nothing to wait for


def lora_dirs(base: Path) -> dict[int, Path]:
    """The LoRA folders under ``base`` by their ``max_train_steps`` (folders are named by content:
    ``<base model>-<steps>steps-<key>``)."""
    return {int(f.name.split("-")[1].removesuffix("steps")): f for f in sorted(base.iterdir()) if f.is_dir()}


def test_stage_trains_saves_and_reruns_from_its_checkpoint(tmp_path, monkeypatch):
    from diffusion_bunny.pipeline.status import format_status, resolve_runs, status_table
    from diffusion_bunny.stages import PIPELINE, run_stage
    from diffusion_bunny.stages.generate import STAGE as GENERATE
    from diffusion_bunny.stages.generate.stage import checkpoint_dir as drawn_with

    monkeypatch.setenv("DIFFUSION_BUNNY_LOG_DIR", str(tmp_path / "log"))
    run = make_run(tmp_path, n_train=5, n_val=1)
    overrides = fast_overrides(tmp_path, validation_every=2)
    cfg = load_config(None, overrides, root=tmp_path)
    tables = run_stage(run, "train", cfg, progress=False)
    log, validation = tables["training_log"], tables["training_validation"]
    assert log["step"].to_list() == [1, 2, 3, 4]
    assert log["loss"].is_finite().all() and (log["lr"] == 1e-4).all()
    assert validation["step"].to_list() == [0, 2, 4]
    # One folder per training, named by what it trains (never by the run folder's name).
    (out,) = (tmp_path / "lora").iterdir()
    assert out.name.startswith("tiny-4steps-") and len(out.name) == len("tiny-4steps-") + 12
    check_tensorboard(tmp_path / "log" / "tensorboard" / tensorboard_name(out), log, validation, size=64)
    assert all(Path(p).is_file() for p in validation["path"])
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    assert (out / f"{out.name}_kohya.safetensors").is_file()
    # Every checkpoint keeps its LoRA weights; only the newest keeps the optimizer state.
    assert (out / "checkpoint-2" / "pytorch_lora_weights.safetensors").is_file()
    assert not (out / "checkpoint-2" / "training_state.pt").exists()
    assert (out / "checkpoint-4" / "training_state.pt").is_file()
    facts = run.read_manifest("train")["facts"]
    assert facts["family"] == "sd1" and facts["resolution"] == 64 and facts["resumed_from"] is None
    check_figures(log, validation)
    assert len(facts["buckets"]) >= 2  # landscape, portrait and square images
    latents = sorted((run.run_dir / "cache" / "latents").iterdir())
    assert len(latents) == 5
    stamps = [p.stat().st_mtime_ns for p in latents]
    first = {p.relative_to(out): p.read_bytes() for p in out.rglob("*.safetensors")}

    # More steps: a folder of its own (the 4-step LoRA stays as it was), continued from the
    # 4-step training's last checkpoint, every cached latent reused.
    six = {**overrides, "train.max_train_steps": 6}
    cfg = load_config(None, six, root=tmp_path)
    tables = run_stage(run, "train", cfg, progress=False)
    log = tables["training_log"]
    assert log["step"].to_list() == [1, 2, 3, 4, 5, 6]
    facts = run.read_manifest("train")["facts"]
    assert facts["resumed_from"] == 4 and facts["resumed_from_folder"] == str(out)
    assert "resumed from checkpoint-4 of tiny-4steps-" in PIPELINE.get("train").summary(
        run.read_manifest("train")
    )
    longer = lora_dirs(tmp_path / "lora")[6]
    check_tensorboard(
        tmp_path / "log" / "tensorboard" / tensorboard_name(longer), log, tables["training_validation"], 64
    )
    assert [p.stat().st_mtime_ns for p in sorted((run.run_dir / "cache" / "latents").iterdir())] == stamps
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*.safetensors")} == first

    # Other settings (rank) train into a folder of their own; the earlier LoRAs and
    # their checkpoints are kept byte for byte, and stage 08 draws with the new one.
    cfg = load_config(None, {**overrides, "train.rank": 2}, root=tmp_path)
    with pytest.warns(UserWarning, match=r"earlier one\(s\) in .* are kept"):
        tables = run_stage(run, "train", cfg, progress=False)
    assert tables["training_log"]["step"].to_list() == [1, 2, 3, 4]
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*.safetensors")} == first
    loras = tables["loras"]
    rank2 = Path(loras.filter(pl.col("current"))["folder"][0])
    assert (rank2 / "pytorch_lora_weights.safetensors").is_file() and rank2 not in (out, longer)
    assert loras.select("name", "steps", "current").rows() == [
        (out.name, 4, False),
        (longer.name, 6, False),
        (rank2.name, 4, True),
    ]
    assert drawn_with(run, GENERATE.view(cfg)) == rank2
    check_tensorboard(
        tmp_path / "log" / "tensorboard" / tensorboard_name(rank2),
        tables["training_log"],
        tables["training_validation"],
        64,
    )
    # bunny status lists every LoRA kept, the current one marked.
    text = format_status(status_table(PIPELINE, resolve_runs(run.run_dir, cfg), cfg))
    assert (
        f"kept: {out.name}: 4 steps, tiny; LoRA " in text
        and f"kept: {rank2.name}: 4 steps, tiny; LoRA " in text
    )
    assert text.count("<- current") == 1

    # Back to the six-step settings: their folder is done (nothing to train), and current again.
    cfg = load_config(None, six, root=tmp_path)
    tables = run_stage(run, "train", cfg, progress=False)
    assert run.read_manifest("train")["facts"]["resumed_from"] == 6
    assert tables["loras"].filter(pl.col("current"))["folder"].to_list() == [str(longer)]
    assert drawn_with(run, GENERATE.view(cfg)) == longer

    # A limit on the checkpoints (diffusers' checkpoints_total_limit) applies on the next run,
    # the oldest going first; the newest keeps its state, so the folder still resumes.
    cfg = load_config(None, {**six, "train.checkpoints_total_limit": 1}, root=tmp_path)
    run_stage(run, "train", cfg, progress=False)
    assert sorted(c.name for c in longer.glob("checkpoint-*")) == ["checkpoint-6"]
    assert (longer / "checkpoint-6" / "training_state.pt").is_file()

    # train.start_over is the one way to delete a LoRA: this training's, and only it.
    cfg = load_config(None, {**six, "train.start_over": True}, root=tmp_path)
    with pytest.warns(UserWarning, match=r"train.start_over: the earlier LoRA .* was removed"):
        log = run_stage(run, "train", cfg, progress=False)["training_log"]
    assert (
        log["step"].to_list() == [1, 2, 3, 4, 5, 6]
        and run.read_manifest("train")["facts"]["resumed_from"] is None
    )
    assert (rank2 / "pytorch_lora_weights.safetensors").is_file()
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*.safetensors")} == first


def test_tensorboard_off_writes_no_events_and_a_resume_purges_the_steps_it_redoes(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from diffusion_bunny.stages.train.data import read_dataset
    from diffusion_bunny.stages.train.lora import train_lora

    monkeypatch.setenv("DIFFUSION_BUNNY_LOG_DIR", str(tmp_path / "log"))
    run = make_run(tmp_path, n_train=3, n_val=0)
    images, _ = read_dataset(run.run_dir, run.read_table("dataset_items"))
    logs = {}
    for on in (False, True):
        cfg = training_cfg(
            max_train_steps=4, checkpoint_every=2, train_batch_size=1, tensorboard=on, keep_resumable=2
        )
        result = train_lora(images, cfg, tmp_path / f"lora_{on}", progress=False, cache_dir=tmp_path / "c")
        logs[on] = result.log.drop("elapsed_s")
    # The tracker changes nothing in the table the report reads, and off means no event file.
    assert logs[False].equals(logs[True]) and logs[False].height == 4
    board = tmp_path / "log" / "tensorboard"
    assert sorted(p.name for p in board.iterdir()) == [tensorboard_name(tmp_path / "lora_True")]

    # Fewer steps: training resumes from checkpoint-2 and redoes step 3; TensorBoard shows it once.
    cfg = training_cfg(max_train_steps=3, checkpoint_every=2, train_batch_size=1, keep_resumable=2)
    result = train_lora(images, cfg, tmp_path / "lora_True", progress=False, cache_dir=tmp_path / "c")
    assert result.resumed_from == 2
    check_tensorboard(
        board / tensorboard_name(tmp_path / "lora_True"), result.log, result.validation, size=64
    )
    raw = EventAccumulator(str(board / tensorboard_name(tmp_path / "lora_True")), purge_orphaned_data=False)
    raw.Reload()
    assert [e.step for e in raw.Scalars("loss")] == [1, 2, 3, 4, 3]  # what the purge hides

    assert load_config(None, {"train.tensorboard": False}, root=tmp_path).train.tensorboard is False
    with pytest.raises(ConfigError, match=r"train\.tensorboard"):
        load_config(None, {"train.tensorboard": "sometimes"}, root=tmp_path)


def test_a_moved_run_folder_names_its_own_lora_and_validation_pictures(tmp_path):
    """A run trained into its own ``loras/`` and then moved: notebook 07 named the old folder's
    LoRA ("LoRA in /old/run/loras/..."), drew every validation picture as a grey box, and its
    last cell failed (``FileNotFoundError`` on the old ``output_dir``). The facts and the
    validation table name files relative to the run folder now; nothing is trained again."""
    from diffusion_bunny.stages import run_stage, stage_state, summary
    from diffusion_bunny.stages.train import kept
    from diffusion_bunny.stages.train.plots import validation_grid

    (tmp_path / "old").mkdir()
    run = make_run(tmp_path / "old", n_train=3, n_val=0)
    overrides = fast_overrides(tmp_path, validation_every=2)
    del overrides["train.output_dir"]  # the run folder's own loras/
    cfg = load_config(None, overrides, root=tmp_path)
    run_stage(run, "train", cfg, progress=False)
    facts = run.read_manifest("train")["facts"]
    assert facts["output_dir"] == facts["lora_folder"] and facts["output_dir"].startswith("loras/")
    old = run.run_dir
    run = Run.open(shutil.move(run.run_dir, tmp_path / "moved"))
    assert stage_state(run, "train", cfg) == ("done", "up to date")
    validation = run_stage(run, "train", cfg, progress=False)["training_validation"]
    facts = run.read_manifest("train")["facts"]
    out = run.run_dir / facts["output_dir"]
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    assert (run.run_dir / facts["kohya_path"]).is_file()
    line = summary(run, "train")
    assert f"LoRA in {out / 'pytorch_lora_weights.safetensors'}" in line and str(old) not in line
    assert validation.height and all((run.run_dir / p).is_file() for p in validation["path"])
    grid = validation_grid(validation, run.run_dir, thumb=40)
    first = Image.open(run.run_dir / validation["path"][0]).convert("RGB").resize((40, 40))
    tile = np.asarray(grid.crop((90, 36, 130, 76)), dtype=int)
    assert np.abs(tile - np.asarray(first, dtype=int)).max() == 0  # the picture, not a grey box
    assert any(str(out) in line for line in kept(run, cfg))


def check_figures(log: pl.DataFrame, validation: pl.DataFrame) -> None:
    """The notebook's figures: the loss curve (points + running mean) and the validation grid
    (a row per step, a column per prompt; a missing picture becomes a grey box, not an error)."""
    from diffusion_bunny.stages.train.plots import loss_curve_plot, validation_grid

    plot = loss_curve_plot(log.with_columns(prior_loss=pl.col("loss") / 2))
    assert set(plot.data["series"]) == {"training loss", "prior (class images) loss"}
    assert plot.draw() is not None
    grid = validation_grid(validation, thumb=40)
    assert grid.size == (90 + 40, 36 + 3 * 40)
    first = Image.open(validation["path"][0]).convert("RGB").resize((40, 40))
    assert (
        np.abs(np.asarray(grid.crop((90, 36, 130, 76)), dtype=int) - np.asarray(first, dtype=int)).max() == 0
    )
    Path(validation["path"][1]).unlink()
    assert (
        np.asarray(validation_grid(validation, thumb=40).crop((95, 36 + 40 + 20, 100, 36 + 40 + 25))).min()
        > 200
    )


RESUME_SCRIPT = textwrap.dedent(
    """
    import sys
    from diffusion_bunny.config import load_config
    from diffusion_bunny.pipeline.run import Run
    from diffusion_bunny.stages import run_stage

    overrides = dict(arg.split("=", 1) for arg in sys.argv[2:])
    overrides = {k: (int(v) if v.isdigit() else v) for k, v in overrides.items()}
    run_stage(Run.open(sys.argv[1]), "train", load_config(None, overrides), progress=False)
    """
)


def test_killed_run_resumes_from_its_latest_checkpoint(tmp_path, monkeypatch):
    from diffusion_bunny.stages import run_stage

    monkeypatch.setenv("DIFFUSION_BUNNY_LOG_DIR", str(tmp_path / "log"))  # the killed child's too

    run = make_run(tmp_path, n_train=4, n_val=0)
    overrides = fast_overrides(tmp_path, max_train_steps=400, checkpoint_every=3)
    args = [f"{k}={v}" for k, v in overrides.items()]
    script = tmp_path / "train.py"
    script.write_text(RESUME_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), str(run.run_dir), *args], start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        # Any checkpoint's state: with keep_resumable 1 the first one's is gone once the second
        # is written, which on a quiet machine can happen between two looks.
        while not list((tmp_path / "lora").glob("*/checkpoint-*/training_state.pt")):
            assert proc.poll() is None, "training ended before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint within 240 s"
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    (out,) = (tmp_path / "lora").iterdir()
    done = max(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    assert 3 <= done < 400 and not run.has_table("training_log")
    assert not (out / "pytorch_lora_weights.safetensors").exists()
    # Only the newest checkpoint keeps its optimizer state (keep_resumable: 1).
    assert [
        c.name for c in out.glob("checkpoint-*/training_state.pt") if c.parent.name != f"checkpoint-{done}"
    ] == []

    # A rerun with a few more steps than were done trains into a folder of its own (another
    # max_train_steps), continued from the killed training's newest checkpoint.
    final = done + 2
    cfg = load_config(None, {**overrides, "train.max_train_steps": final}, root=tmp_path)
    log = run_stage(run, "train", cfg, progress=False)["training_log"]
    facts = run.read_manifest("train")["facts"]
    assert facts["resumed_from"] == done and facts["resumed_from_folder"] == str(out)
    assert log["step"].to_list() == list(range(1, final + 1))
    finished = Path(facts["lora_folder"])
    assert finished != out and (finished / "pytorch_lora_weights.safetensors").is_file()
    # TensorBoard: the new run continues the killed one's events, what it logged after checkpoint
    # `done` purged; each step once.
    check_tensorboard(
        tmp_path / "log" / "tensorboard" / tensorboard_name(finished),
        log,
        run.read_table("training_validation"),
        64,
    )
    # The newest checkpoint (the one resumable state) removed to free space: the rerun stops in
    # one line before any model loads. It trained from step 0 over the finished LoRA.
    lora = (finished / "pytorch_lora_weights.safetensors").read_bytes()
    for state in (tmp_path / "lora").glob("*/checkpoint-*/training_state.pt"):  # the killed one's too
        shutil.rmtree(state.parent)
    with pytest.raises(StageError, match=r"holds the finished LoRA.* but no training state to resume from"):
        run_stage(run, "train", cfg, progress=False, force=True)
    assert (finished / "pytorch_lora_weights.safetensors").read_bytes() == lora


def test_empty_dataset_and_missing_inputs_fail_in_one_line(tmp_path):
    from diffusion_bunny.stages import run_stage

    cfg = load_config(None, fast_overrides(tmp_path), root=tmp_path)
    movie = tmp_path / "m.mp4"
    movie.write_bytes(b"x")
    run = Run.create(tmp_path / "run", movie)
    with pytest.raises(StageError, match=r"table 'dataset_items' is missing.*run stage export"):
        run_stage(run, "train", cfg, progress=False)
    make_dataset(run.run_dir, n_train=0, n_val=2)
    with pytest.raises(StageError, match="no training images"):
        run_stage(run, "train", cfg, progress=False)
    make_dataset(run.run_dir, n_train=2, n_val=0)
    (run.run_dir / "dataset" / "hf" / "train" / "train_001.jpg").unlink()
    with pytest.raises(BadInputError, match=r"train_001\.jpg is missing"):
        run_stage(run, "train", cfg, progress=False)
    assert not (tmp_path / "lora").exists() and not (run.run_dir / "cache").exists()


def test_missing_base_model_names_the_setting(tmp_path, monkeypatch):
    from diffusion_bunny.models.diffusion import load_pipeline, resolve_base_model
    from diffusion_bunny.stages import run_stage

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run = make_run(tmp_path, n_train=2, n_val=0)
    cfg = load_config(
        None, {**fast_overrides(tmp_path), "train.base_model": "someone/not-cached"}, root=tmp_path
    )
    with pytest.raises(ModelError, match=r"train\.base_model = 'someone/not-cached' is not in the local"):
        run_stage(run, "train", cfg, progress=False)
    assert not (run.run_dir / "cache").exists()  # failed before any image was encoded
    with pytest.raises(ModelError, match=r"train\.base_model = '\./nowhere': no such folder"):
        resolve_base_model("./nowhere")
    (tmp_path / "notamodel").mkdir()
    with pytest.raises(ModelError, match="not a diffusers pipeline folder of a supported family"):
        resolve_base_model(str(tmp_path / "notamodel"))
    with pytest.raises(ModelError, match=r"is an sd1 model but generate\.family = sdxl"):
        resolve_base_model(str(resolve_base_model("tiny").path), "sdxl", setting="generate.base_model")
    # A damaged weight file: one line naming the setting, not a safetensors traceback.
    broken = tmp_path / "broken_model"
    shutil.copytree(resolve_base_model("tiny").path, broken)
    for weights in (broken / "unet").glob("*.safetensors"):
        weights.write_bytes(b"damaged")
    with pytest.raises(ModelError, match=r"train\.base_model = .*could not be loaded"):
        load_pipeline(str(broken))
    # A relative folder of a settings file starts from the workspace, also from a stage kernel,
    # which works in notebook/ (models/sd was read as the hub id "models/sd" there).
    workspace = tmp_path / "workspace"
    shutil.copytree(resolve_base_model("tiny").path, workspace / "models" / "sd")
    (tmp_path / "notebook").mkdir()
    monkeypatch.setenv("DIFFUSION_BUNNY_WORKSPACE", str(workspace))
    monkeypatch.chdir(tmp_path / "notebook")
    local = resolve_base_model("models/sd")
    assert (local.source, local.path) == ("local", workspace / "models" / "sd")


def test_tiny_presets_are_the_same_every_time(tmp_path):
    from transformers import CLIPTokenizer

    from diffusion_bunny.models.diffusion import resolve_base_model
    from diffusion_bunny.models.tiny import build_tiny_pipeline

    ref = resolve_base_model("tiny")
    assert ref.source == "preset" and ref.family == "sd1"
    tokenizer = CLIPTokenizer.from_pretrained(ref.path / "tokenizer")
    assert tokenizer.model_max_length == 77
    assert len(tokenizer("cat").input_ids) == 3  # start, the merged word, end (BPE merges applied)
    assert resolve_base_model("tiny", "sdxl").name == "tiny-sdxl"
    again = build_tiny_pipeline(tmp_path / "again", "sd1")
    for part in ("unet", "vae", "text_encoder"):
        (a,) = (ref.path / part).glob("*.safetensors")
        (b,) = (again / part).glob("*.safetensors")
        assert a.read_bytes() == b.read_bytes(), part


def test_sdxl_prior_preservation_text_encoder_min_snr_accumulation(tmp_path):
    """The optional paths together on the SDXL preset: LoRA on both text encoders, gradient
    accumulation and checkpointing, Min-SNR weighting, prior preservation with generated class
    images, bf16 mixed precision (on the CPU)."""
    from safetensors import safe_open

    from diffusion_bunny.models.diffusion import load_lora, load_pipeline
    from diffusion_bunny.stages.train.data import read_dataset
    from diffusion_bunny.stages.train.lora import train_lora

    make_dataset(tmp_path, n_train=3, n_val=0)
    images, _ = read_dataset(tmp_path, pl.read_parquet(tmp_path / "tables" / "dataset_items.parquet"))
    cfg = training_cfg(
        base_model="tiny-sdxl",
        max_train_steps=2,
        checkpoint_every=1,
        train_batch_size=1,
        gradient_accumulation_steps=2,
        train_text_encoder=True,
        gradient_checkpointing=True,
        min_snr_gamma=5.0,
        prior_preservation=True,
        class_prompt="a photo of a cat",
        num_class_images=2,
        mixed_precision="bf16",
    )
    result = train_lora(images, cfg, tmp_path / "out", progress=False)
    assert result.log["step"].to_list() == [1, 2]
    assert result.log["prior_loss"].is_not_null().all()
    assert result.facts["family"] == "sdxl" and result.facts["class_images"] == 2
    assert result.facts["mixed_precision"] == "bf16" and result.log["loss"].is_finite().all()
    with safe_open(str(result.lora_path), "pt") as f:
        prefixes = {k.split(".")[0] for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    assert prefixes == {"unet", "text_encoder", "text_encoder_2"}
    with safe_open(str(result.kohya_path), "pt") as f:
        kohya = {k.split("_")[1] for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    assert kohya == {"unet", "te1", "te2"}  # the comparison stood in the comment, never made
    pipe = load_pipeline("tiny-sdxl")
    load_lora(pipe, result.lora_path)
    image = pipe("bunnystyle", num_inference_steps=2, height=64, width=64).images[0]
    assert image.size == (64, 64)


def test_notebook_07_runs_headless_on_demo_frames(demo_run, tmp_path):
    import nbformat

    from diffusion_bunny.pipeline.runner import RunOptions, execute_stage_notebook

    frames = demo_run.read_table("frames")
    paths = [demo_run.run_dir / p for p in frames["path"].to_list()[:6]]
    run = Run.create(tmp_path / "demo_copy", demo_run.movie)
    make_dataset(run.run_dir, n_train=5, n_val=1, images=paths)
    overrides = fast_overrides(tmp_path, max_train_steps=4, validation_every=2)
    options = RunOptions(PIPELINE, load_config(None, overrides), overrides=overrides, progress=False)
    target = execute_stage_notebook(run, "train", options, "python3")
    nb = nbformat.read(target, as_version=4)
    text = "\n".join(
        out.get("text", "")
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
    )
    assert "4 steps on 5 images" in text and "pytorch_lora_weights.safetensors" in text
    # Only the newest checkpoint keeps the optimizer state (train.keep_resumable: 1).
    assert "checkpoint-2/ (LoRA)\n" in text and "checkpoint-4/ (LoRA + optimizer state)\n" in text
    images = pictures(nb)
    assert len(images) >= 2  # the loss curve and the validation grid
    assert run.read_table("training_validation")["step"].to_list() == [0, 2, 4]


def test_class_images_from_a_folder(tmp_path):
    from diffusion_bunny.stages.train.lora import class_images

    folder = tmp_path / "class"
    cfg = training_cfg(prior_preservation=True, class_prompt="a photo of a cat", class_data_dir=str(folder))
    with pytest.raises(BadInputError, match=r"train\.class_data_dir = .* is not a folder"):
        class_images(None, cfg, 64)
    folder.mkdir()
    (folder / "notes.txt").write_text("not an image")
    with pytest.raises(BadInputError, match="holds no images"):
        class_images(None, cfg, 64)
    for i in range(3):
        write_image(folder / f"{i}.png", (64, 64), i)
    found = class_images(None, cfg.model_copy(update={"num_class_images": 2}), 64)
    assert [p.path.name for p in found] == ["0.png", "1.png"] and {p.text for p in found} == {
        "a photo of a cat"
    }
    # One that does not open is one line now, naming the setting: it stopped the training at the
    # step its batch came up, saying to rerun stage export.
    (folder / "1.png").write_bytes(b"<html>hotlink blocked</html>")
    with pytest.raises(
        BadInputError, match=r"class image .*1\.png in train\.class_data_dir cannot be read \("
    ):
        class_images(None, cfg, 64)
    with pytest.raises(StageError, match="class images need the base model"):
        class_images(None, cfg.model_copy(update={"class_data_dir": None}), 64)


KILL_AT_LORA_RENAME = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    import diffusion_bunny.pipeline.atomic as atomic
    from diffusion_bunny.config import load_config
    from diffusion_bunny.pipeline.run import Run
    from diffusion_bunny.stages import run_stage

    real = os.replace
    def replace(src, dst):
        if Path(dst).name == "pytorch_lora_weights.safetensors" and ".tmp-" in Path(src).name:
            os.kill(os.getpid(), signal.SIGKILL)  # the new file complete, its rename not done
        real(src, dst)
    atomic.os.replace = replace
    overrides = dict(arg.split("=", 1) for arg in sys.argv[2:])
    overrides = {k: (int(v) if v.isdigit() else v) for k, v in overrides.items()}
    run_stage(Run.open(sys.argv[1]), "train", load_config(None, overrides), force=True, progress=False)
    """
)


def test_final_lora_file_is_replaced_atomically_and_a_killed_writes_leftovers_swept(tmp_path):
    """Killed between writing the new LoRA file and renaming it, the previous LoRA
    stays whole; the next run sweeps the dead process's temporaries and writes the file again (a
    LoRA folder holds one training, so the file it writes again holds the same weights)."""
    from diffusion_bunny.stages import run_stage

    run = make_run(tmp_path, n_train=2, n_val=0)
    overrides = fast_overrides(tmp_path, max_train_steps=2, checkpoint_every=100)
    cfg = load_config(None, overrides, root=tmp_path)
    run_stage(run, "train", cfg, progress=False)
    (folder,) = (tmp_path / "lora").iterdir()
    lora = folder / "pytorch_lora_weights.safetensors"
    before = lora.read_bytes()
    script = tmp_path / "kill.py"
    script.write_text(KILL_AT_LORA_RENAME)
    args = [f"{k}={v}" for k, v in overrides.items()]
    killed = subprocess.run(
        [sys.executable, str(script), str(run.run_dir), *args], capture_output=True, text=True
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert lora.read_bytes() == before
    leftovers = [p.name for p in lora.parent.rglob(".*") if ".tmp-" in p.name]
    assert leftovers, "the kill point was not reached"
    run_stage(run, "train", cfg, force=True, progress=False)
    assert [p.name for p in lora.parent.rglob(".*") if ".tmp-" in p.name] == []
    from safetensors.torch import load, load_file

    # The same weights (the header's metadata holds a set of layer names, in any order).
    again, first = load_file(lora), load(before)
    assert again.keys() == first.keys() and all(torch.equal(again[k], first[k]) for k in first)


# ---------------------------------------------------------------------------------------------
# Checkpoints that fit, one training per folder, state files that cannot run code


def test_a_training_that_will_not_fit_on_the_disk_stops_before_its_first_step(tmp_path, monkeypatch):
    from diffusion_bunny.errors import StorageError
    from diffusion_bunny.pipeline import atomic
    from diffusion_bunny.stages import run_stage

    run = make_run(tmp_path, n_train=3, n_val=0)
    cfg = load_config(None, fast_overrides(tmp_path), root=tmp_path)
    monkeypatch.setattr(atomic, "free_bytes", lambda path: 2000)
    with pytest.raises(StorageError) as err:
        run_stage(run, "train", cfg, progress=False)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"not enough disk space in {tmp_path / 'lora'}")
    assert "checkpoint(s) of LoRA weights" in message and "2.0 kB free" in message
    assert "train.checkpoints_total_limit" in message and "nothing was trained" in message
    # The LoRA folder made for it is gone again (it was listed as a kept LoRA for good).
    assert list((tmp_path / "lora").iterdir()) == [] and not (run.run_dir / "cache" / "latents").exists()
    assert not run.has_table("training_log")


def test_the_disk_estimate_covers_what_a_training_writes(tmp_path, monkeypatch):
    """The estimate is on the safe side of what a training really writes (checkpoints, states at
    their peak, the LoRA and its kohya copy, validation pictures, latents), and not wildly above."""
    from diffusion_bunny.stages.train import lora as lora_module
    from diffusion_bunny.stages.train.data import read_dataset

    monkeypatch.setenv("DIFFUSION_BUNNY_LOG_DIR", str(tmp_path / "log"))
    run = make_run(tmp_path, n_train=4, n_val=0)
    images, _ = read_dataset(run.run_dir, run.read_table("dataset_items"))
    estimated: list = []
    real_check = lora_module.check_free_space

    def record(needs, advice):
        estimated.extend(needs)
        real_check(needs, advice)

    monkeypatch.setattr(lora_module, "check_free_space", record)
    peak = {"bytes": 0}
    real_prune = lora_module.prune_checkpoints

    def measure(folder, keep, limit):  # the moment a new checkpoint is in and none pruned yet
        peak["bytes"] = max(peak["bytes"], sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()))
        return real_prune(folder, keep, limit)

    monkeypatch.setattr(lora_module, "prune_checkpoints", measure)
    cfg = training_cfg(max_train_steps=6, checkpoint_every=2, validation_every=3, rank=8)
    out, cache = tmp_path / "lora", tmp_path / "cache"
    lora_module.train_lora(images, cfg, out, validation_prompts=["a cat"], progress=False, cache_dir=cache)
    written = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    latents = sum(p.stat().st_size for p in (cache / "latents").iterdir())
    need = {what: size for _, size, what in estimated}
    assert sum(need.values()) >= max(written, peak["bytes"]) + latents
    assert need["cached latents"] >= latents and sum(need.values()) <= 6 * (written + latents)
    # The latents cache is shared by every dataset trained with this VAE: another dataset's
    # files there are not this one's (they were counted as already written).
    for f in (cache / "latents").glob("*.safetensors"):  # now another picture's latents
        f.rename(f.with_name("0" * 24 + f.name[24:]))
    estimated.clear()
    lora_module.train_lora(
        images, cfg, tmp_path / "lora2", validation_prompts=["a cat"], progress=False, cache_dir=cache
    )
    assert {what: size for _, size, what in estimated}["cached latents"] >= latents


def test_a_checkpoint_state_is_read_without_running_code(tmp_path):
    """``torch.load(weights_only=True)``: a state file someone swapped in for one with code in it is
    refused as damaged (and the training starts over), never run."""
    import pickle

    from diffusion_bunny.stages.train.lora import read_checkpoint

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    folder = tmp_path / "checkpoint-2"
    folder.mkdir()
    torch.save({"step": 2, "resume_key": "x"}, folder / "training_state.pt")
    assert read_checkpoint(folder)["step"] == 2
    (folder / "training_state.pt").write_bytes(pickle.dumps({"step": 2, "payload": Payload()}))
    with pytest.raises(Exception):  # noqa: B017 - torch's unpickler refuses it, whatever it calls the error
        read_checkpoint(folder)
    assert not marker.exists()


def test_more_steps_continue_a_run_only_where_the_schedule_does_not_depend_on_the_total():
    """A constant rate (with or without warm-up) is the same at step 30 of a 30- or a 60-step run:
    the longer run continues the shorter one. A linear or cosine rate decays to the total, so the
    30-step run's checkpoint is no start for 60 steps (it would jump back up after step 30)."""
    from diffusion_bunny.stages.train.lora import resume_key

    for schedule, continues in (
        ("constant", True),
        ("constant_with_warmup", True),
        ("linear", False),
        ("cosine", False),
    ):
        short = training_cfg(max_train_steps=30, lr_scheduler=schedule)
        longer = short.model_copy(update={"max_train_steps": 60})
        assert (resume_key(short, "data") == resume_key(longer, "data")) is continues, schedule
        assert resume_key(short, "data") != resume_key(short, "other data")
    # The validation's step count changes nothing a step computes, except where it makes prior
    # preservation's class images (then other steps are other data).
    base = training_cfg(max_train_steps=30)
    assert resume_key(base, "d") == resume_key(
        base.model_copy(update={"validation_inference_steps": 20}), "d"
    )
    prior = base.model_copy(update={"prior_preservation": True, "class_prompt": "a photo of a dog"})
    assert resume_key(prior, "d") != resume_key(
        prior.model_copy(update={"validation_inference_steps": 20}), "d"
    )
    given = prior.model_copy(update={"class_data_dir": "dogs"})
    assert resume_key(given, "d") == resume_key(
        given.model_copy(update={"validation_inference_steps": 20}), "d"
    )


def test_a_full_disk_with_start_over_still_set_says_the_rerun_starts_over(tmp_path):
    """``train.start_over: true`` stays set (a settings file, settings.json, the flags bunny status
    gives back): the storage line said "a rerun resumes from checkpoint-N", and the rerun removed it."""
    import errno

    from diffusion_bunny.stages.train.stage import _storage_advice
    from diffusion_bunny.stages.train.tables import LORA_FILE

    folder = tmp_path / "loras" / "tiny-30steps-abc" / "checkpoint-20"
    folder.mkdir(parents=True)
    (folder / LORA_FILE).write_bytes(b"weights")
    torch.save({"step": 20, "resume_key": "k"}, folder / "training_state.pt")
    full = OSError(errno.ENOSPC, "No space left on device")
    base, lora = tmp_path / "loras", folder.parent
    assert _storage_advice(full, base, lora).endswith("a rerun resumes from checkpoint-20")
    assert _storage_advice(full, base, lora, start_over=True).endswith(
        "set train.start_over back to false first, or a rerun removes checkpoint-20 and starts the "
        "training again"
    )


def test_a_damaged_newest_state_is_set_aside_so_the_states_written_after_it_are_kept(tmp_path):
    """A truncated ``training_state.pt`` in the newest checkpoint (a disk error, a copy of the run
    folder cut short) is skipped, and set aside: left where it was, it stayed the newest state,
    and the pruning that keeps the newest states deleted each good one the rerun wrote below it,
    so every interruption started the training over."""
    from diffusion_bunny.stages.train.lora import _resume_point, checkpoint_steps, prune_checkpoints
    from diffusion_bunny.stages.train.tables import LORA_FILE

    out = tmp_path / "lora"
    for step in (4, 6):
        folder = out / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        (folder / LORA_FILE).write_bytes(b"weights")
        torch.save({"step": step, "resume_key": "k"}, folder / "training_state.pt")
    damaged = out / "checkpoint-6" / "training_state.pt"
    damaged.write_bytes(damaged.read_bytes()[:40])
    warnings: list[str] = []
    state, step, folder = _resume_point(out, [], training_cfg(max_train_steps=10), "k", warnings)
    assert (state["step"], step, folder) == (4, 4, out)
    aside = out / "damaged" / "checkpoint-6-training_state.pt"
    assert len(warnings) == 1 and "checkpoint-6 is damaged" in warnings[0] and str(aside) in warnings[0]
    assert not damaged.exists() and aside.is_file()
    assert checkpoint_steps(out) == [4]
    # The rerun writes checkpoint 5: it is the newest state kept, not the damaged one's.
    (out / "checkpoint-5").mkdir()
    (out / "checkpoint-5" / LORA_FILE).write_bytes(b"weights")
    torch.save({"step": 5, "resume_key": "k"}, out / "checkpoint-5" / "training_state.pt")
    prune_checkpoints(out, keep_resumable=1, total_limit=None)
    assert checkpoint_steps(out) == [5]
    assert (out / "checkpoint-6" / LORA_FILE).is_file()  # its LoRA stays for stage 08
    # The training reaching step 6 again replaces that checkpoint's folder: the state set aside
    # is where the warning said it was kept.
    shutil.rmtree(out / "checkpoint-6")
    assert aside.is_file()
    # train.start_over removes what it sets aside with the LoRA (a state is GBs for SDXL).
    from diffusion_bunny.stages.train.lora import start_over

    assert "damaged/" in start_over(out) and not aside.parent.exists()


HOLD_LORA_FOLDER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from diffusion_bunny.stages.train.lora import lora_lock

    with lora_lock(Path(sys.argv[1])):
        print("held", flush=True)
        time.sleep(120)
    """
)


def test_a_lora_folder_another_training_writes_is_refused_at_once(tmp_path):
    from diffusion_bunny.stages import run_stage
    from diffusion_bunny.stages.train.data import read_dataset
    from diffusion_bunny.stages.train.stage import lora_folder_for

    run = make_run(tmp_path, n_train=2, n_val=0)
    cfg = load_config(None, fast_overrides(tmp_path), root=tmp_path)
    images, _ = read_dataset(run.run_dir, run.read_table("dataset_items"))
    folder, _ = lora_folder_for(run.run_dir, cfg.train, images)
    script = tmp_path / "hold.py"
    script.write_text(HOLD_LORA_FOLDER)
    holder = subprocess.Popen([sys.executable, str(script), str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(StageError) as err:  # at once: the lock is tried, never waited for
            run_stage(run, "train", cfg, progress=False)
    finally:
        holder.kill()
        holder.wait()
    message = str(err.value)
    assert "\n" not in message and f"the LoRA folder {folder} is being trained by " in message
    assert f"process {holder.pid} on " in message
    assert not list(folder.glob("checkpoint-*"))
    run_stage(run, "train", cfg, progress=False)  # the holder gone, the folder trains
    assert (folder / "pytorch_lora_weights.safetensors").is_file()


# ---------------------------------------------------------------------------------------------
# A full disk under stage 07's writers (a tmpfs as root, else the errors injected: test/small_disk.py)


@pytest.mark.parametrize("when", ["latents", "checkpoint", "lora"])
def test_a_full_disk_during_training_is_one_line_and_the_rerun_resumes(when, tmp_path, monkeypatch):
    """The disk fills while the latents are cached, while a checkpoint is written (after the first
    one), or while the final LoRA is written: one line naming the file and what may be freed, no
    partial file left to be taken for a latent, a checkpoint or the LoRA, and once space is freed
    the rerun resumes from the last checkpoint."""
    from small_disk import inject_full_disk, small_disk

    from diffusion_bunny.errors import StorageError
    from diffusion_bunny.stages import run_stage
    from diffusion_bunny.stages.train import lora as lora_module

    monkeypatch.setenv("DIFFUSION_BUNNY_LOG_DIR", str(tmp_path / "log"))
    with small_disk(tmp_path, 64 << 20) as disk, pytest.MonkeyPatch.context() as mp:
        root = disk.root if disk else tmp_path / "disk"
        root.mkdir(exist_ok=True)
        run = make_run(root, n_train=2, n_val=0)  # both latents cached by the second step
        cfg = load_config(
            None, {**fast_overrides(root), "train.output_dir": str(root / "lora")}, root=tmp_path
        )

        def fill() -> None:
            if disk:
                disk.fill(leave=0)
            else:
                inject_full_disk(mp, root)

        # The estimate is checked on its own (test_a_training_that_will_not_fit...): here the disk
        # fills after it said yes, as when another program writes meanwhile.
        mp.setattr(lora_module, "check_free_space", lambda needs, advice: None)
        calls = {"n": 0}
        real_prune = lora_module.prune_checkpoints

        def prune(folder, keep, limit):
            out = real_prune(folder, keep, limit)
            calls["n"] += 1  # 1: before the first step (folder held), 2: after checkpoint-2, 3: after -4
            if calls["n"] == {"latents": 1, "checkpoint": 2, "lora": 3}[when]:
                fill()
            return out

        mp.setattr(lora_module, "prune_checkpoints", prune)
        with pytest.raises(StorageError) as err:
            run_stage(run, "train", cfg, progress=False)
        message = str(err.value)
        assert "\n" not in message and "No space left on device (" in message and "free there" in message
        assert "train.checkpoints_total_limit" in message and ".tmp-" not in message
        # Stopped before its first checkpoint, the training leaves no LoRA folder (nothing to keep).
        folders = list((root / "lora").iterdir())
        assert len(folders) == (when != "latents")
        folder = folders[0] if folders else root / "lora" / "none"
        written = {
            "latents": f"could not write {run.run_dir}/cache/latents/",
            "checkpoint": f"could not write {folder}/checkpoint-4/",
            "lora": f"could not write {folder}/pytorch_lora_weights.safetensors",
        }
        assert message.startswith(written[when]), message
        resumes = {
            "latents": "a rerun starts the training again",
            "checkpoint": "a rerun resumes from checkpoint-2",
        }
        assert message.endswith(resumes.get(when, "a rerun resumes from checkpoint-4")), message
        assert [p for p in root.rglob(".*") if ".tmp-" in p.name] == []
        assert not (folder / "pytorch_lora_weights.safetensors").exists()
        assert (
            sorted(c.name for c in folder.glob("checkpoint-*"))
            == {
                "latents": [],
                "checkpoint": ["checkpoint-2"],
                "lora": ["checkpoint-2", "checkpoint-4"],
            }[when]
        )
        for latent in (run.run_dir / "cache" / "latents").glob("*.safetensors"):
            from safetensors.torch import load_file

            assert load_file(latent)["parameters"].numel()  # whole, or not there at all
        if disk:
            disk.empty()
        mp.undo()
        run_stage(run, "train", cfg, progress=False)
        facts = run.read_manifest("train")["facts"]
        assert facts["resumed_from"] == {"latents": None, "checkpoint": 2, "lora": 4}[when]
        folder = Path(facts["lora_folder"])
        assert list((root / "lora").iterdir()) == [folder]
        assert (folder / "pytorch_lora_weights.safetensors").is_file()


def test_stage_08_draws_with_the_current_lora_of_a_run_folder_that_was_moved(tmp_path):
    """The loras table holds absolute folders: a run folder copied or moved elsewhere finds its
    current LoRA folder in its own loras/ by name, not in the old place and not nowhere."""
    import polars as pl

    from diffusion_bunny.stages.train.tables import current_lora_dir

    old = tmp_path / "old" / "loras" / "tiny-30steps-abc"
    other = tmp_path / "old" / "loras" / "tiny-60steps-def"
    for folder in (old, other):
        folder.mkdir(parents=True)
    loras = pl.DataFrame({"folder": [str(other), str(old)], "current": [False, True]})
    assert current_lora_dir(tmp_path / "old" / "loras", loras) == old
    moved = tmp_path / "new" / "loras"
    (moved / old.name).mkdir(parents=True)
    (moved / other.name).mkdir(parents=True)
    assert current_lora_dir(moved, loras) == moved / old.name
    # The current one gone from the moved folder: its own base, as for a training output.
    (moved / old.name).rmdir()
    assert current_lora_dir(moved, loras) == moved
    assert current_lora_dir(moved, None) == moved


def test_a_resumed_run_with_prior_preservation_trains_on_the_class_images_an_uninterrupted_one_does(tmp_path):
    """After a resume, the class images went on from an estimate that took every batch as full:
    3 pictures in batches of 2 make batches of 2 and 1, and the resumed run paired its pictures
    with other class images than a run that never stopped (another LoRA). The place is kept."""
    from safetensors.numpy import load_file

    from diffusion_bunny.stages import run_stage

    folder = tmp_path / "class"
    folder.mkdir()
    for i in range(5):
        write_image(folder / f"{i}.png", (64, 64), 40 + i)
    prior = {
        "prior_preservation": True,
        "class_prompt": "a photo of a cat",
        "class_data_dir": str(folder),
        "num_class_images": 5,
        "train_batch_size": 2,
        "lr_scheduler": "constant",
    }

    def train(name: str, steps: int) -> dict:
        if not (tmp_path / name).exists():
            (tmp_path / name).mkdir()
            make_run(tmp_path / name, n_train=3, n_val=0)
        run = Run.open(tmp_path / name / "run")
        overrides = fast_overrides(tmp_path / name, max_train_steps=steps, checkpoint_every=2, **prior)
        run_stage(run, "train", load_config(None, overrides, root=tmp_path), progress=False)
        lora = Path(run.read_manifest("train")["facts"]["lora_folder"]) / "pytorch_lora_weights.safetensors"
        return load_file(lora)

    whole = train("whole", 6)
    train("resumed", 3)  # batches of 2, 1 and 2 pictures: 5 class images used, not 6
    resumed = train("resumed", 6)
    assert Run.open(tmp_path / "resumed" / "run").read_manifest("train")["facts"]["resumed_from"] == 3
    assert whole.keys() == resumed.keys()
    assert all(np.array_equal(whole[k], resumed[k]) for k in whole)


def test_event_files_stamped_ahead_of_the_clock_are_not_waited_for(tmp_path, monkeypatch):
    """After the clock stepped back (a VM restored from a snapshot), resuming waited until the
    killed run's event-file second came round again: hours, without a word."""
    from diffusion_bunny.stages.train import lora

    def no_wait(seconds):
        raise AssertionError("waited for a second an hour away")

    ahead = int(time.time()) + 3600
    (tmp_path / f"events.out.tfevents.{ahead}.host.1.0").write_bytes(b"")
    monkeypatch.setattr(lora.time, "sleep", no_wait)
    lora.wait_past_event_files(tmp_path)


def test_two_lora_folders_of_one_name_keep_their_own_tensorboard_events(tmp_path, monkeypatch):
    """Two ``--out`` folders training the same movie with the same settings have LoRA folders of
    one name; the second training (starting at step 0) wiped the first's event files."""
    from diffusion_bunny.stages.train.data import read_dataset
    from diffusion_bunny.stages.train.lora import train_lora

    monkeypatch.setenv("DIFFUSION_BUNNY_LOG_DIR", str(tmp_path / "log"))
    run = make_run(tmp_path, n_train=2, n_val=0)
    images, _ = read_dataset(run.run_dir, run.read_table("dataset_items"))
    cfg = training_cfg(max_train_steps=2, checkpoint_every=2, train_batch_size=1, tensorboard=True)
    first, second = tmp_path / "a" / "tiny-2steps-same", tmp_path / "b" / "tiny-2steps-same"
    logs = [train_lora(images, cfg, f, progress=False, cache_dir=tmp_path / "c").log for f in (first, second)]
    board = tmp_path / "log" / "tensorboard"
    runs = sorted(board.iterdir())
    assert [p.name for p in runs] == sorted(tensorboard_name(f) for f in (first, second))
    assert all(p.name.startswith("tiny-2steps-same-") for p in runs)
    for out, log in zip((first, second), logs, strict=True):
        steps = [step for step, _ in tensorboard_events(board / tensorboard_name(out))["loss"]]
        assert steps == log["step"].to_list() == [1, 2]


def test_gradient_checkpointing_and_cached_latents_change_neither_the_key_nor_a_default_runs_key():
    """Neither changes what a step computes: turning gradient checkpointing on (or latents
    caching off) after a kill started the training over in a new folder. The key of a run at the
    defaults is the one earlier versions wrote (its LoRA folder is found again)."""
    from diffusion_bunny.stages.train.lora import resume_key

    assert resume_key(TrainSettings(), "d") == "0a398d1c20f376d8"  # written by earlier versions
    base = training_cfg(max_train_steps=30)
    for update in ({"gradient_checkpointing": True}, {"cache_latents": False}):
        assert resume_key(base.model_copy(update=update), "d") == resume_key(base, "d"), update
    assert resume_key(base.model_copy(update={"rank": 8}), "d") != resume_key(base, "d")


def test_a_lora_folder_made_under_the_key_of_earlier_versions_is_found_again(tmp_path):
    """A run with gradient_checkpointing on (or a flow key on an SD model) made before those left
    the key had another key: it found no folder and trained again from step 0. The keys earlier
    versions wrote for these settings (computed by them) are taken too."""
    from diffusion_bunny.stages.train.lora import resume_keys
    from diffusion_bunny.stages.train.tables import (
        earlier_resume_keys,
        lora_folder,
        lora_key,
        resumable_folders,
    )

    earlier = {
        "gradient_checkpointing": ({"gradient_checkpointing": True}, None, "315e791f74cfcb16"),
        "cache_latents": ({"cache_latents": False}, None, "9b3009294b487392"),
        "weighting_scheme on SD": ({"weighting_scheme": "mode"}, "sd1", "2435fa84e5cdc28d"),
    }
    for what, (update, family, key) in earlier.items():
        keys = resume_keys(TrainSettings(**update), "d", family)
        assert keys == ["0a398d1c20f376d8", key], what
    assert resume_keys(TrainSettings(), "d") == ["0a398d1c20f376d8"]
    old = tmp_path / "tiny-30steps-old"
    old.mkdir()
    (old / "training.json").write_text(
        json.dumps({"lora_key": lora_key("315e791f74cfcb16", 30), "resume_key": "315e791f74cfcb16"})
    )
    keys = resume_keys(TrainSettings(gradient_checkpointing=True), "d")
    assert resumable_folders(tmp_path, keys) == [old]
    describe = {"resume_key": keys[0]}
    assert lora_folder(tmp_path, [lora_key(k, 30) for k in keys], "new", describe) == (old, False)
    # Found under the old key, it is given today's: with the setting back at its default (one
    # key only) it is still found, and its older checkpoints still resume.
    assert earlier_resume_keys(old) == ["315e791f74cfcb16"]
    plain = resume_keys(TrainSettings(), "d")
    assert lora_folder(tmp_path, [lora_key(k, 30) for k in plain], "new", describe) == (old, False)
    assert resumable_folders(tmp_path, plain) == [old]
    # A folder of today's key wins over one of an earlier key.
    today = tmp_path / "today"
    today.mkdir()
    (today / "training.json").write_text(json.dumps({"lora_key": lora_key(keys[0], 60), "created": "9"}))
    (old / "training.json").write_text(json.dumps({"lora_key": lora_key(keys[1], 60), "created": "1"}))
    assert lora_folder(tmp_path, [lora_key(k, 60) for k in keys], "new", describe) == (today, False)


def test_a_training_refused_before_its_first_step_leaves_no_lora_folder(tmp_path):
    """A LoRA folder made for a training that failed before it wrote anything (here fp16 on the
    CPU) held only its training.json and was listed as a kept LoRA for good; a folder that holds a
    LoRA is never removed."""
    from diffusion_bunny.stages import run_stage
    from diffusion_bunny.stages.train.tables import kept_loras

    run = make_run(tmp_path, n_train=2, n_val=0)
    overrides = fast_overrides(tmp_path, max_train_steps=2)
    run_stage(run, "train", load_config(None, overrides, root=tmp_path), progress=False)
    (kept,) = (tmp_path / "lora").iterdir()
    fp16 = load_config(None, {**overrides, "train.mixed_precision": "fp16"}, root=tmp_path)
    with pytest.raises(ModelError, match="fp16 needs a GPU"):
        run_stage(run, "train", fp16, progress=False)
    assert list((tmp_path / "lora").iterdir()) == [kept]
    assert kept_loras(tmp_path / "lora")["folder"].to_list() == [str(kept)]


def test_a_train_output_dir_that_cannot_hold_folders_names_the_setting(tmp_path):
    """A ``train.output_dir`` that is a file (or a read-only folder) failed before the training's
    storage advice applied: "...or choose another --out", which does not help."""
    from diffusion_bunny.errors import StorageError
    from diffusion_bunny.stages import run_stage

    run = make_run(tmp_path, n_train=2, n_val=0)
    (tmp_path / "lora").write_text("a file, not a folder")
    cfg = load_config(None, fast_overrides(tmp_path, max_train_steps=2), root=tmp_path)
    with pytest.raises(StorageError) as err:
        run_stage(run, "train", cfg, progress=False)
    message = str(err.value)
    assert "\\n" not in message and message.startswith(f"could not write {tmp_path / 'lora'}"), message
    assert f"make {tmp_path / 'lora'} a folder you can write to, or set train.output_dir" in message
    assert "--out" not in message and "free some space" not in message


def test_a_full_disk_while_the_lora_file_is_written_names_that_file_once(tmp_path):
    """The LoRA file is written into a staging folder named after it, and a full disk there named
    ``.../pytorch_lora_weights.safetensors/pytorch_lora_weights.safetensors``."""
    import errno

    from diffusion_bunny.errors import storage_error
    from diffusion_bunny.stages.train.lora import write_lora_file
    from diffusion_bunny.stages.train.tables import LORA_FILE

    def safetensors_full(folder: Path) -> None:
        raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")

    def os_full(folder: Path) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(folder / LORA_FILE))

    for write in (safetensors_full, os_full):
        with pytest.raises(OSError) as err:
            write_lora_file(tmp_path / "checkpoint-4", write)
        message = str(storage_error(err.value, "free some"))
        assert message.startswith(f"could not write {tmp_path / 'checkpoint-4' / LORA_FILE}: "), message
        assert f"{LORA_FILE}/{LORA_FILE}" not in message


def test_flux_only_settings_on_an_sd_model_are_one_warning_and_no_new_lora_folder(tmp_path):
    """``train.quantize_base``, ``train.weighting_scheme``, ... do nothing for SD 1.x/SDXL; they
    were silently ignored yet changed the LoRA folder's key (a full retrain in a new folder)."""
    from diffusion_bunny.stages import run_stage
    from diffusion_bunny.stages.train.lora import resume_key

    base = training_cfg(max_train_steps=30)
    flow = base.model_copy(update={"quantize_base": "nf4", "weighting_scheme": "mode"})
    for family in ("sd1", "sdxl"):
        assert resume_key(flow, "d", family) == resume_key(base, "d", family) == resume_key(base, "d")
    assert resume_key(flow, "d", "flux") != resume_key(base, "d", "flux")

    run = make_run(tmp_path, n_train=2, n_val=0)
    overrides = fast_overrides(tmp_path, max_train_steps=2)
    run_stage(run, "train", load_config(None, overrides, root=tmp_path), progress=False)
    (folder,) = (tmp_path / "lora").iterdir()
    flux_only = {**overrides, "train.quantize_base": "nf4", "train.weighting_scheme": "mode"}
    run_stage(run, "train", load_config(None, flux_only, root=tmp_path), progress=False)
    assert list((tmp_path / "lora").iterdir()) == [folder]
    manifest = run.read_manifest("train")
    assert manifest["facts"]["lora_folder"] == str(folder)
    assert [w for w in manifest["warnings"] if "FLUX" in w] == [
        "train.weighting_scheme, train.quantize_base: for FLUX.1 and SD3.5 only, ignored for this sd1 model"
    ]
