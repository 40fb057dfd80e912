"""Picture files as a broken download or copy leaves them, for the readers' tests."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image


def damaged_avifs(folder: Path) -> list[Path]:
    """An AVIF cut short (Pillow's AVIF plugin raises SyntaxError) and one whose primary item is
    missing (RuntimeError): neither is the OSError Pillow's other readers raise."""
    buf = io.BytesIO()
    picture = np.random.default_rng(0).integers(0, 255, (48, 48, 3), dtype=np.uint8)
    Image.fromarray(picture).save(buf, format="AVIF")
    data = buf.getvalue()
    cut, unnamed = folder / "cut.avif", folder / "unnamed.avif"
    cut.write_bytes(data[:-40])
    unnamed.write_bytes(data.replace(b"pitm\0\0\0\0\0\x01", b"pitm\0\0\0\0\0\x09"))
    return [cut, unnamed]
