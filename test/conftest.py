"""Shared fixtures: synthetic clips, the demo movie, real footage from ../shared/testdata."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

# One OpenMP thread for torch (and OpenBLAS) in the tests, set before anything imports torch so
# this process, papermill's kernels, Ray's workers and the tests' subprocesses all inherit it:
# the tests' tiny models gain nothing from a second thread, and on a 2-core machine whose other
# core is busy torch's 2 threads spin-wait for each other (a 64 px image took 3.4 s instead of
# 0.17 s; techContext). A value already in the environment is kept.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# Bytecode files are kept during the tests even where PYTHONDONTWRITEBYTECODE is set (CI machines,
# container images, this workplace's shell): without them every xdist worker, kernel, Ray worker
# and `bunny` subprocess compiles torch, transformers, plotnine and pandas from source again (16.5 s
# of imports instead of 9.1 s, each time; a fresh clone's suite took 11 min 58 s, 9 min 17 s with
# the bytecode kept). Set here, before the workers and subprocesses start, so they all inherit it.
# uv's `compile-bytecode` would do it at install, but then recompiles the whole venv on every
# `uv run` (1.2-4.5 s each, uv issue 12202), which every user would pay.
if os.environ.pop("PYTHONDONTWRITEBYTECODE", None) is not None:
    sys.dont_write_bytecode = False

from paths import HAMILTON


def _one_core_per_worker() -> None:
    """Each pytest-xdist worker, and every process it starts (kernels, process pools, Ray,
    ``bunny`` subprocesses), on cores of its own. The code sizes its thread pools from the cores
    it may use (``os.sched_getaffinity``: FFmpeg's decoder threads, ONNX Runtime's intra-op
    threads), as a user's single run should; with two workers on two cores each worker's threads
    spun and waited for a core the other worker held, and the stage 01 tests took 101 s instead of
    53 s alone. Where there are fewer cores than workers nothing is pinned."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if not worker.startswith("gw") or count < 2 or len(cores) < count:
        return
    os.sched_setaffinity(0, set(cores[int(worker[2:]) :: count]))


_one_core_per_worker()

#: Seconds each of the longest test files took on 2 workers (warm clone, 2026-11-24, quiet
#: machine). pytest-xdist (``--dist loadfile``, with ``--no-loadscope-reorder`` in pyproject.toml)
#: hands whole files to the workers in collection order, each worker holding its current file and
#: one more; alphabetically, bunny demo's file (62 s) and the kill tests (36 s) came last and one
#: worker ran them alone for a minute while the other had finished (469 s against 404 s). The
#: longest first, the short files at the end even the two out. Files not listed run after, as
#: collected; the figures only order the files, so they need no care beyond the order.
LONGEST_FIRST = {
    "test/pipeline/test_engine.py": 102,  # a local Ray cluster, and a hung movie's timeout
    "test/stages/extract/test_boundaries.py": 87,
    "test/stages/characters/test_characters.py": 67,
    "test/pipeline/test_demo_command.py": 62,  # bunny demo: nine notebooks
    "test/pipeline/test_runner.py": 58,
    "test/test_film_as_released.py": 55,  # four release variants built, stage 01 on each
    "test/stages/export/test_export.py": 41,
    "test/stages/train/test_train.py": 36,
    "test/test_real_footage_end_to_end.py": 36,  # the Hamilton clip through every stage
    "test/pipeline/test_kill_stages.py": 36,
    "test/stages/generate/test_generate.py": 31,
    "test/stages/report/test_report.py": 26,
    "test/stages/scenes/test_scenes.py": 24,
    "test/pipeline/test_kill.py": 22,
}


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list) -> None:
    """The files of :data:`LONGEST_FIRST` first, longest first; the rest as collected. A stable
    sort on the file alone keeps each file's tests together and in their order. A listed file
    that no longer exists stops the run: renamed, it would silently lose its place."""
    root = Path(str(config.rootpath))
    gone = [name for name in LONGEST_FIRST if not (root / name).is_file()]
    if gone:
        raise pytest.UsageError(f"test/conftest.py LONGEST_FIRST names files that are gone: {gone}")

    def weight(item: pytest.Item) -> int:
        return -LONGEST_FIRST.get(Path(str(item.path)).relative_to(root).as_posix(), 0)

    items.sort(key=weight)


@pytest.fixture(scope="session", autouse=True)
def _log_dir(tmp_path_factory: pytest.TempPathFactory) -> None:
    """``bunny`` commands run by the tests log to a temporary folder, not the checkout's log/."""
    os.environ["DIFFUSION_BUNNY_LOG_DIR"] = str(tmp_path_factory.mktemp("log"))


@pytest.fixture(autouse=True)
def _one_torch_thread_after_each_test():
    """Stage 01's TransNetV2 on torch sets torch's threads to the cores this process may use
    (right for a user's run); in the test process that would leave every later test on 2
    spinning threads, so each test ends with torch back on the thread count set above."""
    yield
    torch = sys.modules.get("torch")
    wanted = int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
    if torch is not None and wanted > 0 and torch.get_num_threads() != wanted:
        torch.set_num_threads(wanted)


@pytest.fixture(scope="session")
def hamilton() -> Path:
    """The real stage clip with known cuts (frames 20, 82, 211)."""
    if not HAMILTON.is_file():
        pytest.skip(f"real footage not available here: {HAMILTON} (it ships beside the project, not in it)")
    return HAMILTON


@pytest.fixture(scope="session")
def cut_clip(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[int]]:
    """Four shots with hard cuts: static, panning, static, panning."""
    from clips import write_clip

    path = tmp_path_factory.mktemp("clips") / "cuts.mp4"
    cuts = write_clip(path, [(1, 30, 0.0), (2, 40, 3.0), (3, 25, 0.0), (4, 30, 2.0)])
    return path, cuts


@pytest.fixture(scope="session")
def demo(tmp_path_factory: pytest.TempPathFactory):
    """The built-in demo movie, built once per pytest run: under pytest-xdist the workers share
    one build in the run's common temporary folder (the first builds it under a file lock, the
    others find it current), as pytest-xdist's documentation shows for session data. Tests only
    read it; what a test writes beside it goes to its own folders."""
    from filelock import FileLock

    from diffusion_bunny.demo.movie import build_demo_movie

    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        return build_demo_movie(tmp_path_factory.mktemp("demo"), progress=False)
    shared = tmp_path_factory.getbasetemp().parent
    with FileLock(str(shared / "demo.lock")):
        return build_demo_movie(shared / "demo", progress=False)


def built_once(tmp_path_factory: pytest.TempPathFactory, name: str, build) -> Path:
    """A folder ``build(folder)`` fills, made once per pytest run and copied to each worker.

    Under pytest-xdist the first worker to ask builds it in the run's common temporary folder
    under a file lock (as :func:`demo` does) and every worker, that one included, gets a private
    copy, so a test that writes into its run folder never meets another worker's lock or files.
    The session fixtures below cost 10-25 s each to build; two workers built them twice."""
    from filelock import FileLock

    own = tmp_path_factory.mktemp(name)
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        build(own)
        return own
    shared = tmp_path_factory.getbasetemp().parent / f"shared_{name}"
    with FileLock(f"{shared}.lock"):
        if not (shared / ".built").is_file():
            shutil.rmtree(shared, ignore_errors=True)
            shared.mkdir()
            build(shared)
            (shared / ".built").touch()
    shutil.copytree(shared, own, dirs_exist_ok=True)
    return own


@pytest.fixture(scope="session")
def demo_run(demo, tmp_path_factory):
    """The demo movie through stages 01 and 02, in-process, once per pytest run (a copy per
    worker, :func:`built_once`). Tests read it; a test that changes a run copies it first."""
    from diffusion_bunny.config import load_config
    from diffusion_bunny.pipeline.run import Run
    from diffusion_bunny.stages import run_stage

    def build(folder: Path) -> None:
        run = Run.create(folder / "run", demo.path)
        cfg = load_config(root=folder)  # no config/ folder there: the defaults
        run_stage(run, "extract", cfg, progress=False)
        run_stage(run, "quality", cfg, progress=False)

    return Run.open(built_once(tmp_path_factory, "demo_run", build) / "run")


# The thresholds of stage 04 for the board tests: with the default noise_threshold (0.5) the demo
# has one frame in the noise bucket, and whether it has any depends on the embedder's numbers; at
# 0.8 three lone frames (the rocket launch, the coffee, the dark shot) land there, so the tests
# always have a noise frame to drag out of it.
BOARD_OVERRIDES = {"scenes.noise_threshold": 0.8}


@pytest.fixture(scope="session")
def scenes_demo_run(demo_run, demo, tmp_path_factory):
    """The demo run through stages 03 (named from the demo's reference portraits) and 04 with
    :data:`BOARD_OVERRIDES`, once per pytest run (a copy per worker, :func:`built_once`); returns
    ``(run, overrides)``. Tests that move frames work on a copy (:func:`board_run`)."""
    from diffusion_bunny.config import load_config
    from diffusion_bunny.demo.movie import build_demo_references
    from diffusion_bunny.pipeline.run import Run
    from diffusion_bunny.stages import run_stage

    def build(folder: Path) -> None:
        from diffusion_bunny.demo.run import DEMO_SETTINGS

        refs = build_demo_references(folder / "refs")
        overrides = {**DEMO_SETTINGS, **BOARD_OVERRIDES, "characters.reference_dir": str(refs)}
        # The copies keep these settings word for word (the reference folder built here): the
        # stages' config hashes then match and a test sees the stages done, as it would in place.
        (folder / "overrides.json").write_text(json.dumps(overrides))
        shutil.copytree(demo_run.run_dir, folder / "run")
        run = Run.open(folder / "run")
        cfg = load_config(None, overrides, root=folder)
        run_stage(run, "characters", cfg, progress=False)
        run_stage(run, "scenes", cfg, progress=False)

    folder = built_once(tmp_path_factory, "scenes_run", build)
    return Run.open(folder / "run"), json.loads((folder / "overrides.json").read_text())


@pytest.fixture
def board_run(scenes_demo_run, tmp_path):
    """A private copy of :func:`scenes_demo_run` that a test may change; ``(run, overrides)``."""
    from diffusion_bunny.pipeline.run import Run

    run, overrides = scenes_demo_run
    shutil.copytree(run.run_dir, tmp_path / "run")
    return Run.open(tmp_path / "run"), overrides
