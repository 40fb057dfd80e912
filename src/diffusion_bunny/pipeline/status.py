"""``bunny status``: each stage's state per movie, read from the manifests.

A run folder, a folder of run folders (``data/output``), a movie or a folder of movies (mapped
to their run folders as ``bunny run`` would) all work. Nothing is computed and no kernel starts:
each stage's inputs are fingerprinted (file sizes and hashes of small tables) and compared with
its manifest by :func:`diffusion_bunny.pipeline.contract.stage_state`, the same check ``bunny run`` makes
before it decides to skip a stage.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import polars as pl

from diffusion_bunny.errors import BadInputError, StageError, UserError
from diffusion_bunny.media.probe import probe_video, shown, unreadable
from diffusion_bunny.pipeline.contract import Pipeline, stage_state
from diffusion_bunny.pipeline.lock import current_holder
from diffusion_bunny.pipeline.recorded import as_flags, of_stages
from diffusion_bunny.pipeline.run import (
    Run,
    check_exists,
    check_run_folder,
    given_run_folder,
    movie_key,
    run_folder_in,
)
from diffusion_bunny.pipeline.settings import RunConfig, output_root


@dataclass(frozen=True)
class RunRef:
    """A movie's run folder (which may not exist yet) and the movie's name; ``run_dir`` None and
    ``problem`` the line saying why for a movie ``bunny run`` refuses (it cannot be read, is
    empty, is not a video or its name is not UTF-8: no run folder will ever be made for it) or
    whose ``--out`` is another movie's run folder (its stages are not this movie's: they were
    shown as this movie's)."""

    movie: str
    run_dir: Path | None
    problem: str | None = None
    #: The movie file asked about, where a movie was given (its content picks its run folder).
    path: Path | None = None


def _is_run(path: Path) -> bool:
    # Not ``.locks``: its lease is a run.json too (a folder run holds its --out as a run its folder).
    return not path.name.startswith(".") and (path / "run.json").is_file()


def _movie_name(run_dir: Path) -> str:
    try:
        meta = Run(run_dir).meta() or {}
    except UserError:  # a damaged run.json: the folder's name, its stages say what is wrong
        return run_dir.name
    return Path(meta.get("movie", run_dir.name)).name


def resolve_runs(
    target: str | Path | Sequence[str | Path], cfg: RunConfig, out: str | Path | None = None
) -> list[RunRef]:
    """The run folders ``target`` stands for: itself (a run folder), its sub-folders that are
    run folders, or the run folders of a movie / of the movies in a folder (under ``out``, else
    ``paths.output_dir``, as ``bunny run`` names them); of several targets, each one's in turn,
    their movies' run folders named as one ``bunny run`` of them all names them. Each run folder
    is listed once (``out`` may be the movies' folder, which then holds their run folders too),
    and of movies with the same content only the one ``bunny run`` runs (the others are named in
    one line each, as ``bunny run`` names them)."""
    # lazy: the runner (jupyter) is not needed by the report stage, which imports this module
    from diffusion_bunny.pipeline.runner import drop_copies

    targets = [target] if isinstance(target, (str, Path)) else list(target)
    found = _scan_targets(targets, cfg)
    movies = list(dict.fromkeys(item[0] for item in found if isinstance(item, tuple)))
    kept = set(drop_copies(movies))
    # A movie whose run folder the targets hold already (``bunny run FOLDER --out FOLDER``) is
    # that run folder: named again under paths.output_dir, where it never ran, it was listed twice,
    # done and never run. One that ran there too, or asked of an --out, is listed as before.
    ran = {_run_key(item.run_dir) for item in found if isinstance(item, RunRef)} - {None}
    refs: dict[Any, RunRef] = {}
    for item in found:
        if isinstance(item, tuple):
            movie, is_file = item
            if movie not in kept:
                continue
            item = _of_movie(movie, cfg, out, single=is_file and len(targets) == 1)
            elsewhere = item.run_dir is None or not _is_run(item.run_dir)
            if not out and elsewhere and item.problem is None and _key_of(movie) in ran:
                continue
        refs.setdefault(item.run_dir or item.path or item.movie, item)
    return _named_apart(list(refs.values()))


def _named_apart(refs: list[RunRef]) -> list[RunRef]:
    """Movies of one file name in two folders, each named by its path: two refused ``E01.mkv``
    (no run folder) were one block, the second's problem never shown."""
    names = [ref.movie for ref in refs]
    return [
        replace(ref, movie=str(ref.path)) if names.count(ref.movie) > 1 and ref.path is not None else ref
        for ref in refs
    ]


def _run_key(run_dir: Path | None) -> str | None:
    """The movie key a run folder's ``run.json`` records (None when it cannot say)."""
    try:
        return (Run(run_dir).meta() or {}).get("movie_key") if run_dir is not None else None
    except UserError:
        return None


def _key_of(movie: Path) -> str | None:
    try:
        return movie_key(movie)
    except OSError:  # unreadable: its own line says so
        return None


def _of_movie(movie: Path, cfg: RunConfig, out: str | Path | None, single: bool) -> RunRef:
    """A movie's run folder; ``single``: a movie file given alone, whose run folder is ``out``.
    A movie ``bunny run`` refuses (its probe: a name that is not UTF-8, an empty file, one that
    is not a video, one it may not read) has none: it was shown as "never ran" with a run folder
    that no run would ever make."""
    root = Path(out) if out else output_root(cfg)
    try:
        probe_video(movie)
    except BadInputError as exc:
        return RunRef(movie.name, None, str(exc), path=movie)
    try:
        # ``out`` of a folder run (or of several movies) holds one run folder per movie
        own = given_run_folder(out, movie) if (out and single) else run_folder_in(root, movie)
    except OSError as exc:  # its id reads the file: no run folder to name
        return RunRef(movie.name, None, str(unreadable(movie, exc)), path=movie)
    run_dir = own
    if out and single and run_dir == Path(out):
        try:  # another movie's run folder: its stages are not this movie's (bunny run refuses it)
            check_run_folder(run_dir, movie)
        except StageError as exc:
            return RunRef(movie.name, None, str(exc), path=movie)
        except OSError as exc:
            return RunRef(movie.name, None, str(unreadable(movie, exc)), path=movie)
    return RunRef(movie.name, run_dir.resolve(), path=movie)


def _scan(target: str | Path, cfg: RunConfig) -> list[RunRef | tuple[Path, bool]]:
    """What one target holds, in order: run folders found, and movies as ``(path, whether the
    target is that movie file)``. A file named is a movie whatever its extension, as
    ``runner.find_movies`` takes it (``bunny run anim.gif`` ran and ``bunny status anim.gif`` was
    refused); ``run.video_extensions`` picks only a folder's movies."""
    target = check_exists(target)
    exts = {e.lower() for e in cfg.run.video_extensions}
    if target.is_dir() and _is_run(target):
        return [RunRef(_movie_name(target), target.resolve())]
    if target.is_file():
        return [(target, True)]
    if target.is_dir():
        runs: list[RunRef | tuple[Path, bool]] = [
            RunRef(_movie_name(p), p.resolve()) for p in sorted(target.iterdir()) if p.is_dir() and _is_run(p)
        ]
        movies = sorted(
            p
            for p in target.iterdir()
            if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in exts
        )
        if runs or movies:
            return runs + [(m, False) for m in movies]
    raise BadInputError(
        f"{target}: neither a run folder (with run.json), a folder of run folders, a movie nor a folder "
        "of movies; give one of those"
    )


def _scan_targets(targets: list[str | Path], cfg: RunConfig) -> list[RunRef | tuple[Path, bool]]:
    """What several targets (a shell's ``DIR/*``) hold, as ``bunny run`` takes them
    (``runner._movies_of_targets``): a file not named as a video (subtitles, a poster) and a
    folder that holds neither run folders nor movies (``extras/``) are passed over when another
    target gives something. Each file was a movie refused, and such a folder stopped the command,
    while ``bunny run`` of the same targets ran."""
    if len(targets) == 1:
        return _scan(targets[0], cfg)
    exts = {e.lower() for e in cfg.run.video_extensions}
    found: list[RunRef | tuple[Path, bool]] = []
    files: list[RunRef | tuple[Path, bool]] = []
    folders: list[Path] = []
    for one in targets:
        path = check_exists(one)
        if path.is_file() and path.suffix.lower() not in exts:
            files.append((path, True))
            continue
        try:
            found += _scan(path, cfg)
        except BadInputError:
            folders.append(path)
    if not found:
        if not files:
            raise BadInputError(
                f"none of the {len(targets)} targets is a run folder, a movie or a folder of either "
                f"({', '.join(p.name + '/' for p in folders[:4])}); give one of those"
            )
        return files  # only files named otherwise: each a movie as typed, as bunny run takes them
    return found


def run_status(
    pipeline: Pipeline, run_dir: Path, cfg: RunConfig, stages: list[str] | None = None
) -> list[tuple[str, str, str]]:
    """``(stage, state, reason)`` for each stage of one run folder; a folder that does not exist
    yet has every stage missing."""
    return [row[:3] for row in _run_rows(pipeline, run_dir, cfg, stages)]


@dataclass(frozen=True)
class _AskedRun(Run):
    """A run folder judged with the movie file status was asked about (its content the folder's
    movie, at another path: renamed, or kept in an archive beside a new cut at the old path), as
    ``bunny run`` of that file judges it once it has recorded the new path in ``run.json``."""

    asked: Path = Path()

    def meta(self) -> dict[str, Any] | None:
        meta = super().meta()
        return None if meta is None else {**meta, "movie": str(self.asked.resolve())}


def _as_asked(run: Run, asked: Path | None) -> Run:
    """``run``, or an :class:`_AskedRun` of it where ``asked`` has the folder's movie's content at
    another path (the folder's recorded movie gone, renamed or replaced): its stages showed stale
    ("its inputs changed (movie)", "the movie of this run is gone"), which a run finds done."""
    if asked is None:
        return run
    with contextlib.suppress(OSError, UserError):
        meta = run.meta() or {}
        if Path(str(meta.get("movie"))) != asked.resolve() and movie_key(asked) == meta.get("movie_key"):
            return _AskedRun(run.run_dir, asked)
    return run


def _run_rows(
    pipeline: Pipeline,
    run_dir: Path,
    cfg: RunConfig,
    stages: list[str] | None = None,
    run: Run | None = None,
) -> list[tuple[str, str, str, list[str]]]:
    """Each stage's state, reason and what it keeps; ``run``: the folder opened as it is to be
    judged (:func:`_as_asked`), else ``run_dir`` as it is."""
    stages = stages or pipeline.names()
    if not _is_run(run_dir):
        return [(stage, "missing", "never ran", []) for stage in stages]
    run = run or Run.open(run_dir)
    out = []
    for stage in stages:
        try:
            state, reason = stage_state(pipeline, run, stage, cfg)
        except UserError as exc:
            # An input is missing (an earlier stage never ran, the movie moved): the stage cannot
            # be up to date; the message says what to do.
            state = "stale" if run.read_manifest(stage) else "missing"
            reason = str(exc)
        out.append((stage, state, reason, _kept(pipeline, run, stage, cfg)))
    return out


def _kept(pipeline: Pipeline, run: Run, stage: str, cfg: RunConfig) -> list[str]:
    """What ``stage`` keeps beside its outputs (each LoRA of stage 07), or why it cannot say."""
    spec = pipeline.get(stage)
    if spec.kept is None:
        return []
    try:
        return spec.kept(run, spec.view(cfg))
    except UserError as exc:
        return [f"(cannot list: {exc})"]


def _replaced_movie(run_dir: Path) -> str | None:
    """The line for a run folder whose movie's path now holds another file (its key, size and
    first megabyte, differs from the one ``run.json`` records), else None. Its stages were judged
    against the new file and shown stale ("its inputs changed (movie)") for good: ``bunny run``
    takes the new file to a run folder of its own and refuses this one as another movie's."""
    try:
        meta = Run(run_dir).meta() or {}
    except UserError:  # damaged: its stages say so
        return None
    recorded, key = meta.get("movie"), meta.get("movie_key")
    if not isinstance(recorded, str) or not key or not Path(recorded).is_file():
        return None  # moved or gone: the stages say so
    try:
        now = movie_key(recorded)
    except OSError:
        return None
    if now == key:
        return None
    return (
        f"{shown(Path(recorded).name)} is now another file; this run folder holds the earlier file's run "
        "(remove it when its results are no longer needed)"
    )


def settings_note(run: Run, asked: dict[str, Any]) -> str | None:
    """A line when the run's last ``bunny run`` was given other settings than this command
    (``asked``: its ``config_path`` and ``overrides``), else None. Why: a stage of a run made with
    ``--characters`` read "stale (its config changed: characters.reference_dir ... -> None)" to a
    ``bunny status`` typed without it, with nothing saying that the command's own settings are
    what the stages are judged by."""
    recorded = run.settings()
    if recorded is None:
        return None
    # Where the stages run is in no stage's settings (engine.kind, engine.address)
    recorded, asked = (of_stages(r) for r in (recorded, asked))
    if recorded == asked:
        return None
    return (
        f"its last bunny run was given {as_flags(recorded)}; judged here by this command's "
        f"({as_flags(asked)}): give the same to judge by those"
    )


def status_table(
    pipeline: Pipeline, refs: list[RunRef], cfg: RunConfig, asked: dict[str, Any] | None = None
) -> pl.DataFrame:
    """One row per movie and stage: ``movie``, ``run_dir``, ``stage``, ``state``, ``reason``,
    ``kept`` (what the stage keeps beside its outputs, e.g. every LoRA of stage 07), ``in_use``
    (the process holding the run folder now, if any) and ``note`` (:func:`settings_note`, when
    ``asked`` is given). ``state`` is ``replaced`` in each row of a run folder whose movie's path
    now holds another file, ``reason`` the line saying so."""
    rows = []
    for ref in refs:
        states: list[tuple[str, str, str, list[str]]]
        is_run = ref.run_dir is not None and _is_run(ref.run_dir)
        # The movie asked about may be this folder's movie kept at another path (an archive of
        # the episode beside its new cut): bunny run goes on in this folder with it.
        run = _as_asked(Run.open(ref.run_dir), ref.path) if is_run else None
        replaced = _replaced_movie(ref.run_dir) if is_run and not isinstance(run, _AskedRun) else None
        if ref.run_dir is None:  # the movie cannot be read: every stage missing, saying why
            states = [(stage, "missing", ref.problem or "", []) for stage in pipeline.names()]
        elif replaced is not None:  # judged against the new file, each stage was stale for good
            states = [(s, "replaced", replaced, _kept(pipeline, run, s, cfg)) for s in pipeline.names()]
        else:
            states = _run_rows(pipeline, ref.run_dir, cfg, run=run)
        holder = current_holder(ref.run_dir, cfg.pipeline.lock_stale_s) if is_run else None
        note = settings_note(run, asked) if run is not None and asked is not None else None
        for stage, state, reason, kept in states:
            rows.append(
                {
                    "movie": shown(ref.movie),  # a name that is not UTF-8, escaped
                    "run_dir": shown(ref.run_dir) if ref.run_dir else None,
                    "stage": stage,
                    "state": state,
                    "reason": reason,
                    "kept": kept,
                    "in_use": holder.describe() if holder is not None else None,
                    "note": note,
                }
            )
    return pl.DataFrame(
        rows,
        schema={
            "movie": pl.Utf8,
            "run_dir": pl.Utf8,
            "stage": pl.Utf8,
            "state": pl.Utf8,
            "reason": pl.Utf8,
            "kept": pl.List(pl.Utf8),
            "in_use": pl.Utf8,
            "note": pl.Utf8,
        },
    )


def format_status(table: pl.DataFrame) -> str:
    """Plain text for the terminal: one block per movie, one line per stage (and one per thing
    a stage keeps, such as each LoRA); of an earlier file's run folder one line for all."""
    lines = []
    width = max([len(s) for s in table["stage"].to_list()] + [5])
    for (movie, run_dir), part in table.group_by(["movie", "run_dir"], maintain_order=True):
        done = int((part["state"] == "done").sum())
        replaced = bool((part["state"] == "replaced").all())
        told = "an earlier file's run" if replaced else f"{done} of {part.height} stages done"
        lines.append(f"{movie}  ({run_dir or 'no run folder'}; {told})")
        in_use = part["in_use"][0] if "in_use" in part.columns else None
        if in_use:
            lines.append(f"  in use by {in_use}")
        note = part["note"][0] if "note" in part.columns else None
        if note:
            lines.append(f"  {note}")
        if replaced:  # one line for the run folder, not one stale line per stage
            lines.append(f"  {part['reason'][0]}")
        for row in part.iter_rows(named=True):
            reason = "" if row["state"] == "done" else f"  ({row['reason']})"
            if not replaced:
                lines.append(f"  {row['stage']:<{width}}  {row['state']}{reason}")
            for item in row.get("kept") or []:
                # under its stage's line; of an earlier file's run (no stage lines), named
                lines.append(f"  {'' if not replaced else row['stage']:<{width}}    kept: {item}")
    return "\n".join(lines)
