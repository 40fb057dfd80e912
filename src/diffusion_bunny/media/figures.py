"""Helpers the stages' figures share: fonts for the Pillow sheets and ordered categories for plotnine."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from PIL import ImageFont

if TYPE_CHECKING:
    pass


def load_font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # pragma: no cover - Pillow built without FreeType
        return ImageFont.load_default()


def categorical(values: Any, categories: list[str]) -> Any:
    """Ordered pandas categorical (plotnine orders axes by it)."""
    import pandas as pd

    return pd.Categorical(values, categories=categories, ordered=True)


def png_bytes(image: Any) -> bytes:
    """A Pillow image as PNG bytes (what ``ipywidgets.Image`` shows)."""
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
