"""Stage 07 (``train``): a LoRA fine-tuned on the dataset stage 06 exported.

Reads the ``dataset_items`` table and the images under ``<run>/dataset/hf/`` (never the kohya
copy), trains with :func:`diffusion_bunny.stages.train.lora.train_lora` into ``checkpoint/<run
folder name>/`` (or ``training.output_dir``) and returns the ``training_log`` and
``training_validation`` tables. Everything a user can get wrong (an empty dataset, a missing
image, a base model that is not there) fails here in one line before a model is loaded or a step
runs.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from diffusion_bunny.config import TrainingConfig
from diffusion_bunny.pipeline.contract import Context, StageOutput
from diffusion_bunny.stages.train.data import read_dataset
from diffusion_bunny.stages.train.flow import trainer_class_for
from diffusion_bunny.stages.train.lora import train_lora
from diffusion_bunny.stages.train.tables import checkpoint_dir

#: Captions of the validation split used as validation prompts when none are configured.
DEFAULT_VALIDATION_PROMPTS = 2


def validation_prompts(cfg: TrainingConfig, validation_texts: list[str], train_texts: list[str]) -> list[str]:
    """The configured prompts, else up to two captions of the validation split, else the first
    training caption (a dataset too small to hold out a validation split still gets a picture)."""
    if cfg.validation_prompts:
        return list(cfg.validation_prompts)
    texts = validation_texts or train_texts[:1]
    return list(dict.fromkeys(texts))[:DEFAULT_VALIDATION_PROMPTS]


def train_stage(
    run_dir: Path,
    items: pl.DataFrame,
    cfg: TrainingConfig,
    *,
    progress: bool = True,
    progress_path: Path | None = None,
) -> StageOutput:
    """Train (or resume) the LoRA of a run and return its tables."""
    from diffusion_bunny.models.device import cpu_threads_for
    from diffusion_bunny.models.diffusion import resolve_base_model

    images, validation_texts = read_dataset(run_dir, items)
    ref = resolve_base_model(cfg.base_model, cfg.family)  # a missing model fails here, before the latents
    prompts = validation_prompts(cfg, validation_texts, [i.text for i in images])
    with cpu_threads_for(ref.source, cfg.device, "training.device"):
        result = train_lora(
            images,
            cfg,
            checkpoint_dir(run_dir, cfg),
            validation_prompts=prompts,
            progress=progress,
            progress_path=progress_path,
            cache_dir=Path(run_dir) / "cache",
            trainer_class=trainer_class_for(cfg),
        )
    log = result.log
    counts = {
        "images": len(images),
        "steps": int(log["step"].max()) if log.height else 0,
        "final_loss": float(log["loss"].tail(10).mean()) if log.height else None,
        "validation_images": result.validation.height,
    }
    return StageOutput(
        tables={"training_log": log, "training_validation": result.validation},
        counts=counts,
        warnings=result.warnings,
        facts=result.facts,
    )


def compute(ctx: Context) -> StageOutput:
    """Stage 07 on a run."""
    return train_stage(
        ctx.run_dir,
        ctx.table("dataset_items"),
        ctx.cfg.training,
        progress=ctx.progress,
        progress_path=ctx.progress_path,
    )
