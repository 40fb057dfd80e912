"""Stage 06's outputs as other stages and tools rely on them: the ``dataset_items`` table and the
``dataset/`` folder (a Hugging Face imagefolder under ``hf/``, a kohya folder under ``kohya/``)."""

from __future__ import annotations

from pathlib import Path

import polars as pl

CROPS = ("full", "face", "half_body", "character")
SPLITS = ("train", "validation")

ITEM_SCHEMA = {
    "frame_id": pl.String,
    "frame_index": pl.Int64,
    "face_id": pl.String,
    "shot_id": pl.Int64,
    "path": pl.String,
    "crop": pl.String,
    "characters": pl.List(pl.String),
    "concept": pl.String,
    "text": pl.String,
    "left": pl.Int64,
    "top": pl.Int64,
    "right": pl.Int64,
    "bottom": pl.Int64,
}


DATASET_DIR = "dataset"

#: Columns of the ``dataset_items`` table (the contract's columns first).
ITEMS_COLUMNS = (
    "frame_id",
    "split",
    "file_name",
    "text",
    "characters",
    "shot_id",
    "crop",
    "repeats",
    "width",
    "height",
    "face_id",
    "concept",
    "left",
    "top",
    "right",
    "bottom",
)
#: Columns of the Hugging Face metadata files (``file_name`` becomes the ``image`` column).
METADATA_COLUMNS = ("file_name", "text", "characters", "shot_id", "frame_id", "crop", "repeats")


#: The ``clips`` table (``export.video_clips``): one shot clip per row, ``dataset/video/<clip_id>.mp4``.
CLIP_SCHEMA = {
    "clip_id": pl.String,
    "shot_id": pl.Int64,
    "start_s": pl.Float64,
    "end_s": pl.Float64,
    "frames": pl.Int64,
    "width": pl.Int64,
    "height": pl.Int64,
    "characters": pl.List(pl.String),
    "caption": pl.String,
    # The part of the movie's picture the clip shows (display pixels): the shot's picture box,
    # narrowed to the tightest crop of its exported frames (a subtitle band cut off there is cut
    # off the clip too).
    "crop_left": pl.Int64,
    "crop_top": pl.Int64,
    "crop_right": pl.Int64,
    "crop_bottom": pl.Int64,
}
VIDEO_DIR = "video"


def dataset_dir(run_dir: Path) -> Path:
    """``<run>/dataset``."""
    return Path(run_dir) / DATASET_DIR
