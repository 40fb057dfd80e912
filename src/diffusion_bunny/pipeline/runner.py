"""Headless runs: execute the stage notebooks with papermill on one movie or a folder of movies.

The runner decides per stage whether the manifest still matches (then the stage is skipped
without starting a kernel), executes the notebook otherwise, keeps the executed copy in
``<run>/notebooks/`` and turns a user error raised inside the kernel back into a
:class:`~diffusion_bunny.errors.UserError` with the kernel's message. The notebooks of one
movie's run share one kernel (:class:`StageKernel`), reset between notebooks.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import json
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jupyter_core.utils import run_sync

from diffusion_bunny.errors import (
    USER_ERROR_NAMES,
    BadInputError,
    StageError,
    UserError,
    storage_error_from_text,
)
from diffusion_bunny.logs import FILE_ONLY, say
from diffusion_bunny.media.probe import probe_video, shown
from diffusion_bunny.paths import project_root
from diffusion_bunny.pipeline import lock
from diffusion_bunny.pipeline.atomic import atomic_path, temp_path, writer_alive
from diffusion_bunny.pipeline.contract import (
    Pipeline,
    behind_producers,
    relocate_if_moved,
    stage_state,
    stage_summary,
)
from diffusion_bunny.pipeline.manifest import file_fingerprint
from diffusion_bunny.pipeline.progress import remove_relay_files, start_following, stop_following
from diffusion_bunny.pipeline.recorded import dropped_settings_note
from diffusion_bunny.pipeline.run import (
    Run,
    check_exists,
    check_run_folder,
    given_run_folder,
    run_folder_in,
)
from diffusion_bunny.pipeline.settings import RunConfig, output_root, parse_override

log = logging.getLogger(__name__)
#: Terminal colour codes in IPython's tracebacks (unreadable in a log file).
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


@dataclass(frozen=True)
class RunOptions:
    """What every movie of one ``bunny run`` is run with, passed whole from the command through
    the engines (:mod:`~diffusion_bunny.pipeline.engine`, a Ray task included) to each stage
    notebook, instead of seven keyword arguments handed on by hand through five functions."""

    pipeline: Pipeline
    #: The loaded config (``config_path`` and ``overrides`` applied): the runner's own settings.
    cfg: RunConfig
    #: The stages to run, in pipeline order (:func:`parse_stages`).
    stages: tuple[str, ...] = ()
    #: What each stage notebook loads the same config from (its papermill parameters).
    config_path: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    #: Rerun stages whose manifest matches.
    force: bool = False
    #: Terminal progress bars (off for ``--quiet`` and inside Ray workers).
    progress: bool = True
    #: A setting's name today (``config.current_name``: this module may not import the config),
    #: to compare the settings given with those the folder's last run recorded.
    current_name: Callable[[str], str] | None = None


@dataclass
class StageReport:
    """What happened to one stage of one movie."""

    stage: str
    status: str  # "ran", "skipped"
    reason: str
    counts: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


@dataclass
class MovieReport:
    """What happened to one movie."""

    movie: Path
    run_dir: Path | None
    stages: list[StageReport] = field(default_factory=list)
    error: str | None = None
    bug: bool = False  # the error was a bug (a folder run reports those on either engine)
    #: A Ray task's terminal lines, which the head prints (``logs.held_lines``); empty otherwise.
    lines: list[str] = field(default_factory=list)


def _holds_video(folder: Path, exts: set[str]) -> bool:
    try:
        return any(p.suffix.lower() in exts and p.is_file() for p in folder.iterdir())
    except OSError:  # a folder we may not read says nothing
        return False


def _same_path(path: Path) -> Path:
    try:
        return path.resolve()
    except OSError:  # a loop of links: as typed (its probe says what is wrong)
        return path


def find_movies(target: str | Path | Sequence[str | Path], cfg: RunConfig) -> list[Path]:
    """The movie itself, or every video file directly inside a folder (sorted by name); of
    several targets (a shell's ``*.mkv``), each one's movies in their order, each file once."""
    if not isinstance(target, (str, Path)):
        found = _movies_of_targets(list(target), cfg)
        # Once per file, however it was typed (``dir/a.mp4`` and ``dir/../dir/a.mp4``): kept apart,
        # the second was "the same file as a.mp4" of itself.
        once: dict[Path, Path] = {}
        for movie in found:
            once.setdefault(_same_path(movie), movie)
        return list(once.values())
    target = check_exists(target)
    if target.is_file():
        return [target]
    exts = {e.lower() for e in cfg.run.video_extensions}
    movies = sorted(
        p for p in target.iterdir() if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in exts
    )
    if not movies:
        # A season of folders (one per episode) is the usual reason: say which hold videos.
        below = sorted(
            d.name
            for d in target.iterdir()
            if d.is_dir() and not d.name.startswith(".") and _holds_video(d, exts)
        )
        hint = _sequence_hint(target)
        if below:
            listed = ", ".join(below[:3]) + (f" and {len(below) - 3} more" if len(below) > 3 else "")
            holds = "1 of them holds" if len(below) == 1 else f"{len(below)} of them hold"
            hint = f"; sub-folders are not searched, and {holds} videos ({listed}): run each"
        raise BadInputError(
            f"{target}: the folder holds no video file (looked for {', '.join(sorted(exts))}){hint}"
        )
    return movies


def _movies_of_targets(targets: list[str | Path], cfg: RunConfig) -> list[Path]:
    """The movies of several targets (a shell's ``DIR/*``), as one folder would give them: files
    not named as videos (``run.video_extensions``: subtitles, a poster) and folders holding none
    (``extras/``) are passed over in one line. Each was a "movie" that failed, or stopped the
    whole command. Named files are taken whatever their names when no target gives a video by
    its name (``bunny run a.gif b.gif``)."""
    if len(targets) == 1:
        return find_movies(targets[0], cfg)
    exts = {e.lower() for e in cfg.run.video_extensions}
    found: list[Path] = []
    files: list[Path] = []
    skipped: list[str] = []
    for one in targets:
        path = check_exists(one)
        if path.is_file():
            (found if path.suffix.lower() in exts else files).append(path)
            continue
        try:
            found += find_movies(path, cfg)
        except BadInputError:
            skipped.append(f"{path.name}/ (no video in it)")
    if not found:
        if not files:
            raise BadInputError(
                f"none of the {len(targets)} targets holds a video file ({', '.join(skipped[:4])}); give "
                "movie files or the folders that hold them"
            )
        return files  # only files named otherwise: taken as typed, one by one
    skipped = [f"{p.name} (not a video by its name)" for p in files] + skipped
    if skipped:
        more = f" and {len(skipped) - 4} more" if len(skipped) > 4 else ""
        say(
            log,
            f"{len(skipped)} of the {len(targets)} targets passed over: {', '.join(skipped[:4])}{more}; "
            "a movie named alone runs whatever its name (run.video_extensions lists the ones taken here)",
        )
    return found


#: Pictures an animation or a render is often exported as, one file per frame.
_SEQUENCE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".exr", ".dpx", ".webp", ".bmp", ".tga")


def _sequence_hint(folder: Path) -> str:
    """What to do with a folder of frames (an animator's export, a render) or a DVD's VIDEO_TS: the
    workspace reads movies, and the line said only that the folder "holds no video file"."""
    files = [p for p in folder.iterdir() if p.is_file()]
    counts = Counter(p.suffix for p in files if p.suffix.lower() in _SEQUENCE_SUFFIXES)
    vobs = [p for p in files if p.name.upper().startswith("VTS_")]
    if vobs:  # a DVD's VIDEO_TS: each title is cut into 1 GB pieces, beside menus
        return (
            f"; it is a DVD's VIDEO_TS folder ({len(vobs)} VTS files): join one title's pieces into one "
            "file, e.g. cat VTS_01_1.VOB VTS_01_2.VOB ... > title.vob (the largest title is the film), "
            "and run that file"
        )
    if counts.total() < 2:
        return ""
    suffix = counts.most_common(1)[0][0]
    return (
        f"; it holds {counts.total()} pictures: a picture sequence is read once made into a movie, "
        f"e.g. ffmpeg -framerate 24 -pattern_type glob -i '*{suffix}' -vf 'pad=ceil(iw/2)*2:ceil(ih/2)*2' "
        "-c:v libx264 -crf 12 -pix_fmt yuv420p movie.mp4"
    )


def drop_copies(movies: list[Path]) -> list[Path]:
    """Each movie of a folder once: of files with the same content (``film (1).mp4`` beside
    ``film.mp4``, a copy a download or a backup left) the one with the shortest name is run and
    the others are left out with one line each. Run on, a copy made a second run folder of the
    same frames, and a folder's datasets and its library of scenes held each of that movie's
    pictures twice. Same content is the manifests' fingerprint (size, first and last megabyte):
    instant on a 50 GB file. Empty files are no copies (each is reported as empty)."""
    groups: dict[Any, list[Path]] = {}
    for movie in movies:
        key: Any = movie  # unreadable or empty: its own run says what is wrong with it
        with contextlib.suppress(OSError):
            mark = file_fingerprint(movie)
            if mark["size"]:
                key = (mark["size"], mark["head"], mark["tail"])
        groups.setdefault(key, []).append(movie)
    kept = set()
    for group in groups.values():
        first = min(group, key=lambda p: (len(p.name), p.name))
        kept.add(first)
        for copy in group:
            if copy != first:
                # Of one name in two folders (``s1/E01.mkv``, ``backup/E01.mkv``) the folders
                # too: "E01.mkv: the same file as E01.mkv" did not say which one runs.
                one_name = copy.name == first.name
                said = (
                    (shown(str(copy)), shown(str(first)))
                    if one_name
                    else (shown(copy.name), shown(first.name))
                )
                _say(f"{said[0]}: the same file as {said[1]} (size, first and last megabyte); run once")
    return [m for m in movies if m in kept]


def parse_stages(pipeline: Pipeline, text: str | Sequence[str] | None) -> list[str]:
    """``"extract,quality"`` -> ordered list of known stage names; None means all stages.

    A stage may also be given by its notebook's number (``01``, ``3``) and a span by its ends
    (``1-3``, ``extract-characters``): the workspace's own messages speak of stages by number
    ("rerun stage 01"), and ``--stages 01,02`` was an unknown stage."""
    order = pipeline.names()
    if text is None:
        return order
    tokens = [n.strip() for n in (text.split(",") if isinstance(text, str) else text) if n.strip()]
    if not tokens:
        raise StageError(f"--stages is empty (available: {', '.join(order)})")
    names: set[str] = set()
    for token in tokens:
        ends = [_stage_name(order, end.strip()) for end in _span(token, order)]
        first, last = order.index(ends[0]), order.index(ends[-1])
        if first > last:
            raise StageError(f"--stages {token}: {ends[0]} comes after {ends[-1]}; give the span in order")
        names.update(order[first : last + 1])
    return sorted(names, key=order.index)


def _span(token: str, order: list[str]) -> list[str]:
    """``token`` as one stage or the two ends of a span (a name itself never holds a '-')."""
    if token in order or "-" not in token.strip("-"):
        return [token]
    return token.split("-", 1)


def _stage_name(order: list[str], word: str) -> str:
    """A stage's name (of ``order``, the pipeline's) from its name or its notebook's number
    (1-based, as the notebooks are)."""
    if word.isdigit() and 1 <= int(word) <= len(order):
        return order[int(word) - 1]
    if word not in order:
        raise StageError(
            f"unknown stage '{word}' (available: {', '.join(order)}; or their numbers 1-{len(order)}, "
            "a span as 1-3)"
        )
    return word


def notebook_dir() -> Path:
    """The ``notebook/`` folder of the checkout."""
    root = project_root()
    if root is None or not (root / "notebook").is_dir():
        raise UserError("the stage notebooks were not found: run bunny from a diffusion-bunny checkout")
    return root / "notebook"


#: How every stage kernel is started (by nbclient, or ahead of it by :meth:`StageKernel.start`).
#: ipykernel warns on every start that its local TCP sockets are unencrypted; that is noise on a
#: user's terminal (errors in cells still come back through papermill). The history is kept in
#: memory, as nbclient does by default, not in the user's IPython profile database.
KERNEL_ARGUMENTS = ["--IPKernelApp.log_level=ERROR", "--HistoryManager.hist_file=:memory:"]

#: Run in a shared kernel before each notebook but its first: what a fresh kernel would give a
#: notebook (an empty namespace and output history, no open figures, execution counts from 1),
#: keeping only what was imported. IPython's reset also drops the module's dunders, which
#: multiprocessing's spawn needs (``__main__.__spec__``), so those are put back. Its full garbage
#: collections (two, one in flushing the output cache) are skipped: over the ~290,000 objects of a
#: kernel that ran the stages they took 0.4-0.5 s a notebook, ~2 s of a six-stage run, and free
#: only reference cycles, which the interpreter's own collector frees anyway as the next notebook
#: allocates (what the namespace held by plain references is freed at once). Last, glibc's
#: ``malloc_trim`` hands the freed heap back to the system: free() only returns the top of the
#: heap, so the kernel kept stage 01's freed decode buffers resident while stage 03 loaded its
#: models (peak RSS on the 10-minute film as released 2,146-2,167 MiB before, 1,898-1,926 after;
#: a few milliseconds; elsewhere than glibc the call is skipped).
_FRESH_NAMESPACE = """\
def _fresh(ip=get_ipython()):
    import gc, sys
    dunders = {k: v for k, v in ip.user_ns.items() if k.startswith("__") and k.endswith("__")}
    if "matplotlib.pyplot" in sys.modules:
        sys.modules["matplotlib.pyplot"].close("all")
    collect, gc.collect = gc.collect, lambda generation=2: 0
    try:
        ip.reset(new_session=True)
    finally:
        gc.collect = collect
    ip.user_ns.update(dunders)
    try:  # glibc keeps freed heap in its arenas; hand it back before the next stage allocates
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
_fresh()
"""


#: The script a stage kernel runs as it starts, and the variable naming what it imports.
_KERNEL_WARM = Path(__file__).with_name("kernel_warm.py")
WARM_ENV = "DIFFUSION_BUNNY_KERNEL_WARM"


def warm_modules(pipeline: Pipeline, stage: str) -> tuple[list[str], list[str]]:
    """The modules a kernel can import ahead for ``stage``'s notebook, as (needed before the
    stage, needed after it): every module its code cells import at their top level (what the
    notebook imports whatever it is run with), split at the first cell that runs the stage; the
    stage's own code (``stages/<name>/stage.py``, imported when it runs) is needed before it."""
    before: list[str] = []
    after: list[str] = []
    try:
        cells = json.loads((notebook_dir() / pipeline.get(stage).notebook).read_text())["cells"]
    except (OSError, ValueError, KeyError, UserError):
        cells = []
    names = before
    for cell in cells:
        if cell.get("cell_type") != "code":
            continue
        source = "".join(cell.get("source", ""))
        try:
            tree = ast.parse(source)
        except SyntaxError:  # IPython syntax (a magic): the notebook still imports it itself
            continue
        for node in tree.body:
            if isinstance(node, ast.Import):
                names += [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names.append(node.module)
        if "run_stage(" in source:
            names = after
    before.append(f"{pipeline.get(stage).package}.stage")
    before = list(dict.fromkeys(before))
    return before, [n for n in dict.fromkeys(after) if n not in before]


class StageKernel:
    """One Jupyter kernel for the stage notebooks of one movie's run.

    Why: a fresh kernel per notebook paid its start and the stage's imports (polars, plotnine,
    torch: 4-6 s on 2 cores) and the first figure's set-up (~2 s) every time, more than many
    stages' own work on a short movie and ~70 s of a six-stage run. Between notebooks the kernel
    is reset (:data:`_FRESH_NAMESPACE`), so a notebook still sees only the names it defines, as
    a user running it alone in JupyterLab would; imported modules and loaded models stay, which
    is the saving. The run starts the kernel ahead of its first notebook (:meth:`start`;
    otherwise nbclient starts it with the first notebook), and nbclient leaves it running because
    it does not own the manager; a kernel that died is replaced. :meth:`close` ends it whatever
    happened, a failed notebook write included.
    """

    def __init__(self, kernel_name: str):
        self.kernel_name = kernel_name
        self._km: Any = None
        self.notebooks = 0
        self.fresh = True  # whether the last notebook got a kernel not started before

    def start(self, warm: Sequence[str] = (), later: Sequence[str] = ()) -> None:
        """Start the kernel now, before the first notebook needs it, importing the modules
        ``warm`` as it starts and ``later`` in the background (:func:`warm_modules`).

        Why: a kernel takes ~1.9 s on 2 cores to start and answer (interpreter, ipykernel,
        ZeroMQ), and the first notebook's imports ~2 s more (polars and the stage's modules
        ~0.8 s, the figures' plotnine, pandas and pyplot ~1.2 s); the run's own process
        meanwhile probes the movie, checks the stages and imports papermill (~1 s) on the other
        core. Started here with the stage's imports (:mod:`~diffusion_bunny.pipeline.kernel_warm`),
        the two overlap instead of following each other, and the figures' imports overlap the
        stage's decoding. Started as nbclient would start it (same working folder and
        arguments), so nbclient simply connects to it once it answers.
        """
        if self._km is None:
            self._km = self._new_manager()
            self.notebooks = 0
        if not self._km.has_kernel:
            arguments = list(KERNEL_ARGUMENTS)
            env = dict(os.environ)
            if warm or later:
                arguments.append(f"--IPKernelApp.exec_files={json.dumps([str(_KERNEL_WARM)])}")
                env[WARM_ENV] = ",".join(warm)
                env[WARM_ENV + "_LATER"] = ",".join(later)
            run_sync(self._km.start_kernel)(extra_arguments=arguments, cwd=str(notebook_dir()), env=env)

    def manager(self) -> Any:
        """The kernel manager for the next notebook: the running kernel, reset, or a new one."""
        if self._km is not None and self._km.has_kernel and not run_sync(self._km.is_alive)():
            self.close()
        if self._km is None:
            self._km = self._new_manager()
            self.notebooks = 0
        self.fresh = not self._km.has_kernel or not self.notebooks
        if not self.fresh and self.notebooks:
            self._reset()
        self.notebooks += 1
        return self._km

    def _new_manager(self) -> Any:
        from jupyter_client.kernelspec import NoSuchKernel  # lazy: jupyter_client takes 0.11 s to import
        from jupyter_client.manager import AsyncKernelManager  # lazy: jupyter_client takes 0.11 s to import

        km = AsyncKernelManager(kernel_name=self.kernel_name, **_kernel_sockets())
        try:
            km.kernel_spec  # noqa: B018 - looks the kernel up now, for a clear line
        except NoSuchKernel:
            raise StageError(
                f"run.kernel: no Jupyter kernel named {self.kernel_name!r} is installed; use python3 (the "
                "project's own environment) or one that `uv run jupyter kernelspec list` shows"
            ) from None
        return km

    def _reset(self) -> None:
        async def fresh() -> dict[str, Any]:
            # Over the shell channel alone: its reply says the reset ran. wait_for_ready and
            # execute_interactive would also drain IOPub, which costs a 0.2 s quiet wait each
            # (1 s of a six-stage run); the kernel is known to be alive (checked above).
            kc = self._km.client()
            kc.start_channels(iopub=False, stdin=False, hb=False, control=False)
            try:
                msg_id = kc.execute(_FRESH_NAMESPACE, silent=True, store_history=False)
                deadline = time.monotonic() + 60
                while True:
                    reply = await kc.get_shell_msg(timeout=max(0.1, deadline - time.monotonic()))
                    if reply["parent_header"].get("msg_id") == msg_id:
                        return reply
            finally:
                kc.stop_channels()

        reply = run_sync(fresh)()
        if reply["content"]["status"] != "ok":  # pragma: no cover - IPython's own reset failing
            raise RuntimeError(f"resetting the stage kernel failed: {reply['content']}")

    def close(self) -> None:
        """Shut the kernel down (a no-op when none runs)."""
        km, self._km = self._km, None
        if km is None:
            return
        if not km.has_kernel:
            try:
                _kill_unrecorded_kernel(getattr(km, "connection_file", ""))
            finally:
                with contextlib.suppress(Exception):  # its connection and socket files, if written
                    run_sync(km.cleanup_resources)()
            return
        try:
            if run_sync(km.is_alive)():
                # Killed, not asked to shut down: every stage's writes are finished and atomic by
                # now, and a polite shutdown of a kernel that ran the stages (interpreter exit
                # over torch, ONNX Runtime, dlib, plotnine) took 1.2-1.6 s of every run.
                run_sync(km.shutdown_kernel)(now=True)
        finally:
            run_sync(km.cleanup_resources)()


def _kill_unrecorded_kernel(connection_file: str) -> None:
    """End a kernel this process launched but never recorded, found by its connection file.

    Why: an interrupt (Ctrl-C, or SIGTERM raised as one) that lands while jupyter_client launches
    the kernel, after the fork and before ``Popen`` returns, leaves the kernel running without
    its manager knowing it. ipykernel ends itself only once it notices its parent gone (polled
    each second, after its start-up imports): seconds later on a loaded machine, never where
    orphans are adopted by a process other than init (the SIGTERM test found it under load).
    The kernel leads a session of its own (``start_new_session``), so its group goes with it."""
    if not connection_file:
        return
    import psutil  # lazy: only a kernel start that was interrupted needs it

    for child in psutil.Process().children():
        with contextlib.suppress(psutil.Error, OSError):
            if connection_file in child.cmdline():
                if hasattr(os, "killpg"):  # POSIX: the kernel's own children too
                    with contextlib.suppress(OSError):
                        os.killpg(child.pid, signal.SIGKILL)
                child.kill()
                child.wait(timeout=10)


def _kernel_sockets() -> dict[str, str]:
    """How the run talks to a stage kernel: Unix sockets of its own where the system has them.

    Why: over TCP, jupyter_client picks the kernel's five ports by opening and closing them in
    the run's process, and the kernel binds them a second later. Anything on the machine may
    take one in between; in a folder run on Ray, whose workers open connections all the time,
    one did, and the kernel printed a heartbeat traceback ("Address already in use") into the
    run's messages. Socket files named after a fresh id cannot be taken. Their path must be
    absolute (the kernel runs in the notebooks' folder) and short (a Unix socket's name holds
    107 bytes): a temporary folder with a long name falls back to TCP. The connection file (the
    kernel's key) is named the same way, so :func:`remove_orphan_sockets` removes it too once the
    process is gone (a ``tmpXXXX.json`` of jupyter_client's was left by each hard kill).
    """
    if os.name != "posix":  # pragma: no cover - ZeroMQ has no ipc transport on Windows
        return {}
    folder = tempfile.gettempdir()
    name = os.path.join(folder, f"{_SOCKET_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:12]}")
    if len(name) > 86:  # "-ipc-N" is added for each of the five channels
        return {}
    remove_orphan_sockets(folder)
    return {"transport": "ipc", "ip": f"{name}-ipc", "connection_file": f"{name}.json"}


#: Stage kernels' socket files, ``bunny-kernel-<pid of the process that started it>-<id>-ipc-<N>``,
#: and connection files, ``...-<id>.json``.
_SOCKET_PREFIX = "bunny-kernel-"
_SOCKET_NAME = re.compile(re.escape(_SOCKET_PREFIX) + r"(\d+)-[0-9a-f]+(?:-ipc-\d+|\.json)")


def remove_orphan_sockets(folder: str) -> None:
    """Remove the socket files of stage kernels whose starting process has gone.

    Why: :meth:`StageKernel.close` removes a kernel's files, but a process killed outright
    cannot (a movie's Ray task cancelled past ``engine.task_timeout_s``, whose worker is killed; a
    ``bunny run`` killed with SIGKILL). Its kernel exits with it, and a kernel does not remove
    its files on its way out, so each such kill left five in the temporary folder. The process
    that started a kernel is in the name: while it lives its files are its own; once it is gone
    nobody will remove them. Another user's files stay (not ours to judge, nor to delete).
    """
    with contextlib.suppress(OSError):
        for entry in os.scandir(folder):
            match = _SOCKET_NAME.fullmatch(entry.name)
            if match is not None and not writer_alive(int(match.group(1)), entry.path):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)


def stage_timeout(cfg: RunConfig, movie_s: float | None) -> float | None:
    """Seconds one stage notebook of a movie ``movie_s`` seconds long may run:
    ``pipeline.stage_timeout_s`` when it is a number (None: no limit), and for ``auto``
    ``stage_timeout_base_s`` + ``stage_timeout_per_minute_s`` per minute of movie (a movie whose
    length cannot be read counts as three hours long)."""
    pipe = cfg.pipeline
    if pipe.stage_timeout_s != "auto":
        return float(pipe.stage_timeout_s) if pipe.stage_timeout_s else None
    minutes = (movie_s if movie_s is not None else 3 * 3600.0) / 60.0
    return pipe.stage_timeout_base_s + pipe.stage_timeout_per_minute_s * minutes


def execute_stage_notebook(
    run: Run, stage: str, options: RunOptions, kernel: str | StageKernel, movie_s: float | None = None
) -> Path:
    """Execute one stage notebook headless and keep the executed copy in the run folder.

    ``kernel`` is a kernel name (a kernel of its own, shut down after the notebook) or a
    :class:`StageKernel` shared with the run's other notebooks. A notebook still running after
    :func:`stage_timeout` (``movie_s``: the movie's length) has its kernel stopped
    (:class:`_Deadline`) and fails with one line, as a hung stage must not stall a batch.
    """
    # papermill -> nbformat -> jsonschema imports rfc3987_syntax, which builds a parser grammar
    # at import time (0.9 s, a third of the CLI's start-up) for an "iri" format check that
    # notebook validation never uses; jsonschema skips that checker when the import fails.
    sys.modules.setdefault("rfc3987_syntax", None)  # type: ignore[arg-type]
    import papermill  # lazy: papermill takes 1.2 s to import
    from nbclient.exceptions import DeadKernelError  # lazy: nbclient takes 1.0 s to import
    from papermill.exceptions import PapermillExecutionError  # lazy: papermill takes 1.2 s to import

    _route_papermill_logs()

    spec = options.pipeline.get(stage)
    source = notebook_dir() / spec.notebook
    target = run.notebooks_dir / spec.notebook
    target.parent.mkdir(parents=True, exist_ok=True)
    own = not isinstance(kernel, StageKernel)
    stage_kernel = StageKernel(kernel) if isinstance(kernel, str) else kernel
    km = stage_kernel.manager()
    timeout_s = stage_timeout(options.cfg, movie_s)
    deadline = _Deadline(km, timeout_s)
    stop = threading.Event()
    watcher = start_following(run.progress_path(stage), stop) if options.progress else None
    # The notebook is executed into a temporary file beside its place and renamed there when
    # papermill has written it whole (a notebook that failed in a cell too: it shows where): a
    # full disk or a kernel killed outright left a cut-off or empty notebook beside a stage that
    # counted as done, and no rerun repaired it. Its first copy is written before any kernel
    # starts: a run folder that cannot take it fails here, not after the stage's work.
    # Only the rename is inside atomic_path: it takes any other error on a nearly full disk for
    # a full disk's, and an interrupt or a kernel's death must stay what it is.
    failed: Exception | None = None
    part = temp_path(target)
    try:
        shutil.copyfile(source, part)
        deadline.start()
        try:
            _papermill(papermill, source, part, run, options, stage_kernel, km)
        except PapermillExecutionError as exc:  # the notebook, its error marked, is kept
            failed = _notebook_error(stage, target, exc)
        with atomic_path(target) as whole:
            os.replace(part, whole)
    except OSError as exc:  # papermill writing the executed notebook (a full disk names no file)
        if not exc.filename or Path(str(exc.filename)).name.startswith(f".{target.name}."):
            exc.filename = str(target)
        raise
    except DeadKernelError as exc:  # papermill saves nothing then: the notebook before is kept
        stage_kernel.close()
        auto = options.cfg.pipeline.stage_timeout_s == "auto"
        raise _dead_kernel_error(stage, exc, timeout_s if deadline.fired else None, auto) from None
    finally:
        part.unlink(missing_ok=True)  # a notebook not put in place (killed: swept later)
        deadline.cancel()
        stop_following(stop, watcher)
        remove_relay_files(run.progress_path(stage))
        if own:
            stage_kernel.close()
    if failed is not None:
        raise failed from None
    return target


def _papermill(
    papermill: Any, source: Path, output: Path, run: Run, options: RunOptions, kernel: StageKernel, km: Any
) -> None:
    """papermill executes ``source`` into ``output`` (a temporary name: its warning that the name
    does not end in ``.ipynb`` is silenced)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"The specified file .* does not end in one of")
        papermill.execute_notebook(
            str(source),
            str(output),
            parameters=_notebook_parameters(run, options),
            progress_bar=False,  # the stage's own bar (frames, not cells) is followed instead
            # papermill rewrites the whole notebook (figures included) after every cell: ~190
            # writes and 1.9 s of a six-stage run on 2 cores. It is written once at the end, or
            # with the error marked when a cell fails; the stage's own bar shows its progress.
            request_save_on_cell_execute=False,
            cwd=str(source.parent),
            extra_arguments=KERNEL_ARGUMENTS,
            # a kernel started ahead answers once its warm imports are done (StageKernel.start):
            # seconds on a loaded machine, more than papermill's 60 s only when something hangs
            start_timeout=300,
            kernel_name=kernel.kernel_name,
            km=km,
            engine_name=_reply_keeping_engine(),
        )


def _notebook_parameters(run: Run, options: RunOptions) -> dict[str, Any]:
    """The papermill parameters of every stage notebook: the run, and the config as the command
    loaded it. ``force`` is the user's ``--force``: the runner runs a notebook only when its stage
    is not up to date, and the stage then finds it so itself; forced always, it threw away the
    work a rerun keeps (stage 02 scored every frame again for a new threshold)."""
    return {
        "run_dir": str(run.run_dir),
        "config_path": options.config_path,
        "overrides": options.overrides,
        "movie": str(run.movie),
        "force": options.force,
        "interactive": False,
    }


def _notebook_error(stage: str, target: Path, exc: Any) -> Exception:
    """A cell that raised (papermill's ``PapermillExecutionError``) as the runner's error: a user
    error or a full disk with the kernel's own message, anything else as a bug whose traceback
    goes to the log file."""
    if exc.ename in USER_ERROR_NAMES:
        return UserError(exc.evalue)
    storage = storage_error_from_text(exc.ename, exc.evalue)
    if storage is not None:
        return storage
    # A bug in the stage: the kernel's own traceback is what a developer needs, and the
    # runner's (raised by the caller) says only that the notebook failed; both go to the log file.
    log.error(
        "stage %s: the kernel's traceback:\n%s",
        stage,
        _ANSI.sub("", "\n".join(exc.traceback or [])),
        extra=FILE_ONLY,
    )
    return RuntimeError(
        f"stage {stage} failed inside its notebook ({exc.ename}: {exc.evalue}); "
        f"the executed notebook is {target}"
    )


def _dead_kernel_error(
    stage: str, exc: Exception, timed_out_s: float | None, auto: bool = False
) -> StageError:
    """The kernel process ended under the stage: stopped by its deadline (``timed_out_s``), or
    else nearly always killed by the system for memory. papermill saves no executed notebook
    then (it saves once, at the end): what the stage last did is in the command's log."""
    if timed_out_s is not None:
        setting = (
            f"pipeline.stage_timeout_s: auto ({timed_out_s:g} s for this movie's length)"
            if auto
            else f"pipeline.stage_timeout_s = {timed_out_s:g} s"
        )
        raise_it = (
            "pipeline.stage_timeout_base_s or stage_timeout_per_minute_s"
            if auto
            else "pipeline.stage_timeout_s"
        )
        return StageError(
            f"stage {stage} did not finish within {setting} and was stopped (a hang, or more work than the "
            f"limit allows); raise {raise_it} if "
            "it was working, or see what it last did in the log (finished stages are kept)"
        )
    # The stage's earlier results are intact (its writes are atomic, its manifest was removed
    # first, so it simply runs again).
    return StageError(
        f"stage {stage}: the notebook's kernel died ({str(exc).strip() or 'no reason given'}), most "
        "often because the machine ran out of memory; close other programs or lower the stage's "
        "sizes in the config, then rerun (finished stages are kept)"
    )


class _PapermillToLog(logging.Handler):
    """papermill's and nbclient's own lines ("Kernel died while waiting for execute reply") go to
    the command's log file; without a handler, logging's last resort printed them on the
    terminal beside the runner's one-line error."""

    def emit(self, record: logging.LogRecord) -> None:
        log.log(record.levelno, "papermill: %s", record.getMessage(), extra=FILE_ONLY)


@functools.cache
def _reply_keeping_engine() -> str:
    """The name of papermill's nbclient engine, registered once, with one change: a cell that failed
    without an error output keeps its error as the kernel's execute reply names it.

    A failing cell's error reaches papermill twice: as an ``error`` output on the kernel's IOPub
    channel and in the execute reply on its shell channel. Papermill reads only the output, and
    without one reports a bare ``CellExecutionError`` with no text: a full disk, or any user
    error, then reads as a bug. The output goes missing when IPython cannot format the
    traceback (it prints "Unexpected exception formatting exception" instead) or when it comes
    after nbclient's ``iopub_timeout`` on a loaded machine; seen on 2 cores under the test suite.
    The reply's ``ename`` and ``evalue`` are the exception's own (nbclient keeps them on its
    ``CellExecutionError``), so the runner's classification (:func:`_notebook_error`) reads them
    as if the output had come."""
    import nbformat  # lazy: nbformat takes 0.86 s to import
    from papermill.engines import NBClientEngine, papermill_engines  # lazy: papermill takes 1.2 s to import

    class ReplyKeepingEngine(NBClientEngine):
        @classmethod
        def execute_managed_notebook(cls, nb_man: Any, kernel_name: str, **kwargs: Any) -> Any:
            mark = nb_man.cell_exception

            def cell_exception(cell: Any, cell_index: int | None = None, **kw: Any) -> None:
                exc = kw.get("exception")
                outputs = cell.setdefault("outputs", [])
                if exc is not None and not any(o.get("output_type") == "error" for o in outputs):
                    trace = str(getattr(exc, "traceback", "") or "")
                    outputs.append(
                        nbformat.v4.new_output(
                            "error",
                            ename=str(getattr(exc, "ename", "") or "CellExecutionError"),
                            evalue=str(getattr(exc, "evalue", "") or ""),
                            traceback=trace.splitlines(),
                        )
                    )
                mark(cell, cell_index, **kw)

            nb_man.cell_exception = cell_exception
            return super().execute_managed_notebook(nb_man, kernel_name, **kwargs)

    papermill_engines.register("diffusion-bunny", ReplyKeepingEngine)
    return "diffusion-bunny"


def _route_papermill_logs() -> None:
    pm = logging.getLogger("papermill")
    if not any(isinstance(h, _PapermillToLog) for h in pm.handlers):
        pm.addHandler(_PapermillToLog())
    echo = logging.getLogger("asyncio")
    if not any(isinstance(f, _KernelDeathEcho) for f in echo.filters):
        echo.addFilter(_KernelDeathEcho())


class _KernelDeathEcho(logging.Filter):
    """asyncio's "Task exception was never retrieved" for the cell nbclient was running when its
    kernel died, put at debug level (Python's last-resort handler printed it to the terminal): the
    runner has said why in one line (interrupted, timed out, out of memory), and a Ctrl-C printed
    this traceback after it about one time in five."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and type(exc).__name__ == "DeadKernelError":
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return True


class _Deadline:
    """Stops a stage notebook's kernel when the notebook runs past ``timeout_s``.

    The kernel's whole process group is killed (SIGKILL): a stage hung in C code (a decoder, a
    network read) ignores the interrupt a cell timeout would send, and the kernel's own children
    (stage 03's detection processes) go with it. nbclient then finds the kernel dead and the
    runner reports the stage as timed out (:attr:`fired`); the OS releases the kernel's locks."""

    def __init__(self, km: Any, timeout_s: float | None):
        self.km = km
        self.timeout_s = timeout_s
        self.fired = False
        self._cancelled = False
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None

    def start(self) -> None:
        if self.timeout_s:
            self._timer = threading.Timer(self.timeout_s, self._stop_kernel)
            self._timer.daemon = True
            self._timer.start()

    def _stop_kernel(self) -> None:
        provisioner = getattr(self.km, "provisioner", None)
        pgid = getattr(provisioner, "pgid", None) or getattr(provisioner, "pid", None)
        if not pgid:
            # Past the deadline with the kernel not launched yet (a machine loaded many deep):
            # look again in a second rather than let the notebook run unbounded.
            with self._lock:
                if not self._cancelled:
                    self._timer = threading.Timer(1.0, self._stop_kernel)
                    self._timer.daemon = True
                    self._timer.start()
            return
        self.fired = True
        log.info(
            "stage notebook past its %s s: stopping its kernel (process group %s)",
            self.timeout_s,
            pgid,
            extra=FILE_ONLY,
        )
        with contextlib.suppress(OSError):  # already gone
            os.killpg(pgid, signal.SIGKILL)

    def cancel(self) -> None:
        with self._lock:
            self._cancelled = True
            if self._timer is not None:
                self._timer.cancel()


def run_movie(movie: Path, out: Path | None, options: RunOptions) -> MovieReport:
    """Run the chosen stages on one movie (into ``out``, else its folder under
    ``paths.output_dir``), skipping the ones that are up to date."""
    cfg = options.cfg
    info = probe_video(movie)
    run_dir = given_run_folder(out, movie) if out is not None else run_folder_in(output_root(cfg), movie)
    check_run_folder(run_dir, movie)  # before the lock writes its .locks there
    # The run folder is held from the first stage to the last (a second run of it stops at once,
    # naming this one); the stage notebooks' kernels work under this lock (lock.exported).
    with (
        lock.run_lock(run_dir, what="bunny run", lease_s=cfg.pipeline.lock_stale_s) as lease,
        lock.exported(run_dir, lease),
    ):
        if lease is not None:  # taken here, not inherited from a run whose stage may be running
            _remove_leftover_relays(run_dir)
        return _run_movie_locked(movie, Run.create(run_dir, movie), options, info.duration_s)


def _remove_leftover_relays(run_dir: Path) -> None:
    """Remove the progress and relay files (``.progress-<stage>.json*``) a killed run left: a
    cancelled Ray task or Ctrl-C ends before its stage removes them, and a rerun that skipped that
    stage kept them for good, though they mean a stage is running. Called once the run lock is
    taken: no stage runs in the folder then."""
    for path in Path(run_dir).glob(".progress-*"):
        with contextlib.suppress(OSError):
            path.unlink()


def _run_movie_locked(movie: Path, run: Run, options: RunOptions, movie_s: float | None) -> MovieReport:
    pipeline, cfg, force = options.pipeline, options.cfg, options.force
    report = MovieReport(movie=movie, run_dir=run.run_dir)
    kernel = StageKernel(cfg.run.kernel)
    try:
        first = next(
            (s for s in options.stages if force or stage_state(pipeline, run, s, cfg)[0] != "done"), None
        )
        # Recorded once the stages' states are read: a setting they refuse (a reference folder
        # without pictures) stops the command in one line, and a notebook opened on the run later
        # must not start from settings no stage ran with.
        asked = {"config_path": options.config_path, "overrides": options.overrides}
        if (note := dropped_settings_note(run.settings(), asked, options.current_name)) is not None:
            _say(f"{movie.name}: warning: {note}")
        run.write_settings(options.config_path, options.overrides)
        if first is not None:
            # boots, importing the first notebook's modules, while this process checks the
            # stages and imports papermill
            kernel.start(*warm_modules(pipeline, first))
        for stage in options.stages:
            state, reason = stage_state(pipeline, run, stage, cfg)
            if state == "done" and not force:
                relocate_if_moved(pipeline, run, stage, cfg)
                report.stages.append(StageReport(stage, "skipped", "up to date"))
                _say(f"{movie.name}: {stage} is up to date, skipped (--force reruns it)")
                for line in _behind_outside(pipeline, run, stage, options.stages, cfg):
                    _say(f"{movie.name}: warning: {line}")
                continue
            _say(f"{movie.name}: {stage} ({'forced' if force and state == 'done' else reason})")
            t0 = time.monotonic()
            execute_stage_notebook(run, stage, options, kernel, movie_s)
            log.info(
                "%s: %s notebook took %.1f s (%s)",
                movie.name,
                stage,
                time.monotonic() - t0,
                "kernel start included" if kernel.fresh else "kernel of the earlier stage, reset",
            )
            manifest = run.read_manifest(stage) or {}
            stage_report = StageReport(
                stage, "ran", reason, manifest.get("counts", {}), manifest.get("warnings", [])
            )
            report.stages.append(stage_report)
            summary = stage_summary(pipeline.get(stage), manifest, run.run_dir) if manifest else reason
            _say(f"{movie.name}: {stage} done: {summary}")
            for warning in stage_report.warnings:
                _say(f"{movie.name}: warning: {warning}")
    finally:
        kernel.close()
    return report


def _behind_outside(
    pipeline: Pipeline, run: Run, stage: str, stages: Sequence[str], cfg: RunConfig
) -> list[str]:
    """For a stage skipped as up to date, the stages it reads from that this command does not run
    and that are out of date (:func:`~.contract.behind_producers`): ``--stages export`` after a
    new stage 03 setting said "up to date" and nothing else, so the old names were what the
    user kept. Producers this command runs are checked by their own turn."""
    declared = pipeline.get(stage)
    if not {r.producer for r in declared.reads} - {*stages, stage}:
        return []
    return behind_producers(pipeline, run, declared, cfg)


def _say(text: str) -> None:
    """One line for the terminal (unless --quiet) and the log file (diffusion_bunny.logs)."""
    say(log, text)


def overrides_from_args(
    items: Sequence[str] | None, text_setting: Callable[[str], bool] | None = None
) -> dict[str, Any]:
    """``["extract.motion_threshold=2"]`` -> ``{"extract.motion_threshold": 2}`` (JSON-safe for papermill);
    a setting ``text_setting`` says takes text keeps the text as typed (:func:`parse_override`).

    A folder setting (a key ending in ``_dir``, or a model setting naming a folder that exists:
    :func:`_local_model`) given as a relative path is a path from where the command is typed, as
    ``--out``, ``--characters`` and ``--config`` are: made absolute here. In
    a settings file such a path starts from the workspace; on the command line that surprised:
    ``--set characters.reference_dir=refs`` typed beside ``refs/`` looked in the checkout."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, value = parse_override(item, text_setting)
        relative = isinstance(value, str) and value and not Path(value).expanduser().is_absolute()
        if relative and (key.endswith("_dir") or _local_model(key, value)):
            value = str(Path(value).expanduser().resolve())
        out[key] = json.loads(json.dumps(value, default=str))
    return out


#: Settings that take a hub id or a local folder (``train.base_model``, ``scenes.clip_model``...).
_MODEL_KEYS = ("characters.hub.detector", "characters.hub.features")


def _local_model(key: str, value: str) -> bool:
    """A model setting naming a folder that exists from where the command is typed: a local
    model, made absolute as a ``*_dir`` is. The stage kernels work in ``notebook/``, where
    ``models/sd`` was not found and was then looked up as a hub id (``owner/name``). A folder
    that exists wins over a hub id of the same name, as in ``from_pretrained``."""
    return (key.endswith("_model") or key in _MODEL_KEYS) and Path(value).expanduser().is_dir()
