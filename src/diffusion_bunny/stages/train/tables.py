"""Stage 07's outputs as stage 08 and the report rely on them: the ``training_log``,
``training_validation`` and ``loras`` tables and the folders of LoRA files
(``checkpoint/<run folder name>/v<n>/``, one per training configuration)."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl

from diffusion_bunny.config import TrainingConfig, workspace_root

if TYPE_CHECKING:
    from diffusion_bunny.config import TrainingConfig


LORA_FILE = "pytorch_lora_weights.safetensors"

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


def checkpoint_dir(run_dir: Path, cfg: TrainingConfig) -> Path:
    """Where a run's LoRAs are kept: ``training.output_dir`` (relative to the workspace unless
    absolute), else ``checkpoint/<run folder name>/`` in the workspace; one ``v<n>/`` folder per
    training configuration inside (:func:`lora_folder`)."""
    if cfg.output_dir:
        out = Path(cfg.output_dir).expanduser()
        return out if out.is_absolute() else workspace_root() / out
    return workspace_root() / "checkpoint" / Path(run_dir).name


# ---------------------------------------------------------------------------------------------
# One folder per training configuration (issue 31)

#: What a LoRA folder records about the configuration it was trained with.
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


def version_folders(base: Path) -> list[tuple[int, Path, dict[str, Any]]]:
    """``(n, folder, training.json)`` of every ``v<n>/`` LoRA folder under ``base``, by ``n``
    (a folder without a readable ``training.json`` is not one of ours and is left alone)."""
    out = []
    if Path(base).is_dir():
        for child in Path(base).iterdir():
            m = _VERSION.match(child.name)
            if not m or not child.is_dir():
                continue
            try:
                info = json.loads((child / TRAINING_FILE).read_text())
            except (OSError, ValueError):
                continue
            if isinstance(info, dict):
                out.append((int(m.group(1)), child, info))
    return sorted(out, key=lambda v: v[0])


def lora_folder(base: Path, key: str, describe: dict[str, Any]) -> tuple[Path, bool]:
    """The LoRA folder of the training configuration ``key`` (settings that change a step + the
    dataset, :func:`~diffusion_bunny.stages.train.lora.resume_key`) under ``base``: the existing
    ``v<n>/`` whose ``training.json`` holds that key (a rerun resumes there), else a new
    ``v<n+1>/`` (returned with True). Why versions instead of one folder: a retrain with other
    settings or one edited caption used to start over in the same folder and delete the LoRA
    and every checkpoint of the run before, hours of GPU time; now nothing is deleted unless
    ``training.start_over`` asks for it."""
    from diffusion_bunny.pipeline.atomic import atomic_write_bytes

    versions = version_folders(base)
    for _, folder, info in versions:
        if info.get("resume_key") == key:
            return folder, False
    n = (versions[-1][0] if versions else 0) + 1
    while (Path(base) / f"v{n}").exists():  # a folder of ours without training.json: keep clear
        n += 1
    folder = Path(base) / f"v{n}"
    folder.mkdir(parents=True)
    info = {"version": n, "resume_key": key, "created": datetime.now(UTC).isoformat(timespec="seconds")}
    atomic_write_bytes(folder / TRAINING_FILE, json.dumps({**info, **describe}, indent=1).encode())
    return folder, True


def lora_name(folder: Path) -> str:
    """The name a LoRA folder's files and TensorBoard run carry: ``<run>-v<n>`` for a version
    folder (``v1`` alone would collide across runs in ``log/tensorboard/``), else its own name."""
    folder = Path(folder)
    return f"{folder.parent.name}-{folder.name}" if _VERSION.match(folder.name) else folder.name


def _steps(folder: Path) -> int | None:
    steps = [
        int(c.name[11:])
        for c in folder.glob("checkpoint-*")
        if c.name[11:].isdigit() and (c / STATE_FILE).is_file()
    ]
    return max(steps) if steps else None


def kept_loras(base: Path, current: Path | None = None) -> pl.DataFrame:
    """Every LoRA kept under ``base``: one row per ``v<n>/`` folder (``lora_path`` null while its
    training has not finished), plus the base folder itself when it holds a LoRA directly (a
    training output from before issue 31, or one ``training.output_dir`` points at). ``current``
    marks the folder the last training used (what stage 08 draws with)."""
    base = Path(base)
    rows = []
    folders: list[tuple[str, Path, dict[str, Any]]] = []
    if (base / LORA_FILE).is_file():
        folders.append((base.name, base, {}))
    folders += [(f"v{n}", folder, info) for n, folder, info in version_folders(base)]
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
    when it lies under ``base`` (the configured ``training.output_dir``, else
    ``checkpoint/<run>/``) and still exists; else ``base`` itself (a training output the user
    points ``training.output_dir`` at, or one written before LoRA folders were versioned)."""
    base = Path(base)
    if loras is not None and "current" in loras.columns:
        current = loras.filter(pl.col("current"))
        if current.height:
            folder = Path(current["folder"][0])
            if folder.parent.resolve() == base.resolve() and folder.is_dir():
                return folder
    return base
