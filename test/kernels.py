"""Jupyter kernels that misbehave on purpose, for the runner's fault tests: each is the project's
own ipykernel with a few lines run at its start (``--IPKernelApp.exec_lines``) that replace
``diffusion_bunny.stages.run_stage`` before a stage notebook imports it. Point ``JUPYTER_PATH``
at the folder and pass ``--set run.kernel=<name>``."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def write_kernel(folder: Path, name: str, code: str) -> None:
    """Kernel spec ``name`` under ``folder/kernels/`` running ``code`` as the kernel starts."""
    spec = folder / "kernels" / name
    spec.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    argv.append(f"--IPKernelApp.exec_lines={json.dumps([code])}")
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": name, "language": "python"}))


def dying_kernel(folder: Path) -> None:
    """``dying``: ``run_stage`` kills the kernel with SIGKILL the moment a stage starts (as the
    out-of-memory killer does)."""
    write_kernel(
        folder,
        "dying",
        "import os, signal, diffusion_bunny.stages as s; "
        "s.run_stage = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)",
    )


def sleepy_kernel(folder: Path) -> None:
    """``sleepy``: writes its pid to ``$SLEEPY_MARK`` as it starts; its ``run_stage``, on a run
    folder whose path holds ``$SLEEPY_ONLY`` (any, when unset), writes ``$SLEEPY_MARK.stage`` and
    sleeps ``$SLEEPY_S`` seconds first: a stage that hangs, or one still at work while a test does
    something else."""
    write_kernel(
        folder,
        "sleepy",
        "import os, time, pathlib, diffusion_bunny.stages as s\n"
        "mark = pathlib.Path(os.environ['SLEEPY_MARK'])\n"
        "mark.write_text(str(os.getpid()))\n"
        "real = s.run_stage\n"
        "def slow(run, *a, **k):\n"
        "    if os.environ.get('SLEEPY_ONLY', '') in str(run.run_dir):\n"
        "        pathlib.Path(str(mark) + '.stage').write_text(str(os.getpid()))\n"
        "        time.sleep(float(os.environ['SLEEPY_S']))\n"
        "    return real(run, *a, **k)\n"
        "s.run_stage = slow",
    )
