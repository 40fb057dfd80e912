"""What every stage's figures share: fonts, ordered categories for plotnine, PNG and JPEG bytes
for widgets, the charts' look (:func:`minimal_theme`) and the charts several stages draw
(:func:`histogram` of a score with its thresholds, :func:`horizontal_bars` of counts), the order
of a sheet's groups (:func:`largest_first`), and :func:`tile_sheet`, the one contact-sheet builder.

The charts are plotnine charts returned without being drawn (a notebook shows them, the report
saves them); each stage's ``plots.py`` says what is counted and labelled, these helpers how it
looks, so the stages' figures look alike and a change of look is made once.

Every stage shows pictures in a grid: keyframes per shot (01), kept and rejected frames (02), faces
per character (03), frames per cluster (04), exported pictures per concept (06), validation
images per step (07), generated pictures per seed and scale (08). They are all pasted together
with Pillow by :func:`tile_sheet`: a hundred matplotlib axes take seconds to lay out, the mosaic a
fraction of that, and Jupyter shows a PIL image as it is. Each stage only says what goes where.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl
from PIL import Image, ImageDraw, ImageFont, ImageOps

from diffusion_bunny.media.images import eight_bit

if TYPE_CHECKING:
    import pandas as pd
    import plotnine as p9


#: The dashed line at a threshold or a median on the charts.
LINE_RED = "#C0392B"


#: The sheets' font, shipped in matplotlib's wheel (a dependency): DejaVu Sans covers Latin,
#: Greek, Cyrillic and the punctuation of names; Pillow's built-in font has no glyph past
#: ASCII, and a character named ``Zoë`` got a box for its ``ë`` on every sheet.
SHEET_FONT = "DejaVuSans.ttf"


def _sheet_font_file() -> str:
    import matplotlib  # lazy: matplotlib takes 0.15 s to import

    return str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / SHEET_FONT)


def sheet_font_file(texts: Sequence[str]) -> str:
    """The font file a sheet draws ``texts`` with: :data:`SHEET_FONT` where it draws them all,
    else the installed font that draws the most of them (:func:`text_font`). DejaVu Sans has no
    CJK: characters named 山田 and 佐藤 were two rows of the same empty boxes on notebook 03's
    strips and the report's sheets, where a font that draws them was installed."""
    default = _sheet_font_file()
    needs = frozenset(ord(c) for text in texts for c in text)
    if needs <= _ASCII or needs <= _glyphs(default):
        return default
    family, drawn = text_font(list(texts))
    return _family_file(family) if any(drawn) else default


@cache
def load_font(size: int, file: str | None = None) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """The font ``file`` (:data:`SHEET_FONT` when None) at ``size`` pixels; Pillow's built-in font
    where it cannot be loaded (a matplotlib without its fonts, a Pillow without FreeType). Cached:
    a sheet asks for two sizes, and reading the file each time cost a millisecond a sheet."""
    try:
        return ImageFont.truetype(file or _sheet_font_file(), size)
    except OSError:
        pass
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # pragma: no cover - Pillow built without FreeType
        return ImageFont.load_default()


def categorical(values: Any, categories: list[str]) -> pd.Categorical:
    """Ordered pandas categorical (plotnine orders axes by it)."""
    import pandas as pd  # lazy: pandas takes 0.29 s to import

    return pd.Categorical(values, categories=categories, ordered=True)


def png_bytes(image: Any) -> bytes:
    """A Pillow image as PNG bytes (what ``ipywidgets.Image`` shows)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def jpeg_bytes(image: Any, quality: int = 90) -> bytes:
    """A Pillow image as JPEG bytes: a sheet of frames in a widget or a notebook, a fifth of its
    PNG and encoded ten to twenty times faster. Colour is kept at full resolution (no chroma
    subsampling), so the sheets' coloured labels and boxes stay sharp."""
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality, subsampling=0)
    return buf.getvalue()


def chart_png(chart: p9.ggplot, dpi: int = 72, **savefig: Any) -> bytes:
    """A plotnine chart as PNG bytes, drawn and closed (an open matplotlib figure would be shown a
    second time by the notebook); ``savefig`` goes to matplotlib's ``savefig``."""

    import matplotlib.pyplot as plt  # lazy: matplotlib takes 0.15 s to import

    fig = chart.draw()
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=dpi, **savefig)
    finally:
        plt.close(fig)
    return buf.getvalue()


# ------------------------------------------------------------------------------------- charts


def minimal_theme(width: float, height: float, *, names: Sequence[str] = (), **settings: Any) -> p9.theme:
    """The look of every stage's charts: plotnine's minimal theme, ``width`` x ``height`` inches,
    and any other theme ``settings`` (a legend's position, rotated axis labels). The chart's
    text is drawn in a font that draws ``names`` (the characters or movies it names:
    :func:`text_font`), where plotnine's own does not (a Japanese name was a row of boxes)."""
    import plotnine as p9  # lazy: plotnine takes 0.44 s to import

    if names and not all(ord(c) < 0x7F for name in names for c in name):
        family, drawn = text_font(list(names))
        if any(drawn) and "text" not in settings:
            settings["text"] = p9.element_text(family=family)
    return p9.theme_minimal() + p9.theme(figure_size=(width, height), **settings)


#: Fonts whose every glyph is a box or a code (matplotlib ships Last Resort): a text they "draw" is
#: as unreadable as a missing glyph.
_PLACEHOLDER_FONTS = ("Last Resort",)


@cache
def _glyphs(path: str) -> frozenset[int]:
    """The code points the font file at ``path`` draws (none for a font FreeType cannot open or
    scale: a colour emoji font's bitmaps come out empty or fail)."""
    from matplotlib.ft2font import FT2Font  # lazy: matplotlib takes 0.15 s to import

    try:
        font = FT2Font(path)
    except (OSError, RuntimeError, ValueError):
        return frozenset()
    return frozenset(font.get_charmap()) if font.scalable else frozenset()


def _base_glyphs(family: str) -> frozenset[int]:
    """The code points of the font matplotlib draws ``family`` (plotnine's ``sans-serif``) with."""
    from matplotlib import font_manager  # lazy: matplotlib takes 0.15 s to import

    return _glyphs(str(font_manager.findfont(font_manager.FontProperties(family=[family]))))


def _regular_file(entries: list[Any]) -> str:
    """The file of the regular upright font of one family (of its ``font_manager`` entries), the
    one matplotlib draws it with. Read from the entries, not ``findfont``: that logs a warning for
    each family without a regular weight (DejaVu Sans Light) as it falls back."""
    from matplotlib import font_manager  # lazy: matplotlib takes 0.15 s to import

    def off_regular(entry: Any) -> tuple[bool, float]:
        weight = entry.weight
        weight = weight if isinstance(weight, int) else font_manager.weight_dict.get(weight, 400)
        return entry.style != "normal", abs(weight - 400)

    return str(min(entries, key=off_regular).fname)


def _families() -> dict[str, list[Any]]:
    """The installed fonts' ``font_manager`` entries by family, placeholders left out."""
    from matplotlib import font_manager  # lazy: matplotlib takes 0.15 s to import

    by_family: dict[str, list[Any]] = {}
    for entry in font_manager.fontManager.ttflist:
        if not entry.name.startswith(_PLACEHOLDER_FONTS):
            by_family.setdefault(entry.name, []).append(entry)
    return by_family


def _family_file(family: str) -> str:
    """The file of ``family``'s regular font (:data:`SHEET_FONT` where none is installed)."""
    entries = _families().get(family)
    return _regular_file(entries) if entries else _sheet_font_file()


#: What a font must draw to label a chart: printable ASCII (the labels' fallbacks are ASCII).
_ASCII = frozenset(range(0x20, 0x7F))


def text_font(texts: Sequence[str]) -> tuple[str, list[bool]]:
    """The font family to draw ``texts`` with, and for each text whether it draws it whole:
    plotnine's own (``base_family``) when it draws them all, else the installed font that draws
    the most of them and printable ASCII (Noto Sans CJK for Japanese names). A movie named in CJK
    script or with an emoji was a row of empty boxes on a chart, and matplotlib printed "Glyph NNN
    missing from font(s) DejaVu Sans" for each character on the terminal; a text the font does
    not draw is to be labelled another way. One family, not a list to fall back through:
    plotnine spreads a list over a chart's tick labels, one family to each, when they are as many."""
    from plotnine.options import get_option  # lazy: plotnine takes 0.44 s to import

    needs = [frozenset(ord(c) for c in text) for text in texts]
    best = str(get_option("base_family"))
    drawn = [need <= _base_glyphs(best) for need in needs]
    if all(drawn):
        return best, drawn
    by_family = _families()
    # sans fonts first: the look of the rest of the chart
    for name in sorted(by_family, key=lambda name: ("Sans" not in name, "Mono" in name, name)):
        glyphs = _glyphs(_regular_file(by_family[name]))
        those = [need <= glyphs for need in needs]
        if glyphs >= _ASCII and sum(those) > sum(drawn):
            best, drawn = name, those
            if all(drawn):
                break
    return best, drawn


def bin_edges(
    values: np.ndarray,
    *,
    bins: int | None = None,
    binwidth: float | None = None,
    include: Sequence[float] = (),
) -> np.ndarray:
    """The edges of a histogram's bars over ``values``: ``bins`` bars of one width from the
    smallest value to the largest, or bars ``binwidth`` wide centred on its multiples (words per
    caption: one bar per count). The range also covers ``include`` (the thresholds drawn on the
    chart: its axis spans them, so bars are as wide as they look beside them, as plotnine's own
    binning over the axis gave). A single value, or none, gets one bar one unit wide around it."""
    finite = np.concatenate([values, np.asarray(include, dtype=float)])
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        return np.array([-0.5, 0.5])
    low, high = float(finite.min()), float(finite.max())
    if binwidth is not None:
        if binwidth <= 0:
            raise ValueError(f"binwidth must be positive, got {binwidth}")
        first = math.floor((low + binwidth / 2) / binwidth) * binwidth - binwidth / 2
        count = max(1, math.ceil((high - first) / binwidth))
        if first + count * binwidth <= high:
            count += 1
        return first + binwidth * np.arange(count + 1)
    if high == low:
        return np.array([low - 0.5, low + 0.5])
    return np.linspace(low, high, (bins or 30) + 1)


def stacked_bins(
    data: pd.DataFrame,
    x: str,
    *,
    by: str | None = None,
    panel: str | None = None,
    bins: int | None = None,
    binwidth: float | None = None,
    include: Sequence[float] | Mapping[Any, Sequence[float]] = (),
) -> pd.DataFrame:
    """A histogram of ``x`` as the rectangles of its bars (``xmin``, ``xmax``, ``ymin``,
    ``ymax``), one per bar and ``by`` group, stacked as plotnine stacks them (the first of
    ``by``'s categories on top, as in the legend), the edges per ``panel`` (each facet of a chart
    with free scales bins its own range, widened to the values ``include`` names for it, a
    mapping from panel to values; a plain sequence widens every panel); groups and panels keep
    their columns, and their categories where they had them. Bars that count nothing are left
    out.

    Why not plotnine's ``geom_histogram``: its binning and stacking run in pandas group by group
    and took 1.2-2.1 s of stage 02's six-panel histogram on 2 cores (a second or more of every
    notebook run and of the figures a person waits for); numpy counts the same bars in
    milliseconds, and ``geom_rect`` draws them."""
    import pandas as pd  # lazy: pandas takes 0.29 s to import

    rows: list[pd.DataFrame] = []
    panels = [(None, data)] if panel is None else list(data.groupby(panel, observed=True, sort=False))
    groups_order = _levels(data[by])[::-1] if by is not None else [None]
    for key, part in panels:
        name = key[0] if isinstance(key, tuple) else key
        extra = include.get(name, ()) if isinstance(include, Mapping) else include
        values = part[x].to_numpy(dtype=float)
        keep = np.isfinite(values)
        edges = bin_edges(values[keep], bins=bins, binwidth=binwidth, include=extra)
        index = np.clip(np.searchsorted(edges, values[keep], side="right") - 1, 0, len(edges) - 2)
        base = np.zeros(len(edges) - 1)
        labels = part[by].to_numpy()[keep] if by is not None else None
        for group in groups_order:
            chosen = index if labels is None else index[labels == group]
            counts = np.bincount(chosen, minlength=len(edges) - 1).astype(float)
            bars = pd.DataFrame({"xmin": edges[:-1], "xmax": edges[1:], "ymin": base, "ymax": base + counts})[
                counts > 0
            ]
            if by is not None:
                bars[by] = group
            if panel is not None:
                bars[panel] = name
            rows.append(bars)
            base = base + counts
    columns = ["xmin", "xmax", "ymin", "ymax"] + [c for c in (by, panel) if c is not None]
    out = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=columns)
    for column in (by, panel):
        if column is not None and isinstance(data[column].dtype, pd.CategoricalDtype):
            out[column] = pd.Categorical(out[column], categories=data[column].cat.categories)
    return out


def whole_counts(limits: tuple[float, float]) -> list[float]:
    """Breaks of a count axis at whole numbers only: a histogram of four frames is labelled 0, 1,
    2, 3, 4, not 0.25 frames (mizani's breaks, with the fractional ones dropped and, where
    that leaves fewer than two, every whole number in the range)."""
    from mizani.breaks import breaks_extended  # lazy: with plotnine (0.44 s to import)

    breaks = [float(b) for b in breaks_extended(n=5)(limits) if float(b).is_integer()]
    if len(breaks) < 2:
        breaks = [float(b) for b in range(math.floor(limits[0]), math.ceil(limits[1]) + 1)]
    return breaks


def _levels(values: pd.Series) -> list[Any]:
    """A column's groups in the order plotnine gives them: its categories, else sorted."""
    import pandas as pd  # lazy: pandas takes 0.29 s to import

    if isinstance(values.dtype, pd.CategoricalDtype):
        return list(values.cat.categories)
    return sorted(values.dropna().unique().tolist())


def bar_layers(
    by: str | None = None, *, fill: str = "#4C78A8", colour: str | None = None, size: float = 0.2
) -> list[Any]:
    """The layers that draw :func:`stacked_bins`' bars: their rectangles (filled by the ``by``
    column, else in ``fill``; ``colour`` and ``size`` outline them) and a count axis of whole
    numbers (:func:`whole_counts`). Add them to a ``ggplot`` of the bars."""
    import plotnine as p9  # lazy: plotnine takes 0.44 s to import

    corners = {"xmin": "xmin", "xmax": "xmax", "ymin": "ymin", "ymax": "ymax"}
    outline = {"colour": colour, "size": size} if colour is not None else {}
    if by is not None:
        rects = p9.geom_rect(p9.aes(**corners, fill=by), **outline)
    else:
        rects = p9.geom_rect(p9.aes(**corners), fill=fill, **outline)
    return [rects, p9.scale_y_continuous(breaks=whole_counts)]


def histogram(
    data: pd.DataFrame,
    x: str,
    *,
    labels: dict[str, str],
    by: str | None = None,
    colours: dict[str, str] | None = None,
    lines: Sequence[tuple[float, str]] = (),
    line_size: float = 0.5,
    figure_size: tuple[float, float] = (8, 3.2),
    bins: int | None = None,
    binwidth: float | None = None,
    fill: str = "#4C78A8",
    colour: str | None = None,
    size: float = 0.2,
) -> p9.ggplot:
    """The histogram of ``x`` (``bins`` bars, or bars ``binwidth`` wide; stacked by the ``by``
    column in ``colours``, else one ``fill``), a dashed vertical line at each ``(value, colour)``
    of ``lines`` (the thresholds a stage applies to the score, or its median), ``labels`` as
    plotnine's ``labs``: how a stage shows a score and where its thresholds cut it. ``colour``
    and ``size`` outline the bars; ``figure_size`` is in inches. The bars are counted by
    :func:`stacked_bins`."""
    import plotnine as p9  # lazy: plotnine takes 0.44 s to import

    bars = stacked_bins(data, x, by=by, bins=bins, binwidth=binwidth, include=[value for value, _ in lines])
    chart = p9.ggplot(bars) + bar_layers(by, fill=fill, colour=colour, size=size)
    for value, line_colour in lines:
        chart += p9.geom_vline(xintercept=value, linetype="dashed", colour=line_colour, size=line_size)
    if colours is not None:
        chart += p9.scale_fill_manual(values=colours)
    return chart + p9.labs(**labels) + minimal_theme(*figure_size)


def horizontal_bars(
    data: pd.DataFrame,
    category: str,
    value: str,
    by: str,
    *,
    order: list[str],
    by_order: list[str],
    colours: dict[str, str],
    labels: dict[str, str],
    width: float = 7,
) -> p9.ggplot:
    """One horizontal bar per ``category`` (``order`` from the bottom up) of length ``value``,
    stacked by ``by`` (``by_order`` from the axis out) in ``colours``; the figure grows with
    the number of bars, so a long list stays readable. (``data`` is changed: its two columns
    become ordered categoricals.)"""
    import plotnine as p9  # lazy: plotnine takes 0.44 s to import

    data[category] = categorical(data[category], order)
    data[by] = categorical(data[by], by_order)
    return (
        p9.ggplot(data, p9.aes(x=category, y=value, fill=by))
        + p9.geom_col()
        + p9.coord_flip()
        + p9.scale_fill_manual(values=colours)
        + p9.labs(**labels)
        + minimal_theme(width, max(2.0, 0.45 * len(order) + 1), names=order)
    )


# ------------------------------------------------------------------------------------- sheets


def largest_first(table: pl.DataFrame, column: str, last: str | None = None) -> list[Any]:
    """The values of ``column`` by how many rows hold each, most first (ties by value), with
    ``last`` (a noise or unknown bucket) at the end whatever its size: the order of a sheet's
    groups, the big ones being the ones a person checks first."""
    is_last = pl.col(column) == last if last is not None else pl.lit(False)
    sizes = table.group_by(column).len().with_columns(is_last.alias("_last"))
    return sizes.sort(["_last", "len", column], descending=[False, True, False])[column].to_list()


@dataclass
class Tile:
    """One picture of a sheet: the file it comes from (None: a grey placeholder), an optional box
    to crop from it, and how it is labelled and framed."""

    path: Path | None
    label: str = ""
    label_colour: str = "#444444"
    #: A frame drawn inside the tile (low-confidence faces, frames a person placed, validation).
    outline: str | None = None
    crop: tuple[int, int, int, int] | None = None
    #: What a placeholder says when the file cannot be read.
    missing: str = "missing"
    #: A box drawn on the picture, as shares (0-1) of its width and height: (left, top, right,
    #: bottom), e.g. a shot's picture box inside letterbox bars.
    mark: tuple[float, float, float, float] | None = None
    mark_colour: str = "#E4007C"


@dataclass
class Block:
    """A group of tiles under a title line, or beside a label of one or more lines at the left
    (as a contact sheet labels each shot)."""

    tiles: list[Tile]
    title: str | None = None
    title_colour: str = "black"
    side: Sequence[str] = ()
    side_colour: str = "black"


@dataclass(frozen=True)
class Layout:
    """The geometry of a sheet (pixels). Tiles wrap after ``columns``; a block takes at least one
    row. ``label_above`` puts each tile's label over the picture instead of under it."""

    tile: tuple[int, int]
    columns: int
    gap: int = 4
    label_h: int = 14
    label_above: bool = False
    title_h: int = 22
    side_width: int = 0
    #: A gap before the first column (sheets with a side label start right after it).
    lead_gap: bool = True
    header_h: int = 0
    column_title_h: int = 0
    fit: str = "stretch"  # or "contain": keep the aspect, centred on a light tile
    resample: Image.Resampling = Image.Resampling.BILINEAR


#: What a transparent pixel of a picture (a sprite) is shown on: neutral grey, not black.
TRANSPARENT_GROUND = (128, 128, 128)


def as_rgb(img: Image.Image) -> Image.Image:
    """``img`` as RGB, its transparent parts on :data:`TRANSPARENT_GROUND` (PIL's own convert
    would show whatever colour a transparent pixel holds, mostly black)."""
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        ground = Image.new("RGBA", rgba.size, (*TRANSPARENT_GROUND, 255))
        ground.alpha_composite(rgba)
        return ground.convert("RGB")
    return eight_bit(img).convert("RGB")


def _open_rgb(path: Path) -> Image.Image | None:
    """The picture at ``path`` as RGB and upright (a phone photo's EXIF orientation applied, as
    stage 03 reads its references), or None when it cannot be read (a placeholder is shown): a
    truncated or damaged AVIF raises SyntaxError or RuntimeError in Pillow's plugin, and stopped
    notebook 03's reference sheet."""
    try:
        with Image.open(path) as img:
            return as_rgb(ImageOps.exif_transpose(img))
    except (OSError, TypeError, ValueError, SyntaxError, RuntimeError, Image.DecompressionBombError):
        return None


def tile_sheet(
    blocks: Sequence[Block],
    layout: Layout,
    *,
    header: Sequence[str] = (),
    column_titles: Sequence[str] = (),
) -> Image.Image:
    """The blocks' pictures pasted into one image (see the module docstring); ``header`` lines go
    above everything (the first in the larger font), ``column_titles`` over the columns."""
    lay = layout
    tile_w, tile_h = lay.tile
    texts = [*header, *column_titles]
    for b in blocks:
        texts += [b.title or "", *b.side, *(t.label for t in b.tiles), *(t.missing for t in b.tiles)]
    file = sheet_font_file(texts)
    font, small = load_font(13, file), load_font(11, file)
    lead = lay.gap if lay.lead_gap else 0
    cell_w, cell_h = tile_w + lay.gap, tile_h + lay.label_h + lay.gap

    def rows_of(block: Block) -> int:
        return max(1, math.ceil(len(block.tiles) / lay.columns))

    heights = [(lay.title_h if b.title is not None else 0) + rows_of(b) * cell_h for b in blocks]
    width = lay.side_width + lead + lay.columns * cell_w
    # As wide as its titles and header too: a character seen in one frame got a sheet one tile
    # wide, and its title ("lin_manuel_mirar") lost the counts after the name.
    texts = [(b.title, font) for b in blocks if b.title] + [
        (line, font if i == 0 else small) for i, line in enumerate(header)
    ]
    width = max([width, *(math.ceil(f.getlength(t)) + 2 * lay.gap + 4 for t, f in texts)])
    height = lay.header_h + lay.column_title_h + sum(heights)
    sheet = Image.new("RGB", (width, max(height, lay.title_h)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, line in enumerate(header):
        draw.text(
            (4, 4 + 16 * i), line, fill="black" if i == 0 else "#444444", font=font if i == 0 else small
        )
    chars = max(8, tile_w // 6)
    for c, text in enumerate(column_titles):
        x = lay.side_width + lead + c * cell_w + 4
        draw.text((x, lay.header_h + 4), text[:chars], fill="black", font=small)
        draw.text((x, lay.header_h + 18), text[chars : 2 * chars], fill="black", font=small)
    # Where every tile goes, then the pictures file by file: a file is decoded once however
    # many tiles show it (a frame with five faces), and dropped as soon as its tiles are made.
    # Holding every decoded frame until the sheet was done cost 6 MB a 1080p frame: 260 MB for
    # the cluster sheet of a 10-minute film, the peak of the whole ingest.
    places: dict[Path | None, list[tuple[Tile, tuple[int, int]]]] = {}
    top = lay.header_h + lay.column_title_h
    for block, block_h in zip(blocks, heights, strict=True):
        if block.title is not None:
            draw.text((lay.gap, top + 4), block.title, fill=block.title_colour, font=font)
        first = top + (lay.title_h if block.title is not None else 0)
        picture_top = first + (lay.label_h if lay.label_above else 0)
        for i, line in enumerate(block.side):
            y = picture_top + tile_h // 2 - 14 + 16 * i
            draw.text((4, y), line, fill=block.side_colour, font=font if i == 0 else small)
        for k, item in enumerate(block.tiles):
            x = lay.side_width + lead + (k % lay.columns) * cell_w
            y = first + (k // lay.columns) * cell_h
            places.setdefault(item.path, []).append((item, (x, y + lay.label_h if lay.label_above else y)))
            if item.label:
                label_y = y + 1 if lay.label_above else y + tile_h
                draw.text((x, label_y), item.label, fill=item.label_colour, font=small)
        top += block_h
    for path, tiles in places.items():
        source = _open_rgb(path) if path is not None else None
        for item, where in tiles:
            sheet.paste(_picture(item, lay, source, small), where)
        del source  # before the next file is decoded
    return sheet


def _picture(item: Tile, lay: Layout, source: Image.Image | None, font: Any) -> Image.Image:
    """One tile: ``source`` (the tile's file, decoded; None: a placeholder) cropped, fitted to the
    tile and framed."""
    size = lay.tile
    if source is None:
        out = Image.new("RGB", size, "#DDDDDD")
        ImageDraw.Draw(out).text((8, 8), item.missing, fill="black", font=font)
    else:
        if item.crop is not None:
            source = source.crop(item.crop)
        if lay.fit == "contain":
            thumb = source.copy()
            thumb.thumbnail(size, lay.resample)
            out = Image.new("RGB", size, "#F4F4F4")
            out.paste(thumb, ((size[0] - thumb.width) // 2, (size[1] - thumb.height) // 2))
        else:
            out = source.resize(size, lay.resample)
    if item.mark is not None and source is not None:
        w, h = out.size
        left, top, right, bottom = item.mark
        box = (
            round(left * w),
            round(top * h),
            max(round(left * w), round(right * w) - 1),
            round(bottom * h) - 1,
        )
        ImageDraw.Draw(out).rectangle(box, outline=item.mark_colour, width=2)
    if item.outline:
        ImageDraw.Draw(out).rectangle((0, 0, size[0] - 1, size[1] - 1), outline=item.outline, width=4)
    return out


def aspect_height(path: Path | None, width: int, default: float = 9 / 16) -> int:
    """The tile height that keeps the aspect of the picture at ``path`` at ``width`` (16:9 when
    it cannot be read)."""
    if path is not None:
        try:
            with Image.open(path) as img:
                return round(width * img.height / img.width)
        except (OSError, TypeError, ValueError, ZeroDivisionError):
            pass
    return round(width * default)
