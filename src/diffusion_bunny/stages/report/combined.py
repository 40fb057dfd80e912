"""The report across the movies of a batch: one row per movie (counts, each stage's state, a link to
its own report) as ``movies.parquet``, a figure, and ``report/index.html`` beside the run folders."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl

from diffusion_bunny.pipeline.run import Run
from diffusion_bunny.stages.report.document import render_report_html, report_document, table_html
from diffusion_bunny.stages.report.sections import Figure, Section
from diffusion_bunny.stages.report.stage import report_dir, save_sections

if TYPE_CHECKING:
    from plotnine import ggplot

    from diffusion_bunny.config import Config


def relative_link(target: Path, start: Path) -> str:
    """A link from a file in ``start`` to ``target`` that survives moving the whole folder."""
    return Path(os.path.relpath(target, start)).as_posix()


# ------------------------------------------------------------------------------ across movies


def movies_table(reports: list[Any], cfg: Config, start: Path | None = None) -> pl.DataFrame:
    """One row per movie of a batch (``runner.MovieReport``\\ s): its run folder, error, counts
    (frames extracted and kept, shots, faces, named characters), ``report_html`` (its report,
    relative to ``start`` when given) and one state column per stage (done/stale/missing)."""
    from diffusion_bunny.pipeline.status import run_status
    from diffusion_bunny.stages import stage_names

    stages = stage_names()
    rows = []
    for rep in reports:
        run_dir = Path(rep.run_dir) if rep.run_dir is not None else None
        row: dict[str, Any] = {
            "movie": Path(rep.movie).name,
            "run_dir": str(run_dir) if run_dir else None,
            "error": rep.error,
            "frames": None,
            "kept": None,
            "shots": None,
            "faces": None,
            "characters": None,
            "report_html": None,
        }
        is_run = run_dir is not None and (run_dir / "run.json").is_file()
        if is_run:
            run = Run.open(run_dir)
            if run.has_table("frames"):
                row["frames"] = pl.read_parquet(run.table_path("frames"), columns=["frame_id"]).height
            if run.has_table("quality"):
                row["kept"] = int(pl.read_parquet(run.table_path("quality"), columns=["keep"])["keep"].sum())
            if run.has_table("shots"):
                row["shots"] = pl.read_parquet(run.table_path("shots"), columns=["shot_id"]).height
            if run.has_table("faces"):
                names = pl.read_parquet(run.table_path("faces"), columns=["character"])["character"]
                row["faces"] = names.len()
                row["characters"] = names.drop_nulls().n_unique()
            html = report_dir(run.run_dir) / "index.html"
            if html.is_file():
                row["report_html"] = relative_link(html, start) if start else str(html)
        states = run_status(run_dir, cfg, stages) if is_run else [(s, "missing", "never ran") for s in stages]
        row.update({stage: state for stage, state, _ in states})
        rows.append(row)
    schema = {
        "movie": pl.Utf8,
        "run_dir": pl.Utf8,
        "error": pl.Utf8,
        "frames": pl.Int64,
        "kept": pl.Int64,
        "shots": pl.Int64,
        "faces": pl.Int64,
        "characters": pl.Int64,
        "report_html": pl.Utf8,
        **dict.fromkeys(stages, pl.Utf8),
    }
    return pl.DataFrame(rows, schema=schema)


def movies_plot(movies: pl.DataFrame) -> ggplot:
    """Frames, kept frames, shots and named characters per movie, one panel each."""
    from plotnine import aes, coord_flip, facet_wrap, geom_col, ggplot, labs, theme, theme_minimal

    from diffusion_bunny.media.figures import categorical

    measures = ["frames", "kept", "shots", "characters"]
    long = movies.select("movie", *measures).unpivot(index="movie", variable_name="measure", value_name="n")
    df = long.drop_nulls("n").to_pandas()
    df["measure"] = categorical(df["measure"], measures)
    df["movie"] = categorical(df["movie"], movies["movie"].to_list()[::-1])
    return (
        ggplot(df, aes("movie", "n"))
        + geom_col(fill="#4C78A8")
        + coord_flip()
        + facet_wrap("measure", scales="free_x", ncol=4)
        + labs(x="", y="", title=f"{movies.height} movies")
        + theme_minimal()
        + theme(figure_size=(10, max(2.2, 0.4 * movies.height + 1.4)))
    )


def write_combined_report(out_dir: str | Path, reports: list[Any], cfg: Config) -> Path:
    """The report across the movies of a batch: ``<out>/report/movies.parquet`` (see
    :func:`movies_table`), ``<out>/report/figures/movies.png`` and ``<out>/report/index.html``
    (a table with each movie's counts, stage states and a link to its own report)."""
    folder = report_dir(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    movies = movies_table(reports, cfg, start=folder)
    from diffusion_bunny.pipeline.atomic import atomic_write_parquet

    atomic_write_parquet(folder / "movies.parquet", movies)
    counted = movies.filter(pl.col("frames").is_not_null())
    figures = save_sections(
        out_dir,
        [
            Section(
                "movies",
                "ok" if counted.height else "empty",
                f"{movies.height} movies, {movies['error'].is_not_null().sum()} failed",
                [Figure("movies", "Per movie", movies_plot(counted))] if counted.height else [],
            )
        ],
        cfg.report.dpi,
    )
    doc = report_document(
        out_dir,
        figures,
        title=f"QA report: {movies.height} movies",
        intro=f"Output folder `{Path(out_dir).resolve()}`. Each movie's own report is linked in the table.",
        tables={"movies": table_html(movies.drop("run_dir"), links=("report_html",))},
    )
    return render_report_html(doc, folder / "index.html")
