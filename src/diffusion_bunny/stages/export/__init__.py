"""Stage 06 ``export``: a training set a LoRA trainer loads as it is, a Hugging Face imagefolder
and a kohya folder, with face crops, balanced repeats and a validation split by shot.

* :mod:`.plan`: what goes in, pure over the tables (crops, the split that never puts near-identical
  pictures on both sides, repeats per concept, file names);
* :mod:`.clips`: shot clips for a video LoRA (``export.video_clips``), pure planning;
* :mod:`.stage`: writing the pictures and captions into a staging folder swapped in at the end;
* :mod:`.tables`: ``dataset_items`` and the ``dataset/`` layout;
* :mod:`.plots`: notebook 06's figures.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from diffusion_bunny.pipeline.contract import ConfigView, Reads, Stage
from diffusion_bunny.pipeline.manifest import file_fingerprint
from diffusion_bunny.pipeline.run import Run, from_run_fact
from diffusion_bunny.stages.export.tables import dataset_dir
from diffusion_bunny.stages.extract.tables import BOX_COLUMNS, REGION_COLUMNS


def _owns(run: Run, cfg: ConfigView) -> dict[str, Path]:
    return {"dataset/": dataset_dir(run.run_dir)}


def _inputs(run: Run, cfg: ConfigView) -> dict[str, Any]:
    """The movie, only when clips are cut from it."""
    if not cfg.export.video_clips:
        return {}
    return {"movie": file_fingerprint(run.movie)} if run.movie.is_file() else {"movie": None}


def _relocate(run: Run, cfg: ConfigView, facts: dict[str, Any]) -> dict[str, Any]:
    # lazy: the stage module (image and video writers) loads only when a folder moved
    from diffusion_bunny.stages.export.stage import relocate

    return relocate(run, cfg, facts)


def summary(manifest: dict[str, Any]) -> str:
    """One line about a run of stage 06: pictures by crop and split, and where they are."""
    c, f = manifest["counts"], manifest["facts"]
    return (
        f"{c['items']} pictures from {c['captioned_frames']} captioned frames ({c['train']} train, "
        f"{c['validation']} validation; {c['crop_full']} full, {c['crop_face']} face, "
        f"{c['crop_half_body']} half-body, {c.get('crop_character', 0)} character) in "
        f"{from_run_fact(f['dataset_dir'], manifest.get('run_folder', ''))}"
        + (
            f"; left out: {c.get('upscaled_crops', 0)} crop(s) too small (upscaled), "
            f"{c.get('blurry_crops', 0)} out of focus"
            if c.get("upscaled_crops") or c.get("blurry_crops")
            else ""
        )
    )


STAGE = Stage(
    name="export",
    notebook="06_export_dataset.ipynb",
    package=__name__,
    summary=summary,
    reads=(
        Reads(
            "frames",
            "extract",
            ("frame_id", "frame_index", "shot_id", "path", "width", "height", *BOX_COLUMNS),
        ),
        # Which frames were kept, and their hashes (shots the movie cuts back to share a split).
        Reads("quality", "quality", ("frame_id", "keep", "phash", *REGION_COLUMNS)),
        # A caption a person edited in notebook 05 makes the dataset stale; a template caption's
        # tags give its crops captions of their own.
        Reads("captions", "captions", ("frame_id", "caption", "status", "tags", "provider")),
        Reads(
            "faces",
            "characters",
            # low_confidence and edited: whether unnamed faces are people in a crop's own caption
            # (a face fixed to none is not: captions.tables.without_false_sightings).
            (
                "face_id",
                "frame_id",
                "character",
                "top",
                "right",
                "bottom",
                "left",
                "kind",
                "sharpness",
                "low_confidence",
                "edited",
            ),
            optional=True,
        ),
        # Shot boundaries, for the clips (export.video_clips): a clip never crosses a cut.
        Reads("shots", "extract", ("shot_id", "start_s", "end_s", *BOX_COLUMNS), optional=True),
    ),
    config=(
        "export",
        "captions.trigger_word",
        "captions.character_descriptions",
        "captions.scene_names",
        # The clips are deinterlaced as stage 01's frames were (export.video_clips).
        "extract.deinterlace",
    ),
    writes=("dataset_items", "clips"),
    owns=_owns,
    inputs=_inputs,
    relocate=_relocate,
)
