"""Kill -9 for the later stages: what ``test_kill.py`` does for stages 01/02, for
stages 03, 04, 06, 08 and 09, each killed mid-write by SIGKILL (a table's temporary written and
not yet renamed, the dataset folder halfway through its swap, a report figure before its rename).

One chain keeps it cheap (each child process pays its imports once): a finished run of all nine
stages on a tiny clip, copied; then one child per kill that first finishes the stage the last
kill interrupted (a plain rerun, as a user would start) and then reruns the next stage forced
until it kills itself at its kill point. A last child finishes the interrupted report and checks
every stage. The tables and owned folders must equal those of the finished run, with no
temporary file, staging folder or ``.old`` folder left anywhere.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
from clips import write_clip
from test_kill import LEFTOVER

STAGES = ("extract", "quality", "characters", "scenes", "captions", "export", "train", "generate", "report")

CHILD = """
import json, os, signal, sys
from pathlib import Path
import diffusion_bunny.pipeline.atomic as atomic
from diffusion_bunny.config import load_config
from diffusion_bunny.pipeline.run import Run
from diffusion_bunny.stages import run_stage

def die():
    os.kill(os.getpid(), signal.SIGKILL)

{kill}

run = Run.create(Path(sys.argv[1]), Path(sys.argv[2]))
cfg = load_config(None, json.loads(sys.argv[4]), root=Path(sys.argv[3]))
for stage in sys.argv[5].split(","):
    forced = stage.startswith("!")
    run_stage(run, stage.lstrip("!"), cfg, force=forced, progress=False)
"""

#: Kill right before ``os.replace`` puts a file of this name in place (its temporary complete).
BEFORE_RENAME = """
real = os.replace
def replace(src, dst):
    if {test}:
        die()
    real(src, dst)
atomic.os.replace = replace
"""

#: The dataset folder halfway through its swap: the old one renamed aside, the new not in place.
DURING_SWAP = """
real = atomic.swap_in
def swap_in(staging, final):
    if final.name == "dataset" and final.exists():
        os.replace(final, atomic._leftover_name(final, "old"))
        die()
    real(staging, final)
atomic.swap_in = swap_in
"""

#: (stage, kill point): the chain's order.
KILLS = [
    ("characters", BEFORE_RENAME.format(test='Path(dst).name == "faces.parquet"')),
    ("scenes", BEFORE_RENAME.format(test='Path(dst).name == "clusters.parquet"')),
    ("export", DURING_SWAP),
    ("generate", BEFORE_RENAME.format(test='Path(dst).name == "generations.parquet"')),
    ("report", BEFORE_RENAME.format(test='Path(dst).suffix == ".png" and "report" in Path(dst).parts')),
]

#: Columns that are times, not results (the caption stage logs its latency).
TIMES = {"latency_s", "ts"}


def _child(run_dir: Path, movie: Path, root: Path, overrides: dict, stages: str, kill: str = ""):
    return subprocess.run(
        [
            sys.executable,
            "-c",
            CHILD.format(kill=kill),
            *map(str, (run_dir, movie, root)),
            json.dumps(overrides),
            stages,
        ],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )


def _snapshot(run_dir: Path) -> dict[str, object]:
    out: dict[str, object] = {}
    for path in sorted((run_dir / "tables").glob("*.parquet")):
        df = pl.read_parquet(path)
        out[path.stem] = df.drop([c for c in df.columns if c in TIMES]).with_columns(
            pl.col(c).str.replace(str(run_dir), "RUN", literal=True)
            for c, t in df.schema.items()
            if t == pl.Utf8 and c not in TIMES
        )
    for folder in ("frames", "dataset", "generated", "report"):
        files = sorted(p for p in (run_dir / folder).rglob("*") if p.is_file())
        out[folder] = [str(p.relative_to(run_dir)) for p in files]
    return out


def _leftovers(*folders: Path) -> list[str]:
    return [
        str(Path(parent, name))
        for folder in folders
        for parent, dirs, files in os.walk(folder)
        for name in [*dirs, *files]
        if LEFTOVER.match(name)
    ]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """The nine stages on a tiny clip (two shots of 24 frames at 96x64), in a child process."""
    base = tmp_path_factory.mktemp("kill_stages")
    movie = base / "tiny.mp4"
    write_clip(movie, [(51, 24, 0.0), (52, 24, 2.0)], width=96, height=64)
    overrides = {
        "train.output_dir": str(base / "lora"),
        "train.max_train_steps": 2,
        "train.checkpoint_every": 1,
        "train.validation_every": 0,
        "train.resolution": 64,
        "generate.steps": 2,
        "generate.seeds": [0],
        "generate.lora_scales": [1.0],
    }
    done = _child(base / "run", movie, base, overrides, ",".join(STAGES))
    assert done.returncode == 0, done.stderr
    return base, movie, overrides


def test_stages_03_04_06_08_09_killed_mid_write_rerun_to_the_same_tables(finished, tmp_path):
    base, movie, overrides = finished
    reference = _snapshot(base / "run")
    assert reference["dataset"] and reference["generated"] and reference["report"]
    run_dir = tmp_path / "run"
    shutil.copytree(base / "run", run_dir)
    interrupted = ""
    for stage, kill in KILLS:
        stages = ",".join(s for s in (interrupted, f"!{stage}") if s)
        killed = _child(run_dir, movie, base, overrides, stages, kill)
        assert killed.returncode == -signal.SIGKILL, (stage, killed.stderr[-2000:])
        assert _leftovers(run_dir), f"{stage}: the kill point was not reached with a temporary on disk"
        assert not (run_dir / "manifests" / f"{stage}.json").exists()  # the stage is not done
        interrupted = stage
    # The last rerun: the report finishes; every stage is done and equals the finished run.
    rerun = _child(run_dir, movie, base, overrides, ",".join(STAGES))
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert _leftovers(run_dir, base / "lora") == []
    snap = _snapshot(run_dir)
    assert snap.keys() == reference.keys()
    for key, value in reference.items():
        if isinstance(value, pl.DataFrame):
            assert snap[key].equals(value), key
        else:
            assert snap[key] == value, key
    for stage in STAGES:
        assert json.loads((run_dir / "manifests" / f"{stage}.json").read_text())["stage"] == stage
