"""Atomic writes: a file or a whole folder is written beside its target under a temporary name,
flushed, then renamed over it, so a reader never sees half of it and a killed process leaves the
previous version.

Files (:func:`atomic_write_bytes`, :func:`atomic_write_parquet`) go through a temporary file in
the same folder. Folders a stage owns (``frames/``, ``thumbs/``, ``dataset/``) go through
:func:`staged_folder`: the new content is written into a staging folder beside the target and
swapped in only when it is complete. A process killed during the swap leaves an ``.old`` folder
that :func:`recover_folder` puts back; leftovers of processes that are gone are removed, those of a
process still running are left alone (two processes may work on one run folder).

Every temporary name carries the writer's process id (``.<name>.tmp-<pid>-<hex>``,
``.<name>.staging-<pid>-<hex>``, ``.<name>.old-<pid>-<hex>``), so :func:`sweep_leftovers` can tell
the leftovers of a killed writer (its pid is gone: removed, or an ``.old`` folder put back) from
the work in progress of a live one (left alone). The run folder is swept each time it is opened
for a run (:meth:`~diffusion_bunny.pipeline.run.Run.create`). For writers that only take a file
name (safetensors, diffusers), :func:`atomic_path` hands out such a temporary name.

A full disk is the user's to fix, so it must reach the user as an ``OSError`` naming the file
(one line, exit status 2), whichever library was writing: polars, safetensors and torch report
it in exceptions of their own, which :func:`hidden_disk_error` turns back into the ``OSError``
(:func:`atomic_path` does so for every writer it serves). :func:`check_free_space` refuses, in
one line, work whose estimated output will not fit, before it starts.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from diffusion_bunny.errors import StorageError

if TYPE_CHECKING:  # annotations only: a frame writes itself (DataFrame.write_parquet)
    import polars as pl


def _umask_mode() -> int:
    """The mode a plain ``open()`` would give a new file (mkstemp's 0600 would hide run outputs,
    the report and the dataset from other users of a shared workspace)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _fsync(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (the new name is in the directory on disk, not only in
    the page cache), so a power cut after the rename cannot bring back the old file."""
    with contextlib.suppress(OSError):  # a file system that cannot fsync a directory
        _fsync(folder)


def temp_path(final: Path) -> Path:
    """A temporary name beside ``final`` that carries this process's id (see the module docstring)."""
    return _leftover_name(Path(final), "tmp")


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """A temporary path beside ``final`` for a writer that only takes a file name: when the block
    ends normally the file is flushed to disk and renamed over ``final``; when it raises, or the
    process is killed, ``final`` keeps its old content (a killed writer's file is swept later)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(final)
    try:
        yield tmp
        _fsync(tmp)
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, final)
    except BaseException as exc:
        # Judged before the partial file goes: a full disk looks full only while it is there.
        hidden = None if isinstance(exc, OSError) else hidden_disk_error(exc, final)
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.filename is None:
            # A write on a full disk fails without a file name (``write()``, ``fsync()``); the
            # one-line error must name the file.
            exc.filename = str(final)
        if hidden is not None:
            raise hidden from exc
        raise
    _fsync_dir(final.parent)


#: The C library's texts of the errors a full disk or quota gives, as libraries quote them.
_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
#: Below this many free bytes a file system counts as full when a writer failed without saying why.
FULL_BELOW = 1 << 20


def _existing(path: Path) -> Path:
    """``path`` or its nearest existing parent (what ``statvfs`` can be asked about)."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: Path) -> int | None:
    """Free bytes (for this user) on the file system holding ``path``; None when it cannot be read."""
    try:
        return shutil.disk_usage(_existing(path)).free
    except OSError:
        return None


def hidden_disk_error(exc: BaseException, path: Path) -> OSError | None:
    """The ``OSError`` a full disk gave a library that reports it in its own exception: polars
    (``ComputeError: ... No space left on device (os error 28)``), safetensors
    (``SafetensorError: ... I/O error: No space left on device``), torch's ``torch.save``
    (``RuntimeError: [enforce fail at inline_container.cc] unexpected pos``, which names no cause
    at all: then a file system with less than :data:`FULL_BELOW` free counts as full). None for
    any other failure, which stays what it is (a bug)."""
    if isinstance(exc, OSError):
        if exc.filename is None:
            exc.filename = str(path)
        return exc
    text = str(exc)
    for code in _FULL_ERRNOS:
        if os.strerror(code) in text or f"os error {code})" in text:
            return OSError(code, os.strerror(code), str(path))
    free = free_bytes(Path(path).parent)
    if free is not None and free < FULL_BELOW:
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return None


@contextlib.contextmanager
def disk_errors(path: Path) -> Iterator[None]:
    """Raise a full disk under a writer library as the ``OSError`` naming ``path``
    (:func:`hidden_disk_error`); any other failure goes through unchanged."""
    try:
        yield
    except Exception as exc:
        hidden = hidden_disk_error(exc, path)
        if hidden is None or hidden is exc:
            raise
        raise hidden from exc


def check_free_space(needs: Iterable[tuple[Path, int, str]], advice: str) -> None:
    """Refuse, before any of it is written, work whose output will not fit: ``needs`` holds
    ``(folder, bytes, what)``; the folders on one file system are added up and compared with its
    free space. One :class:`~diffusion_bunny.errors.StorageError` names the file system's folder,
    what needs the space and how much is free; ``advice`` says what to do."""
    by_device: dict[int, list[tuple[Path, int, str]]] = {}
    for folder, size, what in needs:
        if size <= 0:
            continue
        try:
            device = os.stat(_existing(folder)).st_dev
        except OSError:
            continue
        by_device.setdefault(device, []).append((Path(folder), size, what))
    for items in by_device.values():
        total = sum(size for _, size, _ in items)
        free = free_bytes(items[0][0])
        if free is None or total <= free:
            continue
        parts = ", ".join(f"{what} {human_bytes(size)}" for _, size, what in items)
        raise StorageError(
            f"not enough disk space in {items[0][0]}: about {human_bytes(total)} needed ({parts}) but "
            f"{human_bytes(free)} free; {advice}"
        )


def human_bytes(n: float) -> str:
    """``1.5 GB``, ``320 MB``, ``12 kB`` (powers of 1000, as ``df -H`` and file managers say)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover


def atomic_write_parquet(path: Path, df: pl.DataFrame) -> Path:
    """Write ``df`` to ``path`` atomically (temporary parquet file beside it, flushed to disk, then
    renamed), so a reader never sees half a table and a crash leaves the old one."""
    with atomic_path(path) as tmp:
        df.write_parquet(tmp)
    return path


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, flushed to disk, then rename over ``path``."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(data)


def _leftover_name(final: Path, kind: str) -> Path:
    return final.parent / f".{final.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


#: Any leftover name: ``.<name>.<kind>-<pid>-<hex>``.
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|staging|old)-(?P<pid>\d+)-[0-9a-f]+$")


def sweep_leftovers(folder: Path) -> list[Path]:
    """Remove what killed writers left in ``folder`` and below (temporary files, staging folders)
    and put back an ``.old`` folder whose swap was cut short (:func:`recover_folder`). Names of a
    process that still runs are left alone. Returns what was removed or put back."""
    folder = Path(folder)
    done: list[Path] = []
    if not folder.is_dir():
        return done
    for parent, dirs, files in os.walk(folder):
        here = Path(parent)
        for name in [*dirs, *files]:
            m = _LEFTOVER.match(name)
            if m is None or writer_alive(int(m.group("pid")), here / name):
                continue
            path = here / name
            if m.group("kind") == "old":
                recover_folder(here / m.group("name"))
            elif path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            done.append(path)
        dirs[:] = [d for d in dirs if not _LEFTOVER.match(d)]  # never walk into a leftover
    return done


def _leftovers(final: Path, kind: str) -> list[tuple[Path, int]]:
    pattern = re.compile(rf"^\.{re.escape(final.name)}\.{kind}-(\d+)-[0-9a-f]+$")
    found = []
    if final.parent.is_dir():
        for path in final.parent.iterdir():
            m = pattern.match(path.name)
            if m:
                found.append((path, int(m.group(1))))
    return found


#: Seconds of slack between a leftover's change time and the start of the process now holding its
#: pid: the boot time a start is counted from is read to the second.
_START_SLACK_S = 2.0


def process_start(pid: int) -> str | None:
    """When process ``pid`` started, in clock ticks since boot (``/proc/<pid>/stat``, field 22),
    or None where that cannot be read: with the pid it names one process, not one of its
    successors under a reused pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces: split after its end.
    fields = stat[stat.rfind(")") + 2 :].split()
    return fields[19] if len(fields) > 19 else None


def process_started_at(pid: int) -> float | None:
    """When process ``pid`` started, as a ``time.time()`` value (the boot time in ``/proc/stat``
    plus :func:`process_start`), or None where that cannot be read (not Linux, no process)."""
    ticks = process_start(pid)
    try:
        lines = Path("/proc/stat").read_text().splitlines()
        boot = next(float(line.split()[1]) for line in lines if line.startswith("btime "))
        return boot + float(ticks) / os.sysconf("SC_CLK_TCK") if ticks is not None else None
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def writer_alive(pid: int, path: Path | str) -> bool:
    """Whether the process that wrote ``path`` (its name carries ``pid``) may still be running.

    Why not :func:`process_alive` alone: pids are reused, and in a container nearly always (a
    ``bunny run`` started as the container's command is pid 1 in every container). A leftover of a
    killed writer whose pid now names another process, or this one, was never cleaned up, and a
    folder whose swap was cut short was never put back. A process that started after the leftover
    last changed cannot have written it."""
    if not process_alive(pid):
        return False
    started = process_started_at(pid)
    try:
        changed = os.lstat(path).st_ctime
    except OSError:
        return True  # gone already: nothing to judge, nothing to remove
    return started is None or started <= changed + _START_SLACK_S


def process_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (ours counts as alive)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - another user's process
        return True
    return True


def swap_in(staging: Path, final: Path) -> None:
    """Replace ``final`` by ``staging``: the old folder is renamed aside first, so at every moment
    either the old or the new one is complete on disk."""
    old = _leftover_name(final, "old")
    if final.exists():
        os.replace(final, old)
    os.replace(staging, final)
    shutil.rmtree(old, ignore_errors=True)


def recover_folder(final: Path) -> None:
    """Undo what a killed process left around ``final``: a swap cut short (the folder gone, its old
    copy beside it) gets the old copy back; staging and old folders of processes that are gone are
    removed. A process that still runs keeps its own."""
    final = Path(final)
    olds = [(p, pid) for p, pid in _leftovers(final, "old") if not writer_alive(pid, p)]
    if olds and not final.exists():
        try:
            newest = max(olds, key=lambda o: o[0].stat().st_mtime)[0]
            os.replace(newest, final)
        except FileNotFoundError:  # another process opening the run put it back first
            return
        olds = [o for o in olds if o[0] != newest]
    for path, _ in olds + [(p, pid) for p, pid in _leftovers(final, "staging") if not writer_alive(pid, p)]:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def staged_folder(final: Path) -> Iterator[Path]:
    """A fresh staging folder beside ``final`` to write the new content into; swapped in as
    ``final`` when the block ends normally, removed (``final`` untouched) when it raises."""
    final = Path(final)
    recover_folder(final)
    staging = _leftover_name(final, "staging")
    staging.mkdir(parents=True)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    swap_in(staging, final)
