"""Stage 03 ``characters``: every face found, encoded and named from reference photos, or
clustered for a person to name.

* :mod:`.stage`: detection and encoding on a process pool with a per-frame cache, and naming a
  cluster (:func:`~diffusion_bunny.stages.characters.stage.name_cluster`: its faces become
  reference photos, the run is re-labelled in seconds);
* :mod:`.identify`: encodings to names, pure (thresholds, open-set matching, tracks, votes,
  clusters of unknown faces);
* :mod:`.tables`: ``faces``, ``face_frames`` (and ``detections``, the per-frame cache) and where
  the reference photos are;
* :mod:`.plots`, :mod:`.widgets`: notebook 03's figures and the naming rows.

The face model itself (dlib's detector and encoder, reference loading) is
:mod:`diffusion_bunny.models.faces`: stage 08 scores generated faces with it too.
"""

from __future__ import annotations

from typing import Any

from diffusion_bunny.pipeline.contract import ConfigView, Reads, Stage
from diffusion_bunny.pipeline.run import Run
from diffusion_bunny.registry import FACE_DETECTORS
from diffusion_bunny.stages.characters.tables import references_input
from diffusion_bunny.stages.extract.tables import BOX_COLUMNS, REGION_COLUMNS


def _inputs(run: Run, cfg: ConfigView) -> dict[str, Any]:
    # The reference photos in force (a config value, or the run's own references/): naming a
    # cluster adds photos there, which makes the stage stale.
    return {"references": references_input(run.run_dir, cfg.characters)}


def summary(manifest: dict[str, Any]) -> str:
    """One line about a run of stage 03: appearances (faces and drawn characters) found, named and
    left for a person to name."""
    c, f = manifest["counts"], manifest["facts"]
    speed = f" at {f['frames_per_second']} frames/s" if f.get("frames_per_second") else ""
    per_char = ", ".join(f"{name} {n}" for name, n in (c.get("characters") or {}).items())
    fitted = f.get("fitted") or {}
    # The fit is most of a first run's time on a drawn film (minutes, against seconds of search):
    # said, so a slow stage is not read as a slow search.
    fit = ""
    if fitted.get("fitted_now"):
        fit = f"; drawn characters' detector fitted in {fitted['seconds']:g} s"
        if fitted.get("device"):
            fit += " on the CPU" if fitted["device"] == "cpu" else " on the GPU"
        absent, every = fitted.get("not_in_film") or [], fitted.get("characters") or []
        if absent:
            fit += f" (again for the {len(every) - len(absent)} of its {len(every)} characters in this film)"
    fixed, waiting = c.get("fixed_by_hand", 0), c.get("fixes_waiting", 0)
    hand = f"; {fixed} fixed by hand" if fixed or waiting else ""
    if c.get("fixed_to_none"):
        hand += f", {c['fixed_to_none']} of them to none"
    if waiting:
        hand += f" ({waiting} more waiting for appearances this run no longer has)"
    # A sighting fixed to none is no unknown one (the report counted 9 where this line said 10).
    unknown = c["unknown_faces"] - c.get("fixed_to_none", 0)
    return (
        f"{c['frames_scanned']} frames searched ({f['frames_cached']} from the cache){speed}; "
        f"{c['faces']} appearances in {c['frames_with_faces']} frames ({per_char or 'none'}); "
        f"{c['named_faces']} named, {unknown} unknown in {c['clusters']} "
        f"cluster{'' if c['clusters'] == 1 else 's'}{hand}{fit}"
    )


def _detectors(cfg: ConfigView) -> tuple[tuple[frozenset[str], str], ...]:
    # The face detector finds the faces (stage 08: in the generated pictures, to score them).
    return (FACE_DETECTORS.code_choice(cfg.characters.detector),)


STAGE = Stage(
    name="characters",
    notebook="03_detect_characters.ipynb",
    package=__name__,
    summary=summary,
    reads=(
        Reads(
            "frames",
            "extract",
            ("frame_id", "frame_index", "timestamp_s", "shot_id", "path", "width", "height", *BOX_COLUMNS),
        ),
        # Which frames stage 02 kept (characters.frames: kept); not needed with characters.frames: all.
        Reads("quality", "quality", ("frame_id", "keep", *REGION_COLUMNS), optional=True),
        # A person's fixes of single appearances: re-applied on top of every rerun.
        Reads("appearance_edits", "characters", ("event_id",), optional=True, nonempty=True),
    ),
    config=("characters",),
    # detections: every frame's sightings before labelling (which drops and reshapes some), the
    # cache a rerun reuses, so that a rerun labels what a first run would.
    writes=("faces", "face_frames", "detections"),
    edits=("appearance_edits",),  # names given by hand (fix_appearance, notebook 03)
    inputs=_inputs,
    detectors=_detectors,
)
