"""The run folder: where a movie's tables, frames, manifests and executed notebooks live.

:class:`Run` names every place in it (``tables/``, ``manifests/``, ``notebooks/``, progress
files); what a manifest holds is :mod:`~diffusion_bunny.pipeline.manifest`'s business. Every write
is atomic (:mod:`~diffusion_bunny.pipeline.atomic`), so a killed run never leaves a half-written
table or manifest behind.

Every table, a stage's or a person's, is written one way: :meth:`Run.commit`, under the locks of
the tables it writes (one lock per table, :meth:`Run.table_lock`), so a person's edit and a
stage's write never lose each other's rows, and a person's tables keep a backup
(:mod:`.userwork`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import unicodedata
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from diffusion_bunny.errors import BadInputError, DamagedTableError, StageError
from diffusion_bunny.pipeline.atomic import (
    atomic_write_bytes,
    sweep_leftovers,
)
from diffusion_bunny.pipeline.lock import (
    DEFAULT_LEASE_S,
    TABLE_LOCK_TIMEOUT_S,
    may_sweep,
    run_lock,
    table_lock,
)
from diffusion_bunny.pipeline.manifest import file_fingerprint, table_fingerprint
from diffusion_bunny.pipeline.userwork import HAND_MADE, backup_path, read_kept, stage_table

log = logging.getLogger(__name__)

#: A web address (``https://...``), which ``Path`` would fold into ``https:/...``.
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def run_fact(path: str | Path, run_dir: str | Path) -> str:
    """A file a manifest's facts or a table record: relative to the run folder when it lies inside
    it, absolute otherwise. Absolute facts pointed into the old folder once a run folder was moved
    or copied (notebook 08 printed a snippet loading another run's LoRA; notebook 07 listed the
    old folder's files, or failed where it was gone)."""
    path, run_dir = Path(path).absolute(), Path(run_dir).absolute()
    return path.relative_to(run_dir).as_posix() if path.is_relative_to(run_dir) else str(path)


def from_run_fact(fact: str | None, run_dir: str | Path) -> Path | None:
    """The file a fact of :func:`run_fact` names, in the run folder where it is relative."""
    return None if not fact else Path(run_dir) / fact


def check_exists(target: str | Path) -> Path:
    """``target`` as a path that exists, or one line: a web address is named as such (a user
    pastes a video's link; it read "https:/www...: no such file or folder")."""
    if _URL.match(str(target)):
        raise BadInputError(
            f"{target} is a web address: the workspace reads files; download the movie first and "
            "give its file"
        )
    path = Path(target).expanduser()
    if not path.exists():
        raise BadInputError(f"{path}: no such file or folder; check the path")
    return path


@contextlib.contextmanager
def damaged_table(path: Path) -> Iterator[None]:
    """A stage's table that does not read (damaged on disk) is one line saying how to rebuild
    it, not a parquet traceback: every stage's table can be computed again (a table a person
    made is restored from its backup instead, :mod:`.userwork`)."""
    try:
        yield
    except pl.exceptions.PolarsError as exc:
        why = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise DamagedTableError(
            f"table {path} is damaged ({why}); run the stage that writes it again with --force "
            "(bunny status names it: its state is stale), and the stages after it"
        ) from None


def _whole(path: Path) -> bool:
    """Whether a table's file reads as parquet (its footer and schema, without the table)."""
    try:
        pl.scan_parquet(path, glob=False).collect_schema()
    except (pl.exceptions.PolarsError, OSError):
        return False
    return True


def slugify(text: str) -> str:
    """Lower-case ASCII slug for folder names (``"Mon Film (2019)"`` -> ``"mon-film-2019"``)."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")
    return slug or "movie"


#: Longest folder or file name part this project makes from a user's text (bytes of UTF-8): file
#: systems allow 255 (eCryptfs about 143), and a name is often one part of a longer one.
NAME_BYTES = 100


def bounded_name(name: str, limit: int = NAME_BYTES) -> str:
    """``name`` when it fits in ``limit`` bytes of UTF-8, else its head cut on a character boundary
    and ``~`` + 8 hex of its hash: still readable, still one name per text, and never the
    ``ENAMETOOLONG`` that long character names joined by ``+`` gave (a kohya concept folder)."""
    data = name.encode()
    if len(data) <= limit:
        return name
    digest = hashlib.sha1(data).hexdigest()[:8]
    head = data[: limit - 9].decode("utf-8", errors="ignore")
    return f"{head}~{digest}"


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


#: Longest slug in a run folder's name: with ``-`` and the 8 hex of the key, the 255 bytes a file
#: system allows in one name. A movie named longer (a file name may be 255 bytes, its slug with
#: the key was not) stopped ``bunny run`` with "bug: File name too long"; shorter names, and so
#: the run folders of earlier runs, are unchanged.
SLUG_BYTES = 255 - 9


def movie_id(path: str | Path) -> str:
    """``<slug of the file stem>-<movie_key>``: readable, and two different movies called
    ``episode1.mkv`` in different folders never share a run folder. The slug is ASCII, cut to
    :data:`SLUG_BYTES` (the key keeps two movies of one long name apart)."""
    path = Path(path)
    return f"{slugify(path.stem)[:SLUG_BYTES].rstrip('-')}-{movie_key(path)}"


def run_folder_in(root: str | Path, movie: str | Path) -> Path:
    """The run folder of ``movie`` under ``root`` (a folder run's ``--out``, or ``paths.output_dir``):
    ``<root>/<movie id>``, or, where that holds no run yet, the run folder already there of the
    same content (its name ends with the movie's key, and its ``run.json`` says so). A movie
    renamed since it ran, or the copy of it a folder now runs (``drop_copies`` keeps the shortest
    name), made a second run folder of the same frames and did all the work again, and the
    corrections made by hand in the first were left behind. OSError when the movie cannot be read
    (its key is its first megabyte)."""
    root = Path(root)
    own = root / movie_id(movie)
    if (own / "run.json").is_file():
        return own
    key = own.name.rpartition("-")[2]
    with contextlib.suppress(OSError):
        for earlier in sorted(root.glob(f"*-{key}")):
            with contextlib.suppress(StageError):  # a damaged run.json: not taken for this movie's
                meta = Run(earlier).meta() or {}
                if meta.get("movie_key") == key and _same_movie(Path(meta.get("movie", "")), Path(movie)):
                    return earlier
    return own


def _same_movie(recorded: Path, movie: Path) -> bool:
    """Whether the movie a run folder records is ``movie``: gone from where it was (renamed or
    moved), or a copy of it (size, first and last megabyte, as ``drop_copies`` judges). The key
    is its first megabyte only: two cuts of one film that differ only at the end share it, and
    one run folder for both redid stage 01 at every run, each in turn."""
    if not recorded.name or not recorded.is_file():
        return True
    try:
        return file_fingerprint(recorded) == file_fingerprint(movie)
    except OSError:
        return False


def given_run_folder(out: str | Path, movie: str | Path) -> Path:
    """A single movie's ``--out``: the folder itself, or, where ``out`` is no run folder but holds
    this movie's run folder (the ``--out`` of a folder run it was part of), that run folder, as
    ``bunny status MOVIE --out OUT`` reads it. Run into ``out`` itself, it was refused as a folder
    that holds files and is no run folder."""
    out = Path(out)
    if (out / "run.json").is_file() or not out.is_dir():
        return out
    with contextlib.suppress(OSError):
        inner = run_folder_in(out, movie)
        if (inner / "run.json").is_file() or _folder_run_out(out):
            return inner
    return out


def _folder_run_out(out: Path) -> bool:
    """Whether ``out`` is the ``--out`` of a folder run: its combined report, its lock, or a run
    folder of a movie in it. A movie of that folder the run had not reached yet (a Ctrl-C, a
    stop) runs alone in its own run folder there, as the folder run would have run it; ``out``
    itself was refused as "already holds files and is no run folder"."""
    if (out / "report" / "movies.parquet").is_file() or (out / ".locks" / "folder-run").exists():
        return True
    with contextlib.suppress(OSError):
        return any((inner / "run.json").is_file() for inner in out.iterdir() if inner.is_dir())
    return False


def check_run_folder(run_dir: str | Path, movie: str | Path) -> None:
    """Refuse a run folder that holds other things than this movie's run, before anything is
    written there: a run replaces whole folders in it (``frames/``, ``tables/``, ``report/``,
    ``dataset/``), so a folder of the user's own given as ``--out`` would have lost a ``frames``
    folder of theirs, and another movie's run folder its results and the corrections made by
    hand in it. Hidden entries (``.DS_Store``, the run lock's ``.locks``) and ``log/`` (where a
    Ray task on another node logs before the run starts; logs are added to, never replaced) do
    not count; a run folder whose movie was moved or renamed (same content) is this movie's.
    """
    folder = Path(run_dir)
    if folder.exists() and not folder.is_dir():
        raise StageError(f"{folder} is a file, not a folder; give --out a folder for the run (new or empty)")
    if not folder.is_dir():
        return
    try:
        meta = Run(folder).meta()
    except StageError:
        # Damaged (a cut copy, a killed editor): Run.create rewrites it for the movie given,
        # unless the folder shows another movie's run. Another movie took the folder over.
        _check_damaged_owner(folder, movie)
        return
    if meta is not None:
        if meta.get("movie_key") not in (None, movie_key(movie)):
            if Path(str(meta.get("movie"))) == Path(movie).resolve():
                # The same path with other content: "the run folder of another movie (movie.mp4)"
                # named the very file given, with no word of its change.
                raise StageError(
                    f"{folder} is the run folder of {Path(movie).name} as it was: the file has changed "
                    "since (a new cut, a download finished or cut short, damage); give --out a new "
                    f"folder for it as it is now, or remove that one to run it there again"
                )
            raise StageError(
                f"{folder} is the run folder of another movie ({Path(meta['movie']).name}); give --out "
                f"a new folder for {Path(movie).name}, or remove that one to reuse its name"
            )
        return
    own = sorted(p.name for p in folder.iterdir() if not p.name.startswith(".") and p.name != "log")
    if own:
        shown = ", ".join(own[:3]) + (f" and {len(own) - 3} more" if len(own) > 3 else "")
        raise StageError(
            f"{folder} already holds files and is no run folder (no run.json): {shown}; a run "
            "replaces whole folders in its run folder, so give --out a new or empty folder"
        )


def _owner_key(folder: Path) -> str | None:
    """The key of the movie whose run ``folder`` holds, read without ``run.json``: its frames'
    ids (``<movie_key>_<frame index>``); None when it has none to read. Not the folder's name: a
    name of the user's own may end in eight hex digits (``shots-20261129``)."""
    frames = folder / "tables" / "frames.parquet"
    with contextlib.suppress(Exception):  # a damaged or missing table tells nothing
        first = pl.read_parquet(frames, columns=["frame_id"], n_rows=1, glob=False)["frame_id"]
        if len(first) and re.fullmatch(r"[0-9a-f]{8}_\d+", str(first[0])):
            return str(first[0]).partition("_")[0]
    return None


def _check_damaged_owner(folder: Path, movie: str | Path) -> None:
    """Refuse a run folder whose ``run.json`` is damaged when what it holds is another movie's
    run: its results, and the corrections made by hand in it, would be replaced by this movie's."""
    owner = _owner_key(folder)
    if owner is not None and owner != movie_key(movie):
        raise StageError(
            f"{folder} holds the run of another movie (its frames are {owner}_...) and its run.json "
            f"is damaged; give --out a new folder for {Path(movie).name}, or remove that folder to "
            "reuse its name"
        )


def check_batch_folder(out: str | Path) -> None:
    """Refuse a folder run's ``--out`` where the run would replace what is not its own, before
    anything is written there: a folder run writes one run folder per movie (each checked as a
    single movie's ``--out`` is) and replaces ``report/``, so a folder of the user's own lost the
    figures of its ``report/``, and a movie's run folder got the batch nested inside it and its
    own report's figures deleted. Anything else may stay beside the batch (the movies themselves
    when ``--out`` is their folder, a subtitle beside one, notes): the run touches it not."""
    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise StageError(f"{folder} is a file, not a folder; give --out a folder for the movies' run folders")
    if not folder.is_dir():
        return
    if (folder / "run.json").is_file():
        raise StageError(
            f"{folder} is the run folder of one movie; a folder run writes a run folder per movie and a "
            "report into --out, so give it a new or empty folder (or the --out of an earlier folder run)"
        )
    report = folder / "report"
    if report.exists() and not report.is_dir():
        raise StageError(
            f"{report} is a file; a folder run writes its combined report into report/ of its --out, "
            "so give --out a new folder, or move that file away"
        )
    if report.is_dir() and not (report / "movies.parquet").is_file():
        held = sorted(p.name for p in report.iterdir() if not p.name.startswith("."))
        if held:
            raise StageError(
                f"{report} is no folder run's report ({', '.join(held[:3])}); a folder run replaces "
                "report/ in its --out, so give --out a new folder, or move that report/ away"
            )


#: What the last ``bunny run`` of a run folder ran with (:meth:`Run.write_settings`).
SETTINGS_FILE = "settings.json"


@dataclass(frozen=True)
class Run:
    """One movie's run folder. ``movie`` is recorded in ``run.json`` on the first run, so later
    stages and notebooks only need the folder."""

    run_dir: Path

    @classmethod
    def create(cls, run_dir: str | Path, movie: str | Path) -> Run:
        """Open (and create if needed) the run folder of ``movie``, removing what killed writers
        left in it (:func:`~diffusion_bunny.pipeline.atomic.sweep_leftovers`) unless another
        process holds the folder (:meth:`lock`)."""
        run = cls(Path(run_dir).resolve())
        check_run_folder(run.run_dir, movie)
        run.run_dir.mkdir(parents=True, exist_ok=True)
        if may_sweep(run.run_dir):  # never under another machine's live run (its pids are not ours)
            sweep_leftovers(run.run_dir)
        meta = {
            "movie": str(Path(movie).resolve()),
            "movie_id": movie_id(movie),
            "movie_key": movie_key(movie),
        }
        try:
            current = run.meta()
        except StageError:  # damaged (a killed editor, a bad copy): the movie given here rewrites it
            current = None
        if current != meta:
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
        try:
            meta = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise StageError(
                f"{path} is damaged ({exc}); rerun on the movie (bunny run MOVIE --out "
                f"{self.run_dir} rewrites it; the stages' results are kept and reused)"
            ) from None
        if not isinstance(meta, dict) or not isinstance(meta.get("movie"), str):
            raise StageError(
                f"{path} does not describe a run (no movie); rerun on the movie (bunny run MOVIE "
                f"--out {self.run_dir} rewrites it)"
            )
        return meta

    def write_settings(self, config_path: str | None, overrides: dict[str, Any]) -> None:
        """Record what the last ``bunny run`` of this folder ran with (``--config`` and the
        settings of ``--set``, ``--characters``...) in ``settings.json``, for a notebook opened on
        the run later (:func:`diffusion_bunny.nbtools.notebook_config`). Without it a notebook
        opened in JupyterLab on a run made with ``--characters`` ran stage 03 again with no
        reference pictures, and every name was lost."""
        record = {"config_path": config_path, "overrides": overrides}
        if self.settings() != record:
            text = json.dumps(record, indent=2, default=str)
            atomic_write_bytes(self.run_dir / SETTINGS_FILE, text.encode())

    def settings(self) -> dict[str, Any] | None:
        """``settings.json`` (:meth:`write_settings`), or None where no ``bunny run`` wrote one or
        it cannot be read (a notebook then runs with its own settings, as before the record)."""
        try:
            record = json.loads((self.run_dir / SETTINGS_FILE).read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            return None
        if not isinstance(record, dict) or not isinstance(record.get("overrides"), dict):
            return None
        return record

    def layers(
        self,
        config_path: str | Path | None,
        overrides: dict[str, Any] | None,
        current_name: Callable[[str], str] | None = None,
    ) -> tuple[str | None, dict[str, Any], str | None]:
        """A notebook's ``config_path`` and ``overrides`` over what the last ``bunny run`` of
        this folder was given (:meth:`settings`): the settings file in force (the notebook's own,
        else the recorded one), the overrides (the notebook's winning), and the recorded settings
        file when it is gone (None otherwise). One rule for the notebook's config and for the
        widgets that say a saved choice is overridden: a ``--set`` of the run hid "use this
        threshold" without a word.

        ``current_name`` gives a setting's name today (the configuration's, which this module may
        not import): a recorded setting the notebook sets under another spelling is the
        notebook's. Merged by spelling, a run recorded with ``extraction.motion_threshold`` and a
        notebook setting ``extract.motion_threshold`` set one setting twice, and would not open."""
        given = dict(overrides or {})
        record = self.settings()
        if not record:
            return (None if config_path is None else str(config_path)), given, None
        recorded = record.get("config_path")
        gone = recorded if isinstance(recorded, str) and not Path(recorded).is_file() else None
        path = config_path if config_path is not None else (recorded if recorded and not gone else None)
        name = current_name or (lambda key: key)
        named = {name(key) for key in given}
        kept = {k: v for k, v in record["overrides"].items() if name(k) not in named}
        return (None if path is None else str(path)), {**kept, **given}, gone

    def lock(self, what: str = "", lease_s: float | None = None) -> contextlib.AbstractContextManager[Any]:
        """Hold this run folder for the block: one run of it at a time, across processes and
        machines sharing the disk (:func:`diffusion_bunny.pipeline.lock.run_lock`). A second
        holder stops at once with :class:`~diffusion_bunny.pipeline.lock.RunBusy` naming the
        first (pid and host)."""
        return run_lock(self.run_dir, what=what, lease_s=lease_s or DEFAULT_LEASE_S)

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
        """Whether the table is there. A table of corrections made by hand that is gone while its
        backup is not (deleted by hand, left out of a copy) is a warning: read as "no corrections
        yet", its edits were dropped without a word, the backup beside it. Not put back on its
        own: deleting the table may be how a person meant to start over."""
        path = self.table_path(name)
        if path.is_file():
            return True
        backup = backup_path(path)
        if name in HAND_MADE and backup.is_file():
            warnings.warn(
                f"{path} is gone, so the corrections made by hand in it are not applied; its backup "
                f"{backup} still holds them: copy it back to keep them (cp '{backup}' '{path}'), or "
                "delete the backup to confirm (the next correction replaces it)",
                stacklevel=2,
            )
        return False

    def read_table(self, name: str) -> pl.DataFrame:
        """Read a stage table; a missing one names the stage to run first."""
        path = self.table_path(name)
        if not path.is_file():
            raise StageError(
                f"table '{name}' is missing in {self.run_dir}; run the stage that writes it first"
            )
        if self._hand_made(name):  # restored from its backup if damaged
            return read_kept(path)
        with damaged_table(path):
            return pl.read_parquet(path, glob=False)

    def optional_table(self, name: str) -> pl.DataFrame | None:
        """A table an earlier stage may not have written (its stage is optional or did not run)."""
        return self.read_table(name) if self.has_table(name) else None

    def write_table(self, name: str, df: pl.DataFrame, *, backup: bool = False) -> Path:
        """Write a table atomically (temporary parquet file, then rename), without its lock: the
        step :meth:`commit` takes for each table (use that). ``backup``: a table a person made
        (corrections), also copied to ``tables/backup/`` (:mod:`.userwork`); once it has a
        backup, every later write keeps it up to date."""
        with contextlib.ExitStack() as stack:
            self._write_staged(stack, name, df, backup)
        return self.table_path(name)

    @contextlib.contextmanager
    def table_lock(self, *names: str, timeout: float | None = None) -> Iterator[None]:
        """Hold the lock of each table named for the block (:func:`~.lock.table_lock`, files under
        ``.locks/tables/``). They are taken in sorted order whoever asks, so two writers of
        overlapping tables never wait on each other in a circle."""
        wait = TABLE_LOCK_TIMEOUT_S if timeout is None else timeout
        with contextlib.ExitStack() as stack:
            for name in sorted(set(names)):
                stack.enter_context(
                    table_lock(self.run_dir / ".locks" / "tables" / f"{name}.lock", name, wait)
                )
            yield

    @contextlib.contextmanager
    def commit(
        self, *names: str, by_hand: bool = False, timeout: float | None = None
    ) -> Iterator[dict[str, pl.DataFrame]]:
        """The one write path of a run's tables: hold the locks of ``names`` for the block, which
        puts the tables to write into the dict it is given; they are written when the block ends,
        all or none (:meth:`_write_all`), nothing when it raises.

        Reading inside the block sees every table as no one else can change it until the writes
        are done: stage 04 folds in the moves made while it computed, a person's edit reads the
        table it appends to. ``names`` may include tables the block only reads (a stage locks
        the tables people edit while it folds them in). ``by_hand``: a person's edit, which no
        stage can rebuild; every table it writes is kept with a backup (:mod:`.userwork`)."""
        with self.table_lock(*names, timeout=timeout):
            tables: dict[str, pl.DataFrame] = {}
            yield tables
            unlocked = set(tables) - set(names)
            if unlocked:  # pragma: no cover - a bug in the caller
                raise RuntimeError(
                    f"commit of {', '.join(names)} writes tables it did not lock: {sorted(unlocked)}"
                )
            self._write_all(tables, by_hand)

    def _write_all(self, tables: dict[str, pl.DataFrame], by_hand: bool) -> None:
        """Every table (and the backup of each kept one) written to its temporary file first, and
        renamed into place only once all are whole: a full disk in the second table of a hand
        edit left the first written (the edit recorded in ``caption_edits`` and its backup, not in
        ``captions``), reported as failed yet applied by the next run of the stage."""
        with contextlib.ExitStack() as stack:  # left in reverse: each table before its backup
            for name, df in tables.items():
                self._write_staged(stack, name, df, by_hand)

    def _write_staged(self, stack: contextlib.ExitStack, name: str, df: pl.DataFrame, by_hand: bool) -> None:
        """One table of a commit written to its temporary file (and its backup's, for a table
        made by hand or one that has a backup), renamed into place when ``stack`` closes after
        the commit's last table (:func:`~.userwork.stage_table`)."""
        path = self.table_path(name)
        stage_table(stack, path, df, kept=by_hand or backup_path(path).is_file())

    def _hand_made(self, name: str) -> bool:
        """Whether a table is a person's (a stage's ``edits``, or any table a person's edit wrote:
        it has a backup): read with :func:`read_kept`, never sent to be rebuilt with --force."""
        return name in HAND_MADE or backup_path(self.table_path(name)).is_file()

    def table_height(self, name: str) -> int:
        """Rows of a table, without reading it when it is not one made by hand (those are read,
        so a damaged one is restored from its backup first)."""
        path = self.table_path(name)
        if self._hand_made(name):
            return read_kept(path).height
        with damaged_table(path):
            return int(pl.scan_parquet(path, glob=False).select(pl.len()).collect().item())

    def table_fingerprint(self, name: str, columns: Sequence[str] | None = None) -> dict[str, Any]:
        """Fingerprint of a table (of ``columns`` only, when given): see
        :func:`~diffusion_bunny.pipeline.manifest.table_fingerprint`. A damaged table made by
        hand is restored from its backup first."""
        path = self.table_path(name)
        # Only a file whose footer does not read is read whole: a whole one is hashed as it is.
        if path.is_file() and self._hand_made(name) and not _whole(path):
            read_kept(path)
            if not _whole(path):  # damaged, and not restored: the folder cannot be written
                path = backup_path(path)  # (``bunny status`` on a read-only run)
        with damaged_table(path):
            return {"table": name, **table_fingerprint(path, columns)}

    def progress_path(self, stage: str) -> Path:
        """Where a running stage reports its progress for the terminal (see :mod:`.progress`)."""
        return self.run_dir / f".progress-{stage}.json"

    def manifest_path(self, stage: str) -> Path:
        return self.manifests_dir / f"{stage}.json"

    def read_manifest(self, stage: str) -> dict[str, Any] | None:
        """The stage's manifest, or None if missing or unreadable (then the stage simply reruns)."""
        path = self.manifest_path(stage)
        try:
            manifest = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):  # damaged (not text, not JSON): a bug's traceback before
            manifest = None
        if not isinstance(manifest, dict):  # JSON, but no manifest (``[]``): as damaged, said so
            log.warning("manifest %s cannot be read; stage %s counts as not run", path, stage)
            return None
        return manifest

    def started_path(self, stage: str) -> Path:
        """Marks a run of the stage begun and not finished (written when its manifest is removed
        before it computes, removed with the manifest's writing): a stage that failed on its first
        run left no table and no manifest, and ``bunny status`` said it "never ran"."""
        return self.manifests_dir / f".{stage}.started"

    def write_manifest(self, stage: str, manifest: dict[str, Any]) -> None:
        atomic_write_bytes(self.manifest_path(stage), json.dumps(manifest, indent=2, default=str).encode())
        self.started_path(stage).unlink(missing_ok=True)
