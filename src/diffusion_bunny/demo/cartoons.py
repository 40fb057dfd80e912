"""Cartoon characters drawn in code: drawn people (big-headed, anime-like proportions) and cartoon
animals, each in any pose, with its alpha mask and its head box.

The demo movie films two of them beside its photographed people, and the tests of stage 03 use
them as characters nobody downloaded: characters of one family share one drawing style (the same
proportions, line width and shading) and differ only where characters of a real cartoon differ
(hair and eye colour, clothes, fur, ears), which is what makes them hard to tell apart. A pose
moves the limbs, turns and tilts the head, changes the expression and can mirror the character,
so a reference picture and an appearance in a film are never the same drawing.

Drawn at twice the size and reduced (antialiased edges, as a real drawing has); shading is a
radial gradient per body part when ``shaded`` (the look of a 3D render).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

RGB = tuple[int, int, int]
OUTLINE: RGB = (40, 30, 30)


@dataclass(frozen=True)
class Cartoon:
    """One character's looks (what stays the same in every pose)."""

    name: str
    #: ``person`` (a drawn person) or ``animal`` (a four-legged cartoon animal).
    family: str
    #: Hair (person) or fur (animal) colour.
    main: RGB
    #: Clothes (person) or belly and muzzle (animal).
    second: RGB
    eyes: RGB = (70, 110, 200)
    skin: RGB = (250, 220, 200)
    #: person: ``long``, ``short`` or ``twintails``; animal: ``pointed`` (cat), ``floppy`` (dog),
    #: ``long`` (rabbit) or ``round`` (bear).
    style: str = "long"
    #: An accessory's colour (a ribbon for a person, a collar for an animal); None for none.
    accent: RGB | None = None
    #: Shaded like a 3D render (radial gradients) instead of flat colours.
    shaded: bool = False


@dataclass(frozen=True)
class Pose:
    """What changes between two drawings of one character."""

    #: Head turned: -1 (looking to the image's left) .. 1 (right); 0 facing the viewer.
    turn: float = 0.0
    #: Head tilt in degrees.
    tilt: float = 0.0
    #: ``smile``, ``open``, ``flat`` or ``sad``.
    mouth: str = "smile"
    blink: bool = False
    #: Walking phase in [0, 1) (legs and arms swing with it).
    step: float = 0.0
    #: Arms raised (person): 0 down .. 1 up.
    arms_up: float = 0.0
    mirror: bool = False
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Drawing:
    """An RGBA drawing and the head's box in its pixels (left, top, right, bottom)."""

    rgba: np.ndarray
    head: tuple[int, int, int, int]

    @property
    def box(self) -> tuple[int, int, int, int]:
        """The drawing's visible extent (left, top, right, bottom) from its alpha."""
        ys, xs = np.nonzero(self.rgba[..., 3] > 16)
        return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def _shade(colour: RGB, k: float) -> RGB:
    return tuple(int(max(0, min(255, c * k))) for c in colour)  # type: ignore[return-value]


class _Canvas:
    """A supersampled RGBA canvas with the few strokes the characters are made of."""

    def __init__(self, width: int, height: int, shaded: bool, scale: int = 2):
        self.s = scale
        self.image = Image.new("RGBA", (width * scale, height * scale), (0, 0, 0, 0))
        self.draw = ImageDraw.Draw(self.image)
        self.shaded = shaded
        self.lw = max(1, round(height * scale / 110))

    def _xy(self, box):
        return [v * self.s for v in box]

    def ellipse(self, box, fill: RGB, outline: bool = True) -> None:
        box = self._xy(box)
        if self.shaded and (box[2] - box[0]) > 6:
            self._gradient_ellipse(box, fill)
            if outline:
                self.draw.ellipse(box, outline=OUTLINE, width=self.lw)
            return
        self.draw.ellipse(box, fill=fill, outline=OUTLINE if outline else None, width=self.lw)

    def _gradient_ellipse(self, box, fill: RGB) -> None:
        x0, y0, x1, y1 = (round(v) for v in box)
        w, h = max(1, x1 - x0), max(1, y1 - y0)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        # Light from the top left: brightest a third of the way in.
        d = np.hypot((xx - 0.35 * w) / w, (yy - 0.3 * h) / h)
        k = np.clip(1.25 - 0.75 * d, 0.55, 1.25)[..., None]
        rgb = np.clip(np.asarray(fill, np.float32) * k, 0, 255).astype(np.uint8)
        mask = Image.new("L", (w, h), 0)
        ImageDraw.Draw(mask).ellipse((0, 0, w - 1, h - 1), fill=255)
        self.image.paste(Image.fromarray(rgb, "RGB"), (x0, y0), mask)

    def polygon(self, points, fill: RGB, outline: bool = True) -> None:
        pts = [(x * self.s, y * self.s) for x, y in points]
        self.draw.polygon(pts, fill=fill, outline=OUTLINE if outline else None, width=self.lw)

    def limb(self, a, b, width: float, fill: RGB) -> None:
        a, b = (a[0] * self.s, a[1] * self.s), (b[0] * self.s, b[1] * self.s)
        w = width * self.s
        self.draw.line([a, b], fill=OUTLINE, width=int(w + 2 * self.lw))
        self.draw.line([a, b], fill=fill, width=int(w))
        for p in (a, b):
            r = w / 2
            self.draw.ellipse((p[0] - r, p[1] - r, p[0] + r, p[1] + r), fill=fill)

    def arc(self, box, start: float, end: float) -> None:
        self.draw.arc(self._xy(box), start, end, fill=OUTLINE, width=self.lw)

    def line(self, a, b) -> None:
        self.draw.line(
            [(a[0] * self.s, a[1] * self.s), (b[0] * self.s, b[1] * self.s)], fill=OUTLINE, width=self.lw
        )

    def result(self) -> np.ndarray:
        w, h = self.image.size
        return np.asarray(self.image.resize((w // self.s, h // self.s), Image.Resampling.LANCZOS))


def _eyes_and_mouth(c: _Canvas, cx: float, cy: float, r: float, look: Cartoon, pose: Pose) -> None:
    """Eyes, iris, highlight and mouth on a head of radius ``r`` centred at (cx, cy)."""
    shift = pose.turn * r * 0.35
    big = look.family == "person"
    ew, eh = (r * 0.28, r * 0.36) if big else (r * 0.2, r * 0.24)
    for side in (-1, 1):
        ex = (
            cx
            + shift
            + side * r * (0.38 if big else 0.42) * (1 - 0.25 * abs(pose.turn) * (side * pose.turn > 0))
        )
        ey = cy + r * (0.05 if big else -0.05)
        if pose.blink:
            c.arc((ex - ew, ey - eh * 0.3, ex + ew, ey + eh * 0.6), 200, 340)
            continue
        c.ellipse((ex - ew, ey - eh, ex + ew, ey + eh), (255, 255, 255))
        ix = ex + pose.turn * ew * 0.35
        c.ellipse((ix - ew * 0.7, ey - eh * 0.75, ix + ew * 0.7, ey + eh * 0.85), look.eyes, outline=False)
        c.ellipse((ix - ew * 0.3, ey - eh * 0.3, ix + ew * 0.3, ey + eh * 0.4), (20, 20, 30), outline=False)
        c.ellipse(
            (ix - ew * 0.55, ey - eh * 0.6, ix - ew * 0.15, ey - eh * 0.15), (255, 255, 255), outline=False
        )
    mx, my, mw = cx + shift * 1.1, cy + r * (0.55 if big else 0.45), r * 0.22
    if pose.mouth == "open":
        c.ellipse((mx - mw * 0.6, my - mw * 0.4, mx + mw * 0.6, my + mw * 0.6), (170, 60, 70))
    elif pose.mouth == "flat":
        c.line((mx - mw * 0.6, my), (mx + mw * 0.6, my))
    elif pose.mouth == "sad":
        c.arc((mx - mw, my, mx + mw, my + mw * 1.2), 200, 340)
    else:
        c.arc((mx - mw, my - mw, mx + mw, my + mw * 0.6), 20, 160)


def _layer(c: _Canvas) -> _Canvas:
    """A transparent canvas of ``c``'s size and strokes: a head drawn on it turns on its own."""
    layer = _Canvas.__new__(_Canvas)
    layer.__dict__.update(c.__dict__)
    layer.image = Image.new("RGBA", c.image.size, (0, 0, 0, 0))
    layer.draw = ImageDraw.Draw(layer.image)
    return layer


def _person_body(c: _Canvas, look: Cartoon, pose: Pose, cx: float, h: float) -> None:
    """Legs and shoes, the dress, the arms (they swing with the step, rise with ``arms_up``)."""
    swing = math.sin(2 * math.pi * pose.step)
    for side in (-1, 1):
        hip = (cx + side * 0.06 * h, 0.7 * h)
        foot = (cx + side * 0.08 * h + side * swing * 0.05 * h, 0.95 * h)
        c.limb(hip, foot, 0.045 * h, look.skin)
        shoe = (foot[0] - 0.045 * h, foot[1] - 0.02 * h, foot[0] + 0.045 * h, foot[1] + 0.03 * h)
        c.ellipse(shoe, _shade(look.second, 0.6))
    dress = [
        (cx - 0.08 * h, 0.42 * h),
        (cx + 0.08 * h, 0.42 * h),
        (cx + 0.17 * h, 0.76 * h),
        (cx - 0.17 * h, 0.76 * h),
    ]
    c.polygon(dress, look.second)
    for side in (-1, 1):
        shoulder = (cx + side * 0.085 * h, 0.46 * h)
        angle = math.radians(20 + 140 * pose.arms_up + side * swing * 12)
        hand = (shoulder[0] + side * math.sin(angle) * 0.2 * h, shoulder[1] + math.cos(angle) * 0.2 * h)
        c.limb(shoulder, hand, 0.04 * h, look.skin)


def _person_back_hair(c: _Canvas, look: Cartoon, cx: float, hy: float, r: float) -> None:
    if look.style == "long":
        c.polygon(
            [
                (cx - r * 1.05, hy),
                (cx + r * 1.05, hy),
                (cx + r * 1.15, hy + r * 2.1),
                (cx - r * 1.15, hy + r * 2.1),
            ],
            look.main,
        )
    elif look.style == "twintails":
        for side in (-1, 1):
            x = cx + side * r * 1.25
            c.ellipse((x - r * 0.35, hy - r * 0.2, x + r * 0.35, hy + r * 1.9), look.main)


def _person_head(hc: _Canvas, look: Cartoon, pose: Pose, cx: float, hy: float, r: float) -> None:
    """Face, fringe (turned with the head), side locks or ribbon, eyes and mouth."""
    hc.ellipse((cx - r, hy - r, cx + r, hy + r * 1.05), look.skin)
    x = cx + pose.turn * r * 0.25
    fringe = [
        (-1.05, 0.1),
        (-0.9, -0.75),
        (0.0, -1.08),
        (0.9, -0.75),
        (1.05, 0.1),
        (0.55, -0.3),
        (0.15, -0.05),
        (-0.3, -0.35),
    ]
    hc.polygon([(x + r * dx, hy + r * dy) for dx, dy in fringe], look.main)
    if look.style == "short":
        for side in (-1, 1):
            lock = [(1.02, -0.2), (1.1, 0.7), (0.8, 0.3)]
            hc.polygon([(cx + side * r * dx, hy + r * dy) for dx, dy in lock], look.main)
    if look.accent is not None:
        bx = x + r * 0.55
        hc.polygon(
            [(bx, hy - r * 0.8), (bx + r * 0.45, hy - r * 1.05), (bx + r * 0.45, hy - r * 0.5)], look.accent
        )
        hc.polygon(
            [(bx, hy - r * 0.8), (bx - r * 0.1, hy - r * 1.15), (bx - r * 0.2, hy - r * 0.55)], look.accent
        )
    _eyes_and_mouth(hc, cx, hy + r * 0.1, r, look, pose)


def _person(look: Cartoon, pose: Pose, height: int) -> Drawing:
    h = float(height)
    w = 0.7 * h
    c = _Canvas(int(w), int(h), look.shaded)
    cx, r = w / 2, 0.2 * h
    hy = r + 0.03 * h
    _person_body(c, look, pose, cx, h)
    _person_back_hair(c, look, cx, hy, r)
    hc = _layer(c)
    _person_head(hc, look, pose, cx, hy, r)
    head = hc.image.rotate(pose.tilt, center=(cx * c.s, (hy + r) * c.s), resample=Image.Resampling.BICUBIC)
    c.image.alpha_composite(head)
    box = _rotated_box((cx - r * 1.1, hy - r * 1.15, cx + r * 1.1, hy + r * 1.1), pose.tilt, (cx, hy + r))
    return _finish(c.result(), box, pose)


def _animal(look: Cartoon, pose: Pose, height: int) -> Drawing:
    h = float(height)
    w = 1.25 * h
    c = _Canvas(int(w), int(h), look.shaded)
    swing = math.sin(2 * math.pi * pose.step)
    body = (0.2 * w, 0.42 * h, 0.78 * w, 0.78 * h)
    # Tail, legs, body, belly.
    c.limb((body[0] + 0.02 * w, 0.55 * h), (0.06 * w, (0.32 - 0.08 * swing) * h), 0.05 * h, look.main)
    for i, x in enumerate((0.28, 0.38, 0.6, 0.7)):
        phase = swing if i % 2 == 0 else -swing
        top = (x * w, 0.7 * h)
        foot = ((x + 0.05 * phase) * w, 0.96 * h)
        c.limb(top, foot, 0.07 * h, _shade(look.main, 0.9 if i in (1, 3) else 1.0))
    c.ellipse(body, look.main)
    c.ellipse((0.35 * w, 0.6 * h, 0.68 * w, 0.77 * h), look.second, outline=False)
    if look.accent is not None:
        c.limb((0.7 * w, 0.5 * h), (0.76 * w, 0.68 * h), 0.035 * h, look.accent)
    # Head with ears, muzzle, eyes, nose.
    r = 0.2 * h
    hx, hy = 0.8 * w, 0.36 * h
    hc = _layer(c)
    for side in (-1, 1):
        ex = hx + side * r * 0.6
        if look.style == "pointed":
            hc.polygon(
                [
                    (ex - r * 0.35, hy - r * 0.6),
                    (ex + side * r * 0.1, hy - r * 1.45),
                    (ex + r * 0.35, hy - r * 0.6),
                ],
                look.main,
            )
        elif look.style == "long":
            hc.ellipse((ex - r * 0.22, hy - r * 2.1, ex + r * 0.22, hy - r * 0.4), look.main)
            hc.ellipse((ex - r * 0.1, hy - r * 1.9, ex + r * 0.1, hy - r * 0.6), look.second, outline=False)
        elif look.style == "round":
            hc.ellipse((ex - r * 0.35, hy - r * 1.15, ex + r * 0.35, hy - r * 0.45), look.main)
    hc.ellipse((hx - r, hy - r, hx + r, hy + r), look.main)
    if look.style == "floppy":
        for side in (-1, 1):
            ex = hx + side * r * 0.95
            hc.ellipse((ex - r * 0.25, hy - r * 0.6, ex + r * 0.25, hy + r * 0.7), _shade(look.main, 0.7))
    hc.ellipse(
        (hx - r * 0.5 + pose.turn * r * 0.3, hy + r * 0.1, hx + r * 0.5 + pose.turn * r * 0.3, hy + r * 0.85),
        look.second,
    )
    _eyes_and_mouth(hc, hx, hy - r * 0.15, r, look, pose)
    nx = hx + pose.turn * r * 0.35
    hc.ellipse((nx - r * 0.12, hy + r * 0.2, nx + r * 0.12, hy + r * 0.36), (50, 35, 35), outline=False)
    head = hc.image.rotate(pose.tilt, center=(hx * c.s, hy * c.s), resample=Image.Resampling.BICUBIC)
    c.image.alpha_composite(head)
    rgba = c.result()
    top = hy - r * (
        2.1
        if look.style == "long"
        else 1.45
        if look.style == "pointed"
        else 1.15
        if look.style == "round"
        else 1.0
    )
    box = _rotated_box((hx - r * 1.2, top, hx + r * 1.2, hy + r * 1.05), pose.tilt, (hx, hy))
    return _finish(rgba, box, pose)


def _rotated_box(box, degrees: float, centre) -> tuple[float, float, float, float]:
    """The axis-aligned box around ``box`` rotated by ``degrees`` (PIL's sense) about ``centre``."""
    a = math.radians(-degrees)
    corners = [(box[0], box[1]), (box[2], box[1]), (box[0], box[3]), (box[2], box[3])]
    pts = [
        (
            centre[0] + (x - centre[0]) * math.cos(a) - (y - centre[1]) * math.sin(a),
            centre[1] + (x - centre[0]) * math.sin(a) + (y - centre[1]) * math.cos(a),
        )
        for x, y in corners
    ]
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    return min(xs), min(ys), max(xs), max(ys)


def _finish(rgba: np.ndarray, head: tuple[float, ...], pose: Pose) -> Drawing:
    height, width = rgba.shape[:2]
    left, top, right, bottom = head
    box = (max(0, round(left)), max(0, round(top)), min(width, round(right)), min(height, round(bottom)))
    if pose.mirror:
        rgba = np.ascontiguousarray(rgba[:, ::-1])
        box = (width - box[2], box[1], width - box[0], box[3])
    return Drawing(np.ascontiguousarray(rgba), box)


def draw(look: Cartoon, pose: Pose | None = None, height: int = 256) -> Drawing:
    """``look`` in ``pose`` on a transparent canvas ``height`` pixels tall."""
    pose = pose or Pose()
    if look.family == "person":
        return _person(look, pose, height)
    if look.family == "animal":
        return _animal(look, pose, height)
    raise ValueError(f"unknown cartoon family {look.family!r}")


def random_pose(rng: np.random.Generator, *, mirror: bool | None = None) -> Pose:
    """A pose drawn at random (the tests' and the demo's films use seeded generators)."""
    return Pose(
        turn=float(rng.uniform(-0.8, 0.8)),
        tilt=float(rng.uniform(-15, 15)),
        mouth=str(rng.choice(["smile", "open", "flat", "sad"])),
        blink=bool(rng.random() < 0.15),
        step=float(rng.random()),
        arms_up=float(rng.choice([0.0, 0.0, 0.5, 1.0])),
        mirror=bool(rng.random() < 0.5) if mirror is None else mirror,
    )


#: A cast for the demo and the tests: three drawn people in one style (two differ mainly by hair
#: colour) and three cartoon animals, one of them shaded like a 3D render.
CAST = (
    Cartoon(
        "mika",
        "person",
        main=(240, 150, 190),
        second=(60, 80, 160),
        eyes=(60, 150, 90),
        style="twintails",
        accent=(230, 60, 60),
    ),
    Cartoon("rin", "person", main=(90, 120, 220), second=(60, 80, 160), eyes=(200, 120, 40), style="long"),
    Cartoon("aoi", "person", main=(60, 50, 50), second=(200, 200, 210), eyes=(120, 70, 160), style="short"),
    Cartoon(
        "biscuit",
        "animal",
        main=(210, 150, 80),
        second=(250, 230, 200),
        eyes=(60, 40, 30),
        style="floppy",
        accent=(200, 40, 40),
    ),
    Cartoon(
        "pepper", "animal", main=(80, 80, 90), second=(235, 235, 235), eyes=(120, 180, 60), style="pointed"
    ),
    Cartoon(
        "hopps",
        "animal",
        main=(200, 200, 205),
        second=(250, 240, 240),
        eyes=(150, 60, 60),
        style="long",
        shaded=True,
    ),
)


def cast(name: str) -> Cartoon:
    """The :data:`CAST` member called ``name``."""
    for look in CAST:
        if look.name == name:
            return look
    raise KeyError(name)


def soften(rgba: np.ndarray, radius: float) -> np.ndarray:
    """``rgba`` blurred (an out-of-focus character)."""
    return np.asarray(Image.fromarray(rgba, "RGBA").filter(ImageFilter.GaussianBlur(radius)))


#: Drawn backdrops for the drawn characters' shots (a cartoon is drawn on drawn ground): name ->
#: (sky top, sky bottom, ground, scenery colour).
BACKDROPS = {
    "drawn_park": ((120, 180, 240), (200, 230, 250), (110, 170, 80), (60, 120, 60)),
    "drawn_street": ((40, 40, 110), (120, 80, 140), (70, 65, 75), (150, 70, 60)),
}


def backdrop(name: str, width: int = 1024, height: int = 576) -> np.ndarray:
    """A drawn backdrop (RGB uint8): a sky, a horizon of hills or houses, a ground with a path and
    a few clouds, the same every time (no randomness but the layout below)."""
    sky_top, sky_bottom, ground, scenery = BACKDROPS[name]
    t = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    rgb = np.asarray(sky_top, np.float32) * (1 - t) + np.asarray(sky_bottom, np.float32) * t
    image = Image.fromarray(np.broadcast_to(rgb, (height, width, 3)).round().astype(np.uint8))
    draw_ = ImageDraw.Draw(image)
    horizon = int(0.55 * height)
    if name == "drawn_park":
        for i, x in enumerate(range(-100, width + 200, 260)):
            draw_.ellipse(
                (x, horizon - 110 - 40 * (i % 2), x + 420, horizon + 140),
                fill=scenery,
                outline=OUTLINE,
                width=3,
            )
        for x in range(80, width, 330):
            draw_.rectangle(
                (x, horizon - 60, x + 24, horizon + 40), fill=(110, 80, 50), outline=OUTLINE, width=2
            )
            draw_.ellipse(
                (x - 55, horizon - 170, x + 80, horizon - 40), fill=(70, 140, 70), outline=OUTLINE, width=3
            )
    else:
        for i, x in enumerate(range(0, width, 200)):
            top = horizon - 150 - 60 * (i % 3)
            draw_.rectangle(
                (x, top, x + 190, horizon + 20),
                fill=_shade(scenery, 0.8 + 0.1 * (i % 3)),
                outline=OUTLINE,
                width=3,
            )
            for wx in range(x + 25, x + 170, 55):
                draw_.rectangle(
                    (wx, top + 30, wx + 30, top + 70), fill=(250, 240, 170), outline=OUTLINE, width=2
                )
    draw_.rectangle((0, horizon + 20, width, height), fill=ground)
    draw_.polygon(
        [
            (width * 0.35, height),
            (width * 0.65, height),
            (width * 0.55, horizon + 20),
            (width * 0.45, horizon + 20),
        ],
        fill=_shade(ground, 1.25),
    )
    for x, y in ((150, 70), (520, 40), (830, 95)):
        for dx, dy, r in ((0, 0, 34), (40, -15, 40), (85, 0, 32)):
            draw_.ellipse((x + dx - r, y + dy - r, x + dx + r, y + dy + r), fill=(250, 250, 250))
    return np.asarray(image)
