"""The rules of stage 06 (``export``): which pictures a LoRA dataset gets, how they are cropped,
split and balanced. Pure functions over the run's tables, so tests and notebook 06 can look at a
plan before any image is written.

* **Items.** Every frame stage 02 kept that has a usable caption (``caption`` set and ``status``
  ``ok`` or ``edited``: a failed caption would teach the model nothing) gives a ``full`` picture;
  every named face of such a frame can also give a ``face`` crop (a square centred on stage 03's
  box, with ``export.face_margin`` around it) and a ``half_body`` crop (``half_body_face_heights``
  face heights tall, ``half_body_aspect`` wide, half a face height of head room); every named
  drawn character a ``character`` crop (its box, framed as its references frame it, with
  ``character_margin`` around it, never longer than ``character_max_aspect``: a character is
  no face, and a square would cut a long one off; a small one with more of its scene around it,
  up to ``character_max_context`` times the side, so that the trainer need not enlarge it more
  than ``max_upscale`` times). Crops are clamped to the frame: shifted
  inside it first, shrunk only when the frame is too small. An item's ``characters`` are the
  named appearances whose box centre lies inside its crop.
* **Crops worth learning from.** A face or character crop the trainer would enlarge more than
  ``max_upscale`` times (to ``crop_resolution``) is left out, and so is one out of focus: its
  appearance's sharpness under ``min_sharpness_ratio`` of the median of the movie's named
  appearances of its kind (a blurred face far behind the subject, enlarged, teaches blur). What
  is left out, and why, is in the plan's ``dropped``.
* **Split.** Validation takes whole groups of shots: frames of one shot are near copies of each
  other, and a shot the movie cuts back to (same set-up: perceptual hashes within
  ``split_phash_distance`` bits) joins the same group, so near-identical pictures never sit on
  both sides. Groups are drawn in a seeded order until the validation share is reached, never
  taking a character's last training pictures.
* **Balance.** kohya repeats a folder ``<repeats>`` times per epoch. A concept (the characters of
  a picture, joined by ``+``) with fewer training pictures gets more repeats, so each contributes
  about as many steps as the largest one, capped by ``max_repeats``; pictures without a named
  character keep ``base_repeats`` (they teach the style, not a person).
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl

from diffusion_bunny.errors import StageError
from diffusion_bunny.pipeline.run import bounded_name
from diffusion_bunny.stages.captions.settings import CaptionsSettings
from diffusion_bunny.stages.captions.tables import (
    crop_template_caption,
    faces_are_people,
    usable_captions,
    without_false_sightings,
)
from diffusion_bunny.stages.export.settings import ExportSettings
from diffusion_bunny.stages.export.tables import CROPS, ITEM_SCHEMA
from diffusion_bunny.stages.extract.tables import frame_regions, region_of

Box = tuple[int, int, int, int]  # left, top, right, bottom (right and bottom exclusive)


@dataclass
class ExportPlan:
    """What the export will write: one row per picture, with split, repeats and file name."""

    items: pl.DataFrame
    counts: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    #: Face and character crops left out: frame_id, face_id, crop, reason (upscaled, blurry).
    dropped: list[dict[str, Any]] = field(default_factory=list)


def clamp_box(cx: float, cy: float, w: float, h: float, bounds: Box) -> Box:
    """A ``w`` x ``h`` box centred on (``cx``, ``cy``), shrunk (keeping its aspect) only if the
    picture is smaller, then shifted to lie inside ``bounds`` (left, top, right, bottom: the
    frame's picture box, so no crop ever reaches into letterbox bars or a subtitle band)."""
    x0, y0, x1, y1 = bounds
    width, height = x1 - x0, y1 - y0
    scale = min(1.0, width / w, height / h)
    w, h = max(1, round(w * scale)), max(1, round(h * scale))
    left = min(max(round(cx - w / 2), x0), x1 - w)
    top = min(max(round(cy - h / 2), y0), y1 - h)
    return left, top, left + w, top + h


def face_box(face: Box, bounds: Box, margin: float) -> Box | None:
    """A square around the face with ``margin`` x its size on every side, inside ``bounds``;
    None when the picture cannot hold the whole face in a square (a face larger than its short
    side)."""
    left, top, right, bottom = face
    size = max(right - left, bottom - top)
    if size > min(bounds[2] - bounds[0], bounds[3] - bounds[1]):
        return None
    side = size * (1 + 2 * margin)
    return clamp_box((left + right) / 2, (top + bottom) / 2, side, side, bounds)


def half_body_box(face: Box, bounds: Box, face_heights: float, aspect: float) -> Box | None:
    """A portrait box ``face_heights`` face heights tall and ``aspect`` x as wide, the face at the
    top (half a face height of head room), inside ``bounds``. Shrunk to fit, keeping the face at
    the top; None when it would then hold less than two face heights (it would be a face crop)."""
    left, top, right, bottom = face
    face_h = bottom - top
    h = face_h * face_heights
    w = h * aspect
    scale = min(1.0, (bounds[2] - bounds[0]) / w, (bounds[3] - bounds[1]) / h)
    if h * scale < 2 * face_h:
        return None
    h, w = h * scale, w * scale
    cy = top - 0.5 * face_h * scale + h / 2
    return clamp_box((left + right) / 2, cy, w, h, bounds)


def character_box(
    box: Box, bounds: Box, margin: float, max_aspect: float, min_side: float = 0.0, max_context: float = 1.0
) -> Box:
    """A drawn character's crop: its box with ``margin`` of its size on every side, its short
    side widened until it is at most ``max_aspect`` times shorter than the long one, inside
    ``bounds``.

    A crop whose side (the square root of its area) is under ``min_side`` takes in more of the
    frame around the character, keeping its shape, up to ``max_context`` times its side. Why: in
    drawn and animated films characters are often 80-250 px tall at 720p (a sprite, a creature
    seen whole), so their tight crop is one the trainer would enlarge 3-5 times, and left out
    as upscaled the character got no picture of its own; the same character with some of its
    scene around it is a sharp picture centred on it. Bounded, so that a character a few pixels
    high never passes for the subject of a picture that is mostly scenery."""
    left, top, right, bottom = box
    w = (right - left) * (1 + 2 * margin)
    h = (bottom - top) * (1 + 2 * margin)
    # Whole pixels, rounded up before the side is judged: rounded later (clamp_box), a crop just
    # over min_side could fall a pixel short of it and be left out as upscaled, unwidened.
    w, h = math.ceil(max(w, h / max_aspect)), math.ceil(max(h, w / max_aspect))
    side = float(np.sqrt(w * h))
    if side < min_side:
        grow = min(max_context, min_side / side)
        # Rounded up, so that a crop grown to min_side is not a pixel short of it.
        w, h = math.ceil(w * grow), math.ceil(h * grow)
    return clamp_box((left + right) / 2, (top + bottom) / 2, w, h, bounds)


def least_side(cfg: ExportSettings) -> float:
    """The least side (square root of the area) a crop needs for the trainer to enlarge it at
    most ``max_upscale`` times to ``crop_resolution`` (0 without that limit): what a character
    crop widens to (:func:`character_box`) and what :func:`crop_problem` calls ``upscaled``."""
    return cfg.crop_resolution / cfg.max_upscale if cfg.max_upscale is not None else 0.0


def _character_framing(cfg: ExportSettings) -> tuple[float, float, float, float]:
    """:func:`character_box`'s ``margin``, ``max_aspect``, ``min_side`` and ``max_context`` from
    the settings."""
    return cfg.character_margin, cfg.character_max_aspect, least_side(cfg), cfg.character_max_context


def crop_caption(caption: str, tag: str) -> str:
    """The frame's caption for a crop: ``tag`` (``close-up``, ``upper body``) added at the end,
    since the frame's caption describes the framing of the whole frame; not when one of its
    comma-separated parts is that tag already (a caption typed "..., close-up, dark stage" read
    "..., close-up, dark stage, close-up")."""
    if not tag:
        return caption
    parts = {part.strip(" .;").casefold() for part in caption.split(",")}
    if tag.strip().casefold() in parts:
        return caption
    return f"{caption.rstrip(' ,.;')}, {tag}"


def concept_of(characters: list[str], unnamed: str) -> str:
    """kohya concept of a picture: its characters joined by ``+`` (names cannot hold ``+``), or
    ``unnamed`` when it shows none."""
    return "+".join(sorted(characters)) if characters else unnamed


def _inside(face: Box, box: Box) -> bool:
    cx, cy = (face[0] + face[2]) / 2, (face[1] + face[3]) / 2
    return box[0] <= cx < box[2] and box[1] <= cy < box[3]


def _usable_frames(
    frames: pl.DataFrame, quality: pl.DataFrame, captions: pl.DataFrame
) -> tuple[int, pl.DataFrame]:
    """The kept frames with a usable caption (their rows of ``frames`` plus ``caption``) and how
    many frames were kept; one :class:`StageError` when there are none."""
    kept = quality.filter(pl.col("keep")).select("frame_id")
    if kept.is_empty():
        raise StageError(
            f"no frame to export: stage 02 kept none of the {quality.height} frames; loosen the "
            "quality.* thresholds (notebook 02) and rerun stage quality"
        )
    kept_caps = captions.join(kept, on="frame_id", how="semi")
    usable = usable_captions(kept_caps).select("frame_id", pl.col("caption").str.strip_chars())
    if usable.is_empty():
        failed = int((kept_caps["status"] == "failed").sum()) if kept_caps.height else 0
        raise StageError(
            f"no frame to export: none of the {kept.height} kept frames has a usable caption "
            f"({kept_caps.height} captioned, {failed} failed; usable = caption set and status ok or "
            "edited); check the captions.* settings and rerun stage captions (notebook 05)"
        )
    return kept.height, frames.join(usable, on="frame_id").sort("frame_index")


def _named_faces(faces: pl.DataFrame | None, floors: dict[str, float]) -> dict[str, list[dict[str, Any]]]:
    """Named appearances per frame (none without a ``faces`` table: stage 03 did not run), each
    with the sharpness floor of its kind (:func:`sharpness_floors`)."""
    by_frame: dict[str, list[dict[str, Any]]] = {}
    if faces is not None and faces.height:
        for face in faces.filter(pl.col("character").is_not_null()).sort("face_id").iter_rows(named=True):
            face["sharpness_floor"] = floors.get(face.get("kind") or "face")
            by_frame.setdefault(face["frame_id"], []).append(face)
    return by_frame


def _frame_items(
    frame: dict[str, Any],
    faces: list[dict[str, Any]],
    cfg: ExportSettings,
    counts: dict[str, int],
    dropped: list[dict[str, Any]],
) -> list[dict[str, Any]]:
    """The pictures one frame gives: the full picture (the frame's region: its picture box, or
    stage 02's crop), a face and a half-body crop per named face that is large enough and has
    room around it inside that region, and a character crop per named drawn character
    (``counts`` and ``dropped`` record what was left out)."""
    bounds = region_of(frame) or (0, 0, frame["width"], frame["height"])
    boxes = [(f, (f["left"], f["top"], f["right"], f["bottom"])) for f in faces]
    base = {k: frame[k] for k in ("frame_id", "frame_index", "shot_id", "path")}

    def item(crop: str, box: Box, face_id: str | None, text: str) -> dict[str, Any]:
        chars = sorted({f["character"] for f, fb in boxes if _inside(fb, box)})
        left, top, right, bottom = box
        return {
            **base,
            "face_id": face_id,
            "crop": crop,
            "characters": chars,
            "concept": concept_of(chars, cfg.unnamed_concept),
            "text": text,
            "left": left,
            "top": top,
            "right": right,
            "bottom": bottom,
        }

    out = []
    if "full" in cfg.crops:
        if boxes or cfg.include_unnamed:
            out.append(item("full", bounds, None, frame["caption"]))
        else:
            counts["unnamed_frames_dropped"] += 1
    for face, fb in boxes:
        kind = face.get("kind") or "face"
        if kind == "face":
            if not any(c in cfg.crops for c in ("face", "half_body")):
                continue
            if fb[3] - fb[1] < cfg.min_face_px:
                counts["small_faces"] += 1
                continue
            wanted = [c for c in ("face", "half_body") if c in cfg.crops]
        else:
            wanted = ["character"] if "character" in cfg.crops else []
        for crop in wanted:
            if crop == "face":
                box, tag = face_box(fb, bounds, cfg.face_margin), cfg.face_tag
            elif crop == "half_body":
                box = half_body_box(fb, bounds, cfg.half_body_face_heights, cfg.half_body_aspect)
                tag = cfg.half_body_tag
            else:
                box = character_box(fb, bounds, *_character_framing(cfg))
                tag = cfg.character_tag
            if box is None:
                counts["no_room"] += 1
                continue
            reason = crop_problem(face, box, crop, cfg)
            if reason is not None:
                counts[f"{reason}_crops"] += 1
                dropped.append(
                    {"frame_id": face["frame_id"], "face_id": face["face_id"], "crop": crop, "reason": reason}
                )
                continue
            out.append(item(crop, box, face["face_id"], crop_caption(frame["caption"], tag)))
    return out


def crop_problem(face: dict[str, Any], box: Box, crop: str, cfg: ExportSettings) -> str | None:
    """Why a face, half-body or character crop is not worth learning from (``upscaled`` or
    ``blurry``), or None. ``face["sharpness_floor"]`` is the least sharpness its kind allows in
    this movie; a half-body crop is judged by its face's (it was exempt, and the half-body crop
    of a 64 px face, 192x256, went to the trainer to be enlarged 2.3 times, and that of a face
    out of focus went too)."""
    w, h = max(1, box[2] - box[0]), max(1, box[3] - box[1])
    # As written: export.max_side shrinks a crop after this check, and one kept at 206 px was
    # written at 64 for the trainer to enlarge 8 times.
    side = float(np.sqrt(w * h)) * min(1.0, cfg.max_side / max(w, h))
    if side < least_side(cfg):
        return "upscaled"
    floor = face.get("sharpness_floor")
    if floor is not None and face.get("sharpness") is not None and face["sharpness"] < floor:
        return "blurry"
    return None


def sharpness_floors(faces: pl.DataFrame | None, ratio: float) -> dict[str, float]:
    """Per kind of appearance, the least sharpness a crop may have: ``ratio`` of the median of the
    movie's named appearances of that kind (sharpness depends on what is drawn or filmed, so it
    is judged against the movie's own appearances, not an absolute number)."""
    if faces is None or faces.height == 0 or "sharpness" not in faces.columns or ratio <= 0:
        return {}
    named = faces.filter(pl.col("character").is_not_null())
    if "kind" not in named.columns:
        named = named.with_columns(pl.lit("face").alias("kind"))
    return {
        kind: ratio * float(median)
        for kind, median in named.group_by("kind").agg(pl.col("sharpness").median()).iter_rows()
        if median is not None
    }


def select_items(
    frames: pl.DataFrame,
    quality: pl.DataFrame,
    faces: pl.DataFrame | None,
    captions: pl.DataFrame,
    cfg: ExportSettings,
    captioning: CaptionsSettings | None = None,
) -> tuple[pl.DataFrame, dict[str, Any], list[dict[str, Any]]]:
    """The pictures to export (``ITEM_SCHEMA``), counts of what was left out and why, and the
    face and character crops left out (:func:`crop_problem`). With ``captioning`` (stage 05's
    settings), a crop of a frame the template captioned gets a template caption of its own
    (:func:`retell_crops`).

    Raises one :class:`StageError` when nothing can be exported (no kept frame, no usable caption,
    or settings that leave no picture), before anything is written.
    """
    n_kept, rows = _usable_frames(frames, quality, captions)
    rows = rows.join(frame_regions(frames, quality), on="frame_id", how="left")
    by_frame = _named_faces(faces, sharpness_floors(faces, cfg.min_sharpness_ratio))
    counts = {
        "kept_frames": n_kept,
        "captioned_frames": rows.height,
        "small_faces": 0,
        "no_room": 0,
        "upscaled_crops": 0,
        "blurry_crops": 0,
        "uncaptioned_frames": n_kept - rows.height,
        "unnamed_frames_dropped": 0,
    }
    dropped: list[dict[str, Any]] = []
    items = [
        item
        for frame in rows.iter_rows(named=True)
        for item in _frame_items(frame, by_frame.get(frame["frame_id"], []), cfg, counts, dropped)
    ]
    if not items:
        raise StageError(
            f"no picture to export from the {rows.height} captioned frames with export.crops = "
            f"{list(cfg.crops)}: {_why_none(counts, cfg)}"
        )
    items_table = pl.DataFrame(items, schema=ITEM_SCHEMA)
    return retell_crops(items_table, captions, faces, cfg, captioning), counts, dropped


def _why_none(counts: dict[str, int], cfg: ExportSettings) -> str:
    """Why the crops gave no picture, and what to change: named faces 103 px tall, all left out as
    enlarged too much, were reported as "no named face of at least min_face_px", with advice to
    set include_unnamed, which was set."""
    crops_left = []
    if counts["upscaled_crops"]:
        crops_left.append(
            f"{counts['upscaled_crops']} crop(s) left out as enlarged more than export.max_upscale "
            f"({cfg.max_upscale:g}) times to export.crop_resolution ({cfg.crop_resolution})"
        )
    if counts["blurry_crops"]:
        crops_left.append(f"{counts['blurry_crops']} out of focus (export.min_sharpness_ratio)")
    if crops_left:
        return "; ".join(crops_left) + (
            "; raise export.max_upscale, lower export.crop_resolution or add full to export.crops"
        )
    # Only what the crops asked for: a film of people with export.crops [character] read "no
    # named face of at least 64 px" beside named faces of 110 px.
    missing = []
    if {"face", "half_body"} & set(cfg.crops):
        missing.append(f"no named face of at least export.min_face_px ({cfg.min_face_px}) px")
    if "character" in cfg.crops:
        missing.append("no named drawn character (a character crop frames one)")
    unnamed = "" if cfg.include_unnamed else ", set export.include_unnamed: true"
    return (
        " and ".join(missing)
        + ("" if cfg.include_unnamed else " (export.include_unnamed is false)")
        + f"; add full to export.crops{unnamed} or name characters (notebook 03)"
    )


def retell_crops(
    items: pl.DataFrame,
    captions: pl.DataFrame,
    faces: pl.DataFrame | None,
    cfg: ExportSettings,
    captioning: CaptionsSettings | None,
) -> pl.DataFrame:
    """``items`` with each crop of a template-captioned frame (``provider`` template, ``status``
    ok) captioned for what it shows: the characters inside it, the people no one named whose
    face is inside it (in a film of people: :func:`faces_are_people`; not one a person fixed to
    none, :func:`without_false_sightings`), and the crop's tag as its framing
    (:func:`~diffusion_bunny.stages.captions.tables.crop_template_caption`). A caption a person
    edited, or one a model wrote, stays the frame's with the tag added (:func:`crop_caption`):
    free text cannot be taken apart safely."""
    if captioning is None or not {"tags", "provider"} <= set(captions.columns):
        return items
    template = captions.filter((pl.col("provider") == "template") & (pl.col("status") == "ok"))
    tags = dict(zip(template["frame_id"].to_list(), template["tags"].to_list(), strict=True))
    framing = {"face": cfg.face_tag, "half_body": cfg.half_body_tag, "character": cfg.character_tag}
    strangers: dict[str, list[Box]] = {}
    if faces is not None and faces.height and faces_are_people(faces):
        unnamed = without_false_sightings(faces).filter(pl.col("character").is_null())
        if "kind" in unnamed.columns:
            unnamed = unnamed.filter(pl.col("kind").fill_null("face") == "face")
        for fid, *box in unnamed.select("frame_id", "left", "top", "right", "bottom").iter_rows():
            strangers.setdefault(fid, []).append(tuple(box))
    texts = []
    for fid, crop, chars, text, *box in items.select(
        "frame_id", "crop", "characters", "text", "left", "top", "right", "bottom"
    ).iter_rows():
        if crop == "full" or fid not in tags:
            texts.append(text)
            continue
        others = sum(_inside(face, tuple(box)) for face in strangers.get(fid, ()))
        texts.append(crop_template_caption(tags[fid], chars, framing[crop], captioning, others))
    return items.with_columns(pl.Series("text", texts, dtype=pl.String))


def shot_groups(items: pl.DataFrame, quality: pl.DataFrame, distance: int | None) -> dict[int, int]:
    """Shot id -> group id (the group's smallest shot id). Shots are grouped when two of their
    frames have perceptual hashes within ``distance`` bits (None: every shot alone)."""
    shots = sorted(set(items["shot_id"].to_list()))
    parent = {s: s for s in shots}

    def find(s: int) -> int:
        while parent[s] != s:
            parent[s] = parent[parent[s]]
            s = parent[s]
        return s

    if distance is not None and "phash" in quality.columns:
        frames = (
            items.select("frame_id", "shot_id")
            .unique("frame_id")
            .join(quality.select("frame_id", "phash"), on="frame_id")
            .filter(pl.col("phash").is_not_null())
            .sort("frame_id")
        )
        hashes = frames["phash"].cast(pl.UInt64).to_numpy()
        shot_of = frames["shot_id"].to_numpy()
        for start in range(0, len(hashes), 1024):  # blocked: memory stays small for long movies
            block = hashes[start : start + 1024, None] ^ hashes[None, :]
            near = np.argwhere(np.bitwise_count(block) <= distance)
            for i, j in near:
                a, b = find(int(shot_of[start + i])), find(int(shot_of[j]))
                if a != b:
                    parent[max(a, b)] = min(a, b)
    return {s: find(s) for s in shots}


def assign_split(
    items: pl.DataFrame, groups: dict[int, int], fraction: float, seed: int
) -> tuple[pl.DataFrame, list[str]]:
    """Add ``split`` (``train``/``validation``): whole groups drawn in a seeded order (those
    showing a named character first) until the validation share reaches ``fraction`` of the
    pictures. A group goes to validation only if it brings the share closer to the target (when
    every group overshoots, the smallest one that holds at most half the pictures), and never
    when it holds a character's last training pictures or all of them."""
    items = items.with_columns(
        pl.col("shot_id").replace_strict(groups, return_dtype=pl.Int64).alias("split_group")
    )
    warnings: list[str] = []
    n = items.height
    group_ids = sorted(set(groups.values()))
    validation: set[int] = set()
    if fraction > 0:
        target = max(1, round(fraction * n))
        sizes = dict(items.group_by("split_group").len().iter_rows())
        per_char = (
            items.select("split_group", "characters")
            .explode("characters")
            .drop_nulls("characters")
            .group_by("characters", "split_group")
            .len()
        )
        totals = per_char.group_by("characters").agg(pl.col("len").sum())
        train_left = {c: int(k) for c, k in totals.iter_rows()}
        chars_in: dict[int, dict[str, int]] = {}
        for char, group, k in per_char.iter_rows():
            chars_in.setdefault(group, {})[char] = k
        taken = 0

        def eligible(group: int) -> bool:
            # Train keeps at least one picture, and every character at least one training picture.
            return taken + sizes[group] < n and all(
                train_left[c] - k > 0 for c, k in chars_in.get(group, {}).items()
            )

        def take(group: int) -> None:
            nonlocal taken
            validation.add(group)
            taken += sizes[group]
            for c, k in chars_in.get(group, {}).items():
                train_left[c] -= k

        order = [group_ids[int(i)] for i in np.random.default_rng(seed).permutation(len(group_ids))]
        # Groups that show a named character first: validation should measure the characters.
        order.sort(key=lambda g: g not in chars_in)
        for group in order:
            if taken >= target:
                break
            if abs(taken + sizes[group] - target) < abs(taken - target) and eligible(group):
                take(group)
        if not validation:  # every group overshoots: the smallest one, if it is under half the set
            fallback = sorted((g for g in order if eligible(g)), key=lambda g: sizes[g])
            if fallback and sizes[fallback[0]] < n / 2:
                take(fallback[0])
        if not validation:
            warnings.append(
                f"no validation pictures: the {len(group_ids)} group(s) of shots cannot be split without "
                "taking all of the pictures (or all of a character's); export.validation_fraction "
                f"= {fraction} asks for {target}"
            )
    split = pl.when(pl.col("split_group").is_in(sorted(validation))).then(pl.lit("validation"))
    return items.with_columns(split.otherwise(pl.lit("train")).alias("split")), warnings


def balance_repeats(items: pl.DataFrame, cfg: ExportSettings) -> pl.DataFrame:
    """Add ``repeats``: per concept over the training pictures, ``base_repeats`` x (pictures of the
    largest named concept / pictures of this one), rounded, within [base_repeats, max_repeats].
    Pictures without a named character and validation pictures get ``base_repeats`` / 1."""
    train = items.filter(pl.col("split") == "train")
    sizes = dict(train.filter(pl.col("characters").list.len() > 0).group_by("concept").len().iter_rows())
    largest = max(sizes.values(), default=0)
    repeats: dict[str, int] = {}
    for concept, size in sizes.items():
        ratio = largest / size if cfg.balance else 1.0
        repeats[concept] = int(min(cfg.max_repeats, max(cfg.base_repeats, round(cfg.base_repeats * ratio))))
    column = (
        pl.when(pl.col("split") == "validation")
        .then(pl.lit(1))
        .otherwise(pl.col("concept").replace_strict(repeats, default=cfg.base_repeats, return_dtype=pl.Int64))
    )
    return items.with_columns(column.cast(pl.Int64).alias("repeats"))


def file_names(items: pl.DataFrame, image_format: str) -> pl.DataFrame:
    """Add ``file_name``: ``<frame_id>.<ext>`` for a whole frame, ``<face_id>_<crop>.<ext>`` for
    a crop (face ids are ``<frame_id>_NN``, so names sort by frame and never collide)."""
    name = (
        pl.when(pl.col("crop") == "full")
        .then(pl.col("frame_id"))
        .otherwise(pl.col("face_id") + "_" + pl.col("crop"))
    )
    return items.with_columns((name + f".{image_format}").alias("file_name"))


def kohya_folder(repeats: int, concept: str) -> str:
    """kohya's ``<repeats>_<concept>`` folder name (sd-scripts reads the number before the first
    ``_`` as the repeats; the rest only names the folder, since every picture has its .txt),
    bounded in length: a concept of many long names joined by ``+`` would pass the file system's
    limit (:func:`~diffusion_bunny.pipeline.run.bounded_name`), and portable: a character folder
    named on Linux may hold characters Windows refuses in a name (``Tom & <Jerry>``, ``Who?``),
    and a dataset is often copied to a Windows machine for kohya_ss, where such a folder cannot be
    made. They, and a trailing dot or space, become ``_``."""
    portable = _NOT_PORTABLE.sub("_", concept)
    portable = portable.rstrip(" .") + "_" * (len(portable) - len(portable.rstrip(" .")))
    if portable != concept:  # "Dr. Who." and "Dr. Who_" were one folder, and the export failed
        portable += "~" + hashlib.sha1(concept.encode()).hexdigest()[:6]
    return bounded_name(f"{repeats}_{portable}")


#: Characters Windows refuses in a file name (and control characters).
_NOT_PORTABLE = re.compile(r'[<>:"/\\|?*\x00-\x1f]')


def output_size(box: Box, max_side: int) -> tuple[int, int]:
    """Width and height of a crop once shrunk to ``max_side`` (never enlarged)."""
    w, h = box[2] - box[0], box[3] - box[1]
    scale = min(1.0, max_side / max(w, h))
    return max(1, round(w * scale)), max(1, round(h * scale))


def plan_export(
    frames: pl.DataFrame,
    quality: pl.DataFrame,
    faces: pl.DataFrame | None,
    captions: pl.DataFrame,
    cfg: ExportSettings,
    captioning: CaptionsSettings | None = None,
) -> ExportPlan:
    """Everything the export decides, before writing: items with ``split``, ``repeats``,
    ``file_name``, ``width`` and ``height`` (of the written picture), in frame order."""
    names = set(faces["character"].drop_nulls().to_list()) if faces is not None and faces.height else set()
    cfg, clashes = _name_clashes(names, cfg, captioning)
    items, counts, dropped = select_items(frames, quality, faces, captions, cfg, captioning)
    groups = shot_groups(items, quality, cfg.split_phash_distance)
    items, warnings = assign_split(items, groups, cfg.validation_fraction, cfg.seed)
    warnings = clashes + warnings
    items = file_names(balance_repeats(items, cfg), cfg.image_format)
    sizes = [output_size(b, cfg.max_side) for b in items.select("left", "top", "right", "bottom").iter_rows()]
    items = items.with_columns(
        pl.Series("width", [s[0] for s in sizes], dtype=pl.Int64),
        pl.Series("height", [s[1] for s in sizes], dtype=pl.Int64),
    ).sort("frame_index", "crop", "file_name")
    if counts["uncaptioned_frames"]:
        warnings.append(
            f"{counts['uncaptioned_frames']} kept frame(s) left out: no usable caption (failed or missing); "
            "fix them in notebook 05 or rerun stage captions"
        )
    warnings += _typed_names_not_found(items, captions, names)
    n_val = int((items["split"] == "validation").sum())
    counts.update(
        {
            "items": items.height,
            "train": items.height - n_val,
            "validation": n_val,
            "split_groups": len(set(groups.values())),
            "shots": len(groups),
            **{f"crop_{c}": int((items["crop"] == c).sum()) for c in CROPS},
        }
    )
    return ExportPlan(items=items, counts=counts, warnings=warnings, dropped=dropped)


def _typed_names_not_found(items: pl.DataFrame, captions: pl.DataFrame, names: set[str]) -> list[str]:
    """One line for the pictures whose caption a person typed (notebook 05) names a character
    that stage 03 does not find in them: a sighting fixed away or lost to a rerun after the
    caption was written, or one stage 03 missed. Either way the caption and the character folders
    now disagree, and the edit is never overwritten, so nothing else would say it."""
    edited = set(captions.filter(pl.col("status") == "edited")["frame_id"].to_list())
    if not edited or not names:
        return []
    spelt = {
        name: re.compile(rf"(?<!\w){re.escape(name).replace('_', '[_ ]')}(?!\w)", re.I) for name in names
    }
    found: dict[str, list[str]] = {}
    for frame_id, characters, text in (
        items.filter(pl.col("frame_id").is_in(list(edited)) & (pl.col("crop") == "full"))
        .select("frame_id", "characters", "text")
        .iter_rows()
    ):
        typed = [name for name, pattern in spelt.items() if name not in characters and pattern.search(text)]
        if typed:
            found[frame_id] = sorted(typed)
    if not found:
        return []
    shown = "; ".join(f"{f} ({', '.join(n)})" for f, n in list(found.items())[:5])
    more = f" and {len(found) - 5} more" if len(found) > 5 else ""
    return [
        f"{len(found)} frame(s) whose caption, typed by hand, names a character stage 03 does not find "
        f"in them: {shown}{more}; fix the caption (notebook 05) or the sighting (notebook 03)"
    ]


def _name_clashes(
    names: set[str], cfg: ExportSettings, captioning: CaptionsSettings | None
) -> tuple[ExportSettings, list[str]]:
    """The export's settings and a line per character named as a word the dataset gives
    something else. A character named ``export.unnamed_concept`` (``scene``) shared one kohya
    folder with the pictures of nobody named, which then took its repeats: they get a concept of
    their own. A character named ``captions.trigger_word`` opens its captions with that word
    twice and is taught as the style: said, not changed (the captions are stage 05's)."""
    lines = []
    taken = {n.casefold(): n for n in sorted(names)}  # one folder on a disk that ignores case
    clash = taken.get(cfg.unnamed_concept.casefold())
    if clash is not None and cfg.include_unnamed:
        concept = cfg.unnamed_concept
        while concept.casefold() in taken:
            concept += "_unnamed"
        lines.append(
            f"a character is named {clash!r}, as export.unnamed_concept names the pictures "
            f"of nobody named: those are in the concept {concept!r}; set export.unnamed_concept to "
            "another word to choose it"
        )
        cfg = cfg.model_copy(update={"unnamed_concept": concept})
    word = captioning.trigger_word if captioning is not None else None
    if word and word.casefold() in taken:
        lines.append(
            f"a character is named {taken[word.casefold()]!r}, the trigger word (captions.trigger_word) "
            "every caption opens with: the LoRA cannot tell that character from the style; rename its "
            "reference folder, or set captions.trigger_word to another word and rerun stage captions"
        )
    return cfg, lines


def concept_table(items: pl.DataFrame) -> pl.DataFrame:
    """Per kohya concept: training pictures, repeats, steps per epoch (pictures x repeats) and the
    folder name, largest first (notebook 06's repeats table)."""
    train = items.filter(pl.col("split") == "train")
    return (
        train.group_by("concept")
        .agg(pl.len().alias("pictures"), pl.col("repeats").first())
        .with_columns(
            (pl.col("pictures") * pl.col("repeats")).alias("steps_per_epoch"),
            pl.struct("repeats", "concept")
            .map_elements(lambda r: kohya_folder(r["repeats"], r["concept"]), return_dtype=pl.Utf8)
            .alias("kohya_folder"),
        )
        .sort(["pictures", "concept"], descending=[True, False])
    )
