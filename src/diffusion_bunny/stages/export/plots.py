"""Stage 06's figures: pictures per character and split, and the exported pictures per concept."""

from __future__ import annotations

from pathlib import Path

import plotnine as p9
import polars as pl
from PIL import Image

from diffusion_bunny.media.clips import clip_frames_rgb
from diffusion_bunny.media.figures import Block, Layout, Tile, horizontal_bars, largest_first, tile_sheet

# ----------------------------------------------------------------------------- stage 06

SPLIT_COLOURS = {"train": "#4C78A8", "validation": "#F58518"}
NO_CHARACTER = "(no character)"


def dataset_counts_plot(items: pl.DataFrame) -> p9.ggplot:
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
    n_val = int((items["split"] == "validation").sum())
    return horizontal_bars(
        table.to_pandas(),
        "character",
        "pictures",
        "split",
        order=order,
        by_order=["validation", "train"],
        colours=SPLIT_COLOURS,
        labels={
            "x": "",
            "y": "pictures",
            "fill": "",
            "title": f"{items.height} pictures: {n_val} for validation",
        },
    )


def dataset_sheet(
    dataset_dir: str | Path, items: pl.DataFrame, *, max_per_group: int = 8, side: int = 128
) -> Image.Image:
    """One row per kohya concept (largest first): the exported pictures as training will see
    them (crops included, each at its own aspect), labelled with its crop and size; validation
    pictures get an orange frame."""
    dataset_dir = Path(dataset_dir)
    blocks = []
    for concept in largest_first(items, "concept"):
        members = items.filter(pl.col("concept") == concept).sort("split", "frame_id", "crop")
        repeats = members.filter(pl.col("split") == "train")["repeats"]
        times = f", x{repeats[0]} per epoch" if repeats.len() else ""
        tiles = [
            Tile(
                dataset_dir / "hf" / row["split"] / row["file_name"],
                label=f"{row['crop']} {row['width']}x{row['height']} s{row['shot_id']}",
                outline="#F58518" if row["split"] == "validation" else None,
                missing="",
            )
            for row in members.head(max_per_group).iter_rows(named=True)
        ]
        blocks.append(Block(tiles, title=f"{concept}  ({members.height} pictures{times})"))
    return tile_sheet(blocks, Layout((side, side), max_per_group, fit="contain"))


def clip_strips(
    video_dir: Path, clips: pl.DataFrame, height: int = 96, limit: int = 12
) -> Image.Image | None:
    """One row per clip: its first, middle and last frames side by side, read back from the
    written mp4 (what the trainer will see), so a clip that crosses a cut or shows the wrong
    people is visible at a glance. None when there are no clips."""
    rows = []
    for clip in clips.head(limit).iter_rows(named=True):
        info = clip_frames_rgb(Path(video_dir) / f"{clip['clip_id']}.mp4")
        tiles = [Image.fromarray(info[k]) for k in ("first", "middle", "last")]
        tiles = [t.resize((max(1, round(t.width * height / t.height)), height)) for t in tiles]
        row = Image.new("RGB", (sum(t.width for t in tiles) + 4 * (len(tiles) - 1), height), "white")
        x = 0
        for t in tiles:
            row.paste(t, (x, 0))
            x += t.width + 4
        rows.append(row)
    if not rows:
        return None
    out = Image.new("RGB", (max(r.width for r in rows), sum(r.height + 4 for r in rows) - 4), "white")
    y = 0
    for r in rows:
        out.paste(r, (0, y))
        y += r.height + 4
    return out
