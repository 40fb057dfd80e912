"""Models from the Hugging Face hub: from the local cache when they are there,
downloaded with a progress bar when they are not and the hub can be reached, and one line naming
the id (and the setting to change) when neither works.

``HF_HUB_OFFLINE=1`` is honoured: nothing is asked of the network, and a model missing from the
cache is that one line. Only the files a loader reads are fetched (:data:`DIFFUSERS_FILES`,
:data:`TRANSFORMERS_FILES`): a Stable Diffusion repository also holds fp16 and EMA variants and
single-file checkpoints several times the size of what diffusers loads.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
from pathlib import Path

import huggingface_hub

from diffusion_bunny.errors import ModelError
from diffusion_bunny.logs import relay_bar_class, say

#: What a hub id looks like (``owner/name``), as opposed to a path.
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")

#: A diffusers pipeline folder: its index, each component's config and tokenizer files, and the
#: full-precision safetensors weights (sharded or not), no variants.
DIFFUSERS_FILES = [
    "model_index.json",
    "*/*.json",
    "*/*.txt",
    "*/*.model",
    "*/diffusion_pytorch_model.safetensors",
    "*/diffusion_pytorch_model-*.safetensors",
    "*/model.safetensors",
    "*/model-*.safetensors",
]
#: Never fetched: the weights of a pipeline's safety checker (1.2 GB for Stable Diffusion 1.5),
#: which the loader does not read (``safety_checker=None``) and ``*/model.safetensors`` selects.
IGNORED_FILES = ["safety_checker/*.safetensors", "safety_checker/*.bin"]
#: A transformers model folder (CLIP): configs, tokenizer files and safetensors weights.
TRANSFORMERS_FILES = ["*.json", "*.txt", "*.model", "model.safetensors", "model-*.safetensors"]
#: Weights in PyTorch's own format, fetched only for a repository without safetensors (an older
#: one holds ``pytorch_model.bin`` alone: it was never fetched, and failed to load on every run);
#: a repository with both keeps to its safetensors, the same weights at half the download.
BIN_FILES = [
    "pytorch_model.bin",
    "pytorch_model-*.bin",
    "*/pytorch_model.bin",
    "*/pytorch_model-*.bin",
    "*/diffusion_pytorch_model.bin",
    "*/diffusion_pytorch_model-*.bin",
]


def offline() -> str | None:
    """The variable that forbids the network (``HF_HUB_OFFLINE``, or ``TRANSFORMERS_OFFLINE``,
    which huggingface_hub honours too), set to a true value; None when neither is."""
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}:
            return name
    return None


def cached(repo_id: str, patterns: list[str] | None = None) -> Path | None:
    """The cached snapshot folder of ``repo_id`` holding every file ``patterns`` selects, or None;
    never touches the network.

    The patterns must be the ones the download used: huggingface_hub keeps the repository's tree
    listing beside the snapshot and, asked for the whole repository, calls a snapshot that
    :func:`download` fetched with ``allow_patterns`` incomplete (the fp16 variants and single-file
    checkpoints were left out on purpose), so under ``HF_HUB_OFFLINE=1`` a model ``bunny`` had
    downloaded was refused. A download cut short (a selected file missing) is still refused."""
    from huggingface_hub import snapshot_download  # lazy: snapshot_download takes 0.15 s to import

    try:
        folder = Path(
            snapshot_download(
                repo_id, local_files_only=True, allow_patterns=patterns, ignore_patterns=IGNORED_FILES
            )
        )
    except Exception:  # not cached, a cache entry without a snapshot, or an incomplete one
        return None
    return folder if weights_complete(folder) else None


#: Parts of a diffusers pipeline the loader never reads (``safety_checker=None``): their weights
#: are neither fetched nor expected.
UNREAD_PARTS = ("safety_checker", "feature_extractor")


def weights_complete(folder: Path) -> bool:
    """Whether a cached snapshot holds weights for every model in it: each part
    ``model_index.json`` names is there, and has its ``.safetensors`` where it has a model's
    ``config.json`` (a transformers model: at its root). huggingface_hub can tell a snapshot
    cut short only from the repository's tree listing, which a file fetched on its own
    (``hf download ID model_index.json``) or an older hub's cache lacks: such a folder was
    taken as whole, never downloaded again, and failed to load on every run."""
    index = folder / "model_index.json"
    if not index.is_file():  # a transformers model: its weights beside its config
        return not (folder / "config.json").is_file() or _has_weights(folder)
    try:
        parts = json.loads(index.read_text())
    except (OSError, ValueError):
        return False
    # Only the parts the index names: a repository's other folders (SDXL's ONNX exports
    # vae_decoder/ and vae_encoder/, a config and a model.onnx) are no part the loader reads.
    for name, value in parts.items():
        wanted = isinstance(value, list) and value and value[0] is not None and not name.startswith("_")
        if not wanted or name in UNREAD_PARTS:
            continue
        part = folder / name
        if not part.is_dir() or ((part / "config.json").is_file() and not _has_weights(part)):
            return False
    return True


def _has_weights(folder: Path) -> bool:
    """Whether ``folder`` holds its weights whole, as safetensors or (an older repository's only
    ones) ``*pytorch_model*.bin``: one file, or every shard its index lists (a download cut short
    in the last shard was taken as whole, and every run failed on the missing shard)."""
    for suffix in (".safetensors", ".bin"):
        for index in folder.glob(f"*{suffix}.index.json"):
            try:
                shards = set(json.loads(index.read_text())["weight_map"].values())
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                return False
            if not all((folder / shard).is_file() for shard in shards):
                return False
    return any(folder.glob("*.safetensors")) or any(folder.glob("*pytorch_model*.bin"))


def snapshot_hint(folder: str | Path, exc: BaseException) -> str:
    """For a model that failed to load from ``folder`` with ``exc``: when it is a snapshot in the
    Hugging Face cache, the folder to delete so the next run downloads it again. A cached file
    can be cut short (a copy of the cache stopped midway, a full disk) and the cache is never
    checked file by file: the same damaged copy failed on every run, and the message named only
    the setting. Empty for a folder of the user's own, and for a plain ``ValueError`` (the model
    is of another kind, or lacks a tokenizer: downloaded again, it would be the same)."""
    path = Path(folder)
    repo = next((p for p in path.parents if p.name.startswith("models--")), None)
    if repo is None or path.parent.name != "snapshots" or type(exc) is ValueError:
        return ""
    return (
        f"; if its cached copy is damaged (a download or a copy cut short), delete {repo} to fetch it again"
    )


def hub_model(repo_id: str, setting: str, patterns: list[str], *, instead: str) -> Path:
    """The local folder of hub model ``repo_id``: the cached snapshot, else downloaded now with a
    progress bar. ``setting`` is the config key the one-line errors name; ``instead`` says what
    else it may be set to."""
    found = cached(repo_id, patterns) or cached(repo_id, patterns + BIN_FILES)
    if found is not None:
        return found
    variable = offline()
    if variable is not None:
        raise ModelError(
            f"{setting} = {repo_id!r} is not in the local Hugging Face cache "
            f"({huggingface_hub.constants.HF_HUB_CACHE}) and {variable}=1 forbids downloading it; unset "
            f"{variable} to download it, or set {setting} to {instead}"
        )
    return download(repo_id, setting, patterns, instead=instead)


def download(repo_id: str, setting: str, patterns: list[str], *, instead: str) -> Path:
    """Download the files of ``repo_id`` a loader needs into the Hugging Face cache, with a
    progress bar (tqdm, as every long loop here); a hub that cannot be reached, an unknown or
    gated id is one :class:`ModelError` naming the id."""
    say(
        logging.getLogger(__name__),
        f"{setting} = {repo_id!r} is not in the local Hugging Face cache: downloading it "
        f"(into {huggingface_hub.constants.HF_HUB_CACHE})",
    )
    try:
        # The bars are relayed to the terminal of `bunny run` (a stage's kernel has none of its own).
        folder = huggingface_hub.snapshot_download(
            repo_id, allow_patterns=patterns, ignore_patterns=IGNORED_FILES, tqdm_class=relay_bar_class()
        )
        if not weights_complete(Path(folder)):  # no safetensors there: its .bin weights
            folder = huggingface_hub.snapshot_download(
                repo_id,
                allow_patterns=patterns + BIN_FILES,
                ignore_patterns=IGNORED_FILES,
                tqdm_class=relay_bar_class(),
            )
    except Exception as exc:  # every failure here means "not to be had": say which, in one line
        if getattr(exc, "errno", None) in _CACHE_ERRNOS:  # the cache, not the hub or the id
            raise ModelError(
                f"{setting} = {repo_id!r} could not be downloaded: the Hugging Face cache "
                f"{huggingface_hub.constants.HF_HUB_CACHE} cannot be written ({_reason(exc)}); make it "
                "writable or free space there, or point HF_HOME (or HF_HUB_CACHE) at a folder that is"
            ) from None
        raise ModelError(
            f"{setting} = {repo_id!r} is not in the local Hugging Face cache and could not be downloaded "
            f"({_reason(exc)}); check the id and the network (a gated model needs `hf auth login`), or "
            f"set {setting} to {instead}"
        ) from None
    return Path(folder)


#: Errors of the cache's own folder (its permissions, a file in its path, a full or read-only disk).
_CACHE_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.ENOSPC}


def short_reason(exc: BaseException, limit: int = 200) -> str:
    """``exc``'s text on one line (its class name when it has none), cut at a word to at most
    ``limit`` characters: a library's reason inside one of our lines (a loader's, a download's)
    was cut mid-word ("...we cannot find the appropriate sna...")."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if len(text) <= limit:
        return text
    cut = text[: limit - 3]
    return (cut.rsplit(" ", 1)[0] if " " in cut else cut) + "..."


def _reason(exc: BaseException) -> str:
    name = type(exc).__name__
    if name in ("RepositoryNotFoundError", "RevisionNotFoundError"):
        return "no such model on the hub, or it is private"
    if name == "GatedRepoError":
        return "a gated model: accept its licence on the hub and log in"
    text = short_reason(exc, 160) if str(exc).strip() else ""
    return f"{name}: {text}" if text else name
