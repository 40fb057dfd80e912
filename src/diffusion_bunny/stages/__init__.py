"""The stage registry and the one function that runs a stage with skip-on-rerun.

Each stage declares the config sections it depends on, the tables it writes and how to
fingerprint its inputs; :func:`run_stage` then decides whether to skip, computes, writes the
tables atomically and records the manifest. Notebooks, ``bunny run`` and tests all call the same
function, so a stage behaves the same with or without papermill.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from diffusion_bunny.config import Config
from diffusion_bunny.errors import StageError
from diffusion_bunny.pipeline.run import Run, StageState, build_manifest, manifest_state

if TYPE_CHECKING:
    import polars as pl


@dataclass(frozen=True)
class StageOutput:
    """What a stage's compute function returns."""

    tables: dict[str, pl.DataFrame]
    counts: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StageSpec:
    """A stage: its name, number, notebook and dependencies."""

    name: str
    number: int
    notebook: str
    version: int
    sections: tuple[str, ...]
    outputs: tuple[str, ...]
    inputs: Callable[[Run, Config], dict[str, Any]]
    compute: Callable[[Run, Config, bool], StageOutput]


def _require_tables(run: Run, stage: str, tables: dict[str, str]) -> None:
    """One clear error for the first missing input table (``tables``: table -> the stage that
    writes it), naming the command that runs everything up to ``stage``."""
    for table, producer in tables.items():
        if not run.has_table(table):
            names = stage_names()
            upto = ",".join(names[: names.index(stage) + 1])
            raise StageError(
                f"table '{table}' is missing in {run.run_dir}; run stage {producer} first "
                f"(bunny run MOVIE --stages {upto})"
            )


def _extract_inputs(run: Run, cfg: Config) -> dict[str, Any]:
    from diffusion_bunny.pipeline.run import file_fingerprint

    movie = run.movie
    if not movie.is_file():
        raise StageError(f"the movie of this run is gone: {movie}; put it back or rerun on its new path")
    return {"movie": file_fingerprint(movie)}


def _extract_compute(run: Run, cfg: Config, progress: bool) -> StageOutput:
    from diffusion_bunny.stages.extract.stage import extract_frames

    result = extract_frames(
        run.movie,
        cfg.extraction,
        run.run_dir,
        movie_key=run.movie_key,
        progress=progress,
        progress_path=run.progress_path("extract"),
    )
    counts = {
        "shots": result.shots.height,
        "frames": result.frames.height,
        "static_shots": int((result.shots["kind"] == "static").sum()),
        "dynamic_shots": int((result.shots["kind"] == "dynamic").sum()),
        "decoded_frames": result.info["decoded_frames"],
        "boundary_candidates": result.boundary_candidates.height,
    }
    return StageOutput(
        tables={
            "shots": result.shots,
            "frames": result.frames,
            "keyframe_candidates": result.candidates,
            "boundary_candidates": result.boundary_candidates,
        },
        counts=counts,
        warnings=result.warnings,
        facts=result.info,
    )


def _quality_inputs(run: Run, cfg: Config) -> dict[str, Any]:
    _require_tables(run, "quality", {"frames": "extract"})
    return {"frames": run.table_fingerprint("frames")}


def _quality_compute(run: Run, cfg: Config, progress: bool) -> StageOutput:
    from diffusion_bunny.stages.quality.rules import reason_counts
    from diffusion_bunny.stages.quality.stage import quality_stage

    frames = run.read_table("frames")
    table, facts = quality_stage(
        run.run_dir, frames, cfg.filtering, progress=progress, progress_path=run.progress_path("quality")
    )
    if run.has_table("faces"):
        # Stage 03 already ran: keep the face sharpness it measured (the faces did not change).
        from diffusion_bunny.stages.characters.identify import fill_face_sharpness

        table = fill_face_sharpness(table, run.read_table("faces"))
    counts = {"frames": table.height, **reason_counts(table)}
    warnings = []
    if counts.get("unreadable"):
        warnings.append(
            f"{counts['unreadable']} frame file(s) missing or unreadable (reject_reason 'unreadable'); "
            "rerun stage extract with --force to write them again"
        )
    return StageOutput(tables={"quality": table}, counts=counts, warnings=warnings, facts=facts)


def _characters_inputs(run: Run, cfg: Config) -> dict[str, Any]:
    from diffusion_bunny.models.faces import references_fingerprint
    from diffusion_bunny.stages.characters.tables import reference_dir

    _require_tables(run, "characters", {"frames": "extract"})
    inputs: dict[str, Any] = {"frames": run.table_fingerprint("frames")}
    if run.has_table("quality"):
        # Which frames stage 02 kept, not the face_sharpness column stage 03 fills in itself.
        inputs["quality"] = run.table_fingerprint("quality", ["frame_id", "keep"])
    inputs["references"] = references_fingerprint(reference_dir(run.run_dir, cfg.characters))
    return inputs


def _characters_compute(run: Run, cfg: Config, progress: bool) -> StageOutput:
    from diffusion_bunny.stages.characters.stage import characters_stage

    previous = None
    if run.has_table("faces") and run.has_table("face_frames"):
        previous = (run.read_table("faces"), run.read_table("face_frames"))
    quality = run.optional_table("quality")
    result = characters_stage(
        run.run_dir,
        run.read_table("frames"),
        quality,
        cfg.characters,
        previous=previous,
        progress=progress,
        progress_path=run.progress_path("characters"),
    )
    if result.quality is not None:
        # Stage 02 leaves face_sharpness empty; it is filled here, where the faces are known.
        run.write_table("quality", result.quality)
    return StageOutput(
        tables={"faces": result.faces, "face_frames": result.face_frames},
        counts=result.counts,
        warnings=result.warnings,
        facts=result.facts,
    )


def _scenes_inputs(run: Run, cfg: Config) -> dict[str, Any]:
    _require_tables(run, "scenes", {"frames": "extract", "quality": "quality"})
    inputs: dict[str, Any] = {
        "frames": run.table_fingerprint("frames"),
        "quality": run.table_fingerprint("quality", ["frame_id", "keep"]),
    }
    if run.has_table("faces"):
        inputs["faces"] = run.table_fingerprint("faces", ["frame_id", "character"])
    if run.has_table("face_frames"):
        inputs["face_frames"] = run.table_fingerprint("face_frames", ["frame_id", "status"])
    if run.has_table("feedback") and run.read_table("feedback").height:
        # A person's corrections: the adapter learns from them, so new ones make the stage stale.
        inputs["feedback"] = run.table_fingerprint("feedback", ["event_id"])
    return inputs


def _scenes_compute(run: Run, cfg: Config, progress: bool) -> StageOutput:
    from diffusion_bunny.stages.scenes.stage import read_feedback, scenes_lock, scenes_stage

    previous = {
        t: run.read_table(t) for t in ("embeddings", "clusters", "scene_exemplars") if run.has_table(t)
    }
    manifest = run.read_manifest("scenes")
    with scenes_lock(run.run_dir):
        feedback = read_feedback(run.run_dir)
        if not run.has_table("feedback"):
            run.write_table("feedback", feedback)  # the empty, append-only table, so its schema is fixed
    result = scenes_stage(
        run.run_dir,
        run.movie_key,
        run.read_table("frames"),
        run.read_table("quality"),
        run.optional_table("faces"),
        feedback,
        cfg.scenes,
        face_frames=run.optional_table("face_frames"),
        previous=previous,
        previous_facts=(manifest or {}).get("facts"),
        progress=progress,
    )
    return StageOutput(
        tables={
            "embeddings": result.embeddings,
            "clusters": result.clusters,
            "scene_exemplars": result.exemplars,
        },
        counts=result.counts,
        warnings=result.warnings,
        facts=result.facts,
    )


def _captions_inputs(run: Run, cfg: Config) -> dict[str, Any]:
    _require_tables(run, "captions", {"frames": "extract", "quality": "quality"})
    inputs: dict[str, Any] = {
        "frames": run.table_fingerprint("frames"),
        "quality": run.table_fingerprint("quality", ["frame_id", "keep", "brightness"]),
    }
    if run.has_table("shots"):
        inputs["shots"] = run.table_fingerprint("shots", ["shot_id", "kind"])
    if run.has_table("faces"):
        inputs["faces"] = run.table_fingerprint("faces", ["frame_id", "character", "top", "bottom"])
    if run.has_table("clusters"):
        inputs["clusters"] = run.table_fingerprint("clusters", ["frame_id", "level", "cluster_id"])
    if run.has_table("caption_edits"):
        # A person's edits: re-applied on top of every rerun.
        inputs["caption_edits"] = run.table_fingerprint("caption_edits", ["event_id"])
    return inputs


def _captions_compute(run: Run, cfg: Config, progress: bool) -> StageOutput:
    from diffusion_bunny.stages.captions.stage import captions_stage

    result = captions_stage(
        run.run_dir,
        run.read_table("frames"),
        cfg.captioning,
        quality=run.optional_table("quality"),
        faces=run.optional_table("faces"),
        shots=run.optional_table("shots"),
        clusters=run.optional_table("clusters"),
        seed=cfg.run.seed,
        progress=progress,
        progress_path=run.progress_path("captions"),
    )
    return StageOutput(
        tables={"captions": result.captions, "caption_calls": result.calls},
        counts=result.counts,
        warnings=result.warnings,
        facts=result.facts,
    )


def _export_inputs(run: Run, cfg: Config) -> dict[str, Any]:
    _require_tables(run, "export", {"frames": "extract", "quality": "quality", "captions": "captions"})
    inputs: dict[str, Any] = {
        "frames": run.table_fingerprint("frames"),
        # Which frames were kept, and their hashes (shots the movie cuts back to share a split).
        "quality": run.table_fingerprint("quality", ["frame_id", "keep", "phash"]),
        # A caption a person edited in notebook 05 makes the dataset stale.
        "captions": run.table_fingerprint("captions", ["frame_id", "caption", "status"]),
    }
    if run.has_table("faces"):
        inputs["faces"] = run.table_fingerprint(
            "faces", ["face_id", "frame_id", "character", "top", "right", "bottom", "left"]
        )
    return inputs


def _export_compute(run: Run, cfg: Config, progress: bool) -> StageOutput:
    from diffusion_bunny.stages.export.stage import export_stage

    result = export_stage(
        run.run_dir,
        run.read_table("frames"),
        run.read_table("quality"),
        run.optional_table("faces"),
        run.read_table("captions"),
        cfg.export,
        progress=progress,
        progress_path=run.progress_path("export"),
    )
    return StageOutput(
        tables={"dataset_items": result.items},
        counts=result.counts,
        warnings=result.warnings,
        facts=result.facts,
    )


def _train_inputs(run: Run, cfg: Config) -> dict[str, Any]:
    _require_tables(run, "train", {"dataset_items": "export"})
    return {"dataset_items": run.table_fingerprint("dataset_items")}


def _train_compute(run: Run, cfg: Config, progress: bool) -> StageOutput:
    from diffusion_bunny.stages.train.stage import train_stage

    result = train_stage(
        run.run_dir,
        run.read_table("dataset_items"),
        cfg.training,
        progress=progress,
        progress_path=run.progress_path("train"),
    )
    return StageOutput(
        tables={"training_log": result.log, "training_validation": result.validation},
        counts=result.counts,
        warnings=result.warnings,
        facts=result.facts,
    )


def _generate_inputs(run: Run, cfg: Config) -> dict[str, Any]:
    from diffusion_bunny.stages.generate.stage import generate_inputs

    return generate_inputs(run, cfg)


def _generate_compute(run: Run, cfg: Config, progress: bool) -> StageOutput:
    from diffusion_bunny.stages.generate.stage import generate_run

    result = generate_run(run, cfg, progress=progress)
    return StageOutput(
        tables={"generations": result.generations, "generation_scores": result.scores},
        counts=result.counts,
        warnings=result.warnings,
        facts=result.facts,
    )


#: Tables stage 09 writes itself (never its own input).
REPORT_TABLES = ("report_figures", "report_funnel")


def _report_inputs(run: Run, cfg: Config) -> dict[str, Any]:
    # Every table the run has (whichever stages ran): a changed table makes the report stale. No
    # table is required: sections of stages that did not run say so.
    names = sorted(p.stem for p in run.tables_dir.glob("*.parquet")) if run.tables_dir.is_dir() else []
    return {name: run.table_fingerprint(name) for name in names if name not in REPORT_TABLES}


def _report_compute(run: Run, cfg: Config, progress: bool) -> StageOutput:
    from diffusion_bunny.stages.report.stage import report_stage

    figures, funnel, counts = report_stage(run, cfg)
    return StageOutput(
        tables={"report_figures": figures, "report_funnel": funnel},
        counts=counts,
        facts={"html": str((run.run_dir / "report" / "index.html").relative_to(run.run_dir))},
    )


STAGES: dict[str, StageSpec] = {
    spec.name: spec
    for spec in (
        StageSpec(
            name="extract",
            number=1,
            notebook="01_extract_frames.ipynb",
            version=2,
            sections=("extraction",),
            outputs=("shots", "frames", "keyframe_candidates", "boundary_candidates"),
            inputs=_extract_inputs,
            compute=_extract_compute,
        ),
        StageSpec(
            name="quality",
            number=2,
            notebook="02_filter_quality.ipynb",
            version=1,
            sections=("filtering",),
            outputs=("quality",),
            inputs=_quality_inputs,
            compute=_quality_compute,
        ),
        StageSpec(
            name="characters",
            number=3,
            notebook="03_detect_characters.ipynb",
            version=1,
            sections=("characters",),
            outputs=("faces", "face_frames"),
            inputs=_characters_inputs,
            compute=_characters_compute,
        ),
        StageSpec(
            name="scenes",
            number=4,
            notebook="04_cluster_scenes.ipynb",
            version=1,
            sections=("scenes",),
            outputs=("embeddings", "clusters", "scene_exemplars"),
            inputs=_scenes_inputs,
            compute=_scenes_compute,
        ),
        StageSpec(
            name="captions",
            number=5,
            notebook="05_caption.ipynb",
            version=1,
            sections=("captioning",),
            outputs=("captions", "caption_calls"),
            inputs=_captions_inputs,
            compute=_captions_compute,
        ),
        StageSpec(
            name="export",
            number=6,
            notebook="06_export_dataset.ipynb",
            version=1,
            sections=("export",),
            outputs=("dataset_items",),
            inputs=_export_inputs,
            compute=_export_compute,
        ),
        StageSpec(
            name="train",
            number=7,
            notebook="07_finetune_lora.ipynb",
            version=1,
            sections=("training",),
            outputs=("training_log", "training_validation"),
            inputs=_train_inputs,
            compute=_train_compute,
        ),
        StageSpec(
            name="generate",
            number=8,
            notebook="08_generate.ipynb",
            version=1,
            sections=("generation",),
            outputs=("generations", "generation_scores"),
            inputs=_generate_inputs,
            compute=_generate_compute,
        ),
        StageSpec(
            name="report",
            number=9,
            notebook="09_qa_report.ipynb",
            version=1,
            sections=("report",),
            outputs=REPORT_TABLES,
            inputs=_report_inputs,
            compute=_report_compute,
        ),
    )
}


def stage_names() -> list[str]:
    """Stage names in pipeline order."""
    return [s.name for s in sorted(STAGES.values(), key=lambda s: s.number)]


def get_stage(name: str) -> StageSpec:
    """The spec of ``name``; an unknown name is a user error that lists the known ones."""
    try:
        return STAGES[name]
    except KeyError:
        raise StageError(f"unknown stage '{name}' (available: {', '.join(stage_names())})") from None


def stage_state(run: Run, name: str, cfg: Config) -> tuple[StageState, str]:
    """``done``/``stale``/``missing`` for one stage of a run, with the reason."""
    spec = get_stage(name)
    return manifest_state(
        run, name, spec.version, cfg.section_hash(*spec.sections), spec.inputs(run, cfg), spec.outputs
    )


def run_stage(
    run: Run, name: str, cfg: Config, *, force: bool = False, progress: bool = True
) -> dict[str, pl.DataFrame]:
    """Run one stage (or skip it when its manifest matches) and return the tables it wrote."""
    spec = get_stage(name)
    inputs = spec.inputs(run, cfg)
    config_hash = cfg.section_hash(*spec.sections)
    state, _ = manifest_state(run, name, spec.version, config_hash, inputs, spec.outputs)
    if state == "done" and not force:
        return {table: run.read_table(table) for table in spec.outputs}
    started = datetime.now(UTC)
    out = spec.compute(run, cfg, progress)
    for table, df in out.tables.items():
        run.write_table(table, df)
    manifest = build_manifest(
        name,
        spec.version,
        config_hash,
        {section: getattr(cfg, section).model_dump(mode="json") for section in spec.sections},
        inputs,
        out.tables,
        out.counts,
        seed=cfg.run.seed,
        started=started,
        warnings=out.warnings,
        facts=out.facts,
    )
    run.write_manifest(name, manifest)
    for warning in out.warnings:
        import warnings

        warnings.warn(warning, stacklevel=2)
    return out.tables
