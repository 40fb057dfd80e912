"""Benchmark stage 02's scoring (``score_frames``) on 720p JPEGs against a naive baseline.

Stage 02 reads every extracted frame once. What it measures, in one run on the same files:

1. ``naive``: what one would write first, one frame after the other: full decode in colour
   (``cv2.imread``), gray conversion, area resize to the score width, then the same scores;
2. ``stage, 1 thread``: :func:`~diffusion_bunny.stages.quality.stage.score_frames` with one worker
   (reduced-scale JPEG decoding alone);
3. ``stage``: ``score_frames`` on every core (what the stage runs);
4. ``text``: the text step (:func:`~diffusion_bunny.stages.quality.text.detect_text`: reduced
   decode of the picture, PP-OCRv4 detection at ``quality.text_width``, edge shares) on the same
   frames at 720p and at 1080p, one thread and every core, in ms per frame and CPU ms per frame,
   with what it would add to a 60-minute film's stage 02 for ``--kept`` kept frames. A third of
   the frames carry drawn text (subtitles, a title card, a sign) so the post-processing has
   lines to handle, as on a film with text.

The target is at least 200 frames/s at 720p on a 2-core machine for (3). The frames are made
here: crops of scikit-image's sample pictures, resized to 1280x720 with a little noise and saved
as quality-95 JPEGs (stage 01's default), so the benchmark needs no movie and no network. Files
are read once before timing so every variant sees a warm page cache; each variant runs
``--repeat`` times and the best time is kept. Exit status 0 even when the target is missed (a
measurement, not a test).

    uv run python python_script/bench_quality.py [--frames 300] [--repeat 3] [--work DIR]
        [--text-frames 60] [--kept 3000]
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


def make_frames(
    folder: Path, n: int, seed: int = 0, size: tuple[int, int] = (WIDTH, HEIGHT), text: bool = False
) -> pl.DataFrame:
    """``n`` varied JPEGs of ``size`` under ``folder/frames`` and their frames table; with
    ``text``, every third carries drawn text (a subtitle, a title card or a sign)."""
    from diffusion_bunny.demo import overlays

    width, height = size
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
        frame = cv2.resize(src[y : y + ch, x : x + cw], (width, height), interpolation=cv2.INTER_CUBIC)
        noise = rng.normal(0, 2.0, frame.shape[:2]).astype(np.float32)
        frame = cv2.add(frame, cv2.merge([noise] * 3), dtype=cv2.CV_8U)
        if text and i % 3 == 0:
            rgb = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
            kind = (i // 3) % 3
            if kind == 0:
                rgb, _ = overlays.subtitle(rgb, overlays.DIALOGUE[i % len(overlays.DIALOGUE)])
            elif kind == 1:
                rgb, _ = overlays.title((width, height), ("THE LONG NIGHT",))
            else:
                rgb, _ = overlays.sign(rgb, overlays.SIGNS[i % len(overlays.SIGNS)])
            frame = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
        rel = f"frames/f{width}_{i:05d}.jpg"
        cv2.imwrite(str(folder / rel), frame, [cv2.IMWRITE_JPEG_QUALITY, 95])
        rows.append({"frame_id": f"f{width}_{i:05d}", "path": rel, "width": width, "height": height})
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


def bench_text(work: Path, n: int, kept: int) -> None:
    """The text step's cost per frame at 720p and 1080p, one thread and every core."""
    from diffusion_bunny.models.text import load_text_detector
    from diffusion_bunny.stages.quality.settings import QualitySettings
    from diffusion_bunny.stages.quality.text import detect_text

    width = QualitySettings().text_width
    started = time.perf_counter()
    detector = load_text_detector()
    loaded = time.perf_counter() - started
    print(f"\ntext detector loaded in {loaded:.2f} s ({detector.key}), text_width {width}")
    cores = os.cpu_count() or 1
    for size in ((1280, 720), (1920, 1080)):
        frames = make_frames(work, n, seed=1, size=size, text=True)
        for rel in frames["path"]:
            (work / rel).read_bytes()
        detect_text(work, frames.head(2), detector, width, workers=1, progress=False)  # warm-up
        for workers in (1, cores):
            wall, cpu = time.perf_counter(), time.process_time()
            found = detect_text(work, frames, detector, width, workers=workers, progress=False)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            lines = int(found["text_lines"].list.len().sum())
            print(
                f"text {size[0]}x{size[1]}, {workers} thread(s): {1000 * wall / n:6.1f} ms/frame wall, "
                f"{1000 * cpu / n:6.1f} CPU ms/frame ({lines} lines on {n} frames); "
                f"{kept} kept frames: {kept * wall / n:5.0f} s"
            )


def best_time(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--work", type=Path, default=None, help="folder for the JPEGs (default: a temp dir)")
    parser.add_argument("--text-frames", type=int, default=60, help="frames per size for the text step")
    parser.add_argument("--kept", type=int, default=3000, help="kept frames of a 60-minute film (estimate)")
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
        print(
            f"{platform.processor() or platform.machine()}, {cores} cores, OpenCV {cv2.__version__}, "
            f"load average {os.getloadavg()[0]:.2f}"
        )
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
        if args.text_frames:
            bench_text(work, args.text_frames, args.kept)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
