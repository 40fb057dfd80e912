"""Stage 05's tables: what each frame shows (facts), the offline template caption, and edits.

The facts of a frame (who is in it, how close the camera is, whether the shot moves, which scene
cluster it belongs to, how light it is) come from the tables of stages 01-04 and feed both the
``template`` provider and the prompt of the LLM providers (the known characters). They are pure
functions over tables, so notebook 05 can show them and a test can check them without a provider.

A person's edit of a caption is an append-only row in ``caption_edits`` (like stage 04's
``feedback``): the stage re-applies the latest edit of each frame after every run, so a rerun,
even with another provider, never overwrites what a person wrote.
"""

from __future__ import annotations

import polars as pl

from diffusion_bunny.stages.captions.settings import CaptionsSettings
from diffusion_bunny.stages.extract.tables import REGION_COLUMNS, frame_regions

FACT_SCHEMA: dict[str, pl.DataType] = {
    "frame_id": pl.String,
    "path": pl.String,
    "characters": pl.List(pl.String),
    "unknown_faces": pl.Int64,
    # Whether finding nobody in the frame says nobody is there (:func:`nobody_is_known`): the
    # template says "no people" only then, and otherwise nothing about who is in the frame.
    "nobody_known": pl.Boolean,
    "framing": pl.String,
    "motion": pl.String,
    "scene": pl.String,
    "light": pl.String,
    # The part of the frame a caption describes (its picture box, or stage 02's crop): what a
    # paid model is shown, in saved-frame pixels.
    "crop_left": pl.Int64,
    "crop_top": pl.Int64,
    "crop_right": pl.Int64,
    "crop_bottom": pl.Int64,
}


#: The template's words for how a shot moves and how it is lit (its tags name them too).
MOTION_TAGS = ("moving shot", "static shot")
LIGHT_TAGS = ("dark", "bright")
#: How many of its heads tall a drawn character's box is taken to be, where no face frames the
#: picture: its figure's height over the picture's, divided by this, is judged as a face's is
#: (:func:`framing_of`). Cartoon and anime characters are drawn 2-6 heads tall, people about 7;
#: at 6 only a figure filling 72% of the picture or more (most often one cut by the frame's
#: edge, from the waist up) is a medium shot, and a whole figure standing in its scene stays a
#: wide shot, as a person's whole figure is judged by its face (the demo's girl, two thirds of
#: the picture, would have been a medium shot at 4 heads). A figure never makes a close-up: a
#: box cut by the frame's edge does not say how much of it is head.
FIGURE_HEADS = 6.0


def framing_of(face_ratio: float | None, cfg: CaptionsSettings) -> str:
    """``close-up``, ``medium shot`` or ``wide shot`` from the largest face's height over the
    frame's height (no face: wide): a cheap, explainable proxy for the camera distance."""
    if face_ratio is None or face_ratio < cfg.medium_ratio:
        return "wide shot"
    if face_ratio >= cfg.close_up_ratio:
        return "close-up"
    return "medium shot"


def light_of(brightness: float | None, cfg: CaptionsSettings) -> str:
    """``dark``, ``bright`` or ``""`` (ordinary light) from stage 02's mean brightness."""
    if brightness is None:
        return ""
    if brightness < cfg.dark_below:
        return LIGHT_TAGS[0]
    if brightness > cfg.bright_above:
        return LIGHT_TAGS[1]
    return ""


def nobody_is_known(faces: pl.DataFrame | None, face_frames: pl.DataFrame | None) -> set[str]:
    """The frames where stage 03 finding nobody means nobody is there: the frames it searched,
    in a film where its face detector found people and nothing else.

    Why: "no people" in a training caption teaches the LoRA that what the picture shows is not a
    character. A face detector that found people in a film misses few of them (recall 0.93 on
    the face truth set), so its silence on a frame is evidence. The drawn characters' detector
    misses most sightings of a creature or an animal (docs/characters.md), and a face detector
    sees no drawn character at all: in a film with drawn characters, or with no face anywhere
    (a cartoon searched without pictures), or on a frame stage 03 did not search, finding nobody
    says nothing, and the caption says nothing about who is there either.
    """
    if faces is None or face_frames is None or not faces.height or _has_drawn(faces):
        return set()  # any drawn character: stricter than faces_are_people
    return set(face_frames.filter(pl.col("status") == "ok")["frame_id"].to_list())


def _has_drawn(faces: pl.DataFrame) -> bool:
    """Whether stage 03 found any appearance that is not a human face (a drawn character)."""
    return "kind" in faces.columns and bool((faces["kind"].fill_null("face") != "face").any())


def without_false_sightings(faces: pl.DataFrame | None) -> pl.DataFrame | None:
    """``faces`` less the appearances a person fixed to none of the characters in notebook 03
    (``edited``, no name: a false sighting, docs/characters.md).

    Why: such a row keeps its box (the fix is held by it, and the fixer's strip shows it to be
    fixed again), and read as an unnamed face it was a person: frame 235 of the Hamilton clip
    still read "4 people, close-up" after two of its faces were fixed to none, and a named face
    fixed to none turned "lin_manuel_miranda" into "a person". Captions, stage 06's crop
    captions, stage 04's character level and the report count people with this rule."""
    if faces is None or "edited" not in faces.columns:
        return faces
    return faces.filter(~(pl.col("character").is_null() & pl.col("edited").fill_null(False)))


def faces_are_people(faces: pl.DataFrame | None) -> bool:
    """Whether an unnamed face stage 03 found is a person to count in a caption ("and 1 other
    person"): in a film of people, yes. In a film with drawn characters the face detector fires
    on what is drawn with a face: a drawn character the drawn detector missed (a painted knight
    whose box held only his breastplate), a skull on a warlord's pole. Counted, they read "a
    person" and "orc_ruler and 1 other person" in Wesnoth's captions, none of them a person. So
    they are counted in a film of faces only, or where a face was named as a person (from a
    photo, not low confidence: a film of people and drawn characters, as the demo's); elsewhere
    they are left unsaid, as a frame where nobody was found is (:func:`nobody_is_known`)."""
    if faces is None or not _has_drawn(faces):
        return True
    named = faces.filter((pl.col("kind").fill_null("face") == "face") & pl.col("character").is_not_null())
    if "low_confidence" in named.columns:
        named = named.filter(~pl.col("low_confidence").fill_null(False))
    return not named.is_empty()


def _people_and_framing(
    group: pl.DataFrame, height: int, people_film: bool, cfg: CaptionsSettings
) -> tuple[int, str]:
    """One frame's appearances (``group``): how many unnamed people to count, and its framing.

    The framing is judged by the tallest face that is someone: a named face, or an unnamed one
    where unnamed faces are people (``people_film``, :func:`faces_are_people`); in a film of
    drawn characters an unnamed face is as likely a skull on a pole as a person, and read "close-
    up" for the warlord holding it. A drawn character's box frames its whole figure, so where no
    such face is found the tallest named figure is judged as :data:`FIGURE_HEADS` heads (a
    character filling the frame read "wide shot" before). ``height``: the picture's height; the
    false sightings are out of ``group`` already (:func:`without_false_sightings`)."""
    is_face = pl.col("kind").fill_null("face") == "face" if "kind" in group.columns else pl.lit(True)
    faces = group.filter(is_face)
    counted = faces if people_film else faces.filter(pl.col("character").is_not_null())
    unknown = int(counted["character"].is_null().sum())
    face_h = (counted["bottom"] - counted["top"]).max()
    if face_h is not None and height:
        return unknown, framing_of(float(face_h) / height, cfg)
    figures = group.filter(~is_face & pl.col("character").is_not_null())
    figure_h = (figures["bottom"] - figures["top"]).max()
    ratio = float(figure_h) / height / FIGURE_HEADS if figure_h is not None and height else None
    return unknown, framing_of(ratio, cfg)


def caption_facts(
    frames: pl.DataFrame,
    cfg: CaptionsSettings,
    *,
    quality: pl.DataFrame | None = None,
    faces: pl.DataFrame | None = None,
    face_frames: pl.DataFrame | None = None,
    shots: pl.DataFrame | None = None,
    clusters: pl.DataFrame | None = None,
) -> pl.DataFrame:
    """One row per frame to caption (``captions.frames``: the kept ones, or all) with what the
    earlier stages know about it. Tables that are absent leave their facts empty; without
    ``face_frames`` (the frames stage 03 searched) no frame's lack of anyone is known."""
    table = frames.select("frame_id", "path", "shot_id", "height").join(
        frame_regions(frames, quality), on="frame_id", how="left"
    )
    if quality is not None:
        q = quality.select("frame_id", "keep", "brightness")
        table = table.join(q, on="frame_id", how="left")
        if cfg.frames == "kept":
            table = table.filter(pl.col("keep").fill_null(False))
    else:
        table = table.with_columns(pl.lit(None, pl.Float64).alias("brightness"))
    table = table.sort("frame_id")

    per_frame: dict[str, tuple[list[str], int, float | None]] = {}
    people_film = faces_are_people(faces)
    # Whether the film's faces are people, and whether finding nobody says nobody is there, are
    # facts about the detectors; who is in a frame leaves out what a person fixed to none.
    known = nobody_is_known(faces, face_frames)
    faces = without_false_sightings(faces)
    if faces is not None and faces.height:
        # Framing is judged against the picture's height, not the frame's: letterbox bars would
        # make every close-up look like a medium shot.
        picture_h = (pl.col("crop_bottom") - pl.col("crop_top")).fill_null(pl.col("height"))
        heights = dict(table.select("frame_id", picture_h).iter_rows())
        for fid, group in faces.filter(pl.col("frame_id").is_in(table["frame_id"].implode())).group_by(
            "frame_id"
        ):
            names = sorted({c for c in group["character"].to_list() if c})
            per_frame[fid[0]] = (
                names,
                *_people_and_framing(group, heights.get(fid[0]) or 0, people_film, cfg),
            )

    motion: dict[int, str] = {}
    if shots is not None:
        motion = {
            int(s): MOTION_TAGS[0] if k == "dynamic" else MOTION_TAGS[1]
            for s, k in zip(shots["shot_id"].to_list(), shots["kind"].to_list(), strict=True)
        }
    scene: dict[str, str] = {}
    if clusters is not None and clusters.height:
        level = clusters.filter(pl.col("level") == "scene")
        scene = dict(zip(level["frame_id"].to_list(), level["cluster_id"].to_list(), strict=True))

    rows = []
    for rec in table.iter_rows(named=True):
        names, unknown, framing = per_frame.get(rec["frame_id"], ([], 0, framing_of(None, cfg)))
        rows.append(
            {
                "frame_id": rec["frame_id"],
                "path": rec["path"],
                "characters": names,
                "unknown_faces": unknown,
                "nobody_known": rec["frame_id"] in known,
                "framing": framing,
                "motion": motion.get(int(rec["shot_id"]), "") if rec["shot_id"] is not None else "",
                "scene": scene.get(rec["frame_id"], ""),
                "light": light_of(rec["brightness"], cfg),
                **{c: rec[c] for c in REGION_COLUMNS},
            }
        )
    return pl.DataFrame(rows, schema=FACT_SCHEMA)


def _scene_phrase(scene: str, cfg: CaptionsSettings) -> str:
    if not scene or scene == "noise":
        return ""
    name = cfg.scene_names.get(scene)
    if not name:
        return f"scene {scene}"
    # "the kitchen" or "a cave" as the name: "in the the kitchen" said the article twice
    return f"in {name}" if name.split()[0].casefold() in ("the", "a", "an") else f"in the {name}"


def template_caption(facts: dict, cfg: CaptionsSettings) -> tuple[str, list[str]]:
    """The offline caption of one frame (a row of :func:`caption_facts`) and its tags.

    Order follows what LoRA trainers expect (trigger word first, then who, then how it is shot):
    ``bunnystyle, astronaut and grace_hopper, close-up, static shot, dark, in the kitchen``.
    """
    names = list(facts["characters"] or [])
    unknown = int(facts["unknown_faces"] or 0)
    if names:
        described = cfg.character_descriptions
        if len(names) == 1 and not unknown:
            said = [f"{names[0]}, {described[names[0]]}" if described.get(names[0]) else names[0]]
        else:
            # In brackets beside others: "fatbat, a cartoon bat and owl, a cartoon owl" read as one
            # bat-and-owl and an owl, whichever name each description belonged to.
            said = [f"{n} ({described[n]})" if described.get(n) else n for n in names]
        who = said[0] if len(said) == 1 else ", ".join(said[:-1]) + " and " + said[-1]
        if unknown:
            who += f" and {unknown} other {'person' if unknown == 1 else 'people'}"
    elif unknown:
        who = "a person" if unknown == 1 else f"{unknown} people"
    else:  # found nobody: said only where that means nobody is there (nobody_is_known)
        who = "no people" if facts.get("nobody_known") else ""
    parts = [cfg.trigger_word, who, facts["framing"], facts["motion"], facts["light"]]
    parts.append(_scene_phrase(facts["scene"], cfg))
    caption = ", ".join(p for p in parts if p)
    tags = [*names, facts["framing"], facts["motion"], facts["light"]]
    if facts["scene"]:
        tags.append(f"scene:{facts['scene']}")
    if unknown and not names:
        tags.append("no named character")
    elif not names and facts.get("nobody_known"):
        tags.append("no people")
    return caption, [t for t in tags if t]
