"""The stage contract: what a stage declares, and the one function that runs any stage.

A stage is a declaration (:class:`Stage`), in the spirit of kedro's nodes: the tables it reads
(:class:`Reads`: which stage writes each, the columns it depends on, required or optional), the
settings it reads (whole config sections, or single keys such as ``run.seed``), the tables it
writes, the folders and files it owns beside them, a ``compute`` that receives the tables it
declared (:class:`Context`) and returns the tables it writes (:class:`StageOutput`), and a
``summary`` that turns its manifest into one line for people.

:func:`run_stage` does everything else, the same way for every stage, so that notebooks, ``bunny
run`` and tests behave alike: it checks that the required tables exist (the "run stage X first"
message comes from the declaration), fingerprints the declared inputs, skips the stage when its
manifest matches, otherwise invalidates the manifest, reads the declared tables, computes, writes
the tables atomically and records the manifest with fingerprints of everything written
(:mod:`~diffusion_bunny.pipeline.manifest`).

Tables people edit (the review board's moves in ``feedback``, the captions typed into
``caption_edits``) belong to the stage whose editors write them (:attr:`Stage.edits`). The stage
and its editors write through the same :meth:`Run.commit <diffusion_bunny.pipeline.run.Run.commit>`
under the same table locks; the stage's :attr:`StageOutput.merge` folds in, under those locks,
the edits made while it computed, so none is lost.

The stage sees the configuration only through :class:`ConfigView`, which refuses any setting the
stage did not declare: a manifest's settings are then exactly what the stage read, and a setting a
stage starts to read without declaring it fails its tests instead of silently never making it
stale.

This module knows no stage: the ordered collection of them is a :class:`Pipeline`, built in
:mod:`diffusion_bunny.stages` (the one place the stage order is written) and handed to the
runner, the engines and ``bunny status``.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from diffusion_bunny.errors import DamagedTableError, StageError, StageWarning, UserError
from diffusion_bunny.logs import attach_from_env, relaying
from diffusion_bunny.paths import workspace_root
from diffusion_bunny.pipeline.atomic import atomic_write_bytes
from diffusion_bunny.pipeline.manifest import (
    StageState,
    build_manifest,
    code_hash,
    path_fingerprint,
    plain,
)
from diffusion_bunny.pipeline.run import Run
from diffusion_bunny.pipeline.settings import RECORDED_AS
from diffusion_bunny.pipeline.userwork import HAND_MADE

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    import polars as pl

    from diffusion_bunny.pipeline.settings import RunConfig


class UndeclaredSetting(AttributeError):
    """A stage read a setting it did not declare: a bug in the stage's declaration (exit 1)."""


class ConfigView:
    """The settings one stage declared, and only those: ``view.quality`` when the stage
    declared the ``quality`` section, ``view.run.seed`` when it declared ``run.seed``; anything
    else raises :class:`UndeclaredSetting`."""

    def __init__(self, cfg: RunConfig, declared: Sequence[str], stage: str):
        self._cfg = cfg
        self._stage = stage
        self._sections = {d for d in declared if "." not in d}
        self._keys: dict[str, set[str]] = {}
        for d in declared:
            if "." in d:
                section, _, key = d.partition(".")
                self._keys.setdefault(section, set()).add(key)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        if name in self._sections:
            return getattr(self._cfg, name)
        if name in self._keys:
            return _SectionView(getattr(self._cfg, name), self._keys[name], f"{self._stage}: {name}")
        raise UndeclaredSetting(
            f"stage {self._stage} read the setting section '{name}' without declaring it; add it "
            "to the stage's config declaration"
        )


class _SectionView:
    def __init__(self, section: Any, keys: set[str], where: str):
        self._section = section
        self._keys = keys
        self._where = where

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        if name in self._keys:
            return getattr(self._section, name)
        raise UndeclaredSetting(
            f"{self._where}.{name} was read without being declared; add it to the stage's config declaration"
        )


@dataclass(frozen=True)
class Reads:
    """A table a stage reads.

    ``columns`` are the ones the stage depends on (only they are fingerprinted: a column another
    stage adds does not make this one stale); ``optional`` tables may be absent (the stage then
    gets None); ``nonempty`` marks tables of corrections a person appends to (``feedback``,
    ``caption_edits``): an empty one counts as absent, so creating it changes nothing.
    """

    table: str
    producer: str
    columns: tuple[str, ...] | None = None
    optional: bool = False
    nonempty: bool = False


@dataclass(frozen=True)
class StageOutput:
    """What a stage's ``compute`` returns: the tables it writes and what goes into its manifest."""

    tables: dict[str, pl.DataFrame]
    counts: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)
    #: For a stage whose tables people edit while it computes: called by :func:`run_stage`'s
    #: commit, under the locks of the stage's tables and of its :attr:`Stage.edits`, with the
    #: tables computed; returns the tables to write with the edits made meanwhile folded in
    #: (stage 04 places the moves, stage 05 puts the typed captions back). None: written as they are.
    merge: Callable[[dict[str, pl.DataFrame]], dict[str, pl.DataFrame]] | None = None
    #: Declared inputs the stage changed itself as it ran (stage 04: the scene library's id made
    #: on its first use, the feedback a library join rewrites), so the stage is not stale from
    #: its own writes: each recorded as the value given (the id the run used: a library made
    #: again by another movie meanwhile leaves it stale), or with None as taken again in the
    #: commit, after the merge.
    settled: dict[str, Any] = field(default_factory=dict)


@dataclass
class Context:
    """What ``compute`` receives: the run, the declared settings, the declared tables."""

    stage: str
    run: Run
    cfg: ConfigView
    tables: dict[str, pl.DataFrame | None]
    progress: bool = True
    #: The stage's manifest of its last run (read before this run invalidated it), or None.
    previous: dict[str, Any] | None = None
    writes: tuple[str, ...] = ()
    #: The run was forced (``--force``): work kept from the last run is not reused.
    forced: bool = False
    #: One line per stage whose tables this stage reads and which is out of date
    #: (:func:`behind_producers`; also the manifest's warnings): the report shows them.
    behind: tuple[str, ...] = ()

    def table(self, name: str) -> pl.DataFrame:
        """A declared table (an optional one that is absent is a bug to ask for here)."""
        df = self.tables[name]
        if df is None:
            raise KeyError(f"table {name} is absent; use Context.optional for optional tables")
        return df

    def optional(self, name: str) -> pl.DataFrame | None:
        """A declared table, or None when the run does not have it."""
        return self.tables[name]

    def own_previous(self, name: str) -> pl.DataFrame | None:
        """This stage's own table from its last run (a cache of work done: faces per frame,
        embeddings), before this run replaces it; None when there is none, or when it is
        damaged on disk: it is only work to reuse, and the rerun that ``bunny status`` and the
        damaged-table message advise must not stop at reading it."""
        if name not in self.writes:
            raise KeyError(f"stage {self.stage} does not write table {name}")
        try:
            return self.run.optional_table(name)
        except DamagedTableError as exc:
            log.warning("%s: %s; computed again in full", self.stage, exc)
            return None

    @property
    def progress_path(self) -> Path:
        """Where the stage reports progress for ``bunny run``'s terminal bar."""
        return self.run.progress_path(self.stage)

    @property
    def run_dir(self) -> Path:
        return self.run.run_dir


@dataclass(frozen=True)
class Stage:
    """A stage's declaration (see the module docstring)."""

    name: str
    notebook: str
    #: The stage's package (``diffusion_bunny.stages.<name>``): its ``stage`` module's ``compute``
    #: is the stage (:meth:`stage_module`); that module and what it imports make the code hash
    #: (:func:`~diffusion_bunny.pipeline.manifest.code_hash`).
    package: str
    #: One line on the stage's last run from its manifest (:func:`stage_summary` adds
    #: ``run_folder``, which facts of files inside it are relative to).
    summary: Callable[[dict[str, Any]], str]
    reads: tuple[Reads, ...] = ()
    config: tuple[str, ...] = ()
    writes: tuple[str, ...] = ()
    #: The tables people write through this stage's editors (``feedback``: the review board's
    #: moves; ``caption_edits``: typed captions). No stage computes them: a person's commit
    #: keeps them with a backup, the stage reads them (``Reads(..., nonempty=True)``), and
    #: :func:`run_stage` holds their locks while :attr:`StageOutput.merge` folds them in.
    edits: tuple[str, ...] = ()
    #: Folders and files the stage writes beside its tables, by label (``frames/``): fingerprinted
    #: in its manifest, so deleting one makes the stage ``missing``.
    owns: Callable[[Run, ConfigView], dict[str, Path]] | None = None
    #: What else the stage reads that is not a table (the movie, reference photos, LoRA files).
    inputs: Callable[[Run, ConfigView], dict[str, Any]] | None = None
    #: The report: every table of the run is an input (any change makes it stale).
    reads_every_table: bool = False
    #: What the stage keeps beside its outputs, one line each, for ``bunny status`` (stage 07:
    #: the LoRA of every training configuration, none deleted by a retrain).
    kept: Callable[[Run, ConfigView], list[str]] | None = None
    #: Rewrites the files beside its outputs that name the run folder's place, when the folder
    #: was moved or copied (stage 06: the dataset's README and the video trainers' files, which a
    #: trainer reads from anywhere, so they hold absolute paths); returns the facts that changed
    #: (empty: nothing to rewrite). Called when the stage is up to date (:func:`_relocated`).
    relocate: Callable[[Run, ConfigView, dict[str, Any]], dict[str, Any]] | None = None
    #: The detectors its settings choose, as ``(every detector's module, the chosen one's)``
    #: pairs (:meth:`~diffusion_bunny.registry.Registry.code_choice`): its code hash covers the
    #: chosen detector and not the others.
    detectors: Callable[[ConfigView], tuple[tuple[frozenset[str], str], ...]] | None = None

    def __post_init__(self) -> None:
        HAND_MADE.update(self.edits)

    def stage_module(self) -> Any:
        """``<package>.stage``, imported now: its ``compute(ctx)`` is the stage (and the report
        stage's ``batch_report`` the batch's report). Imported when the stage runs, never by the
        declaration: a stage's own module pulls in its models and libraries."""
        return importlib.import_module(f"{self.package}.stage")

    def view(self, cfg: RunConfig) -> ConfigView:
        return ConfigView(cfg, self.config, self.name)

    def code(self, cfg: RunConfig) -> str:
        """The hash of the code that computes the stage's tables with these settings (its
        manifest's ``code_hash``): the detectors they did not choose are not part of it."""
        choices = self.detectors(self.view(cfg)) if self.detectors is not None else ()
        return code_hash(self.package, choices)


@dataclass(frozen=True)
class Pipeline:
    """The stages in the order they run (the tuple's order is the only place it is written),
    and what a batch of movies does at its end."""

    stages: tuple[Stage, ...]
    #: The stage whose ``stage`` module's ``batch_report(out_dir, movie_reports, cfg, pipeline)``
    #: writes the report across the movies after a folder ran (None: no such report).
    batch_reporter: str | None = None

    def names(self) -> list[str]:
        return [s.name for s in self.stages]

    def batch_report(self, out_dir: Path, reports: Sequence[Any], cfg: RunConfig) -> Path | None:
        """The report across the movies of a batch, by the :attr:`batch_reporter` stage's code;
        None when the pipeline has none."""
        if self.batch_reporter is None:
            return None
        module = self.get(self.batch_reporter).stage_module()
        return module.batch_report(out_dir, list(reports), cfg, self)

    def get(self, name: str) -> Stage:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise StageError(f"unknown stage '{name}' (available: {', '.join(self.names())})")

    def upto(self, name: str) -> str:
        """``extract,quality,...,name``: the ``--stages`` that make ``name``'s inputs."""
        names = self.names()
        return ",".join(names[: names.index(name) + 1])


# ------------------------------------------------------------------------------- manifests


def output_fingerprints(run: Run, tables: Sequence[str], owned: dict[str, Path]) -> dict[str, Any]:
    """What a stage wrote, as recorded in its manifest: every table, every owned folder or file
    (None for an owned path the stage did not write this time, e.g. an adapter without
    corrections)."""
    return {
        "tables": {name: _output_fingerprint(run, name) for name in tables},
        "owned": {label: path_fingerprint(path) for label, path in owned.items()},
    }


def _output_fingerprint(run: Run, name: str) -> dict[str, Any]:
    """A written table's fingerprint as :meth:`Run.table_fingerprint` takes it: one a person's
    edit wrote restored first when damaged (``bunny status`` said "restored from its backup",
    then "stale (its output changed since it ran)" of the damaged bytes it had hashed before)."""
    return {k: v for k, v in run.table_fingerprint(name).items() if k != "table"}


def _changed(stored: dict[str, Any], fresh: dict[str, Any]) -> list[str]:
    return sorted(k for k in set(stored) | set(fresh) if stored.get(k) != fresh.get(k))


def _folder(value: str) -> Path:
    """A folder setting's value as the folder its readers open: relative ones are under the
    workspace (as ``characters.tables.configured_reference_dir`` and the others read them)."""
    path = Path(value).expanduser()
    return (path if path.is_absolute() else workspace_root() / path).resolve()


def _same_folder(key: str, old: Any, new: Any) -> bool:
    """One folder setting spelt two ways: ``refs`` in a settings file and ``/work/refs`` from
    ``--characters refs`` typed in the workspace are one folder, and a stage that ran with
    one of them is not stale with the other (its stage 03 was fitted again, minutes, for
    nothing). What the folder holds is the stage's input, fingerprinted on its own."""
    if not (key.endswith("_dir") and isinstance(old, str) and isinstance(new, str) and old and new):
        return False
    try:
        return _folder(old) == _folder(new)
    except (OSError, RuntimeError):  # ~olduser of another machine, a symlink loop: not known the same
        return False


def settings_moved(stored: dict[str, Any], fresh: dict[str, Any]) -> list[str]:
    """The recorded keys (flat, ``characters.reference_dir``) whose values differ between a
    manifest's ``config`` and the present settings, a folder spelt another way not counted."""
    old, new = flat_settings(stored), flat_settings(plain(fresh))
    return [k for k in _changed(old, new) if not _same_folder(k, old.get(k), new.get(k))]


def flat_settings(values: Any, prefix: str = "") -> dict[str, Any]:
    """``{"characters": {"fitted": {"steps": 1}}}`` as ``{"characters.fitted.steps": 1}``."""
    if not isinstance(values, dict):
        return {prefix: values}
    out: dict[str, Any] = {}
    for key, value in values.items():
        out.update(flat_settings(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _present_name(recorded: str) -> str:
    """A recorded key under the section's name of today (``extraction.motion_threshold`` ->
    ``extract.motion_threshold``; manifests keep the old names, :data:`RECORDED_AS`)."""
    section, dot, key = recorded.partition(".")
    return _PRESENT.get(section, section) + dot + key


_PRESENT = {old: new for new, old in RECORDED_AS.items()}


def _short(value: Any, width: int = 40) -> str:
    """``value`` as Python writes it, its end kept when longer than ``width``: a folder's last
    names say which it is. A text is cut inside its quotes, at a folder's name ("'...iew_setup/"
    lost the opening quote and half a name)."""
    text = repr(value)
    if len(text) <= width:
        return text
    if not isinstance(value, str):
        return "..." + text[-(width - 3) :]
    tail = value[-(width - 5) :]  # room for the quotes and "..."
    cut = max(tail.find("/"), tail.find(os.sep))
    return repr("..." + (tail[cut:] if 0 < cut < len(tail) - 1 else tail))


def config_changes(stored: dict[str, Any] | None, fresh: dict[str, Any] | None, most: int = 3) -> str:
    """The settings that differ between a manifest's recorded ``config`` and the present one, as
    ``key old -> new`` (up to ``most`` of them, then how many more): what "its config changed"
    means, so a user sees which setting, e.g. a ``--characters`` folder given to one run and not
    to the next. Empty when either side is unknown."""
    if not stored or fresh is None:
        return ""
    old, new = flat_settings(stored), flat_settings(plain(fresh))
    # A detector's name first: switching it changes all its settings, and "accept_threshold 40.0
    # -> None; ...; 11 more" hid the one change a person made.
    # Then the settings both sides hold, before those one side lacks: after an upgrade a stage's
    # record lacks the settings it reads today, and "captions.trigger_word None -> 'bunnystyle'"
    # said a trigger word had been none when the run had used that very one.
    keys = sorted(
        settings_moved(stored, fresh), key=lambda k: (not k.endswith(".name"), k not in old or k not in new)
    )

    def told(key: str, side: dict[str, Any], missing: str) -> str:
        if key in side:
            return _short(side[key])
        return "None" if _recorded(stored if side is old else fresh, key) else missing

    shown = [
        f"{_present_name(k)} {told(k, old, '(unrecorded)')} -> {told(k, new, '(unset)')}" for k in keys[:most]
    ]
    if len(keys) > most:
        shown.append(f"{len(keys) - most} more")
    return "; ".join(shown)


def _recorded(values: Any, key: str) -> bool:
    """Whether the nested ``values`` record the flat ``key``: itself, or an empty map above it
    (``{}`` flattens to nothing: a key under it is recorded, as none)."""
    parts = key.split(".")
    return key in flat_settings(values) or any(_holds(values, parts[:n]) for n in range(1, len(parts)))


def _holds(values: Any, path: list[str]) -> bool:
    """Whether the nested ``values`` hold an empty map at the dotted ``path``."""
    for part in path:
        if not isinstance(values, dict):
            return False
        values = values.get(part)
    return values == {}


def manifest_state(
    run: Run,
    stage: str,
    *,
    code: str,
    config_hash: str,
    inputs: dict[str, Any],
    tables: Sequence[str],
    owned: dict[str, Path],
    config: dict[str, Any] | None = None,
) -> tuple[StageState, str]:
    """``done`` (the manifest matches the present), ``stale`` (something changed; the reason says
    what, naming the settings that moved when ``config``, the present values, is given) or
    ``missing`` (never ran, its last run stopped before the end, or an output is gone)."""
    manifest = run.read_manifest(stage)
    if manifest is None:
        # A stage removes its manifest before it computes (remove_manifest, which marks it
        # begun): tables of its, or the mark, and no manifest mean a run of it was stopped or
        # failed, not that it never ran.
        if any(run.has_table(name) for name in tables) or run.started_path(stage).is_file():
            return "missing", "its last run did not finish"
        return "missing", "never ran"
    recorded = manifest.get("outputs") or {}
    gone = [name for name in tables if not run.has_table(name)]
    if gone:
        # A table the stage did not write when it ran (a version of the stage from before it)
        # was never there: the run is behind, not damaged. One it wrote and lost is missing.
        written = recorded.get("tables") if isinstance(recorded, dict) else None
        lost = [name for name in gone if written is None or name in written]
        if lost:
            return "missing", f"table {lost[0]} is gone"
        return "stale", f"it ran before it wrote table {gone[0]}"
    if not isinstance(recorded, dict):  # a manifest written before outputs were fingerprinted
        return "stale", "its manifest predates output fingerprints"
    recorded_owned = recorded.get("owned") or {}
    # The settings first: an output's place may be one (train.output_dir), and a LoRA folder read
    # under another one than the stage wrote it to was said to be gone.
    moved = _settings_or_code_moved(manifest, config_hash, config, code)
    if moved is not None:
        return "stale", moved
    for label, path in owned.items():
        if recorded_owned.get(label) is not None and not path.exists():
            return "missing", f"its output {label} is gone"
    changed = _changed(manifest.get("inputs") or {}, plain(inputs))
    if changed:
        return "stale", f"its inputs changed ({', '.join(changed)})"
    fresh = plain(output_fingerprints(run, tables, owned))
    changed = _changed(recorded.get("tables") or {}, fresh["tables"])
    changed += _changed(recorded_owned, fresh["owned"])
    if changed:
        return "stale", f"its output changed since it ran ({', '.join(sorted(changed))})"
    return "done", "up to date"


def _settings_or_code_moved(
    manifest: dict[str, Any], config_hash: str, config: dict[str, Any] | None, code: str
) -> str | None:
    """Why a stage's settings or code no longer match its manifest, or None. The config first:
    which detector runs is a setting, and its code follows the choice (a switch of
    extract.detector read "its code changed")."""
    stored = manifest.get("config")
    moved = settings_moved(stored, config) if stored and config is not None else None
    if manifest.get("config_hash") != config_hash and moved != []:
        if manifest.get("code_hash") != code and moved and not any(_recorded(stored, k) for k in moved):
            # Only settings its record lacks: they came with the new code (an upgrade), and
            # "batch_threads (unrecorded) -> 0" named a setting nobody touched as the cause.
            new = ", ".join(_present_name(k) for k in moved[:3]) + (" ..." if len(moved) > 3 else "")
            return f"its code changed (and it reads settings it did not record: {new})"
        changes = config_changes(stored, config)
        return f"its config changed: {changes}" if changes else "its config changed"
    if manifest.get("code_hash") != code:
        return "its code changed"
    return None


def remove_manifest(run: Run, stage: str) -> None:
    """Invalidate a stage before it computes: a run killed halfway (or failed) leaves it
    ``missing``, marked as begun (:meth:`Run.started_path`) until its manifest is written."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(run.manifest_path(stage))
    atomic_write_bytes(run.started_path(stage), datetime.now(UTC).isoformat().encode())


# --------------------------------------------------------------------------------- running


def _missing_input(run: Run, pipeline: Pipeline, stage: Stage, reads: Reads) -> StageError:
    return StageError(
        f"table '{reads.table}' is missing in {run.run_dir}; run stage {reads.producer} first "
        f"(bunny run MOVIE --stages {pipeline.upto(stage.name)})"
    )


def _present(run: Run, reads: Reads) -> bool:
    if not run.has_table(reads.table):
        return False
    if reads.nonempty:
        return run.table_height(reads.table) > 0
    return True


def _own_tables(stage: Stage, pipeline: Pipeline) -> set[str]:
    """Tables no stage writes but the report (its own outputs) are left out of its inputs."""
    return set(stage.writes)


def declared_inputs(run: Run, pipeline: Pipeline, stage: Stage, view: ConfigView) -> dict[str, Any]:
    """Fingerprints of everything the stage declared it reads; a required table that is missing
    is one :class:`StageError` naming the stage that writes it."""
    inputs: dict[str, Any] = {}
    for reads in stage.reads:
        if _present(run, reads):
            inputs[reads.table] = run.table_fingerprint(reads.table, reads.columns)
        elif not reads.optional:
            raise _missing_input(run, pipeline, stage, reads)
    if stage.reads_every_table and run.tables_dir.is_dir():
        own = _own_tables(stage, pipeline)
        for path in sorted(run.tables_dir.glob("*.parquet")):
            if path.stem not in own:
                inputs[path.stem] = run.table_fingerprint(path.stem)
    if stage.inputs is not None:
        inputs.update(stage.inputs(run, view))
    return inputs


def stage_summary(stage: Stage, manifest: dict[str, Any], run_dir: Path) -> str:
    """``stage``'s one line on its last run, its manifest given ``run_folder``: a fact of a file
    in the run folder is relative to it (:func:`~diffusion_bunny.pipeline.run.run_fact`), so a
    moved or copied folder's summary names its own files."""
    return stage.summary({**manifest, "run_folder": str(run_dir)})


def owned_paths(run: Run, stage: Stage, view: ConfigView) -> dict[str, Path]:
    return stage.owns(run, view) if stage.owns is not None else {}


def stage_state(pipeline: Pipeline, run: Run, name: str, cfg: RunConfig) -> tuple[StageState, str]:
    """``done``/``stale``/``missing`` for one stage of a run, with the reason."""
    stage = pipeline.get(name)
    view = stage.view(cfg)
    return manifest_state(
        run,
        name,
        code=stage.code(cfg),
        config_hash=cfg.section_hash(*stage.config),
        inputs=_inputs_now(pipeline, run, stage, view, cfg)[0],
        tables=stage.writes,
        owned=owned_paths(run, stage, view),
        config=cfg.section_values(*stage.config),
    )


def _behind(pipeline: Pipeline, run: Run, producer: Stage, cfg: RunConfig) -> str | None:
    """Why the tables ``producer`` wrote are older than what makes them now, or None.

    Unlike :func:`manifest_state` this leaves out what a person's edit changes: an edit is
    committed into the stage's own tables at once (:meth:`Run.commit` ``by_hand``), so its tables
    and its edit tables moving since it ran do not make what it wrote out of date."""
    manifest = run.read_manifest(producer.name)
    if manifest is None:
        return "its last run did not finish"
    config = cfg.section_values(*producer.config)
    moved = _settings_or_code_moved(manifest, cfg.section_hash(*producer.config), config, producer.code(cfg))
    if moved is not None:
        return moved
    edits = set(producer.edits)
    fresh = plain(declared_inputs(run, pipeline, producer, producer.view(cfg)))
    changed = [n for n in _changed(manifest.get("inputs") or {}, fresh) if n not in edits]
    return f"its inputs changed ({', '.join(changed)})" if changed else None


def behind_producers(
    pipeline: Pipeline, run: Run, stage: Stage, cfg: RunConfig, every: dict[str, str] | None = None
) -> list[str]:
    """One warning per stage whose tables ``stage`` reads and which is out of date.

    ``bunny run`` runs the stages in order, so this only speaks in a notebook run out of order:
    stage 03 run again in notebook 03 and then stage 06 without stage 05 would otherwise export
    captions naming the old characters beside crops naming the new ones, without a word. A stage
    that reads every table (the report) gets one line naming every stage behind
    (:func:`_behind_every_table`; ``every``: those stages, when the caller has them already)."""
    if stage.reads_every_table:
        every = every if every is not None else _stages_behind(pipeline, run, stage, cfg)
        return _behind_every_table(pipeline, run, stage, every)
    read = [r for r in stage.reads if r.producer != stage.name and _present(run, r)]
    lines: list[str] = []
    for name in dict.fromkeys(r.producer for r in read):
        try:
            reason = _behind(pipeline, run, pipeline.get(name), cfg)
        except (UserError, OSError):  # the producer cannot tell (its inputs gone, its reference
            continue  # folder moved): its own run says so; this stage reads only its tables
        if reason is not None:
            tables = ", ".join(r.table for r in read if r.producer == name)
            # Every stage from the producer to this one: those between may read the producer's
            # tables too (stage 05's captions name stage 03's characters), and "characters,export"
            # exported new crops beside old captions, with the next warning.
            order = [s.name for s in pipeline.stages]
            then = order[order.index(name) + 1 : order.index(stage.name) + 1] or [stage.name]
            lines.append(
                f"stage {stage.name} read {tables} from stage {name}, which is out of date ({reason}): "
                f"run stage {name} again, then {', '.join(then)} (bunny run MOVIE --stages "
                f"{','.join([name, *then])}, or their notebooks)"
            )
    return lines


def _inputs_now(
    pipeline: Pipeline, run: Run, stage: Stage, view: ConfigView, cfg: RunConfig
) -> tuple[dict[str, Any], dict[str, str] | None]:
    """:func:`declared_inputs`, and for a stage that reads every table (the report) the names of
    the stages behind (:func:`_stages_behind`, also returned: judged once per run of the stage):
    its page names them, so it is stale when they change (it kept naming a stage that a rerun
    had brought up to date with the same tables, and a setting changed with no rerun found it
    up to date, unsaid)."""
    inputs = declared_inputs(run, pipeline, stage, view)
    behind = _stages_behind(pipeline, run, stage, cfg) if stage.reads_every_table else None
    if behind is not None:
        inputs["stages behind"] = sorted(behind)
    return inputs, behind


def _stages_behind(pipeline: Pipeline, run: Run, stage: Stage, cfg: RunConfig) -> dict[str, str]:
    """``{stage: why it is out of date}`` of the other stages whose tables are there."""
    behind: dict[str, str] = {}
    for other in pipeline.stages:
        if other.name == stage.name or not any(run.has_table(t) for t in other.writes):
            continue
        try:
            reason = _behind(pipeline, run, other, cfg)
        except (UserError, OSError):  # it cannot tell (its inputs gone): its own run says so
            continue
        if reason is not None:
            behind[other.name] = reason
    return behind


def _behind_every_table(pipeline: Pipeline, run: Run, stage: Stage, behind: dict[str, str]) -> list[str]:
    """The one line for a stage that reads every table (the report), or none: the stages whose
    tables are there and which are out of date, and what to run again (each of them and every
    stage after the first that has run, then this one).

    Why: ``bunny run --stages quality,report`` drew stage 06's dataset of the old frames beside
    stage 02's new ones (an export of 7 frames out of 5 kept, 2 of them dropped since) as if
    they belonged together; the page now says which stages its figures are behind."""
    if not behind:
        return []
    order = [s.name for s in pipeline.stages]
    later = order[order.index(next(iter(behind))) : order.index(stage.name)]
    again = [n for n in later if n in behind or run.read_manifest(n) is not None] + [stage.name]
    named = "; ".join(f"{name} ({reason})" for name, reason in behind.items())
    return [
        f"stage {stage.name} read the tables of stages that are out of date: {named}; "
        f"run them again (bunny run MOVIE --stages {','.join(again)}, or their notebooks)"
    ]


def _read_declared(run: Run, stage: Stage) -> dict[str, pl.DataFrame | None]:
    tables: dict[str, pl.DataFrame | None] = {}
    for reads in stage.reads:
        tables[reads.table] = run.read_table(reads.table) if _present(run, reads) else None
    if stage.reads_every_table and run.tables_dir.is_dir():
        own = set(stage.writes)
        for path in sorted(run.tables_dir.glob("*.parquet")):
            if path.stem not in own and path.stem not in tables:
                tables[path.stem] = run.read_table(path.stem)
    return tables


def run_stage(
    pipeline: Pipeline, run: Run, name: str, cfg: RunConfig, *, force: bool = False, progress: bool = True
) -> dict[str, pl.DataFrame]:
    """Run one stage (or skip it when its manifest matches) and return the tables it wrote.

    Logs what it does to ``diffusion_bunny``'s logger, and (in a kernel or worker ``bunny``
    started) to the command's log file, :func:`diffusion_bunny.logs.attach_from_env`. Holds the
    run folder throughout (:meth:`Run.lock`: a second run of the folder stops at once, naming the
    holder; inside ``bunny run`` the stage works under the run's own lock), and writes the tables
    through :meth:`Run.commit`, folding in the edits people made meanwhile (:attr:`StageOutput.merge`)."""
    attach_from_env()
    with run.lock(f"stage {name}", cfg.pipeline.lock_stale_s):
        return _run_stage_locked(pipeline, run, name, cfg, force=force, progress=progress)


def relocate_if_moved(pipeline: Pipeline, run: Run, name: str, cfg: RunConfig) -> None:
    """Rewrite an up-to-date stage's files that name the run folder's place where the folder
    moved (:func:`_relocated`): what ``bunny run`` does for a stage it skips. Run only by
    :func:`run_stage`, a copied folder's export was "up to date, skipped" under ``bunny run``
    and its trainer files pointed into the other run."""
    stage = pipeline.get(name)
    if stage.relocate is not None:  # most stages name no place: no manifest to read for them
        _relocated(run, stage, stage.view(cfg))


def _relocated(run: Run, stage: Stage, view: ConfigView) -> None:
    """An up-to-date stage's files that name the run folder's place rewritten where the folder
    moved (:attr:`Stage.relocate`), and its manifest's facts and fingerprints of what it owns
    taken again: the stage stays up to date, its work not done twice for a copy of a folder."""
    manifest = run.read_manifest(stage.name)
    if stage.relocate is None or manifest is None:
        return
    changed = stage.relocate(run, view, manifest.get("facts") or {})
    if not changed:
        return
    manifest["facts"] = {**(manifest.get("facts") or {}), **changed}
    owned = owned_paths(run, stage, view)
    manifest["outputs"]["owned"] = plain({label: path_fingerprint(path) for label, path in owned.items()})
    run.write_manifest(stage.name, manifest)
    log.info("%s: %s's files rewritten for the folder's new place", run.run_dir.name, stage.name)


def _commit_tables(
    pipeline: Pipeline, run: Run, stage: Stage, view: ConfigView, out: StageOutput, inputs: dict[str, Any]
) -> tuple[dict[str, pl.DataFrame], dict[str, Any]]:
    """Write a stage's tables, merged with what people edited meanwhile, and the inputs it settled on.

    The locks of the tables people edit are held too, so no edit lands between the merge and the writes.
    """
    with run.commit(*stage.writes, *stage.edits) as tables:
        merged = out.merge(out.tables) if out.merge is not None else out.tables
        tables.update({table: merged[table] for table in stage.writes})
        if out.settled:
            fresh = declared_inputs(run, pipeline, stage, view)
            given = {key: value for key, value in out.settled.items() if value is not None}
            inputs = {**inputs, **{k: fresh[k] for k in out.settled if k in fresh}, **given}
    return tables, inputs


def _run_stage_locked(
    pipeline: Pipeline, run: Run, name: str, cfg: RunConfig, *, force: bool, progress: bool
) -> dict[str, pl.DataFrame]:
    stage = pipeline.get(name)
    view = stage.view(cfg)
    inputs, ahead = _inputs_now(pipeline, run, stage, view, cfg)
    config_hash = cfg.section_hash(*stage.config)
    code = stage.code(cfg)
    owned = owned_paths(run, stage, view)
    state, reason = manifest_state(
        run,
        name,
        code=code,
        config_hash=config_hash,
        inputs=inputs,
        tables=stage.writes,
        owned=owned,
        config=cfg.section_values(*stage.config),
    )
    if state == "done" and not force:
        _relocated(run, stage, view)
        log.info("%s: %s up to date (config %s), tables read back", run.run_dir.name, name, config_hash)
        return {table: run.read_table(table) for table in stage.writes}
    log.info(
        "%s: %s starts (%s; config %s of %s; code %s)",
        run.run_dir.name,
        name,
        "forced" if state == "done" else reason,
        config_hash,
        ", ".join(stage.config),
        code,
    )
    t0 = time.monotonic()
    behind = behind_producers(pipeline, run, stage, cfg, ahead)
    previous = run.read_manifest(name)
    remove_manifest(run, name)  # from here on a killed run leaves the stage missing, never done
    started = datetime.now(UTC)
    context = Context(
        stage=name,
        run=run,
        cfg=view,
        tables=_read_declared(run, stage),
        progress=progress,
        previous=previous,
        writes=stage.writes,
        forced=force,
        behind=tuple(behind),
    )
    for line in behind:
        log.warning("%s: %s", run.run_dir.name, line)
    with relaying(run.progress_path(name)):  # under `bunny run`: its lines and bars on the terminal
        out = stage.stage_module().compute(context)
    unexpected = set(out.tables) - set(stage.writes)
    if unexpected:  # pragma: no cover - a declaration bug
        raise RuntimeError(f"stage {name} returned tables it does not declare: {sorted(unexpected)}")
    tables, inputs = _commit_tables(pipeline, run, stage, view, out, inputs)
    manifest = build_manifest(
        name,
        code=code,
        config_hash=config_hash,
        config=cfg.section_values(*stage.config),
        inputs=inputs,
        outputs=output_fingerprints(run, stage.writes, owned_paths(run, stage, view)),
        counts=out.counts,
        seed=cfg.run.seed,
        started=started,
        warnings=[*behind, *out.warnings],
        facts=out.facts,
    )
    run.write_manifest(name, manifest)
    log.info("%s: %s done in %.1f s: %s", run.run_dir.name, name, time.monotonic() - t0, out.counts)
    for warning in [*behind, *out.warnings]:
        warnings.warn(warning, StageWarning, stacklevel=4)
    return tables
