"""Stage 01 ``extract``: one decode pass gives shots, per-shot motion and well-chosen frames.

Everything happens in a single streaming pass with bounded memory:

* the analysis copy of each frame (see :mod:`diffusion_bunny.media.video`) feeds the shot-boundary
  detector (:mod:`.detectors`: the TransNetV2 cascade by default, TransNetV2 alone, or a
  PySceneDetect detector), a motion measure (mean absolute difference of a tiny grayscale copy)
  and a cheap sharpness measure (variance of the Laplacian) used only to pick the best frame of a
  window;
* frames pass through a delay line as long as the detector's look-ahead (the cascade waits for
  TransNetV2's right-hand context), so a cut the detector reports late still splits the shots at
  the right frame; only the current frames are held, so memory does not grow with the movie;
* each open shot keeps only a handful of candidate frames (best of its start window, best per
  bucket for its middle, a sliding best for its end); when the shot closes its candidates are
  saved as small thumbnails and the ones chosen for the current motion threshold as full JPEGs.

Scores are computed once and the threshold is applied separately
(:func:`~.keyframes.classify_shots`, :func:`~.keyframes.select_keyframes`), so notebook 01's
slider can re-classify shots without decoding again. ``frames/`` and ``thumbs/`` are written into
staging folders swapped in only when the pass completes.
"""

from __future__ import annotations

import hashlib
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import polars as pl
from av.video.reformatter import VideoReformatter
from tqdm.auto import tqdm

from diffusion_bunny.errors import BadInputError
from diffusion_bunny.logs import bar_options
from diffusion_bunny.media.images import laplacian_variance, opencv_threads
from diffusion_bunny.media.video import (
    DEINTERLACE_SETTING,
    Decoded,
    DecodeReport,
    Display,
    ShotProfile,
    VideoInfo,
    VideoReader,
    analysis_in_video_range,
    frame_to_bgr,
    rotate_box,
    shrink_upright,
    thumbnail,
    thumbnail_size,
)
from diffusion_bunny.pipeline.atomic import staged_folder
from diffusion_bunny.pipeline.contract import Context, StageOutput
from diffusion_bunny.pipeline.progress import ProgressFile
from diffusion_bunny.stages.extract.detectors import ContentSettings, make_boundaries, shortest_shot
from diffusion_bunny.stages.extract.keyframes import FrameCandidate, OpenShot
from diffusion_bunny.stages.extract.picturebox import (
    BoxDecision,
    decide_boxes,
    sample_box,
    to_display,
)
from diffusion_bunny.stages.extract.settings import ExtractSettings
from diffusion_bunny.stages.extract.tables import (
    BOUNDARY_CANDIDATES_SCHEMA,
    BOX_COLUMNS,
    CANDIDATES_SCHEMA,
    FRAMES_SCHEMA,
    SHOTS_SCHEMA,
    frame_id_for,
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

    def _write(self, path: Path, bgr: np.ndarray, shrink: Callable[[np.ndarray], np.ndarray] | None) -> None:
        if shrink is not None:
            bgr = shrink(bgr)
        ok, buf = cv2.imencode(".jpg", bgr, self.params)
        if not ok:  # pragma: no cover - OpenCV only fails on invalid arrays
            raise RuntimeError(f"JPEG encoding failed for {path}")
        try:
            path.write_bytes(buf.tobytes())
        except OSError as exc:  # a full disk fails in write(), which names no file
            exc.filename = exc.filename or str(path)
            raise

    def submit(
        self, path: Path, bgr: np.ndarray, shrink: Callable[[np.ndarray], np.ndarray] | None = None
    ) -> None:
        """Write ``bgr`` as a JPEG at ``path`` (first shrunk by ``shrink`` on the pool, if given)."""
        while len(self.pending) > 16:
            self.pending.popleft().result()
        self.pending.append(self.pool.submit(self._write, path, bgr, shrink))

    def close(self) -> None:
        try:
            for fut in self.pending:
                fut.result()
        finally:
            self.pool.shutdown(wait=True)


class _ShotAssembler:
    """Turns the frames leaving the delay line into shots, keyframe candidates and saved frames.

    It holds what the pass knows between two frames: the open shot, the cuts reported but not yet
    reached, the interval method's pick, and the rows of the tables so far.
    """

    def __init__(
        self,
        cfg: ExtractSettings,
        movie_key: str,
        info: Any,
        folders: tuple[Path, Path],
        writer: _Writer,
        sampled: tuple[int, int, int, int] | None = None,
    ):
        self.cfg = cfg
        self.movie_key = movie_key
        #: The picture box of a sample of the film taken before the pass (:func:`sample_box`).
        self.sampled = sampled
        self.display = Display.of(info)
        self.rotation = info.rotation
        self.size = self.display.size
        self.stored = (info.width, info.height)
        # Shots shorter than this (seconds shown: shortest_shot) are kept but give no keyframes
        # (too short to sample).
        self.min_shot_s = shortest_shot(cfg.min_shot_seconds, info.fps)[1]
        self.frames_dir, self.thumbs_dir = folders
        self.writer = writer
        # One libswscale context for every frame converted here (see frame_to_bgr); this object
        # lives on the decoding thread.
        self.reformatter = VideoReformatter()
        self.window = max(1, round(cfg.keyframe_window_seconds * info.fps))
        self.keyframe_gap = round((cfg.keyframe_gap_seconds or 0.0) * info.fps)
        self.shots: list[dict[str, Any]] = []
        # Per shot: the lit share of every stored row and column (for its picture box).
        self.profiles: list[ShotProfile] = []
        self.cand_rows: list[dict[str, Any]] = []
        self.frame_rows: list[dict[str, Any]] = []
        self.pending_cuts: list[int] = []
        self.current: OpenShot | None = None
        # Interval method: one frame per tick, the sharpest within the keyframe window after it.
        self.interval_next = 0.0
        self.interval_window = min(cfg.keyframe_window_seconds, cfg.interval_seconds)
        self.interval_window_end = 0.0
        self.interval_best: FrameCandidate | None = None
        # Keyframe method: the shot and time of the last keyframe saved.
        self.last_keyframe: tuple[int, float] | None = None

    def add_cuts(self, cuts: list[int]) -> None:
        if cuts:
            self.pending_cuts.extend(cuts)
            self.pending_cuts.sort()

    def save_full(self, c: FrameCandidate, shot_id: int, role: str) -> np.ndarray:
        """Write the full frame and add its row; returns the upright BGR array it was made from."""
        fid = frame_id_for(self.movie_key, c.index)
        bgr = frame_to_bgr(c.frame, self.display, self.reformatter)
        self.writer.submit(self.frames_dir / f"{fid}.jpg", bgr)
        width, height = self.size
        self.frame_rows.append(
            {
                "frame_id": fid,
                "frame_index": c.index,
                "timestamp_s": c.time_s,
                "shot_id": shot_id,
                "path": f"frames/{fid}.jpg",
                "width": width,
                "height": height,
                "role": role,
            }
        )
        return bgr

    def save_candidate(
        self, c: FrameCandidate, shot_id: int, role: str, bgr: np.ndarray | None = None
    ) -> None:
        """Write the candidate's thumbnail and add its row. With the frame's full ``bgr`` already
        converted (it is also saved full), the thumbnail is shrunk from it on the writer's pool
        instead of by libswscale on this thread: this thread also decodes, and every
        millisecond it spends elsewhere is decoding time lost."""
        name = f"{frame_id_for(self.movie_key, c.index)}.jpg"
        if bgr is None:
            self.writer.submit(
                self.thumbs_dir / name,
                thumbnail(c.frame, self.cfg.thumb_width, self.display, self.reformatter),
            )
        else:
            size = thumbnail_size(*self.display.upright, self.cfg.thumb_width)
            self.writer.submit(
                self.thumbs_dir / name, bgr, partial(shrink_upright, size=size, rotation=self.rotation)
            )
        self.cand_rows.append(
            {
                "shot_id": shot_id,
                "role": role,
                "frame_index": c.index,
                "timestamp_s": c.time_s,
                "analysis_sharpness": c.sharp,
                "thumb_path": f"thumbs/{name}",
            }
        )

    def close_shot(self, shot: OpenShot, end_index: int, end_s: float, whole_movie: bool = False) -> None:
        motion = shot.motion
        kind = "static" if motion < self.cfg.motion_threshold else "dynamic"
        # A confirmed cut is never dropped to make shots long enough: a shot shorter (in
        # presentation time) than min_shot_seconds is kept, marked, and sampled for no keyframe
        # (its few frames are often a flash, a whip or the blend of a transition). A shot that is
        # the whole movie (a clip under min_shot_seconds, one frame) is no flash: it is sampled
        # whatever its length, or such a movie would give an empty dataset.
        too_short = end_s - shot.start_s < self.min_shot_s and not whole_movie
        self.shots.append(
            {
                "shot_id": shot.shot_id,
                "start_frame": shot.start,
                "end_frame": end_index,
                "start_s": shot.start_s,
                "end_s": end_s,
                "n_frames": end_index - shot.start,
                "motion": motion,
                "kind": kind,
                "too_short": too_short,
            }
        )
        if self.cfg.method != "shots" or too_short:
            return
        picks = shot.candidates()
        saved: set[int] = set()
        for role in ("start", "middle", "end"):
            c = picks.get(role)
            if c is None:
                continue
            wanted = role == "middle" or kind == "dynamic"
            bgr = None
            if wanted and c.index not in saved:
                saved.add(c.index)
                bgr = self.save_full(c, shot.shot_id, role)
            self.save_candidate(c, shot.shot_id, role, bgr)
        # The extras of a long shot depend on its kind (what they add to: the middle frame, or
        # start, middle and end); both kinds' are candidates (roles "extra_static" and
        # "extra_dynamic" where they differ), so notebook 01's slider shows what a rerun at
        # another motion threshold saves (it showed this kind's extras for either).
        static = {c.index: c for c in shot.extras(self.keyframe_gap, [picks["middle"].index])}
        dynamic = {
            c.index: c for c in shot.extras(self.keyframe_gap, sorted({c.index for c in picks.values()}))
        }
        mine = static if kind == "static" else dynamic
        for index in sorted(static.keys() | dynamic.keys()):
            c = static.get(index) or dynamic[index]
            role = (
                "extra"
                if index in static and index in dynamic
                else f"extra_{'static' if index in static else 'dynamic'}"
            )
            bgr = None
            if index in mine and index not in saved:
                saved.add(index)
                bgr = self.save_full(c, shot.shot_id, "extra")
            self.save_candidate(c, shot.shot_id, role, bgr)

    def flush_interval(self) -> None:
        if self.interval_best is not None and self.current is not None:
            bgr = self.save_full(self.interval_best, self.current.shot_id, "interval")
            self.save_candidate(self.interval_best, self.current.shot_id, "interval", bgr)
            self.interval_best = None

    def commit(self, d: Decoded, sharp: float, diff: float | None) -> None:
        """One frame leaves the delay line: close the shot if a cut was reported at or before it,
        then add it to the open shot."""
        while self.pending_cuts and self.pending_cuts[0] <= d.index:
            cut = self.pending_cuts.pop(0)
            if self.current is not None and cut > self.current.start:
                self.flush_interval()
                # The new shot starts at this frame; with keyframe-only decoding the reported
                # cut may fall between two decoded frames, and shots must stay contiguous.
                self.close_shot(self.current, d.index, d.time_s)
                self.current = None
        if self.current is None:
            self.current = OpenShot(len(self.shots), d.index, d.time_s, self.window)
            self.profiles.append(ShotProfile())
        self.profiles[-1].add(d.profiles)
        cand = FrameCandidate(d.index, d.time_s, sharp, d.frame)
        self.current.add(cand, diff)
        if self.cfg.method == "keyframe":
            self._keyframe(cand, self.current.shot_id)
        elif self.cfg.method == "interval":
            self._interval(cand, d.time_s)

    def _keyframe(self, cand: FrameCandidate, shot: int) -> None:
        """Keyframe method: a codec keyframe is saved when it is its shot's first or comes
        ``interval_seconds`` or more after the last one saved there; one closer is a candidate
        alone (role ``near_keyframe``). An all-intra master (ProRes, DNxHD, Motion JPEG: every
        frame a keyframe) had every frame written to disk, and a broadcast stream (a keyframe
        every half second) two a second."""
        last = self.last_keyframe
        if last is not None and last[0] == shot and cand.time_s - last[1] < self.cfg.interval_seconds - 1e-6:
            self.save_candidate(cand, shot, "near_keyframe")
            return
        self.last_keyframe = (shot, cand.time_s)
        bgr = self.save_full(cand, shot, "keyframe")
        self.save_candidate(cand, shot, "keyframe", bgr)

    def _interval(self, cand: FrameCandidate, time_s: float) -> None:
        if self.interval_best is not None and time_s >= self.interval_window_end:
            self.flush_interval()
        if self.interval_best is None and time_s >= self.interval_next:
            self.interval_best = cand
            self.interval_window_end = time_s + self.interval_window
            step = self.cfg.interval_seconds
            self.interval_next = (time_s // step + 1) * step
        elif self.interval_best is not None and cand.sharp > self.interval_best.sharp:
            self.interval_best = cand

    def finish(
        self,
        last_index: int,
        last_time: float,
        fps: float,
        duration_s: float | None = None,
        picture_end_s: float | None = None,
    ) -> None:
        """Close the last shot at the end of the movie, then give every shot its picture box.
        ``duration_s``: the movie's length, where the last frame decoded is not its end (keyframes
        only: the last keyframe, which may be seconds before it; the last shot was cut to one
        frame and marked too short). ``picture_end_s``: where the file says its picture ends,
        which the last frame's mean length may overshoot: a variable-rate film's last frame
        lasts its own time (1/29.97 s), not the film's mean frame's (1/19.7), and its last shot
        ended after the film."""
        if self.current is not None:
            self.flush_interval()
            whole = not self.shots
            end_index, end_s = last_index + 1, last_time + 1.0 / fps
            if picture_end_s is not None and last_time < picture_end_s < end_s:
                end_s = picture_end_s
            if duration_s is not None and duration_s > end_s:
                end_index, end_s = max(end_index, round(duration_s * fps)), duration_s
            self.close_shot(self.current, end_index, end_s, whole_movie=whole)
        self.boxes = self.picture_boxes()

    def picture_boxes(self) -> BoxDecision:
        """Each shot's picture box (:mod:`.picturebox`) in display pixels, written into the
        shot rows; with ``picture_box: off`` the full frame."""
        if self.cfg.picture_box == "off":
            decision = BoxDecision([(0, 0, *self.stored)] * len(self.shots), ["off"] * len(self.shots), None)
        else:
            decision = decide_boxes(
                self.profiles,
                [s["n_frames"] for s in self.shots],
                self.stored,
                [s["start_s"] for s in self.shots],
                self.sampled,
            )
        for shot, box, source in zip(self.shots, decision.boxes, decision.sources, strict=True):
            shot.update(zip(BOX_COLUMNS, self.shown(box), strict=True), box_source=source)
        return decision

    def shown(self, box: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
        """A box in stored pixels as a box in the saved frames' pixels (square, rotated)."""
        upright = self.display.upright
        return rotate_box(
            to_display(box, self.stored, upright), upright, self.rotation, self.display.mirrored
        )


def _detector(cfg: ExtractSettings, fps: float, full_range: bool = True) -> tuple[ExtractSettings, Any]:
    """The configured boundary detector (and the config it really runs with)."""
    if cfg.uses_transnetv2 and cfg.method == "keyframe":
        # Keyframe-only decoding gives frames seconds apart; TransNetV2 reads motion between
        # consecutive frames, so the content detector compares the keyframes instead.
        cfg = cfg.model_copy(update={"detector": ContentSettings()})
    # TransNetV2 alone needs the model from frame 75 on: load it now, in the background. The
    # cascade starts loading it at its first doubtful candidate.
    detector = cfg.detector
    model = detector.model(start=detector.needs_model_at_once) if detector.uses_transnetv2 else None
    return cfg, make_boundaries(cfg, fps, model, full_range=full_range)


def _decode(
    reader: VideoReader,
    detector: Any,
    assembler: _ShotAssembler,
    *,
    progress: bool,
    progress_path: Path | None,
) -> tuple[int, float]:
    """The single pass: every decoded frame feeds the detector and the motion and sharpness
    measures, then waits in the delay line until no cut can still be reported before it.
    Returns the index and time of the last frame decoded."""
    info = reader.info
    delay = max(1, detector.lookahead + 1)
    line: deque[tuple[Decoded, float, float | None]] = deque()
    desc = f"extract {info.path.name}"
    bar = tqdm(total=info.declared_frames, unit="frame", desc=desc, disable=not progress, **bar_options(0.5))
    reporter = ProgressFile(progress_path, desc, info.declared_frames, "frame")
    last_time, last_index = 0.0, -1
    prev_tiny: np.ndarray | None = None
    tiny_size: tuple[int, int] | None = None
    try:
        for n, d in enumerate(reader.frames()):
            gray = d.small_gray
            if tiny_size is None:
                tiny_size = (max(8, gray.shape[1] // 4), max(8, gray.shape[0] // 4))
            tiny = cv2.resize(gray, tiny_size, interpolation=cv2.INTER_AREA)
            diff = None if prev_tiny is None else float(cv2.norm(tiny, prev_tiny, cv2.NORM_L1)) / tiny.size
            prev_tiny = tiny
            assembler.add_cuts(detector.push(d.index, d.small_bgr, d.time_s))
            line.append((d, laplacian_variance(gray), diff))
            while len(line) > delay:
                assembler.commit(*line.popleft())
            last_time, last_index = d.time_s, d.index
            if n % 32 == 31:
                bar.update(32)
                reporter.update(n + 1)
        bar.update(reader.report.decoded % 32)
        reporter.update(reader.report.decoded, force=True)
        if last_index >= 0:
            assembler.add_cuts(detector.finish(last_index))
        while line:
            assembler.commit(*line.popleft())
    finally:
        bar.close()
        reporter.close()
    return last_index, last_time


def extract_frames(
    movie: str | Path,
    cfg: ExtractSettings,
    run_dir: str | Path,
    *,
    movie_key: str | None = None,
    progress: bool = True,
    progress_path: Path | None = None,
) -> StageOutput:
    """Decode ``movie`` once and write ``frames/`` and ``thumbs/`` under ``run_dir``.

    The images are first written to staging folders that replace the old ones only when the
    pass completes, so a failure leaves the previous results as they were.
    """
    run_dir = Path(run_dir)
    reader = VideoReader(
        movie,
        cfg.analysis_width,
        keyframes_only=cfg.method == "keyframe",
        detect_width=cfg.detect_width,
        deinterlace=DEINTERLACE_SETTING[cfg.deinterlace],
        # Every 4th frame is plenty for a box that must hold for the whole shot (and costs a
        # quarter of 0.36 ms a 1080p frame on the decoding thread).
        profile_every=0 if cfg.picture_box == "off" else PROFILE_EVERY,
        sample_profiles=cfg.picture_box != "off",
    )
    info = reader.info
    sampled = sample_box(reader.sample, (info.width, info.height))
    if movie_key is None:
        movie_key = hashlib.sha256(str(Path(movie).resolve()).encode()).hexdigest()[:8]
    requested = cfg.detector.name
    cfg, detector = _detector(cfg, info.fps, not analysis_in_video_range(info))
    started = time.perf_counter()
    with staged_folder(run_dir / "frames") as frames_dir, staged_folder(run_dir / "thumbs") as thumbs_dir:
        writer = _Writer(cfg.jpeg_quality)
        try:
            assembler = _ShotAssembler(cfg, movie_key, info, (frames_dir, thumbs_dir), writer, sampled)
            with opencv_threads(1):
                last_index, last_time = _decode(
                    reader, detector, assembler, progress=progress, progress_path=progress_path
                )
            end_s = None  # keyframes only: the end of the movie, at most a group of pictures on
            if cfg.method == "keyframe" and reader.report.stopped_by_error is None and info.duration_s:
                end_s = min(info.duration_s, last_time + reader.report.longest_gap_s + 1.0 / info.fps)
            whole_read = reader.report.stopped_by_error is None
            assembler.finish(last_index, last_time, info.fps, end_s, info.duration_s if whole_read else None)
            writer.close()
        except BaseException:
            writer.pool.shutdown(wait=True, cancel_futures=True)
            raise
        if reader.report.decoded == 0:
            raise BadInputError(f"{info.path}: no frame could be decoded; the file is corrupt")
    elapsed = time.perf_counter() - started
    warnings = list(info.warnings)
    boxes = assembler.boxes
    if boxes.black_shots:
        whose = "the full frame" if boxes.film is None else "their neighbours' or the film's picture box"
        warnings.append(
            f"{boxes.black_shots} shot(s) are black throughout: no picture box of their own, {whose} is used"
        )
    warnings += _joins(info, reader.report)
    facts = {
        **_movie_facts(reader, last_time),
        "picture_box": _box_facts(assembler),
        "detector": cfg.detector.name,
        "detector_requested": requested,
        "sample_box": list(sampled) if sampled else None,
        "threshold": cfg.effective_threshold,
        "method": cfg.method,
        "seconds": round(elapsed, 3),
        "frames_per_second": round(reader.report.decoded / elapsed, 1) if elapsed else None,
        "damaged_packets": reader.report.damaged_packets,
        "damaged_frames": reader.report.damaged_frames,
        "timestamp_resets": reader.report.timestamp_resets,
        "resized_frames": reader.report.resized_frames,
        **detector.facts(),
    }
    loss = reader.loss_message()
    return _output(assembler, detector, facts, warnings + ([loss] if loss else []))


def _joins(info: VideoInfo, report: DecodeReport) -> list[str]:
    """What a movie of joined pieces (``cat a.ts b.ts``, a stream that changed quality) had done
    to it: pieces of another size scaled, times run on across each join."""
    out = []
    if report.resized_frames:
        out.append(
            f"{info.path.name}: {report.resized_frames} frame(s) are stored at another size than its "
            "first (a joined piece, a stream that changed quality); they are scaled to "
            f"{info.width}x{info.height}"
        )
    if report.timestamp_resets:
        out.append(
            f"{info.path.name}: its timestamps start again {report.timestamp_resets} time(s) (pieces of "
            "a recording joined); the times of shots and frames run on across each join"
        )
    return out


#: Frames between two picture-box profiles (see ``VideoReader(profile_every=)``).
PROFILE_EVERY = 4


def _box_facts(assembler: _ShotAssembler) -> dict[str, Any]:
    """How the shots' picture boxes were decided, for the manifest and notebook 01."""
    boxes = assembler.boxes
    film = list(assembler.shown(boxes.film)) if boxes.film is not None else None
    sources: dict[str, int] = {}
    for source in boxes.sources:
        sources[source] = sources.get(source, 0) + 1
    return {"film_box": film, "sources": sources, "black_shots": boxes.black_shots}


def _movie_facts(reader: VideoReader, last_time: float) -> dict[str, Any]:
    info = reader.info
    out_w, out_h = info.display_size
    return {
        "movie": str(info.path),
        "container": info.container,
        "codec": info.codec,
        # As stored (coded), the shape of a stored pixel, and as shown (square pixels, rotated).
        "coded_width": info.width,
        "coded_height": info.height,
        "sample_aspect": f"{info.sample_aspect.numerator}:{info.sample_aspect.denominator}",
        "width": out_w,
        "height": out_h,
        "pix_fmt": info.pix_fmt,
        "bit_depth": info.bit_depth,
        "hdr": info.hdr,
        "tone_mapped": info.hdr is not None,
        "field_order": info.field_order,
        "interlaced_flag": info.interlaced_flag,
        "interlace_check": reader.interlace,
        "deinterlaced": reader.deinterlace,
        "rotation": info.rotation,
        "mirrored": info.mirrored,
        "fps": info.fps,
        "duration_s": info.duration_s,
        "declared_frames": info.declared_frames,
        "decoded_frames": reader.report.decoded,
        "decoded_until_s": round(last_time, 3),
        "analysis_step": reader.analysis_step,
        "detect_step": reader.analysis_step * reader.detect_factor,
    }


def _output(
    assembler: _ShotAssembler, detector: Any, facts: dict[str, Any], warnings: list[str]
) -> StageOutput:
    shots_table = pl.DataFrame(assembler.shots, schema=SHOTS_SCHEMA)
    frame_cols = [c for c in FRAMES_SCHEMA if c not in BOX_COLUMNS]
    frames_table = (
        pl.DataFrame(assembler.frame_rows, schema={c: FRAMES_SCHEMA[c] for c in frame_cols})
        .join(shots_table.select("shot_id", *BOX_COLUMNS), on="shot_id", how="left")
        .select(list(FRAMES_SCHEMA))
        .sort("frame_index")
    )
    boundary_table = pl.DataFrame(detector.candidate_rows(), schema=BOUNDARY_CANDIDATES_SCHEMA)
    counts = {
        "shots": shots_table.height,
        "frames": frames_table.height,
        "static_shots": int((shots_table["kind"] == "static").sum()),
        "dynamic_shots": int((shots_table["kind"] == "dynamic").sum()),
        "too_short_shots": int(shots_table["too_short"].sum()),
        "decoded_frames": facts["decoded_frames"],
        "boundary_candidates": boundary_table.height,
    }
    if frames_table.is_empty() and counts["too_short_shots"]:
        warnings = [
            *warnings,
            f"no frame kept: every one of the {counts['shots']} shot(s) is shorter than "
            "extract.min_shot_seconds, and such shots give no frame; lower it (e.g. --set "
            "extract.min_shot_seconds=0.1) and rerun stage extract",
        ]
    return StageOutput(
        tables={
            "shots": shots_table,
            "frames": frames_table,
            "keyframe_candidates": pl.DataFrame(assembler.cand_rows, schema=CANDIDATES_SCHEMA),
            "boundary_candidates": boundary_table,
        },
        counts=counts,
        warnings=warnings,
        facts=facts,
    )


def compute(ctx: Context) -> StageOutput:
    """Stage 01 on a run: its movie, decoded once."""
    return extract_frames(
        ctx.run.movie,
        ctx.cfg.extract,
        ctx.run_dir,
        movie_key=ctx.run.movie_key,
        progress=ctx.progress,
        progress_path=ctx.progress_path,
    )
