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


#: The largest seed a setting takes: torch's generators take 64-bit seeds, and training adds
#: offsets to its own (validation pictures ``seed + i``, class pictures ``seed + 1000 + i``).
#: A larger one passed validation and stopped stage 07 or 08 with an overflow inside torch.
MAX_SEED = 2**63 - 2**20


def multiple_of_eight(value: int | None) -> int | None:
    """A picture side the diffusion models take: their autoencoders shrink a picture 8 times, and
    diffusers refuses a side that is not a multiple of 8 (once the model has loaded: a run
    stopped there as a bug)."""
    if value is not None and value % 8:
        lower, upper = value - value % 8, value - value % 8 + 8
        raise ValueError(
            f"must be a multiple of 8 (the models' autoencoders need it), e.g. {lower} or {upper}"
        )
    return value
