"""Stage 02 ``quality``: score every extracted frame once, then drop blurred, badly exposed,
text (title cards, credits) and duplicate frames, and crop burned-in subtitles, with thresholds
a person sets by eye.

* :mod:`.scores`: sharpness, brightness, contrast, clipped share and a perceptual hash, once per
  frame, on the shot's picture box (a thread pool over reduced JPEG decodes);
* :mod:`.text`: the lines of text on the frames the other rules keep (once per frame, reused on
  a rerun), and the text and subtitle rules over them;
* :mod:`.rules`: the thresholds applied in order, pure over the scores, so notebook 02's sliders
  move a threshold without scoring again and a headless rerun reproduces the choice (brightness
  relative to the film's own);
* :mod:`.stage`: the stage on a run; :mod:`.tables`: the ``quality`` table's columns and reasons;
* :mod:`.plots`, :mod:`.widgets`: notebook 02's histograms, kept/rejected grid and sliders.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

from diffusion_bunny.media.images import BOX_COLUMNS
from diffusion_bunny.pipeline.contract import ConfigView, Reads, Stage
from diffusion_bunny.pipeline.run import Run

#: What stage 02 reads of the frames table: where each frame is, its size and its picture box.
FRAME_COLUMNS = ("frame_id", "frame_index", "shot_id", "path", "width", "height", *BOX_COLUMNS)


def frame_files(run: Run, cfg: ConfigView | None = None) -> dict[str, Any]:
    """The frame files as they are now: the size of each file the frames table names (missing:
    -1), hashed. Stage 02's input beside the frames table.

    Why: a frame file deleted or damaged after stage 01 is scored ``unreadable``; stage 01 run
    again writes it back under the same row, so the frames table (all stage 02 declared before)
    does not change and stage 02 was skipped, the frame unreadable for good. A stat per frame,
    no read: a long film's thousands of frames cost milliseconds, on every ``bunny status`` too.
    The size, not the time: a copy of the run folder (``cp -r``, an archive keeping whole
    seconds) and stage 01 writing the same frames again change every file's time, and made
    stage 02 decode every frame again; a file damaged in place at its own size is not seen."""
    if not run.has_table("frames"):
        return {}
    lines, missing = [], 0
    for path in run.read_table("frames")["path"]:
        try:
            size = os.stat(run.run_dir / path).st_size
        except OSError:
            size, missing = -1, missing + 1
        lines.append(f"{path}\t{size}")
    digest = hashlib.sha256("\n".join(lines).encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return {"frame_files": {"files": len(lines), "missing": missing, "sha256": digest}}


def summary(manifest: dict[str, Any]) -> str:
    """One line about a run of stage 02: how many frames were kept and why the others were not."""
    c, f = manifest["counts"], manifest["facts"]
    skip = ("frames", "subtitles_cropped")
    reasons = ", ".join(f"{n} {reason}" for reason, n in c.items() if reason not in skip)
    if c.get("subtitles_cropped"):
        reasons += f" ({c['subtitles_cropped']} kept with their subtitles cropped off)"
    speed = f" at {f['frames_per_second']} frames/s" if f.get("frames_per_second") else ""
    text = ""
    if f.get("text_frames_detected") or f.get("text_frames_reused"):
        ms = f" at {f['text_ms_per_frame']} ms/frame" if f.get("text_ms_per_frame") else ""
        text = f"; text looked for on {f['text_frames_detected']} frames{ms}"
        if f.get("text_frames_reused"):
            text += f" ({f['text_frames_reused']} reused)"
    # A threshold moved: the last run's scores were applied again, no frame decoded.
    scored = "(scores reused)" if f.get("scores_reused") else f"scored{speed} on {f['workers']} threads"
    return f"{c['frames']} frames {scored}{text}: {reasons or 'none'}"


STAGE = Stage(
    name="quality",
    notebook="02_filter_quality.ipynb",
    package=__name__,
    summary=summary,
    reads=(Reads("frames", "extract", FRAME_COLUMNS),),
    inputs=frame_files,
    config=("quality",),
    writes=("quality",),
)
