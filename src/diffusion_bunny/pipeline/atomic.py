"""Atomic writes: a temporary file beside the target, flushed, then renamed over it, so a reader
never sees half a file and a killed process leaves the previous version."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # polars is imported where tables are read or written: the CLI never needs it
    import polars as pl


def _umask_mode() -> int:
    """The mode a plain ``open()`` would give a new file (mkstemp's 0600 would hide run outputs,
    the report and the dataset from other users of a shared workspace)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_parquet(path: Path, df: pl.DataFrame) -> Path:
    """Write ``df`` to ``path`` atomically (temporary parquet file beside it, then rename), so a
    reader never sees half a table and a crash leaves the old one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".parquet.tmp")
    os.close(fd)
    try:
        df.write_parquet(tmp)
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
