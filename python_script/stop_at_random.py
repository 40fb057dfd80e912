"""Stop ``bunny run`` at random moments and check what each stop leaves behind.

A run is stopped by a person (Ctrl-C: SIGINT), by ``kill``, ``timeout``, Slurm or a closed terminal
(SIGTERM, SIGHUP), or killed outright (SIGKILL: the out-of-memory killer, a cancelled job). Each
round starts ``bunny run MOVIE --force`` (every chosen stage computes), waits a random time, sends
one of ``--signals`` to the command and then checks:

* it ended within ``--grace`` seconds (never hung), with the exit status the signal should give
  (SIGINT 130, SIGTERM/SIGHUP 128 + the signal; a SIGKILL is the system's doing);
* it printed the one line a stopped run prints and no traceback;
* no process it started is still running a few seconds later (the stage kernel, stage 03's
  workers; an exited process not yet reaped does not count).

After the rounds one plain ``bunny run`` (no ``--force``) must finish what the stops left, exit 0
and leave every chosen stage up to date: what each killed writer left was swept or taken up. A
round whose run finished before its signal came says so and checks nothing. Where to look when a
round fails: the command's last lines (printed) and its log in the run folder (``logs/``).

    uv run python python_script/stop_at_random.py MOVIE [--out DIR] [--rounds 12] [--seed 0]
        [--signals TERM,INT,HUP,KILL] [--max-wait 40] [--characters DIR] [--stages ...]
        [--run-args "--engine ray"]

Found with it (2026-11-30): SIGTERM 1.2 s into a run, while the command imported its modules,
printed an import's traceback and exited 1; a kernel whose launch an interrupt cut short (after
its fork, before jupyter_client learnt its pid) ran on after the command had ended.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = "extract,quality,characters,scenes,captions,export"
#: What a stopped run prints last (cli._stopped), by signal; SIGKILL leaves no line.
LINES = {
    signal.SIGINT: "interrupted; finished stages are kept, rerun to continue",
    signal.SIGTERM: "SIGTERM; finished stages are kept, rerun to continue",
    signal.SIGHUP: "SIGHUP; finished stages are kept, rerun to continue",
}


def _stat(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def descendants(pid: int) -> dict[int, str]:
    """The processes under ``pid`` (pid: start time, from /proc), so a reused pid is told apart."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        fields = _stat(int(stat.parent.name))
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out: dict[int, str] = {}
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            fields = _stat(child)
            if fields is not None:
                out[child] = fields[19]
                todo.append(child)
    return out


def running(processes: dict[int, str]) -> list[str]:
    """The command lines of ``processes`` still running (not gone, not a zombie, not reused)."""
    out = []
    for pid, started in processes.items():
        fields = _stat(pid)
        if fields is None or fields[0] == "Z" or fields[19] != started:
            continue
        try:
            line = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")[:160].decode()
        except OSError:
            continue
        out.append(f"{pid}: {line}")
    return out


def _default_signals() -> None:
    for sig in (signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)


def one_round(command: list[str], sig: signal.Signals, wait: float, grace: float) -> tuple[bool, str]:
    """Start ``command``, send ``sig`` to it after ``wait`` seconds; (all well, what was seen)."""
    proc = subprocess.Popen(
        command,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        # Started under nohup, SIGHUP is ignored, and in the background of a script SIGINT is;
        # bunny rightly keeps an ignored signal ignored, so both are restored here.
        preexec_fn=_default_signals,
    )
    seen: dict[int, str] = {}
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
        seen.update(descendants(proc.pid))
    if proc.poll() is not None:
        return True, f"finished before the signal (exit {proc.returncode})"
    seen.update(descendants(proc.pid))
    proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=grace)
    except subprocess.TimeoutExpired:
        for pid in [proc.pid, *seen]:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        proc.communicate()
        return False, f"HUNG: not ended {grace:.0f} s after {sig.name}"
    problems = []
    lines = err.strip().splitlines()
    finished = re.findall(r": (\w+) done: ", err)
    where = f"after {finished[-1]}" if finished else "before any stage ended"
    if sig == signal.SIGKILL:
        if proc.returncode != -signal.SIGKILL:
            problems.append(f"exit {proc.returncode}")
    else:
        if proc.returncode != (130 if sig == signal.SIGINT else 128 + sig):
            problems.append(f"exit {proc.returncode}")
        if not lines or not lines[-1].startswith(LINES[sig]):
            problems.append(f"last line {lines[-1] if lines else ''!r}")
        if "Traceback" in err:
            problems.append("a traceback:\n" + err[-2500:])
    # a killed command's kernel ends itself once it sees its parent gone (ipykernel polls each second)
    settle = time.monotonic() + (10 if sig == signal.SIGKILL else 5)
    while running(seen) and time.monotonic() < settle:
        time.sleep(0.5)
    if running(seen):
        problems.append(f"left running: {running(seen)}")
    said = f"exit {proc.returncode}, {where}"
    return not problems, said + ("; " + "; ".join(problems) if problems else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("movie", type=Path)
    parser.add_argument("--out", type=Path, help="the run folder (default: a new temporary one)")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--signals", default="TERM,INT,HUP,KILL")
    parser.add_argument("--max-wait", type=float, default=40.0, help="the latest a signal comes, seconds")
    parser.add_argument("--grace", type=float, default=90.0, help="seconds a stopped run has to end")
    parser.add_argument("--characters", type=Path)
    parser.add_argument("--stages", default=STAGES)
    parser.add_argument("--run-args", default="", help='more for bunny run, e.g. "--engine ray"')
    args = parser.parse_args(argv)
    if not Path("/proc/self/stat").is_file():
        parser.error("reads processes from /proc: Linux only")
    out = args.out or Path(tempfile.mkdtemp(prefix="stop_at_random-")) / "run"
    command = [sys.executable, "-m", "diffusion_bunny.cli", "run", str(args.movie), "--out", str(out)]
    command += ["--stages", args.stages] + (["--characters", str(args.characters)] if args.characters else [])
    command += shlex.split(args.run_args)
    signals = [getattr(signal, f"SIG{name.strip().upper()}") for name in args.signals.split(",")]
    rng = random.Random(args.seed)
    failed = 0
    print(f"run folder: {out}", flush=True)
    for i in range(args.rounds):
        sig, wait = rng.choice(signals), rng.uniform(0.3, args.max_wait)
        ok, what = one_round([*command, "--force"], sig, wait, args.grace)
        failed += not ok
        print(f"round {i:2d}: {sig.name:7s} at {wait:5.1f} s: {'ok' if ok else 'FAILED'}: {what}", flush=True)
    final = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    last = final.stderr.strip().splitlines()[-1:] or [""]
    skipped = final.stderr.count("is up to date, skipped")
    print(f"the run after the stops: exit {final.returncode}; {last[0]}", flush=True)
    again = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    done = again.returncode == 0 and not re.search(r": \w+ done: ", again.stderr)
    said = "every stage up to date" if done else again.stderr[-800:]
    print(f"and once more: exit {again.returncode}, {said}")
    print(f"{failed} of {args.rounds} rounds failed (the run after them skipped {skipped} stage(s))")
    return 1 if failed or final.returncode or not done else 0


if __name__ == "__main__":
    sys.exit(main())
