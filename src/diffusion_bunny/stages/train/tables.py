"""Stage 07's outputs as stage 08 and the report rely on them: the ``training_log`` and
``training_validation`` tables and the folder of LoRA files (``checkpoint/<run folder name>/``)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import polars as pl

from diffusion_bunny.config import TrainingConfig, workspace_root

if TYPE_CHECKING:
    from diffusion_bunny.config import TrainingConfig


LORA_FILE = "pytorch_lora_weights.safetensors"

TRAINING_LOG_SCHEMA = {
    "step": pl.Int64,
    "loss": pl.Float64,
    "lr": pl.Float64,
    "epoch": pl.Int64,
    "elapsed_s": pl.Float64,
    "prior_loss": pl.Float64,
}
VALIDATION_SCHEMA = {
    "step": pl.Int64,
    "index": pl.Int64,
    "prompt": pl.Utf8,
    "seed": pl.Int64,
    "path": pl.Utf8,
}


def checkpoint_dir(run_dir: Path, cfg: TrainingConfig) -> Path:
    """Where a run's LoRA files go: ``training.output_dir`` (relative to the workspace unless
    absolute), else ``checkpoint/<run folder name>/`` in the workspace."""
    if cfg.output_dir:
        out = Path(cfg.output_dir).expanduser()
        return out if out.is_absolute() else workspace_root() / out
    return workspace_root() / "checkpoint" / Path(run_dir).name
