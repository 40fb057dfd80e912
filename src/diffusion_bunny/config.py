"""Layered, validated configuration.

Layers, later wins: the defaults below (mirrored, with comments, in ``config/main.yaml``), then
``config/main.yaml`` itself, then ``config/local_*.yaml`` (git-ignored, written by widgets), then an
explicit ``--config FILE``, then ``--set section.key=value`` overrides (papermill passes the same
overrides dict). Secrets never live here: they come from the environment or ``.env``.

The merged dict is validated into frozen pydantic models with ``extra="forbid"`` so that a typo
is an error that names the key instead of a setting silently ignored. Each section is named after
the stage that reads it, and its model lives in that stage's folder (``stages/<stage>/settings.py``,
beside the code that reads it); the sections every run has (``run``, ``engine``, ``pipeline``) are the
machinery's own (:mod:`diffusion_bunny.pipeline.settings`, which this module's names for them
re-export). This module puts the stages' models together and reads the layers; it stands above
the stages and the machinery, and neither imports it: they are given a validated config.
"""

from __future__ import annotations

import copy
import logging
import os
import re
import types
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from diffusion_bunny.errors import ConfigError
from diffusion_bunny.paths import project_root
from diffusion_bunny.pipeline.settings import RECORDED_AS as RECORDED_AS
from diffusion_bunny.pipeline.settings import (
    SECTION_ALIASES,
    RunConfig,
    parse_override,
    read_settings_file,
)
from diffusion_bunny.pipeline.settings import EngineSettings as EngineSettings
from diffusion_bunny.pipeline.settings import PathsSettings as PathsSettings
from diffusion_bunny.pipeline.settings import PipelineSettings as PipelineSettings
from diffusion_bunny.pipeline.settings import RunSettings as RunSettings
from diffusion_bunny.pipeline.settings import output_root as output_root
from diffusion_bunny.pipeline.settings import recorded_name as recorded_name
from diffusion_bunny.pipeline.settings import save_local_settings as save_local_settings
from diffusion_bunny.registry import move_into_detector
from diffusion_bunny.secrets import load_env_file, redact_urls
from diffusion_bunny.section import YES_NO_FOR_A_NUMBER
from diffusion_bunny.stages.captions.settings import CaptionsSettings
from diffusion_bunny.stages.characters.settings import MOVED_TO_DETECTOR as FACE_KEYS
from diffusion_bunny.stages.characters.settings import CharactersSettings
from diffusion_bunny.stages.export.settings import ExportSettings
from diffusion_bunny.stages.extract.settings import MOVED_TO_DETECTOR as SHOT_KEYS
from diffusion_bunny.stages.extract.settings import ExtractSettings
from diffusion_bunny.stages.generate.settings import GenerateSettings
from diffusion_bunny.stages.quality.settings import QualitySettings
from diffusion_bunny.stages.report.settings import ReportSettings
from diffusion_bunny.stages.scenes.settings import ScenesSettings
from diffusion_bunny.stages.train.settings import TrainSettings

#: Settings renamed or moved to another section: (section, key) -> (section, key). The old place
#: still loads, with one warning; the same setting in both places in one layer is an error.
MOVED_KEYS = {
    ("characters", "model"): ("characters", "detector"),
    ("run", "output_dir"): ("paths", "output_dir"),
}
#: A detector's settings that were the section's own before they became the detector's
#: (``extract.candidate_threshold`` -> ``extract.detector.candidate_threshold``): section -> keys.
DETECTOR_KEYS = {"extract": SHOT_KEYS, "characters": FACE_KEYS}


class Config(RunConfig):
    """The whole validated configuration: the sections every run has (:class:`RunConfig`) and
    one per stage, each stage's model from its own folder."""

    extract: ExtractSettings = ExtractSettings()
    quality: QualitySettings = QualitySettings()
    characters: CharactersSettings = CharactersSettings()
    scenes: ScenesSettings = ScenesSettings()
    captions: CaptionsSettings = CaptionsSettings()
    export: ExportSettings = ExportSettings()
    train: TrainSettings = TrainSettings()
    generate: GenerateSettings = GenerateSettings()
    report: ReportSettings = ReportSettings()


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """``top`` over ``base``, mapping by mapping. A detector is one tagged setting
    (``detector: {name: mtcnn, ...}``, or its name alone): a layer that names another detector
    replaces the one below it whole (its settings are not the other's), and a layer that tunes a
    detector without naming it tunes the one named below (only a ``detector``: a mapping over
    another text setting is that mapping, refused as "not a valid string" as it was written)."""
    out = copy.deepcopy(base)
    for key, value in top.items():
        current = out.get(key)
        if key == "detector" and isinstance(value, dict) and isinstance(current, str) and "name" not in value:
            out[key] = {"name": current, **copy.deepcopy(value)}
        elif isinstance(value, str) and isinstance(current, dict) and current.get("name") == value:
            continue  # the detector below named again (``--set extract.detector=content``): its tuning stays
        elif isinstance(value, dict) and isinstance(current, dict):
            renamed = "name" in value and "name" in current and value["name"] != current["name"]
            out[key] = copy.deepcopy(value) if renamed else _deep_merge(current, value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def text_setting(dotted: str) -> bool:
    """Whether the setting ``dotted`` (``generate.negative_prompt``; an old name too) takes text,
    for :func:`parse_override`: its ``--set`` value is then kept as typed, whatever YAML would
    read it as (``captions.trigger_word=2024``, ``generate.negative_prompt=style: cartoon``)."""
    section, _, rest = dotted.partition(".")
    parts = [SECTION_ALIASES.get(section, section), *rest.split(".")]
    if len(parts) == 2 and tuple(parts) in MOVED_KEYS:
        parts = list(MOVED_KEYS[(parts[0], parts[1])])
    annotation = _annotation(parts)
    if annotation is None and len(parts) >= 3:
        # A name's text in a ``dict[str, str]`` (``captions.character_descriptions.biscuit=style:
        # dog`` was a mapping, refused with no hint): kept as typed like any text setting.
        outer = _annotation(parts[:2])
        return typing.get_origin(outer) is dict and typing.get_args(outer)[1:] == (str,)
    if annotation is None:
        return False
    # Only a union is its arguments: ``dict[str, str]`` (captions.character_descriptions) has
    # ``(str, str)`` too, and its ``{biscuit: a cartoon dog}`` was kept as text, then refused.
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    forms = set(typing.get_args(annotation)) if union else {annotation}
    return str in forms and forms <= {str, type(None)}


def settings_group(dotted: str) -> bool:
    """Whether ``dotted`` (any spelling) names a group of settings (a section, a provider's, a
    detector's), whose mapping a layer may give key by key, rather than one setting whose value
    is a mapping (``captions.character_descriptions``: its keys are names, "Dr. Who" too)."""
    annotation = _annotation(current_name(dotted).split("."))
    return annotation is not None and _holds_settings(annotation)


def _empty_groups_as_defaults(layer: dict[str, Any], at: tuple[str, ...]) -> dict[str, Any]:
    """A settings file's groups left empty (``fitted:`` with every key under it commented out)
    as no settings, as an empty section is: the file's group was "empty; give it a value" while
    an empty section beside it loaded. Only a group that cannot be null (its declared type is a
    settings model alone) is read so; a value left empty elsewhere is still said."""
    out: dict[str, Any] = {}
    for key, value in layer.items():
        parts = (*at, str(key))
        if isinstance(value, dict):
            value = _empty_groups_as_defaults(value, parts)
        elif value is None and len(parts) > 1:
            annotation = _annotation(current_name(".".join(parts)).split("."))
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                value = {}
        out[key] = value
    return out


def _takes_empty_text(loc: tuple[Any, ...]) -> bool:
    """Whether the text setting at ``loc`` takes ``''`` (a tag that adds nothing): then the line
    for a value left empty says how to give it. ``--set export.half_body_tag=`` was "is empty"
    with no word of ``''``; a setting that refuses it (a trigger word) is not sent there."""
    model = _annotation([str(part) for part in loc[:-1]]) if len(loc) > 1 else None
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        return False
    try:
        model(**{str(loc[-1]): ""})
    except ValidationError as exc:
        return not any(error["loc"][:1] == (str(loc[-1]),) for error in exc.errors())
    except TypeError:
        return False
    return True


def _annotation(parts: list[str]) -> Any:
    """The declared type of the setting at ``parts`` (section, then keys), through the settings
    models; None where no such setting is declared."""
    model: type[BaseModel] = Config
    for part in parts[:-1]:
        field = model.model_fields.get(part)
        inner = field.annotation if field is not None else None
        if not (isinstance(inner, type) and issubclass(inner, BaseModel)):
            return None
        model = inner
    field = model.model_fields.get(parts[-1])
    return None if field is None else field.annotation


def _holds_settings(annotation: Any) -> bool:
    """A settings model, or a union (a detector's choice) of some."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return True
    return any(_holds_settings(arg) for arg in typing.get_args(annotation))


def current_name(dotted: str) -> str:
    """The name a setting (``extraction.motion_threshold``, ``run.output_dir``,
    ``extract.threshold``) has today (``extract.motion_threshold``, ``paths.output_dir``,
    ``extract.detector.threshold``): the renames :func:`load_config` makes in each layer, so that
    two layers merged by spelling (a run's record and a notebook's) find the same setting."""
    section, *rest = dotted.split(".")
    parts = [SECTION_ALIASES.get(section, section), *rest]
    if len(parts) >= 2 and (parts[0], parts[1]) in MOVED_KEYS:
        parts[:2] = MOVED_KEYS[(parts[0], parts[1])]
    elif len(parts) == 2 and parts[1] in DETECTOR_KEYS.get(parts[0], ()):
        parts.insert(1, "detector")
    return ".".join(parts)


def overrides_to_tree(overrides: dict[str, Any] | list[str] | None) -> dict[str, Any]:
    """Turn ``{"extract.detector.threshold": 30}`` or ``["extract.detector.threshold=30"]`` into
    nested dicts. A detector named and tuned in one go (``extract.detector=content`` and
    ``extract.detector.threshold=30``, in either order) is that detector with that setting."""
    if not overrides:
        return {}
    pairs = (
        [parse_override(item, text_setting) for item in overrides]
        if isinstance(overrides, list | tuple)
        else list(overrides.items())
    )
    tree: dict[str, Any] = {}
    for dotted, value in pairs:
        node = tree
        *parents, leaf = dotted.split(".")
        for part in parents:
            if isinstance(node.get(part), str):  # a detector's name, now tuned too
                node[part] = {"name": node[part]}
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{dotted}' conflicts with another override")
        if isinstance(node.get(leaf), dict) and isinstance(value, str):  # tuned, now named too
            node[leaf] = {**node[leaf], "name": value}
        else:  # a copy: a later key under it must not write into the caller's (a run's record)
            node[leaf] = copy.deepcopy(value)
    return tree


def _rename_sections(layer: dict[str, Any], source: str) -> dict[str, Any]:
    """``layer`` with renamed sections (:data:`SECTION_ALIASES`) under their new name, and one
    warning per old name used. A key set under both names in the same layer is a
    :class:`ConfigError` naming both: which one was meant cannot be told."""
    out = layer
    for old, new in SECTION_ALIASES.items():
        if old not in layer:
            continue
        legacy = layer[old]
        if legacy is None:
            legacy = {}
        if not isinstance(legacy, dict):
            raise ConfigError(f"config error: {old} must be a mapping of settings (it is now called '{new}')")
        current = layer.get(new) or {}
        both = sorted(set(legacy) & set(current)) if isinstance(current, dict) else []
        if both:
            raise ConfigError(
                f"config error: {source} sets {old}.{both[0]} and {new}.{both[0]}; '{old}' is the old "
                f"name of '{new}': keep only {new}.{both[0]}"
            )
        out = {k: v for k, v in out.items() if k != old}
        out[new] = {**legacy, **current} if isinstance(current, dict) else current
        keys = ", ".join(f"{new}.{k}" for k in legacy) or new
        # A log record, not a Python warning: the command line shows it as one "warning: ..."
        # line (a warning would carry its file, line and source line).
        logging.getLogger(__name__).warning(
            "%s: the config section '%s' is now called '%s'; write %s", source, old, new, keys
        )
    for old, new in MOVED_KEYS.items():
        out = _move_key(out, old, new, source)
    for section, keys in DETECTOR_KEYS.items():
        if isinstance(out.get(section), dict):
            out = {**out, section: move_into_detector(out[section], section, keys, source)}
    return out


def _move_key(
    layer: dict[str, Any], old: tuple[str, str], new: tuple[str, str], source: str
) -> dict[str, Any]:
    """``layer`` with the setting ``old`` (section, key) moved to ``new``, and one warning; set in
    both places in one layer, a :class:`ConfigError` naming both."""
    values = layer.get(old[0])
    if not isinstance(values, dict) or old[1] not in values:
        return layer
    rest = {k: v for k, v in values.items() if k != old[1]}
    target = rest if new[0] == old[0] else layer.get(new[0]) or {}
    if isinstance(target, dict) and new[1] in target:
        raise ConfigError(
            f"config error: {source} sets {old[0]}.{old[1]} and {new[0]}.{new[1]}; '{old[0]}.{old[1]}' "
            f"is the old name of '{new[0]}.{new[1]}': keep only {new[0]}.{new[1]}"
        )
    logging.getLogger(__name__).warning(
        "%s: the setting %s.%s is now called %s.%s", source, old[0], old[1], new[0], new[1]
    )
    moved = {**target, new[1]: values[old[1]]} if isinstance(target, dict) else target
    return {**layer, old[0]: rest, new[0]: moved}


def _member(annotation: Any, tag: Any) -> type[BaseModel] | None:
    """The member of a tagged union (a detector's settings) whose ``name`` is ``tag``."""
    for arg in typing.get_args(annotation):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            name = arg.model_fields.get("name")
            if name is not None and name.default == tag:
                return arg
        elif (found := _member(arg, tag)) is not None:
            return found
    return None


def _allowed_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    parts = list(loc[:-1])
    while parts:
        field = model.model_fields.get(str(parts.pop(0)))
        if field is None:
            return []
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
        elif parts and (member := _member(annotation, parts[0])) is not None:
            model = member  # a detector: pydantic's location names its tag next
            parts.pop(0)
        else:
            return []
    return sorted(model.model_fields)


def _shown(loc: tuple[Any, ...]) -> str:
    """A validation error's location as the setting a user writes: a detector's tag, which
    pydantic puts after ``detector``, is not part of it."""
    parts = [p for i, p in enumerate(loc) if not (i and loc[i - 1] == "detector")]
    return ".".join(str(p) for p in parts) or "config"


#: How pydantic names the member of a union a value was tried as (``literal['auto']``,
#: ``constrained-float``, ``function-after[...]``): not a setting's name.
_UNION_MEMBER = re.compile(r"^(literal\[|constrained-|function-|nullable|none$|int$|float$|str$|bool$)")


# Refusals of a mapping given where a group of settings goes: the mapping is the right kind there.
_GROUP_ERRORS = frozenset(
    {"model_type", "dict_type", "model_attributes_type", "value_error", "assertion_error"}
)


def _format_validation_error(exc: ValidationError) -> str:
    errors = exc.errors()
    err = errors[0]
    loc = tuple(p for p in err["loc"] if not isinstance(p, int))
    if loc and isinstance(loc[-1], str) and _UNION_MEMBER.match(loc[-1]):
        # A union (``stage_timeout_s: auto | a number > 0 | null``): every form it may take,
        # not the first member's refusal under that member's internal name.
        loc = loc[:-1]
        forms = [e["msg"] for e in errors if tuple(p for p in e["loc"] if not isinstance(p, int))[:-1] == loc]
        err = {**err, "msg": "; or ".join(dict.fromkeys(forms))}
    if err["type"] == YES_NO_FOR_A_NUMBER:  # raised by the section: its context names the key
        ctx = err["ctx"]
        loc, err = (*loc, ctx["key"]), {**err, "msg": ctx["refusal"], "input": ctx["value"]}
    if err["type"] == "invalid_key":  # ``1: 2`` under a section: "run = 1: Keys should be strings"
        allowed = ", ".join(_allowed_keys(Config, (*loc, str(err["input"]))))
        return f"config error: unknown key '{_shown((*loc, str(err['input'])))}' (allowed here: {allowed})"
    if loc and loc[-1] == "[key]":  # ``1: hall`` under a name's mapping: YAML read a number
        at, name = _shown(loc[:-1]), err["input"]
        return f"config error: {at}: the name {name!r} is a number here; put it in quotes ('{name}')"
    key = _shown(loc)
    if err["type"] == "extra_forbidden":
        allowed = _allowed_keys(Config, loc)
        nested = ""
        head, _, rest = str(loc[-1]).partition(".")
        if rest and head in allowed:  # a settings file's ``paths.output_dir: x``: --set's form
            nested = f"; a settings file nests its keys: '{head}:', then '  {rest}: ...' indented under it"
        return f"config error: unknown key '{key}' (allowed here: {', '.join(allowed)}){nested}"
    msg = err["msg"].removeprefix("Value error, ").removeprefix(f"{key}: ")  # a validator naming it too
    value = err.get("input")
    if value is None and err["type"] != "string_type":
        # ``--set extract.detector=`` (nothing after the '='): not "Input should be a valid
        # dictionary or object to extract fields from"
        return f"config error: {key} is empty; give it a value, or leave the key out for its default"
    if isinstance(value, str) and "," in value and len(err["loc"]) > len(loc):  # an item of a list
        # ``--set generate.seeds=1,2``: the list's items are what the message names
        return f"config error: {key} = {value!r}: a list is written in brackets: [{value}]"
    if err["type"] == "string_type" and isinstance(value, int | float | list | tuple):
        # A number, a yes/no or a list where text goes: YAML read it so.
        return f"config error: {key} = {value!r}: {msg}; put the text in quotes"
    if err["type"] == "string_type" and value is None:
        none = f" ('' for none: --set \"{key}=''\")" if _takes_empty_text(loc) else ""
        return (
            f"config error: {key} is empty: {msg}; give it text{none}, or leave the key out for its default"
        )
    if isinstance(value, dict) and value and err["type"] not in _GROUP_ERRORS:
        # ``--set run.seed.x=1``: keys under a setting that takes one value ("run.seed: Input
        # should be a valid integer" sent people to look at the seed's value).
        under = f"{key}.{next(iter(value))}"
        return f"config error: {under}: {key} takes one value, not settings under it: {msg}"
    # A value refused for carrying credentials or a key is not repeated (the error may be stored).
    if isinstance(value, dict) or "must not carry" in msg:
        return f"config error: {key}: {msg}"
    if isinstance(value, str):  # an error is printed and logged: a URL's key is not repeated
        value = redact_urls(value)
    return f"config error: {key} = {value!r}: {msg}"


def validate_config(data: dict[str, Any], origins: dict[tuple[str, ...], str] | None = None) -> Config:
    """Validate a merged dict, raising :class:`ConfigError` with one line naming the key, and
    the settings file that set it where ``origins`` knows one (a bad value in one of three
    layered files was named by key alone, and people looked in the wrong file)."""
    if not isinstance(data, dict):
        raise ConfigError("config must be a mapping of sections")
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        line = _format_validation_error(exc)
        source = _origin_of(exc, origins or {})
        if source:  # "config error in FILE: key = value: why"
            line = line.replace("config error:", f"config error in {source}:", 1)
        raise ConfigError(line) from None


def _origins(
    tree: dict[str, Any], source: str, into: dict[tuple[str, ...], str], at: tuple[str, ...] = ()
) -> None:
    """Record ``source`` as where every key of a settings layer was last set, mapping by mapping."""
    for key, value in tree.items():
        into[(*at, str(key))] = source
        if isinstance(value, dict):
            _origins(value, source, into, (*at, str(key)))


def _origin_of(exc: ValidationError, origins: dict[tuple[str, ...], str]) -> str | None:
    """The settings file that set the key the first error is about: the longest recorded key
    path its location begins with (a union's member name or a list's index is no key)."""
    err = exc.errors()[0]
    loc = tuple(str(p) for p in err["loc"] if not isinstance(p, int))
    if err["type"] == YES_NO_FOR_A_NUMBER:
        loc = (*loc, str(err["ctx"]["key"]))
    for end in range(len(loc), 0, -1):
        if loc[:end] in origins:
            return origins[loc[:end]]
    return None


def load_config(
    config_path: str | os.PathLike[str] | None = None,
    overrides: dict[str, Any] | list[str] | None = None,
    *,
    root: Path | None = None,
    use_local: bool = True,
) -> Config:
    """Load every layer and validate. ``root`` defaults to :func:`project_root`."""
    root = root if root is not None else project_root()
    files: list[Path] = []
    if root is not None:
        main = root / "config" / "main.yaml"
        files += [main] if main.is_file() else []
        files += sorted((root / "config").glob("local_*.yaml")) if use_local else []
        # Secrets for later stages (API keys) come from .env into the environment, never into
        # the config object, so they cannot leak into manifests or notebooks.
        load_env_file(root / ".env")
    files += [Path(config_path).expanduser()] if config_path else []
    merged: dict[str, Any] = {}
    origins: dict[tuple[str, ...], str] = {}
    for path in files:
        layer = _empty_groups_as_defaults(_rename_sections(read_settings_file(path), str(path)), ())
        merged = _deep_merge(merged, layer)
        _origins(layer, str(path), origins)
    # What --set or a notebook's parameters give is named by key alone: the person just typed it.
    given = _rename_sections(overrides_to_tree(overrides), "--set")
    _origins(given, "", origins)
    return validate_config(_deep_merge(merged, given), origins)
