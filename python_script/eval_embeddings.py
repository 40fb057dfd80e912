"""How meaningful the scene descriptor's cosine similarities are, and how fast it runs.

Stage 04 thresholds cosine similarity (``scenes.assign_threshold`` 0.85 to join a cluster,
``scenes.noise_threshold`` 0.5 for the noise bucket), so the numbers themselves matter. This
script measures them on footage with known places:

* the built-in demo movie (``data/demo``, built if absent): place = ``shots[*].source`` of its
  ground truth (the astronaut appears in three shots, Grace Hopper and the cat in two each);
* ``../shared/testdata/face_recognition_examples/short_hamilton_clip.mp4`` (real footage; four
  shots, cuts at frames 20, 82, 211; place = shot), skipped with a note when absent.

Every ``--step``-th frame is written as a JPEG (quality 95, as stage 01 writes) and embedded with
:class:`~diffusion_bunny.stages.scenes.embeddings.DescriptorEmbedder`.
Reported per set: similarity of all pairs
of frames of the same place and of different places (5th percentile, median, 95th percentile;
share >= 0.85 and share < 0.5); then robustness (similarity of a frame to a changed copy of
itself: brightness, crop, shift, resolution) and speed (frames/s, JPEG decoding included, at
640x360, 1920x1080 and 3840x2160).

    uv run python python_script/eval_embeddings.py [--step 3] [--speed-frames 200]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import av
import cv2
import numpy as np

from diffusion_bunny.demo.run import demo_movie
from diffusion_bunny.stages.scenes.embeddings import DescriptorEmbedder, describe

ROOT = Path(__file__).resolve().parents[1]
HAMILTON = ROOT.parent / "shared" / "testdata" / "face_recognition_examples" / "short_hamilton_clip.mp4"
HAMILTON_CUTS = (0, 20, 82, 211, 275)


def dump_frames(movie: Path, out: Path, step: int, place_of) -> tuple[list[Path], list[str]]:
    """Every ``step``-th frame of ``movie`` as a JPEG in ``out``, with its place label."""
    out.mkdir(parents=True, exist_ok=True)
    paths, places = [], []
    with av.open(str(movie)) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i % step:
                continue
            path = out / f"{i:06d}.jpg"
            cv2.imwrite(str(path), frame.to_ndarray(format="bgr24"), [cv2.IMWRITE_JPEG_QUALITY, 95])
            paths.append(path)
            places.append(place_of(i))
    return paths, places


def pair_stats(vectors: np.ndarray, places: list[str]) -> dict[str, dict[str, float]]:
    """Percentiles of the cosine over all pairs of frames, same place vs different places."""
    sims = vectors @ vectors.T
    labels = np.asarray(places)
    iu = np.triu_indices(len(labels), 1)
    same = (labels[:, None] == labels[None, :])[iu]
    out = {}
    for name, values in (("same place", sims[iu][same]), ("different places", sims[iu][~same])):
        p5, p50, p95 = np.percentile(values, [5, 50, 95])
        out[name] = {
            "pairs": int(values.size),
            "p5": round(float(p5), 3),
            "median": round(float(p50), 3),
            "p95": round(float(p95), 3),
            ">=0.85": round(float((values >= 0.85).mean()), 3),
            "<0.5": round(float((values < 0.5).mean()), 3),
        }
    return out


def changes(img: np.ndarray):
    """Changed copies of a frame that should still count as the same place."""
    h, w = img.shape[:2]
    yield "brightness x0.8", np.clip(img * 0.8, 0, 255).astype(np.uint8)
    yield "brightness x1.25", np.clip(img * 1.25, 0, 255).astype(np.uint8)
    yield "brightness +20", np.clip(img.astype(np.int16) + 20, 0, 255).astype(np.uint8)
    yield "crop 5%", img[h // 40 : h - h // 40, w // 40 : w - w // 40]
    yield "crop 10%", img[h // 20 : h - h // 20, w // 20 : w - w // 20]
    yield "shift 10%", img[:, w // 10 :]
    yield "1080p copy", cv2.resize(img, (1920, 1080), interpolation=cv2.INTER_CUBIC)


def robustness(paths: list[Path]) -> dict[str, tuple[float, float]]:
    """(min, median) similarity between a frame and each changed copy of it."""
    sims: dict[str, list[float]] = {}
    for path in paths:
        img = cv2.imread(str(path))
        ref = describe(img)
        for name, changed in changes(img):
            sims.setdefault(name, []).append(float(ref @ describe(changed)))
    return {k: (round(min(v), 3), round(float(np.median(v)), 3)) for k, v in sims.items()}


def speed(paths: list[Path], tmp: Path, n: int) -> dict[str, float]:
    """frames/s of ``embed_images`` (decoding included) on ``n`` frames at three resolutions."""
    embedder = DescriptorEmbedder()
    out = {}
    for label, size in (("640x360", None), ("1920x1080", (1920, 1080)), ("3840x2160", (3840, 2160))):
        folder = tmp / f"speed_{label}"
        folder.mkdir()
        files = []
        for i in range(n):
            img = cv2.imread(str(paths[i % len(paths)]))
            if size is not None:
                img = cv2.resize(img, size, interpolation=cv2.INTER_CUBIC)
            files.append(folder / f"{i:05d}.jpg")
            cv2.imwrite(str(files[-1]), img, [cv2.IMWRITE_JPEG_QUALITY, 95])
        embedder.embed_images(files[:8])  # warm up thread pool and OpenCV
        start = time.perf_counter()
        embedder.embed_images(files)
        out[label] = round(n / (time.perf_counter() - start), 1)
    return out


def main() -> None:
    """Run the evaluation and print JSON-like lines."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--step", type=int, default=3, help="embed every STEP-th frame")
    parser.add_argument("--speed-frames", type=int, default=200, help="frames per resolution for speed")
    args = parser.parse_args()

    demo = demo_movie(progress=False)
    shots = demo.ground_truth()["shots"]

    def demo_place(i: int) -> str:
        return next(s["source"] for s in shots if s["start_frame"] <= i < s["end_frame"])

    def hamilton_place(i: int) -> str:
        return next(f"shot{k}" for k in range(4) if HAMILTON_CUTS[k] <= i < HAMILTON_CUTS[k + 1])

    sets = [("demo movie", demo.path, demo_place)]
    if HAMILTON.is_file():
        sets.append(("Hamilton clip", HAMILTON, hamilton_place))
    else:
        print(f"note: {HAMILTON} not found; the real-footage set is skipped", file=sys.stderr)

    embedder = DescriptorEmbedder()
    with tempfile.TemporaryDirectory(prefix="eval_embeddings_") as tmp_name:
        tmp = Path(tmp_name)
        all_paths: list[Path] = []
        for name, movie, place_of in sets:
            paths, places = dump_frames(movie, tmp / name.replace(" ", "_"), args.step, place_of)
            vectors = embedder.embed_images(paths)
            print(f"{name}: {len(paths)} frames, {len(set(places))} places ({embedder.name})")
            for kind, stats in pair_stats(vectors, places).items():
                print(f"  {kind}: {json.dumps(stats)}")
            print(f"  changed copies (min, median): {json.dumps(robustness(paths[::10]))}")
            all_paths += paths
        fps = speed(all_paths, tmp, args.speed_frames)
        print(f"speed, frames/s (decode + descriptor, {embedder.name}): {fps}")


if __name__ == "__main__":
    main()
