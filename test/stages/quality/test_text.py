"""Stage 02's text step: the pure text rules on small tables, the real detector on a real frame with
text drawn on it, and the stage on a run holding a title card, credits, a sign and a letterboxed
frame with burned-in subtitles."""

from __future__ import annotations

import os
import shutil

import cv2
import numpy as np
import polars as pl
import pytest

from diffusion_bunny.config import load_config
from diffusion_bunny.demo import overlays
from diffusion_bunny.errors import ModelError
from diffusion_bunny.pipeline.run import Run
from diffusion_bunny.stages import run_stage
from diffusion_bunny.stages.quality.plots import text_sheet
from diffusion_bunny.stages.quality.rules import apply_quality_rules
from diffusion_bunny.stages.quality.settings import QualitySettings
from diffusion_bunny.stages.quality.text import TEXT_SCHEMA, is_blob, measure_text, text_verdict


def line(left, top, right, bottom, edges=0.05, area=None, score=0.8):
    area = (right - left) * (bottom - top) if area is None else area
    return {
        "left": left,
        "top": top,
        "right": right,
        "bottom": bottom,
        "score": score,
        "area": area,
        "edges": edges,
    }


SUBTITLE = [line(0.3, 0.86, 0.7, 0.92, edges=0.2)]
TWO_LINES = [line(0.25, 0.80, 0.75, 0.86, edges=0.15), line(0.3, 0.86, 0.7, 0.92, edges=0.15)]
TITLE = [line(0.3, 0.42, 0.7, 0.55, edges=0.97)]
CREDITS = [
    line(0.2 if i % 2 else 0.52, 0.05 + 0.07 * i, 0.48 if i % 2 else 0.75, 0.1 + 0.07 * i, edges=0.07)
    for i in range(13)
]
SIGN = [line(0.2, 0.3, 0.4, 0.38, edges=0.12)]
LOGO = [line(0.9, 0.03, 0.96, 0.15, edges=0.03)]  # the Hamilton clip's corner logo: not a subtitle


def test_text_rules_are_pure_over_the_lines():
    cfg = QualitySettings()
    assert text_verdict(None, cfg) == (None, 0.0, 1.0)  # not looked at: kept whole
    assert text_verdict([], cfg) == (None, 0.0, 1.0)
    assert text_verdict(TITLE, cfg)[0] == "text"
    assert text_verdict(CREDITS, cfg)[0] == "text"
    assert text_verdict(SIGN, cfg) == (None, 0.0, 1.0)
    assert text_verdict(SIGN + LOGO, cfg) == (None, 0.0, 1.0)
    # Subtitles: the crop ends a quarter of a line above the top of the subtitles.
    reason, top, bottom = text_verdict(TWO_LINES + LOGO, cfg)
    assert reason is None and top == 0.0 and bottom == pytest.approx(0.80 - 0.25 * 0.06)
    reason, top, bottom = text_verdict([line(0.3, 0.04, 0.7, 0.1, edges=0.2)], cfg)  # at the top
    assert reason is None and top == pytest.approx(0.1 + 0.25 * 0.06) and bottom == 1.0
    assert text_verdict(SUBTITLE, cfg.model_copy(update={"subtitles": "drop"}))[0] == "subtitles"
    assert text_verdict(SUBTITLE, cfg.model_copy(update={"subtitles": "keep"})) == (None, 0.0, 1.0)
    # A crop that would keep too little of the picture drops the frame instead.
    assert text_verdict(SUBTITLE, cfg.model_copy(update={"min_crop_height": 0.9}))[0] == "subtitles"
    # Subtitles over a scene that is itself a title card: the title wins.
    assert text_verdict(TITLE + SUBTITLE, cfg)[0] == "text"
    # A text-heavy insert over a busy background: the area rule.
    page = [line(0.1, 0.1 + 0.065 * i, 0.9, 0.16 + 0.065 * i, edges=0.04) for i in range(8)]
    assert text_verdict(page, cfg)[0] == "text"
    assert text_verdict(page, cfg.model_copy(update={"max_text_area": 0.5}))[0] is None


def test_a_timecode_in_a_corner_of_a_dark_picture_is_no_title_card():
    """A burned-in timecode in the top-left corner of the Hamilton clip's dark stage (2% of the
    picture) held 51-77% of its edges: every frame of three of its four shots was dropped as
    ``text``. A mark in a corner is weighed as subtitles are; the same line across the middle
    (a title card) is still text, and so is a title beside it."""
    cfg = QualitySettings()
    timecode = [line(0.029, 0.019, 0.329, 0.096, edges=0.77, area=0.023)]  # as measured
    assert text_verdict(timecode, cfg) == (None, 0.0, 1.0)
    assert text_verdict([line(0.78, 0.88, 0.97, 0.95, edges=0.6)], cfg) == (None, 0.0, 1.0)  # bottom right
    assert text_verdict([line(0.4, 0.45, 0.58, 0.52, edges=0.7, area=0.023)], cfg)[0] == "text"
    assert text_verdict(timecode + TITLE, cfg)[0] == "text"
    # Credits set in a corner: two lines there, or one large line, are text as before.
    credit = [line(0.05, 0.8, 0.35, 0.86, edges=0.4), line(0.05, 0.87, 0.3, 0.93, edges=0.4)]
    assert text_verdict(credit, cfg)[0] == "text"
    assert text_verdict([line(0.02, 0.78, 0.38, 0.98, edges=0.8)], cfg)[0] == "text"


def test_a_box_shaped_like_a_figure_is_not_text():
    cfg = QualitySettings()
    wide = 1280 / 720
    # DBNet's box round a cartoon penguin on snow: half the picture high, as wide as high.
    figure = [line(0.42, 0.25, 0.66, 0.75, edges=0.9)]
    assert is_blob(figure[0], wide)
    assert text_verdict(figure, cfg, wide) == (None, 0.0, 1.0)
    assert text_verdict(figure, cfg)[0] == "text"  # without the picture's aspect, as before
    # Text stays text: a title line, a short word, a column of vertical text, small square glyphs.
    assert text_verdict(TITLE, cfg, wide)[0] == "text" and not is_blob(TITLE[0], wide)
    assert not is_blob(line(0.4, 0.3, 0.6, 0.52), wide)  # "OK" at 22 % of the height: 1.6x
    assert not is_blob(line(0.45, 0.1, 0.51, 0.9), wide)  # vertical: 0.13x
    assert not is_blob(line(0.45, 0.4, 0.53, 0.54), wide)  # one glyph, 14 % high: under BLOB_HEIGHT
    assert text_verdict(CREDITS + figure, cfg, wide)[0] == "text"


def test_a_drawn_penguin_on_snow_is_not_a_title_card(detector):
    """The character truth set's SuperTux film, frame 456: the detector boxes the penguin (90 %
    of the picture's edges), which dropped the shot's only frame as text."""
    import av

    from diffusion_bunny.demo.character_truth import truth_dir

    with av.open(str(truth_dir() / "films" / "supertux.mp4")) as container:
        rgb = next(f.to_ndarray(format="rgb24") for i, f in enumerate(container.decode(video=0)) if i == 456)
    cfg = QualitySettings()
    m = measure_text(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), detector, cfg.text_width)
    assert m["text_share"] > cfg.max_text_share  # what the rule saw
    assert text_verdict(m["text_lines"], cfg, 1280 / 720) == (None, 0.0, 1.0)


A, M = 0x0F0F0F0F0F0F0F0F, 0xFFFFFFFFFFFFFFFF  # hashes 32 or 64 bits apart


def test_text_reasons_and_crop_in_the_quality_table():
    lines = [SUBTITLE, TITLE, SIGN, None, TWO_LINES]
    table = pl.DataFrame(
        {
            "frame_id": [f"f{i}" for i in range(5)],
            "readable": [True] * 5,
            "sharpness": [500.0] * 5,
            "brightness": [120.0] * 5,
            "contrast": [50.0] * 5,
            "clipped": [0.0] * 5,
            "phash": pl.Series([A, ~A & M, M >> 32, M ^ (M >> 32), A], dtype=pl.UInt64),
            "nearest_distance": [None] * 5,
            "text_lines": lines,
        }
    )
    frames = pl.DataFrame(
        {
            "frame_id": [f"f{i}" for i in range(5)],
            "frame_index": [0, 10, 20, 30, 40],
            "shot_id": [0, 1, 2, 3, 4],
            "width": [1920] * 5,
            "height": [1080] * 5,
            "box_left": [0] * 5,
            "box_top": [140] * 5,  # a 2.40:1 picture letterboxed in 1920x1080
            "box_right": [1920] * 5,
            "box_bottom": [940] * 5,
        }
    )
    out = apply_quality_rules(table, frames, QualitySettings())
    # f4 (subtitled, same hash as f0) is f0's duplicate: the text rules came first, f0 kept.
    assert out["reject_reason"].to_list() == [None, "text", None, None, "duplicate"]
    crops = out.select("crop_left", "crop_top", "crop_right", "crop_bottom").rows()
    sub_top = 140 + (0.86 - 0.25 * 0.06) * 800
    assert crops[0] == (0, 140, 1920, int(np.floor(sub_top)))
    assert crops[1:] == [(0, 140, 1920, 940)] * 4  # the picture box: rejected, sign, unchecked
    assert out.schema["crop_top"] == pl.Int64
    dropped = apply_quality_rules(table, frames, QualitySettings(subtitles="drop"))
    assert dropped["reject_reason"].to_list() == ["subtitles", "text", None, None, "subtitles"]
    off = apply_quality_rules(table, frames, QualitySettings(text_filter=False))
    assert off["reject_reason"].to_list() == [None, None, None, None, "duplicate"]
    # Without a picture box (a run before stage 01 found boxes) the crop starts from the frame.
    plain = apply_quality_rules(
        table, frames.drop("box_left", "box_top", "box_right", "box_bottom"), QualitySettings()
    )
    assert plain.row(2, named=True)["crop_bottom"] == 1080 and plain.row(0, named=True)["crop_top"] == 0


def test_a_title_card_that_recurs_is_looked_at_in_every_copy(monkeypatch, tmp_path):
    from types import SimpleNamespace

    from diffusion_bunny.stages.quality import stage

    # A title card 12 times (one hash, the earliest kept and the others its duplicates) between
    # 12 distinct shots. Each copy dropped for text used to let the next one through, one per
    # round of 8, so the ninth copy ended in the dataset without being looked at.
    card = 0x0F0F_0F0F_0F0F_0F0F
    far = np.random.default_rng(3).integers(0, 2**63, size=12, dtype=np.uint64)
    ids = [f"f{i}" for i in range(24)]
    is_card = [i % 2 == 0 for i in range(24)]
    hashes = [card if c else int(far[i // 2]) for i, c in enumerate(is_card)]
    scores = pl.DataFrame(
        {
            "frame_id": ids,
            "readable": [True] * 24,
            "sharpness": [500.0] * 24,
            "brightness": [120.0] * 24,
            "contrast": [50.0] * 24,
            "clipped": [0.0] * 24,
            "phash": pl.Series(hashes, dtype=pl.UInt64),
            "nearest_distance": [None] * 24,
        }
    )
    frames = pl.DataFrame(
        {
            "frame_id": ids,
            "frame_index": [10 * i for i in range(24)],
            "shot_id": list(range(24)),
            "path": [f"frames/{f}.jpg" for f in ids],
            "width": [480] * 24,
            "height": [270] * 24,
        }
    )
    looked: list[list[str]] = []

    def fake_detect(run_dir, todo, detector, width, **kwargs):
        looked.append(todo["frame_id"].to_list())
        card_ids = {f for f, c in zip(ids, is_card, strict=True) if c}
        lines = [TITLE if f in card_ids else [] for f in todo["frame_id"]]
        return pl.DataFrame(
            {"frame_id": todo["frame_id"], "text_lines": lines, "text_area": None, "text_share": None},
            schema={"frame_id": pl.Utf8, **{k: v for k, v in TEXT_SCHEMA.items() if k != "text_key"}},
        ).with_columns(pl.lit("k").alias("text_key"))

    monkeypatch.setattr(stage, "load_text_detector", lambda: SimpleNamespace(key="fake"))
    monkeypatch.setattr(stage, "detect_text", fake_detect)
    ctx = SimpleNamespace(
        cfg=SimpleNamespace(quality=QualitySettings()),
        run_dir=tmp_path,
        own_previous=lambda name: None,
        progress=False,
        progress_path=tmp_path / "progress.json",
    )
    facts: dict = {}
    out, _ = stage._add_text(ctx, frames, scores, facts)
    table = apply_quality_rules(out, frames, QualitySettings())
    kept = table.filter("keep")
    assert kept["text_lines"].is_not_null().all()  # every kept frame was looked at
    assert kept["frame_id"].to_list() == [f for f, c in zip(ids, is_card, strict=True) if not c]
    assert set(table.filter(pl.col("frame_id").is_in(ids[::2]))["reject_reason"]) == {"text"}
    # The copies were looked at all at once, as soon as the first turned out to be a title card.
    assert facts["text_rounds"] == 1 and len(looked) == 2 and sorted(looked[1]) == sorted(ids[2::2])
    assert facts["text_frames_detected"] == 24


@pytest.fixture(scope="module")
def detector():
    from diffusion_bunny.models.text import load_text_detector

    return load_text_detector()


def test_detector_on_a_real_frame_with_drawn_text(hamilton, detector):
    cap = cv2.VideoCapture(str(hamilton))
    cap.set(cv2.CAP_PROP_POS_FRAMES, 120)
    ok, frame = cap.read()
    assert ok
    rgb = cv2.cvtColor(cv2.resize(frame, (1280, 720), interpolation=cv2.INTER_CUBIC), cv2.COLOR_BGR2RGB)
    cfg = QualitySettings()

    def verdict(picture: np.ndarray):
        m = measure_text(cv2.cvtColor(picture, cv2.COLOR_RGB2BGR), detector, cfg.text_width)
        assert 0.0 <= m["text_area"] <= 1.0 and 0.0 <= m["text_share"] <= 1.0 + 1e-6
        return text_verdict(m["text_lines"], cfg)

    assert verdict(rgb) == (None, 0.0, 1.0)
    signed, _ = overlays.sign(rgb, "PHARMACY", centre=(0.25, 0.4), height_share=0.06)
    assert verdict(signed) == (None, 0.0, 1.0)
    subbed, box = overlays.subtitle(
        rgb, overlays.DIALOGUE[:2], colour=overlays.YELLOW, font_name="serif-bold"
    )
    reason, top, bottom = verdict(subbed)
    assert reason is None and top == 0.0 and bottom > 0.7 and bottom * 720 <= box[1]
    card, _ = overlays.title(
        (1280, 720),
        ("THE LONG NIGHT",),
        background=overlays.gradient((1280, 720), (160, 30, 20), (20, 20, 90)),
    )
    assert verdict(card)[0] == "text"


def test_stage_drops_text_and_crops_subtitles(demo_run, tmp_path, detector):
    run = Run.create(tmp_path / "run", demo_run.movie)
    for name in ("tables", "manifests", "frames", "thumbs"):
        shutil.copytree(demo_run.run_dir / name, run.run_dir / name)
    frames = run.read_table("frames")
    w, h = int(frames["width"][0]), int(frames["height"][0])
    by_shot = {r["shot_id"]: r for r in frames.iter_rows(named=True)}

    def picture(shot: int) -> np.ndarray:
        return cv2.cvtColor(cv2.imread(str(run.run_dir / by_shot[shot]["path"])), cv2.COLOR_BGR2RGB)

    letterboxed, box = overlays.letterbox(picture(0)[40:300], (w, h))  # a wide picture with bars
    inside = letterboxed[box[1] : box[3], box[0] : box[2]]
    subbed, sub_box = overlays.subtitle(
        inside, "Where were you last night?", font_size=(box[3] - box[1]) // 12
    )
    letterboxed[box[1] : box[3], box[0] : box[2]] = subbed
    made = {
        "title": (
            overlays.title(
                (w, h),
                ("THE LONG", "NIGHT"),
                background=overlays.gradient((w, h), (30, 90, 160), (200, 120, 40)),
            )[0],
            None,
        ),
        "credits": (overlays.credits_list((w, h), offset=0.2, background=(70, 20, 60))[0], None),
        "subtitled": (letterboxed, box),
        "sign": (overlays.sign(picture(4), "STATION", centre=(0.7, 0.3), height_share=0.07)[0], None),
    }
    rows = []
    for k, (name, (rgb, frame_box)) in enumerate(made.items()):
        path = f"frames/made_{name}.jpg"
        cv2.imwrite(
            str(run.run_dir / path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95]
        )
        left, top, right, bottom = frame_box or (0, 0, w, h)
        rows.append(
            {
                **by_shot[0],
                "frame_id": f"made_{name}",
                "frame_index": 10_000 + k,
                "shot_id": 100 + k,
                "path": path,
                "box_left": left,
                "box_top": top,
                "box_right": right,
                "box_bottom": bottom,
            }
        )
    # Stage 01 found no bars in the demo: every box is the whole frame.
    assert frames.select("box_left", "box_top", "box_right", "box_bottom").unique().rows() == [(0, 0, w, h)]
    run.write_table("frames", pl.concat([frames, pl.DataFrame(rows, schema=frames.schema)]))

    cfg = load_config(root=tmp_path)
    quality = run_stage(run, "quality", cfg, force=True, progress=False)["quality"]
    reason = dict(quality.select("frame_id", "reject_reason").iter_rows())
    assert reason["made_title"] == "text" and reason["made_credits"] == "text"
    assert reason["made_sign"] is None and reason["made_subtitled"] is None
    crop = quality.filter(pl.col("frame_id") == "made_subtitled").row(0, named=True)
    assert (crop["crop_left"], crop["crop_top"], crop["crop_right"]) == (box[0], box[1], box[2])
    assert box[1] + 0.6 * (box[3] - box[1]) <= crop["crop_bottom"] <= box[1] + sub_box[1]
    sign = quality.filter(pl.col("frame_id") == "made_sign").row(0, named=True)
    assert (sign["crop_top"], sign["crop_bottom"]) == (0, h)
    # The demo's own frames keep the reasons they had (no text found in its pictures).
    before = dict(demo_run.read_table("quality").select("frame_id", "reject_reason").iter_rows())
    assert {f: reason[f] for f in before} == before
    manifest = run.read_manifest("quality")
    assert manifest["counts"]["text"] == 2 and manifest["counts"]["subtitles_cropped"] == 1
    facts = manifest["facts"]
    # The demo frames' text scores came with the copied run (same detector, box and files): reused.
    # The four new frames were looked at; every kept frame and the two title frames were.
    assert facts["text_frames_detected"] == 4
    looked = facts["text_frames_detected"] + facts["text_frames_reused"]
    assert looked == int(quality["keep"].sum()) + 2 == int(quality["text_lines"].is_not_null().sum())
    assert quality.filter(~pl.col("keep") & (pl.col("reject_reason") != "text"))["text_lines"].is_null().all()

    # Notebook 02's strip: the two text frames, then the subtitled frame as extracted and cropped.
    sheet = text_sheet(run.run_dir, quality, run.read_table("frames"), columns=4, thumb_width=120)
    empty = text_sheet(
        demo_run.run_dir,
        demo_run.read_table("quality"),
        demo_run.read_table("frames"),
        columns=4,
        thumb_width=120,
    )
    if os.environ.get("DIFFUSION_BUNNY_KEEP_SHEETS"):
        sheet.save(os.environ["DIFFUSION_BUNNY_KEEP_SHEETS"])
    # Three blocks of one row each either way (an empty block keeps its row); the pictures differ.
    assert sheet.size == empty.size and sheet.tobytes() != empty.tobytes()

    # A threshold moves: the rules run again, no frame is looked at again.
    moved = load_config(None, ["quality.subtitles=drop"], root=tmp_path)
    again = run_stage(run, "quality", moved, progress=False)["quality"]
    assert again.filter(pl.col("frame_id") == "made_subtitled")["reject_reason"].item() == "subtitles"
    facts = run.read_manifest("quality")["facts"]
    assert facts["text_frames_detected"] == 0 and facts["text_frames_reused"] == looked

    # No text model: one line naming the setting that turns the text rules off.
    from diffusion_bunny.models import text as text_model

    text_model._shared.cache_clear()
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(text_model, "MODEL_FILE", "missing_det.onnx")
            with pytest.raises(ModelError) as info:
                run_stage(
                    run,
                    "quality",
                    load_config(None, ["quality.max_text_area=0.3"], root=tmp_path),
                    progress=False,
                )
            assert "quality.text_filter: false" in str(info.value) and "\n" not in str(info.value)
            off = load_config(None, ["quality.text_filter=false"], root=tmp_path)
            quality = run_stage(run, "quality", off, progress=False)["quality"]
            assert quality.filter(pl.col("frame_id") == "made_title")["keep"].item()
    finally:
        text_model._shared.cache_clear()


def test_the_histograms_show_what_the_text_rule_weighs():
    """The text panel drew every line's share of the edges: a frame kept with a subtitle holding
    0.6 of its edges drew right of the 0.5 line, and a page of small text (area 0.3, share 0.1)
    dropped for its area drew far left of it, with no area line. Both panels now show the
    rule's own numbers, each with its threshold."""
    from diffusion_bunny.stages.quality.plots import quality_histograms
    from diffusion_bunny.stages.quality.text import judged_text

    cfg = QualitySettings()
    subtitle = [line(0.3, 0.86, 0.7, 0.92, edges=0.6)]
    page = [line(0.1, 0.2, 0.9, 0.6, edges=0.1, area=0.3)]
    table = pl.DataFrame(
        {
            "frame_id": ["sub", "page", "plain", "unseen"],
            "text_lines": [subtitle, page, [], None],
        },
        schema_overrides={"text_lines": TEXT_SCHEMA["text_lines"]},
    )
    assert text_verdict(subtitle, cfg)[0] is None and text_verdict(page, cfg)[0] == "text"
    rows = judged_text(table, cfg).to_dicts()
    judged = {r["frame_id"]: (r["text_share_judged"], r["text_area_judged"]) for r in rows}
    assert judged["sub"] == (0.0, 0.0) and judged["plain"] == (0.0, 0.0) and judged["unseen"] == (None, None)
    assert judged["page"][0] == pytest.approx(0.1) and judged["page"][1] == pytest.approx(0.3)
    scores = table.with_columns(
        pl.Series("sharpness", [100.0] * 4),
        pl.Series("brightness", [100.0] * 4),
        pl.Series("contrast", [40.0] * 4),
        pl.Series("clipped", [0.0] * 4),
        pl.Series("nearest_distance", [20] * 4),
        pl.Series("readable", [True] * 4),
        pl.Series("keep", [True, False, True, True]),
        pl.Series("reject_reason", [None, "text", None, None], dtype=pl.Utf8),
    )
    chart = quality_histograms(scores, cfg)
    thresholds = next(layer.geom.data for layer in chart.layers if type(layer.geom).__name__ == "geom_vline")
    bars = chart.data
    area = bars[(bars["score"] == "text (share of area)") & (bars["outcome"] == "text")]
    assert len(area) == 1 and area["xmin"].iloc[0] > cfg.max_text_area  # right of its line
    edges = bars[(bars["score"] == "text (share of edges)") & (bars["outcome"] == "kept")]
    assert (edges["xmax"] <= cfg.max_text_share).all()  # the kept subtitle frame left of the line
    assert thresholds[thresholds["score"] == "text (share of area)"]["value"].tolist() == [cfg.max_text_area]
