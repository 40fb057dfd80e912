"""Stage 02 ``quality``: the scores, each rule on small tables, bad input, the demo movie's ground
truth, and notebook 02's sliders driven from Python."""

from __future__ import annotations

import itertools
import json
import os
from io import BytesIO
from pathlib import Path
from unittest.mock import ANY

import cv2
import numpy as np
import polars as pl
import pytest
import yaml
from PIL import Image

from diffusion_bunny.config import load_config, save_local_settings
from diffusion_bunny.demo.run import expected_reasons
from diffusion_bunny.errors import ConfigError
from diffusion_bunny.media.images import BOX_COLUMNS
from diffusion_bunny.pipeline.run import Run
from diffusion_bunny.stages import run_stage, stage_state
from diffusion_bunny.stages.quality import frame_files
from diffusion_bunny.stages.quality.plots import quality_histograms, quality_sheet
from diffusion_bunny.stages.quality.rules import (
    apply_quality_rules,
    exposure_thresholds,
    reason_counts,
    sharpness_threshold,
)
from diffusion_bunny.stages.quality.scores import (
    hamming,
    nearest_distances,
    noise_sigma,
    score_frames,
    score_gray,
    score_image,
)
from diffusion_bunny.stages.quality.settings import QualitySettings
from diffusion_bunny.stages.quality.tables import SCORES_SCHEMA

# Random 64-bit hashes are about 32 bits apart; these 12 are at least 20 apart (checked below).
FAR = [int(h) for h in np.random.default_rng(7).integers(0, 2**63, size=12, dtype=np.uint64)]


def scores(rows: list[dict]) -> tuple[pl.DataFrame, pl.DataFrame]:
    """A score table and its frames table from short rows; unspecified scores are clean."""
    full = []
    for i, row in enumerate(rows):
        full.append(
            {
                "frame_id": f"f{i}",
                "readable": True,
                "sharpness": 500.0,
                "brightness": 120.0,
                "contrast": 50.0,
                "clipped": 0.0,
                "phash": FAR[i] if i < len(FAR) else None,
                "nearest_distance": None,
                "shot_id": 0,
                **row,
            }
        )
    table = pl.DataFrame(full).with_columns(pl.col("phash").cast(pl.UInt64))
    frames = table.select(
        "frame_id", pl.int_range(pl.len()).mul(10).alias("frame_index"), pl.col("shot_id").cast(pl.Int64)
    )
    return table.drop("shot_id"), frames


def distinct(rows: list[dict]) -> list[dict]:
    """``rows`` with random hashes (about 32 bits apart, never within ``dup_distance``), for
    tables longer than :data:`FAR`."""
    hashes = np.random.default_rng(11).integers(0, 2**63, size=len(rows), dtype=np.uint64)
    return [{"phash": int(h), **row} for h, row in zip(hashes, rows, strict=True)]


def test_far_hashes_are_far():
    d = hamming(np.array(FAR, np.uint64)[:, None], np.array(FAR, np.uint64)[None, :])
    assert d[~np.eye(len(FAR), dtype=bool)].min() >= 20


def reasons(table: pl.DataFrame) -> list[str | None]:
    return table["reject_reason"].to_list()


def test_exposure_and_sharpness_rules_in_order():
    cfg = QualitySettings(min_sharpness=40, min_brightness=35, max_brightness=230, max_clipped=0.5)
    table, frames = scores(
        [
            {"readable": False, "sharpness": None, "brightness": None, "clipped": None, "phash": None},
            {"brightness": 20.0, "sharpness": 10.0},  # dark and therefore also "blurred": dark wins
            {"brightness": 240.0, "sharpness": 45.0},  # washed out: too little detail to show
            {"clipped": 0.7},
            {"sharpness": 39.9},
            {"sharpness": 40.0, "brightness": 35.0},  # thresholds are inclusive for keeping
            {},
        ]
    )
    out = apply_quality_rules(table, frames, cfg)
    assert reasons(out) == ["unreadable", "too_dark", "too_bright", "clipped", "blurry", None, None]
    assert out["keep"].to_list() == [False] * 5 + [True] * 2
    assert reason_counts(out) == {
        "kept": 2,
        "unreadable": 1,
        "too_dark": 1,
        "too_bright": 1,
        "clipped": 1,
        "blurry": 1,
    }
    # Pure: the same inputs give the same table, the inputs are untouched, row order is irrelevant.
    assert out.equals(apply_quality_rules(table, frames, cfg))
    shuffled = apply_quality_rules(table.sample(fraction=1.0, shuffle=True, seed=1), frames, cfg)
    assert shuffled.equals(out)
    assert "keep" not in table.columns


def test_duplicates_anywhere_in_the_movie_keep_the_better_frame():
    cfg = QualitySettings(dup_distance=4)
    same = 0x123456789ABCDEF0
    table, frames = scores(
        [
            {"phash": same, "sharpness": 300.0},
            {},
            {},
            {"phash": same ^ 0b1011, "sharpness": 900.0},  # 3 bits away, far in time, sharper
            {},
            {"phash": same ^ 0b11111, "sharpness": 100.0},  # 5 bits from f0 and 2 from f3
            {"phash": same, "sharpness": 5.0},  # blurred copy: rejected as blurry, not a duplicate
        ]
    )
    out = apply_quality_rules(table, frames, cfg)
    assert reasons(out) == ["duplicate", None, None, None, None, "duplicate", "blurry"]
    assert out["duplicate_of"].to_list() == ["f3", None, None, None, None, "f3", None]
    # At distance 1 only (nearly) identical hashes would be duplicates: none here.
    assert reasons(apply_quality_rules(table, frames, QualitySettings(dup_distance=1)))[:6] == [None] * 6


def test_an_unreadable_frame_leaves_the_other_frames_hashes_whole():
    """An unreadable frame has no hash (null): the column's numbers must stay 64-bit integers for
    the others. As floats (what numpy makes of a column with a null) their low bits were rounded
    away, and frames 5 bits apart counted as duplicates at dup_distance 4."""
    cfg = QualitySettings(dup_distance=4)
    first = FAR[0] | (1 << 63)
    rows = [{"phash": first}, {"phash": first ^ 0b11111}]
    table, frames = scores(rows)
    assert reasons(apply_quality_rules(table, frames, cfg)) == [None, None]
    broken = [*rows, {"readable": False, "phash": None, "sharpness": None, "brightness": None}]
    table, frames = scores(broken)
    assert reasons(apply_quality_rules(table, frames, cfg)) == [None, None, "unreadable"]
    # Over many pairs 5-8 bits apart, none is taken for a duplicate.
    rng = np.random.default_rng(3)
    pairs = []
    for _ in range(60):
        a = int(rng.integers(2**62, 2**63, dtype=np.uint64)) | (1 << 63)
        bits = rng.choice(64, size=int(rng.integers(5, 9)), replace=False)
        pairs += [{"phash": a}, {"phash": a ^ int(sum(1 << int(b) for b in bits))}]
    table, frames = scores(distinct_shots([*pairs, {"readable": False, "phash": None, "sharpness": None}]))
    assert "duplicate" not in reasons(apply_quality_rules(table, frames, cfg))


def distinct_shots(rows: list[dict]) -> list[dict]:
    """``rows``, each in a shot of its own (so that only the duplicate rule could drop one)."""
    return [{"shot_id": i, **row} for i, row in enumerate(rows)]


def test_the_sliders_hold_every_setting_they_open_with():
    """A slider clamps a value outside its range, and "use these thresholds" saves what the
    sliders hold: each opens on the setting as it is, however far it lies from this film's."""
    from diffusion_bunny.stages.quality.widgets import _sliders

    cfg = QualitySettings(min_sharpness=50, exposure_detail=800, dup_distance=40, best_per_batch=30)
    sliders = _sliders(cfg, top_sharp=20.0)  # a soft film: its sharpest frame scores 20
    assert sliders["min_sharpness"].value == pytest.approx(50, rel=0.01)
    assert sliders["exposure_detail"].value == 800 and sliders["dup_distance"].value == 40
    assert sliders["best_per_batch"].value == 30


def test_blurred_frame_never_removes_its_sharp_copy():
    same = 0x0F0F0F0F0F0F0F0F
    table, frames = scores([{"phash": same, "sharpness": 10.0}, {"phash": same, "sharpness": 200.0}])
    assert reasons(apply_quality_rules(table, frames, QualitySettings())) == ["blurry", None]
    # With the blur rule off, the sharper copy wins, wherever it is.
    loose = apply_quality_rules(table, frames, QualitySettings(min_sharpness=0))
    assert reasons(loose) == ["duplicate", None] and loose["duplicate_of"][0] == "f1"


def test_duplicate_chain_and_sharpness_ties():
    a = 0
    b = 0b111  # 3 bits from a
    c = 0b111111  # 6 bits from a, 3 from b
    table, frames = scores(
        [{"phash": a, "sharpness": 900.0}, {"phash": b, "sharpness": 800.0}, {"phash": c, "sharpness": 700.0}]
    )
    # Only kept frames remove others: b goes as a's duplicate, c (far from a) stays.
    assert reasons(apply_quality_rules(table, frames, QualitySettings(dup_distance=3))) == [
        None,
        "duplicate",
        None,
    ]
    # A repeat that is sharper only by encoding noise does not displace the first appearance.
    table, frames = scores([{"phash": a, "sharpness": 649.5}, {}, {"phash": a, "sharpness": 650.9}])
    out = apply_quality_rules(table, frames, QualitySettings())
    assert reasons(out) == [None, None, "duplicate"] and out["duplicate_of"][2] == "f0"


def test_best_n_per_shot_and_per_consecutive_frames():
    sharp = [100.0, 300.0, 200.0, 50.0, 400.0, 410.0, 90.0]
    shots = [0, 0, 0, 1, 1, 1, 2]
    table, frames = scores([{"sharpness": s, "shot_id": k} for s, k in zip(sharp, shots, strict=True)])
    keep_all = apply_quality_rules(table, frames, QualitySettings())
    assert keep_all["keep"].all()
    per_shot = apply_quality_rules(table, frames, QualitySettings(best_per_batch=1))
    assert per_shot["keep"].to_list() == [False, True, False, False, False, True, True]
    assert set(reasons(per_shot)) == {None, "not_best"}
    two = apply_quality_rules(table, frames, QualitySettings(best_per_batch=2))
    assert two["keep"].to_list() == [False, True, True, False, True, True, True]
    # Batches of 2 consecutive frames: (0,1) (2,3) (4,5) (6).
    pairs = apply_quality_rules(table, frames, QualitySettings(batch=2, best_per_batch=1))
    assert pairs["keep"].to_list() == [False, True, True, False, False, True, True]
    # Rejected frames do not take a place: with f1 blurred, f2 is the best of shot 0.
    blurred = table.with_columns(
        pl.when(pl.col("frame_id") == "f1").then(1.0).otherwise(pl.col("sharpness")).alias("sharpness")
    )
    out = apply_quality_rules(blurred, frames, QualitySettings(best_per_batch=1))
    assert reasons(out)[:3] == ["not_best", "blurry", None]


def test_a_frame_dropped_as_not_best_makes_no_duplicate():
    # f2 (shot 0) is beyond shot 0's one place; f3, shot 1's only frame, is 2 bits from it. A
    # duplicate of a frame that is not kept stands for nothing: f3 stays, and shot 1 keeps a frame.
    near = 0x0F0F_0F0F_0F0F_0F0F
    rows = [
        {"sharpness": 1000.0, "shot_id": 0},
        {"sharpness": 900.0, "shot_id": 0},
        {"sharpness": 800.0, "shot_id": 0, "phash": near},
        {"sharpness": 700.0, "shot_id": 1, "phash": near ^ 0b11},
    ]
    table, frames = scores(rows)
    out = apply_quality_rules(table, frames, QualitySettings(text_filter=False, best_per_batch=1))
    assert reasons(out) == [None, "not_best", "not_best", None]
    assert out["duplicate_of"].is_null().all()
    # Every duplicate names a frame that is kept, whatever the places per batch.
    for best in (1, 2, 3):
        out = apply_quality_rules(table, frames, QualitySettings(text_filter=False, best_per_batch=best))
        kept = set(out.filter("keep")["frame_id"])
        assert set(out["duplicate_of"].drop_nulls()) <= kept
    # Near copies in one shot still take no place: f3 goes as f2's duplicate, not as not_best.
    one_shot = frames.with_columns(pl.lit(0, pl.Int64).alias("shot_id"))
    out = apply_quality_rules(table, one_shot, QualitySettings(text_filter=False, best_per_batch=3))
    assert reasons(out) == [None, None, None, "duplicate"] and out["duplicate_of"][3] == "f2"


def test_brightness_is_relative_to_the_film():
    rng = np.random.default_rng(3)
    # A dark film: its scenes between 15 and 45 (median ~30), black frames at 1-4, one flash.
    night = [{"brightness": float(b)} for b in rng.uniform(15, 45, 30)]
    # Black frames and flashes keep none of a picture's detail.
    black = [{"brightness": float(b), "clipped": 0.97, "sharpness": 0.4} for b in (1.0, 2.5, 4.0)]
    flash = [{"brightness": 250.0, "sharpness": 1.0}]
    table, frames = scores(distinct(night + black + flash))
    out = apply_quality_rules(table, frames, QualitySettings())
    got = reasons(out)
    assert got[:30] == [None] * 30  # every night scene stays
    assert got[30:] == ["too_dark", "too_dark", "too_dark", "too_bright"]
    exposure = exposure_thresholds(table, QualitySettings())
    median = float(np.median([r["brightness"] for r in night]))
    assert exposure.film_brightness == pytest.approx(median)
    assert exposure.min_brightness == pytest.approx(max(10.0, 35.0 * median / 100.0))
    # Absolute thresholds and brightness alone (the first rule): most of the film goes as too dark.
    first_rule = QualitySettings(relative_brightness=False, exposure_detail=None)
    absolute = reasons(apply_quality_rules(table, frames, first_rule))
    assert absolute.count("too_dark") > 20
    # A film of ordinary exposure keeps the configured thresholds: never tightened.
    ordinary, ordinary_frames = scores(
        distinct(
            [
                {"brightness": b, "sharpness": 500.0 if b > 35 else 30.0}
                for b in (90.0, 110.0, 130.0, 120.0, 100.0, 34.0)
            ]
        )
    )
    assert reasons(apply_quality_rules(ordinary, ordinary_frames, QualitySettings()))[-1] == "too_dark"
    assert exposure_thresholds(ordinary, QualitySettings()).min_brightness == 35.0
    # A bright film (snow): its bright scenes stay, a white frame still goes.
    snow, snow_frames = scores(
        distinct(
            [
                {"brightness": b, "sharpness": 500.0 if b < 250 else 2.0}
                for b in (200.0, 235.0, 238.0, 215.0, 225.0, 252.0)
            ]
        )
    )
    assert reasons(apply_quality_rules(snow, snow_frames, QualitySettings())) == [None] * 5 + ["too_bright"]
    # A dark grade crushes shadows in every scene: the film's typical clipped share is allowed.
    crushed, crushed_frames = scores(
        distinct([{"brightness": 25.0, "clipped": c} for c in (0.5, 0.62, 0.7, 0.66, 0.97)])
    )
    assert reasons(apply_quality_rules(crushed, crushed_frames, QualitySettings())) == [None] * 4 + [
        "clipped"
    ]
    with pytest.raises(ValueError, match="black_floor"):
        QualitySettings(black_floor=40)


def test_a_frame_that_shows_its_picture_is_not_badly_exposed():
    """Brightness alone does not condemn a frame: one outside the window that keeps its detail
    stays, one that lost it goes, and a noisy frame's grain is no detail."""
    cfg = QualitySettings(text_filter=False)  # exposure_detail 75
    table, frames = scores(
        distinct(
            [{"brightness": b} for b in (160.0, 200.0, 150.0, 120.0, 170.0)]
            + [
                {"brightness": 244.0, "sharpness": 110.0},  # a drawn snowfield: kept
                {"brightness": 247.0, "sharpness": 90.0},  # over the ceiling, as crisp: kept
                {"brightness": 21.0, "sharpness": 150.0, "contrast": 26.0},  # a drawn cave: kept
                {"brightness": 244.0, "sharpness": 60.0},  # washed out: under 75 of detail
                {"brightness": 6.0, "sharpness": 0.5},  # a fade to black
                {"brightness": 21.0, "sharpness": 120.0, "noise": 2.5},  # 120 - 20 * 2.5^2 = 0
            ]
        )
    )
    got = reasons(apply_quality_rules(table, frames, cfg))
    assert got == [None] * 8 + ["too_bright", "too_dark", "too_dark"]
    # null: brightness alone decides, as before; the blur rule off changes nothing here.
    assert reasons(apply_quality_rules(table, frames, cfg.model_copy(update={"min_sharpness": 0.0}))) == got
    alone = reasons(apply_quality_rules(table, frames, cfg.model_copy(update={"exposure_detail": None})))
    assert alone[5:] == ["too_bright", "too_bright", "too_dark", "too_bright", "too_dark", "too_dark"]


def test_drawn_scenes_bright_and_dark_keep_their_frames_and_their_fades_go():
    """Real frames of a drawn film (the character truth set's SuperTux film: a snowfield, a dark
    forest, a penguin alone on snow), as stage 01 saves them: every one is kept; the same frames
    faded to black or to white go; the penguin's box is not read as a title card."""
    import av

    from diffusion_bunny.demo.character_truth import truth_dir

    film = truth_dir() / "films" / "supertux.mp4"
    wanted = {232: "snowfield", 526: "dark forest", 589: "snowfield", 640: "dark forest", 456: "penguin"}
    with av.open(str(film)) as container:
        frames = itertools.islice(container.decode(video=0), max(wanted) + 1)
        pictures = {i: f.to_ndarray(format="rgb24") for i, f in enumerate(frames) if i in wanted}
    rng = np.random.default_rng(2)
    content = [pictures[i] for i in sorted(wanted)]
    fades = [(f * rng.uniform(0.02, 0.04)).astype(np.uint8) for f in content]
    flashes = [(255 - (255 - f) * rng.uniform(0.02, 0.04)).astype(np.uint8) for f in content]
    table, frames = _night_film_scores(content + fades + flashes)
    got = reasons(apply_quality_rules(table, frames, QualitySettings(text_filter=False)))
    n = len(content)
    assert got[:n] == [None] * n
    assert got[n : 2 * n] == ["too_dark"] * n and got[2 * n :] == ["too_bright"] * n
    # Brightness alone (the rule before) dropped both forests (in the whole film, whose median
    # is brighter, the snowfields too).
    alone = QualitySettings(text_filter=False, exposure_detail=None)
    assert reasons(apply_quality_rules(table, frames, alone))[:n] == [
        None,
        None,
        "too_dark",
        None,
        "too_dark",
    ]


def _night_film_scores(pictures: list[np.ndarray]) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Stage 02's scores of RGB ``pictures`` saved as stage 01 saves them (quality-95 JPEG),
    one shot each, with hashes far apart (duplicates are not what is judged here)."""
    rows = []
    for i, rgb in enumerate(pictures):
        _ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
        gray = cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2GRAY)
        rows.append({**{k: v for k, v in score_gray(gray).items() if k != "phash"}, "shot_id": i})
    return scores(distinct(rows))


def test_a_night_film_keeps_its_sharp_frames_and_drops_its_blurred_ones():
    """Real frames (the Hamilton clip, lifted to an ordinary exposure), the same frames
    night-graded, and some of them out of focus: dark is not blurry, and blurry stays blurry."""
    from paths import HAMILTON

    from diffusion_bunny.demo.realclips import night_grade

    if not HAMILTON.is_file():
        pytest.skip(f"real footage not available here: {HAMILTON}")
    import av

    with av.open(str(HAMILTON)) as container:
        source = [
            f.to_ndarray(format="rgb24") for i, f in enumerate(container.decode(video=0)) if i % 10 == 5
        ]
    lift = np.clip(255 * 1.3 * (np.arange(256) / 255) ** (1 / 1.4), 0, 255).astype(np.uint8)
    lit = [cv2.LUT(f, lift) for f in source]
    soft = [cv2.GaussianBlur(f, (0, 0), 8) for f in lit[::5]]
    rng = np.random.default_rng(5)
    night = [night_grade(f, rng) for f in lit + soft]
    n = len(lit)
    cfg = QualitySettings(text_filter=False)

    lit_table, lit_frames = _night_film_scores(lit + soft)
    lit_verdicts = reasons(apply_quality_rules(lit_table, lit_frames, cfg))
    # An ordinary film is judged as before: the relative rule does not touch it.
    absolute = cfg.model_copy(update={"relative_sharpness": False})
    assert reasons(apply_quality_rules(lit_table, lit_frames, absolute)) == lit_verdicts
    assert sharpness_threshold(lit_table, cfg).film_scale == 1.0
    assert lit_verdicts[n:] == ["blurry"] * len(soft) and lit_verdicts[:n].count(None) == n

    night_table, night_frames = _night_film_scores(night)
    # A night grade: about half the light and a third of the contrast of the lit film.
    assert night_table["brightness"].median() < 0.6 * lit_table["brightness"].median()
    assert 0.25 < night_table["contrast"].median() / lit_table["contrast"].median() < 0.45
    got = reasons(apply_quality_rules(night_table, night_frames, cfg))
    # Every sharp frame the lit film keeps, the night film keeps; every blurred one goes.
    assert got[:n] == lit_verdicts[:n]
    assert got[n:] == ["blurry"] * len(soft)
    # With the absolute threshold (the rule before) the night film lost the frames of its softer
    # shot as blurry (5 of 27, each kept lit); without taking the noise out, its blurred frames
    # passed.
    assert reasons(apply_quality_rules(night_table, night_frames, absolute))[:n].count("blurry") >= 4
    noiseless = night_table.with_columns(pl.lit(0.0).alias("noise"))
    assert reasons(apply_quality_rules(noiseless, night_frames, cfg))[n:].count(None) >= len(soft) // 2


def test_noise_estimate_reads_noise_not_edges():
    rng = np.random.default_rng(0)
    ramp = np.tile(np.linspace(20, 200, 256, dtype=np.float32), (144, 1))
    ramp[:, 128:] += 40  # an edge: the kernel cancels it to first order
    for sigma in (0.0, 2.0, 5.0):
        noisy = np.clip(ramp + rng.standard_normal(ramp.shape, dtype=np.float32) * sigma, 0, 255)
        assert noise_sigma(noisy) == pytest.approx(sigma, abs=0.15 + 0.1 * sigma)


def test_scores_measure_the_picture_box_not_the_bars(tmp_path):
    from diffusion_bunny.demo.overlays import letterbox
    from diffusion_bunny.media.images import decode_picture

    picture = cv2.cvtColor(_picture(1280, 536), cv2.COLOR_BGR2RGB)  # 2.39:1
    framed, box = letterbox(picture, (1920, 1080))
    assert box == (0, 138, 1920, 942)
    cv2.imwrite(
        str(tmp_path / "lb.jpg"), cv2.cvtColor(framed, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95]
    )
    cv2.imwrite(
        str(tmp_path / "pic.jpg"), cv2.cvtColor(picture, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95]
    )
    whole = score_image(tmp_path / "lb.jpg")
    inside = score_image(tmp_path / "lb.jpg", box=box)
    alone = score_image(tmp_path / "pic.jpg")
    assert whole["brightness"] == pytest.approx(804 / 1080 * alone["brightness"], rel=0.03)
    assert whole["clipped"] > 0.25 > inside["clipped"]
    assert inside["brightness"] == pytest.approx(alone["brightness"], abs=2.0)
    assert inside["clipped"] == pytest.approx(alone["clipped"], abs=0.02)
    assert hamming(inside["phash"], alone["phash"]) <= 4
    # The shared reader: reduced decode (1/2 here), cropped to the box scaled to it, no bar row.
    data = np.fromfile(tmp_path / "lb.jpg", np.uint8)
    region = decode_picture(data, box, min_width=800, gray=True)
    assert region.shape == (402, 960) and region[0].mean() > 40 and region[-1].mean() > 40
    assert decode_picture(data, box).shape == (804, 1920, 3)
    assert decode_picture(data[: data.size // 2], box) is None  # truncated


def test_config_out_of_range_is_one_line_naming_the_key():
    cases = {
        "quality.dup_distance=65": "quality.dup_distance = 65: Input should be less than or equal to 64",
        "quality.max_clipped=1.5": "quality.max_clipped = 1.5",
        "quality.min_sharpness=-1": "quality.min_sharpness = -1",
        "quality.batch=0": "quality.batch = 0: must be 'shot' or a positive number",
        "quality.batch=scene": "quality.batch = 'scene'",
        "quality.best_per_batch=-1": "quality.best_per_batch = -1",
        "quality.min_brightness=240": "min_brightness (240.0) must be under max_brightness (230.0)",
        "quality.reference_contrast=0": "quality.reference_contrast = 0",
        "extract.detector.reference_contrast=200": "extract.detector.reference_contrast = 200",
        "quality.dup_dist=3": "unknown key 'quality.dup_dist' (allowed here: batch, best_per_batch,",
    }
    for override, message in cases.items():
        with pytest.raises(ConfigError) as info:
            load_config(None, [override])
        assert message in str(info.value) and "\n" not in str(info.value)
    assert load_config(None, ["quality.batch=12"]).quality.batch == 12
    # 0 keeps every frame of a batch, as notebook 02's slider says (it was refused).
    assert load_config(None, ["quality.best_per_batch=0"]).quality.best_per_batch is None


def test_filtering_is_the_old_name_of_quality(tmp_path, caplog):
    (tmp_path / "config").mkdir()
    old = tmp_path / "config" / "local_thresholds.yaml"
    old.write_text("filtering:\n  min_sharpness: 12\n")
    with caplog.at_level("WARNING", logger="diffusion_bunny.config"):
        cfg = load_config(None, ["filtering.dup_distance=7"], root=tmp_path)
    lines = [r.getMessage() for r in caplog.records if r.name == "diffusion_bunny.config"]
    assert lines == [
        f"{old}: the config section 'filtering' is now called 'quality'; write quality.min_sharpness",
        "--set: the config section 'filtering' is now called 'quality'; write quality.dup_distance",
    ]
    assert cfg.quality.min_sharpness == 12 and cfg.quality.dup_distance == 7
    # A later layer under the new name wins over an earlier one under the old name, and back.
    assert load_config(None, ["quality.min_sharpness=20"], root=tmp_path).quality.min_sharpness == 20
    # The same key under both names in one layer cannot be resolved: one line naming both.
    with pytest.raises(ConfigError) as info:
        load_config(None, ["filtering.dup_distance=7", "quality.dup_distance=8"], root=tmp_path)
    assert "sets filtering.dup_distance and quality.dup_distance" in str(info.value)
    # Notebook 02's save moves an old file's settings to the new name.
    save_local_settings("thresholds", {"quality": {"dup_distance": 3}}, tmp_path)
    assert yaml.safe_load(old.read_text()) == {"quality": {"dup_distance": 3, "min_sharpness": 12}}


def _picture(width: int, height: int) -> np.ndarray:
    """The same scene at any size: the astronaut brought to 1280x720, then area-resized."""
    import skimage.data

    src = cv2.cvtColor(skimage.data.astronaut(), cv2.COLOR_RGB2BGR)[:288]
    scene = cv2.resize(src, (1280, 720), interpolation=cv2.INTER_CUBIC)
    return cv2.resize(scene, (width, height), interpolation=cv2.INTER_AREA)


def test_scores_of_images(tmp_path):
    def save(name: str, img: np.ndarray) -> Path:
        path = tmp_path / name
        cv2.imwrite(str(path), img, [cv2.IMWRITE_JPEG_QUALITY, 95])
        return path

    big = score_image(save("big.jpg", _picture(1280, 720)), 1280)
    small = score_image(save("small.jpg", _picture(640, 360)), 640)
    # Scores compare across resolutions: measured on the same fixed-width gray copy.
    assert small["sharpness"] == pytest.approx(big["sharpness"], rel=0.15)
    blurred = score_image(save("blur.jpg", cv2.GaussianBlur(_picture(640, 360), (0, 0), 5)), 640)
    dark = score_image(save("dark.jpg", (_picture(640, 360) * 0.15).astype(np.uint8)), 640)
    white = score_image(save("white.jpg", np.full((90, 160, 3), 255, np.uint8)))
    assert blurred["sharpness"] < big["sharpness"] / 10
    assert big["brightness"] == pytest.approx(small["brightness"], abs=1.0)
    assert dark["brightness"] < 25 < big["brightness"]
    assert white["clipped"] == 1.0 and white["brightness"] > 250 and white["contrast"] < 1
    assert hamming(big["phash"], small["phash"]) <= 2
    assert hamming(big["phash"], dark["phash"]) <= 4  # same picture, darker
    assert hamming(big["phash"], score_image(save("flip.jpg", _picture(640, 360)[::-1]))["phash"]) > 16
    assert isinstance(big["phash"], int) and 0 <= big["phash"] < 2**64
    # A phone's upright frame scores as the same picture stored on its side: brought to 256 wide,
    # a 360x640 frame scored about 3 times less sharp, and a kept frame was "blurry".
    upright = score_image(save("upright.jpg", np.ascontiguousarray(_picture(640, 360).transpose(1, 0, 2))))
    assert upright["sharpness"] == pytest.approx(small["sharpness"], rel=0.05)
    assert upright["noise"] == pytest.approx(small["noise"], rel=0.1)

    good = (tmp_path / "big.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not an image")
    for name in ("missing.jpg", "truncated.jpg", "empty.jpg", "text.jpg"):
        assert score_image(tmp_path / name, 1280) is None, name


def test_nearest_distances_match_brute_force():
    rng = np.random.default_rng(0)
    hashes = rng.integers(0, 2**63, size=37, dtype=np.uint64)
    hashes[5] = hashes[20]
    brute = hamming(hashes[:, None], hashes[None, :]).astype(int)
    np.fill_diagonal(brute, 99)
    assert nearest_distances(hashes, block=8).tolist() == brute.min(axis=1).tolist()
    assert nearest_distances(hashes[:1]).tolist() == [64]


def test_demo_rejects_blurred_dark_and_repeated_shots(demo_run, demo):
    truth = demo.ground_truth()
    quality = demo_run.read_table("quality")
    frames = demo_run.read_table("frames")
    assert quality.height == frames.height and quality["frame_id"].to_list() == frames["frame_id"].to_list()
    assert quality.schema["phash"] == pl.UInt64 and "face_sharpness" not in quality.columns
    expected = expected_reasons(truth)
    got = quality.join(frames.select("frame_id", "shot_id"), on="frame_id")
    for row in got.iter_rows(named=True):
        assert row["reject_reason"] == expected[row["shot_id"]], (row["shot_id"], row)
        assert row["keep"] == (expected[row["shot_id"]] is None)
    repeat = next(s for s in truth["shots"] if s["repeat_of"] is not None)
    dup = got.filter(pl.col("shot_id") == repeat["shot_id"])["duplicate_of"].item()
    assert frames.filter(pl.col("frame_id") == dup)["shot_id"].item() == repeat["repeat_of"]
    manifest = demo_run.read_manifest("quality")
    assert manifest["counts"]["kept"] == int(quality["keep"].sum())
    declared = ["frame_id", "frame_index", "shot_id", "path", "width", "height", *BOX_COLUMNS]
    assert manifest["inputs"] == {
        "frames": demo_run.table_fingerprint("frames", declared),
        **frame_files(demo_run),  # each frame file's size and time, hashed
    }
    assert manifest["inputs"]["frame_files"] == {"files": frames.height, "missing": 0, "sha256": ANY}
    assert manifest["facts"]["workers"] >= 1


def test_quality_explorer_moves_keep_without_rescoring(demo_run, tmp_path, monkeypatch):
    import ipywidgets

    from diffusion_bunny.stages.quality import scores as quality_module
    from diffusion_bunny.stages.quality.widgets import QualityThresholdExplorer

    def no_scoring(*args, **kwargs):
        raise AssertionError("a slider must not read frames again")

    monkeypatch.setattr(quality_module, "score_image", no_scoring)
    frames = demo_run.read_table("frames")
    shot_of = dict(frames.select("frame_id", "shot_id").iter_rows())
    explorer = QualityThresholdExplorer(demo_run, QualitySettings(), config_root=tmp_path)

    def walk(w):
        yield w
        for child in getattr(w, "children", ()):
            yield from walk(child)

    assert not any(isinstance(w, ipywidgets.Output) for w in walk(explorer.widget))
    assert bytes(explorer.plot_img.value).startswith(b"\x89PNG")
    sheet_before = bytes(explorer.sheet_img.value)
    assert sheet_before.startswith(b"\xff\xd8")
    base = explorer.summary
    assert base == {"kept": base["kept"], "too_dark": 1, "blurry": 1, "duplicate": 1}

    def rejected(reason: str) -> set[int]:
        t = explorer.table().filter(pl.col("reject_reason") == reason)
        return {shot_of[f] for f in t["frame_id"]}

    # Shot 7 (Grace Hopper, static) re-frames the first frame of shot 2 by a few pixels: 8 bits
    # apart, kept at the default distance, a duplicate at 8.
    explorer.set_thresholds(dup_distance=8)
    assert rejected("duplicate") == {7, 9}
    assert f"<b>{base['kept'] - 1}</b> of" in explorer.counts.value
    explorer.set_thresholds(dup_distance=4, min_brightness=10)
    assert rejected("too_dark") == set() and rejected("blurry") == {3, 8}
    # The dark shot (8) keeps too little detail to be saved from its darkness at 75; at 5 it is,
    # and then goes as blurry; None (brightness alone) is the slider at 0.
    explorer.set_thresholds(min_brightness=35, exposure_detail=5)
    assert rejected("too_dark") == set() and rejected("blurry") == {3, 8}
    assert "kept whatever their brightness from 5 detail" in explorer.counts.value
    explorer.set_thresholds(exposure_detail=None)
    assert explorer.quality.exposure_detail is None and rejected("too_dark") == {8}
    explorer.set_thresholds(exposure_detail=75)
    explorer.set_thresholds(min_brightness=35, min_sharpness=500)
    assert {4, 10} <= rejected("blurry")  # the dusk rocket and the soft cat are the softest sharp shots
    explorer.set_thresholds(min_sharpness=50, best_per_batch=1)
    kept = explorer.table().filter(pl.col("keep"))
    assert sorted(shot_of[f] for f in kept["frame_id"]) == [0, 1, 2, 4, 5, 6, 7, 10, 11, 12]
    assert bytes(explorer.sheet_img.value) != sheet_before  # the grid was redrawn
    assert (
        Image.open(BytesIO(bytes(explorer.sheet_img.value))).width == Image.open(BytesIO(sheet_before)).width
    )
    explorer.set_thresholds(min_brightness=240)  # above max_brightness: said, not applied
    assert "must be under max_brightness" in explorer.counts.value
    # Nor saved: the line under the button says so (a traceback went to the log console, and the
    # last save's "saved to" line stayed, though nothing was written).
    explorer.saved.value = "saved to an earlier file"
    assert explorer.save() is None and not (tmp_path / "config" / "local_thresholds.yaml").exists()
    assert explorer.saved.value.startswith("<span") and "not saved: min_brightness" in explorer.saved.value
    explorer.set_thresholds(min_brightness=35)
    assert explorer.saved.value == ""  # a moved slider: the last save's line no longer holds
    floor = explorer.sliders["min_brightness"]
    assert (floor.min, floor.max) == (QualitySettings().black_floor, QualitySettings().white_ceiling)
    with pytest.raises(KeyError, match="no slider"):
        explorer.set_thresholds(sharpness=3)

    # The brightness thresholds in force for this film are said; the demo is of ordinary exposure.
    explorer.set_thresholds(min_brightness=35)
    assert "median brightness" in explorer.counts.value and "too dark under 35.0" in explorer.counts.value
    explorer.set_thresholds(relative_brightness=False, subtitles="drop", max_text_share=0.7)
    assert "(as configured)" in explorer.counts.value
    assert bytes(explorer.text_img.value).startswith(b"\xff\xd8")
    explorer.set_thresholds(min_brightness=30, dup_distance=6, best_per_batch=None, min_sharpness=50)
    path = explorer.save()
    assert path == tmp_path / "config" / "local_thresholds.yaml"
    saved = yaml.safe_load(path.read_text())["quality"]
    assert saved["dup_distance"] == 6 and saved["best_per_batch"] is None
    assert (saved["relative_brightness"], saved["subtitles"], saved["max_text_share"]) == (False, "drop", 0.7)
    # A headless rerun reads the saved layer and reproduces the widget's choice.
    cfg = load_config(root=tmp_path).quality
    headless = apply_quality_rules(demo_run.read_table("quality"), frames, cfg)
    assert headless["keep"].to_list() == explorer.table()["keep"].to_list()
    assert cfg.min_sharpness == pytest.approx(50, rel=1e-3)
    assert "win over the saved file" not in explorer.saved.value
    # The notebook's own overrides come after the saved file: a threshold they set wins, and
    # saving says so instead of being silently undone.
    layered = QualityThresholdExplorer(
        demo_run, QualitySettings(), config_root=tmp_path, overrides={"quality.dup_distance": 3}
    )
    layered.set_thresholds(dup_distance=7)
    layered.save()
    assert (
        "but quality.dup_distance is set by this notebook's config_path or overrides" in layered.saved.value
    )
    assert "rerun the notebook from its config cell" in layered.saved.value
    # The overrides in every form a notebook takes them (text from papermill's -p, --set's list,
    # nested): the widget did not open on the first two, and said nothing on the third.
    for form in ('{"quality.dup_distance": 3}', ["quality.dup_distance=3"], {"quality": {"dup_distance": 3}}):
        formed = QualityThresholdExplorer(demo_run, QualitySettings(), config_root=tmp_path, overrides=form)
        formed.set_thresholds(dup_distance=7)
        formed.save()
        assert "but quality.dup_distance is set by this notebook's" in formed.saved.value, form
    # A value that means the saved one (best_per_batch 0 is null, "keep all") hides nothing.
    alike = QualityThresholdExplorer(
        demo_run, QualitySettings(), config_root=tmp_path, overrides={"quality.best_per_batch": 0}
    )
    alike.save()
    assert "win over the saved file" not in alike.saved.value
    # Under the section's old name (which still loads) too: it hid the saved choice unwarned.
    for old_name in ({"filtering.dup_distance": 3}, None):
        config_path = None
        if old_name is None:
            config_path = tmp_path / "extra.yaml"
            config_path.write_text("filtering:\n  dup_distance: 3\n")
        older = QualityThresholdExplorer(
            demo_run,
            QualitySettings(),
            config_root=tmp_path,
            config_path=config_path,
            overrides=old_name or {},
        )
        older.set_thresholds(dup_distance=7)
        older.save()
        assert "quality.dup_distance is set by this notebook's config_path" in older.saved.value
    # A file the loader reads (UTF-16 with its mark, an empty section) is saved into; one it
    # cannot read is said under the button (the traceback went to the log console unseen).
    saved_file = tmp_path / "config" / "local_thresholds.yaml"
    saved_file.write_bytes("quality:\nextract:\n  jpeg_quality: 90\n".encode("utf-16"))
    assert layered.save() == saved_file
    assert yaml.safe_load(saved_file.read_text())["extract"] == {"jpeg_quality": 90}
    assert saved_file.read_text().startswith("# Written by the workspace's widgets")
    saved_file.write_text("quality: [1, 2\n")
    assert layered.save() is None and "not saved: config file" in layered.saved.value
    # Settings at a slider's bottom that it cannot show (0 on the log scale; exposure detail 0,
    # which is not null) are the explorer's as they are, untouched.
    zero = QualitySettings(min_sharpness=0, exposure_detail=0)
    edge = QualityThresholdExplorer(demo_run, zero, config_root=tmp_path)
    assert (edge.quality.min_sharpness, edge.quality.exposure_detail) == (0, 0.0)


def test_unreadable_frames_are_recorded_not_fatal(demo_run, tmp_path):
    import shutil

    run = Run.create(tmp_path / "run", demo_run.movie)
    for name in ("tables", "manifests", "frames", "thumbs"):
        shutil.copytree(demo_run.run_dir / name, run.run_dir / name)
    frames = run.read_table("frames")
    gone, broken = frames["path"][0], frames["path"][1]
    (run.run_dir / gone).unlink()
    (run.run_dir / broken).write_bytes((run.run_dir / broken).read_bytes()[:500])
    cfg = load_config(root=tmp_path)
    with pytest.warns(UserWarning, match="2 frame file"):
        quality = run_stage(run, "quality", cfg, force=True, progress=False)["quality"]
    assert quality["reject_reason"].to_list()[:2] == ["unreadable", "unreadable"]
    assert quality["readable"].to_list()[:2] == [False, False] and quality["sharpness"][:2].is_null().all()
    assert quality["keep"].sum() >= 10
    assert run.read_manifest("quality")["counts"]["unreadable"] == 2
    assert not (run.run_dir / ".progress-quality.json").exists()
    # The stage is up to date now, and stale when its own settings move.
    assert stage_state(run, "quality", cfg)[0] == "done"
    moved = load_config(None, ["quality.dup_distance=9"], root=tmp_path)
    assert stage_state(run, "quality", moved) == (
        "stale",
        f"its config changed: quality.dup_distance {cfg.quality.dup_distance} -> 9",
    )
    assert stage_state(run, "quality", load_config(None, ["extract.jpeg_quality=80"], root=tmp_path))[0] == (
        "done"
    )
    scored = score_frames(run.run_dir, frames.head(3), workers=2, progress=False)
    assert scored["readable"].to_list() == [False, False, True]
    assert json.loads(json.dumps(run.read_manifest("quality")["warnings"]))


def _copied_run(demo_run, tmp_path) -> Run:
    import shutil

    run = Run.create(tmp_path / "run", demo_run.movie)
    for name in ("tables", "manifests", "frames", "thumbs"):
        shutil.copytree(demo_run.run_dir / name, run.run_dir / name)
    return run


def test_a_frame_file_written_again_is_scored_again(demo_run, tmp_path):
    # A frame deleted after stage 01 is unreadable; stage 01 writes it back under the same row of
    # the frames table: stage 02 must see the file changed, not stay "up to date" on the table.
    run = _copied_run(demo_run, tmp_path)
    cfg = load_config(root=tmp_path)
    frame = run.run_dir / run.read_table("frames")["path"][0]
    data = frame.read_bytes()
    run_stage(run, "quality", cfg, force=True, progress=False)
    assert stage_state(run, "quality", cfg)[0] == "done"
    frame.unlink()
    state, reason = stage_state(run, "quality", cfg)
    assert state == "stale" and "frame_files" in reason
    with pytest.warns(UserWarning, match="1 frame file"):
        quality = run_stage(run, "quality", cfg, progress=False)["quality"]
    assert quality["reject_reason"][0] == "unreadable"
    assert run.read_manifest("quality")["inputs"]["frame_files"]["missing"] == 1
    frame.write_bytes(data)  # as stage 01 run again writes it
    assert stage_state(run, "quality", cfg)[0] == "stale"
    quality = run_stage(run, "quality", cfg, progress=False)["quality"]
    assert quality["readable"][0] and quality["reject_reason"][0] != "unreadable"
    assert stage_state(run, "quality", cfg)[0] == "done"


def test_a_threshold_moved_reuses_the_scores(demo_run, tmp_path, monkeypatch):
    from diffusion_bunny.stages.quality import stage as quality_stage

    run = _copied_run(demo_run, tmp_path)
    cfg = load_config(root=tmp_path)
    first = run_stage(run, "quality", cfg, force=True, progress=False)["quality"]
    calls = []
    real = quality_stage.score_frames
    monkeypatch.setattr(quality_stage, "score_frames", lambda *a, **k: calls.append(1) or real(*a, **k))
    # A threshold moved: the rules apply again to the stored scores, no frame decoded.
    moved = load_config(None, ["quality.min_sharpness=5000"], root=tmp_path)
    again = run_stage(run, "quality", moved, progress=False)["quality"]
    assert not calls and run.read_manifest("quality")["facts"]["scores_reused"] == first.height
    assert again.select(*SCORES_SCHEMA).equals(first.select(*SCORES_SCHEMA))
    assert set(again["reject_reason"].drop_nulls()) >= {"blurry"}
    # Every file's time changed (a copy of the run folder, stage 01 writing the same frames):
    # nothing to do. Written again at another size: scored again.
    frames = [run.run_dir / p for p in run.read_table("frames")["path"]]
    for path in frames:
        os.utime(path, (1_000_000_000, 1_000_000_000))
    assert stage_state(run, "quality", moved)[0] == "done"
    frames[0].write_bytes(frames[0].read_bytes() + b"\0")
    run_stage(run, "quality", cfg, progress=False)
    assert len(calls) == 1 and "scores_reused" not in run.read_manifest("quality")["facts"]
    # --force scores again (the way to, after a change no fingerprint sees).
    run_stage(run, "quality", cfg, progress=False, force=True)
    assert len(calls) == 2
    calls.pop()
    # The scoring code changed (the manifest records another code hash): scored again.
    manifest = run.read_manifest("quality")
    run.write_manifest("quality", {**manifest, "code_hash": "another"})
    run_stage(run, "quality", moved, progress=False)
    assert len(calls) == 2
    # The table on disk is not the one the manifest recorded: scored again.
    run_stage(run, "quality", cfg, progress=False)
    assert len(calls) == 2  # (reused: nothing moved but the threshold)
    table = run.read_table("quality").with_columns(pl.col("sharpness") * 2)
    table.write_parquet(run.table_path("quality"))
    run_stage(run, "quality", moved, progress=False)
    assert len(calls) == 3


def test_quality_needs_the_frames_table(cut_clip, tmp_path):
    from diffusion_bunny.errors import StageError

    path, _ = cut_clip
    run = Run.create(tmp_path / "run", path)
    with pytest.raises(StageError, match=r"table 'frames' is missing .* run stage extract first"):
        run_stage(run, "quality", load_config(), progress=False)


def test_quality_figures_render(demo_run, tmp_path):
    quality = demo_run.read_table("quality")
    frames = demo_run.read_table("frames")
    out = tmp_path / "hist.png"
    chart = quality_histograms(quality, QualitySettings())
    chart.save(out, verbose=False, dpi=50)
    assert out.stat().st_size > 5_000
    # Every frame is counted once in each panel, in its outcome's colour.
    heights = chart.data.assign(n=chart.data["ymax"] - chart.data["ymin"])
    per_panel = heights.groupby("score", observed=True)["n"].sum()
    assert per_panel["brightness (0-255)"] == quality.height
    assert per_panel["sharpness (log10)"] == quality.height
    kept = heights[heights["outcome"] == "kept"].groupby("score", observed=True)["n"].sum()
    assert kept["contrast (std, 0-255)"] == int(quality["keep"].sum())
    sheet = quality_sheet(demo_run.run_dir, quality, frames, columns=4, thumb_width=100)
    kept_rows = -(-int(quality["keep"].sum()) // 4)
    assert sheet.size == (4 + 4 * 104, 24 * 2 + (kept_rows + 1) * (round(100 * 180 / 320) + 15 + 4))
    few = quality_sheet(demo_run.run_dir, quality, frames, max_per_group=2)
    assert few.size[1] < sheet.size[1] * 2
