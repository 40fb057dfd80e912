"""Stage 01 ``extract``: one decode pass gives shots, per-shot motion and well-chosen frames.

Everything happens in a single streaming pass with bounded memory:

* the analysis copy of each frame (see :mod:`diffusion_bunny.media.video`) feeds the shot-boundary
  detector (:mod:`diffusion_bunny.stages.extract.detectors.base`: the TransNetV2 cascade by
  default, TransNetV2
  alone, or a PySceneDetect detector), a motion measure (mean absolute difference of a tiny
  grayscale copy) and a cheap sharpness measure (variance of the Laplacian) used only to pick
  the best frame of a window;
* frames pass through a delay line as long as the detector's look-ahead (the cascade waits for
  TransNetV2's right-hand context), so a cut the detector reports late still splits the shots at
  the right frame; only the current frames are held, so memory does not grow with the movie;
* each open shot keeps only a handful of candidate frames (best of its start window, best per
  bucket for its middle, a sliding best for its end); when the shot closes its candidates are
  saved as small thumbnails and the ones chosen for the current motion threshold as full JPEGs.

Scores are computed once and the threshold is applied separately (:func:`classify_shots`,
:func:`select_keyframes`), so notebook 01's slider can re-classify shots without decoding again.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import polars as pl
from tqdm.auto import tqdm

from diffusion_bunny.config import ExtractionConfig
from diffusion_bunny.media.images import laplacian_variance
from diffusion_bunny.media.video import Decoded, VideoReader, frame_to_bgr, thumbnail
from diffusion_bunny.pipeline.progress import ProgressFile
from diffusion_bunny.stages.extract.keyframes import FrameCandidate, OpenShot
from diffusion_bunny.stages.extract.tables import (
    BOUNDARY_CANDIDATES_SCHEMA,
    CANDIDATES_SCHEMA,
    FRAMES_SCHEMA,
    SHOTS_SCHEMA,
    frame_id_for,
)


@dataclass
class ExtractResult:
    """Tables and facts produced by :func:`extract_frames`."""

    shots: pl.DataFrame
    frames: pl.DataFrame
    candidates: pl.DataFrame
    info: dict[str, Any]
    warnings: list[str]
    boundary_candidates: pl.DataFrame = field(
        default_factory=lambda: pl.DataFrame(schema=BOUNDARY_CANDIDATES_SCHEMA)
    )


class _Writer:
    """Encodes kept frames to JPEG and writes them on a small thread pool: OpenCV releases the
    GIL while it encodes, so the decode loop keeps going. Only numpy arrays cross into the pool:
    PyAV conversions stay on the decoding thread (concurrent swscale calls from several threads
    were seen to deadlock)."""

    def __init__(self, quality: int):
        self.params = [cv2.IMWRITE_JPEG_QUALITY, quality]
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="jpeg")
        self.pending: deque[Future[None]] = deque()

    def _write(self, path: Path, bgr: np.ndarray) -> None:
        ok, buf = cv2.imencode(".jpg", bgr, self.params)
        if not ok:  # pragma: no cover - OpenCV only fails on invalid arrays
            raise RuntimeError(f"JPEG encoding failed for {path}")
        path.write_bytes(buf.tobytes())

    def submit(self, path: Path, bgr: np.ndarray) -> None:
        while len(self.pending) > 16:
            self.pending.popleft().result()
        self.pending.append(self.pool.submit(self._write, path, bgr))

    def close(self) -> None:
        try:
            for fut in self.pending:
                fut.result()
        finally:
            self.pool.shutdown(wait=True)


def extract_frames(
    movie: str | Path,
    cfg: ExtractionConfig,
    run_dir: str | Path,
    *,
    movie_key: str | None = None,
    progress: bool = True,
    progress_path: Path | None = None,
) -> ExtractResult:
    """Decode ``movie`` once and write ``frames/`` and ``thumbs/`` under ``run_dir``.

    The images are first written to staging folders that replace the old ones only when the
    pass completes, so a failure leaves the previous results as they were.
    """
    run_dir = Path(run_dir)
    reader = VideoReader(
        movie, cfg.analysis_width, keyframes_only=cfg.method == "keyframe", detect_width=cfg.detect_width
    )
    info = reader.info
    fps = info.fps
    if movie_key is None:
        movie_key = hashlib.sha256(str(Path(movie).resolve()).encode()).hexdigest()[:8]
    window = max(1, round(cfg.keyframe_window_seconds * fps))
    requested = cfg.detector
    if cfg.uses_transnetv2 and cfg.method == "keyframe":
        # Keyframe-only decoding gives frames seconds apart; TransNetV2 reads motion between
        # consecutive frames, so the content detector compares the keyframes instead.
        cfg = cfg.model_copy(update={"detector": "content"})
    from diffusion_bunny.stages.extract.detectors import make_boundaries
    from diffusion_bunny.stages.extract.detectors.transnet import ModelHandle

    # TransNetV2 alone needs the model from frame 75 on: load it now, in the background. The
    # cascade starts loading it at its first doubtful candidate.
    model = (
        ModelHandle(cfg.device, runtime=cfg.runtime, start=cfg.detector == "transnetv2")
        if cfg.uses_transnetv2
        else None
    )
    detector = make_boundaries(cfg, fps, model)
    delay = max(1, detector.lookahead + 1)
    stage_frames = run_dir / f".frames.tmp{os.getpid()}"
    stage_thumbs = run_dir / f".thumbs.tmp{os.getpid()}"
    for d in (stage_frames, stage_thumbs):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    writer = _Writer(cfg.jpeg_quality)
    out_w, out_h = info.display_size

    shots: list[dict[str, Any]] = []
    cand_rows: list[dict[str, Any]] = []
    frame_rows: list[dict[str, Any]] = []
    pending_cuts: list[int] = []
    line: deque[tuple[Decoded, float, float | None]] = deque()
    current: OpenShot | None = None
    interval_next = 0.0
    interval_window = min(cfg.keyframe_window_seconds, cfg.interval_seconds)
    interval_window_end = 0.0
    interval_best: FrameCandidate | None = None
    prev_tiny: np.ndarray | None = None

    def save_full(c: FrameCandidate, shot_id: int, role: str) -> None:
        fid = frame_id_for(movie_key, c.index)
        rel = f"frames/{fid}.jpg"
        writer.submit(stage_frames / f"{fid}.jpg", frame_to_bgr(c.frame, info.rotation))
        frame_rows.append(
            {
                "frame_id": fid,
                "frame_index": c.index,
                "timestamp_s": c.time_s,
                "shot_id": shot_id,
                "path": rel,
                "width": out_w,
                "height": out_h,
                "role": role,
            }
        )

    def save_candidate(c: FrameCandidate, shot_id: int, role: str) -> None:
        name = f"{frame_id_for(movie_key, c.index)}.jpg"
        writer.submit(stage_thumbs / name, thumbnail(c.frame, cfg.thumb_width, info.rotation))
        cand_rows.append(
            {
                "shot_id": shot_id,
                "role": role,
                "frame_index": c.index,
                "timestamp_s": c.time_s,
                "analysis_sharpness": c.sharp,
                "thumb_path": f"thumbs/{name}",
            }
        )

    def close_shot(shot: OpenShot, end_index: int, end_s: float) -> None:
        motion = shot.motion
        kind = "static" if motion < cfg.motion_threshold else "dynamic"
        shots.append(
            {
                "shot_id": shot.shot_id,
                "start_frame": shot.start,
                "end_frame": end_index,
                "start_s": shot.start_s,
                "end_s": end_s,
                "n_frames": end_index - shot.start,
                "motion": motion,
                "kind": kind,
            }
        )
        if cfg.method == "shots":
            picks = shot.candidates()
            saved: set[int] = set()
            for role in ("start", "middle", "end"):
                c = picks.get(role)
                if c is None:
                    continue
                save_candidate(c, shot.shot_id, role)
                wanted = role == "middle" or kind == "dynamic"
                if wanted and c.index not in saved:
                    saved.add(c.index)
                    save_full(c, shot.shot_id, role)

    def flush_interval() -> None:
        nonlocal interval_best
        if interval_best is not None and current is not None:
            save_candidate(interval_best, current.shot_id, "interval")
            save_full(interval_best, current.shot_id, "interval")
            interval_best = None

    def commit(d: Decoded, sharp: float, diff: float | None) -> None:
        nonlocal current, interval_next, interval_best, interval_window_end
        while pending_cuts and pending_cuts[0] <= d.index:
            cut = pending_cuts.pop(0)
            if current is not None and cut > current.start:
                flush_interval()
                # The new shot starts at this frame; with keyframe-only decoding the reported
                # cut may fall between two decoded frames, and shots must stay contiguous.
                close_shot(current, d.index, d.time_s)
                current = None
        if current is None:
            current = OpenShot(len(shots), d.index, d.time_s, window)
        cand = FrameCandidate(d.index, d.time_s, sharp, d.frame)
        current.add(cand, diff)
        if cfg.method == "keyframe":
            save_candidate(cand, current.shot_id, "keyframe")
            save_full(cand, current.shot_id, "keyframe")
        elif cfg.method == "interval":
            # One frame per tick: the sharpest within the keyframe window after the tick.
            if interval_best is not None and d.time_s >= interval_window_end:
                flush_interval()
            if interval_best is None and d.time_s >= interval_next:
                interval_best = cand
                interval_window_end = d.time_s + interval_window
                interval_next = (d.time_s // cfg.interval_seconds + 1) * cfg.interval_seconds
            elif interval_best is not None and sharp > interval_best.sharp:
                interval_best = cand

    started = time.perf_counter()
    bar = tqdm(
        total=info.declared_frames,
        unit="frame",
        desc=(desc := f"extract {info.path.name}"),
        disable=not progress,
        mininterval=0.5,
    )
    reporter = ProgressFile(progress_path, desc, info.declared_frames, "frame")
    last_time = 0.0
    last_index = -1
    try:
        tiny_size = None
        for n, d in enumerate(reader.frames()):
            gray = d.small_gray
            if tiny_size is None:
                tiny_size = (max(8, gray.shape[1] // 4), max(8, gray.shape[0] // 4))
            tiny = cv2.resize(gray, tiny_size, interpolation=cv2.INTER_AREA)
            diff = None if prev_tiny is None else float(cv2.norm(tiny, prev_tiny, cv2.NORM_L1)) / tiny.size
            prev_tiny = tiny
            cuts = detector.push(d.index, d.small_bgr)
            if cuts:
                pending_cuts.extend(cuts)
                pending_cuts.sort()
            line.append((d, laplacian_variance(gray), diff))
            while len(line) > delay:
                commit(*line.popleft())
            last_time, last_index = d.time_s, d.index
            if n % 32 == 31:
                bar.update(32)
                reporter.update(n + 1)
        bar.update(reader.report.decoded % 32)
        reporter.update(reader.report.decoded, force=True)
        if last_index >= 0:
            pending_cuts.extend(detector.finish(last_index))
            pending_cuts.sort()
        while line:
            commit(*line.popleft())
        if current is not None:
            flush_interval()
            end_index = last_index + 1
            close_shot(current, end_index, last_time + 1.0 / fps)
        writer.close()
    except BaseException:
        writer.pool.shutdown(wait=True, cancel_futures=True)
        shutil.rmtree(stage_frames, ignore_errors=True)
        shutil.rmtree(stage_thumbs, ignore_errors=True)
        raise
    finally:
        bar.close()
        reporter.close()

    if reader.report.decoded == 0:
        shutil.rmtree(stage_frames, ignore_errors=True)
        shutil.rmtree(stage_thumbs, ignore_errors=True)
        from diffusion_bunny.errors import BadInputError

        raise BadInputError(f"{info.path}: no frame could be decoded; the file is corrupt")

    for final_dir, staged in ((run_dir / "frames", stage_frames), (run_dir / "thumbs", stage_thumbs)):
        old = run_dir / f".{final_dir.name}.old{os.getpid()}"
        if final_dir.exists():
            final_dir.rename(old)
        staged.rename(final_dir)
        shutil.rmtree(old, ignore_errors=True)

    warnings = []
    loss = reader.loss_message()
    if loss:
        warnings.append(loss)
    elapsed = time.perf_counter() - started
    facts = {
        "movie": str(info.path),
        "container": info.container,
        "codec": info.codec,
        "coded_width": info.width,
        "coded_height": info.height,
        "width": out_w,
        "height": out_h,
        "rotation": info.rotation,
        "fps": fps,
        "duration_s": info.duration_s,
        "declared_frames": info.declared_frames,
        "decoded_frames": reader.report.decoded,
        "decoded_until_s": round(last_time, 3),
        "analysis_step": reader.analysis_step,
        "detect_step": reader.analysis_step * reader.detect_factor,
        "detector": cfg.detector,
        "detector_requested": requested,
        "threshold": cfg.effective_threshold,
        "method": cfg.method,
        "seconds": round(elapsed, 3),
        "frames_per_second": round(reader.report.decoded / elapsed, 1) if elapsed else None,
    }
    facts.update(detector.facts())
    return ExtractResult(
        shots=pl.DataFrame(shots, schema=SHOTS_SCHEMA),
        frames=pl.DataFrame(frame_rows, schema=FRAMES_SCHEMA).sort("frame_index"),
        candidates=pl.DataFrame(cand_rows, schema=CANDIDATES_SCHEMA),
        info=facts,
        warnings=warnings,
        boundary_candidates=pl.DataFrame(detector.candidate_rows(), schema=BOUNDARY_CANDIDATES_SCHEMA),
    )
