"""The base of every settings model: one section of the configuration (``run``, ``extract``,
``characters``, ...) or a part of one.

Frozen, so a stage cannot change the settings it was given, and ``extra="forbid"``, so a typo in a
YAML file is an error naming the key instead of a setting silently ignored. Each stage's model
lives in its own folder (``stages/<stage>/settings.py``); :mod:`diffusion_bunny.config` puts them
together. This module is apart from the configuration because those models must not import it:
the configuration imports them.
"""

from __future__ import annotations

import functools
import types
import typing
from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator
from pydantic_core import PydanticCustomError

#: The error type of a ``true``/``false`` given where a number goes (its context names the key).
YES_NO_FOR_A_NUMBER = "yes_no_for_a_number"


def _forms(annotation: Any) -> tuple[bool, bool, bool, tuple[str, ...]]:
    """What a setting's type takes: (a number, a yes/no, null, its fixed texts), looking through
    unions, ``Literal`` and ``Annotated``. ``Any`` takes a yes/no."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _forms(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType, typing.Literal):
        parts = [
            _forms(arg) if origin is not typing.Literal else _literal_form(arg)
            for arg in typing.get_args(annotation)
        ]
        return (
            any(p[0] for p in parts),
            any(p[1] for p in parts),
            any(p[2] for p in parts),
            tuple(t for p in parts for t in p[3]),
        )
    if annotation is bool or annotation is Any:
        return False, True, False, ()
    return annotation in (int, float), False, annotation is type(None), ()


def _literal_form(value: Any) -> tuple[bool, bool, bool, tuple[str, ...]]:
    if isinstance(value, bool):
        return False, True, False, ()
    if isinstance(value, int | float):
        return True, False, False, ()
    return False, False, value is None, (value,) if isinstance(value, str) else ()


@functools.cache
def _yes_no_refusal(model: type[BaseModel], name: str) -> str | None:
    """The line refusing ``true``/``false`` for the setting ``name`` of ``model``, or None where
    a yes/no is one of its values or it takes no number."""
    number, yes_no, null, texts = _forms(model.model_fields[name].annotation)
    if not number or yes_no:
        return None
    wanted = " or ".join([*(repr(t) for t in texts), "a number"])
    return f"{wanted} is needed, not true/false" + (" (null turns it off)" if null else "")


@functools.cache
def _a_list_only(model: type[BaseModel], name: str) -> bool:
    """Whether every form of the setting ``name`` of ``model`` (null aside) is a list of any
    length: a lone value given to it is then a list of one."""

    def listed(annotation: Any) -> bool:
        origin, args = typing.get_origin(annotation), typing.get_args(annotation)
        if origin is typing.Annotated:
            return listed(args[0])
        if origin in (typing.Union, types.UnionType):
            forms = [a for a in args if a is not type(None)]
            return bool(forms) and all(listed(a) for a in forms)
        return origin is list or (origin is tuple and len(args) == 2 and args[1] is Ellipsis)

    return listed(model.model_fields[name].annotation)


class Section(BaseModel):
    """A frozen settings model that refuses unknown keys."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    @model_validator(mode="before")
    @classmethod
    def _no_yes_no_for_a_number(cls, data: Any) -> Any:
        """Refuse ``true``/``false`` where a number goes. Pydantic's lax mode reads them as 1 and
        0, so ``accept_threshold: false`` (meant as "off") made the cascade accept every
        candidate: the opposite. Real yes/no settings, and texts, are left alone. A model
        validator, not a field one: a detector's ``name`` (a union's tag) may have none; the
        error carries the key, which :mod:`diffusion_bunny.config` puts in its line."""
        if not isinstance(data, dict):
            return data
        for key, value in data.items():
            if isinstance(value, bool) and key in cls.model_fields:
                refusal = _yes_no_refusal(cls, key)
                if refusal is not None:
                    raise PydanticCustomError(
                        YES_NO_FOR_A_NUMBER,
                        "{key} = {value}: {refusal}",
                        {"key": key, "value": value, "refusal": refusal},
                    )
        return data

    @model_validator(mode="before")
    @classmethod
    def _one_value_as_a_list(cls, data: Any) -> Any:
        """A lone value where a list goes is a list of one: ``--set generate.characters=alice``,
        ``generate.seeds=1`` or ``captions.fallback=openai`` was "Input should be a valid tuple".
        A setting that also takes a single text (``train.lora_targets: attention``) keeps it."""
        if not isinstance(data, dict):
            return data
        lone = [
            key
            for key, value in data.items()
            if isinstance(value, str | int | float)
            and not isinstance(value, bool)  # a yes/no is no item of a list: refused as it was
            and key in cls.model_fields
            and _a_list_only(cls, key)
        ]
        return {**data, **{key: [data[key]] for key in lone}} if lone else data


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
