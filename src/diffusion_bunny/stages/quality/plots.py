"""Stage 02's figures: every score's histogram with its threshold, and kept against rejected frames."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
import plotnine as p9
import polars as pl
from PIL import Image

from diffusion_bunny.media.figures import (
    LINE_RED,
    Block,
    Layout,
    Tile,
    aspect_height,
    bar_layers,
    minimal_theme,
    stacked_bins,
    tile_sheet,
)
from diffusion_bunny.stages.extract.tables import frame_image_path
from diffusion_bunny.stages.quality.rules import exposure_thresholds, sharpness_threshold, with_text_columns
from diffusion_bunny.stages.quality.text import judged_text

if TYPE_CHECKING:
    from diffusion_bunny.stages.quality.settings import QualitySettings


#: One colour per outcome of stage 02, in rule order.
OUTCOME_COLOURS = {
    "kept": "#54A24B",
    "unreadable": "#000000",
    "too_dark": "#3B3B98",
    "too_bright": "#F2CF5B",
    "clipped": "#B279A2",
    "blurry": "#9D755D",
    "text": "#FF7F0E",
    "subtitles": "#17BECF",
    "duplicate": "#E45756",
    "not_best": "#BAB0AC",
}


def quality_histograms(
    table: pl.DataFrame, cfg: QualitySettings, frames: pl.DataFrame | None = None
) -> p9.ggplot:
    """One histogram per quality score, bars coloured by outcome, thresholds as dashed lines.

    Sharpness is shown as log10: it spans three decades, and on a linear axis every blurred frame
    would sit in the first bar. The hash panel shows each frame's distance to its nearest other
    frame, the quantity ``dup_distance`` cuts (the line sits half a bit above it: bars left of
    the line are duplicates of something, if that something is kept and better). The brightness
    and clipped lines are the thresholds in force for this film (``relative_brightness`` moves
    them with its median, drawn dotted); the two text panels show what the text rule weighs, the
    share of the edges and of the area held by text lines that are not subtitles (frames looked
    at only; ``frames`` gives each picture's shape, by which lines shaped like figures are left
    out, as the rule leaves them).
    """
    table = with_text_columns(table)
    table = table.join(judged_text(table, cfg, frames), on="frame_id", how="left")
    exposure = exposure_thresholds(table, cfg)
    # A flat film's blur threshold (for its median frame; relative_sharpness), else the configured.
    blur = sharpness_threshold(table, cfg)
    blur_line = blur.min_sharpness * blur.film_scale**2
    panels = {
        "sharpness (log10)": pl.col("sharpness").clip(lower_bound=1e-3).log10(),
        "brightness (0-255)": pl.col("brightness"),
        "contrast (std, 0-255)": pl.col("contrast"),
        "clipped share": pl.col("clipped"),
        "nearest hash distance (bits)": pl.col("nearest_distance").cast(pl.Float64),
        "text (share of edges)": pl.col("text_share_judged"),
        "text (share of area)": pl.col("text_area_judged"),
    }
    outcome = pl.col("reject_reason").fill_null("kept").alias("outcome")
    long = pl.concat(
        [
            table.select(pl.lit(name).alias("score"), expr.alias("value"), outcome)
            for name, expr in panels.items()
        ]
    ).drop_nulls("value")
    lines = [
        ("sharpness (log10)", math.log10(max(blur_line, 1e-3))),
        ("brightness (0-255)", exposure.min_brightness),
        ("brightness (0-255)", exposure.max_brightness),
        ("clipped share", exposure.max_clipped),
        ("nearest hash distance (bits)", cfg.dup_distance + 0.5),
        ("text (share of edges)", cfg.max_text_share),
        ("text (share of area)", cfg.max_text_area),
    ]
    order = list(panels)
    df = long.to_pandas()
    df["score"] = pd.Categorical(df["score"], categories=order)
    present = [o for o in OUTCOME_COLOURS if o in set(df["outcome"])]
    df["outcome"] = pd.Categorical(df["outcome"], categories=present)
    vlines = pd.DataFrame(lines, columns=["score", "value"])
    vlines["score"] = pd.Categorical(vlines["score"], categories=order)
    kept = int(table["keep"].sum())
    film = []
    if exposure.film_brightness is not None:
        film.append(("brightness (0-255)", exposure.film_brightness))
    medians = pd.DataFrame(film, columns=["score", "value"])
    medians["score"] = pd.Categorical(medians["score"], categories=order)
    title = f"{kept} of {table.height} frames kept"
    if exposure.film_brightness is not None:
        title += (
            f"; film median brightness {exposure.film_brightness:.0f} (dotted): too dark under "
            f"{exposure.min_brightness:.1f}, too bright over {exposure.max_brightness:.1f}"
        )
    # Each panel's bars span its lines too, as its axis does.
    span: dict[str, list[float]] = {}
    for name, value in [*lines, *film]:
        span.setdefault(name, []).append(value)
    bars = stacked_bins(df, "value", by="outcome", panel="score", bins=30, include=span)
    return (
        p9.ggplot(bars)
        + bar_layers("outcome", colour="white", size=0.1)
        + p9.geom_vline(vlines, p9.aes(xintercept="value"), linetype="dashed", colour=LINE_RED, size=0.7)
        + p9.geom_vline(medians, p9.aes(xintercept="value"), linetype="dotted", colour="#333333", size=0.7)
        + p9.facet_wrap("score", scales="free", ncol=4)  # seven panels in two rows
        + p9.scale_fill_manual(values=OUTCOME_COLOURS, limits=present)
        + p9.labs(x="", y="frames", fill="outcome", title=title)
        + minimal_theme(10, 5.5)
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
    """Kept frames, then rejected ones labelled with their reason, as one mosaic.

    Rejected frames are grouped by reason in rule order, so the frames a threshold just pushed
    out sit together. Thumbnails from ``thumbs/`` are used where stage 01 saved them.
    """
    run_dir = Path(run_dir)
    rank = {r: i for i, r in enumerate(OUTCOME_COLOURS)}
    rows = (
        _with_frames(table, frames)
        .with_columns(
            pl.col("reject_reason").fill_null("kept").replace_strict(rank, default=99).alias("_rank")
        )
        .sort("_rank", "frame_index")
    )
    thumb_h = _thumb_height(run_dir, rows, thumb_width)
    blocks = []
    for title, group in (("kept", rows.filter(pl.col("keep"))), ("rejected", rows.filter(~pl.col("keep")))):
        tiles = [
            _frame_tile(run_dir, row, row["reject_reason"] or "")
            for row in group.head(max_per_group).iter_rows(named=True)
        ]
        colour = OUTCOME_COLOURS["kept"] if title == "kept" else LINE_RED
        blocks.append(Block(tiles, title=f"{title} ({_shown(group, max_per_group)})", title_colour=colour))
    layout = Layout((thumb_width, thumb_h), columns, label_h=15, label_above=True, title_h=24)
    return tile_sheet(blocks, layout)


def _with_frames(table: pl.DataFrame, frames: pl.DataFrame) -> pl.DataFrame:
    """``table`` with each frame's index, shot and file (what a tile shows)."""
    return table.join(frames.select("frame_id", "frame_index", "shot_id", "path"), on="frame_id", how="left")


def _thumb_height(run_dir: Path, rows: pl.DataFrame, thumb_width: int) -> int:
    """The tile height that keeps the first row's frame's aspect at ``thumb_width``."""
    first = rows.head(1).to_dicts()
    return aspect_height(
        frame_image_path(run_dir, first[0]["frame_id"], first[0]["path"]) if first else None, thumb_width
    )


def _frame_tile(run_dir: Path, row: dict, reason: str) -> Tile:
    """A frame's tile, labelled with its index, shot and ``reason`` in the reason's colour."""
    return Tile(
        frame_image_path(run_dir, row["frame_id"], row["path"]) if row["path"] else None,
        label=f"#{row['frame_index']} shot {row['shot_id']} {reason}",
        label_colour=OUTCOME_COLOURS.get(reason or "kept", "#444444"),
        missing="unreadable",
    )


def _shown(group: pl.DataFrame, limit: int) -> str:
    """How many of a group's frames a sheet shows: ``12`` or ``first 12 of 30``."""
    return f"first {limit} of {group.height}" if group.height > limit else str(group.height)


def text_sheet(
    run_dir: str | Path,
    table: pl.DataFrame,
    frames: pl.DataFrame,
    *,
    max_per_group: int = 12,
    columns: int = 6,
    thumb_width: int = 160,
) -> Image.Image:
    """The frames dropped for ``text`` and for ``subtitles``, then each frame kept with its
    subtitles cropped off twice: as extracted and as later stages will see it (its ``crop_*``
    region), so the crop can be judged by eye."""
    run_dir = Path(run_dir)
    rows = _with_frames(table, frames)
    thumb_h = _thumb_height(run_dir, rows, thumb_width)
    blocks = []
    for reason in ("text", "subtitles"):
        group = rows.filter(pl.col("reject_reason") == reason).sort("frame_index")
        tiles = [_frame_tile(run_dir, r, reason) for r in group.head(max_per_group).iter_rows(named=True)]
        title = f"dropped: {reason} ({_shown(group, max_per_group)})"
        blocks.append(Block(tiles, title=title, title_colour=OUTCOME_COLOURS[reason]))
    heights = frames.select("frame_id", "height")
    cropped = (
        rows.join(heights, on="frame_id", how="left")
        .filter(pl.col("keep") & ((pl.col("crop_top") > 0) | (pl.col("crop_bottom") < pl.col("height"))))
        .sort("frame_index")
    )
    if "box_top" in frames.columns:
        boxes = frames.select("frame_id", "box_top", "box_bottom")
        cropped = cropped.join(boxes, on="frame_id", how="left").filter(
            (pl.col("crop_top") > pl.col("box_top")) | (pl.col("crop_bottom") < pl.col("box_bottom"))
        )
    pairs = max(1, columns // 2)
    tiles = []
    for r in cropped.head(pairs * max(1, max_per_group // columns)).iter_rows(named=True):
        path = run_dir / r["path"] if r["path"] else None
        crop = (r["crop_left"], r["crop_top"], r["crop_right"], r["crop_bottom"])
        tiles.append(Tile(path, label=f"#{r['frame_index']} as extracted", missing="unreadable"))
        tiles.append(
            Tile(path, label="what later stages see", crop=crop, label_colour=OUTCOME_COLOURS["kept"])
        )
    blocks.append(
        Block(
            tiles,
            title=f"kept, subtitles cropped off ({cropped.height})",
            title_colour=OUTCOME_COLOURS["kept"],
        )
    )
    layout = Layout((thumb_width, thumb_h), columns, label_h=15, label_above=True, title_h=24, fit="contain")
    return tile_sheet(blocks, layout)
