"""Short synthetic clips with known shot boundaries, one kind of transition each, made with ffmpeg.

Shot detectors are judged on what they get wrong: gradual transitions they miss, and flashes
or fast camera moves they mistake for cuts. This module films the still pictures that ship
inside installed packages (the demo movie's sources, :func:`diffusion_bunny.demo.movie.load_source`)
with a moving virtual camera and light film grain, and joins the shots with ffmpeg's own
transitions, so the ground truth is exact by construction:

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
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

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


def _source_png(folder: Path, name: str) -> Path:
    from diffusion_bunny.demo.movie import load_source

    path = folder / f"{name}.png"
    if not path.is_file():
        cv2.imwrite(str(path), cv2.cvtColor(np.asarray(load_source(name)), cv2.COLOR_RGB2BGR))
    return path


def _shot_graph(idx: int, frames: int, width: int, height: int, fast: bool, variant: int) -> str:
    """Filter chain for input ``idx``: a moving camera over the still picture, with grain."""
    if fast:
        # The camera sweeps across a picture four frames wide: a sixth of the frame per frame
        # at 24-25 frames of shot, a whip pan for a detector.
        scale = f"scale={width * 4}:{height * 2}"
        x = f"(iw-ow)*n/{max(frames - 1, 1)}"
        y = "(ih-oh)/2"
    else:
        # A slow pan (one direction or the other) over a picture a third wider than the frame.
        scale = f"scale={round(width * 1.35)}:{round(height * 1.35)}"
        direction = "n" if variant % 2 == 0 else f"({frames}-n)"
        x = f"(iw-ow)*{direction}/{frames}"
        y = f"(ih-oh)*{0.3 + 0.1 * (variant % 4):.2f}"
    return (
        f"[{idx}:v]{scale},crop={width}:{height}:x='{x}':y='{y}',"
        f"noise=alls=4:allf=t,trim=end_frame={frames},setpts=PTS-STARTPTS,format=yuv420p,setsar=1"
    )


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
    ffmpeg: str | None = None,
) -> Clip:
    """Render a clip of ``shots`` shots joined by transitions of ``kind`` (see the module doc);
    the truth is written beside it as ``<name>.truth.json``."""
    if kind not in KINDS:
        raise ValueError(f"unknown clip kind {kind!r} (known: {', '.join(KINDS)})")
    ffmpeg = ffmpeg or shutil.which("ffmpeg")
    if ffmpeg is None:
        raise FileNotFoundError("ffmpeg is not installed (Debian: apt-get install ffmpeg)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    src_dir = path.parent / "sources"
    src_dir.mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    names = [SOURCES[i] for i in rng.permutation(len(SOURCES))]
    picks = [names[i % len(names)] for i in range(shots)]
    if kind == "cut" and shots >= 3:
        picks[2] = picks[1]  # a cut between two framings of the same picture
    inputs: list[str] = []
    graphs: list[str] = []
    for i, name in enumerate(picks):
        inputs += ["-loop", "1", "-framerate", str(fps), "-i", str(_source_png(src_dir, name))]
        chain = _shot_graph(i, shot_frames, width, height, fast=kind == "pan", variant=seed + i)
        if kind == "cut" and i == 2:
            # Same picture, other framing: zoomed in on another part of it.
            chain = chain.replace(
                f"scale={round(width * 1.35)}:{round(height * 1.35)}", f"scale={width * 2}:{height * 2}"
            )
        graphs.append(chain + f"[s{i}]")
    flashes: list[int] = []
    boundaries: list[int | list[int]] = []
    acc, length = "s0", shot_frames
    d = transition_frames
    for i in range(1, shots):
        out = f"a{i}"
        if kind in GRADUAL:
            offset = length - d
            graphs.append(
                f"[{acc}][s{i}]xfade=transition={GRADUAL[kind]}:duration={d / fps:.6f}:"
                f"offset={offset / fps:.6f}[{out}]"
            )
            # xfade blends frames offset .. offset+d-1; the new shot is alone from offset+d on.
            boundaries.append([offset, offset + d])
            length = offset + shot_frames
        else:
            graphs.append(f"[{acc}][s{i}]concat=n=2:v=1:a=0[{out}]")
            boundaries.append(length)
            length += shot_frames
        acc = out
    final = acc
    if kind == "flash":
        # Two flashes per shot after the first: two frames almost white, then one half as bright.
        enables = []
        for i in range(1, shots):
            start = i * shot_frames
            for at in (start + shot_frames // 3, start + 2 * shot_frames // 3):
                flashes.append(at)
                enables.append((at, at + 1, at + 2))
        strong = "+".join(f"between(n,{a},{b})" for a, b, _ in enables)
        weak = "+".join(f"eq(n,{c})" for _, _, c in enables)
        graphs.append(
            f"[{acc}]lutyuv=y='min(255,val*0.4+200)':u=128:v=128:enable='{strong}',"
            f"lutyuv=y='min(255,val*0.7+90)':enable='{weak}'[fl]"
        )
        final = "fl"
    cmd = [
        ffmpeg, "-nostdin", "-v", "error", "-y", *inputs,
        "-filter_complex", ";".join(graphs), "-map", f"[{final}]",
        "-frames:v", str(length), "-r", str(fps),
        "-c:v", "libx264", "-preset", "veryfast", "-crf", "20", "-pix_fmt", "yuv420p", "-threads", "2",
        str(path),
    ]  # fmt: skip
    subprocess.run(cmd, check=True, stdin=subprocess.DEVNULL, capture_output=True)
    clip = Clip(path=path, kind=kind, frames=length, fps=fps, boundaries=boundaries, flashes=flashes)
    path.with_suffix(".truth.json").write_text(json.dumps(_doc(clip), indent=1) + "\n")
    return clip


def _doc(clip: Clip) -> dict[str, Any]:
    return {
        "movie": clip.path.name,
        "kind": clip.kind,
        "frames": clip.frames,
        "fps": clip.fps,
        "boundaries": clip.boundaries,
        "flashes": clip.flashes,
    }
