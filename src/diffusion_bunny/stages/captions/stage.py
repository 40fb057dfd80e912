"""Stage 05 ``captions``: a caption for every kept frame, from the configured provider chain.

The loop (:func:`caption_frames`) walks the chain per frame: an answer already in the cache is
taken as it is (no call); a provider whose circuit is open is skipped; otherwise the provider is
asked, with retries on transient failures. A paid answer goes into the cache *before* anything
else happens, so killing the process at any point loses at most the requests in flight, and
the next run asks only for what is not in the cache. Every request is logged in the
``caption_calls`` table (provider, attempt, outcome, latency, tokens), from which notebook 05
draws the per-provider summary.

Every paid answer is recorded whatever it is: one that carries no caption (empty,
refused, truncated, unparsable, or unreadable: a 200 whose body could not be read) is stored with
that status, logged with it as its outcome, and never asked again unless ``captions.retry``
names the status. The answers live in one store per user (:func:`answers_dir`), read by every run
folder, so a movie is paid for once whatever ``--out`` it is captioned into. Before the first paid
request the stage says how many it will make and stops (exit 2) when that, with what the movie
took in earlier runs (:class:`SpentLedger`), is more than ``captions.max_paid_requests``; the run
also stops there if retries, timeouts and fallbacks reach it. A request that timed out is asked
once more at most: the server may have answered (and billed) after the client stopped waiting,
and the log says so.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl
from tqdm.auto import tqdm

from diffusion_bunny.errors import BadInputError, ProviderError, StageError, storage_error
from diffusion_bunny.logs import say
from diffusion_bunny.models.cache import cache_dir
from diffusion_bunny.paths import workspace_root
from diffusion_bunny.pipeline.atomic import atomic_write_bytes
from diffusion_bunny.pipeline.contract import Context, StageOutput
from diffusion_bunny.pipeline.progress import ProgressFile
from diffusion_bunny.pipeline.run import Run
from diffusion_bunny.stages.captions.facts import caption_facts
from diffusion_bunny.stages.captions.providers import (
    ANSWER_STATUSES,
    FALLBACK_ADVICE,
    PROMPT_VERSION,
    PROVIDER_DOWN,
    RETRY,
    AnswerError,
    CaptionCache,
    CircuitBreaker,
    Provider,
    RateLimiter,
    RawAnswer,
    backoff_delay,
    classify,
    is_timeout,
    make_provider,
    redact,
    retry_after,
    scaled_jpeg,
    short_error,
)
from diffusion_bunny.stages.captions.settings import CaptionsSettings
from diffusion_bunny.stages.captions.tables import (
    CAPTION_SCHEMA,
    EDIT_SCHEMA,
    apply_edits,
    recorded_settings,
    without_trigger,
)
from diffusion_bunny.stages.extract.tables import region_of

CALL_SCHEMA: dict[str, pl.DataType] = {
    "frame_id": pl.String,
    "provider": pl.String,
    "model": pl.String,
    "attempt": pl.Int64,
    "outcome": pl.String,
    "error": pl.String,
    "latency_s": pl.Float64,
    "input_tokens": pl.Int64,
    "output_tokens": pl.Int64,
    "ts": pl.Datetime("us", "UTC"),
}


#: Outcomes of ``caption_calls`` that are requests sent (paid for, when the provider is paid).
REQUEST_OUTCOMES = ("ok", "retry", "timeout", "failed", "down", *ANSWER_STATUSES)

log = logging.getLogger(__name__)


class SpentLedger:
    """The paid requests a movie took, over every run of it: one small JSON file per run
    (``<store>/spent/<movie key>/<run token>.json``, rewritten atomically after each request),
    summed. Why files per run and not one counter: runs of one movie may go on at once (two run
    folders, two machines on a shared disk), and a counter read, raised and written back by two
    of them loses requests; each run writing only its own file needs no lock, also on a network
    file system. Kept beside the answers, so turning the store off (``captions.cache: false``)
    keeps the count per run folder."""

    def __init__(self, store: Path, movie_key: str):
        self.folder = Path(store) / "spent" / movie_key
        self.path = self.folder / f"{datetime.now(UTC):%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:8]}.json"
        self.earlier = self._sum()
        self.mine = 0

    def others(self) -> int:
        """The paid requests of the movie's other runs, read again now: runs that go on at once
        each spent the whole cap when each read the others' once, at its start."""
        return self._sum()

    def _sum(self) -> int:
        total = 0
        for path in self.folder.glob("*.json") if self.folder.is_dir() else []:
            if path == self.path:
                continue
            try:
                total += int(json.loads(path.read_text()).get("requests", 0))
            except (OSError, ValueError, TypeError, AttributeError):
                continue  # a damaged count is not a reason to stop: the cap is a guard rail
        return total

    def add(self) -> None:
        """Count one more paid request of this run (on disk before the request is sent: a disk too
        full to count it stops the run before it pays)."""
        self.mine += 1
        data = {"requests": self.mine, "updated": datetime.now(UTC).isoformat(timespec="seconds")}
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(self.path, json.dumps(data).encode())
        except OSError as exc:
            error = storage_error(exc, "free some space or fix the permissions (or set captions.cache_dir)")
            if error is None:
                raise
            raise error from None


class _Budget:
    """Paid requests allowed (``captions.max_paid_requests``) for the movie, over every run
    (those of earlier runs from ``ledger``), across threads."""

    def __init__(self, cap: int, ledger: SpentLedger | None = None):
        self.cap, self.used, self.ledger = cap, 0, ledger
        self.earlier = ledger.earlier if ledger is not None else 0
        self._lock = threading.Lock()

    def take(self) -> None:
        with self._lock:
            if self.ledger is not None:
                self.earlier = self.ledger.others()
            if self.earlier + self.used >= self.cap:
                before = f" ({self.earlier} of them in earlier runs of this movie)" if self.earlier else ""
                total = self.earlier + self.used
                raise StageError(
                    f"stage captions stopped after {total} paid request(s) for this movie{before}: "
                    f"captions.max_paid_requests is {self.cap}; every answer received is recorded and is "
                    "not asked again; raise the setting (--set captions.max_paid_requests=N) and run the "
                    "stage again to go on"
                )
            self.used += 1
            if self.ledger is not None:
                self.ledger.add()


def _not_again(prov: str, status: str, detail: str) -> str:
    """The error of a frame whose paid answer carried no caption (a true promise: see
    :meth:`_Captioner._paid`)."""
    why = f" ({detail})" if detail else ""
    return f"{prov}: {status} answer{why}, recorded; not asked again unless captions.retry lists {status}"


@dataclass
class CaptionRun:
    """What :func:`caption_frames` produced."""

    captions: pl.DataFrame
    calls: pl.DataFrame
    #: Every provider whose circuit opened: (the reason, still open at the end, times opened).
    breakers: dict[str, tuple[str, bool, int]] = field(default_factory=dict)
    #: ``N paid requests (M answered from the store)`` of the run.
    paid_note: str = ""


class _Log:
    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    def add(self, **row: Any) -> None:
        row.setdefault("error", None)
        row.setdefault("latency_s", None)
        row.setdefault("input_tokens", None)
        row.setdefault("output_tokens", None)
        row["ts"] = datetime.now(UTC)
        with self.lock:
            self.rows.append(row)


class _Captioner:
    """One run's captioning: the provider chain with a circuit breaker and a rate limiter per
    provider, the answer cache, and the log of every request (and cache hit)."""

    def __init__(
        self,
        run_dir: Path,
        providers: list[Provider],
        cfg: CaptionsSettings,
        cache: CaptionCache,
        hashes: dict[str, str | None],
        *,
        seed: int,
        sleep: Callable[[float], None],
        clock: Callable[[], float] = time.monotonic,
        ledger: SpentLedger | None = None,
    ):
        self.run_dir = run_dir
        self.providers = providers
        self.cfg = cfg
        self.cache = cache
        self.hashes = hashes
        self.sleep = sleep
        self.log = _Log()
        self.breakers = {
            p.name: CircuitBreaker(cfg.breaker_failures, cfg.breaker_cooldown_s, clock=clock)
            for p in providers
        }
        self._inflight: dict[str, list[Any]] = {}
        self._inflight_guard = threading.Lock()
        self.limiters = {
            p.name: RateLimiter(cfg.requests_per_minute, cfg.concurrency, sleep=sleep) for p in providers
        }
        self._rng = random.Random(seed)
        self._rng_lock = threading.Lock()
        self.budget = _Budget(cfg.max_paid_requests, ledger)
        #: Answers of paid providers taken from the store (no request), for the progress line.
        self.from_store = 0
        #: Frames a person captioned: their caption is the person's whatever a provider says, so
        #: none is asked (each was a paid request thrown away, counted against the cap).
        self.by_hand: set[str] = set()

    def jitter(self, attempt: int, exc: BaseException | None = None) -> float:
        """The wait before another attempt: the backoff's, or longer when the server asked for
        a longer one (``Retry-After``), held to ``captions.backoff_max_s`` as every wait."""
        with self._rng_lock:
            delay = backoff_delay(attempt, self.cfg.backoff_base_s, self.cfg.backoff_max_s, self._rng)
        asked = retry_after(exc) if exc is not None else None
        return delay if asked is None else max(delay, min(asked, self.cfg.backoff_max_s))

    @staticmethod
    def row(fid: str, **values: Any) -> dict[str, Any]:
        base = dict.fromkeys(CAPTION_SCHEMA)
        base.update(frame_id=fid, tags=[], prompt_version=PROMPT_VERSION)
        base.update(values)
        return base

    def unreadable(self, fid: str, path: Path, exc: OSError) -> dict[str, Any]:
        return self.row(fid, status="failed", error=f"frame file unreadable: {path.name} ({exc})")

    def _log_unreadable(self, fid: str, exc: OSError) -> None:
        self.log.add(
            frame_id=fid, provider="-", model="-", attempt=0, outcome="unreadable", error=short_error(exc)
        )

    def caption(self, rec: dict[str, Any]) -> dict[str, Any]:
        """One frame through the chain: the first provider that answers (from the cache when a
        paid provider already did) gives the caption; a frame is decoded and scaled only when a
        paid provider is really asked. A frame whose file is missing or cannot be decoded skips
        the paid providers, not the chain: the template reads the tables, not the pixels, so a
        chain that ends with it still captions every frame (as the docs promise)."""
        fid = rec["frame_id"]
        if fid in self.by_hand:  # the edit fills it (apply_edits)
            return self.row(fid, provider="-", model="-", status="edited")
        path = full_frame_path(self.run_dir, rec)
        unreadable: OSError | None = None
        if not path.is_file():
            unreadable = FileNotFoundError(f"no such file: {path}")
            self._log_unreadable(fid, unreadable)
        sha = self.hashes.get(fid)
        last_error = ""
        for prov in self.providers:
            if not prov.paid:
                answer, error, circuit_open = self._ask(fid, prov, b"", rec, "")
            elif unreadable is not None:
                continue
            elif sha is None:
                unreadable = OSError(f"cannot read {path}")
                self._log_unreadable(fid, unreadable)
                continue
            else:
                key = CaptionCache.key_for(sha, prov, rec, self.cfg)
                # Identical requests (the same frame file twice, say) are asked once: the
                # second waits here for the first and then finds its answer in the cache.
                with self._key_lock(key):
                    answer, error, circuit_open = self._paid(fid, prov, path, rec, key)
                if isinstance(answer, OSError):
                    unreadable = answer
                    self._log_unreadable(fid, unreadable)
                    continue
            if answer is not None:
                return answer
            # A provider whose circuit is open says so only when nothing failed before it.
            last_error = (last_error or error) if circuit_open else error
        if unreadable is not None:
            return self.unreadable(fid, path, unreadable)
        return self.row(fid, status="failed", error=last_error or "no provider could caption the frame")

    @contextmanager
    def _key_lock(self, key: str) -> Iterator[None]:
        with self._inflight_guard:
            entry = self._inflight.setdefault(key, [threading.Lock(), 0])
            entry[1] += 1
        try:
            with entry[0]:
                yield
        finally:
            with self._inflight_guard:
                entry[1] -= 1
                if entry[1] == 0:
                    del self._inflight[key]

    def _paid(
        self, fid: str, prov: Provider, path: Path, rec: dict[str, Any], key: str
    ) -> tuple[Any, str, bool]:
        """A paid provider for one frame: its cached raw answer parsed again when there is one
        (no request), else the full frame scaled to ``image_max_side`` and asked."""
        hit = self.cache.get(key)
        status = _cached_status(hit, prov)
        if status == "ok":
            assert hit is not None
            result = prov.parse(_raw(hit))
            self.from_store += 1
            self.log.add(frame_id=fid, provider=prov.name, model=prov.model, attempt=0, outcome="cached")
            return self._answer(fid, prov, result, hit.get("latency_s")), "", False
        if status is not None and status not in self.cfg.retry:
            # Paid for and recorded with its status: never asked again unless the user says so.
            assert hit is not None
            self.from_store += 1
            detail = hit.get("detail") or ""
            self.log.add(
                frame_id=fid,
                provider=prov.name,
                model=prov.model,
                attempt=0,
                outcome=f"cached_{status}",
                error=f"{status}: {detail}" if detail else status,
            )
            return None, _not_again(prov.name, status, detail), False
        breaker = self.breakers[prov.name]
        if breaker.blocked():  # no need to decode the frame
            return None, f"{prov.name}: circuit open ({breaker.reason})", True
        try:
            image = scaled_jpeg(path.read_bytes(), self.cfg.image_max_side, region_of(rec))
        except OSError as exc:
            return exc, "", False
        return self._ask(fid, prov, image, rec, key)

    def _answer(self, fid: str, prov: Provider, result: Any, latency: float | None) -> dict[str, Any]:
        return self.row(
            fid,
            caption=result.caption,
            tags=list(result.tags),
            provider=prov.name,
            model=prov.model,
            status="ok",
            latency_s=latency,
            input_tokens=result.input_tokens,
            output_tokens=result.output_tokens,
        )

    def _ask(
        self, fid: str, prov: Provider, image: bytes, rec: dict[str, Any], key: str
    ) -> tuple[dict[str, Any] | None, str, bool]:
        """Ask one provider, with retries on passing faults: ``(row, "", False)`` on an answer,
        ``(None, the error, whether the circuit was open)`` when this provider gave up (the chain
        moves on). A paid answer is cached raw, before it is parsed. A probe of a half-open
        circuit is not retried: its outcome alone closes or reopens the circuit."""
        breaker = self.breakers[prov.name]
        timeouts = 0
        for attempt in range(self.cfg.max_retries + 1):
            permit = breaker.allow()
            if not permit:
                return None, f"{prov.name}: circuit open ({breaker.reason})", True
            if prov.paid:  # the template costs nothing and is not paced
                self.limiters[prov.name].acquire()
                # Counted once the pacing lets it go, right before it is sent: counted before the
                # wait, a run stopped while it waited had requests on its count never sent.
                self.budget.take()  # past max_paid_requests: StageError stops the run
            started = time.monotonic()
            cache_failure: list[BaseException] = []
            try:
                if prov.paid:
                    result = prov.caption(image, rec, self._keeper(prov, key, started, cache_failure))
                else:
                    result = prov.caption(image, rec)
            except Exception as exc:  # every failure is classified; none stops the run
                if cache_failure:
                    raise cache_failure[0] from None
                gave_up = self._failed(fid, prov, attempt, permit, started, exc, timeouts)
                if prov.paid and is_timeout(exc):
                    timeouts += 1
                if gave_up is None:
                    self.sleep(self.jitter(attempt, exc))
                    continue
                return None, gave_up, False
            latency = time.monotonic() - started
            breaker.success()
            self.log.add(
                frame_id=fid,
                provider=prov.name,
                model=prov.model,
                attempt=attempt,
                outcome="ok",
                latency_s=latency,
                input_tokens=result.input_tokens,
                output_tokens=result.output_tokens,
            )
            return self._answer(fid, prov, result, latency), "", False
        return None, "", False  # pragma: no cover - the loop always returns

    def _keeper(
        self, prov: Provider, key: str, started: float, cache_failure: list[BaseException]
    ) -> Callable[[RawAnswer], None]:
        """What a paid provider calls with its raw answer the moment it has one: into the cache,
        with its status, before anything else can go wrong (a failure to store it is put in
        ``cache_failure``, so the caller stops the run on it rather than classify it)."""

        def keep(raw: RawAnswer) -> None:
            status, detail = prov.status(raw)
            try:
                self.cache.set(
                    key,
                    {
                        # Redacted as every string stored: a server may echo the request headers.
                        "raw": redact(raw.text),
                        "status": status,
                        "detail": redact(detail),
                        "finish_reason": raw.finish_reason,
                        "refusal": redact(raw.refusal),
                        "latency_s": time.monotonic() - started,
                        "input_tokens": raw.input_tokens,
                        "output_tokens": raw.output_tokens,
                        "ts": datetime.now(UTC).isoformat(),
                    },
                )
            except BaseException as exc:  # a full disk under the cache must stop the run
                cache_failure.append(exc)
                raise

        return keep

    def _failed(
        self,
        fid: str,
        prov: Provider,
        attempt: int,
        permit: Any,
        started: float,
        exc: Exception,
        timeouts: int,
    ) -> str | None:
        """One failed request, logged and counted against the provider's circuit: None when it
        is worth another attempt, else the error the provider gave up with. A paid request that
        timed out is asked once more at most (``timeouts``: this frame's earlier ones): the server
        may have answered, and billed, after the client stopped waiting."""
        breaker = self.breakers[prov.name]
        if isinstance(exc, AnswerError):
            # Answered and recorded, but no caption: asking again in this run would pay again;
            # it counts against the circuit like any failure of the provider.
            self.log.add(
                frame_id=fid,
                provider=prov.name,
                model=prov.model,
                attempt=attempt,
                outcome=exc.status,
                error=short_error(exc),
                latency_s=time.monotonic() - started,
            )
            breaker.failure(f"{exc.status} answers", fatal=False)
            return _not_again(prov.name, exc.status, exc.detail)
        kind = classify(exc)
        timed_out = prov.paid and is_timeout(exc)
        will_retry = kind == RETRY and attempt < self.cfg.max_retries and permit != "probe"
        will_retry = will_retry and not (timed_out and timeouts >= 1)
        error = short_error(exc)
        if timed_out:
            again = "asked once more" if will_retry else "not asked again in this run"
            error = (
                f"timed out after {self.cfg.timeout_s:g} s ({error}); the server may have answered and "
                f"billed it; {again}"
            )
            log.warning("captions: %s: the request for %s %s", prov.name, fid, error)
        outcome = "retry" if will_retry else ("down" if kind == PROVIDER_DOWN else "failed")
        self.log.add(
            frame_id=fid,
            provider=prov.name,
            model=prov.model,
            attempt=attempt,
            outcome="timeout" if timed_out else outcome,
            error=error,
            latency_s=time.monotonic() - started,
        )
        if will_retry:
            return None
        breaker.failure(short_error(exc), fatal=kind == PROVIDER_DOWN)
        return f"{prov.name}: {error}"

    def paid_note(self) -> str:
        """``N paid requests (M answered from the store)``: what this run has paid for so far."""
        return f"{self.budget.used} paid requests ({self.from_store} answered from the store)"

    def run(
        self, records: list[dict[str, Any]], progress: bool, progress_path: Path | None
    ) -> list[dict[str, Any]]:
        """Every frame, on ``captions.concurrency`` threads when a paid provider is in the chain."""
        rows: list[dict[str, Any]] = []
        bar = tqdm(total=len(records), desc="captions", unit="frame", disable=not progress)
        pfile = ProgressFile(progress_path, "captions", len(records), "frame")
        paid = any(p.paid for p in self.providers)

        def done(row: dict[str, Any]) -> None:
            rows.append(row)
            bar.update(1)
            # What is being paid for, while it happens (the terminal of `bunny run` shows it too).
            note = self.paid_note() if paid else None
            if note is not None:
                bar.set_postfix_str(note, refresh=False)
            pfile.update(len(rows), note=note)

        try:
            workers = self.cfg.concurrency if paid else 1
            if workers == 1:
                for rec in records:
                    done(self.caption(rec))
                pfile.update(len(rows), note=self.paid_note() if paid else None, force=True)
                return rows
            pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="caption")
            try:
                for fut in as_completed([pool.submit(self.caption, rec) for rec in records]):
                    done(fut.result())
                pfile.update(len(rows), note=self.paid_note(), force=True)
            except StageError:
                # The paid-request cap, reached in one worker: the requests the others have sent
                # are paid for already, and each worker stores its answer before it returns. Not
                # waited for, they were lost with the stage and paid again by the next run.
                pool.shutdown(wait=True, cancel_futures=True)
                raise
            except BaseException:
                # Ctrl-C in the notebook, or a failure such as a full disk under the cache: frames
                # still queued must not go on being asked (and paid for) behind the error.
                pool.shutdown(wait=False, cancel_futures=True)
                raise
            pool.shutdown(wait=True)
            return rows
        finally:
            bar.close()
            pfile.close()


def caption_frames(
    run_dir: Path,
    facts: pl.DataFrame,
    providers: list[Provider],
    cfg: CaptionsSettings,
    cache: CaptionCache,
    hashes: dict[str, str | None],
    *,
    seed: int = 0,
    progress: bool = True,
    progress_path: Path | None = None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    ledger: SpentLedger | None = None,
    down: dict[str, str] | None = None,
    by_hand: set[str] | None = None,
) -> CaptionRun:
    """Caption every frame of ``facts`` through the provider chain (see the module docstring).
    ``hashes``: :func:`frame_hashes` (needed only when the chain has a paid provider);
    ``ledger``: the movie's paid requests over its runs (None: this call's count only);
    ``down``: providers found not answering before the first frame (name -> why), whose circuits
    open for the run at once; ``by_hand``: frames a person captioned (asked of nobody)."""
    captioner = _Captioner(
        Path(run_dir), providers, cfg, cache, hashes, seed=seed, sleep=sleep, clock=clock, ledger=ledger
    )
    captioner.by_hand = set(by_hand or ())
    for name, why in (down or {}).items():
        captioner.breakers[name].failure(why, fatal=True)
    rows = captioner.run(list(facts.iter_rows(named=True)), progress, progress_path)
    captions = pl.DataFrame(rows, schema=CAPTION_SCHEMA).sort("frame_id")
    log = captioner.log.rows
    calls = pl.DataFrame(log, schema=CALL_SCHEMA) if log else pl.DataFrame(schema=CALL_SCHEMA)
    breakers = captioner.breakers
    opened = {n: (b.reason, b.open, b.times_opened) for n, b in breakers.items() if b.times_opened}
    return CaptionRun(captions, calls, opened, paid_note=captioner.paid_note())


def provider_summary(calls: pl.DataFrame) -> pl.DataFrame:
    """Per provider: requests made, failures, retries, cache hits, latency and tokens."""
    real = pl.col("outcome").is_in(REQUEST_OUTCOMES)
    return (
        calls.filter(pl.col("provider") != "-")
        .group_by("provider", "model")
        .agg(
            real.sum().alias("requests"),
            (pl.col("outcome") == "ok").sum().alias("answered"),
            pl.col("outcome")
            .is_in(["retry", "timeout", "failed", "down", *ANSWER_STATUSES])
            .sum()
            .alias("failures"),
            (pl.col("outcome") == "retry").sum().alias("retries"),
            (pl.col("outcome") == "timeout").sum().alias("timeouts"),
            pl.col("outcome").str.starts_with("cached").sum().alias("cache_hits"),
            pl.col("latency_s").filter(real).mean().alias("mean_latency_s"),
            pl.col("latency_s").filter(real).quantile(0.95).alias("p95_latency_s"),
            pl.col("input_tokens").sum().alias("input_tokens"),
            pl.col("output_tokens").sum().alias("output_tokens"),
        )
        .sort("provider")
    )


def answers_dir(run_dir: Path, cfg: CaptionsSettings) -> Path:
    """Where paid answers are kept: ``captions.cache_dir``; else, with ``captions.cache``, the
    user's store (``captions/`` in :func:`diffusion_bunny.models.cache.cache_dir`), read by every
    run folder; else the run's own ``<run>/cache/captions`` (paid once per run folder). A relative
    ``cache_dir`` is under the workspace, as every folder of a settings file (the kernel works in
    ``notebook/``: it was taken from there)."""
    if cfg.cache_dir:
        path = Path(cfg.cache_dir).expanduser()
        return path if path.is_absolute() else workspace_root() / path
    return cache_dir() / "captions" if cfg.cache else run_answers_dir(run_dir)


def run_answers_dir(run_dir: Path) -> Path:
    """The run folder's own answer folder (where earlier versions kept its answers)."""
    return Path(run_dir) / "cache" / "captions"


def full_frame_path(run_dir: Path, rec: dict[str, Any]) -> Path:
    """The full-resolution frame stage 01 saved (``frames.path``), never the 320-px thumbnail:
    a paid model is sent the frame scaled to ``captions.image_max_side``, and a thumbnail would
    make that setting meaningless (the picture would be about 320 px whatever it says)."""
    path = rec.get("path")
    return Path(run_dir) / path if path else Path(run_dir) / "frames" / f"{rec['frame_id']}.missing"


def frame_hashes(run_dir: Path, facts: pl.DataFrame) -> dict[str, str | None]:
    """SHA-256 of every full frame file and of the region of it that is sent (the cache key: the
    same picture is the same question), None for a file that cannot be read. Read once per run,
    before anything is asked."""
    out: dict[str, str | None] = {}
    for rec in facts.iter_rows(named=True):
        try:
            data = full_frame_path(run_dir, rec).read_bytes()
        except OSError:
            out[rec["frame_id"]] = None
            continue
        digest = hashlib.sha256(data)
        region = region_of(rec)
        if region is not None:
            digest.update(("region:" + ",".join(map(str, region))).encode())
        out[rec["frame_id"]] = digest.hexdigest()
    return out


def _raw(hit: dict[str, Any]) -> RawAnswer:
    tokens = hit.get("input_tokens"), hit.get("output_tokens")
    return RawAnswer(hit["raw"], *tokens, hit.get("finish_reason"), hit.get("refusal"))


def _cached_status(hit: dict[str, Any] | None, prov: Provider) -> str | None:
    """The status of a recorded answer (None: nothing recorded), from its text as a fresh
    answer's would be: a parser mended since (or one of another release) reads the answers
    already paid for, and one that did not parse then but does now is a caption, not a failure
    to pay for again. Only ``unreadable`` (a body that could not be read; no text was kept)
    stays as recorded."""
    if hit is None or "raw" not in hit:
        return None
    status = hit.get("status")
    if status != "unreadable":
        status = prov.status(_raw(hit))[0]
    return str(status)


def _uncached(
    facts: pl.DataFrame,
    hashes: dict[str, str | None],
    providers: list[Provider],
    cfg: CaptionsSettings,
    cache: CaptionCache,
) -> int:
    """Frames the first paid provider of the chain will be asked about: no answer recorded, or
    one whose status ``captions.retry`` lists (frames without a hash are asked of nobody)."""
    paid = [p for p in providers if p.paid]
    if not paid:
        return 0
    first = paid[0]
    missing = 0
    for rec in facts.iter_rows(named=True):
        sha = hashes.get(rec["frame_id"])
        if sha is None:
            continue
        status = _cached_status(cache.get(CaptionCache.key_for(sha, first, rec, cfg)), first)
        if status is None or status in cfg.retry:
            missing += 1
    return missing


def _failed(captions: pl.DataFrame, calls: pl.DataFrame) -> pl.DataFrame:
    """The frames no provider captioned; a :class:`ProviderError` when that is every frame asked.
    Frames a person captioned (asked of nobody, ``edited``) are left out of that count: with
    them counted, one hand-typed caption let a run whose every request failed (a wrong model, a
    server down) write its failures over all the captions of the last run."""
    failed = captions.filter(pl.col("status") == "failed")
    if not captions.filter(pl.col("status") == "ok").height and failed.height:
        raise ProviderError(
            f"no frame could be captioned ({failed.height} failed; first: {redact(failed['error'][0])}); fix "
            f"the provider or add template to captions.fallback. {_rerun_note(calls)}"
        )
    return failed


def _as_started(captions: pl.DataFrame, before: pl.DataFrame | None) -> pl.DataFrame:
    """Frames a person captioned (asked of nobody this run) with the provider, model and tags
    of the caption the person started from, as :func:`apply_edits` keeps them: they read "-"."""
    if before is None or not before.height:
        return captions
    keep = ("provider", "model", "tags")
    started = before.select("frame_id", *[pl.col(c).alias(f"_{c}") for c in keep])
    joined = captions.join(started, on="frame_id", how="left")
    asked_nobody = (
        (pl.col("provider") == "-") & (pl.col("status") == "edited") & pl.col("_provider").is_not_null()
    )
    return joined.with_columns(
        [pl.when(asked_nobody).then(pl.col(f"_{c}")).otherwise(pl.col(c)).alias(c) for c in keep]
    ).select(captions.columns)


def _open_store(run_dir: Path, cfg: CaptionsSettings) -> tuple[CaptionCache, Path | None]:
    """The answer store, with the answers an earlier version kept in the run folder taken in, and
    the older store of the run folder that could not be (said in a warning), if any."""
    cache = CaptionCache(answers_dir(run_dir, cfg))
    own = run_answers_dir(run_dir)
    if own.resolve() != cache.directory.resolve():  # answers an earlier version kept in the run folder
        cache.import_legacy(own / CaptionCache.FILE)
        cache.take_in(own)  # and those paid with captions.cache: false
    legacy = cache.legacy or (own / "cache.db" if (own / "cache.db").is_file() and not len(cache) else None)
    return cache, legacy


def compute(ctx: Context, *, bedrock_client: Any | None = None) -> StageOutput:
    """Stage 05 on a run: build the providers (keys checked), check the servers when there is
    anything to ask, caption, then put every edit a person made back on top.

    ``bedrock_client``: an existing ``bedrock-runtime`` client (a test's, with botocore's
    Stubber); the stage otherwise makes its own from ``captions.bedrock``."""
    run_dir, cfg = ctx.run_dir, ctx.cfg.captions
    facts = caption_facts(
        ctx.table("frames"),
        cfg,
        quality=ctx.table("quality"),
        faces=ctx.optional("faces"),
        face_frames=ctx.optional("face_frames"),
        shots=ctx.optional("shots"),
        clusters=ctx.optional("clusters"),
    )
    if not facts.height:
        raise StageError(
            "no frames to caption: stage 02 kept none (see tables/quality.parquet's reject_reason); "
            "loosen the quality.* thresholds or set captions.frames: all"
        )
    providers = [make_provider(name, cfg, bedrock=bedrock_client) for name in cfg.chain()]
    cache, legacy = _open_store(run_dir, cfg)
    ledger = SpentLedger(cache.directory, ctx.run.movie_key) if any(p.paid for p in providers) else None
    try:
        # Hashes only matter to the cache of paid providers: a template run reads no frame file,
        # nor does a frame a person captioned (asked of nobody: without a hash, none is counted).
        by_hand = set(read_edits(run_dir)["frame_id"].to_list())
        asked = facts.filter(~pl.col("frame_id").is_in(list(by_hand)))
        hashes = frame_hashes(run_dir, asked) if any(p.paid for p in providers) else {}
        to_ask = _uncached(facts, hashes, providers, cfg, cache)
        down: dict[str, str] = {}
        if to_ask:
            _announce(to_ask, facts.height, providers, cfg, ledger.earlier if ledger is not None else 0)
            down = _preflight(providers)
        result = caption_frames(
            run_dir,
            facts,
            providers,
            cfg,
            cache,
            hashes,
            seed=ctx.cfg.run.seed,
            progress=ctx.progress,
            progress_path=ctx.progress_path,
            ledger=ledger,
            down=down,
            by_hand=by_hand,
        )
    finally:
        cache.close()
    if ledger is not None:
        say(log, f"captions: {result.paid_note}")
    # Every string this stage stores goes through redact (a server may echo the request headers).
    captions = result.captions.with_columns(pl.col("error").map_elements(redact, return_dtype=pl.String))
    calls = result.calls.with_columns(pl.col("error").map_elements(redact, return_dtype=pl.String))
    failed = _failed(captions, calls)
    captions = _as_started(captions, ctx.own_previous("captions"))
    # Edits made so far, for the counts; the commit re-applies them under the locks as it writes.
    edits = read_edits(run_dir)
    triggers = _triggers(cfg, ctx.previous)
    captions = apply_edits(captions, edits, *triggers)
    told = [*cache.notes, *_warnings(legacy, failed, calls, result.breakers, providers[-1].name)]
    return StageOutput(
        tables={"captions": captions, "caption_calls": calls},
        counts=_counts(captions, failed.height, calls, [p.name for p in providers if p.paid], edits),
        warnings=[redact(w) for w in told],
        facts={
            "prompt_version": PROMPT_VERSION,
            "chain": [f"{p.name}:{p.model}" for p in providers],
            "asked": to_ask,
            "open_circuits": {n: r for n, (r, still_open, _) in result.breakers.items() if still_open},
            "answer_store": str(cache.directory),
            "paid_requests_earlier": ledger.earlier if ledger is not None else 0,
        },
        merge=lambda tables: with_edits(run_dir, tables, triggers),
    )


def _counts(
    captions: pl.DataFrame, failed: int, calls: pl.DataFrame, paid: list[str], edits: pl.DataFrame
) -> dict[str, Any]:
    """The manifest's counts of a run: captioned, ``failed`` (frames no provider captioned, before
    a person's edits), edited, ``edits`` of frames the run no longer keeps (they wait unused, and
    come back with their frame), by provider, and what was paid for (requests to the ``paid``
    providers, answers from the cache, answers by status)."""
    gone = set(edits["frame_id"].to_list()) - set(captions["frame_id"].to_list())
    return {
        "frames": captions.height,
        "captioned": int(captions["caption"].is_not_null().sum()),
        "failed": failed,
        "edited": int((captions["status"] == "edited").sum()),
        "edits_on_frames_gone": len(gone),
        **{f"by_{k}": v for k, v in captions.group_by("provider").len().iter_rows() if k},
        "paid_requests": int(
            calls.filter(pl.col("provider").is_in(paid))["outcome"].is_in(REQUEST_OUTCOMES).sum()
        ),
        "cache_hits": int(calls["outcome"].str.starts_with("cached").sum()),
        **{
            f"answers_{status}": int(calls["outcome"].is_in([status, f"cached_{status}"]).sum())
            for status in ANSWER_STATUSES
        },
    }


def _warnings(
    legacy: Path | None,
    failed: pl.DataFrame,
    calls: pl.DataFrame,
    breakers: dict[str, tuple[str, bool, int]],
    last: str = "",
) -> list[str]:
    """What a person should know about a run: an old answer cache left behind, frames without a
    caption, and every provider whose circuit opened (``last``: the chain's last provider, after
    which there is no next one to send frames to)."""
    warnings = []
    if legacy is not None:
        warnings.append(
            f"the answer cache at {legacy.parent} was written by an older version (diskcache, "
            f"{legacy.name}), "
            "which is no longer read; its frames were asked again once into the answer store. "
            f"Delete {legacy.name} and its .val files there to free the space"
        )
    if failed.height:
        warnings.append(
            f"{failed.height} frame(s) got no caption (first: {failed['error'][0]}). {_rerun_note(calls)}"
        )
    for name, (reason, still_open, times) in breakers.items():
        went = "got no caption" if name == last else "went to the next provider"
        after = (
            f"later frames {went}" if still_open else f"frames {went} until a probe succeeded and closed it"
        )
        # A rerun with the provider back finds the stage up to date (its settings did not
        # change): said here, or the fallback's captions went into the dataset unnoticed.
        keep = (
            ""
            if name == last
            else f"; they keep those captions until the stage runs with --force once {name} answers"
        )
        warnings.append(f"provider {name}'s circuit opened {times} time(s) ({reason}); {after}{keep}")
    return warnings


def _preflight(providers: list[Provider]) -> dict[str, str]:
    """Ask every paid provider whether it answers before the first frame. One that does not (no
    network, a server not started, a refused key) stops the stage with its one line, unless a
    provider after it in the chain can caption in its place (``captions.fallback``): then it is
    returned, name -> why, and its circuit opens for the run, so its frames go to the fallback and
    answers it gave in earlier runs are still read from the store."""
    down: dict[str, str] = {}
    first: ProviderError | None = None
    for prov in providers:
        if prov.paid:
            try:
                prov.preflight()
            except ProviderError as exc:
                first = first or exc
                down[prov.name] = str(exc).removesuffix(f"; {FALLBACK_ADVICE}")
    if first is not None and len(down) == len(providers):
        raise first
    return down


def _announce(
    to_ask: int, frames: int, providers: list[Provider], cfg: CaptionsSettings, earlier: int = 0
) -> None:
    """Before the first paid request: how many there will be, and the cap (exit 2 past it), which
    counts the requests this movie took in earlier runs too."""
    first = next(p for p in providers if p.paid)
    cap = cfg.max_paid_requests
    before = f" and the {earlier} made for this movie in earlier runs" if earlier else ""
    after = f", after the {earlier} made for this movie in earlier runs" if earlier else ""
    if to_ask + earlier > cap:
        raise StageError(
            f"stage captions would make {to_ask} paid request(s) to {first.name} ({first.model}){before}, "
            f"more than captions.max_paid_requests ({cap}); nothing was asked. Raise it (--set "
            f"captions.max_paid_requests={to_ask + earlier}) or caption fewer frames"
        )
    say(
        log,
        f"captions: {to_ask} paid request(s) to {first.name} ({first.model}), one per frame of {frames} "
        f"without a recorded answer{after}; retries and fallbacks may add some, and the run stops at "
        f"captions.max_paid_requests ({cap})",
    )


def _rerun_note(calls: pl.DataFrame) -> str:
    """What a rerun will ask again and what it will not, from this run's calls (true by
    construction: recorded answers are read back; frames without one are asked)."""
    outcomes = {o.removeprefix("cached_") for o in calls["outcome"].to_list()}
    statuses = sorted(outcomes & set(ANSWER_STATUSES))
    note = "A rerun (--force) asks again only frames that got no answer"
    if statuses:
        listed = ", ".join(statuses)
        note += (
            f"; paid answers that carried no caption ({listed}) are recorded and are not asked again "
            f"unless captions.retry lists their status (e.g. --set 'captions.retry=[{statuses[0]}]')"
        )
    return note


def with_edits(
    run_dir: Path, tables: dict[str, pl.DataFrame], triggers: tuple[str, tuple[str, ...]] = ("", ())
) -> dict[str, pl.DataFrame]:
    """The stage's tables with every edit re-read and applied (opening with the trigger word,
    ``triggers`` as :func:`_triggers` gives them): called by the commit under the locks of
    ``captions`` and ``caption_edits``, so an edit saved while the stage was captioning is kept."""
    return {**tables, "captions": apply_edits(tables["captions"], read_edits(run_dir), *triggers)}


def _triggers(cfg: Any, previous: dict[str, Any] | None) -> tuple[str, tuple[str, ...]]:
    """The trigger word typed captions open with, and the one the last run used where it was
    another (an edit opening with it gets the new one instead)."""
    before = _recorded_trigger(previous)
    return cfg.trigger_word, tuple([before] if before and before != cfg.trigger_word else [])


def _recorded_trigger(manifest: dict[str, Any] | None) -> str | None:
    """The trigger word a run of stage 05 used (its manifest's settings), if it says."""
    word = recorded_settings(manifest).get("trigger_word")
    return word if isinstance(word, str) else None


# ---------------------------------------------------------------------------------------------
# A person's edits


def read_edits(run_dir: str | Path) -> pl.DataFrame:
    """Every edit so far (empty table with the schema when there are none); a damaged
    ``caption_edits`` is restored from its backup (:mod:`~diffusion_bunny.pipeline.userwork`)."""
    run = Run.open(run_dir)
    if not run.has_table("caption_edits"):
        return pl.DataFrame(schema=EDIT_SCHEMA)
    edits = run.read_table("caption_edits")
    # A row changed by hand to no caption or no frame (the table is a parquet file anyone can
    # write) stopped the stage and every edit after it with a TypeError naming nothing.
    blank = (
        pl.col("frame_id").is_null()
        | pl.col("caption").is_null()
        | (pl.col("caption").str.strip_chars() == "")
    )
    left = edits.filter(blank)
    if left.height and _first_time_said(run.table_path("caption_edits")):
        log.warning(
            "%s: %d edit(s) without a caption or a frame left out (%s); edit those frames again "
            "in notebook 05",
            run.table_path("caption_edits"),
            left.height,
            ", ".join(left["frame_id"].drop_nulls().head(3).to_list()) or "no frame named",
        )
    return edits.filter(~blank) if left.height else edits


#: The versions of ``caption_edits`` whose blank rows were said (:func:`_first_time_said`).
_SAID: set[tuple[str, int, int]] = set()


def _first_time_said(path: Path) -> bool:
    """Whether the blank rows of this version of the table (path, size, time) are still to be said:
    one run of stage 05 reads the edits three times, and the line came three times."""
    try:
        info = path.stat()
    except OSError:
        return True
    version = (str(path), info.st_size, info.st_mtime_ns)
    if version in _SAID:
        return False
    _SAID.add(version)
    return True


def edit_caption(run_dir: str | Path, frame_id: str, caption: str) -> pl.DataFrame:
    """Record a person's caption for one frame and update the ``captions`` table at once.

    The edit goes to the append-only ``caption_edits`` table first (the stage re-applies it
    after any rerun), then into ``captions``; both in one :meth:`Run.commit
    <diffusion_bunny.pipeline.run.Run.commit>` (under the tables' locks, kept with a backup), so
    an edit and a run of stage 05 never lose each other's writes. Returns the updated captions
    table.
    """
    text = " ".join(str(caption).split())
    if not text:
        raise BadInputError(f"the caption of {frame_id} is empty; type a caption (or leave it as it was)")
    run = Run.open(run_dir)
    run_dir = run.run_dir
    # Opening with the trigger word the captions were made with, as the stage's rerun gives it;
    # kept without it, so that a later word is put in its place, never beside it.
    trigger = _recorded_trigger(run.read_manifest("captions")) or ""
    text = without_trigger(text, trigger)
    said = text.strip(" ,;:.")
    if trigger and (not said or said.casefold() == trigger.casefold()):
        # The editor's box opens with the trigger word: the description deleted left it alone,
        # marked edited and trained on as a caption that says nothing.
        raise BadInputError(
            f"the caption of {frame_id} is only the trigger word {trigger!r}; type what the frame shows "
            "after it (or leave it as it was)"
        )
    with run.commit("caption_edits", "captions", by_hand=True) as tables:
        if not run.has_table("captions"):
            raise BadInputError(f"no captions in {run_dir}; run stage captions first")
        captions = run.read_table("captions")
        if frame_id not in set(captions["frame_id"].to_list()):
            raise BadInputError(
                f"frame {frame_id} has no caption row in {run_dir}; pick a frame from the table"
            )
        row = pl.DataFrame(
            {
                "event_id": [uuid.uuid4().hex],
                "ts": [datetime.now(UTC)],
                "frame_id": [frame_id],
                "caption": [text],
            },
            schema=EDIT_SCHEMA,
        )
        tables["caption_edits"] = pl.concat([read_edits(run_dir), row])
        tables["captions"] = captions = apply_edits(captions, row, trigger)
    return captions
