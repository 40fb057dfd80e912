"""Stage 01's tables and folders, as other stages and tools rely on them: the columns of ``shots``,
``frames``, ``keyframe_candidates`` and ``boundary_candidates``, frame ids, and where a frame's
picture is (``frames/``, ``thumbs/``)."""

from __future__ import annotations

from pathlib import Path

import polars as pl

SHOTS_SCHEMA = {
    "shot_id": pl.Int64,
    "start_frame": pl.Int64,
    "end_frame": pl.Int64,
    "start_s": pl.Float64,
    "end_s": pl.Float64,
    "n_frames": pl.Int64,
    "motion": pl.Float64,
    "kind": pl.Utf8,
}
CANDIDATES_SCHEMA = {
    "shot_id": pl.Int64,
    "role": pl.Utf8,
    "frame_index": pl.Int64,
    "timestamp_s": pl.Float64,
    "analysis_sharpness": pl.Float64,
    "thumb_path": pl.Utf8,
}
BOUNDARY_CANDIDATES_SCHEMA = {
    "frame_index": pl.Int64,
    "kind": pl.Utf8,
    "fast_score": pl.Float64,
    "baseline": pl.Float64,
    "colour_score": pl.Float64,
    "flash_like": pl.Boolean,
    "motion_residual": pl.Float64,
    "motion_contrast": pl.Float64,
    "model_score": pl.Float64,
    "decision": pl.Utf8,
    "reason": pl.Utf8,
    "boundary": pl.Int64,
}
FRAMES_SCHEMA = {
    "frame_id": pl.Utf8,
    "frame_index": pl.Int64,
    "timestamp_s": pl.Float64,
    "shot_id": pl.Int64,
    "path": pl.Utf8,
    "width": pl.Int64,
    "height": pl.Int64,
    "role": pl.Utf8,
}


def frame_id_for(movie_key: str, index: int) -> str:
    """Frame ids carry the movie key so they stay unique when runs are combined into a library."""
    return f"{movie_key}_{index:07d}"


def frame_image_path(run_dir: Path, frame_id: str, path: str | None) -> Path:
    """The small thumbnail stage 01 saved for a frame (``thumbs/<frame_id>.jpg``) when there is
    one, else the frame itself (``path``, relative to the run folder)."""
    thumb = run_dir / "thumbs" / f"{frame_id}.jpg"
    return thumb if thumb.is_file() or path is None else run_dir / path
