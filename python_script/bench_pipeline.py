"""The whole ingest at feature length: ``bunny run`` stages 01-06 (and 07) on real footage of 10,
30 and 60 minutes, per stage: wall time, peak memory, rows in and out, frames per second; and the
fixed cost of one ``bunny run`` on its own.

The movie is real footage made long: the Hamilton clip of ``../shared/testdata`` looped to 60
minutes by :mod:`diffusion_bunny.demo.realclips` (made once, reused between runs; the 10- and
30-minute movies are its first minutes, cut at a keyframe without re-encoding). By default
(``--movie released``) it is made as a film is released: 1920x1080 with the picture
letterboxed to 2.40:1 throughout, title cards and credits, burned-in subtitles over a fifth of
the shots; ``--movie loop`` is the 720p loop without bars or text. Looping alone
would repeat frames, which stage 02 drops as duplicates, so every repeat is varied (crop, roll,
mirror, colour grade, light, camera moves, speed 0.8-1.25x; redrawn until its frames are at least
6 pHash bits from every earlier repeat's): every shot is new to the duplicate search and to the
face and scene stages, and the table says how many frames each stage saw. The performer is
Lin-Manuel Miranda, so stage 03 gets his portrait (and Alex Lacamoire's) from ``../shared/testdata``
as references, and stages 06-07 have a named character to export and train on.

Each stage runs as its own ``bunny run MOVIE --stages NAME`` in a child process (the stages
before it are done, so only it runs), timed with ``time.perf_counter``; peak RSS is ``os.wait4``'s
``ru_maxrss``: the largest process of the child's tree (the notebook kernel), not a sum. Then
(``--mode both``, the default, or ``together``) stages 01-06 run again as a user runs them, in
one ``bunny run MOVIE --stages extract,...,export`` whose notebooks share one kernel; its
per-stage times come from the command's log. The reference is ``ffmpeg -i MOVIE -f null -`` on the
same movie, in the same run.

The fixed cost of a ``bunny run`` (interpreter and kernel start, each notebook's figures and
reset, shutdown) is measured on its own (``--fixed-runs``, default 3): stages 01-06 on a
3-second clip of the same footage, where the stages' own work is a few frames, so the command's
wall time is what every run pays whatever the movie's length.

``bunny run MOVIE --stages extract`` (stage 01 alone as a user runs it, from an empty run folder,
so the interpreter, the kernel, the imports and the notebook's figures are included) is timed on
every length too (``--extract-run``, on by default): on a 10-minute film it must stay within 1.4x
ffmpeg's decode-only time, end to end, so that a run's fixed cost is small beside the decoding.

Targets on the film as released: ``bunny run --stages extract`` within 1.4x decode; stages 01-06
together within 2.5x at 10 minutes and 2.0x at 60 minutes (3x on the plain loop); peak RSS of
the run at most 1.5 GiB; the fixed cost at most 10 s;
no stage growing faster than linearly with the movie's length (the table prints each stage's
growth exponent between lengths: 1.0 is linear; pairwise work over all frames, such as
duplicate search or neighbour counts, would show as 2). Stage 07 (``--train-steps``, tiny preset)
is timed but not counted in the ratio: its cost is the number of steps, not the movie.

    uv run python python_script/bench_pipeline.py [--lengths 10,30,60] [--train-steps 10]
        [--mode both|separate|together] [--work data/bench_pipeline] [--movies data/real]
        [--set SECTION.KEY=VALUE ...] [--fixed-only] [--no-extract-run] [--movie released|loop]

Every figure of the speed targets in one run, each against ffmpeg's decode of the same file:
``--lengths 10,60 --mode together --train-steps 0`` (the 60-minute film as released is made once,
about half an hour on 2 cores, and reused).

Exit status 0 even when a target is missed (a measurement, not a test); 2 when ffmpeg or
``../shared/testdata`` is missing.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_extract import BenchError, machine_facts, measure, warm_cache

ROOT = Path(__file__).resolve().parents[1]
INGEST = ("extract", "quality", "characters", "scenes", "captions", "export")
TARGET_FIXED_S = 10.0
TARGET_RSS_MIB = 1536.0
#: ``bunny run --stages extract`` end to end, x decode-only.
TARGET_EXTRACT_RUN_X = 1.4


def target_x_decode(kind: str, minutes: float) -> float:
    """Stages 01-06 in one run, x decode-only: within 2.5x from 10 minutes and 2.0x at feature
    length (the run's fixed cost weighs less on a long film), the film as released and the plain
    720p loop alike (``kind`` is kept for the report's labels)."""
    return 2.0 if minutes >= 60 else 2.5


#: (count read as rows in, count read as rows out) of each stage's manifest.
ROWS = {
    "extract": ("decoded_frames", "frames"),
    "quality": ("frames", "kept"),
    "characters": ("frames_scanned", "faces"),
    "scenes": ("frames", "scene_clusters"),
    "captions": ("frames", "captioned"),
    "export": ("captioned_frames", "items"),
    "train": ("images", "steps"),
}


@dataclass
class StageRun:
    stage: str
    wall_s: float = math.nan
    peak_kib: int = 0
    cpu_s: float = math.nan
    rows_in: int | None = None
    rows_out: int | None = None
    failed: str | None = None
    counts: dict[str, Any] = field(default_factory=dict)


@dataclass
class LengthRun:
    minutes: float
    movie: Path
    frames: int
    ffmpeg_s: float = math.nan
    ffmpeg_cpu_s: float = math.nan
    stages: dict[str, StageRun] = field(default_factory=dict)
    together: StageRun | None = None  # stages 01-06 in one bunny run (shared kernel)
    together_stages: dict[str, float] = field(default_factory=dict)  # stage -> notebook seconds
    extract_run: StageRun | None = None  # bunny run --stages extract from an empty run folder
    extract_stage_s: float = math.nan  # of which stage 01's own work (the contract's "done in")
    load: dict[str, float] = field(default_factory=dict)  # figure -> 1-minute load average before it

    def ingest_s(self) -> float:
        return sum(self.stages[s].wall_s for s in INGEST if s in self.stages)

    def ingest_cpu_s(self) -> float:
        return sum(self.stages[s].cpu_s for s in INGEST if s in self.stages)


def references(work: Path) -> Path:
    """One folder per character with their portrait from ``../shared/testdata``."""
    from diffusion_bunny.demo.realclips import TESTDATA

    out = work / "characters"
    for name in ("lin-manuel-miranda", "alex-lacamoire"):
        src = TESTDATA / "face_recognition_examples" / f"{name}.png"
        if not src.is_file():
            raise BenchError(f"{src} is missing (../shared/testdata holds the reference portraits)")
        (out / name).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, out / name / src.name)
    return out


def long_movie(folder: Path, minutes: float, kind: str = "released") -> Path:
    from diffusion_bunny.demo import realclips

    if not realclips.HAMILTON.is_file():
        raise BenchError(f"{realclips.HAMILTON} is missing: the benchmark needs ../shared/testdata")
    if kind == "released":
        params = realclips.released(realclips.Params(minutes=minutes, width=1920, height=1080, seed=0))
        what = "a film as released: 1920x1080, 2.40:1 letterbox, titles, credits, subtitles"
    else:
        params = realclips.Params(minutes=minutes, width=1280, height=720, seed=0)
        what = "1280x720, no bars"
    print(f"movie: {minutes:g} minutes of looped Hamilton, {what} (made once, then reused) ...", flush=True)
    return realclips.movie_of(params, folder, realclips.HAMILTON, verbose=True)


def fixed_cost(work: Path, movies: Path, refs: Path, runs: int) -> list[tuple[float, dict[str, float]]]:
    """Wall time of ``bunny run`` stages 01-06 on a 3-second clip (the stages' own work is a
    few frames), ``runs`` times, each from an empty run folder: (seconds, notebook seconds)."""
    from diffusion_bunny.demo import realclips

    clip = realclips.make_movie(realclips.Params(minutes=0.05, width=640, height=360, seed=0), movies)
    bunny = Path(sys.executable).parent / "bunny"
    out = []
    for i in range(runs):
        folder = work / "out" / "fixed"
        logs = work / "logs" / f"fixed-{i}"
        shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(logs, ignore_errors=True)
        cmd = [str(bunny), "run", str(clip), "--out", str(folder), "--stages", ",".join(INGEST), "--quiet"]
        cmd += ["--characters", str(refs)]
        env = {**os.environ, "DIFFUSION_BUNNY_LOG_DIR": str(logs / "bunny")}
        wall, _, rc, _, err, _ = measure(cmd, logs, "fixed", env=env)
        if rc != 0:
            raise BenchError(f"bunny run on the 3-second clip failed: {_failure(rc, err)}")
        took: dict[str, float] = {}
        work_s: dict[str, float] = {}
        for log_file in sorted((logs / "bunny").glob("bunny-*.log")):
            text = log_file.read_text(errors="replace")
            for match in NOTEBOOK_TOOK.finditer(text):
                took[match.group(1)] = float(match.group(2))
            for match in STAGE_DONE.finditer(text):
                work_s[match.group(1)] = float(match.group(2))
        out.append((wall, took))
        print(
            f"  fixed cost, run {i + 1}: {wall:.1f} s (notebooks {sum(took.values()):.1f} s, of which the "
            f"stages' own work on the clip {sum(work_s.values()):.1f} s: "
            f"{', '.join(f'{k} {v:.1f}' for k, v in work_s.items())}; the rest is interpreter and kernel "
            f"start, imports, resets, figures and shutdown: {wall - sum(work_s.values()):.1f} s)",
            flush=True,
        )
    return out


def ffmpeg_decode(ffmpeg: str, movie: Path, logs: Path) -> tuple[float, float]:
    wall, _, rc, _, err, cpu = measure(
        [ffmpeg, "-nostdin", "-v", "error", "-i", str(movie), "-f", "null", "-"], logs, "ffmpeg"
    )
    if rc != 0:
        raise BenchError(f"ffmpeg could not decode {movie}: {err.strip()[-300:]}")
    return wall, cpu


def run_stages(length: LengthRun, stages: list[str], refs: Path, extra: list[str], work: Path) -> None:
    bunny = Path(sys.executable).parent / "bunny"
    out = work / "out" / f"{length.minutes:g}min"
    shutil.rmtree(out, ignore_errors=True)
    logs = work / "logs" / f"{length.minutes:g}min"
    for stage in stages:
        print(f"  {length.minutes:g} min: {stage} ...", end="", flush=True)
        cmd = [str(bunny), "run", str(length.movie), "--out", str(out), "--stages", stage, "--quiet"]
        cmd += ["--characters", str(refs), *extra]
        wall, peak, rc, _, err, cpu = measure(cmd, logs, stage)
        run = StageRun(stage, wall, peak, cpu)
        if rc != 0:
            run.failed = _failure(rc, err)
        else:
            manifest = json.loads((out / "manifests" / f"{stage}.json").read_text())
            run.counts = manifest.get("counts", {})
            key_in, key_out = ROWS.get(stage, (None, None))
            run.rows_in, run.rows_out = run.counts.get(key_in), run.counts.get(key_out)
        length.stages[stage] = run
        print(
            f" {wall:.1f} s, {peak / 1024:.0f} MiB" + (f"  FAILED {run.failed}" if run.failed else ""),
            flush=True,
        )
        if run.failed:
            break


def _failure(rc: int, err: str) -> str:
    """A failed bunny run in one line: its exit status and the last line it printed."""
    return f"exit {rc}: {err.strip().splitlines()[-1] if err.strip() else ''}"


#: The runner's log line per notebook (pipeline/runner.py: run_movie).
NOTEBOOK_TOOK = re.compile(r": (\w+) notebook took ([0-9.]+) s")
#: The stage's own work inside its notebook (the contract's line): the rest of the notebook's time
#: is its imports, kernel reset and figures.
STAGE_DONE = re.compile(r": (\w+) done in ([0-9.]+) s: ")


def _timed_bunny_run(
    length: LengthRun, work: Path, label: str, stages: list[str], extra: list[str], log_line: re.Pattern
) -> tuple[StageRun, list[re.Match]]:
    """One ``bunny run MOVIE --stages ...`` from an empty run folder, as a user runs it (the
    interpreter, the kernel, the notebooks' imports and figures included): its time, peak memory
    and CPU, and the matches of ``log_line`` in the log it wrote."""
    bunny = Path(sys.executable).parent / "bunny"
    out = work / "out" / f"{length.minutes:g}min-{label}"
    logs = work / "logs" / f"{length.minutes:g}min-{label}"
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(logs, ignore_errors=True)
    cmd = [str(bunny), "run", str(length.movie), "--out", str(out), "--stages", ",".join(stages), "--quiet"]
    env = {**os.environ, "DIFFUSION_BUNNY_LOG_DIR": str(logs / "bunny")}  # the log read below
    length.load[label] = os.getloadavg()[0]
    wall, peak, rc, _, err, cpu = measure([*cmd, *extra], logs, label, env=env)
    run = StageRun(label, wall, peak, cpu)
    if rc != 0:
        run.failed = _failure(rc, err)
    matches = [
        match
        for log_file in sorted((logs / "bunny").glob("bunny-*.log"))
        for match in log_line.finditer(log_file.read_text(errors="replace"))
    ]
    print(f" {wall:.1f} s, {peak / 1024:.0f} MiB" + (f"  FAILED {run.failed}" if rc else ""))
    return run, matches


def run_together(length: LengthRun, refs: Path, extra: list[str], work: Path) -> None:
    """Stages 01-06 in one ``bunny run``, from an empty run folder, as a user runs them."""
    print(f"  {length.minutes:g} min: stages 01-06 in one bunny run ...", end="", flush=True)
    length.together, took = _timed_bunny_run(
        length, work, "together", INGEST, ["--characters", str(refs), *extra], NOTEBOOK_TOOK
    )
    for match in took:
        length.together_stages[match.group(1)] = float(match.group(2))


def run_extract(length: LengthRun, work: Path) -> None:
    """``bunny run MOVIE --stages extract``: stage 01 as a user runs it, and (from its log) the
    stage's own work, so the rest is the run's fixed cost."""
    print(f"  {length.minutes:g} min: bunny run --stages extract ...", end="", flush=True)
    length.extract_run, done = _timed_bunny_run(length, work, "extract_run", ["extract"], [], STAGE_DONE)
    for match in done:
        length.extract_stage_s = float(match.group(2))


def _n(value: int | None) -> str:
    return "-" if value is None else str(value)


def growth(a: LengthRun, b: LengthRun, stage: str) -> float | None:
    """Exponent k in time ~ length**k between two lengths (1: linear)."""
    ra, rb = a.stages.get(stage), b.stages.get(stage)
    if not ra or not rb or ra.failed or rb.failed or ra.wall_s <= 0 or rb.wall_s <= 0:
        return None
    return math.log(rb.wall_s / ra.wall_s) / math.log(b.frames / a.frames)


def report_together(runs: list[LengthRun]) -> None:
    """``bunny run --stages extract`` and stages 01-06 in one bunny run: the figures a user meets."""
    for r in runs:
        e = r.extract_run
        if e is not None:
            print(
                f"\n== {r.minutes:g} minutes, bunny run --stages extract (load {r.load['extract_run']:.2f}): "
                + (
                    f"FAILED: {e.failed}"
                    if e.failed
                    else f"{e.wall_s:.1f} s = {e.wall_s / r.ffmpeg_s:.2f}x decode-only "
                    f"(CPU: {e.cpu_s / r.ffmpeg_cpu_s:.2f}x); peak RSS {e.peak_kib / 1024:.0f} MiB\n"
                    f"  of which stage 01's own work {r.extract_stage_s:.1f} s = "
                    f"{r.extract_stage_s / r.ffmpeg_s:.2f}x decode-only, and the rest of the command "
                    f"(interpreter, kernel, imports, figures, shutdown) {e.wall_s - r.extract_stage_s:.1f} s "
                    f"= {(e.wall_s - r.extract_stage_s) / r.ffmpeg_s:.2f}x"
                )
            )
        t = r.together
        if t is None:
            continue
        print(
            f"\n== {r.minutes:g} minutes, stages 01-06 in one bunny run (one kernel for the six notebooks; "
            f"load {r.load['together']:.2f})"
        )
        if t.failed:
            print(f"  FAILED: {t.failed}")
            continue
        cells = ", ".join(
            f"{stage} {r.together_stages[stage]:.1f} s" for stage in INGEST if stage in r.together_stages
        )
        print(f"  notebooks: {cells}")
        print(
            f"  whole command: {t.wall_s:.1f} s = {t.wall_s / r.ffmpeg_s:.2f}x decode-only "
            f"(CPU: {t.cpu_s / r.ffmpeg_cpu_s:.2f}x); peak RSS {t.peak_kib / 1024:.0f} MiB"
        )


def report(runs: list[LengthRun], stages: list[str], kind: str) -> None:
    report_together(runs)
    for r in runs:
        if not r.stages:
            continue
        print(
            f"\n== {r.minutes:g} minutes: {r.movie.name}, {r.frames} frames; "
            f"ffmpeg decode-only {r.ffmpeg_s:.1f} s ({r.ffmpeg_cpu_s:.1f} s of CPU)"
        )
        print(
            f"  {'stage':<11}{'wall s':>9}{'x decode':>10}{'peak MiB':>10}{'rows in':>10}{'rows out':>10}"
            f"{'in/s':>9}{'cpu s':>9}{'x cpu':>7}"
        )
        for stage in stages:
            s = r.stages.get(stage)
            if s is None:
                continue
            if s.failed:
                print(f"  {stage:<11}  FAILED: {s.failed}")
                continue
            rate = f"{s.rows_in / s.wall_s:.1f}" if s.rows_in else "-"
            print(
                f"  {stage:<11}{s.wall_s:>9.1f}{s.wall_s / r.ffmpeg_s:>10.2f}{s.peak_kib / 1024:>10.0f}"
                f"{_n(s.rows_in):>10}{_n(s.rows_out):>10}"
                f"{rate:>9}{s.cpu_s:>9.1f}{s.cpu_s / r.ffmpeg_cpu_s:>7.2f}"
            )
        done = [s for s in INGEST if s in r.stages and not r.stages[s].failed]
        peak = max((r.stages[s].peak_kib for s in r.stages if not r.stages[s].failed), default=0) / 1024
        print(
            f"  stages 01-06 together: {r.ingest_s():.1f} s = {r.ingest_s() / r.ffmpeg_s:.2f}x decode-only "
            f"(CPU: {r.ingest_cpu_s() / r.ffmpeg_cpu_s:.2f}x; {len(done)} of {len(INGEST)} stages); "
            f"peak RSS {peak:.0f} MiB"
        )
    if len(runs) > 1:
        print("\n== growth with length (time ~ frames^k; 1.0 = linear)")
        pairs = list(itertools.pairwise(runs))
        head = "".join(f"{f'{a.minutes:g}->{b.minutes:g} min':>16}" for a, b in pairs)
        print(f"  {'stage':<11}{head}")
        for stage in stages:
            cells = [growth(a, b, stage) for a, b in pairs]
            print(f"  {stage:<11}" + "".join(f"{'-' if k is None else f'{k:.2f}':>16}" for k in cells))
    print("\ntargets (each against ffmpeg's decode-only time of the same movie in this run)")
    for r in runs:
        target = target_x_decode(kind, r.minutes)
        e = r.extract_run
        if e is not None and not e.failed:
            x = e.wall_s / r.ffmpeg_s
            verdict = "PASS" if x <= TARGET_EXTRACT_RUN_X else "FAIL"
            label = f"{r.minutes:g} min: bunny run --stages extract / ffmpeg decode-only"
            print(f"  {label} = {x:.2f} (target <= {TARGET_EXTRACT_RUN_X})  {verdict}")
        if r.together is not None and not r.together.failed:
            x = r.together.wall_s / r.ffmpeg_s
            label = f"{r.minutes:g} min: stages 01-06 in one bunny run / ffmpeg decode-only"
            verdict = "PASS" if x <= target else "FAIL"
            print(f"  {label} = {x:.2f} (target <= {target})  {verdict}")
            peak = r.together.peak_kib / 1024
            verdict = "PASS" if peak <= TARGET_RSS_MIB else "FAIL"
            label = f"{r.minutes:g} min: peak RSS of that run"
            print(f"  {label} = {peak:.0f} MiB (target <= {TARGET_RSS_MIB:g})  {verdict}")
        if not r.stages:
            continue
        x = r.ingest_s() / r.ffmpeg_s
        complete = all(s in r.stages and not r.stages[s].failed for s in INGEST)
        verdict = ("PASS" if x <= target else "FAIL") if complete else "n/a (a stage failed)"
        label = f"{r.minutes:g} min: stages 01-06 / ffmpeg decode-only"
        print(f"  {label} = {x:.2f} (target <= {target})  {verdict}")
        peak = max((s.peak_kib for s in r.stages.values() if not s.failed), default=0) / 1024
        verdict = "PASS" if peak <= TARGET_RSS_MIB else "FAIL"
        print(f"  {r.minutes:g} min: peak RSS = {peak:.0f} MiB (target <= {TARGET_RSS_MIB:g})  {verdict}")
    if len(runs) > 1:
        worst = [
            (stage, k)
            for a, b in itertools.pairwise(runs)
            for stage in INGEST
            if (k := growth(a, b, stage)) is not None
        ]
        if worst:
            stage, k = max(worst, key=lambda x: x[1])
            print(
                f"  fastest-growing stage: {stage}, exponent {k:.2f} (target: linear; "
                f"{'PASS' if k <= 1.15 else 'FAIL'} at <= 1.15, which allows timing noise)"
            )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", default="10,30,60", help="movie lengths in minutes (the longest is made)")
    ap.add_argument("--train-steps", type=int, default=10, help="stage 07 steps on the tiny preset (0: skip)")
    ap.add_argument(
        "--mode",
        choices=("both", "separate", "together"),
        default="both",
        help="each stage in its own bunny run (per-stage memory, growth), stages 01-06 in one, or both",
    )
    ap.add_argument(
        "--work", type=Path, default=ROOT / "data" / "bench_pipeline", help="run folders and logs"
    )
    ap.add_argument("--movies", type=Path, default=ROOT / "data" / "real", help="where the movies are made")
    ap.add_argument(
        "--movie",
        choices=("released", "loop"),
        default="released",
        help="a film as released (1080p, letterboxed, text) or the plain 720p loop",
    )
    ap.add_argument("--fixed-runs", type=int, default=3, help="runs of the fixed-cost measurement (0: skip)")
    ap.add_argument(
        "--extract-run",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="time bunny run --stages extract on every length, end to end",
    )
    ap.add_argument(
        "--fixed-only", action="store_true", help="measure the fixed cost alone (no long movie, no ffmpeg)"
    )
    ap.add_argument("--set", action="append", default=[], help="extra config override for every stage")
    ap.add_argument(
        "--detectors",
        default="hog,mediapipe,mtcnn,centerface",
        help="stage 03 again with each face detector on the shortest movie (empty: skip)",
    )
    args = ap.parse_args(argv)
    try:
        return bench(args)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def bench(args: argparse.Namespace) -> int:
    if args.fixed_only:
        return bench_fixed(args)
    ffmpeg = shutil.which("ffmpeg")
    if not ffmpeg:
        raise BenchError("ffmpeg must be on PATH (Debian: apt-get install ffmpeg): it is the reference")
    lengths = sorted(float(x) for x in args.lengths.split(","))
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    for line in machine_facts(ffmpeg):
        print(line)
    refs = references(work)
    fixed = fixed_cost(work, args.movies.resolve(), refs, args.fixed_runs) if args.fixed_runs > 0 else []
    source = long_movie(args.movies.resolve(), lengths[-1], args.movie)
    stages = list(INGEST) + (["train"] if args.train_steps > 0 else [])
    sets = [x for kv in args.set for x in ("--set", kv)]
    extra = list(sets)
    if args.train_steps > 0:
        extra += [
            "--set",
            "train.base_model=tiny",
            "--set",
            f"train.max_train_steps={args.train_steps}",
        ]
    from diffusion_bunny.demo import realclips

    runs = []
    for minutes in lengths:
        movie, frames = realclips.first_minutes(source, minutes) if minutes < lengths[-1] else (source, 0)
        if not frames:
            frames = int(json.loads(source.with_suffix(".cuts.json").read_text())["frames"])
        run = LengthRun(minutes, movie, frames)
        warm_cache(movie)
        started = time.perf_counter()
        run.ffmpeg_s, run.ffmpeg_cpu_s = ffmpeg_decode(ffmpeg, movie, work / "logs" / f"{minutes:g}min")
        load = os.getloadavg()[0]
        print(f"{minutes:g} min ({frames} frames): ffmpeg decode-only {run.ffmpeg_s:.1f} s (load {load:.2f})")
        if args.extract_run:
            run_extract(run, work)
        if args.mode in ("both", "separate"):
            run_stages(run, stages, refs, extra, work)
        if args.mode in ("both", "together"):
            run_together(run, refs, sets, work)  # stages 01-06 only: no training settings
        print(f"  ({time.perf_counter() - started:.0f} s for this length)", flush=True)
        runs.append(run)
    report(runs, stages, args.movie)
    compare_detectors(runs[0], refs, sets, work, args.detectors)
    report_fixed(fixed)
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


def bench_fixed(args: argparse.Namespace) -> int:
    """``--fixed-only``: the fixed cost of one ``bunny run``, nothing else."""
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    report_fixed(fixed_cost(work, args.movies.resolve(), references(work), max(1, args.fixed_runs)))
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


def report_fixed(fixed: list[tuple[float, dict[str, float]]]) -> None:
    if not fixed:
        return
    walls = sorted(w for w, _ in fixed)
    median = walls[len(walls) // 2]
    notebooks = {k: round(v, 1) for k, v in fixed[0][1].items()}
    print(
        f"  fixed cost of one bunny run (stages 01-06 on a 3-second clip), median of {len(walls)}: "
        f"{median:.1f} s (runs: {', '.join(f'{w:.1f}' for w in walls)}; "
        f"notebooks of the first: {notebooks}) "
        f"(target <= {TARGET_FIXED_S:g})  {'PASS' if median <= TARGET_FIXED_S else 'FAIL'}"
    )


# ---------------------------------------------------------------------------------------------
# Stage 03 per face detector


def compare_detectors(length: LengthRun, refs: Path, sets: list[str], work: Path, detectors: str) -> None:
    """Stage 03 alone again on ``length``'s movie (stages 01-02 done by the separate runs) with
    each of ``detectors`` (``characters.detector``), forced: wall time, frames searched, faces
    found and named. A table under the main one."""
    names = [d.strip() for d in detectors.split(",") if d.strip()]
    out = work / "out" / f"{length.minutes:g}min"
    if not names or not (out / "tables" / "quality.parquet").is_file():
        return
    bunny = Path(sys.executable).parent / "bunny"
    print(f"\nstage 03 per detector on the {length.minutes:g}-min movie (load {os.getloadavg()[0]:.2f}):")
    print(
        f"  {'detector':<10} {'wall s':>7} {'frames':>7} {'frames/s':>9} {'faces':>6} {'named':>6} "
        f"{'low conf':>8}"
    )
    for name in names:
        # --force: stage 03 reuses none of its last run's detections (the detector the ingest ran
        # with would take every frame from them), so every frame is searched.
        cmd = [str(bunny), "run", str(length.movie), "--out", str(out), "--stages", "characters", "--quiet"]
        cmd += ["--force", "--characters", str(refs), *sets, "--set", f"characters.detector={name}"]
        wall, _, rc, _, err, _ = measure(cmd, work / "logs" / "detectors", name)
        if rc != 0:
            print(f"  {name:<10} FAILED {_failure(rc, err)}")
            continue
        manifest = json.loads((out / "manifests" / "characters.json").read_text())
        c, f = manifest["counts"], manifest["facts"]
        if f.get("frames_cached"):
            print(f"  {name:<10} took {f['frames_cached']} frames from the cache: frames/s is not its own")
        print(
            f"  {name:<10} {wall:7.1f} {c['frames_scanned']:7d} {f.get('frames_per_second') or 0:9.1f} "
            f"{c['faces']:6d} {c['named_faces']:6d} "
            f"{c.get('low_confidence_faces', '-'):>8}"
        )


if __name__ == "__main__":
    sys.exit(main())
