"""The run lock: one run of a run folder at a time, on one machine or on several sharing a disk.

Why a run lock and not only a lock per stage: two ``bunny run`` on one folder each
held a different stage in turn, so one could swap ``frames/`` while the other captioned them
(and paid for frames that then vanished). The lock is taken before the first stage and kept
until the last, by ``bunny run`` (:func:`diffusion_bunny.pipeline.runner.run_movie`, so by every
engine's worker too) and by :func:`~diffusion_bunny.pipeline.contract.run_stage` when a stage
runs on its own (a notebook in JupyterLab, the Python API). A second one stops at once, naming
the holder: after a wait it would only find the stages done, or redo them for nothing.

Two records, because one is not enough on a shared disk:

* an OS file lock (``.locks/run.lock``, ``flock`` through filelock): the system releases it when
  its holder dies, however it dies, so a killed run never blocks the next one on this machine;
* a lease (``.locks/run.json``: host, pid, the process's start time, since when, a heartbeat
  renewed every ``lease_s / 4`` seconds by a thread of the holder, and a token). Some shared file
  systems keep file locks per machine, so a run on another node may get the OS lock while this
  one holds it: it then finds the lease, and a lease from another host counts as held while its
  heartbeat is younger than ``lease_s`` (``pipeline.lock_stale_s``). A lease from this host is
  judged by its pid (and the pid's start time, so a reused pid is not mistaken for the holder).
  A dead holder's lease is taken over with a log line.

The stage notebooks a run executes, and their kernels, run in child processes of the holder:
they inherit :data:`ENV` (``<run folder>|<token>``) and, finding the same token in the lease,
work under their parent's lock instead of asking for it. The lock is re-entrant within a process.

Inside a run folder each table has a lock of its own (:func:`table_lock`, an OS file lock under
``.locks/tables/``): the run lock keeps two runs apart, the table locks keep a run and a person
apart, since a person edits tables (a move on the review board, a typed caption) while a stage
computes. Every write of a table takes its lock (:meth:`~diffusion_bunny.pipeline.run.Run.commit`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from diffusion_bunny.errors import StageError
from diffusion_bunny.pipeline.atomic import atomic_write_bytes, process_alive, process_start

log = logging.getLogger(__name__)

#: ``<run folder>|<token>`` of the lease this process's parent holds (read by its kernels).
ENV = "DIFFUSION_BUNNY_RUN_LEASE"
#: Default seconds without a heartbeat after which another host's lease counts as abandoned.
DEFAULT_LEASE_S = 120.0
LOCK_FILE = "run.lock"
LEASE_FILE = "run.json"


@dataclass(frozen=True)
class Lease:
    """Who holds (or last held) a run folder."""

    host: str
    pid: int
    since: str
    heartbeat: float  # time.time() of the last renewal
    token: str
    started: str | None = None  # process_start(pid) on its host
    what: str = ""  # "bunny run", "stage scenes", ...
    #: The holder's own ``pipeline.lock_stale_s`` (it renews every quarter of it): a reader with a
    #: shorter one (a notebook's default) took a live holder's heartbeat for a dead one's and
    #: swept its staging folder away.
    lease_s: float | None = None

    @classmethod
    def read(cls, path: Path) -> Lease | None:
        """The lease in ``path``; None when there is none or it cannot be read (a lease cut short
        by a kill counts as no lease: the OS lock still guards this machine)."""
        try:
            data = json.loads(path.read_text())
            return cls(
                host=str(data["host"]),
                pid=int(data["pid"]),
                since=str(data["since"]),
                heartbeat=float(data["heartbeat"]),
                token=str(data["token"]),
                started=data.get("started"),
                what=str(data.get("what", "")),
                lease_s=float(data["lease_s"]) if data.get("lease_s") is not None else None,
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def alive(self, lease_s: float, now: float | None = None) -> bool:
        """Whether the holder is still there: on this host, its process (same pid, same start);
        on another, a heartbeat younger than ``lease_s``."""
        if self.host == socket.gethostname():
            if not process_alive(self.pid):
                return False
            current = process_start(self.pid)
            return self.started is None or current is None or current == self.started
        return ((now if now is not None else time.time()) - self.heartbeat) < self.lapse_s(lease_s)

    def lapse_s(self, lease_s: float) -> float:
        """Seconds without a heartbeat after which the lease of another host has lapsed: the
        reader's ``lease_s`` or the holder's own, the longer."""
        return max(lease_s, self.lease_s or 0.0)

    def describe(self, now: float | None = None) -> str:
        """``process 123 on host-a (bunny run, since ..., heartbeat 4 s ago)``."""
        age = max(0.0, (now if now is not None else time.time()) - self.heartbeat)
        what = f"{self.what}, " if self.what else ""
        return f"process {self.pid} on {self.host} ({what}since {self.since}, heartbeat {age:.0f} s ago)"


def lease_path(run_dir: Path) -> Path:
    return Path(run_dir) / ".locks" / LEASE_FILE


def current_holder(run_dir: Path, lease_s: float = DEFAULT_LEASE_S) -> Lease | None:
    """The live holder of a run folder, or None (for ``bunny status``; takes no lock)."""
    lease = Lease.read(lease_path(run_dir))
    return lease if lease is not None and lease.alive(lease_s) else None


class RunBusy(StageError):
    """Another process holds the run folder (exit status 2: wait for it, or stop it)."""


class _Held:
    """A lock this process holds: the OS lock, the lease and the thread that renews it."""

    def __init__(self, run_dir: Path, lock: Any, lease: Lease, lease_s: float):
        self.run_dir = run_dir
        self.lock = lock
        self.lease = lease
        self.count = 1
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._renew, args=(max(1.0, lease_s / 4),), name="run-lease", daemon=True
        )
        self._thread.start()

    def _renew(self, every: float) -> None:
        path = lease_path(self.run_dir)
        while not self._stop.wait(every):
            current = Lease.read(path)
            if current is not None and current.token != self.lease.token:
                log.warning("the run lease of %s was taken by %s", self.run_dir, current.describe())
                return
            with contextlib.suppress(OSError):  # a full disk: the next renewal tries again
                _write_lease(path, self.lease, heartbeat=time.time())

    def release(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        path = lease_path(self.run_dir)
        current = Lease.read(path)
        if current is not None and current.token == self.lease.token:
            with contextlib.suppress(OSError):
                path.unlink()
        self.lock.release()


_held: dict[Path, _Held] = {}
_held_guard = threading.Lock()


def _write_lease(path: Path, lease: Lease, heartbeat: float | None = None) -> None:
    data = {
        "host": lease.host,
        "pid": lease.pid,
        "since": lease.since,
        "heartbeat": heartbeat if heartbeat is not None else lease.heartbeat,
        "heartbeat_at": datetime.fromtimestamp(heartbeat or lease.heartbeat, UTC).isoformat(),
        "token": lease.token,
        "started": lease.started,
        "what": lease.what,
        "lease_s": lease.lease_s,
    }
    atomic_write_bytes(path, json.dumps(data, indent=1).encode())


def may_sweep(run_dir: Path) -> bool:
    """Whether leftovers of dead writers may be removed from ``run_dir`` now: no other process
    holds it (a holder on another machine has live pids this one cannot see), or we do."""
    run_dir = Path(run_dir).resolve()
    if run_dir in _held or inherited(run_dir):
        return True
    return current_holder(run_dir) is None


def inherited(run_dir: Path) -> bool:
    """Whether this process works under its parent's lease of ``run_dir`` (a stage notebook's
    kernel started by ``bunny run``): :data:`ENV` names the folder and the lease's token."""
    value = os.environ.get(ENV, "")
    folder, _, token = value.rpartition("|")
    if not token or Path(folder) != Path(run_dir):
        return False
    lease = Lease.read(lease_path(run_dir))
    return lease is not None and lease.token == token


def _busy(
    run_dir: Path, holder: Lease | None, lease_s: float, noun: str = "run folder", shown: Any = None
) -> RunBusy:
    by = holder.describe() if holder is not None else "another process (it left no lease to name it)"
    remote = ""
    if holder is not None and holder.host != socket.gethostname():
        remote = (
            f"; if that process is gone, its lease lapses {holder.lapse_s(lease_s):.0f} s after its "
            "last heartbeat (pipeline.lock_stale_s) and the next run takes over"
        )
    return RunBusy(
        f"{shown or run_dir} is in use by {by}; one run per {noun} at a time: wait for it to finish or stop "
        f"it, or give this run another --out{remote}"
    )


@contextlib.contextmanager
def run_lock(
    run_dir: str | Path,
    *,
    what: str = "",
    lease_s: float = DEFAULT_LEASE_S,
    noun: str = "run folder",
    shown: str | Path | None = None,
) -> Iterator[Lease | None]:
    """Hold the run folder ``run_dir`` for the block (see the module docstring); yields the lease
    (None when working under a parent's). Raises :class:`RunBusy` at once when another process
    holds it. ``what`` says who holds it (``bunny run``, ``stage scenes``) in the other's message;
    ``noun`` and ``shown`` name what is held there, when it is not a run folder (a folder run holds
    its ``--out`` through a folder inside it)."""
    from filelock import FileLock, Timeout  # lazy: keeps filelock out of `bunny --help` (0.04 s)

    run_dir = Path(run_dir).resolve()
    with _held_guard:
        mine = _held.get(run_dir)
        if mine is not None:
            mine.count += 1
    if mine is not None:  # re-entrant in this process
        try:
            yield mine.lease
        finally:
            with _held_guard:
                mine.count -= 1
        return
    if inherited(run_dir):
        yield None
        return
    folder = run_dir / ".locks"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LEASE_FILE
    lock = FileLock(str(folder / LOCK_FILE), timeout=0, thread_local=False)
    try:
        lock.acquire()
    except Timeout:
        raise _busy(run_dir, Lease.read(path), lease_s, noun, shown) from None
    try:
        previous = Lease.read(path)
        if previous is not None and previous.alive(lease_s):
            # The OS lock was free yet the lease lives: a holder on another machine whose file
            # system does not share locks between hosts.
            raise _busy(run_dir, previous, lease_s, noun, shown)
        if previous is not None:
            log.info("%s: took over the run lock of %s, which is gone", run_dir, previous.describe())
        now = time.time()
        lease = Lease(
            host=socket.gethostname(),
            pid=os.getpid(),
            since=datetime.now(UTC).isoformat(timespec="seconds"),
            heartbeat=now,
            token=uuid.uuid4().hex,
            started=process_start(os.getpid()),
            what=what,
            lease_s=lease_s,
        )
        _write_lease(path, lease)
    except BaseException:
        lock.release()
        raise
    held = _Held(run_dir, lock, lease, lease_s)
    with _held_guard:
        _held[run_dir] = held
    try:
        yield lease
    finally:
        with _held_guard:
            _held.pop(run_dir, None)
        held.release()


@contextlib.contextmanager
def exported(run_dir: str | Path, lease: Lease | None) -> Iterator[None]:
    """Put this process's lease of ``run_dir`` in the environment for the block, so the
    kernels and subprocesses started meanwhile work under it (:func:`inherited`)."""
    if lease is None:
        yield
        return
    before = os.environ.get(ENV)
    os.environ[ENV] = f"{Path(run_dir).resolve()}|{lease.token}"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = before


#: Seconds a writer waits for a table's lock before saying who to wait for (a stage writes its
#: tables in seconds; a person's edit in milliseconds).
TABLE_LOCK_TIMEOUT_S = 120.0

_tables_held = threading.local()  # per thread: lock file -> depth, so a holder may take it again


@contextlib.contextmanager
def table_lock(path: str | Path, name: str, timeout: float = TABLE_LOCK_TIMEOUT_S) -> Iterator[None]:
    """Hold the lock of table ``name`` (the OS file lock ``path``) for the block.

    Another process, or another thread of this one, waits for it (up to ``timeout`` seconds, then
    one clear :class:`StageError` instead of filelock's traceback); the thread that holds it may
    take it again (a commit's ``merge`` reading through a helper that locks). The system releases
    it when its holder dies, so a killed writer never blocks the next one."""
    from filelock import FileLock, Timeout  # lazy: keeps filelock out of `bunny --help` (0.04 s)

    path = Path(path).resolve()  # one lock per file, however its folder was spelled
    held: dict[Path, int] = _tables_held.__dict__.setdefault("depth", {})
    if path in held:
        held[path] += 1
        try:
            yield
        finally:
            held[path] -= 1
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path), timeout=timeout)
    try:
        lock.acquire()
    except Timeout:
        raise StageError(
            f"another process has held the {name} lock ({path}) for {timeout:.0f} s (a notebook saving "
            "a correction, or a stage run writing its tables); let it finish or stop it, then try again (the "
            "system releases the lock when that process ends)"
        ) from None
    held[path] = 1
    try:
        yield
    finally:
        del held[path]
        lock.release()
