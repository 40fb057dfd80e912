"""Stage 02 ``quality``: score every extracted frame once, then drop blurred, badly exposed and
duplicate frames with thresholds a person sets by eye.

* :mod:`.scores`: sharpness, brightness, contrast, clipped share and a perceptual hash, once per
  frame (a thread pool over reduced JPEG decodes);
* :mod:`.rules`: the thresholds applied in order, pure over the scores, so notebook 02's sliders
  move a threshold without scoring again and a headless rerun reproduces the choice;
* :mod:`.stage`: the stage on a run; :mod:`.tables`: the ``quality`` table's columns and reasons;
* :mod:`.plots`, :mod:`.widgets`: notebook 02's histograms, kept/rejected grid and sliders.
"""

from __future__ import annotations

from typing import Any

from diffusion_bunny.pipeline.contract import Context, Reads, Stage, StageOutput


def _compute(ctx: Context) -> StageOutput:
    from diffusion_bunny.stages.quality.stage import compute

    return compute(ctx)


def summary(manifest: dict[str, Any]) -> str:
    """One line about a run of stage 02: how many frames were kept and why the others were not."""
    c, f = manifest["counts"], manifest["facts"]
    reasons = ", ".join(f"{n} {reason}" for reason, n in c.items() if reason != "frames")
    speed = f" at {f['frames_per_second']} frames/s" if f.get("frames_per_second") else ""
    return f"{c['frames']} frames scored{speed} on {f['workers']} threads: {reasons or 'none'}"


STAGE = Stage(
    name="quality",
    number=2,
    notebook="02_filter_quality.ipynb",
    package=__name__,
    compute=_compute,
    summary=summary,
    reads=(Reads("frames", "extract", ("frame_id", "frame_index", "shot_id", "path", "width")),),
    config=("quality",),
    writes=("quality",),
)
