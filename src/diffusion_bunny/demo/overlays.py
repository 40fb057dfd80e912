"""Text drawn onto pictures, as a film as released has it: title cards on black or on colour,
credits lists (scrolling), burned-in subtitles (white or yellow, with a dark outline), a page of
text (an insert), and signs inside a scene.

Two sets, both drawing RGB ``uint8`` arrays (H x W x 3), nothing modified in place, no system
font needed:

* :func:`title`, :func:`credits_list`, :func:`page`, :func:`subtitle`, :func:`sign`,
  :func:`gradient`, :func:`letterbox`: stage 02's tests and calibration draw them on real frames
  (``python_script/calibrate_quality.py``) with many fonts (matplotlib's DejaVu, STIX and Computer
  Modern, Pillow's own: :func:`font`), sizes and positions; each returns the picture and the box
  (``left, top, right, bottom`` in pixels, right/bottom exclusive) of what it drew, so the truth
  is known by construction;
* :func:`title_card`, :func:`credits_roll`, :func:`burn_subtitles`: the end-to-end "film as
  released" (:mod:`diffusion_bunny.demo.release`, ``realclips --released``) draws its title
  cards, end credits and subtitled shots with them, in Pillow's built-in font.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

Box = tuple[int, int, int, int]
RGB = tuple[int, int, int]

#: Font names this module knows: a file of matplotlib's ``mpl-data/fonts/ttf`` or Pillow's own
#: scalable default (``"pillow"``).
FONTS = {
    "sans": "DejaVuSans.ttf",
    "sans-bold": "DejaVuSans-Bold.ttf",
    "sans-oblique": "DejaVuSans-Oblique.ttf",
    "serif": "DejaVuSerif.ttf",
    "serif-bold": "DejaVuSerif-Bold.ttf",
    "serif-italic": "DejaVuSerif-Italic.ttf",
    "mono": "DejaVuSansMono.ttf",
    "stix": "STIXGeneral.ttf",
    "stix-bold": "STIXGeneralBol.ttf",
    "cm-serif": "cmr10.ttf",
    "pillow": "",
}

WHITE: RGB = (245, 245, 245)
YELLOW: RGB = (255, 226, 32)
BLACK: RGB = (0, 0, 0)

#: A credits list: roles and names, as end credits have them.
CREDITS = (
    ("Directed by", "Ada Lindqvist"),
    ("Written by", "Marcus Oyelaran"),
    ("Produced by", "Helen Marsh"),
    ("Director of Photography", "Tomas Irwin"),
    ("Edited by", "Priya Natarajan"),
    ("Music by", "Jonas Feld"),
    ("Production Designer", "Clara Ibsen"),
    ("Costume Designer", "Noor Haddad"),
    ("Sound Mixer", "Eli Brandt"),
    ("Casting by", "Rosa Vidal"),
    ("First Assistant Director", "Ken Adebayo"),
    ("Script Supervisor", "Lena Kraus"),
    ("Gaffer", "Milo Stanek"),
    ("Key Grip", "Ivan Petrov"),
)

#: Lines of dialogue for subtitles.
DIALOGUE = (
    "I told you we should have left before dawn.",
    "Where were you last night?",
    "Nobody leaves this room until I say so.",
    "It's not what it looks like.",
    "We have ten minutes. Maybe less.",
    "You kept the letter all these years?",
    "Don't look back.",
    "Then who opened the door?",
)

#: Words for signs in a scene (shop fronts, street signs, a label on a box).
SIGNS = ("HOTEL", "PHARMACY", "EXIT", "CAFE ROMA", "NO PARKING", "BAKERY", "STATION", "OPEN")


@cache
def font(name: str = "sans-bold", size: int = 40) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """A scalable font by name (:data:`FONTS`) at ``size`` pixels."""
    if name not in FONTS:
        raise KeyError(f"unknown font {name!r} (known: {', '.join(FONTS)})")
    if name == "pillow":
        return ImageFont.load_default(size=size)
    import matplotlib  # lazy: matplotlib takes 0.15 s to import

    path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / FONTS[name]
    return ImageFont.truetype(str(path), size)


def _canvas(size: tuple[int, int], background: RGB | np.ndarray) -> Image.Image:
    width, height = size
    if isinstance(background, np.ndarray):
        return Image.fromarray(np.ascontiguousarray(background[:, :, :3]).astype(np.uint8), "RGB")
    return Image.new("RGB", (width, height), tuple(int(c) for c in background))


def _union(boxes: Sequence[Box]) -> Box:
    return (
        min(b[0] for b in boxes),
        min(b[1] for b in boxes),
        max(b[2] for b in boxes),
        max(b[3] for b in boxes),
    )


def _draw_lines(
    draw: ImageDraw.ImageDraw,
    lines: Sequence[str],
    centre_x: float,
    top: float,
    face: ImageFont.FreeTypeFont | ImageFont.ImageFont,
    fill: RGB,
    *,
    spacing: float = 1.25,
    outline: int = 0,
    outline_fill: RGB = BLACK,
    align: str = "centre",
    left: float = 0.0,
) -> list[Box]:
    """Draw ``lines`` one under the other; the boxes of the ink drawn (with outline)."""
    size = getattr(face, "size", 20)
    boxes = []
    y = top
    for line in lines:
        if align == "centre":
            xy, anchor = (centre_x, y), "mt"
        else:
            xy, anchor = (left, y), "lt"
        draw.text(
            xy, line, font=face, fill=fill, anchor=anchor, stroke_width=outline, stroke_fill=outline_fill
        )
        box = draw.textbbox(xy, line, font=face, anchor=anchor, stroke_width=outline)
        boxes.append(tuple(round(v) for v in box))
        y += size * spacing
    return boxes


def title(
    size: tuple[int, int],
    lines: Sequence[str] = ("THE LONG NIGHT",),
    *,
    background: RGB | np.ndarray = BLACK,
    colour: RGB = WHITE,
    font_name: str = "serif-bold",
    font_size: int | None = None,
    centre_y: float = 0.5,
) -> tuple[np.ndarray, Box]:
    """A title card: ``lines`` centred on a plain ``background`` (a colour, or a picture such as
    a gradient). ``font_size`` defaults to a tenth of the height."""
    img = _canvas(size, background)
    draw = ImageDraw.Draw(img)
    face = font(font_name, font_size or max(8, size[1] // 10))
    line_h = getattr(face, "size", 20) * 1.25
    top = size[1] * centre_y - line_h * len(lines) / 2
    boxes = _draw_lines(draw, lines, size[0] / 2, top, face, colour)
    return np.asarray(img), _union(boxes)


def gradient(size: tuple[int, int], top: RGB, bottom: RGB) -> np.ndarray:
    """A vertical colour gradient (a title card's coloured background)."""
    width, height = size
    t = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    rows = (1 - t) * np.array(top, np.float32) + t * np.array(bottom, np.float32)
    return np.broadcast_to(rows, (height, width, 3)).round().astype(np.uint8).copy()


def credits_list(
    size: tuple[int, int],
    *,
    offset: float = 0.0,
    background: RGB | np.ndarray = BLACK,
    colour: RGB = WHITE,
    font_name: str = "sans",
    font_size: int | None = None,
    entries: Sequence[tuple[str, str]] = CREDITS,
) -> tuple[np.ndarray, Box]:
    """A frame of scrolling end credits: role and name pairs in two columns about the centre,
    moved up by ``offset`` (a share of the height: 0 starts the list at the top, larger values
    scroll it). The box covers the lines that are on screen."""
    width, height = size
    img = _canvas(size, background)
    draw = ImageDraw.Draw(img)
    face = font(font_name, font_size or max(8, height // 24))
    step = getattr(face, "size", 20) * 1.6
    y = height * 0.08 - offset * height
    boxes = []
    for role, name in entries:
        if -step < y < height:
            draw.text((width * 0.48, y), role, font=face, fill=colour, anchor="rt")
            draw.text((width * 0.52, y), name, font=face, fill=colour, anchor="lt")
            a = draw.textbbox((width * 0.48, y), role, font=face, anchor="rt")
            b = draw.textbbox((width * 0.52, y), name, font=face, anchor="lt")
            box = (int(a[0]), int(max(0, min(a[1], b[1]))), int(b[2]), int(min(height, max(a[3], b[3]))))
            if box[3] > box[1]:
                boxes.append(box)
        y += step
    return np.asarray(img), _union(boxes) if boxes else (0, 0, 0, 0)


def page(
    size: tuple[int, int],
    *,
    paper: RGB = (238, 232, 214),
    ink: RGB = (30, 30, 40),
    font_name: str = "serif",
    font_size: int | None = None,
    text: str | None = None,
) -> tuple[np.ndarray, Box]:
    """A text-heavy insert: a letter or a page of a book filling the frame."""
    width, height = size
    body = text or (
        "My dear Anna, by the time this letter reaches you the river will have frozen and the "
        "last boat will have left the harbour. I cannot tell you everything here. Keep the key "
        "I gave you, and do not trust the man from the station. He was there the night the "
        "lights went out, and he knows more than he says. Burn this when you have read it. "
        "I will come for you in the spring, if I can. Until then, stay at your aunt's house."
    )
    img = _canvas(size, paper)
    draw = ImageDraw.Draw(img)
    face = font(font_name, font_size or max(8, height // 22))
    margin = width * 0.1
    words, lines, line = body.split(), [], ""
    for word in words:
        trial = f"{line} {word}".strip()
        if draw.textlength(trial, font=face) > width - 2 * margin and line:
            lines.append(line)
            line = word
        else:
            line = trial
    lines.append(line)
    boxes = _draw_lines(draw, lines, 0, height * 0.1, face, ink, spacing=1.45, align="left", left=margin)
    boxes = [b for b in boxes if b[3] <= height]
    return np.asarray(img), _union(boxes)


def subtitle(
    picture: np.ndarray,
    lines: Sequence[str] | str = DIALOGUE[0],
    *,
    colour: RGB = WHITE,
    position: str = "bottom",
    font_name: str = "sans-bold",
    font_size: int | None = None,
    outline: int | None = None,
    margin: float = 0.06,
) -> tuple[np.ndarray, Box]:
    """Burned-in subtitles: one or two centred lines at the ``bottom`` (or ``top``) of
    ``picture``, ``margin`` (a share of the height) from the edge, with a dark outline as DVD
    and broadcast subtitles have. ``font_size`` defaults to 1/22 of the height."""
    if isinstance(lines, str):
        lines = (lines,)
    img = _canvas((picture.shape[1], picture.shape[0]), picture)
    height = picture.shape[0]
    face = font(font_name, font_size or max(8, height // 22))
    size = getattr(face, "size", 20)
    stroke = outline if outline is not None else max(1, size // 14)
    block = size * 1.25 * len(lines)
    top = height * (1 - margin) - block if position == "bottom" else height * margin
    boxes = _draw_lines(ImageDraw.Draw(img), lines, picture.shape[1] / 2, top, face, colour, outline=stroke)
    return np.asarray(img), _union(boxes)


def sign(
    picture: np.ndarray,
    word: str = SIGNS[0],
    *,
    centre: tuple[float, float] = (0.3, 0.35),
    height_share: float = 0.08,
    panel: RGB = (24, 60, 120),
    colour: RGB = WHITE,
    font_name: str = "sans-bold",
) -> tuple[np.ndarray, Box]:
    """A sign inside the scene: a panel with one word, centred at ``centre`` (shares of width
    and height), its letters ``height_share`` of the picture's height. What a scene with some
    text looks like: the frame must be kept."""
    img = _canvas((picture.shape[1], picture.shape[0]), picture)
    draw = ImageDraw.Draw(img)
    h, w = picture.shape[:2]
    face = font(font_name, max(8, round(h * height_share)))
    cx, cy = centre[0] * w, centre[1] * h
    box = draw.textbbox((cx, cy), word, font=face, anchor="mm")
    pad = (box[3] - box[1]) * 0.4
    draw.rectangle((box[0] - pad, box[1] - pad, box[2] + pad, box[3] + pad), fill=panel)
    draw.text((cx, cy), word, font=face, fill=colour, anchor="mm")
    return np.asarray(img), tuple(round(v) for v in box)


def letterbox(picture: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, Box]:
    """``picture`` scaled to fit inside ``size`` with black bars (letterbox or pillarbox), and
    the box of the picture in the result: what a 2.40:1 film in a 16:9 frame looks like."""
    width, height = size
    h, w = picture.shape[:2]
    scale = min(width / w, height / h)
    pw, ph = max(1, round(w * scale)), max(1, round(h * scale))
    small = np.asarray(Image.fromarray(picture).resize((pw, ph), Image.Resampling.LANCZOS))
    out = np.zeros((height, width, 3), np.uint8)
    left, top = (width - pw) // 2, (height - ph) // 2
    out[top : top + ph, left : left + pw] = small
    return out, (left, top, left + pw, top + ph)


# ---------------------------------------------------------------- the film as released's text
# Drawn in Pillow's own font (``"pillow"``), as before the sheets took DejaVu Sans: the film's
# frames, and what its tests measure on them, stay as they were.


def _lines(draw: ImageDraw.ImageDraw, lines: Sequence[str], size: int) -> list[tuple[str, int, int]]:
    face = font("pillow", size)
    out = []
    for line in lines:
        left, top, right, bottom = draw.textbbox((0, 0), line, font=face)
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
    face = font("pillow", text_px)
    measured = _lines(draw, lines, text_px)
    gap = round(text_px * 0.5)
    total = sum(lh for _, _, lh in measured) + gap * (len(measured) - 1)
    y = (h - total) / 2
    for line, lw, lh in measured:
        draw.text(((w - lw) / 2, y), line, font=face, fill=colour)
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
    face = font("pillow", text_px)
    gap = round(text_px * 0.6)
    y = h * (0.5 + 0.5 * (1.0 - progress)) - h * 0.25
    for line, lw, lh in _lines(draw, lines, text_px):
        draw.text(((w - lw) / 2, y), line, font=face, fill=WHITE)
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
    face = font("pillow", text_px)
    left, top, right, bottom = draw.textbbox((0, 0), line, font=face)
    x = (w - (right - left)) / 2 - left
    y = h * (1.0 - bottom_margin) - (bottom - top) - top
    stroke = max(1, text_px // 12)
    draw.text((x, y), line, font=face, fill=colour, stroke_width=stroke, stroke_fill=(0, 0, 0))
    return np.asarray(img)
