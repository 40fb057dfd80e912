"""Faults a user meets, each one line on standard error with exit status 2 and earlier results
intact: a notebook kernel that dies under a stage (the system killing it for
memory), a disk that cannot take the run's files (a file-size limit stands in for a full disk:
the test cannot mount a small file system), a damaged ``run.json`` in ``bunny status``."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from clips import write_clip
from kernels import dying_kernel, sleepy_kernel

from diffusion_bunny.cli import main


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    movie = tmp_path_factory.mktemp("faults") / "tiny.mp4"
    write_clip(movie, [(61, 12, 0.0), (62, 12, 0.0)], width=96, height=64)
    return movie


@pytest.fixture(scope="module")
def extracted(clip, tmp_path_factory) -> Path:
    """The clip through stage 01 by ``bunny run``, once for the module; each test that starts from
    there works on a copy (:func:`_extracted_copy`)."""
    out = tmp_path_factory.mktemp("extracted") / "run"
    assert main(["run", str(clip), "--out", str(out), "--stages", "extract", "--quiet"]) == 0
    return out


def _extracted_copy(extracted: Path, out: Path) -> Path:
    shutil.copytree(extracted, out)
    return out


def test_a_kernel_that_dies_is_one_line_and_keeps_earlier_stages(
    clip, extracted, tmp_path, monkeypatch, capsys
):
    out = _extracted_copy(extracted, tmp_path / "run")
    frames = (out / "tables" / "frames.parquet").read_bytes()
    dying_kernel(tmp_path / "jupyter")
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    capsys.readouterr()
    args = [
        "run",
        str(clip),
        "--out",
        str(out),
        "--stages",
        "quality",
        "--quiet",
        "--set",
        "run.kernel=dying",
    ]
    assert main(args) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "kernel died" in lines[0] and "out of memory" in lines[0], err
    assert "Traceback" not in err
    assert (out / "tables" / "frames.parquet").read_bytes() == frames
    assert json.loads((out / "manifests" / "extract.json").read_text())["counts"]


def _limited_run(args: list[str], limit: int) -> subprocess.CompletedProcess:
    """``bunny`` in a child process whose files may not grow past ``limit`` bytes (writes past
    it fail with EFBIG, as writes on a full disk fail with ENOSPC)."""

    def limit_files() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    # It writes no bytecode, nor do the kernels it starts: CPython writes a .pyc with one write
    # call, and past the limit that call writes part of it and returns, leaving a cut-short .pyc
    # that every later import of the module fails on ("marshal data too short"; the command
    # clears such files, see cli._remove_damaged_bytecode, but the test is about what it says).
    code = (
        "import sys; import diffusion_bunny.cli as cli; cli._keep_bytecode = lambda: None; "
        "sys.exit(cli.main(sys.argv[1:]))"
    )
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        preexec_fn=limit_files,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_a_full_disk_is_one_line_and_keeps_earlier_results(clip, extracted, tmp_path):
    out = _extracted_copy(extracted, tmp_path / "run")
    before = {p.name: p.read_bytes() for p in (out / "tables").glob("*.parquet")}
    done = _limited_run(
        ["run", str(clip), "--out", str(out), "--stages", "extract", "--force", "--quiet"], 2000
    )
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "could not write" in lines[0] and "File too large" in lines[0], done.stderr
    assert f"error: could not write {out}/" in lines[0]  # the file, not "a file"
    assert "Traceback" not in done.stderr
    assert {p.name: p.read_bytes() for p in (out / "tables").glob("*.parquet")} == before


def test_a_log_file_that_cannot_be_written_is_one_line(extracted, tmp_path, monkeypatch):
    """A full disk under log/ used to print a traceback per record; now the command
    does its work, then says it in one line naming the log file, exit status 2. A log folder that
    cannot be made at all (here /sys, where nothing can be made) stops it before anything runs."""
    monkeypatch.setenv("DIFFUSION_BUNNY_LOG_DIR", str(tmp_path / "log"))
    done = _limited_run(["status", str(extracted)], 100)
    assert done.returncode == 2, done.stderr
    assert "extract" in done.stdout and "done" in done.stdout  # the status was shown
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: could not write "), done.stderr
    assert str(tmp_path / "log" / "bunny-") in lines[0] and "File too large" in lines[0]
    assert "DIFFUSION_BUNNY_LOG_DIR" in lines[0]
    monkeypatch.setenv("DIFFUSION_BUNNY_LOG_DIR", "/sys/diffusion-bunny-log")
    done = subprocess.run(
        [sys.executable, "-m", "diffusion_bunny.cli", "status", str(extracted)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and done.stdout == ""
    assert (
        done.stderr.startswith("error: could not write /sys/diffusion-bunny-log")
        and "(nothing ran)" in done.stderr
    )
    assert len(done.stderr.splitlines()) == 1
    # A file where the log folder should be: mkdir's exist_ok passed FileExistsError on, a traceback.
    (tmp_path / "a-file").write_text("not a folder")
    monkeypatch.setenv("DIFFUSION_BUNNY_LOG_DIR", str(tmp_path / "a-file"))
    command = [sys.executable, "-m", "diffusion_bunny.cli", "status", str(extracted)]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 2 and done.stdout == "" and len(done.stderr.splitlines()) == 1, done.stderr
    said = f"error: could not write {tmp_path / 'a-file'}: Not a directory (a file stands"
    assert done.stderr.startswith(said), done.stderr


def test_status_with_a_damaged_run_json_says_so_in_one_row(clip, extracted, tmp_path, capsys):
    out = tmp_path / "runs"
    _extracted_copy(extracted, out / "a")
    (out / "a" / "run.json").write_text('{"movie": "/x/tiny.mp4", ')  # cut short
    capsys.readouterr()
    assert main(["status", str(out)]) == 0
    text = capsys.readouterr().out
    assert "run.json is damaged" in text and "Traceback" not in text
    # The next run on the movie rewrites it; the stage is still up to date.
    assert main(["run", str(clip), "--out", str(out / "a"), "--stages", "extract", "--quiet"]) == 0
    from diffusion_bunny import logs

    assert "is up to date, skipped" in logs.last_path.read_text()  # --quiet: in the log only
    assert json.loads((out / "a" / "run.json").read_text())["movie"] == str(clip.resolve())


def _bunny(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    code = "import sys; from diffusion_bunny.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        env={**os.environ, "OMP_NUM_THREADS": "1", **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its kernel too can be killed as a group
    )


def _wait_for(path: Path, proc: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not path.is_file():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.1)


def test_one_bunny_run_per_run_folder_from_first_stage_to_last(clip, extracted, tmp_path, capsys):
    """While a ``bunny run`` is in a later stage, a second one on the same run folder
    (here redoing stage 01, as in the issue) stops at once, exit 2, naming the first's pid and
    host, and touches nothing; when the first is killed, the next run takes the folder over."""
    out = _extracted_copy(extracted, tmp_path / "run")
    frames = (out / "tables" / "frames.parquet").read_bytes()
    sleepy_kernel(tmp_path / "jupyter")
    mark = tmp_path / "in_quality"
    first = _bunny(
        [
            "run",
            str(clip),
            "--out",
            str(out),
            "--stages",
            "extract,quality",
            "--quiet",
            "--set",
            "run.kernel=sleepy",
        ],
        {"JUPYTER_PATH": str(tmp_path / "jupyter"), "SLEEPY_MARK": str(mark), "SLEEPY_S": "120"},
    )
    try:
        # The first run is inside stage quality (extract was up to date).
        _wait_for(Path(str(mark) + ".stage"), first)
        capsys.readouterr()
        assert main(["run", str(clip), "--out", str(out), "--stages", "extract", "--force", "--quiet"]) == 2
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(lines) == 1, err
        assert f"{out.resolve()} is in use by process {first.pid} on {socket.gethostname()} (bunny run" in err
        assert "Traceback" not in err
        assert (out / "tables" / "frames.parquet").read_bytes() == frames
        # A stage run on its own (a notebook in JupyterLab, the Python API) is refused the same way.
        from diffusion_bunny.config import load_config
        from diffusion_bunny.pipeline.lock import RunBusy
        from diffusion_bunny.pipeline.run import Run
        from diffusion_bunny.stages import run_stage

        with pytest.raises(RunBusy, match=f"in use by process {first.pid}"):
            run_stage(Run.open(out), "quality", load_config(root=tmp_path), progress=False)
        # Naming a cluster is refused before it writes a reference picture (the next run named it).
        from diffusion_bunny.stages.characters.stage import name_cluster

        with pytest.raises(RunBusy, match=f"in use by process {first.pid}"):
            name_cluster(out, "cluster_00", "bob", load_config(root=tmp_path))
        assert not (out / "references").exists()
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the run and its kernel, as a crash would
        first.wait()
    # The dead holder's lease is left behind; the next run takes the folder over.
    assert json.loads((out / ".locks" / "run.json").read_text())["pid"] == first.pid
    assert main(["run", str(clip), "--out", str(out), "--stages", "extract,quality", "--quiet"]) == 0
    assert not (out / ".locks" / "run.json").exists()  # released at the end


def _lease(out: Path, host: str, pid: int, age_s: float) -> None:
    """A lease as another machine sharing the disk would leave it (its OS lock not visible here)."""
    (out / ".locks").mkdir(exist_ok=True)
    beat = time.time() - age_s
    lease = {
        "host": host,
        "pid": pid,
        "since": "2026-01-01T00:00:00+00:00",
        "heartbeat": beat,
        "token": "0" * 32,
        "started": None,
        "what": "bunny run",
    }
    (out / ".locks" / "run.json").write_text(json.dumps(lease))


def test_a_run_lock_held_from_another_machine_is_judged_by_its_heartbeat(clip, extracted, tmp_path, capsys):
    """On a shared disk whose file locks do not reach across machines, the lease decides: another
    host's lease with a fresh heartbeat holds the folder (exit 2 naming pid and host); one silent
    for longer than pipeline.lock_stale_s, or a lease of a dead process on this host, is taken over."""
    out = _extracted_copy(extracted, tmp_path / "run")
    args = ["run", str(clip), "--out", str(out), "--stages", "extract", "--quiet"]
    _lease(out, "render-node-7", 4242, age_s=5)
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"{out.resolve()} is in use by process 4242 on render-node-7 (bunny run" in err
    assert "heartbeat 5 s ago" in err and "pipeline.lock_stale_s" in err
    assert json.loads((out / ".locks" / "run.json").read_text())["host"] == "render-node-7"
    _lease(out, "render-node-7", 4242, age_s=500)  # past the 120 s default
    assert main(args) == 0
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _lease(out, socket.gethostname(), dead.pid, age_s=1)  # fresh, but its process is gone
    assert main(args) == 0
    assert "took over the run lock" in logs_text()


def logs_text() -> str:
    from diffusion_bunny import logs

    return logs.last_path.read_text()


def test_bytecode_cut_short_by_a_full_disk_is_cleared_in_one_line(tmp_path, monkeypatch, capsys):
    """A .pyc written on a full disk is cut short and taken as whole: every later import of its
    module failed "with a bug" (EOFError: marshal data too short), long after space was freed.
    The command removes every such file it finds and says to run again; the next import
    compiles the module afresh."""
    import importlib
    import py_compile

    from diffusion_bunny import cli

    package = tmp_path / "lib"
    package.mkdir()
    for name in ("whole_mod", "cut_mod"):
        (package / f"{name}.py").write_text(f"VALUE = {name!r}\n" + "X = list(range(50))\n" * 20)
        py_compile.compile(
            str(package / f"{name}.py"),
            cfile=importlib.util.cache_from_source(str(package / f"{name}.py")),
            doraise=True,
        )
    cut = Path(importlib.util.cache_from_source(str(package / "cut_mod.py")))
    cut.write_bytes(cut.read_bytes()[:40])  # what a full disk leaves
    monkeypatch.syspath_prepend(str(package))
    monkeypatch.setattr(cli, "_bytecode_roots", lambda: [package])

    def status_importing_the_module(args):
        importlib.import_module("cut_mod")  # the real import machinery fails on it
        return 0

    monkeypatch.setattr(cli, "_cmd_status", status_importing_the_module)
    assert main(["status", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: 1 cached bytecode file(s) (.pyc) were cut short") and "bug" not in err
    assert not cut.exists()
    assert Path(importlib.util.cache_from_source(str(package / "whole_mod.py"))).exists()
    assert main(["status", str(tmp_path)]) == 0  # compiled afresh
    assert importlib.import_module("cut_mod").VALUE == "cut_mod"


def test_a_lease_is_judged_by_the_holders_own_staleness(tmp_path):
    """A holder with pipeline.lock_stale_s 600 renews every 150 s; a notebook on another machine
    reading with the default 120 s took it for dead at 121 s and swept its staging folder."""
    from diffusion_bunny.pipeline.lock import Lease, current_holder, lease_path, run_lock

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with run_lock(run_dir, what="bunny run", lease_s=600):
        data = json.loads(lease_path(run_dir).read_text())
    assert data["lease_s"] == 600
    lease = lease_path(run_dir)
    lease.parent.mkdir(exist_ok=True)
    lease.write_text(
        json.dumps({**data, "host": "render-node-7", "heartbeat": time.time() - 130})
    )  # another machine's, 130 s since its last heartbeat
    assert current_holder(run_dir) is not None  # alive for its own 600 s
    assert Lease.read(lease).alive(120, now=time.time() + 500) is False
