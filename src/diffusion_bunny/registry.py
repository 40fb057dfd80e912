"""The detectors a setting can choose, each registered once, with its own settings.

A detector is chosen by one tagged setting: ``characters.detector: {name: mtcnn, scale_step: 0.8}``
(or just ``characters.detector: mtcnn`` for its defaults). The module that holds a detector
defines its settings model (a :class:`DetectorSettings` whose ``name`` is a ``Literal``: the tag)
with their defaults, builds the detector from them, and registers the model once
(``@FACE_DETECTORS.register``). Nothing else lists the detectors: the configuration's field is the
union of what is registered (:meth:`Registry.choice`), an unknown name is one line naming the
setting and the choices, and the code that needs a detector asks its settings to build it.

The registry also says which module computes with each detector (:attr:`Detector.module`), so a
stage's code hash can cover the detector it chose and not the ones it did not.

Own code: pydantic's discriminated unions do the validation; what a registry adds (the names, the
module, the short form ``detector: mtcnn``) is a few lines.
"""

from __future__ import annotations

import functools
import logging
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Union

from pydantic import BeforeValidator, Field

from diffusion_bunny.errors import ConfigError
from diffusion_bunny.section import Section


class DetectorSettings(Section):
    """A detector's own settings; ``name`` (a ``Literal`` in each subclass) is its registered
    name and the tag of the setting that chooses it."""

    name: str


@dataclass(frozen=True)
class Detector:
    """One registered detector: its name, its settings model and the module that holds both."""

    name: str
    settings: type[DetectorSettings]
    module: str


class Registry:
    """The detectors of one kind (``kind``: what the error messages call them), chosen by the
    setting ``setting``."""

    def __init__(self, kind: str, setting: str):
        self.kind = kind
        self.setting = setting
        self._by_name: dict[str, Detector] = {}

    def register(self, settings: type[DetectorSettings]) -> type[DetectorSettings]:
        """Class decorator: register the detector whose settings model this is."""
        name = settings.model_fields["name"].default
        if not isinstance(name, str) or not name:
            raise TypeError(f"{settings.__name__}.name needs its registered name as its default")
        if name in self._by_name:
            raise ValueError(f"the {self.kind} '{name}' is registered twice")
        self._by_name[name] = Detector(name, settings, settings.__module__)
        return settings

    def names(self) -> tuple[str, ...]:
        """The registered names, sorted."""
        return tuple(sorted(self._by_name))

    def get(self, name: str) -> Detector:
        """The detector called ``name``; :class:`ValueError` naming the setting and the choices
        (a name written as a list or a mapping too: looked up as it was, it stopped the run with
        "unhashable type" as a bug)."""
        if isinstance(name, str) and name in self._by_name:
            return self._by_name[name]
        raise ValueError(
            f"{self.setting}: '{name}' is not a {self.kind}; choose one of {', '.join(self.names())}"
        )

    def settings(self, name: str, **values: Any) -> DetectorSettings:
        """The settings of detector ``name``: its defaults, with ``values`` over them."""
        return self.get(name).settings(name=name, **values)

    def modules(self) -> frozenset[str]:
        """The modules that hold the registered detectors."""
        return frozenset(d.module for d in self._by_name.values())

    def code_choice(self, settings: DetectorSettings) -> tuple[frozenset[str], str]:
        """For :func:`~diffusion_bunny.codegraph.code_hash`: every detector's module, and the
        chosen one's (a stage's code hash then covers the detector it runs, not the others)."""
        return self.modules(), self.get(settings.name).module

    def _tagged(self, default: str, value: Any) -> Any:
        """The setting as written, made a mapping pydantic's union can read: a name alone stands
        for that detector with its defaults, a mapping without a name (a layer that tunes the
        detector no layer named) for ``default``; settings that were the section's own before
        they became the detector's (:class:`Moved`) are kept where the chosen detector has them
        and dropped, with one warning, where it does not (they never applied to it; a null there
        meant "the detector's default")."""
        if isinstance(value, str):
            value = {"name": value}
        if not isinstance(value, dict):
            return value
        value = {"name": default, **value}
        own = self.get(value["name"]).settings.model_fields  # an unknown name: one line
        settled = {}
        for key, item in value.items():
            if not isinstance(item, Moved):
                settled[key] = item
            elif key in own:
                if item.value is not None or type(None) in typing.get_args(own[key].annotation):
                    settled[key] = item.value
            elif item.value is not None:
                logging.getLogger(__name__).warning(
                    "%s.%s is not a setting of the %s %s; it is ignored",
                    self.setting.rpartition(".")[0],
                    key,
                    self.kind,
                    value["name"],
                )
        return settled

    def choice(self, default: str) -> Any:
        """The type of the setting that chooses one registered detector (a name, or a mapping
        with ``name`` and that detector's settings; ``default`` where a mapping names none)."""
        members = tuple(d.settings for d in self._by_name.values())
        union = Annotated[Union[members], Field(discriminator="name")]  # noqa: UP007 - a runtime tuple
        return Annotated[union, BeforeValidator(functools.partial(self._tagged, default))]


@dataclass(frozen=True)
class Moved:
    """A detector's setting one configuration layer wrote at its section's level, as before it
    became the detector's own: :func:`move_into_detector` puts it under ``detector`` in its layer
    (so later layers still win); the setting that chooses the detector keeps it where the chosen
    detector has it (:meth:`Registry.choice`)."""

    value: Any


def move_into_detector(
    values: dict[str, Any], section: str, moved: tuple[str, ...], source: str
) -> dict[str, Any]:
    """One layer's ``section`` with the keys of ``moved`` written at its level moved under
    ``detector`` (as :class:`Moved`), one warning each naming the layer. A key the layer also
    sets under ``detector`` is a :class:`ConfigError` naming both (which one was meant cannot be
    told; the old one silently won), as is a ``detector`` neither a name nor a mapping (there is
    nowhere to move the key to)."""
    if not any(key in values for key in moved):
        return values
    values = dict(values)
    chosen = values.get("detector")
    if chosen is not None and not isinstance(chosen, str | dict):
        raise ConfigError(
            f"config error: {source} sets {section}.detector = {chosen!r}: {section}.detector must be "
            f"a detector name or a mapping"
        )
    detector = {"name": chosen} if isinstance(chosen, str) else dict(chosen or {})
    for key in moved:
        if key in values and key in detector:
            raise ConfigError(
                f"config error: {source} sets {section}.{key} and {section}.detector.{key}; "
                f"'{section}.{key}' is the old place of '{section}.detector.{key}': keep only "
                f"{section}.detector.{key}"
            )
        if key in values:
            detector[key] = Moved(values.pop(key))
            logging.getLogger(__name__).warning(
                "%s: the setting %s.%s is now %s.detector.%s", source, section, key, section, key
            )
    values["detector"] = detector
    return values


#: The face detectors of stage 03 (and of stage 08's identity score): ``characters.detector``.
FACE_DETECTORS = Registry("face detector", "characters.detector")
#: The shot-boundary detectors of stage 01: ``extract.detector``.
SHOT_DETECTORS = Registry("shot detector", "extract.detector")
