"""The ``bunny`` command line.

Exit status 0 on success, 2 on a user error (bad path, bad input file, bad config, a full disk
or no permission to write, a kernel that died) with one clear line on standard error and no
traceback, 1 only for a bug.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import marshal
import os
import re
import signal
import sys
import sysconfig
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from diffusion_bunny.errors import BadInputError, ConfigError, UserError, storage_error
from diffusion_bunny.logs import log_hint, version
from diffusion_bunny.paths import absolute_path_variables


def _shared_options() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """The options of every command (how much it says) and those of the settings a run is made
    with, as parent parsers."""
    common = argparse.ArgumentParser(add_help=False)
    talk = common.add_mutually_exclusive_group()
    talk.add_argument(
        "-v", "--verbose", action="store_true", help="show the log's INFO lines on the terminal"
    )
    talk.add_argument(
        "-q", "--quiet", action="store_true", help="no progress bars; only errors and the final lines"
    )
    # The settings a run is made with: `bunny status` takes them as `bunny run` does, to judge
    # the stages against the same settings.
    settings = argparse.ArgumentParser(add_help=False)
    settings.add_argument("--config", help="an extra YAML config layered over config/main.yaml")
    settings.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one setting (repeatable), e.g. --set extract.motion_threshold=2",
    )
    settings.add_argument(
        "--characters",
        metavar="DIR",
        help="reference images: one sub-folder per character (folder name = name), photos inside",
    )
    return common, settings


def _build_parser() -> argparse.ArgumentParser:
    # The stage names of --help come from the pipeline, the one place the order is written (the
    # declarations only: each stage's own code is imported when it runs).
    from diffusion_bunny.stages import stage_names  # lazy: after _keep_bytecode(), to cache its bytecode

    parser = argparse.ArgumentParser(
        prog="bunny",
        description="Turn a movie into a character-labelled, captioned training set.",
        epilog="Each command writes log/bunny-<timestamp>-<pid>.log (INFO: what ran, config hashes, "
        "timings, warnings, tracebacks of bugs).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    common, settings = _shared_options()
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser(
        "run", parents=[common, settings], help="run the stages headless on a movie or a folder of movies"
    )
    run.add_argument(
        "target",
        nargs="+",
        help="a movie file, a folder whose video files are all processed, or several of these "
        "(e.g. *.mkv; run as one folder)",
    )
    run.add_argument("--out", help="run folder (one movie) or parent of the run folders (a folder)")
    run.add_argument(
        "--stages",
        metavar="NAMES",
        help=(
            "comma-separated stage names or their notebooks' numbers, spans too (1-6, extract-export; "
            f"default: all, in this order): {', '.join(stage_names())}"
        ),
    )
    run.add_argument("--force", action="store_true", help="rerun stages even when up to date")
    run.add_argument(
        "--engine",
        choices=("local", "ray"),
        help="local: one movie after another (default, engine.kind); ray: one Ray task per movie",
    )
    run.add_argument(
        "--address",
        help="join the Ray cluster at this address (implies --engine ray; default: a local cluster)",
    )

    status = sub.add_parser(
        "status",
        parents=[common, settings],
        help="each stage's state per movie (done, stale and why, missing), from the manifests",
    )
    status.add_argument(
        "target",
        nargs="+",
        help="a run folder, a folder of run folders (e.g. data/output), a movie or a folder of movies, "
        "or several of these",
    )
    status.add_argument("--out", help="where the movies' run folders are, as given to bunny run --out")

    demo = sub.add_parser(
        "demo", parents=[common], help="build the built-in demo movie once and run every stage on it"
    )
    demo.add_argument("--out", help="run folder (default data/output/demo)")
    demo.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    demo.add_argument("--force", action="store_true", help="rebuild the movie and rerun every stage")
    return parser


def _cmd_run(args: argparse.Namespace) -> int:
    from diffusion_bunny.config import (  # lazy: after _keep_bytecode(), to cache its bytecode
        current_name,
        load_config,
        text_setting,
    )
    from diffusion_bunny.pipeline.engine import (  # lazy: after _keep_bytecode(), to cache its bytecode
        run_target,
    )
    from diffusion_bunny.pipeline.runner import (  # lazy: after _keep_bytecode(), to cache its bytecode
        overrides_from_args,
        parse_stages,
    )
    from diffusion_bunny.stages import PIPELINE  # lazy: after _keep_bytecode(), to cache its bytecode

    config_path = _config_path(args)
    overrides = overrides_from_args(args.overrides, text_setting)
    _characters_override(args, overrides)
    engine = args.engine
    if args.address and engine is None:
        engine = "ray"  # an address only means something to Ray
    if args.address and engine != "ray":
        raise UserError(f"--address {args.address} joins a Ray cluster: use it with --engine ray")
    if engine is not None:
        overrides["engine.kind"] = engine
    if args.address is not None:
        overrides["engine.address"] = args.address
    cfg = load_config(config_path, overrides)
    if engine == "local" and cfg.engine.address:  # an address means Ray, set here or in the settings
        raise UserError(
            f"engine.address {cfg.engine.address} (from the settings) joins a Ray cluster: use it with "
            "--engine ray, or add --set engine.address=null to run here"
        )
    _check_reference_setting(args, cfg, parse_stages(PIPELINE, args.stages))
    reports = run_target(
        PIPELINE,
        args.target[0] if len(args.target) == 1 else args.target,
        cfg,
        config_path=config_path,
        overrides=overrides,
        stages=args.stages,
        out=args.out,
        force=args.force,
        progress=not args.quiet,
        current_name=current_name,
    )
    failed = [r for r in reports if r.error]
    for r in reports:
        if not r.error:
            _say(f"{r.movie.name}: {r.run_dir}")
    if any(_DAMAGED_BYTECODE.search(r.error) for r in failed):  # a movie of a folder failed on it
        removed = _remove_damaged_bytecode(_bytecode_roots())
        print(
            f"error: {len(removed)} cached bytecode file(s) (.pyc) were cut short when they were written "
            "and are now removed; run the failed movies again",
            file=sys.stderr,
        )
    if failed:
        print(
            f"error: {len(failed)} of {len(reports)} movies failed (see the messages above){log_hint()}",
            file=sys.stderr,
        )
        return 1 if any(r.bug for r in failed) else 2
    return 0


def _characters_override(args: argparse.Namespace, overrides: dict) -> None:
    """``--characters DIR`` as ``characters.reference_dir`` (absolute); a folder that is not there,
    or holds no picture in a character sub-folder, is one line naming it."""
    if not args.characters:
        return
    from diffusion_bunny.stages.characters.tables import (  # lazy: after _keep_bytecode(), for its bytecode
        check_reference_folder,
    )

    characters = Path(args.characters).expanduser().resolve()
    if not characters.is_dir():
        what = "is not a folder" if characters.exists() else "does not exist"
        raise BadInputError(
            f"--characters {args.characters}: {characters} {what}; give a folder with one "
            "sub-folder of reference images per character"
        )
    # Its pictures too, before any stage runs (stage 01 decoded the whole film before stage 03
    # found a folder without pictures) and before the run records the folder in settings.json.
    check_reference_folder(characters)
    overrides["characters.reference_dir"] = str(characters)


def _check_reference_setting(args: argparse.Namespace, cfg: Any, stages: list[str]) -> None:
    """``characters.reference_dir`` from ``--set`` or a settings file, checked as ``--characters``
    is before any stage runs, when a stage that reads it will: stages 01 and 02 ran (a film's
    whole decode), then stage 03 said the folder was not there."""
    if args.characters or not cfg.characters.reference_dir or not {"characters", "generate"} & set(stages):
        return
    from diffusion_bunny.stages.characters.tables import (  # lazy: after _keep_bytecode(), for its bytecode
        configured_reference_dir,
    )

    folder = configured_reference_dir(cfg.characters)
    if folder is not None and not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise BadInputError(
            f"characters.reference_dir {cfg.characters.reference_dir}: {folder} {what}; give a folder with "
            "one sub-folder of reference images per character, or leave the setting out"
        )


#: Options whose empty value is a mistake, with what to give (``--out "$DIR"`` with ``DIR``
#: unset ran into the workspace's output folder, ``--characters ''`` without pictures and
#: ``--address ''`` on the local engine, all silently: as ``--config ''`` does, one line).
_NOT_BLANK = {"out": "a folder", "characters": "a folder of pictures", "address": "a Ray address"}


def _refuse_blank(args: argparse.Namespace) -> None:
    """One line for an option given empty, for a path that is not UTF-8 text, and for one that
    loops through links (Python's ``resolve`` raises RuntimeError there: a bug's line before)."""
    for name, what in _NOT_BLANK.items():
        value = getattr(args, name, None)
        if value is not None and not value.strip():
            raise ConfigError(f"--{name} {value!r}: give {what}, or leave the option out")
    from diffusion_bunny.media.probe import check_utf8_name  # lazy: after _keep_bytecode()

    for name in ("out", "characters", "config"):
        value = getattr(args, name, None)
        if value:
            # Tables, notebooks and manifests hold the path as text: a Latin-1 folder name failed
            # "with a bug" after the first stage had run, and `bunny status` on it too.
            check_utf8_name(value, f"the folder or file given as --{name}")
        try:
            if value:
                Path(value).resolve()
        except RuntimeError:
            raise ConfigError(f"--{name} {value}: its path loops through links; give another path") from None


def _config_path(args: argparse.Namespace) -> str | None:
    """``--config FILE`` as an absolute path, None without it. An empty one (``--config "$CFG"``
    with ``CFG`` unset) is an error: it was taken for no ``--config`` at all, silently."""
    if args.config is None:
        return None
    if not args.config.strip():
        raise ConfigError(f"--config {args.config!r}: give a settings file")
    return str(Path(args.config).resolve())


def _cmd_status(args: argparse.Namespace) -> int:
    from diffusion_bunny.config import (  # lazy: after _keep_bytecode(), to cache its bytecode
        load_config,
        text_setting,
    )
    from diffusion_bunny.pipeline.runner import (  # lazy: after _keep_bytecode(), to cache its bytecode
        overrides_from_args,
    )
    from diffusion_bunny.pipeline.status import (  # lazy: after _keep_bytecode(), to cache its bytecode
        format_status,
        resolve_runs,
        status_table,
    )
    from diffusion_bunny.stages import PIPELINE  # lazy: after _keep_bytecode(), to cache its bytecode

    config_path = _config_path(args)
    overrides = overrides_from_args(args.overrides, text_setting)
    _characters_override(args, overrides)
    cfg = load_config(config_path, overrides)
    target = args.target[0] if len(args.target) == 1 else args.target
    asked = {"config_path": config_path, "overrides": overrides}
    _say(format_status(status_table(PIPELINE, resolve_runs(target, cfg, args.out), cfg, asked)))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from diffusion_bunny.config import text_setting  # lazy: after _keep_bytecode(), to cache its bytecode
    from diffusion_bunny.demo.run import run_demo  # lazy: after _keep_bytecode(), to cache its bytecode
    from diffusion_bunny.pipeline.runner import (  # lazy: after _keep_bytecode(), to cache its bytecode
        overrides_from_args,
    )

    summary = run_demo(
        out=Path(args.out) if args.out else None,
        overrides=overrides_from_args(args.overrides, text_setting),
        force=args.force,
        progress=not args.quiet,
    )
    _say(summary)
    return 0


def _say(text: str) -> None:
    """Print a command's result on stdout; a reader that stopped early (``bunny status | head``)
    ends it quietly.

    Why: by the time these lines are printed the work is done, and a ``BrokenPipeError`` from
    them was an "error: bug" with exit status 1. Python's advice for SIGPIPE (the ``signal``
    module's notes) is followed: stdout is pointed at ``os.devnull``, so the interpreter's own
    flush at exit does not raise again; the exit status stays the command's."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def _keep_bytecode() -> None:
    """Let this process and the kernels and workers it starts cache their modules' bytecode even
    where ``PYTHONDONTWRITEBYTECODE`` is set (CI machines, container images, this workplace's
    shell). Why: without the ``.pyc`` files every ``bunny run`` compiles torch, pandas, plotnine,
    matplotlib and polars from source again, in this process and in the notebook kernel: 4-8 s of
    a run's fixed cost on 2 cores (13 s of CPU in compiling on a 3-second clip, profiled with
    py-spy), paid on every run, where the cached bytecode costs it once. Python skips writing
    where it cannot (a read-only install), and a venv compiled ahead (``uv sync
    --compile-bytecode``) is only read. The test suite does the same (``test/conftest.py``)."""
    if os.environ.pop("PYTHONDONTWRITEBYTECODE", None) is not None:
        sys.dont_write_bytecode = False


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP (``kill``, ``timeout``, Slurm, ``docker stop``, a closed SSH terminal)
    as an interrupt. Python ends on those signals without running any ``finally``: the stage
    kernel was never closed, and stage 03's workers were left running for good, 235 MB each."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


#: The signal that stopped the command, if one did: code it interrupts (a kernel starting, an
#: event loop) may turn the interrupt into another exception, which is then no bug.
_signalled: int | None = None


#: Seconds a stopped command has to close its kernels and end, before it ends without them.
STOP_GRACE_S = 20.0
_stop_timer: threading.Timer | None = None


def _raise_stopped(signum: int, frame: object) -> None:
    global _signalled, _stop_timer
    if _signalled is None:
        _stop_timer = threading.Timer(STOP_GRACE_S, _leave_now, args=(signum,))
        _stop_timer.daemon = True
        _stop_timer.start()
    _signalled = signum
    raise Stopped(signum)


def _leave_now(signum: int) -> None:
    """End a stopped command that has not ended within :data:`STOP_GRACE_S`, its child processes
    (the stage kernel and its workers) first. The interrupt is raised wherever the main thread
    stands: raised between tqdm's two write locks it left one held, and the command waited for
    itself forever on its next line to the terminal (found by the SIGTERM test under load)."""
    with contextlib.suppress(Exception):
        import psutil  # lazy: only a command that failed to stop needs it

        children = psutil.Process().children(recursive=True)
        for child in children:
            with contextlib.suppress(psutil.Error):
                child.kill()
    with contextlib.suppress(Exception):
        why = signal.Signals(signum).name
        os.write(
            2, f"{why}; finished stages are kept, rerun to continue (ended without its cleanup)\n".encode()
        )
    os._exit(128 + signum)


@contextlib.contextmanager
def _signals_as_interrupts() -> Iterator[None]:
    """SIGTERM and SIGHUP raise :class:`Stopped` in the main thread for the block."""
    # A signal ignored by whoever started us stays ignored: ``nohup bunny run`` must outlive
    # the terminal it was typed in.
    names = [
        n
        for n in ("SIGTERM", "SIGHUP")
        if hasattr(signal, n) and signal.getsignal(getattr(signal, n)) != signal.SIG_IGN
    ]
    before: dict[str, object] = {}
    try:  # installed inside the try: a signal in between still restores what was installed
        for name in names:
            before[name] = signal.signal(getattr(signal, name), _raise_stopped)
        yield
    finally:
        global _signalled
        if _stop_timer is not None:
            _stop_timer.cancel()  # the command ended in time
        _signalled = None  # a later command in this process (a test, an API caller) starts afresh
        for name, handler in before.items():
            signal.signal(getattr(signal, name), handler)


def _stopped(signum: int | None, started: float, note: str = "") -> int:
    """One line for a run stopped by Ctrl-C (``signum`` None: exit 130) or a signal (128 + it)."""
    why = signal.Signals(signum).name if signum is not None else "interrupted"
    logging.getLogger("diffusion_bunny.cli").info("%s after %.1f s%s", why, time.monotonic() - started, note)
    print(f"{why}; finished stages are kept, rerun to continue", file=sys.stderr)
    return 128 + signum if signum is not None else 130


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``bunny`` console script."""
    started = time.monotonic()
    with _signals_as_interrupts():
        try:
            return _main(argv)
        # Stopped before the command's own handling began (its imports, reading its arguments: the
        # first second or two of every command): one line as later, not an import's traceback
        # (SIGTERM 1.2 s into `bunny run`, stopping runs at random moments).
        except KeyboardInterrupt as exc:
            return _stopped(exc.signum if isinstance(exc, Stopped) else _signalled, started)
        except Exception as exc:
            if _signalled is None:
                raise
            return _stopped(_signalled, started, f" ({type(exc).__name__})")


def _main(argv: list[str] | None) -> int:
    _keep_bytecode()
    from diffusion_bunny import logs  # lazy: after _keep_bytecode(), to cache its bytecode
    from diffusion_bunny.logs import (  # lazy: after _keep_bytecode(), to cache its bytecode
        FILE_ONLY,
        start_cli_log,
        stop_cli_log,
    )

    args = _build_parser().parse_args(argv)
    absolute_path_variables()  # HF_HOME=hfcache means here, not in the kernel's notebook folder
    for name in ("out", "config", "characters"):  # `--out=~/runs` or a quoted "~/x": the shell left the ~
        if getattr(args, name, None):
            setattr(args, name, os.path.expanduser(getattr(args, name)))
    try:
        path = start_cli_log(-1 if args.quiet else 1 if args.verbose else 0, command=argv)
    except OSError as exc:  # the log file itself cannot be made (read-only or full disk)
        storage = storage_error(exc, logs.START_ADVICE)
        if storage is None:
            raise
        print(f"error: {storage}", file=sys.stderr)
        return 2
    log = logging.getLogger("diffusion_bunny.cli")
    started = time.monotonic()
    try:
        _refuse_blank(args)
        if args.command == "run":
            code = _cmd_run(args)
        elif args.command == "status":
            code = _cmd_status(args)
        else:
            code = _cmd_demo(args)
        log.info("exit status %d after %.1f s", code, time.monotonic() - started)
        if logs.failure is not None and code in (0, 2):
            # The work is done (or stopped on a user error), but its log is incomplete.
            print(f"error: {logs.failure}", file=sys.stderr)
            return 2
        return code
    except UserError as exc:
        log.info("user error: %s", exc)
        print(f"error: {exc} (log: {path})", file=sys.stderr)
        return 2
    except OSError as exc:  # disk full, no permission on --out: the user's to fix, one line
        storage = storage_error(exc)
        if storage is None:
            log.exception("bug: %s", exc, extra=FILE_ONLY)
            print(f"error: bug: {type(exc).__name__}: {exc} (the traceback is in {path})", file=sys.stderr)
            return 1
        log.info("storage error: %s", storage)
        print(f"error: {storage} (log: {path})", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        # A plain KeyboardInterrupt after a signal: code it hit made one of ours (Ray's wait does)
        return _stopped(exc.signum if isinstance(exc, Stopped) else _signalled, started)
    except Exception as exc:
        if _signalled is not None:  # the signal's interrupt, turned into this by the code it hit
            return _stopped(_signalled, started, f" ({type(exc).__name__})")
        log.exception("bug: %s", exc, extra=FILE_ONLY)
        if _DAMAGED_BYTECODE.search(str(exc)):
            removed = _remove_damaged_bytecode(_bytecode_roots())
            print(
                f"error: {len(removed)} cached bytecode file(s) (.pyc) were cut short when they were "
                "written (a full disk or a file-size limit) and are now removed; run the command again "
                f"(log: {path})",
                file=sys.stderr,
            )
            log.info("damaged bytecode removed: %s", removed)
            return 2
        print(f"error: bug: {type(exc).__name__}: {exc} (the traceback is in {path})", file=sys.stderr)
        return 1
    finally:
        stop_cli_log()


#: How importing a module whose cached bytecode is cut short fails (here or inside a kernel).
_DAMAGED_BYTECODE = re.compile(r"marshal data too short|bad marshal data")


def _bytecode_roots() -> list[Path]:
    """Where the modules a run imports keep their bytecode: this package and the environment's."""
    paths = sysconfig.get_paths()
    return sorted({Path(__file__).parent, Path(paths["purelib"]), Path(paths["platlib"])})


def _remove_damaged_bytecode(roots: list[Path]) -> list[Path]:
    """Delete every ``__pycache__/*.pyc`` under ``roots`` whose code cannot be read back.

    Why: CPython writes a ``.pyc`` with a single write call and takes it as whole. On a full disk
    (or under a file-size limit) that call writes only part of it, and the cut-short file then
    fails every import of its module ("EOFError: marshal data too short") long after space is
    freed; ``bunny`` keeps bytecode on purpose (:func:`_keep_bytecode`), so it clears them. Python
    compiles the module again at the next import. 8,400 files take under a second."""
    removed = []
    for root in roots:
        for pyc in root.rglob("__pycache__/*.pyc"):
            try:
                data = pyc.read_bytes()
                marshal.loads(memoryview(data)[16:])  # past the 16-byte header (PEP 552)
            except (EOFError, ValueError, TypeError):
                with contextlib.suppress(OSError):
                    pyc.unlink()
                    removed.append(pyc)
            except OSError:
                continue
    return removed


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
