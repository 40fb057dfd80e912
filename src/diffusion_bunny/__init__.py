"""diffusion-bunny.

The package root stays light (the CLI imports it before anything heavy); the few functions a
notebook user calls by name are imported from their modules on first use.
"""

from __future__ import annotations

from typing import Any

__all__ = ["move_to_cluster"]


def __getattr__(name: str) -> Any:
    if name == "move_to_cluster":
        # lazy: keeps usearch out of `bunny --help` (0.09 s)
        from diffusion_bunny.stages.scenes.stage import (
            move_to_cluster,
        )

        return move_to_cluster
    raise AttributeError(f"module 'diffusion_bunny' has no attribute {name!r}")
