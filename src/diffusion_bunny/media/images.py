"""Picture files and measures on pictures that several stages share.

Stage 01 judges sharpness on its analysis copies, stage 02 on the saved frames, stage 03 on face
crops: the same measure (:func:`laplacian_variance`) everywhere, so the numbers compare. Stage 02
and stage 04 both read thousands of JPEGs and must tell a truncated file from a dull picture
(:func:`jpeg_truncated`). Every measure after stage 01 looks at the shot's picture box, never at
letterbox bars: :func:`read_image` (with ``region``) and :func:`decode_picture` (bytes, gray or
colour, None for a bad file: stage 02 scores thousands) decode a frame at reduced scale and crop
its box with :func:`crop_region` (:func:`frame_box` reads the box from a ``frames`` row).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from diffusion_bunny.errors import BadInputError


def eight_bit(im: Image.Image) -> Image.Image:
    """``im`` with 8-bit grey in place of 16- or 32-bit integer or floating grey, its
    transparent value (a PNG's tRNS) kept as transparency. Pillow's own conversion of those
    modes clips each value at 255 instead of scaling it: a 16-bit grey PNG (line art from Krita
    or GIMP, a scan) was read as a white picture, a 0-1 float TIFF as a black one, and a
    16-bit grey PNG's transparent background as black."""
    if im.mode not in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        return im
    raw = np.asarray(im)
    grey = np.nan_to_num(raw.astype(np.float64))
    peak = grey.max(initial=0)
    if im.mode.startswith("I;16"):
        top = 65535.0  # 16-bit by its mode, however dark the picture
    elif im.mode == "F":
        top = 1.0 if peak <= 1.0 else 255.0 if peak <= 255 else peak
    else:
        top = 255.0 if peak <= 255 else 65535.0 if peak <= 65535 else peak
    out = Image.fromarray((grey.clip(0, top) * (255.0 / top)).round().astype(np.uint8))
    transparent = im.info.get("transparency")
    if isinstance(transparent, int) and not isinstance(transparent, bool):
        alpha = np.where(raw == transparent, 0, 255).astype(np.uint8)
        out = Image.merge("LA", (out, Image.fromarray(alpha)))
    return out


@contextmanager
def opencv_threads(n: int) -> Iterator[None]:
    """OpenCV's thread pool at ``n`` threads while the block runs, as it was afterwards.

    OpenCV splits even a 256x144 resize or colour conversion over its pool, whose idle workers
    wait actively (``sched_yield`` in a loop). Stage 01 makes tens of such calls a frame while
    the decoder's threads want every core: on the 10-minute 720p loop (2 cores, perf) OpenCV's
    second thread spent 2.8 s of CPU yielding and no picture came sooner; with one thread the
    stage spent 1.5-2.5 s less system CPU (four interleaved runs, the same shots)."""
    before = cv2.getNumThreads()
    cv2.setNumThreads(n)
    try:
        yield
    finally:
        cv2.setNumThreads(before)


def laplacian_variance(gray: np.ndarray) -> float:
    """Variance of the Laplacian: the value of ``Laplacian(CV_32F).var()`` (to rounding), from
    a 16-bit Laplacian's sum and sum of squares. Stage 01 measures it on every decoded frame,
    where the cost counts: OpenCV's ``sum`` and ``norm`` are vectorised and ``meanStdDev`` is
    not (22 against 50 microseconds on a 256x144 copy; the 32-bit route costs about 60)."""
    lap = cv2.Laplacian(gray, cv2.CV_16S)
    n = lap.size
    mean = cv2.sumElems(lap)[0] / n
    return float(max(0.0, cv2.norm(lap, cv2.NORM_L2SQR) / n - mean * mean))


def jpeg_truncated(data: np.ndarray) -> bool:
    """Whether the bytes of a JPEG file lack its end marker (FF D9): libjpeg fills a truncated
    JPEG with grey and only warns, so such a frame would pass for a dull one. Stage 01 writes
    plain JPEGs that end with the marker."""
    if data.size < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return False
    return b"\xff\xd9" not in data[-32:].tobytes()


def read_rgb(path: str | Path) -> np.ndarray | None:
    """A picture file as an RGB array at full size, or None when it is missing, empty, a
    truncated JPEG (:func:`jpeg_truncated`) or not a decodable image: the one reader of whole
    pictures (stage 03's frames and references, stage 06's exports, the identity scores).

    Decoded straight to RGB (libjpeg converts to either order at no cost): the same pixels as
    decoding to BGR and swapping, or as Pillow's decode, 1.4 ms less than the swap per 1080p
    frame and half Pillow's time."""
    data = np.fromfile(str(path), dtype=np.uint8) if Path(path).is_file() else None
    if data is None or data.size == 0 or jpeg_truncated(data):
        return None
    return cv2.imdecode(data, cv2.IMREAD_COLOR_RGB)


#: The JPEG is decoded at the largest libjpeg reduction that leaves at least this many pixels on
#: its short side, so the final area resize always averages a pixel or more of real data.
MIN_DECODE_SIDE = 96

_REDUCED_COLOR = (
    (8, cv2.IMREAD_REDUCED_COLOR_8),
    (4, cv2.IMREAD_REDUCED_COLOR_4),
    (2, cv2.IMREAD_REDUCED_COLOR_2),
)


# --------------------------------------------------------------------------------------------
# Reading frames
# --------------------------------------------------------------------------------------------


def jpeg_size(data: np.ndarray) -> tuple[int, int] | None:
    """(width, height) from a JPEG's SOF marker, without decoding; None for other formats."""
    buf = data.tobytes()
    if len(buf) < 4 or buf[0] != 0xFF or buf[1] != 0xD8:
        return None
    i = 2
    while i + 9 < len(buf):
        if buf[i] != 0xFF:
            return None
        marker = buf[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # markers without a length
            i += 2
            continue
        length = (buf[i + 2] << 8) | buf[i + 3]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            height = (buf[i + 5] << 8) | buf[i + 6]
            width = (buf[i + 7] << 8) | buf[i + 8]
            return width, height
        i += 2 + length
    return None


Region = tuple[int, int, int, int]


def crop_region(
    image: np.ndarray, region: Region | None, full_size: tuple[int, int] | None = None
) -> np.ndarray:
    """The part of ``image`` inside ``region`` = (left, top, right, bottom), given in pixels of
    the picture at ``full_size`` (width, height; default: the image's own size), so a region of
    the saved frame crops a copy decoded at reduced scale too. Clamped to the image; never empty."""
    if region is None:
        return image
    h, w = image.shape[:2]
    fw, fh = full_size or (w, h)
    sx, sy = w / fw, h / fh
    left, top, right, bottom = region
    x0 = min(max(0, round(left * sx)), w - 1)
    y0 = min(max(0, round(top * sy)), h - 1)
    x1 = max(x0 + 1, min(w, round(right * sx)))
    y1 = max(y0 + 1, min(h, round(bottom * sy)))
    if (x0, y0, x1, y1) == (0, 0, w, h):
        return image
    return np.ascontiguousarray(image[y0:y1, x0:x1])


def read_image(path: str | Path, min_side: int = MIN_DECODE_SIDE, region: Region | None = None) -> np.ndarray:
    """Decode ``path`` as BGR ``uint8`` at the smallest libjpeg reduction (1/2, 1/4, 1/8) that keeps
    at least ``min_side`` pixels on the short side (full size for other formats). With
    ``region`` (left, top, right, bottom in the file's own pixels: a frame's picture box), only
    that part is returned, and the reduction is chosen by the region's short side.

    Raises :class:`BadInputError` naming the file when it is missing, empty, truncated or not an
    image: the frames are the stage's inputs, and skipping one would misalign rows.
    """
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise BadInputError(
            f"cannot read frame image {path}: {exc.strerror or exc}; rerun stage extract with --force"
        ) from None
    if data.size == 0:
        raise BadInputError(f"frame image {path} is empty; rerun stage extract with --force")
    if jpeg_truncated(data):
        raise BadInputError(f"frame image {path} is a truncated JPEG; rerun stage extract with --force")
    flag = cv2.IMREAD_COLOR
    size = jpeg_size(data)
    if size is not None:
        short = min(size)
        if region is not None:
            short = min(short, region[2] - region[0], region[3] - region[1])
        for factor, reduced in _REDUCED_COLOR:
            if short // factor >= min_side:
                flag = reduced
                break
    image = cv2.imdecode(data, flag)
    if image is None or image.size == 0:
        raise BadInputError(
            f"frame image {path} cannot be decoded as an image; rerun stage extract with --force"
        )
    if region is not None:
        full = size or (image.shape[1], image.shape[0])
        image = crop_region(image, region, full)
    return image


# --------------------------------------------------------------------------------------------
# The picture inside letterbox and pillarbox bars
# --------------------------------------------------------------------------------------------

#: The ``frames`` columns that hold a frame's picture box (stage 01): the active picture inside
#: letterbox or pillarbox bars, in pixels of the saved JPEG, right and bottom exclusive.
BOX_COLUMNS = ("box_left", "box_top", "box_right", "box_bottom")

Box = Region

_REDUCED_GRAY = (
    (8, cv2.IMREAD_REDUCED_GRAYSCALE_8),
    (4, cv2.IMREAD_REDUCED_GRAYSCALE_4),
    (2, cv2.IMREAD_REDUCED_GRAYSCALE_2),
)


def frame_box(row: dict, width: int | None = None, height: int | None = None) -> Box | None:
    """The picture box of one ``frames`` row as ``(left, top, right, bottom)``, or None when the
    table has no box (a run made before stage 01 found boxes) or the row's box is null: then the
    whole frame is the picture. ``width``/``height`` (the frame's size) clamp the box."""
    values = [row.get(c) for c in BOX_COLUMNS]
    if any(v is None for v in values):
        return None
    left, top, right, bottom = (int(v) for v in values)
    if width:
        left, right = max(0, left), min(int(width), right)
    if height:
        top, bottom = max(0, top), min(int(height), bottom)
    if right <= left or bottom <= top:
        return None
    return left, top, right, bottom


def _reduction(size: tuple[int, int] | None, box: Box | None, min_width: int | None) -> int:
    """The largest libjpeg reduction (8, 4, 2 or 1) that leaves the picture at least ``min_width``
    pixels wide (and 8 high): the picture, not the frame, is what a measure needs."""
    if size is None or not min_width:
        return 1
    width = (box[2] - box[0]) if box else size[0]
    height = (box[3] - box[1]) if box else size[1]
    for factor in (8, 4, 2):
        if width // factor >= min_width and height // factor >= 8:
            return factor
    return 1


def decode_picture(
    data: np.ndarray, box: Box | None = None, *, min_width: int | None = None, gray: bool = False
) -> np.ndarray | None:
    """The picture of a frame file's bytes: decoded (gray or BGR) at the largest libjpeg reduction
    that keeps the picture box at least ``min_width`` pixels wide (full size for other formats or
    without ``min_width``), then cropped to ``box`` (full-size pixels; None: the whole frame).

    None when the bytes are empty, a truncated JPEG or not an image: callers that score thousands
    of frames record such a frame instead of failing. The reduced decode is what makes reading
    the picture cheap (libjpeg drops DCT coefficients: a 1080p frame at 1/4 is 480x270 for about
    a third of a full decode). :func:`read_image` with a ``region`` does the same for stages 03-06
    (chosen by the short side, colour only, errors raised).
    """
    if data.size == 0 or jpeg_truncated(data):
        return None
    size = jpeg_size(data)
    factor = _reduction(size, box, min_width)
    flags = dict(_REDUCED_GRAY if gray else _REDUCED_COLOR)
    flag = flags.get(factor, cv2.IMREAD_GRAYSCALE if gray else cv2.IMREAD_COLOR)
    image = cv2.imdecode(data, flag)
    if image is None or image.size == 0:
        return None
    if box is None:
        return image
    picture = crop_region(image, box, size or (image.shape[1], image.shape[0]))
    return picture if picture.size else None


def l2_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32)
