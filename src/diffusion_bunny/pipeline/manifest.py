"""Manifests that cannot lie: what a stage read, with which settings and code, and what it wrote.

A stage's manifest (``<run>/manifests/<stage>.json``) records

* ``code_hash``: a hash of the code that computes the stage's tables (:func:`code_hash`: its
  ``stage`` module and what that imports, in ``models/`` and ``media/`` too, but not its plots,
  widgets or the generic machinery), so "its code changed" is a fact about the source, not a
  version number someone had to remember to bump;
* ``config_hash`` and ``config``: the settings the stage declared (whole sections or single
  keys), and nothing else;
* ``inputs``: fingerprints of the tables it declared (only the columns it depends on) and of
  anything else it reads (the movie, reference photos, LoRA files);
* ``outputs``: fingerprints of every table it wrote and of the folders and files it owns
  (``frames/``, ``dataset/``, the LoRA files...), so a deleted or changed output is noticed.

:func:`~diffusion_bunny.pipeline.contract.manifest_state` compares a manifest with the present:
``missing`` when the stage never ran or an output is gone, ``stale`` (with the reason) when its
code, settings, inputs or outputs changed, ``done`` otherwise. The manifest is removed before a
stage computes and written after its outputs, so a stage killed halfway is never ``done``.

Fingerprints are cheap enough for ``bunny status`` on a folder of runs: tables are hashed whole
(they are small), folders by the names and sizes of their files (a deleted, added or rewritten
file of another size changes it; reading thousands of JPEGs would not be cheap), big files by size
and their first and last megabyte.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import platform
from collections.abc import Sequence
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Literal

import polars as pl

from diffusion_bunny import codegraph
from diffusion_bunny.paths import is_clutter

StageState = Literal["done", "stale", "missing"]

#: Files over this size are fingerprinted by size and their ends, not hashed whole.
_WHOLE_HASH_MAX = 64 << 20


def _digest(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()[:16]


def package_version() -> str:
    """Installed version of diffusion-bunny (recorded in every manifest)."""
    try:
        return version("diffusion-bunny")
    except PackageNotFoundError:  # pragma: no cover - running from a bare source tree
        return "0+unknown"


def code_hash(package: str, choices: tuple[tuple[frozenset[str], str], ...] = ()) -> str:
    """The hash of the code that computes a stage's tables: its package's ``stage`` module (where
    a stage's ``compute`` lives, by convention; the package itself when it has none, as the
    tests' one-file toy stage) and every module of the package that it imports, transitively
    (:func:`diffusion_bunny.codegraph.code_hash`). A figure, a widget or a comment edited makes no
    stage stale; a change to the face detector stage 03 runs makes it stale. ``choices``: the
    detectors the stage's settings choose (only the chosen one of each counts)."""
    root = f"{package}.stage"
    try:
        found = importlib.util.find_spec(root) is not None
    except ModuleNotFoundError:  # ``package`` is a plain module, not a package
        found = False
    return codegraph.code_hash(root if found else package, choices=choices)


def file_fingerprint(path: str | Path) -> dict[str, Any]:
    """Size and hashes of the first and last megabyte: content-based (a moved or touched movie is
    not re-extracted) yet instant on a 50 GB file."""
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = hashlib.sha256(str(size).encode() + fh.read(1 << 20)).hexdigest()[:16]
        fh.seek(max(0, size - (1 << 20)))
        tail = hashlib.sha256(fh.read()).hexdigest()[:16]
    return {"size": size, "head": head, "tail": tail}


def path_fingerprint(path: Path) -> dict[str, Any] | None:
    """A folder: count, total size and a hash of its files' relative names and sizes; a file: its
    size and content hash (ends only for big files); None when it does not exist."""
    if path.is_dir():
        entries = sorted(
            (p.relative_to(path).as_posix(), p.stat().st_size)
            for p in path.rglob("*")
            if p.is_file() and not any(is_clutter(part) for part in p.relative_to(path).parts)
        )
        # surrogateescape: a name that is not UTF-8 (Linux takes any bytes) is hashed as its bytes
        blob = "\n".join(f"{name}\t{size}" for name, size in entries).encode("utf-8", "surrogateescape")
        return {"files": len(entries), "bytes": sum(s for _, s in entries), "sha256": _digest(blob)}
    if path.is_file():
        size = path.stat().st_size
        if size > _WHOLE_HASH_MAX:
            return file_fingerprint(path)
        return {"size": size, "sha256": _digest(path.read_bytes())}
    return None


def table_fingerprint(path: Path, columns: Sequence[str] | None = None) -> dict[str, Any]:
    """Hash of a table file; with ``columns``, of those columns' values only (stage 03 depends on
    which frames stage 02 kept, not on every score)."""
    if columns is None:
        return {"sha256": _digest(path.read_bytes())}
    # JSON lines, not CSV: a declared column may hold lists (face encodings), which CSV cannot.
    df = pl.read_parquet(path, columns=list(columns), glob=False)
    return {"columns": list(columns), "sha256": _digest(df.write_ndjson().encode())}


def plain(value: Any) -> Any:
    """The JSON form a value takes in a manifest file (so fresh and stored values compare)."""
    return json.loads(json.dumps(value, default=str))


def build_manifest(
    stage: str,
    *,
    code: str,
    config_hash: str,
    config: dict[str, Any],
    inputs: dict[str, Any],
    outputs: dict[str, Any],
    counts: dict[str, Any],
    seed: int,
    started: datetime,
    warnings: list[str],
    facts: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The manifest a stage writes after its outputs."""
    finished = datetime.now(UTC)
    return {
        "stage": stage,
        "code_hash": code,
        "config_hash": config_hash,
        "config": config,
        "inputs": inputs,
        "outputs": outputs,
        "counts": counts,
        "seed": seed,
        "warnings": warnings,
        "facts": facts or {},
        "started": started.isoformat(),
        "finished": finished.isoformat(),
        "duration_s": round((finished - started).total_seconds(), 3),
        "versions": library_versions(),
    }


def _version(dist: str) -> str:
    try:
        return version(dist)
    except PackageNotFoundError:  # pragma: no cover - every listed package is a dependency
        return "missing"


def library_versions() -> dict[str, str]:
    """The versions a manifest records: the package, Python and the main libraries (a library
    upgrade is no code of the package, yet it can change what a stage computes)."""
    return {
        "diffusion_bunny": package_version(),
        "python": platform.python_version(),
        **{
            dist: _version(dist)
            for dist in ("polars", "numpy", "av", "scenedetect-headless", "opencv-python-headless")
        },
    }
