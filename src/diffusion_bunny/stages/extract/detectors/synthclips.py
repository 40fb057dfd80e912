"""Short synthetic clips with known shot boundaries, one kind of transition each, made with FFmpeg's
filters through PyAV (no ffmpeg program needed).

Shot detectors are judged on what they get wrong: gradual transitions they miss, and flashes
or fast camera moves they mistake for cuts. This module films the still pictures that ship
inside installed packages (the demo movie's sources, :func:`diffusion_bunny.media.samples.load_source`)
with a moving virtual camera and light film grain, and joins the shots with FFmpeg's own
transitions (libavfilter, from the PyAV wheel), so the ground truth is exact by construction:

* ``cut``: hard cuts (one of them between two framings of the same picture);
* ``dissolve``: cross-dissolves (``xfade=fade``); ``fadeblack``: fades through black
  (``xfade=fadeblack``); ``wipe``: wipes (``xfade=wipeleft``);
* ``flash``: hard cuts plus camera flashes (a few frames brightened almost to white) that are
  *not* boundaries;
* ``pan``: hard cuts between fast pans (the picture moves by a sixth of the frame per frame).

Boundaries are given as the first frame of the new shot for hard cuts and as the inclusive span
``[first blended frame, first frame of the new shot alone]`` for gradual transitions: a
detector may split a dissolve anywhere inside it (stage 01 splits at TransNetV2's peak, the
middle), and :func:`diffusion_bunny.demo.metrics.match_boundaries` scores a detection inside the
span as exact.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import av.filter
import numpy as np

from diffusion_bunny.media.samples import load_source

KINDS = ("cut", "dissolve", "fadeblack", "wipe", "flash", "pan")
GRADUAL = {"dissolve": "fade", "fadeblack": "fadeblack", "wipe": "wipeleft"}
SOURCES = ("astronaut", "coffee", "chelsea", "rocket", "motorcycle", "immunohistochemistry", "grace_hopper")


@dataclass(frozen=True)
class Clip:
    """A rendered clip and its truth: ``boundaries`` holds ints (cuts) and ``[start, end]`` spans."""

    path: Path
    kind: str
    frames: int
    fps: int
    boundaries: list[int | list[int]]
    flashes: list[int]

    def truth(self) -> list[int | tuple[int, int]]:
        """Boundaries in the form :func:`~diffusion_bunny.demo.metrics.match_boundaries` takes."""
        return [b if isinstance(b, int) else (b[0], b[1]) for b in self.boundaries]


Filter = tuple[str, str]  # (libavfilter name, its options string)


def _shot_filters(frames: int, width: int, height: int, fast: bool, variant: int) -> list[Filter]:
    """Filter chain of one shot: a moving camera over the still picture, with grain."""
    if fast:
        # The camera sweeps across a picture four frames wide: a sixth of the frame per frame
        # at 24-25 frames of shot, a whip pan for a detector.
        scale = f"{width * 4}:{height * 2}"
        x = f"(iw-ow)*n/{max(frames - 1, 1)}"
        y = "(ih-oh)/2"
    else:
        # A slow pan (one direction or the other) over a picture a third wider than the frame.
        scale = f"{round(width * 1.35)}:{round(height * 1.35)}"
        direction = "n" if variant % 2 == 0 else f"({frames}-n)"
        x = f"(iw-ow)*{direction}/{frames}"
        y = f"(ih-oh)*{0.3 + 0.1 * (variant % 4):.2f}"
    return [
        ("scale", scale),
        ("crop", f"{width}:{height}:x='{x}':y='{y}'"),
        ("noise", "alls=4:allf=t"),
        ("trim", f"end_frame={frames}"),
        ("setpts", "PTS-STARTPTS"),
        ("format", "yuv420p"),
        ("setsar", "1"),
    ]


class _Graph:
    """A libavfilter graph built node by node through PyAV (the same filters the ``ffmpeg``
    command would run from a ``-filter_complex`` string, with FFmpeg's libraries from the PyAV
    wheel: no ffmpeg program needed)."""

    def __init__(self) -> None:
        self.graph = av.filter.Graph()
        self.sources: list[tuple[object, np.ndarray]] = []

    def source(self, rgb: np.ndarray, fps: int) -> object:
        """A still picture looped at ``fps`` (``ffmpeg -loop 1 -framerate fps -i picture``)."""
        height, width = rgb.shape[:2]
        node = self.graph.add(
            "buffer",
            video_size=f"{width}x{height}",
            pix_fmt="rgb24",
            time_base=f"1/{fps}",
            frame_rate=f"{fps}/1",
            pixel_aspect="1/1",
        )
        self.sources.append((node, rgb))
        return node

    def chain(self, node: object, filters: list[Filter]) -> object:
        for name, args in filters:
            nxt = self.graph.add(name, args)
            node.link_to(nxt)
            node = nxt
        return node

    def join(self, name: str, args: str, a: object, b: object) -> object:
        node = self.graph.add(name, args)
        a.link_to(node, 0, 0)
        b.link_to(node, 0, 1)
        return node

    def run(self, last: object, n_frames: int, loop_frames: int) -> list[object]:
        """Feed ``loop_frames`` copies of each picture, return the first ``n_frames`` output frames."""
        sink = self.graph.add("buffersink")
        last.link_to(sink)
        self.graph.configure()
        for node, rgb in self.sources:
            for i in range(loop_frames):
                frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
                frame.pts = i
                node.push(frame)
            node.push(None)
        out = []
        while len(out) < n_frames:
            try:
                out.append(sink.pull())
            except (av.error.EOFError, BlockingIOError):
                break
        return out


def make_clip(
    path: Path,
    kind: str,
    *,
    shots: int = 4,
    shot_frames: int = 50,
    transition_frames: int = 12,
    width: int = 320,
    height: int = 180,
    fps: int = 25,
    seed: int = 0,
) -> Clip:
    """Render a clip of ``shots`` shots joined by transitions of ``kind`` (see the module doc);
    the truth is written beside it as ``<name>.truth.json``."""
    if kind not in KINDS:
        raise ValueError(f"unknown clip kind {kind!r} (known: {', '.join(KINDS)})")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    g = _Graph()
    streams = _shot_streams(g, kind, shots, shot_frames, (width, height), fps, seed)
    boundaries: list[int | list[int]] = []
    acc, length = streams[0], shot_frames
    d = transition_frames
    for i in range(1, shots):
        if kind in GRADUAL:
            offset = length - d
            acc = g.join(
                "xfade",
                f"transition={GRADUAL[kind]}:duration={d / fps:.6f}:offset={offset / fps:.6f}",
                acc,
                streams[i],
            )
            # xfade blends frames offset .. offset+d-1; the new shot is alone from offset+d on.
            boundaries.append([offset, offset + d])
            length = offset + shot_frames
        else:
            acc = g.join("concat", "n=2:v=1:a=0", acc, streams[i])
            boundaries.append(length)
            length += shot_frames
    flashes: list[int] = []
    if kind == "flash":
        flashes, filters = _flash_filters(shots, shot_frames)
        acc = g.chain(acc, filters)
    frames = g.run(acc, length, shot_frames)
    if len(frames) != length:
        raise RuntimeError(f"the filter graph gave {len(frames)} frames, {length} expected")
    _encode(path, frames, width, height, fps)
    clip = Clip(path=path, kind=kind, frames=length, fps=fps, boundaries=boundaries, flashes=flashes)
    path.with_suffix(".truth.json").write_text(json.dumps(_doc(clip), indent=1) + "\n")
    return clip


def _shot_streams(
    g: _Graph, kind: str, shots: int, shot_frames: int, size: tuple[int, int], fps: int, seed: int
) -> list[object]:
    """One filmed picture per shot (pictures in an order drawn from ``seed``), each a chain of
    :func:`_shot_filters` in ``g``."""
    width, height = size
    rng = np.random.default_rng(seed)
    names = [SOURCES[i] for i in rng.permutation(len(SOURCES))]
    picks = [names[i % len(names)] for i in range(shots)]
    if kind == "cut" and shots >= 3:
        picks[2] = picks[1]  # a cut between two framings of the same picture
    streams = []
    for i, name in enumerate(picks):
        chain = _shot_filters(shot_frames, width, height, fast=kind == "pan", variant=seed + i)
        if kind == "cut" and i == 2:
            # Same picture, other framing: zoomed in on another part of it.
            chain[0] = ("scale", f"{width * 2}:{height * 2}")
        streams.append(g.chain(g.source(np.ascontiguousarray(load_source(name)), fps), chain))
    return streams


def _flash_filters(shots: int, shot_frames: int) -> tuple[list[int], list[Filter]]:
    """Two flashes per shot after the first (two frames almost white, then one half as bright):
    their first frames and the filters that draw them."""
    flashes: list[int] = []
    enables = []
    for i in range(1, shots):
        start = i * shot_frames
        for at in (start + shot_frames // 3, start + 2 * shot_frames // 3):
            flashes.append(at)
            enables.append((at, at + 1, at + 2))
    strong = "+".join(f"between(n,{a},{b})" for a, b, _ in enables)
    weak = "+".join(f"eq(n,{c})" for _, _, c in enables)
    return flashes, [
        ("lutyuv", f"y='min(255,val*0.4+200)':u=128:v=128:enable='{strong}'"),
        ("lutyuv", f"y='min(255,val*0.7+90)':enable='{weak}'"),
    ]


def _encode(path: Path, frames: list[object], width: int, height: int, fps: int) -> None:
    """Encode the filter graph's frames with libx264 into ``path``."""
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "veryfast", "crf": "20"}
        stream.codec_context.thread_count = 2
        for i, frame in enumerate(frames):
            frame.pts, frame.time_base = i, Fraction(1, fps)
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))


def _doc(clip: Clip) -> dict[str, Any]:
    return {
        "movie": clip.path.name,
        "kind": clip.kind,
        "frames": clip.frames,
        "fps": clip.fps,
        "boundaries": clip.boundaries,
        "flashes": clip.flashes,
    }
