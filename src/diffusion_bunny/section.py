"""The base of every settings model: one section of the configuration (``run``, ``extract``,
``characters``, ...) or a part of one.

Frozen, so a stage cannot change the settings it was given, and ``extra="forbid"``, so a typo in a
YAML file is an error naming the key instead of a setting silently ignored. Each stage's model
lives in its own folder (``stages/<stage>/settings.py``); :mod:`diffusion_bunny.config` puts them
together. This module is apart from the configuration because those models must not import it:
the configuration imports them.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """A frozen settings model that refuses unknown keys."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)
