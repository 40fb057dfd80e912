"""Tables a person made by hand: kept with a backup of their last good version.

No stage can rebuild a person's corrections (the review board's cluster moves in ``feedback``,
the captions typed in ``caption_edits``), so a damaged file must not stop the stages that read
it, and must not be fixed by deleting it. Such a table is written with :func:`write_kept`: the
table atomically, then the same bytes to ``tables/backup/<name>.parquet``. :func:`read_kept`
reads it; when the file does not read (a disk error, a sync tool, a hand edit), the backup is put
back with a warning (the damaged file is kept beside the backup to look at), and when there is
no readable backup either, one line names the file and how to recover.

The machinery knows no stage: a table is protected when a person's edit writes it (the one write
path, ``Run.commit(..., by_hand=True)``: the tables a stage declares in ``Stage.edits`` and the
stage tables the edit updates, such as ``clusters``) and stays protected from then on (its backup
exists, and every later write, the stage's included, keeps it up to date); the tables named in
``Stage.edits`` are hand-made from the start (:data:`HAND_MADE`).
"""

from __future__ import annotations

import contextlib
import shutil
import warnings
from datetime import datetime
from pathlib import Path

import polars as pl

from diffusion_bunny.errors import StageError
from diffusion_bunny.pipeline.atomic import atomic_path

BACKUP_DIR = "backup"
#: The names of the tables people write (every stage's ``Stage.edits``, added as each stage is
#: declared): such a table is read as a hand-made one even without a backup (a run made before
#: backups, a copy without ``tables/backup/``), so a damaged one is not sent to "run the stage
#: again with --force", which cannot rebuild it.
HAND_MADE: set[str] = set()


def backup_path(path: Path) -> Path:
    """``tables/backup/<name>.parquet`` for ``tables/<name>.parquet``."""
    path = Path(path)
    return path.parent / BACKUP_DIR / path.name


def write_kept(path: Path, df: pl.DataFrame) -> Path:
    """Write a hand-made table atomically, then its backup (the same bytes)."""
    with contextlib.ExitStack() as stack:
        stage_table(stack, path, df, kept=True)
    return path


def stage_table(stack: contextlib.ExitStack, path: Path, df: pl.DataFrame, *, kept: bool) -> None:
    """``df`` written to a temporary file beside ``path`` (and, ``kept``, the same bytes beside
    its backup), each renamed into place when ``stack`` closes: a commit of several tables
    closes it after the last, so none lands unless all were written. The stack closes in
    reverse, so a table is renamed before its backup: killed in between, the backup is the
    version before, still a good one."""
    backup = backup_path(path)
    if kept:
        backup.parent.mkdir(parents=True, exist_ok=True)
        backup_tmp = stack.enter_context(atomic_path(backup))
    tmp = stack.enter_context(atomic_path(path))
    df.write_parquet(tmp)
    if kept:
        shutil.copyfile(tmp, backup_tmp)


def _read(path: Path, columns: list[str] | None = None) -> pl.DataFrame:
    return pl.read_parquet(path, columns=columns, glob=False)


def read_kept(path: Path, columns: list[str] | None = None) -> pl.DataFrame:
    """Read a hand-made table; a damaged one is restored from its backup (with a warning), or is
    one :class:`StageError` naming the file and how to recover."""
    path = Path(path)
    try:
        return _read(path, columns)
    except (pl.exceptions.PolarsError, OSError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        why = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
    backup = backup_path(path)
    try:
        _read(backup)
    except (pl.exceptions.PolarsError, OSError):
        raise StageError(
            f"{path} is damaged ({why}) and has no readable backup ({backup}); it holds corrections made "
            "by hand, which no stage can rebuild: put back a copy of it if you have one, or move it "
            "aside to start the corrections over"
        ) from None
    damaged = backup.with_name(f"{path.stem}.damaged-{datetime.now():%Y%m%d-%H%M%S}{path.suffix}")
    # Copied aside, then replaced in one rename: moved aside first, a kill (or a full disk) before
    # the copy left no table, which reads as "no edits yet", and the next edit wrote a table of one
    # row and copied it over the backup: every earlier edit lost.
    try:
        shutil.copyfile(path, damaged)
        with atomic_path(path) as tmp:
            shutil.copyfile(backup, tmp)
    except OSError as exc:
        # A folder that cannot be written (read-only, full): the backup is read as it is, and the
        # restore waits for a command that may write (``bunny status`` ended on this, no status).
        with contextlib.suppress(OSError):
            if damaged.is_file() and damaged.stat().st_size != path.stat().st_size:
                damaged.unlink()  # a copy cut short: no copy of the damaged file at all
        warnings.warn(
            f"{path} is damaged ({why}); its backup {backup} is read instead, but could not be put "
            f"back ({exc.strerror or exc}): make the folder writable, and the next run restores it",
            stacklevel=2,
        )
        return _read(backup, columns)
    warnings.warn(
        f"{path} was damaged ({why}); restored from its backup {backup} (the last version written); "
        f"the damaged file is kept as {damaged}",
        stacklevel=2,
    )
    return _read(path, columns)
