"""Caption providers behind one interface, and the machinery that makes paid calls safe.

Providers: ``template`` (offline, from the tables), and four LLM providers that all go through
one dspy Signature (:func:`caption_signature`: image + known characters + trigger word ->
caption + tags), so the prompt is structured, versioned and can be swapped or optimised with
dspy's tools without touching the calling code:

- ``openai``, ``anthropic``: dspy's own engine (``openai/<model>``, ``anthropic/<model>``);
- ``local``: any OpenAI-compatible server (vLLM, Ollama...) through the same engine at a base URL;
- ``bedrock``: boto3's ``bedrock-runtime`` Converse API, plugged into dspy as a custom engine
  (:class:`BedrockConverseEngine`), so Bedrock gets the same Signature and parsing.

Robustness lives here, not in the client libraries (dspy's engine never retries by itself, and
we keep it that way so there is exactly one retry policy): a requests-per-minute token bucket
(:class:`RateLimiter`), exponential backoff with full jitter on 429, 5xx, timeouts and dropped
connections (:func:`backoff_delay`), a circuit breaker per provider (:class:`CircuitBreaker`)
that sends the rest of the run to the next provider until a probe after a cool-down succeeds,
and a disk cache (:class:`CaptionCache`, plain JSON in stdlib sqlite3, never evicting) keyed by
everything that changes the answer. The *raw* answer is in the cache before it is parsed and
before the next request starts, so a rerun or a resume after a kill never pays for the same
frame twice, not even for an answer that did not parse. Every paid answer is stored with its
status (:func:`answer_status`: ``ok``, ``empty``, ``refused``, ``truncated``, ``unparsable``, issue
31): one that carries no caption is not asked again unless ``captions.retry`` names its status.
Secrets are read from the environment
(or ``.env``) when a provider is built and handed straight to the client; every stored string
goes through :func:`~diffusion_bunny.secrets.redact`, which hides every secret value the process
knows.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import logging
import math
import os
import random
import re
import socket
import sqlite3
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

from botocore.awsrequest import AWSRequest
from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError, ProfileNotFound
from PIL import Image

from diffusion_bunny.errors import ConfigError, ProviderError, storage_error
from diffusion_bunny.logs import say
from diffusion_bunny.paths import workspace_root
from diffusion_bunny.pipeline.atomic import atomic_write_bytes
from diffusion_bunny.secrets import load_env_file, redact, register_secret
from diffusion_bunny.stages.captions.facts import template_caption
from diffusion_bunny.stages.captions.settings import CaptionsSettings

# dspy is imported only through this module (lazily); at first use it would fetch litellm's model
# cost map over the network. Keep it offline.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

# The prompt: what every LLM provider is sent besides the frame and its facts (caption_signature
# builds the dspy Signature from it). PROMPT_VERSION, part of every answer's cache key, is derived
# from these texts, so a changed prompt is asked again instead of answered from the cache of the
# old one. Nothing else of the code is in the key: a paid answer stays valid until what is sent
# changes, and the parsing is not part of it (the cache holds the raw answer and parses it again
# on every read, so a parser fixed later reads the answers already paid for).
INSTRUCTIONS = (
    "Caption one frame of a movie for a diffusion-model training set. Start the caption with the "
    "trigger word. Name every known character you see, by the given name, and describe the shot: "
    "framing (close-up, medium or wide), what the people do, the place, the light and the colours. "
    "One sentence of at most 40 words, no speculation about the plot. Tags: short lower-case "
    "phrases for the same facts."
)
FIELD_DESCRIPTIONS = {
    "image": "the frame",
    "characters": "names of the characters known to be in the frame (may be empty)",
    "trigger_word": "the word that must open the caption",
    "caption": "the caption, starting with the trigger word",
    "tags": "short tags for the same facts",
}


def prompt_version(instructions: str, descriptions: dict[str, str]) -> str:
    """The prompt's part of every cache key: a hash of its texts (the field names included).

    ``v1`` stands for the layout of the signature those texts fill (each field's role and type,
    fixed in :func:`caption_signature`). A test pins the layout and today's value, so neither a new
    layout nor a refactor of this function can re-key, and so pay again for, every stored answer
    without someone deciding it."""
    blob = json.dumps([instructions, descriptions], sort_keys=True).encode()
    return "v1-" + hashlib.sha256(blob).hexdigest()[:8]


PROMPT_VERSION = prompt_version(INSTRUCTIONS, FIELD_DESCRIPTIONS)

#: Environment variables holding each paid provider's key.
KEY_VARIABLES = {"openai": "OPENAI_API_KEY", "anthropic": "ANTHROPIC_API_KEY"}


@dataclass(frozen=True)
class CaptionResult:
    """One caption and what it cost."""

    caption: str
    tags: list[str]
    input_tokens: int | None = None
    output_tokens: int | None = None


class Provider(Protocol):
    """What the caption loop needs of a provider."""

    name: str
    model: str
    paid: bool

    def preflight(self) -> None:
        """Raise :class:`ProviderError` (naming what to fix) when the provider cannot work."""

    def caption(self, image: bytes, facts: dict[str, Any]) -> CaptionResult:
        """Caption one frame (``image``: JPEG bytes, already scaled down)."""


# ---------------------------------------------------------------------------------------------
# Error classes: what to do with a failure


RETRY, PROVIDER_DOWN, ITEM_FAILED = "retry", "provider_down", "item_failed"

#: What a paid answer can be besides ``ok`` (a caption): billed, but carrying none. Stored with
#: the answer; asked again only when ``captions.retry`` lists the status. ``unreadable``: the
#: server said 200 (so it billed) but its body could not be read at all (cut off, an HTML page).
ANSWER_STATUSES = ("empty", "refused", "truncated", "unparsable", "unreadable")


class AnswerError(Exception):
    """A paid answer arrived and was recorded, but carries no caption: ``status`` is one of
    :data:`ANSWER_STATUSES`. Never retried in the same run (that would pay again)."""

    def __init__(self, status: str, detail: str):
        super().__init__(f"{status} answer ({detail})" if detail else f"{status} answer")
        self.status, self.detail = status, detail


_RETRY_DSPY = {"LMRateLimitError", "LMServerError", "LMTimeoutError", "LMTransportError"}
_DOWN_DSPY = {"LMAuthError", "LMBillingError", "LMUnsupportedModelError", "LMNotConfiguredError"}
_RETRY_AWS = {
    "ThrottlingException",
    "TooManyRequestsException",
    "ServiceUnavailableException",
    "InternalServerException",
    "ModelTimeoutException",
    "ModelNotReadyException",
    "ServiceQuotaExceededException",
}
_DOWN_AWS = {
    "AccessDeniedException",
    "UnrecognizedClientException",
    "ExpiredTokenException",
    "ResourceNotFoundException",
    "InvalidSignatureException",
}
_RETRY_BOTO = {"ReadTimeoutError", "ConnectTimeoutError", "EndpointConnectionError", "ConnectionClosedError"}


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and cur not in seen:
        seen.append(cur)
        cur = cur.__cause__ or cur.__context__
    return seen


def classify(exc: BaseException) -> str:
    """``retry`` (rate limit, server error, timeout, dropped connection), ``provider_down`` (the
    key or the model is refused: no point in asking again) or ``item_failed`` (this frame's
    answer could not be used). Looks through the exception chain, since dspy wraps what a
    custom engine (Bedrock) raises."""
    for err in _chain(exc):
        name = type(err).__name__
        if name in _RETRY_DSPY or name in _RETRY_BOTO:
            return RETRY
        if name in _DOWN_DSPY:
            return PROVIDER_DOWN
        code = getattr(err, "response", None)
        if isinstance(code, dict):
            aws = code.get("Error", {}).get("Code", "")
            if aws in _RETRY_AWS:
                return RETRY
            if aws in _DOWN_AWS:
                return PROVIDER_DOWN
        if isinstance(err, (TimeoutError, ConnectionError, socket.timeout)):
            return RETRY
    return ITEM_FAILED


_TIMEOUT_NAMES = {
    "LMTimeoutError",
    "ReadTimeoutError",
    "ReadTimeout",
    "ModelTimeoutException",
    "TimeoutException",
}


def is_timeout(exc: BaseException) -> bool:
    """Whether the request ran out of time waiting for an answer (the server may have answered,
    and billed, after the client stopped listening), as opposed to one refused or dropped."""
    for err in _chain(exc):
        if type(err).__name__ in _TIMEOUT_NAMES or isinstance(err, (TimeoutError, socket.timeout)):
            return True
        if "timed out" in str(err).lower() and type(err).__name__ in _RETRY_DSPY | _RETRY_BOTO:
            return True
    return False


def retry_after(exc: BaseException) -> float | None:
    """The seconds a server asked to wait before the next request (a 429's ``Retry-After``, as
    dspy's errors carry it), None when it asked nothing: retrying sooner only earns another 429."""
    for err in _chain(exc):
        value = getattr(err, "retry_after", None)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return max(0.0, float(value))
    return None


def unreadable_answer(exc: BaseException) -> str | None:
    """The detail of a 200 answer whose body could not be read (dspy's engine: ``the reply (HTTP
    200, ...) is not JSON``; botocore: ``ResponseParserError``), None for any other failure. Such an
    answer was billed: it is recorded like a refusal, never asked again behind the user's back."""
    for err in _chain(exc):
        if getattr(err, "status", None) == 200 or type(err).__name__ == "ResponseParserError":
            return short_error(err)
    return None


def short_error(exc: BaseException) -> str:
    """One line for the table: the exception's class and the first line of its message, with
    every secret the process knows replaced (a server may echo the request headers)."""
    text = redact(str(exc)).strip()
    first = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {first}"[:300]


# ---------------------------------------------------------------------------------------------
# Secrets: diffusion_bunny.secrets (the command line's log uses them too)

# ---------------------------------------------------------------------------------------------
# Rate limit, backoff, circuit breaker


class RateLimiter:
    """At most ``per_minute`` requests started in any 60 seconds, paced by a token bucket that
    lets up to ``burst`` go at once. Thread-safe.

    Written here because the clients we use have none (dspy's engine and boto3 leave pacing to
    the caller) and one small limiter shared by all worker threads is all that is needed. A
    bucket alone does not keep the promise: a full bucket of ``burst`` plus its refill lets
    ``burst + per_minute`` start in the first minute (8 + 2 at 3 a minute, a free tier's 429s),
    so the starts of the last minute are also counted and the bucket holds at most
    ``per_minute`` tokens."""

    WINDOW_S = 60.0

    def __init__(
        self,
        per_minute: float,
        burst: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.rate = per_minute / 60.0
        self.capacity = float(max(1.0, min(float(burst), per_minute)))
        self.tokens = self.capacity
        # The window counts whole starts: 1.5 a minute is at most 2 in any minute, the bucket
        # keeping 1.5 over the long run (a window of 1 held it to 1).
        self.window = max(1, math.ceil(per_minute))
        self.starts: deque[float] = deque()
        self.clock = clock
        self.sleep = sleep
        self.last = clock()
        self.lock = threading.Lock()

    def acquire(self) -> float:
        """Wait for a token; returns the seconds waited."""
        waited = 0.0
        while True:
            with self.lock:
                now = self.clock()
                self.tokens = min(self.capacity, self.tokens + (now - self.last) * self.rate)
                self.last = now
                while self.starts and self.starts[0] <= now - self.WINDOW_S:
                    self.starts.popleft()
                if len(self.starts) >= self.window:
                    need = self.starts[0] + self.WINDOW_S - now
                elif self.tokens >= 1.0:
                    self.tokens -= 1.0
                    self.starts.append(now)
                    return waited
                else:
                    need = (1.0 - self.tokens) / self.rate
            self.sleep(need)
            waited += need


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Full-jitter exponential backoff: uniform in [0, min(cap, base * 2**attempt)] (the AWS
    architecture blog's recommendation: it spreads retries of many workers apart best)."""
    return rng.uniform(0.0, min(cap, base * (2.0**attempt)))


class CircuitBreaker:
    """Closed, open, half-open. Opens after ``threshold`` frames in a row failed on a provider (or
    at once when the provider refuses the key or the model); the frames then go to the next
    provider of the chain. After ``cooldown_s`` an open circuit lets exactly one probe request
    through (half-open): a success closes it, a failure opens it for another cool-down. So one
    bad minute does not send the rest of a long run to the fallback.

    A refused key or model (``fatal``) stays open for the run: it will not be accepted a minute
    later, and probing it would only repeat the refusal."""

    CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"

    def __init__(
        self, threshold: int, cooldown_s: float = 60.0, *, clock: Callable[[], float] = time.monotonic
    ):
        self.threshold = threshold
        self.cooldown_s = cooldown_s
        self.clock = clock
        self.failures = 0
        self.state = self.CLOSED
        self.fatal = False
        self.reason = ""
        self.opened_at = 0.0
        self.times_opened = 0
        self.lock = threading.Lock()

    @property
    def open(self) -> bool:
        """Whether the circuit is not closed (open, or half-open with its probe out)."""
        return self.state != self.CLOSED

    def blocked(self) -> bool:
        """Open, and no probe would be let through now (a look that changes nothing)."""
        with self.lock:
            if self.state == self.HALF_OPEN:
                return True
            return self.state == self.OPEN and (self.fatal or self.clock() - self.opened_at < self.cooldown_s)

    def allow(self) -> str:
        """May a request go to this provider now? ``"closed"`` when closed; when open and the
        cool-down has passed, ``"probe"`` once (the circuit turns half-open until the probe is
        answered: report it with :meth:`success` or :meth:`failure`, no retries); else ``""``."""
        with self.lock:
            if self.state == self.CLOSED:
                return "closed"
            if (
                self.state == self.OPEN
                and not self.fatal
                and self.clock() - self.opened_at >= self.cooldown_s
            ):
                self.state = self.HALF_OPEN
                return "probe"
            return ""

    def success(self) -> None:
        with self.lock:
            self.failures = 0
            self.state = self.CLOSED

    def failure(self, reason: str, *, fatal: bool = False) -> None:
        with self.lock:
            self.failures += 1
            if self.state == self.HALF_OPEN or fatal or self.failures >= self.threshold:
                if self.state == self.CLOSED:
                    self.reason = reason
                    self.times_opened += 1
                self.fatal = self.fatal or fatal
                self.state = self.OPEN
                self.opened_at = self.clock()


# ---------------------------------------------------------------------------------------------
# Disk cache


class CaptionCache:
    """Paid answers and refusals, one small JSON file per answer, kept for every run of this user.

    Where: one store per user (``captions.cache``: the user cache folder of
    :func:`diffusion_bunny.models.cache.cache_dir`, ``$DIFFUSION_BUNNY_CACHE``; or
    ``captions.cache_dir``), which every run folder reads, so the same movie captioned into a
    second run folder (another ``--out``) pays nothing again. Keyed by :meth:`key`: provider,
    model, prompt version, the picture's hash and the other inputs of the prompt.

    Why one file per answer, written atomically (:func:`~diffusion_bunny.pipeline.atomic.atomic_write_bytes`:
    a temporary name, flushed, renamed over), rather than SQLite: the store may sit on a network
    file system (a home folder on NFS, a cluster's shared disk). SQLite in WAL mode (what this
    used before) needs shared memory between its users, which NFS cannot give: two machines
    writing at once corrupt it. SQLite without WAL relies on POSIX file locks, which NFS clients
    implement unreliably (or not at all under ``nolock``), and one bad lock damages the whole
    database, every answer paid for. A rename is atomic on NFS and on every local file system, an
    answer never changes once paid for, so no lock is needed at all: two writers of one key both
    write a whole file and the last rename wins; a reader sees a whole answer or none; and a
    damaged file (a disk error, a hand edit) costs one answer, never the store. The price is a
    small file per paid answer (~10,000 for a feature film), nothing next to the pictures.

    A damaged answer file is moved aside into ``damaged/`` (one line in :attr:`notes`) and its
    frame asked again; nothing readable is ever asked again. Answers in the SQLite stores of
    earlier versions (``answers.sqlite3``, in this folder or a run's ``cache/captions/``) are read
    in once (:meth:`import_legacy`); a damaged one is moved aside with one line, what could be
    read of it kept.

    A cache folder written by the old diskcache store (``cache.db``) is not read (it holds
    pickles): those frames are asked again once, and :attr:`legacy` says so for the warning."""

    #: The folder of answer files inside the store.
    ANSWERS = "answers"
    #: The SQLite store of earlier versions (read in once, then renamed ``.imported``).
    FILE = "answers.sqlite3"
    #: Where damaged answer files and stores are moved.
    DAMAGED = "damaged"

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        #: The old diskcache database when it is there and this store is new.
        self.legacy = (self.directory / "cache.db") if (self.directory / "cache.db").is_file() else None
        #: One-line notes for the run's warnings (damaged files moved aside, old stores read in).
        self.notes: list[str] = []
        self._notes_lock = threading.Lock()
        answers = self.directory / self.ANSWERS
        with self._storage(answers):
            if answers.exists() and not answers.is_dir():
                self._move_aside(answers, "the answer store's folder is a file")
            answers.mkdir(parents=True, exist_ok=True)
        self.import_legacy(self.directory / self.FILE)
        if self.legacy is not None and len(self):
            self.legacy = None  # already rebuilt once: nothing more to say

    @contextlib.contextmanager
    def _storage(self, path: Path) -> Iterator[None]:
        """A full or read-only disk under the store is one line naming it (exit status 2), not a
        bug."""
        try:
            yield
        except OSError as exc:
            if exc.filename is None:
                exc.filename = str(path)
            error = storage_error(
                exc,
                "free some space or fix the permissions (or set captions.cache_dir), then run the stage "
                "again: the answers stored before are kept and not asked again",
            )
            if error is None:
                raise
            raise error from None

    def _note(self, text: str) -> None:
        with self._notes_lock:
            self.notes.append(text)
        say(logging.getLogger(__name__), f"captions: {text}")

    def _move_aside(self, path: Path, why: str) -> Path:
        """Move a damaged file or folder into ``damaged/`` (kept for a look, never read again)."""
        folder = self.directory / self.DAMAGED
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / f"{path.name}.{datetime.now(UTC):%Y%m%d-%H%M%S}-{os.getpid()}"
        os.replace(path, target)
        self._note(f"{why}: moved aside to {target}; a new one is started, and every readable answer is kept")
        return target

    def path_of(self, key: str) -> Path:
        """The file of ``key``'s answer: ``answers/<2 hex>/<sha256 of the key>.json``."""
        digest = hashlib.sha256(key.encode()).hexdigest()
        return self.directory / self.ANSWERS / digest[:2] / f"{digest}.json"

    @staticmethod
    def key(
        image_sha: str,
        provider: str,
        model: str,
        facts: dict[str, Any],
        trigger_word: str,
        max_side: int = 768,
        *,
        max_tokens: int = 300,
        temperature: float = 0.2,
    ) -> str:
        """Everything that changes the answer: image hash + the size it is sent at + prompt
        version + provider + model + the prompt's other inputs + the sampling settings
        (``max_tokens`` cuts an answer short, ``temperature`` changes it). Not the server's URL:
        the same model behind a restarted server (another port) gives the same answers."""
        chars = ",".join(sorted(facts.get("characters") or []))
        return (
            f"{PROMPT_VERSION}|{provider}|{model}|{image_sha}@{max_side}|{chars}|{trigger_word}"
            f"|max_tokens={max_tokens}|temperature={temperature!r}"
        )

    @classmethod
    def key_for(cls, image_sha: str, provider: Provider, facts: dict[str, Any], cfg: CaptionsSettings) -> str:
        """:meth:`key` with every setting taken from the configuration."""
        return cls.key(
            image_sha,
            provider.name,
            provider.model,
            facts,
            cfg.trigger_word,
            cfg.image_max_side,
            max_tokens=cfg.max_tokens,
            temperature=cfg.temperature,
        )

    def get(self, key: str) -> dict[str, Any] | None:
        """The answer stored under ``key``, or None (a damaged file is moved aside: asked again)."""
        path = self.path_of(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError:
            return None  # unreadable here (permissions): asked again, the store's write will say why
        try:
            value = json.loads(data)
            if not isinstance(value, dict) or value.get("key") != key:
                raise ValueError("not the answer of this key")
        except ValueError:
            with contextlib.suppress(OSError):
                self._move_aside(path, f"a damaged answer file ({path.name})")
            return None
        value.pop("key", None)
        return value

    def set(self, key: str, value: dict[str, Any]) -> None:
        """Store ``value`` under ``key``: on disk, whole, before this returns."""
        path = self.path_of(key)
        with self._storage(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, json.dumps({**value, "key": key}, sort_keys=True).encode())

    def __len__(self) -> int:
        return sum(1 for _ in (self.directory / self.ANSWERS).glob("*/*.json"))

    def close(self) -> None:
        """Nothing to close (each answer is its own file); kept for the callers' ``finally``."""

    def take_in(self, other: Path) -> int:
        """Copy the answers (and the paid-request counts, ``spent/``) of another store of this
        kind, a run folder's own (``captions.cache: false``), that this one lacks; returns the
        answers copied. Why: answers paid for with the store off were paid again once it was back
        on, and their requests counted toward no cap. A file is named by its key's hash, so the
        same path here is the same answer."""
        other = Path(other)
        copied = 0
        for sub in (self.ANSWERS, "spent"):
            for path in sorted((other / sub).rglob("*.json")) if (other / sub).is_dir() else []:
                target = self.directory / sub / path.relative_to(other / sub)
                if target.exists():
                    continue
                with contextlib.suppress(OSError):  # unreadable: asked again, as before
                    target.parent.mkdir(parents=True, exist_ok=True)
                    atomic_write_bytes(target, path.read_bytes())
                    copied += sub == self.ANSWERS
        if copied:
            self._note(f"{copied} paid answer(s) of {other} read into the answer store {self.directory}")
        return copied

    def import_legacy(self, database: Path) -> int:
        """Read the answers of an earlier version's SQLite store (``answers.sqlite3``) into this
        one, skipping keys already here, then rename it ``.imported`` so it is read once. A store
        SQLite calls damaged is moved aside with one line, what could be read of it kept. Returns
        the answers read in."""
        database = Path(database)
        if not database.is_file():
            return 0
        rows: list[tuple[str, str]] = []
        damaged = None
        try:
            db = sqlite3.connect(database, timeout=60.0)  # closing it folds in its WAL file
            try:
                for row in db.execute("SELECT key, value FROM answers"):
                    rows.append(row)
            finally:
                db.close()
        except sqlite3.DatabaseError as exc:
            damaged = str(exc)
        added = 0
        for key, text in rows:
            try:
                value = json.loads(text)
            except ValueError:
                continue
            if isinstance(value, dict) and self.get(key) is None:
                self.set(key, value)
                added += 1
        if damaged is not None:
            why = f"the answer store {database} is damaged ({damaged}; {added} answer(s) read from it)"
            with contextlib.suppress(OSError):
                self._move_aside(database, why)
            return added
        with contextlib.suppress(OSError):
            os.replace(database, database.with_name(database.name + ".imported"))
        if added:
            self._note(f"{added} paid answer(s) of {database} read into the answer store {self.directory}")
        return added


# ---------------------------------------------------------------------------------------------
# Providers


class TemplateProvider:
    """The offline default: a caption assembled from the tables (never fails, costs nothing)."""

    name = "template"
    model = "template-v1"
    paid = False

    def __init__(self, cfg: CaptionsSettings):
        self.cfg = cfg

    def preflight(self) -> None:
        return None

    def caption(self, image: bytes, facts: dict[str, Any]) -> CaptionResult:
        text, tags = template_caption(facts, self.cfg)
        return CaptionResult(text, tags)


def caption_signature() -> type:
    """The dspy Signature every LLM provider answers (built lazily: dspy is only imported when
    an LLM provider is used)."""
    import dspy  # lazy: dspy takes 1.2 s to import

    # Built from a dict (not a class body): this module uses postponed annotations, which dspy
    # cannot resolve in a class defined inside a function.
    d = FIELD_DESCRIPTIONS
    return dspy.Signature(
        {
            "image": (dspy.Image, dspy.InputField(desc=d["image"])),
            "characters": (list[str], dspy.InputField(desc=d["characters"])),
            "trigger_word": (str, dspy.InputField(desc=d["trigger_word"])),
            "caption": (str, dspy.OutputField(desc=d["caption"])),
            "tags": (list[str], dspy.OutputField(desc=d["tags"])),
        },
        INSTRUCTIONS,
    )


def _usage(usage: dict[str, Any] | None) -> tuple[int | None, int | None]:
    """Input and output tokens from dspy's usage record (``{model: {...tokens...}}``)."""
    usage = usage or {}
    inp = out = None
    for entry in usage.values():
        entry = entry or {}
        i = entry.get("prompt_tokens", entry.get("input_tokens"))
        o = entry.get("completion_tokens", entry.get("output_tokens"))
        inp = (inp or 0) + int(i) if i is not None else inp
        out = (out or 0) + int(o) if o is not None else out
    return inp, out


def _with_trigger(caption: str, trigger: str) -> str:
    """Every caption must open with the trigger word (the LoRA learns the look from it); an
    answer that forgot it gets it prepended rather than being thrown away. The trigger must be
    the answer's whole first word: ``cat`` does not open "Catherine sits ...", nor ``bunnystyle``
    "bunnystyled ...". Quotes a model put around its whole answer are not part of the caption."""
    text = " ".join(caption.split())
    # Only a pair around the whole: '"Hamilton" is on a sign, he says "wait"' keeps its quotes.
    if (
        len(text) > 2
        and (text[0], text[-1]) in _QUOTES
        and text[0] not in text[1:-1]
        and text[-1] not in text[1:-1]
    ):
        text = text[1:-1].strip()
    if not trigger or re.match(rf"{re.escape(trigger)}(?![\w-])", text, re.IGNORECASE):
        return text
    return f"{trigger}, {text}"


#: Answers that stand for no caption at all.
_NON_ANSWERS = frozenset(
    {"n/a", "na", "none", "null", "nothing", "no caption", "unknown", "caption", "empty"}
)


def _says_something(text: str, trigger: str) -> bool:
    """Whether a caption, once its trigger word is set apart, has words of its own."""
    rest = text[len(trigger) :] if trigger and text.casefold().startswith(trigger.casefold()) else text
    words = " ".join(re.sub(r"[^\w/ ]+", " ", rest).split()).casefold()
    return bool(words) and words not in _NON_ANSWERS


#: Pairs of quotes a model may wrap a whole answer in.
_QUOTES = {('"', '"'), ("'", "'"), ("\u201c", "\u201d"), ("\u2018", "\u2019"), ("`", "`")}


class DspyProvider:
    """An LLM provider: one dspy LM (no dspy cache, no dspy retries: both are ours) and the
    caption Signature."""

    paid = True

    def __init__(self, name: str, model: str, lm: Any, cfg: CaptionsSettings, preflight: Callable[[], None]):
        import dspy  # lazy: dspy takes 1.2 s to import

        self.name = name
        self.model = model
        self.lm = lm
        self.cfg = cfg
        self._preflight = preflight
        self.predict = dspy.Predict(caption_signature())
        # The response dspy records for each call, per thread (calls run on several threads):
        # its finish reason and refusal tell an empty answer's status. The entry is not kept in
        # dspy's histories (the LM's and the process-wide one): each holds the request's messages
        # with the frame as base64, about 1 GB over a feature film's kept frames.
        self._last = threading.local()

        def update_history(entry: dict[str, Any]) -> None:
            self._last.response = entry.get("response")

        lm.update_history = update_history

    def preflight(self) -> None:
        self._preflight()

    def caption(
        self, image: bytes, facts: dict[str, Any], on_raw: Callable[[RawAnswer], None] | None = None
    ) -> CaptionResult:
        """Ask for one caption. ``on_raw`` is given the raw answer (text, tokens, finish reason
        and :func:`answer_status`) as soon as it arrives, *before* dspy parses it or raises on an
        empty one: the caller records it there, so every paid answer is paid only once (a rerun
        reads the record). An answer without a caption raises :class:`AnswerError`."""
        import dspy  # lazy: dspy takes 1.2 s to import
        from dspy.utils.usage_tracker import track_usage  # lazy: dspy takes 1.2 s to import

        answers: list[RawAnswer] = []

        def record(raw: RawAnswer) -> None:
            if on_raw is not None:
                on_raw(raw)  # a store that cannot write (full disk) raises here, before the append
            answers.append(raw)

        self._last.response = None
        # No JSON-adapter fallback: it would send a second (paid) request behind our back when an
        # answer does not parse; a bad answer is one failed attempt, counted and logged as such.
        adapter = _raw_first_adapter(record, lambda: getattr(self._last, "response", None))
        try:
            with dspy.context(lm=self.lm, adapter=adapter), track_usage() as tracker:
                adapter.tracker = tracker
                pred = self.predict(
                    # A data URI is sent as it is; raw bytes would be decoded and re-encoded by dspy.
                    image=dspy.Image("data:image/jpeg;base64," + base64.b64encode(image).decode()),
                    characters=list(facts.get("characters") or []),
                    trigger_word=self.cfg.trigger_word,
                )
            inp, out = _usage(tracker.get_total_tokens())
            return self._result(pred.caption, pred.tags, inp, out)
        except Exception as exc:
            unreadable = None if answers else unreadable_answer(exc)
            if unreadable is not None:  # a 200 (billed) with a body that could not be read
                record(RawAnswer("", unreadable=redact(unreadable)))
            elif not answers:  # no answer came (HTTP error, timeout): classified by the caller
                raise
            status, detail = answer_status(answers[-1], self.parse)
            if status == "ok":  # dspy refused it for its tags alone; ours keeps the caption
                return self.parse(answers[-1])
            raise AnswerError(status, detail) from exc

    def status(self, raw: RawAnswer) -> tuple[str, str]:
        """:func:`answer_status` of a raw answer of this provider."""
        return answer_status(raw, self.parse)

    def parse(self, raw: RawAnswer) -> CaptionResult:
        """The caption in a raw answer (a fresh one or one from the cache, parsed the same way),
        without asking anything. Raises dspy's ``AdapterParseError`` when it carries no caption.
        Tags are read leniently (:func:`_loose_tags`): dspy's parser throws the whole answer away
        when its tags are not a JSON list or missing, and the caption, paid for, went with it; not
        of an answer cut at ``max_tokens`` or stopped by a filter (its caption is cut too)."""
        import dspy  # lazy: dspy takes 1.2 s to import

        adapter = dspy.ChatAdapter(use_json_adapter_fallback=False)
        try:
            fields = adapter.parse(self.predict.signature, raw.text)
        except Exception:
            sections = _sections(raw.text)
            # Only of an answer that ended as it meant to: one cut at max_tokens ends mid-caption
            # ("her left hand rais"), and one the content filter stopped is no caption either.
            if not sections.get("caption") or (raw.finish_reason or "stop") != "stop" or raw.refusal:
                raise
            fields = {"caption": sections["caption"], "tags": _loose_tags(sections.get("tags", ""))}
        return self._result(fields.get("caption"), fields.get("tags"), raw.input_tokens, raw.output_tokens)

    def _result(self, caption: Any, tags: Any, inp: int | None, out: int | None) -> CaptionResult:
        caption = str(caption or "").strip()
        if not caption:
            raise ValueError("the answer had an empty caption")
        text = _with_trigger(caption, self.cfg.trigger_word)
        if not _says_something(text, self.cfg.trigger_word):
            # The trigger word alone, a pair of quotes or "N/A" was stored ``ok``, exported as a
            # caption that says nothing, and never asked again (captions.retry takes statuses).
            raise ValueError(f"the answer's caption says nothing ({caption[:40]!r})")
        tags = [str(t).strip() for t in (tags or []) if str(t).strip()]
        return CaptionResult(text, tags, inp, out)


_FIELD_HEADER = re.compile(r"\[\[ ## (\w+) ## \]\]")


def _sections(text: str) -> dict[str, str]:
    """The fields of a chat-adapter answer (``[[ ## name ## ]]`` headers), first of each name,
    as dspy's ChatAdapter splits them, without parsing their values."""
    found: list[tuple[str | None, list[str]]] = [(None, [])]
    for line in text.splitlines():
        match = _FIELD_HEADER.match(line.strip())
        if match:
            rest = line.strip()[match.end() :].strip()
            found.append((match.group(1), [rest] if rest else []))
        else:
            found[-1][1].append(line)
    out: dict[str, str] = {}
    for name, lines in found:
        if name is not None and name not in out:
            out[name] = "\n".join(lines).strip()
    return out


def _loose_tags(value: str) -> list[str]:
    """Tags as a model wrote them: a JSON list, else a comma- or line-separated list
    (``stage, performer, dark``), brackets and quotes dropped; none when absent."""
    try:
        parsed = json.loads(value)
    except ValueError:
        parsed = None
    if isinstance(parsed, list):
        return [str(t) for t in parsed]
    parts = re.split(r"[,\n]", value.strip().strip("[]"))
    return [p.strip().strip("\"'`-* ").strip() for p in parts if p.strip().strip("\"'`-* ").strip()]


@dataclass(frozen=True)
class RawAnswer:
    """A paid answer as the provider sent it, before parsing: what the cache keeps."""

    text: str
    input_tokens: int | None = None
    output_tokens: int | None = None
    #: Why the model stopped, in dspy's words (``stop``, ``length``, ``content_filter``, ...).
    finish_reason: str | None = None
    #: The refusal the model sent instead of text, when it sent one.
    refusal: str | None = None
    #: Why a 200 answer's body could not be read at all (then ``text`` is empty).
    unreadable: str | None = None


def answer_status(raw: RawAnswer, parse: Callable[[RawAnswer], Any]) -> tuple[str, str]:
    """``(status, detail)`` of a paid answer: ``ok`` when ``parse`` gets a caption out of it,
    else ``refused`` (a refusal or the content filter), ``truncated`` (stopped at ``max_tokens``:
    a reasoning model can spend them all before writing anything), ``empty`` (no text),
    ``unparsable`` (text without the fields asked for) or ``unreadable`` (a 200 whose body could not
    be read)."""
    if raw.unreadable:
        return "unreadable", raw.unreadable[:200]
    try:
        parse(raw)
        return "ok", ""
    except Exception as exc:  # any parse failure is a status, never a crash
        why = short_error(exc)
    finish = raw.finish_reason or "stop"
    if raw.refusal or finish == "content_filter":
        return "refused", (raw.refusal or f"finish_reason {finish}")[:200]
    if finish == "length":
        tokens = f", {raw.output_tokens} output tokens" if raw.output_tokens is not None else ""
        return "truncated", f"stopped at max_tokens{tokens}"
    if not raw.text.strip():
        return "empty", f"no text, finish_reason {finish}"
    return "unparsable", why


def _finish_of(response: Any) -> tuple[str | None, str | None]:
    """``(finish_reason, refusal text)`` of the response dspy recorded for a call: an lm15
    ``Response`` (or a list of them) or a legacy OpenAI-shaped dict."""
    if isinstance(response, (list, tuple)):
        response = response[0] if response else None
    if response is None:
        return None, None
    if isinstance(response, dict):
        choices = response.get("choices") or [{}]
        message = choices[0].get("message") or {}
        return choices[0].get("finish_reason"), message.get("refusal")
    finish = getattr(response, "finish_reason", None)
    message = getattr(response, "message", None)
    parts = getattr(message, "parts", ())
    refusal = [getattr(p, "text", "") for p in parts if getattr(p, "type", "") == "refusal"]
    return finish, " ".join(r for r in refusal if r) or None


def _raw_first_adapter(
    on_raw: Callable[[RawAnswer], None] | None, response: Callable[[], Any] = lambda: None
) -> Any:
    """dspy's chat adapter, with a hook that hands every raw completion to ``on_raw`` as soon as
    the model answered, before dspy looks at it: dspy raises on an empty or null answer (a
    refusal, the content filter, a reasoning model that spent ``max_tokens``) before it would
    call ``parse``, so the hook sits one step earlier, in ``_call_postprocess``. ``response``
    gives the response dspy recorded for this call (its finish reason and refusal)."""
    import dspy  # lazy: dspy takes 1.2 s to import

    class RawFirstAdapter(dspy.ChatAdapter):
        tracker: Any = None

        def _call_postprocess(self, processed: Any, original: Any, outputs: Any, lm: Any, kwargs: Any) -> Any:
            if on_raw is not None:
                usage = self.tracker.get_total_tokens() if self.tracker is not None else None
                finish, refusal = _finish_of(response())
                for output in outputs:
                    text = output.get("text") if isinstance(output, dict) else output
                    on_raw(RawAnswer(str(text or ""), *_usage(usage), finish, refusal))
            return super()._call_postprocess(processed, original, outputs, lm, kwargs)

    return RawFirstAdapter(use_json_adapter_fallback=False)


def _probe_http(url: str, setting: str, headers: dict[str, str], timeout: float, key_variable: str) -> None:
    """Is anything answering at ``url``? Any HTTP status means yes, except 401/403: the key is
    refused, and the line names the variable that holds it (``key_variable``): the base URL
    setting it named before sent people to fix an address that was right. A refused connection,
    unknown host or timeout is the one clear error, naming ``setting``."""
    request = urllib.request.Request(url, headers=headers, method="GET")
    try:
        with urllib.request.urlopen(request, timeout=timeout):
            return
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            raise ProviderError(
                f"the caption server at {urlparse(url).netloc} refused the key in {key_variable} "
                f"(HTTP {exc.code}); set the right key in {key_variable} (in the environment or .env)"
            ) from None
        return
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ProviderError(
            f"cannot reach the caption server at {url} ({reason}); check the network (or start the "
            f"server, if it is your own) or fix {setting}; {FALLBACK_ADVICE}"
        ) from None


#: The end of a line saying a provider does not answer: what else to do. Left out where a provider
#: after it in ``captions.fallback`` captions in its place (the stage's warning then said to add
#: template to a chain that already ended with it).
FALLBACK_ADVICE = (
    "or choose another captions.provider, or end captions.fallback with template to caption from "
    "the tables when it is down"
)


def _require_key(provider: str, variable: str) -> str:
    value = os.environ.get(variable, "").strip()
    if not value:
        raise ProviderError(
            f"captions.provider '{provider}' needs the environment variable {variable}; set it in the "
            "environment or in .env at the workspace root (never in a config file or notebook)"
        )
    return _printable_key(provider, variable, value)


def _printable_key(provider: str, variable: str, value: str) -> str:
    """A key as an HTTP header can carry it: printable ASCII. A key copied from a dashboard that
    shows it shortened (``sk-proj-Ab3…x9Qz``) or with a quote or space in it went as far as the
    request and ended in a traceback (UnicodeEncodeError), the template fallback never reached.
    The key itself is never repeated: only where the first character that cannot be is."""
    bad = next((i for i, c in enumerate(value) if not (c.isascii() and c.isprintable()) or c == " "), None)
    if bad is None:
        return value
    raise ProviderError(
        f"captions.provider '{provider}': the key in {variable} has a character no key has at position "
        f"{bad + 1} of {len(value)} (a key shown shortened with '…', or copied with a space or a line "
        "break); copy the whole key again"
    )


def _dspy_lm(model: str, cfg: CaptionsSettings, key: str, base: str | None) -> Any:
    """A dspy LM on dspy's own HTTP engine, without dspy's cache or retries (both are ours)."""
    import dspy  # lazy: dspy takes 1.2 s to import

    kwargs: dict[str, Any] = {"api_key": key, "timeout": cfg.timeout_s}
    if base:
        kwargs["api_base"] = base
    return dspy.LM(
        model, cache=False, num_retries=0, max_tokens=cfg.max_tokens, temperature=cfg.temperature, **kwargs
    )


def _openai_like(name: str, cfg: CaptionsSettings) -> DspyProvider:
    if name == "openai":
        variable = KEY_VARIABLES[name]
        key = _require_key(name, variable)
        model, base = cfg.openai.model, cfg.openai.base_url
        setting = "captions.openai.base_url"
        probe_base = (base or "https://api.openai.com/v1").rstrip("/")
    else:
        variable = cfg.local.api_key_env
        key = os.environ.get(variable, "").strip() or "not-needed"
        key = _printable_key(name, variable, key)
        if key != "not-needed":
            register_secret(key)  # whatever the variable is called
        model, base = cfg.local.model, cfg.local.base_url
        setting = "captions.local.base_url"
        probe_base = base.rstrip("/")
    if not model:
        raise ConfigError(f"config error: captions.{name}.model is empty; name the model to ask")
    lm = _dspy_lm(f"openai/{model}", cfg, key, base)

    def preflight() -> None:
        _probe_http(
            f"{probe_base}/models",
            setting,
            {"Authorization": f"Bearer {key}"},
            min(10.0, cfg.timeout_s),
            variable,
        )

    return DspyProvider(name, model, lm, cfg, preflight)


def _anthropic(cfg: CaptionsSettings) -> DspyProvider:
    key = _require_key("anthropic", KEY_VARIABLES["anthropic"])
    # dspy's Anthropic engine posts to <base>/messages, its own base ending in /v1: a base URL
    # given as the server root gets the /v1 the engine (and the preflight) expect.
    base = cfg.anthropic.base_url.rstrip("/") if cfg.anthropic.base_url else None
    if base and not base.endswith("/v1"):
        base += "/v1"
    lm = _dspy_lm(f"anthropic/{cfg.anthropic.model}", cfg, key, base)
    root = (base or "https://api.anthropic.com/v1")[: -len("/v1")]

    def preflight() -> None:
        _probe_http(
            f"{root}/v1/models",
            "captions.anthropic.base_url",
            {"x-api-key": key, "anthropic-version": "2023-06-01"},
            min(10.0, cfg.timeout_s),
            KEY_VARIABLES["anthropic"],
        )

    return DspyProvider("anthropic", cfg.anthropic.model, lm, cfg, preflight)


class BedrockConverseEngine:
    """A dspy engine (``complete(Request) -> Response``) that sends the request through boto3's
    ``bedrock-runtime`` Converse API: dspy builds the prompt and parses the answer, boto3 signs
    and sends it. boto3's own retries are turned off (ours apply)."""

    def __init__(self, client: Any, model_id: str):
        self.client = client
        self.model_id = model_id

    @staticmethod
    def _blocks(parts: Any) -> list[dict[str, Any]]:
        blocks: list[dict[str, Any]] = []
        for part in parts:
            kind = getattr(part, "type", "")
            if kind == "text":
                blocks.append({"text": part.text})
            elif kind == "image":
                data = part.data
                raw = base64.b64decode(data) if isinstance(data, str) else bytes(data or b"")
                if not raw and part.path is not None:
                    raw = Path(part.path).read_bytes()
                fmt = (part.media_type or "image/jpeg").split("/")[-1].replace("jpg", "jpeg")
                blocks.append({"image": {"format": fmt, "source": {"bytes": raw}}})
            else:
                raise ValueError(f"Bedrock captioning cannot send a {kind!r} part")
        return blocks

    def complete(self, request: Any) -> Any:
        from dspy.lm15 import Message, Response, TextPart, Usage  # lazy: dspy takes 1.2 s to import

        messages = [{"role": m.role, "content": self._blocks(m.parts)} for m in request.messages]
        kwargs: dict[str, Any] = {"modelId": self.model_id, "messages": messages}
        if request.system is not None:
            system = (
                request.system if isinstance(request.system, str) else "".join(p.text for p in request.system)
            )
            kwargs["system"] = [{"text": system}]
        inference: dict[str, Any] = {}
        if request.config.max_tokens is not None:
            inference["maxTokens"] = int(request.config.max_tokens)
        if request.config.temperature is not None:
            inference["temperature"] = float(request.config.temperature)
        if inference:
            kwargs["inferenceConfig"] = inference
        answer = self.client.converse(**kwargs)
        text = "".join(block.get("text", "") for block in answer["output"]["message"]["content"])
        usage = answer.get("usage", {})
        stop = answer.get("stopReason", "end_turn")
        return Response(
            id=answer.get("ResponseMetadata", {}).get("RequestId"),
            model=self.model_id,
            message=Message.assistant([TextPart(text)]),
            finish_reason=(
                "length"
                if stop == "max_tokens"
                else "content_filter"
                if stop in ("content_filtered", "guardrail_intervened")
                else "stop"
            ),
            usage=Usage(
                input_tokens=usage.get("inputTokens"),
                output_tokens=usage.get("outputTokens"),
                total_tokens=usage.get("totalTokens"),
            ),
        )

    def close(self) -> None:
        return None


def bedrock_client(cfg: CaptionsSettings) -> Any:
    """A ``bedrock-runtime`` client from the configured profile/region or the default chain;
    one clear error naming the setting or variable when either is missing."""
    import boto3  # lazy: boto3 takes 0.12 s to import

    # botocore reads AWS_DEFAULT_REGION only; the AWS CLI and the SDKs of other languages read
    # AWS_REGION first, and the settings say so.
    region = cfg.bedrock.region or os.environ.get("AWS_REGION") or None
    try:
        session = boto3.Session(profile_name=cfg.bedrock.profile, region_name=region)
    except ProfileNotFound as exc:
        name = exc.kwargs.get("profile", cfg.bedrock.profile)
        where = "captions.bedrock.profile" if cfg.bedrock.profile else "AWS_PROFILE"
        raise ProviderError(
            f"the AWS profile '{name}' ({where}) is not in ~/.aws; fix the name, or unset it to "
            "use AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
        ) from None
    if not session.region_name:
        raise ProviderError(
            "captions.provider 'bedrock' needs a region: set captions.bedrock.region or AWS_REGION"
        )
    try:
        credentials = session.get_credentials()
    except BotoCoreError as exc:
        raise ProviderError(f"cannot read AWS credentials ({exc}); fix AWS_PROFILE or ~/.aws") from None
    if credentials is None:
        raise ProviderError(
            "captions.provider 'bedrock' found no AWS credentials; set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY (environment or .env), AWS_PROFILE, or captions.bedrock.profile"
        )
    frozen = credentials.get_frozen_credentials()
    for secret in (frozen.secret_key, frozen.token, frozen.access_key):
        register_secret(secret)  # a profile's keys are not in the environment
    boto = BotoConfig(
        retries={"total_max_attempts": 1, "mode": "standard"},
        read_timeout=cfg.timeout_s,
        connect_timeout=min(10.0, cfg.timeout_s),
        max_pool_connections=max(10, cfg.concurrency),
    )
    return session.client("bedrock-runtime", config=boto)


def _bedrock(cfg: CaptionsSettings, client: Any | None = None) -> DspyProvider:
    import dspy  # lazy: dspy takes 1.2 s to import

    client = client if client is not None else bedrock_client(cfg)
    engine = BedrockConverseEngine(client, cfg.bedrock.model_id)
    lm = dspy.LM(
        f"bedrock/{cfg.bedrock.model_id}",
        engine=engine,
        cache=False,
        num_retries=0,
        max_tokens=cfg.max_tokens,
        temperature=cfg.temperature,
    )
    return DspyProvider("bedrock", cfg.bedrock.model_id, lm, cfg, lambda: _probe_bedrock(client))


def _probe_bedrock(client: Any) -> None:
    """Does the Bedrock endpoint answer? Credentials and region are checked when the client is
    made; without this, an unreachable endpoint was asked for every frame (35 requests counted
    against ``captions.max_paid_requests``) before the stage stopped.

    Asked unsigned (AWS answers 403 "missing authentication token": it is there), so any HTTP
    status means yes; whether the keys are accepted shows at the first call, since a signed probe
    needs a permission of its own (``bedrock:ListFoundationModels``) that a key may lack. Sent
    through the client's own HTTP session, so its proxies, ``AWS_CA_BUNDLE`` and timeouts apply as
    to the real calls (urllib's certificate store refused an endpoint botocore reached)."""
    endpoint = client.meta.endpoint_url.rstrip("/") + "/"
    try:
        # botocore has no public "send this plain request"; its endpoint's session is what every
        # call of the client goes through.
        client._endpoint.http_session.send(AWSRequest(method="GET", url=endpoint).prepare())
    except BotoCoreError as exc:  # no connection, a proxy or TLS refused, a timeout
        raise ProviderError(
            f"cannot reach the caption server at {endpoint} ({exc}); check the network (and a proxy "
            "or AWS_CA_BUNDLE, where one is set) or fix captions.bedrock.region (or the endpoint your "
            f"AWS settings name); {FALLBACK_ADVICE}"
        ) from None


def make_provider(name: str, cfg: CaptionsSettings, *, bedrock: Any | None = None) -> Provider:
    """Build the provider ``name`` (keys read from the environment here, checked at once).
    ``bedrock``: an existing ``bedrock-runtime`` client (tests pass one with a Stubber)."""
    if name == "template":
        return TemplateProvider(cfg)

    load_dotenv_once()
    if name in ("openai", "local"):
        return _openai_like(name, cfg)
    if name == "anthropic":
        return _anthropic(cfg)
    if name == "bedrock":
        return _bedrock(cfg, bedrock)
    raise ConfigError(
        f"config error: captions.provider = {name!r}: unknown provider "
        "(allowed: template, bedrock, openai, anthropic, local)"
    )


def scaled_jpeg(raw: bytes, max_side: int, region: tuple[int, int, int, int] | None = None) -> bytes:
    """The JPEG bytes to send: the frame (its ``region`` only, when given: the picture without
    letterbox bars or a subtitle band) scaled to ``max_side`` on its long side (cost and speed).
    A file Pillow cannot decode raises ``OSError`` (``UnidentifiedImageError``)."""
    with Image.open(io.BytesIO(raw)) as img:
        img = img.convert("RGB")
        if region is not None and tuple(region) != (0, 0, *img.size):
            img = img.crop(region)
        if max(img.size) > max_side:
            img.thumbnail((max_side, max_side))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def load_dotenv_once() -> None:
    """Secrets may live in ``.env`` (the workspace's, then the working directory's); values already
    in the environment win. Nothing from it is ever written anywhere."""
    for folder in (workspace_root(), Path.cwd()):
        env = folder / ".env"
        if env.is_file():
            load_env_file(env)
