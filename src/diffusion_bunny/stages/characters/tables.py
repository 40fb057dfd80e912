"""Stage 03's tables and folders as other stages rely on them: ``faces`` and ``face_frames`` (and
``detections``, the sightings before labelling that a rerun reuses), and
where the reference photos of the characters are (``characters.reference_dir``, else the run's
``references/``, where naming a cluster writes)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import polars as pl

from diffusion_bunny.errors import BadInputError
from diffusion_bunny.models.faces import (
    REFERENCE_SUFFIXES,
    DetectSettings,
    ReferenceSet,
    name_key,
    reference_images,
    references_fingerprint,
)
from diffusion_bunny.models.fitted.detector import iou
from diffusion_bunny.paths import workspace_root
from diffusion_bunny.stages.characters.settings import CharactersSettings

DETECTIONS_SCHEMA = {
    "face_id": pl.Utf8,
    "frame_id": pl.Utf8,
    "top": pl.Int64,
    "right": pl.Int64,
    "bottom": pl.Int64,
    "left": pl.Int64,
    "embedding": pl.List(pl.Float32),
    "sharpness": pl.Float64,
    #: The detector's confidence (1.0 from dlib's HOG, which gives none).
    "detector_score": pl.Float64,
    #: Head turn from the landmarks (models.faces.yaw_of): 0 facing the camera, 1+ in profile.
    "yaw": pl.Float64,
    #: ``face`` (a human face, embedding: dlib's 128-d descriptor) or ``drawn`` (a drawn or
    #: animated character found by the fitted detector, framed as its references frame it;
    #: embedding: the detector's feature there).
    "kind": pl.Utf8,
    #: The character the fitted detector found (null for faces, which are named by distance).
    "label": pl.Utf8,
}
LABEL_SCHEMA = {
    "shot_id": pl.Int64,
    "frame_index": pl.Int64,
    "timestamp_s": pl.Float64,
    "character": pl.Utf8,
    "distance": pl.Float64,
    "raw_character": pl.Utf8,
    "nearest": pl.Utf8,
    "nearest_distance": pl.Float64,
    "threshold": pl.Float64,
    "low_confidence": pl.Boolean,
    #: The face is large and frontal enough for its own encoding to name it
    #: (characters.trust_min_px, trust_max_yaw).
    "trusted": pl.Boolean,
    "track_id": pl.Int64,
    "track_size": pl.Int64,
    "cluster": pl.Utf8,
    #: A person set the name by hand (notebook 03's fixer, :func:`~.stage.fix_appearance`). With
    #: ``character`` null: fixed to none, a false sighting, which the later stages count as
    #: nobody (stage 05's ``captions.facts.without_false_sightings``).
    "edited": pl.Boolean,
}
FACES_SCHEMA = {**DETECTIONS_SCHEMA, **LABEL_SCHEMA}
FACE_FRAMES_SCHEMA = {
    "frame_id": pl.Utf8,
    "status": pl.Utf8,
    "n_faces": pl.Int64,
    "error": pl.Utf8,
    "detect_key": pl.Utf8,
    "file_bytes": pl.Int64,
    #: The part of the frame searched ("left,top,right,bottom": its picture box, or stage 02's
    #: crop), part of what a cached detection must match.
    "region": pl.Utf8,
    #: Sharpness of the frame's largest face (null without a face).
    "face_sharpness": pl.Float64,
}
#: ``appearance_edits``: the names a person gave appearances by hand, append-only; ``character``
#: null means "none of the characters": a false sighting, no one to count or frame by (a real
#: person nobody is to name is left unknown, not fixed). The
#: appearance is held by its frame, kind and box as well as its id: an id is its place among its
#: frame's sightings, and a rerun that finds one more there (a refit after a still was added)
#: gave the fix to another appearance.
APPEARANCE_EDIT_SCHEMA = {
    "event_id": pl.Utf8,
    "ts": pl.Datetime("us", "UTC"),
    "face_id": pl.Utf8,
    "character": pl.Utf8,
    "frame_id": pl.Utf8,
    "kind": pl.Utf8,
    "left": pl.Int64,
    "top": pl.Int64,
    "right": pl.Int64,
    "bottom": pl.Int64,
    #: The detector's own box of a drawn sighting whose box in ``faces`` grew by a face it took in
    #: (:func:`~diffusion_bunny.stages.characters.identify.faces_of_drawn`; null otherwise, and in
    #: fixes made before it was kept): a rerun matches fixes against the detector's boxes before
    #: they grow, where a breastplate's box under a large head overlaps the grown one too little.
    "raw_left": pl.Int64,
    "raw_top": pl.Int64,
    "raw_right": pl.Int64,
    "raw_bottom": pl.Int64,
}
#: A fix goes to the appearance of its frame and kind whose box overlaps its own this much
#: (intersection over union), the most overlapping one; none: it waits for its appearance.
EDIT_MIN_IOU = 0.5
#: A box's columns, in order.
BOX = ("left", "top", "right", "bottom")


def with_edit_columns(edits: pl.DataFrame) -> pl.DataFrame:
    """An ``appearance_edits`` table with every column (one written before fixes kept their box
    has them null: such a fix goes by its id)."""
    missing = [
        pl.lit(None, dtype).alias(name)
        for name, dtype in APPEARANCE_EDIT_SCHEMA.items()
        if name not in edits.columns
    ]
    return edits.with_columns(missing).select(list(APPEARANCE_EDIT_SCHEMA))


_RAW_BOX = ("raw_left", "raw_top", "raw_right", "raw_bottom")
_ANCHOR = ("face_id", "frame_id", "kind", *BOX, *_RAW_BOX)


def edit_targets(faces: pl.DataFrame, edits: pl.DataFrame | None) -> dict[tuple, str | None]:
    """For each appearance a person fixed (its id, frame, kind and box when fixed), the
    appearance of ``faces`` it is now (None: not there this run, its fix waits). A fix that kept
    its box goes to the sighting of the same frame and kind whose box overlaps it most (at least
    :data:`EDIT_MIN_IOU`); one from before boxes were kept goes by its id."""
    if edits is None or edits.height == 0:
        return {}
    by_frame: dict[str, list[tuple[str, str, tuple[int, ...]]]] = {}
    for row in faces.select("face_id", "frame_id", "kind", *BOX).iter_rows():
        by_frame.setdefault(row[1], []).append((row[0], row[2], tuple(row[3:])))
    ids = set(faces["face_id"].to_list())
    targets: dict[tuple, str | None] = {}
    for anchor in with_edit_columns(edits).select(_ANCHOR).unique(maintain_order=True).iter_rows():
        face_id, frame_id, kind, box, raw = anchor[0], anchor[1], anchor[2], anchor[3:7], anchor[7:]
        if frame_id is None or None in box:
            targets[anchor] = face_id if face_id in ids else None
            continue
        boxes = [box] if None in raw else [box, raw]  # as seen, and as the detector found it
        scored = [
            (max(iou(b, other) for b in boxes), fid)
            for fid, k, other in by_frame.get(frame_id, [])
            if k == kind
        ]
        best = max(scored, default=(0.0, None))
        targets[anchor] = best[1] if best[0] >= EDIT_MIN_IOU else None
    return targets


def fixes_of(faces: pl.DataFrame, edits: pl.DataFrame, face_id: str) -> pl.Series:
    """Which rows of ``edits`` go to appearance ``face_id`` of ``faces`` (:func:`edit_targets`),
    as a boolean column: the fixes an undo takes back."""
    targets = edit_targets(faces, edits)
    anchors = with_edit_columns(edits).select(_ANCHOR).iter_rows()
    return pl.Series([targets.get(anchor) == face_id for anchor in anchors], dtype=pl.Boolean)


def kept_by_id(edits: pl.DataFrame) -> bool:
    """Whether ``edits`` (with every column) hold a fix kept by its id alone, without its box."""
    return bool((edits["frame_id"].is_null() | edits["left"].is_null()).any())


def anchor_by_id(
    edits: pl.DataFrame, faces: pl.DataFrame, raw_box: Callable[[dict[str, Any]], tuple[int | None, ...]]
) -> pl.DataFrame:
    """``edits`` with each fix made before fixes kept their box (an earlier version's: its id
    alone) given the frame, kind and box of the appearance its id names in ``faces``, where that
    appearance shows the fix (edited, under the fix's latest name); ``raw_box`` gives a drawn
    one's detector box. An id is the sighting's place in its frame: the first refit after an
    upgrade renumbered a frame's sightings, and such a fix was lost (or went to another sighting)
    while the run said it waited for an appearance no longer there. Anchored while the ids still
    hold, it follows its box as any fix does."""
    edits = with_edit_columns(edits)
    if not kept_by_id(edits):
        return edits
    latest = dict(edits.sort("ts").select("face_id", "character").iter_rows())
    shown = {
        row["face_id"]: row
        for row in faces.filter(pl.col("edited").fill_null(False)).iter_rows(named=True)
        if row["face_id"] in latest and row["character"] == latest[row["face_id"]]
    }
    rows = []
    for row in edits.iter_rows(named=True):
        seen = shown.get(row["face_id"])
        if seen is not None and (row["frame_id"] is None or row["left"] is None):
            row = {**row, "frame_id": seen["frame_id"], "kind": seen["kind"], **{k: seen[k] for k in BOX}}
            row.update(zip(_RAW_BOX, raw_box(seen), strict=True))
        rows.append(row)
    return pl.DataFrame(rows, schema=APPEARANCE_EDIT_SCHEMA)


def spelt_as_known(edits: pl.DataFrame, known: Iterable[str]) -> pl.DataFrame:
    """``edits`` with each name spelt as the one character of ``known`` (the reference folders
    of this run) it names whatever the case, spaces, '-' or '_', as a name typed today is
    (``check_name``). Why: a fix keeps the spelling of its day, and a folder renamed since
    (``lin`` to ``Lin``) made the fixed appearance a character of its own beside the folder's
    (``Lin 3, lin 1``), with no picture and a scene sub-cluster of its own. Names two folders
    share (a warning of the reference reader) are left as they are."""
    folders: dict[str, set[str]] = {}
    for name in known:
        folders.setdefault(name_key(name), set()).add(name)
    given = edits["character"].drop_nulls().unique().to_list() if edits.height else []
    spelt = {}
    for name in given:
        same = folders.get(name_key(name), set())
        if len(same) == 1 and name not in same:
            spelt[name] = next(iter(same))
    return edits.with_columns(pl.col("character").replace(spelt)) if spelt else edits


def apply_appearance_edits(faces: pl.DataFrame, edits: pl.DataFrame | None) -> pl.DataFrame:
    """``faces`` with each appearance's latest edit in place: the name a person gave it (or none),
    no longer low confidence nor in a cluster, ``edited`` set. An edit goes to its appearance
    as :func:`edit_targets` finds it; edits of appearances the table no longer holds (the frame
    was not searched again) are kept in ``edits`` and do nothing here."""
    faces = faces.with_columns(pl.lit(False).alias("edited")) if "edited" not in faces.columns else faces
    if edits is None or edits.height == 0 or faces.height == 0:
        return faces
    targets = edit_targets(faces, edits)
    named: dict[str, str | None] = {}
    edits = with_edit_columns(edits).sort("ts")
    for anchor, name in zip(edits.select(_ANCHOR).iter_rows(), edits["character"], strict=True):
        target = targets.get(anchor)
        if target is not None:  # the latest fix of an appearance wins
            named[target] = name
    latest = pl.DataFrame(
        {"face_id": list(named), "_name": list(named.values()), "_edited": [True] * len(named)},
        schema={"face_id": pl.Utf8, "_name": pl.Utf8, "_edited": pl.Boolean},
    )
    out = faces.join(latest, on="face_id", how="left")
    edited = pl.col("_edited").fill_null(False)
    return out.with_columns(
        pl.when(edited).then(pl.col("_name")).otherwise(pl.col("character")).alias("character"),
        pl.when(edited).then(pl.lit(None, pl.Float64)).otherwise(pl.col("distance")).alias("distance"),
        pl.when(edited).then(pl.lit(False)).otherwise(pl.col("low_confidence")).alias("low_confidence"),
        pl.when(edited).then(pl.lit(None, pl.Utf8)).otherwise(pl.col("cluster")).alias("cluster"),
        (pl.col("edited") | edited).alias("edited"),
    ).drop("_name", "_edited")


def reference_faces(ref_dir: Path, settings: DetectSettings) -> tuple[ReferenceSet, list[str]]:
    """The human characters' face encodings of ``ref_dir`` as stage 03 takes them (transparency
    on grey, a face confirmed as photographed), and the warnings of what cannot serve: what
    another stage reads the references with (stage 08 read them by other rules, and a picture
    stage 03 left out of a character was part of its identity there)."""
    # The stage declarations import this module; the reader pulls in OpenCV's GrabCut and the
    # fitted detector's code (90 ms on every command).
    from diffusion_bunny.stages.characters.references import load_character_references  # lazy: see above

    refs, _, warnings = load_character_references(ref_dir, settings)
    return refs, warnings


#: Name of the reference folder inside a run, used when ``characters.reference_dir`` is not set
#: and a person names a cluster in notebook 03.
RUN_REFERENCES = "references"
#: Where in a run stage 03 keeps the detector it fitted (``fitted-<key>.pt``) and the drawn
#: characters' cut-outs (``cutouts/``); stage 08 scores drawn characters with that detector.
CHARACTERS_CACHE = Path("cache") / "characters"


# ---------------------------------------------------------------------------------------------
# Reference folder


def configured_reference_dir(cfg: CharactersSettings) -> Path | None:
    """``characters.reference_dir`` as an absolute path (relative ones are under the workspace),
    resolved as ``--characters`` is: the folder is part of stage 03's inputs, and the same one
    given through a link or ``..`` (a notebook's setting) found the stage stale under ``bunny run``."""
    if not cfg.reference_dir:
        return None
    path = Path(cfg.reference_dir).expanduser()
    return (path if path.is_absolute() else workspace_root() / path).resolve()


def references_input(run_dir: Path, cfg: CharactersSettings) -> dict:
    """The reference pictures in force as a stage's input (stages 03 and 08): their content, and
    their folder as given, but the run's own ``references/`` named from the run folder: recorded
    by its absolute path, a run folder copied or moved found those stages stale, nothing changed."""
    folder = reference_dir(run_dir, cfg)
    taken = references_fingerprint(folder)
    if folder is not None and folder.is_relative_to(run_dir):
        taken["dir"] = folder.relative_to(run_dir).as_posix()
    return taken


def reference_dir(run_dir: Path, cfg: CharactersSettings) -> Path | None:
    """The reference folder in force: the configured one (which must exist), else the run's own
    ``references/`` once a person has named a cluster, else None (discovery only)."""
    configured = configured_reference_dir(cfg)
    if configured is not None:
        check_reference_folder(configured)
        return configured
    own = Path(run_dir) / RUN_REFERENCES
    return own if own.is_dir() and any(reference_images(own).values()) else None


def check_reference_folder(folder: Path) -> None:
    """One line (:class:`BadInputError`) when ``folder``, the configured reference folder, is
    missing, unreadable or holds no picture in a character sub-folder. ``bunny run`` checks a
    ``--characters`` folder so before any stage runs: found by stage 03's check alone, a folder
    without pictures let stage 01 decode the whole film first."""
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise BadInputError(
            f"reference folder {folder} {what} (characters.reference_dir or --characters); "
            "give a folder with one sub-folder of images per character"
        )
    try:
        given = reference_images(folder)
    except OSError as exc:  # its permissions: a read, not the run folder's "could not write"
        raise BadInputError(
            f"reference folder {folder} cannot be read ({exc.strerror or type(exc).__name__}); "
            "fix its permissions, or give another folder (characters.reference_dir or --characters)"
        ) from None
    files = [path for paths in given.values() for path in paths]
    if files and not any(path.suffix.lower() in REFERENCE_SUFFIXES for path in files):
        # iPhone photos (.heic), raw files, notes: every one left out by stage 03 after stages 01
        # and 02 had decoded the film, and the run went on with every face unknown.
        kinds = Counter(path.suffix.lower() or "(no suffix)" for path in files)
        shown = ", ".join(f"{n} {suffix}" for suffix, n in kinds.most_common(4))
        raise BadInputError(
            f"reference folder {folder} holds no picture bunny reads ({shown}); save the pictures as "
            "JPEG, PNG or WebP (HEIC and raw photos are not read), one sub-folder per character"
        )
    if not any(given.values()):
        loose = sum(p.is_file() and p.suffix.lower() in REFERENCE_SUFFIXES for p in folder.iterdir())
        found = f" (it holds {loose} picture(s) of its own, in no sub-folder)" if loose else ""
        raise BadInputError(
            f"reference folder {folder} holds no images in character sub-folders{found}; add "
            "one sub-folder per character (its name is the character's) with pictures of it (a "
            "photo of the face, a drawing, a sprite, a still), or unset characters.reference_dir "
            "to discover characters without references"
        )


def unread_run_references(run_dir: Path, cfg: CharactersSettings) -> list[str]:
    """One line when a reference folder is configured and the run's own ``references/`` holds
    pictures: stills boxed and clusters named while no folder was given went there, and a later
    run with ``--characters`` read only that folder, dropping them without a word (the boxed
    stills of a run that had started without pictures)."""
    configured = configured_reference_dir(cfg)
    own = Path(run_dir) / RUN_REFERENCES
    if configured is None or not own.is_dir() or own.resolve() == configured.resolve():
        return []
    held = {name: files for name, files in reference_images(own).items() if files}
    if not held:
        return []
    names = ", ".join(sorted(held))
    count = sum(len(files) for files in held.values())
    return [
        f"{count} picture(s) of {names} in {own} (stills and named clusters of a run without "
        f"pictures) are not read while characters.reference_dir (--characters) is {configured}; "
        f"move each character's folder into {configured} to use them"
    ]


def naming_dir(run_dir: Path, cfg: CharactersSettings) -> Path:
    """Where naming a cluster writes its reference images."""
    return configured_reference_dir(cfg) or Path(run_dir) / RUN_REFERENCES


def character_counts(faces: pl.DataFrame) -> pl.DataFrame:
    """Per character (``unknown`` last): faces, frames, shots and low-confidence faces."""
    if faces.height == 0:
        return pl.DataFrame(
            schema={
                "character": pl.Utf8,
                "faces": pl.UInt32,
                "frames": pl.UInt32,
                "shots": pl.UInt32,
                "low_confidence": pl.UInt32,
            }
        )
    return (
        faces.with_columns(pl.col("character").fill_null("unknown"))
        .group_by("character")
        .agg(
            pl.len().alias("faces"),
            pl.col("frame_id").n_unique().alias("frames"),
            pl.col("shot_id").n_unique().alias("shots"),
            pl.col("low_confidence").sum().cast(pl.UInt32).alias("low_confidence"),
        )
        .with_columns((pl.col("character") == "unknown").alias("_u"))
        .sort("_u", "faces", "character", descending=[False, True, False])
        .drop("_u")
    )
