"""Stage 02 ``quality``: score every extracted frame once, then drop blurred, badly exposed and
duplicate frames with thresholds a person sets by eye.

Two halves, kept apart on purpose (docs/development.md, "scores are computed once"):

* :func:`score_frames` reads each frame once and measures sharpness, brightness, contrast, the
  share of clipped pixels and a 64-bit perceptual hash. It runs on a thread pool over frames:
  OpenCV releases the GIL while it decodes and filters, so threads use every core without the
  cost of shipping images between processes. JPEGs are decoded straight to gray and, for frames
  of 1024 px and wider, at reduced scale (libjpeg's DCT scaling): the scores need 256 pixels of
  width, not 1280. A thread decodes a 720p frame and scores it in about 3 ms, against 4.6 ms for
  a full colour decode (``python_script/bench_quality.py``).
* :func:`apply_quality_rules` is a pure function of the score table, the frames table and the
  ``quality`` settings. Notebook 02's sliders call it on every move, so no score is recomputed
  when a threshold changes, and a headless run with the saved thresholds gives the same table.

Rules, in order; a frame gets the reason of the first rule it fails:

1. ``unreadable``: the frame file is missing, empty, truncated or not an image;
2. ``too_dark`` / ``too_bright`` / ``clipped``: mean brightness outside
   [``min_brightness``, ``max_brightness``], or more than ``max_clipped`` of the pixels crushed to
   black or blown to white. Exposure comes before sharpness because the Laplacian's variance
   scales with the square of the exposure: a dark frame always also looks blurred;
3. ``blurry``: sharpness under ``min_sharpness``;
4. ``duplicate``: perceptual hash within ``dup_distance`` bits of a better frame that is kept,
   anywhere in the movie (all pairs, not only neighbours); better = sharper, and between near
   equals (within :data:`~.rules.SHARPNESS_TIE`) the earlier one;
5. ``not_best``: more than ``best_per_batch`` frames survive in its batch (a shot by default, or
   ``batch`` consecutive frames) and it is not among the sharpest.

Only frames that passed rules 1-3 can make another frame a duplicate, and only frames that stay
kept: a blurred take of a scene never removes its sharp take, and in a chain A~B~C where A is the
sharpest and C is far from A, B goes as A's duplicate and C stays. Rules 4 and 5 are decided in
one pass, sharpest first (``rules._duplicate_groups``): best-N picks among distinct frames
instead of spending its N places on copies, and a frame that is ``not_best`` makes no other
frame a duplicate, so a shot never loses its frames to a copy that was itself dropped.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

import polars as pl

from diffusion_bunny.media.images import BOX_COLUMNS
from diffusion_bunny.models.text import load_text_detector
from diffusion_bunny.pipeline.contract import Context, StageOutput
from diffusion_bunny.pipeline.manifest import code_hash, library_versions, plain, table_fingerprint
from diffusion_bunny.stages.quality import FRAME_COLUMNS, frame_files
from diffusion_bunny.stages.quality import STAGE as QUALITY
from diffusion_bunny.stages.quality.rules import (
    apply_quality_rules,
    exposure_thresholds,
    reason_counts,
    sharpness_threshold,
    with_text_columns,
)
from diffusion_bunny.stages.quality.scores import SCORE_WIDTH, score_frames
from diffusion_bunny.stages.quality.tables import SCORES_SCHEMA
from diffusion_bunny.stages.quality.text import TEXT_SCHEMA, current_keys, detect_text

if TYPE_CHECKING:
    from diffusion_bunny.models.text import TextDetector

#: The text rules that drop a frame (its duplicates may then hold the same text: a title card).
TEXT_REASONS = ("text", "subtitles")


def _reuse_text(scores: pl.DataFrame, previous: pl.DataFrame | None, keys: dict[str, str]) -> pl.DataFrame:
    """``scores`` with the text scores of the last run where their key still matches (same
    detector, width, picture box and frame file): moving a threshold never detects again."""
    scores = with_text_columns(scores)
    if previous is None or "text_key" not in previous.columns:
        return scores
    old = previous.select("frame_id", *TEXT_SCHEMA).filter(
        pl.col("text_key").is_not_null()
        & (pl.col("text_key") == pl.col("frame_id").replace_strict(keys, default=None, return_dtype=pl.Utf8))
    )
    return scores.update(old, on="frame_id", how="left", include_nulls=False) if old.height else scores


def _look(ctx: Context, frames: pl.DataFrame, ids: pl.Series, detector: TextDetector) -> pl.DataFrame:
    """The text scores of the frames ``ids``, every one marked looked at (a frame that could not
    be read again keeps null scores and passes: ``text_lines`` empty, not null)."""
    found = detect_text(
        ctx.run_dir,
        frames.filter(pl.col("frame_id").is_in(ids.implode())),
        detector,
        ctx.cfg.quality.text_width,
        progress=ctx.progress,
        progress_path=ctx.progress_path,
    )
    return found.with_columns(pl.col("text_lines").fill_null(pl.lit([], dtype=TEXT_SCHEMA["text_lines"])))


def _text_rounds(
    ctx: Context, frames: pl.DataFrame, scores: pl.DataFrame, detector: TextDetector
) -> tuple[pl.DataFrame, int, int]:
    """``scores`` once every frame the rules keep has been looked at for text, with how many
    frames were looked at and in how many rounds.

    A round applies the rules and looks at the kept frames not looked at yet. A kept frame that
    turns out to be dropped for text lets one of its duplicates through, which may hold the same
    text (a title card that recurs): those duplicates are looked at in the same round, all at
    once, instead of one per round. Rounds go on until no kept frame is left unchecked; each
    looks at one frame at least, so they end (the bound only guards against a bug)."""
    cfg = ctx.cfg.quality
    detected = 0
    for rounds in range(1, frames.height + 2):
        table = apply_quality_rules(scores, frames, cfg)
        todo = table.filter(pl.col("keep") & pl.col("text_lines").is_null())["frame_id"]
        if todo.is_empty():
            return scores, detected, rounds - 1
        found = _look(ctx, frames, todo, detector)
        scores = scores.update(found, on="frame_id", how="left", include_nulls=False)
        dropped = apply_quality_rules(scores, frames, cfg).filter(
            pl.col("frame_id").is_in(todo.implode()) & pl.col("reject_reason").is_in(TEXT_REASONS)
        )["frame_id"]
        copies = table.filter(
            pl.col("duplicate_of").is_in(dropped.implode()) & pl.col("text_lines").is_null()
        )["frame_id"]
        if not copies.is_empty():
            more = _look(ctx, frames, copies, detector)
            scores = scores.update(more, on="frame_id", how="left", include_nulls=False)
            found = pl.concat([found, more])
        detected += found.height
    raise RuntimeError("stage 02 looked for text without end: every round must look at a new frame")


def _add_text(
    ctx: Context, frames: pl.DataFrame, scores: pl.DataFrame, facts: dict
) -> tuple[pl.DataFrame, list[str]]:
    """Look for text on the frames the rules keep, round after round, until every kept frame
    has been looked at; reuse the last run's text scores where they still hold."""
    cfg = ctx.cfg.quality
    if not cfg.text_filter:
        facts["text"] = "off (quality.text_filter: false)"
        return with_text_columns(scores), []
    # A detector that cannot load stops the stage with one line naming quality.text_filter (a
    # ModelError, exit status 2): a dataset full of title cards is worse than a stage to rerun.
    detector = load_text_detector()
    keys = current_keys(ctx.run_dir, frames, detector.key, cfg.text_width)
    scores = _reuse_text(scores, ctx.own_previous("quality"), keys)
    reused = int(scores["text_lines"].is_not_null().sum())
    started = time.perf_counter()
    scores, detected, rounds = _text_rounds(ctx, frames, scores, detector)
    seconds = time.perf_counter() - started
    facts.update(
        {
            "text_detector": detector.key,
            "text_width": cfg.text_width,
            "text_frames_detected": detected,
            "text_frames_reused": reused,
            "text_rounds": rounds,
            "text_seconds": round(seconds, 3),
            "text_ms_per_frame": round(1000 * seconds / detected, 1) if detected else None,
        }
    )
    return scores, []


def _stored_scores(ctx: Context, frames: pl.DataFrame) -> pl.DataFrame | None:
    """The scores of the last run, in ``frames``' order, when they still hold; else None.

    Why: the scores are a function of the frame files, the frames table's paths and picture boxes
    and the stage's code, and of no setting (:data:`SCORE_WIDTH` is code). When the last run read
    the same inputs (the frames table's columns and :func:`frame_files`, as its manifest records
    them) with the same code, and its table is still the one it wrote, only settings moved: the
    thresholds (or ``text_width``, whose text scores are keyed on their own) apply again to the
    stored scores instead of decoding every frame again (docs/development.md, "Habits")."""
    manifest = ctx.previous
    if ctx.forced or not manifest or (manifest.get("facts") or {}).get("score_width") != SCORE_WIDTH:
        return None  # --force is the way to score again; so is a library upgrade (OpenCV's decoder)
    if manifest.get("versions") != library_versions():
        return None
    if manifest.get("code_hash") != code_hash(QUALITY.package):
        return None
    fresh = {"frames": ctx.run.table_fingerprint("frames", FRAME_COLUMNS), **frame_files(ctx.run)}
    if manifest.get("inputs") != plain(fresh):
        return None
    written = ((manifest.get("outputs") or {}).get("tables") or {}).get("quality")
    path = ctx.run.table_path("quality")
    if written is None or not path.is_file() or plain(table_fingerprint(path)) != written:
        return None
    old = ctx.own_previous("quality")
    if old is None or not set(SCORES_SCHEMA) <= set(old.columns) or old.height != frames.height:
        return None
    stored = frames.select("frame_id").join(
        old.select(list(SCORES_SCHEMA)), on="frame_id", how="left", maintain_order="left"
    )
    return None if stored["readable"].is_null().any() else stored.cast(SCORES_SCHEMA)


def compute(ctx: Context) -> StageOutput:
    """Score the frames stage 01 kept, once, then apply the rules, looking for text on the frames
    they keep: the ``quality`` table."""
    frames = ctx.table("frames")
    cfg = ctx.cfg.quality
    started = time.perf_counter()
    workers = os.cpu_count() or 1
    scores = _stored_scores(ctx, frames)
    facts: dict[str, Any] = {"score_width": SCORE_WIDTH, "workers": workers}
    if scores is not None:
        facts["scores_reused"] = scores.height
    else:
        scores = score_frames(
            ctx.run_dir, frames, workers=workers, progress=ctx.progress, progress_path=ctx.progress_path
        )
        scored = time.perf_counter() - started
        facts["scoring_seconds"] = round(scored, 3)
        facts["frames_per_second"] = (
            round(frames.height / scored, 1) if scored > 0 and frames.height else None
        )
    scores, warnings = _add_text(ctx, frames, scores, facts)
    table = apply_quality_rules(scores, frames, cfg)
    # The film-relative thresholds in force, so a reader sees why a night film kept its frames.
    exposure, sharpness = exposure_thresholds(scores, cfg), sharpness_threshold(scores, cfg)
    facts.update(
        min_brightness_in_force=round(exposure.min_brightness, 2),
        film_contrast=None if sharpness.film_contrast is None else round(sharpness.film_contrast, 2),
        sharpness_scale=round(sharpness.film_scale, 4),
    )
    counts = {"frames": table.height, **reason_counts(table)}
    cropped = int(
        (table["keep"] & (table["crop_bottom"] - table["crop_top"] < _box_height(frames, table))).sum()
    )
    if cropped:
        counts["subtitles_cropped"] = cropped
    if counts.get("unreadable"):
        warnings.append(
            f"{counts['unreadable']} frame file(s) missing or unreadable (reject_reason 'unreadable'); "
            "rerun stage extract with --force to write them again (stage quality then scores them again)"
        )
    return StageOutput(tables={"quality": table}, counts=counts, warnings=warnings, facts=facts)


def _box_height(frames: pl.DataFrame, table: pl.DataFrame) -> pl.Series:
    """Each row's picture-box height (the frame's height without a box), in ``table``'s order."""
    cols = [c for c in BOX_COLUMNS if c in frames.columns]
    expr = (pl.col("box_bottom") - pl.col("box_top")) if len(cols) == 4 else pl.lit(None, pl.Int64)
    heights = frames.select("frame_id", pl.coalesce(expr, pl.col("height")).alias("_h"))
    return table.select("frame_id").join(heights, on="frame_id", how="left", maintain_order="left")["_h"]
