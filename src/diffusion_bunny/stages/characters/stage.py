"""Stage 03 ``characters``: find every face in the kept frames and say whose it is.

Two halves (docs/development.md: scores once, thresholds separately):

1. :func:`detect_faces` runs dlib's detector and encoder once per frame, on a pool of
   worker processes (dlib holds the GIL, so threads would run one at a time). Results are cached
   in the run's own tables: the ``face_frames`` table records, per frame, the detector settings
   and the file size it was computed with, and a rerun reuses every frame whose entry still
   matches. Naming a cluster or adding a reference image therefore re-labels a run in seconds.
2. :func:`label_faces` is a pure function of the encodings, the reference set and the
   ``characters`` settings: open-set nearest-reference identification with per-character
   thresholds, tracks through a shot by linking faces of consecutive sampled frames, a majority
   vote per track, and Chinese-whispers clusters of the faces nobody could name.

Naming a cluster (:func:`name_cluster`, the notebook's naming widget) copies the cluster's best
face crops into the reference folder as new reference images and re-labels the run.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import multiprocessing
import os
import re
import shutil
import sys
import threading
import time
import types
import unicodedata
import uuid
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import polars as pl

from diffusion_bunny.errors import StageError, StageWarning, UserError
from diffusion_bunny.media.images import crop_region, read_image
from diffusion_bunny.models.device import resolve_device
from diffusion_bunny.models.face_detect import require as require_detector
from diffusion_bunny.models.faces import (
    REFERENCE_SUFFIXES,
    DetectSettings,
    ReferenceSet,
    character_name,
    detect_and_encode,
    face_sharpness,
    name_key,
    portrait_faces,
    read_rgb,
    reference_images,
)
from diffusion_bunny.models.fitted import FittedSettings
from diffusion_bunny.models.fitted.detector import (
    FittedDetector,
    FittedSearch,
    Hit,
    batch_threads,
    fit_film_detector,
    fit_key,
)
from diffusion_bunny.models.hub_characters.finder import HubFinder, hub_key
from diffusion_bunny.pipeline.atomic import atomic_write_bytes
from diffusion_bunny.pipeline.contract import Context, Pipeline, StageOutput, run_stage
from diffusion_bunny.pipeline.progress import tracked
from diffusion_bunny.pipeline.run import Run, damaged_table
from diffusion_bunny.pipeline.settings import RunConfig
from diffusion_bunny.stages.characters import STAGE
from diffusion_bunny.stages.characters.identify import (
    character_thresholds,
    frame_face_sharpness,
    frames_to_scan,
    label_faces,
    trusted_faces,
)
from diffusion_bunny.stages.characters.references import (
    GREY,
    MIN_SUBJECT_PX,
    RESERVED_NAMES,
    SAME_PHOTO_DISTANCE,
    ReferencePictures,
    ReferenceProblem,
    load_character_references,
    on_grey,
    photographed_face,
    picture_hash,
    read_shrunk,
    same_photo,
)
from diffusion_bunny.stages.characters.settings import CharactersSettings
from diffusion_bunny.stages.characters.tables import (
    APPEARANCE_EDIT_SCHEMA,
    BOX,
    CHARACTERS_CACHE,
    DETECTIONS_SCHEMA,
    FACE_FRAMES_SCHEMA,
    RUN_REFERENCES,
    anchor_by_id,
    apply_appearance_edits,
    character_counts,
    edit_targets,
    fixes_of,
    kept_by_id,
    naming_dir,
    reference_dir,
    spelt_as_known,
    unread_run_references,
    with_edit_columns,
)
from diffusion_bunny.stages.extract.tables import frame_regions, region_of

#: Below this many frames to do, a process pool costs more to start than it saves: each spawned
#: worker imports its detector's runtime and loads its models and dlib's (3-4 s of CPU for MTCNN,
#: which imports torch to read its weights). On the demo run's frames on a quiet 2-core machine
#: (MTCNN): 17 frames took 5.6 s on the pool and 4.9 s in-process, 40 frames 7.0 s and
#: 8.0 s; break-even is about 25 (12 was fitted for HOG). A CenterFace worker starts faster (2.7 s
#: against MTCNN's 4.8 on a loaded machine) and searches faster too, so the break-even moves
#: little; not measured again.
MIN_FRAMES_FOR_POOL = 24
#: The fitted detector's detections are kept (and cached) from this score on, under any
#: ``characters.fitted.min_score``, so moving that threshold re-labels without searching again.
KEEP_SCORE = 0.25
#: Width of the frames the fitted detector is trained on (it pastes characters on pieces of them).
BACKGROUND_WIDTH = 640

#: Reference pictures a fix took away (:func:`_unpromote`), kept for :func:`undo_fix` to put back.
SET_ASIDE = Path(CHARACTERS_CACHE) / "set_aside"


# ---------------------------------------------------------------------------------------------
# Detection (expensive, cached)


@contextmanager
def _workers_without_main_script() -> Iterator[None]:
    """Start spawn workers without re-running the caller's main script.

    Workers are spawned, not forked: a fork copies whatever locks the parent's other threads hold
    at that instant (OpenCV's and PyAV's pools, a kernel's zmq threads), and a worker hung on one
    of them was seen here. But spawn re-imports the main module of the parent in every worker,
    which re-runs a plain script that calls a stage without an ``if __name__ == "__main__"``
    guard. The workers need only this module, so the main module is hidden from
    :mod:`multiprocessing` while they start (``pool.map`` submits every job, and with it starts
    every worker, inside this block).
    """
    main = sys.modules.get("__main__")
    hide = main is not None and getattr(main, "__file__", None) is not None
    if hide:
        sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        if hide:
            sys.modules["__main__"] = main


def _init_worker(parent: int | None = None) -> None:
    # One OpenCV (and torch, for MTCNN: read when torch is first imported) thread per process:
    # the pool already uses every core.
    os.environ["OMP_NUM_THREADS"] = "1"
    cv2.setNumThreads(1)
    # ``parent``: the pool's process, given by it (read here, it could already be gone)
    threading.Thread(target=_exit_with_parent, args=(parent or os.getppid(),), daemon=True).start()


def _exit_with_parent(parent: int, every_s: float = 2.0, leave: Callable[[int], Any] = os._exit) -> None:
    """Worker: end when the process that started it is gone. A kernel killed outright (SIGKILL,
    the out-of-memory killer) cannot shut its pool down, and its workers, waiting for work,
    stayed for good (235 MB each)."""
    while os.getppid() == parent:
        time.sleep(every_s)
    leave(0)


Job = tuple[str, str, DetectSettings, "tuple[int, int, int, int] | None", "tuple[str, str] | None"]


@functools.cache
def _fitted(path: str, digest: str) -> FittedSearch:
    """The search of the fitted character detector saved at ``path`` (read once per worker
    process), from its ``.onnx`` file: a worker needs no torch. Kept by the file's ``digest``
    too, as the detections' key is: a process that searches again (a notebook's kernel; fewer
    frames than pay for a pool) after the file was rewritten under the same name (a fit made
    again on a GPU) must search with the new network, not the one it read before."""
    detector = FittedSearch.load(Path(path).with_suffix(".onnx"))
    if detector is None:
        raise StageError(f"the fitted character detector {path} cannot be read; rerun stage characters")
    return detector


def _detect_file(job: Job) -> tuple[str, str, list[tuple], str | None]:
    """Worker: detect and encode the faces of one frame file (module level so it pickles), and find
    the drawn characters with the fitted detector ``fitted`` (its file and the digest of its ONNX
    file) when there is one, inside the frame's region (the picture box without bars or a
    subtitle band; boxes come back in frame pixels). A row: top, right, bottom, left, embedding,
    sharpness, score, yaw, kind, label."""
    frame_id, path, settings, region, fitted = job
    try:
        rgb = read_rgb(path)
        if rgb is None:
            return frame_id, "failed", [], "missing or not a decodable image"
        left, top = (region[0], region[1]) if region else (0, 0)
        searched = crop_region(rgb, region)
        faces = detect_and_encode(searched, settings)
        hits = _fitted(*fitted).detect(searched, KEEP_SCORE) if fitted else []
    except Exception as exc:  # one bad frame must not cost the stage: logged and skipped
        return frame_id, "failed", [], f"{type(exc).__name__}: {exc}"
    faces.sort(key=lambda f: (f.left, f.top))
    found = [
        (
            f.top + top,
            f.right + left,
            f.bottom + top,
            f.left + left,
            f.encoding,
            f.sharpness,
            f.score,
            f.yaw,
            "face",
            None,
        )
        for f in faces
    ]
    names = _fitted(*fitted).names if fitted else []
    found.extend(_drawn_rows(hits, names, searched, (left, top), settings.min_face_px))
    return frame_id, "ok", found, None


def _drawn_rows(
    hits: list[Hit], names: list[str], searched: np.ndarray, offset: tuple[int, int], min_px: int
) -> list[tuple]:
    """Detection rows of the drawn characters ``hits`` found in ``searched`` (the frame's region,
    whose top-left corner is ``offset`` in the frame): boxes in frame pixels, a hit's name from
    ``names`` (None for a character found without a name, index -1), those shorter than
    ``min_px`` (the smallest face wanted) left out."""
    left, top = offset
    rows = []
    for hit in sorted(hits, key=lambda h: (h.box[0], h.box[1])):
        x0, y0, x1, y1 = (round(v) for v in hit.box)
        if y1 - y0 < min_px:
            continue
        box = (y0 + top, x1 + left, y1 + top, x0 + left)
        sharp = face_sharpness(searched, (y0, x1, y1, x0))
        name = names[hit.index] if hit.index >= 0 else None
        rows.append((*box, hit.feature, sharp, hit.score, 0.0, "drawn", name))
    return rows


def _hub_sightings(
    finder: HubFinder,
    jobs: list[Job],
    min_px: int,
    progress: bool,
    progress_path: Path | None,
) -> dict[str, list[tuple]]:
    """The hub's sightings of characters in every job's frame (in this process: the models are
    large, and torch uses every core on its own), ``batch_size`` frames a forward pass. A frame
    that cannot be read is left out here; the face pass has already recorded it as failed."""
    out: dict[str, list[tuple]] = {}
    size = finder.settings.batch_size
    with tracked(len(jobs), desc="characters", progress=progress, progress_path=progress_path) as done:
        for start in range(0, len(jobs), size):
            chunk = []
            for frame_id, path, _, region, _ in jobs[start : start + size]:
                rgb = read_rgb(path)
                if rgb is not None:
                    offset = (region[0], region[1]) if region else (0, 0)
                    chunk.append((frame_id, crop_region(rgb, region), offset))
            found = finder.find_frames([c[1] for c in chunk]) if chunk else []
            for (frame_id, searched, offset), hits in zip(chunk, found, strict=True):
                out[frame_id] = _drawn_rows(hits, finder.names, searched, offset, min_px)
            done(min(len(jobs), start + size))
    return out


def _reusable(
    previous: tuple[pl.DataFrame, pl.DataFrame] | None, key: str, sizes: dict[str, tuple[int, str]]
) -> tuple[set[str], pl.DataFrame]:
    """Frames whose detections from the last run still hold (same detector settings, same file
    size, same region searched) and those detections."""
    if (
        previous is None
        or "region" not in previous[1].columns
        or not set(DETECTIONS_SCHEMA) <= set(previous[0].columns)
    ):
        return set(), pl.DataFrame(schema=DETECTIONS_SCHEMA)
    old_detections, old_frames = previous
    ok = old_frames.filter(
        (pl.col("status") == "ok") & (pl.col("detect_key") == key) & pl.col("frame_id").is_in(list(sizes))
    )
    cached = {
        fid
        for fid, size, region in zip(ok["frame_id"], ok["file_bytes"], ok["region"], strict=True)
        if sizes.get(fid) == (size, region)
    }
    return cached, old_detections.filter(pl.col("frame_id").is_in(list(cached))).select(
        list(DETECTIONS_SCHEMA)
    )


def _run_jobs(
    jobs: list[Job],
    n_workers: int,
    use_pool: bool,
    progress: bool,
    progress_path: Path | None,
) -> dict[str, tuple[str, list[tuple], str | None]]:
    """Detect and encode the faces of every job's frame, on a spawned process pool when it pays
    (dlib holds the GIL, so threads would not help)."""
    results: dict[str, tuple[str, list[tuple], str | None]] = {}
    with tracked(len(jobs), desc="faces", progress=progress, progress_path=progress_path) as done:
        if use_pool:
            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(
                max_workers=n_workers, mp_context=ctx, initializer=_init_worker, initargs=(os.getpid(),)
            ) as pool:
                with _workers_without_main_script():
                    iterator = pool.map(
                        _detect_file, jobs, chunksize=max(1, min(8, len(jobs) // (4 * n_workers)))
                    )
                for n, (fid, status, faces, error) in enumerate(iterator, start=1):
                    results[fid] = (status, faces, error)
                    done(n)
        else:
            for n, job in enumerate(jobs, start=1):
                fid, status, faces, error = _detect_file(job)
                results[fid] = (status, faces, error)
                done(n)
    return results


def _detect_key(
    settings: DetectSettings, fitted: Path | None, hub_key: str | None
) -> tuple[str, tuple[str, str] | None]:
    """What a frame's detections depend on (``face_frames.detect_key``), and the fitted network
    searched with (its file and ONNX digest, None without one). The fit's key says what it was
    fitted from, the searched network's own digest which weights came of it: on a GPU (cuDNN) a
    fit made again from the same pictures and frames is another network, and its sightings are
    not the last one's."""
    key, searched_with = settings.key(), None
    if fitted is not None:
        weights = hashlib.sha256(Path(fitted).with_suffix(".onnx").read_bytes()).hexdigest()[:12]
        key = f"{key}+{Path(fitted).stem.removeprefix('fitted-')}-{weights}"
        searched_with = (str(fitted), weights)
    if hub_key is not None:
        key = f"{key}+hub-{hub_key}"
    return key, searched_with


def detect_faces(
    run_dir: Path,
    frames: pl.DataFrame,
    settings: DetectSettings,
    *,
    workers: int = 0,
    previous: tuple[pl.DataFrame, pl.DataFrame] | None = None,
    quality: pl.DataFrame | None = None,
    progress: bool = True,
    progress_path: Path | None = None,
    fitted: Path | None = None,
    hub: tuple[str, Callable[[], HubFinder]] | None = None,
) -> tuple[pl.DataFrame, pl.DataFrame, dict[str, Any]]:
    """Detections (``DETECTIONS_SCHEMA``) and per-frame status (``FACE_FRAMES_SCHEMA``) for
    ``frames``, reusing ``previous`` (detections, face_frames) where its entries still match. Each
    frame is searched inside its region (:func:`~diffusion_bunny.stages.extract.tables.frame_regions`:
    the picture box, or stage 02's crop from ``quality``), never in the bars around it. With
    ``fitted`` (the file of a fitted character detector) the drawn characters are searched too; with
    ``hub`` (the key of its sightings, and what makes its finder: called only when a frame is left
    to search, so a rerun that reuses every frame loads no model) the hub's models search them."""
    run_dir = Path(run_dir)
    key, searched_with = _detect_key(settings, fitted, hub[0] if hub is not None else None)
    regions = {r["frame_id"]: region_of(r) for r in frame_regions(frames, quality).iter_rows(named=True)}
    rows = frames.select("frame_id", "path").to_dicts()
    # What a cached detection must still match: the file's size and the region searched.
    sizes: dict[str, tuple[int, str]] = {}
    for row in rows:
        path = run_dir / row["path"]
        region = regions.get(row["frame_id"])
        sizes[row["frame_id"]] = (
            path.stat().st_size if path.is_file() else -1,
            ",".join(map(str, region)) if region else "",
        )
    cached_ids, cached_faces = _reusable(previous, key, sizes)
    todo = [r for r in rows if r["frame_id"] not in cached_ids]
    # The cores this process may run on (taskset, a container's cpuset, a pinned test worker),
    # not the machine's: two processes spawned onto one core only pay their start twice.
    n_workers = workers or len(os.sched_getaffinity(0)) or 1
    use_pool = n_workers > 1 and len(todo) >= MIN_FRAMES_FOR_POOL
    jobs = [
        (
            r["frame_id"],
            str(run_dir / r["path"]),
            settings,
            regions.get(r["frame_id"]),
            searched_with,
        )
        for r in todo
    ]
    started = time.perf_counter()
    # The hub's models load before any frame is searched: one that cannot be had stops the stage
    # at once, not after the faces of every frame.
    finder = hub[1]() if hub is not None and jobs else None
    results = _run_jobs(jobs, n_workers, use_pool, progress, progress_path)
    if finder is not None:
        sightings = _hub_sightings(finder, jobs, settings.min_face_px, progress, progress_path)
        for fid, (status, found, error) in list(results.items()):
            if status == "ok":
                results[fid] = (status, [*found, *sightings.get(fid, [])], error)
    seconds = time.perf_counter() - started

    detections, face_frames = _detection_tables(rows, results, cached_ids, cached_faces, key, sizes)
    facts = {
        "detect_key": key,
        "detect_settings": settings.as_json(),
        "workers": n_workers if use_pool else 1,
        "frames_detected": len(jobs),
        "frames_cached": len(cached_ids),
        "detect_seconds": round(seconds, 3),
        "frames_per_second": round(len(jobs) / seconds, 1) if jobs and seconds > 0 else None,
    }
    return detections, face_frames, facts


def _detection_tables(
    rows: list[dict[str, Any]],
    results: dict[str, tuple[str, list[tuple], str | None]],
    cached_ids: set[str],
    cached_faces: pl.DataFrame,
    key: str,
    sizes: dict[str, tuple[int, str]],
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The detections (the cached ones and the new ``results``, in the frames' order) and the
    per-frame status rows, which record what a later run's cache must match."""
    cached_n = dict(cached_faces.group_by("frame_id").len().iter_rows()) if cached_faces.height else {}
    new_faces: list[dict[str, Any]] = []
    status_rows: list[dict[str, Any]] = []
    for row in rows:
        fid = row["frame_id"]
        status, faces, error = ("ok", [], None) if fid in cached_ids else results[fid]
        n_faces = cached_n.get(fid, 0) if fid in cached_ids else len(faces)
        status_rows.append(
            {
                "frame_id": fid,
                "status": status,
                "n_faces": n_faces,
                "error": error,
                "detect_key": key,
                "file_bytes": sizes[fid][0],
                "region": sizes[fid][1],
            }
        )
        for k, (top, right, bottom, left, enc, sharp, det_score, yaw, kind, label) in enumerate(faces):
            new_faces.append(
                {
                    "face_id": f"{fid}_{k:02d}",
                    "frame_id": fid,
                    "top": top,
                    "right": right,
                    "bottom": bottom,
                    "left": left,
                    "embedding": np.asarray(enc, np.float32).tolist(),
                    "sharpness": float(sharp),
                    "detector_score": float(det_score),
                    "yaw": float(yaw),
                    "kind": kind,
                    "label": label,
                }
            )
    detections = pl.concat([cached_faces, pl.DataFrame(new_faces, schema=DETECTIONS_SCHEMA)])
    order = {fid: i for i, fid in enumerate(r["frame_id"] for r in rows)}
    detections = (
        detections.with_columns(pl.col("frame_id").replace_strict(order, return_dtype=pl.Int64).alias("_o"))
        .sort("_o", "face_id")
        .drop("_o")
    )
    return detections, pl.DataFrame(status_rows, schema=FACE_FRAMES_SCHEMA)


def background_frames(
    run_dir: Path, frames: pl.DataFrame, quality: pl.DataFrame | None, limit: int
) -> list[np.ndarray]:
    """Up to ``limit`` of ``frames``, evenly spaced, each inside its region and
    :data:`BACKGROUND_WIDTH` wide (RGB): what the fitted detector pastes characters onto."""
    regions = {r["frame_id"]: region_of(r) for r in frame_regions(frames, quality).iter_rows(named=True)}
    rows = frames.select("frame_id", "path").to_dicts()
    if len(rows) > limit:
        rows = [rows[round(i * (len(rows) - 1) / max(1, limit - 1))] for i in range(limit)]
    out = []
    for row in rows:
        bgr = read_image(
            Path(run_dir) / row["path"], min_side=BACKGROUND_WIDTH // 2, region=regions.get(row["frame_id"])
        )
        height, width = bgr.shape[:2]
        size = (BACKGROUND_WIDTH, max(16, round(height * BACKGROUND_WIDTH / width)))
        out.append(cv2.cvtColor(cv2.resize(bgr, size, interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2RGB))
    return out


def fitted_detector_file(
    run_dir: Path,
    pictures: ReferencePictures,
    frames: pl.DataFrame,
    quality: pl.DataFrame | None,
    settings: FittedSettings,
    *,
    progress: bool = True,
    refit: bool = False,
) -> tuple[Path, bool, list[str]]:
    """The file of the detector fitted to ``pictures``'s drawn characters on the film's frames
    (``<run>/cache/characters/fitted-<key>.pt``), fitted now unless a file of the same key is
    there (or ``refit``: ``--force``); returns it, whether it was fitted now and the characters
    it finds (those of the pictures that are in the film, :func:`fit_film_detector`). Beside it,
    ``fitted-<key>.onnx`` is what the search runs (:class:`FittedSearch`). Older fits are removed."""
    backgrounds = background_frames(run_dir, frames, quality, settings.backgrounds)
    if not backgrounds:
        raise StageError("no frame to fit the character detector on; run stages extract and quality first")
    key = fit_key(pictures.cutouts, backgrounds, settings)
    folder = Path(run_dir) / CHARACTERS_CACHE
    path = folder / f"fitted-{key}.pt"
    detector = None if refit else FittedDetector.load(path)
    fitted_now = detector is None
    if detector is None:
        detector = fit_film_detector(pictures.cutouts, backgrounds, settings, progress=progress, key=key)
        atomic_write_bytes(path, detector.to_bytes())
    if fitted_now or FittedSearch.load(path.with_suffix(".onnx")) is None:
        atomic_write_bytes(path.with_suffix(".onnx"), detector.onnx_bytes())
    for old in [*folder.glob("fitted-*.pt"), *folder.glob("fitted-*.onnx")]:
        if old.stem != path.stem:
            old.unlink(missing_ok=True)
    return path, fitted_now, detector.names


def _references(
    ref_dir: Path | None, settings: DetectSettings, warnings: list[str]
) -> tuple[ReferenceSet, ReferencePictures]:
    """The human faces' encodings and the drawn characters' cut-outs of ``ref_dir`` (none without
    one); what cannot serve is added to ``warnings``."""
    if ref_dir is None:
        return ReferenceSet(), ReferencePictures()
    refs, pictures, ref_warnings = load_character_references(ref_dir, settings)
    warnings.extend(ref_warnings)
    if len(refs) == 0 and not pictures.cutouts:
        warnings.append(
            f"no usable reference picture in {ref_dir}: every face stays unknown and is clustered for naming"
        )
    return refs, pictures


def save_cutouts(run_dir: Path, pictures: ReferencePictures) -> dict[str, str]:
    """Each drawn character's cut-outs written as transparent PNGs to
    ``<run>/cache/characters/cutouts/`` (the files of an earlier run removed); returns the
    reference picture's path -> its cut-out's file.

    Why: notebook 03's reference sheet shows what the fitted detector learns from, the character
    with its separated background gone, not the box it was cut from: a GrabCut that kept half a
    poster's background looks, as a box, like one that kept the character alone."""
    folder = Path(run_dir) / CHARACTERS_CACHE / "cutouts"
    if not pictures.cutouts and not folder.is_dir():
        return {}
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.png"):
        old.unlink(missing_ok=True)
    files: dict[str, str] = {}
    for name, cutouts in pictures.cutouts.items():
        taken = [t for t in pictures.taken if t.character == name and t.use == "cutout"]
        for number, (t, rgba) in enumerate(zip(taken, cutouts, strict=True)):
            out = folder / f"{len(files):03d}-{number}.png"
            if _write_png(out, rgba):
                files[str(t.path)] = str(out)
    return files


def taken_facts(run_dir: Path, pictures: ReferencePictures) -> list[dict[str, Any]]:
    """The manifest's ``references_taken``: what was taken from each picture, with the file of
    each drawn cut-out (:func:`save_cutouts`, written now)."""
    cutouts = save_cutouts(run_dir, pictures)
    return [
        {**t.as_fact(), **({"cutout": cutouts[str(t.path)]} if str(t.path) in cutouts else {})}
        for t in pictures.taken
    ]


def characters_not_found(faces: pl.DataFrame, references: dict[str, int]) -> list[str]:
    """The characters with usable reference pictures after whom no appearance is named, sorted.

    The pictures a user has of a character often show it from sides, or in a light, the film
    does not, and then the fit finds nothing of it; a still from the film is what finds it
    (docs/characters.md: one still each took held-out creatures from 3 to 11 of 11 shots), so
    the run says which characters need one instead of leaving them to be noticed missing."""
    named = set(faces["character"].drop_nulls().to_list()) if faces.height else set()
    return sorted(name for name, pictures in references.items() if pictures and name not in named)


def not_found_warnings(names: list[str], not_in_film: Sequence[str] = ()) -> list[str]:
    """The run's lines on :func:`characters_not_found` (none when every character was found),
    with what to do; those the fitted detector judged not in the film (``not_in_film``,
    :func:`~diffusion_bunny.models.fitted.detector.fit_film_detector`) in a line of their own.
    Either may be a character of another film (one ``--characters`` folder for a folder of
    films), so the advice is for the ones in this film."""
    left_out = set(not_in_film)
    absent = [name for name in names if name in left_out]
    missed = [name for name in names if name not in left_out]
    still = (
        "add a still from the film of each (notebook 03, 'Add a still from the film', or confirm one "
        "of its likely sightings there; add_still from Python; of a person, where the face looks "
        "toward the camera)"
    )
    lines = []
    if missed:
        lines.append(
            f"{len(missed)} character(s) with reference pictures named in no searched frame: "
            f"{', '.join(missed)}; if one is in this film, {still} or pictures that show them as "
            "the film does, then rerun stage characters"
        )
    if absent:
        lines.append(
            f"{len(absent)} character(s) taken as not in this film (the detector fitted to every "
            f"character found none of them in its frames) and left out of its fit: {', '.join(absent)}; "
            f"if one is in it, {still}, then rerun stage characters"
        )
    return lines


def failed_warnings(failed: pl.DataFrame) -> list[str]:
    """The run's one line on the searched frames whose detection failed (``face_frames`` rows
    of status ``failed``); none when none did."""
    if not failed.height:
        return []
    first = failed.row(0, named=True)
    return [
        f"{failed.height} frame(s) failed face detection and were skipped (first: "
        f"{first['frame_id']}: {first['error']}); rerun stage extract with --force if frame "
        "files are damaged"
    ]


def nothing_found_warnings(found: int, searched: int, drawn_pictures: int, backend: str) -> list[str]:
    """The run's one line when ``searched`` frames gave no appearance at all while nothing but
    human faces was looked for (no drawn character's picture, ``characters.backend: offline``);
    none otherwise.

    Why: offline, drawn characters, animals and creatures are found only from pictures of them
    (docs/characters.md: nothing shipped offline finds them without one), so a cartoon run
    without references ends with an empty table that looks like a broken stage; the line says
    why, and the three ways to find them (pictures, a box around each character in one frame of
    the film, the hub)."""
    if found or not searched or drawn_pictures or backend != "offline":
        return []
    return [
        f"no character found in the {searched} searched frame(s): without pictures of them, "
        "characters.backend 'offline' finds human faces only; for drawn, animal or 3D characters "
        "give a folder with pictures of each (--characters DIR, one sub-folder per character, or "
        "characters.reference_dir), or box each once in a frame of the film (notebook 03, 'Add a "
        "still from the film', or add_still), and rerun stage characters; or set "
        "characters.backend: hub to find them with models from the hub"
    ]


def _counts(
    faces: pl.DataFrame,
    scan: pl.DataFrame,
    failed: int,
    references: dict[str, int],
    edits: pl.DataFrame,
) -> dict[str, Any]:
    """The manifest's counts of a run of stage 03, with the fixes by hand (``edits``) in force
    and those waiting for an appearance the run no longer has (its frame no longer kept, or no
    longer found there): such a fix does nothing until the appearance comes back, and a person
    who made it should not read its silence as the fix lost. Those fixed to none are counted
    apart too: they stay unknown appearances here, and the later stages count them as nobody."""
    per_char = character_counts(faces)
    targets = edit_targets(faces, edits)
    clusters = (
        faces["cluster"].n_unique() - (1 if faces["cluster"].null_count() else 0) if faces.height else 0
    )
    return {
        "frames_scanned": scan.height,
        "frames_failed": failed,
        "frames_with_faces": int(faces["frame_id"].n_unique()) if faces.height else 0,
        "faces": faces.height,
        "named_faces": int(faces["character"].is_not_null().sum()),
        "unknown_faces": int(faces["character"].is_null().sum()),
        "low_confidence_faces": int(faces["low_confidence"].sum()),
        "clusters": int(clusters),
        "characters": {r["character"]: r["faces"] for r in per_char.iter_rows(named=True)},
        "references": references,
        "fixed_by_hand": len({t for t in targets.values() if t is not None}),
        "fixes_waiting": sum(1 for t in targets.values() if t is None),
        "fixed_to_none": int((faces["character"].is_null() & faces["edited"]).sum()) if faces.height else 0,
    }


def _drawn_backend(
    ctx: Context, pictures: ReferencePictures, scan: pl.DataFrame, quality: pl.DataFrame | None
) -> tuple[Path | None, dict[str, Any], tuple[str, Callable[[], HubFinder]] | None]:
    """What finds the drawn characters, by ``characters.backend``: the offline detector fitted to
    ``pictures`` (its file and the facts of its fitting; none without drawn references), or the
    hub's finder (its key, and what makes it once a frame is left to search)."""
    cfg = ctx.cfg.characters
    if cfg.backend == "hub":
        make = functools.partial(HubFinder, cfg.hub, pictures.cutouts)
        return None, {}, (hub_key(cfg.hub, pictures.cutouts), make)
    if not pictures.cutouts:
        return None, {}, None
    started = time.perf_counter()
    fitted, fitted_now, cast = fitted_detector_file(
        ctx.run_dir, pictures, scan, quality, cfg.fitted, progress=ctx.progress, refit=ctx.forced
    )
    facts = {
        "file": str(fitted),
        "characters": pictures.drawn(),
        "not_in_film": sorted(set(pictures.drawn()) - set(cast)),
        "fitted_now": fitted_now,
        "seconds": round(time.perf_counter() - started, 1),
    }
    if fitted_now:  # where the minutes went (characters.fitted.device, .batch_threads)
        facts["device"] = resolve_device(cfg.fitted.device, "characters.fitted.device")
        facts["batch_threads"] = batch_threads(cfg.fitted, facts["device"])
    return fitted, facts, None


def compute(ctx: Context) -> StageOutput:
    """Detect (or reuse the detections of frames that did not change), identify, track, vote and
    cluster: the ``faces``, ``face_frames`` and ``detections`` tables."""
    run_dir, frames, quality, cfg = (
        ctx.run_dir,
        ctx.table("frames"),
        ctx.optional("quality"),
        ctx.cfg.characters,
    )
    # The last run's detections are reused, never its faces: labelling drops sightings (a drawn one
    # under its score, a face on a drawn figure) and widens boxes, which a new threshold or rule must
    # see again. With --force nothing kept is reused (the detector is fitted again too).
    previous = None
    old_detections, old_frames = ctx.own_previous("detections"), ctx.own_previous("face_frames")
    if old_detections is not None and old_frames is not None and not ctx.forced:
        previous = (old_detections, old_frames)
    settings = DetectSettings.from_config(cfg)
    require_detector(settings.detector)
    anchor_old_fixes(ctx.run)
    scan = frames_to_scan(frames, quality, cfg)
    ref_dir = reference_dir(run_dir, cfg)
    warnings = unread_run_references(run_dir, cfg)
    refs, pictures = _references(ref_dir, settings, warnings)
    fitted, fitted_facts, hub = _drawn_backend(ctx, pictures, scan, quality)
    detections, face_frames, facts = detect_faces(
        run_dir,
        scan,
        settings,
        workers=cfg.workers,
        previous=previous,
        quality=quality,
        progress=ctx.progress,
        progress_path=ctx.progress_path,
        fitted=fitted,
        hub=hub,
    )
    failed = face_frames.filter(pl.col("status") == "failed")
    warnings.extend(failed_warnings(failed))
    faces = label_faces(detections, frames, refs, cfg, edits := _fixes(run_dir, ref_dir))
    if fitted is not None:
        fitted_facts["appearances"] = int((faces["kind"] == "drawn").sum())
        facts["fitted"] = fitted_facts
    if hub is not None:
        facts["hub"] = _hub_facts(faces, hub[0])
    references = {**refs.counts(), **{n: len(v) for n, v in pictures.cutouts.items()}}
    facts.update(
        characters_not_found=characters_not_found(faces, references),
        reference_dir=str(ref_dir) if ref_dir else None,
        reference_files=refs.files,
        references_taken=taken_facts(run_dir, pictures),
        thresholds=character_thresholds(refs, cfg),
    )
    # The sharpness of each searched frame's largest face (the subject), beside its status: stage
    # 03's own table, for whoever judges frames by their faces.
    face_frames = (
        face_frames.drop("face_sharpness", strict=False)
        .join(frame_face_sharpness(faces), on="frame_id", how="left")
        .select(list(FACE_FRAMES_SCHEMA))
    )
    return StageOutput(
        tables={"faces": faces, "face_frames": face_frames, "detections": detections},
        counts=_counts(faces, scan, failed.height, references, edits),
        warnings=warnings
        + _found_warnings(
            run_dir, ctx.previous, faces, references, facts, (scan.height, len(pictures.cutouts), cfg.backend)
        ),
        facts=facts,
        # Fixes saved while the stage ran are read again under the tables' locks.
        merge=lambda tables: {
            **tables,
            "faces": apply_appearance_edits(tables["faces"], _fixes(run_dir, ref_dir)),
        },
    )


def _hub_facts(faces: pl.DataFrame, key: str) -> dict[str, Any]:
    """What the hub backend found, for the manifest: its key and its drawn appearances' counts."""
    drawn = faces.filter(pl.col("kind") == "drawn")
    return {
        "key": key,
        "appearances": drawn.height,
        "named": int(drawn["character"].is_not_null().sum()),
        "clusters": int(drawn["cluster"].drop_nulls().n_unique()),
        "noise": int((drawn["character"].is_null() & drawn["cluster"].is_null()).sum()),
    }


def _found_warnings(
    run_dir: Path,
    previous: dict[str, Any] | None,
    faces: pl.DataFrame,
    references: dict[str, int],
    facts: dict,
    searched: tuple[int, int, str],
) -> list[str]:
    """The run's lines on whom it found: characters with pictures named nowhere, nobody found at
    all (``searched``: the frames searched, the drawn characters with pictures, the backend), and
    fixes by hand naming a character whose pictures are gone."""
    return (
        not_found_warnings(facts["characters_not_found"], (facts.get("fitted") or {}).get("not_in_film", ()))
        + nothing_found_warnings(faces.height, *searched)
        + fixes_without_pictures(run_dir, previous, faces, references, facts)
    )


#: Every character the run's reference folder ever gave pictures of (``fixes_without_pictures``):
#: kept beside the fitted detectors, as the manifest a failed or killed run removes cannot.
REFERENCE_NAMES_FILE = "reference_names.json"


def fixes_without_pictures(
    run_dir: Path,
    previous: dict[str, Any] | None,
    faces: pl.DataFrame,
    references: dict[str, int],
    facts: dict[str, Any],
) -> list[str]:
    """A line for the appearances fixed by hand to a character whose reference pictures an earlier
    run had and this one has not (its folder renamed or removed). The fixes keep their name, as a
    name given by a fix alone is a character too, and the run said nothing: after a rename one
    person was two characters, and after a removal a fixed face kept a name nobody else had.
    Said on every run until the pictures are back or the fixes name someone else: the names that
    ever had pictures are kept in the run's :data:`REFERENCE_NAMES_FILE` (and read from the last
    run's manifest, ``previous``, for a run made before it), the ones said in
    ``facts.fixed_names_without_pictures``. A folder still there whose pictures no longer serve
    is not gone (the reference reader says what is wrong with its pictures)."""
    memory = run_dir / CHARACTERS_CACHE / REFERENCE_NAMES_FILE
    last = (previous or {}).get("facts") or {}
    taken = last.get("references_taken") or []
    before = {t.get("character") for t in taken if isinstance(t, dict) and not t.get("problem")}
    with contextlib.suppress(OSError, ValueError, TypeError):
        before |= set(json.loads(memory.read_text()))
    folder = facts.get("reference_dir")
    # Every picture this run read, usable or not (``facts.references_taken``), names a character
    # whose folder is still there.
    now = {name for name, count in references.items() if count}
    now |= {t.get("character") for t in facts.get("references_taken") or []}
    with contextlib.suppress(OSError):  # a read-only run folder: the manifest's names still serve
        atomic_write_bytes(memory, json.dumps(sorted((before | now) - {None})).encode())
    fixed = faces.filter(pl.col("edited").fill_null(False) & pl.col("character").is_not_null())
    gone = [
        (name, n) for name, n in fixed.group_by("character").len().sort("character").iter_rows()
        if name in before - now
    ]  # fmt: skip
    facts["fixed_names_without_pictures"] = [name for name, _ in gone]
    if not gone:
        return []
    listed = ", ".join(f"{name} ({n})" for name, n in gone)
    return [
        f"appearances fixed by hand name characters whose reference pictures are gone since an earlier "
        f"run: {listed}; give the folder its old name back in {folder or 'the reference folder'}, or fix "
        "those appearances again in notebook 03"
    ]


# ---------------------------------------------------------------------------------------------
# A person's fixes


def _fixes(run_dir: Path, ref_dir: Path | None) -> pl.DataFrame:
    """Every fix so far, each name spelt as the reference folder of ``ref_dir`` it names
    (:func:`~diffusion_bunny.stages.characters.tables.spelt_as_known`)."""
    known = reference_images(ref_dir) if ref_dir is not None else {}
    return spelt_as_known(read_appearance_edits(run_dir), known)


def read_appearance_edits(run_dir: str | Path) -> pl.DataFrame:
    """Every fix so far (an empty table with the schema when there is none)."""
    run = Run.open(run_dir)
    if not run.has_table("appearance_edits"):
        return pl.DataFrame(schema=APPEARANCE_EDIT_SCHEMA)
    return with_edit_columns(run.read_table("appearance_edits"))


def fix_appearance(
    run_dir: str | Path, face_id: str, character: str | None, characters: CharactersSettings | None = None
) -> pl.DataFrame:
    """Give one appearance the name ``character`` (None: none of the characters, for a false
    sighting) and update the ``faces`` table at once. ``characters``: the run's settings, whose
    ``reference_dir`` holds characters the name may be another spelling of (``alex`` where the
    folder is ``Alex``).

    The fix goes to the append-only ``appearance_edits`` table (re-applied after any rerun of the
    stage), then into ``faces``; both in one :meth:`Run.commit
    <diffusion_bunny.pipeline.run.Run.commit>`, so a fix and a run of stage 03 never lose each
    other's writes. Returns the updated ``faces`` table."""
    run = Run.open(run_dir)
    name = (
        None
        if character is None or not str(character).strip()
        else check_name(str(character), known_names(run, characters))
    )
    with run.commit("appearance_edits", "faces", by_hand=True) as tables:
        if not run.has_table("faces"):
            raise UserError(f"no appearances in {run.run_dir}; run stage characters first")
        faces = run.read_table("faces")
        if face_id not in set(faces["face_id"].to_list()):
            raise UserError(
                f"appearance {face_id} is not in the faces table of {run.run_dir}; "
                "pick one from notebook 03's strip"
            )
        fixed = faces.filter(pl.col("face_id") == face_id).row(0, named=True)
        raw = _detected_box(run, fixed)
        row = pl.DataFrame(
            {
                "event_id": [uuid.uuid4().hex],
                "ts": [datetime.now(UTC)],
                "face_id": [face_id],
                "character": [name],
                **{key: [fixed[key]] for key in ("frame_id", "kind", "left", "top", "right", "bottom")},
                **{f"raw_{key}": [value] for key, value in zip(BOX, raw, strict=True)},
            },
            schema=APPEARANCE_EDIT_SCHEMA,
        )
        before = anchor_by_id(
            read_appearance_edits(run.run_dir), faces, lambda seen: _detected_box(run, seen)
        )
        tables["appearance_edits"] = pl.concat([before, row])
        tables["faces"] = faces = apply_appearance_edits(faces, row)
    if fixed["character"] not in (None, name):
        _unpromote(promoted_picture(run, characters, face_id, fixed["character"]), run.run_dir)
    return faces


def undo_fix(run_dir: str | Path, face_id: str, cfg: RunConfig) -> pl.DataFrame:
    """Take back every fix of appearance ``face_id`` and label the run again (detections are
    reused: seconds), so the appearance is what stage 03 makes of it: named by its references, or
    unknown in its cluster. Returns the updated ``faces`` table. ``cfg``: the run's settings (the
    notebook's ``cfg``).

    Why: a fix is re-applied after every rerun, and a fix made by mistake (a face marked a false
    sighting, a name given to the wrong face) could only be replaced by another fix: none gave
    the appearance back to its cluster, where naming the cluster names it. The fixes are removed
    from ``appearance_edits`` (its backup keeps the version before), and a reference picture a
    fix took away (:func:`_unpromote`) is put back in its character's folder first, so the
    relabelling names with it again."""
    run = Run.open(Path(run_dir))
    with run.lock(f"undoing the fix of {face_id}", cfg.pipeline.lock_stale_s):
        with run.commit("appearance_edits", "faces", by_hand=True) as tables:
            faces = run.read_table("faces") if run.has_table("faces") else None
            if faces is None or face_id not in set(faces["face_id"].to_list()):
                raise UserError(
                    f"appearance {face_id} is not in the faces table of {run.run_dir}; "
                    "pick one from notebook 03's strip"
                )
            edits = read_appearance_edits(run.run_dir)
            mine = fixes_of(faces, edits, face_id)
            if not mine.any():
                raise UserError(f"appearance {face_id} has no fix to undo (fixes show in notebook 03)")
            tables["appearance_edits"] = edits.filter(~mine)
        _put_back(run, face_id, cfg.characters)  # once the fixes' removal is saved
        return run_stage(Pipeline((STAGE,)), run, "characters", cfg, progress=False)["faces"]


def promoted_picture(run: Run, characters: CharactersSettings | None, face_id: str, name: str) -> Path | None:
    """The reference picture naming a cluster ``name`` took from the human face ``face_id``
    (``<folder>/<name>/<face_id>.png`` in the folder naming writes to), where there is one and it
    still shows that face (:func:`_shows_face`). Drawn characters' pictures are not looked for
    (their ids move with every fit, and their features tell no picture)."""
    folder = run.run_dir / RUN_REFERENCES if characters is None else naming_dir(run.run_dir, characters)
    picture = folder / name / f"{face_id}.png"
    return picture if _shows_face(run, picture, face_id, characters) else None


def _shows_face(run: Run, picture: Path, face_id: str, characters: CharactersSettings | None) -> bool:
    """Whether ``picture`` shows the face that is ``face_id`` in the run's detections. An id is
    the face's place in its frame, which a later run may give another face: the picture is that
    face's only where its face is within :data:`~.references.SAME_PHOTO_DISTANCE` of the face's
    encoding."""
    if not picture.is_file() or not run.has_table("detections"):
        return False
    path = run.table_path("detections")
    with damaged_table(path):
        found = (
            pl.scan_parquet(path, glob=False)
            .filter((pl.col("face_id") == face_id) & (pl.col("kind").fill_null("face") == "face"))
            .select("embedding")
            .collect()
        )
    settings = DetectSettings() if characters is None else DetectSettings.from_config(characters)
    held = _photo(picture, replace(settings, min_face_px=0))
    if found.is_empty() or held is None:
        return False
    distance = float(np.linalg.norm(np.asarray(found["embedding"][0], np.float32) - held[1]))
    return distance < SAME_PHOTO_DISTANCE


def _unpromote(picture: Path | None, run_dir: Path) -> None:
    """Take away a reference picture naming took from an appearance a person has since fixed to
    another name: it went on naming that face's look as the old character (a face fixed to
    "Pianist" stayed one of "Lin Manuel"'s pictures). Kept where it is the character's only
    picture: the character would be lost with it. Set aside in the run's cache
    (:data:`SET_ASIDE`, with the path it came from), not deleted, so that :func:`undo_fix` can
    put it back: an undone fix otherwise left the character one picture short for good."""
    if picture is None:
        return
    with contextlib.suppress(OSError):  # the fix is saved: a folder made read-only since keeps it
        others = [
            p for p in picture.parent.iterdir() if p != picture and p.suffix.lower() in REFERENCE_SUFFIXES
        ]
        if others:
            kept = Path(run_dir) / SET_ASIDE / picture.parent.name / picture.name
            kept.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(kept.with_suffix(".json"), json.dumps({"from": str(picture)}).encode())
            shutil.move(picture, kept)  # the reference folder may be on another drive


def _put_back(run: Run, face_id: str, characters: CharactersSettings) -> None:
    """The reference pictures :func:`_unpromote` set aside for appearance ``face_id``, moved back
    where they came from. One still showing that face only (a later run may have given its id to
    another face). One whose folder is gone, or holds a file of that name, stays set aside, said
    in one warning."""
    for kept in sorted((run.run_dir / SET_ASIDE).glob(f"*/{face_id}.png")):
        try:
            home = Path(json.loads(kept.with_suffix(".json").read_text())["from"])
        except (OSError, ValueError, KeyError, TypeError):  # set aside without its record
            home = naming_dir(run.run_dir, characters) / kept.parent.name / kept.name
        if not _shows_face(run, kept, face_id, characters):
            continue
        if not home.parent.is_dir() or home.exists():
            warnings.warn(
                f"{kept} stays set aside: {home.parent} is gone or holds {home.name} already; "
                "copy it into the character's folder by hand if it should name them again",
                StageWarning,
                stacklevel=3,
            )
            continue
        with contextlib.suppress(OSError):  # a read-only folder: the undo itself still holds
            shutil.move(kept, home)
            kept.with_suffix(".json").unlink(missing_ok=True)


def anchor_old_fixes(run: Run) -> None:
    """Give the fixes an earlier version saved by id alone their appearance's frame and box, from
    the ``faces`` table they were applied to, before this run may renumber its sightings
    (:func:`~.tables.anchor_by_id`); written back, under the tables' locks, only when one moved."""
    if not (run.has_table("appearance_edits") and run.has_table("faces")):
        return
    if not kept_by_id(read_appearance_edits(run.run_dir)):
        return  # every fix holds its box: no table to read or lock, as after the first run
    with run.commit("appearance_edits", "faces", by_hand=True) as tables:
        edits = read_appearance_edits(run.run_dir)
        anchored = anchor_by_id(edits, run.read_table("faces"), lambda seen: _detected_box(run, seen))
        if not anchored.equals(edits):
            tables["appearance_edits"] = anchored


def _detected_box(run: Run, appearance: dict[str, Any]) -> tuple[int | None, ...]:
    """The detector's own box of a drawn ``appearance`` whose box in ``faces`` grew by a face it
    took in (the ``detections`` row of its id, frame and kind), else nulls: what a rerun matches
    the fix against before the boxes grow."""
    box = tuple(appearance[k] for k in BOX)
    if appearance["kind"] != "drawn" or not run.has_table("detections"):
        return (None,) * 4
    path = run.table_path("detections")
    with damaged_table(path):  # one row's box: not the whole table with its embeddings, per fix
        found = (
            pl.scan_parquet(path, glob=False)
            .filter(
                (pl.col("face_id") == appearance["face_id"])
                & (pl.col("frame_id") == appearance["frame_id"])
                & (pl.col("kind") == "drawn")
            )
            .select(BOX)
            .collect()
        )
    if found.is_empty():
        return (None,) * 4
    raw = tuple(int(found[k][0]) for k in BOX)
    return raw if raw != box else (None,) * 4


# ---------------------------------------------------------------------------------------------
# Naming clusters

#: The middle dots that separate the parts of a foreign name written in Japanese (リン・マニュエル)
#: and Chinese (迈克尔·杰克逊): a reference folder so named worked, and naming a cluster after it in
#: notebook 03 was refused.
_NAME_DOTS = "\u00b7\u30fb\uff65"
#: The apostrophe as macOS and phones type it (o\u2019brien) beside the plain one.
_NAME_MARKS = "'\u2019"
_NAME = re.compile(rf"^[\w][\w .{_NAME_MARKS}{_NAME_DOTS}-]{{0,63}}$")


#: Marks that show nothing (variation selectors, the combining grapheme joiner): a name with one
#: prints as the name without it, and would be another character.
_INVISIBLE_MARKS = re.compile("[\u034f\u180b-\u180d\ufe00-\ufe0f\U000e0100-\U000e01ef]")


def _name_pattern(name: str) -> bool:
    """Whether ``name`` is made of what :data:`_NAME` allows. The combining marks Hindi, Thai,
    Tamil and pointed Hebrew write their vowels with (Unicode's ``M`` categories: ``राम``
    is ra, the vowel sign aa, ma) are no ``\\w`` to Python's ``re``, which refused those names
    while their reference folders worked; after a letter (or its marks) they are part of it.
    None that shows nothing (:data:`_INVISIBLE_MARKS`)."""
    if _INVISIBLE_MARKS.search(name):
        return False
    letters = []
    for i, c in enumerate(name):
        if unicodedata.category(c).startswith("M"):
            if i == 0 or unicodedata.category(name[i - 1])[0] not in "LM":
                return False
            c = "a"
        letters.append(c)
    return bool(_NAME.match(name[:1] + "".join(letters[1:])))


def check_name(name: str, known: Iterable[str] = ()) -> str:
    """A character name usable as a folder name, or a user error that says what is allowed.
    Composed (:func:`~diffusion_bunny.models.faces.character_name`), and spelt as the
    character of ``known`` it names whatever the case and whether its words are joined by
    spaces, '-' or '_' (``alice`` given where ``Alice`` is known made a second character, and
    ``alex lacamoire`` where the reference folder is ``alex_lacamoire`` a second kohya folder
    and a second character drawn by stage 08). Where it could name several known characters
    and is spelt as none of them, a user error names them: picking one would be a guess. A
    character ``known`` already is usable as it is spelt, even where a new name could not be (a
    reference folder ``Alex (piano)``, which stage 03 loads and asks a still of, was refused by
    the still picker). The reserved names are refused whatever their case, as the reference
    loader refuses their folders (``Unknown`` named a cluster into a folder every later run
    left out)."""
    name = character_name(name)
    if name.casefold() in RESERVED_NAMES:
        raise UserError(
            f"character name {name!r} is not usable: 'unknown' and 'noise' are what the workspace "
            "calls the appearances it cannot name; choose another name"
        )
    same = sorted({k for k in map(character_name, known) if name_key(k) == name_key(name)})
    if same and _folder_name(name):
        if name in same or len(same) == 1:
            return name if name in same else same[0]
        raise UserError(
            f"character name {name!r} could be any of the characters {', '.join(map(repr, same))} "
            "(names that differ only in case, spaces, '-' or '_'); type one of them as it is spelt"
        )
    if not _name_pattern(name):
        raise UserError(
            f"character name {name!r} is not usable: use letters, digits, spaces, '.', \"'\", '-', '_' "
            "or a middle dot (at most 64, not starting with a symbol), and not 'unknown' or 'noise'"
        )
    return name


def _folder_name(name: str) -> bool:
    """Whether ``name`` names a folder inside another (not the folder itself, its parent, or a
    path): a known name is one, but a hand-edited faces table could hold anything."""
    return bool(name.strip()) and name not in {".", ".."} and not any(c in name for c in "/\\\0")


def known_names(run: Run, characters: CharactersSettings | None = None) -> set[str]:
    """The characters a run knows: named in its appearances, or a folder of pictures where
    naming writes (``characters.reference_dir``, else the run's ``references/``). Without the
    settings (``fix_appearance(run_dir, face_id, name)`` as notebook 03 printed it), also the
    folder stage 03 last read: a character named in no frame was otherwise a new name ("Fat_Bat"
    beside the folder "fat bat", a caption name and a kohya folder of its own)."""
    names = (
        set(run.read_table("faces")["character"].drop_nulls().to_list()) if run.has_table("faces") else set()
    )
    # The names of fixes waiting for their frame (stage 02 left it out for a run): "pianist"
    # typed then was a second character beside the waiting "Pianist" once the frame came back.
    names |= set(read_appearance_edits(run.run_dir)["character"].drop_nulls().to_list())
    folders = [run.run_dir / RUN_REFERENCES if characters is None else naming_dir(run.run_dir, characters)]
    if characters is None:
        read = ((run.read_manifest("characters") or {}).get("facts") or {}).get("reference_dir")
        folders += [Path(read)] if read else []
    for folder in folders:
        if folder.is_dir():
            names |= set(reference_images(folder))
    return names


def face_crop(rgb: np.ndarray, box: tuple[int, int, int, int], *, margin: float = 0.6, min_face: int = 160):
    """The face with ``margin`` of its size on every side, scaled so the face is at least
    ``min_face`` pixels tall: a reference the detector finds again without upsampling tricks."""
    top, right, bottom, left = box
    h, w = bottom - top, right - left
    y0, y1 = max(0, round(top - margin * h)), min(rgb.shape[0], round(bottom + margin * h))
    x0, x1 = max(0, round(left - margin * w)), min(rgb.shape[1], round(right + margin * w))
    crop = rgb[y0:y1, x0:x1]
    if h and h < min_face:
        scale = min_face / h
        crop = cv2.resize(
            crop, (round(crop.shape[1] * scale), round(crop.shape[0] * scale)), interpolation=cv2.INTER_CUBIC
        )
    return crop


def _write_png(out: Path, rgb: np.ndarray) -> bool:
    """``rgb`` (or RGBA, kept transparent) written atomically as the PNG ``out`` (a temporary
    named by pid, swept if killed); False when there is nothing to write."""
    to_bgr = cv2.COLOR_RGBA2BGRA if rgb.ndim == 3 and rgb.shape[2] == 4 else cv2.COLOR_RGB2BGR
    if not rgb.size:
        return False
    ok, png = cv2.imencode(".png", cv2.cvtColor(np.ascontiguousarray(rgb), to_bgr))
    if not ok:
        return False
    atomic_write_bytes(out, png.tobytes())
    return True


def promote_faces(
    run_dir: Path,
    faces: pl.DataFrame,
    frames: pl.DataFrame,
    target: Path,
    settings: DetectSettings,
    *,
    max_faces: int = 5,
    already: list[Path] | None = None,
) -> list[Path]:
    """Save the best faces of ``faces`` (sharpest of the largest, one per frame) as reference images
    in ``target``; only crops that reading the references takes for a photo of one face (the
    detector finds one face and dlib's HOG confirms it, :func:`~.references.photographed_face`)
    are kept. A crop kept on the detector alone (a profile, a small face) was read back as a
    drawing: the person became a drawn character, and a detector was fitted to his face. Nor is
    a crop kept that reading takes for the same photo as one kept before it or already in
    ``target`` (:func:`~.references.same_photo`): each was left out again, with a warning, by
    every later run (naming a second cluster into a character wrote six such copies). The
    pictures of ``target`` a crop was a copy of are added to ``already``, where given."""
    paths = dict(frames.select("frame_id", "path").iter_rows())
    ranked = (
        faces.with_columns((pl.col("bottom") - pl.col("top")).alias("_h"))
        .sort(["_h", "sharpness"], descending=True)
        .unique("frame_id", keep="first", maintain_order=True)
    )
    target.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    ref_settings = replace(settings, min_face_px=0)
    kept = _photos_in(target, ref_settings)
    for row in ranked.iter_rows(named=True):
        if len(written) >= max_faces:
            break
        rgb = read_rgb(Path(run_dir) / paths.get(row["frame_id"], ""))
        if rgb is None:
            continue
        crop = np.ascontiguousarray(face_crop(rgb, (row["top"], row["right"], row["bottom"], row["left"])))
        found = portrait_faces(crop, ref_settings)
        box = (found[0].top, found[0].right, found[0].bottom, found[0].left) if len(found) == 1 else None
        if box is None or not photographed_face(crop, box):
            continue
        mine = (picture_hash(crop), found[0].encoding)
        if (copy := same_photo(mine, kept)) is not None:
            if already is not None and copy not in written and copy not in already:
                already.append(copy)
            continue
        out = target / f"{row['face_id']}.png"
        if _write_png(out, crop):
            written.append(out)
            kept.append((out, *mine))
    return written


def _photo(path: Path, settings: DetectSettings) -> tuple[np.ndarray, np.ndarray] | None:
    """A reference picture's hash and face encoding as reading the references takes them, or
    None where it is no photo of one face (or not a picture)."""
    try:
        rgb = on_grey(read_shrunk(path)[0])
    except (OSError, ValueError, ReferenceProblem):
        return None
    return _photo_of(rgb, settings)


def _copy_in(rgb: np.ndarray, target: Path, settings: DetectSettings) -> Path | None:
    """The picture of the folder ``target`` that reading the references would take ``rgb`` for
    a copy of (:func:`~.references.same_photo`), or None."""
    mine = _photo_of(rgb, settings)
    return None if mine is None else same_photo(mine, _photos_in(target, settings))


def _photos_in(target: Path, settings: DetectSettings) -> list[tuple[Path, np.ndarray, np.ndarray]]:
    """Each photo of one face in the folder ``target`` (none where there is no folder) with its
    hash and face encoding, as :func:`~.references.same_photo` compares them."""
    if not target.is_dir():
        return []
    return [(p, *held) for p in sorted(target.iterdir()) if (held := _photo(p, settings)) is not None]


def _photo_of(rgb: np.ndarray, settings: DetectSettings) -> tuple[np.ndarray, np.ndarray] | None:
    """:func:`_photo` of a picture in memory."""
    found = [
        f for f in portrait_faces(rgb, settings) if photographed_face(rgb, (f.top, f.right, f.bottom, f.left))
    ]
    return (picture_hash(rgb), found[0].encoding) if len(found) == 1 else None


#: A drawn character's reference is its box with this share of the box's size around it on every
#: side: then the box lies just inside the rectangle that reading the reference cuts it out from
#: (GrabCut from ``references.GRABCUT_INSET`` of the picture in: 0.22 / (1 + 2 * 0.22) = 0.15).
DRAWN_MARGIN = 0.22


def promote_drawn(
    run_dir: Path, drawn: pl.DataFrame, frames: pl.DataFrame, target: Path, *, max_pictures: int = 5
) -> list[Path]:
    """Save the best sightings of ``drawn`` (a cluster of drawn characters: the largest and
    sharpest, one per frame) as reference pictures in ``target``, each its box with
    :data:`DRAWN_MARGIN` around it, so that reading the references cuts the character out again."""
    paths = dict(frames.select("frame_id", "path").iter_rows())
    ranked = (
        drawn.with_columns(
            ((pl.col("bottom") - pl.col("top")) * (pl.col("right") - pl.col("left"))).alias("_a")
        )
        .sort(["_a", "sharpness"], descending=True)
        .unique("frame_id", keep="first", maintain_order=True)
    )
    target.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for row in ranked.head(max_pictures).iter_rows(named=True):
        rgb = read_rgb(Path(run_dir) / paths.get(row["frame_id"], ""))
        if rgb is None:
            continue
        box = (row["top"], row["right"], row["bottom"], row["left"])
        out = target / f"{row['face_id']}.png"
        if _write_png(out, face_crop(rgb, box, margin=DRAWN_MARGIN, min_face=0)):
            written.append(out)
    return written


def add_still(
    run_dir: str | Path,
    frame_id: str,
    box: tuple[int, int, int, int],
    name: str,
    characters: CharactersSettings,
) -> Path:
    """A still from the film as a reference picture of ``name``: the frame's ``box`` (left, top,
    right, bottom in full-resolution pixels, drawn around the character) with
    :data:`DRAWN_MARGIN` around it, written to the reference folder (``characters.reference_dir``,
    or the run's own ``references/``; ``characters`` is the run's ``characters`` settings).
    Returns the file; the next run of stage 03 fits on it.

    Why: the pictures a user has of a character (a sprite, a poster, a portrait render) show it
    from sides the film may not, and what the fitted detector lacks for animals and creatures is
    the film's own poses. One still per character found the held-out 3D creatures in all 11
    shots the stills were not taken from, against 3 with their pictures alone; where the pictures
    already show the film's look it changes little (docs/characters.md, "A still from the film")."""
    run = Run.open(Path(run_dir))
    name = check_name(name, known_names(run, characters))
    frames = run.read_table("frames").filter(pl.col("frame_id") == frame_id)
    if frames.is_empty():
        raise UserError(f"frame {frame_id} is not a frame of {run.run_dir}; pick one in notebook 03")
    path = run.run_dir / frames["path"][0]
    rgb = read_rgb(path)
    if rgb is None:
        raise UserError(f"frame file {path} cannot be read; rerun stage extract with --force")
    left, top, right, bottom = _box_of(box, frame_id)
    height, width = rgb.shape[:2]
    left, top, right, bottom = max(0, left), max(0, top), min(width, right), min(height, bottom)
    if min(right - left, bottom - top) < MIN_SUBJECT_PX:
        raise UserError(
            f"the box {tuple(box)} on frame {frame_id} ({width}x{height}) is under {MIN_SUBJECT_PX} px a "
            "side inside the frame: draw it around the character"
        )
    crop = still_crop(rgb, (left, top, right, bottom))
    faces = _still_faces(crop, characters)
    small = next((tall for tall, front in faces if front and tall < characters.trust_min_px), None)
    if small is not None:
        raise UserError(
            f"the face in the box on frame {frame_id} is {small} px tall, under characters.trust_min_px "
            f"({characters.trust_min_px}): too small to tell {name} by, other people's faces would be "
            f"named {name}; box {name} in a frame where the face is larger, or add a photo"
        )
    if not any(photographed for _, photographed in faces) and _named_by_face(run, name):
        seen = "a face turned away from the camera" if faces else "no face"
        raise UserError(
            f"{name} is a person, named by the face, and the box on frame {frame_id} holds {seen}: "
            "a still of it names nobody (people are told apart by faces seen from the front); box "
            f"{name} in a frame where the face looks toward the camera, or add a photo"
        )
    target = naming_dir(run.run_dir, characters) / name
    copy = _copy_in(crop, target, replace(DetectSettings.from_config(characters), min_face_px=0))
    if copy is not None:  # reading would leave it out, with a warning on every run
        raise UserError(
            f"the still of frame {frame_id} is the same photo of {name}'s face as {copy} (a copy adds "
            f"nothing); box {name} in a shot where the face looks otherwise"
        )
    target.mkdir(parents=True, exist_ok=True)
    out = target / f"still_{frame_id}_{left}_{top}_{right}_{bottom}.png"
    if not _write_png(out, crop):  # pragma: no cover - the box is at least 16 px a side
        raise UserError(f"the still of frame {frame_id} could not be encoded")
    return out


def still_crop(rgb: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """The frame's ``box`` (left, top, right, bottom, inside the frame) with :data:`DRAWN_MARGIN`
    around it; where the frame's edge cuts the margin off, neutral grey
    (:data:`~diffusion_bunny.stages.characters.references.GREY`) stands in for it. Why: a
    character cut by the frame's edge (the ones the fit misses, so the ones a user boxes) lay on
    the still's border, which GrabCut takes for background: of an owl at the right edge it kept one
    wing's outline and a foot (9% of the still, against 27-41% for the film's other stills)."""
    left, top, right, bottom = box
    mx, my = round(DRAWN_MARGIN * (right - left)), round(DRAWN_MARGIN * (bottom - top))
    height, width = rgb.shape[:2]
    out = np.empty((bottom - top + 2 * my, right - left + 2 * mx, 3), np.uint8)
    out[:] = GREY
    y0, y1, x0, x1 = max(0, top - my), min(height, bottom + my), max(0, left - mx), min(width, right + mx)
    out[y0 - (top - my) : y1 - (top - my), x0 - (left - mx) : x1 - (left - mx)] = rgb[y0:y1, x0:x1, :3]
    return out


def _still_faces(crop: np.ndarray, characters: CharactersSettings) -> list[tuple[int, bool]]:
    """The faces the detector finds in a still: each one's height and whether dlib's detector of
    photographed faces finds it too (:func:`~.references.photographed_face`: a human face seen
    from the front, which is what reading the references takes as a person's face).

    Why both: a still becomes a reference face as a portrait does, at any size; a face of 24 px
    from the film gave an encoding close to another person's, and the next run named that person
    after the still (the Hamilton clip's pianist boxed at the piano named the singer), so a face
    under ``characters.trust_min_px`` is refused. And a face the detector finds but dlib's does not
    (a profile: the Hamilton clip's pianist seen from the side) is no face to reading the
    references, which left such a still of a person out with a warning while the run's own line
    went on asking for a still."""
    settings = replace(DetectSettings.from_config(characters), min_face_px=0)
    return [
        (face.bottom - face.top, photographed_face(crop, (face.top, face.right, face.bottom, face.left)))
        for face in portrait_faces(crop, settings)
    ]


def _named_by_face(run: Run, name: str) -> bool:
    """Whether the last run of stage 03 took ``name`` for a person: a human face among its
    reference pictures, or faces named after it and no drawn figure (a face on a drawn
    character's figure is named after the character too: it is not a person for that)."""
    manifest = run.read_manifest("characters") or {}
    taken = (manifest.get("facts") or {}).get("references_taken") or []
    if any(t.get("character") == name and t.get("use") == "face" for t in taken):
        return True
    if not run.has_table("faces"):
        return False
    kinds = set(run.read_table("faces").filter(pl.col("character") == name)["kind"].to_list())
    return kinds == {"face"}


def promote_cluster(
    run: Run, cluster: str, name: str, cfg: RunConfig, *, max_faces: int = 5
) -> tuple[list[Path], pl.DataFrame]:
    """The run-folder half of naming a cluster: its best faces written as reference images of
    ``name`` (in ``characters.reference_dir``, or the run's own ``references/``); returns the files
    written and the cluster's faces. :func:`name_cluster` then
    re-labels the run."""
    name = check_name(name, known_names(run, cfg.characters))
    faces = run.read_table("faces")
    # A cluster typed as None or a number: no cluster, said below (compared, polars warned first).
    members = faces.filter(pl.col("cluster") == cluster) if isinstance(cluster, str) else faces.clear()
    if members.height == 0:
        known = sorted(c for c in faces["cluster"].unique().to_list() if c)
        raise UserError(
            f"no unknown faces in cluster {cluster!r} (clusters now: {', '.join(known) or 'none'})"
        )
    target = naming_dir(run.run_dir, cfg.characters) / name
    existed = target.exists()
    frames = run.read_table("frames")
    already: list[Path] = []
    if (members["kind"] == "drawn").all():
        written = promote_drawn(run.run_dir, members, frames, target, max_pictures=max_faces)
    else:
        settings = DetectSettings.from_config(cfg.characters)
        # Only faces stage 03 would name by themselves: crops of small or turned ones were written
        # as references (upscaled, as add_still refuses), named none of the cluster, and the
        # naming said it had worked.
        usable = members.filter(pl.Series(trusted_faces(members, cfg.characters)))
        if usable.is_empty():
            raise UserError(
                f"the faces of {cluster} are too small or too turned for stage 03 to name by themselves "
                f"(under characters.trust_min_px {cfg.characters.trust_min_px} px, or turned past "
                f"trust_max_yaw): fix them one by one in notebook 03's fixer, or name a cluster of "
                f"larger faces of {name}"
            )
        written = promote_faces(
            run.run_dir, usable, frames, target, settings, max_faces=max_faces, already=already
        )
    if not written:
        if not existed:  # an empty folder made here was a character "with no pictures" in every run
            with contextlib.suppress(OSError):
                target.rmdir()
        if already:  # named before: its faces were left unnamed by the labelling, not by the detector
            raise UserError(
                f"the faces of {cluster} that could serve are {name}'s reference photos already "
                f"({', '.join(p.name for p in already[:3])}): nothing to add. Stage 03 names no face "
                "too small or too turned by itself (characters.trust_min_px, trust_max_yaw): fix those "
                "one by one in notebook 03's fixer"
            )
        raise UserError(
            f"no face of {cluster} could serve as a reference (the detector does not find them again "
            "in a crop); add photos of this person to "
            f"{target} by hand"
        )
    return written, members


def _box_of(box: Any, frame_id: str) -> tuple[int, int, int, int]:
    """A still's box as four whole pixels (left, top, right, bottom): a box typed as text or with
    a value missing was a ValueError naming nothing."""
    try:
        left, top, right, bottom = (round(float(v)) for v in box)
    except (TypeError, ValueError, OverflowError):
        raise UserError(
            f"the box {box!r} for frame {frame_id} is not four numbers (left, top, right, bottom in the "
            "frame's pixels); draw it with notebook 03's still picker or type four numbers"
        ) from None
    return left, top, right, bottom


def name_cluster(
    run_dir: str | Path,
    cluster: str,
    name: str,
    cfg: RunConfig,
    *,
    max_faces: int = 5,
) -> dict[str, Any]:
    """Name an unknown cluster: its best faces become reference images of ``name`` (in
    ``characters.reference_dir``, or the run's own ``references/``) and the run is re-labelled
    (detections are reused, so this takes seconds). ``cfg`` is the run's configuration (the
    notebook's ``cfg``). Returns what changed. The run folder is held from the start: a run
    busy with it refused the relabelling after the pictures were written, and the next run named
    the cluster anyway (under a second spelling, neither)."""
    run = Run.open(Path(run_dir))
    with run.lock(f"naming {cluster}", cfg.pipeline.lock_stale_s):
        written, members = promote_cluster(run, cluster, name, cfg, max_faces=max_faces)
        name = written[0].parent.name  # as promote_cluster spelt it (composed, the known spelling)
        after = run_stage(Pipeline((STAGE,)), run, "characters", cfg, progress=False)["faces"]
    member_ids = members["face_id"].implode()
    return {
        "cluster": cluster,
        "character": name,
        "references_added": [str(p) for p in written],
        "faces_of_cluster_named": int(
            after.filter(pl.col("face_id").is_in(member_ids) & (pl.col("character") == name)).height
        ),
        "cluster_faces": members.height,
        "named_faces": int((after["character"] == name).sum()),
    }
