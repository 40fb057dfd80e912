"""Figures of stage 07: the loss curve and the validation images of each checkpoint.

Kept apart from ``plots.py`` (the figures of stages 01-04) so the training code and its notebook
change together. Like ``plots.py``, every function returns the figure without showing it.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl
from PIL import Image, ImageDraw
from plotnine import aes, geom_line, geom_point, ggplot, labs, scale_colour_manual, theme, theme_minimal

from diffusion_bunny.media.figures import load_font

#: Steps of the running mean drawn over the noisy per-step loss.
SMOOTHING = 5


def loss_curve_plot(log: pl.DataFrame, smoothing: int = SMOOTHING) -> ggplot:
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
        ggplot(data, aes("step", "value", colour="series"))
        + geom_point(alpha=0.35, size=1.2)
        + geom_line(aes(y="mean"), size=1.0)
        + scale_colour_manual(values=colours)
        + labs(
            x="optimizer step",
            y="loss (MSE on the noise)",
            colour="",
            title=f"loss, running mean of {smoothing} steps",
        )
        + theme_minimal()
        + theme(figure_size=(8, 3.4), legend_position="bottom")
    )


def validation_grid(validation: pl.DataFrame, thumb: int = 160) -> Image.Image:
    """The validation images as one picture: a row per step (0 = the base model before
    training), a column per prompt, labelled; a missing file is drawn as a grey box."""
    font, small = load_font(13), load_font(11)
    steps = sorted(validation["step"].unique().to_list())
    prompts = validation.sort("index").unique("index", keep="first", maintain_order=True)
    columns = prompts["index"].to_list()
    label_w, head_h = 90, 36
    sheet = Image.new(
        "RGB", (label_w + thumb * max(1, len(columns)), head_h + thumb * max(1, len(steps))), "white"
    )
    draw = ImageDraw.Draw(sheet)
    for c, prompt in enumerate(prompts["prompt"].to_list()):
        draw.text((label_w + c * thumb + 4, 4), prompt[:26], fill="black", font=small)
        draw.text((label_w + c * thumb + 4, 18), prompt[26:52], fill="black", font=small)
    for r, step in enumerate(steps):
        top = head_h + r * thumb
        draw.text((6, top + thumb // 2 - 8), "base" if step == 0 else f"step {step}", fill="black", font=font)
        for row in validation.filter(pl.col("step") == step).iter_rows(named=True):
            left = label_w + columns.index(row["index"]) * thumb
            path = Path(row["path"])
            if path.is_file():
                with Image.open(path) as im:
                    sheet.paste(im.convert("RGB").resize((thumb, thumb)), (left, top))
            else:
                draw.rectangle((left + 2, top + 2, left + thumb - 3, top + thumb - 3), fill="#dddddd")
                draw.text((left + 8, top + 8), "missing", fill="black", font=small)
    return sheet
