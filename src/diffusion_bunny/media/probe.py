"""Probe a movie file before any work: every bad input ends here in one clear message.

Kept apart from :mod:`diffusion_bunny.media.video` so that the command line can check its inputs
without importing OpenCV and NumPy (start-up time of every ``bunny run``).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import struct
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av

from diffusion_bunny.errors import BadInputError

#: FFmpeg's transfer characteristics (``AVColorTransferCharacteristic``) of HDR video.
TRC_PQ, TRC_HLG = 16, 18
#: FFmpeg's ``AVFieldOrder``: 0 unknown, 1 progressive, 2-5 interlaced (tt, bb, tb, bt).
FIELD_ORDERS = {0: "unknown", 1: "progressive", 2: "tt", 3: "bb", 4: "tb", 5: "bt"}
#: A sample aspect ratio outside this range is a broken header, not a real anamorphic format
#: (the widest in use, 2:1 squeeze of anamorphic cinema scans, and the narrowest, 1:2).
SAR_RANGE = (0.25, 4.0)


@dataclass(frozen=True)
class VideoInfo:
    """What the container says about the video stream, before decoding it."""

    path: Path
    container: str
    codec: str
    width: int
    height: int
    #: The display matrix's turn in degrees counter-clockwise, a quarter turn (0, 90, 180, 270).
    rotation: int
    fps: float
    duration_s: float | None
    declared_frames: int | None
    pix_fmt: str | None
    #: Shape of one stored pixel (width / height): 1 for square pixels, 16/11 for an anamorphic
    #: PAL DVD (704x576 shown as 1024x576). Already made 1 when the file's value was absurd.
    sample_aspect: Fraction = Fraction(1)
    #: Bits per sample of the luma plane (8, 10, 12).
    bit_depth: int = 8
    #: ``pq`` (SMPTE ST 2084) or ``hlg`` (ARIB STD-B67) for HDR video, None for SDR.
    hdr: str | None = None
    #: FFmpeg's colour tags of the stream (transfer, primaries, matrix, range), as numbers.
    color_trc: int = 0
    color_primaries: int = 0
    colorspace: int = 0
    color_range: int = 0
    #: The container's field order (``progressive``, ``tt``, ``bb``, ...) and whether the first
    #: frame is flagged interlaced. Flags can lie (telecined film is flagged interlaced): stage 01
    #: confirms them on the pictures before deinterlacing (:mod:`diffusion_bunny.media.video`).
    field_order: str = "unknown"
    interlaced_flag: bool = False
    #: Things the file says that were not believed (one sentence each), for the stage's warnings.
    warnings: tuple[str, ...] = ()
    #: Whether the display matrix also mirrors the picture (left and right swapped after the turn):
    #: what ``ffmpeg -display_hflip`` and some front cameras write.
    mirrored: bool = False

    @property
    def upright_size(self) -> tuple[int, int]:
        """Width and height in square pixels before rotation: the stored width scaled by the
        sample aspect ratio (rounded to even), the height as stored, as players show it."""
        width = self.width
        if self.sample_aspect != 1:
            width = max(2, round(self.width * float(self.sample_aspect) / 2) * 2)
        return width, self.height

    @property
    def display_size(self) -> tuple[int, int]:
        """Width and height as shown: square pixels (sample aspect ratio applied), then the
        rotation metadata."""
        width, height = self.upright_size
        if self.rotation % 180:
            return height, width
        return width, height


def _fail(path: Path, what: str) -> BadInputError:
    return BadInputError(f"{shown(path)}: {what}")


def unreadable(path: str | Path, exc: OSError) -> BadInputError:
    """The line for a movie this process may not read (no permission, an I/O error)."""
    return _fail(
        Path(path),
        f"cannot read the file ({exc.strerror or type(exc).__name__}); give it read permission "
        "(chmod +r) or run as a user who may read it",
    )


def shown(path: str | Path) -> str:
    """``path`` as text that can be printed and written anywhere: bytes of a name that are not
    UTF-8 as ``\\xe9`` escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def is_text(path: str | Path) -> bool:
    """Whether ``path`` is UTF-8 text. Linux takes any bytes for a name, and a name from an old
    archive or another system's copy can be Latin-1 (``caf\\xe9.mp4``); tables, notebooks,
    manifests and captions hold text."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_utf8_name(path: str | Path, what: str = "the movie") -> None:
    """One line when ``path`` is not UTF-8 text (:func:`is_text`): such a movie failed "with a
    bug" halfway."""
    if not is_text(path):
        raise BadInputError(
            f"{shown(path)}: the name of {what} is not UTF-8 text (made on another system); rename it "
            "(for example with convmv -f latin1 -t utf8) and run it again"
        )


def _picture_duration(
    container: av.container.InputContainer, stream: av.video.stream.VideoStream, path: Path | None = None
) -> float | None:
    """The picture's own length in seconds, or None where the file does not say.

    Matroska keeps no duration per stream, and a picture that starts later than the file (after
    the sound, or a cover) is that much shorter than the container; taken whole, stage 01 said
    the film's end was lost. Matroska's duration (its Segment Duration) runs from timestamp 0,
    whatever the first packet's: a film alone in its file starting at 0.834 s still warned that
    its last 0.8 s were lost. Elsewhere (an MPEG-TS) FFmpeg's duration runs from the earliest
    stream's start."""
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is None:
        return None
    first_s = (container.start_time or 0) / av.time_base
    start_s = first_s
    if stream.start_time is not None and stream.time_base is not None:
        start_s = max(first_s, float(stream.start_time * stream.time_base))
    if "matroska" in container.format.name:
        # The picture's own DURATION tag (FFmpeg and mkvmerge write one per track) where it has
        # one: the Segment's is the longest track's, and a film whose sound or subtitles ran
        # past its picture was said to have lost its end, "truncated or corrupt". Both run
        # from 0 here (FFmpeg's does; mkvmerge starts its tracks at 0).
        whole_s = container.duration / av.time_base
        own = _tagged_seconds(stream, whole_s)
        if own is None and path is not None and len(container.streams) > 1:
            own = _untagged_picture_end(path, stream.index, whole_s)
        end_s = own if own is not None and own > start_s else whole_s
        return end_s - start_s
    return container.duration / av.time_base - start_s


#: How much of a Matroska file's end is read for its picture's last packet (seconds).
TAIL_S = 10.0
#: A Matroska file without an index is read whole for its tail only up to this size (bytes).
TAIL_READ_WHOLE = 64 << 20


def _untagged_picture_end(path: Path, index: int, whole_s: float) -> float | None:
    """Where a Matroska picture without a ``DURATION`` tag ends (mkvmerge with
    ``--disable-track-statistics-tags``, older mkvmerge, GStreamer), read from the packets of the
    file's last :data:`TAIL_S`: the picture's last packet, where another track runs to the file's
    end and the picture stops more than a second before it (a file without an index to seek by
    is read whole only up to :data:`TAIL_READ_WHOLE`). None otherwise: a file cut short
    stops every track early, and its lost end is still said. Why: the Segment's duration is the
    longest track's, and 3 s of picture with 10 s of sound were "the last 6.2 s (62%) lost; the
    file is truncated or corrupt" while every frame was read."""
    try:
        stat = path.stat()
    except OSError:
        return None
    picture, other = _tail_ends(str(path), stat.st_size, stat.st_mtime_ns, index, whole_s)
    if picture is None or other is None or other < whole_s - 1.0 or picture > whole_s - 1.0:
        return None
    return picture


@functools.lru_cache(maxsize=64)
def _tail_ends(path: str, size: int, mtime_ns: int, index: int, whole_s: float) -> tuple[float | None, ...]:
    """The end (seconds) of the last packet of stream ``index`` and of any other stream, in the
    last :data:`TAIL_S` of the file (read without decoding, in a container of its own; kept per
    file for the process, as every stage probes the movie)."""
    ends: dict[bool, float] = {}
    target = max(0.0, whole_s - TAIL_S)
    with contextlib.suppress(av.error.FFmpegError, OSError), av.open(path, metadata_errors="ignore") as c:
        c.seek(int(target * av.time_base))
        for packet in c.demux():
            if packet.pts is None or packet.time_base is None:
                continue
            end = float((packet.pts + (packet.duration or 0)) * packet.time_base)
            if not ends and end < target - TAIL_S and size > TAIL_READ_WHOLE:
                # No index to seek by (no Cues: written last, so a file cut short has none): the
                # demuxer reads from the start, the whole of a 20 GB remux on every probe.
                return None, None
            own = packet.stream.index == index
            ends[own] = max(ends.get(own, end), end)
    return ends.get(True), ends.get(False)


#: A declared rate at or above this is a time base (Matroska's 1 ms, FLV's), not a film's.
TIME_BASE_RATE = 500.0
#: A Matroska film at most this long (seconds) is measured whole: its mean, exactly.
SHORT_FILM_S = 30.0
#: Packets read from the start to measure a film that declares a time base (about 20 s of film).
RATE_PACKETS = 600


def _tagged_seconds(stream: av.video.stream.VideoStream, container_s: float | None) -> float | None:
    """The track's own length from its ``DURATION`` tag (``HH:MM:SS.nnnnnnnnn``), or None: the
    Segment's duration is the longest track's, often the sound's. FFmpeg writes ``DURATION`` and
    rewrites it in every file it makes; mkvmerge's is ``DURATION-eng``, and a cut made from such a
    release by FFmpeg keeps the release's beside its own, so the plain one is read first and any
    longer than the file is another file's (a 10 s cut "lost 6,280 s")."""
    tags = {str(k).upper(): v for k, v in (stream.metadata or {}).items()}
    for key in ["DURATION", *sorted(k for k in tags if k.startswith("DURATION-"))]:
        if key not in tags:
            continue
        with contextlib.suppress(ValueError):
            hours, minutes, seconds = str(tags[key]).split(":")
            total = int(hours) * 3600 + int(minutes) * 60 + float(seconds)
            if total > 0 and (container_s is None or total <= container_s + 1.0):
                return total
    return None


def _measured_rate(path: Path, limit: int | None = RATE_PACKETS) -> float:
    """Frames a second over the presentation times of the film's first ``limit`` packets (None:
    all of them), read without decoding in a container of its own; 0.0 where they do not tell.
    Kept per file (its path, size and time) for the process: every stage probes the movie."""
    try:
        stat = path.stat()
    except OSError:
        return 0.0
    return _measured_rate_of(str(path), stat.st_size, stat.st_mtime_ns, limit)


@functools.lru_cache(maxsize=64)
def _measured_rate_of(path: str, size: int, mtime_ns: int, limit: int | None) -> float:
    times: list[float] = []
    with contextlib.suppress(av.error.FFmpegError, OSError), av.open(path, metadata_errors="ignore") as c:
        stream = picture_stream(c)
        if stream is None or stream.time_base is None:
            return 0.0
        for packet in c.demux(stream):
            if packet.pts is not None:
                times.append(float(packet.pts * stream.time_base))
            if limit is not None and len(times) >= limit:
                break
    times.sort()
    if limit is not None and len(times) >= limit:
        times = times[: len(times) - 16]  # frames reordered past the sample's end (B-pyramids)
    return (len(times) - 1) / (times[-1] - times[0]) if len(times) > 2 and times[-1] > times[0] else 0.0


#: FFmpeg's demuxers of bare video streams, with no container to time them.
RAW_STREAMS = frozenset({"h264", "hevc", "vvc", "mpegvideo", "m4v", "cavsvideo", "avs2", "avs3", "obu"})


def _frame_rate(
    path: Path,
    stream: av.video.stream.VideoStream,
    matroska: bool,
    duration_s: float | None,
    raw: bool = False,
    gif: bool = False,
) -> float:
    """The picture's mean frames a second, which every window in seconds that stage 01 counts
    in frames (a keyframe's window, the shortest shot, a shot clip) needs.

    MP4 and its kin count their frames, and FFmpeg's average rate is that count over the
    duration. Matroska counts none: its rate is the track's DefaultDuration (or FFmpeg's guess
    from the first frames without one), which a variable-frame-rate file muxed from a 30 fps
    source keeps at 30 while its frames run at 17, and a file muxed with 1 ms durations declares
    as 1000. So a Matroska film of up to :data:`SHORT_FILM_S` seconds is measured whole (a clip,
    a scene: its exact mean), and any film declaring a time base (:data:`TIME_BASE_RATE`) on its
    first :data:`RATE_PACKETS` packets; the declared rate is kept within 0.5% of the measure (a
    29.97 film keeps 30000/1001; a measured rate within 0.1% of a standard one is that one).
    A longer film declaring a film's rate keeps it: its first seconds alone are no mean (a still
    intro at 2 fps made a 24 fps film 13.8, a 29.97 opening made a 23.976 anime 29.97), and
    samples across it cost a read of most of a file without an index (66 of 73 MB a probe).
    mkvmerge's statistics tags (NUMBER_OF_FRAMES) are not read: a cut made from a release by
    FFmpeg keeps the release's count. Other files without a count (MPEG-TS, FLV) keep their
    declared rate unless it is a time base: a joined recording's times restart."""
    if raw and stream.guessed_rate:
        # A bare H.264/H.265 stream (a camera's, a drone's .h264) has no container to time it:
        # FFmpeg's demuxer gives every one 25 frames a second, and its frames no times, while the
        # stream's own timing (the rate ``ffmpeg`` encodes it on at) is the guessed rate. A 29.97
        # camera file read at 25 made every shot a fifth too long, and its EDL 25 fps.
        return _standard(float(stream.guessed_rate))
    if gif and stream.frames and duration_s:
        # A GIF times each frame by its own delay, and FFmpeg's average rate is its guess from the
        # first ones: 50/3 for a GIF of 47 frames in 3.12 s (15.1 a second), so every window
        # stage 01 counts in frames was a tenth off.
        return stream.frames / duration_s
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    declared = float(rate) if rate else 0.0
    if stream.frames:
        return declared
    implausible = not declared or declared >= TIME_BASE_RATE
    short = matroska and duration_s is not None and duration_s <= SHORT_FILM_S
    if not (implausible or short):
        return declared
    measured = _measured_rate(path, None if short else RATE_PACKETS)
    if measured and not (declared and abs(declared - measured) <= 0.005 * measured):
        return _standard(measured)
    return declared


#: Frame rates of film and video (the NTSC ones exact): a measured rate this close to one is it.
STANDARD_RATES = (24000 / 1001, 24.0, 25.0, 30000 / 1001, 30.0, 48.0, 50.0, 60000 / 1001, 60.0)


def _standard(rate: float) -> float:
    """``rate``, or the standard rate within 0.1% of it: a 29.97 film measured at 29.968 (its
    timestamps rounded to milliseconds) is 30000/1001, which an EDL's timecode takes."""
    near = min(STANDARD_RATES, key=lambda r: abs(r - rate))
    return near if abs(near - rate) <= 0.001 * near else rate


def image_demuxer(name: str) -> bool:
    """Whether FFmpeg's demuxer ``name`` is one of its picture readers (``image2``, ``*_pipe``)."""
    return name == "image2" or any(part.endswith("_pipe") for part in name.split(","))


def still_picture(container: av.container.InputContainer) -> bool:
    """Whether FFmpeg read a file as one picture: an image demuxer (``image2`` for a JPEG,
    ``png_pipe``, ``webp_pipe`` and the other ``*_pipe``) that finds no second picture. A photo
    given as the movie ran every stage on one frame, without a word. A bare Motion-JPEG stream (a
    webcam's ``.mjpeg``) is read by ``jpeg_pipe`` too, and is a film; so is an animated GIF
    (``gif``). Reads at most two packets: the caller reopens the file to decode it."""
    if not image_demuxer(container.format.name):
        return False
    stream = picture_stream(container)
    if stream is None:
        return False
    pictures = 0
    with contextlib.suppress(av.error.FFmpegError):
        for packet in container.demux(stream):
            pictures += packet.size > 0
            if pictures > 1:
                return False
    return True


def _open_film(path: Path) -> av.container.InputContainer:
    """``path`` opened by FFmpeg, or one line (:class:`BadInputError`) where FFmpeg cannot read it
    or finds one still picture in it (:func:`still_picture`)."""
    try:
        container = av.open(str(path), metadata_errors="ignore")
    except av.error.FFmpegError as exc:
        raise _fail(
            path,
            f"not a video FFmpeg can read ({exc.strerror or exc}); the file may be corrupt, "
            "truncated or of another type: copy or download it again, or check that it plays",
        ) from None
    if not image_demuxer(container.format.name):
        return container
    with container:
        if still_picture(container):
            raise _fail(
                path,
                "is a still picture, not a film; give a video file (a picture of a character goes "
                "in the --characters folder, in a sub-folder named after it)",
            )
    # read from its start again: the check took its first packets
    return av.open(str(path), metadata_errors="ignore")


def probe_video(path: str | Path) -> VideoInfo:
    """Open ``path`` and describe its first video stream.

    Every way a user can hand over a bad file ends here in one :class:`BadInputError` that says
    what is wrong: missing path, directory, zero-byte file, not a media file, no video stream,
    or a stream that does not yield a single frame.
    """
    path = Path(path)
    check_utf8_name(path)
    if not path.exists():
        raise _fail(path, "no such file; check the path")
    if path.is_dir():
        raise _fail(path, "is a folder, not a video file")
    if path.stat().st_size == 0:
        raise _fail(path, "the file is empty (0 bytes); it is not a video")
    try:
        path.open("rb").close()
    except OSError as exc:  # FFmpeg's "Permission denied" read as a corrupt file
        raise unreadable(path, exc) from None
    with _open_film(path) as container:
        stream = picture_stream(container)
        if stream is None:
            what = "only a cover picture" if container.streams.video else "no video stream"
            raise _fail(path, f"holds {what} (audio only, or not a movie)")
        ctx = stream.codec_context
        duration_s = _picture_duration(container, stream, path)
        first_frame = _first_frame(container, stream)
        if isinstance(first_frame, av.error.FFmpegError):
            reason = first_frame.strerror or first_frame
            raise _fail(
                path,
                f"the video stream cannot be decoded ({reason}); the file is damaged: copy or download "
                "it again, or check that it plays",
            ) from None
        if first_frame is None:
            raise _fail(
                path,
                "the video stream holds no decodable frame; the file is corrupt or truncated: copy or "
                "download it again, or check that it plays",
            )
        rotation, mirrored = display_turn(first_frame, ctx.name)
        name = container.format.name
        fps = _frame_rate(path, stream, "matroska" in name, duration_s, name in RAW_STREAMS, name == "gif")
        if not fps or not math.isfinite(fps):
            fps = 25.0
        sar, warnings = _sample_aspect(path, stream)
        trc = int(first_frame.color_trc or ctx.color_trc or 0)
        bits = max((c.bits for c in first_frame.format.components), default=8)
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
            sample_aspect=sar,
            bit_depth=bits,
            hdr={TRC_PQ: "pq", TRC_HLG: "hlg"}.get(trc),
            color_trc=trc,
            color_primaries=int(first_frame.color_primaries or ctx.color_primaries or 0),
            colorspace=int(first_frame.colorspace or ctx.colorspace or 0),
            color_range=int(first_frame.color_range or ctx.color_range or 0),
            field_order=FIELD_ORDERS.get(int(ctx.field_order or 0), "unknown"),
            interlaced_flag=bool(first_frame.interlaced_frame),
            warnings=warnings,
            mirrored=mirrored,
        )


#: Codecs whose decoders attach EXIF to their frames, a side data PyAV 18 cannot name: reading
#: ``frame.side_data`` of a Motion-JPEG camera clip raised ValueError, and of a PNG crashed the
#: interpreter later (at garbage collection). A display matrix is a container's (MP4, Matroska),
#: so their frames are read by ``frame.rotation`` alone.
EXIF_CODECS = frozenset({"mjpeg", "png", "apng", "webp", "tiff", "gif", "bmp", "jpeg2000", "jpegls"})


def quarter_turn(angle: float) -> int:
    """``angle`` (degrees) as the quarter turn it is within a degree of (0, 90, 180, 270), else 0:
    a picture is turned only by right angles here, as FFmpeg's autorotate does and as players
    show it. A tag of 45 degrees was half taken: the sizes swapped (a picture box "inside bars"
    that were not there) while the frames were saved unturned."""
    turn = round(angle / 90.0) * 90
    return turn % 360 if abs(angle - turn) <= 1.0 else 0


def display_turn(frame: av.VideoFrame, codec: str = "") -> tuple[int, bool]:
    """The turn (a quarter turn counter-clockwise: :func:`quarter_turn`) and mirror of ``frame``'s
    display matrix: the picture is shown turned by the angle, then mirrored left to right when
    the flag is set.

    Why not PyAV's ``frame.rotation`` alone: it is the angle of the matrix's first column and
    says nothing of a mirror, so a mirrored picture (``ffmpeg -display_hflip``: angle -180) was
    saved upside down. A mirror shows as a negative determinant; with the mirror of the shown x
    undone (its first row negated) what is left is a turn, read as FFmpeg's
    ``av_display_rotation_get`` reads it. Players and ``ffmpeg`` itself show such files mirrored.
    ``codec``: the stream's (:data:`EXIF_CODECS` are read by the angle alone)."""
    side = None
    if codec not in EXIF_CODECS:
        with contextlib.suppress(ValueError):  # a side data type newer than PyAV's list
            side = frame.side_data.get(av.sidedata.sidedata.Type.DISPLAYMATRIX)
    if side is None:
        return quarter_turn(frame.rotation or 0), False
    # a, c: the shown x of a stored (p, q) is a p + c q; b, d: its y (16.16 fixed point).
    a, b, _, c, d, *_ = struct.unpack("=9i", bytes(side))
    mirrored = a * d - b * c < 0
    if mirrored:
        a, c = -a, -c
    if not (math.hypot(a, c) and math.hypot(b, d)):
        return 0, False  # a degenerate matrix (zeros): shown as stored, as FFmpeg does
    angle = -math.degrees(math.atan2(b / math.hypot(b, d), a / math.hypot(a, c)))
    return quarter_turn(angle), mirrored


def repeats_a_frame(packet: av.Packet) -> bool:
    """Whether ``packet`` is an empty one with a time: Theora's way of showing the frame before
    for longer (a still, a variable-rate clip), which the decoder refuses ("Invalid argument") as
    ``ffmpeg`` never hands it one. Stage 01 stopped at the first, and a Theora film read as
    corrupt. The empty packet without a time that ends a demux flushes the decoder: kept."""
    return packet.size == 0 and (packet.pts is not None or packet.dts is not None)


#: Damaged packets passed over at the start of a stream before it is taken as undecodable.
FIRST_FRAME_TRIES = 250


def _first_frame(
    container: av.container.InputContainer, stream: av.video.stream.VideoStream
) -> av.VideoFrame | av.error.FFmpegError | None:
    """The stream's first frame the decoder gives, past damaged packets at its start (a glitch
    in the first keyframe refused a movie whose every later shot decoded; stage 01 reads past
    such packets too), or the error that ended the search, or None when the stream ran out."""
    error: av.error.FFmpegError | None = None
    try:
        for tries, packet in enumerate(container.demux(stream)):
            if repeats_a_frame(packet):
                continue
            try:
                frames = stream.decode(packet)
            except av.error.InvalidDataError as exc:
                error = exc
                if tries >= FIRST_FRAME_TRIES:
                    return exc
                continue
            if frames:
                return frames[0]
    except av.error.FFmpegError as exc:
        return exc
    return error


#: Video streams that are pictures, not the film: a cover (album art, a thumbnail a downloader
#: embedded), thumbnails along the timeline, a still.
_NOT_THE_FILM = (
    av.stream.Disposition.attached_pic
    | av.stream.Disposition.timed_thumbnails
    | av.stream.Disposition.still_image
)


def picture_stream(container: av.container.InputContainer) -> av.video.stream.VideoStream | None:
    """The film among a file's video streams (None: it has none): not a cover picture; of the
    others the one marked default, else the largest picture, as players choose.

    Why not simply the first: a Matroska file can carry a cover or a one-frame title card as its
    first video track, and an audio file its album art as a video stream; taken as the film, the
    run found one frame of a 300x300 picture. Every reader of the movie (probe, stage 01's
    decoder, the clips of stage 06) takes the stream this returns."""
    moving = [s for s in container.streams.video if not s.disposition & _NOT_THE_FILM]
    if not moving:
        return None
    default = [s for s in moving if s.disposition & av.stream.Disposition.default]
    if len(default) == 1:
        return default[0]
    candidates = default or moving
    return max(candidates, key=lambda s: (s.codec_context.width or 0) * (s.codec_context.height or 0))


def _sample_aspect(path: Path, stream: av.video.stream.VideoStream) -> tuple[Fraction, tuple[str, ...]]:
    """The stream's sample aspect ratio, or 1 (square) with a warning when it is absurd.

    The container's value wins over the codec's, as in ffprobe and players. A missing value
    (0/1 or unset) means square pixels, silently: that is what most files say."""
    sar = stream.sample_aspect_ratio or stream.codec_context.sample_aspect_ratio
    if sar is None or sar.numerator == 0:
        return Fraction(1), ()
    value = Fraction(sar.numerator, sar.denominator)
    low, high = SAR_RANGE
    if not low <= value <= high:
        return Fraction(1), (
            f"{path.name}: the file's sample aspect ratio {value} is absurd (outside {low}-{high:g}); "
            "treated as square pixels",
        )
    return value, ()
