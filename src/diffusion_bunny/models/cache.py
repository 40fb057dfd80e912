"""The user cache of this machine: models converted or built once and reused by every run.

TransNetV2's ONNX export (stage 01), the tiny Stable Diffusion presets (stage 07) and the class
images a DreamBooth run generates live here. One place, so ``$DIFFUSION_BUNNY_CACHE`` moves them
all; a run's own caches (caption answers, latents) live in its run folder instead.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$DIFFUSION_BUNNY_CACHE``, else ``$XDG_CACHE_HOME/diffusion-bunny`` (``~/.cache/...``)."""
    env = os.environ.get("DIFFUSION_BUNNY_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "diffusion-bunny"  # a quoted "~/c" is the home's, as above
