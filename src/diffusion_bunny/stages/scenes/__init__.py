"""Stage 04 ``scenes``: frames grouped by place and by who is in them, corrected by a person on
a review board, learning from the corrections.

* :mod:`.embeddings`: one vector per frame (a colour-and-texture descriptor with no model, or
  CLIP from :mod:`diffusion_bunny.models.clip`);
* :mod:`.clustering`: order-independent threshold clustering by exemplars, character
  sub-clusters, stable ids, corrections applied over any clustering (pure);
* :mod:`.adapter`: the small model trained from the corrections (triplet loss);
* :mod:`.timeline`: the clusters as CSV and a CMX3600 EDL for an editor;
* :mod:`.stage`: the stage on a run, and the corrections API the board calls
  (:func:`~diffusion_bunny.stages.scenes.stage.move_to_cluster`), shots like a frame, text search;
* :mod:`.tables`: ``clusters``, ``feedback`` and the cluster ids;
* :mod:`.board` (+ ``static/``), :mod:`.plots`: notebook 04's review board and figures.

``feedback`` belongs to the corrections API: the board creates it with the first move; the stage
only reads it (a non-empty one makes the stage stale, so the next run learns from it), but for
once: the run that joins a scene library (or moves to another) rewrites its cluster ids in the
library's, since the old ids name other places there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from diffusion_bunny.pipeline.contract import ConfigView, Reads, Stage
from diffusion_bunny.pipeline.run import Run
from diffusion_bunny.stages.extract.tables import BOX_COLUMNS, REGION_COLUMNS
from diffusion_bunny.stages.scenes.tables import ADAPTER_FILE


def _owns(run: Run, cfg: ConfigView) -> dict[str, Path]:
    return {ADAPTER_FILE: run.run_dir / ADAPTER_FILE}


def _inputs(run: Run, cfg: ConfigView) -> dict[str, Any]:
    """The scene library's own id (``library.json``) with ``scenes.library_dir`` set: a library
    deleted and made again under the same folder holds other clusters under the same ids, so the
    movies that used the old one are stale, and their next run joins the new one."""
    from diffusion_bunny.stages.scenes.stage import (  # lazy: keeps numpy out of `bunny --help`
        library_id,
        library_path,
    )

    library = library_path(cfg.scenes)
    return {} if library is None else {"library": library_id(library)}


def summary(manifest: dict[str, Any]) -> str:
    """One line about a run of stage 04: clusters, noise and the corrections it applied."""
    c, f = manifest["counts"], manifest["facts"]
    adapter = (f.get("adapter") or {}).get("triplets") or 0
    nobody = c.get("nobody_clusters")
    nobody = f", {nobody} of them with nobody named" if nobody else ""
    unscanned = c.get("unscanned_clusters")
    nobody += f", {unscanned} of them in frames stage 03 did not search" if unscanned else ""
    gone = c.get("corrections_on_frames_gone")
    # A move of a frame that stage 01 or 02 no longer keeps places nothing (the adapter still
    # learns from it): said, so the count is not read as moves on the board.
    gone = f" ({gone} of them on frames no longer kept)" if gone else ""
    learnt = f"an adapter trained on {adapter} of them" if adapter else "no adapter"
    return (
        f"{c['frames']} frames in {c['scene_clusters']} scenes ({c['character_clusters']} character "
        f"sub-clusters{nobody}), {c['noise']} in the noise bucket; {c['corrections']} correction(s) by "
        f"hand so far{gone}, {learnt} "
        f"({f['mode']}, {f['embedder']})"
    )


STAGE = Stage(
    name="scenes",
    notebook="04_cluster_scenes.ipynb",
    package=__name__,
    summary=summary,
    reads=(
        Reads(
            "frames",
            "extract",
            ("frame_id", "frame_index", "shot_id", "path", "width", "height", *BOX_COLUMNS),
        ),
        Reads("quality", "quality", ("frame_id", "keep", *REGION_COLUMNS)),
        # edited: a face fixed to none in notebook 03 is nobody (clustering.frame_characters).
        Reads("faces", "characters", ("frame_id", "character", "edited"), optional=True),
        Reads("face_frames", "characters", ("frame_id", "status"), optional=True),
        # A person's corrections: the adapter learns from them, so new ones make the stage stale.
        # Every column (None: the whole table): a target or level changed by hand is a new
        # correction too, and a table made by hand may lack ``level`` (read as scene moves),
        # which a declared column would refuse before the stage can say what is wrong.
        Reads("feedback", "scenes", None, optional=True, nonempty=True),
    ),
    config=("scenes",),
    writes=("embeddings", "clusters", "scene_exemplars"),
    edits=("feedback",),  # the review board's moves (move_to_cluster)
    owns=_owns,
    inputs=_inputs,
)
