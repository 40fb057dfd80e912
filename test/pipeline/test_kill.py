"""Kill -9 matrix: a real process running real stages SIGKILLs itself at a precise point of its
writes (right after a temporary file is written and before its rename, inside a staged folder,
halfway through a folder swap); the next run must leave the same tables and owned folders as an
uninterrupted run, and no temporary file or staging folder behind.

The kill points are set by patching, inside the child process only, the function the production
code calls at that moment (``os.replace`` as :mod:`diffusion_bunny.pipeline.atomic` calls it,
:func:`~diffusion_bunny.pipeline.atomic.swap_in`), so production code carries no test hooks.
Inputs are tiny (a 2-shot clip of 48 frames at 96x64) so each case takes a few seconds.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
from clips import write_clip

STAGES = ("extract", "quality")
LEFTOVER = re.compile(r"^\..+\.(tmp|staging|old)-\d+-[0-9a-f]+$")

#: Run in the child: ``KILL`` is the kill point's code, patched in before the stages run.
CHILD = """
import os, signal, sys
from pathlib import Path
import diffusion_bunny.pipeline.atomic as atomic
from diffusion_bunny.config import load_config
from diffusion_bunny.pipeline.run import Run
from diffusion_bunny.stages import run_stage

def die():
    os.kill(os.getpid(), signal.SIGKILL)

{kill}

run = Run.create(Path(sys.argv[1]), Path(sys.argv[2]))
cfg = load_config(root=Path(sys.argv[3]))
for stage in sys.argv[4].split(","):
    run_stage(run, stage, cfg, force=True, progress=False)
"""

KILLS = {
    # After the temporary parquet of a table is complete and flushed, before its rename.
    "table-before-rename": """
real = os.replace
def replace(src, dst):
    if Path(dst).name == "{table}.parquet":
        die()
    real(src, dst)
atomic.os.replace = replace
""",
    # frames/ and thumbs/ complete in their staging folders, the swap not begun.
    "staged-before-swap": """
real = atomic.swap_in
def swap_in(staging, final):
    if final.name == "frames":
        die()
    real(staging, final)
atomic.swap_in = swap_in
""",
    # During the swap of frames/: the old folder renamed aside, the new one not yet in place.
    "during-swap": """
real = atomic.swap_in
def swap_in(staging, final):
    if final.name == "frames" and final.exists():
        os.replace(final, atomic._leftover_name(final, "old"))
        die()
    real(staging, final)
atomic.swap_in = swap_in
""",
    # After the tables are written, before the manifest's rename: the stage must run again.
    "manifest-before-rename": """
real = os.replace
def replace(src, dst):
    if Path(dst).name == "{table}.json":
        die()
    real(src, dst)
atomic.os.replace = replace
""",
}


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    movie = tmp_path_factory.mktemp("kill") / "tiny.mp4"
    write_clip(movie, [(51, 24, 0.0), (52, 24, 2.0)], width=96, height=64)
    return movie


def _child(run_dir: Path, movie: Path, root: Path, stages: str, kill: str) -> subprocess.CompletedProcess:
    script = CHILD.format(kill=kill)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-c", script, str(run_dir), str(movie), str(root), stages],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _snapshot(run_dir: Path) -> dict[str, object]:
    """The run's tables (paths made relative) and its owned folders' file names and sizes."""
    out: dict[str, object] = {}
    for path in sorted((run_dir / "tables").glob("*.parquet")):
        df = pl.read_parquet(path)
        out[path.stem] = df.with_columns(
            pl.col(c).str.replace(str(run_dir), "RUN", literal=True)
            for c, t in df.schema.items()
            if t == pl.Utf8
        )
    for folder in ("frames", "thumbs"):
        out[folder] = sorted((p.name, p.stat().st_size) for p in (run_dir / folder).iterdir())
    return out


def _leftovers(run_dir: Path) -> list[str]:
    return [
        str(Path(parent, name).relative_to(run_dir))
        for parent, dirs, files in os.walk(run_dir)
        for name in [*dirs, *files]
        if LEFTOVER.match(name)
    ]


@pytest.fixture(scope="module")
def reference(clip, tmp_path_factory) -> dict[str, object]:
    """The tables and folders of an uninterrupted run (in a child process, as the killed ones)."""
    root = tmp_path_factory.mktemp("noconfig")
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    done = _child(run_dir, clip, root, ",".join(STAGES), "")
    assert done.returncode == 0, done.stderr
    return _snapshot(run_dir)


@pytest.mark.parametrize(
    ("point", "stage", "table"),
    [
        ("table-before-rename", "extract", "frames"),
        ("table-before-rename", "quality", "quality"),
        ("staged-before-swap", "extract", None),
        ("during-swap", "extract", None),
        ("manifest-before-rename", "extract", "extract"),
    ],
)
def test_killed_stage_then_rerun_equals_an_uninterrupted_run(point, stage, table, clip, reference, tmp_path):
    run_dir = tmp_path / "run"
    # A finished run first, so the kill lands on a rerun that replaces existing results (the
    # case where a half write could damage what was there).
    assert _child(run_dir, clip, tmp_path, ",".join(STAGES), "").returncode == 0
    stages = ",".join(STAGES[: STAGES.index(stage) + 1])
    killed = _child(run_dir, clip, tmp_path, stages, KILLS[point].format(table=table))
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    if point != "manifest-before-rename":
        assert _leftovers(run_dir), "the kill point was not reached with a temporary on disk"
    # The next run: leftovers of the dead process swept, the stages redone where needed.
    rerun = _child(run_dir, clip, tmp_path, ",".join(STAGES), "")
    assert rerun.returncode == 0, rerun.stderr
    assert _leftovers(run_dir) == []
    snap = _snapshot(run_dir)
    assert snap.keys() == reference.keys()
    for key, value in reference.items():
        if isinstance(value, pl.DataFrame):
            assert snap[key].equals(value), key
        else:
            assert snap[key] == value, key


def test_a_live_writers_temporaries_are_left_alone(tmp_path):
    """The sweep removes only what a dead process left: a live writer's temporary file and staging
    folder (another runner on the same run folder) stay."""
    from diffusion_bunny.pipeline.atomic import sweep_leftovers

    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        tables = tmp_path / "tables"
        tables.mkdir()
        mine = tables / f".frames.parquet.tmp-{live.pid}-0123abcd"
        theirs = tables / f".frames.parquet.tmp-{dead.pid}-0123abcd"
        staging_live = tmp_path / f".frames.staging-{live.pid}-0123abcd"
        staging_dead = tmp_path / f".frames.staging-{dead.pid}-0123abcd"
        for path in (mine, theirs):
            path.write_bytes(b"x")
        for path in (staging_live, staging_dead):
            (path / "deep").mkdir(parents=True)
        swept = sweep_leftovers(tmp_path)
        assert sorted(swept) == sorted([theirs, staging_dead])
        assert mine.exists() and staging_live.exists() and not theirs.exists() and not staging_dead.exists()
    finally:
        live.kill()
        live.wait()
    # Once the live writer is gone, its leftovers go too.
    sweep_leftovers(tmp_path)
    assert _leftovers(tmp_path) == []
