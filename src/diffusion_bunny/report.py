"""Stage 09 ``report``: a QA report of one run (and a combined one across the movies of a batch).

People judge a dataset by looking at it, so every stage's outcome becomes a figure: the funnel of
frames in and out of each stage with the reasons, the quality scores with their thresholds, shot
lengths, who is on screen when, cluster sizes, caption lengths, training loss, identity per
checkpoint, and a contact sheet per character. A section whose stage did not run says so instead
of failing, so the report works after any subset of the stages.

How the HTML comes out, headless and in JupyterLab alike: the stage itself (called by notebook 09
through :func:`~diffusion_bunny.stages.run_stage`) writes every figure as PNG, then assembles a
small notebook document from the same sections (a markdown cell per heading and text, a cell whose
outputs are the embedded PNGs and tables) and converts it with nbconvert's ``HTMLExporter``,
code hidden (:func:`render_report_html`). A notebook cannot convert itself while it runs (its
outputs reach the file only after the last cell), and converting notebook 09's executed copy
would work only under papermill; building the document from the sections gives the same
``<run>/report/index.html`` whether ``bunny run`` or a person in JupyterLab ran the stage, needs no
second kernel, and can be tested without one. Notebook 09 shows the same PNGs, section by
section (:func:`display_section`).
"""

from __future__ import annotations

import base64
import io
import logging
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl

from diffusion_bunny.captions import usable_captions
from diffusion_bunny.run import Run, atomic_write_bytes, slugify

if TYPE_CHECKING:
    from plotnine import ggplot

    from diffusion_bunny.config import Config

#: Sections in report order: key -> (title, the stage whose tables it shows, what it tells).
SECTIONS: dict[str, tuple[str, str, str]] = {
    "funnel": (
        "Frames in and out of each stage",
        "extract",
        "Each bar is the frames that reached a step: green went on, the other colours were dropped, "
        "with the reason. Steps of stages that did not run are left out.",
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
        "Face-encoding distance between each generated picture and the character's references, "
        "per checkpoint (lower is closer; the dashed line is the naming tolerance).",
    ),
}

#: The table each optional section needs (its absence means the stage did not run).
SECTION_TABLES = {
    "quality": "quality",
    "shots": "shots",
    "characters": "faces",
    "scenes": "clusters",
    "captions": "captions",
    "train": "training_log",
    "generate": "generations",
}

PASSED = "#54A24B"
REASON_COLOURS = {
    "kept": PASSED,
    "train": PASSED,
    "validation": "#A0D38F",
    "unreadable": "#000000",
    "too_dark": "#3B3B98",
    "too_bright": "#F2CF5B",
    "clipped": "#B279A2",
    "blurry": "#9D755D",
    "duplicate": "#E45756",
    "not_best": "#BAB0AC",
    "noise": "#BBBBBB",
    "failed": "#E45756",
}
_OTHER_COLOURS = ["#4C78A8", "#F58518", "#72B7B2", "#FF9DA6", "#9D755D", "#EECA3B", "#79706E"]


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


def did_not_run(stage: str, table: str) -> str:
    """The one line a section shows for a stage that did not run."""
    return f"stage {stage} did not run (no tables/{table}.parquet)"


# --------------------------------------------------------------------------------------- funnel


def funnel_table(
    *,
    decoded: int | None = None,
    candidates: pl.DataFrame | None = None,
    frames: pl.DataFrame | None = None,
    quality: pl.DataFrame | None = None,
    faces: pl.DataFrame | None = None,
    face_frames: pl.DataFrame | None = None,
    clusters: pl.DataFrame | None = None,
    captions: pl.DataFrame | None = None,
    dataset_items: pl.DataFrame | None = None,
) -> pl.DataFrame:
    """Frames in and out of each step, with the reasons for the ones dropped.

    One row per (step, outcome): ``step`` (ordered as the pipeline), ``stage``, ``outcome``
    (``kept``/``train``/``validation`` for frames that went on, else the reason they were
    dropped), ``frames`` and ``passed`` (bool). A step appears only when its stage's table is
    given, so a partial run gives a shorter funnel rather than an error.
    """
    rows: list[tuple[str, str, str, int, bool]] = []

    def step(name: str, stage: str, kept: int, dropped: dict[str, int], passed: dict[str, int] | None = None):
        for outcome, n in (passed or {"kept": kept}).items():
            rows.append((name, stage, outcome, int(n), True))
        for reason, n in dropped.items():
            if n > 0:
                rows.append((name, stage, reason, int(n), False))

    if decoded is not None:
        step("decoded", "extract", decoded, {})
    if candidates is not None:
        lost = {"not a candidate": decoded - candidates.height} if decoded is not None else {}
        step("keyframe candidates", "extract", candidates.height, lost)
    if frames is not None:
        lost = {"not chosen": candidates.height - frames.height} if candidates is not None else {}
        step("extracted", "extract", frames.height, lost)
    kept_ids: pl.Series | None = None
    if quality is not None:
        kept_ids = quality.filter(pl.col("keep"))["frame_id"]
        reasons = dict(quality.filter(~pl.col("keep")).group_by("reject_reason").len().iter_rows())
        order = [r for r in REASON_COLOURS if r in reasons] + sorted(
            str(r) for r in reasons if r not in REASON_COLOURS
        )
        step("kept by quality", "quality", kept_ids.len(), {r: reasons.get(r, 0) for r in order})
    if faces is not None and kept_ids is not None:
        kept_set = set(kept_ids.to_list())
        on_kept = faces.filter(pl.col("frame_id").is_in(kept_set))
        named = set(on_kept.filter(pl.col("character").is_not_null())["frame_id"].to_list())
        with_faces = set(on_kept["frame_id"].to_list())
        searched = set(face_frames["frame_id"].to_list()) & kept_set if face_frames is not None else kept_set
        step(
            "with a named character",
            "characters",
            len(named),
            {
                "unknown faces only": len(with_faces - named),
                "no face": len(searched - with_faces),
                "not searched": len(kept_set - searched - with_faces),
            },
        )
    if clusters is not None:
        scene = clusters.filter(pl.col("level") == "scene")
        noise = int((scene["cluster_id"] == "noise").sum())
        step("in a scene cluster", "scenes", scene.height - noise, {"noise": noise})
    usable = None
    if captions is not None:
        usable = usable_captions(captions).height
        step("captioned", "captions", usable, {"failed": captions.height - usable})
    if dataset_items is not None:
        # Frames, not pictures: a frame's face and half-body crops are extra rows of the same frame
        # (all in the frame's split, which is drawn per shot group).
        frames_out = dataset_items.unique("frame_id")
        splits = dict(frames_out.group_by("split").len().iter_rows())
        source = usable if usable is not None else (kept_ids.len() if kept_ids is not None else None)
        lost = {"not exported": source - frames_out.height} if source is not None else {}
        passed = {s: splits[s] for s in ("train", "validation") if s in splits}
        step("exported", "export", frames_out.height, lost, passed or {"train": 0})
    table = pl.DataFrame(
        rows,
        schema={
            "step": pl.Utf8,
            "stage": pl.Utf8,
            "outcome": pl.Utf8,
            "frames": pl.Int64,
            "passed": pl.Boolean,
        },
        orient="row",
    )
    return table


def funnel_summary(funnel: pl.DataFrame) -> pl.DataFrame:
    """One row per step: frames in, frames out, and the dropped ones by reason as text."""
    steps = funnel["step"].unique(maintain_order=True).to_list()
    out = []
    for name in steps:
        part = funnel.filter(pl.col("step") == name)
        passed = part.filter(pl.col("passed"))
        dropped = part.filter(~pl.col("passed"))
        out.append(
            {
                "step": name,
                "stage": part["stage"][0],
                "frames in": int(part["frames"].sum()),
                "frames out": int(passed["frames"].sum()),
                "dropped": ", ".join(f"{n} {o}" for o, n in dropped.select("outcome", "frames").iter_rows())
                or "-",
            }
        )
    return pl.DataFrame(
        out,
        schema={
            "step": pl.Utf8,
            "stage": pl.Utf8,
            "frames in": pl.Int64,
            "frames out": pl.Int64,
            "dropped": pl.Utf8,
        },
    )


def funnel_plot(funnel: pl.DataFrame) -> ggplot:
    """One bar per step (first step on top), as shares of the frames that reached it: green went
    on, the dropped ones stacked after, one colour per reason; the counts (in -> out) are written
    beside each bar. Shares, not counts: a movie decodes thousands of frames and keeps dozens, so
    on one count axis every later step would be a sliver."""
    from plotnine import (
        aes,
        coord_flip,
        geom_col,
        geom_text,
        ggplot,
        labs,
        scale_fill_manual,
        scale_y_continuous,
        theme,
        theme_minimal,
    )

    from diffusion_bunny.plots import pd_categorical

    steps = funnel["step"].unique(maintain_order=True).to_list()
    outcomes = funnel["outcome"].unique(maintain_order=True).to_list()
    passed = [o for o in outcomes if o in ("kept", "train", "validation")]
    order = passed + [o for o in outcomes if o not in passed]
    extra = iter(_OTHER_COLOURS * 4)
    colours = {o: REASON_COLOURS.get(o) or next(extra) for o in order}
    shares = funnel.with_columns(
        (pl.col("frames") / pl.col("frames").sum().over("step").clip(lower_bound=1)).alias("share")
    )
    summary = funnel_summary(funnel)
    labels = summary.select(
        "step", pl.format("{} -> {}", pl.col("frames in"), pl.col("frames out")).alias("label")
    ).to_pandas()
    df = shares.to_pandas()
    for frame in (df, labels):
        frame["step"] = pd_categorical(frame["step"], steps[::-1])
    labels["share"] = 1.02
    df["outcome"] = pd_categorical(df["outcome"], order[::-1])  # what went on nearest the axis
    first = int(summary["frames in"][0]) if steps else 0
    last = int(summary["frames out"][-1]) if steps else 0
    return (
        ggplot(df, aes("step", "share"))
        + geom_col(aes(fill="outcome"), position="stack")
        + geom_text(labels, aes("step", "share", label="label"), ha="left", size=9)
        + coord_flip()
        + scale_fill_manual(values=colours, breaks=order)
        + scale_y_continuous(
            limits=(0, 1.32), breaks=[0, 0.25, 0.5, 0.75, 1.0], labels=["0", "25%", "50%", "75%", "100%"]
        )
        + labs(x="", y="share of the frames that reached the step", fill="", title=f"{first} in, {last} out")
        + theme_minimal()
        + theme(figure_size=(9, max(2.2, 0.45 * len(steps) + 1.2)))
    )


# ------------------------------------------------------------------------------- other figures


def shot_length_histogram(shots: pl.DataFrame) -> ggplot:
    """Distribution of shot lengths, static and dynamic shots stacked, the median as a line."""
    from plotnine import (
        aes,
        geom_histogram,
        geom_vline,
        ggplot,
        labs,
        scale_fill_manual,
        theme,
        theme_minimal,
    )

    from diffusion_bunny.plots import KIND_COLOURS

    df = shots.with_columns((pl.col("end_s") - pl.col("start_s")).alias("length_s"))
    median = float(df["length_s"].median() or 0.0)
    return (
        ggplot(df.to_pandas(), aes("length_s", fill="kind"))
        + geom_histogram(bins=max(5, min(30, df.height)), colour="white", size=0.2)
        + geom_vline(xintercept=median, linetype="dashed", colour="#C0392B")
        + scale_fill_manual(values=KIND_COLOURS)
        + labs(
            x="shot length (s)",
            y="shots",
            fill="shot",
            title=f"{df.height} shots, median {median:.1f} s (dashed)",
        )
        + theme_minimal()
        + theme(figure_size=(8, 3.2))
    )


def checkpoint_order(names: list[str]) -> list[str]:
    """Checkpoints by training step (``checkpoint-200`` before ``checkpoint-1000``); names
    without a number (the final weights) last."""

    def key(name: str) -> tuple[int, int, str]:
        numbers = re.findall(r"\d+", Path(name).name)
        return (0, int(numbers[-1]), name) if numbers else (1, 0, name)

    return sorted(set(names), key=key)


def identity_table(generations: pl.DataFrame) -> pl.DataFrame:
    """Per checkpoint and character: pictures, faces found, mean identity distance (faces found
    only; lower is closer to the references)."""
    return (
        generations.group_by("checkpoint", "character")
        .agg(
            pl.len().alias("pictures"),
            pl.col("face_found").sum().cast(pl.Int64).alias("faces_found"),
            pl.col("identity_distance").drop_nulls().mean().alias("identity_distance"),
        )
        .sort("checkpoint", "character")
    )


def identity_plot(generations: pl.DataFrame, tolerance: float = 0.6) -> ggplot:
    """Mean identity distance per checkpoint (in training order), one line per character."""
    from plotnine import aes, geom_hline, geom_line, geom_point, ggplot, labs, theme, theme_minimal

    from diffusion_bunny.plots import pd_categorical

    table = identity_table(generations)
    order = checkpoint_order(table["checkpoint"].to_list())
    df = table.filter(pl.col("identity_distance").is_not_null()).to_pandas()
    df["checkpoint"] = pd_categorical(df["checkpoint"], order)
    found = int(table["faces_found"].sum())
    return (
        ggplot(df, aes("checkpoint", "identity_distance", colour="character", group="character"))
        + geom_line()
        + geom_point(size=2.5)
        + geom_hline(yintercept=tolerance, linetype="dashed", colour="#C0392B")
        + labs(
            x="checkpoint",
            y="identity distance (lower is closer)",
            colour="",
            title=f"{generations.height} generated pictures, a face found in {found}",
        )
        + theme_minimal()
        + theme(figure_size=(8, 3.2))
    )


# ------------------------------------------------------------------------------------- sections


def _filtering_config(run: Run, cfg: Config) -> Any:
    """The thresholds stage 02 last ran with (from its manifest), else the current ones."""
    from diffusion_bunny.config import FilteringConfig

    manifest = run.read_manifest("quality") or {}
    try:
        return FilteringConfig(**manifest["config"]["filtering"])
    except (KeyError, TypeError, ValueError):
        return cfg.filtering


def build_sections(run: Run, cfg: Config) -> list[Section]:
    """Every section of the report, in order, from the tables the run has."""
    builders: dict[str, Callable[[Run, Config], Section]] = {
        "funnel": _funnel_section,
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


def _funnel_section(run: Run, cfg: Config) -> Section:
    if not run.has_table("frames"):
        return Section("funnel", "absent", did_not_run("extract", "frames"))
    decoded = ((run.read_manifest("extract") or {}).get("counts") or {}).get("decoded_frames")
    funnel = run_funnel(run, decoded)
    summary = funnel_summary(funnel)
    last = summary.row(-1, named=True)
    return Section(
        "funnel",
        "ok",
        f"{summary['frames in'][0]} frames in, {last['frames out']} out after '{last['step']}'",
        [Figure("funnel", "Frames per step", funnel_plot(funnel))],
    )


def run_funnel(run: Run, decoded: int | None = None) -> pl.DataFrame:
    """:func:`funnel_table` over the run's tables (the ones present)."""
    candidates = (
        pl.read_parquet(run.table_path("keyframe_candidates"), columns=["frame_index"])
        if run.has_table("keyframe_candidates")
        else None
    )
    faces = (
        pl.read_parquet(run.table_path("faces"), columns=["frame_id", "character"])
        if run.has_table("faces")
        else None
    )
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


def _quality_section(run: Run, cfg: Config) -> Section:
    from diffusion_bunny.plots import quality_histograms

    quality = run.read_table("quality")
    if not quality.height:
        return Section("quality", "empty", "stage quality ran on no frame")
    kept = int(quality["keep"].sum())
    return Section(
        "quality",
        "ok",
        f"{kept} of {quality.height} frames kept",
        [
            Figure(
                "quality",
                "Quality scores and thresholds",
                quality_histograms(quality, _filtering_config(run, cfg)),
            )
        ],
    )


def _shots_section(run: Run, cfg: Config) -> Section:
    from diffusion_bunny.plots import shot_length_plot

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


def _characters_section(run: Run, cfg: Config) -> Section:
    from diffusion_bunny.plots import UNKNOWN, face_sheet, screen_time_plot

    faces = run.read_table("faces")
    if not faces.height:
        return Section("characters", "empty", "stage characters found no face")
    figures = []
    if run.has_table("shots"):
        figures.append(Figure("screen_time", "Screen time", screen_time_plot(faces, run.read_table("shots"))))
    named = faces.filter(pl.col("character").is_not_null())
    counts = named.group_by("character").len().sort(["len", "character"], descending=[True, False])
    frames = run.read_table("frames")
    shown = counts.head(cfg.report.max_characters)
    for name in shown["character"].to_list():
        members = named.filter(pl.col("character") == name)
        sheet = face_sheet(
            run.run_dir,
            members,
            frames,
            max_per_group=cfg.report.contact_sheet_faces,
            columns=max(1, min(12, members.height)),
        )
        figures.append(Figure(f"contact_{slugify(name)}", f"Contact sheet: {name}", sheet))
    unknown = faces.height - named.height
    more = f" (contact sheets for the first {shown.height})" if counts.height > shown.height else ""
    message = (
        f"{faces.height} faces: {counts.height} named characters{more}, {unknown} {UNKNOWN} faces"
        if counts.height
        else f"{faces.height} faces, none named (name them in notebook 03)"
    )
    return Section("characters", "ok", message, figures)


def _scenes_section(run: Run, cfg: Config) -> Section:
    from diffusion_bunny.plots import cluster_sizes_plot

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


def _captions_section(run: Run, cfg: Config) -> Section:
    from diffusion_bunny.plots import caption_length_plot

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


def _train_section(run: Run, cfg: Config) -> Section:
    from diffusion_bunny.train_plots import loss_curve_plot

    log = run.read_table("training_log").drop_nulls("loss")
    if not log.height:
        return Section("train", "empty", "the training log holds no step")
    return Section(
        "train",
        "ok",
        f"{log.height} logged steps",
        [Figure("training_loss", "Training loss", loss_curve_plot(log))],
    )


def _generate_section(run: Run, cfg: Config) -> Section:
    generations = run.read_table("generations")
    if not generations.height or generations["identity_distance"].is_null().all():
        return Section(
            "generate", "empty", f"{generations.height} generated pictures, no face found in any of them"
        )
    n = generations["checkpoint"].n_unique()
    return Section(
        "generate",
        "ok",
        f"{generations.height} generated pictures from {n} checkpoint(s)",
        [
            Figure(
                "identity_per_checkpoint",
                "Identity per checkpoint",
                identity_plot(generations, cfg.characters.tolerance),
            )
        ],
    )


# ------------------------------------------------------------------------------------- writing


def figure_png(image: Any, dpi: int = 100) -> bytes:
    """PNG bytes of a plotnine chart (drawn, saved and closed, so a notebook does not show it a
    second time) or of a Pillow image."""
    buf = io.BytesIO()
    if hasattr(image, "draw"):
        import matplotlib.pyplot as plt

        fig = image.draw()
        try:
            fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight", facecolor="white")
        finally:
            plt.close(fig)
    else:
        image.save(buf, format="PNG")
    return buf.getvalue()


def report_dir(run_dir: str | Path) -> Path:
    """``<run>/report``: ``index.html`` and ``figures/*.png``."""
    return Path(run_dir) / "report"


def save_sections(run_dir: str | Path, sections: list[Section], dpi: int = 100) -> pl.DataFrame:
    """Write every figure as ``<run>/report/figures/<name>.png`` (atomically; PNGs of figures
    no longer in the report are removed) and return the ``report_figures`` table: one row per
    figure, and one per section without figures (``figure`` null) with its message."""
    run_dir = Path(run_dir)
    folder = report_dir(run_dir) / "figures"
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    written = set()
    for order, section in enumerate(sections):
        base = {"order": order, "section": section.key, "title": section.title, "status": section.status}
        if not section.figures:
            rows.append(
                {**base, "figure": None, "figure_title": None, "path": None, "message": section.message}
            )
        for fig in section.figures:
            path = folder / f"{fig.name}.png"
            atomic_write_bytes(path, figure_png(fig.image, dpi))
            written.add(path.name)
            rows.append(
                {
                    **base,
                    "figure": fig.name,
                    "figure_title": fig.title,
                    "path": str(path.relative_to(run_dir)),
                    "message": section.message,
                }
            )
    for old in folder.glob("*.png"):
        if old.name not in written:
            old.unlink()
    return pl.DataFrame(
        rows,
        schema={
            "order": pl.Int64,
            "section": pl.Utf8,
            "title": pl.Utf8,
            "status": pl.Utf8,
            "figure": pl.Utf8,
            "figure_title": pl.Utf8,
            "path": pl.Utf8,
            "message": pl.Utf8,
        },
    )


def write_report_figures(run_dir: str | Path, cfg: Config | None = None) -> dict[str, Path]:
    """Build every section of the run's report and write its figures as PNG; returns
    ``{figure name: PNG path}`` (sections whose stage did not run have none)."""
    from diffusion_bunny.config import load_config

    cfg = cfg or load_config()
    run = Run.open(run_dir)
    table = save_sections(run.run_dir, build_sections(run, cfg), cfg.report.dpi)
    return {
        row["figure"]: run.run_dir / row["path"]
        for row in table.iter_rows(named=True)
        if row["figure"] is not None
    }


# ----------------------------------------------------------------------------------------- HTML


def _png_output(png: bytes) -> Any:
    import nbformat

    return nbformat.v4.new_output(
        "display_data", data={"image/png": base64.b64encode(png).decode("ascii"), "text/plain": "<figure>"}
    )


def _html_output(html: str) -> Any:
    import nbformat

    return nbformat.v4.new_output("display_data", data={"text/html": html, "text/plain": "<table>"})


def table_html(df: pl.DataFrame, links: tuple[str, ...] = ()) -> str:
    """A plain HTML table (escaped), for the report's tables; values of the ``links`` columns are
    relative paths shown as links."""
    head = "".join(f"<th>{escape(str(c))}</th>" for c in df.columns)
    body = "".join(
        "<tr>"
        + "".join(
            f'<td><a href="{escape(v)}">open</a></td>' if c in links and v else f"<td>{_cell(v)}</td>"
            for c, v in zip(df.columns, row, strict=True)
        )
        + "</tr>"
        for row in df.iter_rows()
    )
    return f'<table class="bunny-table"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.3g}"
    return escape(str(value))


def report_document(
    run_dir: str | Path,
    figures: pl.DataFrame,
    *,
    title: str,
    intro: str = "",
    tables: dict[str, str] | None = None,
) -> Any:
    """A notebook document of the report: a markdown cell per section (heading, what it shows,
    its message), then a code cell with no source whose outputs are the section's PNGs (read
    from disk) and, for sections named in ``tables``, that HTML table (:func:`table_html`).
    nbconvert turns it into HTML with the (empty) code hidden."""
    import nbformat

    run_dir = Path(run_dir)
    nb = nbformat.v4.new_notebook()
    nb.metadata["title"] = title
    nb.cells.append(nbformat.v4.new_markdown_cell(f"# {title}\n\n{intro}".strip()))
    tables = tables or {}
    for key in figures.sort("order")["section"].unique(maintain_order=True).to_list():
        rows = figures.filter(pl.col("section") == key).sort("order")
        first = rows.row(0, named=True)
        about = SECTIONS[key][2] if key in SECTIONS else ""
        status = "" if first["status"] == "ok" else "**"
        text = f"## {first['title']}\n\n{about}\n\n{status}{first['message']}{status}"
        nb.cells.append(nbformat.v4.new_markdown_cell(text))
        outputs = []
        if key in tables:
            outputs.append(_html_output(tables[key]))
        for row in rows.filter(pl.col("figure").is_not_null()).iter_rows(named=True):
            outputs.append(_png_output((run_dir / row["path"]).read_bytes()))
            nb.metadata.setdefault("figure_titles", []).append(row["figure_title"] or row["figure"])
        if outputs:
            cell = nbformat.v4.new_code_cell("")
            cell.outputs = outputs
            nb.cells.append(cell)
    return nb


_NBCONVERT_ALT = 'alt="No description has been provided for this image"'


def render_report_html(notebook: Any, out_html: str | Path) -> Path:
    """Convert a notebook (an executed one, or :func:`report_document`'s) to one self-contained
    HTML file with nbconvert, code and prompts hidden, pictures embedded; written atomically."""
    import nbformat
    from nbconvert import HTMLExporter

    if isinstance(notebook, str | Path):
        notebook = nbformat.read(str(notebook), as_version=4)
    exporter = HTMLExporter(template_name="lab")
    exporter.exclude_input = True
    exporter.exclude_input_prompt = True
    exporter.exclude_output_prompt = True
    # nbconvert fills a placeholder alternative text into every image and logs a warning about
    # it; the report's figures get their titles instead (kept in the document's metadata).
    quiet = logging.getLogger("diffusion_bunny.report.nbconvert")
    quiet.setLevel(logging.ERROR)
    exporter.log = quiet
    body, _ = exporter.from_notebook_node(notebook)
    for alt in notebook.metadata.get("figure_titles", []):
        body = body.replace(_NBCONVERT_ALT, f'alt="{escape(alt, quote=True)}"', 1)
    out_html = Path(out_html)
    atomic_write_bytes(out_html, body.encode("utf-8"))
    return out_html


def report_stage(run: Run, cfg: Config) -> tuple[pl.DataFrame, pl.DataFrame, dict[str, Any]]:
    """What stage 09 does: every section's figures as PNG, the funnel table, and
    ``<run>/report/index.html``. Returns (``report_figures``, ``report_funnel``, counts)."""
    sections = build_sections(run, cfg)
    figures = save_sections(run.run_dir, sections, cfg.report.dpi)
    decoded = ((run.read_manifest("extract") or {}).get("counts") or {}).get("decoded_frames")
    funnel = run_funnel(run, decoded) if run.has_table("frames") else funnel_table()
    meta = run.meta() or {}
    movie = Path(meta.get("movie", run.run_dir.name)).name
    doc = report_document(
        run.run_dir,
        figures,
        title=f"QA report: {movie}",
        intro=f"Run folder `{run.run_dir}`. Figures are also in `report/figures/` as PNG.",
        tables={"funnel": table_html(funnel_summary(funnel))} if funnel.height else None,
    )
    render_report_html(doc, report_dir(run.run_dir) / "index.html")
    absent = [SECTIONS[k][1] for k in figures.filter(pl.col("status") == "absent")["section"].to_list()]
    counts = {
        "figures": int(figures["figure"].is_not_null().sum()),
        "sections": figures["section"].n_unique(),
        "stages_not_run": sorted(set(absent)),
    }
    return figures, funnel, counts


def display_section(run_dir: str | Path, figures: pl.DataFrame, key: str) -> None:
    """Show one section in a notebook: its message, then its PNGs (as the HTML report has them)."""
    from IPython.display import Image as IPImage
    from IPython.display import Markdown, display

    rows = figures.filter(pl.col("section") == key).sort("order")
    if not rows.height:
        display(Markdown(f"*section {key} is not in this report*"))
        return
    display(Markdown(rows["message"][0] if rows["status"][0] == "ok" else f"**{rows['message'][0]}**"))
    for path in rows["path"].drop_nulls().to_list():
        display(IPImage(filename=str(Path(run_dir) / path)))


def relative_link(target: Path, start: Path) -> str:
    """A link from a file in ``start`` to ``target`` that survives moving the whole folder."""
    return Path(os.path.relpath(target, start)).as_posix()


# ------------------------------------------------------------------------------ across movies


def movies_table(reports: list[Any], cfg: Config, start: Path | None = None) -> pl.DataFrame:
    """One row per movie of a batch (``runner.MovieReport``\\ s): its run folder, error, counts
    (frames extracted and kept, shots, faces, named characters), ``report_html`` (its report,
    relative to ``start`` when given) and one state column per stage (done/stale/missing)."""
    from diffusion_bunny.stages import stage_names
    from diffusion_bunny.status import run_status

    stages = stage_names()
    rows = []
    for rep in reports:
        run_dir = Path(rep.run_dir) if rep.run_dir is not None else None
        row: dict[str, Any] = {
            "movie": Path(rep.movie).name,
            "run_dir": str(run_dir) if run_dir else None,
            "error": rep.error,
            "frames": None,
            "kept": None,
            "shots": None,
            "faces": None,
            "characters": None,
            "report_html": None,
        }
        is_run = run_dir is not None and (run_dir / "run.json").is_file()
        if is_run:
            run = Run.open(run_dir)
            if run.has_table("frames"):
                row["frames"] = pl.read_parquet(run.table_path("frames"), columns=["frame_id"]).height
            if run.has_table("quality"):
                row["kept"] = int(pl.read_parquet(run.table_path("quality"), columns=["keep"])["keep"].sum())
            if run.has_table("shots"):
                row["shots"] = pl.read_parquet(run.table_path("shots"), columns=["shot_id"]).height
            if run.has_table("faces"):
                names = pl.read_parquet(run.table_path("faces"), columns=["character"])["character"]
                row["faces"] = names.len()
                row["characters"] = names.drop_nulls().n_unique()
            html = report_dir(run.run_dir) / "index.html"
            if html.is_file():
                row["report_html"] = relative_link(html, start) if start else str(html)
        states = run_status(run_dir, cfg, stages) if is_run else [(s, "missing", "never ran") for s in stages]
        row.update({stage: state for stage, state, _ in states})
        rows.append(row)
    schema = {
        "movie": pl.Utf8,
        "run_dir": pl.Utf8,
        "error": pl.Utf8,
        "frames": pl.Int64,
        "kept": pl.Int64,
        "shots": pl.Int64,
        "faces": pl.Int64,
        "characters": pl.Int64,
        "report_html": pl.Utf8,
        **dict.fromkeys(stages, pl.Utf8),
    }
    return pl.DataFrame(rows, schema=schema)


def movies_plot(movies: pl.DataFrame) -> ggplot:
    """Frames, kept frames, shots and named characters per movie, one panel each."""
    from plotnine import aes, coord_flip, facet_wrap, geom_col, ggplot, labs, theme, theme_minimal

    from diffusion_bunny.plots import pd_categorical

    measures = ["frames", "kept", "shots", "characters"]
    long = movies.select("movie", *measures).unpivot(index="movie", variable_name="measure", value_name="n")
    df = long.drop_nulls("n").to_pandas()
    df["measure"] = pd_categorical(df["measure"], measures)
    df["movie"] = pd_categorical(df["movie"], movies["movie"].to_list()[::-1])
    return (
        ggplot(df, aes("movie", "n"))
        + geom_col(fill="#4C78A8")
        + coord_flip()
        + facet_wrap("measure", scales="free_x", ncol=4)
        + labs(x="", y="", title=f"{movies.height} movies")
        + theme_minimal()
        + theme(figure_size=(10, max(2.2, 0.4 * movies.height + 1.4)))
    )


def write_combined_report(out_dir: str | Path, reports: list[Any], cfg: Config) -> Path:
    """The report across the movies of a batch: ``<out>/report/movies.parquet`` (see
    :func:`movies_table`), ``<out>/report/figures/movies.png`` and ``<out>/report/index.html``
    (a table with each movie's counts, stage states and a link to its own report)."""
    folder = report_dir(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    movies = movies_table(reports, cfg, start=folder)
    from diffusion_bunny.run import atomic_write_parquet

    atomic_write_parquet(folder / "movies.parquet", movies)
    counted = movies.filter(pl.col("frames").is_not_null())
    figures = save_sections(
        out_dir,
        [
            Section(
                "movies",
                "ok" if counted.height else "empty",
                f"{movies.height} movies, {movies['error'].is_not_null().sum()} failed",
                [Figure("movies", "Per movie", movies_plot(counted))] if counted.height else [],
            )
        ],
        cfg.report.dpi,
    )
    doc = report_document(
        out_dir,
        figures,
        title=f"QA report: {movies.height} movies",
        intro=f"Output folder `{Path(out_dir).resolve()}`. Each movie's own report is linked in the table.",
        tables={"movies": table_html(movies.drop("run_dir"), links=("report_html",))},
    )
    return render_report_html(doc, folder / "index.html")
