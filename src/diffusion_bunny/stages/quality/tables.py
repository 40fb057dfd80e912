"""Stage 02's table as other stages rely on it: ``quality`` (scores, ``keep``, ``reject_reason``, the
``crop_*`` region) and the reasons in the order the rules apply them."""

from __future__ import annotations

import polars as pl

from diffusion_bunny.stages.quality.text import CROP_COLUMNS

REASONS = (
    "unreadable",
    "too_dark",
    "too_bright",
    "clipped",
    "blurry",
    "text",
    "subtitles",
    "duplicate",
    "not_best",
)

SCORES_SCHEMA = {
    "frame_id": pl.Utf8,
    "readable": pl.Boolean,
    "sharpness": pl.Float64,
    "brightness": pl.Float64,
    "contrast": pl.Float64,
    "clipped": pl.Float64,
    "noise": pl.Float64,
    "phash": pl.UInt64,
    "nearest_distance": pl.Int64,
}
RULE_COLUMNS = {"keep": pl.Boolean, "reject_reason": pl.Utf8, "duplicate_of": pl.Utf8}
#: The region of the frame later stages use (frame pixels, right/bottom exclusive): the shot's
#: picture box, less the subtitle band when subtitles are cropped. Null when the frames table
#: gives no size.
CROP_SCHEMA = {c: pl.Int64 for c in CROP_COLUMNS}
