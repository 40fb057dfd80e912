"""Figures of stage 08 (``generate``): scores per checkpoint, and the image grids.

Kept in the stage's own folder, as every stage keeps its figures; the same habits hold: plotnine
charts returned (never shown), image grids pasted with Pillow (a grid of dozens of matplotlib axes
takes seconds to lay out).
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
    categorical,
    tile_sheet,
)
from diffusion_bunny.stages.generate.tables import BASE

_METRICS = {
    "identity_distance": "identity distance to the references (lower is better)",
    "face_share": "share of images with a face",
    "drawn_score": "drawn characters: detector's score (higher is better)",
    "drawn_share": "drawn characters: share of their images showing them",
    "clip_score": "CLIP score (image vs prompt, 0-100)",
}


def checkpoint_scores_plot(scores: pl.DataFrame) -> p9.ggplot:
    """One panel per score (identity distance, share of images with a face, the drawn characters'
    score and share found, CLIP score when computed) over the checkpoints in training order, ``base``
    (the model without LoRA) first; the best checkpoint is marked. Panels whose score is null
    everywhere (no face found, no drawn character, no CLIP model) are left out, except the face
    share, which says how much the identity score rests on (left out too when only drawn
    characters were drawn)."""
    order = scores.sort("order")["checkpoint"].to_list()
    drawn_only = "drawn_images" in scores.columns and bool((scores["drawn_images"] == scores["images"]).all())
    rows = []
    for metric in _METRICS:
        if metric not in scores.columns:  # a table from before drawn characters were scored
            continue
        values = scores.select("checkpoint", "best", pl.col(metric).alias("value"))
        always = metric == "face_share" and not drawn_only
        if not always and values["value"].null_count() == values.height:
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
        p9.ggplot(frame, p9.aes("checkpoint", "value"))
        + p9.geom_line(p9.aes(group="metric"), data=lora, colour="#888888")
        + p9.geom_point(p9.aes(colour="kind"), size=3)
        + p9.scale_colour_manual(values={"best": "#D62728", "checkpoint": "#1F77B4", "base model": "#555555"})
        + p9.facet_wrap("metric", ncol=1, scales="free_y")
        + p9.labs(x="checkpoint (training order)", y="", colour="", title="Scores per checkpoint")
        + p9.theme_bw()
        + p9.theme(figure_size=(7, 2.2 * len(rows) + 0.6))
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
    "no face"), a drawn character's with its drawn score ("found 0.81", "not found
    0.12"); the prompts are listed at the top."""
    run_dir = Path(run_dir)
    rows = generations.filter(
        (pl.col("character") == character) & pl.col("checkpoint").is_in([checkpoint, BASE])
    )
    scales = sorted(rows["lora_scale"].unique().to_list())
    keys = rows.select("prompt_index", "seed").unique().sort("prompt_index", "seed").rows()
    prompts = dict(rows.select("prompt_index", "prompt").unique().iter_rows())
    by_cell = {(r["prompt_index"], r["seed"], r["lora_scale"]): r for r in rows.iter_rows(named=True)}
    blocks = []
    for p, seed in keys:
        tiles = []
        for scale in scales:
            row = by_cell.get((p, seed, scale))
            if row is None:
                tiles.append(Tile(None, missing=""))
                continue
            d, drawn = row["identity_distance"], row.get("drawn_score")
            if drawn is not None:
                text = f"{'found' if row['drawn_found'] else 'not found'} {drawn:.2f}"
            else:
                text = "no face" if not row["face_found"] else ("face" if d is None else f"distance {d:.2f}")
            tiles.append(Tile(run_dir / row["path"], label=text, missing=""))
        blocks.append(Block(tiles, side=(f"p{p} seed {seed}",)))
    header = [f"{character} · {checkpoint}", *(f"p{p}: {text}" for p, text in sorted(prompts.items()))]
    layout = Layout(
        (cell, cell),
        max(1, len(scales)),
        label_h=15,
        side_width=110,
        lead_gap=False,
        header_h=8 + 16 * len(header),
        column_title_h=20,
    )
    names = ["base model" if scale == 0 else f"LoRA x{scale:g}" for scale in scales]
    return tile_sheet(blocks, layout, header=header, column_titles=names)
