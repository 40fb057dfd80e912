"""Figures the notebooks show: plotnine for charts, matplotlib for image grids.

Every function takes tables and returns a figure object without showing it, so notebooks,
widgets, the report and tests can all use the same code.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import polars as pl
from PIL import Image
from plotnine import (
    aes,
    geom_histogram,
    geom_rect,
    geom_vline,
    ggplot,
    labs,
    scale_fill_manual,
    theme,
    theme_minimal,
)

KIND_COLOURS = {"static": "#4C78A8", "dynamic": "#F58518"}


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


def contact_sheet(
    run_dir: str | Path,
    picks: pl.DataFrame,
    shots: pl.DataFrame,
    *,
    path_column: str = "thumb_path",
    max_shots: int = 30,
    thumb_width: float = 1.6,
) -> plt.Figure:
    """Keyframes grouped by shot: one row per shot, its kind and length in the row label.

    ``picks`` is a frames-like table with ``shot_id``, ``frame_index`` and an image path column
    relative to ``run_dir`` (thumbnails by default: fast, and enough to judge a choice).
    """
    run_dir = Path(run_dir)
    shot_ids = shots["shot_id"].to_list()[:max_shots]
    per_shot = {sid: picks.filter(pl.col("shot_id") == sid).sort("frame_index") for sid in shot_ids}
    cols = max([df.height for df in per_shot.values()] + [1])
    rows = max(1, len(shot_ids))
    fig, axes = plt.subplots(
        rows, cols, figsize=(thumb_width * cols + 1.8, thumb_width * 0.62 * rows + 0.4), squeeze=False
    )
    info = {r["shot_id"]: r for r in shots.iter_rows(named=True)}
    for r, sid in enumerate(shot_ids):
        shot = info[sid]
        for c in range(cols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            df = per_shot[sid]
            if c < df.height:
                row = df.row(c, named=True)
                try:
                    img = np.asarray(Image.open(run_dir / row[path_column]).convert("RGB"))
                except OSError:
                    img = np.zeros((9, 16, 3), np.uint8)
                ax.imshow(img)
                ax.set_title(f"#{row['frame_index']}", fontsize=6, pad=1)
        axes[r][0].set_ylabel(
            f"shot {sid}\n{shot['end_s'] - shot['start_s']:.1f}s {shot['kind']}",
            fontsize=7,
            rotation=0,
            ha="right",
            va="center",
            color=KIND_COLOURS.get(shot["kind"], "black"),
        )
    if len(shots) > max_shots:
        fig.suptitle(f"first {max_shots} of {shots.height} shots", fontsize=8)
    fig.tight_layout(pad=0.3)
    plt.close(fig)  # returned, not shown: the caller decides (display, savefig)
    return fig
