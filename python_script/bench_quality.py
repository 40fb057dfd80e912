"""Benchmark stage 02's scoring (``score_frames``) on 720p JPEGs against a naive baseline.

Stage 02 reads every extracted frame once. What it measures, in one run on the same files:

1. ``naive``: what one would write first, one frame after the other: full decode in colour
   (``cv2.imread``), gray conversion, area resize to the score width, then the same scores;
2. ``stage, 1 thread``: :func:`~diffusion_bunny.stages.quality.stage.score_frames` with one worker
   (reduced-scale JPEG decoding alone);
3. ``stage``: ``score_frames`` on every core (what the stage runs).

The target is at least 200 frames/s at 720p on a 2-core machine for (3). The frames are made
here: crops of scikit-image's sample pictures, resized to 1280x720 with a little noise and saved
as quality-95 JPEGs (stage 01's default), so the benchmark needs no movie and no network. Files
are read once before timing so every variant sees a warm page cache; each variant runs
``--repeat`` times and the best time is kept. Exit status 0 even when the target is missed (a
measurement, not a test).

    uv run python python_script/bench_quality.py [--frames 300] [--repeat 3] [--work DIR]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import polars as pl

from diffusion_bunny.stages.quality.scores import SCORE_WIDTH, phash, score_frames

WIDTH, HEIGHT = 1280, 720
TARGET_FPS = 200.0


def make_frames(folder: Path, n: int, seed: int = 0) -> pl.DataFrame:
    """``n`` varied 720p JPEGs under ``folder/frames`` and their frames table."""
    import skimage.data

    rng = np.random.default_rng(seed)
    sources = [
        cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
        for img in (
            skimage.data.astronaut(),
            skimage.data.coffee(),
            skimage.data.chelsea(),
            skimage.data.rocket(),
            skimage.data.immunohistochemistry(),
        )
    ]
    (folder / "frames").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        src = sources[i % len(sources)]
        h, w = src.shape[:2]
        cw = int(w * rng.uniform(0.6, 1.0))
        ch = min(h, round(cw * 9 / 16))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        frame = cv2.resize(src[y : y + ch, x : x + cw], (WIDTH, HEIGHT), interpolation=cv2.INTER_CUBIC)
        noise = rng.normal(0, 2.0, frame.shape[:2]).astype(np.float32)
        frame = cv2.add(frame, cv2.merge([noise] * 3), dtype=cv2.CV_8U)
        rel = f"frames/f{i:05d}.jpg"
        cv2.imwrite(str(folder / rel), frame, [cv2.IMWRITE_JPEG_QUALITY, 95])
        rows.append({"frame_id": f"f{i:05d}", "path": rel, "width": WIDTH, "height": HEIGHT})
    return pl.DataFrame(rows)


def naive_scores(folder: Path, frames: pl.DataFrame) -> list[dict[str, float]]:
    """The baseline: full-resolution colour decode, one frame at a time, same scores."""
    out = []
    for rel in frames["path"]:
        bgr = cv2.imread(str(folder / rel))
        gray = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
        size = (SCORE_WIDTH, round(SCORE_WIDTH * gray.shape[0] / gray.shape[1]))
        small = cv2.resize(gray, size, interpolation=cv2.INTER_AREA)
        lap = cv2.Laplacian(small, cv2.CV_64F)
        out.append(
            {
                "sharpness": float(lap.var()),
                "brightness": float(small.mean()),
                "contrast": float(small.std()),
                "clipped": float(((small <= 4) | (small >= 251)).mean()),
                "phash": phash(small),
            }
        )
    return out


def best_time(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--work", type=Path, default=None, help="folder for the JPEGs (default: a temp dir)")
    args = parser.parse_args(argv)

    work = args.work or Path(tempfile.mkdtemp(prefix="bench_quality_"))
    try:
        start = time.perf_counter()
        frames = make_frames(work, args.frames)
        print(
            f"made {frames.height} JPEGs at {WIDTH}x{HEIGHT} in {time.perf_counter() - start:.1f} s ({work})"
        )
        for rel in frames["path"]:  # warm the page cache for every variant alike
            (work / rel).read_bytes()
        cores = os.cpu_count() or 1
        print(f"{platform.processor() or platform.machine()}, {cores} cores, OpenCV {cv2.__version__}")
        variants: list[tuple[str, Callable[[], object]]] = [
            ("naive (full decode, 1 thread)", lambda: naive_scores(work, frames)),
            ("stage, 1 thread", lambda: score_frames(work, frames, workers=1, progress=False)),
            (f"stage, {cores} threads", lambda: score_frames(work, frames, progress=False)),
        ]
        results = {}
        for name, fn in variants:
            seconds = best_time(fn, args.repeat)
            results[name] = frames.height / seconds
            print(f"{name:34s} {results[name]:8.1f} frames/s ({seconds * 1000 / frames.height:.2f} ms/frame)")
        ours = results[variants[-1][0]]
        base = results[variants[0][0]]
        verdict = "met" if ours >= TARGET_FPS else "MISSED"
        print(
            f"speed-up over naive: {ours / base:.1f}x; target >= {TARGET_FPS:.0f} frames/s at 720p: {verdict}"
        )
        # The reduced decode must not change what the scores say (the same rules apply either way).
        fast = score_frames(work, frames.head(20), progress=False)
        slow = naive_scores(work, frames.head(20))
        ratio = np.array([f / s["sharpness"] for f, s in zip(fast["sharpness"], slow, strict=True)])
        print(
            f"sharpness, reduced decode / full decode: median {np.median(ratio):.2f} (min {ratio.min():.2f})"
        )
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
