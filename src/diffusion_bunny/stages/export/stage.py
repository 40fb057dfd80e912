"""Stage 06 (``export``): write the LoRA dataset of a run to ``<run>/dataset/``.

Two layouts of the same pictures, planned by :func:`diffusion_bunny.stages.export.plan.plan_export`:

* ``dataset/hf/train/`` and ``dataset/hf/validation/``: a Hugging Face *imagefolder*, pictures
  plus one metadata file per split (``file_name``, ``text``, ``characters``, ``shot_id``,
  ``frame_id``, ``crop``, ``repeats``), so ``datasets.load_dataset("imagefolder",
  data_dir=".../dataset/hf")`` loads both splits as they are. The metadata is parquet by default:
  datasets infers a JSON Lines file's column types from its first rows, and a split in which no
  picture names a character then types ``characters`` as a list of nulls and the two splits
  refuse to load together (``export.metadata_format: jsonl`` writes JSON Lines all the same).
* ``dataset/kohya/<repeats>_<concept>/``: the training pictures (hard links to the same files when
  the file system allows) with a same-stem ``.txt`` caption, as kohya's sd-scripts read them
  (pass ``--caption_extension .txt``).

* ``dataset/video/<clip_id>.mp4`` + ``<clip_id>.txt`` (``export.video_clips: true``): one clip per
  kept shot with a named character, cut inside the shot with PyAV (:mod:`.clips` plans it,
  :mod:`diffusion_bunny.media.clips` cuts it), with ``musubi_dataset.toml`` and
  ``diffusion_pipe_dataset.toml`` beside them, and the ``clips`` table.

Everything is written into a staging folder beside ``dataset/`` and swapped in at the end, so a
killed or failed export leaves the previous dataset as it was; a crash in the middle of the swap
itself is repaired by the next run.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import cv2
import numpy as np
import polars as pl
from PIL import Image

from diffusion_bunny.errors import BadInputError, StageWarning
from diffusion_bunny.media.clips import ClipSource, encode_mp4
from diffusion_bunny.media.images import read_rgb
from diffusion_bunny.media.probe import probe_video
from diffusion_bunny.media.video import DEINTERLACE_SETTING
from diffusion_bunny.pipeline.atomic import atomic_write_bytes, disk_errors, staged_folder
from diffusion_bunny.pipeline.contract import ConfigView, Context, StageOutput
from diffusion_bunny.pipeline.progress import map_tracked
from diffusion_bunny.pipeline.run import Run, run_fact
from diffusion_bunny.stages.captions.tables import recorded_settings, usable_captions
from diffusion_bunny.stages.export.clips import diffusion_pipe_toml, musubi_toml, plan_clips
from diffusion_bunny.stages.export.plan import concept_table, kohya_folder, plan_export
from diffusion_bunny.stages.export.settings import ExportSettings
from diffusion_bunny.stages.export.tables import (
    CLIP_SCHEMA,
    CROPS,
    ITEMS_COLUMNS,
    METADATA_COLUMNS,
    SPLITS,
    VIDEO_DIR,
    dataset_dir,
)
from diffusion_bunny.stages.extract.tables import region_of

_SAVE_OPTIONS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}


def _save_options(cfg: ExportSettings) -> dict[str, Any]:
    fmt = _SAVE_OPTIONS[cfg.image_format]
    if fmt == "PNG":
        return {"format": fmt, "compress_level": 6}
    return {"format": fmt, "quality": cfg.jpeg_quality}


def resized(crop: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``crop`` (RGB, H x W x 3) at ``size`` (width, height): shrunk by pixel-area averaging
    (OpenCV's ``INTER_AREA``, its method for shrinking: no aliasing), enlarged with a Lanczos
    filter.

    Why OpenCV rather than Pillow's LANCZOS: shrinking a 720p frame to 1024x576 took 19-25 ms
    there and 4.4 ms here (mean difference 0.05 grey levels on the looped Hamilton frames); it was
    most of stage 06's time (50 s of 2,538 frames at 60 minutes).
    """
    height, width = crop.shape[:2]
    if (width, height) == size:
        return crop
    shrink = size[0] <= width and size[1] <= height
    method = cv2.INTER_AREA if shrink else cv2.INTER_LANCZOS4
    return cv2.resize(crop, size, interpolation=method)


def crop_box(rgb: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """The ``box`` (left, top, right, bottom) of ``rgb``, the part outside the picture black, as
    Pillow's ``crop`` gives it (a face square with its margin can pass the frame's edge)."""
    left, top, right, bottom = box
    height, width = rgb.shape[:2]
    if left >= 0 and top >= 0 and right <= width and bottom <= height:
        return rgb[top:bottom, left:right]
    out = np.zeros((bottom - top, right - left, rgb.shape[2]), rgb.dtype)
    x0, y0, x1, y1 = max(left, 0), max(top, 0), min(right, width), min(bottom, height)
    if x1 > x0 and y1 > y0:
        out[y0 - top : y1 - top, x0 - left : x1 - left] = rgb[y0:y1, x0:x1]
    return out


def _write_frame(
    run_dir: Path, rows: list[dict[str, Any]], root: Path, cfg: ExportSettings, kohya: bool
) -> int:
    """Every picture of one frame (the frame file is decoded once); returns the bytes written."""
    path = run_dir / rows[0]["path"]
    # OpenCV rather than Pillow (read_rgb): the same pixels, decoded in half the time, and an
    # array to crop and resize without Pillow's copies (those and the decode were ~45% of the
    # stage); a truncated frame is refused as Pillow refused it.
    rgb = read_rgb(path)
    if rgb is None:
        raise BadInputError(
            f"frame file {path} cannot be read (truncated or not an image); rerun stage extract with --force"
        )
    options = _save_options(cfg)
    written = 0
    for row in rows:
        crop = resized(
            crop_box(rgb, (row["left"], row["top"], row["right"], row["bottom"])),
            (row["width"], row["height"]),
        )
        target = root / "hf" / row["split"] / row["file_name"]
        with disk_errors(target):  # Pillow's write on a full disk names no file
            Image.fromarray(crop).save(target, **options)
        written += target.stat().st_size
        if kohya and row["split"] == "train":
            folder = root / "kohya" / kohya_folder(row["repeats"], row["concept"])
            linked = folder / row["file_name"]
            try:
                os.link(target, linked)
            except OSError:  # a file system without hard links: a copy
                shutil.copyfile(target, linked)
            with disk_errors(linked.with_suffix(".txt")):
                linked.with_suffix(".txt").write_text(row["text"] + "\n", encoding="utf-8")
    return written


def write_metadata(folder: Path, items: pl.DataFrame, metadata_format: str) -> Path:
    """The imagefolder metadata of one split (``metadata.parquet`` or ``metadata.jsonl``)."""
    table = items.select(METADATA_COLUMNS)
    if metadata_format == "parquet":
        path = folder / "metadata.parquet"
        with disk_errors(path):  # polars reports a full disk in an error of its own
            table.write_parquet(path)
        return path
    path = folder / "metadata.jsonl"
    with disk_errors(path), path.open("w", encoding="utf-8") as fh:
        for row in table.iter_rows(named=True):
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def _crops_written(plan_items: pl.DataFrame) -> str:
    """The crops of the pictures written, with their counts (``8 full, 3 face``): the configured
    ``export.crops`` named kinds a run may have written none of (no character found, every face
    too small), and the README said "crops: full, face, character" over 8 full pictures."""
    written = {c: int((plan_items["crop"] == c).sum()) for c in CROPS}
    return ", ".join(f"{n} {c}" for c, n in written.items() if n) or "none"


def _readme(plan_items: pl.DataFrame, cfg: ExportSettings, root: Path) -> str:
    counts = {s: int((plan_items["split"] == s).sum()) for s in SPLITS}
    lines = [
        "# LoRA dataset written by diffusion-bunny (stage 06, export)",
        "",
        f"{plan_items.height} pictures: {counts['train']} train, {counts['validation']} validation "
        f"(crops: {_crops_written(plan_items)}; whole shots never straddle the two).",
        "",
        "Hugging Face datasets:",
        "",
        "```python",
        "from datasets import load_dataset",
        f'dataset = load_dataset("imagefolder", data_dir={str(root / "hf")!r})',
        "```",
        "",
        "Columns: image, text (the caption), characters, shot_id, frame_id, crop, repeats.",
    ]
    if cfg.kohya:
        lines += [
            "",
            "kohya sd-scripts: `--train_data_dir` = the kohya folder beside this file, "
            "`--caption_extension .txt`; each folder is `<repeats>_<concept>`:",
            "",
            *[
                f"- {row['kohya_folder']}: {row['pictures']} pictures x {row['repeats']}"
                for row in concept_table(plan_items).iter_rows(named=True)
            ],
        ]
    return "\n".join(lines) + "\n"


def write_clips(
    movie: Path,
    shots: pl.DataFrame,
    clips: pl.DataFrame,
    root: Path,
    clip_fps: float,
    warnings: list[str],
    deinterlace: bool | None = None,
) -> pl.DataFrame:
    """Cut every planned clip into ``root/video`` with its caption file and the two dataset
    configs (paths in them are where the folder lands after the swap, ``dataset_dir/video``).
    Returns the clips written: a shot whose frames cannot be decoded again (a damaged stretch)
    gives none, with a line in ``warnings``, and the rest of the dataset is still written.
    ``deinterlace``: whether stage 01 deinterlaced the frames (:func:`deinterlaced`; None: decide
    as it does)."""
    video = root / VIDEO_DIR
    video.mkdir(parents=True)
    bounds = {r["shot_id"]: (r["start_s"], r["end_s"]) for r in shots.iter_rows(named=True)}
    source = ClipSource(movie, deinterlace)  # how stage 01 shows the movie: square pixels, deinterlaced, SDR
    failed: list[str] = []
    for clip in clips.iter_rows(named=True):
        size = (clip["width"], clip["height"])
        region = region_of(clip)
        try:
            images = source.clip(
                clip["start_s"], clip["frames"], clip_fps, *bounds[clip["shot_id"]], size, region
            )
        except ValueError:  # decode_clip: no frame of the shot could be decoded
            failed.append(clip["clip_id"])
            continue
        encode_mp4(video / f"{clip['clip_id']}.mp4", images, clip_fps)
        (video / f"{clip['clip_id']}.txt").write_text(clip["caption"] + "\n", encoding="utf-8")
    if failed:
        warnings.append(
            f"{len(failed)} clip(s) left out: their shot's frames could not be decoded again from "
            f"{Path(movie).name} (first: {failed[0]}); the file may be damaged there"
        )
    return clips.filter(~pl.col("clip_id").is_in(failed))


#: The captions settings a crop's own caption is told with (``crop_template_caption``).
TEMPLATE_WORDS = ("trigger_word", "character_descriptions", "scene_names")


def deinterlaced(run: Run, setting: str) -> bool | None:
    """Whether stage 01 deinterlaced the film's frames, as its manifest records it, so the clips
    are cut as those frames were without asking the film's pictures (``idet``) a second time; the
    setting ``extract.deinterlace`` where the manifest does not say (None: auto, decided anew)."""
    facts = (run.read_manifest("extract") or {}).get("facts")
    recorded = facts.get("deinterlaced") if isinstance(facts, dict) else None
    return recorded if isinstance(recorded, bool) else DEINTERLACE_SETTING[setting]


def captioned_with(run: Run, current: Any) -> Any:
    """The template's words the frames' captions were made with (stage 05's manifest), for the
    crops' own captions: told with the settings in force while stage 05 was out of date (a new
    trigger word, run with ``--stages export``), the crops said "zzstyle" beside their frames'
    "bunnystyle", two trigger words in one dataset. ``current`` (the captions settings in
    force, as the stage sees them) where the manifest does not say; the words alone, as
    ``crop_template_caption`` reads them (the stage may read no other captions setting)."""
    recorded = recorded_settings(run.read_manifest("captions"))
    if not recorded:
        return current
    words = {key: recorded.get(key, getattr(current, key)) for key in TEMPLATE_WORDS}
    trigger, *mappings = words.values()
    if not isinstance(trigger, (str, type(None))) or not all(isinstance(m, dict) for m in mappings):
        return current  # a manifest edited by hand: the settings in force
    return SimpleNamespace(**words)


def compute(ctx: Context) -> StageOutput:
    """Stage 06 on a run: plan the dataset, check the frame files, write both layouts (and the
    clips, with ``export.video_clips``) into a staging folder and swap it in as
    ``<run>/dataset``; returns the ``dataset_items`` and ``clips`` tables."""
    run_dir, cfg = ctx.run_dir, ctx.cfg.export
    started = time.perf_counter()
    tables = ctx.table("frames"), ctx.table("quality"), ctx.optional("faces"), ctx.table("captions")
    # The template's words (trigger word, descriptions, scene names): crops get captions of their own.
    plan = plan_export(*tables, cfg, captioned_with(ctx.run, ctx.cfg.captions))
    items = plan.items
    missing = sorted({p for p in items["path"].unique().to_list() if not (run_dir / p).is_file()})
    if missing:
        raise BadInputError(
            f"{len(missing)} frame file(s) are missing in {run_dir} (first: {missing[0]}); "
            "rerun stage extract with --force"
        )
    shots, movie = ctx.optional("shots"), ctx.run.movie
    captions = dict(usable_captions(tables[3]).select("frame_id", "caption").iter_rows())
    clips, short = _plan_clips(items, shots, movie, cfg, plan.warnings, timestamp_joins(ctx.run), captions)
    with staged_folder(dataset_dir(run_dir)) as staging:
        if cfg.video_clips:
            clips = _write_video(
                run_dir,
                staging,
                movie,
                shots,
                clips,
                cfg,
                plan.warnings,
                deinterlaced(ctx.run, ctx.cfg.extract.deinterlace),
            )
        written = _write_pictures(run_dir, staging, items, cfg, ctx.progress, ctx.progress_path)
        _set_aside_added(run_dir, staging, ctx.previous, plan.warnings)
    table = items.select(ITEMS_COLUMNS)
    facts = {
        "dataset_dir": run_fact(dataset_dir(run_dir), run_dir),
        "dataset_folder": str(dataset_dir(run_dir)),  # as its README and trainer files name it
        # What dataset/ holds from this time on is a person's (_set_aside_added)
        "dataset_written": time.time(),
        "image_format": cfg.image_format,
        "metadata_format": cfg.metadata_format,
        "seed": cfg.seed,
        "bytes": written,
        "seconds": round(time.perf_counter() - started, 3),
        "concepts": concept_table(items).to_dicts(),
        "dropped_crops": plan.dropped,
    }
    return StageOutput(
        tables={"dataset_items": table, "clips": clips},
        counts={**plan.counts, "clips": clips.height, "clip_short_shots": short},
        warnings=plan.warnings,
        facts=facts,
    )


def timestamp_joins(run: Run) -> int:
    """How often the movie's timestamps started again (joined pieces of a recording), as stage 01
    counted them while it decoded the movie: read from its manifest, not by demuxing the whole
    movie once more."""
    return ((run.read_manifest("extract") or {}).get("facts") or {}).get("timestamp_resets") or 0


def _plan_clips(
    items: pl.DataFrame,
    shots: pl.DataFrame | None,
    movie: Path,
    cfg: ExportSettings,
    warnings: list[str],
    joins: int = 0,
    captions: dict[str, str] | None = None,
) -> tuple[pl.DataFrame, int]:
    """The clips to cut (``export.video_clips``; none otherwise) and how many shots with a named
    character were too short to give one (said in ``warnings``). A clip is found by a seek to its
    time, which in a movie whose times start again (``joins``, :func:`timestamp_joins`) lands in
    whichever piece the seek meets first: none is cut there."""
    if not cfg.video_clips:
        return pl.DataFrame(schema=CLIP_SCHEMA), 0
    if shots is None or not Path(movie).is_file():
        raise BadInputError(
            f"export.video_clips needs the run's shots and its movie ({movie}); "
            "put the movie back or set export.video_clips: false"
        )
    if joins:
        warnings.append(
            f"{Path(movie).name}: its timestamps start again {joins} time(s) (pieces of a recording "
            "joined), so a clip cannot be found by its time: no clips; copy it into one file whose "
            "times run on (ffmpeg -i MOVIE -c copy MOVIE.mkv) and run that for export.video_clips"
        )
        return pl.DataFrame(schema=CLIP_SCHEMA), 0
    size = (cfg.clip_width, cfg.clip_height)
    # The training pictures' shots only: a shot held out for validation was trained on as video.
    train = items.filter(pl.col("split") == "train")
    fps = probe_video(movie).fps
    clips, short = plan_clips(shots, train, fps, cfg.clip_fps, cfg.clip_frames, size, captions)
    if short:
        warnings.append(
            f"{short} shot(s) with a named character are shorter than a clip "
            f"({cfg.clip_frames} frames at {cfg.clip_fps:g} fps) and give none"
        )
    return clips, short


def _write_video(
    run_dir: Path,
    staging: Path,
    movie: Path,
    shots: pl.DataFrame,
    clips: pl.DataFrame,
    cfg: ExportSettings,
    warnings: list[str],
    deinterlace: bool | None = None,
) -> pl.DataFrame:
    """The clips and the two video trainers' dataset files, which name the folder the staging
    folder becomes; returns the clips written. No clip, no dataset files: they named an empty
    folder, which a trainer stops on ("had no images/videos")."""
    clips = write_clips(Path(movie), shots, clips, staging, cfg.clip_fps, warnings, deinterlace)
    if clips.is_empty():
        warnings.append(
            "export.video_clips: no clip was made, so no video dataset file (musubi_dataset.toml, "
            "diffusion_pipe_dataset.toml) is written; shorter clips (export.clip_frames) or a lower "
            "export.clip_fps fit more shots"
        )
        return clips
    for name, text in _trainer_files(run_dir, cfg).items():
        (staging / name).write_text(text, encoding="utf-8")
    return clips


def _set_aside_added(
    run_dir: Path, staging: Path, previous: dict[str, Any] | None, warnings: list[str]
) -> None:
    """Files put into ``dataset/`` since the last export finished (regularisation pictures, a
    trainer's cache) and kohya captions changed there by hand: moved to
    ``<run>/dataset_added/<time>/`` under their own paths, in one line, before the new folder is
    swapped in. The swap removes the old folder whole, and they were lost in silence. A file is
    judged by when it was last made or changed (its inode's ctime, which a copy cannot carry
    over) against when the export wrote the folder, or found it moved or copied (the
    ``dataset_written`` fact: every file of a copy is new by its ctime); a folder moved or copied
    since, not yet found so, is not judged."""
    root = dataset_dir(run_dir)
    facts = (previous or {}).get("facts") or {}
    since = facts.get("dataset_written")
    if not isinstance(since, int | float) or facts.get("dataset_folder") != str(root) or not root.is_dir():
        return
    added = []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.stat().st_ctime > since):
        twin = staging / path.relative_to(root)
        # The export's own files are its to rewrite; a caption's .txt is what people fix by hand.
        if not twin.is_file() or (path.suffix == ".txt" and twin.read_bytes() != path.read_bytes()):
            added.append(path.relative_to(root))
    if not added:
        return
    aside = run_dir / "dataset_added" / datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    for rel in added:
        (aside / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.move(root / rel, aside / rel)
    warnings.append(
        f"{len(added)} file(s) put into or changed in dataset/ since the last export (first: {added[0]}) "
        f"were moved to {aside}: the export writes dataset/ whole; keep your own files beside it, and "
        "make caption edits in notebook 05, where they are kept"
    )


def _trainer_files(run_dir: Path, cfg: ExportSettings) -> dict[str, str]:
    """The video trainers' dataset files by name: they name the dataset's folder by its absolute
    path, as a trainer reads them from its own folder."""
    size, final = (cfg.clip_width, cfg.clip_height), dataset_dir(run_dir) / VIDEO_DIR
    return {
        "musubi_dataset.toml": musubi_toml(
            # Not under dataset/: the export writes that folder whole, and a cache there was
            # removed with the old folder on the next export (minutes of latents on a GPU).
            str(final),
            str(run_dir / "cache" / "musubi"),
            size,
            cfg.clip_frames,
        ),
        "diffusion_pipe_dataset.toml": diffusion_pipe_toml(str(final), size, cfg.clip_frames),
    }


def relocate(run: Run, cfg: ConfigView, facts: dict[str, Any]) -> dict[str, Any]:
    """The README and the video trainers' files of a run folder moved or copied since the export,
    rewritten to name the dataset where it is now (they named the old folder: a musubi training
    from a copy cached into the other run, and the README's ``load_dataset`` read the other
    dataset); the ``dataset_folder`` fact that changed, or nothing. A folder that cannot be
    written keeps them as they are, with a warning."""
    root = dataset_dir(run.run_dir)
    if facts.get("dataset_folder") in (None, str(root)) or not root.is_dir():
        return {}
    files = _trainer_files(run.run_dir, cfg.export) if (root / "musubi_dataset.toml").is_file() else {}
    try:
        if (root / "README.md").is_file():
            files["README.md"] = _readme(run.read_table("dataset_items"), cfg.export, root)
        for name, text in files.items():
            atomic_write_bytes(root / name, text.encode("utf-8"))
    except OSError as exc:
        warnings.warn(
            f"{root}: the dataset's README and trainer files still name {facts['dataset_folder']} (the "
            f"folder this run was exported in): they could not be rewritten here ({exc.strerror or exc}); "
            "rerun stage export with --force where the folder can be written",
            StageWarning,
            stacklevel=2,
        )
        return {}
    # Every file of a copied folder is new by its ctime: from now on, what changes is a person's.
    return {"dataset_folder": str(root), "dataset_written": time.time()}


def _write_pictures(
    run_dir: Path,
    staging: Path,
    items: pl.DataFrame,
    cfg: ExportSettings,
    progress: bool,
    progress_path: Path | None,
) -> int:
    """Both picture layouts (the imagefolder splits and their metadata, the kohya folders) and
    the README, frame by frame on a few threads; returns the bytes written."""
    for split in SPLITS:
        if (items["split"] == split).any():
            (staging / "hf" / split).mkdir(parents=True)
    if cfg.kohya:
        train = items.filter(pl.col("split") == "train")
        for repeats, concept in train.select("repeats", "concept").unique().iter_rows():
            (staging / "kohya" / kohya_folder(repeats, concept)).mkdir(parents=True)
    by_frame = items.partition_by("frame_id", maintain_order=True, as_dict=False)
    jobs = [frame.to_dicts() for frame in by_frame]
    sizes = map_tracked(
        lambda rows: _write_frame(run_dir, rows, staging, cfg, cfg.kohya),
        jobs,
        desc="export",
        workers=min(4, os.cpu_count() or 1),
        progress=progress,
        progress_path=progress_path,
    )
    for split in SPLITS:
        part = items.filter(pl.col("split") == split)
        if part.height:
            write_metadata(staging / "hf" / split, part, cfg.metadata_format)
    with disk_errors(staging / "README.md"):
        (staging / "README.md").write_text(_readme(items, cfg, dataset_dir(run_dir)), encoding="utf-8")
    return sum(sizes)
