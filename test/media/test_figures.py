"""The contact-sheet builder every stage's figures use (:func:`tile_sheet`) and the histograms' bars
(:func:`stacked_bins`)."""

from __future__ import annotations

import gc
import io
import warnings
import weakref

import numpy as np
import pandas as pd
import pytest
from damaged import damaged_avifs
from PIL import Image, ImageDraw

from diffusion_bunny.media import figures
from diffusion_bunny.media.figures import (
    Block,
    Layout,
    Tile,
    bin_edges,
    histogram,
    stacked_bins,
    tile_sheet,
    whole_counts,
)


def _frame(path, colour, size=(64, 48)):
    Image.new("RGB", size, colour).save(path)
    return path


def test_each_file_decoded_once_and_dropped_after_its_tiles(tmp_path, monkeypatch):
    red = _frame(tmp_path / "red.png", (255, 0, 0))
    blue = _frame(tmp_path / "blue.png", (0, 0, 255))
    opened: list = []
    alive: list = []
    most_alive = [0]
    real_open = figures._open_rgb

    def tracking_open(path):
        image = real_open(path)
        opened.append(path.name)
        gc.collect()
        alive[:] = [ref for ref in alive if ref() is not None]
        if image is not None:
            alive.append(weakref.ref(image))
        most_alive[0] = max(most_alive[0], len(alive))
        return image

    monkeypatch.setattr(figures, "_open_rgb", tracking_open)
    # The red frame shows in both blocks (a frame with two characters), interleaved with blue.
    blocks = [
        Block([Tile(red, crop=(0, 0, 32, 24)), Tile(blue)], title="a"),
        Block([Tile(blue), Tile(red), Tile(tmp_path / "gone.png", missing="gone")], title="b"),
    ]
    lay = Layout((20, 20), columns=3, gap=4, label_h=0, title_h=10)
    sheet = np.asarray(tile_sheet(blocks, lay))

    assert sorted(opened) == ["blue.png", "gone.png", "red.png"]  # once each
    assert most_alive[0] == 1  # never two decoded files at once
    # Each tile holds its own file's colour where the layout puts it.
    cell = 20 + 4
    first_row, second_row = 10, 10 + cell + 10
    assert tuple(sheet[first_row + 10, 4 + 10]) == (255, 0, 0)
    assert tuple(sheet[first_row + 10, 4 + cell + 10]) == (0, 0, 255)
    assert tuple(sheet[second_row + 10, 4 + 10]) == (0, 0, 255)
    assert tuple(sheet[second_row + 10, 4 + cell + 10]) == (255, 0, 0)
    assert tuple(sheet[second_row + 10, 4 + 2 * cell + 15]) == (0xDD, 0xDD, 0xDD)  # the placeholder


def test_transparent_pictures_shown_on_grey(tmp_path):
    sprite = tmp_path / "sprite.png"
    Image.new("RGBA", (30, 30), (0, 0, 0, 0)).save(sprite)
    sheet = np.asarray(tile_sheet([Block([Tile(sprite)])], Layout((30, 30), columns=1, label_h=0)))
    assert tuple(sheet[4 + 15, 4 + 15]) == figures.TRANSPARENT_GROUND


def test_stacked_bins_count_every_value_once_stacked_in_legend_order():
    rng = np.random.default_rng(0)
    data = pd.DataFrame(
        {
            "value": np.concatenate([rng.normal(0, 1, 300), rng.normal(5, 2, 200), [np.nan, np.inf]]),
            "outcome": pd.Categorical(["kept"] * 250 + ["blurry"] * 250 + ["kept"] * 2, ["kept", "blurry"]),
            "panel": ["a"] * 300 + ["b"] * 202,
        }
    )
    bars = stacked_bins(data, "value", by="outcome", panel="panel", bins=30)
    for name, part in bars.groupby("panel", observed=True):
        finite = data[(data["panel"] == name) & np.isfinite(data["value"])]
        assert (part["ymax"] - part["ymin"]).sum() == len(finite)
        for outcome in ("kept", "blurry"):  # each group's bars count its own values
            mine = part[part["outcome"] == outcome]
            assert (mine["ymax"] - mine["ymin"]).sum() == (finite["outcome"] == outcome).sum()
        # Each panel bins its own range: 30 bars from its smallest value to its largest.
        assert part["xmin"].min() == pytest.approx(finite["value"].min())
        assert part["xmax"].max() == pytest.approx(finite["value"].max())
    # Stacked: in each bar, the first category sits on the second (plotnine's order, the
    # legend's from the top), and no two groups overlap.
    a = bars[bars["panel"] == "a"]
    for _, column in a.groupby("xmin"):
        kept, blurry = column[column["outcome"] == "kept"], column[column["outcome"] == "blurry"]
        if len(kept) and len(blurry):
            assert kept["ymin"].iloc[0] == blurry["ymax"].iloc[0]
        assert column["ymin"].min() == 0
    assert list(bars["outcome"].cat.categories) == ["kept", "blurry"]
    assert (bars["ymax"] > bars["ymin"]).all()  # bars that count nothing are left out


def test_bin_edges_span_the_lines_and_centre_on_binwidth():
    # The range covers a threshold drawn beyond the data, as the chart's axis does.
    edges = bin_edges(np.array([10.0, 20.0, 90.0]), bins=30, include=[230.0])
    assert edges[0] == 10 and edges[-1] == 230 and len(edges) == 31
    # One bar per word count, centred on it, every count inside a bar.
    words = np.array([7, 8, 8, 9, 13])
    edges = bin_edges(words, binwidth=1)
    assert edges[0] == 6.5 and edges[-1] == 13.5
    assert np.allclose(np.diff(edges), 1)
    bars = stacked_bins(pd.DataFrame({"words": words}), "words", binwidth=1)
    assert dict(zip((bars["xmin"] + 0.5).astype(int), bars["ymax"], strict=True)) == {7: 1, 8: 2, 9: 1, 13: 1}
    # One value, or none: one bar around it.
    assert list(bin_edges(np.array([3.0, 3.0]), bins=10)) == [2.5, 3.5]
    assert list(bin_edges(np.array([]), bins=10)) == [-0.5, 0.5]
    with pytest.raises(ValueError, match="binwidth must be positive"):
        bin_edges(words, binwidth=0)


def test_histogram_draws_its_bars_and_lines():
    data = pd.DataFrame({"x": [1.0, 2.0, 2.5, 9.0], "kind": ["static", "dynamic", "static", "static"]})
    chart = histogram(data, "x", by="kind", lines=[(12.0, "#C0392B")], labels={"x": "x"}, bins=4)
    assert (chart.data["ymax"] - chart.data["ymin"]).sum() == 4
    # The bars divide the range from 1 to the line at 12, not to the largest value.
    assert np.allclose(chart.data["xmax"] - chart.data["xmin"], 11 / 4)
    assert chart.draw() is not None


def test_count_axes_break_at_whole_numbers_only():
    assert whole_counts((0, 1)) == [0, 1]  # not 0.25, 0.5, 0.75 frames
    assert whole_counts((0, 2)) == [0, 1, 2]
    assert whole_counts((0, 5)) == [0, 1, 2, 3, 4, 5]
    assert whole_counts((0, 400)) == [0, 100, 200, 300, 400]
    # Two shots of different lengths: each bar counts one, and the axis says 0 and 1 only.
    figure = histogram(pd.DataFrame({"x": [1.0, 9.0]}), "x", labels={"x": "x"}, bins=4).draw()
    assert [t for t in figure.axes[0].get_yticks() if 0 <= t <= 1] == [0, 1]


def test_a_sheet_is_as_wide_as_its_titles(tmp_path):
    """A character seen once got a sheet one tile wide, and its title lost the counts after the
    name ("lin_manuel_mirar"); the sheet now takes the title's width, the tiles where they were."""
    face = tmp_path / "face.png"
    Image.new("RGB", (20, 20), (255, 0, 0)).save(face)
    title = "lin_manuel_miranda (1 of 1 faces, 0 low confidence)"
    lay = Layout((20, 20), columns=1, gap=4, label_h=0, title_h=16)
    sheet = tile_sheet([Block([Tile(face)], title=title)], lay)
    assert sheet.width >= figures.load_font(13).getlength(title) + 8
    assert tuple(np.asarray(sheet)[16 + 10, 4 + 10]) == (255, 0, 0)
    assert tile_sheet([Block([Tile(face)])], lay).width == 4 + 24  # no title: as before


def test_a_damaged_avif_on_a_sheet_is_a_placeholder(tmp_path):
    """A truncated AVIF among the references stopped notebook 03's reference sheet with Pillow's
    SyntaxError (RuntimeError for one without its image item); it is a grey tile now."""
    lay = Layout((20, 20), columns=2, gap=4, label_h=0)
    sheet = np.asarray(tile_sheet([Block([Tile(p, missing="x") for p in damaged_avifs(tmp_path)])], lay))
    assert tuple(sheet[4 + 15, 4 + 15]) == tuple(sheet[4 + 15, 4 + 24 + 15]) == (0xDD, 0xDD, 0xDD)


def _ink(text: str) -> np.ndarray:
    img = Image.new("L", (60, 24))
    ImageDraw.Draw(img).text((2, 2), text, font=figures.load_font(13), fill=255)
    return np.asarray(img)


def test_names_past_ascii_are_drawn_in_their_own_letters():
    """Pillow's built-in font has no glyph past ASCII: a character named Zoë (or Ђорђе, Σοφία)
    got a box for its letters on every sheet. The sheets' font draws them; a character it lacks
    too (here one of Unicode's private planes) is still the box."""
    box = _ink("\U000f0000")
    for letter in ("ë", "Ђ", "Σ", "—"):
        assert _ink(letter).any() and not np.array_equal(_ink(letter), box), letter
    assert figures.load_font(13) is figures.load_font(13)  # read once


def test_the_sheets_fall_back_to_pillows_font_without_their_own(monkeypatch):
    monkeypatch.setattr(figures, "SHEET_FONT", "NoSuchFont.ttf")
    figures.load_font.cache_clear()
    try:
        assert figures.load_font(13).getname()[0] != "DejaVu Sans"
        assert _ink("Zoe").any()
    finally:
        figures.load_font.cache_clear()


def _cjk_font(path, family: str, extra: str) -> None:
    """A TrueType font ``family`` at ``path`` that draws printable ASCII and the letters of
    ``extra``, each as a filled square (no CJK font is installed on the test machines)."""
    from fontTools.fontBuilder import FontBuilder
    from fontTools.pens.ttGlyphPen import TTGlyphPen

    letters = [chr(c) for c in range(0x21, 0x7F)] + list(extra)
    names = [".notdef", "space"] + [f"g{ord(c):05x}" for c in letters]
    builder = FontBuilder(1000, isTTF=True)
    builder.setupGlyphOrder(names)
    builder.setupCharacterMap({0x20: "space", **{ord(c): f"g{ord(c):05x}" for c in letters}})
    glyphs = {}
    for name in names:
        pen = TTGlyphPen(None)
        if name not in (".notdef", "space"):
            pen.moveTo((100, 0)), pen.lineTo((100, 700)), pen.lineTo((800, 700)), pen.lineTo((800, 0))
            pen.closePath()
        glyphs[name] = pen.glyph()
    builder.setupGlyf(glyphs)
    builder.setupHorizontalMetrics({name: (900, 100) for name in names})
    builder.setupHorizontalHeader(ascent=800, descent=-200)
    builder.setupNameTable({"familyName": family, "styleName": "Regular"})
    builder.setupOS2(sTypoAscender=800, sTypoDescender=-200, usWinAscent=800, usWinDescent=200)
    builder.setupPost()
    builder.save(str(path))


def test_names_in_a_script_the_sheets_font_lacks_are_drawn_in_a_font_that_has_it(tmp_path, monkeypatch):
    """DejaVu Sans has no CJK: characters named 山田 and 佐藤 were two rows of the same empty
    boxes on the sheets and charts, where a font that draws them was installed. The sheets and
    the charts that name characters now take such a font; names DejaVu draws keep it."""
    from matplotlib import font_manager

    from diffusion_bunny.stages.characters.plots import character_counts_plot

    file = tmp_path / "BunnyTestSans.ttf"
    _cjk_font(file, "Bunny Test Sans", "山田佐藤")
    monkeypatch.setattr(font_manager.fontManager, "ttflist", list(font_manager.fontManager.ttflist))
    font_manager.fontManager.addfont(str(file))
    dejavu = figures.sheet_font_file(["Zoë"])
    assert dejavu.endswith(figures.SHEET_FONT) and figures.sheet_font_file(["Zoe"]) == dejavu
    assert figures.sheet_font_file(["山田", "Zoe"]) == str(file)

    face = _frame(tmp_path / "face.png", (200, 30, 30), (20, 20))
    lay = Layout((20, 20), columns=1, gap=4, label_h=0, title_h=16)
    block = [Block([Tile(face)], title="山田 (1 of 1 faces)")]
    drawn = np.asarray(tile_sheet(block, lay))
    monkeypatch.setattr(figures, "sheet_font_file", lambda texts: dejavu)
    assert not np.array_equal(drawn, np.asarray(tile_sheet(block, lay)))  # not DejaVu's boxes

    import polars as pl

    counts = pl.DataFrame({"character": ["山田", "佐藤"], "faces": [3, 2], "low_confidence": [0, 1]})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        character_counts_plot(counts).draw().savefig(io.BytesIO(), format="png")
    assert not [w for w in caught if "missing from font" in str(w.message)]
