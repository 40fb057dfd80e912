"""The run folder: where a movie's tables, frames, manifests and executed notebooks live.

A stage's manifest records what produced its tables (config hash of the stage's own settings,
fingerprints of its inputs, code version, counts). A stage whose manifest still matches is
skipped; every write is atomic (temporary file, then rename), so a killed run never leaves a
half-written table or manifest behind.
"""

from __future__ import annotations

import hashlib
import json
import platform
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from diffusion_bunny.errors import StageError
from diffusion_bunny.pipeline.atomic import atomic_write_bytes, atomic_write_parquet

if TYPE_CHECKING:  # polars is imported where tables are read or written: the CLI never needs it
    import polars as pl

StageState = Literal["done", "stale", "missing"]


def package_version() -> str:
    """Installed version of diffusion-bunny (recorded in every manifest)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("diffusion-bunny")
    except PackageNotFoundError:  # pragma: no cover - running from a bare source tree
        return "0+unknown"


def slugify(text: str) -> str:
    """Lower-case ASCII slug for folder names (``"Mon Film (2019)"`` -> ``"mon-film-2019"``)."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")
    return slug or "movie"


def _head_hash(path: Path, size: int) -> str:
    h = hashlib.sha256(str(size).encode())
    with path.open("rb") as fh:
        h.update(fh.read(1 << 20))
    return h.hexdigest()


def movie_key(path: str | Path) -> str:
    """Short hash of the file's size and first megabyte: stable across renames and moves, and
    cheap even for a 50 GB file."""
    path = Path(path)
    return _head_hash(path, path.stat().st_size)[:8]


def movie_id(path: str | Path) -> str:
    """``<slug of the file stem>-<movie_key>``: readable, and two different movies called
    ``episode1.mkv`` in different folders never share a run folder."""
    path = Path(path)
    return f"{slugify(path.stem)}-{movie_key(path)}"


def file_fingerprint(path: str | Path) -> dict[str, Any]:
    """Size and hashes of the first and last megabyte of an input file: content-based (a moved
    or touched movie is not re-extracted) yet instant on a 50 GB file."""
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as fh:
        fh.seek(max(0, size - (1 << 20)))
        tail = hashlib.sha256(fh.read()).hexdigest()[:16]
    return {"size": size, "head": _head_hash(path, size)[:16], "tail": tail}


@dataclass(frozen=True)
class Run:
    """One movie's run folder. ``movie`` is recorded in ``run.json`` on the first run, so later
    stages and notebooks only need the folder."""

    run_dir: Path

    @classmethod
    def create(cls, run_dir: str | Path, movie: str | Path) -> Run:
        """Open (and create if needed) the run folder of ``movie``."""
        run = cls(Path(run_dir).resolve())
        run.run_dir.mkdir(parents=True, exist_ok=True)
        meta = {
            "movie": str(Path(movie).resolve()),
            "movie_id": movie_id(movie),
            "movie_key": movie_key(movie),
        }
        if run.meta() != meta:
            atomic_write_bytes(run.run_dir / "run.json", json.dumps(meta, indent=2).encode())
        return run

    @classmethod
    def open(cls, run_dir: str | Path) -> Run:
        """Open an existing run folder (raises a clear error if it was never created)."""
        run = cls(Path(run_dir).resolve())
        if not (run.run_dir / "run.json").is_file():
            raise StageError(
                f"{run.run_dir} is not a run folder (no run.json); run stage 01 on a movie first"
            )
        return run

    def meta(self) -> dict[str, Any] | None:
        """Contents of ``run.json``, or None before the first run."""
        path = self.run_dir / "run.json"
        if not path.is_file():
            return None
        return json.loads(path.read_text())

    @property
    def movie(self) -> Path:
        """The movie this run was made from."""
        meta = self.meta()
        if meta is None:
            raise StageError(f"{self.run_dir} has no run.json; run stage 01 on a movie first")
        return Path(meta["movie"])

    @property
    def movie_key(self) -> str:
        """Short content hash of the movie, used in frame ids."""
        meta = self.meta()
        return meta["movie_key"] if meta else movie_key(self.movie)

    @property
    def tables_dir(self) -> Path:
        return self.run_dir / "tables"

    @property
    def manifests_dir(self) -> Path:
        return self.run_dir / "manifests"

    @property
    def notebooks_dir(self) -> Path:
        return self.run_dir / "notebooks"

    def table_path(self, name: str) -> Path:
        return self.tables_dir / f"{name}.parquet"

    def has_table(self, name: str) -> bool:
        return self.table_path(name).is_file()

    def read_table(self, name: str) -> pl.DataFrame:
        """Read a stage table; a missing one names the stage to run first."""
        import polars as pl

        path = self.table_path(name)
        if not path.is_file():
            raise StageError(
                f"table '{name}' is missing in {self.run_dir}; run the stage that writes it first"
            )
        return pl.read_parquet(path)

    def optional_table(self, name: str) -> pl.DataFrame | None:
        """A table an earlier stage may not have written (its stage is optional or did not run)."""
        return self.read_table(name) if self.has_table(name) else None

    def write_table(self, name: str, df: pl.DataFrame) -> Path:
        """Write a table atomically (temporary parquet file, then rename)."""
        return atomic_write_parquet(self.table_path(name), df)

    def table_fingerprint(self, name: str, columns: Sequence[str] | None = None) -> dict[str, Any]:
        """Hash of a table file, so a later stage notices when an earlier one rewrote it.

        With ``columns``, only those columns' values are hashed: stage 03 depends on which frames
        stage 02 kept, not on the ``face_sharpness`` column stage 03 itself fills in.
        """
        if columns is None:
            data = self.table_path(name).read_bytes()
            return {"table": name, "sha256": hashlib.sha256(data).hexdigest()[:16]}
        import polars as pl

        df = pl.read_parquet(self.table_path(name), columns=list(columns))
        blob = df.write_csv().encode()
        return {"table": name, "columns": list(columns), "sha256": hashlib.sha256(blob).hexdigest()[:16]}

    def progress_path(self, stage: str) -> Path:
        """Where a running stage reports its progress for the terminal (see :mod:`.progress`)."""
        return self.run_dir / f".progress-{stage}.json"

    def manifest_path(self, stage: str) -> Path:
        return self.manifests_dir / f"{stage}.json"

    def read_manifest(self, stage: str) -> dict[str, Any] | None:
        """The stage's manifest, or None if missing or unreadable (then the stage simply reruns)."""
        path = self.manifest_path(stage)
        try:
            return json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def write_manifest(self, stage: str, manifest: dict[str, Any]) -> None:
        atomic_write_bytes(self.manifest_path(stage), json.dumps(manifest, indent=2, default=str).encode())


def build_manifest(
    stage: str,
    stage_version: int,
    config_hash: str,
    config: dict[str, Any],
    inputs: dict[str, Any],
    outputs: Iterable[str],
    counts: dict[str, Any],
    *,
    seed: int,
    started: datetime,
    warnings: list[str],
    facts: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The manifest a stage writes after its tables."""
    from importlib.metadata import PackageNotFoundError, version

    def _version(dist: str) -> str:
        try:
            return version(dist)
        except PackageNotFoundError:  # pragma: no cover - every listed package is a dependency
            return "missing"

    finished = datetime.now(UTC)
    return {
        "stage": stage,
        "stage_version": stage_version,
        "config_hash": config_hash,
        "config": config,
        "inputs": inputs,
        "outputs": sorted(outputs),
        "counts": counts,
        "seed": seed,
        "warnings": warnings,
        "facts": facts or {},
        "started": started.isoformat(),
        "finished": finished.isoformat(),
        "duration_s": round((finished - started).total_seconds(), 3),
        "versions": {
            "diffusion_bunny": package_version(),
            "python": platform.python_version(),
            **{
                dist: _version(dist)
                for dist in ("polars", "numpy", "av", "scenedetect-headless", "opencv-python-headless")
            },
        },
    }


def manifest_state(
    run: Run,
    stage: str,
    stage_version: int,
    config_hash: str,
    inputs: dict[str, Any],
    outputs: Iterable[str],
) -> tuple[StageState, str]:
    """Whether a stage's outputs are ``done`` (manifest matches), ``stale`` (something changed,
    with the reason) or ``missing``."""
    manifest = run.read_manifest(stage)
    if manifest is None:
        return "missing", "never ran"
    if any(not run.has_table(name) for name in outputs):
        return "missing", "a table is missing"
    if manifest.get("stage_version") != stage_version:
        return "stale", "the stage's code changed"
    if manifest.get("config_hash") != config_hash:
        return "stale", "its config changed"
    if manifest.get("inputs") != json.loads(json.dumps(inputs, default=str)):
        return "stale", "its inputs changed"
    return "done", "up to date"
