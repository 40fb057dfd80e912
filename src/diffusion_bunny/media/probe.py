"""Probe a movie file before any work: every bad input ends here in one clear message.

Kept apart from :mod:`diffusion_bunny.media.video` so that the command line can check its inputs
without importing OpenCV and NumPy (start-up time of every ``bunny run``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import av

from diffusion_bunny.errors import BadInputError


@dataclass(frozen=True)
class VideoInfo:
    """What the container says about the video stream, before decoding it."""

    path: Path
    container: str
    codec: str
    width: int
    height: int
    rotation: int
    fps: float
    duration_s: float | None
    declared_frames: int | None
    pix_fmt: str | None

    @property
    def display_size(self) -> tuple[int, int]:
        """Width and height after applying rotation metadata."""
        if self.rotation % 180:
            return self.height, self.width
        return self.width, self.height


def _fail(path: Path, what: str) -> BadInputError:
    return BadInputError(f"{path}: {what}")


def probe_video(path: str | Path) -> VideoInfo:
    """Open ``path`` and describe its first video stream.

    Every way a user can hand over a bad file ends here in one :class:`BadInputError` that says
    what is wrong: missing path, directory, zero-byte file, not a media file, no video stream,
    or a stream that does not yield a single frame.
    """
    path = Path(path)
    if not path.exists():
        raise _fail(path, "no such file; check the path")
    if path.is_dir():
        raise _fail(path, "is a folder, not a video file")
    if path.stat().st_size == 0:
        raise _fail(path, "the file is empty (0 bytes); it is not a video")
    try:
        container = av.open(str(path), metadata_errors="ignore")
    except av.error.FFmpegError as exc:
        raise _fail(
            path,
            f"not a video FFmpeg can read ({exc.strerror or exc}); the file may be corrupt, "
            "truncated or of another type",
        ) from None
    with container:
        if not container.streams.video:
            raise _fail(path, "holds no video stream (audio only, or not a movie)")
        stream = container.streams.video[0]
        ctx = stream.codec_context
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        fps = float(rate) if rate else 0.0
        duration_s = None
        if stream.duration is not None and stream.time_base is not None:
            duration_s = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            duration_s = container.duration / av.time_base
        rotation = 0
        first_frame = None
        try:
            for frame in container.decode(stream):
                first_frame = frame
                break
        except av.error.FFmpegError as exc:
            raise _fail(path, f"the video stream cannot be decoded ({exc.strerror or exc})") from None
        if first_frame is None:
            raise _fail(path, "the video stream holds no decodable frame; the file is corrupt or truncated")
        rotation = round(first_frame.rotation or 0) % 360
        if not fps or not math.isfinite(fps):
            fps = 25.0
        return VideoInfo(
            path=path,
            container=container.format.name,
            codec=ctx.name,
            width=first_frame.width,
            height=first_frame.height,
            rotation=rotation,
            fps=fps,
            duration_s=duration_s,
            declared_frames=stream.frames or None,
            pix_fmt=first_frame.format.name,
        )
