"""Stage 04's figures: cluster sizes, similarity to the exemplar with both thresholds, the learning
curve of corrections, thumbnails per cluster.
"""

from __future__ import annotations

from pathlib import Path

import plotnine as p9
import polars as pl
from PIL import Image

from diffusion_bunny.media.figures import (
    Block,
    Layout,
    Tile,
    aspect_height,
    categorical,
    histogram,
    largest_first,
    minimal_theme,
    tile_sheet,
)
from diffusion_bunny.stages.extract.tables import frame_image_path

# ----------------------------------------------------------------------------- stage 04


def cluster_sizes_plot(clusters: pl.DataFrame, level: str = "scene") -> p9.ggplot:
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
        p9.ggplot(data, p9.aes("name", "frames", fill="noise"))
        + p9.geom_col()
        + p9.scale_fill_manual(values={False: "#4C78A8", True: "#BBBBBB"}, guide=None)
        + p9.labs(
            x="",
            y="frames",
            title=f"{level} clusters: {n_clusters}, noise {share:.0%} of frames",
        )
        + minimal_theme(8, 3.2, names=order, axis_text_x=p9.element_text(rotation=60, ha="right"))
    )


def similarity_histogram(
    clusters: pl.DataFrame, assign_threshold: float, noise_threshold: float
) -> p9.ggplot:
    """Each frame's similarity to its scene cluster's exemplar, with the two thresholds."""
    data = clusters.filter((pl.col("level") == "scene") & pl.col("similarity").is_not_null())
    return histogram(
        data.select("similarity").to_pandas(),
        "similarity",
        lines=[(assign_threshold, "#54A24B"), (noise_threshold, "#E45756")],
        labels={
            "x": "cosine similarity to the cluster's exemplar",
            "y": "frames",
            "title": f"join at >= {assign_threshold} (green), noise under {noise_threshold} (red)",
        },
        figure_size=(7, 3),
        bins=30,
        fill="#4C78A8",
    )


def learning_curve_plot(curve: pl.DataFrame) -> p9.ggplot:
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
        p9.ggplot(data.to_pandas(), p9.aes("corrections", "ari", color="clustering"))
        + p9.geom_line(p9.aes(group="run"), alpha=0.3)
        + p9.geom_line(data=mean.to_pandas(), size=1.4)
        + p9.geom_point(data=mean.to_pandas(), size=2)
        + p9.labs(
            x="corrections by the simulated reviewer",
            y="adjusted Rand index (untouched frames)",
            color="",
            title="learning from corrections",
        )
        + minimal_theme(6.5, 3.2)
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
    blocks = []
    for cid in largest_first(rows, "cluster_id", last="noise"):
        members = rows.filter(pl.col("cluster_id") == cid).sort(
            ["similarity", "frame_id"], descending=[True, False], nulls_last=True
        )
        tiles = [
            Tile(
                frame_image_path(run_dir, row["frame_id"], row["path"]) if row["path"] else None,
                label=f"{row['similarity']:.2f}" if row["similarity"] is not None else "-",
                outline="#4C78A8" if row["manual"] else None,
                missing="",
            )
            for row in members.head(max_per_group).iter_rows(named=True)
        ]
        blocks.append(Block(tiles, title=f"{members['name'][0]}  ({members.height} frames)"))
    # Tiles of the film's own shape (a 4:3 or a scope film was stretched to 16:9), and a frame of
    # another shape fitted inside, as the other sheets do.
    first = next((t.path for b in blocks for t in b.tiles if t.path is not None), None)
    return tile_sheet(blocks, Layout((side, aspect_height(first, side)), max_per_group, fit="contain"))
