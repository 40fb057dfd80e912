"""What the last ``bunny run`` of a run folder was given (its ``settings.json``,
:meth:`~diffusion_bunny.pipeline.run.Run.settings`), said back as the flags that give it: by
``bunny status`` (:func:`~diffusion_bunny.pipeline.status.settings_note`) and by ``bunny run``
when it leaves some out (:func:`dropped_settings_note`). Its own module: the runner and the
status both use it, and the status imports the runner."""

from __future__ import annotations

import json
import shlex
from collections.abc import Callable
from typing import Any


def as_flags(record: dict[str, Any]) -> str:
    """A run's recorded settings (``settings.json``) as the flags that give them, to be typed
    back: each value as ``--set`` reads it (``null``, ``true``, a list in brackets) and each word
    quoted for the shell. Python's spelling (``None``, ``['a', 'b']``) read back as other text,
    and ``negative_prompt=blurry, ugly`` unquoted was two words, one refused by ``bunny``."""
    overrides = dict(record.get("overrides") or {})
    words = [f"--config {shlex.quote(str(record['config_path']))}"] if record.get("config_path") else []
    if overrides.get("characters.reference_dir"):
        words.append(f"--characters {shlex.quote(str(overrides.pop('characters.reference_dir')))}")
    words += [f"--set {shlex.quote(f'{key}={as_typed(value)}')}" for key, value in overrides.items()]
    return " ".join(words) or "no settings of its own"


def as_typed(value: Any) -> str:
    """A recorded setting's value as ``--set`` reads it back (YAML 1.2; JSON is YAML)."""
    if value is None or isinstance(value, bool | list | dict):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def of_stages(record: dict[str, Any]) -> dict[str, Any]:
    """A recorded ``config_path`` and ``overrides`` without the engine's settings."""
    overrides = {k: v for k, v in (record.get("overrides") or {}).items() if not k.startswith("engine.")}
    return {"config_path": record.get("config_path"), "overrides": overrides}


def dropped_settings_note(
    recorded: dict[str, Any] | None,
    asked: dict[str, Any],
    current_name: Callable[[str], str] | None = None,
) -> str | None:
    """A line when ``bunny run`` on a run folder leaves out settings its last ``bunny run`` was
    given (a ``--config`` or a ``--set``/``--characters`` key ``asked`` lacks), else None: the
    stages they touch are judged and run without them. Why: ``bunny run MOVIE --stages report``
    typed without the first run's ``--characters`` said stage 03 was out of date and to run it
    again, which would have named nobody; and the folder's settings then dropped the references
    for its notebooks. Giving other values is a choice, and said by the stages' reasons.
    ``current_name``: a setting's name today (the configuration's ``current_name``), so that a
    setting given under its new name is not said to be left out under its old one."""
    if recorded is None:
        return None
    recorded, asked = (of_stages(r) for r in (recorded, asked))
    name = current_name or (lambda key: key)
    given = {name(k) for k in asked["overrides"]}
    left_out = {k: v for k, v in recorded["overrides"].items() if name(k) not in given}
    config = recorded["config_path"] if recorded["config_path"] and not asked["config_path"] else None
    if not left_out and config is None:
        return None
    flags = as_flags({"config_path": config, "overrides": left_out})
    return (
        f"its last bunny run was given {flags}, this one not: the stages those settings touch run "
        "without them (and the folder's notebooks start without them); give the same to keep them"
    )
