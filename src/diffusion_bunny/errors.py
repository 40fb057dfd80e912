"""Errors a user can cause, kept apart from bugs.

The command line turns a :class:`UserError` into one line on standard error and exit status 2;
anything else is a bug and keeps its traceback. Errors raised inside a papermill-executed
notebook cross the kernel boundary only as a class name and a message, so the runner recognises
them by the names listed in :data:`USER_ERROR_NAMES`.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from pathlib import Path


class UserError(Exception):
    """Something the user can fix: a bad path, a bad input file, a bad config value."""

    def _render_traceback_(self) -> list[str]:
        """What IPython (JupyterLab, a notebook run by papermill) shows of it: its one line, not
        a traceback through the workspace's code (6-11 frames around one clear message)."""
        return [f"{type(self).__name__}: {self}"]


class ConfigError(UserError):
    """A config key is unknown or its value is not allowed."""


class BadInputError(UserError):
    """An input file is missing, empty, not a video, or cannot be decoded."""


class StageError(UserError):
    """A stage cannot run because something it needs (an earlier stage's table) is missing."""


class DamagedTableError(StageError):
    """A stage's table on disk does not read (truncated, overwritten): it is computed again by
    rerunning the stage that writes it."""


class ModelError(UserError):
    """A model a stage needs is not installed, cannot be loaded, or its device is unavailable."""


class ProviderError(UserError):
    """A caption provider cannot be used: its key is missing, its server is unreachable, or it
    refused every request."""


class StorageError(UserError):
    """A file could not be written: the disk or quota is full, no permission, a read-only disk."""


class EngineError(UserError):
    """The engine that runs many movies (a Ray cluster) cannot start or cannot be reached."""


class StageWarning(UserWarning):
    """A warning of a stage's run (a stale input, a character named nowhere): also kept in the
    stage's manifest, which ``bunny run`` and the notebooks print from (so it is said when the
    stage is up to date as well); the notebooks leave this copy of it out."""


USER_ERROR_NAMES = frozenset(
    cls.__name__
    for cls in (
        UserError,
        ConfigError,
        BadInputError,
        StageError,
        DamagedTableError,
        ModelError,
        ProviderError,
        EngineError,
        StorageError,
    )
)


#: The operating system's answers that are the user's to fix: a full disk or quota, a file-size
#: limit (``ulimit -f``), no permission, a read-only file system, a file where a folder of the
#: path should be (``DIFFUSION_BUNNY_CACHE`` or a setting's folder naming a file: it stopped
#: stage 05 "with a bug"), a name too long for the file system or a loop of links in the path
#: (``--out`` of 300 characters, or through two links to each other). Any other ``OSError`` is a
#: bug.
USER_OS_ERRNOS = frozenset(
    {
        errno.ENOSPC,
        errno.EDQUOT,
        errno.EFBIG,
        errno.EACCES,
        errno.EPERM,
        errno.EROFS,
        errno.ENOTDIR,
        errno.ENAMETOOLONG,
        errno.ELOOP,
    }
)

#: How those errors read in a message from inside a notebook kernel (only a class name and text
#: cross the kernel boundary), by the C library's ``strerror``.
_USER_OS_TEXTS = tuple(os.strerror(code) for code in sorted(USER_OS_ERRNOS))


#: What to do about a file that cannot be written under a run folder.
RUN_ADVICE = "free some space, or fix the permissions, or choose another --out (finished stages are kept)"


def storage_error(exc: BaseException, advice: str = RUN_ADVICE) -> StorageError | None:
    """The one-line user error for an ``OSError`` a user can fix (see :data:`USER_OS_ERRNOS`),
    or None for any other exception. Earlier results are intact: every write is atomic."""
    if not isinstance(exc, OSError) or exc.errno not in USER_OS_ERRNOS:
        return None
    # A copy or a rename names both files; the one written is the second (shutil sets both).
    where = exc.filename2 or exc.filename
    why = exc.strerror or ""
    if exc.errno == errno.ENOTDIR:
        why += " (a file stands where a folder of this path should be)"
    return _storage(str(where) if where else None, why, exc.errno in _FULL, advice)


#: A full disk or quota (what freeing space fixes), as opposed to permissions or a read-only disk.
_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})
#: A temporary name of an atomic write (``.<name>.tmp-<pid>-<hex>``, a staging or old folder).
_TEMPORARY = re.compile(r"\.(?P<name>[^/]+)\.(?:tmp|staging|old)-\d+-[0-9a-f]+(?=/|$)")


def final_name(path: str) -> str:
    """The path a user knows for a file written through a temporary name (an atomic write, a
    staging folder): ``<run>/.frames.staging-12-ab/x.jpg`` is ``<run>/frames/x.jpg``."""
    return _TEMPORARY.sub(lambda m: m["name"], path)


def _storage(where: str | None, why: str, full: bool, advice: str) -> StorageError:
    """``could not write <path>: <why> (<free> free there; <what may go>); <advice>``."""
    note = ""
    if where is not None and full:
        note = f" ({_room(Path(where))})"
    place = final_name(where) if where else "a file"
    return StorageError(f"could not write {place}: {why}{note}; {advice}")


def _room(path: Path) -> str:
    """How much is free on the disk holding ``path``, and the caches of its run folder (if it is
    in one) that may simply be deleted: what a user can free without losing work."""
    folder = path
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return "the disk is full"
    text = f"{_size(free)} free there"
    for parent in [folder, *folder.parents]:
        if (parent / "run.json").is_file():
            cache = parent / "cache"
            size = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file()) if cache.is_dir() else 0
            if size:
                text += f"; {cache} holds {_size(size)} of caches, rebuilt when needed"
            break
    return text


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def storage_error_from_text(ename: str, evalue: str) -> StorageError | None:
    """:func:`storage_error` for an error that crossed a kernel boundary as a name and a text."""
    named = ("OSError", "PermissionError", "IOError", "NotADirectoryError")
    if ename not in named or not any(t in evalue for t in _USER_OS_TEXTS):
        return None
    # "[Errno 28] No space left on device: '/run/tables/x.parquet'": the path first, as above.
    m = re.fullmatch(
        r"\[Errno (?P<code>\d+)\] (?P<why>[^:]+): '(?:[^']*' -> ')?(?P<path>.+)'", evalue.strip()
    )
    if m:
        return _storage(m["path"], m["why"], int(m["code"]) in _FULL, RUN_ADVICE)
    return StorageError(f"could not write: {evalue}; {RUN_ADVICE}")
