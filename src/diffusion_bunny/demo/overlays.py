"""Text as films carry it, drawn onto pictures: title cards, credits, burned-in subtitles.

For test footage with known truth (:mod:`diffusion_bunny.demo.release`): what stage 02's text
rules must find. Drawn with Pillow's built-in FreeType font, so no system font is needed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

from diffusion_bunny.media.figures import load_font

YELLOW = (255, 226, 32)
WHITE = (245, 245, 245)


def _lines(draw: ImageDraw.ImageDraw, lines: Sequence[str], size: int) -> list[tuple[str, int, int]]:
    font = load_font(size)
    out = []
    for line in lines:
        left, top, right, bottom = draw.textbbox((0, 0), line, font=font)
        out.append((line, right - left, bottom - top))
    return out


def title_card(
    size: tuple[int, int],
    lines: Sequence[str],
    background: tuple[int, int, int] = (0, 0, 0),
    colour: tuple[int, int, int] = WHITE,
) -> np.ndarray:
    """A title card: ``lines`` centred on a plain ``background`` (RGB array of ``size``)."""
    w, h = size
    img = Image.new("RGB", (w, h), background)
    draw = ImageDraw.Draw(img)
    text_px = max(12, round(h * 0.09))
    font = load_font(text_px)
    measured = _lines(draw, lines, text_px)
    gap = round(text_px * 0.5)
    total = sum(lh for _, _, lh in measured) + gap * (len(measured) - 1)
    y = (h - total) / 2
    for line, lw, lh in measured:
        draw.text(((w - lw) / 2, y), line, font=font, fill=colour)
        y += lh + gap
    return np.asarray(img)


def credits_roll(
    size: tuple[int, int],
    lines: Sequence[str],
    progress: float,
    background: tuple[int, int, int] = (0, 0, 0),
) -> np.ndarray:
    """End credits scrolling up: ``progress`` 0 has the list entering from the bottom edge,
    1 has it half-way up the frame."""
    w, h = size
    img = Image.new("RGB", (w, h), background)
    draw = ImageDraw.Draw(img)
    text_px = max(10, round(h * 0.06))
    font = load_font(text_px)
    gap = round(text_px * 0.6)
    y = h * (0.5 + 0.5 * (1.0 - progress)) - h * 0.25
    for line, lw, lh in _lines(draw, lines, text_px):
        draw.text(((w - lw) / 2, y), line, font=font, fill=WHITE)
        y += lh + gap
    return np.asarray(img)


def burn_subtitles(
    picture: np.ndarray, line: str, colour: tuple[int, int, int] = YELLOW, bottom_margin: float = 0.06
) -> np.ndarray:
    """``line`` burned into the bottom of ``picture`` (RGB) as DVD and fansub subtitles are:
    centred, coloured, with a black outline, ``bottom_margin`` of the height above the edge."""
    h, w = picture.shape[:2]
    img = Image.fromarray(picture)
    draw = ImageDraw.Draw(img)
    text_px = max(10, round(h * 0.055))
    font = load_font(text_px)
    left, top, right, bottom = draw.textbbox((0, 0), line, font=font)
    x = (w - (right - left)) / 2 - left
    y = h * (1.0 - bottom_margin) - (bottom - top) - top
    stroke = max(1, text_px // 12)
    draw.text((x, y), line, font=font, fill=colour, stroke_width=stroke, stroke_fill=(0, 0, 0))
    return np.asarray(img)
