"""Stage 08 (``generate``) on a run: where the LoRA files and references are, what the stage's
inputs are, and the call into :mod:`diffusion_bunny.generate`.

Inputs (a change in any makes the stage stale): the LoRA files compared (size and content hashes),
the base model setting, the trigger word, the image size, stage 03's reference folder (content
hash) and face detector settings, and which faces stage 03 named (``faces``: frame_id,
character). The ``generation`` section is the stage's own config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from diffusion_bunny.config import Config
from diffusion_bunny.errors import StageError
from diffusion_bunny.generate import Checkpoint, GenerateResult, find_checkpoints, select_checkpoints
from diffusion_bunny.run import Run, file_fingerprint


def checkpoint_dir(run: Run, cfg: Config) -> Path:
    """Stage 07's output folder (``training.output_dir``, else ``checkpoint/<run folder name>/``),
    by stage 07's own rule."""
    from diffusion_bunny.stages.train import checkpoint_dir as training_dir

    return training_dir(run.run_dir, cfg.training)


def base_model_setting(cfg: Config) -> tuple[str, str, str]:
    """(base model, family, the setting that names it): ``generation.base_model`` when set, else
    the model training used (``training.base_model`` / ``training.family``)."""
    if cfg.generation.base_model:
        return cfg.generation.base_model, "auto", "generation.base_model"
    return cfg.training.base_model, cfg.training.family, "training.base_model"


def trigger_word(cfg: Config) -> str:
    """``generation.trigger_word``, else the captions' (``captioning.trigger_word``): the word the
    LoRA learned the movie's look under."""
    return cfg.generation.trigger_word or cfg.captioning.trigger_word


def selected_checkpoints(run: Run, cfg: Config) -> list[Checkpoint]:
    """The LoRA files to compare; none at all is a StageError naming stage train."""
    from diffusion_bunny.stages import stage_names

    folder = checkpoint_dir(run, cfg)
    found = find_checkpoints(folder)
    if not found:
        names = stage_names()
        upto = ",".join(names[: names.index("generate") + 1])
        raise StageError(
            f"no trained LoRA in {folder} (pytorch_lora_weights.safetensors); run stage train first "
            f"(bunny run MOVIE --stages {upto}), or point training.output_dir at a training output"
        )
    return select_checkpoints(found, cfg.generation.checkpoints)


def generate_inputs(run: Run, cfg: Config) -> dict[str, Any]:
    """The fingerprints :func:`stages.run_stage` compares with the last manifest."""
    from diffusion_bunny.faces import DetectSettings, references_fingerprint
    from diffusion_bunny.stages.characters import reference_dir

    base, family, _ = base_model_setting(cfg)
    inputs: dict[str, Any] = {
        "checkpoints": {c.name: file_fingerprint(c.path) for c in selected_checkpoints(run, cfg)},
        "base_model": {"name": base, "family": family},
        "trigger_word": trigger_word(cfg),
        "resolution": cfg.generation.resolution or cfg.training.resolution,
        "references": references_fingerprint(reference_dir(run.run_dir, cfg.characters)),
        "detect": DetectSettings.from_config(cfg.characters).key(),
    }
    if run.has_table("faces"):
        # The references are the confidently named faces: a relabel of stage 03 changes them.
        inputs["faces"] = run.table_fingerprint(
            "faces", ["face_id", "frame_id", "character", "low_confidence"]
        )
    return inputs


def generate_run(run: Run, cfg: Config, *, progress: bool = True) -> GenerateResult:
    """Stage 08 on a run: resolve the base model (a missing one fails here, first), find the LoRA
    files and the references, then render, score and choose."""
    from diffusion_bunny.faces import DetectSettings
    from diffusion_bunny.generate import character_references, generate_stage
    from diffusion_bunny.sd_models import load_pipeline, resolve_base_model
    from diffusion_bunny.stages.characters import reference_dir

    base, family, setting = base_model_setting(cfg)
    ref = resolve_base_model(base, family, setting=setting)
    checkpoints = selected_checkpoints(run, cfg)
    detect = DetectSettings.from_config(cfg.characters)
    faces = run.optional_table("faces")
    references, ref_warnings = character_references(reference_dir(run.run_dir, cfg.characters), faces, detect)
    result = generate_stage(
        run.run_dir,
        cfg.generation,
        pipe_loader=lambda: load_pipeline(ref, device=cfg.generation.device, setting=setting),
        checkpoints=checkpoints,
        references=references,
        detect=detect,
        trigger=trigger_word(cfg),
        resolution=cfg.generation.resolution or cfg.training.resolution,
        base_model=ref.name,
        progress=progress,
        progress_path=run.progress_path("generate"),
    )
    result.warnings[:0] = ref_warnings
    result.facts["base_model_path"] = str(ref.path)
    result.facts["base_model_family"] = ref.family
    return result
