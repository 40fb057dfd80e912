"""Faults a user meets, each one line on standard error with exit status 2 and earlier results
intact (issue 17.7): a notebook kernel that dies under a stage (the system killing it for
memory), a disk that cannot take the run's files (a file-size limit stands in for a full disk:
the test cannot mount a small file system), a damaged ``run.json`` in ``bunny status``."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from clips import write_clip

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


def _dying_kernel(folder: Path) -> None:
    """A Jupyter kernel named ``dying``: the project's ipykernel, whose ``run_stage`` kills the
    kernel process with SIGKILL the moment a stage starts (as the out-of-memory killer does)."""
    spec = folder / "kernels" / "dying"
    spec.mkdir(parents=True)
    kill = (
        "import os, signal, diffusion_bunny.stages as s; "
        "s.run_stage = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)"
    )
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    argv.append(f"--IPKernelApp.exec_lines={json.dumps([kill])}")
    (spec / "kernel.json").write_text(
        json.dumps({"argv": argv, "display_name": "dying", "language": "python"})
    )


def test_a_kernel_that_dies_is_one_line_and_keeps_earlier_stages(
    clip, extracted, tmp_path, monkeypatch, capsys
):
    out = _extracted_copy(extracted, tmp_path / "run")
    frames = (out / "tables" / "frames.parquet").read_bytes()
    _dying_kernel(tmp_path / "jupyter")
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

    code = "import sys; from diffusion_bunny.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        preexec_fn=limit_files,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
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
    assert "Traceback" not in done.stderr
    assert {p.name: p.read_bytes() for p in (out / "tables").glob("*.parquet")} == before


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


def test_a_second_runner_on_a_stage_names_the_process_that_holds_it(clip, extracted, tmp_path, capsys):
    """Issue 17.5: a stage of one run folder runs in one process at a time; a second runner
    stops at once (exit 2) naming the holder, and a killed holder blocks nothing."""
    out = _extracted_copy(extracted, tmp_path / "run")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from diffusion_bunny.pipeline.run import Run\n"
            "with Run.open(sys.argv[1]).stage_lock('quality'):\n"
            "    print('held', flush=True); time.sleep(120)",
            str(out),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        capsys.readouterr()
        assert main(["run", str(clip), "--out", str(out), "--stages", "quality", "--quiet"]) == 2
        err = capsys.readouterr().err
        assert f"stage quality of {out.resolve()} is being run by process {holder.pid}" in err, err
        assert "Traceback" not in err
    finally:
        holder.kill()  # SIGKILL: the OS releases its lock
        holder.wait()
    assert main(["run", str(clip), "--out", str(out), "--stages", "quality", "--quiet"]) == 0
