"""The report page: a small notebook document built from the sections (markdown per heading, the
PNGs and tables as outputs) converted with nbconvert's ``HTMLExporter``, code hidden."""

from __future__ import annotations

import base64
import logging
import math
import re
from html import escape
from pathlib import Path
from typing import Any

import polars as pl

from diffusion_bunny.media.figures import chart_png, png_bytes
from diffusion_bunny.pipeline.atomic import atomic_write_bytes
from diffusion_bunny.stages.report.sections import SECTIONS

# ------------------------------------------------------------------------------------- writing


def figure_png(image: Any, dpi: int = 100) -> bytes:
    """PNG bytes of a plotnine chart (drawn, saved and closed, so a notebook does not show it a
    second time) or of a Pillow image."""
    if hasattr(image, "draw"):
        return chart_png(image, dpi, bbox_inches="tight", facecolor="white")
    return png_bytes(image)


# ----------------------------------------------------------------------------------------- HTML


def _png_output(png: bytes) -> Any:
    import nbformat  # lazy: nbformat takes 0.86 s to import

    return nbformat.v4.new_output(
        "display_data", data={"image/png": base64.b64encode(png).decode("ascii"), "text/plain": "<figure>"}
    )


def _html_output(html: str) -> Any:
    import nbformat  # lazy: nbformat takes 0.86 s to import

    return nbformat.v4.new_output("display_data", data={"text/html": html, "text/plain": "<table>"})


def table_html(df: pl.DataFrame, links: tuple[str, ...] = ()) -> str:
    """A plain HTML table (escaped), for the report's tables; values of the ``links`` columns are
    relative paths shown as links."""
    head = "".join(f"<th>{escape(str(c))}</th>" for c in df.columns)
    body = "".join(
        "<tr>"
        + "".join(
            f'<td><a href="{escape(v)}">open</a></td>' if c in links and v else f"<td>{_cell(v)}</td>"
            for c, v in zip(df.columns, row, strict=True)
        )
        + "</tr>"
        for row in df.iter_rows()
    )
    return f'<table class="bunny-table"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.3g}"
    return escape(str(value))


_MARKDOWN = re.compile(r"([\\`*_\[\]#|~])")


def plain_markdown(text: str) -> str:
    """``text`` (a movie's file name, a character's name, a message quoting them) shown as it is
    in a markdown cell: ``__main__.mkv`` was set in bold, ``_grace_`` in italics, and a character
    ``R2-D2 <droid>`` lost its ``<droid>`` as an HTML tag."""
    return _MARKDOWN.sub(r"\\\1", escape(text, quote=False))


def report_document(
    run_dir: str | Path,
    figures: pl.DataFrame,
    *,
    title: str,
    intro: str = "",
    tables: dict[str, str] | None = None,
) -> Any:
    """A notebook document of the report: a markdown cell per section (heading, what it shows,
    its message), then a code cell with no source whose outputs are the section's PNGs (read
    from disk) and, for sections named in ``tables``, that HTML table (:func:`table_html`).
    nbconvert turns it into HTML with the (empty) code hidden."""
    import nbformat  # lazy: nbformat takes 0.86 s to import

    run_dir = Path(run_dir)
    nb = nbformat.v4.new_notebook()
    nb.metadata["title"] = title
    nb.cells.append(nbformat.v4.new_markdown_cell(f"# {plain_markdown(title)}\n\n{intro}".strip()))
    tables = tables or {}
    for key in figures.sort("order")["section"].unique(maintain_order=True).to_list():
        rows = figures.filter(pl.col("section") == key).sort("order")
        first = rows.row(0, named=True)
        about = SECTIONS[key][2] if key in SECTIONS else ""
        status = "" if first["status"] == "ok" else "**"
        text = f"## {first['title']}\n\n{about}\n\n{status}{plain_markdown(first['message'])}{status}"
        nb.cells.append(nbformat.v4.new_markdown_cell(text))
        outputs = []
        if key in tables:
            outputs.append(_html_output(tables[key]))
        for row in rows.filter(pl.col("figure").is_not_null()).iter_rows(named=True):
            outputs.append(_png_output((run_dir / row["path"]).read_bytes()))
            nb.metadata.setdefault("figure_titles", []).append(row["figure_title"] or row["figure"])
        if outputs:
            cell = nbformat.v4.new_code_cell("")
            cell.outputs = outputs
            nb.cells.append(cell)
    return nb


_NBCONVERT_ALT = 'alt="No description has been provided for this image"'

# The lab template's page loads require.js and MathJax from cdnjs, imports mermaid from there for
# a diagram and the widget manager for widgets: opening the report contacted a third party, and
# offline each script was a console error. The report is one page to open anywhere (its figures
# are embedded PNGs, its tables plain HTML, nothing needs those scripts), so their blocks are
# emptied and the page loads nothing from the network.
_OFFLINE_PAGE = """{%- extends 'index.html.j2' -%}
{%- block html_head_js -%}{%- endblock html_head_js -%}
{%- block jupyter_widgets -%}{%- endblock jupyter_widgets -%}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
"""


def render_report_html(notebook: Any, out_html: str | Path) -> Path:
    """Convert a notebook (an executed one, or :func:`report_document`'s) to one self-contained
    HTML file with nbconvert, code and prompts hidden, pictures embedded, no script or style
    fetched from the network (:data:`_OFFLINE_PAGE`); written atomically."""
    import nbformat  # lazy: nbformat takes 0.86 s to import
    from nbconvert import HTMLExporter  # lazy: nbconvert takes 1.1 s to import

    if isinstance(notebook, str | Path):
        notebook = nbformat.read(str(notebook), as_version=4)
    exporter = HTMLExporter(template_name="lab", raw_template=_OFFLINE_PAGE)
    exporter.exclude_input = True
    exporter.exclude_input_prompt = True
    exporter.exclude_output_prompt = True
    # nbconvert fills a placeholder alternative text into every image and logs a warning about
    # it; the report's figures get their titles instead (kept in the document's metadata).
    quiet = logging.getLogger("diffusion_bunny.stages.report.stage.nbconvert")
    quiet.setLevel(logging.ERROR)
    exporter.log = quiet
    body, _ = exporter.from_notebook_node(notebook)
    for alt in notebook.metadata.get("figure_titles", []):
        body = body.replace(_NBCONVERT_ALT, f'alt="{escape(alt, quote=True)}"', 1)
    out_html = Path(out_html)
    atomic_write_bytes(out_html, body.encode("utf-8"))
    return out_html
