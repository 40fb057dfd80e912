"""The report's own figures (the other sections reuse each stage's plots): the shot-length
histogram and the identity of generated pictures per checkpoint (a person's face distance, a drawn
character's fitted-detector score)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

import polars as pl

from diffusion_bunny.media.figures import LINE_RED, categorical, minimal_theme
from diffusion_bunny.stages.generate.tables import BASE

if TYPE_CHECKING:
    import plotnine as p9


# ------------------------------------------------------------------------------- other figures


def shot_length_histogram(shots: pl.DataFrame) -> p9.ggplot:
    """Distribution of shot lengths, static and dynamic shots stacked, the median as a line."""

    from diffusion_bunny.stages.extract.plots import kind_histogram  # lazy: pulls in plotnine (0.44 s)

    df = shots.with_columns((pl.col("end_s") - pl.col("start_s")).alias("length_s"))
    median = float(df["length_s"].median() or 0.0)
    return kind_histogram(
        df.to_pandas(),
        "length_s",
        bins=max(5, min(30, df.height)),
        line=median,
        line_size=0.5,
        labels={"x": "shot length (s)", "title": f"{df.height} shots, median {median:.1f} s (dashed)"},
    )


def checkpoint_order(names: list[str]) -> list[str]:
    """Checkpoints by training step (``checkpoint-200`` before ``checkpoint-1000``), the base
    model without LoRA (``base``) first; other names without a number (the final weights) last."""

    def key(name: str) -> tuple[int, int, str]:
        if name == BASE:
            return (-1, 0, name)
        numbers = re.findall(r"\d+", Path(name).name)
        return (0, int(numbers[-1]), name) if numbers else (1, 0, name)

    return sorted(set(names), key=key)


def identity_table(generations: pl.DataFrame) -> pl.DataFrame:
    """Per checkpoint and character: pictures, faces found, mean identity distance (faces found
    only; lower is closer to the references)."""
    return (
        generations.group_by("checkpoint", "character")
        .agg(
            pl.len().alias("pictures"),
            pl.col("face_found").sum().cast(pl.Int64).alias("faces_found"),
            pl.col("identity_distance").drop_nulls().mean().alias("identity_distance"),
        )
        .sort("checkpoint", "character")
    )


def identity_plot(generations: pl.DataFrame, tolerance: float = 0.6) -> p9.ggplot:
    """Mean identity distance per checkpoint (in training order), one line per character."""
    table = identity_table(generations).filter(pl.col("identity_distance").is_not_null())
    found = int(identity_table(generations)["faces_found"].sum())
    return _per_checkpoint(
        table,
        "identity_distance",
        tolerance,
        "identity distance (lower is closer)",
        f"{generations.height} generated pictures, a face found in {found}",
    )


def _per_checkpoint(table: pl.DataFrame, column: str, line: float, label: str, title: str) -> p9.ggplot:
    """``column`` per checkpoint (in training order), one line per character, a dashed line at
    ``line``: the identity plot and the drawn characters' plot."""
    import plotnine as p9  # lazy: plotnine takes 0.44 s to import

    df = table.to_pandas()
    df["checkpoint"] = categorical(df["checkpoint"], checkpoint_order(table["checkpoint"].to_list()))
    return (
        p9.ggplot(df, p9.aes("checkpoint", column, colour="character", group="character"))
        + p9.geom_line()
        + p9.geom_point(size=2.5)
        + p9.geom_hline(yintercept=line, linetype="dashed", colour=LINE_RED)
        + p9.labs(x="checkpoint", y=label, colour="", title=title)
        + minimal_theme(8, 3.2)
    )


def drawn_table(generations: pl.DataFrame) -> pl.DataFrame:
    """Per checkpoint and drawn character: pictures scored, those showing the character and the
    mean fitted-detector score (higher is closer)."""
    return (
        generations.filter(pl.col("drawn_score").is_not_null())
        .group_by("checkpoint", "character")
        .agg(
            pl.len().alias("pictures"),
            pl.col("drawn_found").sum().cast(pl.Int64).alias("found"),
            pl.col("drawn_score").mean().alias("drawn_score"),
        )
        .sort("checkpoint", "character")
    )


def drawn_plot(generations: pl.DataFrame, min_score: float = 0.5) -> p9.ggplot:
    """Mean fitted-detector score per checkpoint (in training order), one line per drawn
    character; the dashed line is the score stage 03 names a sighting at."""
    table = drawn_table(generations)
    return _per_checkpoint(
        table,
        "drawn_score",
        min_score,
        "detector's score (higher is closer)",
        f"{int(table['pictures'].sum())} pictures of drawn characters, the character found in "
        f"{int(table['found'].sum())}",
    )
