"""Stage 02's figures: every score's histogram with its threshold, and kept against rejected frames."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import polars as pl
from PIL import Image, ImageDraw
from plotnine import (
    aes,
    facet_wrap,
    geom_histogram,
    geom_vline,
    ggplot,
    labs,
    scale_fill_manual,
    theme,
    theme_minimal,
)

from diffusion_bunny.stages.extract.tables import frame_image_path

if TYPE_CHECKING:
    from diffusion_bunny.config import FilteringConfig

from diffusion_bunny.media.figures import load_font

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
    font, small = load_font(14), load_font(11)
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
