"""Stage 04's tables as other stages and the board rely on them: ``clusters`` (two levels, the
``noise`` bucket), the append-only ``feedback`` of corrections, and the cluster ids they use."""

from __future__ import annotations

import polars as pl

NOISE = "noise"
NEW = "new"
LEVELS = ("scene", "character")
NOBODY = "nobody"
UNKNOWN = "unknown"
UNSCANNED = "unscanned"

FEEDBACK_SCHEMA = {
    "event_id": pl.String,
    "ts": pl.Datetime("us", "UTC"),
    "anchor_id": pl.String,
    "from_cluster": pl.String,
    "to_cluster": pl.String,
    "label": pl.Int64,
    "level": pl.String,
}
CLUSTER_SCHEMA = {
    "frame_id": pl.String,
    "level": pl.String,
    "cluster_id": pl.String,
    "similarity": pl.Float32,
    "name": pl.String,
    "shot_id": pl.Int64,
    "characters": pl.String,
    "manual": pl.Boolean,
}


def empty_feedback() -> pl.DataFrame:
    return pl.DataFrame(schema=FEEDBACK_SCHEMA)


#: The adapter learned from the corrections, beside the tables (when there are corrections).
ADAPTER_FILE = "models/scene_adapter.npz"
#: The translation of the corrections' ids into a scene library's, written by the run that joins
#: it before it rewrites ``feedback`` and removed by the next run that finds the join done.
JOIN_FILE = "models/scene_library_join.json"
