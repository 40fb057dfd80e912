"""Probe and stream-decode a movie once, with memory independent of its length.

PyAV (FFmpeg's libraries) decodes with frame threading, as fast as the ``ffmpeg`` command. The
expensive part after decoding is colour conversion: turning every 720p frame into an RGB array
costs more than decoding it. So the analysis copy of each frame is taken straight from the
decoded YUV planes by integer-stride sampling (no conversion of the full frame), and only the
frames that are kept are ever converted to full-size RGB (:func:`frame_to_bgr`).

A film as released is not always stored as it is shown, and the conversion of a kept frame
makes it so (:class:`Display`): non-square pixels (anamorphic DVD and broadcast) are resampled to
the display aspect, the rotation of phone footage is applied, and HDR video (PQ or HLG) is
tone-mapped to SDR (:mod:`diffusion_bunny.media.hdr`). Interlaced video is deinterlaced for
every frame by FFmpeg's ``bwdif`` filter (:class:`Deinterlacer`) once ``idet`` has confirmed on
the pictures that the flags are right (:func:`interlace_verdict`).
"""

from __future__ import annotations

import bisect
import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import av
import cv2
import numpy as np
from av.video.reformatter import VideoReformatter

from diffusion_bunny.errors import BadInputError
from diffusion_bunny.media import hdr as hdr_tone
from diffusion_bunny.media.probe import VideoInfo, picture_stream, probe_video, repeats_a_frame

__all__ = [
    "DecodeReport",
    "Decoded",
    "Deinterlacer",
    "Display",
    "MonotonicClock",
    "VideoInfo",
    "VideoReader",
    "analysis_copy",
    "decode_past_damage",
    "decode_threads",
    "frame_to_bgr",
    "interlace_decision",
    "interlace_verdict",
    "luma_profiles",
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
    #: Lit share of every stored row and column (:func:`luma_profiles`), on the frames the reader
    #: profiles (every ``profile_every``-th), else None.
    profiles: tuple[np.ndarray, np.ndarray] | None = None


@dataclass(frozen=True)
class Display:
    """How a stored frame becomes the picture people see: its size in square pixels before
    rotation (the sample aspect ratio applied), the rotation, the HDR transfer to tone-map, and
    whether the display matrix mirrors it (after the turn)."""

    upright: tuple[int, int]
    rotation: int = 0
    hdr: str | None = None
    full_range: bool = False
    mirrored: bool = False

    @classmethod
    def of(cls, info: VideoInfo) -> Display:
        """The display of a probed movie."""
        return cls(info.upright_size, info.rotation, info.hdr, info.color_range == 2, info.mirrored)

    @property
    def size(self) -> tuple[int, int]:
        """Width and height as shown (after rotation)."""
        w, h = self.upright
        return (h, w) if (self.rotation // 90) % 2 else (w, h)


def _plane(frame: av.VideoFrame, i: int) -> np.ndarray:
    plane = frame.planes[i]
    buf = np.frombuffer(plane, np.uint8)
    return buf.reshape(plane.height, plane.line_size)[:, : plane.width]


def _sample(plane: np.ndarray, step_y: int, step_x: int) -> np.ndarray:
    """Every ``step_y``-th row and ``step_x``-th column of ``plane``, contiguous. The rows are
    copied first (whole lines, a memory copy) and the columns taken from that: numpy gathers a
    2-D stride in both directions at half the speed (70 against 32 microseconds for 720p luma
    at a step of 5), on the thread that feeds the decoder every frame."""
    rows = np.ascontiguousarray(plane[::step_y]) if step_y > 1 else plane
    return np.ascontiguousarray(rows[:, ::step_x])


def analysis_in_video_range(info: VideoInfo) -> bool:
    """Whether :func:`analysis_copy`'s BGR copies of this movie keep video range (black at 16,
    white at 235): 8-bit planar YUV of limited range (most video) is converted without the
    range expanded, for speed; other formats go through libswscale, which expands it."""
    pix_fmt = info.pix_fmt or ""
    return pix_fmt in _PLANAR_YUV and not pix_fmt.startswith("yuvj") and info.color_range != 2


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
        gray = _sample(_plane(frame, 0), step, step)
        dstep = step * detect_factor
        y = _sample(gray, detect_factor, detect_factor) if detect_factor > 1 else gray
        h, w = y.shape
        u_full, v_full = _plane(frame, 1), _plane(frame, 2)
        cstep_y = max(1, round(dstep * u_full.shape[0] / frame.height))
        cstep_x = max(1, round(dstep * u_full.shape[1] / frame.width))
        u = _sample(u_full, cstep_y, cstep_x)[:h, :w]
        v = _sample(v_full, cstep_y, cstep_x)[:h, :w]
        if u.shape != y.shape:
            u = cv2.resize(np.ascontiguousarray(u), (w, h), interpolation=cv2.INTER_NEAREST)
            v = cv2.resize(np.ascontiguousarray(v), (w, h), interpolation=cv2.INTER_NEAREST)
        ycrcb = cv2.merge([y, np.ascontiguousarray(v), np.ascontiguousarray(u)])
        return cv2.cvtColor(ycrcb, cv2.COLOR_YCrCb2BGR), gray
    w = max(1, frame.width // step)
    h = max(1, frame.height // step)
    bgr = frame.reformat(width=w, height=h, format="bgr24").to_ndarray()
    gray = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
    if detect_factor > 1:
        bgr = np.ascontiguousarray(bgr[::detect_factor, ::detect_factor])
    return bgr, gray


def thumbnail_size(upright_width: int, upright_height: int, width: int) -> tuple[int, int]:
    """(width, height) of a thumbnail ``width`` pixels wide before rotation (height even), for a
    picture of ``upright_width`` x ``upright_height`` square pixels."""
    return width, max(2, round(upright_height * width / upright_width / 2) * 2)


def _convert(
    frame: av.VideoFrame, size: tuple[int, int], display: Display, r: VideoReformatter
) -> np.ndarray:
    """``frame`` scaled to ``size`` (before rotation) as 8-bit BGR, tone-mapped when HDR."""
    w, h = size
    # Bicubic where the picture is stretched (anamorphic width, upscaled thumbnails); libswscale's
    # default (bilinear) elsewhere, as before.
    interp = "BICUBIC" if w > frame.width or h > frame.height else None
    if display.hdr:
        planes = r.reformat(frame, width=w, height=h, format="yuv444p16le", interpolation=interp)
        return hdr_tone.tone_map_yuv16(planes.to_ndarray(), display.hdr, display.full_range)
    return r.reformat(frame, width=w, height=h, format="bgr24", interpolation=interp).to_ndarray()


def thumbnail(
    frame: av.VideoFrame, width: int, display: Display, reformatter: VideoReformatter | None = None
) -> np.ndarray:
    """Upright BGR thumbnail ``width`` pixels wide (before rotation), scaled by libswscale
    (through ``reformatter`` if given: see :func:`frame_to_bgr`)."""
    w, h = thumbnail_size(*display.upright, width)
    small = _convert(frame, (w, h), display, reformatter or VideoReformatter())
    return rotate_image(small, display.rotation, display.mirrored)


def shrink_upright(bgr: np.ndarray, size: tuple[int, int], rotation: int) -> np.ndarray:
    """The thumbnail of a frame already converted by :func:`frame_to_bgr` (upright): ``size`` is
    :func:`thumbnail_size` (before rotation), averaged by OpenCV's area filter. Unlike
    :func:`thumbnail` it needs no PyAV call, so it can run off the decoding thread."""
    w, h = size
    if (rotation // 90) % 2:
        w, h = h, w
    return cv2.resize(bgr, (w, h), interpolation=cv2.INTER_AREA)


def rotate_image(img: np.ndarray, rotation: int, mirrored: bool = False) -> np.ndarray:
    """Turn (and mirror) a stored picture the way its display matrix shows it.

    ``rotation`` is the display matrix's angle in degrees, counter-clockwise (PyAV's
    ``frame.rotation``; a phone held upright stores a quarter turn clockwise, read as -90 and
    kept as 270). Turning the stored picture by that angle counter-clockwise (``np.rot90`` with
    k = angle / 90) puts every pixel where the matrix shows it; ``mirrored``
    (:func:`~diffusion_bunny.media.probe.display_turn`) then swaps left and right, as players
    show a mirrored matrix (kept upside down, a mirrored picture was a wrong training image).
    Stage 01's tests check this on clips whose matrix is written number by number, with the
    shown place of a marked corner worked out from the matrix itself, not from this function."""
    k = (rotation // 90) % 4
    if k:
        img = np.rot90(img, k=k)
    if mirrored:
        img = np.fliplr(img)
    return np.ascontiguousarray(img) if k or mirrored else img


def rotate_box(
    box: tuple[int, int, int, int], size: tuple[int, int], rotation: int, mirrored: bool = False
) -> tuple[int, int, int, int]:
    """A box ``(left, top, right, bottom)`` (right/bottom exclusive) in a picture of ``size``
    (width, height) before rotation, moved the way :func:`rotate_image` moves its pixels."""
    left, top, right, bottom = box
    w, h = size
    k = (rotation // 90) % 4
    if k == 1:  # np.rot90 once: new[i, j] = old[j, w - 1 - i]
        left, top, right, bottom = top, w - right, bottom, w - left
    elif k == 2:
        left, top, right, bottom = w - right, h - bottom, w - left, h - top
    elif k == 3:  # new[i, j] = old[h - 1 - j, i]
        left, top, right, bottom = h - bottom, left, h - top, right
    if mirrored:  # np.fliplr of the turned picture, whose width is h after a quarter turn
        shown_w = h if k % 2 else w
        left, right = shown_w - right, shown_w - left
    return left, top, right, bottom


def frame_to_bgr(
    frame: av.VideoFrame, display: Display, reformatter: VideoReformatter | None = None
) -> np.ndarray:
    """Full-size upright BGR array of a kept frame as shown (the only full conversion we pay
    for): square pixels, rotation applied, HDR tone-mapped to SDR.

    ``reformatter``: one :class:`av.video.reformatter.VideoReformatter` kept by the caller for
    all its frames. ``frame.to_ndarray(format=...)`` makes a new one per frame, and with it a
    new libswscale context: measured on 720p, 1.17 ms a frame against 0.27 ms when the context
    is reused (same pixels). A reformatter must stay on one thread."""
    bgr = _convert(frame, display.upright, display, reformatter or VideoReformatter())
    return rotate_image(bgr, display.rotation, display.mirrored)


#: Luma above the black level by more than this (8-bit code values) lights a pixel for the
#: picture-box profiles. Letterbox bars of compressed video sit at the black level within 1-2
#: codes; the darkest real footage at hand (the Hamilton clip's stage, mean luma 27-33) lights
#: 45-100% of every row and column at this margin, and 10-18% at cropdetect's 24.
LIT_MARGIN = 4


def luma_profiles(frame: av.VideoFrame, step: int) -> tuple[np.ndarray, np.ndarray]:
    """How many sampled pixels of each stored row and of each stored column are lit (brighter
    than black by :data:`LIT_MARGIN`): rows sampled every ``step`` columns, columns every
    ``step`` rows, so every row and column of the stored frame gets a count at the cost of two
    stride copies. Returns ``(rows, row_samples)``-normalised fractions ``(rows, cols)`` as
    float32.

    Limited-range video (nearly all of it) is black at 16, full range at 0; 10-bit planes are
    read as their top 8 bits. Any other layout (an animated GIF's BGRA, RGB, 12-bit or
    semi-planar video) is converted to full-range gray by libswscale first: rarer, and dearer
    per frame, but its luma is not the first plane (read as luma, a GIF's BGRA bytes left every
    shot "black throughout")."""
    name = frame.format.name
    black = 0 if (frame.color_range == 2 or name.startswith("yuvj")) else 16
    if name in _PLANAR_YUV:
        y = _plane(frame, 0)
    elif name in ("yuv420p10le", "yuv422p10le", "yuv444p10le"):
        plane = frame.planes[0]
        y16 = np.frombuffer(plane, np.uint16).reshape(plane.height, plane.line_size // 2)[:, : plane.width]
        return _lit((y16[:, ::step] >> 2).astype(np.uint8), (y16[::step, :] >> 2).astype(np.uint8), black)
    else:
        y, black = frame.reformat(format="gray", dst_color_range=2).to_ndarray(), 0
    return _lit(np.ascontiguousarray(y[:, ::step]), np.ascontiguousarray(y[::step, :]), black)


def _lit(cols_sampled: np.ndarray, rows_sampled: np.ndarray, black: int) -> tuple[np.ndarray, np.ndarray]:
    limit = black + LIT_MARGIN
    _, a = cv2.threshold(cols_sampled, limit, 1, cv2.THRESH_BINARY)
    _, b = cv2.threshold(rows_sampled, limit, 1, cv2.THRESH_BINARY)
    rows = cv2.reduce(a, 1, cv2.REDUCE_SUM, dtype=cv2.CV_32S).ravel().astype(np.float32) / a.shape[1]
    cols = cv2.reduce(b, 0, cv2.REDUCE_SUM, dtype=cv2.CV_32S).ravel().astype(np.float32) / b.shape[0]
    return rows, cols


@dataclass
class ShotProfile:
    """The maximum lit share of every stored row and column (:func:`luma_profiles`) over the
    frames profiled: a shot's in stage 01 (``picturebox``), or the film's sample (:class:`_Sampled`)."""

    rows: np.ndarray | None = None
    cols: np.ndarray | None = None
    samples: int = 0

    def add(self, profiles: tuple[np.ndarray, np.ndarray] | None) -> None:
        if profiles is None:
            return
        rows, cols = profiles
        if self.rows is None or self.rows.shape != rows.shape or self.cols is None:
            self.rows, self.cols = rows.copy(), cols.copy()
        else:
            np.maximum(self.rows, rows, out=self.rows)
            np.maximum(self.cols, cols, out=self.cols)
        self.samples += 1


class _Sampled:
    """The :class:`ShotProfile` of every ``every``-th frame it is called with."""

    def __init__(self, step: int, every: int = 4):
        self.step, self.every, self.seen = step, every, 0
        self.profile = ShotProfile()

    def __call__(self, frame: av.VideoFrame) -> None:
        self.seen += 1
        if not (self.seen - 1) % self.every:
            self.profile.add(luma_profiles(frame, self.step))

    @property
    def profiles(self) -> tuple[np.ndarray, np.ndarray] | None:
        p = self.profile
        return None if p.rows is None or p.cols is None else (p.rows, p.cols)


class Deinterlacer:
    """FFmpeg's ``bwdif`` (motion-adaptive, from both fields and their neighbours in time), one
    output frame per input frame, through PyAV's filter graph. It holds one frame back: push
    ``None`` at the end to get the last one. Chosen over ``yadif`` for its cleaner edges; both
    ship with PyAV's FFmpeg."""

    def __init__(self, stream: av.video.stream.VideoStream):
        self.graph = av.filter.Graph()
        source = self.graph.add_buffer(template=stream)
        bwdif = self.graph.add("bwdif", "mode=send_frame:parity=auto:deint=all")
        sink = self.graph.add("buffersink")
        source.link_to(bwdif)
        bwdif.link_to(sink)
        self.graph.configure()

    def push(self, frame: av.VideoFrame | None) -> list[av.VideoFrame]:
        """Feed one decoded frame (None at the end) and return the frames ready now."""
        self.graph.push(frame)
        out = []
        while True:
            try:
                out.append(self.graph.pull())
            except (av.error.BlockingIOError, av.error.EOFError):
                return out


class FieldDoubler:
    """One field of each frame, scaled back to the frame's height (FFmpeg's ``field`` and
    ``scale``): the deinterlacing of keyframes alone, seconds apart, which leave ``bwdif`` no
    neighbours in time. ``bwdif`` fed one frame at a time weaves a still picture's two fields
    back together, combs and all; half the lines, interpolated (bilinear: bicubic rings on a
    title's edges, a comb of its own), show none. The field shown first is kept (``top``: top
    field first, as ``idet`` most often finds)."""

    def __init__(self, stream: av.video.stream.VideoStream, size: tuple[int, int], top: bool = True):
        self.graph = av.filter.Graph()
        source = self.graph.add_buffer(template=stream)
        field = self.graph.add("field", f"type={'top' if top else 'bottom'}")
        scale = self.graph.add("scale", f"w={size[0]}:h={size[1]}:flags=bilinear")
        sink = self.graph.add("buffersink")
        source.link_to(field)
        field.link_to(scale)
        scale.link_to(sink)
        self.graph.configure()

    def push(self, frame: av.VideoFrame | None) -> list[av.VideoFrame]:
        """Feed one decoded frame (None at the end) and return the frames ready now."""
        if frame is None:
            return []
        self.graph.push(frame)
        return [self.graph.pull()]


#: Where in a film not flagged interlaced its pictures are asked (a share of its length): away
#: from its opening, whose logos and black frames (still or empty) show no combs.
UNFLAGGED_SAMPLE_AT = 1 / 3
#: How many: half the flagged films' 240, as every film now pays for them (decoding 120 frames
#: of 720p takes ~0.4 s on 2 cores, 1080p ~0.8 s); hard telecine is clear within them.
UNFLAGGED_FRAMES = 120

#: Frames ``idet`` must judge interlaced before a film not flagged so is deinterlaced (a second
#: at 24 fps): a few frames it takes for combed among progressive ones decide nothing.
COMBED_MIN_FRAMES = 24
#: And how many times the frames it judges progressive they must be. Hard telecine gives ~60 to
#: 1 (235 to 4 on the real clips tried), while progressive pictures that fool it (a pattern
#: scrolled vertically, text scrolling at a few pixels a frame) came near 1 to 1: an unflagged
#: film is deinterlaced only on a clear verdict, since deinterlacing a progressive one softens it.
COMBED_MARGIN = 2


def interlace_verdict(
    path: str | Path,
    max_frames: int = 240,
    start_share: float = 0.0,
    seconds: float | None = None,
    each: Callable[[av.VideoFrame], None] | None = None,
) -> dict[str, int]:
    """FFmpeg's ``idet`` over ``max_frames`` frames from ``start_share`` of the film, ``seconds``
    long (from its start where the rest is shorter or its length is not known): how many it
    judged top field first, bottom field first, progressive and undetermined (multi-frame
    detection). ``each`` sees every judged frame too (stage 01's sample of the picture box,
    ``VideoReader.sample``: the same decode for a film not flagged interlaced). Flags lie
    both ways (telecined film and progressive encodes are often flagged interlaced; a DVD rip of
    hard-telecined film is stored as progressive, two combed frames in five), so stage 01 asks
    the pictures."""
    with av.open(str(path), metadata_errors="ignore") as container:
        stream = picture_stream(container)
        stream.thread_type = "AUTO"
        fps = float(stream.average_rate or 25)
        # The probe's length, not the container's: Matroska's counts from 0 past a first
        # timestamp far from it, and a seek by it landed past the end (nothing judged).
        seconds = seconds or 0.0
        skip_before = None  # seconds: a seek lands on the keyframe before, up to seconds early
        if start_share > 0 and seconds * (1 - start_share) > 2 * max_frames / fps:
            # From the container's first timestamp: a broadcast capture's starts far from 0.
            target = (container.start_time or 0) + round(seconds * start_share * av.time_base)
            with contextlib.suppress(av.error.FFmpegError):  # not seekable: judge from the start
                container.seek(target)
                skip_before = target / av.time_base
        graph = av.filter.Graph()
        source = graph.add_buffer(template=stream)
        idet = graph.add("idet")
        sink = graph.add("buffersink")
        source.link_to(idet)
        idet.link_to(sink)
        graph.configure()
        last: dict[str, str] = {}
        try:
            n = 0
            # Past damage: after a seek into an MPEG-TS capture its first packets do not decode.
            for frame in decode_past_damage(container, stream, DecodeReport(), fps):
                if skip_before is not None and frame.time is not None and frame.time < skip_before:
                    continue
                if n >= max_frames:
                    break
                n += 1
                if each is not None:
                    each(frame)
                graph.push(frame)
                while True:
                    try:
                        last = dict(graph.pull().metadata)
                    except (av.error.BlockingIOError, av.error.EOFError):
                        break
        except av.error.FFmpegError:
            pass  # a broken stream: judge on what decoded
    keys = ("tff", "bff", "progressive", "undetermined")
    return {k: round(float(last.get(f"lavfi.idet.multiple.{k}", 0))) for k in keys}


def flagged_interlaced(info: VideoInfo) -> bool:
    """Whether the file says its video is interlaced."""
    return bool(info.interlaced_flag or info.field_order in ("tt", "bb", "tb", "bt"))


def should_deinterlace(info: VideoInfo, verdict: dict[str, int] | None) -> bool:
    """Deinterlace when ``idet`` does not find progressive pictures in the majority: of a file
    that says it is interlaced (with nothing to judge, e.g. black frames, the flags decide), and
    of one that does not when it finds :data:`COMBED_MIN_FRAMES` combed frames or more and
    :data:`COMBED_MARGIN` times the progressive ones (hard telecine: ``idet`` judges its pattern
    interlaced throughout)."""
    interlaced = verdict["tff"] + verdict["bff"] if verdict else 0
    if not flagged_interlaced(info):
        return bool(verdict) and interlaced >= max(COMBED_MARGIN * verdict["progressive"], COMBED_MIN_FRAMES)
    if not verdict:
        return True
    return interlaced >= verdict["progressive"] or interlaced + verdict["progressive"] == 0


#: ``extract.deinterlace``'s words as :class:`VideoReader`'s and ``ClipSource``'s ``deinterlace``
#: (None: decide by :func:`interlace_decision`), so stage 01's frames and stage 06's clips read
#: the setting alike.
DEINTERLACE_SETTING: dict[str, bool | None] = {"auto": None, "on": True, "off": False}


def interlace_decision(
    info: VideoInfo, each: Callable[[av.VideoFrame], None] | None = None
) -> tuple[bool, dict[str, int]]:
    """Whether ``info``'s film is deinterlaced (:func:`should_deinterlace`), and the verdict of
    ``idet`` behind it (:func:`interlace_verdict`, ``each`` seeing its frames): the pictures of a
    film flagged interlaced are asked from its start, :data:`UNFLAGGED_FRAMES` of any other from
    :data:`UNFLAGGED_SAMPLE_AT` on."""
    if flagged_interlaced(info):
        verdict = interlace_verdict(info.path, each=each)
    else:
        verdict = interlace_verdict(
            info.path, UNFLAGGED_FRAMES, UNFLAGGED_SAMPLE_AT, info.duration_s, each=each
        )
    return should_deinterlace(info, verdict), verdict


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


def decode_past_damage(
    container: av.container.InputContainer,
    stream: av.video.stream.VideoStream,
    report: DecodeReport,
    fps: float,
    cover: FileCoverage | None = None,
) -> Iterator[av.VideoFrame]:
    """``stream``'s whole frames from where ``container`` stands, past damaged data.

    A packet the decoder cannot read (a glitch in a download, a recording, a copy) is skipped and
    counted, as ``ffmpeg`` skips it: PyAV's ``container.decode`` raises at the first one, and a
    16 kB glitch a third into a real clip cost the remaining 71% of its frames. The frames after
    it are predicted from what it held: the decoder smears blocks of other pictures into them (a
    real clip's frame of two shots mixed was kept for the dataset) until a keyframe starts afresh,
    so they are left out (counted) up to the next keyframe, or for :data:`RECOVERY_S` in a stream
    without keyframes (intra refresh). Data the container cannot read past ends the frames,
    recording why. With ``cover``, every stream's packets are demuxed and their bytes noted in it
    (:class:`FileCoverage`); only ``stream``'s are decoded."""
    packets = container.demux() if cover is not None else container.demux(stream)
    seen, tainted = 0, -1  # frames decoded since the last damage, -1 when whole
    earliest: float | None = None  # the earliest packet's time before the first frame came out
    while True:
        try:
            packet = next(packets)
            if cover is not None:
                cover.add(packet)
                if packet.stream.index != stream.index:  # (flush packets say stream_index 0)
                    continue
            if repeats_a_frame(packet):
                continue
            # (a packet before a trimmed MP4's edit point is decoded and not shown, by design)
            timed = packet.pts is not None and packet.time_base is not None
            if report.head_lost_s is None and timed and not packet.is_discard:
                at = float(packet.pts * packet.time_base)
                earliest = at if earliest is None else min(earliest, at)
            frames = stream.decode(packet)
        except StopIteration:
            return
        except av.error.InvalidDataError:
            report.damaged_packets += 1
            continue
        except av.error.FFmpegError as exc:
            report.stopped_by_error = str(exc.strerror or exc)
            return
        for frame in frames:
            if report.damaged_packets != seen or frame.is_corrupt:
                seen, tainted = report.damaged_packets, 0
            if tainted >= 0:
                tainted += 1
                if not (frame.key_frame and not frame.is_corrupt) and tainted < RECOVERY_S * fps:
                    report.damaged_frames += 1
                    continue
                tainted = -1
            if report.head_lost_s is None:
                timed = frame.time is not None and earliest is not None
                report.head_lost_s = max(0.0, frame.time - earliest) if timed else -1.0
            yield frame


@dataclass
class DecodeReport:
    """How the decode went, filled in while :meth:`VideoReader.frames` runs."""

    decoded: int = 0
    #: The first frame decoded, seconds after the stream's start: past 0 where the file begins
    #: partway through a group of pictures (a recording cut from a broadcast), whose frames up to
    #: the first keyframe cannot be decoded.
    first_time_s: float | None = None
    last_time_s: float = 0.0
    stopped_by_error: str | None = None
    #: Packets of the picture the decoder could not read (damaged data), skipped.
    damaged_packets: int = 0
    #: Frames decoded from a damaged stretch (until the next keyframe), left out.
    damaged_frames: int = 0
    #: Times the stream's timestamps started again or leapt (pieces of a recording joined).
    timestamp_resets: int = 0
    #: Frames stored at another size than the movie's first (a joined piece of another
    #: resolution, a stream that switched quality), scaled to the movie's size.
    resized_frames: int = 0
    #: The longest time between two frames decoded (keyframes only: the longest group of
    #: pictures), how far the last frame decoded may lie before the end of a whole file.
    longest_gap_s: float = 0.0
    #: Stretches of over half a second without a frame decoded: (the time of the frame before
    #: it, its length), at most :data:`GAPS_KEPT`.
    gaps: list[tuple[float, float]] = field(default_factory=list)
    #: When damage was met (the time of the last frame decoded before it), at most :data:`GAPS_KEPT`.
    damage_at: list[float] = field(default_factory=list)
    #: Stretches of the file no packet was read from, between packets (:class:`FileCoverage`):
    #: (the time of the first packet after it, seconds from the first frame; its bytes), at
    #: most :data:`GAPS_KEPT`. Damage the demuxer passed over in silence, resyncing at the next
    #: cluster, leaves one and no packet that fails to decode.
    unread: list[tuple[float, int]] = field(default_factory=list)
    #: How far the first frame decoded lies after the earliest packet read before it: the
    #: frames up to the first keyframe that could not be decoded (-1.0 where the packets carry
    #: no times; None before the first frame).
    head_lost_s: float | None = None


#: Seconds after damage a stream without a keyframe (intra refresh) is taken as whole again.
RECOVERY_S = 10.0

#: Stretches without a frame, and places of damage, a decode report keeps (a film damaged all
#: through needs no more to be told so).
GAPS_KEPT = 1000

#: A leap forward of more than this between two frames of a container whose timestamps may jump
#: (MPEG-TS and the like) is a discontinuity, not a pause: FFmpeg's own threshold for such formats.
TIMESTAMP_LEAP_S = 10.0

#: libavformat's ``AVFMT_TS_DISCONT``: the format allows timestamp discontinuities.
_TS_DISCONT = 0x0200

#: Bytes between two packets a container may hold without damage: Matroska's block and cluster
#: headers (7-24 bytes between packets measured), AVI's chunk headers (9-16), an OpenDML AVI's
#: standard index chunks, an MP4 fragment's ``moof``. More than this that no packet covers is
#: data the demuxer passed over.
UNREAD_BYTES = 4096


class FileCoverage:
    """Which bytes of a file the demuxer read as packets: what it passed over between them.

    Why: Matroska's demuxer (and AVI's) resyncs past damage to the next cluster without an
    error, and without a packet that fails to decode when the damage began at a cluster's edge:
    2.3 s of a film's picture gone was reported as nothing lost. Packets come in time order, not
    the file's (an MP4 fragment holds its video, then its audio), so the bytes read are kept as
    merged stretches and the holes judged once the file is read. Our own code: FFmpeg says it
    only in log lines, and a pass-wide log capture would catch every other library's too. Not
    for MPEG-TS and the like, whose packets are spread over 188-byte cells among other streams'
    and padding."""

    def __init__(self) -> None:
        #: Merged stretches read, sorted: [start, end, time of the packet that starts it].
        self.spans: list[list[float]] = []
        self._last = 0

    def add(self, packet: av.Packet) -> None:
        """Note ``packet``'s bytes (packets without a position, or empty, are passed over)."""
        pos, size = packet.pos, packet.size
        if pos is None or pos < 0 or not size:
            return
        spans, end = self.spans, pos + size
        i = self._last  # the common case: the packet follows the one before in the file
        if not (i < len(spans) and spans[i][0] <= pos and (i + 1 == len(spans) or spans[i + 1][0] > pos)):
            i = bisect.bisect_right(spans, pos, key=lambda span: span[0]) - 1
        if i >= 0 and spans[i][1] + UNREAD_BYTES >= pos:
            spans[i][1] = max(spans[i][1], end)
        else:  # (the time only here: a Fraction's product costs more than the rest)
            when = packet.pts if packet.pts is not None else packet.dts
            t = float(when * packet.time_base) if when is not None and packet.time_base else float("nan")
            i += 1
            spans.insert(i, [pos, end, t])
        while i + 1 < len(spans) and spans[i + 1][0] <= spans[i][1] + UNREAD_BYTES:
            spans[i][1] = max(spans[i][1], spans.pop(i + 1)[1])
        self._last = i

    def holes(self) -> list[tuple[float, int]]:
        """(the time of the packet after it, seconds in the stream's time; its bytes) of each
        stretch between packets no packet was read from, in file order."""
        pairs = zip(self.spans, self.spans[1:], strict=False)
        return [(after[2], int(after[0] - before[1])) for before, after in pairs]


class MonotonicClock:
    """A stream's presentation times made to run on, as ``ffmpeg`` makes them.

    Joined pieces of a recording (``cat`` of MPEG-TS files, a TV recording across a PTS reset or
    its 26.5-hour wrap) start their timestamps again: PyAV hands them on as they are, and a shot
    that spans the join ended before it began (seen: a shot of 2.74 -> 2.58 s in ``cat a.ts
    b.ts``). In a format that allows such discontinuities (MPEG-TS, MPEG-PS: FFmpeg's
    ``AVFMT_TS_DISCONT``, as ``ffmpeg`` itself corrects only there), a frame whose time goes back,
    or leaps more than :data:`TIMESTAMP_LEAP_S`, is taken as one frame after the frame before,
    and the pieces after it are shifted by the same amount. Elsewhere (MP4, Matroska, AVI) times
    are left as they are: one glitched time there would shift every later frame."""

    def __init__(self, fps: float, discontinuous: bool):
        self.frame_s = 1.0 / fps
        self.discontinuous = discontinuous
        self.offset = 0.0
        self.last: float | None = None
        self.resets = 0

    @classmethod
    def of(cls, container: av.container.InputContainer, fps: float) -> MonotonicClock:
        """A clock for ``container``'s picture: it corrects where the format allows discontinuities."""
        return cls(fps, bool(container.format.flags & _TS_DISCONT))

    def __call__(self, t: float) -> float:
        """``t`` (seconds from the stream's start) on the clock that runs on."""
        if not self.discontinuous:
            return t
        t += self.offset
        last = self.last
        if last is not None and (t < last - 0.5 * self.frame_s or t > last + TIMESTAMP_LEAP_S):
            shift = last + self.frame_s - t
            self.offset += shift
            t += shift
            self.resets += 1
        self.last = t
        return t


class _KeyframeOrder:
    """Tells keyframes the decoder gives out of time order (:func:`_keyframes_out_of_order`) from
    a recording joined from several, on the stream's own times (an MPEG-TS clock makes any step
    back a timestamp reset): a step back then a step past the latest time so far, or two steps
    back running, is out of order (0, 5.5, 3.5, 7.9 s; 2, 1, 0 s); a step back then on forward
    below it is a second recording starting (joined recordings' times restart)."""

    def __init__(self) -> None:
        self.prev: float | None = None
        self.top = 0.0
        self.back: tuple[float, float] | None = None

    def see(self, t: float | None) -> tuple[float, float] | None:
        """``(earlier, later)`` times of the step back, where ``t`` shows the order is wrong."""
        if t is None:
            return None
        prev, self.prev = self.prev, t
        if prev is None:
            self.top = t
            return None
        if t < prev:
            if self.back is not None:
                return self.back
            self.back = (prev, t)
        elif self.back is not None:
            if t > self.top:
                return self.back
            self.back = None
        self.top = max(self.top, t)
        return None


def _keyframes_out_of_order(path: Path, last: float, now: float) -> BadInputError:
    """The line for a film whose keyframes FFmpeg's decoder, told to skip every other frame, gives
    out of time order. Why: an open-GOP H.264 encode (its keyframes not IDR, B-frames across them)
    gave 5 of its 7 keyframes at 0, 5.5, 3.5, 7.9 and 1.5 s; each picture took the index of a
    time it was not shown at (the thumbnail of frame 166 was frame 105), two keyframes never came
    out, and the run called the whole file truncated at 1.5 s. Every frame decodes in order."""
    return BadInputError(
        f"{path.name}: with extract.method: keyframe its keyframes come out of the decoder out of order "
        f"({last:.2f} s, then {now:.2f} s: an open-GOP encode, whose keyframes cannot be decoded on their "
        "own, as Blu-ray and broadcast streams often are); use extract.method: shots (the default), "
        "which decodes every frame"
    )


class VideoReader:
    """Streams a movie once: yields :class:`Decoded` frames in presentation order.

    Timestamps are presentation times (pts * time_base) relative to the stream start, so
    variable-frame-rate footage keeps its real timing, run on across joins
    (:class:`MonotonicClock`); ``index`` counts decoded frames. A stream
    that breaks part-way (truncated or corrupt data) ends the iteration instead of raising; the
    :attr:`report` says how much was decoded and :meth:`loss_message` how much was lost.
    """

    def __init__(
        self,
        path: str | Path,
        analysis_width: int = 256,
        keyframes_only: bool = False,
        detect_width: int | None = None,
        *,
        deinterlace: bool | None = False,
        profile_every: int = 0,
        sample_profiles: bool = False,
    ):
        """``deinterlace``: True / False, or None to decide from the file's flags confirmed by
        ``idet`` (:func:`should_deinterlace`). ``profile_every``: measure :func:`luma_profiles`
        on every N-th frame (0: never). ``sample_profiles``: measure them before the pass as
        well, on frames from a third of the way in (``sample``)."""
        self.info = probe_video(path)
        self.analysis_step = max(1, self.info.width // analysis_width)
        detect_step = max(1, self.info.width // (detect_width or analysis_width))
        self.detect_factor = max(1, detect_step // self.analysis_step)
        self.keyframes_only = keyframes_only
        self.report = DecodeReport()
        self.profile_every = profile_every
        self.interlace: dict[str, int] | None = None
        #: The most lit share of every stored row and column over every 4th frame of the
        #: :data:`UNFLAGGED_FRAMES` from :data:`UNFLAGGED_SAMPLE_AT` of the film (the interlace
        #: check's own frames where it looks there; a film under ~15 s: from its start), known
        #: before the pass: a witness of the film's picture box (``picturebox.sample_box``).
        self.sample: tuple[np.ndarray, np.ndarray] | None = None
        sampled = _Sampled(self.analysis_step) if sample_profiles else None
        if deinterlace is None and not flagged_interlaced(self.info):
            # One decode for both: the check's frames are a third of the way in.
            deinterlace, self.interlace = interlace_decision(self.info, sampled)
        else:
            if deinterlace is None:  # a film flagged interlaced is checked from its start
                deinterlace, self.interlace = interlace_decision(self.info)
            if sampled is not None:  # the frames a third of the way in, decoded for the sample
                info = self.info
                interlace_verdict(info.path, UNFLAGGED_FRAMES, UNFLAGGED_SAMPLE_AT, info.duration_s, sampled)
        if sampled is not None:
            self.sample = sampled.profiles
        # Keyframe-only decoding gives frames seconds apart, no neighbours in time: those are
        # deinterlaced from one field (:class:`FieldDoubler`). They were not deinterlaced at all,
        # and ``extract.deinterlace: on`` did nothing there.
        self.deinterlace = bool(deinterlace)

    def _decoded(
        self, container: av.container.InputContainer, cover: FileCoverage | None = None
    ) -> Iterator[av.VideoFrame]:
        """The stream's whole frames (:func:`decode_past_damage`), deinterlaced when asked."""
        stream = picture_stream(container)
        stored = (self.info.width, self.info.height)
        deinterlacer: Deinterlacer | FieldDoubler | None = None
        if self.deinterlace and self.keyframes_only:
            verdict = self.interlace or {}
            deinterlacer = FieldDoubler(stream, stored, top=verdict.get("bff", 0) <= verdict.get("tff", 0))
        elif self.deinterlace:
            deinterlacer = Deinterlacer(stream)
        for frame in decode_past_damage(container, stream, self.report, self.info.fps, cover):
            if (frame.width, frame.height) != stored:
                # Every measure, box and saved frame is in the movie's stored pixels: a piece of
                # another size gave analysis copies and profiles of another shape.
                frame = frame.reformat(width=stored[0], height=stored[1])
                self.report.resized_frames += 1
            if deinterlacer is None:
                yield frame
            else:
                yield from deinterlacer.push(frame)
        if deinterlacer is not None:
            yield from deinterlacer.push(None)

    def frames(self) -> Iterator[Decoded]:
        """Decode the whole stream once."""
        info = self.info
        report = self.report
        container = av.open(str(info.path), metadata_errors="ignore")
        try:
            stream = picture_stream(container)
            stream.thread_type = "AUTO"
            stream.codec_context.thread_count = decode_threads()
            if self.keyframes_only:
                stream.codec_context.skip_frame = "NONKEY"
            tb = float(stream.time_base) if stream.time_base else None
            start = stream.start_time * tb if (stream.start_time is not None and tb) else None
            index = damage_seen = 0
            every = self.profile_every
            clock = MonotonicClock.of(container, info.fps)
            order = _KeyframeOrder()
            # Keyframes alone leave gaps by design; MPEG-TS spreads packets over cells.
            cover = None if self.keyframes_only or clock.discontinuous else FileCoverage()
            for frame in self._decoded(container, cover):
                t = frame.time
                if t is None:
                    t = index / info.fps
                else:
                    if start is None:
                        start = t
                    t = max(0.0, round(clock(t - start), 6))
                    report.timestamp_resets = clock.resets
                if self.keyframes_only:
                    # Only keyframes come out of the decoder; their index in the full stream is
                    # recovered from the presentation time, never repeated: on variable-frame-
                    # rate footage a time at the average rate is no exact index, and two keyframes
                    # of an all-intra clip both became frame 1 (one JPEG written over the other).
                    # (Counting packets instead broke trimmed files' edit lists and joined
                    # recordings, whose packet times restart.)
                    index = max(round(t * info.fps), index)
                    backwards = order.see(frame.time)
                    if backwards is not None:
                        raise _keyframes_out_of_order(info.path, *backwards)
                small_bgr, small_gray = analysis_copy(frame, self.analysis_step, self.detect_factor)
                profiles = None
                if every and (self.keyframes_only or index % every == 0):
                    profiles = luma_profiles(frame, self.analysis_step)
                if report.decoded:
                    gap = t - report.last_time_s
                    report.longest_gap_s = max(report.longest_gap_s, gap)
                    if gap > 0.5 and len(report.gaps) < GAPS_KEPT:
                        report.gaps.append((report.last_time_s, gap))
                    damage = report.damaged_packets + report.damaged_frames
                    if damage != damage_seen and len(report.damage_at) < GAPS_KEPT:
                        report.damage_at.append(report.last_time_s)
                    damage_seen = damage
                else:
                    report.first_time_s = t
                report.decoded += 1
                report.last_time_s = t
                yield Decoded(index, t, frame, small_bgr, small_gray, profiles)
                index += 1
            if cover is not None and start is not None:
                holes = [(round(at - start, 6), size) for at, size in cover.holes() if at == at]
                report.unread = holes[:GAPS_KEPT]
        finally:
            container.close()

    def loss_message(self) -> str | None:
        """One sentence on how much of the movie could not be decoded, or None if nothing was:
        its start (frames before the first keyframe), its end, damaged stretches."""
        rest = self._rest_lost()
        first = self.report.first_time_s
        unread = self.report.head_lost_s
        least = max(0.5, 3.0 / self.info.fps)
        # Keyframes alone: the first decoded is the first keyframe, which a trimmed MP4 (an edit
        # list) has seconds in while every frame before it decodes. Said only of a full decode.
        # Nor of a film whose picture starts late by design (an Xvid AVI's first frame, a
        # keyframe, timed 1 s in): only frames read before the first one decoded are lost.
        read_whole = unread is not None and 0 <= unread <= least
        if first is None or self.keyframes_only or first <= least or read_whole:
            return rest
        head = (
            f"{self.info.path.name}: the first {first:.1f} s could not be decoded (the file begins partway "
            "through a group of pictures, as a recording cut from a broadcast does) and were left out"
        )
        return f"{head}; the rest was read" if rest is None else f"{head}; and {rest}"

    def _gap_lost(self) -> str:
        """`` N s of picture from T s are missing;`` where damage left a stretch without a frame
        longer than half a second (and three frames), else empty. Why: damage that took whole
        packets with it (60 kB overwritten in a Matroska file) read "1 packet(s) could not be
        decoded, and the 0 frame(s) ... were left out" while 1.2 s of picture was gone. Only a
        stretch with damage in it counts: a variable-rate film may hold a still that long."""
        report, frame_s = self.report, 1.0 / self.info.fps

        # A stretch is the damage's when damage was met in it or within a second of it (the
        # demuxer may pass over unreadable data silently, failing on a packet before or after),
        # the nearest such stretch: a still of a variable-rate film near the damage is not it.
        def away(at: float, length: float) -> float:
            return min(max(0.0, at - when, when - at - length) for when in damage_at)

        damage_at = [*report.damage_at, *(at for at, _ in report.unread)]
        if self.keyframes_only or not damage_at:
            return ""
        near = [(away(at, length), -length, at, length) for at, length in report.gaps]
        near = [n for n in near if n[0] <= 1.0]
        if not near:
            return ""
        *_, at, length = min(near)  # the nearest, then the longest
        lost = length - frame_s
        if lost <= max(0.5, 3 * frame_s):
            return ""
        return f" {lost:.1f} s of picture from {at:.1f} s are missing;"

    def _rest_lost(self) -> str | None:
        info, report = self.info, self.report
        frame_s = 1.0 / info.fps
        expected_s = info.duration_s
        got_s = report.last_time_s + frame_s
        lost_s = (expected_s - got_s) if expected_s else 0.0
        if self.keyframes_only and report.stopped_by_error is None:
            # The last frame decoded is the last keyframe, which may lie a group of pictures
            # before the end of a whole file: that much is no loss ("the last 4.8 s (50%) were
            # lost; ... corrupt"); more is (a download cut short ends without an error).
            lost_s -= report.longest_gap_s
        skipped = report.damaged_packets + report.damaged_frames
        if report.stopped_by_error is None and lost_s <= max(0.5, 3 * frame_s):
            gap = self._gap_lost()
            if not skipped and not gap:
                return None
            said = []
            if skipped:
                said.append(
                    f"{report.damaged_packets} packet(s) could not be decoded, and the "
                    f"{report.damaged_frames} frame(s) decoded from damaged data up to the next keyframe "
                    "(smeared with pieces of other pictures) were left out"
                )
            if report.unread and gap:
                unread_kb = sum(size for _, size in report.unread) / 1024
                said.append(f"{unread_kb:.0f} kB of the file could not be read and were passed over")
            damaged = ", and ".join(said)
            return f"{info.path.name}: the picture is damaged in places: {damaged};{gap} the rest was read"
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
        if skipped:
            msg += f", and {skipped} damaged packet(s) or frame(s) before that point were left out"
        return msg + "; the file is truncated or corrupt, frames before that point were kept"
