"""The report across the movies of a batch, pure parts: the per-movie figure and relative links
(:func:`~diffusion_bunny.stages.report.stage.batch_report` gathers the rows and writes)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import polars as pl

from diffusion_bunny.media.figures import categorical, minimal_theme, text_font, whole_counts

if TYPE_CHECKING:
    import plotnine as p9


def relative_link(target: Path, start: Path) -> str:
    """A link from a file in ``start`` to ``target`` that survives moving the whole folder."""
    return Path(os.path.relpath(target, start)).as_posix()


def distinct_names(paths: list[Path]) -> list[str]:
    """How each movie of a batch is named in its report: its file name, with as many of its
    folders before it as tell it from another of the same name (``season1/E01.mkv``,
    ``season2/E01.mkv``); the same file given twice is numbered. A row per movie must have a
    name of its own: the figure's axis takes them as categories, which must differ."""
    parts = [Path(p).parts or (str(p),) for p in paths]
    depth = [1] * len(paths)
    while True:
        names = ["/".join(ps[-d:]) for ps, d in zip(parts, depth, strict=True)]
        # grown while another path shows the same name (the same path given twice never differs)
        grow = [
            i
            for i, n in enumerate(names)
            if depth[i] < len(parts[i]) and any(m == n and parts[j] != parts[i] for j, m in enumerate(names))
        ]
        if not grow:
            break
        for i in grow:
            depth[i] += 1
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if names.count(name) == 1 else f"{name} ({seen[name]})")
    return out


# ------------------------------------------------------------------------------ across movies


def movie_labels(movies: pl.DataFrame) -> tuple[list[str], str]:
    """Each movie's label on a chart and the font family that draws them: its name, where an
    installed font draws it (``text_font``), else its run folder's name (ASCII and unique). A
    name in CJK script or with an emoji was a row of empty boxes, and each missing glyph printed a
    warning on the terminal. The labels differ as the names do (the axis takes them as
    categories)."""
    names = movies["movie"].to_list()
    family, drawn = text_font(names)
    folders = movies["run_dir"].to_list() if "run_dir" in movies.columns else [None] * len(names)
    labels: list[str] = []
    for name, whole, folder in zip(names, drawn, folders, strict=True):
        if not whole:  # ASCII: the run folder's name, else the name's ASCII characters
            name = Path(folder).name if folder else "".join(c if " " <= c <= "~" else "?" for c in name)
        label, n = name, 1
        while label in labels:  # a run folder shown twice, or two names of '?'s
            n += 1
            label = f"{name} ({n})"
        labels.append(label)
    return labels, family


def movies_plot(movies: pl.DataFrame) -> p9.ggplot:
    """Frames, kept frames, shots and named characters per movie, one panel each."""
    import plotnine as p9  # lazy: plotnine takes 0.44 s to import

    labels, family = movie_labels(movies)
    movies = movies.with_columns(movie=pl.Series(labels, dtype=pl.Utf8))
    measures = {"frames": "frames", "kept": "kept", "shots": "shots", "named_characters": "characters named"}
    long = movies.select("movie", *measures).unpivot(index="movie", variable_name="measure", value_name="n")
    df = long.drop_nulls("n").with_columns(pl.col("measure").replace_strict(measures)).to_pandas()
    df["measure"] = categorical(df["measure"], list(measures.values()))
    df["movie"] = categorical(df["movie"], labels[::-1])
    # the names' font on the movies' axis only (coord_flip puts them on y)
    fonts = {"axis_text_y": p9.element_text(family=family)}
    return (
        p9.ggplot(df, p9.aes("movie", "n"))
        + p9.geom_col(fill="#4C78A8")
        # counts: whole numbers on the axis (a film of 2 characters read 0.5, 1.5)
        + p9.scale_y_continuous(breaks=whole_counts)
        + p9.coord_flip()
        + p9.facet_wrap("measure", scales="free_x", ncol=4)
        + p9.labs(x="", y="", title=f"{movies.height} movies")
        + minimal_theme(10, max(2.2, 0.4 * movies.height + 1.4), **fonts)
    )
