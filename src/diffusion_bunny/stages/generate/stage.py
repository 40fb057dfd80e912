"""Stage 08 (``generate``) on a run: find the LoRA files and the references, render the grid
(resuming), score every picture and pick the best checkpoint."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import polars as pl

from diffusion_bunny.errors import ConfigError, StageError
from diffusion_bunny.models.device import cpu_threads_for, resolve_device
from diffusion_bunny.models.diffusion import load_pipeline, resolve_base_model
from diffusion_bunny.models.faces import DetectSettings
from diffusion_bunny.pipeline.contract import ConfigView, Context, StageOutput
from diffusion_bunny.pipeline.run import Run
from diffusion_bunny.stages.characters.tables import reference_dir
from diffusion_bunny.stages.generate.drawn import (
    DrawnScorer,
    HubDrawnScorer,
    load_drawn_scorer,
    stage03_characters,
)
from diffusion_bunny.stages.generate.grid import Checkpoint, find_checkpoints, plan_grid, select_checkpoints
from diffusion_bunny.stages.generate.identity import (
    CharacterReferences,
    character_references,
    characters_to_draw,
    checkpoint_scores,
    clip_scores,
    load_clip,
    pick_best,
    score_images,
)
from diffusion_bunny.stages.generate.render import (
    DEFAULT_GUIDANCE,
    RenderSettings,
    batch_size_for,
    check_loras,
    default_size,
    generate_images,
    pipe_family,
)
from diffusion_bunny.stages.generate.settings import GenerateSettings
from diffusion_bunny.stages.generate.tables import GENERATIONS_SCHEMA, lora_fact
from diffusion_bunny.stages.train.tables import checkpoint_dir as training_dir
from diffusion_bunny.stages.train.tables import current_lora_dir


def checkpoint_dir(run: Run, cfg: ConfigView) -> Path:
    """The LoRA folder to draw with: the one stage 07 trained last (its ``loras`` table's
    ``current`` row, one ``v<n>/`` of ``checkpoint/<run folder name>/`` or ``train.output_dir``),
    else that folder itself (a training output ``train.output_dir`` points at)."""
    return current_lora_dir(training_dir(run.run_dir, cfg.train), run.optional_table("loras"))


def base_model_setting(cfg: ConfigView) -> tuple[str, str, str]:
    """(base model, family, the setting that names it): ``generate.base_model`` when set, else
    the model training used (``train.base_model`` / ``train.family``)."""
    if cfg.generate.base_model:
        return cfg.generate.base_model, "auto", "generate.base_model"
    return cfg.train.base_model, cfg.train.family, "train.base_model"


def trigger_word(cfg: ConfigView) -> str:
    """``generate.trigger_word``, else (null) the captions' (``captions.trigger_word``): the word
    the LoRA learned the movie's look under. An empty one is no trigger word (it put the
    captions' back into every prompt)."""
    if cfg.generate.trigger_word is not None:
        return cfg.generate.trigger_word
    return cfg.captions.trigger_word


def selected_checkpoints(run: Run, cfg: ConfigView) -> list[Checkpoint]:
    """The LoRA files to compare; none at all is a StageError naming stage train. With
    ``generate.lora_scales`` only 0 the base model alone is drawn: no LoRA is read, so none is
    needed (a user who draws the base model before training, to see what it makes of the
    prompts), and none is an input of the stage."""
    if not any(s != 0 for s in cfg.generate.lora_scales):
        return []
    folder = checkpoint_dir(run, cfg)
    found = find_checkpoints(folder)
    if not found:
        raise StageError(_no_lora(folder, run.optional_table("loras")))
    return select_checkpoints(found, cfg.generate.checkpoints)


def _no_lora(folder: Path, loras: pl.DataFrame | None) -> str:
    """Why no LoRA was found in ``folder``. Where stage 07's last training lies under another
    ``train.output_dir`` (trained with one, drawn without it), that folder is named: the line
    said "no trained LoRA in <run>/loras" beside a finished LoRA there, and to train again."""
    current = loras.filter(pl.col("current")) if loras is not None and "current" in loras.columns else None
    trained = Path(current["folder"][0]) if current is not None and current.height else None
    if trained is not None and trained.resolve() != Path(folder).resolve() and find_checkpoints(trained):
        return (
            f"no trained LoRA in {folder}: stage train's last LoRA is {trained}, under another "
            f"train.output_dir; give it as stage train had it (--set train.output_dir={trained.parent}), "
            "or run stage train with these settings"
        )
    return (
        f"no trained LoRA in {folder} (pytorch_lora_weights.safetensors); run stage train first "
        "(bunny run MOVIE runs every stage up to it), or point train.output_dir at a training output"
    )


def compute(ctx: Context) -> StageOutput:
    """Stage 08 on a run: resolve the base model (a missing one fails here, first), find the LoRA
    files and the references, then render, score and choose."""
    run, cfg, progress = ctx.run, ctx.cfg, ctx.progress
    base, family, setting = base_model_setting(cfg)
    ref = resolve_base_model(base, family, setting=setting)
    checkpoints = selected_checkpoints(run, cfg)
    detect = DetectSettings.from_config(cfg.characters)
    faces = ctx.optional("faces")
    stage03 = stage03_characters(run.read_manifest("characters"), run.run_dir)
    references, ref_warnings = character_references(
        reference_dir(run.run_dir, cfg.characters), faces, detect, drawn_pictures=stage03.drawn
    )
    wanted = cfg.generate.characters if cfg.generate.characters is not None else references.names
    drawn, drawn_warnings = load_drawn_scorer(
        stage03,
        [n for n in references.drawn if n in wanted],
        cfg.characters.hub,
        cfg.characters.fitted.min_score,
    )
    ref_warnings += drawn_warnings
    with cpu_threads_for(ref.source, cfg.generate.device, "generate.device"):
        result = draw_and_score(
            run.run_dir,
            cfg.generate,
            pipe_loader=lambda: load_pipeline(
                ref, device=cfg.generate.device, setting=setting, device_setting="generate.device"
            ),
            checkpoints=checkpoints,
            references=references,
            detect=detect,
            drawn=drawn,
            descriptions=cfg.captions.character_descriptions,
            trigger=trigger_word(cfg),
            resolution=cfg.generate.resolution or cfg.train.resolution,
            resolution_setting="generate.resolution" if cfg.generate.resolution else "train.resolution",
            base_model=ref.name,
            progress=progress,
            progress_path=ctx.progress_path,
        )
    result.warnings[:0] = ref_warnings
    result.facts["base_model_path"] = str(ref.path)
    result.facts["base_model_family"] = ref.family
    return result


# ---------------------------------------------------------------------------------------------
# Drawing and scoring


def side_multiple(pipe: Any) -> int:
    """What a picture side must be a multiple of for the loaded pipeline: its autoencoder's
    shrink factor, times the 2x2 patches FLUX.1 packs its latents into, or SD3.5's transformer's
    patch size. The settings check only 8: SD3.5 then stopped with diffusers' error (a bug, exit
    1) and FLUX.1 silently drew a smaller picture than the manifest said."""
    scale = int(getattr(pipe, "vae_scale_factor", 8))
    family = pipe_family(pipe)
    if family == "flux":
        return scale * 2
    if family == "sd3":
        patch = getattr(pipe, "patch_size", None) or pipe.transformer.config.patch_size
        return scale * int(patch)
    return scale


def check_side(pipe: Any, side: int, setting: str) -> None:
    """A ConfigError naming ``setting`` and the nearest sides that fit when the loaded pipeline
    cannot draw ``side`` px (:func:`side_multiple`); checked before any picture is drawn."""
    step = side_multiple(pipe)
    if side % step:
        lower, upper = side - side % step, side - side % step + step
        nearest = sorted((s for s in (lower, upper) if s >= step), key=lambda s: (abs(s - side), s))
        raise ConfigError(
            f"{setting}: {side} px is not a multiple of {step}, which this base model "
            f"({pipe_family(pipe)}) draws in; set {' or '.join(map(str, nearest))}"
        )


def _load_models(
    pipe_loader: Any,
    cfg: GenerateSettings,
    checkpoints: Sequence[Checkpoint],
    resolution: int | None,
    resolution_setting: str,
) -> tuple[Any, Any, int | None]:
    """The base model (first: a missing one fails before anything else), checked against the side
    and the LoRA files, the CLIP model when one is set (before any picture is drawn, so a missing
    one fails here too), and the side to draw. A side taken from ``train.resolution`` is rounded
    down to what the model draws, as the training cut its pictures (a FLUX.1 LoRA trained with
    72 trained at 64): refused here, after the training, its advice was a retrain."""
    pipe = pipe_loader()
    if resolution is not None and resolution_setting == "train.resolution":
        resolution = max(side_multiple(pipe), resolution - resolution % side_multiple(pipe))
    if resolution is not None:
        check_side(pipe, resolution, resolution_setting)
    check_loras(pipe, checkpoints)
    clip = None
    if cfg.clip_model:
        clip = load_clip(cfg.clip_model, resolve_device(cfg.device, "generate.device"))
    return pipe, clip, resolution


def draw_and_score(
    run_dir: Path,
    cfg: GenerateSettings,
    *,
    pipe_loader: Any,
    checkpoints: Sequence[Checkpoint],
    references: CharacterReferences,
    detect: DetectSettings,
    trigger: str,
    resolution: int | None,
    base_model: str,
    drawn: DrawnScorer | HubDrawnScorer | None = None,
    descriptions: Mapping[str, str] | None = None,
    progress: bool = False,
    progress_path: Path | None = None,
    resolution_setting: str = "generate.resolution",
) -> StageOutput:
    """What :func:`compute` does once it has resolved the run's models and files (the tests call
    it with a tiny pipeline): check the LoRA files, render the grid (resuming), score every image
    and pick the best checkpoint.

    ``pipe_loader()`` loads the base model (called first: a missing model fails before anything
    else); ``checkpoints`` are the LoRA files to compare, in training order (none where
    ``lora_scales`` has only 0: the base model alone is drawn, and a LoRA nothing was drawn with
    is neither counted nor compared); ``drawn`` scores the pictures of the drawn characters
    (:mod:`.drawn`; None: they are drawn, not scored); ``descriptions``
    (``captions.character_descriptions``) follow the names in the prompts; ``resolution_setting``
    names the setting ``resolution`` came from (in the error of a side the model cannot draw).
    """
    run_dir = Path(run_dir)
    warnings: list[str] = []
    characters, char_warnings = characters_to_draw(references, cfg.characters)
    warnings.extend(char_warnings)
    with_lora = any(s != 0 for s in cfg.lora_scales)
    if not checkpoints and with_lora:
        raise StageError("no LoRA checkpoint to generate with; run stage train first")
    checkpoints = checkpoints if with_lora else []  # only the grid's are checked, counted, compared
    pipe, clip, resolution = _load_models(pipe_loader, cfg, checkpoints, resolution, resolution_setting)
    items, size, rendered, reused = _draw(
        run_dir,
        cfg,
        pipe,
        checkpoints,
        characters,
        trigger,
        resolution,
        base_model,
        progress,
        progress_path,
        descriptions,
    )
    del pipe  # the base model's memory back before the faces are scored
    ids = score_images(run_dir, items, references, detect, drawn=drawn, progress=progress)
    clips: list[float | None] = [None] * len(items)
    if clip is not None:
        clips = list(clip_scores([run_dir / i.rel_path for i in items], [i.prompt for i in items], clip))
    generations = _generations_table(items, ids, clips, drawn.min_score if drawn else None)
    scores = checkpoint_scores(generations, [c.name for c in checkpoints])
    best = pick_best(scores)
    # False, not null (nor a comparison with None), with no checkpoint to choose (the base model alone).
    generations = generations.with_columns(best=(pl.col("checkpoint") == (best or "")).fill_null(False))
    warnings.extend(_score_warnings(generations, references, drawn))
    counts = {
        "images": generations.height,
        "rendered_now": rendered,
        "reused": reused,
        "with_face": int(generations["face_found"].sum()),
        "drawn_found": int(generations["drawn_found"].fill_null(False).sum()),
        "characters": len(characters),
        "checkpoints": len(checkpoints),
    }
    return StageOutput(
        tables={"generations": generations, "generation_scores": scores},
        counts=counts,
        warnings=warnings,
        facts=_facts(cfg, generations, scores, best, checkpoints, references, characters, trigger, run_dir)
        | {"base_model": base_model, "resolution": size},
    )


def _people(generations: pl.DataFrame, references: CharacterReferences) -> pl.DataFrame:
    """The pictures a face is looked for in to score them: those of the human characters, and
    the trigger-word grid of a run that named nobody (the drawn characters' are scored otherwise)."""
    return generations.filter(~pl.col("character").is_in(references.drawn))


def _score_warnings(
    generations: pl.DataFrame, references: CharacterReferences, drawn: DrawnScorer | HubDrawnScorer | None
) -> list[str]:
    """One line when pictures of human characters show no face, one when pictures of drawn
    characters do not show them (the drawn scorer's score under its ``min_score``) or were not
    scored (its model failed to load)."""
    out = []
    people = _people(generations, references)
    with_face = int(people["face_found"].sum())
    if with_face < people.height:
        out.append(
            f"no face in {people.height - with_face} of {people.height} generated images of people "
            "(identity_distance is null there); a base model that draws people, or more training, "
            "gives the identity score more to measure"
        )
    if drawn is not None and drawn.failed:
        out.append(
            f"the pictures of drawn characters are drawn but not scored: {drawn.failed}; once it loads, "
            "bunny run MOVIE --stages generate --force scores them (drawing them again)"
        )
    scored = generations.filter(pl.col("drawn_found").is_not_null())
    missed = int((~scored["drawn_found"]).sum())
    if drawn is not None and missed:
        out.append(
            f"the drawn character is not found in {missed} of {scored.height} generated images of "
            f"drawn characters ({drawn.model} scores them under {drawn.setting} "
            f"{drawn.min_score:g}); more training, or a base model that draws in the film's style, "
            "gives that score more to find"
        )
    return out


def _facts(
    cfg: GenerateSettings,
    generations: pl.DataFrame,
    scores: pl.DataFrame,
    best: str | None,
    checkpoints: Sequence[Checkpoint],
    references: CharacterReferences,
    characters: list[str],
    trigger: str,
    run_dir: Path,
) -> dict[str, Any]:
    """The manifest's facts of a run: the best checkpoint and its score, what was drawn and
    compared, and with which references. LoRA files inside the run folder are relative to it
    (:func:`~.tables.lora_fact`): a moved or copied run folder names its own."""
    best_ck = next((c for c in checkpoints if c.name == best), None)
    best_row = scores.filter(pl.col("best")).row(0, named=True) if best is not None else {}
    people = _people(generations, references)
    with_face = int(people["face_found"].sum())
    scored = generations.filter(pl.col("drawn_found").is_not_null())
    return {
        "best_checkpoint": best,
        "best_lora": lora_fact(best_ck.path, run_dir) if best_ck else None,
        "best_identity_distance": best_row.get("identity_distance"),
        "best_drawn_score": best_row.get("drawn_score"),
        "trigger_word": trigger,
        "characters": characters,
        "drawn_characters": [c for c in characters if c in references.drawn],
        "checkpoints": {c.name: lora_fact(c.path, run_dir) for c in checkpoints},
        "references": references.sources,
        "clip_model": cfg.clip_model,
        "no_face": f"no face in {people.height - with_face} of {people.height} images",
        "drawn_found": f"found in {int(scored['drawn_found'].sum())} of {scored.height} images",
    }


def _draw(
    run_dir: Path,
    cfg: GenerateSettings,
    pipe: Any,
    checkpoints: Sequence[Checkpoint],
    characters: list[str],
    trigger: str,
    resolution: int | None,
    base_model: str,
    progress: bool,
    progress_path: Path | None,
    descriptions: Mapping[str, str] | None = None,
) -> tuple[list[Any], int, int, int]:
    """Render what is missing of the grid with the loaded base model. Returns the grid, the
    picture size, and the counts of pictures drawn now and reused."""
    size = resolution or default_size(pipe)
    guidance = cfg.guidance_scale if cfg.guidance_scale is not None else DEFAULT_GUIDANCE[pipe_family(pipe)]
    settings = RenderSettings(
        base_model=base_model,
        negative_prompt=cfg.negative_prompt,
        steps=cfg.steps,
        guidance_scale=guidance,
        width=size,
        height=size,
        max_sequence_length=cfg.max_sequence_length,
    )
    items = plan_grid(characters, cfg.prompts, trigger, cfg.seeds, cfg.lora_scales, checkpoints, descriptions)
    rendered, reused = generate_images(
        pipe,
        run_dir,
        items,
        checkpoints,
        settings,
        batch_size=batch_size_for(pipe, cfg.batch_size),
        progress=progress,
        progress_path=progress_path,
    )
    return items, size, rendered, reused


def _generations_table(
    items: Sequence[Any], ids: Sequence[Any], clips: Sequence[float | None], min_score: float | None
) -> pl.DataFrame:
    return pl.DataFrame(
        [
            {
                "character": it.character,
                "prompt_index": it.prompt_index,
                "prompt": it.prompt,
                "seed": it.seed,
                "lora_scale": it.lora_scale,
                "checkpoint": it.checkpoint,
                "step": it.step,
                "path": it.rel_path,
                "faces": sc.faces,
                "face_found": sc.faces > 0,
                "identity_distance": sc.distance,
                "drawn_score": sc.drawn,
                "drawn_found": None if sc.drawn is None or min_score is None else sc.drawn >= min_score,
                "clip_score": cs,
                "best": False,
            }
            for it, sc, cs in zip(items, ids, clips, strict=True)
        ],
        schema=GENERATIONS_SCHEMA,
    )
