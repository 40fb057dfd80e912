"""Probe and stream-decode a movie once, with memory independent of its length.

PyAV (FFmpeg's libraries) decodes with frame threading, as fast as the ``ffmpeg`` command. The
expensive part after decoding is colour conversion: turning every 720p frame into an RGB array
costs more than decoding it. So the analysis copy of each frame is taken straight from the
decoded YUV planes by integer-stride sampling (no conversion of the full frame), and only the
frames that are kept are ever converted to full-size RGB (:func:`frame_to_bgr`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import av
import cv2
import numpy as np
from av.video.reformatter import VideoReformatter

from diffusion_bunny.media.probe import VideoInfo, probe_video

__all__ = [
    "Decoded",
    "VideoInfo",
    "VideoReader",
    "analysis_copy",
    "decode_threads",
    "frame_to_bgr",
    "probe_video",
    "shrink_upright",
    "thumbnail",
    "thumbnail_size",
]

# 8-bit planar YUV layouts whose planes can be sampled directly; anything else (10-bit, RGB,
# NV12 from some decoders) goes through libswscale at analysis size, slower but correct.
_PLANAR_YUV = {"yuv420p", "yuvj420p", "yuv422p", "yuvj422p", "yuv444p", "yuvj444p"}


@dataclass
class Decoded:
    """One decoded frame: its place in the stream and its small analysis copies."""

    index: int
    time_s: float
    frame: av.VideoFrame
    small_bgr: np.ndarray
    small_gray: np.ndarray


def _plane(frame: av.VideoFrame, i: int) -> np.ndarray:
    plane = frame.planes[i]
    buf = np.frombuffer(plane, np.uint8)
    return buf.reshape(plane.height, plane.line_size)[:, : plane.width]


def analysis_copy(frame: av.VideoFrame, step: int, detect_factor: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Small copies of ``frame``: BGR for the shot detector and grayscale for sharpness and
    motion, sampled straight from the decoded planes.

    The gray copy takes every ``step``-th pixel of the luma plane; the detector's BGR copy every
    ``step * detect_factor``-th pixel of luma and chroma. Stride sampling reads a small fraction
    of the pixels and converts no full frame, which is why it hides behind decoding;
    PySceneDetect's own downscaling is an integer-factor resize too, so its detectors see the
    same kind of image. Detection runs on the smaller copy because its HSV conversion is the
    most expensive per-frame step, and colour statistics of a 128-pixel-wide frame still tell
    shots apart.
    """
    name = frame.format.name
    if name in _PLANAR_YUV:
        y_full = _plane(frame, 0)
        gray = np.ascontiguousarray(y_full[::step, ::step])
        dstep = step * detect_factor
        y = gray[::detect_factor, ::detect_factor] if detect_factor > 1 else gray
        h, w = y.shape
        u_full, v_full = _plane(frame, 1), _plane(frame, 2)
        cstep_y = max(1, round(dstep * u_full.shape[0] / frame.height))
        cstep_x = max(1, round(dstep * u_full.shape[1] / frame.width))
        u = u_full[::cstep_y, ::cstep_x][:h, :w]
        v = v_full[::cstep_y, ::cstep_x][:h, :w]
        if u.shape != y.shape:
            u = cv2.resize(np.ascontiguousarray(u), (w, h), interpolation=cv2.INTER_NEAREST)
            v = cv2.resize(np.ascontiguousarray(v), (w, h), interpolation=cv2.INTER_NEAREST)
        ycrcb = cv2.merge([np.ascontiguousarray(y), np.ascontiguousarray(v), np.ascontiguousarray(u)])
        return cv2.cvtColor(ycrcb, cv2.COLOR_YCrCb2BGR), gray
    w = max(1, frame.width // step)
    h = max(1, frame.height // step)
    bgr = frame.reformat(width=w, height=h, format="bgr24").to_ndarray()
    gray = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
    if detect_factor > 1:
        bgr = np.ascontiguousarray(bgr[::detect_factor, ::detect_factor])
    return bgr, gray


def thumbnail_size(coded_width: int, coded_height: int, width: int) -> tuple[int, int]:
    """(width, height) of a thumbnail ``width`` pixels wide before rotation (height even)."""
    return width, max(2, round(coded_height * width / coded_width / 2) * 2)


def thumbnail(
    frame: av.VideoFrame, width: int, rotation: int, reformatter: VideoReformatter | None = None
) -> np.ndarray:
    """Upright BGR thumbnail ``width`` pixels wide (before rotation), scaled by libswscale
    (through ``reformatter`` if given: see :func:`frame_to_bgr`)."""
    w, h = thumbnail_size(frame.width, frame.height, width)
    r = reformatter or VideoReformatter()
    small = r.reformat(frame, width=w, height=h, format="bgr24", interpolation="AREA").to_ndarray()
    return rotate_image(small, rotation)


def shrink_upright(bgr: np.ndarray, size: tuple[int, int], rotation: int) -> np.ndarray:
    """The thumbnail of a frame already converted by :func:`frame_to_bgr` (upright): ``size`` is
    :func:`thumbnail_size` (before rotation), averaged by OpenCV's area filter. Unlike
    :func:`thumbnail` it needs no PyAV call, so it can run off the decoding thread."""
    w, h = size
    if (rotation // 90) % 2:
        w, h = h, w
    return cv2.resize(bgr, (w, h), interpolation=cv2.INTER_AREA)


def rotate_image(img: np.ndarray, rotation: int) -> np.ndarray:
    """Apply display-matrix rotation the way players (and ``ffmpeg``'s autorotate) do.

    PyAV's ``frame.rotation`` is the display matrix's angle, counter-clockwise; turning the
    stored picture by that angle (``np.rot90`` with k = angle / 90) shows it upright. The tests
    compare the result with ffmpeg's own autorotated decode.
    """
    k = (rotation // 90) % 4
    if k == 0:
        return img
    return np.ascontiguousarray(np.rot90(img, k=k))


def frame_to_bgr(
    frame: av.VideoFrame, rotation: int, reformatter: VideoReformatter | None = None
) -> np.ndarray:
    """Full-size upright BGR array of a kept frame (the only full conversion we pay for).

    ``reformatter``: one :class:`av.video.reformatter.VideoReformatter` kept by the caller for
    all its frames. ``frame.to_ndarray(format=...)`` makes a new one per frame, and with it a
    new libswscale context: measured on 720p, 1.17 ms a frame against 0.27 ms when the context
    is reused (same pixels). A reformatter must stay on one thread."""
    r = reformatter or VideoReformatter()
    return rotate_image(r.reformat(frame, format="bgr24").to_ndarray(), rotation)


def decode_threads() -> int:
    """Decoder threads for a streaming pass: two more than FFmpeg's own choice (cores + 1).

    With frame threading each thread decodes one frame, and the thread asking for the next
    frame waits until the oldest one in flight is done. Stage 01's own work on each frame
    (analysis copies, shot signals, the network now and then) runs between those requests, on
    the same thread; two more frames in flight let the decoder go on through it instead of
    idling. Measured on the 10-minute 720p real loop (2 cores, interleaved runs): stage 01 took
    31.8-36.0 s with FFmpeg's 3 threads, 28.0-30.8 s with 5 (4-8 within noise of 5), while
    ``ffmpeg -threads 5`` alone decodes no faster than with its default. FFmpeg caps its own
    choice at 16 threads, and so do we."""
    return min(16, len(os.sched_getaffinity(0)) + 3)


@dataclass
class DecodeReport:
    """How the decode went, filled in while :meth:`VideoReader.frames` runs."""

    decoded: int = 0
    last_time_s: float = 0.0
    stopped_by_error: str | None = None


class VideoReader:
    """Streams a movie once: yields :class:`Decoded` frames in presentation order.

    Timestamps are presentation times (pts * time_base) relative to the stream start, so
    variable-frame-rate footage keeps its real timing; ``index`` counts decoded frames. A stream
    that breaks part-way (truncated or corrupt data) ends the iteration instead of raising; the
    :attr:`report` says how much was decoded and :meth:`loss_message` how much was lost.
    """

    def __init__(
        self,
        path: str | Path,
        analysis_width: int = 256,
        keyframes_only: bool = False,
        detect_width: int | None = None,
    ):
        self.info = probe_video(path)
        self.analysis_step = max(1, self.info.width // analysis_width)
        detect_step = max(1, self.info.width // (detect_width or analysis_width))
        self.detect_factor = max(1, detect_step // self.analysis_step)
        self.keyframes_only = keyframes_only
        self.report = DecodeReport()

    def frames(self) -> Iterator[Decoded]:
        """Decode the whole stream once."""
        info = self.info
        report = self.report
        container = av.open(str(info.path), metadata_errors="ignore")
        try:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            stream.codec_context.thread_count = decode_threads()
            if self.keyframes_only:
                stream.codec_context.skip_frame = "NONKEY"
            tb = float(stream.time_base) if stream.time_base else None
            start = stream.start_time * tb if (stream.start_time is not None and tb) else None
            index = 0
            iterator = container.decode(stream)
            while True:
                try:
                    frame = next(iterator)
                except StopIteration:
                    break
                except av.error.FFmpegError as exc:
                    report.stopped_by_error = str(exc.strerror or exc)
                    break
                t = frame.time
                if t is None:
                    t = index / info.fps
                else:
                    if start is None:
                        start = t
                    t = max(0.0, round(t - start, 6))
                if self.keyframes_only:
                    # Only keyframes come out of the decoder; their index in the full stream is
                    # recovered from the presentation time.
                    index = round(t * info.fps)
                small_bgr, small_gray = analysis_copy(frame, self.analysis_step, self.detect_factor)
                report.decoded += 1
                report.last_time_s = t
                yield Decoded(index, t, frame, small_bgr, small_gray)
                index += 1
        finally:
            container.close()

    def loss_message(self) -> str | None:
        """One sentence on how much of the movie could not be decoded, or None if nothing was."""
        info, report = self.info, self.report
        frame_s = 1.0 / info.fps
        expected_s = info.duration_s
        got_s = report.last_time_s + frame_s
        lost_s = (expected_s - got_s) if expected_s else 0.0
        if report.stopped_by_error is None and lost_s <= max(0.5, 3 * frame_s):
            return None
        if expected_s and lost_s > 0:
            pct = 100.0 * lost_s / expected_s
            msg = (
                f"{info.path.name}: decoding stopped at {got_s:.1f} s of {expected_s:.1f} s; "
                f"the last {lost_s:.1f} s ({pct:.0f}%) were lost"
            )
        else:
            msg = f"{info.path.name}: decoding stopped early after {report.decoded} frames"
        if report.stopped_by_error:
            msg += f" (FFmpeg: {report.stopped_by_error})"
        return msg + "; the file is truncated or corrupt, frames before that point were kept"
