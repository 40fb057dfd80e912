"""Stage 08's tables as the report relies on them: ``generations`` (one row per picture) and
``generation_scores`` (one per checkpoint), and the checkpoint names they use."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from diffusion_bunny.pipeline.run import from_run_fact, run_fact

#: Checkpoint name of the images rendered with LoRA scale 0 (the base model alone).
BASE = "base"
#: Character name used when stage 03 named nobody: the prompts then carry the trigger word only.
NO_CHARACTER = "(none)"
#: Name of the final LoRA (``<checkpoint dir>/pytorch_lora_weights.safetensors``).
FINAL = "final"

GENERATIONS_SCHEMA = {
    "character": pl.Utf8,
    "prompt_index": pl.Int64,
    "prompt": pl.Utf8,
    "seed": pl.Int64,
    "lora_scale": pl.Float64,
    "checkpoint": pl.Utf8,
    "step": pl.Int64,
    "path": pl.Utf8,
    "faces": pl.Int64,
    "face_found": pl.Boolean,
    "identity_distance": pl.Float64,
    "drawn_score": pl.Float64,
    "drawn_found": pl.Boolean,
    "clip_score": pl.Float64,
    "best": pl.Boolean,
}
SCORES_SCHEMA = {
    "checkpoint": pl.Utf8,
    "step": pl.Int64,
    "order": pl.Int64,
    "images": pl.Int64,
    "with_face": pl.Int64,
    "face_share": pl.Float64,
    "identity_distance": pl.Float64,
    "drawn_images": pl.Int64,
    "drawn_found": pl.Int64,
    "drawn_share": pl.Float64,
    "drawn_score": pl.Float64,
    "clip_score": pl.Float64,
    "best": pl.Boolean,
}


def lora_fact(path: Path, run_dir: Path) -> str:
    """A LoRA file as the manifest's facts record it (``best_lora``, ``checkpoints``):
    :func:`~diffusion_bunny.pipeline.run.run_fact`."""
    return run_fact(path, run_dir)


def lora_file(fact: str | None, run_dir: Path) -> Path | None:
    """The LoRA file a fact of :func:`lora_fact` names
    (:func:`~diffusion_bunny.pipeline.run.from_run_fact`)."""
    return from_run_fact(fact, run_dir)
