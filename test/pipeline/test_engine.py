"""Many movies: ``bunny run FOLDER --engine local`` and ``--engine ray`` make the same run folders
and manifests, resume (a second run skips every stage), report a bad movie while the others run,
and end with a combined report across the movies.

The Ray tests start one local Ray cluster for the module with 2 CPUs, i.e. 2 worker processes
that each run one movie's task at a time (one node: a second node on a 2-core machine would only
add a second raylet), through :func:`diffusion_bunny.pipeline.engine.start_ray`, the code ``bunny run``
uses; ``bunny run`` then finds Ray initialised and runs on that cluster. Starting it takes
20-40 s on a loaded 2-core machine.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import types
from pathlib import Path

import polars as pl
import pytest
from clips import write_clip
from kernels import sleepy_kernel
from unreadable import make_unreadable

from diffusion_bunny import logs
from diffusion_bunny.cli import main
from diffusion_bunny.config import load_config
from diffusion_bunny.pipeline.run import movie_id

STAGES = "extract,quality,report"


@pytest.fixture(scope="module")
def movies(tmp_path_factory) -> Path:
    """Two short clips (2 and 3 shots) in one folder."""
    folder = tmp_path_factory.mktemp("movies")
    write_clip(folder / "a.mp4", [(31, 20, 0.0), (32, 20, 0.0)])
    write_clip(folder / "b.mp4", [(33, 15, 0.0), (34, 15, 3.0), (35, 15, 0.0)])
    return folder


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """A local Ray cluster with 2 worker CPUs and a small object store, no dashboard. Its workers
    start with the environment of this moment, so the ``sleepy`` kernel of the hang test (which
    sleeps only in movie b's run folder and only when a run asks for it) is set up here."""
    from diffusion_bunny.pipeline.engine import start_ray

    cfg = load_config(None, {"engine.num_cpus": 2, "engine.object_store_mb": 100})
    with pytest.MonkeyPatch.context() as mp:
        for key, value in _hang_env(tmp_path_factory.mktemp("ray_kernels")).items():
            mp.setenv(key, value)
        assert start_ray(cfg) is True
    import ray

    assert ray.cluster_resources()["CPU"] == 2
    yield ray
    ray.shutdown()


def _finished(run_dir: Path) -> dict[str, str]:
    return {
        p.stem: json.loads(p.read_text())["finished"] for p in sorted((run_dir / "manifests").glob("*.json"))
    }


def _check_batch(movies: Path, out: Path) -> pl.DataFrame:
    """Both movies' run folders hold the stages' manifests, tables and executed notebooks; the
    combined report lists both."""
    for name, shots in (("a.mp4", 2), ("b.mp4", 3)):
        run_dir = out / movie_id(movies / name)
        assert set(_finished(run_dir)) == {"extract", "quality", "report"}
        assert pl.read_parquet(run_dir / "tables" / "shots.parquet").height == shots
        assert (run_dir / "notebooks" / "09_qa_report.ipynb").is_file()
        assert (run_dir / "report" / "index.html").is_file()
    table = pl.read_parquet(out / "report" / "movies.parquet")
    assert table["movie"].to_list() == ["a.mp4", "b.mp4"]
    assert table["shots"].to_list() == [2, 3]
    assert table["frames"].min() > 0 and table["error"].is_null().all()
    assert table.select("extract", "quality", "report").unique().rows() == [("done", "done", "done")]
    assert table.select("characters", "scenes").unique().rows() == [("missing", "missing")]
    html = (out / "report" / "index.html").read_text()
    for row in table.iter_rows(named=True):
        assert row["movie"] in html
        own = (out / "report" / row["report_html"]).resolve()
        assert own == Path(row["run_dir"]) / "report" / "index.html"
        assert f'href="{row["report_html"]}"' in html
    return table


def _local_args(movies: Path, out: Path) -> list[str]:
    return ["run", str(movies), "--out", str(out), "--stages", STAGES, "--engine", "local", "--quiet"]


@pytest.fixture(scope="module")
def local_batch(movies, tmp_path_factory) -> Path:
    """Both movies through :data:`STAGES` on the local engine, once for the module: the local
    engine's test checks it, the Ray test compares its tables with it."""
    out = tmp_path_factory.mktemp("local_batch") / "out"
    assert main(_local_args(movies, out)) == 0
    return out


@pytest.fixture(scope="module")
def extracted(movies, tmp_path_factory) -> Path:
    """Both movies through stage 01 only, once for the module (tests that break one copy it)."""
    out = tmp_path_factory.mktemp("extracted") / "out"
    assert main(["run", str(movies), "--out", str(out), "--stages", "extract", "--quiet"]) == 0
    return out


def test_local_engine_runs_the_movies_one_after_another_and_resumes(movies, local_batch, tmp_path, capsys):
    out = local_batch
    args = _local_args(movies, out)
    _check_batch(movies, out)
    first = {name: _finished(out / movie_id(movies / name)) for name in ("a.mp4", "b.mp4")}
    capsys.readouterr()
    assert main(args) == 0
    # --quiet: the terminal shows only errors; the skipped stages are in the command's log file.
    assert capsys.readouterr().err == ""
    assert logs.last_path.read_text().count("is up to date, skipped") == 6
    assert {name: _finished(out / movie_id(movies / name)) for name in ("a.mp4", "b.mp4")} == first
    # A broken movie beside a finished one: reported in one line, the other skipped, exit status 2.
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "a.mp4").write_bytes((movies / "a.mp4").read_bytes())
    (mixed / "broken.mp4").write_bytes(b"")
    assert main(["run", str(mixed), "--out", str(out), "--stages", "extract", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "broken.mp4: the file is empty" in err and "1 of 2 movies failed" in err
    assert _finished(out / movie_id(movies / "a.mp4")) == first["a.mp4"]


def _break_one_movie(movies: Path, extracted: Path, out: Path) -> None:
    """A copy of both movies through stage 01 (:func:`extracted`), then movie b's ``frames`` table
    rewritten with no frame paths (a table that reads, but that stage 01 never makes): stage 02 on
    b then fails inside its notebook with an error that is no user error (a bug, as far as the
    runner can tell), while movie a's stage 02 runs normally. (A table that does not read at all
    is a user error: one line saying to rebuild it.)"""
    shutil.copytree(extracted, out)
    path = out / movie_id(movies / "b.mp4") / "tables" / "frames.parquet"
    frames = pl.read_parquet(path)
    frames.with_columns(pl.lit(None, dtype=pl.Utf8).alias("path")).write_parquet(path)


def _check_bug_isolated(movies: Path, out: Path, code: int, err: str) -> None:
    assert code == 1, err
    assert "b.mp4: failed with a bug" in err and "1 of 2 movies failed" in err
    assert "Traceback" not in err
    # The lines name the command's log file, which holds the movie's error line and
    # the bug's traceback (written by the process that ran the movie: this one, or a Ray worker).
    path = logs.last_path
    assert path is not None and f"(traceback: {path})" in err and f"log: {path}" in err
    text = path.read_text()
    assert "b.mp4: failed with a bug (" in text and "b.mp4 failed with a bug\nTraceback" in text
    assert "TypeError" in text  # where it broke: a frame without a path
    assert "quality" in _finished(out / movie_id(movies / "a.mp4"))
    table = pl.read_parquet(out / "report" / "movies.parquet")
    assert table["movie"].to_list() == ["a.mp4", "b.mp4"]
    rows = {r["movie"]: r for r in table.iter_rows(named=True)}
    assert rows["a.mp4"]["error"] is None and rows["a.mp4"]["quality"] == "done"
    assert rows["b.mp4"]["error"] and rows["b.mp4"]["quality"] != "done"


def test_local_engine_a_bug_in_one_movie_lets_the_others_finish(movies, extracted, tmp_path, capsys):
    """Any exception in one movie is reported, the other movies finish, the combined
    report is written, and the exit status is 1 (a bug), not a traceback that ends the batch."""
    out = tmp_path / "out"
    _break_one_movie(movies, extracted, out)
    capsys.readouterr()
    code = main(["run", str(movies), "--out", str(out), "--stages", "quality,report", "--quiet"])
    _check_bug_isolated(movies, out, code, capsys.readouterr().err)


def _hang_env(tmp_path: Path) -> dict[str, str]:
    """The ``sleepy`` kernel (test/kernels.py), hanging only in movie b's run folder."""
    sleepy_kernel(tmp_path / "jupyter")
    return {
        "JUPYTER_PATH": str(tmp_path / "jupyter"),
        "SLEEPY_MARK": str(tmp_path / "kernel"),
        "SLEEPY_ONLY": "/b-",
        "SLEEPY_S": "600",
    }


def _b_not_extracted(movies: Path, extracted: Path, out: Path) -> None:
    """Movie a through stage 01 (up to date: a rerun starts no kernel), movie b not yet."""
    shutil.copytree(extracted, out)
    shutil.rmtree(out / movie_id(movies / "b.mp4"))


def test_local_engine_a_hung_movie_is_stopped_and_the_batch_goes_on(
    movies, extracted, tmp_path, monkeypatch, capsys
):
    """A stage notebook past pipeline.stage_timeout_s has its kernel (and the kernel's
    children) stopped; the movie is reported in one line like a failed one, the others finish,
    the combined report lists it, exit status 2."""
    out = tmp_path / "out"
    _b_not_extracted(movies, extracted, out)
    for key, value in _hang_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    capsys.readouterr()
    args = ["run", str(movies), "--out", str(out), "--stages", "extract", "--engine", "local", "--quiet"]
    # 30 s: on a machine loaded ~10 deep (a fresh clone's suite) the kernel's start and the first
    # cell's imports took 8 s, and the deadline must land inside the hanging stage.
    code = main([*args, "--set", "run.kernel=sleepy", "--set", "pipeline.stage_timeout_s=30"])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 2 and "1 of 2 movies failed" in lines[1], err
    assert "stage extract did not finish within pipeline.stage_timeout_s = 30 s" in lines[0], err
    assert "Traceback" not in err
    # The kernel reached the stage, hung there and was stopped there.
    kernel_pid = int((tmp_path / "kernel").read_text())
    assert int((tmp_path / "kernel.stage").read_text()) == kernel_pid
    with pytest.raises(ProcessLookupError):
        os.kill(kernel_pid, 0)
    table = pl.read_parquet(out / "report" / "movies.parquet")
    rows = {r["movie"]: r for r in table.iter_rows(named=True)}
    assert rows["a.mp4"]["extract"] == "done" and rows["a.mp4"]["error"] is None
    assert "did not finish within" in rows["b.mp4"]["error"] and rows["b.mp4"]["extract"] == "missing"


def test_ray_cannot_join_a_cluster_one_line(tmp_path, capsys):
    """--address that no cluster answers at: one line naming --address, exit 2, at once (Ray's
    own connection attempts would take minutes)."""
    # Runs before the module's cluster starts (file order). Not `import ray` here: Ray reads its
    # settings once, when first imported, and start_ray sets two of them first (no per-session
    # venv copy of the checkout for the workers); imported here, the module's cluster would be
    # started without them.
    ray = sys.modules.get("ray")
    assert ray is None or not ray.is_initialized()
    folder = tmp_path / "m"
    folder.mkdir()
    write_clip(folder / "a.mp4", [(41, 10, 0.0)])
    code = main(
        ["run", str(folder), "--engine", "ray", "--address", "127.0.0.1:1", "--out", str(tmp_path / "o")]
    )
    err = capsys.readouterr().err
    assert code == 2 and "could not join the Ray cluster at 127.0.0.1:1" in err and "--address" in err
    # --address alone means Ray; with --engine local it is a mistake, said in one line.
    assert main(["run", str(folder), "--address", "127.0.0.1:1", "--out", str(tmp_path / "o")]) == 2
    assert "could not join the Ray cluster" in capsys.readouterr().err
    assert main(["run", str(folder), "--engine", "local", "--address", "127.0.0.1:1"]) == 2
    err = capsys.readouterr().err
    assert "use it with --engine ray" in err and err.count("\n") == 1


def test_an_address_in_the_settings_means_ray_as_the_flag_does(tmp_path, monkeypatch, capsys):
    """``engine.address`` in a settings file or ``--set`` was silently ignored (the batch ran on
    this machine alone): only the ``--address`` flag meant Ray. Now each means Ray (here the
    cluster nobody answers at is said in one line), and with ``--engine local`` each is refused."""
    folder = tmp_path / "m"
    folder.mkdir()
    write_clip(folder / "a.mp4", [(41, 10, 0.0)])
    monkeypatch.setitem(sys.modules, "ray", _SlowRay(fail=0))  # never asked: nobody answers there
    settings = tmp_path / "cluster.yaml"
    settings.write_text("engine:\n  address: 127.0.0.1:1\n")
    out = str(tmp_path / "o")
    for given in (["--set", "engine.address=127.0.0.1:1"], ["--config", str(settings)]):
        capsys.readouterr()
        assert main(["run", str(folder), "--out", out, "--quiet", *given]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: could not join the Ray cluster at 127.0.0.1:1") and err.count("\n") == 1
        assert main(["run", str(folder), "--out", out, "--quiet", "--engine", "local", *given]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: engine.address 127.0.0.1:1 (from the settings) joins a Ray cluster")
        assert "--engine ray" in err and err.count("\n") == 1, err
    assert not (tmp_path / "o" / movie_id(folder / "a.mp4")).exists()


class _SlowRay:
    """Stands in for the ``ray`` module: its first ``fail`` starts time out as Ray's own raylet
    registration does on a busy machine (a bare Exception after a fixed 30 s)."""

    def __init__(self, fail: int):
        self.fail, self.inits, self.shutdowns = fail, 0, 0
        self.addresses: list[str | None] = []

    def is_initialized(self) -> bool:
        return False

    def init(self, **kwargs) -> None:
        self.inits += 1
        self.addresses.append(kwargs.get("address"))
        if self.inits <= self.fail:
            raise Exception("The current node timed out during startup. This could happen because ...")

    def shutdown(self) -> None:
        self.shutdowns += 1


def test_local_ray_start_that_times_out_is_tried_once_more_then_one_line(monkeypatch):
    from diffusion_bunny.errors import EngineError
    from diffusion_bunny.pipeline.engine import start_ray

    cfg = load_config(None, {"engine.num_cpus": 2})
    once = _SlowRay(fail=1)
    monkeypatch.setitem(sys.modules, "ray", once)
    assert start_ray(cfg) is True
    assert (once.inits, once.shutdowns) == (2, 1)
    always = _SlowRay(fail=5)
    monkeypatch.setitem(sys.modules, "ray", always)
    with pytest.raises(EngineError) as err:
        start_ray(cfg)
    msg = str(err.value)
    assert always.inits == 2 and "\n" not in msg
    assert msg.startswith("could not start a local Ray cluster (The current node timed out during startup.")
    assert "--engine local" in msg and "busy machine" in msg


def test_ray_without_address_starts_a_local_cluster_whatever_ray_address_says(monkeypatch):
    """Without --address Ray's default joined the cluster RAY_ADDRESS (or a ``ray start --head``'s
    /tmp/ray/ray_current_cluster) named, then failed on the local settings ("When connecting to an
    existing cluster, object_store_memory must not be provided"): the docs promise a local cluster
    unless --address names one. ``address="local"`` is the one value Ray reads neither from."""
    from diffusion_bunny.pipeline.engine import start_ray

    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    fake = _SlowRay(fail=0)
    monkeypatch.setitem(sys.modules, "ray", fake)
    assert start_ray(load_config(None, {"engine.num_cpus": 2})) is True
    assert fake.addresses == ["local"]
    fake = _SlowRay(fail=0)
    monkeypatch.setitem(sys.modules, "ray", fake)
    monkeypatch.setattr("diffusion_bunny.pipeline.engine._check_reachable", lambda address: None)
    assert start_ray(load_config(None, {"engine.address": "10.0.0.9:6379"})) is True
    assert fake.addresses == ["10.0.0.9:6379"]


class _SignalTakingRay(_SlowRay):
    """Stands in for the ``ray`` module whose ``init`` does what Ray's does to SIGTERM: puts a
    handler of its own in the driver that exits with status 15 (``sys.exit``); with
    ``signalled``, a SIGTERM then comes while it starts."""

    def __init__(self, signalled: bool):
        super().__init__(fail=0)
        self.signalled = signalled

    def init(self, **kwargs) -> None:
        import signal

        super().init(**kwargs)
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))
        if self.signalled:
            signal.raise_signal(signal.SIGTERM)

    def shutdown(self) -> None:
        import signal

        super().shutdown()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # Ray's leaves the system's default in place


def test_bunnys_sigterm_handler_stays_through_rays_start(monkeypatch):
    """``ray.init`` put its own SIGTERM handler over bunny's: a SIGTERM to a folder run on Ray
    printed nothing and exited 15 instead of stopping the run with its line and exit 143. One
    that came while Ray started reaches bunny's handler too."""
    import signal

    from diffusion_bunny.cli import Stopped, _raise_stopped, _signals_as_interrupts
    from diffusion_bunny.pipeline.engine import _shutdown_ray, start_ray

    cfg = load_config(None, {"engine.num_cpus": 2})
    with _signals_as_interrupts():
        monkeypatch.setitem(sys.modules, "ray", _SignalTakingRay(signalled=False))
        assert start_ray(cfg) is True
        assert signal.getsignal(signal.SIGTERM) == _raise_stopped
        _shutdown_ray(sys.modules["ray"])  # the run's end: a SIGTERM during its last lines too
        assert signal.getsignal(signal.SIGTERM) == _raise_stopped
        monkeypatch.setitem(sys.modules, "ray", _SignalTakingRay(signalled=True))
        with pytest.raises(Stopped) as stopped:
            start_ray(cfg)
        assert stopped.value.signum == signal.SIGTERM
        assert signal.getsignal(signal.SIGTERM) == _raise_stopped
        # what Ray had started by then is shut down (run_ray's own cleanup is not reached yet)
        assert sys.modules["ray"].shutdowns == 1


def test_a_sigterm_ignored_where_bunny_runs_that_cuts_rays_start_short_is_one_line(monkeypatch):
    """Started with SIGTERM ignored (``trap '' TERM``), bunny keeps it so, but Ray's start puts its
    own handler first: a SIGTERM then cut the start short and ended the command with status 15
    and no line. It is a failed start, one line, and the signal stays ignored."""
    import signal

    from diffusion_bunny.cli import _signals_as_interrupts
    from diffusion_bunny.errors import EngineError
    from diffusion_bunny.pipeline.engine import start_ray

    fake = _SignalTakingRay(signalled=True)
    monkeypatch.setitem(sys.modules, "ray", fake)
    before = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        with _signals_as_interrupts():
            with pytest.raises(EngineError, match=r"could not start a local Ray cluster \(a SIGTERM cut"):
                start_ray(load_config(None, {"engine.num_cpus": 2}))
            assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, before)
    assert fake.shutdowns >= 1


class _SmallCluster:
    """Stands in for an initialised ``ray`` module: a cluster of two live nodes of 1 CPU each and
    a dead one of 8 (tasks must never be handed out here)."""

    def is_initialized(self) -> bool:
        return True

    def nodes(self) -> list[dict]:
        return [
            {"Alive": True, "Resources": {"CPU": 1.0}},
            {"Alive": True, "Resources": {"CPU": 1.0}},
            {"Alive": False, "Resources": {"CPU": 8.0}},
        ]

    def cluster_resources(self) -> dict:
        return {"CPU": 2.0}

    def remote(self, **kwargs):
        raise AssertionError("a task was handed to Ray")


def test_ray_cpus_per_movie_above_the_largest_node_is_one_line_before_any_task(tmp_path, monkeypatch, capsys):
    """``engine.cpus_per_movie`` more than any node has: Ray kept the task queued until the task's
    time limit (hours) and the batch then said it was cancelled, leaving an empty run folder. Now
    one line, exit 2, before any task or run folder; 2 CPUs split across two nodes do not count
    as 2 (a task runs on one node), and capacity counts what fits per node."""
    from diffusion_bunny.pipeline.engine import _capacity

    folder = tmp_path / "m"
    folder.mkdir()
    write_clip(folder / "a.mp4", [(41, 10, 0.0)])
    monkeypatch.setitem(sys.modules, "ray", _SmallCluster())
    out = tmp_path / "o"
    capsys.readouterr()
    args = ["run", str(folder), "--engine", "ray", "--out", str(out), "--quiet"]
    assert main([*args, "--set", "engine.cpus_per_movie=2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(
        "error: engine.cpus_per_movie 2 is more than the 1 CPU(s) of the cluster's largest node; lower it"
    )
    assert err.count("\n") == 1, err
    assert not (out / movie_id(folder / "a.mp4")).exists()
    cfg = load_config(None, {"engine.cpus_per_movie": 0.6})
    assert _capacity(_SmallCluster(), cfg) == 2  # one per node, not 2 // 0.6 = 3


class _InlineRay(_SmallCluster):
    """Stands in for an initialised ``ray`` module of one node with 2 CPUs that runs each task
    at once, in this process (its reference is the task's report)."""

    def nodes(self) -> list[dict]:
        return [{"Alive": True, "Resources": {"CPU": 2.0}}]

    def remote(self, **kwargs):
        return lambda f: types.SimpleNamespace(remote=lambda *a: _Ref(f(*a)))

    def get_runtime_context(self):
        return types.SimpleNamespace(get_node_id=lambda: "head")

    def wait(self, refs, num_returns=1, timeout=None):
        return refs[:num_returns], refs[num_returns:]

    def get(self, ref):
        return ref.report


class _Ref:
    def __init__(self, report):
        self.report = report


def test_a_ray_run_folder_that_is_a_file_fails_that_movie_alone(tmp_path, monkeypatch, capsys):
    """A movie's run folder taken by a file stopped the whole Ray batch with ``bug:
    FileExistsError`` (the head's token write); now that movie fails in the local engine's line
    and the others run."""
    from diffusion_bunny.pipeline import engine
    from diffusion_bunny.pipeline.runner import MovieReport, RunOptions
    from diffusion_bunny.stages import PIPELINE

    folder = tmp_path / "m"
    folder.mkdir()
    write_clip(folder / "a.mp4", [(41, 10, 0.0)])
    write_clip(folder / "b.mp4", [(42, 10, 0.0)])
    out = tmp_path / "o"
    out.mkdir()
    taken = out / movie_id(folder / "a.mp4")
    taken.write_text("mine")
    ran = []
    monkeypatch.setattr(engine, "run_movie", lambda m, r, o: ran.append(m.name) or MovieReport(m, r))
    monkeypatch.setitem(sys.modules, "ray", _InlineRay())
    options = RunOptions(PIPELINE, load_config(None, {}), stages=("extract",), progress=False)
    jobs = [(folder / name, out / movie_id(folder / name)) for name in ("a.mp4", "b.mp4")]
    capsys.readouterr()
    a, b = engine.run_ray(jobs, options)
    err = capsys.readouterr().err
    assert a.error == f"{taken} is a file, not a folder; give --out a folder for the run (new or empty)"
    assert not a.bug and b.error is None and ran == ["b.mp4"]
    assert err == f"error: a.mp4: {a.error}\n" and taken.read_text() == "mine"


def test_ray_engine_same_run_folders_resumable_and_bad_movie_reported(
    movies, local_batch, extracted, ray_cluster, tmp_path, capsys
):
    out_local, out_ray = local_batch, tmp_path / "ray"
    args = ["run", str(movies), "--out", str(out_ray), "--stages", STAGES, "--engine", "ray", "--quiet"]
    assert main(args) == 0
    table = _check_batch(movies, out_ray)
    # The same per-movie function ran on the workers: the same tables as the local engine made.
    for name in ("a.mp4", "b.mp4"):
        for t in ("shots", "frames", "quality"):
            local = pl.read_parquet(out_local / movie_id(movies / name) / "tables" / f"{t}.parquet")
            remote = pl.read_parquet(out_ray / movie_id(movies / name) / "tables" / f"{t}.parquet")
            assert local.equals(remote), (name, t)
    assert table["frames"].to_list() == [
        pl.read_parquet(out_local / movie_id(movies / n) / "tables" / "frames.parquet").height
        for n in ("a.mp4", "b.mp4")
    ]
    # Resumable: the second run on Ray skips every stage (no manifest is rewritten).
    first = {name: _finished(out_ray / movie_id(movies / name)) for name in ("a.mp4", "b.mp4")}
    assert main(args) == 0
    assert {name: _finished(out_ray / movie_id(movies / name)) for name in ("a.mp4", "b.mp4")} == first
    # One movie on Ray, its run folder given with --out as for a single movie: up to date too.
    single = ["run", str(movies / "a.mp4"), "--out", str(out_ray / movie_id(movies / "a.mp4"))]
    assert main([*single, "--stages", STAGES, "--engine", "ray", "--quiet"]) == 0
    assert _finished(out_ray / movie_id(movies / "a.mp4")) == first["a.mp4"]

    # A broken movie next to good ones: reported, the others still done, exit status 2.
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "a.mp4").write_bytes((movies / "a.mp4").read_bytes())
    (mixed / "broken.mp4").write_bytes(b"")
    capsys.readouterr()
    code = main(
        ["run", str(mixed), "--out", str(out_ray), "--stages", "extract", "--engine", "ray", "--quiet"]
    )
    assert code == 2
    assert "1 of 2 movies failed" in capsys.readouterr().err
    table = pl.read_parquet(out_ray / "report" / "movies.parquet")
    broken = table.filter(pl.col("movie") == "broken.mp4").row(0, named=True)
    assert "the file is empty" in broken["error"] and broken["extract"] == "missing"
    assert table.filter(pl.col("movie") == "a.mp4")["extract"].to_list() == ["done"]

    # A bug in one movie on Ray: reported, the other finishes, the combined report is written, exit 1.
    bugs = tmp_path / "bugs"
    _break_one_movie(movies, extracted, bugs)
    capsys.readouterr()
    code = main(
        ["run", str(movies), "--out", str(bugs), "--stages", "quality,report", "--engine", "ray", "--quiet"]
    )
    _check_bug_isolated(movies, bugs, code, capsys.readouterr().err)

    # A movie whose task runs past engine.task_timeout_s is cancelled and reported
    # like a failed one; the others finish (movie a: up to date, no kernel, done in a second or
    # two on a warm Ray worker, so 10 s leaves it room on a loaded machine), exit status 2.
    hung = tmp_path / "hung"
    _b_not_extracted(movies, extracted, hung)
    capsys.readouterr()
    args = ["run", str(movies), "--out", str(hung), "--stages", "extract", "--engine", "ray", "--quiet"]
    code = main([*args, "--set", "run.kernel=sleepy", "--set", "engine.task_timeout_s=10"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert (
        "b.mp4: did not finish within 10 s on Ray and was cancelled" in err and "1 of 2 movies failed" in err
    )
    table = pl.read_parquet(hung / "report" / "movies.parquet")
    rows = {r["movie"]: r for r in table.iter_rows(named=True)}
    assert rows["a.mp4"]["error"] is None and "was cancelled" in rows["b.mp4"]["error"]


def test_a_ray_task_on_another_node_asks_about_the_run_folder_before_it_logs_there(tmp_path, movies):
    """A task on another node logs into ``<run>/log/`` first; a folder of the user's own is
    refused before that (its line is the task's report), and a run's own log folder does not
    make a new run folder look used."""
    from diffusion_bunny.pipeline.engine import _foreign_run_folder
    from diffusion_bunny.pipeline.run import check_run_folder

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    assert "already holds files and is no run folder" in _foreign_run_folder(movies / "a.mp4", mine)
    fresh = tmp_path / "fresh"
    assert _foreign_run_folder(movies / "a.mp4", fresh) is None
    (fresh / "log").mkdir(parents=True)
    check_run_folder(fresh, movies / "a.mp4")  # the task's own log folder: still a new run folder


def test_a_movie_that_fails_in_a_run_without_out_keeps_its_run_folder_in_its_report(tmp_path, monkeypatch):
    """Without ``--out`` the local engine handed no run folder to a failed movie's report: the
    combined report showed it as never run, whatever stages it had finished."""
    from diffusion_bunny.errors import UserError
    from diffusion_bunny.pipeline import engine
    from diffusion_bunny.pipeline.runner import RunOptions
    from diffusion_bunny.stages import PIPELINE

    movie = tmp_path / "a.mp4"
    movie.write_bytes(b"a movie's bytes" * 100)
    cfg = load_config(None, {"paths.output_dir": str(tmp_path / "runs")}, use_local=False)

    def held(movie, run_dir, options):
        raise UserError(f"{run_dir} is held by another run")

    monkeypatch.setattr(engine, "run_movie", held)
    report = engine.run_one(movie, None, RunOptions(PIPELINE, cfg, progress=False))
    assert report.run_dir == tmp_path / "runs" / movie_id(movie)
    assert report.error == f"{report.run_dir} is held by another run"
    # A movie that cannot even be read has no folder to name; run_movie says why.
    gone = engine.run_one(tmp_path / "gone.mp4", None, RunOptions(PIPELINE, cfg, progress=False))
    assert gone.run_dir is None and gone.error.endswith("is held by another run")


def test_a_failed_movies_line_names_it_in_a_folder_run(tmp_path, monkeypatch, capsys):
    """``error: no frames to cluster: stage 02 kept none`` in a folder run named no movie; a line
    that names the file already is not prefixed again."""
    from diffusion_bunny.errors import UserError
    from diffusion_bunny.pipeline import engine
    from diffusion_bunny.pipeline.runner import RunOptions
    from diffusion_bunny.stages import PIPELINE

    cfg = load_config(None, {"paths.output_dir": str(tmp_path / "runs")}, use_local=False)
    options = RunOptions(PIPELINE, cfg, progress=False)
    for name, message, line in [
        ("dark.mp4", "no frames to cluster", "error: dark.mp4: no frames to cluster"),
        ("cut.mp4", "cut.mp4: the file is cut short", "error: cut.mp4: the file is cut short"),
    ]:
        movie = tmp_path / name
        movie.write_bytes(name.encode() * 100)

        def fails(movie, run_dir, options, message=message):
            raise UserError(message)

        monkeypatch.setattr(engine, "run_movie", fails)
        capsys.readouterr()
        assert engine.run_one(movie, tmp_path / "out", options).error == message
        assert capsys.readouterr().err.splitlines() == [line]


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_folder_run_refuses_an_out_of_the_users_own_before_writing_there(movies, tmp_path, capsys):
    """A folder run checked no --out: a folder of the user's own lost the figures of its
    ``report/`` (the combined report replaced them), and a movie's run folder got the batch
    nested inside it. Both are refused in one line, nothing written; what a folder run leaves
    (run folders, its report, the movies themselves when --out is their folder) is accepted."""
    from diffusion_bunny.pipeline.run import Run, check_batch_folder

    mine = tmp_path / "mine"
    (mine / "report" / "figures").mkdir(parents=True)
    (mine / "report" / "figures" / "holiday.png").write_bytes(b"my picture")
    (mine / "report" / "index.html").write_text("my page")
    (mine / "notes.txt").write_text("my notes")
    single = tmp_path / "single"
    Run.create(single, movies / "a.mp4")
    (single / "report" / "figures").mkdir(parents=True)
    (single / "report" / "figures" / "funnel.png").write_bytes(b"its figure")
    for out, message in [
        (mine, f"{mine / 'report'} is no folder run's report (figures, index.html); "),
        (single, f"{single} is the run folder of one movie; "),
    ]:
        before = _files(out)
        for engine in ("local", "ray"):
            capsys.readouterr()
            assert main(["run", str(movies), "--out", str(out), "--engine", engine, "--quiet"]) == 2
            err = capsys.readouterr().err
            assert err.startswith(f"error: {message}") and err.count("\n") == 1, err
            assert _files(out) == before and sorted(p.name for p in out.iterdir()) == sorted(
                {Path(k).parts[0] for k in before}
            )

    # What a folder run leaves in its --out, beside the movies when --out is their folder.
    own = tmp_path / "own"
    shutil.copytree(movies, own)
    Run.create(own / movie_id(own / "a.mp4"), own / "a.mp4")
    (own / movie_id(own / "b.mp4") / "log").mkdir(parents=True)  # a run folder not begun yet
    (own / "report").mkdir()
    (own / "report" / "movies.parquet").write_bytes(b"")
    (own / "log").mkdir()
    (own / ".locks").mkdir()
    (own / "a.srt").write_text("1\n00:00:01,000 --> 00:00:02,000\nhello\n")  # beside its movie
    (own / "Thumbs.db").write_bytes(b"\xd0\xcf")
    check_batch_folder(own)
    check_batch_folder(tmp_path / "new")


def test_ray_one_movie_into_a_file_is_one_line_before_ray_starts(movies, tmp_path, monkeypatch, capsys):
    """``--engine ray`` and an --out that is a file: the local engine's line (exit 2), not
    ``bug: FileExistsError`` after Ray's start-up."""
    from diffusion_bunny.pipeline import engine

    def no_ray(cfg):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(engine, "start_ray", no_ray)
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    capsys.readouterr()
    args = ["run", str(movies / "a.mp4"), "--out", str(notes), "--stages", "extract", "--quiet"]
    assert main([*args, "--engine", "ray"]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith(f"error: {notes} is a file, not a folder; give --out a folder")
        and err.count("\n") == 1
    )
    assert notes.read_text() == "mine"


def test_an_unreadable_movie_fails_alone_in_one_line_of_its_own(
    movies, extracted, tmp_path, monkeypatch, capsys
):
    """A movie the user may not read stopped a folder run with --out ("could not write ...:
    Permission denied", its id reads the file) before any movie ran; now it fails in one line
    ("cannot read"), on a line of its own under the movies' bar, and the others run."""
    from diffusion_bunny.pipeline.engine import _run_folder

    folder = tmp_path / "movies"
    folder.mkdir()
    shutil.copy(movies / "a.mp4", folder / "a.mp4")
    shutil.copy(movies / "b.mp4", folder / "c.mp4")
    out = tmp_path / "out"
    out.mkdir()
    a_run = out / movie_id(folder / "a.mp4")
    shutil.copytree(extracted / movie_id(movies / "a.mp4"), a_run)  # up to date: no kernel
    (folder / "empty.mp4").write_bytes(b"")  # fails under the movies' bar
    make_unreadable(monkeypatch, folder / "c.mp4")
    capsys.readouterr()
    # Not --quiet: the movies' bar is drawn, and an error line must not be glued to it.
    code = main(["run", str(folder), "--out", str(out), "--stages", "extract"])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line.split("\r")[-1] for line in err.split("\n")]
    unread = [line for line in lines if "c.mp4" in line and "cannot read" in line]
    assert len(unread) == 1, err
    assert unread[0].startswith(f"error: {folder / 'c.mp4'}: cannot read the file ("), err
    empty = [line for line in lines if "empty.mp4" in line]
    assert len(empty) == 1 and empty[0].startswith(f"error: {folder / 'empty.mp4'}: the file is empty"), err
    assert "could not write" not in err and "2 of 3 movies failed" in err
    assert "a.mp4: extract is up to date, skipped" in err
    table = pl.read_parquet(out / "report" / "movies.parquet")
    rows = {r["movie"]: r for r in table.iter_rows(named=True)}
    assert rows["a.mp4"]["error"] is None and rows["a.mp4"]["extract"] == "done"
    assert "cannot read the file" in rows["c.mp4"]["error"] and rows["c.mp4"]["run_dir"] is None
    # Ray's head names each movie's run folder before it runs: an unreadable movie's is left to its task.
    cfg = load_config(None, {"paths.output_dir": str(out)})
    assert _run_folder(folder / "c.mp4", None, cfg) is None


def test_quiet_reaches_the_ray_workers(movies, extracted, tmp_path, monkeypatch, capsys):
    """``-q`` was ignored in Ray workers: without ``bunny``'s terminal handler their lines went to
    standard error, which Ray forwards to the driver's terminal."""
    from diffusion_bunny.logs import QUIET_ENV
    from diffusion_bunny.pipeline import engine
    from diffusion_bunny.pipeline.runner import RunOptions
    from diffusion_bunny.stages import PIPELINE

    engine._prepare_ray_environment()
    out = tmp_path / "run"
    shutil.copytree(extracted / movie_id(movies / "a.mp4"), out)  # up to date: a line, no kernel
    monkeypatch.delenv(QUIET_ENV, raising=False)
    options = RunOptions(PIPELINE, load_config(None, {}), stages=("extract",), progress=False)
    capsys.readouterr()
    report = engine._ray_task(movies / "a.mp4", out, options, quiet=True)
    assert report.error is None and report.lines == []
    assert QUIET_ENV not in os.environ  # the worker's next task starts as it was
    report = engine._ray_task(movies / "a.mp4", out, options)
    assert report.error is None and report.lines == [
        "a.mp4: extract is up to date, skipped (--force reruns it)"
    ]
    # A worker's lines come back with its report, for the head to print: forwarded by Ray, they
    # came glued to the movies' bar, or not at all when the run ended first.
    assert capsys.readouterr().err == ""
    unseen = [(tmp_path / "elsewhere", "token")]  # a folder this node does not see: one error line
    report = engine._ray_task(movies / "a.mp4", out, options, tokens=unseen, quiet=True)
    assert report.lines == [f"error: {report.error}"] and "cannot see" in report.error
    assert capsys.readouterr().err == ""


def test_quiet_keeps_rays_own_warnings_off_the_terminal(monkeypatch):
    """``bunny run --engine ray -q`` printed Ray's "Token authentication is enabled" warning: under
    ``--quiet`` Ray's logger shows errors only; without it, as Ray sets it."""
    import logging

    from diffusion_bunny.logs import QUIET_ENV
    from diffusion_bunny.pipeline.engine import _quiet_ray_logs

    ray_log = logging.getLogger("ray")
    monkeypatch.setattr(ray_log, "level", logging.INFO)
    monkeypatch.delenv(QUIET_ENV, raising=False)
    _quiet_ray_logs()
    assert ray_log.level == logging.INFO
    monkeypatch.setenv(QUIET_ENV, "1")
    _quiet_ray_logs()
    assert ray_log.level == logging.ERROR and not ray_log.isEnabledFor(logging.WARNING)


def test_an_unreadable_movie_on_ray_fails_in_one_line_before_ray_starts(tmp_path, monkeypatch):
    """``bunny run broken.mp4 --engine ray`` started a Ray cluster (about 30 s) before the movie's
    line, then said "1 of 1 movies failed" under it: the local engine's one line at once now."""
    from diffusion_bunny.errors import UserError
    from diffusion_bunny.pipeline import engine
    from diffusion_bunny.stages import PIPELINE

    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"not a movie at all" * 64)
    monkeypatch.setattr(engine, "start_ray", lambda cfg: pytest.fail("Ray was started"))
    cfg = load_config(None, {"engine.kind": "ray"})
    with pytest.raises(UserError, match=r"broken\.mp4"):
        engine.run_target(PIPELINE, bad, cfg, stages="extract", out=tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_a_linked_movie_keeps_its_name_on_ray(movies, tmp_path):
    """Ray's head resolved each movie, so a link (a season folder of links to release-named
    files) was reported under its target's name, where the local engine used the link's."""
    from diffusion_bunny.pipeline.engine import _ray_jobs

    link = tmp_path / "episode1.mp4"
    link.symlink_to(movies / "a.mp4")
    cfg = load_config(None, {"paths.output_dir": str(tmp_path / "out")})
    [(movie, run_dir)] = _ray_jobs([(link, None)], cfg)
    assert movie == link and movie.is_absolute() and run_dir.name.startswith("episode1-")


def test_verbose_reaches_the_ray_workers_and_a_join_sends_the_token_ray_made(tmp_path, monkeypatch):
    """``bunny run -v --engine ray`` showed no INFO line of its tasks. And after one local Ray run
    (which writes ``~/.ray/auth_token``) a ``ray start --head`` there turns token authentication
    on, but a join by ``--address`` sent no token: every join was refused."""
    import logging

    from diffusion_bunny.logs import held_lines, start_cli_log, stop_cli_log, terminal_verbose
    from diffusion_bunny.pipeline import engine

    said = logging.getLogger("diffusion_bunny.test")
    for verbose in (False, True):
        with held_lines(False, verbose) as lines:
            said.info("a stage took 6.3 s")
        assert lines == (["a stage took 6.3 s"] if verbose else [])
    for verbosity in (1, 0):  # each started and stopped: a second start kept the first's file as "before"
        try:
            start_cli_log(verbosity, tmp_path / "log")
            assert terminal_verbose() == (verbosity > 0)
        finally:
            stop_cli_log()
    assert not terminal_verbose()

    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.setenv(name, "")  # recorded by monkeypatch, so put back as it was after the test
        monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    engine._prepare_ray_environment("10.0.0.2:6379")
    assert "RAY_AUTH_MODE" not in os.environ  # no token here: nothing to send
    (tmp_path / "home" / ".ray").mkdir(parents=True)
    (tmp_path / "home" / ".ray" / "auth_token").write_text("secret")
    engine._prepare_ray_environment(None)  # a local cluster: Ray decides itself
    assert "RAY_AUTH_MODE" not in os.environ
    engine._prepare_ray_environment("10.0.0.2:6379")
    assert os.environ["RAY_AUTH_MODE"] == "token"
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # a mode set by the user is kept
    engine._prepare_ray_environment("10.0.0.2:6379")
    assert os.environ["RAY_AUTH_MODE"] == "disabled"
