"""What an executed stage notebook shows: its pictures, for the tests that count them."""

from __future__ import annotations

from typing import Any

#: The formats a notebook's picture comes in: plotnine's charts are PNG, Pillow's sheets JPEG
#: (``nbtools.show_pictures_as_jpeg``).
PICTURE_TYPES = ("image/png", "image/jpeg")


def pictures(nb: Any, kind: str | None = None) -> list[dict]:
    """The outputs of ``nb`` (an nbformat notebook) that show a picture, of MIME type ``kind``
    only when given."""
    kinds = (kind,) if kind else PICTURE_TYPES
    return [o for c in nb.cells for o in c.get("outputs", []) if any(k in o.get("data", {}) for k in kinds)]
