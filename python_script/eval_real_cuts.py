"""Stage 01's cascade on real footage: looped Hamilton movies with exact cut truth.

The synthetic clips of ``eval_shots.py`` are cut between unlike pictures; real films cut
between shots of one scene (same stage, same light, same people), where the difference between
the two sides is much smaller. This script measures the cascade where it matters for speed and
accuracy on real footage, on movies made by :mod:`diffusion_bunny.demo.realclips` (the Hamilton
clip of ``../shared/testdata`` looped, every repeat varied by crop, roll, mirror, colour and
speed; every shot start is a hard cut, the junctions between repeats included):

* the share of real hard cuts accepted without the network (``accepted_fast``);
* precision, recall and F1 of the cuts found, within ``--tolerance`` frames (default 1);
* ``model_frames_per_decoded``: frames the network ran on per decoded frame (the package's
  windowing runs each frame twice: 2.0 when every window is needed).

The frames are decoded once per movie exactly as stage 01 decodes them (PyAV, analysis copy at
``detect_width``) and cached as the 48x27 copies the cascade looks at, so replays are cheap; the
cascade is then fed frame by frame as stage 01 feeds it. Run it with another checkout's package
first on the path (``PYTHONPATH=../other/src``) to get that version's figures on the same
movies ("before" and "after").

    uv run python python_script/eval_real_cuts.py [MOVIE ...] [--minutes 10] [--seeds 0,1]
        [--night] [--flicker] [--work data/real] [--set extract.KEY=VALUE ...] [--json OUT]

``--night`` grades every movie to a night look (:func:`diffusion_bunny.demo.realclips.night_grade`:
mean luma ~24 of 255, a third of the contrast, sensor noise, a blue tint), the footage on which
an absolute candidate threshold loses cuts between dark frames. ``--flicker`` gives every movie
old film's flicker and grain (:func:`diffusion_bunny.demo.realclips.flicker_grade`: each frame's
exposure drawn anew within +-12% and +-6 gray levels), on which frame differences alone take
flickering frames for cuts.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def small_frames(movie: Path, work: Path, detect_width: int) -> tuple[np.ndarray, float]:
    """The movie's 48x27 BGR frames as the cascade computes them (cached under ``work``)."""
    from diffusion_bunny.media.video import VideoReader
    from diffusion_bunny.stages.extract.detectors.transnet import rgb48

    st = movie.stat()
    key = hashlib.sha256(
        f"{movie.resolve()}|{st.st_size}|{st.st_mtime_ns}|{detect_width}".encode()
    ).hexdigest()
    cached = work / f"{movie.stem}-{key[:10]}.frames48.npz"
    if cached.is_file():
        z = np.load(cached)
        return z["frames"], float(z["fps"])
    reader = VideoReader(movie, 256, detect_width=detect_width)
    frames = np.stack([cv2.cvtColor(rgb48(d.small_bgr), cv2.COLOR_RGB2BGR) for d in reader.frames()])
    np.savez(cached, frames=frames, fps=reader.info.fps)
    return frames, reader.info.fps


def replay(
    frames: np.ndarray, fps: float, overrides: dict[str, object]
) -> tuple[list[int], dict, list[dict]]:
    """Feed the cascade as stage 01 does; the cuts it found, its facts and its candidates."""
    from diffusion_bunny.config import load_config
    from diffusion_bunny.stages.extract.detectors import CascadeSettings, make_boundaries
    from diffusion_bunny.stages.extract.detectors.transnet import load_model

    own = CascadeSettings.model_fields
    keys = {(f"extract.detector.{k}" if k in own else f"extract.{k}"): v for k, v in overrides.items()}
    cfg = load_config(None, {"extract.detector": "cascade", **keys}, use_local=False).extract
    det = make_boundaries(cfg, fps, load_model("cpu", precision=cfg.detector.transnetv2_precision))
    found: list[int] = []
    for i, f in enumerate(frames):
        found += det.push(i, f)
    found += det.finish(len(frames) - 1)
    return sorted(found), det.facts(), det.candidate_rows()


def evaluate(movie: Path, work: Path, overrides: dict[str, object], tolerance: int) -> dict:
    from diffusion_bunny.demo.metrics import match_boundaries

    truth = json.loads(movie.with_suffix(".cuts.json").read_text())["cuts"]
    frames, fps = small_frames(movie, work, 128)
    started = time.perf_counter()
    found, facts, rows = replay(frames, fps, overrides)
    took = time.perf_counter() - started
    score = match_boundaries(found, truth, tolerance)
    real = np.array(truth)

    def is_real(frame: int) -> bool:
        return bool(np.abs(real - frame).min() <= tolerance)

    fast_real = sum(1 for r in rows if r["decision"] == "accepted_fast" and is_real(r["boundary"]))
    model_frames = int(facts.get("model_frames_run", 0))
    return {
        "movie": movie.name,
        "frames": len(frames),
        "cuts": len(truth),
        "found": len(found),
        "precision": round(score.precision, 4),
        "recall": round(score.recall, 4),
        "f1": round(score.f1, 4),
        "missed": score.fn,
        "extra": score.fp,
        "accepted_fast_real": fast_real,
        "accepted_fast_share": round(fast_real / len(truth), 3),
        "confirmed": facts.get("candidates_confirmed"),
        "rejected": facts.get("candidates_rejected"),
        "model_frames_run": model_frames,
        "model_frames_per_decoded": round(model_frames / len(frames), 3),
        "replay_s": round(took, 1),
        "model_s": facts.get("model_seconds"),
    }


def missing_input(movies: list[Path]) -> str | None:
    """What is missing for this run, said in one line, or None.

    Checked before anything is decoded or rendered, so a mistyped path or an absent testdata
    folder costs one line rather than a traceback minutes in. A MOVIE is only worth scoring
    with the cut truth beside it; without MOVIEs the movies are rendered from the Hamilton clip
    (whose size is part of every cached movie's name, so even a cached movie needs it).
    """
    for movie in movies:
        if not movie.is_file():
            return f"{movie} not found (give a movie made by diffusion_bunny.demo.realclips)"
        truth = movie.with_suffix(".cuts.json")
        if not truth.is_file():
            return (
                f"{truth} not found: every MOVIE needs its cut truth beside it "
                "(give a movie made by diffusion_bunny.demo.realclips, or no MOVIE to make them)"
            )
    if not movies:
        from diffusion_bunny.demo.realclips import HAMILTON

        if not HAMILTON.is_file():
            return (
                f"{HAMILTON} is missing: the movies are made from ../shared/testdata's Hamilton clip "
                "(put the testdata there, point DIFFUSION_BUNNY_TESTDATA at it, or give MOVIEs)"
            )
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("movies", nargs="*", type=Path, help="movies with a .cuts.json beside them")
    ap.add_argument("--minutes", type=float, default=10.0, help="length of the movies made here")
    ap.add_argument("--seeds", default="0,1", help="one movie per seed is made when no MOVIE is given")
    ap.add_argument("--size", default="1280x720")
    ap.add_argument(
        "--speed",
        default=None,
        help="LO,HI playback speeds of the repeats (default realclips' 0.8,1.25); e.g. 0.8,3 gives "
        "shots of 7-25 frames, shorter than extract.min_shot_seconds, whose cuts must all stay",
    )
    ap.add_argument(
        "--night",
        action="store_true",
        help="night-graded movies (realclips.night_grade: mean luma ~24, a third of the contrast, noise)",
    )
    ap.add_argument(
        "--flicker",
        action="store_true",
        help="old-film movies (realclips.flicker_grade: each frame's exposure +-12%% and +-6 gray "
        "levels, film grain)",
    )
    ap.add_argument("--work", type=Path, default=ROOT / "data" / "real")
    ap.add_argument("--tolerance", type=int, default=1)
    ap.add_argument("--set", action="append", default=[], help="extract KEY=VALUE (JSON value)")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args(argv)
    overrides = {}
    for kv in args.set:
        key, _, value = kv.partition("=")
        overrides[key.removeprefix("extract.")] = json.loads(value)
    movies = list(args.movies)
    if problem := missing_input(movies):
        print(f"error: {problem}", file=sys.stderr)
        return 2
    args.work.mkdir(parents=True, exist_ok=True)
    if not movies:
        from diffusion_bunny.demo import realclips

        width, _, height = args.size.partition("x")
        for seed in (int(s) for s in args.seeds.split(",")):
            params = realclips.Params(minutes=args.minutes, width=int(width), height=int(height), seed=seed)
            if args.speed:
                lo, _, hi = args.speed.partition(",")
                params = realclips.replace(params, speed=(float(lo), float(hi)))
            if args.night:
                params = realclips.replace(params, night=True)
            if args.flicker:
                params = realclips.replace(params, flicker=True)
            print(f"movie: {args.minutes:g} min, seed {seed} (made once, then reused) ...", file=sys.stderr)
            movies.append(realclips.make_movie(params, args.work, verbose=True))
    rows = []
    for movie in movies:
        row = evaluate(movie, args.work, overrides, args.tolerance)
        rows.append(row)
        print(json.dumps(row), flush=True)
    cols = ("movie", "cuts", "precision", "recall", "f1", "accepted_fast_share")
    cols += ("model_frames_per_decoded", "replay_s")
    print("\n" + " | ".join(cols))
    for row in rows:
        print(" | ".join(str(row[c]) for c in cols))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
