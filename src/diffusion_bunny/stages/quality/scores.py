"""Stage 02's scores, computed once per frame: sharpness, brightness, contrast, clipped share and a
perceptual hash, from a reduced decode of the saved JPEG."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np
import polars as pl

from diffusion_bunny.media.images import BOX_COLUMNS, Box, decode_picture, frame_box, laplacian_variance
from diffusion_bunny.pipeline.progress import map_tracked
from diffusion_bunny.stages.quality.tables import SCORES_SCHEMA

#: Gray levels at or below / at or above which a pixel counts as crushed / blown.
CLIP_LOW, CLIP_HIGH = 4, 251

#: Long side in pixels of the grayscale copy every score is computed on (its width for a
#: landscape frame). A fixed size makes the sharpness of a 4K frame and of a 480p frame comparable
#: (the variance of the Laplacian grows with the detail per pixel, so it depends on the scale the
#: image is looked at). The long side, not the width: a phone's upright 360x640 frame brought to
#: 256 wide was looked at 1.78 times larger than the same picture stored 640x360, and scored
#: about 3.2 times less sharp (the Hamilton clip turned a quarter: 639 -> 221, a kept frame
#: "blurry").
SCORE_WIDTH = 256

# libjpeg decodes at 1/2, 1/4 or 1/8 scale by dropping DCT coefficients, faster than a full decode
# followed by a resize (the entropy decoding remains, so 1.3-1.5x, not 4x). The largest factor that
# leaves the picture at least twice SCORE_WIDTH wide is used, so the final area resize always
# averages 2+ pixels: then a 720p, a 1080p and a 4K copy of a scene score within about 10 % of each
# other, where letting the DCT scaling do all the work gave up to 35 % apart (its filter differs
# from INTER_AREA).
DECODE_WIDTH = 2 * SCORE_WIDTH


#: Immerkær's noise kernel: the difference of two Laplacians, which cancels a picture's smooth
#: parts and edges to first order and leaves the noise (its response has 6 times its sigma).
NOISE_KERNEL = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], np.float32)


def noise_sigma(gray: np.ndarray) -> float:
    """The picture's noise (standard deviation in gray levels), by Immerkær's fast estimate
    (J. Immerkær, "Fast Noise Variance Estimation", 1996): the mean absolute response of
    :data:`NOISE_KERNEL` inside the border, times sqrt(pi/2) / 6.

    Why: the variance of the Laplacian counts noise as detail (about 20 sigma squared). In a lit
    frame that is a few per cent of the score; in a night frame, whose detail is a ninth, the
    noise of a night exposure is most of what an out-of-focus frame scores (a blurred
    night-graded Hamilton frame: 8.5, of which 0.9 detail). Written here (one filter, no
    dependency) because the well-kept implementation, scikit-image's ``estimate_sigma``, is a
    wavelet estimate 100x slower per frame and would add scikit-image to stage 02.
    """
    response = cv2.filter2D(gray.astype(np.float32), -1, NOISE_KERNEL)[1:-1, 1:-1]
    return float(np.sqrt(np.pi / 2.0) * cv2.mean(np.abs(response))[0] / 6.0)


def phash(gray: np.ndarray) -> int:
    """64-bit DCT perceptual hash (the classic pHash, as ImageHash computes it): 32x32 copy, 2-D
    DCT, the 8x8 lowest frequencies compared with their median, one bit each.

    Written with ``cv2.dct`` rather than taken from ImageHash: ImageHash works on PIL images and
    scipy's DCT, which would mean a second decode and a copy per frame for the same 64 bits.
    """
    small = cv2.resize(gray, (32, 32), interpolation=cv2.INTER_AREA).astype(np.float32)
    low = cv2.dct(small)[:8, :8]
    bits = (low > np.median(low)).ravel()
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def score_image(path: str | Path, width: int | None = None, box: Box | None = None) -> dict[str, Any] | None:
    """Scores of one image file's picture (``box``, in the file's pixels; None: the whole frame),
    or None when it is missing or cannot be decoded.

    ``width`` is kept for callers that pass the frame's width; the reduction factor is read from
    the JPEG header now (the picture box, not the frame, sets it).
    """
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError:
        return None
    gray = decode_picture(data, box, min_width=DECODE_WIDTH, gray=True)
    if gray is None or gray.size == 0:
        return None
    return score_gray(gray)


def score_gray(gray: np.ndarray) -> dict[str, Any]:
    """The scores of a gray picture (any size: its long side is brought to :data:`SCORE_WIDTH`
    first, so a picture scores as it does turned a quarter)."""
    h, w = gray.shape[:2]
    if max(h, w) != SCORE_WIDTH:
        scale = SCORE_WIDTH / max(h, w)
        size = (max(8, round(w * scale)), max(8, round(h * scale)))
        gray = cv2.resize(gray, size, interpolation=cv2.INTER_AREA)
    mean, std = cv2.meanStdDev(gray)
    hist = np.bincount(gray.ravel(), minlength=256)
    clipped = (hist[: CLIP_LOW + 1].sum() + hist[CLIP_HIGH:].sum()) / gray.size
    return {
        "sharpness": laplacian_variance(gray),
        "brightness": float(mean[0, 0]),
        "contrast": float(std[0, 0]),
        "clipped": float(clipped),
        "noise": noise_sigma(gray),
        "phash": phash(gray),
    }


def hamming(a: int | np.ndarray, b: int | np.ndarray) -> np.ndarray:
    """Bitwise Hamming distance between 64-bit hashes (broadcasting)."""
    return np.bitwise_count(np.bitwise_xor(np.asarray(a, np.uint64), np.asarray(b, np.uint64)))


def nearest_distances(hashes: np.ndarray, block: int = 1024) -> np.ndarray:
    """Hamming distance of each hash to its nearest other one (64 when alone), all pairs, in row
    blocks so the XOR matrix stays a few MB. It is the histogram notebook 02 shows under the
    ``dup_distance`` slider."""
    hashes = np.asarray(hashes, np.uint64)
    n = hashes.size
    out = np.full(n, 64, dtype=np.int64)
    for start in range(0, n, block):
        d = hamming(hashes[start : start + block, None], hashes[None, :]).astype(np.int64)
        rows = np.arange(d.shape[0])
        d[rows, start + rows] = 65  # not its own neighbour
        out[start : start + block] = np.minimum(d.min(axis=1), 64) if n > 1 else 64
    return out


def score_frames(
    run_dir: str | Path,
    frames: pl.DataFrame,
    *,
    workers: int | None = None,
    progress: bool = True,
    progress_path: Path | None = None,
) -> pl.DataFrame:
    """Score every row of ``frames`` (paths relative to ``run_dir``) on a thread pool.

    Every score is measured on the frame's picture box (``box_*`` columns, from stage 01) when
    the table has one, so letterbox bars neither darken a frame nor count as crushed pixels.
    A missing or undecodable file gives a row with ``readable = False`` and null scores instead
    of an error: one bad frame must not cost the whole stage.
    """
    run_dir = Path(run_dir)
    box_columns = [c for c in BOX_COLUMNS if c in frames.columns]
    rows = frames.select("frame_id", "path", "width", "height", *box_columns).to_dicts()
    results = map_tracked(
        lambda r: score_image(run_dir / r["path"], r["width"], frame_box(r, r["width"], r["height"])),
        rows,
        desc="quality",
        workers=workers,
        progress=progress,
        progress_path=progress_path,
    )
    out = [
        {"frame_id": row["frame_id"], "readable": scores is not None, **(scores or {})}
        for row, scores in zip(rows, results, strict=True)
    ]
    table = pl.DataFrame(out, schema={k: v for k, v in SCORES_SCHEMA.items() if k != "nearest_distance"})
    readable = table["readable"].to_numpy()
    nearest = np.full(table.height, None, dtype=object)
    hashes = table.filter(pl.col("readable"))["phash"].to_numpy()
    if hashes.size > 1:
        nearest[readable] = nearest_distances(hashes).tolist()
    return table.with_columns(pl.Series("nearest_distance", nearest.tolist(), dtype=pl.Int64)).select(
        list(SCORES_SCHEMA)
    )
