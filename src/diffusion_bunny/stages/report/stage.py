"""Stage 09 ``report``: a QA report of one run (and a combined one across the movies of a batch).

People judge a dataset by looking at it, so every stage's outcome becomes a figure: the funnel of
frames in and out of each stage with the reasons, the quality scores with their thresholds, shot
lengths, who is on screen when, cluster sizes, caption lengths, training loss, identity per
checkpoint, and a contact sheet per character. A section whose stage did not run says so instead
of failing, so the report works after any subset of the stages.

How the HTML comes out, headless and in JupyterLab alike: the stage itself (called by notebook 09
through :func:`~diffusion_bunny.stages.run_stage`) writes every figure as PNG, then assembles a
small notebook document from the same sections (a markdown cell per heading and text, a cell whose
outputs are the embedded PNGs and tables) and converts it with nbconvert's ``HTMLExporter``,
code hidden (:func:`render_report_html`). A notebook cannot convert itself while it runs (its
outputs reach the file only after the last cell), and converting notebook 09's executed copy
would work only under papermill; building the document from the sections gives the same
``<run>/report/index.html`` whether ``bunny run`` or a person in JupyterLab ran the stage, needs no
second kernel, and can be tested without one. Notebook 09 shows the same PNGs, section by
section (:func:`display_section`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl
from IPython.display import Image as IPImage
from IPython.display import Markdown, display

from diffusion_bunny.media.probe import shown
from diffusion_bunny.pipeline.atomic import atomic_write_bytes, atomic_write_parquet
from diffusion_bunny.pipeline.contract import Context, Pipeline, StageOutput
from diffusion_bunny.pipeline.run import Run
from diffusion_bunny.pipeline.status import run_status
from diffusion_bunny.stages.report.combined import distinct_names, movies_plot, relative_link
from diffusion_bunny.stages.report.document import figure_png, render_report_html, report_document, table_html
from diffusion_bunny.stages.report.funnel import funnel_summary, funnel_table
from diffusion_bunny.stages.report.sections import (
    SECTIONS,
    Figure,
    ReportData,
    Section,
    build_sections,
    run_funnel,
)

if TYPE_CHECKING:
    from diffusion_bunny.pipeline.settings import RunConfig

#: The table each optional section needs (its absence means the stage did not run).

log = logging.getLogger(__name__)


def report_dir(run_dir: str | Path) -> Path:
    """``<run>/report``: ``index.html`` and ``figures/*.png``."""
    return Path(run_dir) / "report"


def save_sections(run_dir: str | Path, sections: list[Section], dpi: int = 100) -> pl.DataFrame:
    """Write every figure as ``<run>/report/figures/<name>.png`` (atomically; PNGs of figures
    no longer in the report are removed) and return the ``report_figures`` table: one row per
    figure, and one per section without figures (``figure`` null) with its message."""
    run_dir = Path(run_dir)
    folder = report_dir(run_dir) / "figures"
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    written = set()
    for order, section in enumerate(sections):
        base = {"order": order, "section": section.key, "title": section.title, "status": section.status}
        if not section.figures:
            rows.append(
                {**base, "figure": None, "figure_title": None, "path": None, "message": section.message}
            )
        for fig in section.figures:
            path = folder / f"{fig.name}.png"
            atomic_write_bytes(path, figure_png(fig.image, dpi))
            written.add(path.name)
            rows.append(
                {
                    **base,
                    "figure": fig.name,
                    "figure_title": fig.title,
                    "path": str(path.relative_to(run_dir)),
                    "message": section.message,
                }
            )
    for old in folder.glob("*.png"):
        if old.name not in written:
            old.unlink()
    return pl.DataFrame(
        rows,
        schema={
            "order": pl.Int64,
            "section": pl.Utf8,
            "title": pl.Utf8,
            "status": pl.Utf8,
            "figure": pl.Utf8,
            "figure_title": pl.Utf8,
            "path": pl.Utf8,
            "message": pl.Utf8,
        },
    )


def write_report_figures(run_dir: str | Path, cfg: RunConfig) -> dict[str, Path]:
    """Build every section of the run's report and write its figures as PNG; returns
    ``{figure name: PNG path}`` (sections whose stage did not run have none)."""
    run = Run.open(run_dir)
    tables = {p.stem: run.read_table(p.stem) for p in sorted(run.tables_dir.glob("*.parquet"))}
    table = save_sections(run.run_dir, build_sections(report_data(run, tables), cfg), cfg.report.dpi)
    return {
        row["figure"]: run.run_dir / row["path"]
        for row in table.iter_rows(named=True)
        if row["figure"] is not None
    }


def report_data(run: Run, tables: dict[str, pl.DataFrame | None]) -> ReportData:
    """The sections' view of a run: its tables and the other stages' manifests."""
    manifests = {p.stem: run.read_manifest(p.stem) for p in sorted(run.manifests_dir.glob("*.json"))}
    return ReportData(run.run_dir, tables, manifests)


def compute(ctx: Context) -> StageOutput:
    """What stage 09 does: every section's figures as PNG, the funnel table, and
    ``<run>/report/index.html``."""
    run, cfg = ctx.run, ctx.cfg
    data = report_data(run, ctx.tables)
    sections = build_sections(data, cfg)
    figures = save_sections(run.run_dir, sections, cfg.report.dpi)
    decoded = ((data.read_manifest("extract") or {}).get("counts") or {}).get("decoded_frames")
    funnel = run_funnel(data, decoded) if data.has_table("frames") else funnel_table()
    meta = run.meta() or {}
    movie = Path(meta.get("movie", run.run_dir.name)).name
    doc = report_document(
        run.run_dir,
        figures,
        title=f"QA report: {movie}",
        intro=_intro(run.run_dir, ctx.behind),
        tables={"funnel": table_html(funnel_summary(funnel))} if funnel.height else None,
    )
    html = render_report_html(doc, report_dir(run.run_dir) / "index.html")
    absent = [SECTIONS[k][1] for k in figures.filter(pl.col("status") == "absent")["section"].to_list()]
    counts = {
        "figures": int(figures["figure"].is_not_null().sum()),
        "sections": figures["section"].n_unique(),
        "stages_not_run": sorted(set(absent)),
    }
    return StageOutput(
        tables={"report_figures": figures, "report_funnel": funnel},
        counts=counts,
        # Relative to the run folder: a moved or copied folder's summary names its own page.
        facts={"html": str(Path(html).relative_to(run.run_dir))},
    )


def _intro(run_dir: Path, behind: tuple[str, ...]) -> str:
    """The page's first words: the run folder, and in bold the stages whose figures are behind
    the others (:attr:`~diffusion_bunny.pipeline.contract.Context.behind`): the funnel and the
    sections show their last run's tables beside newer ones."""
    # The folder's name, not its path: the page goes with the folder when it is moved or copied,
    # and a path written into it named the old place, with the report judged up to date.
    text = f"Run folder `{run_dir.name}`. Figures are also in `report/figures/` as PNG."
    for line in behind:
        text += f"\n\n**{line[0].upper()}{line[1:]}.**"
    return text


def display_section(run_dir: str | Path, figures: pl.DataFrame, key: str) -> None:
    """Show one section in a notebook: its message, then its PNGs (as the HTML report has them)."""
    rows = figures.filter(pl.col("section") == key).sort("order")
    if not rows.height:
        display(Markdown(f"*section {key} is not in this report*"))
        return
    display(Markdown(rows["message"][0] if rows["status"][0] == "ok" else f"**{rows['message'][0]}**"))
    for path in rows["path"].drop_nulls().to_list():
        display(IPImage(filename=str(Path(run_dir) / path)))


# ------------------------------------------------------------------------------ across movies


def _movie_counts(
    row: dict[str, Any],
    run_dir: Path,
    cfg: RunConfig,
    pipeline: Pipeline,
    stages: list[str],
    start: Path | None,
) -> list[tuple[str, str, str]]:
    """Fill ``row``'s counts and report link from the run folder; the stages' states."""
    run = Run.open(run_dir)
    if run.has_table("frames"):
        row["frames"] = pl.read_parquet(run.table_path("frames"), columns=["frame_id"], glob=False).height
    if run.has_table("quality"):
        row["kept"] = int(
            pl.read_parquet(run.table_path("quality"), columns=["keep"], glob=False)["keep"].sum()
        )
    if run.has_table("shots"):
        row["shots"] = pl.read_parquet(run.table_path("shots"), columns=["shot_id"], glob=False).height
    if run.has_table("faces"):
        names = pl.read_parquet(run.table_path("faces"), columns=["character"], glob=False)["character"]
        row["appearances"] = names.len()
        row["named_characters"] = names.drop_nulls().n_unique()
    html = report_dir(run.run_dir) / "index.html"
    if html.is_file():
        row["report_html"] = relative_link(html, start) if start else str(html)
    return run_status(pipeline, run_dir, cfg, stages)


def movies_table(
    reports: list[Any], cfg: RunConfig, pipeline: Pipeline, start: Path | None = None
) -> pl.DataFrame:
    """One row per movie of a batch (``runner.MovieReport``\\ s): its run folder, error, counts
    (frames extracted and kept, shots, appearances of characters, characters named),
    ``report_html`` (its report, relative to ``start`` when given) and one state column per stage
    (done/stale/missing, or unreadable for a run folder that cannot be read: the batch's report
    is written anyway).

    The counts are ``appearances`` and ``named_characters``, not ``faces`` and ``characters``:
    stage 03 is named ``characters``, and its state column took the count's place (the figure
    drew "done" and "stale" as bars)."""
    stages = pipeline.names()
    rows = []
    # a name that is not UTF-8 is escaped, not a crash; two E01.mkv of two seasons keep their folder
    names = distinct_names([Path(shown(rep.movie)) for rep in reports])
    for rep, name in zip(reports, names, strict=True):
        run_dir = Path(rep.run_dir) if rep.run_dir is not None else None
        # Only a run folder is named (as bunny status lists them): a movie refused before its
        # folder was made (an empty file, a file in its folder's way) named one never made.
        is_run = run_dir is not None and (run_dir / "run.json").is_file()
        row: dict[str, Any] = {
            "movie": name,
            "run_dir": str(run_dir) if is_run else None,
            "error": rep.error,
            "frames": None,
            "kept": None,
            "shots": None,
            "appearances": None,
            "named_characters": None,
            "report_html": None,
        }
        try:
            states = _movie_counts(row, run_dir, cfg, pipeline, stages, start) if is_run else None
        except Exception:  # a broken run folder (a corrupt table) must not cost the batch its report
            log.warning("%s: run folder unreadable for the combined report", run_dir, exc_info=True)
            states = [(s, "unreadable", "") for s in stages]
        if states is None:
            states = [(s, "missing", "never ran") for s in stages]
        row.update({stage: state for stage, state, _ in states})
        rows.append(row)
    schema = {
        "movie": pl.Utf8,
        "run_dir": pl.Utf8,
        "error": pl.Utf8,
        "frames": pl.Int64,
        "kept": pl.Int64,
        "shots": pl.Int64,
        "appearances": pl.Int64,
        "named_characters": pl.Int64,
        "report_html": pl.Utf8,
        **dict.fromkeys(stages, pl.Utf8),
    }
    return pl.DataFrame(rows, schema=schema)


def batch_report(out_dir: str | Path, reports: list[Any], cfg: RunConfig, pipeline: Pipeline) -> Path:
    """The report across the movies of a batch: ``<out>/report/movies.parquet`` (see
    :func:`movies_table`), ``<out>/report/figures/movies.png`` and ``<out>/report/index.html``
    (a table with each movie's counts, stage states and a link to its own report)."""
    folder = report_dir(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    movies = movies_table(reports, cfg, pipeline, start=folder)
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
