"""Figures the notebooks show: plotnine for charts, matplotlib for image grids.

Every function takes tables and returns a figure object without showing it, so notebooks,
widgets, the report and tests can all use the same code.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl
from PIL import Image, ImageDraw, ImageFont
from plotnine import (
    aes,
    coord_flip,
    element_text,
    facet_wrap,
    geom_col,
    geom_histogram,
    geom_line,
    geom_point,
    geom_rect,
    geom_segment,
    geom_vline,
    ggplot,
    labs,
    scale_fill_manual,
    scale_shape_manual,
    scale_x_continuous,
    theme,
    theme_minimal,
)

from diffusion_bunny.run import frame_image_path

if TYPE_CHECKING:
    from diffusion_bunny.config import FilteringConfig

KIND_COLOURS = {"static": "#4C78A8", "dynamic": "#F58518"}
#: One colour per outcome of stage 02, in rule order.
OUTCOME_COLOURS = {
    "kept": "#54A24B",
    "unreadable": "#000000",
    "too_dark": "#3B3B98",
    "too_bright": "#F2CF5B",
    "clipped": "#B279A2",
    "blurry": "#9D755D",
    "duplicate": "#E45756",
    "not_best": "#BAB0AC",
}


def shot_length_plot(shots: pl.DataFrame) -> ggplot:
    """Each shot as a bar along the movie's time axis, its height the shot's length: long
    static takes and rapid cutting show at a glance."""
    df = shots.with_columns((pl.col("end_s") - pl.col("start_s")).alias("length_s")).to_pandas()
    df["zero"] = 0.0
    return (
        ggplot(df)
        + geom_rect(
            aes(xmin="start_s", xmax="end_s", ymin="zero", ymax="length_s", fill="kind"),
            colour="white",
            size=0.2,
        )
        + scale_fill_manual(values=KIND_COLOURS)
        + labs(x="time in the movie (s)", y="shot length (s)", fill="shot", title=f"{shots.height} shots")
        + theme_minimal()
        + theme(figure_size=(8, 3.2))
    )


def motion_plot(shots: pl.DataFrame, threshold: float) -> ggplot:
    """Distribution of per-shot motion with the static/dynamic threshold as a line."""
    from diffusion_bunny.stages.extract import classify_shots

    df = classify_shots(shots, threshold).to_pandas()
    n_static = int((df["kind"] == "static").sum())
    bins = max(5, min(40, len(df)))
    return (
        ggplot(df, aes(x="motion", fill="kind"))
        + geom_histogram(bins=bins, colour="white", size=0.2)
        + geom_vline(xintercept=threshold, linetype="dashed", colour="#C0392B", size=0.8)
        + scale_fill_manual(values=KIND_COLOURS)
        + labs(
            x="motion (mean absolute frame difference, 0-255)",
            y="shots",
            fill="shot",
            title=f"motion threshold {threshold:.2f}: {n_static} static, {len(df) - n_static} dynamic",
        )
        + theme_minimal()
        + theme(figure_size=(8, 3.2))
    )


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # pragma: no cover - Pillow built without FreeType
        return ImageFont.load_default()


def contact_sheet(
    run_dir: str | Path,
    picks: pl.DataFrame,
    shots: pl.DataFrame,
    *,
    path_column: str = "thumb_path",
    max_shots: int = 30,
    thumb_width: int = 240,
) -> Image.Image:
    """Keyframes grouped by shot: one row per shot, labelled with its id, length and kind.

    ``picks`` is a frames-like table with ``shot_id``, ``frame_index`` and an image path column
    relative to ``run_dir`` (thumbnails by default). The sheet is pasted together with Pillow
    rather than drawn as a grid of matplotlib axes: a hundred axes take seconds to lay out,
    the mosaic a fraction of that, and Jupyter shows a PIL image as it is.
    """
    run_dir = Path(run_dir)
    shown = shots.head(max_shots)
    rows_by_shot = {
        sid: picks.filter(pl.col("shot_id") == sid).sort("frame_index").to_dicts()
        for sid in shown["shot_id"].to_list()
    }
    cols = max([len(v) for v in rows_by_shot.values()] + [1])
    label_w, gap, title_h = 130, 4, 16
    thumb_h = round(thumb_width * 9 / 16)
    for rows in rows_by_shot.values():
        for row in rows[:1]:
            try:
                with Image.open(run_dir / row[path_column]) as img:
                    thumb_h = round(thumb_width * img.height / img.width)
            except OSError:
                pass
            break
        else:
            continue
        break
    header = 22 if shots.height > max_shots else 0
    width = label_w + cols * (thumb_width + gap)
    height = header + max(1, shown.height) * (thumb_h + title_h + gap)
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    font, small = _font(13), _font(11)
    if header:
        draw.text((4, 4), f"first {max_shots} of {shots.height} shots", fill="black", font=font)
    for r, shot in enumerate(shown.iter_rows(named=True)):
        top = header + r * (thumb_h + title_h + gap)
        colour = KIND_COLOURS.get(shot["kind"], "#000000")
        length = shot["end_s"] - shot["start_s"]
        draw.text((4, top + title_h + thumb_h // 2 - 14), f"shot {shot['shot_id']}", fill=colour, font=font)
        draw.text(
            (4, top + title_h + thumb_h // 2 + 2), f"{length:.1f}s {shot['kind']}", fill=colour, font=small
        )
        for c, row in enumerate(rows_by_shot[shot["shot_id"]]):
            left = label_w + c * (thumb_width + gap)
            draw.text(
                (left, top + 1), f"#{row['frame_index']} {row.get('role') or ''}", fill="#444444", font=small
            )
            try:
                with Image.open(run_dir / row[path_column]) as img:
                    thumb = img.convert("RGB").resize((thumb_width, thumb_h), Image.Resampling.BILINEAR)
            except OSError:
                thumb = Image.new("RGB", (thumb_width, thumb_h), "#DDDDDD")
                ImageDraw.Draw(thumb).text((8, 8), "missing", fill="black", font=small)
            sheet.paste(thumb, (left, top + title_h))
    return sheet


def quality_histograms(table: pl.DataFrame, cfg: FilteringConfig) -> ggplot:
    """One histogram per quality score, bars coloured by outcome, thresholds as dashed lines.

    Sharpness is shown as log10: it spans three decades, and on a linear axis every blurred frame
    would sit in the first bar. The hash panel shows each frame's distance to its nearest other
    frame, the quantity ``dup_distance`` cuts (the line sits half a bit above it: bars left of
    the line are duplicates of something, if that something is kept and better).
    """
    import pandas as pd

    panels = {
        "sharpness (log10)": pl.col("sharpness").clip(lower_bound=1e-3).log10(),
        "brightness (0-255)": pl.col("brightness"),
        "contrast (std, 0-255)": pl.col("contrast"),
        "clipped share": pl.col("clipped"),
        "nearest hash distance (bits)": pl.col("nearest_distance").cast(pl.Float64),
    }
    outcome = pl.col("reject_reason").fill_null("kept").alias("outcome")
    long = pl.concat(
        [
            table.select(pl.lit(name).alias("score"), expr.alias("value"), outcome)
            for name, expr in panels.items()
        ]
    ).drop_nulls("value")
    lines = [
        ("sharpness (log10)", math.log10(max(cfg.min_sharpness, 1e-3))),
        ("brightness (0-255)", cfg.min_brightness),
        ("brightness (0-255)", cfg.max_brightness),
        ("clipped share", cfg.max_clipped),
        ("nearest hash distance (bits)", cfg.dup_distance + 0.5),
    ]
    order = list(panels)
    df = long.to_pandas()
    df["score"] = pd.Categorical(df["score"], categories=order)
    present = [o for o in OUTCOME_COLOURS if o in set(df["outcome"])]
    df["outcome"] = pd.Categorical(df["outcome"], categories=present)
    vlines = pd.DataFrame(lines, columns=["score", "value"])
    vlines["score"] = pd.Categorical(vlines["score"], categories=order)
    kept = int(table["keep"].sum())
    return (
        ggplot(df, aes(x="value", fill="outcome"))
        + geom_histogram(bins=30, colour="white", size=0.1)
        + geom_vline(vlines, aes(xintercept="value"), linetype="dashed", colour="#C0392B", size=0.7)
        + facet_wrap("score", scales="free", ncol=3)
        + scale_fill_manual(values=OUTCOME_COLOURS, limits=present)
        + labs(x="", y="frames", fill="outcome", title=f"{kept} of {table.height} frames kept")
        + theme_minimal()
        + theme(figure_size=(10, 5.5))
    )


def quality_sheet(
    run_dir: str | Path,
    table: pl.DataFrame,
    frames: pl.DataFrame,
    *,
    max_per_group: int = 24,
    columns: int = 6,
    thumb_width: int = 160,
) -> Image.Image:
    """Kept frames, then rejected ones labelled with their reason, as one Pillow mosaic.

    Rejected frames are grouped by reason in rule order, so the frames a threshold just pushed
    out sit together. Thumbnails from ``thumbs/`` are used where stage 01 saved them.
    """
    run_dir = Path(run_dir)
    rows = table.join(frames.select("frame_id", "frame_index", "shot_id", "path"), on="frame_id", how="left")
    rank = {r: i for i, r in enumerate(OUTCOME_COLOURS)}
    rows = rows.with_columns(
        pl.col("reject_reason").fill_null("kept").replace_strict(rank, default=99).alias("_rank")
    ).sort("_rank", "frame_index")
    kept = rows.filter(pl.col("keep"))
    rejected = rows.filter(~pl.col("keep"))
    thumb_h = round(thumb_width * 9 / 16)
    for row in rows.head(1).iter_rows(named=True):
        try:
            with Image.open(frame_image_path(run_dir, row["frame_id"], row["path"])) as img:
                thumb_h = round(thumb_width * img.height / img.width)
        except OSError:
            pass
    gap, label_h, header_h = 4, 15, 24
    sections = [("kept", kept), ("rejected", rejected)]
    heights = [
        header_h + max(1, math.ceil(min(g.height, max_per_group) / columns)) * (thumb_h + label_h + gap)
        for _, g in sections
    ]
    width = columns * (thumb_width + gap) + gap
    sheet = Image.new("RGB", (width, sum(heights)), "white")
    draw = ImageDraw.Draw(sheet)
    font, small = _font(14), _font(11)
    top = 0
    for (title, group), height in zip(sections, heights, strict=True):
        shown = (
            f"first {max_per_group} of {group.height}" if group.height > max_per_group else str(group.height)
        )
        draw.text(
            (gap, top + 4),
            f"{title} ({shown})",
            fill=OUTCOME_COLOURS["kept"] if title == "kept" else "#C0392B",
            font=font,
        )
        for k, row in enumerate(group.head(max_per_group).iter_rows(named=True)):
            left = gap + (k % columns) * (thumb_width + gap)
            y = top + header_h + (k // columns) * (thumb_h + label_h + gap)
            reason = row["reject_reason"] or ""
            label = f"#{row['frame_index']} shot {row['shot_id']} {reason}"
            draw.text((left, y), label, fill=OUTCOME_COLOURS.get(reason or "kept", "#444444"), font=small)
            try:
                with Image.open(frame_image_path(run_dir, row["frame_id"], row["path"])) as img:
                    thumb = img.convert("RGB").resize((thumb_width, thumb_h), Image.Resampling.BILINEAR)
            except (OSError, TypeError):
                thumb = Image.new("RGB", (thumb_width, thumb_h), "#DDDDDD")
                ImageDraw.Draw(thumb).text((8, 8), "unreadable", fill="black", font=small)
            sheet.paste(thumb, (left, y + label_h))
        top += height
    return sheet


# ---------------------------------------------------------------------------------------------
# Stage 03: characters

UNKNOWN = "unknown"


def character_counts_plot(counts: pl.DataFrame) -> ggplot:
    """Faces per character (from :func:`~diffusion_bunny.stages.characters.character_counts`),
    the low-confidence share darker, unknown faces in gray."""
    order = counts["character"].to_list()[::-1]
    df = (
        counts.select(
            "character",
            (pl.col("faces") - pl.col("low_confidence")).alias("confident"),
            pl.col("low_confidence").alias("low confidence"),
        )
        .unpivot(index="character", variable_name="match", value_name="n")
        .to_pandas()
    )
    df["character"] = pd_categorical(df["character"], order)
    df["match"] = pd_categorical(df["match"], ["low confidence", "confident"])
    return (
        ggplot(df, aes(x="character", y="n", fill="match"))
        + geom_col()
        + coord_flip()
        + scale_fill_manual(values={"confident": "#4C78A8", "low confidence": "#F58518"})
        + labs(x="", y="faces", fill="", title=f"{int(counts['faces'].sum())} faces")
        + theme_minimal()
        + theme(figure_size=(7, max(2.0, 0.45 * len(order) + 1)))
    )


def pd_categorical(values: Any, categories: list[str]) -> Any:
    """Ordered pandas categorical (plotnine orders axes by it)."""
    import pandas as pd

    return pd.Categorical(values, categories=categories, ordered=True)


def screen_time_plot(faces: pl.DataFrame, shots: pl.DataFrame) -> ggplot:
    """Character by time: a bar over every shot in which a sampled frame shows the character, a
    dot at each frame where the face was found (hollow for low-confidence matches)."""
    named = faces.with_columns(pl.col("character").fill_null(UNKNOWN))
    spans = (
        named.select("character", "shot_id")
        .unique()
        .join(shots.select("shot_id", "start_s", "end_s"), on="shot_id")
        .to_pandas()
    )
    points = named.select("character", "timestamp_s", "low_confidence").to_pandas()
    chars = [c for c in named["character"].unique().sort().to_list() if c != UNKNOWN]
    order = ([UNKNOWN] if UNKNOWN in set(named["character"]) else []) + chars[::-1]
    for df in (spans, points):
        df["character"] = pd_categorical(df["character"], order)
    seconds = {
        c: float((spans[spans["character"] == c]["end_s"] - spans[spans["character"] == c]["start_s"]).sum())
        for c in order
    }
    total = float(shots["end_s"].max() or 0.0)
    title = "screen time: " + ", ".join(f"{c} {seconds[c]:.0f}s" for c in order[::-1])
    points["match"] = points["low_confidence"].map({True: "low confidence", False: "confident"})
    return (
        ggplot()
        + geom_segment(
            spans, aes(x="start_s", xend="end_s", y="character", yend="character"), size=6, colour="#9ECAE9"
        )
        + geom_point(points, aes(x="timestamp_s", y="character", shape="match"), size=2.2, colour="#1F4E79")
        + scale_shape_manual(values={"confident": "o", "low confidence": "x"})
        + scale_x_continuous(limits=(0, max(total, 1e-6)))
        + labs(x="time in the movie (s)", y="", shape="", title=title)
        + theme_minimal()
        + theme(figure_size=(9, max(2.0, 0.5 * len(order) + 1.2)))
    )


def face_sheet(
    run_dir: str | Path,
    faces: pl.DataFrame,
    frames: pl.DataFrame,
    *,
    group: str = "character",
    max_per_group: int = 12,
    columns: int = 12,
    side: int = 96,
) -> Image.Image:
    """One row block per character (or per cluster with ``group="cluster"``): face crops, each
    labelled with its distance; low-confidence matches get an orange frame.

    Crops come from the full frames (boxes are full-resolution pixels); each frame file is opened
    once however many faces it holds.
    """
    run_dir = Path(run_dir)
    rows = faces.with_columns(pl.col(group).fill_null(UNKNOWN)).join(
        frames.select("frame_id", "path"), on="frame_id", how="left"
    )
    sizes = rows.group_by(group).len().sort(["len", group], descending=[True, False])
    groups = [g for g in sizes[group].to_list() if g != UNKNOWN] + (
        [UNKNOWN] if UNKNOWN in set(sizes[group]) else []
    )
    gap, label_h, header_h = 4, 14, 22
    per_row = min(columns, max_per_group)
    blocks = []
    for name in groups:
        members = rows.filter(pl.col(group) == name)
        if "distance" in members.columns:
            members = members.sort("distance", nulls_last=True)
        blocks.append((name, members))
    height = sum(
        header_h + math.ceil(min(m.height, max_per_group) / per_row) * (side + label_h + gap)
        for _, m in blocks
    )
    width = per_row * (side + gap) + gap
    sheet = Image.new("RGB", (width, max(height, header_h)), "white")
    draw = ImageDraw.Draw(sheet)
    font, small = _font(14), _font(10)
    cache: dict[str, Image.Image | None] = {}
    top = 0
    for name, members in blocks:
        low = int(members["low_confidence"].sum()) if "low_confidence" in members.columns else 0
        shown = f"{min(members.height, max_per_group)} of {members.height}"
        draw.text((gap, top + 4), f"{name}  ({shown} faces, {low} low confidence)", fill="black", font=font)
        for k, row in enumerate(members.head(max_per_group).iter_rows(named=True)):
            x = gap + (k % per_row) * (side + gap)
            y = top + header_h + (k // per_row) * (side + label_h + gap)
            path = row["path"]
            if path not in cache:
                try:
                    with Image.open(run_dir / path) as img:
                        cache[path] = img.convert("RGB")
                except (OSError, TypeError):
                    cache[path] = None
            img = cache[path]
            if img is None:
                crop = Image.new("RGB", (side, side), "#DDDDDD")
            else:
                pad = round(0.15 * (row["bottom"] - row["top"]))
                box = (row["left"] - pad, row["top"] - pad, row["right"] + pad, row["bottom"] + pad)
                crop = img.crop(box).resize((side, side), Image.Resampling.BILINEAR)
            if row.get("low_confidence"):
                ImageDraw.Draw(crop).rectangle((0, 0, side - 1, side - 1), outline="#F58518", width=4)
            sheet.paste(crop, (x, y))
            distance = row.get("distance")
            label = f"{distance:.2f}" if distance is not None else f"~{row.get('nearest_distance') or 0:.2f}"
            colour = "#F58518" if row.get("low_confidence") else "#444444"
            draw.text((x, y + side), f"{label} s{row['shot_id']}", fill=colour, font=small)
        top += header_h + math.ceil(min(members.height, max_per_group) / per_row) * (side + label_h + gap)
    return sheet


# ----------------------------------------------------------------------------- stage 04


def cluster_sizes_plot(clusters: pl.DataFrame, level: str = "scene") -> ggplot:
    """Frames per cluster, largest first, the noise bucket as the last bar in grey."""
    table = clusters.filter(pl.col("level") == level).group_by("cluster_id", "name").len("frames")
    table = table.with_columns((pl.col("cluster_id") == "noise").alias("noise")).sort(
        ["noise", "frames", "cluster_id"], descending=[False, True, False]
    )
    order = table["name"].to_list()
    data = table.to_pandas()
    data["name"] = pd_categorical(data["name"], order)
    share = float(table.filter(pl.col("noise"))["frames"].sum()) / max(int(table["frames"].sum()), 1)
    n_clusters = table.height - int(table["noise"].sum())
    return (
        ggplot(data, aes("name", "frames", fill="noise"))
        + geom_col()
        + scale_fill_manual(values={False: "#4C78A8", True: "#BBBBBB"}, guide=None)
        + labs(
            x="",
            y="frames",
            title=f"{level} clusters: {n_clusters}, noise {share:.0%} of frames",
        )
        + theme_minimal()
        + theme(axis_text_x=element_text(rotation=60, ha="right"), figure_size=(8, 3.2))
    )


def similarity_histogram(clusters: pl.DataFrame, assign_threshold: float, noise_threshold: float) -> ggplot:
    """Each frame's similarity to its scene cluster's exemplar, with the two thresholds."""
    data = clusters.filter((pl.col("level") == "scene") & pl.col("similarity").is_not_null())
    return (
        ggplot(data.select("similarity").to_pandas(), aes("similarity"))
        + geom_histogram(bins=30, fill="#4C78A8")
        + geom_vline(xintercept=assign_threshold, color="#54A24B", linetype="dashed")
        + geom_vline(xintercept=noise_threshold, color="#E45756", linetype="dashed")
        + labs(
            x="cosine similarity to the cluster's exemplar",
            y="frames",
            title=f"join at >= {assign_threshold} (green), noise under {noise_threshold} (red)",
        )
        + theme_minimal()
        + theme(figure_size=(7, 3))
    )


def learning_curve_plot(curve: pl.DataFrame) -> ggplot:
    """Adjusted Rand index against the ground truth on the frames the (simulated) reviewer never
    touched, after K corrections: reclustered through the adapter learned from them, against the
    same frames as first clustered (what moving frames by hand alone gives). Thin lines per seed,
    thick lines for the mean."""
    data = curve.select(
        "corrections",
        pl.col("seed") if "seed" in curve.columns else pl.lit(0).alias("seed"),
        pl.col("ari_untouched").alias("with the adapter"),
        pl.col("ari_untouched_without").alias("corrections only"),
    ).unpivot(index=["corrections", "seed"], variable_name="clustering", value_name="ari")
    data = data.with_columns(pl.concat_str(pl.col("clustering"), pl.col("seed")).alias("run"))
    mean = data.group_by("corrections", "clustering").agg(pl.col("ari").mean()).sort("corrections")
    return (
        ggplot(data.to_pandas(), aes("corrections", "ari", color="clustering"))
        + geom_line(aes(group="run"), alpha=0.3)
        + geom_line(data=mean.to_pandas(), size=1.4)
        + geom_point(data=mean.to_pandas(), size=2)
        + labs(
            x="corrections by the simulated reviewer",
            y="adjusted Rand index (untouched frames)",
            color="",
            title="learning from corrections",
        )
        + theme_minimal()
        + theme(figure_size=(6.5, 3.2))
    )


def cluster_sheet(
    run_dir: str | Path,
    clusters: pl.DataFrame,
    frames: pl.DataFrame,
    *,
    level: str = "scene",
    max_per_group: int = 10,
    side: int = 112,
) -> Image.Image:
    """One row per cluster (largest first, noise last): its frames' thumbnails, best fitting
    first, each labelled with its similarity; frames a person placed get a blue frame."""
    run_dir = Path(run_dir)
    rows = clusters.filter(pl.col("level") == level).join(
        frames.select("frame_id", "path"), on="frame_id", how="left"
    )
    sizes = rows.group_by("cluster_id").len().with_columns((pl.col("cluster_id") == "noise").alias("n"))
    order = sizes.sort(["n", "len", "cluster_id"], descending=[False, True, False])["cluster_id"].to_list()
    gap, label_h, header_h = 4, 14, 22
    thumb_h = round(side * 9 / 16)
    width = max_per_group * (side + gap) + gap
    height = len(order) * (header_h + thumb_h + label_h + gap)
    sheet = Image.new("RGB", (width, max(height, header_h)), "white")
    draw = ImageDraw.Draw(sheet)
    font, small = _font(14), _font(10)
    top = 0
    for cid in order:
        members = rows.filter(pl.col("cluster_id") == cid).sort(
            ["similarity", "frame_id"], descending=[True, False], nulls_last=True
        )
        name = members["name"][0]
        draw.text((gap, top + 4), f"{name}  ({members.height} frames)", fill="black", font=font)
        for k, row in enumerate(members.head(max_per_group).iter_rows(named=True)):
            x, y = gap + k * (side + gap), top + header_h
            try:
                with Image.open(frame_image_path(run_dir, row["frame_id"], row["path"])) as img:
                    thumb = img.convert("RGB").resize((side, thumb_h), Image.Resampling.BILINEAR)
            except (OSError, TypeError):
                thumb = Image.new("RGB", (side, thumb_h), "#DDDDDD")
            if row["manual"]:
                ImageDraw.Draw(thumb).rectangle((0, 0, side - 1, thumb_h - 1), outline="#4C78A8", width=4)
            sheet.paste(thumb, (x, y))
            sim = row["similarity"]
            draw.text((x, y + thumb_h), f"{sim:.2f}" if sim is not None else "-", fill="#444444", font=small)
        top += header_h + thumb_h + label_h + gap
    return sheet


def caption_length_plot(captions: pl.DataFrame, by: str = "provider") -> ggplot:
    """Words per caption of a ``captions`` table, coloured by ``provider`` (notebook 05) or
    ``status`` (the report: written vs edited); the title counts the failed ones. Long captions
    get cut at the text encoder's 77 tokens, very short ones teach little."""
    from diffusion_bunny.captions import caption_lengths

    lengths = caption_lengths(captions)
    failed = captions.height - lengths.height
    median = float(lengths["words"].median() or 0)
    return (
        ggplot(lengths.to_pandas(), aes("words", fill=by))
        + geom_histogram(binwidth=1, position="stack")
        + geom_vline(xintercept=50, color="#E45756", linetype="dashed")
        + labs(
            x="words per caption",
            y="captions",
            fill="",
            title=f"{lengths.height} of {captions.height} frames captioned ({failed} failed), median "
            f"{median:.0f} words (dashed: about CLIP's 77-token limit)",
        )
        + theme_minimal()
        + theme(figure_size=(8, 3.2))
    )


def word_frequency_plot(freq: pl.DataFrame) -> ggplot:
    """The most frequent caption words (``captions.word_frequencies``), most frequent on top."""
    order = freq["word"].to_list()[::-1]
    data = freq.to_pandas()
    data["word"] = pd_categorical(data["word"], order)
    return (
        ggplot(data, aes("word", "count"))
        + geom_col(fill="#4C78A8")
        + coord_flip()
        + labs(x="", y="captions containing it", title="most frequent words")
        + theme_minimal()
        + theme(figure_size=(6, max(2.5, 0.22 * len(order))))
    )


# ----------------------------------------------------------------------------- stage 06

SPLIT_COLOURS = {"train": "#4C78A8", "validation": "#F58518"}
NO_CHARACTER = "(no character)"


def dataset_counts_plot(items: pl.DataFrame) -> ggplot:
    """Pictures per character and split (a picture with two characters counts for both), the
    pictures without a named character as their own bar: shows at a glance who dominates the
    training set and whether every character has validation pictures."""
    table = (
        items.select("split", "characters")
        .explode("characters", empty_as_null=True)
        .with_columns(pl.col("characters").fill_null(NO_CHARACTER).alias("character"))
        .group_by("character", "split")
        .len("pictures")
    )
    totals = table.group_by("character").agg(pl.col("pictures").sum()).sort(["pictures", "character"])
    order = [c for c in totals["character"].to_list() if c != NO_CHARACTER]
    order = ([NO_CHARACTER] if NO_CHARACTER in set(totals["character"]) else []) + order
    data = table.to_pandas()
    data["character"] = pd_categorical(data["character"], order)
    data["split"] = pd_categorical(data["split"], ["validation", "train"])
    n_val = int((items["split"] == "validation").sum())
    return (
        ggplot(data, aes(x="character", y="pictures", fill="split"))
        + geom_col()
        + coord_flip()
        + scale_fill_manual(values=SPLIT_COLOURS)
        + labs(x="", y="pictures", fill="", title=f"{items.height} pictures: {n_val} for validation")
        + theme_minimal()
        + theme(figure_size=(7, max(2.0, 0.45 * len(order) + 1)))
    )


def dataset_sheet(
    dataset_dir: str | Path, items: pl.DataFrame, *, max_per_group: int = 8, side: int = 128
) -> Image.Image:
    """One row per kohya concept (largest first): the exported pictures as training will see
    them (crops included), each labelled with its crop; validation pictures get an orange frame."""
    dataset_dir = Path(dataset_dir)
    sizes = items.group_by("concept").len().sort(["len", "concept"], descending=[True, False])
    gap, label_h, header_h = 4, 14, 22
    width = max_per_group * (side + gap) + gap
    height = sizes.height * (header_h + side + label_h + gap)
    sheet = Image.new("RGB", (width, max(height, header_h)), "white")
    draw = ImageDraw.Draw(sheet)
    font, small = _font(14), _font(10)
    top = 0
    for concept, count in sizes.iter_rows():
        members = items.filter(pl.col("concept") == concept).sort("split", "frame_id", "crop")
        repeats = members.filter(pl.col("split") == "train")["repeats"]
        times = f", x{repeats[0]} per epoch" if repeats.len() else ""
        draw.text((gap, top + 4), f"{concept}  ({count} pictures{times})", fill="black", font=font)
        for k, row in enumerate(members.head(max_per_group).iter_rows(named=True)):
            x, y = gap + k * (side + gap), top + header_h
            try:
                with Image.open(dataset_dir / "hf" / row["split"] / row["file_name"]) as img:
                    thumb = img.convert("RGB")
                    thumb.thumbnail((side, side), Image.Resampling.BILINEAR)
            except OSError:
                thumb = Image.new("RGB", (side, side), "#DDDDDD")
            tile = Image.new("RGB", (side, side), "#F4F4F4")
            tile.paste(thumb, ((side - thumb.width) // 2, (side - thumb.height) // 2))
            if row["split"] == "validation":
                ImageDraw.Draw(tile).rectangle((0, 0, side - 1, side - 1), outline="#F58518", width=4)
            sheet.paste(tile, (x, y))
            draw.text((x, y + side), f"{row['crop']} s{row['shot_id']}", fill="#444444", font=small)
        top += header_h + side + label_h + gap
    return sheet
