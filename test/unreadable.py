"""A movie its user may not read (``chmod 000``), also when the tests run as root, whom file
permissions do not stop: the file's mode is taken away and every ``Path.open`` of it in this
process raises the ``PermissionError`` a user gets (what the code reads a movie's first bytes
with: its id, its fingerprint, the probe's check before FFmpeg opens it)."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest


def make_unreadable(monkeypatch: pytest.MonkeyPatch, movie: Path) -> None:
    movie.chmod(0)
    target = movie.resolve()
    real = Path.open

    def refused(self: Path, *args, **kwargs):
        if self.resolve() == target:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", refused)
