"""Stage 05's settings (``captions``): the providers, how hard they may be called, the template.

Read by the configuration (:mod:`diffusion_bunny.config`) on every command, so it imports
nothing heavier than pydantic.
"""

from __future__ import annotations

import re
from typing import Literal
from urllib.parse import parse_qsl, urlsplit

from pydantic import Field, field_validator, model_validator

from diffusion_bunny.section import Section

#: Query parameters that hold a key: a name whose last word is a key's (``api_key``, ``x-api-key``,
#: ``api_token``, ``X-Amz-Security-Token``, ``auth``, ``sig``); ``?tokenizer=``, ``?auth_mode=``
#: and ``?api-version=`` hold none.
_KEY_PARAMETER = re.compile(
    r"(?:^|[-_.])(?:api)?(?:key|token|secret|password|passwd|pwd|sig|signature|auth|credential)s?$",
    re.IGNORECASE,
)


def _usable_base_url(value: str | None) -> str | None:
    """A base URL must be one (``http(s)://host[:port]/...``: a typo such as ``http//host`` reached
    urllib inside the stage and ended as a bug report) and must not carry a key, as ``user:token@``
    or as a query parameter that holds one (``?api_key=``): the URL is written into the run's
    settings, manifests and notebook parameters. Keys belong in the environment (or ``.env``).
    The key checks come first, on the text as typed: a URL refused for its form is repeated in
    the error (and the log), and a key in a mistyped one was printed with it."""
    if not value:
        return value
    address = value.split("#")[0]
    # The authority alone: an "@" in the path (``/models/m@2024``) is no user part.
    scheme, sep, rest = address.partition("://")
    authority = (rest if sep else scheme).split("/")[0].split("?")[0]
    if "@" in authority:
        raise ValueError(
            "must not carry credentials (user:token@host); remove them and put the key in the "
            "environment or .env (the provider's key variable)"
        )
    query = address.partition("?")[2]
    secret = [k for k, _ in parse_qsl(query, keep_blank_values=True) if _KEY_PARAMETER.search(k)]
    if secret:
        raise ValueError(
            f"must not carry a key in its query ({', '.join(secret)}); remove it and put the key in "
            "the environment or .env (the provider's key variable)"
        )
    try:
        parts = urlsplit(value)
        _ = parts.port  # raises on a port that is not a number
    except ValueError as exc:
        raise ValueError(f"is not a usable URL ({exc}); write it as http://HOST:PORT/PATH") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL with a host (e.g. http://127.0.0.1:8000/v1)")
    return value


class OpenAIProviderSettings(Section):
    """The OpenAI chat API (key in ``OPENAI_API_KEY``)."""

    model: str = "gpt-4o-mini"
    base_url: str | None = None

    _base_url_clean = field_validator("base_url")(classmethod(lambda cls, v: _usable_base_url(v)))


class AnthropicProviderSettings(Section):
    """The Anthropic messages API (key in ``ANTHROPIC_API_KEY``)."""

    model: str = "claude-3-5-haiku-latest"
    base_url: str | None = None

    _base_url_clean = field_validator("base_url")(classmethod(lambda cls, v: _usable_base_url(v)))


class LocalProviderSettings(Section):
    """Any OpenAI-compatible server (vLLM, Ollama, llama.cpp, LM Studio) at ``base_url``."""

    model: str = "qwen2.5-vl-7b-instruct"
    base_url: str = "http://127.0.0.1:8000/v1"
    api_key_env: str = "LOCAL_LLM_API_KEY"

    _base_url_clean = field_validator("base_url")(classmethod(lambda cls, v: _usable_base_url(v)))


class BedrockProviderSettings(Section):
    """AWS Bedrock's Converse API through boto3 (credentials from the environment or a profile)."""

    model_id: str = "anthropic.claude-3-5-sonnet-20240620-v1:0"
    region: str | None = None
    profile: str | None = None


#: The caption providers (``template`` writes offline; the others are paid or local services).
Provider = Literal["template", "bedrock", "openai", "anthropic", "local"]
#: The failed answers a run may ask again (``captions.retry``).
Retriable = Literal["empty", "refused", "truncated", "unparsable", "unreadable"]


class CaptionsSettings(Section):
    """Settings of stage 05 (``captions``): which provider writes the captions, how hard it may be
    called, and how the offline template describes a frame."""

    provider: Provider = "template"
    fallback: list[Provider] = Field(default_factory=list)
    trigger_word: str = Field("bunnystyle", min_length=1, max_length=64)
    frames: Literal["kept", "all"] = "kept"
    concurrency: int = Field(4, ge=1, le=256)
    requests_per_minute: float = Field(60.0, gt=0.0, le=100_000.0)
    timeout_s: float = Field(60.0, gt=0.0, le=3600.0)
    max_retries: int = Field(4, ge=0, le=20)
    backoff_base_s: float = Field(1.0, ge=0.0, le=600.0)
    backoff_max_s: float = Field(30.0, ge=0.0, le=3600.0)
    breaker_failures: int = Field(5, ge=1, le=10_000)
    breaker_cooldown_s: float = Field(60.0, ge=0.0, le=86_400.0)
    max_tokens: int = Field(300, ge=16, le=8192)
    temperature: float = Field(0.2, ge=0.0, le=2.0)
    retry: list[Retriable] = Field(default_factory=list)
    max_paid_requests: int = Field(10_000, ge=0, le=10_000_000)
    image_max_side: int = Field(768, ge=64, le=4096)
    cache: bool = True
    cache_dir: str | None = None
    close_up_ratio: float = Field(0.3, gt=0.0, le=1.0)
    medium_ratio: float = Field(0.12, gt=0.0, le=1.0)
    dark_below: float = Field(60.0, ge=0.0, le=255.0)
    bright_above: float = Field(180.0, ge=0.0, le=255.0)
    scene_names: dict[str, str] = Field(default_factory=dict)
    #: What a character is, said after its name in the template's captions ("a cartoon dog").
    character_descriptions: dict[str, str] = Field(default_factory=dict)
    openai: OpenAIProviderSettings = OpenAIProviderSettings()
    anthropic: AnthropicProviderSettings = AnthropicProviderSettings()
    local: LocalProviderSettings = LocalProviderSettings()
    bedrock: BedrockProviderSettings = BedrockProviderSettings()

    @field_validator("scene_names", "character_descriptions")
    @classmethod
    def _one_line(cls, value: dict[str, str]) -> dict[str, str]:
        """Each text on one line, its spaces single: a YAML block (``>`` or ``|``) ends in a line
        break, which went into every template caption, and kohya reads a caption's first line
        only (the framing, motion, light and scene after it were lost)."""
        return {name: " ".join(text.split()) for name, text in value.items()}

    @field_validator("trigger_word")
    @classmethod
    def _one_token(cls, value: str) -> str:
        if not value.strip() or value != value.strip():
            raise ValueError("must be a word without leading or trailing spaces")
        return value

    @model_validator(mode="after")
    def _orders(self) -> CaptionsSettings:
        if self.medium_ratio >= self.close_up_ratio:
            raise ValueError(
                f"medium_ratio ({self.medium_ratio}) must be under close_up_ratio ({self.close_up_ratio})"
            )
        if self.dark_below >= self.bright_above:
            raise ValueError(
                f"dark_below ({self.dark_below}) must be under bright_above ({self.bright_above})"
            )
        if self.backoff_max_s < self.backoff_base_s:
            raise ValueError(
                f"backoff_max_s ({self.backoff_max_s}) must be at least backoff_base_s "
                f"({self.backoff_base_s})"
            )
        return self

    def chain(self) -> list[str]:
        """The providers in the order they are tried: the chosen one, then the fallbacks."""
        out: list[str] = []
        for name in [self.provider, *self.fallback]:
            if name not in out:
                out.append(name)
        return out
