"""Stage 02's rules, pure over the scores: thresholds applied in a fixed order, each rejected frame
with the first reason it fails, so a slider can move a threshold without scoring again."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

from diffusion_bunny.media.images import BOX_COLUMNS
from diffusion_bunny.stages.quality.scores import hamming
from diffusion_bunny.stages.quality.settings import QualitySettings
from diffusion_bunny.stages.quality.tables import (
    CROP_SCHEMA,
    REASONS,
    RULE_COLUMNS,
    SCORES_SCHEMA,
)
from diffusion_bunny.stages.quality.text import TEXT_SCHEMA, crop_boxes, text_rules


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
    hashes: np.ndarray,
    sharpness: np.ndarray,
    order_key: np.ndarray,
    max_distance: int,
    batches: np.ndarray | None = None,
    quota: int | None = None,
) -> tuple[list[tuple[int, np.ndarray]], list[int]]:
    """Greedy near-duplicate removal over all pairs, with at most ``quota`` frames kept per batch:
    ``([(kept, its duplicates), ...], [not best, ...])`` (indices).

    Frames are visited sharpest first. The sharpest frame not yet decided is kept, unless an
    earlier frame within ``max_distance`` is as sharp within :data:`SHARPNESS_TIE` (then that one
    is kept); every undecided frame within ``max_distance`` of the kept frame becomes its
    duplicate. Only kept frames remove others, so a chain A~B~C keeps C when it is far from A.

    With a ``quota`` (``best_per_batch``), a frame whose batch (``batches``) already keeps
    ``quota`` frames is not kept but ``not_best``, and removes no copy: one pass decides both,
    because a frame dropped as the duplicate of a frame that turns out ``not_best`` would stand
    for nothing kept, and a shot could lose every frame. The batch's places go to its sharpest
    distinct frames, as before: duplicates are decided as their winner is, and take no place.

    All pairs, one vectorised row per kept frame: with a few thousand frames per movie that is a
    few million XOR + popcounts (milliseconds), so an index (BK-tree, multi-index hashing) would
    only add code; it pays off at millions of hashes, not thousands.
    """
    n = hashes.size
    decided = np.zeros(n, dtype=bool)
    groups: list[tuple[int, np.ndarray]] = []
    not_best: list[int] = []
    places: dict[object, int] = {}
    keys = batches.tolist() if batches is not None else []
    # Sharpest first; among equal scores the earlier frame, so the result never depends on row order.
    for i in np.lexsort((order_key, -sharpness)):
        while not decided[i]:
            near = ~decided & (hamming(hashes[i], hashes) <= max_distance)
            ties = np.flatnonzero(near & (sharpness >= (1.0 - SHARPNESS_TIE) * sharpness[i]))
            winner = int(ties[np.argmin(order_key[ties])]) if ties.size else int(i)
            decided[winner] = True
            if quota is not None and batches is not None:
                batch = keys[winner]
                if places.get(batch, 0) >= quota:
                    not_best.append(winner)
                    continue
                places[batch] = places.get(batch, 0) + 1
            copies = np.flatnonzero(~decided & (hamming(hashes[winner], hashes) <= max_distance))
            decided[copies] = True
            groups.append((winner, copies))
    return groups, not_best


#: Fewer frames than this between the black floor and the white ceiling say nothing about the
#: film's exposure: the thresholds then apply as they are.
MIN_FRAMES_RELATIVE = 5


#: The variance of the 3x3 Laplacian of white noise over the noise's variance (1 + 1 + 1 + 1 + 16).
NOISE_LAPLACIAN = 20.0


def detail() -> pl.Expr:
    """Each frame's detail: its sharpness less what its noise scores (``NOISE_LAPLACIAN`` times
    the noise's variance; no noise score, no share)."""
    return pl.col("sharpness") - NOISE_LAPLACIAN * pl.col("noise").fill_null(0.0) ** 2


@dataclass(frozen=True)
class Exposure:
    """The exposure thresholds in force for one film (see :func:`exposure_thresholds`)."""

    #: Median brightness of the film's frames between the floor and the ceiling (None: too few).
    film_brightness: float | None
    #: Median clipped share of those frames (None: too few).
    film_clipped: float | None
    min_brightness: float
    max_brightness: float
    max_clipped: float
    #: Detail (sharpness less its noise) at and above which a frame outside the brightness window
    #: is kept (None: the window alone decides).
    min_detail: float | None = None

    def badly_exposed(self) -> pl.Expr:
        """Whether each frame's brightness says nothing is left of its picture: outside the
        window and without the detail a picture shows (see :func:`_first_reason`)."""
        shows = (
            pl.lit(False)
            if self.min_detail is None
            else (pl.col("sharpness").is_not_nan() & (detail() >= self.min_detail)).fill_null(False)
        )
        return ~shows


def exposure_thresholds(scores: pl.DataFrame, cfg: QualitySettings) -> Exposure:
    """The brightness and clipping thresholds for this film, pure over its scores.

    With ``relative_brightness``, the film's own median brightness ``m`` (over its readable
    frames between ``black_floor`` and ``white_ceiling``, so black frames and flashes do not pull
    it) moves the thresholds:

    * too dark below ``min_brightness * min(1, m / reference_brightness)``, never under
      ``black_floor``: a film darker than the reference keeps its night scenes (they are dark
      for this film, not badly exposed), while a frame darker than the floor (black frames, the
      end of a fade) goes whatever the film;
    * too bright above ``255 - (255 - max_brightness) * min(1, (255 - m) / (255 - reference))``,
      never over ``white_ceiling``: the same for a film brighter than the reference;
    * clipped above ``max_clipped + (1 - max_clipped) * c``, where ``c`` is the film's median
      clipped share: a film graded dark crushes its shadows in every night scene, and that share
      is the film's look, not a fault of one frame.

    A film at or near the reference gets the configured thresholds unchanged: the thresholds are
    only ever loosened for a film, never tightened (a night scene in a bright film is still a
    usable picture). Without ``relative_brightness`` they apply as configured.

    Whatever the window, a frame that still shows its picture is kept: ``exposure_detail`` of
    detail (see :meth:`Exposure.badly_exposed` and :func:`_first_reason`).
    """
    detail = cfg.exposure_detail
    if not cfg.relative_brightness:
        return Exposure(None, None, cfg.min_brightness, cfg.max_brightness, cfg.max_clipped, detail)
    usable = scores.filter(
        pl.col("readable")
        & pl.col("brightness").is_between(cfg.black_floor, cfg.white_ceiling)
        & pl.col("brightness").is_not_nan()
    )
    if usable.height < MIN_FRAMES_RELATIVE:
        return Exposure(None, None, cfg.min_brightness, cfg.max_brightness, cfg.max_clipped, detail)
    m = float(usable["brightness"].median())
    c = float(usable["clipped"].median())
    ref = cfg.reference_brightness
    dark = max(cfg.black_floor, cfg.min_brightness * min(1.0, m / ref))
    bright = min(
        cfg.white_ceiling, 255.0 - (255.0 - cfg.max_brightness) * min(1.0, (255.0 - m) / (255.0 - ref))
    )
    clipped = cfg.max_clipped + (1.0 - cfg.max_clipped) * c
    return Exposure(m, c, dark, bright, clipped, detail)


@dataclass(frozen=True)
class Sharpness:
    """The sharpness threshold in force for one film (see :func:`sharpness_threshold`)."""

    #: Median contrast of the film's frames between the floor and the ceiling (None: too few).
    film_contrast: float | None
    #: The film's contrast over ``reference_contrast``, at most 1 (1: min_sharpness as it is).
    film_scale: float
    min_sharpness: float

    def blurry(self) -> pl.Expr:
        """Whether each frame is blurry: its sharpness under ``min_sharpness`` in an ordinary
        film; in a flat one, its detail (sharpness less its noise's share, see
        :data:`NOISE_LAPLACIAN`) under ``min_sharpness`` times the square of the smaller of the
        film's scale and the frame's own contrast over the reference."""
        if self.film_scale >= 1.0 or self.film_contrast is None:
            return pl.col("sharpness") < self.min_sharpness
        reference = self.film_contrast / self.film_scale
        own = (pl.col("contrast") / reference).clip(upper_bound=1.0)
        scale = pl.min_horizontal(own, pl.lit(self.film_scale))
        return detail() < self.min_sharpness * scale * scale


def sharpness_threshold(scores: pl.DataFrame, cfg: QualitySettings) -> Sharpness:
    """The blur threshold for this film, pure over its scores.

    The variance of the Laplacian grows with the square of the picture's contrast: the same
    scene graded to a night look (a third of the contrast) scores a ninth, and an absolute
    ``min_sharpness`` drops sharp night frames as blurry. A contrast-free measure (the variance
    over the contrast squared) applied to every film would move every film's verdicts, so with
    ``relative_sharpness`` the rule only loosens, and only for a flat film. The film's median
    contrast ``c`` (standard deviation of gray, over its readable frames between
    ``black_floor`` and ``white_ceiling``, as for exposure) at or above ``reference_contrast``
    keeps ``min_sharpness`` as it is: ordinary films are judged as before. Under it the film is
    taken as one graded down by ``s = c / reference_contrast`` (a night grade divides every
    frame's contrast alike), and each frame's detail is held to ``min_sharpness * s^2``: the
    threshold once the film is graded flat; or, for a frame flatter than that (a shot darker
    than the rest of the night), to ``min_sharpness * (own / reference_contrast)^2`` with its
    own contrast: the looser of the two, since either says what the frame would score lit.
    Each alone was measured on the night-graded real loops (``calibrate_quality.py --part
    night``): the frame's own contrast alone is stricter than the lit film wherever a frame is
    contrastier than the film's median (a Hamilton frame scoring 2.9 times the threshold lit
    was dropped night-graded); the film's alone kept a frame in 89-90% of the shots (held out 88%)
    where the looser of the two keeps 95-98% (held out 94%).

    A blurred frame stays blurred at any contrast (its score falls by ``s^2`` with the
    threshold) once the noise is taken out: a night exposure's noise scores about
    ``20 * noise^2`` (the ``noise`` score), as much as the detail of a soft night frame and
    most of what an out-of-focus one scores (a blurred night-graded Hamilton frame: 8.5, of
    which 0.9 detail), so in a flat film the threshold is compared with the sharpness less
    that. In an ordinary film the noise is a few per cent of a frame's score and is left in
    (its verdicts stay as they were).
    """
    if not cfg.relative_sharpness:
        return Sharpness(None, 1.0, cfg.min_sharpness)
    usable = scores.filter(
        pl.col("readable")
        & pl.col("brightness").is_between(cfg.black_floor, cfg.white_ceiling)
        & pl.col("contrast").is_not_nan()
    )
    if usable.height < MIN_FRAMES_RELATIVE:
        return Sharpness(None, 1.0, cfg.min_sharpness)
    c = float(usable["contrast"].median())
    return Sharpness(c, min(1.0, c / cfg.reference_contrast), cfg.min_sharpness)


def with_text_columns(scores: pl.DataFrame) -> pl.DataFrame:
    """``scores`` with the text columns (null: not looked at) and the ``noise`` score (null: not
    measured, taken as none) when it has none (a table written before them, or a test's small
    table)."""
    wanted = {**TEXT_SCHEMA, "noise": pl.Float64}
    missing = [
        pl.lit(None, dtype).alias(name) for name, dtype in wanted.items() if name not in scores.columns
    ]
    return scores.with_columns(missing) if missing else scores


def apply_quality_rules(scores: pl.DataFrame, frames: pl.DataFrame, cfg: QualitySettings) -> pl.DataFrame:
    """``scores`` with ``keep``, ``reject_reason``, ``duplicate_of`` and the ``crop_*`` region set
    by ``cfg``.

    Pure and cheap (no image is read), so a slider can call it on every move. ``frames`` gives
    each frame's shot and position (for batches), and its size and picture box (for the crop).
    Rows come back in frame order. Frames whose text was not looked at (null ``text_lines``)
    pass the text rules: the stage looks at every frame these rules keep (see ``stage.py``).
    The rules run in order, each on the frames the earlier ones kept: the first failed
    threshold (:func:`_first_reason`), then duplicates, then the best per batch.
    """
    scores = with_text_columns(scores)
    geometry = [c for c in ("width", "height", *BOX_COLUMNS) if c in frames.columns]
    base = (
        scores.drop([c for c in (*RULE_COLUMNS, *CROP_SCHEMA) if c in scores.columns])
        .join(frames.select("frame_id", "frame_index", "shot_id"), on="frame_id", how="left")
        .sort("frame_index", nulls_last=True)
    )
    text = text_rules(base, cfg, frames.select("frame_id", *geometry))
    base = base.with_columns(text["text_reason"], text["_crop_top"], text["_crop_bottom"])
    base = base.with_columns(
        _first_reason(exposure_thresholds(base, cfg), sharpness_threshold(base, cfg)).alias("reject_reason"),
        _batch_key(cfg.batch).alias("_batch"),
    )
    base = _mark_duplicates(base, cfg.dup_distance, cfg.best_per_batch)
    # Only a kept frame's crop leaves out its subtitles: a rejected frame's region is its picture.
    base = base.with_columns(
        pl.col("reject_reason").is_null().alias("keep"),
        pl.when(pl.col("reject_reason").is_null())
        .then(pl.col("_crop_top"))
        .otherwise(0.0)
        .alias("_crop_top"),
        pl.when(pl.col("reject_reason").is_null())
        .then(pl.col("_crop_bottom"))
        .otherwise(1.0)
        .alias("_crop_bottom"),
    )
    crops = crop_boxes(base, frames.select("frame_id", *geometry))
    return base.join(crops, on="frame_id", how="left", maintain_order="left").select(
        *SCORES_SCHEMA, *TEXT_SCHEMA, *RULE_COLUMNS, *CROP_SCHEMA
    )


def _first_reason(exposure: Exposure, sharpness: Sharpness) -> pl.Expr:
    """Each frame's first failed threshold (null: it passes them all), from the columns of the
    scores and the text rules' ``text_reason``.

    Exposure before sharpness: the Laplacian's variance scales with the square of the exposure,
    so an under-exposed frame always scores as blurred (the demo's dark shot: 18, under any sane
    blur threshold), and "blurry" would hide the real reason.

    Brightness alone does not condemn a frame: one outside the window (the floor and the ceiling
    included) that keeps ``exposure_detail`` of detail (its sharpness
    less the noise's share, as in :meth:`Sharpness.blurry`: a noisy dark frame's grain is no
    detail) shows its picture, and is judged by the other rules. A film's mean says nothing of
    its look: a cartoon's snowfield (mean 240-246) or its cave (mean 22) drawn with crisp lines
    was dropped as badly exposed while every character in it was plain to see, and those shots
    lost their only frame. What goes still goes: black frames, fades and white flashes keep
    none of their picture's detail (a fade to 3 % keeps a thousandth of the Laplacian's
    variance), and a murky under-exposed frame scores well under ``min_sharpness`` (the
    Laplacian's variance falls with the square of the exposure).

    Text after them (it is looked for
    on the frames they keep only) and before duplicates, so that a title card never stands in
    for a clean frame of its shot as the one kept copy.
    """
    return (
        pl.when(~pl.col("readable"))
        .then(pl.lit("unreadable"))
        .when((pl.col("brightness") < exposure.min_brightness) & exposure.badly_exposed())
        .then(pl.lit("too_dark"))
        .when((pl.col("brightness") > exposure.max_brightness) & exposure.badly_exposed())
        .then(pl.lit("too_bright"))
        .when(pl.col("clipped") > exposure.max_clipped)
        .then(pl.lit("clipped"))
        .when(sharpness.blurry())
        .then(pl.lit("blurry"))
        .otherwise(pl.col("text_reason"))
    )


def _mark_duplicates(base: pl.DataFrame, dup_distance: int, best_per_batch: int | None) -> pl.DataFrame:
    """``base`` with the near-duplicates among the frames not yet rejected marked ``duplicate``
    and ``duplicate_of`` the frame kept in their place, and with ``best_per_batch``, the frames
    beyond the sharpest distinct ones of their batch marked ``not_best`` (see
    :func:`_duplicate_groups`, which decides both at once)."""
    reasons = base["reject_reason"].to_list()
    dup_of: list[str | None] = [None] * base.height
    cand = np.flatnonzero(base["reject_reason"].is_null().to_numpy())
    if cand.size:
        ids = base["frame_id"].to_list()
        # The candidates' own hashes, as unsigned 64-bit integers: a column holding an unreadable
        # frame's null becomes float64 in numpy, whose 53 bits rounded every hash, and frames up
        # to a few bits apart (18% of those 5-8 bits apart) counted as duplicates.
        hashes = base["phash"].gather(cand).cast(pl.UInt64).to_numpy()
        groups, not_best = _duplicate_groups(
            hashes,
            base["sharpness"].to_numpy()[cand],
            base["frame_index"].to_numpy()[cand],
            dup_distance,
            batches=base["_batch"].gather(cand).to_numpy(),
            quota=best_per_batch,
        )
        for winner, copies in groups:
            for j in copies:
                reasons[cand[j]] = "duplicate"
                dup_of[cand[j]] = ids[cand[winner]]
        for j in not_best:
            reasons[cand[j]] = "not_best"
    return base.with_columns(
        pl.Series("reject_reason", reasons, dtype=pl.Utf8), pl.Series("duplicate_of", dup_of, dtype=pl.Utf8)
    )


def reason_counts(table: pl.DataFrame) -> dict[str, int]:
    """``{"kept": n, "<reason>": n, ...}`` in rule order, reasons with no frame left out."""
    counts = {"kept": int(table["keep"].sum())}
    found = dict(table.group_by("reject_reason").len().drop_nulls().iter_rows())
    counts.update({r: int(found[r]) for r in REASONS if r in found})
    return counts
