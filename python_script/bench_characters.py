"""Benchmark stage 03's face detection plus encoding at 720p against face_recognition's own way.

What it measures, on the same frames in the same run (stage 03 best of ``--repeat``; the slow
reference once):

1. the reference: face_recognition's documented loop (its README and examples), one frame after
   another: ``face_locations(frame)`` (HOG, one upsampling, on the full 1280x720 frame) and
   ``face_encodings(frame, boxes)``, through :mod:`diffusion_bunny.models.dlib_faces` (the same dlib
   calls as face_recognition 1.3, which is no longer installed);
2. stage 03's :func:`~diffusion_bunny.stages.characters.stage.detect_faces` with its defaults
   (``DetectSettings()``: CenterFace, the default detector, on a 640 px copy with auto-levels,
   boxes mapped back, dlib's encodings on the full frame), in one process and on a pool of one
   worker process per core.

3. stage 03 with every kind on: the same call with a fitted character detector as well (the four
   drawn people of the character truth set's kenney_toon source, so four heat maps), on all cores:
   faces and drawn characters searched in every frame. The detector is fitted in 30 steps only:
   what a search costs does not depend on how well the network was trained, and a default fit
   takes two minutes.

It prints frames/s for each, the ratio to the reference, and how many faces each found: a sanity
figure only, since the two sides are different detectors (face_recognition's HOG on the full frame,
stage 03's default detector on a 640 px copy), so neither count is the truth; how well each finds
faces is measured on the face truth set by ``eval_faces.py``. The every-kind row counts
appearances, faces and drawn characters together. The target is at least 10 frames/s for stage 03
on all cores, with every kind on.

The frames are real footage with faces: the frames of ``short_hamilton_clip.mp4`` (from
``../shared/testdata``, when present) and of the demo movie, scaled up to 1280x720 and saved as
JPEGs the way stage 01 saves them. Exit status 0 even when the target is missed (a measurement).

A worker process needs about 2.5 s of CPU to start (imports and dlib's models), so the pool is
measured on a few hundred frames, as a movie's kept frames are, not on a handful.

    uv run python python_script/bench_characters.py [--frames 240] [--repeat 2] [--work DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import av
import cv2
import numpy as np
import polars as pl

from diffusion_bunny.demo.character_truth import truth_dir
from diffusion_bunny.models import dlib_faces
from diffusion_bunny.models.faces import DetectSettings
from diffusion_bunny.models.fitted import FittedSettings
from diffusion_bunny.models.fitted.detector import fit_detector
from diffusion_bunny.stages.characters.references import load_character_references
from diffusion_bunny.stages.characters.stage import background_frames, detect_faces

ROOT = Path(__file__).resolve().parents[1]
HAMILTON = ROOT.parent / "shared" / "testdata" / "face_recognition_examples" / "short_hamilton_clip.mp4"
WIDTH, HEIGHT = 1280, 720


def _movie_frames(path: Path, step: int) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [
            f.to_ndarray(format="bgr24") for i, f in enumerate(container.decode(video=0)) if i % step == 0
        ]


def make_frames(folder: Path, n: int) -> pl.DataFrame:
    """``n`` 720p JPEGs of real faces under ``folder/frames`` and their frames table."""
    from diffusion_bunny.demo.run import demo_movie

    sources: list[np.ndarray] = []
    if HAMILTON.is_file():
        sources += _movie_frames(HAMILTON, 3)
    sources += _movie_frames(demo_movie(progress=False).path, 8)
    (folder / "frames").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        frame = cv2.resize(sources[(i * 7) % len(sources)], (WIDTH, HEIGHT), interpolation=cv2.INTER_CUBIC)
        rel = f"frames/f{i:05d}.jpg"
        cv2.imwrite(str(folder / rel), frame, [cv2.IMWRITE_JPEG_QUALITY, 95])
        # The size is what stage 03 needs of a frame without stage 01's picture box (a full frame).
        rows.append({"frame_id": f"f{i:05d}", "path": rel, "width": WIDTH, "height": HEIGHT})
    return pl.DataFrame(rows)


def reference_pass(folder: Path, frames: pl.DataFrame) -> int:
    """face_recognition's documented use, frame by frame; returns the number of faces."""
    fr = dlib_faces
    faces = 0
    for rel in frames["path"]:
        image = fr.load_image_file(str(folder / rel))
        boxes = fr.face_locations(image)
        faces += len(fr.face_encodings(image, boxes))
    return faces


def fitted_detector(folder: Path, frames: pl.DataFrame) -> Path:
    """A detector of kenney_toon's four drawn people fitted on ``frames`` in 30 steps, saved
    under ``folder`` as stage 03 saves one (the torch file and the ONNX search beside it); its
    path."""
    _, pictures, _ = load_character_references(truth_dir() / "refs" / "kenney_toon", DetectSettings())
    backgrounds = background_frames(folder, frames, None, 40)
    detector = fit_detector(pictures.cutouts, backgrounds, FittedSettings(steps=30), progress=False)
    path = folder / "fitted-bench.pt"
    path.write_bytes(detector.to_bytes())
    path.with_suffix(".onnx").write_bytes(detector.onnx_bytes())  # what stage 03's workers search with
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=240)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--work", type=Path, default=None, help="folder for the JPEGs (default: a temp dir)")
    args = parser.parse_args(argv)

    work = args.work or Path(tempfile.mkdtemp(prefix="bench_characters_"))
    try:
        frames = make_frames(work, args.frames)
        cores = os.cpu_count() or 1
        source = "Hamilton and demo" if HAMILTON.is_file() else "demo only"
        print(f"{frames.height} frames at {WIDTH}x{HEIGHT} ({source})")
        for rel in frames["path"]:
            (work / rel).read_bytes()
        settings = DetectSettings()
        results: dict[str, tuple[float, int]] = {}

        detector = settings.detector_name

        def timed(name: str, fn: Callable[[], int], repeat: int = args.repeat, unit: str = "faces") -> None:
            best, found = float("inf"), 0
            for _ in range(repeat):
                start = time.perf_counter()
                found = fn()
                best = min(best, time.perf_counter() - start)
            results[name] = (best, found)
            print(f"  {name:<44} {frames.height / best:6.1f} frames/s  {found} {unit}")

        reference = "face_recognition HOG (full 720p, 1 process)"
        timed(reference, lambda: reference_pass(work, frames), repeat=1)
        timed(
            f"stage 03 {detector} 640 px, 1 process",
            lambda: detect_faces(work, frames, settings, workers=1, progress=False)[0].height,
        )
        timed(
            f"stage 03 {detector} 640 px, {cores} processes",
            lambda: detect_faces(work, frames, settings, workers=cores, progress=False)[0].height,
        )
        fitted = fitted_detector(work, frames)
        timed(
            f"stage 03, every kind on, {cores} processes",
            lambda: (
                detect_faces(work, frames, settings, workers=cores, progress=False, fitted=fitted)[0].height
            ),
            unit="appearances (faces and drawn characters)",
        )
        ref_time, ref_faces = results[reference]
        best_time, best_faces = results[f"stage 03 {detector} 640 px, {cores} processes"]
        fps = frames.height / best_time
        print(
            f"stage 03 on {cores} cores: {fps:.1f} frames/s ({ref_time / best_time:.2f}x face_recognition's "
            f"own loop); faces found {best_faces} by stage 03's {detector} vs {ref_faces} by "
            f"face_recognition's HOG (two detectors: not a check); target >= 10 frames/s: "
            f"{'met' if fps >= 10 else 'MISSED'}"
        )
        every = frames.height / results[f"stage 03, every kind on, {cores} processes"][0]
        print(
            f"stage 03 with every kind on ({cores} cores): {every:.1f} frames/s; target >= 10 frames/s: "
            f"{'met' if every >= 10 else 'MISSED'}"
        )
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
