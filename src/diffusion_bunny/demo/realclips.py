"""Real footage at feature length: the Hamilton clip looped, every repeat varied, exact cut truth.

The only real footage the project may use (``../shared/testdata``) is a 9-second clip with four
shots (hard cuts where frames 20, 82 and 211 begin new shots). Looped, it gives a movie with a
cut every ~2.3 s, about as dense as a modern film. Looping alone would repeat frames, which
stage 02 drops as duplicates (pHash within ``dup_distance`` 4 bits) and stages 03/04 would see as
one face and one scene, so every repeat is varied:

* geometry: each shot of a repeat is seen through its own 16:9 crop box (40-95% of the source
  width, so never under 256 source pixels: stage 02's sharpness, measured 256 px wide, keeps its
  scale), rolled by up to 8 degrees, optionally mirrored; in about half the repeats the box moves
  slowly over each shot (a virtual pan and zoom: camera motion the source does not have);
  optionally letterbox or pillarbox bars (``Params.frames``);
* colour: hue rotation, saturation, per-channel gain (white balance and exposure), gamma and a
  light falloff across the frame, one set per repeat (a real grade is the same across a scene's
  cuts); the source is dark (mean gray 16-33), so most grades lift it;
* speed: 0.8-1.25x, by frame resampling (frames dropped or repeated, as a frame-rate conversion
  does), per repeat, so shot lengths vary and no repeat samples the same instants.

pHash is built to ignore crops, colour and scale, so crop and colour alone left half of 100
repeats within 4 bits of another one. Hence the roll and the falloff, and a guard: a repeat's
parameters are redrawn (up to ``max_tries``) while any of its probe frames (five source instants
per shot, rendered 256 px wide as stage 02 hashes them) lies within ``min_phash_distance`` - 1
bits of the same instant in an earlier repeat. Measured: 60 minutes (387 repeats) need 2.5 draws
a repeat on average, and every probe ends >= 6 bits from every earlier repeat's.

Truth (``<movie>.cuts.json``, the file ``python_script/bench_extract.py`` scores against): every
shot start except frame 0 is a hard cut, the junctions between repeats included. Everything is
deterministic by ``seed`` and repeat ``r``'s parameters depend only on the seed and the repeats
before it, so a 60-minute movie begins with the 10-minute one. Encoded with PyAV's libx264 (no
ffmpeg binary needed); cached under a name that hashes every parameter.

    uv run python -m diffusion_bunny.demo.realclips --minutes 10 --size 1280x720 --out data/real
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import itertools
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import cv2
import numpy as np

from diffusion_bunny.demo.overlays import burn_subtitles, credits_roll, title_card
from diffusion_bunny.stages.quality.scores import hamming, phash

ROOT = Path(__file__).resolve().parents[3]
#: ``../shared/testdata`` beside the project (``$DIFFUSION_BUNNY_TESTDATA`` overrides it, e.g. for a
#: git worktree that lives elsewhere).
TESTDATA = Path(os.environ.get("DIFFUSION_BUNNY_TESTDATA") or ROOT.parent / "shared" / "testdata")
HAMILTON = TESTDATA / "face_recognition_examples" / "short_hamilton_clip.mp4"
#: First frames of the Hamilton clip's shots (its README's ground truth) and its frame count.
HAMILTON_SHOTS = (0, 20, 82, 211)
HAMILTON_FRAMES = 275
#: Bump when rendering changes, so cached movies are never reused across versions.
VERSION = 2
ENCODE = {"preset": "veryfast", "crf": "23"}


@dataclass(frozen=True)
class Box:
    """A 16:9 crop box in source pixels: centre and width (height follows the source aspect)."""

    cx: float
    cy: float
    w: float


@dataclass(frozen=True)
class ShotPlan:
    """One shot of one repeat: which source frames, through which moving box."""

    source_shot: int
    source_start: int
    source_frames: int
    frames: int  # output frames (after resampling)
    box0: Box
    box1: Box  # == box0 when the camera stands still
    subtitle: str = ""  # burned into the bottom of the picture (Params.subtitles_p)


@dataclass(frozen=True)
class RepeatPlan:
    """The variation applied to one pass over the source clip."""

    index: int
    mirror: bool
    hue: float  # degrees
    saturation: float
    gain: tuple[float, float, float]  # R, G, B
    gamma: float
    speed: float
    moving: bool
    shots: tuple[ShotPlan, ...]
    roll: float = 0.0  # degrees, the camera's tilt about its axis (a Dutch angle)
    light: tuple[float, float] = (0.0, 0.0)  # direction (radians) and strength of a light falloff
    frame: str = "full"  # full (16:9), letterbox (2.39:1 in 16:9) or pillarbox (4:3 in 16:9)
    tries: int = 1
    min_distance: int = 64  # smallest pHash distance of its probes to an earlier repeat's

    @property
    def frames(self) -> int:
        return sum(s.frames for s in self.shots)


@dataclass(frozen=True)
class Params:
    """Everything that decides the movie's pixels (hashed into the cache name)."""

    minutes: float = 10.0
    width: int = 1280
    height: int = 720
    seed: int = 0
    speed: tuple[float, float] = (0.8, 1.25)
    crop: tuple[float, float] = (0.4, 0.95)  # crop width / source width (0.4: 256 px of 640)
    mirror_p: float = 0.5
    moving_p: float = 0.5
    roll: float = 8.0  # +- degrees
    light: float = 0.3  # light falloff: gain 1 -+ this across the frame
    frames: tuple[str, ...] = ("full",)  # add "letterbox", "pillarbox" for bars
    hue: float = 30.0  # +- degrees
    saturation: tuple[float, float] = (0.6, 1.4)
    # The source is dark (mean gray 16-33, under stage 02's min_brightness 35): most grades lift it.
    gain: tuple[float, float] = (0.9, 1.5)
    white_balance: float = 0.08  # +- per channel
    gamma: tuple[float, float] = (1.0, 1.7)
    min_phash_distance: int = 6  # > stage 02's dup_distance (4); distances are even
    max_tries: int = 60
    crf: int = 23
    preset: str = "veryfast"
    # A film as released: burned-in subtitles over this share of the shots, and title
    # cards before the first repeat and credits after the last (on black and on colour).
    subtitles_p: float = 0.0
    titles: bool = False
    # A night film: every frame through :func:`night_grade` after its repeat's own grade.
    night: bool = False
    # Old film: every frame's exposure drawn anew and film grain (:func:`flicker_grade`).
    flicker: bool = False
    # Old film's dark corners: a lens's cos^4 vignette of the picture (inside its bars) that
    # reaches this angle in radians at the corners (:func:`vignette_gain`; pi/4 darkens them to a quarter).
    vignette: float = 0.0

    def digest(self, source: Path) -> str:
        st = source.stat()
        doc = {**asdict(self), "version": VERSION, "source": [source.name, st.st_size]}
        # minutes=60 and minutes=60.0 are one movie (the benchmarks parse floats): one name.
        doc["minutes"] = float(doc["minutes"])
        # Settings added later leave the names of movies made without them unchanged.
        later = {"subtitles_p": 0.0, "titles": False, "night": False, "flicker": False, "vignette": 0.0}
        for key, default in later.items():
            if doc[key] == default:
                del doc[key]
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:8]


@dataclass
class Source:
    """The decoded source clip (RGB frames) and its shots."""

    frames: np.ndarray  # [N, H, W, 3] uint8 RGB
    fps: Fraction
    shot_starts: tuple[int, ...]
    _small: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)

    @property
    def size(self) -> tuple[int, int]:
        return self.frames.shape[2], self.frames.shape[1]

    def shots(self) -> list[tuple[int, int]]:
        ends = [*self.shot_starts[1:], len(self.frames)]
        return [(s, e - s) for s, e in zip(self.shot_starts, ends, strict=True)]


def load_source(path: Path = HAMILTON, shot_starts: Sequence[int] = HAMILTON_SHOTS) -> Source:
    """Decode the clip once with PyAV (275 frames of 640x360: 190 MB as RGB)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path} is absent (it lives in ../shared/testdata)")
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        fps = Fraction(stream.average_rate)
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(stream)])
    return Source(frames, fps, tuple(shot_starts))


# ---------------------------------------------------------------------------------------------
# Planning (pure)
# ---------------------------------------------------------------------------------------------


def _box(rng: np.random.Generator, params: Params, src_w: int, src_h: int) -> Box:
    w = rng.uniform(*params.crop) * src_w
    h = w * src_h / src_w
    # Beta(2, 2) places the box nearer the middle more often, so the subject usually stays in it.
    fx, fy = rng.beta(2.0, 2.0, 2)
    return Box(w / 2 + fx * (src_w - w), h / 2 + fy * (src_h - h), w)


def _moved(rng: np.random.Generator, box: Box, params: Params, src_w: int, src_h: int) -> Box:
    """Where a slowly moving box ends: shifted by 5-15% of the source width, zoomed by +-12%,
    kept inside the frame."""
    lo, hi = params.crop
    w = float(np.clip(box.w * rng.uniform(0.88, 1.12), lo * src_w, hi * src_w))
    h = w * src_h / src_w
    angle = rng.uniform(0, 2 * math.pi)
    dist = rng.uniform(0.05, 0.15) * src_w
    cx = float(np.clip(box.cx + dist * math.cos(angle), w / 2, src_w - w / 2))
    cy = float(np.clip(box.cy + dist * math.sin(angle), h / 2, src_h - h / 2))
    return Box(cx, cy, w)


def draw_repeat(
    index: int,
    params: Params,
    source_shots: Sequence[tuple[int, int]],
    src_size: tuple[int, int],
    attempt: int = 0,
) -> RepeatPlan:
    """Repeat ``index``'s variation (attempt ``attempt``), from the seed alone."""
    rng = np.random.default_rng([params.seed, index, attempt])
    src_w, src_h = src_size
    lo, hi = params.speed
    speed = float(math.exp(rng.uniform(math.log(lo), math.log(hi))))
    moving = bool(rng.random() < params.moving_p)
    shots = []
    for k, (start, n) in enumerate(source_shots):
        box0 = _box(rng, params, src_w, src_h)
        box1 = _moved(rng, box0, params, src_w, src_h) if moving else box0
        shots.append(ShotPlan(k, start, n, max(1, round(n / speed)), box0, box1))
    wb = rng.uniform(-params.white_balance, params.white_balance, 3)
    g = rng.uniform(*params.gain)
    roll = float(rng.uniform(-params.roll, params.roll))
    light = (float(rng.uniform(0, 2 * math.pi)), float(rng.uniform(0, params.light)))
    frame = str(params.frames[int(rng.integers(len(params.frames)))])
    if params.subtitles_p > 0:
        # Drawn from a generator of their own, so plans without subtitles stay as they were.
        sub = np.random.default_rng([params.seed, index, attempt, 29])
        shots = [
            replace(shot, subtitle=SUBTITLES[int(sub.integers(len(SUBTITLES)))])
            if sub.random() < params.subtitles_p
            else shot
            for shot in shots
        ]
    return RepeatPlan(
        index=index,
        mirror=bool(rng.random() < params.mirror_p),
        hue=float(rng.uniform(-params.hue, params.hue)),
        saturation=float(rng.uniform(*params.saturation)),
        gain=tuple(float(g * (1 + x)) for x in wb),  # type: ignore[arg-type]
        gamma=float(rng.uniform(*params.gamma)),
        speed=speed,
        moving=moving,
        shots=tuple(shots),
        roll=roll,
        light=light,
        frame=frame,
    )


def source_index(shot: ShotPlan, j: int) -> int:
    """The source frame shown at output frame ``j`` of the shot (nearest-frame resampling)."""
    if shot.frames <= 1:
        return shot.source_start
    pos = j * (shot.source_frames - 1) / (shot.frames - 1)
    return shot.source_start + min(shot.source_frames - 1, int(pos + 0.5))


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------


def colour_matrix(plan: RepeatPlan) -> np.ndarray:
    """3x3 RGB matrix: hue rotation about the gray axis, saturation, per-channel gain."""
    a = math.radians(plan.hue)
    c, s = math.cos(a), math.sin(a)
    k = 1 / 3
    r = math.sqrt(k)
    # Rodrigues rotation about (1, 1, 1)/sqrt(3).
    rot = np.array(
        [
            [c + (1 - c) * k, k * (1 - c) - r * s, k * (1 - c) + r * s],
            [k * (1 - c) + r * s, c + (1 - c) * k, k * (1 - c) - r * s],
            [k * (1 - c) - r * s, k * (1 - c) + r * s, c + (1 - c) * k],
        ]
    )
    luma = np.array([0.299, 0.587, 0.114])
    sat = plan.saturation * np.eye(3) + (1 - plan.saturation) * np.outer(np.ones(3), luma)
    return (np.diag(plan.gain) @ sat @ rot).astype(np.float32)


def gamma_lut(plan: RepeatPlan) -> np.ndarray:
    x = np.arange(256, dtype=np.float64) / 255.0
    return np.clip(np.round(255.0 * x ** (1.0 / plan.gamma)), 0, 255).astype(np.uint8)


#: Inner picture aspect per frame mode (the output frame itself is 16:9 or what ``size`` says).
FRAME_ASPECT = {"full": None, "letterbox": 2.39, "pillarbox": 4 / 3, "scope": 2.40}
#: Subtitles burned over shots of a film as released (Params.subtitles_p).
SUBTITLES = (
    "I am not throwing away my shot!",
    "Hey yo, I'm just like my country",
    "I'm young, scrappy and hungry",
    "The world turned upside down.",
    "Who lives, who dies, who tells your story?",
    "Wait for it.",
)
#: A film as released opens with two title cards and ends with credits (Params.titles):
#: (frames, lines, background RGB, scrolling).
OPENING = (
    (48, ("A DIFFUSION BUNNY PICTURE",), (0, 0, 0), False),
    (48, ("HAMILTON", "LOOPED"), (22, 66, 96), False),
)
CLOSING = (
    (
        96,
        ("Directed by", "A. Smithee", "Music by", "L.-M. Miranda", "Edited by", "T. Schoonmaker"),
        (0, 0, 0),
        True,
    ),
    (48, ("THE END",), (110, 24, 30), False),
)


#: The night grade (:func:`night_grade`): exposure in linear light, lift and gain in display
#: values, a blue white balance, and the sensor noise a night exposure shows (gray levels, sigma).
NIGHT_EXPOSURE = 0.12
NIGHT_LIFT = 9.0
NIGHT_TINT = (0.80, 0.92, 1.25)
NIGHT_NOISE = 1.5


def night_grade(rgb: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
    """``rgb`` (uint8) graded to a night look, the way a colourist darkens a day-lit scene.

    In linear light (sRGB decoded with gamma 2.2) the exposure drops to
    :data:`NIGHT_EXPOSURE` (about three stops), which in display values divides the picture by
    about 2.6; a lift of :data:`NIGHT_LIFT` raises the blacks (a night grade keeps a milky floor
    rather than crushed blacks), and a blue white balance (:data:`NIGHT_TINT`) gives the moonlit
    look. On the looped Hamilton movies' grades (mean luma 45-75) this gives mean luma ~24 and
    about a third of the contrast (standard deviation of luma), which is what a graded night
    film measures. Sensor noise of :data:`NIGHT_NOISE` gray levels is added when ``rng`` is
    given (per frame, so a still shot is not still in its noise, as a real night shot is not).
    Used by the night-graded looped movies (``Params.night``) and the film as released's night
    variant, so fixture and evaluation see the same grade.
    """
    y = cv2.LUT(rgb, _night_lut())
    if rng is None:
        return y
    y = y.astype(np.float32)
    y += rng.standard_normal(y.shape[:2], dtype=np.float32)[..., None] * NIGHT_NOISE
    return np.clip(y + 0.5, 0, 255).astype(np.uint8)


def night_graded_copy(movie: Path, out: Path) -> Path:
    """``movie`` night-graded (:func:`night_grade`, noise seeded by the frame index) into
    ``out`` (H.264 through PyAV, same size and frame rate; made once, reused while newer than
    ``movie``). The cut evaluation's real clip in a night grade."""
    return graded_copy(movie, out, lambda rgb, i: night_grade(rgb, np.random.default_rng([47, i])))


def flickering_copy(movie: Path, out: Path, seed: int = 1) -> Path:
    """``movie`` with old film's flicker and grain (:func:`flicker_grade`, seeded by ``seed`` and
    the frame index) into ``out``, as :func:`night_graded_copy` does. The cut evaluation's real
    clip as an old print (seed 1: the draw on which frame differences alone lost its second
    cut)."""
    return graded_copy(movie, out, lambda rgb, i: flicker_grade(rgb, np.random.default_rng([seed, i])))


def graded_copy(movie: Path, out: Path, grade: Callable[[np.ndarray, int], np.ndarray]) -> Path:
    """``movie``'s frames through ``grade(rgb, frame_index)`` into ``out`` (H.264 through PyAV,
    same size and frame rate, crf 18; made once, reused while newer than ``movie``)."""
    out = Path(out)
    if out.is_file() and out.stat().st_mtime >= Path(movie).stat().st_mtime:
        return out
    tmp = out.with_name(f".{out.name}.{os.getpid()}.part.mp4")
    with av.open(str(movie)) as src:
        stream = src.streams.video[0]
        fps = Fraction(stream.average_rate)
        rgb = [f.to_ndarray(format="rgb24") for f in src.decode(stream)]
    h, w = rgb[0].shape[:2]
    frames = (grade(f, i) for i, f in enumerate(rgb))
    _encode(tmp, frames, Params(width=w, height=h, crf=18), fps)
    tmp.replace(out)
    return out


#: Old film's flicker (:func:`flicker_grade`): each frame's exposure drawn anew, uniformly within
#: +- this share of its gain and +- this many gray levels of lift, and film grain of this many
#: gray levels (sigma, per pixel).
FLICKER_GAIN = 0.12
FLICKER_LIFT = 6.0
FLICKER_GRAIN = 6.0


def flicker_grade(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``rgb`` (uint8) as a worn print of old film shows it: the exposure of every frame differs
    (a projector's or a printer's light that is not steady, uneven development), by a gain of up
    to :data:`FLICKER_GAIN` and a lift of up to :data:`FLICKER_LIFT` either way, independently
    from frame to frame, and the grain of the emulsion (:data:`FLICKER_GRAIN`, new in every
    frame). On the Hamilton clip's grades (mean gray 40-75) a frame then moves by up to 20-30
    gray levels against its neighbour: in a still shot, as much as the change at a real cut
    between two shots of one scene. The cut evaluation's old-film movies (``Params.flicker``)."""
    gain = np.float32(1.0 + rng.uniform(-FLICKER_GAIN, FLICKER_GAIN))
    y = rgb.astype(np.float32) * gain + np.float32(rng.uniform(-FLICKER_LIFT, FLICKER_LIFT))
    y += rng.standard_normal(y.shape[:2], dtype=np.float32)[..., None] * np.float32(FLICKER_GRAIN)
    return np.clip(y + 0.5, 0, 255).astype(np.uint8)


def vignette_gain(width: int, height: int, angle: float) -> np.ndarray:
    """A lens's natural vignette over a ``width`` x ``height`` picture: the cos^4 law of
    illumination, ``cos(angle * d) ** 4`` with ``d`` the distance from the centre over the
    corner's (1 in the middle, ``cos(angle) ** 4`` in the corners), as ``[h, w, 1]`` float32.
    Old film shows it strongly (early lenses, a projector's gate); inside pillarbox bars it dims
    the picture's outer columns so far that they light little more than the bars do."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    d = np.hypot((xx + 0.5) / width - 0.5, (yy + 0.5) / height - 0.5) / math.hypot(0.5, 0.5)
    return (np.cos(angle * d) ** 4).astype(np.float32)[..., None]


@functools.cache
def _night_lut() -> np.ndarray:
    """The night grade without its noise as a per-channel table for ``cv2.LUT``, [256, 1, 3] uint8."""
    x = np.arange(256, dtype=np.float64) / 255.0
    lin = x**2.2 * NIGHT_EXPOSURE
    y = lin ** (1.0 / 2.2) * 255.0
    y = NIGHT_LIFT + y[:, None] * np.asarray(NIGHT_TINT) * (1.0 - NIGHT_LIFT / 255.0)
    lut = np.clip(np.round(y), 0, 255).astype(np.uint8).reshape(256, 1, 3)
    lut.flags.writeable = False
    return lut


class Renderer:
    """Output frames of one repeat at ``size``.

    One affine warp cuts the (rolled, possibly mirrored) box out of the source frame at about
    the box's own resolution (sub-pixel, so pans are smooth); colour (3x3 matrix, gamma table,
    light falloff) is applied there, then one resize to the output size. (Warping straight to
    720p costs 15 ms a frame here, against ~1 ms for the warp at box size plus 2 ms to resize.)
    """

    def __init__(self, source: Source, plan: RepeatPlan, size: tuple[int, int], vignette: float = 0.0):
        self.source = source
        self.plan = plan
        self.size = size
        self.matrix = colour_matrix(plan)
        self.lut = gamma_lut(plan)
        out_w, out_h = size
        aspect = FRAME_ASPECT[plan.frame]
        if aspect is None:
            self.inner = (out_w, out_h)
        elif aspect > out_w / out_h:
            self.inner = (out_w, 2 * round(out_w / aspect / 2))
        else:
            self.inner = (2 * round(out_h * aspect / 2), out_h)
        self._ramps: dict[tuple[int, int], np.ndarray] = {}
        self.vignette = vignette_gain(*self.inner, vignette) if vignette > 0 else None

    def _ramp(self, w: int, h: int) -> np.ndarray:
        ramp = self._ramps.get((w, h))
        if ramp is None:
            angle, strength = self.plan.light
            yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
            r = (xx / w - 0.5) * math.cos(angle) + (yy / h - 0.5) * math.sin(angle)
            ramp = (1.0 + 2.0 * strength * r).astype(np.float32)[..., None]
            self._ramps = {(w, h): ramp}
        return ramp

    def fit(self, box: Box) -> tuple[float, float]:
        """Width and height of ``box`` (inner aspect), shrunk until the rolled box lies inside
        the source frame."""
        src_w, src_h = self.source.size
        in_w, in_h = self.inner
        w = box.w
        h = w * in_h / in_w
        if h > src_h:
            w, h = src_h * in_w / in_h, src_h
        c, s = math.cos(math.radians(self.plan.roll)), math.sin(math.radians(self.plan.roll))
        # Half extents of the rolled box along x and y.
        for _ in range(60):
            ex, ey = abs(c) * w / 2 + abs(s) * h / 2, abs(s) * w / 2 + abs(c) * h / 2
            if box.cx - ex >= 0 and box.cx + ex <= src_w and box.cy - ey >= 0 and box.cy + ey <= src_h:
                break
            w, h = w * 0.97, h * 0.97
        return w, h

    def crop(self, img: np.ndarray, box: Box, subtitle: str = "") -> np.ndarray:
        in_w, in_h = self.inner
        w, h = self.fit(box)
        # Cut at the box's own resolution (not above the output's).
        mid_w = max(2, min(in_w, round(w)))
        mid_h = max(2, round(mid_w * in_h / in_w))
        sx, sy = w / mid_w, h / mid_h
        a = math.radians(self.plan.roll)
        c, s = math.cos(a), math.sin(a)
        m = -1.0 if self.plan.mirror else 1.0
        # Pixel (u, v) of the cut -> offset from the box centre (m*(u+0.5-mid_w/2)*sx,
        # (v+0.5-mid_h/2)*sy), rotated by the roll, plus the centre (pixel centres at +0.5).
        lin = np.array([[c * m * sx, -s * sy], [s * m * sx, c * sy]])
        off = np.array([box.cx - 0.5, box.cy - 0.5]) + lin @ np.array([0.5 - mid_w / 2, 0.5 - mid_h / 2])
        part = cv2.warpAffine(
            img, np.hstack([lin, off[:, None]]), (mid_w, mid_h),
            flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_REPLICATE,
        )  # fmt: skip
        part = cv2.transform(part, self.matrix)
        if self.plan.light[1] > 0:
            part = np.clip(part * self._ramp(mid_w, mid_h), 0, 255).astype(np.uint8)
        part = cv2.LUT(part, self.lut)
        inter = cv2.INTER_AREA if mid_w > in_w else cv2.INTER_LINEAR
        part = cv2.resize(part, (in_w, in_h), interpolation=inter)
        if self.vignette is not None:
            part = (part * self.vignette).astype(np.uint8)
        if subtitle:
            part = burn_subtitles(part, subtitle)
        return self.framed(part)

    def framed(self, part: np.ndarray) -> np.ndarray:
        """A picture of the inner size put in the output frame between its bars."""
        out_w, out_h = self.size
        in_w, in_h = self.inner
        if (in_w, in_h) == (out_w, out_h):
            return part
        top, left = (out_h - in_h) // 2, (out_w - in_w) // 2
        return cv2.copyMakeBorder(
            part, top, out_h - in_h - top, left, out_w - in_w - left, cv2.BORDER_CONSTANT, value=0
        )

    def frame(self, shot: ShotPlan, j: int) -> np.ndarray:
        t = j / max(1, shot.frames - 1)
        b0, b1 = shot.box0, shot.box1
        # Ease in and out, as a camera operator would.
        e = 0.5 - 0.5 * math.cos(math.pi * t)
        box = Box(b0.cx + (b1.cx - b0.cx) * e, b0.cy + (b1.cy - b0.cy) * e, b0.w + (b1.w - b0.w) * e)
        return self.crop(self.source.frames[source_index(shot, j)], box, shot.subtitle)

    def frames(self) -> Iterator[np.ndarray]:
        for shot in self.plan.shots:
            for j in range(shot.frames):
                yield self.frame(shot, j)


def phash_rgb(rgb: np.ndarray) -> int:
    """Stage 02's pHash of an RGB frame (gray, 256 px wide, then its 32x32 DCT hash)."""
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    h, w = gray.shape
    if w != 256:
        gray = cv2.resize(gray, (256, max(8, round(256 * h / w))), interpolation=cv2.INTER_AREA)
    return phash(gray)


PROBES = 5  # source instants per shot checked against earlier repeats


def probe_hashes(source: Source, plan: RepeatPlan) -> np.ndarray:
    """pHashes of the repeat at :data:`PROBES` evenly spread source instants per shot, rendered
    at 256x144 (stage 02 hashes a 256-px-wide copy), shape [shots, PROBES]."""
    r = Renderer(source, plan, (256, 144))
    out = np.zeros((len(plan.shots), PROBES), np.uint64)
    for k, shot in enumerate(plan.shots):
        for p in range(PROBES):
            j = round(p * (shot.frames - 1) / (PROBES - 1))
            out[k, p] = phash_rgb(r.frame(shot, j))
    return out


def plan_movie(params: Params, source: Source) -> list[RepeatPlan]:
    """Repeats until ``params.minutes`` is reached, each redrawn while it is within
    ``min_phash_distance`` of an earlier one (the least distant draw wins after ``max_tries``)."""
    target = round(params.minutes * 60 * float(source.fps))
    shots = source.shots()
    plans: list[RepeatPlan] = []
    seen: list[np.ndarray] = []  # [shots, PROBES] per accepted repeat
    total = 0
    while total < target:
        best: tuple[int, RepeatPlan, np.ndarray] | None = None
        for attempt in range(params.max_tries):
            plan = draw_repeat(len(plans), params, shots, source.size, attempt)
            hashes = probe_hashes(source, plan)
            dist = int(hamming(np.stack(seen), hashes[None]).min()) if seen else 64
            if best is None or dist > best[0]:
                best = (dist, plan, hashes)
            if dist >= params.min_phash_distance:
                break
        assert best is not None
        dist, plan, hashes = best
        plan = RepeatPlan(**{**plan.__dict__, "tries": attempt + 1, "min_distance": dist})
        plans.append(plan)
        seen.append(hashes)
        total += plan.frames
    return plans


def cut_truth(plans: Sequence[RepeatPlan]) -> list[int]:
    """First frames of every shot but the first: the hard cuts, junctions included."""
    starts, at = [], 0
    for plan in plans:
        for shot in plan.shots:
            starts.append(at)
            at += shot.frames
    return starts[1:]


def truth_path(movie: Path) -> Path:
    """Same name ``python_script/bench_extract.py`` reads."""
    return movie.with_suffix(".cuts.json")


def movie_name(params: Params, source_path: Path) -> str:
    tag = f"{params.minutes:g}".replace(".", "p")
    size = f"{params.width}x{params.height}"
    return f"hamilton-loop-{size}-{tag}min-seed{params.seed}-{params.digest(source_path)}"


def _plan_doc(plan: RepeatPlan, start: int) -> dict[str, Any]:
    doc = asdict(plan)
    doc["start_frame"] = start
    return doc


class _Cards:
    """Title cards and credits in the film's frame (between the same bars as its pictures)."""

    def __init__(self, renderer: Renderer):
        self.renderer = renderer

    def frames(
        self, segments: Sequence[tuple[int, tuple[str, ...], tuple[int, int, int], bool]]
    ) -> Iterator[np.ndarray]:
        size = self.renderer.inner
        for frames, lines, background, scroll in segments:
            still = None if scroll else self.renderer.framed(title_card(size, lines, background))
            for j in range(frames):
                if still is not None:
                    yield still
                else:
                    yield self.renderer.framed(credits_roll(size, lines, j / max(1, frames - 1), background))


def _cards(params: Params, source: Source, plan: RepeatPlan) -> _Cards:
    """Cards framed like the film's first repeat (a film as released is letterboxed throughout)."""
    return _Cards(Renderer(source, plan, (params.width, params.height)))


def make_movie(params: Params, out_dir: Path, source_path: Path = HAMILTON, verbose: bool = False) -> Path:
    """Render (or reuse) the movie; returns its path. The truth is written beside it."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    movie = out_dir / f"{movie_name(params, source_path)}.mp4"
    if movie.is_file() and truth_path(movie).is_file():
        return movie
    t0 = time.perf_counter()
    source = load_source(source_path)
    t_decode = time.perf_counter() - t0
    plans = plan_movie(params, source)
    t_plan = time.perf_counter() - t0 - t_decode
    tmp = movie.with_name(f".{movie.name}.part.mp4")
    n = _encode(tmp, _movie_frames(params, source, plans, verbose), params, source.fps)
    if verbose:
        print(file=sys.stderr)
    doc = {
        "movie": movie.name,
        "source": source_path.name,
        "fps": float(source.fps),
        "fps_fraction": [source.fps.numerator, source.fps.denominator],
        "width": params.width,
        "height": params.height,
        "frames": n,
        **_movie_truth(params, plans),
        "params": asdict(params),
        "version": VERSION,
        "created_s": round(time.perf_counter() - t0, 2),
        "decode_s": round(t_decode, 2),
        "plan_s": round(t_plan, 2),
        "repeats": [_plan_doc(p, s) for p, s in zip(plans, _repeat_starts(params, plans), strict=True)],
    }
    tmp.replace(movie)
    truth_path(movie).write_text(json.dumps(doc, indent=1) + "\n")
    return movie


def _movie_frames(
    params: Params, source: Source, plans: Sequence[RepeatPlan], verbose: bool
) -> Iterator[np.ndarray]:
    """The movie's RGB frames in order: opening cards, every repeat, closing credits."""
    cards = _cards(params, source, plans[0]) if params.titles else None

    def graded(frames: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
        for rgb in frames:
            i = next(counter)
            if params.night:
                rgb = night_grade(rgb, np.random.default_rng([params.seed, 47, i]))
            if params.flicker:
                rgb = flicker_grade(rgb, np.random.default_rng([params.seed, 48, i]))
            yield rgb

    counter = itertools.count()
    grade = graded if params.night or params.flicker else (lambda frames: frames)
    if cards:
        yield from grade(cards.frames(OPENING))
    for plan in plans:
        yield from grade(Renderer(source, plan, (params.width, params.height), params.vignette).frames())
        if verbose:
            print(f"\rrepeat {plan.index + 1}/{len(plans)}", end="", file=sys.stderr, flush=True)
    if cards:
        yield from grade(cards.frames(CLOSING))


def _encode(path: Path, frames: Iterator[np.ndarray], params: Params, fps: Fraction) -> int:
    """Encode RGB ``frames`` with libx264 (``params``' preset and crf) into ``path``; returns the
    number of frames written."""
    n = 0
    with av.open(str(path), "w", options={"movflags": "+faststart"}) as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = params.width, params.height, "yuv420p"
        stream.options = {"preset": params.preset, "crf": str(params.crf)}
        stream.codec_context.time_base = Fraction(1) / fps
        for rgb in frames:
            yuv = cv2.cvtColor(rgb, cv2.COLOR_RGB2YUV_I420)
            frame = av.VideoFrame.from_ndarray(yuv, format="yuv420p")
            frame.pts = n
            frame.time_base = stream.codec_context.time_base
            container.mux(stream.encode(frame))
            n += 1
        container.mux(stream.encode(None))
    return n


def _intro_frames(params: Params) -> int:
    """Frames of the opening title cards (none unless ``params.titles``)."""
    return sum(seg[0] for seg in OPENING) if params.titles else 0


def _repeat_starts(params: Params, plans: Sequence[RepeatPlan]) -> list[int]:
    """The first frame of every repeat in the movie (after the opening cards)."""
    starts, at = [], _intro_frames(params)
    for plan in plans:
        starts.append(at)
        at += plan.frames
    return starts


def _movie_truth(params: Params, plans: Sequence[RepeatPlan]) -> dict[str, Any]:
    """The truth's ``cuts``, ``text_shots`` (title cards, credits) and ``subtitled_shots`` (shots
    with burned-in subtitles), shots as ``[first frame, end frame)``."""
    intro = _intro_frames(params)
    starts = _repeat_starts(params, plans)
    at = intro + sum(plan.frames for plan in plans)
    cuts = [intro + c for c in cut_truth(plans)]
    text_shots: list[list[Any]] = []
    if params.titles:
        cuts = [OPENING[0][0], intro, *cuts]
        text_shots = [[0, OPENING[0][0], "title"], [OPENING[0][0], intro, "title"]]
        for frames, *_ in CLOSING:
            cuts.append(at)
            text_shots.append([at, at + frames, "credits"])
            at += frames
    subtitled = [
        [start + sum(x.frames for x in plan.shots[:k]), start + sum(x.frames for x in plan.shots[: k + 1])]
        for plan, start in zip(plans, starts, strict=True)
        for k, shot in enumerate(plan.shots)
        if shot.subtitle
    ]
    # A film as released: the shots that are text and the ones with burned-in subtitles.
    return {"cuts": cuts, "text_shots": text_shots, "subtitled_shots": subtitled}


def first_minutes(movie: Path, minutes: float) -> tuple[Path, int]:
    """The first ``minutes`` of ``movie`` (up to the first keyframe after them), copied without
    re-encoding into ``<stem>-first<minutes>min.mp4`` beside it, with its cut truth (made once);
    returns the path and its frame count."""
    out = movie.with_name(f"{movie.stem}-first{minutes:g}min.mp4")
    truth_out = truth_path(out)
    if out.is_file() and truth_out.is_file():
        return out, int(json.loads(truth_out.read_text())["frames"])
    tmp = out.with_name(f".{out.name}.{os.getpid()}.part.mp4")
    frames = 0
    with av.open(str(movie)) as src, av.open(str(tmp), "w") as dst:
        stream = src.streams.video[0]
        copy = dst.add_stream_from_template(stream)
        limit = Fraction(round(minutes * 60 * 1000), 1000)
        for packet in src.demux(stream):
            if packet.dts is None:
                continue
            if packet.is_keyframe and packet.pts is not None and packet.pts * stream.time_base >= limit:
                break
            packet.stream = copy
            dst.mux(packet)
            frames += 1
    tmp.replace(out)
    doc = json.loads(truth_path(movie).read_text())
    doc.update(
        movie=out.name, frames=frames, cuts=[c for c in doc["cuts"] if c < frames], cut_from=movie.name
    )
    doc.pop("repeats", None)
    truth_out.write_text(json.dumps(doc, indent=1) + "\n")
    return out, frames


def movie_of(params: Params, out_dir: Path, source_path: Path = HAMILTON, verbose: bool = False) -> Path:
    """The movie of ``params``: made earlier; else the first minutes of a longer movie made in
    ``out_dir`` with the same parameters (a movie begins with every shorter one of its seed, so
    the benchmarks share one rendering: 60 minutes take about half an hour on 2 cores); else
    rendered now (:func:`make_movie`)."""
    out_dir = Path(out_dir)
    exact = out_dir / f"{movie_name(params, source_path)}.mp4"
    if exact.is_file() and truth_path(exact).is_file():
        return exact
    longer: list[tuple[float, Path]] = []
    prefix = f"hamilton-loop-{params.width}x{params.height}-"
    for path in out_dir.glob(f"{prefix}*min-seed{params.seed}-*.mp4"):
        tag = path.name[len(prefix) :].split("min-seed", 1)[0]
        try:
            minutes = float(tag.replace("p", "."))
        except ValueError:
            continue
        same = movie_name(replace(params, minutes=minutes), source_path) == path.stem
        if same and minutes > params.minutes and truth_path(path).is_file():
            longer.append((minutes, path))
    if longer:
        return first_minutes(min(longer)[1], params.minutes)[0]
    return make_movie(params, out_dir, source_path, verbose=verbose)


def released(params: Params) -> Params:
    """``params`` made a film as released (see ``--released``). Encoded with x264's superfast
    preset: 1080p at feature length takes hours with veryfast on 2 cores, and superfast keeps
    what decoding costs (CABAC, B-frames)."""
    return replace(params, frames=("scope",), subtitles_p=0.2, titles=True, preset="superfast")


def _size(text: str) -> tuple[int, int]:
    w, _, h = text.lower().partition("x")
    return int(w), int(h)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--size", type=_size, default=(1280, 720), help="WxH, e.g. 1280x720 or 320x180")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "data" / "real"))
    ap.add_argument("--source", default=str(HAMILTON))
    ap.add_argument("--static", action="store_true", help="no moving crop boxes")
    ap.add_argument("--bars", action="store_true", help="also letterboxed and pillarboxed repeats")
    ap.add_argument(
        "--released",
        action="store_true",
        help="a film as released: scope (2.40:1) letterbox throughout, title cards, credits, "
        "burned-in subtitles over a fifth of the shots",
    )
    args = ap.parse_args(argv)
    params = Params(
        minutes=args.minutes,
        width=args.size[0],
        height=args.size[1],
        seed=args.seed,
        moving_p=0.0 if args.static else Params.moving_p,
        frames=("full", "letterbox", "pillarbox") if args.bars else Params.frames,
    )
    if args.released:
        params = released(params)
    t0 = time.perf_counter()
    movie = make_movie(params, Path(args.out), Path(args.source), verbose=True)
    doc = json.loads(truth_path(movie).read_text())
    took = time.perf_counter() - t0
    print(
        f"{movie}\n{doc['frames']} frames, {len(doc['repeats'])} repeats, {len(doc['cuts'])} cuts; "
        f"made in {doc['created_s']} s (this call {took:.1f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
