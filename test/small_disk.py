"""A small file system for the tests of a full disk: a tmpfs mounted by the test where it runs as
root (a real kernel answering ENOSPC to every writer, whichever library writes), else nothing
(:func:`small_disk` yields None and the test injects the error each writer gets on a full disk,
:func:`inject_full_disk`).

:meth:`SmallDisk.fill` leaves a chosen number of bytes free (a ballast file takes the rest), so a
test can let the earlier writes of a stage through and fail the one it means; :meth:`SmallDisk.empty`
takes the ballast away again, as a user freeing space before the rerun.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest


class SmallDisk:
    """A mounted tmpfs of ``size`` bytes at ``root``."""

    def __init__(self, root: Path, size: int):
        self.root, self.size = root, size
        self.ballast = root / ".ballast"

    def free(self) -> int:
        return shutil.disk_usage(self.root).free

    def fill(self, leave: int = 0) -> None:
        """Take all but ``leave`` free bytes (a page's worth more or less: tmpfs counts pages)."""
        self.empty()
        take = max(0, self.free() - leave)
        with open(self.ballast, "wb") as fh:
            chunk = b"\0" * (1 << 20)
            while take > 0:
                fh.write(chunk[: min(take, len(chunk))])
                take -= len(chunk)

    def empty(self) -> None:
        self.ballast.unlink(missing_ok=True)


def can_mount() -> bool:
    """Root with ``mount`` at hand (``DIFFUSION_BUNNY_TEST_NO_MOUNT=1`` tries the injected errors
    instead, as a test run without root gets them)."""
    if os.environ.get("DIFFUSION_BUNNY_TEST_NO_MOUNT"):
        return False
    return os.geteuid() == 0 and shutil.which("mount") is not None


@contextlib.contextmanager
def small_disk(parent: Path, size: int) -> Iterator[SmallDisk | None]:
    """A tmpfs of ``size`` bytes under ``parent`` for the block, or None where this process may not
    mount one (not root, a container without the capability)."""
    root = parent / f"small-disk-{uuid.uuid4().hex[:6]}"
    root.mkdir(parents=True)
    if not can_mount():
        yield None
        return
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(root)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        yield None
        return
    try:
        yield SmallDisk(root, size)
    finally:
        subprocess.run(["umount", "-l", str(root)], capture_output=True)


def inject_full_disk(monkeypatch: pytest.MonkeyPatch, where: Path) -> None:
    """Every writer this code uses fails under ``where`` as it fails on a full disk (measured on a
    tmpfs): Python's writes (``open``, ``Path.write_bytes``, Pillow) with ``OSError(ENOSPC)`` that
    names no file, polars with a ``ComputeError`` quoting the OS, safetensors with a
    ``SafetensorError`` quoting it, ``torch.save`` with a bare ``RuntimeError`` on a disk with
    nothing free. Opening, renaming and removing still work, as on a full disk."""
    import builtins
    import errno
    import io

    import polars as pl
    import safetensors.torch
    import torch

    from diffusion_bunny.pipeline import atomic

    where = str(where)
    full = os.strerror(errno.ENOSPC)

    def under(path) -> bool:
        return str(path).startswith(where)

    real_open = builtins.open

    class FullFile:
        def __init__(self, fh):
            self._fh = fh

        def write(self, data):
            raise OSError(errno.ENOSPC, full)

        def __getattr__(self, name):
            return getattr(self._fh, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._fh.close()

    def fake_open(file, mode="r", *args, **kwargs):
        fh = real_open(file, mode, *args, **kwargs)
        return FullFile(fh) if any(c in mode for c in "wax") and under(file) else fh

    real_parquet = pl.DataFrame.write_parquet

    def parquet(self, file, *args, **kwargs):
        if under(file):
            raise pl.exceptions.ComputeError(
                f"parquet: File out of specification: underlying IO error: {full} (os error 28)"
            )
        return real_parquet(self, file, *args, **kwargs)

    real_save_file = safetensors.torch.save_file

    def save_file(tensors, filename, *args, **kwargs):
        if under(filename):
            raise safetensors.SafetensorError(f"Error while serializing: I/O error: {full} (os error 28)")
        return real_save_file(tensors, filename, *args, **kwargs)

    real_torch_save = torch.save

    def torch_save(obj, f, *args, **kwargs):
        if under(f):
            raise RuntimeError("[enforce fail at inline_container.cc:671] . unexpected pos 576 vs 534")
        return real_torch_save(obj, f, *args, **kwargs)

    real_free = atomic.free_bytes
    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(io, "open", fake_open)
    monkeypatch.setattr(pl.DataFrame, "write_parquet", parquet)
    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    monkeypatch.setattr(torch, "save", torch_save)
    monkeypatch.setattr(atomic, "free_bytes", lambda path: 0 if under(path) else real_free(path))
