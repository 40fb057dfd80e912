""":func:`read_rgb`, how stages 03 and 06 read a whole picture: channels in RGB order, None for what
is not a whole picture."""

from __future__ import annotations

import numpy as np
from PIL import Image

from diffusion_bunny.media.images import read_rgb


def test_read_rgb_gives_rgb_order_and_none_for_what_is_not_a_picture(tmp_path):
    for suffix in ("png", "jpg"):
        path = tmp_path / f"red.{suffix}"
        Image.new("RGB", (32, 16), (230, 20, 10)).save(path, quality=95)
        rgb = read_rgb(path)
        assert rgb.shape == (16, 32, 3) and rgb.dtype == np.uint8
        assert abs(int(rgb[8, 16, 0]) - 230) < 6 and rgb[8, 16, 2] < 20  # red first, not BGR
    grey = tmp_path / "grey.png"
    Image.new("L", (8, 8), 77).save(grey)
    assert read_rgb(grey).shape == (8, 8, 3)
    (tmp_path / "junk.jpg").write_bytes(b"not a picture")
    (tmp_path / "empty.jpg").write_bytes(b"")
    assert read_rgb(tmp_path / "junk.jpg") is None
    assert read_rgb(tmp_path / "empty.jpg") is None
    assert read_rgb(tmp_path / "missing.jpg") is None
    # A JPEG cut short: libjpeg would fill the rest with grey; refused, as Pillow refuses it.
    whole = (tmp_path / "red.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(whole[: len(whole) - 40])
    assert read_rgb(tmp_path / "cut.jpg") is None
