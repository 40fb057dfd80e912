"""Stage 07's outputs as stage 08 and the report rely on them: the ``training_log``,
``training_validation`` and ``loras`` tables and the folders of LoRA files (``<run>/loras/<name>/``,
or under ``train.output_dir``: one folder per training, named by what it trains)."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl

from diffusion_bunny.models.diffusion import LORA_FILE
from diffusion_bunny.paths import workspace_root
from diffusion_bunny.pipeline.atomic import atomic_write_bytes
from diffusion_bunny.stages.train.settings import TrainSettings

if TYPE_CHECKING:
    from diffusion_bunny.stages.train.settings import TrainSettings


TRAINING_LOG_SCHEMA = {
    "step": pl.Int64,
    "loss": pl.Float64,
    "lr": pl.Float64,
    "epoch": pl.Int64,
    "elapsed_s": pl.Float64,
    "prior_loss": pl.Float64,
}
VALIDATION_SCHEMA = {
    "step": pl.Int64,
    "index": pl.Int64,
    "prompt": pl.Utf8,
    "seed": pl.Int64,
    "path": pl.Utf8,
}


#: The run folder's own folder of LoRAs (when ``train.output_dir`` is not set).
LORAS_DIR = "loras"


def checkpoint_dir(run_dir: Path, cfg: TrainSettings) -> Path:
    """Where a run's LoRAs are kept: ``train.output_dir`` (relative to the workspace unless
    absolute), else ``<run>/loras/``; one folder per training inside (:func:`lora_folder`).

    Why in the run folder by default, not in the workspace's ``checkpoint/``: with ``--engine
    ray`` on several machines each node has its own workspace, so LoRAs trained there stayed on
    that node and a rerun from the head trained again for hours; the run folder is the one place
    every node must see. A ``train.output_dir`` on shared storage may hold the LoRAs of many
    runs side by side: their folders are named by content (:func:`lora_folder_name`), so two run
    folders with one name never collide, and the same training of the same data is shared."""
    if cfg.output_dir:
        out = Path(cfg.output_dir).expanduser()
        return out if out.is_absolute() else workspace_root() / out
    return Path(run_dir) / LORAS_DIR


def legacy_checkpoint_dir(run_dir: Path) -> Path:
    """Where LoRAs were kept before they moved into the run folder: ``checkpoint/<run folder
    name>/`` in the workspace (read by nothing; stage 07 only says they are there)."""
    return workspace_root() / "checkpoint" / Path(run_dir).name


# ---------------------------------------------------------------------------------------------
# One folder per training, named by what it trains

#: What a LoRA folder records about the training it holds.
TRAINING_FILE = "training.json"
STATE_FILE = "training_state.pt"
_VERSION = re.compile(r"^v(\d+)$")

LORAS_SCHEMA = {
    "name": pl.Utf8,
    "folder": pl.Utf8,
    "lora_path": pl.Utf8,
    "kohya_path": pl.Utf8,
    "steps": pl.Int64,
    "base_model": pl.Utf8,
    "resume_key": pl.Utf8,
    "created": pl.Utf8,
    "settings": pl.Utf8,
    "current": pl.Boolean,
}


def lora_folders(base: Path) -> list[tuple[Path, dict[str, Any]]]:
    """``(folder, training.json)`` of every LoRA folder under ``base``, oldest first (a folder
    without a readable ``training.json`` is not one of ours and is left alone). Holds the folders
    named by content and the ``v<n>/`` ones of earlier versions."""
    out = []
    if Path(base).is_dir():
        for child in Path(base).iterdir():
            if not child.is_dir() or child.name.startswith("."):
                continue
            try:
                info = json.loads((child / TRAINING_FILE).read_text())
            except (OSError, ValueError):
                continue
            if isinstance(info, dict):
                out.append((child, info))
    return sorted(out, key=lambda f: (str(f[1].get("created") or ""), f[0].name))


def _slug(text: str, limit: int = 40) -> str:
    """A file-name-safe short form of a base model's name (the last part of a hub id or path)."""
    tail = re.split(r"[/\\]", str(text).rstrip("/\\"))[-1] or "model"
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", tail).strip("-.") or "model"
    return slug[:limit]


def lora_folder_name(cfg: TrainSettings, key: str) -> str:
    """``<base model>-<steps>steps-<key>``: readable, and named by what it holds (``key``: the
    settings that change a step, the data and ``max_train_steps``, :func:`lora_key`), never by the
    run folder's name."""
    return f"{_slug(cfg.base_model)}-{cfg.max_train_steps}steps-{key[:12]}"


def lora_key(resume_key: str, max_train_steps: int) -> str:
    """The key of one training's LoRA folder: its resume key (settings that change what a step
    computes + the data) and its ``max_train_steps``. The steps are in it so a longer training
    never replaces the final LoRA of a shorter one (it continues from that one's last checkpoint
    in a folder of its own, :func:`resumable_folders`)."""
    return hashlib.sha256(f"{resume_key}|steps={max_train_steps}".encode()).hexdigest()[:16]


def lora_folder(
    base: Path, key: str | Sequence[str], name: str, describe: dict[str, Any]
) -> tuple[Path, bool]:
    """The LoRA folder of the training ``key`` (:func:`lora_key`; several: the key of today
    first, then the one the same training had before) under ``base``: the existing one whose
    ``training.json`` holds one of them, today's first (a rerun resumes there), else a new folder
    ``name`` with the first (returned with True). A folder found under an earlier key is given
    today's, its earlier resume keys kept (``earlier_keys``, which its checkpoints carry): found
    under the old key alone, it was lost again as soon as a setting that no longer counts moved
    back. Nothing is ever deleted here: a retrain with other settings, more steps or one edited
    caption gets a folder of its own; only ``train.start_over`` empties one."""
    keys = [key] if isinstance(key, str) else list(key)
    folders = lora_folders(base)
    for wanted in keys:
        for folder, info in folders:
            if info.get("lora_key") == wanted:
                if wanted != keys[0]:
                    _adopt(folder, info, keys[0], describe)
                return folder, False
    key = keys[0]
    folder = Path(base) / name
    folder.mkdir(parents=True, exist_ok=True)
    info = {"lora_key": key, "created": datetime.now(UTC).isoformat(timespec="microseconds")}
    atomic_write_bytes(folder / TRAINING_FILE, json.dumps({**info, **describe}, indent=1).encode())
    return folder, True


def _adopt(folder: Path, info: dict[str, Any], key: str, describe: dict[str, Any]) -> None:
    """Give a LoRA folder found under an earlier key today's (:func:`lora_folder`)."""
    earlier = [*(info.get("earlier_keys") or []), info.get("resume_key")]
    adopted = {**info, **describe, "lora_key": key, "earlier_keys": sorted({k for k in earlier if k})}
    atomic_write_bytes(folder / TRAINING_FILE, json.dumps(adopted, indent=1).encode())


def earlier_resume_keys(folder: Path) -> list[str]:
    """The resume keys a LoRA folder had before it was given today's (:func:`lora_folder`),
    which its older checkpoints carry."""
    try:
        info = json.loads((Path(folder) / TRAINING_FILE).read_text())
    except (OSError, ValueError):
        return []
    earlier = info.get("earlier_keys") if isinstance(info, dict) else None
    return [k for k in earlier or [] if isinstance(k, str)]


def resumable_folders(base: Path, resume_key: str | Sequence[str], exclude: Path | None = None) -> list[Path]:
    """The other LoRA folders under ``base`` trained with the same settings and data (their
    ``resume_key``, or one of several: :func:`~.lora.resume_keys`) but another
    ``max_train_steps``: a training with more steps continues from their latest checkpoint
    instead of starting over."""
    keys = [resume_key] if isinstance(resume_key, str) else list(resume_key)
    return [
        folder
        for folder, info in lora_folders(base)
        if {info.get("resume_key"), *(info.get("earlier_keys") or [])} & set(keys)
        and "lora_key" in info
        and (exclude is None or folder.resolve() != Path(exclude).resolve())
    ]


def lora_name(folder: Path) -> str:
    """The name a LoRA folder's files and TensorBoard run carry: its own name (``<run>-v<n>`` for
    a ``v<n>`` folder of earlier versions, where ``v1`` alone would collide across runs)."""
    folder = Path(folder)
    return f"{folder.parent.name}-{folder.name}" if _VERSION.match(folder.name) else folder.name


def tensorboard_name(folder: Path, name: str | None = None) -> str:
    """The TensorBoard run of the LoRA folder ``folder`` (under the workspace's shared
    ``log/tensorboard/``): ``name`` (default :func:`lora_name`) and 8 hex digits of the folder's
    absolute path. Why the path: a LoRA folder is named by what it trains, so the same movie
    and settings under two ``--out`` folders have folders of one name, and a training that starts
    over replaced the other's event files."""
    where = hashlib.sha256(str(Path(folder).resolve()).encode()).hexdigest()[:8]
    return f"{name or lora_name(folder)}-{where}"


def _steps(folder: Path) -> int | None:
    """The last step a LoRA folder holds a checkpoint of (its LoRA weights; the optimizer state
    is kept only by the newest ones)."""
    steps = [
        int(c.name[11:])
        for c in folder.glob("checkpoint-*")
        if c.name[11:].isdigit() and (c / LORA_FILE).is_file()
    ]
    return max(steps) if steps else None


def kept_loras(base: Path, current: Path | None = None) -> pl.DataFrame:
    """Every LoRA kept under ``base``: one row per LoRA folder (``lora_path`` null while its
    training has not finished), plus the base folder itself when it holds a LoRA directly (a
    training output from an older version, or one ``train.output_dir`` points at). ``current``
    marks the folder the last training used (what stage 08 draws with)."""
    base = Path(base)
    rows = []
    folders: list[tuple[str, Path, dict[str, Any]]] = []
    if (base / LORA_FILE).is_file():
        folders.append((base.name, base, {}))
    folders += [(folder.name, folder, info) for folder, info in lora_folders(base)]
    for name, folder, info in folders:
        final = folder / LORA_FILE
        kohya = folder / f"{lora_name(folder)}_kohya.safetensors"
        settings = info.get("settings") or {}
        rows.append(
            {
                "name": name,
                "folder": str(folder),
                "lora_path": str(final) if final.is_file() else None,
                "kohya_path": str(kohya) if kohya.is_file() else None,
                "steps": _steps(folder),
                "base_model": settings.get("base_model"),
                "resume_key": info.get("resume_key"),
                "created": info.get("created"),
                "settings": json.dumps(settings, sort_keys=True) if settings else None,
                "current": current is not None and Path(current).resolve() == folder.resolve(),
            }
        )
    return pl.DataFrame(rows, schema=LORAS_SCHEMA) if rows else pl.DataFrame(schema=LORAS_SCHEMA)


def describe_loras(loras: pl.DataFrame) -> list[str]:
    """One line per kept LoRA, for ``bunny status`` and notebooks 07/08."""
    lines = []
    for row in loras.iter_rows(named=True):
        state = f"{row['steps']} steps" if row["steps"] is not None else "no checkpoint yet"
        done = "LoRA " + row["lora_path"] if row["lora_path"] else "training not finished"
        mark = "  <- current" if row["current"] else ""
        model = f", {row['base_model']}" if row["base_model"] else ""
        lines.append(f"{row['name']}: {state}{model}; {done}{mark}")
    return lines


def current_lora_dir(base: Path, loras: pl.DataFrame | None) -> Path:
    """The folder stage 08 draws with: the ``current`` row of the ``loras`` table stage 07 wrote,
    when it lies under ``base`` (the configured ``train.output_dir``, else ``<run>/loras/``) and
    still exists, or the folder of that name under ``base`` (the table holds absolute paths, and a
    run folder moved or copied took its ``loras/`` with it); else ``base`` itself (a training
    output the user points ``train.output_dir`` at, or one written before LoRA folders were
    versioned)."""
    base = Path(base)
    if loras is not None and "current" in loras.columns:
        current = loras.filter(pl.col("current"))
        if current.height:
            folder = Path(current["folder"][0])
            if folder.parent.resolve() == base.resolve() and folder.is_dir():
                return folder
            if (base / folder.name).is_dir():
                return base / folder.name
    return base
