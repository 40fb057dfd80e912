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

from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl

from diffusion_bunny.pipeline.atomic import atomic_write_bytes
from diffusion_bunny.pipeline.run import Run
from diffusion_bunny.stages.report.document import figure_png, render_report_html, report_document, table_html
from diffusion_bunny.stages.report.funnel import funnel_summary, funnel_table
from diffusion_bunny.stages.report.sections import SECTIONS, Section, build_sections, run_funnel

if TYPE_CHECKING:
    from diffusion_bunny.config import Config

#: The table each optional section needs (its absence means the stage did not run).


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


def write_report_figures(run_dir: str | Path, cfg: Config | None = None) -> dict[str, Path]:
    """Build every section of the run's report and write its figures as PNG; returns
    ``{figure name: PNG path}`` (sections whose stage did not run have none)."""
    from diffusion_bunny.config import load_config

    cfg = cfg or load_config()
    run = Run.open(run_dir)
    table = save_sections(run.run_dir, build_sections(run, cfg), cfg.report.dpi)
    return {
        row["figure"]: run.run_dir / row["path"]
        for row in table.iter_rows(named=True)
        if row["figure"] is not None
    }


def report_stage(run: Run, cfg: Config) -> tuple[pl.DataFrame, pl.DataFrame, dict[str, Any]]:
    """What stage 09 does: every section's figures as PNG, the funnel table, and
    ``<run>/report/index.html``. Returns (``report_figures``, ``report_funnel``, counts)."""
    sections = build_sections(run, cfg)
    figures = save_sections(run.run_dir, sections, cfg.report.dpi)
    decoded = ((run.read_manifest("extract") or {}).get("counts") or {}).get("decoded_frames")
    funnel = run_funnel(run, decoded) if run.has_table("frames") else funnel_table()
    meta = run.meta() or {}
    movie = Path(meta.get("movie", run.run_dir.name)).name
    doc = report_document(
        run.run_dir,
        figures,
        title=f"QA report: {movie}",
        intro=f"Run folder `{run.run_dir}`. Figures are also in `report/figures/` as PNG.",
        tables={"funnel": table_html(funnel_summary(funnel))} if funnel.height else None,
    )
    render_report_html(doc, report_dir(run.run_dir) / "index.html")
    absent = [SECTIONS[k][1] for k in figures.filter(pl.col("status") == "absent")["section"].to_list()]
    counts = {
        "figures": int(figures["figure"].is_not_null().sum()),
        "sections": figures["section"].n_unique(),
        "stages_not_run": sorted(set(absent)),
    }
    return figures, funnel, counts


def display_section(run_dir: str | Path, figures: pl.DataFrame, key: str) -> None:
    """Show one section in a notebook: its message, then its PNGs (as the HTML report has them)."""
    from IPython.display import Image as IPImage
    from IPython.display import Markdown, display

    rows = figures.filter(pl.col("section") == key).sort("order")
    if not rows.height:
        display(Markdown(f"*section {key} is not in this report*"))
        return
    display(Markdown(rows["message"][0] if rows["status"][0] == "ok" else f"**{rows['message'][0]}**"))
    for path in rows["path"].drop_nulls().to_list():
        display(IPImage(filename=str(Path(run_dir) / path)))
