"""Stage 01's figures: shots along the movie, the motion distribution with its threshold, a contact
sheet of keyframes per shot.
"""

from __future__ import annotations

from pathlib import Path

import plotnine as p9
import polars as pl
from PIL import Image

from diffusion_bunny.media.figures import Block, Layout, Tile, aspect_height, tile_sheet

KIND_COLOURS = {"static": "#4C78A8", "dynamic": "#F58518"}


def shot_length_plot(shots: pl.DataFrame) -> p9.ggplot:
    """Each shot as a bar along the movie's time axis, its height the shot's length: long
    static takes and rapid cutting show at a glance."""
    df = shots.with_columns((pl.col("end_s") - pl.col("start_s")).alias("length_s")).to_pandas()
    df["zero"] = 0.0
    return (
        p9.ggplot(df)
        + p9.geom_rect(
            p9.aes(xmin="start_s", xmax="end_s", ymin="zero", ymax="length_s", fill="kind"),
            colour="white",
            size=0.2,
        )
        + p9.scale_fill_manual(values=KIND_COLOURS)
        + p9.labs(x="time in the movie (s)", y="shot length (s)", fill="shot", title=f"{shots.height} shots")
        + p9.theme_minimal()
        + p9.theme(figure_size=(8, 3.2))
    )


def motion_plot(shots: pl.DataFrame, threshold: float) -> p9.ggplot:
    """Distribution of per-shot motion with the static/dynamic threshold as a line."""
    from diffusion_bunny.stages.extract.keyframes import classify_shots

    df = classify_shots(shots, threshold).to_pandas()
    n_static = int((df["kind"] == "static").sum())
    bins = max(5, min(40, len(df)))
    return (
        p9.ggplot(df, p9.aes(x="motion", fill="kind"))
        + p9.geom_histogram(bins=bins, colour="white", size=0.2)
        + p9.geom_vline(xintercept=threshold, linetype="dashed", colour="#C0392B", size=0.8)
        + p9.scale_fill_manual(values=KIND_COLOURS)
        + p9.labs(
            x="motion (mean absolute frame difference, 0-255)",
            y="shots",
            fill="shot",
            title=f"motion threshold {threshold:.2f}: {n_static} static, {len(df) - n_static} dynamic",
        )
        + p9.theme_minimal()
        + p9.theme(figure_size=(8, 3.2))
    )


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
    relative to ``run_dir`` (thumbnails by default).
    """
    run_dir = Path(run_dir)
    shown = shots.head(max_shots)
    rows_by_shot = {
        sid: picks.filter(pl.col("shot_id") == sid).sort("frame_index").to_dicts()
        for sid in shown["shot_id"].to_list()
    }
    first = next((rows[0] for rows in rows_by_shot.values() if rows), None)
    thumb_h = aspect_height(run_dir / first[path_column] if first else None, thumb_width)
    blocks = []
    for shot in shown.iter_rows(named=True):
        colour = KIND_COLOURS.get(shot["kind"], "#000000")
        tiles = [
            Tile(run_dir / row[path_column], label=f"#{row['frame_index']} {row.get('role') or ''}")
            for row in rows_by_shot[shot["shot_id"]]
        ]
        length = f"{shot['end_s'] - shot['start_s']:.1f}s {shot['kind']}"
        blocks.append(Block(tiles, side=(f"shot {shot['shot_id']}", length), side_colour=colour))
    columns = max([len(v) for v in rows_by_shot.values()] + [1])
    truncated = shots.height > max_shots
    layout = Layout(
        (thumb_width, thumb_h),
        columns,
        label_h=16,
        label_above=True,
        side_width=130,
        lead_gap=False,
        header_h=22 if truncated else 0,
    )
    return tile_sheet(
        blocks, layout, header=[f"first {max_shots} of {shots.height} shots"] if truncated else []
    )
