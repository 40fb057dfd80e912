"""Progress of a stage that runs inside a papermill kernel, shown on the terminal of ``bunny run``.

A notebook's tqdm bar lives in the kernel (as a widget in the executed notebook), so the command
line cannot see it. The stage therefore also writes its progress, a few times a second, to a
small JSON file in the run folder, and the runner follows that file with a terminal bar.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from diffusion_bunny.logs import BAR_SUFFIX, ENV, SAY_SUFFIX, bar_options, say_relayed


class ProgressFile:
    """Throttled writer of ``{"done", "total", "unit", "desc", "note"}`` for one stage (``note``: a
    short text the terminal shows beside the bar, e.g. what was paid for so far)."""

    def __init__(self, path: Path | None, desc: str, total: int | None, unit: str, interval: float = 0.25):
        self.path, self.desc, self.total, self.unit, self.interval = path, desc, total, unit, interval
        self._last = 0.0

    def update(self, done: int, *, force: bool = False, note: str | None = None) -> None:
        """Record ``done`` items (written at most every ``interval`` seconds unless forced)."""
        now = time.monotonic()
        if self.path is None or (not force and now - self._last < self.interval):
            return
        self._last = now
        record = {"done": done, "total": self.total, "unit": self.unit, "desc": self.desc}
        if note is not None:
            record["note"] = note
        data = json.dumps(record)
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            tmp.write_text(data)
            os.replace(tmp, self.path)
        except OSError:  # a full disk: the bar is only shown, the stage's own writes will say so
            tmp.unlink(missing_ok=True)

    def close(self) -> None:
        """Remove the file: a finished stage leaves nothing behind in the run folder. Under
        ``bunny`` (its log variable set) the runner that follows the file removes it once it has
        shown the last count (removed here, the final count was often never seen)."""
        if self.path is not None and not os.environ.get(ENV):
            self.path.unlink(missing_ok=True)


@contextlib.contextmanager
def tracked(
    total: int, *, desc: str, unit: str = "frame", progress: bool = True, progress_path: Path | None = None
) -> Iterator[Callable[[int], None]]:
    """A tqdm bar (the notebook's) and the progress file at ``progress_path`` (what ``bunny run``
    shows) counting the same work: yields ``done(n)``, to be called with the count so far; the
    file is gone when the block ends or fails. Nothing to count (a rerun that takes every frame
    from its cache) shows no bar: an empty "faces: 0frame" on the terminal read as a fault."""
    bar = tqdm(total=total, unit=unit, desc=desc, disable=not progress or total == 0, **bar_options(0.5))
    reporter = ProgressFile(progress_path if total else None, desc, total, unit)

    def done(n: int) -> None:
        bar.update(n - bar.n)
        reporter.update(n)

    try:
        yield done
        reporter.update(total, force=True)
    finally:
        bar.close()
        reporter.close()


def map_tracked(
    fn: Callable[[Any], Any],
    items: Sequence[Any],
    *,
    desc: str,
    unit: str = "frame",
    workers: int | None = None,
    progress: bool = True,
    progress_path: Path | None = None,
) -> list[Any]:
    """``fn`` over ``items`` on a thread pool (decoders and ONNX Runtime release the GIL), the
    results in order, counted by :func:`tracked`."""
    workers = workers or os.cpu_count() or 1
    out: list[Any] = []
    with (
        tracked(len(items), desc=desc, unit=unit, progress=progress, progress_path=progress_path) as done,
        ThreadPoolExecutor(max_workers=workers, thread_name_prefix=desc) as pool,
    ):
        for n, result in enumerate(pool.map(fn, items), start=1):
            out.append(result)
            done(n)
    return out


def start_following(path: Path, stop: threading.Event, interval: float = 0.3) -> threading.Thread:
    """:func:`follow` on a thread of its own, started once what an earlier run left beside
    ``path`` is gone (a killed kernel's files): their bars and lines are not this run's."""
    remove_relay_files(path)
    watcher = threading.Thread(target=follow, args=(path, stop, interval), daemon=True)
    watcher.start()
    return watcher


#: Seconds a stage's end waits for its progress follower (a daemon thread) to finish.
FOLLOW_JOIN_S = 5.0


def stop_following(stop: threading.Event, watcher: threading.Thread | None) -> None:
    """End :func:`start_following`'s thread, waiting for it a few seconds at most. An interrupt
    (Ctrl-C, or SIGTERM raised as one) that lands in the main thread while tqdm makes its write
    lock leaves tqdm's lock taken for good (tqdm acquires and releases it without a ``finally``):
    the follower then waits on it forever, and a join without a bound kept the run alive after a
    SIGTERM, its kernel and all (seen once in the test suite, on a loaded machine). The thread
    is a daemon: the process ends without it."""
    stop.set()
    if watcher is not None:
        watcher.join(FOLLOW_JOIN_S)


def follow(path: Path, stop: threading.Event, interval: float = 0.3) -> None:
    """Mirror a stage's progress on this terminal until ``stop`` is set (run in a thread): the
    stage's bar from ``path`` (with its note, e.g. what was paid for so far), the bars it relays
    beside it (a model's download) and the lines it says (:func:`diffusion_bunny.logs.relaying`);
    the files are removed at the end."""
    bars: dict[Path, tuple[tqdm, int]] = {}
    said = 0
    lines = Path(str(path) + SAY_SUFFIX)

    def show(file: Path, data: dict[str, Any]) -> None:
        bar, done = bars.get(file, (None, 0))
        if bar is None:
            scale = bool(data.get("unit_scale"))
            bar = tqdm(
                total=data.get("total"),
                unit=data.get("unit") or "it",
                desc=data.get("desc") or "",
                unit_scale=scale,
                leave=False,
                **bar_options(),
            )
        if data.get("total") is not None and bar.total != data["total"]:
            bar.total = data["total"]
        if data.get("note"):
            bar.set_postfix_str(data["note"], refresh=False)
        bar.update(max(0, data["done"] - done))
        bars[file] = (bar, max(done, data["done"]))

    def relay_lines() -> None:
        nonlocal said
        try:
            with open(lines, "rb") as fh:
                fh.seek(said)
                chunk = fh.read()
        except OSError:
            return
        complete = chunk[: chunk.rfind(b"\n") + 1]
        said += len(complete)
        for line in complete.splitlines():
            with contextlib.suppress(ValueError, KeyError, TypeError):
                say_relayed(json.loads(line)["say"])

    try:
        while True:
            finished = stop.wait(interval)
            relay_lines()
            for file in [path, *sorted(path.parent.glob(path.name + BAR_SUFFIX + "*"))]:
                if file.name.endswith(".tmp"):
                    continue
                try:
                    data = json.loads(file.read_text())
                except (FileNotFoundError, json.JSONDecodeError):
                    continue
                show(file, data)
                if data.get("closed") and file != path:
                    bar, _ = bars.pop(file)
                    bar.refresh()
                    bar.close()
                    file.unlink(missing_ok=True)
            if finished:
                break
    finally:
        for bar, _ in bars.values():
            # Bars refresh seldom when standard error is not a terminal (logs.bar_options): show
            # the final count once before the bar goes.
            bar.refresh()
            bar.close()
        remove_relay_files(path)


def remove_relay_files(path: Path) -> None:
    """Remove a stage's progress file and the relay files beside it (what a killed kernel left)."""
    path.unlink(missing_ok=True)
    for file in path.parent.glob(path.name + ".*"):
        with contextlib.suppress(OSError):
            file.unlink()
