"""Stage 01's figures: shots along the movie, the motion distribution with its threshold, a contact
sheet of keyframes per shot.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import polars as pl
from PIL import Image, ImageDraw
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

if TYPE_CHECKING:
    pass

from diffusion_bunny.media.figures import load_font

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
    from diffusion_bunny.stages.extract.keyframes import classify_shots

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
    font, small = load_font(13), load_font(11)
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
