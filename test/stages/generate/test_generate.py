"""Stage 08 (``generate``): the grid on the tiny model, resuming, identity scores on real faces,
the choice of checkpoint, CLIP scores, the bad-input messages, the figures and notebook 08."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import cv2
import numpy as np
import polars as pl
import pytest
from notebooks import pictures
from relay import relayed_bar

from diffusion_bunny import logs
from diffusion_bunny.errors import ConfigError, ModelError
from diffusion_bunny.models.faces import DetectSettings
from diffusion_bunny.stages.generate import summary as generate_summary
from diffusion_bunny.stages.generate.drawn import (
    DrawnScorer,
    Stage03Characters,
    load_drawn_scorer,
    stage03_characters,
)
from diffusion_bunny.stages.generate.grid import (
    Checkpoint,
    GridItem,
    find_checkpoints,
    plan_grid,
    prompt_tag,
    render_prompt,
    select_checkpoints,
)
from diffusion_bunny.stages.generate.identity import (
    CharacterReferences,
    character_references,
    characters_to_draw,
    checkpoint_scores,
    clip_scores,
    load_clip,
    pick_best,
    score_identity,
    score_images,
)
from diffusion_bunny.stages.generate.render import (
    RenderSettings,
    check_loras,
    generate_images,
    render,
    stored_key,
)
from diffusion_bunny.stages.generate.settings import GenerateSettings
from diffusion_bunny.stages.generate.stage import draw_and_score
from diffusion_bunny.stages.generate.tables import BASE, FINAL, NO_CHARACTER, SCORES_SCHEMA
from diffusion_bunny.stages.train.tables import LORA_FILE

#: Small and fast on a CPU: 64 px (8x8 latents), two denoising steps.
FAST = RenderSettings(base_model="tiny", negative_prompt="", steps=2, guidance_scale=7.5, width=64, height=64)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models on one intra-op thread: on a 2-core machine shared with other jobs, torch's two
    threads spin-waiting for each other made each tiny image ~20x slower (3.4 s against 0.17 s
    measured). Only the speed changes (and float rounding, within one run the same everywhere)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def pipe():
    """The ``tiny`` preset (built once per machine in the user cache by sd_models)."""
    from diffusion_bunny.models.diffusion import load_pipeline

    return load_pipeline("tiny", device="cpu")


def write_lora(pipe, folder: Path, seed: int, *, std: float = 0.3) -> Path:
    """A LoRA on the pipeline's UNet attention layers with random non-zero weights (peft's own
    zero-initialised B would make it a no-op), saved in diffusers format as stage 07 saves it."""
    import torch
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    config = LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    pipe.unet.add_adapter(config, adapter_name="_write")
    try:
        generator = torch.Generator().manual_seed(seed)
        layers = {
            k: torch.randn(v.shape, generator=generator) * std
            for k, v in get_peft_model_state_dict(pipe.unet, adapter_name="_write").items()
        }
    finally:
        pipe.unet.delete_adapters("_write")
    folder.mkdir(parents=True, exist_ok=True)
    type(pipe).save_lora_weights(
        folder, unet_lora_layers=convert_state_dict_to_diffusers(layers), safe_serialization=True
    )
    return folder / LORA_FILE


def write_training_output(pipe, folder: Path, steps: tuple[int, ...] = (10, 20)) -> Path:
    """A training output laid out as stage 07 writes it: checkpoint-<step>/ folders and the final
    LoRA (the final one equal to the last checkpoint, as after a finished training)."""
    import shutil

    for i, step in enumerate(steps):
        write_lora(pipe, folder / f"checkpoint-{step}", seed=i + 1)
    shutil.copy(folder / f"checkpoint-{steps[-1]}" / LORA_FILE, folder / LORA_FILE)
    return folder


@pytest.fixture(scope="module")
def training_output(pipe, tmp_path_factory):
    return write_training_output(pipe, tmp_path_factory.mktemp("checkpoint") / "run")


@pytest.fixture(scope="module")
def demo_refs(tmp_path_factory):
    from diffusion_bunny.demo.movie import build_demo_references

    return build_demo_references(tmp_path_factory.mktemp("refs"))


@pytest.fixture(scope="module")
def references(demo_refs):
    refs, warnings = character_references(demo_refs, None, DetectSettings())
    assert warnings == []
    return refs


# ---------------------------------------------------------------------------------------------
# Checkpoints and the grid (pure)


def test_checkpoints_are_found_in_training_order_and_selected(tmp_path):
    for step in (100, 20, 5):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / LORA_FILE).write_bytes(b"x")
    (tmp_path / "checkpoint-7").mkdir()  # no LoRA file inside: not a checkpoint
    (tmp_path / LORA_FILE).write_bytes(b"x")
    found = find_checkpoints(tmp_path)
    assert [(c.name, c.step) for c in found] == [
        ("checkpoint-5", 5),
        ("checkpoint-20", 20),
        ("checkpoint-100", 100),
        (FINAL, 100),
    ]
    assert select_checkpoints(found, "all") == found
    assert [c.name for c in select_checkpoints(found, "final")] == [FINAL]
    assert [c.name for c in select_checkpoints(found, ("final", "checkpoint-5"))] == ["checkpoint-5", FINAL]
    with pytest.raises(
        ConfigError, match=r"checkpoint-6 is not in the training output \(it has: checkpoint-5"
    ):
        select_checkpoints(found, ("checkpoint-6",))
    assert find_checkpoints(tmp_path / "nothing") == []


def test_two_templates_of_one_prompt_are_planned_once():
    """With no trigger word ``{trigger} {character}, portrait`` is ``{character}, portrait``: both
    drew into the one file their prompt names, and the table had two rows of it."""
    items = plan_grid(
        ["lin"], ["{trigger} {character}, portrait", "{character}, portrait", "x"], "", [0], [0.0], []
    )
    assert [(i.prompt_index, i.prompt) for i in items] == [(0, "lin, portrait"), (2, "x")]
    assert len({i.rel_path for i in items}) == len(items)


def test_prompts_and_grid_plan():
    assert render_prompt("{trigger} {character}, close-up", "bunnystyle", "grace_hopper") == (
        "bunnystyle grace_hopper, close-up"
    )
    assert (
        render_prompt("{trigger} {character}, close-up", "bunnystyle", NO_CHARACTER) == "bunnystyle, close-up"
    )
    assert (
        render_prompt("a portrait of {character} in {trigger}", "bs", NO_CHARACTER) == "a portrait of in bs"
    )
    cks = [Checkpoint("checkpoint-10", 10, Path("a")), Checkpoint(FINAL, 10, Path("b"))]
    items = plan_grid(
        ["ann", "bob"], ["{trigger} {character}", "{character}"], "t", [0, 1], [0.0, 0.5, 1.0], cks
    )
    # per character, prompt and seed: one base image + 2 scales x 2 checkpoints
    assert len(items) == 2 * 2 * 2 * (1 + 2 * 2)
    base = [i for i in items if i.checkpoint == BASE]
    assert len(base) == 8 and {i.lora_scale for i in base} == {0.0} and all(i.step is None for i in base)
    assert len({i.rel_path for i in items}) == len(items)
    assert items[0].rel_path == f"generated/base/ann/{prompt_tag('t ann')}_seed0_scale0.00.png"
    odd = plan_grid(["Mr. X/Y"], ["{character}"], "t", [3], [-0.5], cks[:1])[0]
    assert odd.rel_path == f"generated/checkpoint-10/Mr._X_Y/{prompt_tag('Mr. X/Y')}_seed3_scalem0.50.png"
    # Names alike once made safe for a folder are folders of their own (they drew over each
    # other's pictures), and no name leaves the checkpoint's folder.
    alike = ["Mary Jane", "Mary_Jane", "???", "!!!", ".."]
    folders = [Path(i.rel_path).parent for i in plan_grid(alike, ["{character}"], "t", [0], [1.0], cks[:1])]
    assert len(set(folders)) == len(alike) and all(
        f.parent == Path("generated/checkpoint-10") for f in folders
    )
    assert folders[1].name == "Mary_Jane"  # a name that is already a folder name stays as it is
    assert folders[0].name.startswith("Mary_Jane~") and folders[4].name.startswith("..~")
    only = plan_grid([NO_CHARACTER, "Lin-Manuel Miranda"], ["{character}"], "t", [0], [1.0], cks[:1])
    assert [Path(i.rel_path).parent.name for i in only] == ["none", "Lin-Manuel_Miranda"]  # as always
    # Scales that round alike to two decimals are two files, not one drawn over by both.
    fine = plan_grid(["ann"], ["{character}"], "t", [0], [0.12, 0.125, -0.125], cks[:1])
    names = [i.rel_path.rsplit("_", 1)[1] for i in fine]
    assert names == ["scale0.12.png", "scale0.125.png", "scalem0.125.png"]
    # Six decimals made 1e-7 and 2e-7 one file, and 0.1234561 and 0.1234564 another.
    tiny = [1e-7, 2e-7, -1e-7, 0.1234561, 0.1234564, 4.0]
    names = [
        i.rel_path.rsplit("_", 1)[1] for i in plan_grid(["ann"], ["{character}"], "t", [0], tiny, cks[:1])
    ]
    assert len(set(names)) == len(tiny) and names[0] == "scale1e-07.png" and names[2] == "scalem1e-07.png"
    assert [float(n[len("scale") : -len(".png")].replace("m", "-")) for n in names] == tiny
    # A character's description follows its name, as in the captions the LoRA learned from.
    described = plan_grid(
        ["biscuit", "ann"],
        ["{trigger} {character}, full body"],
        "t",
        [0],
        [1.0],
        cks[:1],
        {"biscuit": "a cartoon dog"},
    )
    assert [i.prompt for i in described] == ["t biscuit, a cartoon dog, full body", "t ann, full body"]
    tag = prompt_tag("t biscuit, a cartoon dog, full body")
    assert described[0].rel_path == f"generated/checkpoint-10/biscuit/{tag}_seed0_scale1.00.png"


def test_a_prompt_removed_or_moved_redraws_no_other_picture(pipe, training_output, tmp_path):
    """Pictures were named by their prompt's place: with the first prompt removed every other
    picture was drawn again (over the removed prompt's files), and again once it was back."""
    cks = find_checkpoints(training_output)[:1]
    prompts = ["{trigger} {character}, portrait", "{trigger} {character}, full body"]

    def draw(templates):
        items = plan_grid(["ann"], templates, "t", [0], [0.0, 1.0], cks)
        return items, generate_images(pipe, tmp_path, items, cks, FAST)

    first, counts = draw(prompts)
    assert counts == (4, 0)
    mtimes = {i.rel_path: (tmp_path / i.rel_path).stat().st_mtime_ns for i in first}
    for templates in (prompts[1:], prompts, prompts[::-1]):
        items, counts = draw(templates)
        assert counts == (0, len(items))
        assert [i.prompt_index for i in items] == sorted(i.prompt_index for i in items)  # by place
    assert {p: (tmp_path / p).stat().st_mtime_ns for p in mtimes} == mtimes
    assert items[0].rel_path == next(i.rel_path for i in first if i.prompt == items[0].prompt)


def test_settings_key_changes_with_what_makes_the_image():
    item = plan_grid(["ann"], ["{character}"], "t", [0], [1.0], [Checkpoint("final", 1, Path("x"))])[0]
    lora = {"size": 1, "head": "a", "tail": "b"}
    key = FAST.key(item, lora)
    assert FAST.key(item, lora) == key
    assert FAST.key(item, {**lora, "head": "c"}) != key
    assert RenderSettings(**{**FAST.__dict__, "steps": 3}).key(item, lora) != key
    from dataclasses import replace

    assert FAST.key(replace(item, seed=1), lora) != key


# ---------------------------------------------------------------------------------------------
# Generation on the tiny model


def test_generation_is_deterministic_and_lora_scale_matters(pipe, training_output):
    from diffusion_bunny.models.diffusion import load_lora

    prompt = "bunnystyle astronaut, close-up portrait"
    base = np.asarray(render(pipe, prompt, 0, FAST))
    assert base.shape == (64, 64, 3)
    assert np.array_equal(base, np.asarray(render(pipe, prompt, 0, FAST)))  # same seed, same picture
    assert not np.array_equal(base, np.asarray(render(pipe, prompt, 1, FAST)))
    load_lora(pipe, training_output / LORA_FILE, 0.0, adapter_name="t")
    try:
        # Scale 0 is the base model exactly: what lets the stage render it once as "base".
        assert np.array_equal(base, np.asarray(render(pipe, prompt, 0, FAST)))
        pipe.set_adapters(["t"], adapter_weights=[1.0])
        full = np.asarray(render(pipe, prompt, 0, FAST))
        assert np.abs(full.astype(int) - base).mean() > 2
    finally:
        pipe.delete_adapters("t")
    assert np.array_equal(base, np.asarray(render(pipe, prompt, 0, FAST)))  # unloaded: base again


def test_batched_images_are_the_images_drawn_one_by_one(pipe, training_output, tmp_path):
    """Batches of 3 over groups of 4 images per checkpoint and scale: a batch never mixes LoRA
    scales or checkpoints (that would change a picture by far more than the tolerance: see the
    test above), and each image starts from its own seed's noise."""
    from PIL import Image

    cks = find_checkpoints(training_output)
    prompts = ["{trigger} {character}", "{trigger} {character}, full body"]
    items = plan_grid(["astronaut"], prompts, "bunnystyle", [0, 1], [0.0, 0.5, 1.0], cks)
    assert generate_images(pipe, tmp_path / "one", items, cks, FAST) == (len(items), 0)
    assert generate_images(pipe, tmp_path / "three", items, cks, FAST, batch_size=3) == (len(items), 0)
    for item in items:
        one = np.asarray(Image.open(tmp_path / "one" / item.rel_path)).astype(int)
        three = np.asarray(Image.open(tmp_path / "three" / item.rel_path)).astype(int)
        assert np.abs(one - three).max() <= 2, item  # float sums in another order, nothing more
    assert stored_key(tmp_path / "one" / items[0].rel_path) == stored_key(
        tmp_path / "three" / items[0].rel_path
    )


def test_batch_size_defaults_to_the_model_kind(pipe):
    from diffusion_bunny.stages.generate.render import PRESET_BATCH, batch_size_for

    assert pipe.bunny_base.source == "preset" and batch_size_for(pipe, None) == PRESET_BATCH
    assert batch_size_for(pipe, 2) == 2
    assert batch_size_for(object(), None) == 1  # a pipeline of a real model, loaded elsewhere


def test_grid_is_written_and_a_rerun_renders_only_what_is_missing(pipe, training_output, tmp_path):
    cks = find_checkpoints(training_output)
    items = plan_grid(["astronaut"], ["{trigger} {character}"], "bunnystyle", [0, 1], [0.0, 1.0], cks)
    assert len(items) == 2 * (1 + 3)
    assert generate_images(pipe, tmp_path, items, cks, FAST) == (len(items), 0)
    paths = [tmp_path / i.rel_path for i in items]
    assert all(p.is_file() and stored_key(p) for p in paths)
    assert not list(tmp_path.rglob("*.tmp"))
    pictures = {
        i.rel_path: np.asarray(__import__("PIL.Image").Image.open(tmp_path / i.rel_path)) for i in items
    }
    # checkpoint-20 and final hold the same weights: same picture; checkpoint-10 differs
    seed0 = {i.checkpoint: pictures[i.rel_path] for i in items if i.seed == 0}
    assert np.array_equal(seed0["checkpoint-20"], seed0[FINAL])
    assert not np.array_equal(seed0["checkpoint-10"], seed0[FINAL])

    # Killed half way: the images on disk are kept, only the missing one is rendered.
    paths[3].unlink()
    mtimes = {p: p.stat().st_mtime_ns for p in paths if p.exists()}
    assert generate_images(pipe, tmp_path, items, cks, FAST) == (1, len(items) - 1)
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items())
    # Other settings: every image again.
    steps3 = RenderSettings(**{**FAST.__dict__, "steps": 3})
    assert generate_images(pipe, tmp_path, items, cks, steps3) == (len(items), 0)
    # A retrained LoRA (same path, other weights) invalidates that checkpoint's images only.
    write_lora(pipe, tmp_path / "retrained", seed=9)
    import shutil

    moved = tmp_path / "ck"
    shutil.copytree(training_output, moved)
    shutil.copy(tmp_path / "retrained" / LORA_FILE, moved / "checkpoint-10" / LORA_FILE)
    cks2 = find_checkpoints(moved)
    assert generate_images(pipe, tmp_path, items, cks2, steps3) == (2, len(items) - 2)


def mismatched_lora(pipe, folder: Path) -> Path:
    """A LoRA whose cross-attention key/value layers expect 64 text features (as an SDXL LoRA
    does) where the tiny SD 1.x UNet has 32."""
    import torch
    from safetensors.torch import load_file, save_file

    good = write_lora(pipe, folder, seed=3)
    layers = load_file(str(good))
    for key in list(layers):
        if ("attn2.to_k" in key or "attn2.to_v" in key) and ("lora_A" in key or "lora.down" in key):
            layers[key] = torch.randn(layers[key].shape[0], 64)
    save_file(layers, str(good))
    return good


def test_lora_that_does_not_fit_stops_before_any_image(pipe, training_output, references, tmp_path):
    bad = mismatched_lora(pipe, tmp_path / "bad")
    cks = [*find_checkpoints(training_output), Checkpoint("checkpoint-99", 99, bad)]
    with pytest.raises(ModelError, match=rf"LoRA file {bad} does not match base model 'tiny' \(sd1\)"):
        check_loras(pipe, cks)
    cfg = GenerateSettings(seeds=(0,), lora_scales=(0.0, 1.0), steps=1)
    with pytest.raises(ModelError, match="does not match base model"):
        draw_and_score(
            tmp_path,
            cfg,
            pipe_loader=lambda: pipe,
            checkpoints=cks,
            references=references,
            detect=DetectSettings(),
            trigger="bunnystyle",
            resolution=64,
            base_model="tiny",
        )
    assert not (tmp_path / "generated").exists()
    check_loras(pipe, find_checkpoints(training_output))  # the good ones pass


# ---------------------------------------------------------------------------------------------
# Identity on real faces


def test_identity_score_of_real_photos(references):
    """A real photo fed to the scorer as if generated: its face is found, close to its own
    character's references (mirrored crops of the same photo) and far from the other person."""
    from diffusion_bunny.media.samples import load_source

    settings = DetectSettings(min_face_px=0)
    assert set(references.names) == {"astronaut", "grace_hopper"}
    for person, other in (("astronaut", "grace_hopper"), ("grace_hopper", "astronaut")):
        rgb = np.ascontiguousarray(load_source(person))
        own = score_identity(rgb, references.encodings[person], settings)
        far = score_identity(rgb, references.encodings[other], settings)
        assert own.faces >= 1 and far.faces == own.faces
        assert own.distance < 0.45, (person, own.distance)
        assert far.distance > 0.6, (person, other, far.distance)
    noise = np.random.default_rng(0).integers(0, 255, (128, 128, 3), dtype=np.uint8)
    assert score_identity(noise, references.encodings["astronaut"], settings) == (
        type(own)(faces=0, distance=None)
    )
    # Without references a face is still counted, but not scored.
    assert score_identity(np.ascontiguousarray(load_source("astronaut")), None, settings).distance is None


def test_the_identity_scoring_shows_its_images_on_the_terminal_of_bunny_run(
    references, tmp_path, monkeypatch
):
    """Stage 08 scores every generated image after drawing them: under ``bunny run`` that bar is
    relayed beside the stage's progress file, which the terminal follows, as the drawing's is;
    and the scores are those of each image."""
    from diffusion_bunny.media.samples import load_source

    items = [GridItem(name, 0, "a portrait", 0, 1.0, FINAL, None) for name in ("astronaut", "grace_hopper")]
    for item in items:
        path = tmp_path / item.rel_path
        path.parent.mkdir(parents=True, exist_ok=True)
        assert cv2.imwrite(
            str(path), cv2.cvtColor(np.ascontiguousarray(load_source(item.character)), cv2.COLOR_RGB2BGR)
        )
    monkeypatch.setenv(logs.ENV, str(tmp_path / "bunny.log"))
    progress_path = tmp_path / ".progress-generate.json"
    with logs.relaying(progress_path):
        scores = score_images(tmp_path, items, references, DetectSettings(), progress=True)
    assert [s.faces >= 1 and s.distance < 0.45 for s in scores] == [True, True]
    _, bar = relayed_bar(progress_path)
    assert (bar["desc"], bar["unit"], bar["done"], bar["total"], bar["closed"]) == (
        "identity",
        "image",
        2,
        2,
        True,
    )


def test_references_include_the_faces_stage_03_named(demo_refs):
    vec = np.full(128, 0.01, np.float32)
    faces = pl.DataFrame(
        {
            "character": ["astronaut", "astronaut", None, "carol"],
            "low_confidence": [False, True, False, False],
            "embedding": [vec.tolist()] * 4,
        }
    )
    refs, _ = character_references(demo_refs, faces, DetectSettings())
    assert refs.names == ["astronaut", "grace_hopper", "carol"]
    assert refs.sources["astronaut"] == {"reference_images": 1, "movie_faces": 1}  # low confidence left out
    assert refs.sources["carol"] == {"reference_images": 0, "movie_faces": 1}
    assert refs.encodings["astronaut"].shape == (2, 128)
    movie_only, warnings = character_references(None, faces, DetectSettings())
    assert movie_only.names == ["astronaut", "carol"] and warnings == []


def test_drawn_characters_are_named_from_stage_03_and_their_pictures_give_no_face_encoding(demo_refs):
    vec = np.full(128, 0.01, np.float32)
    faces = pl.DataFrame(
        {
            "character": ["astronaut", "mika", "mika", "biscuit", None],
            "low_confidence": [False] * 5,
            "embedding": [vec.tolist()] * 5,
            "kind": ["face", "drawn", "drawn", "drawn", "drawn"],
        }
    )
    refs, warnings = character_references(demo_refs, faces, DetectSettings())
    assert refs.drawn == ["biscuit", "mika"] and refs.names == [
        "astronaut",
        "grace_hopper",
        "biscuit",
        "mika",
    ]
    assert "mika" not in refs.encodings and warnings == []
    # A character stage 03 took as drawn gives no encoding, even where this loader sees a face in
    # its picture (here grace_hopper's photo stands in for a cartoon bat's face taken for a person's).
    refs, warnings = character_references(demo_refs, faces, DetectSettings(), frozenset({"grace_hopper"}))
    assert "grace_hopper" not in refs.encodings and refs.names == ["astronaut", "biscuit", "mika"]
    assert warnings == []
    assert characters_to_draw(refs, None) == (["astronaut", "biscuit", "mika"], [])


def test_what_stage_08_reads_of_stage_03_and_a_scorer_that_cannot_be_had_is_one_line(fitted_mika, tmp_path):
    manifest = {
        "facts": {
            "fitted": {"file": str(tmp_path / "fitted.pt")},
            "references_taken": [
                {"character": "mika", "use": "cutout"},
                {"character": "astronaut", "use": "face"},
                {"character": "astronaut", "use": None},
            ],
        }
    }
    seen = stage03_characters(manifest)
    assert seen.drawn == {"mika"} and seen.backend == "offline"  # astronaut's face photo is not drawn
    assert stage03_characters(None) == Stage03Characters()
    assert load_drawn_scorer(seen, []) == (None, [])
    scorer, warnings = load_drawn_scorer(seen, ["mika"])
    assert scorer is None and warnings == [
        f"the pictures of mika are drawn but not scored: stage 03's fitted detector {tmp_path / 'fitted.pt'} "
        "is gone or cannot be read; rerun stage characters (bunny run MOVIE --stages characters --force) "
        "to fit it again"
    ]
    (tmp_path / "fitted.pt").write_bytes(fitted_mika.to_bytes())
    scorer, warnings = load_drawn_scorer(seen, ["mika"])
    assert warnings == [] and scorer.names == ["mika"] and scorer.min_score == 0.5
    # The run's own min_score, not the one of the run that fitted the file (a fit is reused across
    # it): at 0.75 the pictures were counted found at 0.5.
    assert load_drawn_scorer(seen, ["mika"], None, 0.75)[0].min_score == 0.75  # drawn_found's level
    # A drawn character named by hand in notebook 03 (no pictures, so not in the fit): one line,
    # where its pictures were drawn and silently left out of every score and count.
    scorer, warnings = load_drawn_scorer(seen, ["mika", "penguin"])
    assert scorer.names == ["mika"] and warnings == [
        "the pictures of penguin are drawn but not scored: stage 03 has no pictures of them (named by "
        "hand); add a still from the film of each (notebook 03, or add_still) or pictures of them, then "
        "rerun stage characters"
    ]


def test_with_the_hub_backend_drawn_pictures_are_scored_by_owlv2_guided_by_stage_03s_cutouts(tmp_path):
    """Stage 03 ran with characters.backend: hub: stage 08 scores a drawn character's pictures with
    OWLv2 guided by the cut-outs stage 03 wrote (found in the run folder's own cache when the
    manifest's paths moved), its score the one ``detect`` names a sighting from; cut-outs or a
    model that does not load are one line each, and the pictures are drawn all the same; a model
    that cannot be had stops the stage before any drawing."""
    import cv2
    from tiny_models import write_tiny_dinov2, write_tiny_owlv2

    from diffusion_bunny.models.hub_characters import HubCharacterSettings
    from diffusion_bunny.models.hub_characters.finder import HubFinder

    rng = np.random.default_rng(0)
    cut = np.zeros((40, 30, 4), np.uint8)
    cut[..., :3] = rng.integers(0, 256, (40, 30, 3))
    cut[5:35, 5:25, 3] = 255
    cache = tmp_path / "run" / "cache" / "characters" / "cutouts"
    cache.mkdir(parents=True)
    assert cv2.imwrite(str(cache / "000-0.png"), cv2.cvtColor(cut, cv2.COLOR_RGBA2BGRA))
    taken = [
        {"character": "mika", "use": "cutout", "cutout": "/elsewhere/cache/characters/cutouts/000-0.png"},
        {"character": "biscuit", "use": "cutout", "cutout": str(tmp_path / "gone.png")},
        {"character": "astronaut", "use": "face"},
    ]
    seen = stage03_characters({"facts": {"hub": {}, "references_taken": taken}}, tmp_path / "run")
    assert seen.backend == "hub" and seen.drawn == {"mika", "biscuit"}
    assert dict(seen.cutouts)["mika"] == cache / "000-0.png"
    settings = HubCharacterSettings(
        detector=str(write_tiny_owlv2(tmp_path / "owl", grid_boxes=True)),
        features=str(tmp_path / "no-features"),
        device="cpu",
    )
    # No features model is needed (the folder above does not exist): only OWLv2 scores.
    scorer, warnings = load_drawn_scorer(seen, ["mika", "biscuit"], settings)
    assert warnings == [
        "the pictures of biscuit are drawn but not scored: stage 03's cut-outs of them are gone or cannot "
        "be read; rerun stage characters (bunny run MOVIE --stages characters --force) to cut them out again"
    ]
    assert (
        scorer.names == ["mika"] and scorer.min_score == 0.5 and scorer.setting == "characters.hub.min_score"
    )
    picture = rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)
    value = scorer.score(picture, "mika")
    assert 0.0 <= value <= 1.0 and scorer.score(picture, "biscuit") is None
    # The score is the best sighting detect() names at a score of 0 (one character: every patch
    # is hers), and a picture is scored as a batch of pictures is.
    full = settings.model_copy(
        update={"min_score": 0.0, "features": str(write_tiny_dinov2(tmp_path / "dino"))}
    )
    hits = HubFinder(full, {"mika": [cut]}).detect(picture)
    assert max(h.score for h in hits) == pytest.approx(value, abs=1e-5)
    both = scorer.finder.character_scores([picture[:, ::-1], picture])
    assert both.shape == (2, 1) and both[1, 0] == pytest.approx(value, abs=1e-5)
    # Without settings, or with a detector that cannot be had: drawn, not scored, one line.
    assert load_drawn_scorer(seen, ["mika"], None)[1] == [
        "the pictures of mika are drawn but not scored: no characters.hub settings given"
    ]
    # A folder whose model does not load (a config, no weights) passes the first look and fails at
    # the first picture: the pictures stay unscored and the scorer says why, once.
    (tmp_path / "empty-owl").mkdir()
    shutil.copy(tmp_path / "owl" / "config.json", tmp_path / "empty-owl" / "config.json")
    empty = settings.model_copy(update={"detector": str(tmp_path / "empty-owl")})
    scorer, warnings = load_drawn_scorer(seen, ["mika"], empty)
    assert scorer is not None and scorer.failed is None and scorer._finder is None  # nothing loaded yet
    assert scorer.score(picture, "mika") is None and scorer.score(picture, "mika") is None
    assert scorer.failed.startswith("cannot load characters.hub.detector")
    # A detector that cannot be had stops the stage before any drawing, as a missing CLIP model
    # does (a warning after the drawing left the stage done, its best checkpoint picked unscored).
    broken = settings.model_copy(update={"detector": str(tmp_path / "no-owl")})
    with pytest.raises(ModelError) as err:
        load_drawn_scorer(seen, ["mika"], broken)
    message = str(err.value)
    assert message.startswith("characters.hub.detector") and str(tmp_path / "no-owl") in message, message
    assert message.endswith(
        "the pictures of mika with it (stage 03 ran with characters.backend: hub), "
        "or leave them out of generate.characters"
    ), message


def mika_on(background: np.ndarray, seed: int, side: int = 128) -> np.ndarray:
    """A square picture such as a LoRA draws: the demo's drawn girl in a new pose on a photo."""
    import cv2

    from diffusion_bunny.demo.cartoons import Pose, cast, draw

    picture = cv2.resize(background, (side, side), interpolation=cv2.INTER_AREA)
    figure = draw(cast("mika"), Pose(step=0.2 * seed, turn=0.3), 100).rgba
    scale = 0.8 * side / max(figure.shape[:2])
    figure = cv2.resize(figure, (round(figure.shape[1] * scale), round(figure.shape[0] * scale)))
    h, w = figure.shape[:2]
    y, x = (side - h) // 2, (side - w) // 2
    alpha = figure[..., 3:4] / 255.0
    region = picture[y : y + h, x : x + w]
    picture[y : y + h, x : x + w] = (figure[..., :3] * alpha + region * (1 - alpha)).astype(np.uint8)
    return picture


@pytest.fixture(scope="module")
def fitted_mika():
    """The detector stage 03 fits, fitted here to the demo's drawn girl (one picture) on photos
    from the wheels: small, 150 steps (about 13 s on one thread)."""
    import cv2

    from diffusion_bunny.demo.cartoons import Pose, cast, draw
    from diffusion_bunny.media.samples import load_source
    from diffusion_bunny.models.fitted import FittedSettings
    from diffusion_bunny.models.fitted.detector import fit_detector

    cutouts = {"mika": [draw(cast("mika"), Pose(arms_up=1.0, turn=-0.4), 200).rgba]}
    backgrounds = [
        cv2.resize(load_source(n), (320, 180), interpolation=cv2.INTER_AREA)
        for n in ("coffee", "rocket", "motorcycle", "chelsea", "astronaut")
    ]
    settings = FittedSettings(steps=150, batch=12, crop=160, widths=(320,), self_training=False)
    return fit_detector(cutouts, backgrounds, settings, progress=False)


def test_a_drawn_characters_picture_is_scored_by_the_detector_fitted_to_it(fitted_mika):
    import cv2

    from diffusion_bunny.media.samples import load_source

    scorer = DrawnScorer(fitted_mika)
    for seed, name in enumerate(("rocket", "coffee", "chelsea")):
        background = load_source(name)
        with_her = scorer.score(mika_on(background, seed), "mika")
        alone = scorer.score(cv2.resize(background, (128, 128), interpolation=cv2.INTER_AREA), "mika")
        assert with_her >= scorer.min_score > alone, (name, with_her, alone)
        assert with_her - alone > 0.3
    assert scorer.score(mika_on(load_source("rocket"), 0), "biscuit") is None  # not a character it knows


# ---------------------------------------------------------------------------------------------
# Choosing the checkpoint (pure)


def _scores(rows):
    return pl.DataFrame(
        [
            {
                "checkpoint": name,
                "step": None,
                "order": order,
                "images": 4,
                "with_face": 0 if dist is None else 2,
                "face_share": 0.0 if dist is None else 0.5,
                "identity_distance": dist,
                "drawn_images": 0 if drawn is None else 2,
                "drawn_found": 0,
                "drawn_share": None if drawn is None else 0.0,
                "drawn_score": drawn,
                "clip_score": None,
                "best": False,
            }
            for name, order, dist, *more in rows
            for drawn in [more[0] if more else None]
        ],
        schema=SCORES_SCHEMA,
    )


def test_best_checkpoint_is_the_lowest_distance_else_the_latest():
    assert (
        pick_best(_scores([(BASE, -1, 0.1), ("c10", 0, 0.5), ("c20", 1, 0.4), ("final", 2, 0.45)])) == "c20"
    )
    # tie: the later one
    assert pick_best(_scores([("c10", 0, 0.4), ("c20", 1, 0.4), ("final", 2, 0.5)])) == "c20"
    # no faces anywhere (the base model is never a candidate): the latest checkpoint
    assert pick_best(_scores([(BASE, -1, 0.3), ("c10", 0, None), ("final", 1, None)])) == "final"
    # a checkpoint without faces does not win against one with a distance
    assert pick_best(_scores([("c10", 0, 0.7), ("final", 1, None)])) == "c10"
    assert pick_best(_scores([(BASE, -1, None)])) is None


def test_best_checkpoint_of_drawn_characters_is_the_highest_detector_score_where_no_face_is_scored():
    # Only drawn characters scored: the highest mean score wins; a tie goes to the later one.
    assert (
        pick_best(_scores([(BASE, -1, None, 0.9), ("c10", 0, None, 0.7), ("final", 1, None, 0.4)])) == "c10"
    )
    assert (
        pick_best(_scores([("c10", 0, None, 0.6), ("c20", 1, None, 0.6), ("final", 2, None, 0.2)])) == "c20"
    )
    # Scores within a hundredth are a tie (a detector's confidence moving in the third decimal).
    assert pick_best(_scores([("c10", 0, None, 0.4206), ("final", 1, None, 0.4204)])) == "final"
    # A person's face distance, where scored, decides before the drawn characters' score.
    assert pick_best(_scores([("c10", 0, 0.5, 0.9), ("final", 1, 0.4, 0.1)])) == "final"


def test_checkpoint_scores_from_generations():
    gen = pl.DataFrame(
        {
            "checkpoint": [BASE, BASE, "c10", "c10", "c10", "final", "final"],
            "step": [None, None, 10, 10, 10, 10, 10],
            "face_found": [True, False, True, True, False, False, False],
            "identity_distance": [0.2, None, 0.5, 0.3, None, None, None],
            "clip_score": [None] * 7,
        },
        schema_overrides={"identity_distance": pl.Float64, "clip_score": pl.Float64, "step": pl.Int64},
    )
    drawn = {"drawn_score": [None] * 7, "drawn_found": [None] * 7}
    scores = checkpoint_scores(gen.with_columns(pl.DataFrame(drawn, schema=_DRAWN)), ["c10", "final"])
    assert scores["checkpoint"].to_list() == [BASE, "c10", "final"]
    c10 = scores.row(1, named=True)
    assert c10["images"] == 3 and c10["with_face"] == 2 and c10["face_share"] == pytest.approx(2 / 3)
    assert c10["identity_distance"] == pytest.approx(0.4)
    assert c10["drawn_images"] == 0 and c10["drawn_share"] is None and c10["drawn_score"] is None
    assert scores.filter(pl.col("best"))["checkpoint"].to_list() == ["c10"]
    assert scores["identity_distance"][2] is None
    # Pictures of a drawn character: how many were scored, found, their share and mean score.
    drawn = {
        "drawn_score": [0.9, None, 0.2, None, 0.7, 0.6, 0.8],
        "drawn_found": [True, None, False, None, True, True, True],
    }
    scores = checkpoint_scores(gen.with_columns(pl.DataFrame(drawn, schema=_DRAWN)), ["c10", "final"])
    c10, final = scores.row(1, named=True), scores.row(2, named=True)
    assert (c10["drawn_images"], c10["drawn_found"], c10["drawn_share"]) == (2, 1, 0.5)
    assert c10["drawn_score"] == pytest.approx(0.45) and final["drawn_score"] == pytest.approx(0.7)
    assert scores.filter(pl.col("best"))["checkpoint"].to_list() == ["c10"]  # its face distance decides


_DRAWN = {"drawn_score": pl.Float64, "drawn_found": pl.Boolean}


def test_only_the_base_model_drawn_gives_no_best_checkpoint_and_a_line_that_says_why():
    """With ``generate.lora_scales`` only 0 there is no checkpoint to choose: the scores' ``best``
    was null (``checkpoint == None``), and the summary said "over 4 checkpoints; best None"."""
    gen = pl.DataFrame(
        {
            "checkpoint": [BASE, BASE],
            "step": [None, None],
            "face_found": [False, False],
            "identity_distance": [None, None],
            "clip_score": [None, None],
            "drawn_score": [None, None],
            "drawn_found": [None, None],
        },
        schema_overrides={"identity_distance": pl.Float64, "clip_score": pl.Float64, "step": pl.Int64}
        | _DRAWN,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # polars warned of the comparison with None
        scores = checkpoint_scores(gen, [])
    assert scores["best"].to_list() == [False]
    counts = {"images": 16, "rendered_now": 0, "reused": 16, "checkpoints": 0}
    facts = {"best_checkpoint": None, "characters": ["lin"], "no_face": "no face in 16 of 16 images"}
    assert generate_summary({"counts": counts, "facts": facts}) == (
        "16 images (0 drawn now, 16 reused) by the base model alone; no LoRA checkpoint compared "
        "(generate.lora_scales has only 0) (no face in 16 of 16 images)"
    )
    # A manifest written before (the unused LoRA files counted) reads the same way.
    assert "no LoRA checkpoint compared" in generate_summary(
        {"counts": counts | {"checkpoints": 4}, "facts": facts}
    )
    # With a checkpoint compared, the line is as it was.
    facts = facts | {"best_checkpoint": "final", "best_identity_distance": 0.41}
    assert generate_summary({"counts": counts | {"checkpoints": 2}, "facts": facts}) == (
        "16 images (0 drawn now, 16 reused) over 2 checkpoints; best final (identity distance 0.41)"
    )


# ---------------------------------------------------------------------------------------------
# The stage's core on the tiny model, CLIP


def test_generate_stage_on_tiny_model(pipe, training_output, references, tmp_path):
    from tiny_models import write_tiny_clip

    from diffusion_bunny.stages.generate.plots import checkpoint_scores_plot, generation_grid

    clip_dir = write_tiny_clip(tmp_path / "clip")
    cfg = GenerateSettings(
        prompts=("{trigger} {character}, close-up portrait",),
        seeds=(0, 1),
        lora_scales=(0.0, 1.0),
        checkpoints=("checkpoint-10", "final"),
        steps=2,
        clip_model=str(clip_dir),
        device="cpu",
    )
    cks = select_checkpoints(find_checkpoints(training_output), cfg.checkpoints)

    def run_generate():
        return draw_and_score(
            tmp_path / "run",
            cfg,
            pipe_loader=lambda: pipe,
            checkpoints=cks,
            references=references,
            detect=DetectSettings(),
            trigger="bunnystyle",
            resolution=64,
            base_model="tiny",
        )

    result = run_generate()
    gen = result.tables["generations"]
    assert gen.columns[:8] == [
        "character",
        "prompt_index",
        "prompt",
        "seed",
        "lora_scale",
        "checkpoint",
        "step",
        "path",
    ]
    for column in ("identity_distance", "face_found", "clip_score", "best"):
        assert column in gen.columns
    assert gen.height == 2 * 2 * (1 + 2)
    assert set(gen["character"]) == {"astronaut", "grace_hopper"}
    assert all((tmp_path / "run" / p).is_file() for p in gen["path"])
    # A random tiny model draws noise: faces are rare, and an image without one has no distance.
    assert gen.filter(~pl.col("face_found"))["identity_distance"].null_count() == (~gen["face_found"]).sum()
    assert gen["clip_score"].is_between(0, 100).all()
    best = result.facts["best_checkpoint"]
    assert best in ("checkpoint-10", "final")
    assert set(gen.filter(pl.col("best"))["checkpoint"]) == {best}
    assert result.facts["best_lora"] == str(next(c.path for c in cks if c.name == best))
    assert result.counts["rendered_now"] == gen.height and result.counts["reused"] == 0
    if result.counts["with_face"] < gen.height:
        assert any("no face in" in w for w in result.warnings)
    assert result.tables["generation_scores"]["checkpoint"].to_list() == [BASE, "checkpoint-10", "final"]

    plot = checkpoint_scores_plot(result.tables["generation_scores"])
    plot.draw()
    sheet = generation_grid(tmp_path / "run", gen, "astronaut", best)
    assert sheet.width >= 2 * 160 and sheet.height >= 2 * 160  # 2 rows (seeds) x 2 columns (scales)

    # Everything on disk: a rerun renders nothing and scores the same.
    again = run_generate()
    assert again.counts["rendered_now"] == 0 and again.counts["reused"] == gen.height
    assert again.tables["generations"].equals(gen)

    # Only the base model asked for (scale 0): no checkpoint is best, and the column says so.
    cfg = cfg.model_copy(update={"lora_scales": (0.0,)})
    result = run_generate()
    base_only = result.tables["generations"]
    assert set(base_only["checkpoint"]) == {BASE} and base_only["best"].to_list() == [False] * 4
    # The LoRA files drew nothing: they were counted ("over 2 checkpoints; best None") and the
    # scores' best was null. Now none is counted or compared, and the line says why.
    assert result.tables["generation_scores"]["best"].to_list() == [False]
    assert result.counts["checkpoints"] == 0 and result.facts["checkpoints"] == {}
    line = generate_summary({"counts": result.counts, "facts": result.facts})
    assert line.startswith("4 images (0 drawn now, 4 reused) by the base model alone; ")
    assert "no LoRA checkpoint compared (generate.lora_scales has only 0)" in line
    assert "None" not in line and "checkpoints;" not in line


def test_drawn_characters_are_drawn_and_scored_beside_the_people(
    pipe, training_output, references, fitted_mika, tmp_path
):
    from dataclasses import replace

    from diffusion_bunny.stages.generate.plots import checkpoint_scores_plot, generation_grid

    cfg = GenerateSettings(
        prompts=("{trigger} {character}, full body",), seeds=(0,), lora_scales=(0.0, 1.0), steps=2
    )
    with_mika = replace(references, drawn=["mika"])

    def run_generate(drawn):
        return draw_and_score(
            tmp_path / "run",
            cfg,
            pipe_loader=lambda: pipe,
            checkpoints=select_checkpoints(find_checkpoints(training_output), ("checkpoint-10", "final")),
            references=with_mika,
            detect=DetectSettings(),
            trigger="bunnystyle",
            resolution=64,
            base_model="tiny",
            drawn=drawn,
        )

    result = run_generate(DrawnScorer(fitted_mika))
    gen = result.tables["generations"]
    assert set(gen["character"]) == {"astronaut", "grace_hopper", "mika"}
    assert "bunnystyle mika, full body" in gen["prompt"].to_list()
    mika, people = gen.filter(pl.col("character") == "mika"), gen.filter(pl.col("character") != "mika")
    assert mika.height == 3 and mika["drawn_score"].is_between(0, 1).all()
    assert mika["drawn_found"].to_list() == (mika["drawn_score"] >= 0.5).to_list()
    assert people["drawn_score"].null_count() == people.height and people["drawn_found"].null_count() == 6
    scores = result.tables["generation_scores"]
    assert scores["drawn_images"].to_list() == [1, 1, 1]
    assert result.facts["drawn_characters"] == ["mika"]
    assert result.counts["drawn_found"] == int(mika["drawn_found"].sum())
    # The face line counts the people's pictures only; the drawn line the drawn characters'.
    if int(people["face_found"].sum()) < people.height:
        assert any("generated images of people" in w and f"of {people.height} " in w for w in result.warnings)
    missed = int((~mika["drawn_found"]).sum())
    assert any(f"not found in {missed} of 3 generated images of drawn" in w for w in result.warnings) == (
        missed > 0
    )
    checkpoint_scores_plot(scores).draw()
    sheet = generation_grid(tmp_path / "run", gen, "mika", "final")
    assert sheet.width >= 2 * 160
    # Without the fitted detector the drawn character is drawn all the same, and not scored.
    bare = run_generate(None)
    gen = bare.tables["generations"]
    assert (
        gen.filter(pl.col("character") == "mika").height == 3
        and gen["drawn_score"].null_count() == gen.height
    )
    assert bare.counts["rendered_now"] == 0 and not any(
        "generated images of drawn" in w for w in bare.warnings
    )


def test_nobody_named_uses_the_trigger_word_alone(pipe, training_output, tmp_path):
    cfg = GenerateSettings(
        prompts=("{trigger} {character}, portrait",), seeds=(0,), lora_scales=(1.0,), steps=1
    )
    result = draw_and_score(
        tmp_path,
        cfg,
        pipe_loader=lambda: pipe,
        checkpoints=select_checkpoints(find_checkpoints(training_output), "final"),
        references=CharacterReferences(),
        detect=DetectSettings(),
        trigger="bunnystyle",
        resolution=64,
        base_model="tiny",
    )
    assert result.tables["generations"]["character"].to_list() == [NO_CHARACTER]
    assert result.tables["generations"]["prompt"].to_list() == ["bunnystyle, portrait"]
    assert any("no named characters" in w for w in result.warnings)
    assert result.facts["best_checkpoint"] == FINAL
    with pytest.raises(ConfigError, match=r"generate.characters: 'bob' is not a character of this run"):
        draw_and_score(
            tmp_path,
            cfg.model_copy(update={"characters": ("bob",)}),
            pipe_loader=lambda: pipe,
            checkpoints=[],
            references=CharacterReferences(),
            detect=DetectSettings(),
            trigger="t",
            resolution=64,
            base_model="tiny",
        )


def test_clip_score_matches_its_definition(tmp_path):
    from PIL import Image
    from tiny_models import write_tiny_clip

    clip = load_clip(str(write_tiny_clip(tmp_path / "clip")), "cpu")
    paths = []
    for i, colour in enumerate(("red", "blue")):
        paths.append(tmp_path / f"{i}.png")
        Image.new("RGB", (48, 48), colour).save(paths[-1])
    prompts = ["a photo of a cat", "a dog on stage"]
    scores = clip_scores(paths, prompts, clip)
    img, txt = clip.embed_images(paths), clip.embed_texts(prompts)
    expected = [max(0.0, 100 * float(img[i] @ txt[i])) for i in range(2)]
    assert scores == pytest.approx(expected, abs=1e-4)
    with pytest.raises(ModelError, match=r"generate.clip_model='.*nowhere'"):
        load_clip(str(tmp_path / "nowhere"), "cpu")


def test_config_rejects_bad_generation_settings():
    from diffusion_bunny.config import load_config

    with pytest.raises(
        ConfigError, match=r"uses \{name\}; the placeholders are \{trigger\} and \{character\}"
    ):
        load_config(None, {"generate.prompts": ["{trigger} {name}"]})
    with pytest.raises(ConfigError, match=r"generate.checkpoints = .*unknown checkpoint 'best'"):
        load_config(None, {"generate.checkpoints": ["best"]})
    assert load_config(None, {"generate.checkpoints": [20, "final"]}).generate.checkpoints == (
        "checkpoint-20",
        "final",
    )
    with pytest.raises(ConfigError, match=r"generate.seeds = .*lists a value twice"):
        load_config(None, {"generate.seeds": [1, 1]})


# ---------------------------------------------------------------------------------------------
# The stage on a run, and notebook 08


@pytest.fixture(scope="module")
def trained_output(tmp_path_factory, demo_refs):
    """A LoRA trained by stage 07's own trainer (a few steps on the demo's two portraits, a
    checkpoint every 2 steps): the real layout stage 08 reads."""
    from diffusion_bunny.stages.train.data import TrainImage
    from diffusion_bunny.stages.train.lora import train_lora
    from diffusion_bunny.stages.train.settings import TrainSettings

    images = [
        TrainImage(demo_refs / name / f"{name}.png", f"bunnystyle {name}, close-up portrait")
        for name in ("astronaut", "grace_hopper")
    ]
    cfg = TrainSettings(
        resolution=64,
        device="cpu",
        max_train_steps=4,
        checkpoint_every=2,
        validation_every=0,
        train_batch_size=2,
        learning_rate=1e-2,
    )
    out = tmp_path_factory.mktemp("trained") / "lora"
    train_lora(images, cfg, out, progress=False)
    return out


def stage_overrides(run_overrides: dict, lora_dir: Path, **extra) -> dict:
    return {
        **run_overrides,
        "train.output_dir": str(lora_dir),
        "train.resolution": 64,
        "generate.prompts": ["{trigger} {character}, close-up portrait"],
        "generate.seeds": [0],
        "generate.lora_scales": [0.0, 1.0],
        "generate.steps": 2,
        "generate.device": "cpu",
        **extra,
    }


@pytest.fixture
def generate_run(board_run):
    """A private copy of the demo run through stage 03 (named from the demo's portraits)."""
    return board_run


def test_stage_generates_from_the_trained_lora_and_skips_when_up_to_date(generate_run, trained_output):
    from diffusion_bunny.config import load_config
    from diffusion_bunny.stages import run_stage

    run, overrides = generate_run
    cfg = load_config(None, stage_overrides(overrides, trained_output))
    assert [c.name for c in find_checkpoints(trained_output)] == ["checkpoint-2", "checkpoint-4", FINAL]
    tables = run_stage(run, "generate", cfg, progress=False)
    gen = tables["generations"]
    # The demo's two people and its two drawn characters (stage 03 named all four).
    assert set(gen["character"]) == {"astronaut", "grace_hopper", "biscuit", "mika"}
    assert gen.height == 4 * (1 + 3)  # per character: base + 3 checkpoints at scale 1
    drawn = gen.filter(pl.col("character").is_in(["biscuit", "mika"]))
    assert drawn["drawn_score"].null_count() == 0 and gen["drawn_score"].null_count() == 8
    assert all((run.run_dir / p).is_file() for p in gen["path"])
    manifest = run.read_manifest("generate")
    facts = manifest["facts"]
    assert facts["best_checkpoint"] in ("checkpoint-2", "checkpoint-4", FINAL)
    assert facts["resolution"] == 64 and facts["trigger_word"] == "bunnystyle"
    assert set(manifest["inputs"]["checkpoints"]) == {"checkpoint-2", "checkpoint-4", FINAL}
    # references: the reference photo and the movie's faces stage 03 named
    assert facts["references"]["astronaut"]["reference_images"] == 1
    assert facts["references"]["astronaut"]["movie_faces"] > 0
    assert tables["generation_scores"].filter(pl.col("best"))["checkpoint"].to_list() == [
        facts["best_checkpoint"]
    ]
    assert run.read_table("generations").equals(gen)
    # Up to date: skipped. A new seed: only the new pictures are drawn.
    run_stage(run, "generate", cfg, progress=False)
    assert run.read_manifest("generate")["finished"] == manifest["finished"]
    more = load_config(None, stage_overrides(overrides, trained_output, **{"generate.seeds": [0, 1]}))
    run_stage(run, "generate", more, progress=False)
    counts = run.read_manifest("generate")["counts"]
    assert counts["reused"] == gen.height and counts["rendered_now"] == gen.height


def test_a_lora_trained_under_another_output_dir_is_named_where_none_is_found(tmp_path):
    """Trained with ``--set train.output_dir=...``, drawn without it: the line said "no trained
    LoRA in <run>/loras" and to train again, though stage train's last LoRA was whole elsewhere."""
    import polars as pl

    from diffusion_bunny.stages.generate.stage import _no_lora

    trained = tmp_path / "other" / "tiny-4steps-0123456789ab"
    trained.mkdir(parents=True)
    (trained / "pytorch_lora_weights.safetensors").write_bytes(b"")
    loras = pl.DataFrame({"folder": [str(tmp_path / "gone"), str(trained)], "current": [False, True]})
    line = _no_lora(tmp_path / "run" / "loras", loras)
    assert line.startswith(
        f"no trained LoRA in {tmp_path / 'run' / 'loras'}: stage train's last LoRA is {trained}"
    )
    assert f"--set train.output_dir={trained.parent}" in line
    assert "run stage train first" in _no_lora(trained, loras)  # the folder looked in: no other to name
    (trained / "pytorch_lora_weights.safetensors").unlink()  # a folder without weights is none
    assert "run stage train first" in _no_lora(tmp_path / "run" / "loras", loras)
    assert "run stage train first" in _no_lora(tmp_path / "run" / "loras", None)


def test_missing_training_output_and_base_model_are_one_clear_error(generate_run, trained_output, tmp_path):
    from diffusion_bunny.config import load_config
    from diffusion_bunny.errors import StageError
    from diffusion_bunny.stages import run_stage

    run, overrides = generate_run
    empty = load_config(None, stage_overrides(overrides, tmp_path / "no_lora"))
    with pytest.raises(
        StageError, match=r"no trained LoRA in .*no_lora .*run stage train first \(bunny run MOVIE"
    ):
        run_stage(run, "generate", empty, progress=False)
    missing = load_config(
        None, stage_overrides(overrides, trained_output, **{"train.base_model": str(tmp_path / "sd15")})
    )
    with pytest.raises(ModelError, match=r"^train.base_model = '.*sd15': no such folder"):
        run_stage(run, "generate", missing, progress=False)
    other = load_config(
        None, stage_overrides(overrides, trained_output, **{"generate.base_model": "someone/not-cached"})
    )
    with pytest.raises(ModelError, match=r"^generate.base_model = 'someone/not-cached' is not in the local"):
        run_stage(run, "generate", other, progress=False)
    assert not (run.run_dir / "generated").exists() and not run.has_table("generations")
    # The base model alone (lora_scales only 0) reads no LoRA, so it needs none: drawn before training.
    base_only = load_config(
        None, stage_overrides(overrides, tmp_path / "no_lora", **{"generate.lora_scales": [0.0]})
    )
    gen = run_stage(run, "generate", base_only, progress=False)["generations"]
    assert set(gen["checkpoint"]) == {"base"} and gen.height == 4
    assert run.read_manifest("generate")["inputs"]["checkpoints"] == {}


def test_notebook_08_runs_headless(generate_run, trained_output, tmp_path, monkeypatch):
    """Notebook 08 in a kernel, as `bunny run` executes it, on the demo run with a trained LoRA:
    summary, score plot, one grid per character and the loading code."""
    import nbformat
    import papermill
    from paths import ROOT as root

    run, overrides = generate_run
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # see one_torch_thread
    nb = papermill.execute_notebook(
        str(root / "notebook" / "08_generate.ipynb"),
        str(tmp_path / "nb.ipynb"),
        parameters={
            "run_dir": str(run.run_dir),
            "overrides": stage_overrides(overrides, trained_output),
            "interactive": False,
        },
        kernel_name="python3",
        progress_bar=False,
        execution_timeout=600,
        cwd=str(root / "notebook"),
    )
    text = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
    assert "16 images (16 drawn now, 0 reused) over" in text  # two people, two drawn characters
    best = run.read_manifest("generate")["facts"]["best_checkpoint"]
    assert f"best {best} (" in text and "pipe.load_lora_weights(" in text
    shown = pictures(nb)
    assert len(shown) == 5  # score plot + a grid per character
    nbformat.validate(nb)


def test_stage_08_reads_reference_pictures_as_stage_03_does(tmp_path):
    """Stage 08 read the references by other rules than stage 03 (no check that a face is
    photographed, transparency read as black): pictures stage 03 left out of a character were
    part of its identity here. The faces of the face truth set, cut out as naming a cluster cuts
    them (profiles, small, cut at the edge: some not confirmed as photographed)."""
    import json

    from PIL import Image

    from diffusion_bunny.models.faces import portrait_faces, read_rgb
    from diffusion_bunny.stages.characters.references import load_character_references
    from diffusion_bunny.stages.characters.stage import face_crop

    truth_dir = Path(__file__).parents[1] / "characters" / "data" / "face_truth"
    folder = tmp_path / "refs" / "someone"
    folder.mkdir(parents=True)
    settings = DetectSettings()
    one_face = 0
    for frame in json.loads((truth_dir / "truth.json").read_text())["frames"][:24]:
        rgb = read_rgb(truth_dir / frame["file"])
        for k, face in enumerate(f for f in frame["faces"] if not f.get("ignore")):
            left, top, right, bottom = face["box"]
            crop = np.ascontiguousarray(face_crop(rgb, (top, right, bottom, left)))
            Image.fromarray(crop).save(folder / f"{frame['file']}_{k}.png")
            one_face += len(portrait_faces(crop, settings)) == 1
    _, pictures, _ = load_character_references(tmp_path / "refs", settings)
    taken = sum(t.use == "face" for t in pictures.taken)
    refs, _ = character_references(tmp_path / "refs", None, settings)
    assert len(refs.encodings["someone"]) == taken < one_face


def test_settings_a_grid_cannot_draw_are_one_line_before_a_model_loads():
    """An empty list of characters drew nothing and then failed on its empty table, one named
    twice drew, scored and counted its pictures twice; a side that is no multiple of 8 and a seed
    past 64 bits stopped stage 07/08 inside diffusers or torch."""
    from diffusion_bunny.config import load_config
    from diffusion_bunny.errors import ConfigError

    for key, value, words in (
        ("generate.characters", [], "list at least one character"),
        ("generate.characters", ["ann", "bob", "ann"], "lists a value twice"),
        ("generate.characters", "ann,bob", r"one character per item: write \[ann, bob\]"),
        ("generate.resolution", 100, "must be a multiple of 8"),
        ("train.resolution", 100, "e.g. 96 or 104"),
        ("train.seed", 2**64, "less than or equal to"),
        ("generate.seeds", [2**64], "seeds must lie between 0 and"),
    ):
        with pytest.raises(ConfigError, match=words) as err:
            load_config(None, {key: value}, use_local=False)
        assert key in str(err.value)
    load_config(None, {"generate.resolution": 104, "train.seed": 2**40}, use_local=False)
    # A name in a list may hold a comma (a reference folder `Doe, Jane`).
    names = load_config(None, {"generate.characters": ["Doe, Jane", "Kim"]}, use_local=False)
    assert names.generate.characters == ("Doe, Jane", "Kim")
    with pytest.raises(ConfigError, match=r"shapes \{character\}.*write \{character\} alone"):
        load_config(None, {"generate.prompts": ["{trigger} {character!r}"]}, use_local=False)


@pytest.mark.parametrize("preset", ["tiny-sd3", "tiny-flux"])
def test_a_side_the_model_cannot_draw_is_one_config_error_naming_the_setting(
    preset, pipe, references, tmp_path
):
    """A side that is a multiple of 8 but not of 16 passed the settings: SD3.5 stopped with
    diffusers' error (a bug, exit 1), FLUX.1 drew 64 px pictures while the manifest said 72. A
    side taken from train.resolution is drawn as the training cut its pictures (72 -> 64): refused
    after the training, its advice was a retrain."""
    from diffusion_bunny.models.diffusion import load_pipeline
    from diffusion_bunny.stages.generate.stage import check_side

    model = load_pipeline(preset, device="cpu")
    cfg = GenerateSettings(lora_scales=(0.0,), steps=1, device="cpu", seeds=(0,), prompts=("{character}",))

    def draw(setting: str):
        return draw_and_score(
            tmp_path / "run",
            cfg,
            pipe_loader=lambda: model,
            checkpoints=[],
            references=references,
            detect=DetectSettings(),
            trigger="bunnystyle",
            resolution=72,
            resolution_setting=setting,
            base_model=preset,
        )

    with pytest.raises(
        ConfigError, match=r"^generate.resolution: 72 px is not a multiple of 16.*; set 64 or 80$"
    ):
        draw("generate.resolution")
    assert not (tmp_path / "run" / "generated").exists()
    drawn = draw("train.resolution")
    assert drawn.facts["resolution"] == 64
    with pytest.raises(ConfigError, match=r"set 512 or 528$"):
        check_side(model, 520, "generate.resolution")
    check_side(model, 80, "generate.resolution")
    check_side(pipe, 72, "generate.resolution")  # Stable Diffusion 1.x takes any multiple of 8


def test_lora_facts_follow_a_moved_run_folder(pipe, references, tmp_path):
    """``best_lora`` and ``checkpoints`` were absolute: after a run folder was moved the stage
    stayed done and notebook 08 printed a snippet loading the LoRA of the old folder."""
    import shutil

    from diffusion_bunny.stages.generate.render import loading_snippet
    from diffusion_bunny.stages.generate.tables import lora_fact, lora_file

    old = tmp_path / "old"
    cks = find_checkpoints(write_training_output(pipe, old / "loras" / "v1", steps=(10,)))
    cfg = GenerateSettings(seeds=(0,), lora_scales=(1.0,), checkpoints="final", steps=1, device="cpu")
    result = draw_and_score(
        old,
        cfg,
        pipe_loader=lambda: pipe,
        checkpoints=select_checkpoints(cks, cfg.checkpoints),
        references=references,
        detect=DetectSettings(),
        trigger="bunnystyle",
        resolution=64,
        base_model="tiny",
    )
    facts = result.facts | {"base_model_path": "base"}
    assert facts["best_lora"] == f"loras/v1/{LORA_FILE}"
    assert facts["checkpoints"] == {FINAL: f"loras/v1/{LORA_FILE}"}
    new = tmp_path / "new"
    shutil.move(old, new)
    assert lora_file(facts["best_lora"], new) == new / "loras" / "v1" / LORA_FILE
    snippet = loading_snippet(facts, "base", new)
    assert f"load_lora_weights({str(new / 'loras' / 'v1' / LORA_FILE)!r})" in snippet
    assert str(old) not in snippet
    elsewhere = tmp_path / "elsewhere" / LORA_FILE  # a training output outside the run folder
    assert lora_fact(elsewhere, new) == str(elsewhere) and lora_file(str(elsewhere), new) == elsewhere


def test_an_empty_trigger_word_is_none_and_null_is_the_captions():
    """``generate.trigger_word: ''`` put the captions' trigger word into every prompt all the same."""
    from types import SimpleNamespace

    from diffusion_bunny.stages.generate.stage import trigger_word

    captions = SimpleNamespace(trigger_word="bunnystyle")
    for setting, word in (("", ""), (None, "bunnystyle"), ("other", "other")):
        cfg = SimpleNamespace(generate=GenerateSettings(trigger_word=setting), captions=captions)
        assert trigger_word(cfg) == word
    assert render_prompt("{trigger} {character}, portrait", "", "ann") == "ann, portrait"
