"""Accuracy and speed of the shot-boundary detectors on clips with known boundaries.

Detectors: PySceneDetect ``content`` and ``adaptive`` (default thresholds), TransNetV2 alone and
the cascade (stage 01's default), each fed exactly as stage 01 feeds it: one PyAV decode pass,
analysis copies taken from the decoded planes (:class:`diffusion_bunny.media.video.VideoReader`),
frames pushed to :func:`diffusion_bunny.stages.extract.detectors.base.make_boundaries`.

Sets:

* synthetic clips made here with ffmpeg
  (:mod:`diffusion_bunny.stages.extract.detectors.synthclips`; ``--variants`` clips
  per kind, each with other pictures and camera moves): hard cuts; dissolves (``xfade``), fades
  through black and wipes, also pooled as ``gradual``; camera flashes (between hard cuts; a flash
  is not a boundary); fast pans (between hard cuts);
* ``../shared/testdata/face_recognition_examples/short_hamilton_clip.mp4`` (real footage; cuts
  at frames 20, 82, 211), skipped with a note when that folder is absent, and the same clip
  night-graded (:func:`diffusion_bunny.demo.realclips.night_grade`: its dark stage at about a
  third of the contrast, mean luma ~15; ``hamilton night (real)``), and as a worn print of old
  film (:func:`diffusion_bunny.demo.realclips.flicker_grade`: every frame's exposure +-12% and
  +-6 gray levels, grain; ``hamilton flicker (real)``).

Scoring: precision, recall and F1 with TRECVID-style greedy one-to-one matching
(:func:`diffusion_bunny.demo.metrics.match_boundaries`) at each ``--tolerances`` (frames). A gradual
transition's truth is the span from its first blended frame to the first frame of the new shot
alone; a detection inside the span is at distance 0, outside it the distance to the span's
nearer end, so the same tolerance means the same thing for cuts and transitions.

Speed: every clip is decoded once without a detector and once per detector, interleaved, best of
``--repeat``; frames/s is total frames over total time (decode included, so ``decode only`` is
the ceiling). TransNetV2 is loaded once before timing. ``model frames`` is the share of frames the
network ran on (windows included): 1.00 for TransNetV2 alone (plus its padding), a fraction for
the cascade.

    uv run python python_script/eval_shots.py [--variants 3] [--tolerances 0,2] [--repeat 1]
        [--save-cuts FILE]

``--save-cuts`` writes every detector's cut list per clip as JSON; the one in
``test/stages/extract/data/eval_cut_lists.json`` (default variants, ``--detectors cascade,content``)
is what ``test/stages/extract/test_eval_cut_lists.py`` holds stage 01 to: a change to the cascade
that moves any cut on these clips fails the suite until this file is written again on purpose.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HAMILTON = ROOT.parent / "shared" / "testdata" / "face_recognition_examples" / "short_hamilton_clip.mp4"
HAMILTON_CUTS = [20, 82, 211]
DETECTORS = ("content", "adaptive", "transnetv2", "cascade")
SET_OF_KIND = {
    "cut": "hard cuts",
    "dissolve": "dissolves",
    "fadeblack": "fades (black)",
    "wipe": "wipes",
    "flash": "flashes",
    "pan": "fast pans",
}
GRADUAL_KINDS = ("dissolve", "fadeblack", "wipe")
SET_ORDER = (
    "hard cuts",
    "gradual",
    "dissolves",
    "fades (black)",
    "wipes",
    "flashes",
    "fast pans",
    "hamilton (real)",
    "hamilton night (real)",
    "hamilton flicker (real)",
)


@dataclass
class Item:
    """One clip of a set."""

    path: Path
    sets: tuple[str, ...]
    truth: list[int | tuple[int, int]]


def make_items(work: Path, variants: int) -> list[Item]:
    """Render (or reuse) the synthetic clips and add the real clip."""
    from diffusion_bunny.stages.extract.detectors.synthclips import KINDS, make_clip

    items = []
    for kind in KINDS:
        for v in range(variants):
            path = work / f"{kind}-{v}.mp4"
            clip = make_clip(path, kind, seed=17 * v + 3)
            sets = (SET_OF_KIND[kind], "gradual") if kind in GRADUAL_KINDS else (SET_OF_KIND[kind],)
            items.append(Item(path, sets, clip.truth()))
    if HAMILTON.is_file():
        from diffusion_bunny.demo.realclips import flickering_copy, night_graded_copy

        items.append(Item(HAMILTON, ("hamilton (real)",), list(HAMILTON_CUTS)))
        night = night_graded_copy(HAMILTON, work / "hamilton-night.mp4")
        items.append(Item(night, ("hamilton night (real)",), list(HAMILTON_CUTS)))
        old = flickering_copy(HAMILTON, work / "hamilton-flicker.mp4")
        items.append(Item(old, ("hamilton flicker (real)",), list(HAMILTON_CUTS)))
    else:
        print(f"note: {HAMILTON} is absent here; the real-footage row is left out")
    return items


def detect(path: Path, detector: str | None, model) -> tuple[list[int], float, int, int]:
    """One stage-01-style pass: boundaries found, seconds, frames decoded, model frames run."""
    from diffusion_bunny.config import load_config
    from diffusion_bunny.media.video import VideoReader
    from diffusion_bunny.stages.extract.detectors import make_boundaries

    overrides = {"extract.detector": detector or "content"}
    cfg = load_config(None, overrides, use_local=False).extract
    before = model.frames_run if model is not None else 0
    started = time.perf_counter()
    reader = VideoReader(path, cfg.analysis_width, detect_width=cfg.detect_width)
    found: list[int] = []
    if detector is None:
        n = sum(1 for _ in reader.frames())
        return [], time.perf_counter() - started, n, 0
    det = make_boundaries(cfg, reader.info.fps, model if cfg.uses_transnetv2 else None)
    last = -1
    for d in reader.frames():
        found += det.push(d.index, d.small_bgr)
        last = d.index
    found += det.finish(last)
    took = time.perf_counter() - started
    after = model.frames_run if model is not None else 0
    return sorted(found), took, reader.report.decoded, after - before


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Precision, recall, F1 and frames/s of the shot detectors on synthetic and real clips.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--variants", type=int, default=3, help="synthetic clips per transition kind")
    parser.add_argument("--tolerances", default="0,2", help="matching tolerances in frames")
    parser.add_argument("--repeat", type=int, default=1, help="timing: best of N passes per clip")
    parser.add_argument("--detectors", default=",".join(DETECTORS), help="detectors to compare")
    parser.add_argument("--work", default=str(ROOT / "data" / "eval_shots"), help="folder for the clips")
    parser.add_argument(
        "--precision",
        default=None,
        choices=("int8", "fp32"),
        help="TransNetV2 on ONNX Runtime (default: config)",
    )
    parser.add_argument("--save-cuts", default=None, help="write the cut lists per detector and clip (JSON)")
    args = parser.parse_args(argv)
    tolerances = [int(t) for t in args.tolerances.split(",")]
    detectors = [d.strip() for d in args.detectors.split(",") if d.strip()]
    work = Path(args.work).expanduser().resolve()
    work.mkdir(parents=True, exist_ok=True)

    from diffusion_bunny.demo.metrics import BoundaryScore, match_boundaries
    from diffusion_bunny.stages.extract.detectors.transnet import load_model

    items = make_items(work, args.variants)
    from diffusion_bunny.config import load_config

    precision = args.precision or load_config(None, {}, use_local=False).extract.detector.transnetv2_precision
    wanted = any(d in ("transnetv2", "cascade") for d in detectors)
    model = load_model("auto", precision=precision) if wanted else None
    if model is not None:
        print(
            f"TransNetV2 on {model.device} ({getattr(model, 'precision', 'fp32')}), "
            f"loaded in {model.load_s:.1f} s (not timed below)"
        )

    found: dict[tuple[str, int], list[int]] = {}
    seconds: dict[str, float] = defaultdict(float)
    frames: dict[str, int] = defaultdict(int)
    model_frames: dict[str, int] = defaultdict(int)
    for k, item in enumerate(items):
        print(f"\rclip {k + 1}/{len(items)} {item.path.name:<32}", end="", file=sys.stderr, flush=True)
        for name in [None, *detectors]:
            best = float("inf")
            for _ in range(args.repeat):
                cuts, took, n, mf = detect(item.path, name, model)
                best = min(best, took)
            key = name or "decode only"
            seconds[key] += best
            frames[key] += n
            model_frames[key] += mf
            if name is not None:
                found[(name, k)] = cuts
    print(file=sys.stderr)

    def score(det: str, set_name: str, tol: int) -> tuple[BoundaryScore, int]:
        tp = fp = fn = n_truth = 0
        for k, item in enumerate(items):
            if set_name in item.sets:
                s = match_boundaries(found[(det, k)], item.truth, tol)
                tp, fp, fn, n_truth = tp + s.tp, fp + s.fp, fn + s.fn, n_truth + len(item.truth)
        return BoundaryScore(tp, fp, fn), n_truth

    sets = [s for s in SET_ORDER if any(s in it.sets for it in items)]
    head = f"{'detector':<11}{'set':<24}{'true':>5}"
    for tol in tolerances:
        head += f" | {'P@' + str(tol):>6}{'R@' + str(tol):>6}{'F1@' + str(tol):>7}"
    head += f" | {'frames/s':>8}{'model frames':>13}"
    print()
    print(head)
    print("-" * len(head))
    print(
        f"{'decode only':<11}{'all clips':<24}{'':>5}"
        + "".join(f" | {'':>6}{'':>6}{'':>7}" for _ in tolerances)
        + f" | {frames['decode only'] / seconds['decode only']:>8.0f}{'':>13}"
    )
    for det in detectors:
        for i, set_name in enumerate(sets):
            row = f"{det if i == 0 else '':<11}{set_name:<24}"
            for j, tol in enumerate(tolerances):
                s, n_truth = score(det, set_name, tol)
                if j == 0:
                    row += f"{n_truth:>5}"
                row += f" | {s.precision:>6.2f}{s.recall:>6.2f}{s.f1:>7.2f}"
            if i == 0:
                share = model_frames[det] / frames[det] if frames[det] else 0.0
                row += f" | {frames[det] / seconds[det]:>8.0f}{share:>13.2f}"
            print(row)
    total = sum(frames[d] for d in detectors) // max(1, len(detectors))
    print(f"\n{len(items)} clips, {total} frames per detector; tolerances in frames; best of {args.repeat}")
    if args.save_cuts:
        doc = {
            "variants": args.variants,
            "precision": precision,
            "cuts": {
                det: {item.path.name: found[(det, k)] for k, item in enumerate(items)} for det in detectors
            },
        }
        Path(args.save_cuts).write_text(_cuts_json(doc))
        print(f"cut lists written to {args.save_cuts}")
    return 0


def _cuts_json(doc: dict) -> str:
    """JSON with one clip's cut list per line (a diff then shows which clip moved)."""
    lines = [
        "{",
        f' "variants": {doc["variants"]},',
        f' "precision": {json.dumps(doc["precision"])},',
        ' "cuts": {',
    ]
    dets = list(doc["cuts"])
    for i, det in enumerate(dets):
        lines.append(f"  {json.dumps(det)}: {{")
        clips = list(doc["cuts"][det].items())
        for j, (name, cuts) in enumerate(clips):
            lines.append(f"   {json.dumps(name)}: {json.dumps(cuts)}" + ("," if j < len(clips) - 1 else ""))
        lines.append("  }" + ("," if i < len(dets) - 1 else ""))
    lines += [" }", "}"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
