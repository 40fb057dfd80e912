"""Stage 06 (``export``): crops, split by shot, balancing, empty inputs, and the dataset written for
the demo movie loading through ``datasets`` and kohya's folder layout."""

from __future__ import annotations

import shutil

import numpy as np
import polars as pl
import pytest
from notebooks import pictures
from PIL import Image

from diffusion_bunny.config import load_config
from diffusion_bunny.errors import BadInputError, ConfigError, StageError
from diffusion_bunny.pipeline.run import Run
from diffusion_bunny.stages import run_stage, stage_state
from diffusion_bunny.stages.captions.facts import template_caption
from diffusion_bunny.stages.captions.settings import CaptionsSettings
from diffusion_bunny.stages.captions.tables import CAPTION_SCHEMA
from diffusion_bunny.stages.export.plan import (
    assign_split,
    balance_repeats,
    character_box,
    clamp_box,
    concept_table,
    crop_caption,
    crop_problem,
    face_box,
    half_body_box,
    least_side,
    plan_export,
    select_items,
    shot_groups,
)
from diffusion_bunny.stages.export.settings import ExportSettings
from diffusion_bunny.stages.export.stage import _readme, crop_box, resized, write_metadata
from diffusion_bunny.stages.export.tables import ITEMS_COLUMNS, dataset_dir


def captions_table(frame_ids: list[str], status: dict[str, str] | None = None) -> pl.DataFrame:
    """A ``captions`` table as stage 05 writes it (CONTRACT.md): a template caption per frame;
    ``status`` marks frames ``failed`` (caption null) or ``edited``."""
    status = status or {}
    rows = []
    for fid in frame_ids:
        st = status.get(fid, "ok")
        rows.append(
            {
                "frame_id": fid,
                "caption": None if st == "failed" else f"bunnystyle, frame {fid}",
                "tags": ["frame"],
                "provider": "template",
                "model": "template",
                "status": st,
                "error": "provider down" if st == "failed" else None,
                "prompt_version": "1",
                "latency_s": 0.0,
                "input_tokens": None,
                "output_tokens": None,
            }
        )
    return pl.DataFrame(rows, schema=CAPTION_SCHEMA)


# ------------------------------------------------------------------------------ small tables


def small_tables(n_shots: int = 6, per_shot: int = 2):
    """Frames 640x360 in ``n_shots`` shots; shot 0 shows anna (two frames), shot 1 anna and bob,
    shots 2+ bob; every frame kept and captioned, each with a distinct perceptual hash."""
    ids = [f"m_{i:07d}" for i in range(n_shots * per_shot)]
    frames = pl.DataFrame(
        {
            "frame_id": ids,
            "frame_index": list(range(len(ids))),
            "shot_id": [i // per_shot for i in range(len(ids))],
            "path": [f"frames/{f}.jpg" for f in ids],
            "width": [640] * len(ids),
            "height": [360] * len(ids),
        }
    )
    rng = np.random.default_rng(0)
    hashes = rng.integers(0, 2**63, size=len(ids), dtype=np.int64).astype(np.uint64)
    quality = pl.DataFrame({"frame_id": ids, "keep": [True] * len(ids), "phash": pl.Series(hashes)})
    faces = []
    for i, fid in enumerate(ids):
        shot = i // per_shot
        names = ["anna"] if shot == 0 else ["anna", "bob"] if shot == 1 else ["bob"]
        for k, name in enumerate(names):
            left = 100 + 300 * k
            faces.append(
                {
                    "face_id": f"{fid}_{k:02d}",
                    "frame_id": fid,
                    "top": 60,
                    "right": left + 100,
                    "bottom": 160,
                    "left": left,
                    "character": name,
                }
            )
    return frames, quality, pl.DataFrame(faces), captions_table(ids)


def test_crop_boxes_stay_inside_the_frame():
    # A face in the middle: a square centred on it, margin 0.5 -> twice the face's size.
    assert face_box((300, 100, 400, 200), (0, 0, 640, 360), 0.5) == (250, 50, 450, 250)
    # Near the top-left corner: shifted inside, still square and as large.
    box = face_box((0, 0, 80, 100), (0, 0, 640, 360), 0.5)
    assert box == (0, 0, 200, 200)
    # Larger than the frame's short side allows: shrunk to the frame, still holding the face.
    box = face_box((200, 20, 440, 340), (0, 0, 640, 360), 0.5)
    assert box[3] - box[1] == 360 and box[2] - box[0] == 360 and box[0] <= 200 and box[2] >= 440
    # A face larger than the short side cannot be cropped square.
    assert face_box((0, 0, 400, 360), (0, 0, 640, 300), 0.2) is None
    for box in [
        face_box((600, 330, 640, 360), (0, 0, 640, 360), 1.0),
        clamp_box(-50, 500, 300, 200, (0, 0, 640, 360)),
    ]:
        assert box is not None
        assert 0 <= box[0] < box[2] <= 640 and 0 <= box[1] < box[3] <= 360


def test_crops_stay_inside_the_picture_box_never_in_the_bars():
    # A 2.40:1 picture letterboxed in 1920x1080: bars 140 px above and below.
    picture = (0, 140, 1920, 940)
    # A face near the top of the picture: its square is pushed down into the picture, not up
    # into the bar, and keeps its size.
    box = face_box((900, 150, 1000, 250), picture, 0.5)
    assert box == (850, 140, 1050, 340)
    # Too tall for the picture (taller than 800 px with its margin): shrunk to the picture.
    box = face_box((700, 300, 1100, 700), picture, 0.5)
    assert box[1] >= 140 and box[3] <= 940 and box[3] - box[1] == 800
    body = half_body_box((900, 600, 1000, 700), picture, 4.0, 0.75)
    assert body is not None and body[1] >= 140 and body[3] <= 940


def test_half_body_box_is_a_portrait_with_the_face_at_the_top():
    face = (300, 100, 340, 150)  # 50 px tall
    box = half_body_box(face, (0, 0, 1920, 1080), 4.0, 0.75)
    assert box[3] - box[1] == 200 and box[2] - box[0] == 150
    assert box[1] == 75  # half a face height of head room
    assert (box[0] + box[2]) / 2 == 320  # centred on the face
    # Low in a small frame: shrunk to the frame's height and shifted up, the face still inside.
    assert half_body_box((300, 200, 400, 300), (0, 0, 640, 360), 4.0, 0.75) == (215, 0, 485, 360)
    # Room enough below: not shrunk, the bottom reaches the frame's edge exactly.
    assert half_body_box((300, 150, 360, 210), (0, 0, 640, 360), 4.0, 0.75) == (240, 120, 420, 360)
    # A face that fills most of the frame leaves no room for a body.
    assert half_body_box((200, 0, 440, 300), (0, 0, 640, 360), 4.0, 0.75) is None


def test_items_take_kept_frames_with_usable_captions_and_named_faces():
    frames, quality, faces, _ = small_tables(n_shots=3)
    ids = frames["frame_id"].to_list()
    quality = quality.with_columns(pl.col("frame_id").is_in([ids[5]]).not_().alias("keep"))
    captions = captions_table(ids, {ids[0]: "failed", ids[1]: "edited"})
    cfg = ExportSettings(crops=("full", "face", "half_body"), min_face_px=50, max_upscale=None)
    items, counts, _ = select_items(frames, quality, faces, captions, cfg)
    assert ids[0] not in items["frame_id"].to_list()  # failed caption
    assert ids[5] not in items["frame_id"].to_list()  # rejected by stage 02
    assert counts["uncaptioned_frames"] == 1 and counts["kept_frames"] == 5
    assert set(items["crop"]) == {"full", "face", "half_body"}
    full = items.filter((pl.col("frame_id") == ids[2]) & (pl.col("crop") == "full")).row(0, named=True)
    assert full["characters"] == ["anna", "bob"] and full["concept"] == "anna+bob"
    assert (full["left"], full["top"], full["right"], full["bottom"]) == (0, 0, 640, 360)
    # A face crop holds only the face it is centred on, and says it is a close-up.
    face = items.filter((pl.col("face_id") == f"{ids[2]}_01") & (pl.col("crop") == "face")).row(0, named=True)
    assert face["characters"] == ["bob"] and face["text"] == f"bunnystyle, frame {ids[2]}, close-up"
    half = items.filter(pl.col("crop") == "half_body")["text"].to_list()
    assert all(t.endswith(", upper body") for t in half)
    # Faces under min_face_px give no crop: only the full frames remain.
    items, counts, _ = select_items(
        frames, quality, faces, captions, cfg.model_copy(update={"min_face_px": 101})
    )
    assert set(items["crop"]) == {"full"} and counts["small_faces"] > 0
    # Frames without a named character: their own concept, or dropped.
    no_names = faces.filter(pl.col("frame_id") != ids[3])
    items, _, _ = select_items(frames, quality, no_names, captions, cfg)
    assert items.filter(pl.col("frame_id") == ids[3])["concept"].to_list() == ["scene"]
    strict = cfg.model_copy(update={"include_unnamed": False})
    items, counts, _ = select_items(frames, quality, no_names, captions, strict)
    assert ids[3] not in items["frame_id"].to_list() and counts["unnamed_frames_dropped"] == 1


def test_character_box_frames_the_whole_character_never_longer_than_the_limit():
    # A wide animal (300x100): 10% margin on every side, then its height raised to half its width.
    assert character_box((100, 100, 400, 200), (0, 0, 1280, 720), 0.1, 2.0) == (70, 60, 430, 240)
    # A standing figure (100x300): no square forced on it, only the margin and the aspect limit.
    box = character_box((500, 100, 600, 400), (0, 0, 1280, 720), 0.1, 2.0)
    assert (box[2] - box[0], box[3] - box[1]) == (180, 360)
    # At the frame's edge: shifted inside, never into the bars around the picture box.
    box = character_box((0, 150, 200, 300), (0, 140, 1280, 580), 0.1, 2.0)
    assert box[0] == 0 and box[1] >= 140 and box[3] <= 580


def test_a_small_character_takes_in_its_scene_up_to_the_limit_instead_of_being_enlarged():
    # A 100x125 sprite: framed 120x150 (side 134), widened to a side of 256 with its shape, centred.
    box = character_box((600, 300, 700, 425), (0, 0, 1280, 720), 0.1, 2.0, min_side=256, max_context=2.0)
    w, h = box[2] - box[0], box[3] - box[1]
    assert abs(np.sqrt(w * h) - 256) <= 1 and abs(w / h - 0.8) < 0.01
    assert abs((box[0] + box[2]) / 2 - 650) <= 1 and abs((box[1] + box[3]) / 2 - 362.5) <= 1
    # Never more than max_context times its framed side: a 40x50 sprite (side 54) grows to 108.
    box = character_box((600, 300, 640, 350), (0, 0, 1280, 720), 0.1, 2.0, min_side=256, max_context=2.0)
    assert (box[2] - box[0], box[3] - box[1]) == (96, 120)
    # At the frame's corner the widened crop is shifted inside, the character still in it.
    box = character_box((0, 0, 100, 125), (0, 0, 1280, 720), 0.1, 2.0, min_side=256, max_context=2.0)
    assert box[0] == 0 and box[1] == 0 and box[2] >= 100 and box[3] >= 125
    # A large character is left as it is.
    assert character_box((100, 100, 500, 300), (0, 0, 1280, 720), 0.1, 2.0, 256, 2.0) == (60, 80, 540, 320)


def test_no_character_with_room_around_it_is_left_out_as_upscaled_by_a_rounded_pixel():
    """A framed box just over the least side is not widened; rounded to whole pixels it must not
    then fall just under it and be left out as upscaled (156x292 at 720p was, 157x292 was not)."""
    cfg = ExportSettings()
    for bounds in ((0, 0, 1280, 720), (0, 0, 1920, 1080)):
        for w in range(150, 300):
            for h in range(150, 300):
                box = character_box(
                    (500, 200, 500 + w, 200 + h),
                    bounds,
                    cfg.character_margin,
                    cfg.character_max_aspect,
                    least_side(cfg),
                    cfg.character_max_context,
                )
                assert crop_problem({"sharpness": None}, box, "character", cfg) is None, (bounds, w, h, box)


def test_small_drawn_characters_get_a_widened_crop_the_trainer_need_not_enlarge_more_than_twice():
    frames, quality, _, captions = small_tables(n_shots=2)
    frames = frames.with_columns(pl.lit(1280).alias("width"), pl.lit(720).alias("height"))
    ids = frames["frame_id"].to_list()
    faces = appearances_table(ids).with_columns(
        # The fourth frame's dog: 110x130 instead of 60x40 (framed 132x156, side 143).
        pl.when(pl.col("frame_id") == ids[3]).then(pl.lit(240)).otherwise(pl.col("right")).alias("right"),
        pl.when(pl.col("frame_id") == ids[3]).then(pl.lit(300)).otherwise(pl.col("bottom")).alias("bottom"),
        pl.when(pl.col("frame_id") == ids[3]).then(pl.lit(130)).otherwise(pl.col("left")).alias("left"),
        pl.when(pl.col("frame_id") == ids[3]).then(pl.lit(170)).otherwise(pl.col("top")).alias("top"),
    )
    cfg = ExportSettings(crops=("full", "character"), crop_resolution=512, max_upscale=2.0)
    items, counts, dropped = select_items(frames, quality, faces, captions, cfg)
    dog = items.filter((pl.col("frame_id") == ids[3]) & (pl.col("crop") == "character")).row(0, named=True)
    w, h = dog["right"] - dog["left"], dog["bottom"] - dog["top"]
    assert 512 / np.sqrt(w * h) <= 2.0 and dog["characters"] == ["dog"]
    assert dog["left"] <= 130 and dog["top"] <= 170 and dog["right"] >= 240 and dog["bottom"] >= 300
    assert counts["upscaled_crops"] == 0 and not dropped
    # With no room to widen (character_max_context 1) it is left out as before.
    tight = cfg.model_copy(update={"character_max_context": 1.0})
    items, counts, dropped = select_items(frames, quality, faces, captions, tight)
    assert counts["upscaled_crops"] == 1 and [d["reason"] for d in dropped] == ["upscaled"]


def appearances_table(frame_ids: list[str]) -> pl.DataFrame:
    """Named appearances of both kinds, with their sharpness: a drawn dog and a drawn girl in the
    first frame, a sharp face in the second, the same face far behind and soft in the third, a
    tiny drawn dog in the fourth."""
    rows = [
        (frame_ids[0], 0, "drawn", "dog", (100, 300, 500, 500), 400.0),
        (frame_ids[0], 1, "drawn", "girl", (800, 100, 950, 500), 380.0),
        (frame_ids[1], 0, "face", "anna", (500, 100, 800, 400), 300.0),
        (frame_ids[2], 0, "face", "anna", (500, 100, 800, 400), 30.0),
        (frame_ids[3], 0, "drawn", "dog", (10, 10, 70, 50), 390.0),
    ]
    return pl.DataFrame(
        [
            {
                "face_id": f"{fid}_{k:02d}",
                "frame_id": fid,
                "kind": kind,
                "character": name,
                "left": box[0],
                "top": box[1],
                "right": box[2],
                "bottom": box[3],
                "sharpness": sharp,
            }
            for fid, k, kind, name, box, sharp in rows
        ]
    )


def test_drawn_characters_get_character_crops_and_soft_or_small_crops_are_left_out_with_the_reason():
    frames, quality, _, captions = small_tables(n_shots=2)
    frames = frames.with_columns(pl.lit(1280).alias("width"), pl.lit(720).alias("height"))
    ids = frames["frame_id"].to_list()
    faces = appearances_table(ids)
    cfg = ExportSettings(crops=("full", "face", "character"), crop_resolution=512, max_upscale=2.0)
    items, counts, dropped = select_items(frames, quality, faces, captions, cfg)
    crops = {(r["face_id"], r["crop"]) for r in items.filter(pl.col("crop") != "full").iter_rows(named=True)}
    # The dog and the girl give character crops (no face crop: they are no faces); the sharp
    # face a face crop.
    assert crops == {(f"{ids[0]}_00", "character"), (f"{ids[0]}_01", "character"), (f"{ids[1]}_00", "face")}
    dog = items.filter(pl.col("face_id") == f"{ids[0]}_00").row(0, named=True)
    assert (dog["right"] - dog["left"], dog["bottom"] - dog["top"]) == (480, 240)
    # The soft face is out of focus next to the movie's other face (30 against a median of 165);
    # the tiny dog would be enlarged 8 times.
    assert sorted((d["face_id"], d["reason"]) for d in dropped) == [
        (f"{ids[2]}_00", "blurry"),
        (f"{ids[3]}_00", "upscaled"),
    ]
    assert counts["blurry_crops"] == 1 and counts["upscaled_crops"] == 1
    # Both rules can be turned off.
    relaxed = cfg.model_copy(update={"max_upscale": None, "min_sharpness_ratio": 0.0})
    items, counts, dropped = select_items(frames, quality, faces, captions, relaxed)
    assert dropped == [] and int((items["crop"] != "full").sum()) == 5


def test_crops_of_a_template_captioned_frame_name_only_who_they_show():
    frames, quality, _, captions = small_tables(n_shots=2)
    frames = frames.with_columns(pl.lit(1280).alias("width"), pl.lit(720).alias("height"))
    ids = frames["frame_id"].to_list()
    faces = appearances_table(ids)
    # Someone no one named, their face inside the girl's crop and outside the dog's.
    stranger = faces.head(1).with_columns(
        pl.lit(f"{ids[0]}_09").alias("face_id"),
        pl.lit("face").alias("kind"),
        pl.lit(None, pl.String).alias("character"),
        pl.lit(850).alias("left"),
        pl.lit(150).alias("top"),
        pl.lit(900).alias("right"),
        pl.lit(200).alias("bottom"),
    )
    faces = pl.concat([faces, stranger], how="vertical_relaxed")
    words = CaptionsSettings()
    frame = {"characters": ["dog", "girl"], "unknown_faces": 1, "framing": "wide shot"}
    frame |= {"motion": "static shot", "scene": "s001", "light": "dark"}
    caption, tags = template_caption(frame, words)
    captions = captions.with_columns(
        pl.when(pl.col("frame_id") == ids[0])
        .then(pl.lit(caption))
        .otherwise(pl.col("caption"))
        .alias("caption"),
        pl.when(pl.col("frame_id") == ids[0]).then(pl.lit(tags)).otherwise(pl.col("tags")).alias("tags"),
        # The second frame's caption a person wrote: it is kept, with the crop's tag.
        pl.when(pl.col("frame_id") == ids[1])
        .then(pl.lit("edited"))
        .otherwise(pl.col("status"))
        .alias("status"),
    )
    cfg = ExportSettings(crops=("full", "face", "character"), crop_resolution=512, max_upscale=2.0)
    items, _, _ = select_items(frames, quality, faces, captions, cfg, words)
    text = {
        (r["frame_id"], r["crop"], tuple(r["characters"])): r["text"] for r in items.iter_rows(named=True)
    }
    assert text[(ids[0], "full", ("dog", "girl"))] == caption
    assert text[(ids[0], "character", ("dog",))] == "bunnystyle, dog, static shot, dark, scene s001"
    assert text[(ids[0], "character", ("girl",))] == (
        "bunnystyle, girl and 1 other person, static shot, dark, scene s001"
    )
    assert text[(ids[1], "face", ("anna",))] == f"bunnystyle, frame {ids[1]}, close-up"
    # Without stage 05's settings every crop keeps its frame's caption.
    items, _, _ = select_items(frames, quality, faces, captions, cfg)
    assert set(items.filter(pl.col("frame_id") == ids[0])["text"]) == {caption}
    # The stranger fixed to none in notebook 03 (a false sighting) is nobody in the girl's crop.
    fixed = faces.with_columns((pl.col("face_id") == f"{ids[0]}_09").alias("edited"))
    items, _, _ = select_items(frames, quality, fixed, captions, cfg, words)
    girl = items.filter((pl.col("frame_id") == ids[0]) & (pl.col("crop") == "character"))
    assert "bunnystyle, girl, static shot, dark, scene s001" in girl["text"].to_list()


def test_crop_caption_tag():
    assert crop_caption("a woman at a desk.", "close-up") == "a woman at a desk, close-up"
    assert crop_caption("a woman", "") == "a woman"
    # A caption that says its framing already (typed by hand) does not say it twice.
    typed = "lin sings into a microphone, Close-up, dark stage"
    assert crop_caption(typed, "close-up") == typed
    assert crop_caption("a close-up of lin", "close-up") == "a close-up of lin, close-up"  # a word, no tag


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("no_kept", "stage 02 kept none of the 6 frames; loosen the quality.*"),
        ("all_failed", "none of the 6 kept frames has a usable caption (6 captioned, 6 failed"),
        ("blank", "none of the 6 kept frames has a usable caption (6 captioned, 0 failed"),
        ("faces_only", "no picture to export from the 6 captioned frames with export.crops = ['face']"),
        ("faces_upscaled", "crop(s) left out as enlarged more than export.max_upscale (1) times"),
        # Named faces there, and character crops only: it said "no named face of at least 64 px".
        ("characters_only", "['character']: no named drawn character (a character crop frames one)"),
    ],
)
def test_empty_dataset_is_one_clear_error(change, message):
    frames, quality, faces, captions = small_tables(n_shots=3)
    cfg = ExportSettings()
    if change == "no_kept":
        quality = quality.with_columns(pl.lit(False).alias("keep"))
    elif change == "all_failed":
        captions = captions_table(frames["frame_id"].to_list(), dict.fromkeys(frames["frame_id"], "failed"))
    elif change == "blank":
        captions = captions.with_columns(pl.lit("  ").alias("caption"))
    elif change == "faces_upscaled":  # named faces there, every crop too small for 4096 px
        cfg = ExportSettings(crops=("face",), crop_resolution=4096, max_upscale=1)
    elif change == "characters_only":
        cfg = ExportSettings(crops=("character",))
    else:
        faces = faces.head(0)
        cfg = ExportSettings(crops=("face",))
    with pytest.raises(StageError) as err:
        plan_export(frames, quality, faces, captions, cfg)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_near_identical_shots_are_grouped():
    frames, quality, faces, captions = small_tables(n_shots=4)
    items, _, _ = select_items(frames, quality, faces, captions, ExportSettings(crops=("full",)))
    hashes = quality["phash"].to_list()
    # Shot 3's second frame is shot 0's first with 3 bits flipped (the movie cut back to it).
    near = quality.with_columns(pl.Series("phash", [*hashes[:7], hashes[0] ^ 0b10101], dtype=pl.UInt64))
    assert shot_groups(items, near, 4) == {0: 0, 1: 1, 2: 2, 3: 0}
    assert shot_groups(items, near, 2) == {0: 0, 1: 1, 2: 2, 3: 3}
    assert shot_groups(items, near, None) == {0: 0, 1: 1, 2: 2, 3: 3}


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_validation_split_never_straddles_a_group(seed):
    frames, quality, faces, captions = small_tables(n_shots=20, per_shot=3)
    items, _, _ = select_items(frames, quality, faces, captions, ExportSettings(crops=("full", "face")))
    # Shots 4 and 9 are one group (near-identical), as shot_groups would make them.
    groups = {s: (4 if s == 9 else s) for s in range(20)}
    split, warnings = assign_split(items, groups, 0.2, seed)
    assert not warnings
    sides = split.group_by("split_group").agg(pl.col("split").n_unique())
    assert sides["split"].max() == 1
    share = float((split["split"] == "validation").mean())
    assert 0.1 <= share <= 0.3
    # anna is in shots 0 and 1 only: she keeps training pictures whatever the draw.
    train_chars = split.filter(pl.col("split") == "train")["characters"].explode().to_list()
    assert "anna" in train_chars and "bob" in train_chars
    # The same seed gives the same split.
    again, _ = assign_split(items, groups, 0.2, seed)
    assert again["split"].to_list() == split["split"].to_list()


def test_split_seeds_differ_and_fraction_zero_keeps_everything_for_training():
    frames, quality, faces, captions = small_tables(n_shots=20, per_shot=3)
    items, _, _ = select_items(frames, quality, faces, captions, ExportSettings(crops=("full",)))
    groups = {s: s for s in range(20)}
    picks = {tuple(assign_split(items, groups, 0.2, seed)[0]["split"].to_list()) for seed in range(5)}
    assert len(picks) > 1
    split, _ = assign_split(items, groups, 0.0, 0)
    assert set(split["split"]) == {"train"}


def test_one_shot_gives_no_validation_and_says_why():
    frames, quality, faces, captions = small_tables(n_shots=1, per_shot=4)
    items, _, _ = select_items(frames, quality, faces, captions, ExportSettings(crops=("full",)))
    split, warnings = assign_split(items, {0: 0}, 0.2, 0)
    assert set(split["split"]) == {"train"}
    assert "no validation pictures" in warnings[0]


def test_when_every_shot_overshoots_the_smallest_goes_to_validation():
    frames, quality, faces, captions = small_tables(n_shots=4, per_shot=3)
    items, _, _ = select_items(frames, quality, faces, captions, ExportSettings(crops=("full",)))
    items = items.filter(pl.col("shot_id") != 3).vstack(items.filter(pl.col("shot_id") == 3).head(2))
    split, warnings = assign_split(items, {s: s for s in range(4)}, 0.05, 0)
    # Target 1 picture: no shot brings the share closer, so the smallest eligible one (shot 3, two
    # pictures of bob) is taken rather than none; anna's shots stay for training.
    assert split.filter(pl.col("split") == "validation")["shot_id"].unique().to_list() == [3]
    assert not warnings
    # Two shots of three pictures, 5% asked: half the film is no validation set (it was taken).
    two = items.filter(pl.col("shot_id").is_in([0, 1]))
    halves, warned = assign_split(two, {0: 0, 1: 1}, 0.05, 0)
    assert set(halves["split"]) == {"train"} and "no validation pictures" in warned[0]


def test_a_character_named_as_the_unnamed_concept_or_the_trigger_word_is_said():
    """A character named "Scene" shared the kohya folder of the pictures of nobody named
    (``export.unnamed_concept``), which took its repeats: those get a concept of their own now,
    and a character named as the trigger word is one line (its captions open with it twice)."""
    frames, quality, faces, captions = small_tables()
    faces = faces.with_columns(pl.col("character").replace({"bob": "Scene"}))
    nobody = frames["frame_id"][0]
    faces = faces.filter(pl.col("frame_id") != nobody)
    plan = plan_export(
        frames, quality, faces, captions, ExportSettings(), CaptionsSettings(trigger_word="Anna")
    )
    concepts = dict(plan.items.select("frame_id", "concept").filter(pl.col("frame_id") == nobody).iter_rows())
    assert concepts == {nobody: "scene_unnamed"}
    assert "Scene" in set(plan.items["concept"]) and "scene" not in set(plan.items["concept"])
    clash, trigger = (w for w in plan.warnings if "a character is named" in w)
    assert "named 'Scene'" in clash and "export.unnamed_concept" in clash and "'scene_unnamed'" in clash
    alone = plan_export(frames, quality, faces, captions, ExportSettings(include_unnamed=False))
    assert not [w for w in alone.warnings if "a character is named" in w]  # no picture of nobody
    assert "captions.trigger_word" in trigger and "named 'anna'" in trigger
    plain = plan_export(
        frames, quality, faces.with_columns(pl.lit("bob").alias("character")), captions, ExportSettings()
    )
    assert not [w for w in plain.warnings if "a character is named" in w]
    assert set(plain.items["concept"]) == {"bob", "scene"}


def test_a_typed_caption_naming_a_character_not_in_its_frame_is_said():
    """A caption a person typed is never overwritten: when stage 03 no longer finds the
    character it names in that frame (a fix, a rerun), the caption and the character folders
    disagree, and only the export can say so."""
    frames, quality, faces, captions = small_tables()
    bobs_frame, annas_frame, both = frames["frame_id"][4], frames["frame_id"][0], frames["frame_id"][2]
    typed = {
        bobs_frame: "bunnystyle, Anna waves at Bob",
        annas_frame: "bunnystyle, anna",
        both: "bunnystyle, Anna, Bob",
    }
    captions = captions.with_columns(
        pl.col("frame_id").replace_strict(typed, default=pl.col("caption")).alias("caption"),
        pl.when(pl.col("frame_id").is_in(list(typed)))
        .then(pl.lit("edited"))
        .otherwise("status")
        .alias("status"),
    )
    plan = plan_export(frames, quality, faces, captions, ExportSettings())
    (line,) = [w for w in plan.warnings if "typed by hand" in w]
    assert line.startswith(
        "1 frame(s) whose caption, typed by hand, names a character stage 03 does not find"
    )
    assert f"{bobs_frame} (anna)" in line and annas_frame not in line and both not in line
    # The same words from a model (not edited) are the model's: no line.
    plain = captions.with_columns(pl.lit("ok").alias("status"))
    assert not [
        w for w in plan_export(frames, quality, faces, plain, ExportSettings()).warnings if "typed" in w
    ]
    # A name with an underscore, typed with a space, is the same name.
    renamed = faces.with_columns(pl.col("character").replace({"anna": "anna_lee"}))
    lee = {bobs_frame: "Anna Lee waves"}
    typed_lee = captions.with_columns(
        pl.col("frame_id").replace_strict(lee, default=pl.col("caption")).alias("caption")
    )
    (line,) = [
        w for w in plan_export(frames, quality, renamed, typed_lee, ExportSettings()).warnings if "typed" in w
    ]
    assert f"{bobs_frame} (anna_lee)" in line


def test_balancing_gives_smaller_characters_more_repeats():
    concepts = ["anna"] * 12 + ["bob"] * 4 + ["cleo"] * 1 + ["scene"] * 30 + ["bob"] * 2
    chars = [[c] if c != "scene" else [] for c in concepts]
    split = ["train"] * 47 + ["validation"] * 2
    items = pl.DataFrame({"concept": concepts, "characters": chars, "split": split})
    cfg = ExportSettings(base_repeats=2, max_repeats=12)
    out = balance_repeats(items, cfg)
    repeats = dict(out.filter(pl.col("split") == "train").select("concept", "repeats").unique().iter_rows())
    # anna is the largest character (12): base; bob 12/4 -> 3x base; cleo 12x base, capped at 12.
    assert repeats == {"anna": 2, "bob": 6, "cleo": 12, "scene": 2}
    assert set(out.filter(pl.col("split") == "validation")["repeats"]) == {1}
    flat = balance_repeats(items, cfg.model_copy(update={"balance": False}))
    assert set(flat.filter(pl.col("split") == "train")["repeats"]) == {2}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (["export.crops=[]"], "export.crops = []: list at least one crop"),
        (["export.crops=[full, full]"], "each crop may be listed once"),
        (
            ["export.crops=[body]"],
            "export.crops = 'body': Input should be 'full', 'face', 'half_body' or 'character'",
        ),
        (["export.max_repeats=2", "export.base_repeats=3"], "max_repeats (2) must be at least base_repeats"),
        (["export.validation_fraction=0.7"], "export.validation_fraction = 0.7: Input should be less than"),
        (["export.unnamed_concept=../x"], "export.unnamed_concept = '../x': must be usable as a folder name"),
        (["export.face_tag=a, b"], "export.face_tag = 'a, b': must be one short phrase"),
    ],
)
def test_bad_export_settings_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, override)
    assert message in str(err.value)


def test_one_crop_given_as_a_word_is_a_list_of_one():
    """``--set export.crops=full`` was "Input should be a valid tuple", naming no crop."""
    assert load_config(None, ["export.crops=full"]).export.crops == ("full",)
    with pytest.raises(ConfigError, match=r"export\.crops = 'body': Input should be 'full'"):
        load_config(None, ["export.crops=body"])


def test_readme_names_the_crops_written_with_their_counts(tmp_path):
    """The README's crops are those of the pictures written, counted: it listed the configured
    ``export.crops``, "crops: full, face, character" on a run that wrote 8 full pictures and no
    face or character crop (none found big enough)."""
    items = pl.DataFrame(
        {
            "split": ["train"] * 7 + ["validation"],
            "crop": ["full"] * 8,
            "concept": ["scene"] * 8,
            "repeats": [1] * 8,
        }
    )
    cfg = ExportSettings(crops=("full", "face", "character"))
    readme = _readme(items, cfg, tmp_path / "dataset")
    assert "8 pictures: 7 train, 1 validation (crops: 8 full; whole shots never straddle the two)." in readme
    assert "face," not in readme and "character;" not in readme  # none written, none named
    assert "- 1_scene: 7 pictures x 1" in readme  # the rest of the README is as it was
    mixed = items.with_columns(pl.Series("crop", ["face", "full", "half_body", "full"] * 2))
    readme = _readme(mixed, cfg, tmp_path / "dataset")
    assert "(crops: 4 full, 2 face, 2 half_body; " in readme  # in the order of the crop kinds


def test_jsonl_metadata_loads_through_datasets(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from datasets import load_dataset

    rows = {"train": [["anna"], ["anna", "bob"]], "validation": [["bob"]]}
    for split, chars in rows.items():
        (tmp_path / split).mkdir()
        names = [f"{split}{i}.jpg" for i in range(len(chars))]
        for name in names:
            Image.new("RGB", (16, 12), "red").save(tmp_path / split / name)
        items = pl.DataFrame(
            {
                "file_name": names,
                "text": [f"caption {n}" for n in names],
                "characters": chars,
                "shot_id": list(range(len(names))),
                "frame_id": names,
                "crop": ["full"] * len(names),
                "repeats": [1] * len(names),
            }
        )
        assert write_metadata(tmp_path / split, items, "jsonl").name == "metadata.jsonl"
    ds = load_dataset("imagefolder", data_dir=str(tmp_path), cache_dir=str(tmp_path / "cache"))
    assert ds["train"]["characters"] == [["anna"], ["anna", "bob"]]
    assert ds["validation"][0]["text"] == "caption validation0.jpg"


# --------------------------------------------------------------------------- the demo movie


EXPORT_OVERRIDES = {"export.crops": ["full", "face", "half_body"], "export.validation_fraction": 0.15}


def add_captions(run: Run, status: dict[str, str] | None = None) -> pl.DataFrame:
    """Write the ``captions`` table stage 05 would write (every frame stage 02 kept)."""
    kept = run.read_table("quality").filter(pl.col("keep"))["frame_id"].to_list()
    table = captions_table(kept, status)
    run.write_table("captions", table)
    return table


@pytest.fixture(scope="module")
def export_run(scenes_demo_run, tmp_path_factory):
    """The demo through stages 01-04, captions written per the contract (one failed), exported
    with every crop; ``(run, overrides, cfg)``."""
    run, overrides = scenes_demo_run
    run_dir = tmp_path_factory.mktemp("export_run") / "run"
    shutil.copytree(run.run_dir, run_dir)
    run = Run.open(run_dir)
    kept = run.read_table("quality").filter(pl.col("keep"))["frame_id"].to_list()
    add_captions(run, {kept[1]: "failed"})
    overrides = {**overrides, **EXPORT_OVERRIDES}
    cfg = load_config(None, overrides, root=tmp_path_factory.mktemp("noconfig"))
    with pytest.warns(UserWarning, match="1 kept frame"):
        run_stage(run, "export", cfg, progress=False)
    return run, overrides, cfg


@pytest.fixture
def export_copy(export_run, tmp_path):
    run, overrides, cfg = export_run
    shutil.copytree(run.run_dir, tmp_path / "run")
    return Run.open(tmp_path / "run"), overrides, cfg


def test_demo_export_loads_through_datasets(export_run, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from datasets import load_dataset

    run, _, _ = export_run
    items = run.read_table("dataset_items")
    assert tuple(items.columns) == ITEMS_COLUMNS
    kept = run.read_table("quality").filter(pl.col("keep")).height
    assert items.filter(pl.col("crop") == "full").height == kept - 1  # the failed caption is left out
    assert set(items["crop"]) == {"full", "face", "half_body"}
    named = run.read_table("faces").filter(pl.col("character").is_not_null())
    assert set(items["characters"].explode().drop_nulls()) == set(named["character"])
    counts = {s: int((items["split"] == s).sum()) for s in ("train", "validation")}
    assert counts["validation"] >= 1 and counts["train"] > counts["validation"]
    # Near-identical frames never straddle: no shot on both sides.
    sides = items.group_by("shot_id").agg(pl.col("split").n_unique())
    assert sides["split"].max() == 1
    n = {c: items.filter(pl.col("crop") == c).height for c in ("full", "face", "half_body")}
    readme = (dataset_dir(run.run_dir) / "README.md").read_text()
    assert f"(crops: {n['full']} full, {n['face']} face, {n['half_body']} half_body; " in readme

    hf = dataset_dir(run.run_dir) / "hf"
    ds = load_dataset("imagefolder", data_dir=str(hf), cache_dir=str(tmp_path / "cache"))
    assert set(ds) == {"train", "validation"}
    for split, n in counts.items():
        part = ds[split]
        assert part.num_rows == n
        assert {"image", "text", "characters", "shot_id", "crop", "repeats"} <= set(part.column_names)
        expected = items.filter(pl.col("split") == split).sort("file_name")
        got = sorted(zip(*(list(part[c]) for c in ("frame_id", "crop", "text", "characters")), strict=True))
        want = sorted(expected.select("frame_id", "crop", "text", "characters").rows())
        assert got == want
    # The pictures are the crops at the recorded size (none larger than max_side).
    first = items.row(0, named=True)
    with Image.open(hf / first["split"] / first["file_name"]) as image:
        assert image.size == (first["width"], first["height"])
    face = items.filter(pl.col("crop") == "face").row(0, named=True)
    assert face["width"] == face["height"]


def test_demo_kohya_folders_hold_train_pictures_with_captions(export_run):
    run, _, _ = export_run
    items = run.read_table("dataset_items")
    kohya = dataset_dir(run.run_dir) / "kohya"
    train = items.filter(pl.col("split") == "train")
    for row in train.iter_rows(named=True):
        folder = kohya / f"{row['repeats']}_{row['concept']}"
        assert (folder / row["file_name"]).is_file()
        assert (folder / row["file_name"]).with_suffix(".txt").read_text() == row["text"] + "\n"
    pictures = [p for p in kohya.rglob("*") if p.suffix == ".jpg"]
    assert len(pictures) == train.height  # validation pictures stay out of the training folders
    assert {p.parent.name for p in pictures} == set(concept_table(items)["kohya_folder"])
    # The two characters of the demo are balanced: equal steps per epoch, or max_repeats reached.
    table = concept_table(items).filter(pl.col("concept") != "scene")
    steps = table["steps_per_epoch"].to_list()
    assert max(steps) <= 1.5 * min(steps) or table["repeats"].max() == 10


def test_demo_export_reruns_only_when_a_caption_changes(export_copy):
    run, _, cfg = export_copy
    assert stage_state(run, "export", cfg)[0] == "done"
    captions = run.read_table("captions")
    frame = run.read_table("dataset_items").filter(pl.col("crop") == "full")["frame_id"][0]
    edited = captions.with_columns(
        pl.when(pl.col("frame_id") == frame)
        .then(pl.lit("bunnystyle, edited by hand"))
        .otherwise(pl.col("caption"))
        .alias("caption"),
        pl.when(pl.col("frame_id") == frame)
        .then(pl.lit("edited"))
        .otherwise(pl.col("status"))
        .alias("status"),
    )
    run.write_table("captions", edited)
    assert stage_state(run, "export", cfg) == ("stale", "its inputs changed (captions)")
    with pytest.warns(UserWarning):
        items = run_stage(run, "export", cfg, progress=False)["dataset_items"]
    row = items.filter((pl.col("frame_id") == frame) & (pl.col("crop") == "full")).row(0, named=True)
    assert row["text"] == "bunnystyle, edited by hand"
    kohya = dataset_dir(run.run_dir) / "kohya" / f"{row['repeats']}_{row['concept']}"
    if row["split"] == "train":
        assert (kohya / row["file_name"]).with_suffix(".txt").read_text() == "bunnystyle, edited by hand\n"


def test_files_put_into_the_dataset_are_moved_aside_not_lost(export_copy):
    """The export swaps in a new dataset/ and removes the old one whole: pictures a person added
    (regularisation images) and a kohya caption fixed by hand there were lost in silence on the
    next export, which the change itself set off (its output changed)."""
    run, _, cfg = export_copy
    run_stage(run, "export", cfg, progress=False)  # up to date, found copied: what changes now is a person's
    root = dataset_dir(run.run_dir)
    added = root / "reg" / "1_person" / "a.png"
    added.parent.mkdir(parents=True)
    added.write_bytes(b"a picture of mine")
    fixed = sorted((root / "kohya").rglob("*.txt"))[0]
    fixed.write_text("bunnystyle, my own words\n")
    assert stage_state(run, "export", cfg) == ("stale", "its output changed since it ran (dataset/)")
    with pytest.warns(UserWarning) as said:
        run_stage(run, "export", cfg, progress=False)
    (line,) = [str(w.message) for w in said if "since the last export" in str(w.message)]
    assert line.startswith("2 file(s) put into or changed in dataset/ since the last export (first: kohya/")
    (aside,) = (run.run_dir / "dataset_added").iterdir()
    assert f"were moved to {aside}: " in line
    assert (aside / "reg" / "1_person" / "a.png").read_bytes() == b"a picture of mine"
    assert (aside / fixed.relative_to(root)).read_text() == "bunnystyle, my own words\n"
    assert fixed.read_text() != "bunnystyle, my own words\n" and not (root / "reg").exists()
    # Exported again with nothing added, nothing is moved.
    with pytest.warns(UserWarning) as said:
        run_stage(run, "export", cfg, force=True, progress=False)
    assert not [w for w in said if "since the last export" in str(w.message)]
    assert len(list((run.run_dir / "dataset_added").iterdir())) == 1


def test_demo_export_as_png_with_jsonl_and_no_kohya(export_copy, tmp_path, monkeypatch):
    import diffusion_bunny.stages.export.stage as stage

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from datasets import load_dataset

    run, overrides, _ = export_copy
    settings = {"export.image_format": "png", "export.metadata_format": "jsonl", "export.max_side": 200}
    cfg = load_config(None, {**overrides, **settings}, root=tmp_path)

    def no_links(src, dst):
        raise OSError("hard links not supported")

    monkeypatch.setattr(stage.os, "link", no_links)
    with pytest.warns(UserWarning):
        items = run_stage(run, "export", cfg, progress=False)["dataset_items"]
    hf = dataset_dir(run.run_dir) / "hf"
    assert (hf / "train" / "metadata.jsonl").is_file() and not (hf / "train" / "metadata.parquet").exists()
    for row in items.iter_rows(named=True):
        assert row["file_name"].endswith(".png") and max(row["width"], row["height"]) <= 200
        with Image.open(hf / row["split"] / row["file_name"]) as image:
            assert image.format == "PNG" and image.size == (row["width"], row["height"])
    full = items.filter(pl.col("crop") == "full").row(0, named=True)
    assert (full["width"], full["height"]) == (200, 112)  # 640x360 shrunk, aspect kept (112.5 rounds to even)
    # Copies instead of hard links, same bytes.
    train = items.filter(pl.col("split") == "train").row(0, named=True)
    copy = dataset_dir(run.run_dir) / "kohya" / f"{train['repeats']}_{train['concept']}" / train["file_name"]
    assert copy.read_bytes() == (hf / "train" / train["file_name"]).read_bytes()
    assert copy.stat().st_ino != (hf / "train" / train["file_name"]).stat().st_ino
    ds = load_dataset("imagefolder", data_dir=str(hf), cache_dir=str(tmp_path / "cache"))
    assert ds["train"].num_rows + ds["validation"].num_rows == items.height
    # Without kohya, only the imagefolder is written.
    cfg = load_config(None, {**overrides, **settings, "export.kohya": False}, root=tmp_path)
    with pytest.warns(UserWarning):
        run_stage(run, "export", cfg, progress=False)
    assert not (dataset_dir(run.run_dir) / "kohya").exists()
    assert "kohya" not in (dataset_dir(run.run_dir) / "README.md").read_text()


def test_empty_or_missing_captions_leave_the_dataset_intact(export_copy):
    run, _, cfg = export_copy
    before = sorted(p.relative_to(run.run_dir) for p in dataset_dir(run.run_dir).rglob("*"))
    kept = run.read_table("quality").filter(pl.col("keep"))["frame_id"].to_list()
    add_captions(run, dict.fromkeys(kept, "failed"))
    with pytest.raises(StageError, match="has a usable caption"):
        run_stage(run, "export", cfg, progress=False)
    run.table_path("captions").unlink()
    with pytest.raises(StageError, match=r"table 'captions' is missing in .*; run stage captions first"):
        run_stage(run, "export", cfg, progress=False)
    assert sorted(p.relative_to(run.run_dir) for p in dataset_dir(run.run_dir).rglob("*")) == before
    assert not list(run.run_dir.glob(".dataset.*"))


def test_a_failed_export_keeps_the_previous_dataset(export_copy, monkeypatch):
    import diffusion_bunny.stages.export.stage as stage

    run, _, cfg = export_copy
    readme = (dataset_dir(run.run_dir) / "README.md").read_text()
    before = sorted(p.relative_to(run.run_dir) for p in dataset_dir(run.run_dir).rglob("*"))
    # A frame file broken since stage 01: the export stops with one clear error...
    path = (
        run.run_dir
        / run.read_table("dataset_items").join(run.read_table("frames"), on="frame_id")["path"][-1]
    )
    original = path.read_bytes()
    for broken in (b"not a jpeg", original[: len(original) // 2]):  # ... or cut short
        path.write_bytes(broken)
        with pytest.raises(BadInputError, match=r"cannot be read .*rerun stage extract with --force"):
            run_stage(run, "export", cfg, progress=False, force=True)
    # ...and a missing one before anything is written.
    path.unlink()
    with pytest.raises(BadInputError, match="1 frame file\\(s\\) are missing"):
        run_stage(run, "export", cfg, progress=False, force=True)
    path.write_bytes(original)
    # An interruption while pictures are written (Ctrl-C) leaves the old dataset too.
    calls = {"n": 0}
    real = stage._write_frame

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(stage, "_write_frame", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_stage(run, "export", cfg, progress=False, force=True)
    assert sorted(p.relative_to(run.run_dir) for p in dataset_dir(run.run_dir).rglob("*")) == before
    assert (dataset_dir(run.run_dir) / "README.md").read_text() == readme
    assert not list(run.run_dir.glob(".dataset.*"))


def test_dataset_figures(export_run):
    from diffusion_bunny.stages.export.plots import NO_CHARACTER, dataset_counts_plot, dataset_sheet

    run, _, _ = export_run
    items = run.read_table("dataset_items")
    plot = dataset_counts_plot(items)
    data = plot.data
    # One bar per character and split; pictures without a character have their own bar.
    assert int(data["pictures"].sum()) == items["characters"].list.len().clip(1).sum()
    assert NO_CHARACTER in set(data["character"].astype(str))
    assert f"{items.height} pictures" in plot.labels.title
    sheet = dataset_sheet(dataset_dir(run.run_dir), items, side=64)
    concepts = items["concept"].n_unique()
    assert sheet.height == concepts * (22 + 64 + 14 + 4)
    # Validation pictures are framed in orange.
    n_val_rows = items.filter(pl.col("split") == "validation")["concept"].n_unique()
    orange = int((np.asarray(sheet) == (245, 133, 24)).all(axis=2).sum())
    assert (orange > 0) == (n_val_rows > 0)


def test_notebook_06_runs_headless(export_run, tmp_path, monkeypatch):
    """Notebook 06 as ``bunny run`` executes it: the stage is up to date, the summary, the figures and
    the ``datasets`` load print."""
    import nbformat
    import papermill
    from paths import ROOT as root

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    run, overrides, _ = export_run
    finished = run.read_manifest("export")["finished"]
    items = run.read_table("dataset_items")
    nb = papermill.execute_notebook(
        str(root / "notebook" / "06_export_dataset.ipynb"),
        str(tmp_path / "nb.ipynb"),
        # the datasets load asked for: headless runs (interactive False) skip it unless asked
        parameters={
            "run_dir": str(run.run_dir),
            "overrides": overrides,
            "interactive": False,
            "load_check": True,
        },
        kernel_name="python3",
        progress_bar=False,
        execution_timeout=600,
        cwd=str(root / "notebook"),
    )
    text = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
    assert (run.run_dir / "cache" / "datasets").is_dir()  # its Arrow cache in the run folder
    n_val = int((items["split"] == "validation").sum())
    assert f"{items.height} pictures from" in text
    assert f"{items.height - n_val} train, {n_val} validation" in text
    assert "WARNING: 1 kept frame(s) left out" in text
    assert "DatasetDict" in text and f"num_rows: {n_val}" in text
    shown = pictures(nb)
    assert len(shown) == 2  # pictures per character and split, the contact sheet
    tables = [o for c in nb.cells for o in c.get("outputs", []) if "text/html" in o.get("data", {})]
    assert len(tables) >= 2  # repeats, captions
    assert run.read_manifest("export")["finished"] == finished  # skipped: up to date
    nbformat.validate(nb)


def test_resized_averages_when_shrinking_and_keeps_the_size_asked():
    # Stripes one pixel wide: shrinking by 2 must average them (grey), not pick every other
    # stripe (aliasing would give all black or all white).
    stripes = np.zeros((8, 8, 3), np.uint8)
    stripes[:, ::2] = 255
    small = resized(stripes, (4, 4))
    assert small.shape == (4, 4, 3) and np.all(np.abs(small.astype(int) - 128) <= 1)
    assert resized(stripes, (16, 12)).shape == (12, 16, 3)
    assert resized(stripes, (8, 8)) is stripes


def test_crop_box_pads_past_the_edge_with_black_as_pillow_does():
    rgb = np.random.default_rng(0).integers(1, 255, (20, 30, 3), dtype=np.uint8)
    picture = Image.fromarray(rgb)
    for box in [(2, 3, 12, 15), (-5, -4, 10, 8), (20, 10, 40, 25), (-3, -3, 33, 23), (31, 21, 40, 30)]:
        assert np.array_equal(crop_box(rgb, box), np.asarray(picture.crop(box))), box


def test_kohya_folder_names_stay_within_the_file_systems_limit(tmp_path):
    """A concept of several long character names joined by ``+`` made a kohya folder name past
    255 bytes (ENAMETOOLONG at export); names are bounded, readable and one per concept."""
    from diffusion_bunny.pipeline.run import NAME_BYTES
    from diffusion_bunny.stages.export.plan import kohya_folder

    assert kohya_folder(3, "alice+bob") == "3_alice+bob"
    names = ["Dona Maria Carmen de la Concepción Fernández y Gutiérrez"] * 3 + ["Ōkami Amaterasu 天照大神"]
    long_concepts = ["+".join(names), "+".join(reversed(names)), "+".join(names[:3]) + "+x" * 40]
    folders = [kohya_folder(10, c) for c in long_concepts]
    assert len(set(folders)) == 3
    for folder, concept in zip(folders, long_concepts, strict=True):
        assert len(folder.encode()) <= NAME_BYTES and folder.startswith("10_") and "~" in folder
        (tmp_path / folder).mkdir()  # the file system takes it
        assert kohya_folder(10, concept) == folder  # the same concept, the same folder
    table = concept_table(pl.DataFrame({"split": ["train"], "concept": [long_concepts[0]], "repeats": [10]}))
    assert table["kohya_folder"].to_list() == [folders[0]]
    # Names Windows refuses (a dataset copied there for kohya_ss): "Tom & <Jerry>" from a folder
    # (a short hash of the name after: "Dr. Who." and "Dr. Who_" were one folder, and the
    # export failed on the second)
    assert kohya_folder(2, "Tom & <Jerry>").startswith("2_Tom & _Jerry_~")
    assert kohya_folder(2, 'Who? "Mr. T."').startswith("2_Who_ _Mr. T._~")
    assert kohya_folder(2, "Mr. T.").startswith("2_Mr. T_~") and kohya_folder(1, "a:b|c\\d*").startswith(
        "1_a_b_c_d_~"
    )
    assert kohya_folder(1, "Dr. Who.") != kohya_folder(1, "Dr. Who_") == "1_Dr. Who_"


def test_crop_settings_that_leave_nothing_or_do_nothing_say_so():
    """A face crop kept at 206 px was written at export.max_side 64 for the trainer to enlarge 8
    times; half_body_face_heights under 2 was accepted and made no half-body crop at all."""
    cfg = ExportSettings(max_side=64, max_upscale=4, crop_resolution=512)
    assert crop_problem({"sharpness": None}, (0, 0, 206, 206), "face", cfg) == "upscaled"
    assert crop_problem({"sharpness": None}, (0, 0, 206, 206), "face", ExportSettings(max_upscale=4)) is None
    with pytest.raises(ConfigError, match=r"export\.half_body_face_heights"):
        load_config(None, {"export.half_body_face_heights": 1.9})


def test_a_half_body_crop_is_judged_as_its_face_crop_is():
    """The half-body crop was exempt from both checks: that of a 64 px face (192x256) went to
    the trainer to be enlarged 2.3 times, and that of a face out of focus went too."""
    cfg = ExportSettings(crop_resolution=512, max_upscale=2.0)
    sharp = {"sharpness": 150.0, "sharpness_floor": 100.0}
    assert crop_problem(sharp, (0, 0, 192, 256), "half_body", cfg) == "upscaled"
    assert crop_problem(sharp, (0, 0, 300, 400), "half_body", cfg) is None
    soft = {"sharpness": 1.0, "sharpness_floor": 100.0}
    assert crop_problem(soft, (0, 0, 300, 400), "half_body", cfg) == "blurry"


def test_crops_are_captioned_with_the_words_their_frames_were_captioned_with(export_copy):
    """A new trigger word run with ``--stages export`` only (stage 05 out of date): the frames'
    captions kept the old word and the crops' own captions took the new one, two trigger words in
    one dataset. The crops take the words stage 05 ran with."""
    import json

    run, overrides, _ = export_copy
    recorded = {"config": {"captioning": {"trigger_word": "bunnystyle", "character_descriptions": {}}}}
    run.manifest_path("captions").write_text(json.dumps(recorded))
    changed = load_config(None, {**overrides, "captions.trigger_word": "zzstyle"}, use_local=False)
    with pytest.warns(UserWarning):
        items = run_stage(run, "export", changed, progress=False, force=True)["dataset_items"]
    words = {text.split(",")[0] for text in items["text"].to_list()}
    assert "zzstyle" not in words and "bunnystyle" in words, words
    assert items.filter(pl.col("crop") != "full").height  # crops were told their own captions
