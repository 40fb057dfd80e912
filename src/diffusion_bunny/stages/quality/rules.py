"""Stage 02's rules, pure over the scores: thresholds applied in a fixed order, each rejected frame
with the first reason it fails, so a slider can move a threshold without scoring again."""

from __future__ import annotations

import numpy as np
import polars as pl

from diffusion_bunny.config import QualityConfig
from diffusion_bunny.stages.quality.scores import hamming
from diffusion_bunny.stages.quality.tables import REASONS, RULE_COLUMNS, SCORES_SCHEMA


def _batch_key(batch: str | int) -> pl.Expr:
    if batch == "shot":
        return pl.col("shot_id")
    # Batches of consecutive *sampled* frames (rows of the frames table), fixed whatever the
    # thresholds, so moving a slider never reshuffles which frames compete with each other.
    return pl.int_range(pl.len()) // int(batch)


#: Two near-duplicates whose sharpness differs by less than this share are equally good, and the
#: earlier one is kept: exact repeats (a flashback, a recap) differ only by encoding noise (0.2 %
#: on the demo's repeated shot), and the first appearance is the one a person expects to keep.
SHARPNESS_TIE = 0.05


def _duplicate_groups(
    hashes: np.ndarray, sharpness: np.ndarray, order_key: np.ndarray, max_distance: int
) -> list[tuple[int, np.ndarray]]:
    """Greedy near-duplicate removal over all pairs: ``[(kept, its duplicates), ...]`` (indices).

    Frames are visited sharpest first. The sharpest frame not yet decided is kept, unless an
    earlier frame within ``max_distance`` is as sharp within :data:`SHARPNESS_TIE` (then that one
    is kept); every undecided frame within ``max_distance`` of the kept frame becomes its
    duplicate. Only kept frames remove others, so a chain A~B~C keeps C when it is far from A.

    All pairs, one vectorised row per kept frame: with a few thousand frames per movie that is a
    few million XOR + popcounts (milliseconds), so an index (BK-tree, multi-index hashing) would
    only add code; it pays off at millions of hashes, not thousands.
    """
    n = hashes.size
    decided = np.zeros(n, dtype=bool)
    groups: list[tuple[int, np.ndarray]] = []
    # Sharpest first; among equal scores the earlier frame, so the result never depends on row order.
    for i in np.lexsort((order_key, -sharpness)):
        if decided[i]:
            continue
        near = ~decided & (hamming(hashes[i], hashes) <= max_distance)
        ties = np.flatnonzero(near & (sharpness >= (1.0 - SHARPNESS_TIE) * sharpness[i]))
        winner = int(ties[np.argmin(order_key[ties])]) if ties.size else int(i)
        decided[winner] = True
        copies = np.flatnonzero(~decided & (hamming(hashes[winner], hashes) <= max_distance))
        decided[copies] = True
        groups.append((winner, copies))
    return groups


def apply_quality_rules(scores: pl.DataFrame, frames: pl.DataFrame, cfg: QualityConfig) -> pl.DataFrame:
    """``scores`` with ``keep``, ``reject_reason`` and ``duplicate_of`` set by ``cfg``.

    Pure and cheap (no image is read), so a slider can call it on every move. ``frames`` gives
    each frame's shot and position (for batches). Rows come back in frame order.
    """
    base = (
        scores.drop([c for c in RULE_COLUMNS if c in scores.columns])
        .join(frames.select("frame_id", "frame_index", "shot_id"), on="frame_id", how="left")
        .sort("frame_index", nulls_last=True)
    )
    # Exposure before sharpness: the Laplacian's variance scales with the square of the exposure,
    # so an under-exposed frame always scores as blurred (the demo's dark shot: 18, under any sane
    # blur threshold), and "blurry" would hide the real reason.
    reason = (
        pl.when(~pl.col("readable"))
        .then(pl.lit("unreadable"))
        .when(pl.col("brightness") < cfg.min_brightness)
        .then(pl.lit("too_dark"))
        .when(pl.col("brightness") > cfg.max_brightness)
        .then(pl.lit("too_bright"))
        .when(pl.col("clipped") > cfg.max_clipped)
        .then(pl.lit("clipped"))
        .when(pl.col("sharpness") < cfg.min_sharpness)
        .then(pl.lit("blurry"))
        .otherwise(pl.lit(None, dtype=pl.Utf8))
    )
    base = base.with_columns(reason.alias("reject_reason"), _batch_key(cfg.batch).alias("_batch"))

    reasons = base["reject_reason"].to_list()
    dup_of: list[str | None] = [None] * base.height
    cand = np.flatnonzero(base["reject_reason"].is_null().to_numpy())
    if cand.size > 1:
        ids = base["frame_id"].to_list()
        for winner, copies in _duplicate_groups(
            base["phash"].to_numpy()[cand],
            base["sharpness"].to_numpy()[cand],
            base["frame_index"].to_numpy()[cand],
            cfg.dup_distance,
        ):
            for j in copies:
                reasons[cand[j]] = "duplicate"
                dup_of[cand[j]] = ids[cand[winner]]
    base = base.with_columns(
        pl.Series("reject_reason", reasons, dtype=pl.Utf8), pl.Series("duplicate_of", dup_of, dtype=pl.Utf8)
    )

    if cfg.best_per_batch is not None:
        ranked = (
            base.with_row_index("_row")
            .filter(pl.col("reject_reason").is_null())
            .sort(["_batch", "sharpness", "frame_index"], descending=[False, True, False])
            .with_columns(pl.int_range(pl.len()).over("_batch").alias("_rank"))
        )
        beyond = set(ranked.filter(pl.col("_rank") >= cfg.best_per_batch)["_row"].to_list())
        base = base.with_columns(
            pl.when(pl.int_range(pl.len()).is_in(list(beyond)))
            .then(pl.lit("not_best"))
            .otherwise(pl.col("reject_reason"))
            .alias("reject_reason")
        )
    return base.with_columns(pl.col("reject_reason").is_null().alias("keep")).select(
        *SCORES_SCHEMA, *RULE_COLUMNS
    )


def reason_counts(table: pl.DataFrame) -> dict[str, int]:
    """``{"kept": n, "<reason>": n, ...}`` in rule order, reasons with no frame left out."""
    counts = {"kept": int(table["keep"].sum())}
    found = dict(table.group_by("reject_reason").len().drop_nulls().iter_rows())
    counts.update({r: int(found[r]) for r in REASONS if r in found})
    return counts
