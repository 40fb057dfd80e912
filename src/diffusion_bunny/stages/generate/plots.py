"""Figures of stage 08 (``generate``): scores per checkpoint, and the image grids.

Kept apart from :mod:`diffusion_bunny.plots` so the stage's figures live next to each other; the
same habits hold: plotnine charts returned (never shown), image grids pasted with Pillow (a grid
of dozens of matplotlib axes takes seconds to lay out).
"""

from __future__ import annotations

from pathlib import Path

import polars as pl
from PIL import Image, ImageDraw
from plotnine import (
    aes,
    facet_wrap,
    geom_line,
    geom_point,
    ggplot,
    labs,
    scale_colour_manual,
    theme,
    theme_bw,
)

from diffusion_bunny.media.figures import categorical, load_font
from diffusion_bunny.stages.generate.tables import BASE

_METRICS = {
    "identity_distance": "identity distance to the references (lower is better)",
    "face_share": "share of images with a face",
    "clip_score": "CLIP score (image vs prompt, 0-100)",
}


def checkpoint_scores_plot(scores: pl.DataFrame) -> ggplot:
    """One panel per score (identity distance, share of images with a face, CLIP score when
    computed) over the checkpoints in training order, ``base`` (the model without LoRA) first; the
    best checkpoint is marked. Panels whose score is null everywhere (no face found, no CLIP model)
    are left out, except the face share, which always says how much the identity score rests on."""
    order = scores.sort("order")["checkpoint"].to_list()
    rows = []
    for metric in _METRICS:
        values = scores.select("checkpoint", "best", pl.col(metric).alias("value"))
        if metric != "face_share" and values["value"].null_count() == values.height:
            continue
        rows.append(values.drop_nulls("value").with_columns(pl.lit(_METRICS[metric]).alias("metric")))
    data = pl.concat(rows).with_columns(
        pl.when(pl.col("best"))
        .then(pl.lit("best"))
        .when(pl.col("checkpoint") == BASE)
        .then(pl.lit("base model"))
        .otherwise(pl.lit("checkpoint"))
        .alias("kind")
    )
    frame = data.to_pandas()
    frame["checkpoint"] = categorical(frame["checkpoint"], order)
    frame["metric"] = categorical(
        frame["metric"], [m for m in _METRICS.values() if m in set(frame["metric"])]
    )
    lora = frame[frame["checkpoint"] != BASE]
    return (
        ggplot(frame, aes("checkpoint", "value"))
        + geom_line(aes(group="metric"), data=lora, colour="#888888")
        + geom_point(aes(colour="kind"), size=3)
        + scale_colour_manual(values={"best": "#D62728", "checkpoint": "#1F77B4", "base model": "#555555"})
        + facet_wrap("metric", ncol=1, scales="free_y")
        + labs(x="checkpoint (training order)", y="", colour="", title="Scores per checkpoint")
        + theme_bw()
        + theme(figure_size=(7, 2.2 * len(rows) + 0.6))
    )


def generation_grid(
    run_dir: str | Path,
    generations: pl.DataFrame,
    character: str,
    checkpoint: str,
    *,
    cell: int = 160,
) -> Image.Image:
    """The grid of one character and checkpoint: one row per prompt and seed, one column per LoRA
    scale (scale 0 from the base model), each picture labelled with its identity distance (or
    "no face"); the prompts are listed at the top."""
    run_dir = Path(run_dir)
    rows = generations.filter(
        (pl.col("character") == character) & pl.col("checkpoint").is_in([checkpoint, BASE])
    )
    scales = sorted(rows["lora_scale"].unique().to_list())
    keys = rows.select("prompt_index", "seed").unique().sort("prompt_index", "seed").rows()
    prompts = dict(rows.select("prompt_index", "prompt").unique().iter_rows())
    by_cell = {(r["prompt_index"], r["seed"], r["lora_scale"]): r for r in rows.iter_rows(named=True)}
    font, small = load_font(13), load_font(11)
    label_w, gap, caption_h = 110, 4, 15
    header = 22 + 15 * len(prompts) + 18
    width = label_w + max(1, len(scales)) * (cell + gap)
    height = header + max(1, len(keys)) * (cell + caption_h + gap)
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((4, 4), f"{character} · {checkpoint}", fill="black", font=font)
    for i, (p, text) in enumerate(sorted(prompts.items())):
        draw.text((4, 22 + 15 * i), f"p{p}: {text}", fill="#444444", font=small)
    for c, scale in enumerate(scales):
        name = "base model" if scale == 0 else f"LoRA x{scale:g}"
        draw.text((label_w + c * (cell + gap), header - 16), name, fill="black", font=small)
    for r, (p, seed) in enumerate(keys):
        top = header + r * (cell + caption_h + gap)
        draw.text((4, top + cell // 2), f"p{p} seed {seed}", fill="black", font=small)
        for c, scale in enumerate(scales):
            left = label_w + c * (cell + gap)
            row = by_cell.get((p, seed, scale))
            try:
                if row is None:
                    raise OSError
                with Image.open(run_dir / row["path"]) as img:
                    pic = img.convert("RGB").resize((cell, cell), Image.Resampling.BILINEAR)
            except OSError:
                pic = Image.new("RGB", (cell, cell), "#DDDDDD")
            sheet.paste(pic, (left, top))
            if row is not None:
                d = row["identity_distance"]
                text = "no face" if not row["face_found"] else ("face" if d is None else f"distance {d:.2f}")
                draw.text((left, top + cell + 1), text, fill="#444444", font=small)
    return sheet
