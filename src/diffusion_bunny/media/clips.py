"""Cutting a shot clip out of the movie with PyAV (no ffmpeg binary): decode, resample, cover-crop
and encode H.264, for stage 06's ``export.video_clips``.

Resampling picks, for each target time ``t_k = start + k / clip_fps``, the decoded frame nearest to
it (the last frame whose time is <= t_k + half a source frame, as ffmpeg's ``fps`` filter rounds),
and never a frame outside ``[shot start, shot end)``: a clip never crosses a cut. Decoding starts
at a seek to the keyframe before the clip and stops at its last target, so a clip costs its own
span plus at most one GOP, not the movie. Times are relative to the stream start, as stage 01's
``shots`` table; the seek adds ``stream.start_time`` back.

Frames are shown as stage 01 shows them (:class:`ClipSource`): square pixels, rotation, HDR
tone-mapped, interlaced video deinterlaced (decided once per movie, as stage 01 decides it), and
cropped to the shot's picture box before the cover crop, so a clip never carries letterbox bars.

Written here rather than with a library: the nearest-frame resampling inside the shot's bounds is
the point, and PyAV (already a dependency) gives frame times exactly.
"""

from __future__ import annotations

import math
import os
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
from av.video.reformatter import VideoReformatter
from PIL import Image

from diffusion_bunny.media.images import crop_region
from diffusion_bunny.media.probe import picture_stream
from diffusion_bunny.media.video import (
    DecodeReport,
    Deinterlacer,
    Display,
    decode_past_damage,
    frame_to_bgr,
    interlace_decision,
    probe_video,
)


def cover_crop(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """``img`` scaled (LANCZOS) to cover ``size`` and centre-cropped to it (no letterbox bars)."""
    w, h = size
    scale = max(w / img.width, h / img.height)
    nw, nh = max(w, round(img.width * scale)), max(h, round(img.height * scale))
    img = img.resize((nw, nh), Image.Resampling.LANCZOS)
    left, top = (nw - w) // 2, (nh - h) // 2
    return img.crop((left, top, left + w, top + h))


class ClipSource:
    """A movie to cut clips from, shown as stage 01 shows it: the display (square pixels,
    rotation, HDR tone mapping) and whether it is deinterlaced are decided once per movie."""

    def __init__(self, movie: Path, deinterlace: bool | None = None):
        """``deinterlace``: as stage 01 was told (``extract.deinterlace``: on, off, or None for
        auto, decided as stage 01 decides: :func:`~diffusion_bunny.media.video.interlace_decision`)."""
        self.movie = Path(movie)
        info = probe_video(self.movie)
        self.fps = info.fps  # the film's mean rate, as stage 01 reads it (a Matroska file's measured)
        self.display = Display.of(info)
        self.deinterlace = interlace_decision(info)[0] if deinterlace is None else deinterlace

    def clip(
        self,
        start_s: float,
        frames: int,
        clip_fps: float,
        shot_start_s: float,
        shot_end_s: float,
        size: tuple[int, int],
        region: tuple[int, int, int, int] | None = None,
    ) -> list[Image.Image]:
        """The clip's ``frames`` pictures at ``size``, each the ``region`` (display pixels; None:
        the whole picture) of the frame nearest its target time."""
        return decode_clip(
            self.movie, start_s, frames, clip_fps, shot_start_s, shot_end_s, size, region=region, source=self
        )


def _decoded(container: Any, stream: Any, deinterlace: bool, fps: float) -> Any:
    # past damaged packets, as stage 01 read the movie (a shot's clip next to a glitch)
    frames = decode_past_damage(container, stream, DecodeReport(), fps)
    if not deinterlace:
        yield from frames
        return
    # A fresh deinterlacer after the seek: it reads the first frame's neighbours from what follows.
    deinterlacer = Deinterlacer(stream)
    for frame in frames:
        yield from deinterlacer.push(frame)
    yield from deinterlacer.push(None)


#: How far before a clip's first target the seek lands, tried in turn: a format without an index
#: (MPEG-TS, M2TS, MPEG-PS) seeks by timestamp to a packet that need not start a picture, the
#: decoder drops everything up to the next keyframe, and with a long GOP that was past the shot's
#: first frames (stage 06 failed, or the clip began with its first picture held for 21 frames).
#: ``None``: from the start of the file.
SEEK_BACK_S = (1.0, 6.0, 30.0, None)


def decode_clip(
    movie: Path,
    start_s: float,
    frames: int,
    clip_fps: float,
    shot_start_s: float,
    shot_end_s: float,
    size: tuple[int, int],
    *,
    region: tuple[int, int, int, int] | None = None,
    source: ClipSource | None = None,
) -> list[Image.Image]:
    """The clip's ``frames`` pictures at ``size`` (see the module docstring)."""
    source = source or ClipSource(movie)
    targets = [start_s + k / clip_fps for k in range(frames)]
    slack = 0.5 / source.fps if source.fps else 0.02  # the first target may fall between two frames
    with av.open(str(movie)) as container:
        stream = picture_stream(container)
        stream.thread_type = "AUTO"
        for back in SEEK_BACK_S:
            picked, first = _pick(container, stream, source, targets, shot_start_s, shot_end_s, back)
            if first is not None and first <= targets[0] + slack:
                break  # decoding began at or before the clip: every target had its frame
    if any(p is None for p in picked):
        raise ValueError(f"{movie}: no frame of the shot at {shot_start_s:.3f}s could be decoded")
    cache: dict[int, Image.Image] = {}
    out = []
    reformatter = VideoReformatter()
    for frame in picked:  # one source frame may serve two targets (clip_fps > the movie's fps)
        if id(frame) not in cache:
            bgr = crop_region(frame_to_bgr(frame, source.display, reformatter), region)
            cache[id(frame)] = cover_crop(Image.fromarray(bgr[..., ::-1]), size)
        out.append(cache[id(frame)])
    return out


def _pick(
    container: Any,
    stream: Any,
    source: ClipSource,
    targets: list[float],
    shot_start_s: float,
    shot_end_s: float,
    back_s: float | None,
) -> tuple[list[Any], float | None]:
    """The decoded frame for each target (None where none came), decoding from a seek ``back_s``
    before the first target (None: from the start), and the time of the first frame decoded."""
    tb = stream.time_base
    origin = float(stream.start_time * tb) if stream.start_time is not None else 0.0
    at = 0.0 if back_s is None else targets[0] + origin - back_s
    container.seek(max(0, math.floor(at / tb)), stream=stream, backward=True)
    picked: list[Any] = [None] * len(targets)
    k, first = 0, None
    prev, prev_t = None, 0.0  # the last decoded frame inside the shot, and its time
    for frame in _decoded(container, stream, source.deinterlace, source.fps):
        if frame.time is None:
            continue
        t = float(frame.time) - origin
        first = t if first is None else first
        if t < shot_start_s - 1e-6:
            continue
        if t >= shot_end_s - 1e-6:
            break  # the next shot: never cross the cut
        # Target k lies between the frame before and this one: the nearer of the two, by their
        # own times (half a frame at the declared rate was 0.5 ms in a file declaring 1000 fps,
        # and "nearest" became "the one before").
        while k < len(targets) and prev is not None and t >= targets[k]:
            picked[k] = prev if targets[k] - prev_t <= t - targets[k] else frame
            k += 1
        prev, prev_t = frame, t
        if k >= len(targets):
            break
    while k < len(targets) and prev is not None:
        picked[k] = prev
        k += 1
    return picked, first


def encode_mp4(path: Path, images: list[Image.Image], fps: float, crf: int = 18) -> Path:
    """H.264 mp4 (yuv420p, every frame at 1 / fps), written to a temporary name and renamed."""
    path = Path(path)
    tmp = path.with_name(path.stem + ".tmp.mp4")
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(str(tmp), "w") as out:
        stream = out.add_stream("libx264", rate=rate)
        stream.width, stream.height = images[0].size
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf), "preset": "medium"}
        stream.codec_context.time_base = 1 / rate
        for i, img in enumerate(images):
            frame = av.VideoFrame.from_image(img.convert("RGB"))
            frame.pts = i
            frame.time_base = 1 / rate
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    os.replace(tmp, path)
    return path


def clip_frames_rgb(path: Path, which: tuple[str, ...] = ("first", "middle", "last")) -> dict[str, Any]:
    """Frame count, fps, size, codec and the first/middle/last frames (RGB arrays) of a clip."""
    with av.open(str(path)) as c:
        s = picture_stream(c)
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(s)]
        info: dict[str, Any] = {
            "frames": len(frames),
            "fps": float(s.average_rate),
            "width": s.width,
            "height": s.height,
            "codec": s.codec_context.name,
        }
    pick = {"first": 0, "middle": len(frames) // 2, "last": len(frames) - 1}
    info.update({name: frames[pick[name]] for name in which})
    return info
