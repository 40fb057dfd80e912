"""Stage 04's figures: cluster sizes, similarity to the exemplar with both thresholds, the learning
curve of corrections, thumbnails per cluster.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import polars as pl
from PIL import Image, ImageDraw
from plotnine import (
    aes,
    element_text,
    geom_col,
    geom_histogram,
    geom_line,
    geom_point,
    geom_vline,
    ggplot,
    labs,
    scale_fill_manual,
    theme,
    theme_minimal,
)

from diffusion_bunny.stages.extract.tables import frame_image_path

if TYPE_CHECKING:
    pass

from diffusion_bunny.media.figures import categorical, load_font

# ----------------------------------------------------------------------------- stage 04


def cluster_sizes_plot(clusters: pl.DataFrame, level: str = "scene") -> ggplot:
    """Frames per cluster, largest first, the noise bucket as the last bar in grey."""
    table = clusters.filter(pl.col("level") == level).group_by("cluster_id", "name").len("frames")
    table = table.with_columns((pl.col("cluster_id") == "noise").alias("noise")).sort(
        ["noise", "frames", "cluster_id"], descending=[False, True, False]
    )
    order = table["name"].to_list()
    data = table.to_pandas()
    data["name"] = categorical(data["name"], order)
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
    font, small = load_font(14), load_font(10)
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
