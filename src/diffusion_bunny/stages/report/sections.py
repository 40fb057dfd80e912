"""The report's sections: one per stage, each with its figures, or a line saying the stage did not
run (so the report works after any subset of the stages)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from diffusion_bunny.media.figures import Block, Layout, Tile, tile_sheet
from diffusion_bunny.pipeline.contract import ConfigView
from diffusion_bunny.pipeline.run import slugify
from diffusion_bunny.stages.captions.plots import caption_length_plot
from diffusion_bunny.stages.captions.tables import usable_captions, without_false_sightings
from diffusion_bunny.stages.characters.plots import UNKNOWN, face_sheet, screen_time_plot
from diffusion_bunny.stages.export.plots import dataset_sheet
from diffusion_bunny.stages.export.tables import dataset_dir
from diffusion_bunny.stages.extract.plots import shot_length_plot
from diffusion_bunny.stages.quality.plots import quality_histograms, text_sheet
from diffusion_bunny.stages.quality.settings import QualitySettings
from diffusion_bunny.stages.report.figures import drawn_plot, identity_plot, shot_length_histogram
from diffusion_bunny.stages.report.funnel import (
    dropped_by_reason,
    dropped_plot,
    funnel_plot,
    funnel_summary,
    funnel_table,
    last_gate,
    subtitles_cropped,
)
from diffusion_bunny.stages.scenes.plots import cluster_sizes_plot
from diffusion_bunny.stages.train.plots import loss_curve_plot

#: Sections in report order: key -> (title, the stage whose tables it shows, what it tells).
#: The table whose absence means a section's stage did not run.
SECTION_TABLES = {
    "dataset": "dataset_items",
    "quality": "quality",
    "shots": "shots",
    "characters": "faces",
    "scenes": "clusters",
    "captions": "captions",
    "train": "training_log",
    "generate": "generations",
}

SECTIONS: dict[str, tuple[str, str, str]] = {
    "funnel": (
        "Frames in and out of each stage",
        "extract",
        "Each bar is the frames that reached a step: green went on, the other colours were dropped, "
        "with the reason. Two steps drop nothing (with a named character, in a scene cluster): "
        "their greys only say what the frames hold, and every frame goes on. Steps of stages "
        "that did not run are left out.",
    ),
    "dataset": (
        "What the LoRA will see",
        "export",
        "The exported pictures as a trainer reads them (each labelled with its crop and size; "
        "validation pictures framed in orange): the picture only, without letterbox bars, text "
        "frames or burned-in subtitles. Then every frame that was dropped on the way, by reason.",
    ),
    "quality": (
        "Sharpness and brightness",
        "quality",
        "Every quality score of stage 02 with its threshold (dashed), coloured by outcome; the "
        "thresholds are the ones the stage last ran with.",
    ),
    "shots": (
        "Shot lengths",
        "extract",
        "How long the shots are (static shots give one keyframe, dynamic ones three), and where they "
        "fall in the movie.",
    ),
    "characters": (
        "Characters on screen",
        "characters",
        "A bar over every shot in which a sampled frame shows the character, a dot at each frame "
        "where the face was found; then each character's contact sheet (best matches first, "
        "low-confidence ones framed in orange).",
    ),
    "scenes": (
        "Scene clusters",
        "scenes",
        "Frames per scene cluster, largest first; the grey bar is the noise bucket.",
    ),
    "captions": (
        "Caption lengths",
        "captions",
        "Words per usable caption (status ok or edited); failed captions are counted in the title.",
    ),
    "train": (
        "Training loss",
        "train",
        "The LoRA's training loss per step, with a moving average.",
    ),
    "generate": (
        "Identity per checkpoint",
        "generate",
        "Face-encoding distance between each generated picture of a person and the character's "
        "references, per checkpoint (lower is closer; the dashed line is the naming tolerance); for a "
        "drawn character, the score of the detector stage 03 fitted to its pictures (higher is "
        "closer; the dashed line is the score it names a sighting at).",
    ),
}


@dataclass
class Figure:
    """One figure of a section: a plotnine chart or a Pillow image."""

    name: str
    title: str
    image: Any


@dataclass
class Section:
    """One section of the report: its figures, or why it has none."""

    key: str
    status: str  # "ok", "empty" (the stage ran, nothing to show) or "absent" (the stage did not run)
    message: str
    figures: list[Figure] = field(default_factory=list)

    @property
    def title(self) -> str:
        return SECTIONS[self.key][0] if self.key in SECTIONS else self.key.replace("_", " ").capitalize()


@dataclass(frozen=True)
class ReportData:
    """What the sections read: the run's tables (as the stage received them), the manifests of the
    other stages (the thresholds stage 02 ran with, the frames stage 01 decoded) and the run folder
    (where the pictures of the contact sheets are). The sections never open the run themselves."""

    run_dir: Path
    tables: dict[str, pl.DataFrame | None]
    manifests: dict[str, dict[str, Any] | None] = field(default_factory=dict)

    def has_table(self, name: str) -> bool:
        return self.tables.get(name) is not None

    def read_table(self, name: str) -> pl.DataFrame:
        table = self.tables.get(name)
        if table is None:
            raise KeyError(f"the report has no table {name}")
        return table

    def optional_table(self, name: str) -> pl.DataFrame | None:
        return self.tables.get(name)

    def read_manifest(self, stage: str) -> dict[str, Any] | None:
        return self.manifests.get(stage)


def did_not_run(stage: str, table: str) -> str:
    """The one line a section shows for a stage that did not run."""
    return f"stage {stage} did not run (no tables/{table}.parquet)"


# ------------------------------------------------------------------------------------- sections


def _quality_config(run: ReportData, cfg: ConfigView) -> Any:
    """The thresholds stage 02 last ran with (from its manifest, which says ``filtering`` when it
    was written before the section's rename; the defaults for a manifest without them)."""
    settings = ((run.read_manifest("quality") or {}).get("config")) or {}
    try:  # a manifest edited by hand (``"config": "x"``) gives the defaults, not a bug
        return QualitySettings(**(settings.get("quality") or settings["filtering"]))
    except (KeyError, TypeError, ValueError, AttributeError):
        return QualitySettings()


def build_sections(run: ReportData, cfg: ConfigView) -> list[Section]:
    """Every section of the report, in order, from the tables the run has."""
    builders: dict[str, Callable[[ReportData, ConfigView], Section]] = {
        "funnel": _funnel_section,
        "dataset": _dataset_section,
        "quality": _quality_section,
        "shots": _shots_section,
        "characters": _characters_section,
        "scenes": _scenes_section,
        "captions": _captions_section,
        "train": _train_section,
        "generate": _generate_section,
    }
    sections = []
    for key, build in builders.items():
        table = SECTION_TABLES.get(key)
        if table is not None and not run.has_table(table):
            sections.append(Section(key, "absent", did_not_run(SECTIONS[key][1], table)))
            continue
        sections.append(build(run, cfg))
    return sections


def _funnel_section(run: ReportData, cfg: ConfigView) -> Section:
    if not run.has_table("frames"):
        return Section("funnel", "absent", did_not_run("extract", "frames"))
    funnel = run_funnel(run, decoded_frames(run))
    summary = funnel_summary(funnel)
    last = last_gate(summary)
    return Section(
        "funnel",
        "ok",
        f"{summary['frames in'][0]} frames in, {last['frames out']} out after '{last['step']}'",
        [Figure("funnel", "Frames per step", funnel_plot(funnel))],
    )


def _dataset_section(run: ReportData, cfg: ConfigView) -> Section:
    items = run.read_table("dataset_items")
    if not items.height:
        return Section("dataset", "empty", "stage export wrote no picture")
    funnel = run_funnel(run, decoded_frames(run))
    dropped = dropped_by_reason(funnel)
    figures = [
        Figure(
            "dataset_sheet",
            "Exported pictures",
            dataset_sheet(run.run_dir / "dataset", items, max_per_group=cfg.report.dataset_sheet_pictures),
        )
    ]
    plot = dropped_plot(funnel)
    if plot is not None:
        figures.append(Figure("dropped", "Frames dropped, by reason", plot))
    reasons = ", ".join(f"{r} {n}" for r, n in dropped.select("reason", "frames").iter_rows()) or "none"
    frames_out = items["frame_id"].n_unique()
    message = f"{items.height} pictures from {frames_out} frames; dropped on the way: {reasons}"
    return Section("dataset", "ok", message, figures)


def decoded_frames(run: ReportData) -> int | None:
    """How many frames stage 01 decoded (its manifest's count; None before it recorded one)."""
    return ((run.read_manifest("extract") or {}).get("counts") or {}).get("decoded_frames")


def run_funnel(run: ReportData, decoded: int | None = None) -> pl.DataFrame:
    """:func:`funnel_table` over the run's tables (the ones present)."""
    candidates = (
        run.read_table("keyframe_candidates").select("frame_index")
        if run.has_table("keyframe_candidates")
        else None
    )
    faces = None
    if run.has_table("faces"):  # a face fixed to none is no face (:func:`without_false_sightings`)
        faces = without_false_sightings(run.read_table("faces")).select("frame_id", "character")
    return funnel_table(
        decoded=decoded,
        candidates=candidates,
        frames=run.optional_table("frames"),
        quality=run.optional_table("quality"),
        faces=faces,
        face_frames=run.optional_table("face_frames"),
        clusters=run.optional_table("clusters"),
        captions=run.optional_table("captions"),
        dataset_items=run.optional_table("dataset_items"),
    )


def _quality_section(run: ReportData, cfg: ConfigView) -> Section:
    quality = run.read_table("quality")
    if not quality.height:
        return Section("quality", "empty", "stage quality ran on no frame")
    kept = int(quality["keep"].sum())
    frames = run.optional_table("frames")
    histograms = quality_histograms(quality, _quality_config(run, cfg), frames)
    figures = [Figure("quality", "Quality scores and thresholds", histograms)]
    message = f"{kept} of {quality.height} frames kept"
    texts = {r: int((quality["reject_reason"] == r).sum()) for r in ("text", "subtitles")}
    cropped = subtitles_cropped(quality, frames)
    if any(texts.values()) or cropped:
        message += (
            f"; {texts['text']} dropped as text, {texts['subtitles']} for subtitles, {cropped} kept with "
            "their subtitles cropped off"
        )
        if frames is not None and "crop_top" in quality.columns:
            figures.append(
                Figure(
                    "text",
                    "Title cards, credits and subtitles",
                    text_sheet(run.run_dir, quality, frames, max_per_group=cfg.report.contact_sheet_faces),
                )
            )
    return Section("quality", "ok", message, figures)


def _shots_section(run: ReportData, cfg: ConfigView) -> Section:
    shots = run.read_table("shots")
    if not shots.height:
        return Section("shots", "empty", "stage extract found no shot")
    return Section(
        "shots",
        "ok",
        f"{shots.height} shots",
        [
            Figure("shot_lengths", "Shot-length histogram", shot_length_histogram(shots)),
            Figure("shot_timeline", "Shots along the movie", shot_length_plot(shots)),
        ],
    )


def exported_sheet(run: ReportData, name: str, limit: int) -> Any:
    """The pictures of the dataset (stage 06) that name ``name``, as they were written (crop and
    split under each), up to ``limit``; None without a dataset or without such a picture."""
    items = run.optional_table("dataset_items")
    if items is None or not items.height:
        return None
    mine = items.filter(pl.col("characters").list.contains(name)).sort(
        "split", "file_name", descending=[True, False]
    )
    if not mine.height:
        return None
    folder = dataset_dir(run.run_dir) / "hf"
    tiles = [
        Tile(folder / r["split"] / r["file_name"], label=f"{r['crop']} {r['split'][:5]}")
        for r in mine.head(limit).iter_rows(named=True)
    ]
    title = f"{name}: {min(limit, mine.height)} of {mine.height} exported pictures"
    return tile_sheet([Block(tiles, title=title)], Layout((120, 120), min(12, len(tiles)), fit="contain"))


def not_found_note(run: ReportData) -> str:
    """The characters with pictures that stage 03 found in no frame (its manifest's
    ``characters_not_found``), as the end of the section's line; empty when there are none."""
    facts = (run.read_manifest("characters") or {}).get("facts") or {}
    missed = facts.get("characters_not_found") or []
    if not missed:
        return ""
    listed = ", ".join(missed)
    return f"; found in no frame despite their pictures: {listed} (add a still of each in notebook 03)"


def no_pictures_note(run: ReportData) -> str:
    """Why an empty characters section may be empty: stage 03 was given no pictures and searched
    offline, where only human faces are found without them; empty otherwise (pictures given, or
    the hub backend, which discovers characters without them)."""
    facts = (run.read_manifest("characters") or {}).get("facts") or {}
    if facts.get("reference_dir") or "hub" in facts:
        return ""
    return (
        "; no pictures were given, and offline only human faces are found without them "
        "(give --characters DIR, or set characters.backend: hub)"
    )


def file_slugs(names: list[str]) -> dict[str, str]:
    """A file name part for each character: its slug, and where two names give one slug
    (``Маша`` and ``Миша`` are both ``movie``; ``Anna`` and ``anna``) a short hash of the name
    after it. The contact sheets were written over each other, and the report showed one
    character's faces under another's name."""
    slugs = {name: slugify(name) for name in names}
    taken = list(slugs.values())
    return {
        name: slug if taken.count(slug) == 1 else f"{slug}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"
        for name, slug in slugs.items()
    }


def _characters_section(run: ReportData, cfg: ConfigView) -> Section:
    """Stage 03's section: screen time, a contact sheet per character, and the appearances
    counted, those a person fixed to none (false sightings) apart from the unknown ones: they
    are nobody, in the captions as here."""
    found = run.read_table("faces")
    if not found.height:
        message = "stage characters found no character" + not_found_note(run) + no_pictures_note(run)
        return Section("characters", "empty", message)
    faces = without_false_sightings(found)
    false = found.height - faces.height
    figures = []
    if run.has_table("shots") and faces.height:
        figures.append(Figure("screen_time", "Screen time", screen_time_plot(faces, run.read_table("shots"))))
    named = faces.filter(pl.col("character").is_not_null())
    counts = named.group_by("character").len().sort(["len", "character"], descending=[True, False])
    # The contact sheets find each face's picture through stage 01's frames table; without it
    # (deleted) the section keeps its counts and screen time and says what is missing.
    frames = run.optional_table("frames")
    shown = counts.head(cfg.report.max_characters if frames is not None else 0)
    slugs = file_slugs(shown["character"].to_list())
    for name in shown["character"].to_list():
        members = named.filter(pl.col("character") == name)
        sheet = face_sheet(
            run.run_dir,
            members,
            frames,
            max_per_group=cfg.report.contact_sheet_faces,
            columns=max(1, min(12, members.height)),
        )
        figures.append(Figure(f"contact_{slugs[name]}", f"Contact sheet: {name}", sheet))
        exported = exported_sheet(run, name, cfg.report.contact_sheet_faces)
        if exported is not None:
            figures.append(Figure(f"exported_{slugs[name]}", f"Exported pictures: {name}", exported))
    unknown = faces.height - named.height
    more = f" (contact sheets for the first {shown.height})" if 0 < shown.height < counts.height else ""
    message = (
        f"{found.height} appearances: {named.height} named ({counts.height} "
        f"character{'s' if counts.height != 1 else ''}{more}), {unknown} {UNKNOWN}"
        if counts.height
        else f"{found.height} appearances, none named (name them in notebook 03)"
    )
    fixed = f", {false} fixed to none (false sightings)" if false else ""
    if frames is None and counts.height:
        fixed += "; no contact sheets: tables/frames.parquet is missing (run stage extract again)"
    return Section("characters", "ok", message + fixed + not_found_note(run), figures)


def _scenes_section(run: ReportData, cfg: ConfigView) -> Section:
    clusters = run.read_table("clusters")
    scene = clusters.filter(pl.col("level") == "scene")
    if not scene.height:
        return Section("scenes", "empty", "stage scenes clustered no frame")
    noise = int((scene["cluster_id"] == "noise").sum())
    n = scene.filter(pl.col("cluster_id") != "noise")["cluster_id"].n_unique()
    return Section(
        "scenes",
        "ok",
        f"{scene.height} frames in {n} scene clusters; noise {noise} ({noise / scene.height:.0%})",
        [Figure("cluster_sizes", "Cluster sizes", cluster_sizes_plot(clusters, "scene"))],
    )


def _captions_section(run: ReportData, cfg: ConfigView) -> Section:
    captions = run.read_table("captions")
    ok = usable_captions(captions)
    if not ok.height:
        return Section("captions", "empty", f"no usable caption among {captions.height} frames")
    return Section(
        "captions",
        "ok",
        f"{ok.height} of {captions.height} frames captioned",
        [Figure("caption_lengths", "Caption lengths", caption_length_plot(captions, by="status"))],
    )


def _train_section(run: ReportData, cfg: ConfigView) -> Section:
    log = run.read_table("training_log").drop_nulls("loss")
    if not log.height:
        return Section("train", "empty", "the training log holds no step")
    return Section(
        "train",
        "ok",
        f"{log.height} logged steps",
        [Figure("training_loss", "Training loss", loss_curve_plot(log))],
    )


def _generate_section(run: ReportData, cfg: ConfigView) -> Section:
    generations = run.read_table("generations")
    faces = generations.height > 0 and generations["identity_distance"].is_not_null().any()
    drawn = generations.height > 0 and "drawn_score" in generations.columns
    drawn = drawn and generations["drawn_score"].is_not_null().any()
    if not faces and not drawn:
        return Section(
            "generate",
            "empty",
            f"{generations.height} generated pictures, no face found and no drawn character scored in any",
        )
    figures = []
    if faces:
        figures.append(
            Figure(
                "identity_per_checkpoint",
                "Identity per checkpoint",
                identity_plot(generations, cfg.characters.tolerance),
            )
        )
    if drawn:
        figures.append(
            Figure(
                "drawn_per_checkpoint",
                "Drawn characters per checkpoint",
                # The score stage 03 named a sighting at, from the backend that found the characters.
                drawn_plot(
                    generations,
                    cfg.characters.hub.min_score
                    if cfg.characters.backend == "hub"
                    else cfg.characters.fitted.min_score,
                ),
            )
        )
    # The base model's pictures (scale 0, checkpoint "base") are the comparison, not a checkpoint.
    n = generations.filter(pl.col("checkpoint") != "base")["checkpoint"].n_unique()
    base = " and the base model" if (generations["checkpoint"] == "base").any() else ""
    by = f"{n} checkpoint(s){base}" if n else "the base model alone (no LoRA checkpoint)"
    what = f"{generations.height} generated pictures from {by}"
    return Section("generate", "ok", what, figures)
