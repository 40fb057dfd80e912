"""Build the project's built-in demo movie together with exact ground truth.

The pipeline (shot detection, quality filter, face recognition, scene clustering) needs a movie
whose every answer is known in advance, that costs nothing to obtain and that is the same on
every machine.  Real films are neither free nor labelled, so this module *synthesises* one: it
films still images that ship inside installed packages (scikit-image's sample data and
matplotlib's ``grace_hopper.jpg``) with a virtual camera, cuts between them with hard cuts and
records, frame by frame, what it did in ``ground_truth.json``.

Nothing is downloaded: every source image is read from a file inside an installed wheel.  The
render is deterministic: camera paths are closed-form functions of the frame index, the
"sensor noise" comes from a seeded :class:`numpy.random.Generator`, and libx264 runs with a
single thread, so two builds produce byte-identical files.

The recipe below covers every case later stages are graded on:

* static shots (fixed framing plus a little Gaussian sensor noise, like a locked-off camera),
* a slow pan and a slow zoom into a face (dynamic shots, motion score far above the noise),
* a strongly blurred shot and a very dark shot (the quality filter must reject them),
* a shot that repeats an earlier one frame for frame (duplicate / scene-clustering check),
* two people, ``"astronaut"`` (Eileen Collins) and ``"grace_hopper"``, each in a static and a
  dynamic shot, with faces well above the 80 px that dlib's HOG detector needs,
* two drawn characters (:mod:`diffusion_bunny.demo.cartoons`: the girl ``"mika"`` and the dog
  ``"biscuit"``) walking through two panning shots of drawn backdrops, found from references that
  are no photos.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import av
import cv2
import numpy as np
from av.video.reformatter import ColorRange, Colorspace
from PIL import Image
from tqdm.auto import tqdm

from diffusion_bunny.codegraph import code_hash
from diffusion_bunny.demo.cartoons import BACKDROPS, Pose, backdrop, cast, draw
from diffusion_bunny.media.samples import load_source

DEMO_FPS = 24
DEMO_SIZE = (640, 360)  # width, height

#: Bump whenever the meaning of the movie or of its ground truth changes.  Builds already on
#: disk are also rebuilt when the recipe's fingerprint (see `recipe_fingerprint`) changes, so a
#: forgotten bump cannot leave a cached movie that silently disagrees with the code.
RECIPE_VERSION = "demo-v2"

MOVIE_NAME = "demo_movie.mp4"
GROUND_TRUTH_NAME = "ground_truth.json"

#: Base seed of the sensor noise; each shot derives its own stream from it (see `_noise_rng`).
NOISE_SEED = 20240601
#: Standard deviation of the additive sensor noise, on the 0-255 scale.  Enough to make static
#: shots look like footage (no two frames identical) yet far below the motion of a pan.
NOISE_SIGMA = 2.0
#: Gaussian blur of the "out of focus" shot, in output pixels.
BLUR_SIGMA = 6.0
#: Brightness factor of the "under-exposed" shot.
DARK_GAIN = 0.13

#: x264 settings.  crf 18 is visually transparent, so the detectors see the pixels we rendered
#: rather than codec artefacts; "veryfast" encodes about three times faster than "medium",
#: which matters because the tests build the movie twice.  The encoder also runs
#: single-threaded (see `_encode`): x264's output depends on its thread count, which it would
#: otherwise derive from the number of CPUs, so the bytes would differ between machines.
X264_OPTIONS = {"crf": "18", "preset": "veryfast"}

Kind = Literal["static", "dynamic"]

#: FFmpeg's code for SMPTE 170M (BT.601 525-line) in its colorspace, primaries and transfer
#: enumerations alike.
_SMPTE170M = 6


@dataclass(frozen=True)
class Camera:
    """Virtual camera framing: a crop of the source, centred at ``(cx, cy)``, ``width`` wide.

    Coordinates are in source pixels.  The crop height follows from the 16:9 output aspect.
    """

    cx: float
    cy: float
    width: float


@dataclass(frozen=True)
class Walk:
    """A drawn character (:data:`diffusion_bunny.demo.cartoons.CAST`) crossing a shot: its height
    and the middle of its feet at the first and the last frame, in output pixels, walking (its
    legs swing a step every ``step_frames`` frames) and facing the way it goes."""

    name: str
    height: float
    start: tuple[float, float]
    end: tuple[float, float]
    step_frames: int = 16


@dataclass(frozen=True)
class ShotSpec:
    """One shot of the recipe: which image, how it is filmed and what is wrong with it.

    A dynamic shot moves the camera from ``start`` to ``end`` (``end`` is ``None`` for a static
    shot).  ``repeat_of`` names an earlier shot whose frames are reproduced exactly; such a
    spec copies all other fields of the original, so there is one source of truth for them.
    """

    source: str
    n_frames: int
    start: Camera
    end: Camera | None = None
    blurred: bool = False
    dark: bool = False
    faces: tuple[str, ...] = ()
    repeat_of: int | None = None
    walks: tuple[Walk, ...] = ()

    @property
    def kind(self) -> Kind:
        """``"dynamic"`` when the camera moves, else ``"static"``."""
        return "static" if self.end is None else "dynamic"


# Framings were chosen from where dlib's HOG detector boxes the faces in the sources: the
# astronaut's at about x 177-266, y 80-170 of the 512x512 image, Grace Hopper's at about
# x 170-370, y 138-340 of the 512x600 image.  Every framing keeps that box in view, upright,
# and at least about 100 output pixels tall.
_ASTRONAUT_WIDE = ShotSpec(
    source="astronaut",
    n_frames=84,
    start=Camera(cx=256.0, cy=144.0, width=512.0),
    faces=("astronaut",),
)

#: The recipe.  Adjacent shots always show a different image, so every cut is a large jump in
#: colour and layout for a content detector, and nothing inside a shot is.
RECIPE: tuple[ShotSpec, ...] = (
    # 0: static, wide: astronaut with flag and shuttle model (face about 120 px tall).
    _ASTRONAUT_WIDE,
    # 1: static coffee cup.
    ShotSpec(source="coffee", n_frames=90, start=Camera(cx=300.0, cy=200.0, width=600.0)),
    # 2: dynamic, Grace Hopper: tilt down from her cap to her face while pushing in slightly
    # (face box about 260 -> 310 px).  Her face is too large in a too narrow image for a sideways
    # pan that keeps it in frame at a sensible size.
    ShotSpec(
        source="grace_hopper",
        n_frames=84,
        start=Camera(cx=256.0, cy=196.0, width=512.0),
        end=Camera(cx=270.0, cy=239.0, width=440.0),
        faces=("grace_hopper",),
    ),
    # 3: static but badly out of focus: the cat.
    ShotSpec(
        source="chelsea",
        n_frames=84,
        start=Camera(cx=225.5, cy=150.0, width=451.0),
        blurred=True,
    ),
    # 4: static rocket on the launch pad.
    ShotSpec(source="rocket", n_frames=90, start=Camera(cx=320.0, cy=213.5, width=640.0)),
    # 5: dynamic, slow zoom into the astronaut's face: from a low wide framing (badge and
    # helmet ring) tilt up onto her face while pushing in 1.28x.  The push-in stops at 1.6x
    # the source resolution: further in, the upscaled frames get as soft as the blurred shot.
    ShotSpec(
        source="astronaut",
        n_frames=96,
        start=Camera(cx=256.0, cy=214.0, width=512.0),
        end=Camera(cx=222.0, cy=125.0, width=400.0),
        faces=("astronaut",),
    ),
    # 6: dynamic, slow pan (about 2.4 px per frame) along a motorcycle in a garage.
    ShotSpec(
        source="motorcycle",
        n_frames=84,
        start=Camera(cx=270.0, cy=250.0, width=540.0),
        end=Camera(cx=440.0, cy=250.0, width=540.0),
    ),
    # 7: static Grace Hopper, wide (face box about 215 px tall).
    ShotSpec(
        source="grace_hopper",
        n_frames=90,
        start=Camera(cx=256.0, cy=204.0, width=512.0),
        faces=("grace_hopper",),
    ),
    # 8: static but badly under-exposed: a stained tissue slide.
    ShotSpec(
        source="immunohistochemistry",
        n_frames=84,
        start=Camera(cx=256.0, cy=256.0, width=512.0),
        dark=True,
    ),
    # 9: exact repeat of shot 0 (same frames, same noise).
    ShotSpec(
        source=_ASTRONAUT_WIDE.source,
        n_frames=_ASTRONAUT_WIDE.n_frames,
        start=_ASTRONAUT_WIDE.start,
        faces=_ASTRONAUT_WIDE.faces,
        repeat_of=0,
    ),
    # 10: the cat again, this time sharp.
    ShotSpec(source="chelsea", n_frames=90, start=Camera(cx=225.5, cy=150.0, width=451.0)),
    # 11: a drawn girl walks through a drawn park while the camera pans along.
    ShotSpec(
        source="drawn_park",
        n_frames=72,
        start=Camera(cx=420.0, cy=300.0, width=760.0),
        end=Camera(cx=600.0, cy=300.0, width=760.0),
        walks=(Walk("mika", 230.0, (170.0, 345.0), (450.0, 345.0)),),
    ),
    # 12: a cartoon dog trots down a drawn street, the camera following it.
    ShotSpec(
        source="drawn_street",
        n_frames=72,
        start=Camera(cx=600.0, cy=300.0, width=760.0),
        end=Camera(cx=420.0, cy=300.0, width=760.0),
        walks=(Walk("biscuit", 150.0, (460.0, 340.0), (220.0, 340.0)),),
    ),
)


@dataclass(frozen=True)
class DemoMovie:
    """Paths of a built demo movie and its ground truth."""

    path: Path
    ground_truth_path: Path

    def ground_truth(self) -> dict[str, Any]:
        """Parse ``ground_truth.json``; read on demand so callers always see what is on disk."""
        return json.loads(self.ground_truth_path.read_text(encoding="utf-8"))


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


def _camera_at(spec: ShotSpec, i: int) -> Camera:
    """Camera of frame ``i`` of ``spec``: linear pan, geometric (constant-speed) zoom.

    A geometric interpolation of the width makes the zoom look uniform (each frame enlarges by
    the same factor) instead of accelerating towards the end.
    """
    if spec.end is None:
        return spec.start
    t = i / (spec.n_frames - 1)
    a, b = spec.start, spec.end
    width = a.width * (b.width / a.width) ** t
    return Camera(cx=a.cx + (b.cx - a.cx) * t, cy=a.cy + (b.cy - a.cy) * t, width=width)


def _film(src: np.ndarray, cam: Camera) -> np.ndarray:
    """Render the crop ``cam`` of ``src`` to a float32 output frame (subpixel accurate).

    Uses one inverse affine warp instead of crop-then-resize so fractional positions and sizes
    move smoothly; pixel centres are mapped exactly, so an integer 1:1 crop is lossless.
    """
    out_w, out_h = DEMO_SIZE
    scale = cam.width / out_w  # source pixels per output pixel
    x0 = cam.cx - cam.width / 2
    y0 = cam.cy - scale * out_h / 2
    if x0 < -0.5 or y0 < -0.5 or x0 + cam.width > src.shape[1] + 0.5:
        raise ValueError(f"camera {cam} leaves the source image {src.shape}")
    if y0 + scale * out_h > src.shape[0] + 0.5:
        raise ValueError(f"camera {cam} leaves the source image {src.shape}")
    # Output pixel centre (u + 0.5) maps to source coordinate x0 + (u + 0.5) * scale, whose
    # pixel index is that minus 0.5.
    m = np.array(
        [
            [scale, 0.0, x0 + 0.5 * scale - 0.5],
            [0.0, scale, y0 + 0.5 * scale - 0.5],
        ],
        dtype=np.float64,
    )
    frame = cv2.warpAffine(
        src.astype(np.float32),
        m,
        (out_w, out_h),
        flags=cv2.INTER_CUBIC | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_REFLECT_101,
    )
    return frame


def _noise_rng(shot_id: int) -> np.random.Generator:
    """Noise stream of one shot, seeded by the shot id so a repeat can replay it exactly."""
    return np.random.default_rng([NOISE_SEED, shot_id])


def walk_at(walk: Walk, i: int, n_frames: int) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """The drawing of ``walk`` in frame ``i`` of its shot (RGBA) and its box (left, top, right,
    bottom) in output pixels."""
    t = i / max(1, n_frames - 1)
    x = walk.start[0] + (walk.end[0] - walk.start[0]) * t
    y = walk.start[1] + (walk.end[1] - walk.start[1]) * t
    going_left = walk.end[0] < walk.start[0]
    look = cast(walk.name)
    # Animals face right as drawn, people face the viewer: an animal going left is mirrored.
    pose = Pose(
        step=(i / walk.step_frames) % 1.0,
        turn=-0.3 if going_left else 0.3,
        mirror=going_left and look.family == "animal",
    )
    drawing = draw(look, pose, round(walk.height))
    h, w = drawing.rgba.shape[:2]
    left, top = round(x - w / 2), round(y - h)
    return drawing.rgba, (left, top, left + w, top + h)


def _paste_walks(clean: np.ndarray, spec: ShotSpec, i: int) -> np.ndarray:
    """``clean`` (float32 RGB) with the shot's drawn characters blended in at frame ``i``."""
    out = clean.copy()
    for walk in spec.walks:
        rgba, (left, top, right, bottom) = walk_at(walk, i, spec.n_frames)
        out_h, out_w = out.shape[:2]
        x0, y0, x1, y1 = max(0, left), max(0, top), min(out_w, right), min(out_h, bottom)
        if x1 <= x0 or y1 <= y0:
            continue
        part = rgba[y0 - top : y1 - top, x0 - left : x1 - left].astype(np.float32)
        alpha = part[..., 3:4] / 255.0
        out[y0:y1, x0:x1] = out[y0:y1, x0:x1] * (1.0 - alpha) + part[..., :3] * alpha
    return out


def render_shot(spec: ShotSpec, shot_id: int) -> Iterator[np.ndarray]:
    """Yield the ``uint8`` RGB frames (360x640x3) of one shot, in order.

    Effects are applied in camera order: optics (blur) first, then exposure (dark), then sensor
    noise, so the noise stays visible in the blurred and dark shots as it would in real footage.
    """
    src = backdrop(spec.source) if spec.source in BACKDROPS else load_source(spec.source)
    seed_id = shot_id if spec.repeat_of is None else spec.repeat_of
    rng = _noise_rng(seed_id)
    out_w, out_h = DEMO_SIZE
    static_frame: np.ndarray | None = None
    for i in range(spec.n_frames):
        if spec.kind == "static" and static_frame is not None:
            clean = static_frame
        else:
            clean = _film(src, _camera_at(spec, i))
            if spec.blurred:
                clean = cv2.GaussianBlur(clean, (0, 0), sigmaX=BLUR_SIGMA, sigmaY=BLUR_SIGMA)
            if spec.dark:
                clean = clean * np.float32(DARK_GAIN)
            if spec.kind == "static":
                static_frame = clean
        if spec.walks:
            clean = _paste_walks(clean, spec, i)
        # Luminance-only grain (one draw per pixel, shared by R, G and B): what video footage
        # mostly shows after in-camera chroma denoising and 4:2:0 subsampling, and a third of
        # the cost of drawing three channels, which dominates render time.
        grain = rng.standard_normal((out_h, out_w), dtype=np.float32)
        grain *= np.float32(NOISE_SIGMA)
        # One pass: add, round half to even, saturate to 0..255.
        yield cv2.add(clean, cv2.merge([grain, grain, grain]), dtype=cv2.CV_8U)


def _resolve(recipe: tuple[ShotSpec, ...]) -> tuple[ShotSpec, ...]:
    """Check the recipe's invariants; fail loudly rather than write wrong ground truth."""
    for shot_id, spec in enumerate(recipe):
        if spec.n_frames < 2:
            raise ValueError(f"shot {shot_id} is too short")
        if spec.repeat_of is not None:
            if not 0 <= spec.repeat_of < shot_id - 1:
                raise ValueError(f"shot {shot_id} must repeat an earlier, non-adjacent shot")
            orig = recipe[spec.repeat_of]
            if orig.repeat_of is not None or orig != ShotSpec(**{**vars(spec), "repeat_of": None}):
                raise ValueError(f"shot {shot_id} differs from the shot it repeats")
        if shot_id and recipe[shot_id - 1].source == spec.source:
            raise ValueError(f"shots {shot_id - 1} and {shot_id} film the same image")
    return recipe


def recipe_fingerprint(recipe: tuple[ShotSpec, ...]) -> str:
    """Short hash of everything that decides the rendered pixels and the ground truth.

    Stored beside ``recipe_version`` so a cached build is recognised as stale after any edit
    of the recipe or of the render settings, even when nobody bumped the version.
    """
    settings = {
        "recipe": repr(recipe),
        "size": DEMO_SIZE,
        "fps": DEMO_FPS,
        "noise": [NOISE_SEED, NOISE_SIGMA],
        "blur": BLUR_SIGMA,
        "dark": DARK_GAIN,
        "x264": X264_OPTIONS,
        "cartoons": code_hash("diffusion_bunny.demo.cartoons"),
    }
    blob = json.dumps(settings, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def ground_truth_for(recipe: tuple[ShotSpec, ...] | None = None) -> dict[str, Any]:
    """Ground truth of ``recipe`` (default: `RECIPE`): frame ranges and labels of every shot.

    Computed from the recipe alone, without rendering, so it is exact by construction.
    """
    recipe = RECIPE if recipe is None else recipe
    shots: list[dict[str, Any]] = []
    frame = 0
    for shot_id, spec in enumerate(_resolve(recipe)):
        shots.append(
            {
                "shot_id": shot_id,
                "start_frame": frame,
                "end_frame": frame + spec.n_frames,
                "kind": spec.kind,
                "source": spec.source,
                "blurred": spec.blurred,
                "dark": spec.dark,
                "repeat_of": spec.repeat_of,
                "faces": list(spec.faces),
                # Who is in the shot: the people's faces and the drawn characters.
                "characters": sorted({*spec.faces, *(w.name for w in spec.walks)}),
            }
        )
        frame += spec.n_frames
    return {
        "recipe_version": RECIPE_VERSION,
        "recipe_fingerprint": recipe_fingerprint(recipe),
        "fps": DEMO_FPS,
        "width": DEMO_SIZE[0],
        "height": DEMO_SIZE[1],
        "n_frames": frame,
        "cuts": [s["start_frame"] for s in shots[1:]],
        "shots": shots,
    }


def _encode(frames: Iterator[np.ndarray], path: Path, total: int, progress: bool) -> None:
    """Encode RGB frames to an H.264/MP4 file at ``path`` reproducibly."""
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=DEMO_FPS, options=dict(X264_OPTIONS))
        stream.width, stream.height = DEMO_SIZE
        stream.pix_fmt = "yuv420p"
        cc = stream.codec_context
        # A fixed thread count keeps the bitstream independent of the machine's CPU count.
        cc.thread_count = 1
        # Say in the stream which RGB->YUV matrix was used (BT.601, limited range, as for any
        # SD video), so no player or decoder has to guess it.
        cc.colorspace = cc.color_primaries = cc.color_trc = _SMPTE170M
        cc.color_range = int(ColorRange.MPEG)
        for rgb in tqdm(frames, total=total, desc="demo movie", unit="frame", disable=not progress):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(
                format="yuv420p",
                dst_colorspace=Colorspace.ITU601,
                dst_color_range=ColorRange.MPEG,
                threads=1,
            )
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


def _is_current(movie: DemoMovie, recipe: tuple[ShotSpec, ...]) -> bool:
    """True if ``movie`` exists on disk and was built from this version of ``recipe``."""
    if not (movie.path.is_file() and movie.ground_truth_path.is_file()):
        return False
    try:
        gt = movie.ground_truth()
    except (OSError, ValueError):
        return False
    return (
        isinstance(gt, dict)
        and gt.get("recipe_version") == RECIPE_VERSION
        and gt.get("recipe_fingerprint") == recipe_fingerprint(recipe)
    )


#: Mode of the finished files: mkstemp creates its files private (0600), which would hide a
#: shared demo build from other users of the machine.
_FILE_MODE = 0o644


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file + rename so readers never see half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def build_demo_movie(dest_dir: Path, force: bool = False, progress: bool = True) -> DemoMovie:
    """Build the demo movie in ``dest_dir``, or reuse the one there if it is current.

    A build is reused when both files exist and the ground truth carries this recipe version
    (and fingerprint); ``force`` rebuilds anyway.  Building takes seconds, not minutes, but
    every notebook and test asks for the movie, hence the reuse.  The movie is written to a
    temp file in ``dest_dir`` and renamed into place, and the ground truth is written last, so
    an interrupted build never leaves a pair that looks complete.
    """
    dest_dir = Path(dest_dir)
    recipe = RECIPE  # read once: the whole build must use one recipe
    movie = DemoMovie(path=dest_dir / MOVIE_NAME, ground_truth_path=dest_dir / GROUND_TRUTH_NAME)
    if not force and _is_current(movie, recipe):
        return movie
    dest_dir.mkdir(parents=True, exist_ok=True)
    gt = ground_truth_for(recipe)
    # Drop stale ground truth first: if we are interrupted, the pair must not look complete.
    movie.ground_truth_path.unlink(missing_ok=True)

    def frames() -> Iterator[np.ndarray]:
        for shot_id, spec in enumerate(recipe):
            yield from render_shot(spec, shot_id)

    fd, tmp_name = tempfile.mkstemp(dir=dest_dir, prefix=f".{MOVIE_NAME}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        _encode(frames(), tmp, gt["n_frames"], progress)
        digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
        tmp.chmod(_FILE_MODE)
        os.replace(tmp, movie.path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    gt["movie_sha256"] = digest
    _atomic_write_bytes(movie.ground_truth_path, (json.dumps(gt, indent=2) + "\n").encode())
    return movie


# --------------------------------------------------------------------------------------------
# Character references
# --------------------------------------------------------------------------------------------

#: Reference portraits for stage 03: (source, crop box x0, y0, x1, y1 in the source image).  They
#: are mirrored crops of the same photos the movie films, so the demo shows naming at work on
#: faces seen from the other side, at another scale, without any download.
REFERENCE_CROPS = {
    "astronaut": ("astronaut", (120, 20, 330, 250)),
    "grace_hopper": ("grace_hopper", (110, 70, 430, 420)),
}


def _drawn_references(dest_dir: Path) -> None:
    """The demo's drawn characters as a user would show them: the girl as a sprite with
    transparency, the dog on a poster (a JPEG with a painted ground), each in a pose the movie
    never shows."""
    sprite = dest_dir / "mika" / "mika_sprite.png"
    if not sprite.is_file():
        sprite.parent.mkdir(parents=True, exist_ok=True)
        rgba = draw(cast("mika"), Pose(arms_up=1.0, mouth="open", turn=-0.4, tilt=8.0), 300).rgba
        buf = io.BytesIO()
        Image.fromarray(rgba, "RGBA").save(buf, format="PNG")
        _atomic_write_bytes(sprite, buf.getvalue())
    poster = dest_dir / "biscuit" / "biscuit_poster.jpg"
    if not poster.is_file():
        poster.parent.mkdir(parents=True, exist_ok=True)
        rgba = draw(cast("biscuit"), Pose(step=0.3, turn=0.5, mouth="open", tilt=-6.0), 220).rgba
        h, w = rgba.shape[:2]
        ground = np.zeros((h + 80, w + 120, 3), np.float32)
        ground[:] = np.linspace((200, 225, 245), (120, 170, 110), h + 80, dtype=np.float32)[:, None, :]
        alpha = rgba[..., 3:4].astype(np.float32) / 255.0
        part = ground[50 : 50 + h, 60 : 60 + w]
        ground[50 : 50 + h, 60 : 60 + w] = part * (1.0 - alpha) + rgba[..., :3] * alpha
        buf = io.BytesIO()
        Image.fromarray(ground.round().astype(np.uint8)).save(buf, format="JPEG", quality=90)
        _atomic_write_bytes(poster, buf.getvalue())


def build_demo_references(dest_dir: Path) -> Path:
    """Write ``dest_dir/<character>/...`` for the demo's two people (their portraits) and its two
    drawn characters (:func:`_drawn_references`), once, and return ``dest_dir``, the folder
    ``characters.reference_dir`` points at in ``bunny demo``."""
    dest_dir = Path(dest_dir)
    _drawn_references(dest_dir)
    for name, (source, (x0, y0, x1, y1)) in REFERENCE_CROPS.items():
        path = dest_dir / name / f"{name}.png"
        if path.is_file():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        crop = np.ascontiguousarray(load_source(source)[y0:y1, x0:x1, :][:, ::-1])
        buf = io.BytesIO()
        Image.fromarray(crop).save(buf, format="PNG")
        _atomic_write_bytes(path, buf.getvalue())
    return dest_dir
