"""Identity scoring end to end on real faces.

A random tiny model draws noise, so on the demo no generated image holds a face and the choice of
checkpoint by identity never runs on one. Here stage 08 runs on a run folder through
``run_stage`` exactly as ``bunny run`` runs it (config, references folder, LoRA files found and
checked, the grid planned, every LoRA loaded into the tiny pipeline, PNGs written, faces found
and scored, the best checkpoint chosen, tables and manifest written); only the drawing step, the
pipeline's ``__call__``, is replaced: it returns a real photo, chosen by the LoRA file loaded at
that moment, the character named in the prompt and the seed.

* ``checkpoint-10`` draws the right person (held-out photos of obama for obama's prompts, of biden
  for biden's);
* ``checkpoint-20`` draws them swapped (biden for obama, obama for biden);
* ``final`` (the latest, the one chosen when no face is scored) draws two other people;
* scale 0 (the base model, never a candidate) draws the reference photos themselves, closer
  than anything a checkpoint draws.

So the stage picks ``checkpoint-10`` only if it finds the faces, scores each image against the
references of the character its prompt names, and takes the lowest mean distance among the
checkpoints. Photos from ``../shared/testdata`` (face_recognition's examples); skipped where absent.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import polars as pl
import pytest
from paths import TESTDATA
from PIL import Image, ImageOps
from test_generate import write_training_output

from diffusion_bunny.stages.generate.tables import BASE, FINAL
from diffusion_bunny.stages.train.tables import LORA_FILE

KNN = TESTDATA / "face_recognition_examples" / "knn_examples"

#: The references stage 08 scores against (one photo per person), and the photos the fake
#: pipeline draws; a photo drawn as a character is never one of that character's references.
REFERENCES = {
    "obama": "train/obama/obama.jpg",
    "biden": "train/biden/biden.jpg",
    "kit_harington": "train/kit_harington/john1.jpeg",
}
OBAMA = ("test/obama1.jpg", "train/obama/obama2.jpg")
BIDEN = ("train/biden/biden2.jpg", "train/biden/biden2.jpg:mirror")
OTHERS = ("test/johnsnow_test1.jpg", "test/alex_lacamoire1.jpg")
DRAWS = {
    "checkpoint-10": {"obama": OBAMA, "biden": BIDEN},
    "checkpoint-20": {"obama": BIDEN, "biden": OBAMA},
    FINAL: {"obama": OTHERS, "biden": OTHERS},
    BASE: {name: (REFERENCES[name],) * 2 for name in ("obama", "biden")},
}
SEEDS = (0, 1)
#: face_recognition's "same person" tolerance.
SAME_PERSON = 0.6


def photo(spec: str, size: tuple[int, int]) -> Image.Image:
    """A test photo (``path[:mirror]`` under knn_examples/) fitted into ``size``, padded."""
    rel, _, how = spec.partition(":")
    with Image.open(KNN / rel) as img:
        image = img.convert("RGB")
    if how == "mirror":
        image = ImageOps.mirror(image)
    return ImageOps.pad(image, size, color=(128, 128, 128))


class PhotoDrawing:
    """Mixed in front of the loaded pipeline's class: LoRA files load into the real pipeline as
    ever, but a call returns the photo that the LoRA loaded now draws for the prompt's character
    and the seed (:data:`DRAWS`), at the size asked for."""

    lora_names: dict[Path, str]
    drawn: list[tuple[str, str, int]]
    active: str = BASE

    def load_lora_weights(self, pretrained_model_name_or_path_or_dict, *args, **kwargs):
        self.active = self.lora_names[Path(pretrained_model_name_or_path_or_dict).resolve()]
        return super().load_lora_weights(pretrained_model_name_or_path_or_dict, *args, **kwargs)

    def delete_adapters(self, *args, **kwargs):
        self.active = BASE
        return super().delete_adapters(*args, **kwargs)

    def __call__(self, prompt, *, generator, width, height, **kwargs):
        # A prompt and a generator per picture, as the stage draws batches (one of each also works).
        prompts = [prompt] if isinstance(prompt, str) else prompt
        generators = generator if isinstance(generator, list) else [generator]
        images = []
        for text, gen in zip(prompts, generators, strict=True):
            (character,) = [name for name in ("obama", "biden") if f" {name}," in text]
            seed = gen.initial_seed()
            self.drawn.append((self.active, character, seed))
            images.append(photo(DRAWS[self.active][character][seed], (width, height)))
        return SimpleNamespace(images=images)


@pytest.fixture
def photo_run(tmp_path, monkeypatch):
    """A run folder, a references folder, a training output (checkpoint-10, checkpoint-20, final)
    of LoRA files for the tiny preset, and ``load_pipeline`` returning the tiny pipeline with
    :class:`PhotoDrawing` in front of its class. Returns (run, config overrides, drawn)."""
    if not KNN.is_dir():
        pytest.skip(f"real face photos not available here: {KNN} (they ship beside the project, not in it)")
    import diffusion_bunny.models.diffusion as diffusion
    import diffusion_bunny.stages.generate.stage as generate_stage
    from diffusion_bunny.pipeline.run import Run

    refs = tmp_path / "references"
    for name, rel in REFERENCES.items():
        (refs / name).mkdir(parents=True)
        shutil.copy(KNN / rel, refs / name / Path(rel).name)
    pipe = diffusion.load_pipeline("tiny", device="cpu")
    lora_dir = write_training_output(pipe, tmp_path / "checkpoint" / "run")
    lora_names = {
        (lora_dir / "checkpoint-10" / LORA_FILE).resolve(): "checkpoint-10",
        (lora_dir / "checkpoint-20" / LORA_FILE).resolve(): "checkpoint-20",
        (lora_dir / LORA_FILE).resolve(): FINAL,
    }
    drawn: list[tuple[str, str, int]] = []
    real_load = diffusion.load_pipeline

    def load_photo_pipeline(*args, **kwargs):
        loaded = real_load(*args, **kwargs)
        loaded.__class__ = type(f"Photo{type(loaded).__name__}", (PhotoDrawing, type(loaded)), {})
        loaded.lora_names, loaded.drawn = lora_names, drawn
        return loaded

    # stage 08 calls the name its own module imported
    monkeypatch.setattr(generate_stage, "load_pipeline", load_photo_pipeline)
    movie = tmp_path / "movie.mp4"
    movie.write_bytes(b"not decoded: stage 08 reads no frame")
    run = Run.create(tmp_path / "run", movie)
    overrides = {
        "train.base_model": "tiny",
        "train.output_dir": str(lora_dir),
        "characters.reference_dir": str(refs),
        "generate.characters": ["obama", "biden"],
        "generate.prompts": ["{trigger} {character}, close-up portrait"],
        "generate.seeds": list(SEEDS),
        "generate.lora_scales": [0.0, 1.0],
        "generate.resolution": 256,
        "generate.steps": 1,
        "generate.device": "cpu",
    }
    return run, overrides, drawn


def test_stage_08_scores_real_faces_and_picks_the_checkpoint_that_draws_the_character(photo_run):
    from diffusion_bunny.config import load_config
    from diffusion_bunny.stages import run_stage

    run, overrides, drawn = photo_run
    tables = run_stage(run, "generate", load_config(None, overrides), progress=False)

    # Every picture of the grid came from the photo pipeline, drawn with the LoRA of its column.
    gen = tables["generations"]
    assert gen.height == 2 * len(SEEDS) * 4  # characters x seeds x (base + 3 checkpoints)
    assert sorted(drawn) == sorted(
        (ck, name, seed) for ck in DRAWS for name in ("obama", "biden") for seed in SEEDS
    )
    assert gen["face_found"].all() and (gen["faces"] >= 1).all()

    # Each picture is scored against the references of the character its prompt names.
    def distances(checkpoint: str) -> list[float]:
        return gen.filter(pl.col("checkpoint") == checkpoint)["identity_distance"].to_list()

    assert max(distances("checkpoint-10")) < SAME_PERSON, gen
    assert min(distances("checkpoint-20")) > SAME_PERSON, gen
    assert min(distances(FINAL)) > SAME_PERSON, gen
    assert max(distances(BASE)) < min(distances("checkpoint-10"))  # the references themselves

    # The lowest mean distance wins; the base model is never a candidate; the table, the
    # flags and the manifest agree.
    scores = tables["generation_scores"]
    assert scores["checkpoint"].to_list() == [BASE, "checkpoint-10", "checkpoint-20", FINAL]
    assert scores["with_face"].to_list() == [4, 4, 4, 4] and (scores["face_share"] == 1.0).all()
    assert scores.filter(pl.col("best"))["checkpoint"].to_list() == ["checkpoint-10"]
    assert set(gen.filter(pl.col("best"))["checkpoint"]) == {"checkpoint-10"}
    facts = run.read_manifest("generate")["facts"]
    assert facts["best_checkpoint"] == "checkpoint-10"
    assert facts["best_lora"].endswith(str(Path("checkpoint-10") / LORA_FILE))
    mean = sum(distances("checkpoint-10")) / 4
    assert facts["best_identity_distance"] == pytest.approx(mean)
    assert facts["references"] == {name: {"reference_images": 1, "movie_faces": 0} for name in REFERENCES}
    assert run.read_manifest("generate")["counts"]["with_face"] == gen.height
