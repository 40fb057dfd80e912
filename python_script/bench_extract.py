"""Benchmark stage 01 (``extract``) against the reference tools, in the same run.

What it measures, each tool in its own child process (so the peak resident memory reported by
``os.wait4`` belongs to that tool alone; it is the largest process of the child's tree, not a sum),
timed with ``time.perf_counter``:

1. ``ffmpeg -i MOVIE -f null -``: decode only, the physical limit of any tool that looks at
   every frame;
2. stage 01 run in-process (``run_stage(run, "extract", ...)`` from Python, no papermill), both the
   ``run_stage`` call alone and the child's whole wall time including imports, once per detector
   in ``--detectors`` (default: ``cascade``, the default detector, and ``content``);
3. the whole command line, ``bunny run MOVIE --stages extract --force --quiet``;
4. ``scenedetect detect-adaptive``, the stand-alone tool a user would otherwise reach for;
5. stage 01's peak memory on a long (default 30-minute) 720p movie, synthetic and real footage
   (the looped Hamilton clip below, made as long).

All of it on two movies in the same run: a synthetic one (below) and real footage, the Hamilton
clip of ``../shared/testdata`` looped to ``--minutes`` at 720p with every repeat cropped, rolled,
mirrored, re-coloured, panned and re-timed (:mod:`diffusion_bunny.demo.realclips`: a cut every
~2.3 s, many into the clip's fast pan; exact cut truth beside it). Synthetic movies flatter the
cascade (cuts between unlike pictures, accepted at once); real films cut between shots of one
scene, which is where the network's time goes. ``--no-real`` leaves the real movie out (it is
also left out, with a note, where ``../shared/testdata`` is absent).

Why: stage 01 makes one streaming decode pass, so its cost should stay close to the decoder's
own. The targets it reports against are stage 01 with the TransNetV2 cascade within 1.4x of
ffmpeg's decode-only time (1.5x before), stage 01 with ``content`` within 1.25x,
the whole ``bunny run --stages extract`` within 1.6x, stage 01 at least 1.3x faster than
``scenedetect detect-adaptive``, and a peak memory under 1 GiB on a 30-minute 720p movie. Timings
of different tools are only comparable on the same machine, movie and moment, hence one script
that measures them all together and prints ratios rather than absolute numbers.

Without a MOVIE it makes a synthetic 720p H.264 movie with ffmpeg alone (varied moving lavfi
sources, mild temporal noise, hard cuts at known frames, cached under ``--work``) and also scores
the shots stage 01 finds against those known cuts. The memory movie repeats the segments of that
synthetic movie with stream copy (no new encoding), so it costs seconds once they exist; with a
MOVIE of your own they are rendered for it. The exit status is 0 even when a target is
missed (this is a measurement, not a test); 2 when ffmpeg is missing or MOVIE does not exist.

    uv run python python_script/bench_extract.py [MOVIE] [--minutes 10] [--shots 100]
        [--memory-minutes 30] [--skip-memory] [--repeat 1] [--work DIR]
        [--detectors cascade,content] [--no-real] [--movies data/real]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as pkg_version
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
FPS = 30
WIDTH, HEIGHT = 1280, 720
ENCODE = ["-c:v", "libx264", "-preset", "veryfast", "-crf", "23", "-pix_fmt", "yuv420p"]
MIN_SHOT_FRAMES = 36  # 1.2 s: above the stage's default min_shot_seconds (0.5) with margin

TARGET_STAGE = 1.25  # stage 01 (content) / ffmpeg decode-only <= this
TARGET_CASCADE = 1.4  # stage 01 (cascade) / ffmpeg decode-only <= this (1.5 before)
TARGET_CLI = 1.6  # bunny run --stages extract / ffmpeg decode-only <= this
TARGET_SCENEDETECT = 1.3  # scenedetect detect-adaptive / stage 01 >= this
TARGET_RSS_MIB = 1024.0  # stage 01 peak RSS on a 30-minute 720p movie < this
TARGET_RSS_MINUTES = 30.0


class BenchError(Exception):
    """A problem the user must fix (missing tool or movie): exit status 2, one line."""


# --------------------------------------------------------------------------------------------
# Synthetic movie
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Segment:
    """One shot of the synthetic movie: a lavfi filter graph rendered for ``frames`` frames."""

    kind: str
    frames: int
    graph: str


def _color(rng: random.Random) -> str:
    return f"0x{rng.randrange(1 << 24):06X}"


def _hue(rng: random.Random) -> str:
    return f"hue=h={rng.uniform(0, 360):.1f}:s={rng.uniform(0.6, 1.6):.2f}"


def _up(flags: str = "bicubic") -> str:
    return f"scale={WIDTH}:{HEIGHT}:flags={flags}"


def _testsrc2_pan(rng: random.Random, seconds: float) -> str:
    # Pan a 720p window over a 1080p test card, as a slow camera move.
    vx, vy = rng.uniform(-40, 40), rng.uniform(-25, 25)
    x0, y0 = rng.uniform(0, 640), rng.uniform(0, 360)
    return (
        f"testsrc2=s=1920x1080:r={FPS},"
        f"crop={WIDTH}:{HEIGHT}:x='clip({x0:.0f}+t*{vx:.1f},0,640)':y='clip({y0:.0f}+t*{vy:.1f},0,360)',"
        f"{_hue(rng)}"
    )


def _testsrc2_scroll(rng: random.Random, seconds: float) -> str:
    h, v = rng.uniform(-0.004, 0.004), rng.uniform(-0.002, 0.002)
    return f"testsrc2=s={WIDTH}x{HEIGHT}:r={FPS},scroll=h={h:.4f}:v={v:.4f},{_hue(rng)}"


MANDELBROT_SPOTS = (
    (-0.743643887037151, 0.13182590420533),
    (-0.7453, 0.1127),
    (-1.25066, 0.02012),
    (-0.1011, 0.9563),
    (-0.77568377, 0.13646737),
    (0.3245046418497685, 0.04855101129280834),
)


def _mandelbrot(rng: random.Random, seconds: float) -> str:
    # Zooming fractal: fine detail everywhere, like foliage or a crowd.
    x, y = rng.choice(MANDELBROT_SPOTS)
    scale = rng.uniform(0.05, 1.5)
    # end_pts counts frames: zoom in by 2x over four times the shot's length.
    return (
        f"mandelbrot=s=480x270:r={FPS}:maxiter=128:start_x={x}:start_y={y}:"
        f"start_scale={scale:.4f}:end_scale={scale * 0.5:.5f}:end_pts={seconds * 4 * FPS:.0f},"
        f"{_up()}"
    )


def _mandelbrot_still(rng: random.Random, seconds: float) -> str:
    # A static shot: one fractal frame held (only the noise moves).
    x, y = rng.choice(MANDELBROT_SPOTS)
    scale = rng.uniform(0.01, 1.0)
    return (
        f"mandelbrot=s=640x360:r={FPS}:maxiter=256:start_x={x}:start_y={y}:start_scale={scale:.4f},"
        f"trim=end_frame=1,loop=loop=-1:size=1,{_up()},{_hue(rng)}"
    )


def _life(rng: random.Random, seconds: float) -> str:
    return (
        f"life=s=320x180:r={FPS}:mold=10:ratio={rng.uniform(0.05, 0.3):.2f}:"
        f"seed={rng.randrange(1 << 31)}:life_color={_color(rng)}:death_color={_color(rng)}:"
        f"mold_color={_color(rng)},{_up()}"
    )


def _texture_pan(rng: random.Random, source: str) -> str:
    """One frame of ``source`` as a coloured, softened texture under a slow camera pan."""
    a, b, c = (rng.uniform(0.3, 1.0) for _ in range(3))
    vx, vy = rng.uniform(-20, 20), rng.uniform(-12, 12)
    return (
        f"{source},trim=end_frame=1,loop=loop=-1:size=1,format=rgb24,"
        f"colorchannelmixer=rr={a:.2f}:gg={b:.2f}:bb={c:.2f},"
        f"scale=1920:1080:flags=bicubic,gblur=sigma=5,"
        f"crop={WIDTH}:{HEIGHT}:x='clip(320+t*{vx:.1f},0,640)':y='clip(180+t*{vy:.1f},0,360)'"
    )


def _cellauto(rng: random.Random, seconds: float) -> str:
    rule = rng.choice((18, 30, 45, 54, 60, 90, 105, 110, 150))
    return _texture_pan(
        rng,
        f"cellauto=s=240x135:r={FPS}:rule={rule}:seed={rng.randrange(1 << 31)}:"
        f"random_fill_ratio={rng.uniform(0.2, 0.7):.2f}",
    )


def _bars_zoom(rng: random.Random, seconds: float) -> str:
    src = rng.choice(("smptehdbars", "smptebars", "testsrc"))
    rate = rng.uniform(0.0005, 0.003)
    return (
        f"{src}=s={WIDTH}x{HEIGHT}:r={FPS},"
        f"zoompan=z='1+{rate:.4f}*in':x='iw/2-(iw/zoom/2)':y='ih/2-(ih/zoom/2)':d=1:"
        f"s={WIDTH}x{HEIGHT}:fps={FPS},{_hue(rng)}"
    )


def _gradients(rng: random.Random, seconds: float) -> str:
    kind = rng.choice(("linear", "radial", "circular", "spiral"))
    return (
        f"gradients=s=480x270:r={FPS}:speed={rng.uniform(0.005, 0.04):.3f}:"
        f"n={rng.randint(3, 8)}:seed={rng.randrange(1 << 31)}:type={kind},{_up()}"
    )


def _rgbtestsrc_hue(rng: random.Random, seconds: float) -> str:
    h0, dh = rng.uniform(0, 360), rng.uniform(-40, 40)
    v = rng.uniform(-0.003, 0.003)
    return (
        f"rgbtestsrc=s=640x360:r={FPS},hue=h='{h0:.0f}+t*{dh:.1f}':s={rng.uniform(0.5, 1.5):.2f},"
        f"{_up()},scroll=h={v:.4f}"
    )


def _sierpinski(rng: random.Random, seconds: float) -> str:
    kind = rng.choice(("carpet", "triangle"))
    return _texture_pan(rng, f"sierpinski=s=480x270:r={FPS}:seed={rng.randrange(1 << 31)}:type={kind}")


KINDS: dict[str, Callable[[random.Random, float], str]] = {
    "testsrc2-pan": _testsrc2_pan,
    "testsrc2-scroll": _testsrc2_scroll,
    "mandelbrot": _mandelbrot,
    "mandelbrot-still": _mandelbrot_still,
    "life": _life,
    "cellauto": _cellauto,
    "bars-zoom": _bars_zoom,
    "gradients": _gradients,
    "rgbtestsrc-hue": _rgbtestsrc_hue,
    "sierpinski": _sierpinski,
}


def shot_lengths(total_frames: int, shots: int, rng: random.Random) -> list[int]:
    """``shots`` random lengths (log-normal, at least MIN_SHOT_FRAMES) summing to the total."""
    shots = max(1, min(shots, total_frames // MIN_SHOT_FRAMES or 1))
    floor = min(MIN_SHOT_FRAMES, total_frames // shots)
    weights = [rng.lognormvariate(0.0, 0.7) for _ in range(shots)]
    spare = total_frames - floor * shots
    raw = [w / sum(weights) * spare for w in weights]
    lengths = [floor + int(r) for r in raw]
    # Hand the frames lost to rounding down to the largest remainders.
    order = sorted(range(shots), key=lambda i: raw[i] - int(raw[i]), reverse=True)
    for i in order[: total_frames - sum(lengths)]:
        lengths[i] += 1
    return lengths


def plan_segments(total_frames: int, shots: int, seed: int) -> list[Segment]:
    """Seeded plan of the synthetic movie: random lengths, no two neighbours of the same kind."""
    rng = random.Random(seed)
    segments: list[Segment] = []
    previous = ""
    for frames in shot_lengths(total_frames, shots, rng):
        kind = rng.choice([k for k in KINDS if k != previous])
        graph = KINDS[kind](rng, frames / FPS) + ",format=yuv420p,setsar=1"
        if rng.random() < 0.8:  # mild film-grain-like temporal noise on most shots
            graph += f",noise=alls={rng.randint(3, 6)}:allf=t"
        segments.append(Segment(kind=kind, frames=frames, graph=graph))
        previous = kind
    return segments


def _run_quiet(cmd: Sequence[str]) -> None:
    proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr}")


def _render_segment(ffmpeg: str, segment: Segment, path: Path) -> None:
    if path.is_file():
        return
    tmp = path.with_name(path.stem + ".part.mp4")
    cmd = [ffmpeg, "-nostdin", "-v", "error", "-y", "-f", "lavfi", "-i", segment.graph]
    _run_quiet([*cmd, "-frames:v", str(segment.frames), "-an", *ENCODE, str(tmp)])
    tmp.replace(path)


def _concat(ffmpeg: str, parts: Sequence[tuple[Path, int]], out: Path) -> None:
    """Join segment files with the concat demuxer and stream copy. The explicit ``duration``
    lines keep every cut on its exact frame (the files' own durations drift by a fraction of a
    frame per file because of the B-frame edit lists)."""
    listing = out.with_name(out.stem + ".concat.txt")
    lines = []
    for path, frames in parts:
        lines += [f"file '{path.resolve()}'", f"duration {frames / FPS:.9f}"]
    listing.write_text("\n".join(lines) + "\n")
    tmp = out.with_name(out.stem + ".part.mp4")
    concat = ["-f", "concat", "-safe", "0", "-i", str(listing)]
    copy = ["-c", "copy", "-movflags", "+faststart", str(tmp)]
    _run_quiet([ffmpeg, "-nostdin", "-v", "error", "-y", *concat, *copy])
    tmp.replace(out)
    listing.unlink()


def truth_path(movie: Path) -> Path:
    """The JSON beside a synthetic movie that lists its known cut frames."""
    return movie.with_suffix(".cuts.json")


def _write_truth(movie: Path, segments: Sequence[Segment], extra: dict[str, Any]) -> None:
    starts, at = [], 0
    for seg in segments:
        starts.append(at)
        at += seg.frames
    doc = {
        "movie": movie.name,
        "fps": FPS,
        "width": WIDTH,
        "height": HEIGHT,
        "frames": at,
        "cuts": starts[1:],
        **extra,
        "segments": [
            {"start_frame": s, "frames": seg.frames, "kind": seg.kind, "graph": seg.graph}
            for s, seg in zip(starts, segments, strict=True)
        ],
    }
    truth_path(movie).write_text(json.dumps(doc, indent=1) + "\n")


def _minutes_tag(minutes: float) -> str:
    return f"{minutes:g}".replace(".", "p")


def synthetic_name(segments: Sequence[Segment], minutes: float, shots: int, seed: int) -> str:
    """Cache name: the parameters plus a hash of the plan, so a changed generator never reuses
    stale files."""
    plan = json.dumps([(s.kind, s.frames, s.graph) for s in segments]).encode()
    digest = hashlib.sha256(plan).hexdigest()[:8]
    return f"synthetic-720p-{_minutes_tag(minutes)}min-{shots}shots-seed{seed}-{digest}"


def synthetic_segments(
    ffmpeg: str, work: Path, minutes: float, shots: int, seed: int
) -> tuple[list[Segment], list[Path]]:
    """Render (or reuse) the segment files of a synthetic movie, two or more at a time."""
    segments = plan_segments(round(minutes * 60 * FPS), shots, seed)
    name = synthetic_name(segments, minutes, shots, seed)
    seg_dir = work / "segments" / name
    seg_dir.mkdir(parents=True, exist_ok=True)
    paths = [seg_dir / f"seg-{i:04d}.mp4" for i in range(len(segments))]
    jobs = max(1, min(4, len(os.sched_getaffinity(0))))
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        list(pool.map(lambda sp: _render_segment(ffmpeg, *sp), zip(segments, paths, strict=True)))
    return segments, paths


def make_synthetic_movie(ffmpeg: str, work: Path, minutes: float, shots: int, seed: int) -> Path:
    """The synthetic 720p movie of ``minutes`` minutes with about ``shots`` shots (cached)."""
    segments = plan_segments(round(minutes * 60 * FPS), shots, seed)
    movie = work / f"{synthetic_name(segments, minutes, shots, seed)}.mp4"
    if movie.is_file() and truth_path(movie).is_file():
        print(f"reusing {movie}")
        return movie
    started = time.perf_counter()
    segments, paths = synthetic_segments(ffmpeg, work, minutes, shots, seed)
    _concat(ffmpeg, [(p, s.frames) for p, s in zip(paths, segments, strict=True)], movie)
    took = time.perf_counter() - started
    video_min = sum(s.frames for s in segments) / FPS / 60
    _write_truth(movie, segments, {"seed": seed, "created_s": round(took, 2)})
    print(
        f"created {movie.name}: {len(segments)} shots, {video_min:.2f} min of 720p video in "
        f"{took:.1f} s ({took / video_min:.1f} s per minute of video)"
    )
    return movie


def make_memory_movie(
    ffmpeg: str, work: Path, minutes: float, pool_minutes: float, pool_shots: int, seed: int
) -> Path:
    """A long 720p movie for the memory check: the segments of a shorter synthetic movie
    (rendered once, or reused) repeated with stream copy until ``minutes`` is reached."""
    if pool_minutes > minutes:  # a shorter memory movie: a proportionally smaller pool
        pool_shots = max(1, round(pool_shots * minutes / pool_minutes))
        pool_minutes = minutes
    pool_plan = plan_segments(round(pool_minutes * 60 * FPS), pool_shots, seed)
    pool_name = synthetic_name(pool_plan, pool_minutes, pool_shots, seed)
    movie = work / f"memory-720p-{_minutes_tag(minutes)}min-from-{pool_name}.mp4"
    if movie.is_file() and truth_path(movie).is_file():
        print(f"reusing {movie}")
        return movie
    started = time.perf_counter()
    segments, paths = synthetic_segments(ffmpeg, work, pool_minutes, pool_shots, seed)
    target = round(minutes * 60 * FPS)
    chosen: list[tuple[Path, Segment]] = []
    total = 0
    while total < target:
        for path, seg in zip(paths, segments, strict=True):
            if total >= target:
                break
            chosen.append((path, seg))
            total += seg.frames
    _concat(ffmpeg, [(p, s.frames) for p, s in chosen], movie)
    took = time.perf_counter() - started
    _write_truth(
        movie,
        [s for _, s in chosen],
        {"seed": seed, "pool": pool_name, "created_s": round(took, 2)},
    )
    print(
        f"created {movie.name}: {total / FPS / 60:.2f} min, {len(chosen)} shots repeating "
        f"{len(segments)} rendered ones (stream copy), in {took:.1f} s"
    )
    return movie


# --------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------


@dataclass
class Sample:
    """One tool's best wall time and largest peak RSS over the repeats."""

    name: str
    wall_s: float = math.inf
    peak_kib: int = 0
    failed: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    cpu_s: float = math.inf

    def add(self, wall_s: float, peak_kib: int, cpu_s: float = math.inf) -> None:
        self.wall_s = min(self.wall_s, wall_s)
        self.peak_kib = max(self.peak_kib, peak_kib)
        self.cpu_s = min(self.cpu_s, cpu_s)

    @property
    def ok(self) -> bool:
        return self.failed is None and math.isfinite(self.wall_s)


def measure(
    cmd: Sequence[str], log_dir: Path, tag: str, cwd: Path = ROOT, env: dict[str, str] | None = None
) -> tuple[float, int, int, str, str, float]:
    """Run ``cmd`` as a child; returns wall seconds, peak RSS in KiB (``ru_maxrss`` of the child,
    the largest process of its tree), exit code, stdout, stderr and CPU seconds (user + system of
    the child and the descendants it waited for: on a shared machine the steadier figure)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    out_path, err_path = log_dir / f"{tag}.stdout", log_dir / f"{tag}.stderr"
    with out_path.open("wb") as out, err_path.open("wb") as err:
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err, cwd=cwd, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    return (
        wall,
        int(usage.ru_maxrss),
        proc.returncode,
        out_path.read_text(errors="replace"),
        err_path.read_text(errors="replace"),
        usage.ru_utime + usage.ru_stime,
    )


def _tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    return path


def _sibling_script(name: str) -> str | None:
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.is_file() else shutil.which(name)


def run_child_stage(
    movie: Path, outdir: Path, log_dir: Path, tag: str, stage: Sample, child: Sample, detector: str = ""
) -> None:
    """Stage 01 in a fresh Python child: ``stage`` gets the ``run_stage`` time, ``child`` the
    child's whole wall time (interpreter start and imports included). ``detector`` overrides
    ``extract.detector`` (empty: the configured default)."""
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child-stage",
        str(movie),
        str(_fresh(outdir)),
        detector,
    ]
    wall, peak, rc, out, err, cpu = measure(cmd, log_dir, tag)
    report = next((json.loads(line) for line in reversed(out.splitlines()) if line.startswith("{")), None)
    if rc != 0 or report is None:
        stage.failed = child.failed = f"exit {rc}:\n{_tail(err)}"
        return
    stage.add(report["stage_s"], peak)
    child.add(wall, peak, cpu)
    stage.extra.update(report)


def child_stage_main(movie: str, outdir: str, detector: str = "") -> int:
    """Body of ``--child-stage``: run stage 01 in this process and print timings as JSON."""
    started = time.perf_counter()
    from diffusion_bunny.config import load_config
    from diffusion_bunny.pipeline.run import Run
    from diffusion_bunny.stages import run_stage

    imported = time.perf_counter()
    cfg = load_config(None, {"extract.detector": detector} if detector else None)
    run = Run.create(outdir, movie)
    t0 = time.perf_counter()
    tables = run_stage(run, "extract", cfg, force=True, progress=False)
    stage_s = time.perf_counter() - t0
    manifest = json.loads((Path(outdir) / "manifests" / "extract.json").read_text())
    facts = manifest.get("facts", {})
    report = {
        "detector": facts.get("detector"),
        "candidates": facts.get("candidates_proposed"),
        "accepted_fast": facts.get("candidates_accepted_fast"),
        "rejected_fast": facts.get("candidates_rejected_fast"),
        "model_precision": facts.get("model_precision"),
        "model_frames": facts.get("model_frames_run"),
        "model_s": facts.get("model_seconds"),
        "stage_s": stage_s,
        "import_s": imported - started,
        "setup_s": t0 - imported,
        "shots": tables["shots"].height,
        "frames_saved": tables["frames"].height,
    }
    print(json.dumps(report), flush=True)
    return 0


def probe_frames(ffprobe: str, movie: Path) -> dict[str, Any]:
    """Frame count (packets of the first video stream, read without decoding), size, codec."""
    proc = subprocess.run(
        [
            ffprobe,
            "-v",
            "error",
            "-select_streams",
            "v:0",
            "-count_packets",
            "-of",
            "json",
            "-show_entries",
            "stream=codec_name,width,height,avg_frame_rate,nb_read_packets,duration",
            str(movie),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    streams = json.loads(proc.stdout or "{}").get("streams") or []
    if proc.returncode != 0 or not streams:
        raise BenchError(f"ffprobe cannot read a video stream in {movie}: {proc.stderr.strip()}")
    s = streams[0]
    num, _, den = str(s.get("avg_frame_rate", "0/1")).partition("/")
    return {
        "frames": int(s.get("nb_read_packets") or 0),
        "codec": s.get("codec_name"),
        "size": f"{s.get('width')}x{s.get('height')}",
        "fps": float(num) / float(den or 1) if float(den or 1) else 0.0,
        "duration_s": float(s.get("duration") or 0.0),
    }


def warm_cache(path: Path) -> None:
    """Read the movie once so every tool finds it in the page cache."""
    with path.open("rb") as fh:
        while fh.read(8 << 20):
            pass


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------


def machine_facts(ffmpeg: str) -> list[str]:
    from diffusion_bunny.models.device import cpu_summary

    version = subprocess.run([ffmpeg, "-version"], capture_output=True, text=True).stdout
    packages = []
    for pkg in ("diffusion-bunny", "av", "scenedetect-headless", "opencv-python-headless"):
        try:
            packages.append(f"{pkg} {pkg_version(pkg)}")
        except PackageNotFoundError:
            packages.append(f"{pkg} -")
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return [
        f"nproc: {len(os.sched_getaffinity(0))} (os.cpu_count {os.cpu_count()})",
        f"cpu: {cpu_summary()}",
        f"ffmpeg: {version.splitlines()[0] if version else '?'}",
        f"python: {platform.python_version()}; {', '.join(packages)}",
        f"load average at start: {load}",
    ]


def score_shots(outdir: Path, movie: Path) -> str | None:
    """Precision/recall at +-1 frame of the cuts stage 01 found against the known cuts."""
    truth_file = truth_path(movie)
    shots_file = outdir / "tables" / "shots.parquet"
    if not truth_file.is_file() or not shots_file.is_file():
        return None
    import polars as pl

    from diffusion_bunny.demo.metrics import match_boundaries

    truth = json.loads(truth_file.read_text())["cuts"]
    found = pl.read_parquet(shots_file, glob=False)["start_frame"].to_list()[1:]
    score = match_boundaries(found, truth, tolerance=1)
    return (
        f"{len(found) + 1} shots found vs {len(truth) + 1} true; cuts at +-1 frame: "
        f"precision {score.precision:.3f}, recall {score.recall:.3f}, F1 {score.f1:.3f} "
        f"(tp {score.tp}, fp {score.fp}, fn {score.fn})"
    )


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None or not math.isfinite(value) else format(value, spec)


def print_table(rows: Sequence[tuple[Sample, int, bool]], base: Sample) -> None:
    """One line per tool; ``rows`` holds (sample, frames of its movie, compare to ffmpeg?)."""
    head = f"{'wall s':>9}{'frames/s':>10}{'peak RSS MiB':>14}{'x ffmpeg':>10}{'cpu s':>9}{'x cpu':>7}"
    print(f"\n{'tool':<38}{head}")
    print("-" * 97)
    for row, frames, compare in rows:
        if not row.ok:
            print(f"{row.name:<38}{'FAILED':>9}")
            continue
        ratio = row.wall_s / base.wall_s if compare and base.ok else None
        cpu_ratio = row.cpu_s / base.cpu_s if compare and base.ok and math.isfinite(row.cpu_s) else None
        print(
            f"{row.name:<38}{row.wall_s:>9.2f}{frames / row.wall_s:>10.1f}"
            f"{row.peak_kib / 1024:>14.1f}{_fmt(ratio, '.2f'):>10}{_fmt(row.cpu_s, '.1f'):>9}"
            f"{_fmt(cpu_ratio, '.2f'):>7}"
        )


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Benchmark stage 01 (extract) against ffmpeg decode-only, the bunny CLI and "
        "scenedetect detect-adaptive; print ratios, peak memory and target PASS/FAIL lines.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("movie", nargs="?", help="movie to measure (default: a cached synthetic 720p movie)")
    parser.add_argument(
        "--minutes",
        type=float,
        default=10.0,
        help="length of the synthetic movie (also the pool of shots the memory movie repeats)",
    )
    parser.add_argument("--shots", type=int, default=100, help="about how many synthetic shots")
    parser.add_argument("--memory-minutes", type=float, default=30.0, help="length of the memory-check movie")
    parser.add_argument("--skip-memory", action="store_true", help="skip the memory check")
    parser.add_argument("--repeat", type=int, default=1, help="best of N for the timings")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic movies")
    parser.add_argument(
        "--work",
        default=str(ROOT / "data" / "bench"),
        help="folder for the cached movies, run outputs and logs",
    )
    parser.add_argument(
        "--detectors",
        default="cascade,content",
        help="stage 01 detectors to time, comma-separated (the first also runs the memory check)",
    )
    parser.add_argument(
        "--movies",
        type=Path,
        default=ROOT / "data" / "real",
        help="where the real-footage loops are made (shared with bench_pipeline.py and eval_real_cuts.py)",
    )
    parser.add_argument(
        "--no-real",
        action="store_true",
        help="leave out the real-footage movie (the Hamilton clip of ../shared/testdata looped)",
    )
    parser.add_argument("--child-stage", nargs=3, metavar=("MOVIE", "OUTDIR", "DET"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_stage:
        return child_stage_main(*args.child_stage)
    try:
        return bench(args)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


@dataclass
class MovieBench:
    """Every tool's figures on one movie."""

    label: str
    movie: Path
    info: dict[str, Any]
    ffmpeg: Sample
    stage: dict[str, Sample]
    child: dict[str, Sample]
    cli: Sample
    scenedetect: Sample


def real_movie(folder: Path, minutes: float, seed: int) -> Path | None:
    """The Hamilton clip of ``../shared/testdata`` looped at 720p (every repeat varied; exact cut
    truth beside it), made once by :mod:`diffusion_bunny.demo.realclips` in ``folder`` or cut from a
    longer loop made there (``bench_pipeline.py``'s 60 minutes); None without testdata."""
    from diffusion_bunny.demo import realclips

    if not realclips.HAMILTON.is_file():
        return None
    params = realclips.Params(minutes=minutes, width=WIDTH, height=HEIGHT, seed=seed)
    print(f"real movie: {minutes:g} min of looped Hamilton at {WIDTH}x{HEIGHT} (made once) ...", flush=True)
    return realclips.movie_of(params, folder, realclips.HAMILTON, verbose=True)


def time_movie(
    label: str,
    movie: Path,
    info: dict[str, Any],
    detectors: Sequence[str],
    repeat: int,
    work: Path,
    ffmpeg: str,
) -> MovieBench:
    """Every tool on ``movie``, interleaved over ``repeat`` rounds (best of)."""
    bunny, scenedetect = _sibling_script("bunny"), _sibling_script("scenedetect")
    tag = label.split()[0]
    out_root, logs = work / "out" / tag, work / "logs" / tag
    res = MovieBench(
        label,
        movie,
        info,
        Sample("ffmpeg decode-only"),
        {d: Sample(f"stage 01 {d} (run_stage only)") for d in detectors},
        {d: Sample(f"stage 01 {d} child (with imports)") for d in detectors},
        Sample("bunny run --stages extract"),
        Sample("scenedetect detect-adaptive"),
    )
    if bunny is None:
        res.cli.failed = "no bunny console script next to sys.executable"
    if scenedetect is None:
        res.scenedetect.failed = "no scenedetect console script next to sys.executable"
    warm_cache(movie)
    for r in range(repeat):
        # Interleave the tools so a change of background load hits them all alike.
        print(f"{label}, round {r + 1}/{repeat}: ffmpeg", end="", flush=True)
        wall, peak, rc, _, err, cpu = measure(
            [ffmpeg, "-nostdin", "-v", "error", "-i", str(movie), "-f", "null", "-"], logs, "ffmpeg"
        )
        if rc != 0:
            res.ffmpeg.failed = f"exit {rc}:\n{_tail(err)}"
        else:
            res.ffmpeg.add(wall, peak, cpu)
        for det in detectors:
            print(f", stage 01 {det}", end="", flush=True)
            run_child_stage(
                movie,
                out_root / f"stage01-{det}",
                logs,
                f"stage01-{det}",
                res.stage[det],
                res.child[det],
                det,
            )
        if bunny is not None:
            print(", bunny run", end="", flush=True)
            cmd = [bunny, "run", str(movie), "--out", str(_fresh(out_root / "cli"))]
            wall, peak, rc, _, err, cpu = measure(
                [*cmd, "--stages", "extract", "--force", "--quiet"], logs, "bunny"
            )
            if rc != 0:
                res.cli.failed = f"exit {rc}:\n{_tail(err)}"
            else:
                res.cli.add(wall, peak, cpu)
        if scenedetect is not None:
            print(", scenedetect", end="", flush=True)
            sd_out = _fresh(out_root / "scenedetect")
            sd_out.mkdir(parents=True)
            cmd = [scenedetect, "-i", str(movie), "-q", "-o", str(sd_out), "detect-adaptive"]
            wall, peak, rc, _, err, cpu = measure(cmd, logs, "scenedetect", cwd=sd_out)
            if rc != 0:
                res.scenedetect.failed = f"exit {rc}:\n{_tail(err)}"
            else:
                res.scenedetect.add(wall, peak, cpu)
        print(flush=True)
    return res


def ratio_line(label: str, num: Sample, den: Sample, target: float, at_most: bool) -> bool | None:
    sign = "<=" if at_most else ">="
    if not (num.ok and den.ok):
        print(f"  {label:<40} = n/a   (target {sign} {target})  n/a: a tool failed")
        return None
    value = num.wall_s / den.wall_s
    passed = value <= target if at_most else value >= target
    print(f"  {label:<40} = {value:5.2f} (target {sign} {target})  {_verdict(passed)}")
    return passed


def report_movie(res: MovieBench, detectors: Sequence[str], work: Path) -> None:
    frames = res.info["frames"]
    print(
        f"\n== {res.label}: {res.movie.name} ({res.info['size']} {res.info['codec']}, "
        f"{res.info['fps']:.3f} fps, {frames} frames, {res.info['duration_s'] / 60:.2f} min)"
    )
    stage_list = [r for d in detectors for r in (res.stage[d], res.child[d])]
    rows = [(r, frames, True) for r in (res.ffmpeg, *stage_list, res.cli, res.scenedetect)]
    print_table(rows, res.ffmpeg)
    for row, _, _ in rows:
        if row.failed:
            print(f"\n{row.name} failed: {row.failed}")
    print("targets")
    for det in detectors:
        target = TARGET_CASCADE if det == "cascade" else TARGET_STAGE
        ratio_line(f"stage 01 {det} / ffmpeg decode-only", res.stage[det], res.ffmpeg, target, True)
    ratio_line("bunny run / ffmpeg decode-only", res.cli, res.ffmpeg, TARGET_CLI, True)
    for det in detectors:
        ratio_line(
            f"scenedetect / stage 01 {det}", res.scenedetect, res.stage[det], TARGET_SCENEDETECT, False
        )
    print("shots")
    tag = res.label.split()[0]
    for det in detectors:
        path = work / "out" / tag / f"stage01-{det}"
        line = score_shots(path, res.movie) if (path / "tables").is_dir() else None
        print(f"  {det}: {line or 'no known cuts (no ' + truth_path(res.movie).name + ') or no shots table'}")
        if not res.stage[det].ok:
            continue
        extra = res.stage[det].extra
        print(
            f"  stage 01 {det} child: imports {extra['import_s']:.2f} s, config+run folder "
            f"{extra['setup_s']:.2f} s, {extra['frames_saved']} frames saved"
        )
        if extra.get("candidates") is not None:
            print(
                f"  stage 01 {det}: {extra['candidates']} candidates, {extra['accepted_fast']} accepted and "
                f"{extra.get('rejected_fast', 0)} rejected without the network, TransNetV2 "
                f"({extra.get('model_precision') or '-'}) ran on {extra['model_frames']} frames "
                f"({extra['model_frames'] / max(1, frames):.3f} per decoded frame) "
                f"in {extra['model_s']:.2f} s"
            )


def bench(args: argparse.Namespace) -> int:
    ffmpeg, ffprobe = shutil.which("ffmpeg"), shutil.which("ffprobe")
    if not ffmpeg or not ffprobe:
        raise BenchError("ffmpeg and ffprobe must be on PATH (Debian: apt-get install ffmpeg)")
    movie: Path | None = Path(args.movie).expanduser().resolve() if args.movie else None
    if movie is not None and not movie.is_file():
        raise BenchError(f"movie not found: {movie}")
    if args.repeat < 1 or args.minutes <= 0 or args.memory_minutes <= 0 or args.shots < 1:
        raise BenchError("--repeat and --shots must be >= 1, --minutes and --memory-minutes > 0")
    work = Path(args.work).expanduser().resolve()
    work.mkdir(parents=True, exist_ok=True)
    for line in machine_facts(ffmpeg):
        print(line)
    cores = len(os.sched_getaffinity(0))
    if os.getloadavg()[0] > 0.5 * cores:
        print(
            f"warning: load average {os.getloadavg()[0]:.1f} on {cores} cores: other work is "
            "running, so absolute timings are noisy (the tools are interleaved; use --repeat)"
        )
    detectors = [d.strip() for d in args.detectors.split(",") if d.strip()]
    if not detectors:
        raise BenchError("--detectors is empty")

    movies: list[tuple[str, Path]] = []
    if movie is None:
        movies.append(
            ("synthetic movie", make_synthetic_movie(ffmpeg, work, args.minutes, args.shots, args.seed))
        )
    else:
        movies.append(("given movie", movie))
    if not args.no_real:
        real = real_movie(args.movies, args.minutes, args.seed)
        if real is None:
            print("note: ../shared/testdata is absent: no real-footage movie (the Hamilton loop) in this run")
        else:
            movies.append(("real footage (looped Hamilton)", real))
    # The memory check runs on a long synthetic movie and on real footage as long (
    # "peak memory unchanged" holds for both kinds; real cuts send more to the network).
    memory_movies: list[tuple[str, Path]] = []
    if not args.skip_memory:
        memory_movies.append(
            (
                "synthetic",
                make_memory_movie(ffmpeg, work, args.memory_minutes, args.minutes, args.shots, args.seed),
            )
        )
        if not args.no_real:
            real_long = real_movie(args.movies, args.memory_minutes, args.seed)
            if real_long is not None:
                memory_movies.append(("real footage", real_long))

    results = []
    for label, path in movies:
        info = probe_frames(ffprobe, path)
        results.append(time_movie(label, path, info, detectors, args.repeat, work, ffmpeg))

    memory: list[tuple[str, Path, Sample, float, Path]] = []
    for kind, long_movie in memory_movies:
        info = probe_frames(ffprobe, long_movie)
        minutes = info["duration_s"] / 60 if info["duration_s"] else info["frames"] / FPS / 60
        row = Sample(f"stage 01 on {minutes:.4g}-min {kind} movie")
        print(f"memory check: stage 01 on {long_movie.name} ({info['frames']} frames)", flush=True)
        warm_cache(long_movie)
        tag = "memory" if kind == "synthetic" else "memory-real"
        outdir = work / "out" / tag
        run_child_stage(
            long_movie,
            outdir,
            work / "logs",
            tag,
            row,
            Sample(f"{row.name} (child)"),
            detectors[0],
        )
        memory.append((kind, long_movie, row, minutes, outdir))

    for res in results:
        report_movie(res, detectors, work)

    if len(results) > 1:
        print("\n== side by side (x ffmpeg decode-only of the same movie, same run)")
        head = "".join(f"{r.label.split(' (')[0]:>26}" for r in results)
        print(f"  {'tool':<36}{head}")
        names = [("ffmpeg decode-only", lambda r: r.ffmpeg)]
        names += [(f"stage 01 {d}", lambda r, d=d: r.stage[d]) for d in detectors]
        names += [
            ("bunny run --stages extract", lambda r: r.cli),
            ("scenedetect detect-adaptive", lambda r: r.scenedetect),
        ]
        for name, pick in names:
            cells = []
            for r in results:
                sample = pick(r)
                ok = sample.ok and r.ffmpeg.ok
                cells.append(
                    f"{sample.wall_s / r.ffmpeg.wall_s:.2f}x ({sample.wall_s:.1f} s)" if ok else "n/a"
                )
            print(f"  {name:<36}" + "".join(f"{c:>26}" for c in cells))

    print("\nmemory")
    if not memory:
        print(f"  stage 01 peak RSS, {TARGET_RSS_MINUTES:g}-min 720p = skipped (--skip-memory)")
    for kind, long_movie, row, minutes, outdir in memory:
        label = f"stage 01 peak RSS, {TARGET_RSS_MINUTES:g}-min 720p {kind}"
        if not row.ok:
            print(f"  {label:<52} = n/a   (target < {TARGET_RSS_MIB:g} MiB)  n/a: stage 01 failed")
            continue
        mib = row.peak_kib / 1024
        note = "" if minutes >= TARGET_RSS_MINUTES - 0.5 else f"  (measured on {minutes:.3g} min only)"
        print(
            f"  {label:<52} = {mib:5.0f} MiB (target < {TARGET_RSS_MIB:g} MiB)  "
            f"{_verdict(mib < TARGET_RSS_MIB)}{note}"
        )
        line = score_shots(outdir, long_movie)
        if line:
            print(f"    long {kind} movie, {detectors[0]}: {line}")
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"logs: {work / 'logs'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
