"""The contact-sheet builder every stage's figures use (:func:`tile_sheet`)."""

from __future__ import annotations

import gc
import weakref

import numpy as np
from PIL import Image

from diffusion_bunny.media import figures
from diffusion_bunny.media.figures import Block, Layout, Tile, tile_sheet


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
