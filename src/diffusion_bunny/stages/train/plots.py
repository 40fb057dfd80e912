"""Figures of stage 07: the loss curve and the validation images of each checkpoint.

Kept apart from ``plots.py`` (the figures of stages 01-04) so the training code and its notebook
change together. Like ``plots.py``, every function returns the figure without showing it.
"""

from __future__ import annotations

from pathlib import Path

import plotnine as p9
import polars as pl
from PIL import Image

from diffusion_bunny.media.figures import Block, Layout, Tile, minimal_theme, tile_sheet

#: Steps of the running mean drawn over the noisy per-step loss.
SMOOTHING = 5


def loss_curve_plot(log: pl.DataFrame, smoothing: int = SMOOTHING) -> p9.ggplot:
    """Loss per optimizer step (points) with its running mean (line); the prior-preservation loss
    too when the run had one. The denoising loss of one step depends on the random timesteps
    drawn, so the trend is in the running mean, not the points."""
    series = [("loss", "training loss")]
    if "prior_loss" in log.columns and log["prior_loss"].drop_nulls().len():
        series.append(("prior_loss", "prior (class images) loss"))
    frames = []
    for column, label in series:
        part = log.select("step", pl.col(column).alias("value")).drop_nulls()
        part = part.with_columns(
            pl.col("value")
            .rolling_mean(window_size=min(smoothing, max(1, part.height)), min_samples=1)
            .alias("mean"),
            pl.lit(label).alias("series"),
        )
        frames.append(part)
    data = pl.concat(frames).to_pandas()
    colours = {"training loss": "#4C78A8", "prior (class images) loss": "#F58518"}
    return (
        p9.ggplot(data, p9.aes("step", "value", colour="series"))
        + p9.geom_point(alpha=0.35, size=1.2)
        + p9.geom_line(p9.aes(y="mean"), size=1.0)
        + p9.scale_colour_manual(values=colours)
        + p9.labs(
            x="optimizer step",
            y="loss (MSE on the noise)",
            colour="",
            title=f"loss, running mean of {smoothing} steps",
        )
        + minimal_theme(8, 3.4, legend_position="bottom")
    )


def validation_grid(validation: pl.DataFrame, run_dir: Path | str = "", thumb: int = 160) -> Image.Image:
    """The validation images as one picture: a row per step (0 = the base model before
    training), a column per prompt, labelled; a missing file is drawn as a grey box. Their
    ``path`` is relative to ``run_dir`` (absolute in a table of an earlier version)."""
    steps = sorted(validation["step"].unique().to_list())
    prompts = validation.sort("index").unique("index", keep="first", maintain_order=True)
    columns = prompts["index"].to_list()
    blocks = []
    for step in steps:
        by_index = {
            r["index"]: Path(run_dir) / r["path"]
            for r in validation.filter(pl.col("step") == step).iter_rows(named=True)
        }
        tiles = [Tile(by_index.get(index)) for index in columns]
        blocks.append(Block(tiles, side=("base" if step == 0 else f"step {step}",)))
    layout = Layout(
        (thumb, thumb),
        max(1, len(columns)),
        gap=0,
        label_h=0,
        side_width=90,
        lead_gap=False,
        column_title_h=36,
        resample=Image.Resampling.BICUBIC,
    )
    return tile_sheet(blocks, layout, column_titles=prompts["prompt"].to_list())
