"""Stage 06's figures: pictures per character and split, and the exported pictures per concept."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import polars as pl
from PIL import Image, ImageDraw
from plotnine import (
    aes,
    coord_flip,
    geom_col,
    ggplot,
    labs,
    scale_fill_manual,
    theme,
    theme_minimal,
)

if TYPE_CHECKING:
    pass

from diffusion_bunny.media.figures import categorical, load_font

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
    data["character"] = categorical(data["character"], order)
    data["split"] = categorical(data["split"], ["validation", "train"])
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
    font, small = load_font(14), load_font(10)
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
