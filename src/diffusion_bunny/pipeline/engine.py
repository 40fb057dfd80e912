"""Engines for many movies: one after another in this process, or one Ray task per movie.

Both engines call the same per-movie function (:func:`run_one`, i.e. ``runner.run_movie``: the
stage notebooks through papermill, each stage skipped when its manifest matches), so run
folders, manifests and executed notebooks are the same whichever engine made them, a batch
interrupted on one engine resumes on the other, and a bad movie is reported while the others
still run.

Ray (``--engine ray``) starts a local cluster on this machine unless ``--address`` names one to
join. Ray's workers on a local cluster run this process's Python (the project's venv), so the
papermill kernel they start is the project's ``python3`` kernel as well. Ray's hook for
``uv run`` (which would copy the checkout into a fresh virtual environment per session, ~45 s
here) is switched off: the workers already have the environment. Joining a cluster needs every
node to have this project installed and to see the movies and the output folder at the same paths
(a shared file system).

Several machines (a joined cluster): every output must land where the user said, never in a
node's own checkout or working folder. So the head makes the run folders absolute before handing
them over, tasks resolve a relative ``train.output_dir`` or ``scenes.library_dir`` against the
head's workspace (``$DIFFUSION_BUNNY_WORKSPACE``: the settings, and so the stages' config hashes,
stay as written), the head writes a token into each folder (:func:`_visibility_tokens`) that
a task reads back before it starts (:func:`_check_visible`: a node that cannot see the folder, or
sees another disk at that path, fails at once in one line), and a task on another node than the
head logs into its run folder (``<run>/log/``, TensorBoard included) instead of the head's log
file, which that node cannot reach.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from diffusion_bunny.errors import EngineError, UserError, storage_error
from diffusion_bunny.logs import (
    ENV,
    FILE_ONLY,
    LOG_DIR_ENV,
    LOGGER,
    QUIET_ENV,
    attach_from_env,
    bar_options,
    held_lines,
    log_hint,
    terminal_attached,
    terminal_verbose,
)
from diffusion_bunny.media.probe import probe_video, shown, unreadable
from diffusion_bunny.paths import WORKSPACE_ENV, workspace_root
from diffusion_bunny.pipeline import lock
from diffusion_bunny.pipeline.atomic import atomic_write_bytes
from diffusion_bunny.pipeline.contract import Pipeline
from diffusion_bunny.pipeline.run import check_batch_folder, check_run_folder, given_run_folder, run_folder_in
from diffusion_bunny.pipeline.runner import (
    MovieReport,
    RunOptions,
    _say,
    drop_copies,
    find_movies,
    parse_stages,
    remove_orphan_sockets,
    run_movie,
)
from diffusion_bunny.pipeline.settings import RunConfig, output_root

log = logging.getLogger(__name__)
# The engine prints its own one-line errors; without a handler of ``bunny``'s (a Ray worker that
# cannot reach the log file, the Python API) its records would reach logging's last-resort
# handler and put a traceback on the terminal.
log.addHandler(logging.NullHandler())


def run_one(movie: Path, run_dir: Path | None, options: RunOptions) -> MovieReport:
    """One movie through the chosen stages. A user error (bad file, missing model...) becomes the
    report's ``error``, any other exception (a bug) the report's ``error`` with ``bug`` set and its
    traceback in the command's log file, instead of stopping the batch: the other movies still run
    and the combined report is still written (``bunny run`` then exits 1 for a bug, 2 for a user
    error). Each goes to the terminal as one line and to the log file. Interrupts (Ctrl-C) still
    stop the batch."""
    if run_dir is None:  # its folder under paths.output_dir, so a failed movie's report can read it
        with contextlib.suppress(OSError):  # an unreadable movie fails in run_movie, which says why
            run_dir = run_folder_in(output_root(options.cfg), movie)
    try:
        return run_movie(movie, run_dir, options)
    except Exception as exc:  # a bug in one movie must not cost the others their run
        return _failed(movie, run_dir, exc)


def _failed(movie: Path, run_dir: Path | None, exc: Exception) -> MovieReport:
    """The report (and the one line) of a movie that failed with ``exc``, in :func:`run_one` or
    on Ray's head before its task (:func:`_head_tokens`): both engines say the same."""
    if isinstance(exc, UserError):
        # In a folder run the line must name its movie (``no frames to cluster`` named none); a
        # message that names the file already is not prefixed again.
        name = shown(movie.name)  # a name that is not UTF-8, escaped as the message escapes it
        _tell(str(exc) if name in str(exc) else f"{name}: {exc}")
        return MovieReport(movie=movie, run_dir=run_dir, error=str(exc))
    storage = storage_error(exc) if isinstance(exc, OSError) else None
    if storage is None:
        return _bug(movie, run_dir, exc)
    _tell(f"{movie.name}: {storage}")
    return MovieReport(movie=movie, run_dir=run_dir, error=str(storage))


def _bug(movie: Path, run_dir: Path | None, exc: Exception) -> MovieReport:
    lines = str(exc).strip().splitlines() or [""]
    text = f"{type(exc).__name__}: {lines[0]}"
    # The traceback goes to the command's log file only (a Ray worker appends to the same file);
    # the terminal gets the one line (on Ray a worker's stderr is forwarded to the driver's).
    log.error("%s failed with a bug", movie, exc_info=exc, extra=FILE_ONLY)
    _tell(f"{movie.name}: failed with a bug ({text}); the other movies go on{log_hint('traceback')}")
    return MovieReport(movie=movie, run_dir=run_dir, error=text, bug=True)


def _tell(text: str) -> None:
    """One error line on the terminal and in the log file: through ``bunny``'s terminal handler
    (or a Ray task's :func:`~diffusion_bunny.logs.held_lines`), else (no such handler: the
    Python API) written, through ``tqdm.write`` so that it starts a line of its own under the
    movies' bar, not glued to it."""
    if terminal_attached():
        log.error(text)
        return
    log.error(text, extra=FILE_ONLY)
    tqdm.write(f"error: {text}", file=sys.stderr)


def run_local(jobs: Sequence[tuple[Path, Path | None]], options: RunOptions) -> list[MovieReport]:
    """``--engine local``: the movies one after another in this process."""
    bar = tqdm(jobs, desc="movies", unit="movie", disable=not options.progress, **bar_options())
    return [run_one(movie, run_dir, options) for movie, run_dir in bar]


def _prepare_ray_environment(address: str | None = None) -> None:
    """Before ray is imported: no copy of the checkout into a per-session venv (the workers run
    this venv's Python already), and no usage statistics sent anywhere.

    Joining a cluster (``address``) with a Ray token on this machine, and ``RAY_AUTH_MODE`` not
    set: the token is sent (``RAY_AUTH_MODE=token``). Ray 2.60's local ``ray.init`` writes
    ``~/.ray/auth_token``, and from then on ``ray start --head`` on that machine turns token
    authentication on, but a join by address sends no token unless told: after one local
    ``--engine ray`` run, the cluster the walkthrough starts next refused every ``--address``
    (the client sending a token joins a cluster without authentication all the same)."""
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address and "RAY_AUTH_MODE" not in os.environ and _ray_token_here():
        os.environ["RAY_AUTH_MODE"] = "token"


def _ray_token_here() -> bool:
    """Whether Ray finds an authentication token here: in ``RAY_AUTH_TOKEN``, the file
    ``RAY_AUTH_TOKEN_PATH`` names, or ``~/.ray/auth_token`` (where Ray looks, in that order)."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return True
    named = os.environ.get("RAY_AUTH_TOKEN_PATH")
    return Path(named).expanduser().is_file() if named else (Path.home() / ".ray" / "auth_token").is_file()


def start_ray(cfg: RunConfig) -> bool:
    """Connect to the cluster ``engine.address`` names, or start a local one; returns whether
    this call started Ray (and should shut it down). An already initialised Ray (a caller's own
    cluster, as the tests make) is used as it is."""
    _prepare_ray_environment(cfg.engine.address)
    import ray  # lazy: ray takes 1.2 s to import

    _quiet_ray_logs()
    if ray.is_initialized():
        return False
    engine = cfg.engine
    if engine.address:
        _check_reachable(engine.address)
    # Ray raises a bare Exception when its raylet does not register within its fixed 30 s (seen
    # on a busy 2-core machine), so any failure of ray.init is caught: it is the machine or the
    # cluster, not our bug, and deserves one line rather than a traceback.
    try:
        _init_ray(ray, engine)
    except Exception as exc:
        if engine.address or "timed out" not in _first_line(exc):
            raise _start_error(engine, exc) from None
        # A local start that only ran out of time: once more, after cleaning up.
        log.warning("starting a local Ray cluster timed out (%s); trying once more", _first_line(exc))
        _shutdown_ray(ray)
        try:
            _init_ray(ray, engine)
        except Exception as again:
            raise _start_error(engine, again) from None
    return True


def _quiet_ray_logs() -> None:
    """Under ``--quiet`` Ray's own warnings stay off the terminal too (its start printed "Token
    authentication is enabled for this Ray cluster..." above the final lines): its ``ray``
    logger, which Ray gives a terminal handler of its own when imported, shows errors only."""
    if os.environ.get(QUIET_ENV):
        logging.getLogger("ray").setLevel(logging.ERROR)


@contextlib.contextmanager
def _sigterm_kept() -> Iterator[Any]:
    """SIGTERM's handler as it was before the block, put back after it (the one before, or None
    off the main thread, where none can be set). Ray's start puts its own in the driver, and Ray's
    shutdown leaves the signal to the system's default (the process ends on it, no line, no
    cleanup), though Python still names bunny's handler: setting it again installs it again."""
    main = threading.current_thread() is threading.main_thread()
    before = signal.getsignal(signal.SIGTERM) if main else None
    try:
        yield before
    finally:
        if before is not None:  # None: not set from Python; nothing to put back
            signal.signal(signal.SIGTERM, before)


def _shutdown_ray(ray: Any) -> None:
    with _sigterm_kept():
        ray.shutdown()


def _init_ray(ray: Any, engine: Any) -> None:
    """Join ``engine.address``, else start a local cluster: ``address="local"``, because Ray's
    default joins whatever ``RAY_ADDRESS`` or a ``ray start --head`` left in /tmp/ray names, and
    then refused this call's local settings (object_store_memory) instead of starting one.

    SIGTERM keeps the handler it had: ``ray.init`` puts its own in the driver, which exits with
    status 15 (``sys.exit``), over ``bunny``'s, which stops the run with its one line, exit 143
    and its kernels closed. A SIGTERM to a folder run on Ray printed nothing and exited 15
    (stopping runs at random moments, python_script/stop_at_random.py). Ray's cluster is still
    shut down: by :func:`run_ray`'s cleanup, or here when the stop came while Ray started."""
    with _sigterm_kept() as before:
        try:
            try:
                _ray_init(ray, engine)
            except SystemExit as exc:
                # Ray's handler took a SIGTERM that came while Ray started: the signal again,
                # to the handler it was meant for (bunny's raises its interrupt here).
                if before is None or exc.code != signal.SIGTERM:
                    raise
                signal.signal(signal.SIGTERM, before)
                signal.raise_signal(signal.SIGTERM)
                # Still here: the signal is ignored where bunny runs (or its handler returns), but
                # Ray's start is cut short all the same: a failed start, one line, not exit 15.
                with contextlib.suppress(Exception):
                    ray.shutdown()
                raise RuntimeError("a SIGTERM cut its start short") from None
        except KeyboardInterrupt:
            # Stopped while Ray started: what it started so far (its node's processes, its
            # agents) would outlive the command, since run_ray's cleanup is not reached yet.
            with contextlib.suppress(Exception):
                ray.shutdown()
            raise


def _ray_init(ray: Any, engine: Any) -> None:
    if engine.address:
        ray.init(address=engine.address, log_to_driver=True, configure_logging=False)
    else:
        ray.init(
            address="local",
            num_cpus=engine.num_cpus,
            include_dashboard=False,
            object_store_memory=engine.object_store_mb * 1024 * 1024,
            log_to_driver=True,
            configure_logging=False,
        )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _start_error(engine: Any, exc: BaseException) -> EngineError:
    """One line for a Ray that would not start or join, with what to check."""
    first = _first_line(exc)
    if engine.address:
        token = (
            ""
            if os.environ.get("RAY_AUTH_MODE", "").lower() == "token"
            else (
                "; a cluster with token authentication needs its token here (RAY_AUTH_TOKEN, or the "
                "head's ~/.ray/auth_token: ray get-auth-token on the head prints it)"
            )
        )
        return EngineError(
            f"could not join the Ray cluster at {engine.address} ({first}); "
            f"check --address (ray start --head prints it) or leave it out for a local cluster{token}"
        )
    busy = " (a busy machine makes Ray's start time out)" if "timed out" in first else ""
    return EngineError(
        f"could not start a local Ray cluster ({first}); "
        f"check engine.num_cpus and engine.object_store_mb, or use --engine local{busy}"
    )


def _check_reachable(address: str) -> None:
    """Fail in a second on a ``host:port`` nobody listens at: Ray itself retries its connection
    20 times for about 40 s each before it gives up."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "://" in address:
        return  # "auto", or another form Ray understands: let Ray judge it
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=5):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise EngineError(
            f"could not join the Ray cluster at {address} (nothing answers there: {reason}); "
            "check --address (ray start --head prints it) or leave it out for a local cluster"
        ) from None


#: The file a task reads back to prove it sees a folder as the head wrote it.
VISIBLE = ".bunny-visible-{}"


def _ray_task(
    movie: Path,
    run_dir: Path | None,
    options: RunOptions,
    log_file: str | None = None,
    tokens: Sequence[tuple[Path, str]] = (),
    head_node: str | None = None,
    workspace: str | None = None,
    quiet: bool = False,
    verbose: bool = False,
) -> MovieReport:
    """What one Ray worker does for one movie: exactly what the local engine does, once it has
    seen the folders it writes to as the head wrote them (``tokens``, :func:`_check_visible`).
    On the head's node it logs to the command's file (the stage kernels it starts inherit the
    path); on another node (``head_node`` is not this one) into ``<run>/log/``, TensorBoard's
    events too, since the head's log folder is on a disk that node does not see. ``quiet``
    (``bunny --quiet``): its lines go to the log file only, errors still to the terminal;
    ``verbose`` (``--verbose``): its INFO lines are shown too. The
    lines it would show on a terminal come back in the report's ``lines``, which the head prints
    (:func:`~diffusion_bunny.logs.held_lines`)."""
    with held_lines(quiet, verbose) as lines:  # the head prints them (held_lines says why)
        report = _ray_movie(movie, run_dir, options, log_file, tokens, head_node, workspace, quiet)
    return replace(report, lines=list(lines))


def _ray_movie(
    movie: Path,
    run_dir: Path | None,
    options: RunOptions,
    log_file: str | None,
    tokens: Sequence[tuple[Path, str]],
    head_node: str | None,
    workspace: str | None,
    quiet: bool,
) -> MovieReport:
    """:func:`_ray_task`'s work, its terminal lines held."""
    import ray  # lazy: ray takes 1.2 s to import

    problem = _check_visible(tokens) or _foreign_run_folder(movie, run_dir)
    if problem is not None:
        text = f"{movie.name}: {problem}"
        _tell(text)
        return MovieReport(movie=movie, run_dir=run_dir, error=text)
    remote = head_node is not None and ray.get_runtime_context().get_node_id() != head_node
    saved = {k: os.environ.get(k) for k in (ENV, LOG_DIR_ENV, WORKSPACE_ENV, QUIET_ENV)}
    try:
        if quiet:
            os.environ[QUIET_ENV] = "1"
        else:
            os.environ.pop(QUIET_ENV, None)
        if workspace:
            os.environ[WORKSPACE_ENV] = workspace  # relative settings mean the head's workspace
        if remote and run_dir is not None:
            folder = Path(run_dir) / "log"
            folder.mkdir(parents=True, exist_ok=True)
            os.environ[LOG_DIR_ENV] = str(folder)
            os.environ[ENV] = str(folder / f"bunny-ray-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log")
            attach_from_env()
        elif log_file and Path(log_file).parent.is_dir():
            os.environ[ENV] = log_file
            attach_from_env()
        return run_one(movie, run_dir, options)
    finally:
        for key, value in saved.items():  # a Ray worker runs the next movie's task too
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        _detach_log()


def _foreign_run_folder(movie: Path, run_dir: Path | None) -> str | None:
    """:func:`~diffusion_bunny.pipeline.run.check_run_folder`'s line, asked before a task on
    another node writes its log into the run folder (which would make a new folder look used)."""
    try:
        check_run_folder(run_dir, movie) if run_dir is not None else None
    except UserError as exc:
        return str(exc)
    return None


def _detach_log() -> None:
    """Close the log files this task attached (the next task of this worker attaches its own)."""
    for lg in (logging.getLogger(LOGGER), logging.getLogger("py.warnings")):
        for handler in [h for h in lg.handlers if (h.get_name() or "") == f"{LOGGER}-file"]:
            lg.removeHandler(handler)
            handler.close()


def _check_visible(tokens: Sequence[tuple[Path, str]]) -> str | None:
    """None when this node reads back every token the head wrote (:func:`_visibility_tokens`),
    else the one line saying which folder it cannot see: a folder missing here, or another disk
    mounted at its path, would send the movie's outputs where no other node (and no rerun from
    the head) finds them."""
    for folder, token in tokens:
        try:
            seen = (Path(folder) / VISIBLE.format(token)).read_text() == token
        except OSError:
            seen = False
        if not seen:
            return (
                f"Ray node {socket.gethostname()} cannot see {folder} as the head wrote it (the folder is "
                "not there, or another disk is mounted at that path); the run folder (and "
                "train.output_dir) must be on storage every node sees, at the same path"
            )
    return None


def _head_tokens(movie: Path, run_dir: Path, options: RunOptions) -> list[tuple[Path, str]] | MovieReport:
    """A movie's tokens (:func:`_visibility_tokens`), written once its run folder passed the check
    the local engine makes (:func:`~diffusion_bunny.pipeline.run.check_run_folder`); else that
    movie's report and line, and the others run. A run folder that was a file stopped the whole
    batch with ``bug: FileExistsError``, and a folder of the user's own got a token written into it."""
    try:
        check_run_folder(run_dir, movie)
        return _visibility_tokens(movie, run_dir, options)
    except Exception as exc:  # as run_one: this movie's report, not the batch's end
        return _failed(movie, run_dir, exc)


def _visibility_tokens(movie: Path, run_dir: Path, options: RunOptions) -> list[tuple[Path, str]]:
    """Write a token into the folders a movie's task writes to (its run folder, and
    ``train.output_dir`` when it trains or draws), for the task to read back
    (:func:`_check_visible`)."""
    folders = [run_dir]
    output_dir = options.cfg.train.output_dir
    if output_dir and {"train", "generate"} & set(options.stages):
        out = Path(output_dir).expanduser()
        folders.append(out if out.is_absolute() else workspace_root() / out)
    tokens = []
    for folder in folders:
        token = uuid.uuid4().hex
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(folder / VISIBLE.format(token), token.encode())
        tokens.append((folder, token))
    return tokens


def _remove_tokens(tokens: Sequence[tuple[Path, str]]) -> None:
    for folder, token in tokens:
        (Path(folder) / VISIBLE.format(token)).unlink(missing_ok=True)


def task_timeout(cfg: RunConfig, stages: Sequence[str], movie_s: float | None = None) -> float | None:
    """Seconds one movie's Ray task may take: ``engine.task_timeout_s``; else, for
    ``pipeline.stage_timeout_s: auto``, the base once (one slow stage: a download, a training) and
    each stage's share per minute of movie; for a number, that number per stage (None: no limit).
    Why not the base per stage: nine stages of a day each let a hung task hold a worker for nine days."""
    if cfg.engine.task_timeout_s:
        return float(cfg.engine.task_timeout_s)
    pipe = cfg.pipeline
    if pipe.stage_timeout_s == "auto":
        minutes = (movie_s if movie_s is not None else 3 * 3600.0) / 60.0
        return pipe.stage_timeout_base_s + pipe.stage_timeout_per_minute_s * minutes * max(1, len(stages))
    if pipe.stage_timeout_s:
        return float(pipe.stage_timeout_s) * max(1, len(stages))
    return None


def _node_cpus(ray: Any) -> list[float]:
    """The CPUs of each live node of the cluster (the whole cluster's as one node when Ray lists
    none): a task's CPUs must fit on one node, not only in the cluster's sum."""
    cpus = [float(n.get("Resources", {}).get("CPU", 0.0)) for n in ray.nodes() if n.get("Alive", True)]
    return cpus or [float(ray.cluster_resources().get("CPU", 0.0))]


def _check_fits(ray: Any, cfg: RunConfig) -> None:
    """Refuse ``engine.cpus_per_movie`` above the largest node's CPUs before any task or run
    folder: Ray would keep such a task queued forever, and the batch waited out the task's time
    limit (hours by default) to say only that it was cancelled."""
    largest = max(_node_cpus(ray))
    wanted = cfg.engine.cpus_per_movie
    if wanted > largest:
        raise EngineError(
            f"engine.cpus_per_movie {wanted:g} is more than the {largest:g} CPU(s) of the cluster's "
            "largest node; lower it"
        )


def _capacity(ray: Any, cfg: RunConfig) -> int:
    """How many movies the cluster runs at once: per node its CPUs // ``engine.cpus_per_movie``,
    summed (the cluster's sum would count CPUs split across nodes, which no task can use), at least 1."""
    return max(1, sum(int(cpus // cfg.engine.cpus_per_movie) for cpus in _node_cpus(ray)))


def run_ray(jobs: Sequence[tuple[Path, Path | None]], options: RunOptions) -> list[MovieReport]:
    """``--engine ray``: one task per movie (``engine.cpus_per_movie`` CPUs each) on a local or
    joined cluster; reports come back in the movies' order. A task that died of a bug is
    reported with ``bug`` set, after the other movies finished: a bug inside :func:`run_one`
    comes back as such a report, a worker that died (killed, out of memory) as a ``RayError``.

    Hangs are bounded: a task still running :func:`task_timeout` seconds after it was
    handed to Ray is cancelled (its worker killed, its stage kernel exits with it) and its movie
    reported as failed like a user error; the batch goes on. Ray is handed only as many tasks as
    the cluster's nodes fit at once (:func:`_capacity`), so on a cluster this batch has to itself
    that clock counts a task's run, not a wait in Ray's queue; other jobs holding the cluster's
    CPUs make a task wait, and that wait counts. A task that fits on no node is refused before
    any starts (:func:`_check_fits`).
    Every task first checks that its node sees the folders it writes to (the module docstring)."""
    cfg = options.cfg
    jobs = _ray_jobs(jobs, cfg)
    probed = [_movie_seconds(movie) for movie, _ in jobs]
    tokens: dict[int, list[tuple[Path, str]]] = {}
    bar, started = None, False
    try:  # from Ray's start on: a stop right after it still shuts it down
        started = start_ray(cfg)
        import ray  # lazy: ray takes 1.2 s to import

        _check_fits(ray, cfg)
        task = ray.remote(num_cpus=cfg.engine.cpus_per_movie, max_retries=0)(_ray_task)
        # Workers draw no terminal bars (their stderr is forwarded line by line).
        remote = replace(options, progress=False)
        log_file, quiet, verbose = os.environ.get(ENV), bool(os.environ.get(QUIET_ENV)), terminal_verbose()
        head = ray.get_runtime_context().get_node_id()
        capacity = _capacity(ray, cfg)
        waiting = list(range(len(jobs)))
        running: dict[Any, tuple[int, float]] = {}
        results: dict[int, MovieReport] = {}
        limits = {i: task_timeout(cfg, options.stages, probed[i][1]) for i in range(len(jobs))}
        bar = tqdm(
            total=len(jobs), desc="movies", unit="movie", disable=not options.progress, **bar_options()
        )
        while waiting or running:
            while waiting and len(running) < capacity:
                i = waiting.pop(0)
                movie, run_dir = jobs[i]
                # A movie the head cannot probe fails in its task, which says why (no folder made).
                written = _head_tokens(movie, run_dir, options) if probed[i][0] and run_dir else []
                if isinstance(written, MovieReport):
                    results[i] = written
                    bar.update(1)
                    continue
                tokens[i] = written
                ref = task.remote(
                    movie, run_dir, remote, log_file, tokens[i], head, str(workspace_root()), quiet, verbose
                )
                running[ref] = (i, time.monotonic())
            bounded = [t0 + limits[i] for i, t0 in running.values() if limits[i] is not None]
            wait_s = max(0.0, min(bounded) - time.monotonic()) if bounded else None
            done, _ = ray.wait(list(running), num_returns=1, timeout=wait_s)
            for ref in done:
                i, _ = running.pop(ref)
                results[i] = _ray_result(ray, ref, jobs[i])
                _remove_tokens(tokens.pop(i, []))
                bar.update(1)
            now = time.monotonic()
            for ref, (i, t0) in list(running.items()):
                if limits[i] is not None and now - t0 >= limits[i]:
                    running.pop(ref)
                    ray.cancel(ref, force=True)
                    results[i] = _timed_out(jobs[i], limits[i])
                    _remove_tokens(tokens.pop(i, []))
                    bar.update(1)
    finally:
        if bar is not None:  # stopped too: a bar left open drew itself again below the stop's line
            bar.close()
        for left in tokens.values():
            _remove_tokens(left)
        if started:
            import ray  # lazy: ray takes 1.2 s to import (start_ray has imported it)

            _shutdown_ray(ray)
        # a worker killed with its task (cancelled) left its kernel's socket files on this node
        remove_orphan_sockets(tempfile.gettempdir())
    return [results[i] for i in range(len(jobs))]


def _ray_jobs(jobs: Sequence[tuple[Path, Path | None]], cfg: RunConfig) -> list[tuple[Path, Path | None]]:
    """Each movie absolute, as the workers need it, but named as given: a link's target's name
    was shown for it (and in the report's movies table), where the local engine showed the link's;
    and its run folder (:func:`_run_folder`)."""
    return [(Path(os.path.abspath(movie)), _run_folder(movie, run_dir, cfg)) for movie, run_dir in jobs]


def _run_folder(movie: Path, run_dir: Path | None, cfg: RunConfig) -> Path | None:
    """The run folder of a movie, absolute as this process (the head) sees it: a relative
    ``--out`` or ``paths.output_dir`` must not mean each node's own working folder or checkout.
    None for a movie this process cannot read (its id reads the file): its task says why."""
    if run_dir is None:
        try:
            return run_folder_in(output_root(cfg), movie).resolve()
        except OSError:
            return None
    return Path(run_dir).expanduser().resolve()


def _movie_seconds(movie: Path) -> tuple[bool, float | None]:
    """(whether this process can probe the movie, its length for the task's time limit or None);
    a movie that cannot be probed fails in its task, which says why."""
    try:
        return True, probe_video(movie).duration_s
    except UserError:
        return False, None


def _ray_result(ray: Any, ref: Any, job: tuple[Path, Path | None]) -> MovieReport:
    """A task's report, its terminal lines printed here (under the movies' bar, in one block per
    movie); a task that died is a bug's report and line."""
    movie, run_dir = job
    try:
        report = ray.get(ref)
        for line in report.lines:
            tqdm.write(line, file=sys.stderr)
        return report
    except ray.exceptions.RayError as exc:
        cause = getattr(exc, "cause", None) or exc
        lines = str(cause).strip().splitlines() or [""]
        text = f"{type(cause).__name__}: {lines[-1]}"
        log.error("%s failed on Ray", movie, exc_info=exc, extra=FILE_ONLY)
        _tell(f"{movie.name}: failed with a bug on Ray ({text}){log_hint()}")
        return MovieReport(movie=movie, run_dir=run_dir, error=text, bug=True)


def _timed_out(job: tuple[Path, Path | None], limit: float) -> MovieReport:
    movie, run_dir = job
    text = (
        f"did not finish within {limit:g} s on Ray and was cancelled (engine.task_timeout_s, else scaled "
        "from pipeline.stage_timeout_s); finished stages are kept, rerun to go on"
    )
    # A cancelled task's lines never come back (held_lines): the log file has them.
    _tell(f"{movie.name}: {text}{log_hint('its lines')}")
    return MovieReport(movie=movie, run_dir=run_dir, error=text)


def engine_kind(cfg: RunConfig) -> str:
    """The engine a run uses: ``engine.kind``, except that an ``engine.address`` means Ray
    wherever it was set, as ``--address`` does (an address in a settings file or ``--set`` was
    silently ignored and the batch ran on this machine alone)."""
    return "ray" if cfg.engine.address else cfg.engine.kind


def run_movies(jobs: Sequence[tuple[Path, Path | None]], options: RunOptions) -> list[MovieReport]:
    """Run ``(movie, run folder or None for the default)`` jobs on the engine :func:`engine_kind`
    names (``local``/``ray``)."""
    if engine_kind(options.cfg) == "ray":
        return run_ray(jobs, options)
    return run_local(jobs, options)


def _check_single_out(movie: Path, out: Path) -> None:
    """:func:`~diffusion_bunny.pipeline.run.check_run_folder` for one movie run on Ray; a movie
    that cannot be read is left to its task, which says why in one line."""
    with contextlib.suppress(OSError):
        check_run_folder(out, movie)


def _run_folder_movies(movies: Sequence[Path], out: Path | None, options: RunOptions) -> list[MovieReport]:
    """The movies of a folder run, each into ``<out>/<movie id>`` (the default folder without
    ``out``), reports in the movies' order. A movie that cannot be read (no permission) has no id,
    so no run folder: it fails here in one line and the others run."""
    jobs: list[tuple[Path, Path | None]] = []
    failed: dict[Path, MovieReport] = {}
    for movie in movies:
        try:
            jobs.append((movie, run_folder_in(out, movie) if out is not None else None))
        except OSError as exc:
            text = str(unreadable(movie, exc))
            _tell(text)
            failed[movie] = MovieReport(movie=movie, run_dir=None, error=text)
    done = iter(run_movies(jobs, options) if jobs else [])
    return [failed[movie] if movie in failed else next(done) for movie in movies]


def run_target(
    pipeline: Pipeline,
    target: str | Path | Sequence[str | Path],
    cfg: RunConfig,
    *,
    config_path: str | None = None,
    overrides: dict[str, Any] | None = None,
    stages: str | Sequence[str] | None = None,
    out: str | Path | None = None,
    force: bool = False,
    progress: bool = True,
    current_name: Callable[[str], str] | None = None,
) -> list[MovieReport]:
    """``bunny run``: one movie, or every movie of a folder, or of several targets (a shell's
    ``*.mkv``), on an engine (``local``: one after another, ``ray``: one Ray task per movie;
    :func:`engine_kind`). Several targets run as one folder would.

    In a folder, a bad movie (a user error or a bug) is reported and the others still run, on
    either engine; the caller turns the failures into exit status 2 (1 if one was a bug). A
    folder run ends with a combined report across its movies (``<out>/report/index.html`` and
    ``movies.parquet``; ``out`` defaults to ``paths.output_dir``), failed movies included.

    ``cfg`` is the configuration loaded from ``config_path`` and ``overrides`` (by the caller,
    which knows every stage's settings: the machinery knows none); each stage's kernel loads the
    same two again. ``current_name``: a setting's name today (:class:`RunOptions`).
    """
    options = RunOptions(
        pipeline=pipeline,
        cfg=cfg,
        stages=tuple(parse_stages(pipeline, stages)),
        config_path=config_path,
        overrides=dict(overrides or {}),
        force=force,
        progress=progress,
        current_name=current_name,
    )
    movies = find_movies(target, cfg)
    single = len(movies) == 1 and isinstance(target, (str, Path)) and Path(target).expanduser().is_file()
    # A movie that cannot be read fails as on the local engine, in one line: on Ray it started a
    # cluster first (about 30 s) and said "1 of 1 movies failed" under the movie's own line.
    if single and (engine_kind(cfg) == "local" or not _movie_seconds(movies[0])[0]):
        return [run_movie(movies[0], Path(out) if out else None, options)]
    if single:
        run_dir = None
        if out:  # before Ray starts (20 s) and the head writes its token into the folder
            with contextlib.suppress(OSError):  # an unreadable movie: its task says why
                run_dir = given_run_folder(out, movies[0])
            _check_single_out(movies[0], run_dir or Path(out))
        return run_movies([(movies[0], run_dir or (Path(out) if out else None))], options)
    # paths.output_dir is checked as --out is: the run folders and the report go there alike
    batch = Path(out) if out else output_root(cfg)
    check_batch_folder(batch)
    # One folder run per --out at a time: two at once each found the other's movies in use, failed
    # them, and the last one's combined report called the other's finished movies failed. Held
    # through a folder of its own in .locks: a lease (run.json) in --out's own .locks would make it
    # look like a run folder to whoever lists the run folders there. Not paths.output_dir, the
    # folder every run without --out shares: two folders' runs there ran side by side before.
    held = (
        lock.run_lock(
            batch / ".locks" / "folder-run",
            what="bunny run (a folder)",
            lease_s=cfg.pipeline.lock_stale_s,
            noun="folder",
            shown=batch.resolve(),
        )
        if out
        else contextlib.nullcontext()
    )
    with held:
        reports = _run_folder_movies(drop_copies(movies), Path(out) if out else None, options)
        html = pipeline.batch_report(batch, reports, cfg)
    if html is not None:
        _say(f"combined report of {len(reports)} movies: {html}")
    return reports
