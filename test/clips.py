"""Synthetic clips with known ground truth, made in the tests with PyAV alone.

PyAV's wheel bundles FFmpeg's libraries with libx264, libx265, libvpx and the native MPEG-4 and
AAC encoders, so every container and codec the tests need is written here without the ``ffmpeg``
program (a fresh machine has none): :func:`remux` is ``ffmpeg -c copy`` (optionally with a
display-matrix rotation, as ``-metadata:s:v:0 rotate=N`` writes it), :func:`transcode` is
``ffmpeg -c:v CODEC``, :func:`write_tone` an audio-only file and :func:`count_frames` the
frame count ``ffprobe -count_frames`` reports.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np


def shot_image(seed: int, width: int, height: int) -> np.ndarray:
    """A textured RGB picture with its own dominant hue: blobs and stripes, so it has edges
    (sharpness) and clearly differs from the picture of any other seed."""
    rng = np.random.default_rng(seed)
    hue = (seed * 47) % 180
    hsv = np.zeros((height, width, 3), np.uint8)
    hsv[..., 0] = hue
    hsv[..., 1] = 150 + rng.integers(0, 80)
    hsv[..., 2] = 90 + rng.integers(0, 60)
    img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    for _ in range(25):
        c = tuple(int(v) for v in rng.integers(0, 256, 3))
        center = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        cv2.circle(img, center, int(rng.integers(5, height // 4)), c, -1)
    for _ in range(8):
        c = tuple(int(v) for v in rng.integers(0, 256, 3))
        x = int(rng.integers(0, width))
        cv2.line(img, (x, 0), (x + int(rng.integers(-50, 50)), height), c, 3)
    return img


def render_shot(seed: int, n: int, width: int, height: int, pan: float = 0.0) -> list[np.ndarray]:
    """``n`` frames of one shot; ``pan`` pixels per frame of horizontal camera movement."""
    big = shot_image(seed, int(width + abs(pan) * n + 2), height)
    frames = []
    for i in range(n):
        x = abs(pan) * i
        m = np.float32([[1, 0, -x], [0, 1, 0]])
        frames.append(cv2.warpAffine(big, m, (width, height), borderMode=cv2.BORDER_REFLECT))
    return frames


def write_clip(
    path: Path,
    shots: list[tuple[int, int, float]],
    *,
    width: int = 320,
    height: int = 180,
    fps: int = 25,
    codec: str = "libx264",
    pix_fmt: str = "yuv420p",
    times: list[float] | None = None,
    options: dict[str, str] | None = None,
    metadata: dict[str, str] | None = None,
) -> list[int]:
    """Encode shots ``(seed, n_frames, pan)`` back to back with hard cuts; returns the cut frames.
    ``times`` gives explicit presentation times (variable frame rate); ``options``: the encoder's
    own, added to the defaults (e.g. ``{"x264-params": "keyint=10"}``); ``metadata``: the
    track's tags (mkvmerge's ``NUMBER_OF_FRAMES``)."""
    frames: list[np.ndarray] = []
    cuts = []
    for seed, n, pan in shots:
        if frames:
            cuts.append(len(frames))
        frames += render_shot(seed, n, width, height, pan)
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        stream.metadata.update(metadata or {})
        if codec == "libx264":
            stream.options = {"crf": "18", "preset": "veryfast", **(options or {})}
        elif options:
            stream.options = options
        if times is not None:
            stream.codec_context.time_base = Fraction(1, 1000)
        for i, img in enumerate(frames):
            vf = av.VideoFrame.from_ndarray(img, format="rgb24")
            if times is not None:
                vf.pts = round(times[i] * 1000)
                vf.time_base = Fraction(1, 1000)
            out.mux(stream.encode(vf))
        out.mux(stream.encode(None))
    return cuts


def remux(
    src: Path,
    dst: Path,
    *,
    rotation: int | None = None,
    display_matrix: tuple[int, ...] | None = None,
    options: dict[str, str] | None = None,
) -> Path:
    """Copy the video packets of ``src`` into ``dst`` (container from its suffix), like
    ``ffmpeg -i src -c copy dst``. ``rotation``: a display matrix turning the picture by that many
    degrees counter-clockwise (``rotation=90`` gives the file ``ffmpeg -metadata:s:v:0 rotate=90``
    writes: same ffprobe output, PyAV reads ``frame.rotation == 90``). ``display_matrix``: the nine
    numbers themselves, in FFmpeg's ``AV_PKT_DATA_DISPLAYMATRIX`` layout (what a camera writes
    into the track header). ``options``: muxer options, e.g. ``{"movflags": "+faststart"}``."""
    with av.open(str(src)) as inp, av.open(str(dst), "w", options=options or {}) as out:
        in_stream = inp.streams.video[0]
        stream = out.add_stream_from_template(in_stream)
        if rotation is not None:
            stream.set_display_rotation(rotation)
        if display_matrix is not None:
            stream.set_display_matrix(list(display_matrix))
        for packet in inp.demux(in_stream):
            if packet.dts is None:  # the demuxer's empty flush packet
                continue
            packet.stream = stream
            out.mux(packet)
    return dst


def transcode(
    src: Path,
    dst: Path,
    codec: str,
    *,
    pix_fmt: str = "yuv420p",
    options: dict[str, str] | None = None,
    gop: int | None = None,
    qscale: int | None = None,
) -> Path:
    """Decode ``src`` and encode every frame again with ``codec`` into ``dst``, like
    ``ffmpeg -i src -c:v CODEC [-pix_fmt] [-g] [-q:v] dst``."""
    with av.open(str(src)) as inp, av.open(str(dst), "w") as out:
        in_stream = inp.streams.video[0]
        rate = in_stream.average_rate or 25
        stream = out.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = in_stream.width, in_stream.height, pix_fmt
        if gop is not None:
            stream.codec_context.gop_size = gop
        if qscale is not None:  # -q:v N: constant quantiser N (global_quality in lambda units)
            stream.codec_context.qscale = True
            options = {**(options or {}), "global_quality": str(qscale * 118)}
        stream.options = options or {}
        for i, frame in enumerate(inp.decode(in_stream)):
            frame.pts, frame.time_base = i, 1 / Fraction(rate)
            frame.pict_type = av.video.frame.PictureType.NONE  # let the encoder choose
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return dst


def write_tone(path: Path, seconds: float = 1.0, frequency: float = 440.0, rate: int = 44100) -> Path:
    """An audio-only file (AAC sine tone), like ``ffmpeg -f lavfi -i sine=frequency=440:duration=1``."""
    t = np.arange(round(seconds * rate)) / rate
    samples = (0.125 * np.sin(2 * np.pi * frequency * t)).astype(np.float32)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("aac", rate=rate)
        stream.layout = "mono"
        for start in range(0, len(samples), 1024):
            chunk = samples[None, start : start + 1024]
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(chunk), format="flt", layout="mono")
            frame.sample_rate, frame.pts = rate, start
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return path


def _cover_frame(out: av.container.OutputContainer, cover: av.video.stream.VideoStream) -> None:
    """Encode one grey 96x96 picture into ``cover`` (an mjpeg stream of ``out``)."""
    cover.width, cover.height, cover.pix_fmt = 96, 96, "yuvj420p"
    grey = av.VideoFrame.from_ndarray(np.full((96, 96, 3), 200, np.uint8), format="rgb24")
    out.mux(cover.encode(grey))
    out.mux(cover.encode(None))


def write_film_with_cover(path: Path, n: int = 50, fps: int = 25, start_s: float = 1.0) -> Path:
    """A Matroska film whose first video track is a one-picture cover (not the default track),
    then the film's ``n`` frames (320x180, the default track) starting ``start_s`` seconds in, and
    silence from 0 to the film's end: like ``ffmpeg -i cover.png -i film.mp4 -map 0 -map 1 ...``
    with the sound starting before the picture."""
    rate = 48000
    with av.open(str(path), "w") as out:
        cover = out.add_stream("mjpeg", rate=1)
        video = out.add_stream("libx264", rate=fps)
        video.width, video.height, video.pix_fmt = 320, 180, "yuv420p"
        video.disposition = av.stream.Disposition.default
        cover.disposition = av.stream.Disposition(0)
        audio = out.add_stream("aac", rate=rate)
        audio.layout = "mono"
        _cover_frame(out, cover)
        silence = np.zeros((1, 1024), np.float32)
        for start in range(0, round((start_s + n / fps) * rate), 1024):
            frame = av.AudioFrame.from_ndarray(silence, format="flt", layout="mono")
            frame.sample_rate, frame.pts = rate, start
            out.mux(audio.encode(frame))
        out.mux(audio.encode(None))
        for i, img in enumerate(render_shot(3, n, 320, 180, 1.0)):
            vf = av.VideoFrame.from_ndarray(img, format="rgb24")
            vf.pts, vf.time_base = round(start_s * fps) + i, Fraction(1, fps)
            out.mux(video.encode(vf))
        out.mux(video.encode(None))
    return path


def write_song_with_cover(path: Path, seconds: float = 1.0) -> Path:
    """An MP3 of silence with album art (a video stream marked ``attached_pic``)."""
    rate = 44100
    with av.open(str(path), "w") as out:
        audio = out.add_stream("libmp3lame", rate=rate)
        audio.layout = "mono"
        cover = out.add_stream("mjpeg", rate=1)
        cover.disposition = av.stream.Disposition.attached_pic
        _cover_frame(out, cover)
        silence = np.zeros((1, 1152), np.float32)
        for start in range(0, round(seconds * rate), 1152):
            frame = av.AudioFrame.from_ndarray(silence, format="fltp", layout="mono")
            frame.sample_rate, frame.pts = rate, start
            out.mux(audio.encode(frame))
        out.mux(audio.encode(None))
    return path


def count_frames(path: Path) -> tuple[int, int]:
    """``(packets, frames)`` of the first video stream: packets demuxed (no decoding) and frames
    decoded by a plain single-threaded decode, independent of :class:`VideoReader` (which
    decodes with frame threading and may stop early); ``ffprobe -count_frames`` reports the
    second."""
    with av.open(str(path)) as c:
        packets = sum(1 for p in c.demux(c.streams.video[0]) if p.size)
    with av.open(str(path)) as c:
        frames = sum(1 for _ in c.decode(c.streams.video[0]))
    return packets, frames
