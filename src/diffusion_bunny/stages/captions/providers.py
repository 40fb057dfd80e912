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
that sends the rest of the run to the next provider, and a disk cache (:class:`CaptionCache`,
diskcache/SQLite) keyed by image hash, prompt version, provider, model and the prompt's inputs.
Every answer is in the cache before the next request starts, so a rerun or a resume after a kill
never pays for the same frame twice. Secrets are read from the environment (or ``.env``) when a
provider is built and handed straight to the client; they are never stored on this side.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import random
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

from diffusion_bunny.config import CaptioningConfig
from diffusion_bunny.errors import ConfigError, ProviderError
from diffusion_bunny.stages.captions.facts import template_caption

# dspy is imported only through this module (lazily); at first use it would fetch litellm's model
# cost map over the network. Keep it offline.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

# The prompt. Changing any of these texts changes PROMPT_VERSION, hence every cache key, so a new
# prompt is asked again instead of answered from the cache of the old one.
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
PROMPT_VERSION = (
    "v1-"
    + hashlib.sha256(json.dumps([INSTRUCTIONS, FIELD_DESCRIPTIONS], sort_keys=True).encode()).hexdigest()[:8]
)

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


def short_error(exc: BaseException) -> str:
    """One line for the table: the exception's class and the first line of its message."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}"[:300]


# ---------------------------------------------------------------------------------------------
# Rate limit, backoff, circuit breaker


class RateLimiter:
    """A token bucket: ``per_minute`` requests a minute, bursts up to ``burst``. Thread-safe.

    Written here because the clients we use have none (dspy's engine and boto3 leave pacing to
    the caller) and one small bucket shared by all worker threads is all that is needed."""

    def __init__(
        self,
        per_minute: float,
        burst: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.rate = per_minute / 60.0
        self.capacity = float(max(1, burst))
        self.tokens = self.capacity
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
                if self.tokens >= 1.0:
                    self.tokens -= 1.0
                    return waited
                need = (1.0 - self.tokens) / self.rate
            self.sleep(need)
            waited += need


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Full-jitter exponential backoff: uniform in [0, min(cap, base * 2**attempt)] (the AWS
    architecture blog's recommendation: it spreads retries of many workers apart best)."""
    return rng.uniform(0.0, min(cap, base * (2.0**attempt)))


class CircuitBreaker:
    """Opens after ``threshold`` frames in a row failed on a provider (or at once when the
    provider refuses the key or the model); an open circuit stays open for the rest of the run,
    and the frames go to the next provider of the chain."""

    def __init__(self, threshold: int):
        self.threshold = threshold
        self.failures = 0
        self.open = False
        self.reason = ""
        self.lock = threading.Lock()

    def success(self) -> None:
        with self.lock:
            self.failures = 0

    def failure(self, reason: str, *, fatal: bool = False) -> None:
        with self.lock:
            self.failures += 1
            if fatal or self.failures >= self.threshold:
                if not self.open:
                    self.reason = reason
                self.open = True


# ---------------------------------------------------------------------------------------------
# Disk cache


class CaptionCache:
    """Answers of paid providers on disk (diskcache: SQLite, safe across threads and processes,
    each ``set`` committed before it returns, so a kill right after loses nothing)."""

    def __init__(self, directory: str | Path):
        import diskcache

        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._cache = diskcache.Cache(str(self.directory))

    @staticmethod
    def key(
        image_sha: str,
        provider: str,
        model: str,
        facts: dict[str, Any],
        trigger_word: str,
        max_side: int = 768,
    ) -> str:
        """Image hash + the size it is sent at + prompt version + provider + model + the prompt's
        other inputs (a frame sent larger is another question)."""
        chars = ",".join(sorted(facts.get("characters") or []))
        return f"{PROMPT_VERSION}|{provider}|{model}|{image_sha}@{max_side}|{chars}|{trigger_word}"

    def get(self, key: str) -> dict[str, Any] | None:
        value = self._cache.get(key)
        return dict(value) if isinstance(value, dict) else None

    def set(self, key: str, value: dict[str, Any]) -> None:
        self._cache.set(key, value)

    def __len__(self) -> int:
        return len(self._cache)

    def close(self) -> None:
        self._cache.close()


# ---------------------------------------------------------------------------------------------
# Providers


class TemplateProvider:
    """The offline default: a caption assembled from the tables (never fails, costs nothing)."""

    name = "template"
    model = "template-v1"
    paid = False

    def __init__(self, cfg: CaptioningConfig):
        self.cfg = cfg

    def preflight(self) -> None:
        return None

    def caption(self, image: bytes, facts: dict[str, Any]) -> CaptionResult:
        text, tags = template_caption(facts, self.cfg)
        return CaptionResult(text, tags)


def caption_signature() -> type:
    """The dspy Signature every LLM provider answers (built lazily: dspy is only imported when
    an LLM provider is used)."""
    import dspy

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


def _usage(prediction: Any) -> tuple[int | None, int | None]:
    usage = prediction.get_lm_usage() or {}
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
    answer that forgot it gets it prepended rather than being thrown away."""
    text = " ".join(caption.split())
    if text.lower().startswith(trigger.lower()):
        return text
    return f"{trigger}, {text}"


class DspyProvider:
    """An LLM provider: one dspy LM (no dspy cache, no dspy retries: both are ours) and the
    caption Signature."""

    paid = True

    def __init__(self, name: str, model: str, lm: Any, cfg: CaptioningConfig, preflight: Callable[[], None]):
        import dspy

        self.name = name
        self.model = model
        self.lm = lm
        self.cfg = cfg
        self._preflight = preflight
        self.predict = dspy.Predict(caption_signature())

    def preflight(self) -> None:
        self._preflight()

    def caption(self, image: bytes, facts: dict[str, Any]) -> CaptionResult:
        import dspy

        # No JSON-adapter fallback: it would send a second (paid) request behind our back when an
        # answer does not parse; a bad answer is one failed attempt, counted and logged as such.
        adapter = dspy.ChatAdapter(use_json_adapter_fallback=False)
        with dspy.context(lm=self.lm, adapter=adapter, track_usage=True):
            pred = self.predict(
                # A data URI is sent as it is; raw bytes would be decoded and re-encoded by dspy.
                image=dspy.Image("data:image/jpeg;base64," + base64.b64encode(image).decode()),
                characters=list(facts.get("characters") or []),
                trigger_word=self.cfg.trigger_word,
            )
        caption = str(pred.caption or "").strip()
        if not caption:
            raise ValueError("the answer had an empty caption")
        tags = [str(t).strip() for t in (pred.tags or []) if str(t).strip()]
        inp, out = _usage(pred)
        return CaptionResult(_with_trigger(caption, self.cfg.trigger_word), tags, inp, out)


def _probe_http(url: str, setting: str, headers: dict[str, str], timeout: float) -> None:
    """Is anything answering at ``url``? Any HTTP status means yes, except 401/403: the key is
    refused. A refused connection, unknown host or timeout is the one clear error."""
    request = urllib.request.Request(url, headers=headers, method="GET")
    try:
        with urllib.request.urlopen(request, timeout=timeout):
            return
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            raise ProviderError(
                f"{setting}: the server at {urlparse(url).netloc} refused the key (HTTP {exc.code}); "
                "check the key in the environment or .env"
            ) from None
        return
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ProviderError(
            f"cannot reach the caption server at {url} ({reason}); start it or fix {setting} "
            "(or choose another captioning.provider)"
        ) from None


def _require_key(provider: str, variable: str) -> str:
    value = os.environ.get(variable, "").strip()
    if not value:
        raise ProviderError(
            f"captioning.provider '{provider}' needs the environment variable {variable}; set it in the "
            "environment or in .env at the workspace root (never in a config file or notebook)"
        )
    return value


def _dspy_lm(model: str, cfg: CaptioningConfig, key: str, base: str | None) -> Any:
    """A dspy LM on dspy's own HTTP engine, without dspy's cache or retries (both are ours)."""
    import dspy

    kwargs: dict[str, Any] = {"api_key": key, "timeout": cfg.timeout_s}
    if base:
        kwargs["api_base"] = base
    return dspy.LM(
        model, cache=False, num_retries=0, max_tokens=cfg.max_tokens, temperature=cfg.temperature, **kwargs
    )


def _openai_like(name: str, cfg: CaptioningConfig) -> DspyProvider:
    if name == "openai":
        key = _require_key(name, KEY_VARIABLES[name])
        model, base = cfg.openai.model, cfg.openai.base_url
        setting = "captioning.openai.base_url"
        probe_base = (base or "https://api.openai.com/v1").rstrip("/")
    else:
        key = os.environ.get(cfg.local.api_key_env, "").strip() or "not-needed"
        model, base = cfg.local.model, cfg.local.base_url
        setting = "captioning.local.base_url"
        probe_base = base.rstrip("/")
    if not model:
        raise ConfigError(f"config error: captioning.{name}.model is empty; name the model to ask")
    lm = _dspy_lm(f"openai/{model}", cfg, key, base)

    def preflight() -> None:
        _probe_http(
            f"{probe_base}/models", setting, {"Authorization": f"Bearer {key}"}, min(10.0, cfg.timeout_s)
        )

    return DspyProvider(name, model, lm, cfg, preflight)


def _anthropic(cfg: CaptioningConfig) -> DspyProvider:
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
            "captioning.anthropic.base_url",
            {"x-api-key": key, "anthropic-version": "2023-06-01"},
            min(10.0, cfg.timeout_s),
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
        from dspy.lm15 import Message, Response, TextPart, Usage

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
            finish_reason="length" if stop == "max_tokens" else "stop",
            usage=Usage(
                input_tokens=usage.get("inputTokens"),
                output_tokens=usage.get("outputTokens"),
                total_tokens=usage.get("totalTokens"),
            ),
        )

    def close(self) -> None:
        return None


def bedrock_client(cfg: CaptioningConfig) -> Any:
    """A ``bedrock-runtime`` client from the configured profile/region or the default chain;
    one clear error naming the setting or variable when either is missing."""
    import boto3
    from botocore.config import Config as BotoConfig
    from botocore.exceptions import BotoCoreError, ProfileNotFound

    try:
        session = boto3.Session(profile_name=cfg.bedrock.profile, region_name=cfg.bedrock.region)
    except ProfileNotFound:
        raise ProviderError(
            f"the AWS profile '{cfg.bedrock.profile}' (captioning.bedrock.profile) is not in ~/.aws; "
            "fix the name or set it to null to use AWS_ACCESS_KEY_ID / AWS_PROFILE"
        ) from None
    if not session.region_name:
        raise ProviderError(
            "captioning.provider 'bedrock' needs a region: set captioning.bedrock.region or AWS_REGION"
        )
    try:
        credentials = session.get_credentials()
    except BotoCoreError as exc:
        raise ProviderError(f"cannot read AWS credentials ({exc}); fix AWS_PROFILE or ~/.aws") from None
    if credentials is None:
        raise ProviderError(
            "captioning.provider 'bedrock' found no AWS credentials; set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY (environment or .env), AWS_PROFILE, or captioning.bedrock.profile"
        )
    boto = BotoConfig(
        retries={"total_max_attempts": 1, "mode": "standard"},
        read_timeout=cfg.timeout_s,
        connect_timeout=min(10.0, cfg.timeout_s),
        max_pool_connections=max(10, cfg.concurrency),
    )
    return session.client("bedrock-runtime", config=boto)


def _bedrock(cfg: CaptioningConfig, client: Any | None = None) -> DspyProvider:
    import dspy

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
    # Credentials and region are checked when the client is made; the endpoint itself is only
    # known to answer at the first call (a dropped connection there is retried, then opens the
    # circuit), since probing AWS needs a signed request of its own.
    return DspyProvider("bedrock", cfg.bedrock.model_id, lm, cfg, lambda: None)


def make_provider(name: str, cfg: CaptioningConfig, *, bedrock: Any | None = None) -> Provider:
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
        f"config error: captioning.provider = {name!r}: unknown provider "
        "(allowed: template, bedrock, openai, anthropic, local)"
    )


def scaled_jpeg(raw: bytes, max_side: int) -> bytes:
    """The JPEG bytes to send: the frame scaled to ``max_side`` on its long side (cost and speed).
    A file Pillow cannot decode raises ``OSError`` (``UnidentifiedImageError``)."""
    from PIL import Image

    with Image.open(io.BytesIO(raw)) as img:
        img = img.convert("RGB")
        if max(img.size) > max_side:
            img.thumbnail((max_side, max_side))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def load_dotenv_once() -> None:
    """Secrets may live in ``.env`` (the workspace's, then the working directory's); values already
    in the environment win. Nothing from it is ever written anywhere."""
    from dotenv import load_dotenv

    from diffusion_bunny.config import workspace_root

    for folder in (workspace_root(), Path.cwd()):
        env = folder / ".env"
        if env.is_file():
            load_dotenv(env, override=False)
