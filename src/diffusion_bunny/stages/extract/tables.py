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
    # Shorter than extract.min_shot_seconds: kept (its cuts are real) but sampled for no frame.
    "too_short": pl.Boolean,
    # The shot's active picture inside letterbox / pillarbox bars, in display pixels of its frames
    # (right and bottom exclusive); the full frame when there are no bars (see picturebox.py).
    "box_left": pl.Int64,
    "box_top": pl.Int64,
    "box_right": pl.Int64,
    "box_bottom": pl.Int64,
    # own (the shot's own bars) | near (a neighbouring shot's, within a minute) | film (the
    # film's commonest box) | full | black (...: no light at all; then as the others) | off
    "box_source": pl.Utf8,
}
#: The picture box columns, in ``shots`` and in ``frames`` (each frame carries its shot's box).
BOX_COLUMNS = ("box_left", "box_top", "box_right", "box_bottom")
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
    "contrast_scale": pl.Float64,
    "spread": pl.Float64,
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
    "box_left": pl.Int64,
    "box_top": pl.Int64,
    "box_right": pl.Int64,
    "box_bottom": pl.Int64,
}


def frame_id_for(movie_key: str, index: int) -> str:
    """Frame ids carry the movie key so they stay unique when runs are combined into a library."""
    return f"{movie_key}_{index:07d}"


def frame_image_path(run_dir: Path, frame_id: str, path: str | None) -> Path:
    """The small thumbnail stage 01 saved for a frame (``thumbs/<frame_id>.jpg``) when there is
    one, else the frame itself (``path``, relative to the run folder)."""
    thumb = run_dir / "thumbs" / f"{frame_id}.jpg"
    return thumb if thumb.is_file() or path is None else run_dir / path


#: The region of a frame later stages look at, in the ``quality`` table when stage 02 narrowed
#: the picture box (a subtitle band cropped off); else the picture box of stage 01.
REGION_COLUMNS = ("crop_left", "crop_top", "crop_right", "crop_bottom")


def frame_regions(frames: pl.DataFrame, quality: pl.DataFrame | None = None) -> pl.DataFrame:
    """``frame_id`` and the region of each frame every measure after stage 01 must look at
    (``crop_left``, ``crop_top``, ``crop_right``, ``crop_bottom``: saved-frame pixels, right and
    bottom exclusive): stage 02's crop where it made one, else the shot's picture box, else (a
    run from before the picture box existed) the full frame."""
    if all(c in frames.columns for c in BOX_COLUMNS):
        sources = [pl.col(c) for c in BOX_COLUMNS]
    else:
        sources = [pl.lit(0), pl.lit(0), pl.col("width"), pl.col("height")]
    base = frames.select(
        "frame_id", *[src.cast(pl.Int64).alias(c) for src, c in zip(sources, REGION_COLUMNS, strict=True)]
    )
    if quality is None or not all(c in quality.columns for c in REGION_COLUMNS):
        return base
    crops = quality.select("frame_id", *[pl.col(c).alias(f"_{c}") for c in REGION_COLUMNS])
    joined = base.join(crops, on="frame_id", how="left")
    return joined.select(
        "frame_id", *[pl.coalesce(pl.col(f"_{c}"), pl.col(c)).alias(c) for c in REGION_COLUMNS]
    )


def region_of(row: dict) -> tuple[int, int, int, int] | None:
    """The region columns of one row as a tuple, or None when the row has none."""
    values = [row.get(c) for c in REGION_COLUMNS]
    return None if any(v is None for v in values) else tuple(int(v) for v in values)  # type: ignore[return-value]
