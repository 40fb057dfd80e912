"""Stage 02 ``quality``: score every extracted frame once, then drop blurred, badly exposed and
duplicate frames with thresholds a person sets by eye.

Two halves, kept apart on purpose (see DESIGN.md, "scores are computed once"):

* :func:`score_frames` reads each frame once and measures sharpness, brightness, contrast, the
  share of clipped pixels and a 64-bit perceptual hash. It runs on a thread pool over frames:
  OpenCV releases the GIL while it decodes and filters, so threads use every core without the
  cost of shipping images between processes. JPEGs are decoded straight to gray and, for frames
  of 1024 px and wider, at reduced scale (libjpeg's DCT scaling): the scores need 256 pixels of
  width, not 1280. A thread decodes a 720p frame and scores it in about 3 ms, against 4.6 ms for
  a full colour decode (``python_script/bench_quality.py``).
* :func:`apply_quality_rules` is a pure function of the score table, the frames table and the
  ``filtering`` settings. Notebook 02's sliders call it on every move, so no score is recomputed
  when a threshold changes, and a headless run with the saved thresholds gives the same table.

Rules, in order; a frame gets the reason of the first rule it fails:

1. ``unreadable``: the frame file is missing, empty, truncated or not an image;
2. ``too_dark`` / ``too_bright`` / ``clipped``: mean brightness outside
   [``min_brightness``, ``max_brightness``], or more than ``max_clipped`` of the pixels crushed to
   black or blown to white. Exposure comes before sharpness because the Laplacian's variance
   scales with the square of the exposure: a dark frame always also looks blurred;
3. ``blurry``: sharpness under ``min_sharpness``;
4. ``duplicate``: perceptual hash within ``dup_distance`` bits of a better frame that is kept,
   anywhere in the movie (all pairs, not only neighbours); better = sharper, and between near
   equals (within :data:`SHARPNESS_TIE`) the earlier one;
5. ``not_best``: more than ``best_per_batch`` frames survive in its batch (a shot by default, or
   ``batch`` consecutive frames) and it is not among the sharpest.

Only frames that passed rules 1-3 can make another frame a duplicate, and only frames that stay
kept: a blurred take of a scene never removes its sharp take, and in a chain A~B~C where A is the
sharpest and C is far from A, B goes as A's duplicate and C stays. Best-N runs last so that it
picks among distinct frames instead of spending its N places on copies.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import polars as pl
from tqdm.auto import tqdm

from diffusion_bunny.config import FilteringConfig
from diffusion_bunny.progress import ProgressFile

#: Width in pixels of the grayscale copy every score is computed on. A fixed width makes the
#: sharpness of a 4K frame and of a 480p frame comparable (the variance of the Laplacian grows
#: with the detail per pixel, so it depends on the scale the image is looked at).
SCORE_WIDTH = 256
#: Gray levels at or below / at or above which a pixel counts as crushed / blown.
CLIP_LOW, CLIP_HIGH = 4, 251
#: Bump when a score's definition changes (recorded in the manifest's facts).
SCORE_VERSION = 1

# libjpeg decodes at 1/2, 1/4 or 1/8 scale by dropping DCT coefficients, faster than a full decode
# followed by a resize (the entropy decoding remains, so 1.3-1.5x, not 4x). The largest factor that
# leaves at least twice SCORE_WIDTH is used, so the final area resize always averages 2+ pixels:
# then a 720p, a 1080p and a 4K copy of a scene score within about 10 % of each other, where
# letting the DCT scaling do all the work gave up to 35 % apart (its filter differs from INTER_AREA).
_REDUCED = (
    (8, cv2.IMREAD_REDUCED_GRAYSCALE_8),
    (4, cv2.IMREAD_REDUCED_GRAYSCALE_4),
    (2, cv2.IMREAD_REDUCED_GRAYSCALE_2),
    (1, cv2.IMREAD_GRAYSCALE),
)

REASONS = ("unreadable", "too_dark", "too_bright", "clipped", "blurry", "duplicate", "not_best")

SCORES_SCHEMA = {
    "frame_id": pl.Utf8,
    "readable": pl.Boolean,
    "sharpness": pl.Float64,
    "brightness": pl.Float64,
    "contrast": pl.Float64,
    "clipped": pl.Float64,
    "phash": pl.UInt64,
    "nearest_distance": pl.Int64,
    "face_sharpness": pl.Float64,
}
RULE_COLUMNS = {"keep": pl.Boolean, "reject_reason": pl.Utf8, "duplicate_of": pl.Utf8}


def _decode_flag(width: int | None) -> int:
    if not width:
        return cv2.IMREAD_GRAYSCALE
    for factor, flag in _REDUCED:
        if width // factor >= 2 * SCORE_WIDTH:
            return flag
    return cv2.IMREAD_GRAYSCALE


def laplacian_variance(gray: np.ndarray) -> float:
    """Variance of the Laplacian (16-bit Laplacian + meanStdDev: the value of
    ``Laplacian(CV_32F).var()`` at a third of the cost)."""
    std = cv2.meanStdDev(cv2.Laplacian(gray, cv2.CV_16S))[1][0, 0]
    return float(std * std)


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


def _jpeg_truncated(data: np.ndarray) -> bool:
    # libjpeg fills a truncated JPEG with gray and only warns; such a frame is broken, not dull.
    # Stage 01 writes plain JPEGs that end with the EOI marker (FF D9).
    if data.size < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return False
    return b"\xff\xd9" not in data[-32:].tobytes()


def score_image(path: str | Path, width: int | None = None) -> dict[str, Any] | None:
    """Scores of one image file, or None when it is missing or cannot be decoded.

    ``width`` (the frame's width from the frames table) picks the JPEG reduction factor without
    reading the header first.
    """
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError:
        return None
    if data.size == 0 or _jpeg_truncated(data):
        return None
    gray = cv2.imdecode(data, _decode_flag(width))
    if gray is None or gray.size == 0:
        return None
    h, w = gray.shape[:2]
    if w != SCORE_WIDTH:
        size = (SCORE_WIDTH, max(8, round(SCORE_WIDTH * h / w)))
        gray = cv2.resize(gray, size, interpolation=cv2.INTER_AREA)
    mean, std = cv2.meanStdDev(gray)
    hist = np.bincount(gray.ravel(), minlength=256)
    clipped = (hist[: CLIP_LOW + 1].sum() + hist[CLIP_HIGH:].sum()) / gray.size
    return {
        "sharpness": laplacian_variance(gray),
        "brightness": float(mean[0, 0]),
        "contrast": float(std[0, 0]),
        "clipped": float(clipped),
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

    A missing or undecodable file gives a row with ``readable = False`` and null scores instead
    of an error: one bad frame must not cost the whole stage.
    """
    run_dir = Path(run_dir)
    rows = frames.select("frame_id", "path", "width").to_dicts()
    workers = workers or os.cpu_count() or 1
    bar = tqdm(total=len(rows), unit="frame", desc="quality", disable=not progress, mininterval=0.5)
    reporter = ProgressFile(progress_path, "quality", len(rows), "frame")
    out: list[dict[str, Any]] = []
    try:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="quality") as pool:
            results = pool.map(lambda r: score_image(run_dir / r["path"], r["width"]), rows)
            for n, (row, scores) in enumerate(zip(rows, results, strict=True), start=1):
                out.append({"frame_id": row["frame_id"], "readable": scores is not None, **(scores or {})})
                bar.update(1)
                reporter.update(n)
        reporter.update(len(rows), force=True)
    finally:
        bar.close()
        reporter.close()
    table = pl.DataFrame(out, schema={k: v for k, v in SCORES_SCHEMA.items() if k != "nearest_distance"})
    readable = table["readable"].to_numpy()
    nearest = np.full(table.height, None, dtype=object)
    hashes = table.filter(pl.col("readable"))["phash"].to_numpy()
    if hashes.size > 1:
        nearest[readable] = nearest_distances(hashes).tolist()
    return table.with_columns(pl.Series("nearest_distance", nearest.tolist(), dtype=pl.Int64)).select(
        list(SCORES_SCHEMA)
    )


def _batch_key(batch: str | int) -> pl.Expr:
    if batch == "shot":
        return pl.col("shot_id")
    # Batches of consecutive *sampled* frames (rows of the frames table), fixed whatever the
    # thresholds, so moving a slider never reshuffles which frames compete with each other.
    return pl.int_range(pl.len()) // int(batch)


#: Two near-duplicates whose sharpness differs by less than this share are equally good, and the
#: earlier one is kept: exact repeats (a flashback, a recap) differ only by encoding noise (0.2 %
#: on the demo's repeated shot), and the first appearance is the one a person expects to keep.
SHARPNESS_TIE = 0.05


def _duplicate_groups(
    hashes: np.ndarray, sharpness: np.ndarray, order_key: np.ndarray, max_distance: int
) -> list[tuple[int, np.ndarray]]:
    """Greedy near-duplicate removal over all pairs: ``[(kept, its duplicates), ...]`` (indices).

    Frames are visited sharpest first. The sharpest frame not yet decided is kept, unless an
    earlier frame within ``max_distance`` is as sharp within :data:`SHARPNESS_TIE` (then that one
    is kept); every undecided frame within ``max_distance`` of the kept frame becomes its
    duplicate. Only kept frames remove others, so a chain A~B~C keeps C when it is far from A.

    All pairs, one vectorised row per kept frame: with a few thousand frames per movie that is a
    few million XOR + popcounts (milliseconds), so an index (BK-tree, multi-index hashing) would
    only add code; it pays off at millions of hashes, not thousands.
    """
    n = hashes.size
    decided = np.zeros(n, dtype=bool)
    groups: list[tuple[int, np.ndarray]] = []
    # Sharpest first; among equal scores the earlier frame, so the result never depends on row order.
    for i in np.lexsort((order_key, -sharpness)):
        if decided[i]:
            continue
        near = ~decided & (hamming(hashes[i], hashes) <= max_distance)
        ties = np.flatnonzero(near & (sharpness >= (1.0 - SHARPNESS_TIE) * sharpness[i]))
        winner = int(ties[np.argmin(order_key[ties])]) if ties.size else int(i)
        decided[winner] = True
        copies = np.flatnonzero(~decided & (hamming(hashes[winner], hashes) <= max_distance))
        decided[copies] = True
        groups.append((winner, copies))
    return groups


def apply_quality_rules(scores: pl.DataFrame, frames: pl.DataFrame, cfg: FilteringConfig) -> pl.DataFrame:
    """``scores`` with ``keep``, ``reject_reason`` and ``duplicate_of`` set by ``cfg``.

    Pure and cheap (no image is read), so a slider can call it on every move. ``frames`` gives
    each frame's shot and position (for batches). Rows come back in frame order.
    """
    base = (
        scores.drop([c for c in RULE_COLUMNS if c in scores.columns])
        .join(frames.select("frame_id", "frame_index", "shot_id"), on="frame_id", how="left")
        .sort("frame_index", nulls_last=True)
    )
    # Exposure before sharpness: the Laplacian's variance scales with the square of the exposure,
    # so an under-exposed frame always scores as blurred (the demo's dark shot: 18, under any sane
    # blur threshold), and "blurry" would hide the real reason.
    reason = (
        pl.when(~pl.col("readable"))
        .then(pl.lit("unreadable"))
        .when(pl.col("brightness") < cfg.min_brightness)
        .then(pl.lit("too_dark"))
        .when(pl.col("brightness") > cfg.max_brightness)
        .then(pl.lit("too_bright"))
        .when(pl.col("clipped") > cfg.max_clipped)
        .then(pl.lit("clipped"))
        .when(pl.col("sharpness") < cfg.min_sharpness)
        .then(pl.lit("blurry"))
        .otherwise(pl.lit(None, dtype=pl.Utf8))
    )
    base = base.with_columns(reason.alias("reject_reason"), _batch_key(cfg.batch).alias("_batch"))

    reasons = base["reject_reason"].to_list()
    dup_of: list[str | None] = [None] * base.height
    cand = np.flatnonzero(base["reject_reason"].is_null().to_numpy())
    if cand.size > 1:
        ids = base["frame_id"].to_list()
        for winner, copies in _duplicate_groups(
            base["phash"].to_numpy()[cand],
            base["sharpness"].to_numpy()[cand],
            base["frame_index"].to_numpy()[cand],
            cfg.dup_distance,
        ):
            for j in copies:
                reasons[cand[j]] = "duplicate"
                dup_of[cand[j]] = ids[cand[winner]]
    base = base.with_columns(
        pl.Series("reject_reason", reasons, dtype=pl.Utf8), pl.Series("duplicate_of", dup_of, dtype=pl.Utf8)
    )

    if cfg.best_per_batch is not None:
        ranked = (
            base.with_row_index("_row")
            .filter(pl.col("reject_reason").is_null())
            .sort(["_batch", "sharpness", "frame_index"], descending=[False, True, False])
            .with_columns(pl.int_range(pl.len()).over("_batch").alias("_rank"))
        )
        beyond = set(ranked.filter(pl.col("_rank") >= cfg.best_per_batch)["_row"].to_list())
        base = base.with_columns(
            pl.when(pl.int_range(pl.len()).is_in(list(beyond)))
            .then(pl.lit("not_best"))
            .otherwise(pl.col("reject_reason"))
            .alias("reject_reason")
        )
    return base.with_columns(pl.col("reject_reason").is_null().alias("keep")).select(
        *SCORES_SCHEMA, *RULE_COLUMNS
    )


def reason_counts(table: pl.DataFrame) -> dict[str, int]:
    """``{"kept": n, "<reason>": n, ...}`` in rule order, reasons with no frame left out."""
    counts = {"kept": int(table["keep"].sum())}
    found = dict(table.group_by("reject_reason").len().drop_nulls().iter_rows())
    counts.update({r: int(found[r]) for r in REASONS if r in found})
    return counts


def quality_stage(
    run_dir: str | Path,
    frames: pl.DataFrame,
    cfg: FilteringConfig,
    *,
    progress: bool = True,
    progress_path: Path | None = None,
) -> tuple[pl.DataFrame, dict[str, Any]]:
    """Score the frames and apply the rules: the ``quality`` table and facts for the manifest."""
    started = time.perf_counter()
    workers = os.cpu_count() or 1
    scores = score_frames(run_dir, frames, workers=workers, progress=progress, progress_path=progress_path)
    scored = time.perf_counter() - started
    table = apply_quality_rules(scores, frames, cfg)
    facts = {
        "score_version": SCORE_VERSION,
        "score_width": SCORE_WIDTH,
        "workers": workers,
        "scoring_seconds": round(scored, 3),
        "frames_per_second": round(frames.height / scored, 1) if scored > 0 and frames.height else None,
    }
    return table, facts
