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
from diffusion_bunny.pipeline.contract import ConfigView, Stage
from diffusion_bunny.pipeline.manifest import file_fingerprint
from diffusion_bunny.pipeline.run import Run
from diffusion_bunny.registry import SHOT_DETECTORS


def _inputs(run: Run, cfg: ConfigView) -> dict[str, Any]:
    movie = run.movie
    if not movie.is_file():
        raise StageError(f"the movie of this run is gone: {movie}; put it back or rerun on its new path")
    return {"movie": file_fingerprint(movie)}


def _owns(run: Run, cfg: ConfigView) -> dict[str, Path]:
    return {"frames/": run.run_dir / "frames", "thumbs/": run.run_dir / "thumbs"}


def _as_released(f: dict[str, Any], c: dict[str, Any]) -> str:
    """What stage 01 undid of how the film was stored, for the summary line (empty for a plain
    progressive, square-pixel, SDR movie without bars)."""
    parts = []
    if f.get("sample_aspect", "1:1") != "1:1":
        parts.append(f"stored {f['coded_width']}x{f['coded_height']}, sample aspect {f['sample_aspect']}")
    if f.get("hdr"):
        parts.append(f"HDR {f['hdr']} tone-mapped")
    if f.get("deinterlaced"):
        parts.append("deinterlaced")
    film = (f.get("picture_box") or {}).get("film_box")
    if film and (film[2] - film[0], film[3] - film[1]) != (f["width"], f["height"]):
        parts.append(f"picture {film[2] - film[0]}x{film[3] - film[1]} inside bars")
    if c.get("too_short_shots"):
        parts.append(f"{c['too_short_shots']} shot(s) too short to sample")
    return "".join(f"; {p}" for p in parts)


def summary(manifest: dict[str, Any]) -> str:
    """One line about a run of stage 01, from its manifest."""
    c, f = manifest["counts"], manifest["facts"]
    line = (
        f"{c['shots']} shots ({c['static_shots']} static, {c['dynamic_shots']} dynamic), "
        f"{c['frames']} frames kept of {c['decoded_frames']} decoded "
        f"({f['width']}x{f['height']}, {f['fps']:.3f} fps, rotation {f['rotation']}"
        f"{', mirrored' if f.get('mirrored') else ''}"
        f"{_as_released(f, c)}); detector {f['detector']}"
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


def _detectors(cfg: ConfigView) -> tuple[tuple[frozenset[str], str], ...]:
    return (SHOT_DETECTORS.code_choice(cfg.extract.detector),)


STAGE = Stage(
    name="extract",
    notebook="01_extract_frames.ipynb",
    package=__name__,
    summary=summary,
    config=("extract",),
    writes=("shots", "frames", "keyframe_candidates", "boundary_candidates"),
    owns=_owns,
    inputs=_inputs,
    detectors=_detectors,
)
