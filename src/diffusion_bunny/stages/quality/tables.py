"""Stage 02's table as other stages rely on it: ``quality`` (scores, ``keep``, ``reject_reason``) and the
reasons in the order the rules apply them."""

from __future__ import annotations

import polars as pl

REASONS = ("unreadable", "too_dark", "too_bright", "clipped", "blurry", "duplicate", "not_best")

SCORES_SCHEMA = {
    "frame_id": pl.Utf8,
    "readable": pl.Boolean,
    "sharpness": pl.Float64,
    "brightness": pl.Float64,
    "contrast": pl.Float64,
    "clipped": pl.Float64,
    "phash": pl.UInt64,
    "nearest_distance": pl.Int64,
}
RULE_COLUMNS = {"keep": pl.Boolean, "reject_reason": pl.Utf8, "duplicate_of": pl.Utf8}
