"""What a stage relays to the terminal of ``bunny run`` (importable from every test folder:
conftest.py puts this folder on ``sys.path``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from diffusion_bunny import logs


def relayed_bar(progress_path: Path) -> tuple[Path, dict[str, Any]]:
    """The one bar relayed beside the stage's progress file ``progress_path`` (its file and what
    it says: desc, unit, done, total, closed); fails when there is none or more than one."""
    (path,) = progress_path.parent.glob(progress_path.name + logs.BAR_SUFFIX + "*")
    return path, json.loads(path.read_text())
