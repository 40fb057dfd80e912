"""Clusters out to an editor: a CSV table and a CMX3600 EDL.

The EDL is written by OpenTimelineIO's ``cmx_3600`` adapter rather than by string formatting of
our own: timecode arithmetic (drop frame, fractional rates), reel-name limits and the comment
conventions NLEs read (``* FROM CLIP NAME:``, ``* LOC:``) are exactly what that well-kept library
is for, and its reader lets the tests parse the file back.

Layout of the EDL: one video track, the clusters one after another (largest first, the noise
bucket last), and inside a cluster its shots in movie order; each event is the whole shot
(source in/out from stage 01's ``shots`` table), named ``<cluster id> <cluster name> shot N``, with
a locator at the first event of every cluster. Imported into an NLE it is a sequence of the movie
regrouped by place (or by place and character), ready for an editor to scrub through.

CMX3600 timecode exists only at the SMPTE rates (:data:`EDL_RATES`). A movie at another rate (an AVI
at 1000000/66667 fps, 12.5 fps, 120 fps) is written at the nearest of them with every event
placed by time (a frame of the movie may round to the neighbouring timecode frame), and the file
says so in a comment; a rate with no sensible neighbour (not a positive number) skips the EDL. An
export format never fails the stage: :func:`edl_rate` decides, the caller warns.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import av
import opentimelineio as otio
import polars as pl

from diffusion_bunny.errors import BadInputError
from diffusion_bunny.stages.scenes.tables import LEVELS, NOISE

#: The CSV's columns, in order.
CSV_COLUMNS = (
    "cluster_id",
    "name",
    "frame_id",
    "shot_id",
    "frame_index",
    "timestamp_s",
    "similarity",
    "manual",
    "characters",
    "path",
)


def reel_name(movie: Path) -> str:
    """CMX3600 reel names: at most 8 characters, letters, digits and underscores."""
    reel = re.sub(r"[^A-Z0-9_]", "", movie.stem.upper().replace("-", "_").replace(" ", "_"))
    return (reel or "AX")[:8]


def cluster_rows(clusters: pl.DataFrame, frames: pl.DataFrame, level: str) -> pl.DataFrame:
    """The clusters of ``level`` joined with frame times: one row per frame, in export order
    (largest cluster first, the noise bucket last, frames in movie order)."""
    if level not in LEVELS:
        raise BadInputError(f"level must be one of {', '.join(LEVELS)}, not {level!r}")
    table = clusters.filter(pl.col("level") == level).join(
        frames.select("frame_id", "frame_index", "timestamp_s", "path"), on="frame_id", how="left"
    )
    sizes = table.group_by("cluster_id").len("size")
    return (
        table.join(sizes, on="cluster_id")
        .with_columns((pl.col("cluster_id") == NOISE).alias("_noise"))
        .sort(["_noise", "size", "cluster_id", "frame_index"], descending=[False, True, False, False])
        .drop("_noise")
    )


def clusters_csv(rows: pl.DataFrame) -> str:
    """The CSV an editor or a spreadsheet reads: one row per frame (:data:`CSV_COLUMNS`)."""
    return rows.select(CSV_COLUMNS).write_csv()


def fps_from_frames(frames: pl.DataFrame) -> float:
    """The frame rate the frames' indices and times imply (when no manifest says it)."""
    timed = frames.filter(pl.col("timestamp_s") > 0)
    if timed.is_empty():
        return 24.0
    return float((timed["frame_index"] / timed["timestamp_s"]).median())


#: The rates OpenTimelineIO's CMX3600 writer accepts (SMPTE timecode rates; it refuses the rest
#: with "SMPTE timecode does not support this rate").
EDL_RATES = (24000 / 1001, 24.0, 25.0, 30000 / 1001, 30.0, 48000 / 1001, 48.0, 50.0, 60000 / 1001, 60.0)


def edl_rate(fps: float) -> tuple[float | None, str | None]:
    """The timecode rate to write the EDL at, and a note when it is not the movie's own rate:
    ``(fps, None)`` for a SMPTE rate, ``(nearest SMPTE rate, note)`` otherwise, ``(None, note)``
    when ``fps`` is no usable rate (the EDL is then skipped)."""
    if not math.isfinite(fps) or fps <= 0:
        return None, f"the movie's frame rate ({fps}) is not a positive number, so no EDL timecode fits it"
    nearest = min(EDL_RATES, key=lambda r: abs(r - fps))
    if abs(nearest - fps) < 1e-3:
        return nearest, None
    return nearest, (
        f"the movie runs at {fps:.6g} fps, which CMX3600 timecode does not support; this EDL is "
        f"written at {nearest:.6g} fps with every event placed by time (to the nearest frame)"
    )


def start_timecode(movie: Path) -> str | None:
    """The movie's own timecode at its first frame (a camera's or an editor's export starts at
    01:00:00:00, say), from its picture stream's tags, a timecode track's or the container's; None
    when it has none or cannot be opened. An EDL that counted from 00:00:00:00 for such a movie
    pointed an editor's relink an hour away from every shot."""
    try:
        with av.open(str(movie)) as container:
            tags = [dict(s.metadata) for s in container.streams if s.type in ("video", "data")]
            tags.append(dict(container.metadata))
    except (av.FFmpegError, OSError, ValueError):
        return None
    return next((t["timecode"] for t in tags if t.get("timecode")), None)


def timecode_frames(timecode: str | None, rate: float) -> int:
    """Frames at ``rate`` from 00:00:00:00 to ``timecode`` (0 for none, or for a tag that is no
    timecode OpenTimelineIO reads at that rate)."""
    if not timecode:
        return 0
    try:
        return round(otio.opentime.from_timecode(timecode, rate).value)
    except (ValueError, TypeError):
        return 0


def build_timeline(
    rows: pl.DataFrame,
    shots: pl.DataFrame,
    fps: float,
    movie: Path,
    level: str = "scene",
    rate: float | None = None,
    offset: int = 0,
) -> Any:
    """An OpenTimelineIO timeline of the clusters' shots (see the module docstring). ``rate``
    (default ``fps``) is the timecode rate: movie frames at ``fps`` are placed by time on it,
    ``offset`` frames on (the movie's own start timecode, :func:`timecode_frames`)."""
    rate = fps if rate is None else rate
    timed = {"start_s", "end_s"} <= set(shots.columns) and not shots.is_empty()
    # Counted from the first frame's time, as frame 0 is (a stream whose first frame is shown at
    # 0.08 s, after its B-frames' delay, starts at 00:00:00:00 either way).
    origin = float(shots["start_s"].min()) if timed else 0.0

    def at(frame: int, time_s: float | None) -> int:
        # By the shot's time where stage 01 wrote it: frames are counted at the mean rate, and on
        # variable-frame-rate footage a shot starting at 2.7 s was placed at 4.75 s.
        if time_s is not None:
            return offset + round((time_s - origin) * rate)
        return offset + (frame if rate == fps else round(frame * rate / fps))

    reel = reel_name(movie)
    timeline = otio.schema.Timeline(name=f"{movie.stem} {level} clusters")
    track = otio.schema.Track(name="V1", kind=otio.schema.TrackKind.Video)
    timeline.tracks.append(track)
    columns = ["start_frame", "end_frame", *(["start_s", "end_s"] if timed else [])]
    by_shot = shots.select("shot_id", *columns).rows_by_key("shot_id", unique=True)
    for (cid,), group in rows.group_by("cluster_id", maintain_order=True):
        name = group["name"][0]
        first = True
        for shot_id in group.sort("frame_index")["shot_id"].unique(maintain_order=True).to_list():
            row = by_shot[shot_id]
            start, end = at(row[0], row[2] if timed else None), at(row[1], row[3] if timed else None)
            clip = otio.schema.Clip(
                name=f"{cid} {name} shot {shot_id}",
                media_reference=otio.schema.ExternalReference(target_url=str(movie)),
                source_range=otio.opentime.TimeRange(
                    otio.opentime.RationalTime(start, rate),
                    otio.opentime.RationalTime(max(end - start, 1), rate),
                ),
            )
            clip.metadata["cmx_3600"] = {"reel": reel}
            clip.metadata["diffusion_bunny"] = {"cluster_id": cid, "shot_id": int(shot_id), "level": level}
            if first:
                clip.markers.append(
                    otio.schema.Marker(
                        name=f"{cid} {name}",
                        marked_range=otio.opentime.TimeRange(
                            otio.opentime.RationalTime(start, rate), otio.opentime.RationalTime(1, rate)
                        ),
                        color=otio.schema.MarkerColor.RED if cid == NOISE else otio.schema.MarkerColor.GREEN,
                    )
                )
                first = False
            track.append(clip)
    return timeline


def edl_text(timeline: Any, note: str | None = None) -> str:
    """The timeline as a CMX3600 EDL, by OpenTimelineIO's adapter; ``note`` becomes a comment
    (``* NOTE: ...``) of the first event, the one place both editors and the adapter's own reader
    accept a free comment (a comment line before the first event is a parse error there)."""
    first = next(iter(timeline.find_clips()), None)
    if note is not None and first is not None:
        first.metadata["cmx_3600"]["comments"] = [f"NOTE: {note}"]
    return _cmx_events(otio.adapters.write_to_string(timeline, "cmx_3600"))


_EVENT = re.compile(r"^(\d{4,})(?= )", re.MULTILINE)
_TIMECODE = re.compile(r"\b\d\d:\d\d:\d\d[:;]\d\d\b")


def _cmx_events(text: str) -> str:
    """What the adapter leaves out of CMX3600: event numbers have three digits (a film of more
    than 999 (cluster, shot) events, which a feature always is, wrote ``1000``, shifting every
    column: they start again at 001, as editors number them), and the ``FCM`` line that says
    whether the timecodes count drop frame (at 29.97 without it an editor may read them as
    non-drop, 108 frames an hour off)."""
    text = _EVENT.sub(lambda m: f"{(int(m.group(1)) - 1) % 999 + 1:03d}", text)
    drop = any(";" in tc for tc in _TIMECODE.findall(text))
    fcm = f"FCM: {'DROP FRAME' if drop else 'NON-DROP FRAME'}"
    lines = text.split("\n")
    at = next((i + 1 for i, line in enumerate(lines) if line.startswith("TITLE:")), 0)
    return "\n".join([*lines[:at], fcm, *lines[at:]])
