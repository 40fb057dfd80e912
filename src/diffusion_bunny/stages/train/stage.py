"""Stage 07 (``train``): a LoRA fine-tuned on the dataset stage 06 exported.

Reads the ``dataset_items`` table and the images under ``<run>/dataset/hf/`` (never the kohya
copy), trains with :func:`diffusion_bunny.stages.train.lora.train_lora` into the LoRA folder of
its training, ``<run>/loras/<name>/`` (or under ``train.output_dir``; the folder is named by
what it trains: the same settings, data and steps resume in their folder, others get a new one
that may continue from a shorter training's last checkpoint, and no earlier LoRA is deleted), and
returns the ``training_log``, ``training_validation`` and ``loras`` (every LoRA kept, the one just
trained marked ``current``) tables. Everything a user can get wrong (an empty dataset, a missing
image, a base model that is not there, a disk too small for the checkpoints) fails here in one
line before a step runs; a disk that fills up anyway is one line too, and the rerun resumes from
the last checkpoint.
"""

from __future__ import annotations

import errno
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import polars as pl

from diffusion_bunny.errors import StageError, storage_error
from diffusion_bunny.models.device import cpu_threads_for
from diffusion_bunny.models.diffusion import resolve_base_model
from diffusion_bunny.pipeline.contract import Context, StageOutput
from diffusion_bunny.pipeline.lock import current_holder
from diffusion_bunny.pipeline.run import run_fact
from diffusion_bunny.stages.train.data import TrainImage, dataset_key, read_dataset
from diffusion_bunny.stages.train.flow import trainer_class_for
from diffusion_bunny.stages.train.lora import checkpoint_steps, resume_keys, train_lora
from diffusion_bunny.stages.train.settings import TrainSettings
from diffusion_bunny.stages.train.tables import (
    TRAINING_FILE,
    checkpoint_dir,
    kept_loras,
    legacy_checkpoint_dir,
    lora_folder,
    lora_folder_name,
    lora_folders,
    lora_key,
    resumable_folders,
)

#: Captions of the validation split used as validation prompts when none are configured.
DEFAULT_VALIDATION_PROMPTS = 2


def validation_prompts(cfg: TrainSettings, validation_texts: list[str], train_texts: list[str]) -> list[str]:
    """The configured prompts, else up to two captions of the validation split, else the first
    training caption (a dataset too small to hold out a validation split still gets a picture)."""
    if cfg.validation_prompts:
        return list(cfg.validation_prompts)
    texts = validation_texts or train_texts[:1]
    return list(dict.fromkeys(texts))[:DEFAULT_VALIDATION_PROMPTS]


def lora_folder_for(
    run_dir: Path, cfg: TrainSettings, images: list[TrainImage], family: str | None = None
) -> tuple[Path, bool]:
    """The LoRA folder this training of ``images`` writes into (made, with its ``training.json``,
    when new: returned with True), under :func:`~.tables.checkpoint_dir`. ``family`` is the base
    model's (read from it when not given): its key leaves out the settings that family ignores."""
    data = dataset_key(images)
    resumes = resume_keys(cfg, data, family or resolve_base_model(cfg.base_model, cfg.family).family)
    resume, key = resumes[0], lora_key(resumes[0], cfg.max_train_steps)
    describe = {
        "resume_key": resume,
        "run": str(Path(run_dir).resolve()),
        "dataset_key": data,
        "settings": cfg.model_dump(mode="json"),
    }
    keys = [lora_key(k, cfg.max_train_steps) for k in resumes]  # a folder made before under its old key
    return lora_folder(checkpoint_dir(run_dir, cfg), keys, lora_folder_name(cfg, key), describe)


def compute(ctx: Context) -> StageOutput:
    """Stage 07 on a run: train (or resume) the LoRA of its training configuration and return
    its tables."""
    run_dir, cfg = ctx.run_dir, ctx.cfg.train
    images, validation_texts = read_dataset(run_dir, ctx.table("dataset_items"))
    ref = resolve_base_model(cfg.base_model, cfg.family)  # a missing model fails here, before the latents
    prompts = validation_prompts(cfg, validation_texts, [i.text for i in images])
    if not images:  # before any LoRA folder is made for it
        raise StageError("no training images; check the dataset (stage export)")
    base = checkpoint_dir(run_dir, cfg)
    resume = resume_keys(cfg, dataset_key(images), ref.family)
    folder = base
    try:
        # In the try: a train.output_dir that is read-only or a file is one line naming the setting.
        folder, created = lora_folder_for(run_dir, cfg, images, ref.family)
        with (
            _dropped_unless_started(folder, created),
            cpu_threads_for(ref.source, cfg.device, "train.device"),
        ):
            result = train_lora(
                images,
                cfg,
                folder,
                validation_prompts=prompts,
                progress=ctx.progress,
                progress_path=ctx.progress_path,
                cache_dir=Path(run_dir) / "cache",
                trainer_class=trainer_class_for(cfg),
                resume_from=resumable_folders(base, resume, exclude=folder),
            )
    except OSError as exc:
        error = storage_error(exc, _storage_advice(exc, base, folder, cfg.start_over))
        if error is None:
            raise
        raise error from None
    log = result.log
    loras = kept_loras(base, current=folder)
    others = loras.filter(~pl.col("current")).height
    if created and others and not result.facts.get("resumed_from_folder"):
        result.warnings.append(
            f"new training settings or data: this LoRA trains in {folder}; the {others} earlier one(s) in "
            f"{base} are kept (bunny status lists them)"
        )
    legacy = legacy_checkpoint_dir(run_dir)
    if base != legacy and lora_folders(legacy):
        result.warnings.append(
            f"LoRAs trained by an earlier version for a run of this name are in {legacy} (not read any more: "
            f"LoRAs live in the run folder now); set train.output_dir to it to list them, or move them"
        )
    result.facts["lora_folder"] = str(folder)
    result.facts["loras_kept"] = loras.height
    for key in ("output_dir", "lora_path", "kohya_path", "resumed_from_folder", "lora_folder"):
        if result.facts.get(key):  # (a moved or copied run folder's facts name its own files)
            result.facts[key] = run_fact(result.facts[key], run_dir)
    validation = result.validation.with_columns(
        pl.col("path").map_elements(lambda path: run_fact(path, run_dir), return_dtype=pl.String)
    )
    counts = {
        "images": len(images),
        "steps": int(log["step"].max()) if log.height else 0,
        "final_loss": float(log["loss"].tail(10).mean()) if log.height else None,
        "validation_images": result.validation.height,
    }
    return StageOutput(
        tables={"training_log": log, "training_validation": validation, "loras": loras},
        counts=counts,
        warnings=result.warnings,
        facts=result.facts,
    )


@contextmanager
def _dropped_unless_started(folder: Path, created: bool) -> Iterator[None]:
    """Remove the LoRA folder this call ``created`` when the training fails before it wrote
    anything there (settings refused, a damaged base model, an unreadable image, the disk
    pre-check): left with only its ``training.json``, it was listed as a kept LoRA ("no checkpoint
    yet") for good and counted in the warnings of every later training."""
    try:
        yield
    except BaseException:
        unused = created and folder.is_dir() and current_holder(folder) is None
        if unused and {p.name for p in folder.iterdir()} <= {TRAINING_FILE, ".locks"}:
            shutil.rmtree(folder, ignore_errors=True)
        raise


def _storage_advice(exc: OSError, base: Path, folder: Path, start_over: bool = False) -> str:
    """What to do when a write of the training fails, and what a rerun does: free space on a full
    disk; else (a read-only folder, a file where the LoRA folders go) another ``train.output_dir``,
    not the generic "choose another --out", which leaves the setting as it was. With
    ``train.start_over`` still set, a rerun removes the checkpoints again: said, not "resumes"."""
    steps = checkpoint_steps(folder) if folder != base else []
    resume = f"a rerun resumes from checkpoint-{steps[-1]}" if steps else "a rerun starts the training again"
    if steps and start_over:
        resume = (
            f"set train.start_over back to false first, or a rerun removes checkpoint-{steps[-1]} "
            "and starts the training again"
        )
    if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
        return f"make {base} a folder you can write to, or set train.output_dir to one; {resume}"
    return (
        f"free some space (older LoRA folders in {base} that bunny status lists), set "
        f"train.checkpoints_total_limit, or point train.output_dir at a larger disk; {resume}"
    )
