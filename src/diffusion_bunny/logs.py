"""Logs: ``log/bunny-<timestamp>.log`` through the standard ``logging`` module.

Design:

* ``bunny`` calls :func:`start_cli_log` first thing: every record of the ``diffusion_bunny``
  loggers at INFO and up, and every Python warning (``logging.captureWarnings``), goes to one new
  file ``<workspace>/log/bunny-<YYYYmmdd-HHMMSS>-<pid>.log`` (the pid keeps two runs started in
  the same second apart); the terminal shows WARNING and up (``--verbose``: INFO,
  ``--quiet``: ERROR), as plain ``warning: ...`` lines without logger names.
* The file's path is put in the environment (:data:`ENV`) before any kernel or Ray worker
  starts: papermill's kernels (jupyter_client copies ``os.environ`` into the kernel process) and
  the workers of a local Ray cluster inherit it, and :func:`attach_from_env` (called by
  ``run_stage``, so by every stage notebook, idempotent) appends their records to the same file,
  each line naming its process. A notebook opened in JupyterLab has no such variable and logs
  nowhere but its own output. Appends of one record are a single ``write`` on an ``O_APPEND``
  file, so the processes' lines do not tear each other.
* Progress bars: when standard error is not a terminal (CI, ``| tee``), :func:`quiet_bars` sets
  ``TQDM_MININTERVAL`` (tqdm >= 4.66 reads ``TQDM_*`` defaults from the environment when it is
  imported), so every bar in this process's children prints at most once per
  :data:`NON_TTY_INTERVAL_S` seconds; bars of this process take :func:`bar_options`.
* Relayed to the terminal: a stage running in a notebook's kernel under ``bunny run`` writes to
  the kernel's standard error, which the terminal never sees. While a stage runs there
  (:func:`relaying`, set by ``run_stage``), :func:`say`'s lines and the bars of
  :func:`relay_bar_class` (a model's download) also go to small files beside the stage's progress
  file, which the runner follows and shows (``pipeline.progress.follow``).
* The command line is logged with every secret taken out (``secrets.redact_command``): a key in a
  ``--set`` value, in a URL's user part or its query (``?key=``) must not land in a log file.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from importlib import metadata
from pathlib import Path

from diffusion_bunny.errors import storage_error
from diffusion_bunny.paths import workspace_root
from diffusion_bunny.secrets import redact_command

ENV = "DIFFUSION_BUNNY_LOG"
#: The folder of this command's log files (and TensorBoard's ``tensorboard/``), when not ``log/``.
LOG_DIR_ENV = "DIFFUSION_BUNNY_LOG_DIR"
LOGGER = "diffusion_bunny"
#: Set ("1") while a ``bunny --quiet`` command runs: :func:`say` in a process without the terminal
#: handler (a Ray worker, whose standard error reaches the driver's terminal) then stays quiet too.
QUIET_ENV = "DIFFUSION_BUNNY_QUIET"
FORMAT = "%(asctime)s %(levelname)-7s %(processName)s[%(process)d] %(name)s: %(message)s"
NON_TTY_INTERVAL_S = 5.0


class _SayFilter(logging.Filter):
    """The terminal shows records at its level and up, plus INFO records marked ``say`` (the
    runner's one line per stage: what it does and what came out), unless quiet."""

    def __init__(self, level: int, quiet: bool):
        super().__init__()
        self.level, self.quiet = level, quiet

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "file_only", False):
            return False
        return record.levelno >= self.level or (not self.quiet and getattr(record, "say", False))


class _TerminalHandler(logging.StreamHandler):
    """Writes through ``tqdm.write`` so a line never breaks a progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm  # lazy: keeps tqdm out of `bunny --help` (0.05 s)

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # pragma: no cover - logging must never raise
            self.handleError(record)


SAY = {"say": True}  # log.info(..., extra=SAY): also on the terminal unless --quiet
FILE_ONLY = {"file_only": True}  # e.g. a traceback the terminal sums up in one line


#: A warning as ``logging.captureWarnings`` hands it on: ``FILE:LINE: CATEGORY: MESSAGE`` and the
#: source line under it.
_CAPTURED = re.compile(r"^(?P<file>.+?):\d+: \w+: (?P<message>.*?)(?:\n  [^\n]*)?\n?$", re.DOTALL)


def _terminal_text(record: logging.LogRecord) -> str:
    """What the terminal shows of ``record``: a warning the workspace itself gave
    (``warnings.warn``, read by the notebooks too) as its message alone, not as Python prints it,
    with the file and the source line a user has no use for (the log file keeps them)."""
    msg = record.getMessage()
    if record.name == "py.warnings":
        found = _CAPTURED.match(msg)
        if found and "diffusion_bunny" in Path(found["file"]).parts:
            return found["message"]
    return msg


class _TerminalFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = _terminal_text(record)
        if record.levelno >= logging.ERROR:
            return f"error: {msg}"
        if record.levelno >= logging.WARNING:
            return f"warning: {msg}"
        return msg


def log_dir() -> Path:
    """``$DIFFUSION_BUNNY_LOG_DIR``, else ``log/`` of the workspace (the checkout, else the
    working folder); the tests point the variable at a temporary folder."""
    env = os.environ.get(LOG_DIR_ENV)
    if env:
        return Path(env)
    return workspace_root() / "log"


class _LogFileHandler(logging.FileHandler):
    """The log file. When it cannot be written (a full disk, a read-only one), logging's default
    prints a traceback for every record after; this one stops writing at the first failure and
    keeps it in :data:`failure`, which ``bunny`` turns into one line and exit status 2."""

    def handleError(self, record: logging.LogRecord) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):
            if exc.filename is None:
                exc.filename = self.baseFilename
            error = storage_error(exc, LOG_ADVICE)
            if error is not None:
                global failure
                failure = failure or error
                with contextlib.suppress(OSError):
                    self.close()
                self.emit = lambda record: None  # type: ignore[method-assign]
                return
        super().handleError(record)  # pragma: no cover - any other failure: logging's own report


LOG_ADVICE = (
    "free some space or fix the permissions, or set DIFFUSION_BUNNY_LOG_DIR to another folder "
    "(the log is incomplete; results are not affected)"
)

START_ADVICE = (
    "free some space or fix the permissions, or set DIFFUSION_BUNNY_LOG_DIR to another folder (nothing ran)"
)

#: The first failure to write the log file in this process (None while it writes).
failure: Exception | None = None


def _file_handler(path: Path) -> logging.FileHandler:
    # A file name that is not UTF-8 (a Latin-1 name from an old archive) reaches a line as
    # surrogates: written escaped, where strict UTF-8 printed "--- Logging error ---" for it.
    handler = _LogFileHandler(path, mode="a", encoding="utf-8", errors="backslashreplace")
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.set_name(f"{LOGGER}-file")  # attach_from_env's handler too: stop_cli_log removes both
    handler.addFilter(lambda record: not getattr(record, "relayed", False))  # a kernel's line, logged there
    return handler


def start_cli_log(verbosity: int = 0, folder: Path | None = None, command: list[str] | None = None) -> Path:
    """Open this command's log file and the terminal handler; ``verbosity``: -1 quiet, 0, 1
    verbose; ``command``: the arguments to log (default: this process's). Returns the file's path
    (also exported as :data:`ENV` for child processes)."""
    global failure
    failure = None
    folder = folder or log_dir()
    path = folder / f"bunny-{datetime.now():%Y%m%d-%H%M%S}-{os.getpid()}.log"
    try:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except FileExistsError:  # a file of that name (exist_ok covers a folder only): one line too
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(folder)) from None
        handler = _file_handler(path)
    except OSError as exc:  # a read-only or full disk under log/: one line (the caller's)
        if exc.filename is None:
            exc.filename = str(path)
        raise
    logger = logging.getLogger(LOGGER)
    logger.setLevel(logging.INFO)
    warn_logger = logging.getLogger("py.warnings")
    for lg in (logger, warn_logger):  # a second main() in one process (tests) starts afresh
        for h in [h for h in lg.handlers if (h.get_name() or "").startswith(LOGGER)]:
            lg.removeHandler(h)
            h.close()
    logger.addHandler(handler)
    terminal = _TerminalHandler(sys.stderr)
    level = {-1: logging.ERROR, 0: logging.WARNING}.get(verbosity, logging.INFO)
    terminal.addFilter(_SayFilter(level, quiet=verbosity < 0))
    terminal.setFormatter(_TerminalFormatter())
    terminal.set_name(f"{LOGGER}-terminal")
    logger.addHandler(terminal)
    logging.captureWarnings(True)
    for h in logger.handlers:
        if (h.get_name() or "").startswith(LOGGER):
            warn_logger.addHandler(h)
    global _previous_env, _previous_quiet, last_path
    _previous_env, _previous_quiet = os.environ.get(ENV), os.environ.get(QUIET_ENV)
    os.environ[ENV] = str(path)
    if verbosity < 0:
        os.environ[QUIET_ENV] = "1"
    else:
        os.environ.pop(QUIET_ENV, None)
    last_path = path
    quiet_bars()
    args = redact_command(sys.argv[1:] if command is None else command)
    # An argument that is not UTF-8 (a Latin-1 folder name) as escapes: as it came, the log
    # line could not be written anywhere text is (the file, a test's captured log).
    args = os.fsencode(args).decode("utf-8", "backslashreplace")
    logger.info("bunny %s: %s", version(), args)
    return path


#: The file of the last command started in this process (for tests and the Python API).
last_path: Path | None = None


def stop_cli_log() -> None:
    """Close this command's handlers and take :data:`ENV` back out of the environment, so a later
    ``bunny`` command or Python call in the same process (the tests) does not write to this file."""
    global _previous_env
    for lg in (logging.getLogger(LOGGER), logging.getLogger("py.warnings")):
        for h in [h for h in lg.handlers if (h.get_name() or "").startswith(LOGGER)]:
            lg.removeHandler(h)
            h.close()
    logging.captureWarnings(False)
    for key, value in ((ENV, _previous_env), (QUIET_ENV, _previous_quiet)):
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


_previous_env: str | None = None
_previous_quiet: str | None = None


class _HeldHandler(logging.Handler):
    """What the terminal's handler would show, kept in :attr:`lines` (:func:`held_lines`)."""

    def __init__(self, quiet: bool, verbose: bool = False):
        super().__init__()
        self.lines: list[str] = []
        level = logging.ERROR if quiet else logging.INFO if verbose else logging.WARNING
        self.addFilter(_SayFilter(level, quiet=quiet))
        self.setFormatter(_TerminalFormatter())
        self.set_name(f"{LOGGER}-terminal")  # :func:`say` and :func:`terminal_attached` find it

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.lines.append(self.format(record))
        except Exception:  # pragma: no cover - logging must never raise
            self.handleError(record)


@contextlib.contextmanager
def held_lines(quiet: bool, verbose: bool = False) -> Iterator[list[str]]:
    """For the block, the lines this process would show on a terminal (as ``bunny``'s terminal
    handler formats them, ``quiet`` as ``--quiet``, ``verbose`` as ``--verbose``: a Ray task
    showed no INFO line under ``-v``) are kept in the list yielded instead.

    Why: a Ray worker's standard error reaches the command's terminal through Ray's log
    forwarding, which is asynchronous: its lines came glued to the movies' bar, and none at all
    when the run ended before they were forwarded (a failed movie's one line among them, under
    "3 of 4 movies failed (see the messages above)"). The worker returns them with its report and
    the head prints them (:mod:`diffusion_bunny.pipeline.engine`)."""
    logger = logging.getLogger(LOGGER)
    handler = _HeldHandler(quiet, verbose)
    level = logger.level
    logger.setLevel(logging.INFO)  # a worker with no log file to attach left it at WARNING
    logger.addHandler(handler)
    try:
        yield handler.lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def terminal_verbose() -> bool:
    """Whether ``bunny``'s terminal handler shows INFO records (``--verbose``)."""
    for handler in logging.getLogger(LOGGER).handlers:
        if (handler.get_name() or "") == f"{LOGGER}-terminal":
            return any(isinstance(f, _SayFilter) and f.level <= logging.INFO for f in handler.filters)
    return False


def terminal_attached() -> bool:
    """Whether ``bunny``'s terminal handler (or :func:`held_lines`) shows this package's records."""
    return any((h.get_name() or "") == f"{LOGGER}-terminal" for h in logging.getLogger(LOGGER).handlers)


def say(logger: logging.Logger, text: str) -> None:
    """One INFO line for the log file and the terminal (unless --quiet); outside ``bunny`` (no
    terminal handler: a stage's kernel, the Python API, tests) it goes to standard error as
    before (not under ``bunny --quiet``: :data:`QUIET_ENV`, e.g. in a Ray worker), and under
    ``bunny run`` to the terminal through the stage's relay (:func:`relaying`)."""
    if terminal_attached():
        logger.info(text, extra=SAY)
        return
    logger.info(text)
    if not os.environ.get(QUIET_ENV):
        from tqdm import tqdm  # lazy: keeps tqdm out of `bunny --help` (0.05 s)

        tqdm.write(text, file=sys.stderr)
    _relay_line(text)


def say_relayed(text: str) -> None:
    """A line a stage's kernel said (:func:`say`), on this process's terminal (unless --quiet); not
    in the log file again: the kernel wrote it there."""
    logging.getLogger(f"{LOGGER}.relay").info(text, extra={**SAY, "relayed": True})


# ---------------------------------------------------------------------------------------------
# What a stage in a kernel shows on the terminal of `bunny run`

#: The stage's progress file while a stage of ``bunny run`` computes in this process (a kernel).
_relay: Path | None = None
#: The open :func:`relaying` block (a new object each time): a bar writes only inside the block it
#: began in. tqdm closes a bar again when it is collected, which in a kernel the stages share can
#: be a later stage; a file written then outlived the runner's clean-up and showed the next run
#: of the stage a finished bar.
_relay_block: object | None = None
#: Suffixes of the relay files beside a stage's progress file ``.progress-<stage>.json``.
SAY_SUFFIX = ".say"
BAR_SUFFIX = ".bar-"


@contextlib.contextmanager
def relaying(progress_path: Path | None) -> Iterator[None]:
    """Relay :func:`say`'s lines and :func:`relay_bar_class`'s bars beside ``progress_path`` for
    the block, when this process was started by ``bunny`` (:data:`ENV` set: its runner follows the
    files and removes them); elsewhere (JupyterLab) nothing is written."""
    global _relay, _relay_block
    before = _relay, _relay_block
    _relay = Path(progress_path) if progress_path is not None and os.environ.get(ENV) else None
    _relay_block = object() if _relay is not None else None
    try:
        yield
    finally:
        _relay, _relay_block = before


def _relay_line(text: str) -> None:
    if _relay is None:
        return

    line = (json.dumps({"say": text}) + "\n").encode()
    with contextlib.suppress(OSError):  # the terminal misses a line; the log file has it
        fd = os.open(str(_relay) + SAY_SUFFIX, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, line)  # one write on an O_APPEND file: lines never tear
        finally:
            os.close(fd)


def relay_bar_class() -> type:
    """A ``tqdm.auto`` bar class whose bars, while a stage relays (:func:`relaying`), are also
    written (a few times a second) to files the terminal of ``bunny run`` shows: a model's
    download inside a stage's kernel is seen where the user waits for it."""

    from tqdm.auto import tqdm as auto_tqdm  # lazy: keeps tqdm out of `bunny --help` (0.05 s)

    class RelayBar(auto_tqdm):  # type: ignore[misc]
        def __init__(self, *args: object, **kwargs: object) -> None:
            self._relay_path = Path(f"{_relay}{BAR_SUFFIX}{uuid.uuid4().hex[:8]}") if _relay else None
            self._relay_block = _relay_block
            self._relay_at = 0.0
            super().__init__(*args, **kwargs)
            self._mirror(force=True)

        def _mirror(self, force: bool = False, closed: bool = False) -> None:
            path = getattr(self, "_relay_path", None)
            now = time.monotonic()
            if path is None or self._relay_block is not _relay_block:
                return
            if not force and now - self._relay_at < 0.3:
                return
            self._relay_at = now
            data = {"done": self.n, "total": self.total, "closed": closed}
            # A disabled tqdm sets none of these: the bar is shown all the same.
            data.update(
                unit=getattr(self, "unit", "it"),
                desc=getattr(self, "desc", "") or "",
                unit_scale=bool(getattr(self, "unit_scale", False)),
            )
            tmp = path.with_name(path.name + ".tmp")
            with contextlib.suppress(OSError):
                tmp.write_text(json.dumps(data))
                os.replace(tmp, path)

        def update(self, n: float | None = 1) -> bool | None:
            shown = super().update(n)
            self._mirror()
            return shown

        def refresh(self, *args: object, **kwargs: object) -> None:
            super().refresh(*args, **kwargs)
            self._mirror()

        def close(self) -> None:
            if not getattr(self, "_relay_closed", False):  # tqdm closes again when collected
                self._relay_closed = True
                self._mirror(force=True, closed=True)  # the runner shows it once more, then drops it
            super().close()

    return RelayBar


def attach_from_env() -> Path | None:
    """In a kernel or worker started by ``bunny``: append this process's records to the
    command's log file (once; a no-op without :data:`ENV`)."""
    value = os.environ.get(ENV)
    if not value:
        return None
    path = Path(value)
    logger = logging.getLogger(LOGGER)
    if any(getattr(h, "baseFilename", None) == str(path.resolve()) for h in logger.handlers):
        return path
    logger.setLevel(logging.INFO)
    logger.addHandler(_file_handler(path))
    logging.captureWarnings(True)
    logging.getLogger("py.warnings").addHandler(logger.handlers[-1])
    return path


def log_hint(what: str = "log") -> str:
    """``" (<what>: <this command's log file>)"``, for a one-line error that names where the
    details are; empty outside ``bunny`` (no file)."""
    value = os.environ.get(ENV)
    return f" ({what}: {value})" if value else ""


def quiet_bars() -> None:
    """Bars print once per few seconds when standard error is not a terminal (children too)."""
    if not sys.stderr.isatty():
        os.environ.setdefault("TQDM_MININTERVAL", str(NON_TTY_INTERVAL_S))


def bar_options(mininterval: float = 0.1) -> dict[str, float]:
    """tqdm keyword arguments: ``mininterval`` on a terminal, :data:`NON_TTY_INTERVAL_S` elsewhere
    (an explicit ``mininterval`` would override ``TQDM_MININTERVAL``, hence this helper)."""
    return {"mininterval": mininterval if sys.stderr.isatty() else max(mininterval, NON_TTY_INTERVAL_S)}


def version() -> str:
    try:
        return metadata.version("diffusion-bunny")
    except metadata.PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        return "unknown"
