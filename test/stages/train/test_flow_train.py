"""Stage 07 on FLUX.1 and SD3.5: the flow-matching LoRA step, cached text embeddings
with the encoders dropped, checkpoints and resume, both LoRA files, and the settings that do not
apply. Trains the real loop on the ``tiny-flux`` / ``tiny-sd3`` presets built in code, on the CPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from test_train import fast_overrides, make_run, training_cfg, write_image

from diffusion_bunny.config import load_config
from diffusion_bunny.errors import ModelError

pytestmark = pytest.mark.slow

FAMILIES = ("flux", "sd3")


@pytest.fixture(scope="module", autouse=True)
def flow_model_cache(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bunny_cache")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DIFFUSION_BUNNY_CACHE", str(folder))
        yield folder
    torch.set_num_threads(before)


@pytest.mark.parametrize("family", FAMILIES)
def test_flow_steps_lower_the_loss_and_change_every_lora_weight(family, tmp_path):
    from diffusion_bunny.stages.train.data import TrainImage
    from diffusion_bunny.stages.train.flow import FlowLoraTrainer

    cfg = training_cfg(
        base_model=f"tiny-{family}",
        rank=4,
        alpha=2.0,
        learning_rate=2e-3,
        caption_dropout=0.1,
        max_train_steps=60,
    )
    trainer = FlowLoraTrainer(cfg, cache_dir=tmp_path / "cache", device="cpu")
    images = []
    for i in range(2):
        write_image(tmp_path / f"{i}.png", (64, 64), i)
        images.append(TrainImage(path=tmp_path / f"{i}.png", text=f"bunnystyle a photo of the cat {i}"))
    trainer.prepare_texts([im.text for im in images])
    names = ("text_encoder", "text_encoder_2", "text_encoder_3")
    assert all(getattr(trainer.pipe, n, None) is None for n in names)  # off the device during the steps
    assert len(list((tmp_path / "cache" / "text").iterdir())) == 3  # two captions and ""
    batch = trainer.make_batch(images, (64, 64))

    def fixed_loss() -> float:
        state = trainer.generator.get_state()
        trainer.generator.manual_seed(1234)
        with torch.no_grad():
            value = sum(float(trainer.loss(batch)[0]) for _ in range(8)) / 8
        trainer.generator.set_state(state)
        return value

    before, loss_before = trainer.peft_state()["transformer"], fixed_loss()
    for _ in range(60):
        trainer.step(batch)
    after, loss_after = trainer.peft_state()["transformer"], fixed_loss()
    assert loss_after < 0.97 * loss_before, (loss_before, loss_after)
    assert [k for k in before if torch.equal(before[k], after[k])] == []
    if family == "sd3":  # the last block's text queries reach nothing: never a target
        assert "transformer_blocks.1.attn.add_q_proj" not in trainer.targets


def test_resolution_dependent_shift_matches_flux_inference():
    """At 1024 px FLUX.1-dev's mu is 1.15 (shift e^1.15 = 3.16, what kohya's docs quote), at
    512 px 0.63; the median sigma of logit_normal u (0.5) is then e^mu / (e^mu + 1)."""
    from diffusion_bunny.models.tiny import FLUX_DEV_SCHEDULER
    from diffusion_bunny.stages.train.flow import flux_mu, shift_sigmas

    assert flux_mu(64 * 64, FLUX_DEV_SCHEDULER) == pytest.approx(1.15)
    assert flux_mu(32 * 32, FLUX_DEV_SCHEDULER) == pytest.approx(0.63, abs=1e-3)
    assert float(shift_sigmas(torch.tensor(0.5), 3.0)) == pytest.approx(0.75)


@pytest.mark.parametrize("family", FAMILIES)
def test_stage_trains_resumes_and_writes_files_that_load_back(family, tmp_path):
    from diffusion_bunny.models.diffusion import load_lora, load_pipeline
    from diffusion_bunny.stages import run_stage

    run = make_run(tmp_path, n_train=4, n_val=1)
    overrides = fast_overrides(tmp_path, base_model=f"tiny-{family}", validation_every=2)
    cfg = load_config(None, overrides, root=tmp_path)
    tables = run_stage(run, "train", cfg, progress=False)
    log, validation = tables["training_log"], tables["training_validation"]
    assert log["step"].to_list() == [1, 2, 3, 4] and log["loss"].is_finite().all()
    assert validation["step"].to_list() == [0, 2, 4]
    facts = run.read_manifest("train")["facts"]
    assert facts["family"] == family and facts["resolution"] == 64
    assert all(w % 16 == 0 and h % 16 == 0 for w, h in (map(int, b.split("x")) for b in facts["buckets"]))
    out = Path(facts["lora_folder"])
    assert out.parent == tmp_path / "lora" and out.name.startswith(f"tiny-{family}-4steps-")
    diffusers_file, kohya_file = (
        out / "pytorch_lora_weights.safetensors",
        out / f"{out.name}_kohya.safetensors",
    )
    assert diffusers_file.is_file() and kohya_file.is_file()
    captions = {f"bunnystyle, a photo of the cat {i}" for i in range(4)}
    texts = captions | {""} | set(validation["prompt"].to_list())  # "" for caption dropout
    assert len(list((run.run_dir / "cache" / "text").iterdir())) == len(texts)

    # both files give the same picture, and a different one from the base model
    pipe = load_pipeline(f"tiny-{family}")
    kw = {"prompt": "bunnystyle a photo of the cat", "num_inference_steps": 2, "height": 64, "width": 64}
    kw |= {"max_sequence_length": 32, "output_type": "np"}

    def draw():
        return pipe(**kw, generator=torch.Generator().manual_seed(0)).images[0]

    base = draw()
    load_lora(pipe, diffusers_file, 1.0, adapter_name="x")
    with_diffusers = draw()
    load_lora(pipe, kohya_file, 1.0, adapter_name="x")
    np.testing.assert_allclose(draw(), with_diffusers, atol=1e-5)
    assert np.abs(with_diffusers - base).max() > 0

    # more steps continue from checkpoint-4 (in a folder of their own), reusing the cached text embeddings
    stamps = sorted(p.stat().st_mtime_ns for p in (run.run_dir / "cache" / "text").iterdir())
    cfg = load_config(None, {**overrides, "train.max_train_steps": 6}, root=tmp_path)
    log = run_stage(run, "train", cfg, progress=False)["training_log"]
    assert log["step"].to_list() == [1, 2, 3, 4, 5, 6]
    assert run.read_manifest("train")["facts"]["resumed_from"] == 4
    assert sorted(p.stat().st_mtime_ns for p in (run.run_dir / "cache" / "text").iterdir()) == stamps


def test_settings_that_do_not_apply_are_one_line_naming_the_key(tmp_path):
    from diffusion_bunny.stages.train.flow import FlowLoraTrainer

    cases = {
        "train.quantize_base = nf4": {"quantize_base": "nf4"},
        "train.min_snr_gamma": {"min_snr_gamma": 5.0},
        "train.train_text_encoder": {"train_text_encoder": True},
        "train.lora_targets": {"lora_targets": ("no_such_layer",)},
    }
    for key, extra in cases.items():
        with pytest.raises(ModelError) as err:
            FlowLoraTrainer(training_cfg(base_model="tiny-flux", **extra), device="cpu")
        assert key in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_uncached_steps_encode_the_text_every_step(tmp_path):
    """cache_latents false: the same work per step as diffusers' script (what the benchmark's
    'same work' row measures): the encoders stay and the loss still trains."""
    from diffusion_bunny.stages.train.data import TrainImage
    from diffusion_bunny.stages.train.flow import FlowLoraTrainer

    cfg = training_cfg(base_model="tiny-flux", cache_latents=False, max_train_steps=2)
    trainer = FlowLoraTrainer(cfg, cache_dir=tmp_path, device="cpu")
    write_image(tmp_path / "a.png", (64, 64), 0)
    trainer.prepare_texts(["bunnystyle a cat"])
    assert trainer.pipe.text_encoder is not None and not (tmp_path / "text").exists()
    batch = trainer.make_batch([TrainImage(path=tmp_path / "a.png", text="bunnystyle a cat")], (64, 64))
    loss, _, stepped = trainer.step(batch)
    assert np.isfinite(loss) and stepped


def test_a_full_disk_as_the_flow_lora_is_written_is_one_line_and_leaves_no_partial_file(
    tmp_path, monkeypatch
):
    """FLUX.1/SD3.5's LoRA is written as SD's is: aside, then renamed into place, so a disk that
    fills while it is written is one line naming the file (safetensors says it its own way), and
    no partial file stands where stage 08 would take it for the LoRA; the rerun resumes."""
    from small_disk import inject_full_disk, small_disk

    from diffusion_bunny.errors import StorageError
    from diffusion_bunny.stages import run_stage
    from diffusion_bunny.stages.train import lora as lora_module

    monkeypatch.setenv("DIFFUSION_BUNNY_LOG_DIR", str(tmp_path / "log"))
    with small_disk(tmp_path, 64 << 20) as disk, pytest.MonkeyPatch.context() as mp:
        root = disk.root if disk else tmp_path / "disk"
        root.mkdir(exist_ok=True)
        run = make_run(root, n_train=2, n_val=0)
        overrides = {**fast_overrides(root, base_model="tiny-sd3"), "train.output_dir": str(root / "lora")}
        cfg = load_config(None, overrides, root=tmp_path)
        mp.setattr(lora_module, "check_free_space", lambda needs, advice: None)
        calls = {"n": 0}
        real_prune = lora_module.prune_checkpoints

        def prune(folder, keep, limit):
            out = real_prune(folder, keep, limit)
            calls["n"] += 1  # 1: before the first step, 2: after checkpoint-2, 3: after checkpoint-4
            if calls["n"] == 3:
                if disk:
                    disk.fill(leave=0)
                else:
                    inject_full_disk(mp, root)
            return out

        mp.setattr(lora_module, "prune_checkpoints", prune)
        with pytest.raises(StorageError) as err:
            run_stage(run, "train", cfg, progress=False)
        message = str(err.value)
        (folder,) = (root / "lora").iterdir()
        assert "\n" not in message and "No space left on device (" in message
        assert message.startswith(f"could not write {folder}/pytorch_lora_weights.safetensors"), message
        assert message.endswith("a rerun resumes from checkpoint-4"), message
        assert not (folder / "pytorch_lora_weights.safetensors").exists()
        assert [p for p in root.rglob(".*") if ".tmp-" in p.name] == []
        if disk:
            disk.empty()
        mp.undo()
        run_stage(run, "train", cfg, progress=False)
        assert run.read_manifest("train")["facts"]["resumed_from"] == 4
        assert (folder / "pytorch_lora_weights.safetensors").is_file()
