"""Stage 05's tables as other stages rely on them: ``captions`` (and which captions a dataset may
use, and a template caption's tags read back for a crop of its frame), the append-only
``caption_edits``, and the edits applied over a run's captions."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import polars as pl

from diffusion_bunny.pipeline.settings import recorded_name
from diffusion_bunny.stages.captions.facts import LIGHT_TAGS, MOTION_TAGS, template_caption

# Declared here for stage 06 (a stage reads another only through its declarations).
from diffusion_bunny.stages.captions.facts import faces_are_people as faces_are_people
from diffusion_bunny.stages.captions.facts import without_false_sightings as without_false_sightings

if TYPE_CHECKING:
    from diffusion_bunny.stages.captions.settings import CaptionsSettings

#: Columns of the ``captions`` table (the contract other stages rely on).
CAPTION_SCHEMA: dict[str, pl.DataType] = {
    "frame_id": pl.String,
    "caption": pl.String,
    "tags": pl.List(pl.String),
    "provider": pl.String,
    "model": pl.String,
    "status": pl.String,
    "error": pl.String,
    "prompt_version": pl.String,
    "latency_s": pl.Float64,
    "input_tokens": pl.Int64,
    "output_tokens": pl.Int64,
}

EDIT_SCHEMA: dict[str, pl.DataType] = {
    "event_id": pl.String,
    "ts": pl.Datetime("us", "UTC"),
    "frame_id": pl.String,
    "caption": pl.String,
}


def apply_edits(
    captions: pl.DataFrame, edits: pl.DataFrame, trigger: str = "", old_triggers: Sequence[str] = ()
) -> pl.DataFrame:
    """Captions with each frame's latest edit in place (``status edited``; ``provider`` and
    ``model`` stay those of the caption the person started from), opening with ``trigger`` as
    every caption does (:func:`with_trigger`)."""
    if not edits.height:
        return captions
    latest = (
        edits.sort("ts").unique("frame_id", keep="last").select("frame_id", pl.col("caption").alias("_edit"))
    )
    if trigger:
        opened = [with_trigger(text, trigger, old_triggers) for text in latest["_edit"].to_list()]
        latest = latest.with_columns(pl.Series("_edit", opened, pl.String))
    out = captions.join(latest, on="frame_id", how="left")
    edited = pl.col("_edit").is_not_null()
    return out.with_columns(
        pl.when(edited).then(pl.col("_edit")).otherwise(pl.col("caption")).alias("caption"),
        pl.when(edited).then(pl.lit("edited")).otherwise(pl.col("status")).alias("status"),
        pl.when(edited).then(pl.lit(None, pl.String)).otherwise(pl.col("error")).alias("error"),
    ).drop("_edit")


def with_trigger(text: str, trigger: str, old_triggers: Sequence[str] = ()) -> str:
    """``text`` (a caption a person typed) opening with ``trigger``: kept where it does (its
    whole first word), an old trigger word it opens with replaced by it (what follows kept:
    ``sks: a man``, ``sks's dog``), else prepended.

    Why: a typed caption went into the dataset as typed, so one without the trigger word (or
    with the one ``captions.trigger_word`` had before it changed) taught the LoRA two trigger
    words, or none, in one dataset, and nothing said so."""
    if re.match(rf"{re.escape(trigger)}(?![\w-])", text, re.IGNORECASE):
        return text
    for old in old_triggers:
        opening = re.match(rf"{re.escape(old)}(?![\w-])", text, re.IGNORECASE) if old else None
        if opening is not None:
            return trigger + text[opening.end() :]
    return f"{trigger}, {text}"


def without_trigger(text: str, trigger: str | None) -> str:
    """``text`` without ``trigger`` and the comma or spaces after it at its start, as a typed
    caption is kept (the trigger in force is put back whenever it is applied: kept with the word
    it opened with, a later change of the word gave a caption both)."""
    if not trigger:
        return text
    opening = re.match(rf"{re.escape(trigger)}(?:\s*,\s*|\s+)(?=\S)", text, re.IGNORECASE)
    return text[opening.end() :] if opening is not None else text


def recorded_settings(manifest: dict[str, Any] | None) -> dict[str, Any]:
    """The captions settings a run of stage 05 ran with, as its manifest recorded them (empty
    where it says nothing): the trigger word its captions open with (read by the edits of
    stage 05 and by stage 06's crops)."""
    settings = ((manifest or {}).get("config") or {}).get(recorded_name("captions"))
    return settings if isinstance(settings, dict) else {}


#: Caption statuses a dataset may use (the contract): written by a provider, or by a person.
USABLE_STATUSES = ("ok", "edited")


def usable_captions(captions: pl.DataFrame) -> pl.DataFrame:
    """The rows of ``captions`` a dataset can use: caption set and not blank, status ``ok`` or
    ``edited``. Stage 06 exports exactly these; the report and the plots count them."""
    return captions.filter(
        pl.col("caption").is_not_null()
        & (pl.col("caption").str.strip_chars() != "")
        & pl.col("status").is_in(USABLE_STATUSES)
    )


def caption_lengths(captions: pl.DataFrame) -> pl.DataFrame:
    """Words and characters per usable caption (for the length plots of notebooks 05 and 09)."""
    return usable_captions(captions).select(
        "frame_id",
        "provider",
        "status",
        pl.col("caption")
        .str.split(" ")
        .list.eval(pl.element().filter(pl.element() != ""))
        .list.len()
        .alias("words"),
        pl.col("caption").str.len_chars().alias("chars"),
    )


def word_frequencies(captions: pl.DataFrame, *, top: int = 25, skip: tuple[str, ...] = ()) -> pl.DataFrame:
    """The words most captions hold (lower-cased, punctuation stripped): ``count`` is the captions
    holding the word, each caption once, as the plot's axis says ("medium shot, static shot"
    counted "shot" twice, so a word could be in more captions than there were)."""
    usable = captions.filter(pl.col("caption").is_not_null())
    words = (
        usable.select(
            pl.col("caption")
            .str.to_lowercase()
            .str.replace_all(r"[^\w\s:+-]", " ")
            .str.split(" ")
            .list.unique()
        )
        .explode("caption")
        .filter(pl.col("caption").str.len_chars() > 1)
        .filter(~pl.col("caption").is_in(list(skip)))
    )
    return (
        words.group_by("caption")
        .len()
        .rename({"caption": "word", "len": "count"})
        .sort(["count", "word"], descending=[True, False])
        .head(top)
    )


def crop_template_caption(
    tags: list[str] | None, characters: list[str], framing: str, cfg: CaptionsSettings, unknown: int = 0
) -> str:
    """The template caption of a crop of a frame (stage 06's face and character crops): the
    frame's own facts read back from its template tags (how the shot moves, its light, its
    scene), with the crop's characters (and ``unknown`` people no one named) and framing in
    place of the frame's.

    Why: the frame's caption names everyone in the frame and its framing ("blue_guard and
    red_guard, wide shot"); given to a crop of one of them it teaches the LoRA a name for a
    character the picture does not show, and a wide shot for a close-up."""
    tags = list(tags or [])
    facts = {
        "characters": sorted(characters),
        "unknown_faces": unknown,
        "framing": framing,
        "motion": next((t for t in tags if t in MOTION_TAGS), ""),
        "light": next((t for t in tags if t in LIGHT_TAGS), ""),
        "scene": next((t.removeprefix("scene:") for t in tags if t.startswith("scene:")), ""),
    }
    return template_caption(facts, cfg)[0]
