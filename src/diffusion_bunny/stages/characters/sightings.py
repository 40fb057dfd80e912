"""A drawn character's likely sightings: where the fitted detector saw it, but under
``characters.fitted.min_score``, for a person to confirm one as a still from the film.

Why: a character the fit misses (its pictures show it from sides, or in a light, the film does not)
is found once a person adds a still of it from the film (docs/characters.md, "A still from the
film"), but finding a frame where it is clear means paging through the film. The detector has
usually seen it already, weakly: on the character truth set, of the best five sightings under the
threshold of each character, most lie on that character (kenney_toon's female_person, named
nowhere, had five of five). Confirming one of them is one click, and it becomes the still.
"""

from __future__ import annotations

import polars as pl

from diffusion_bunny.errors import UserError
from diffusion_bunny.pipeline.run import Run
from diffusion_bunny.stages.characters.settings import CharactersSettings
from diffusion_bunny.stages.characters.stage import check_name, known_names, read_appearance_edits
from diffusion_bunny.stages.characters.tables import edit_targets

#: How many likely sightings are offered per character: enough that a right one is among them
#: when the detector saw the character at all, few enough to look through at a glance.
MOST = 12


def likely_sightings(run: Run, name: str, characters: CharactersSettings, most: int = MOST) -> pl.DataFrame:
    """The drawn sightings of ``name`` that stage 03 did not name (its score under
    ``characters.fitted.min_score``), surest first, at most one per shot (the same look again
    teaches the fit nothing new) and none in a frame where ``name`` is named already. Columns:
    ``face_id``, ``frame_id``, ``shot_id``, the box (``left``, ``top``, ``right``, ``bottom`` in the
    frame's pixels) and ``detector_score``. Empty when stage 03 has not run with a fitted
    detector. A sighting a person fixed
    (:func:`~diffusion_bunny.stages.characters.stage.fix_appearance`) is not offered again."""
    if not run.has_table("detections") or not run.has_table("faces"):
        return pl.DataFrame(schema=_SCHEMA)
    detections = run.read_table("detections")
    # The name as the run spells it (``Fat Bat`` for the folder ``fat bat``, as add_still and
    # fix_appearance take it: an empty strip said nothing), and no sighting a person has fixed
    # already (one fixed to none of the characters was offered again once min_score rose).
    known = known_names(run, characters)
    name = check_name(name, known)
    if name not in known and name not in set(detections["label"].drop_nulls().to_list()):
        # A name mistyped gave an empty strip, read as "no likely sighting of it".
        raise UserError(
            f"{name!r} is no character of {run.run_dir} (its characters: "
            f"{', '.join(sorted(known)) or 'none'}); type one of those"
        )
    if _human(run, name):
        # A person's character is named by its face encodings: an empty strip said nothing.
        raise UserError(
            f"{name} is a person (named from face photos): likely sightings are the drawn-character "
            "detector's; to find them, name a cluster of unknown faces, or add a still from the film "
            "where the face looks toward the camera"
        )
    # A fix follows its box, as stage 03 applies it (an id is a sighting's place in its frame,
    # which a refit can renumber), to the detections whether or not ``faces`` still shows them.
    targets = edit_targets(detections, read_appearance_edits(run.run_dir)).values()
    fixed = pl.Series([t for t in targets if t is not None], dtype=pl.String)
    named = run.read_table("faces").filter(pl.col("character") == name)["frame_id"]
    weak = detections.filter(
        (pl.col("kind") == "drawn")
        & (pl.col("label") == name)
        & (pl.col("detector_score") < characters.fitted.min_score)
        & ~pl.col("frame_id").is_in(named.implode())
        & ~pl.col("face_id").is_in(fixed.implode())
    )
    shots = run.read_table("frames").select("frame_id", "shot_id")
    return (
        weak.join(shots, on="frame_id")
        .sort(["detector_score", "frame_id"], descending=[True, False])
        .unique("shot_id", keep="first", maintain_order=True)
        .head(most)
        .select(list(_SCHEMA))
    )


def _human(run: Run, name: str) -> bool:
    """Whether stage 03's last run took face photos of ``name`` (``facts.references_taken``)."""
    taken = ((run.read_manifest("characters") or {}).get("facts") or {}).get("references_taken") or []
    return any(row.get("character") == name and row.get("use") == "face" for row in taken)


_SCHEMA = {
    "face_id": pl.String,
    "frame_id": pl.String,
    "shot_id": pl.Int64,
    "left": pl.Int64,
    "top": pl.Int64,
    "right": pl.Int64,
    "bottom": pl.Int64,
    "detector_score": pl.Float64,
}
