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
  ``quality`` settings. Notebook 02's sliders call it on every move, so no score is recomputed
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

from diffusion_bunny.pipeline.contract import Context, StageOutput
from diffusion_bunny.stages.quality.rules import apply_quality_rules, reason_counts
from diffusion_bunny.stages.quality.scores import SCORE_VERSION, SCORE_WIDTH, score_frames


def compute(ctx: Context) -> StageOutput:
    """Score the frames stage 01 kept, once, then apply the rules: the ``quality`` table."""
    frames = ctx.table("frames")
    cfg = ctx.cfg.quality
    started = time.perf_counter()
    workers = os.cpu_count() or 1
    scores = score_frames(
        ctx.run_dir, frames, workers=workers, progress=ctx.progress, progress_path=ctx.progress_path
    )
    scored = time.perf_counter() - started
    table = apply_quality_rules(scores, frames, cfg)
    facts = {
        "score_version": SCORE_VERSION,
        "score_width": SCORE_WIDTH,
        "workers": workers,
        "scoring_seconds": round(scored, 3),
        "frames_per_second": round(frames.height / scored, 1) if scored > 0 and frames.height else None,
    }
    counts = {"frames": table.height, **reason_counts(table)}
    warnings = []
    if counts.get("unreadable"):
        warnings.append(
            f"{counts['unreadable']} frame file(s) missing or unreadable (reject_reason 'unreadable'); "
            "rerun stage extract with --force to write them again"
        )
    return StageOutput(tables={"quality": table}, counts=counts, warnings=warnings, facts=facts)
