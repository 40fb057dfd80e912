"""Stage 01 ``extract``: one decode pass gives shots, per-shot motion and well-chosen frames.

* :mod:`.stage`: the streaming pass over the movie (the only module that writes the run folder);
* :mod:`.detectors`: shot-boundary detectors (the TransNetV2 cascade by default, TransNetV2 alone,
  PySceneDetect's), one module each;
* :mod:`.keyframes`: which frames of a shot to keep, pure over the tables;
* :mod:`.tables`: the tables and folders other stages rely on;
* :mod:`.plots`, :mod:`.widgets`: notebook 01's figures and motion-threshold slider.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from diffusion_bunny.errors import StageError
from diffusion_bunny.pipeline.contract import ConfigView, Context, Stage, StageOutput
from diffusion_bunny.pipeline.manifest import file_fingerprint
from diffusion_bunny.pipeline.run import Run


def _compute(ctx: Context) -> StageOutput:
    from diffusion_bunny.stages.extract.stage import compute

    return compute(ctx)


def _inputs(run: Run, cfg: ConfigView) -> dict[str, Any]:
    movie = run.movie
    if not movie.is_file():
        raise StageError(f"the movie of this run is gone: {movie}; put it back or rerun on its new path")
    return {"movie": file_fingerprint(movie)}


def _owns(run: Run, cfg: ConfigView) -> dict[str, Path]:
    return {"frames/": run.run_dir / "frames", "thumbs/": run.run_dir / "thumbs"}


def summary(manifest: dict[str, Any]) -> str:
    """One line about a run of stage 01, from its manifest."""
    c, f = manifest["counts"], manifest["facts"]
    line = (
        f"{c['shots']} shots ({c['static_shots']} static, {c['dynamic_shots']} dynamic), "
        f"{c['frames']} frames kept of {c['decoded_frames']} decoded "
        f"({f['width']}x{f['height']}, {f['fps']:.3f} fps, rotation {f['rotation']}); "
        f"detector {f['detector']}"
    )
    if f.get("candidates_proposed") is not None:
        line += (
            f": {f['candidates_proposed']} candidates, {f['candidates_accepted_fast']} accepted and "
            f"{f.get('candidates_rejected_fast', 0)} rejected at once, "
            f"{f['candidates_confirmed']} confirmed and {f['candidates_rejected']} rejected by TransNetV2 "
            f"({f['model_frames_run']} network frames)"
        )
    else:
        line += f" at {f['threshold']}"
    return line


STAGE = Stage(
    name="extract",
    number=1,
    notebook="01_extract_frames.ipynb",
    package=__name__,
    compute=_compute,
    summary=summary,
    config=("extraction",),
    writes=("shots", "frames", "keyframe_candidates", "boundary_candidates"),
    owns=_owns,
    inputs=_inputs,
)
