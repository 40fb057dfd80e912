"""Secrets a process knows, and taking them out of every text it stores or logs.

Keys reach this project through the environment (or ``.env``), an AWS profile, or a setting the
user typed (a key inside ``--set captions.local.base_url=https://user:KEY@host/v1?key=KEY``).
Whatever stores text (stage 05's tables and warnings) or logs it (the command line at the top of
every log file) passes it through :func:`redact` or :func:`redact_command` first. One module, so
the caption stage and the log know the same secrets.
"""

from __future__ import annotations

import base64
import os
import re
import threading
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

from dotenv import load_dotenv

from diffusion_bunny.errors import ConfigError
from diffusion_bunny.paths import PATH_VARIABLES, absolute_path_variables

REDACTED = "[redacted]"
#: Variables whose values are secrets whatever their name (provider keys, AWS credentials).
SECRET_VARIABLES = {
    "OPENAI_API_KEY",
    "ANTHROPIC_API_KEY",
    "LOCAL_LLM_API_KEY",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_ACCESS_KEY_ID",
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
}
_SECRET_NAME = re.compile(r"(KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL)", re.IGNORECASE)
#: Names of settings and URL query parameters whose values are secrets (``api_key``, ``token``,
#: ``sig``, ``X-Amz-Signature``, ``password``...).
_SECRET_FIELD = re.compile(r"(key|token|secret|passw|credential|signature|^sig$|auth)", re.IGNORECASE)
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"]+")
_extra_secrets: set[str] = set()
_extra_lock = threading.Lock()


def load_env_file(path: Path) -> None:
    """The variables of a ``.env`` file into the environment; those already set win. A file not
    in UTF-8 (a Windows editor's Latin-1 ``# clé API``) is one line naming it: it stopped every
    command with a ``UnicodeDecodeError`` as a bug. A folder or file it names relatively
    (``HF_HOME=hfcache``, :data:`~diffusion_bunny.paths.PATH_VARIABLES`) is under the file's own
    folder: the stages run elsewhere (the notebooks' folder) and read it there."""
    unset = [name for name in PATH_VARIABLES if not os.environ.get(name)]
    try:
        load_dotenv(path, override=False)
    except UnicodeDecodeError:
        raise ConfigError(
            f"config error: {path} is not UTF-8 text; save it as UTF-8 (it holds KEY=value lines)"
        ) from None
    absolute_path_variables(base=Path(path).parent, names=unset)


def register_secret(value: str | None) -> None:
    """Remember a secret read from somewhere other than the environment (an AWS profile's keys,
    a configured key variable), so :func:`redact` hides it too."""
    if value and len(value) >= 6:
        with _extra_lock:
            _extra_secrets.add(value)


def known_secrets() -> list[str]:
    """Every secret value this process knows: the provider and AWS variables, any variable whose
    name says key/token/secret/password, and what :func:`register_secret` was given. Longest
    first, so a secret containing another is hidden whole. Values under 6 characters are left
    alone (they would redact ordinary words)."""
    found = set()
    for name, value in os.environ.items():
        if (name in SECRET_VARIABLES or _SECRET_NAME.search(name)) and len(value.strip()) >= 6:
            found.add(value.strip())
    with _extra_lock:
        found |= _extra_secrets
    return sorted(found, key=len, reverse=True)


def redact(text: str | None) -> str | None:
    """``text`` with every known secret (also in base64, as in a Basic auth header) replaced by
    ``[redacted]``; applied to every string stage 05 stores (errors, warnings)."""
    if not text:
        return text
    for secret in known_secrets():
        if secret in text:
            text = text.replace(secret, REDACTED)
        encoded = base64.b64encode(secret.encode()).decode().rstrip("=")
        if len(encoded) >= 8 and encoded in text:
            text = text.replace(encoded, REDACTED)
    return text


def redact_url(url: str) -> str:
    """A URL without its secrets: the password of its user part (``https://user:KEY@host``, or
    a user part that is a key alone) and the values of query parameters named like a secret
    (``?key=``, ``&api_key=``, ``&sig=``)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    netloc = parts.netloc
    if "@" in netloc:
        user, _, host = netloc.rpartition("@")
        name, colon, _ = user.partition(":")
        netloc = f"{name}:{REDACTED}@{host}" if colon else f"{REDACTED}@{host}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(_SECRET_FIELD.search(k) for k, _ in pairs):
            query = "&".join(f"{k}={REDACTED if _SECRET_FIELD.search(k) else v}" for k, v in pairs)
    if netloc == parts.netloc and query == parts.query:
        return url
    rebuilt = f"{parts.scheme}://{netloc}{parts.path}"
    rebuilt += f"?{query}" if query else ""
    return rebuilt + (f"#{parts.fragment}" if parts.fragment else "")


def redact_urls(text: str) -> str:
    """``text`` with every URL in it through :func:`redact_url`."""
    return _URL.sub(lambda m: redact_url(m.group(0)), text)


def redact_command(args: Sequence[str]) -> str:
    """A command line fit for a log file: every URL through :func:`redact_url`, the value of a
    ``--set`` whose key names a secret (``captions.local.api_key=...``) replaced, and every
    secret the process knows (:func:`redact`). Applied before anything is logged, so a key typed
    on the command line never lands in a log."""
    out = []
    for arg in args:
        key, eq, value = arg.partition("=")
        if key == "--set" and value:  # ``--set=KEY=VALUE``: argparse takes it as ``--set KEY=VALUE``
            out.append(f"--set={redact_command([value])}")
            continue
        name = key.rsplit(".", 1)[-1]
        # A setting that holds a secret; a ``..._env`` one holds a variable's name, not its value.
        if (
            eq
            and not key.startswith("-")
            and "." in key
            and _SECRET_FIELD.search(name)
            and not name.endswith("_env")
        ):
            arg = f"{key}={REDACTED}"
        arg = redact_urls(arg)
        out.append(redact(arg) or arg)
    return " ".join(out)
