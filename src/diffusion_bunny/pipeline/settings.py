"""The settings every run has, whatever its stages, and the settings files' own rules.

The machinery (:mod:`diffusion_bunny.pipeline`) runs a pipeline on a :class:`RunConfig`: the
sections it reads itself (``run``, ``engine``, ``pipeline``) and the hash of the sections each
stage declares. The whole configuration, with every stage's section, is
:class:`diffusion_bunny.config.Config`, a subclass put together above the stages (it imports
their models); the machinery never imports it, so it knows no stage. The history of the
settings files' section names (:data:`SECTION_ALIASES`) is here because the manifests record a
renamed section under its old name (:func:`recorded_name`) and a widget's saved settings must
not hold a key under both names (:func:`save_local_settings`).
"""

from __future__ import annotations

import contextlib
import hashlib
import html
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import Field, field_validator

from diffusion_bunny.errors import ConfigError, UserError
from diffusion_bunny.paths import workspace_root
from diffusion_bunny.pipeline.atomic import atomic_write_bytes
from diffusion_bunny.section import Section

#: What a folder run takes for a movie: besides the usual, a Blu-ray's and a camcorder's MPEG-TS
#: (``.m2ts``, ``.mts``), phones' ``.3gp``, Ogg and broadcast MXF (a folder of them "held no video").
VIDEO_EXTENSIONS = (
    ".mp4",
    ".m4v",
    ".mkv",
    ".mov",
    ".avi",
    ".webm",
    ".mpg",
    ".mpeg",
    ".ts",
    ".wmv",
    ".flv",
    ".m2ts",
    ".mts",
    ".3gp",
    ".ogv",
    ".mxf",
)

#: Sections renamed: old name -> new name. The old name still loads (any YAML layer, ``--set``),
#: mapped to the new one with a warning; the same key under both names in one layer is an error.
SECTION_ALIASES = {
    "filtering": "quality",
    "extraction": "extract",
    "captioning": "captions",
    "training": "train",
    "generation": "generate",
}
#: A renamed section is recorded in the stages' manifests under its old name, so a finished run
#: stays done across the rename (its settings' hash is unchanged): new name -> recorded name.
RECORDED_AS = {new: old for old, new in SECTION_ALIASES.items() if old != "filtering"}


def recorded_name(declared: str) -> str:
    """How a manifest records a declared section or key (``extract.motion_threshold`` ->
    ``extraction.motion_threshold``): under the name the section had when runs began recording it."""
    section, dot, key = declared.partition(".")
    return RECORDED_AS.get(section, section) + dot + key


class RunSettings(Section):
    """Settings of a whole run, shared by every stage."""

    #: The captions' sampling seed (stage 05), recorded in every manifest; the stages that draw
    #: at random have seeds of their own (``scenes.seed``, ``export.seed``, ``train.seed``...).
    seed: int = Field(0, ge=0)
    video_extensions: tuple[str, ...] = VIDEO_EXTENSIONS
    kernel: str = "python3"

    @field_validator("video_extensions")
    @classmethod
    def _as_suffixes(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        """Each extension as a movie's suffix (``.mp4``): a folder's movies are found by
        ``Path.suffix``, so ``[mp4, mkv]`` (no dot) or ``[]`` matched nothing, and a folder of
        movies ran none."""
        joined = next((e for e in value if "," in e), None)
        if joined is not None:  # ``--set run.video_extensions=mp4,mkv``: one extension '.mp4,mkv'
            raise ValueError(f"a list is written in brackets: [{joined}]")
        out = tuple(dict.fromkeys("." + e.strip().lower().lstrip(".") for e in value))
        if not out or "." in out:
            raise ValueError("give one or more extensions, none blank, e.g. [.mp4, .mkv]")
        return out


class PathsSettings(Section):
    """Where a run's files go. ``output_dir`` was ``run.output_dir``, which still loads, with one
    warning (``MOVED_KEYS`` of :mod:`diffusion_bunny.config`)."""

    #: Where ``bunny run MOVIE`` makes ``<output_dir>/<movie_id>/`` (relative to the workspace
    #: unless absolute).
    output_dir: str = "data/output"

    @field_validator("output_dir")
    @classmethod
    def _names_a_folder(cls, value: str) -> str:
        """A blank folder is ``Path("")``, the current folder: run folders went into the checkout."""
        if not value.strip():
            raise ValueError("must name a folder; leave the key out for the default (data/output)")
        return value


class EngineSettings(Section):
    """How ``bunny run`` processes the movies of a folder: one after another in this process
    (``local``) or as one Ray task per movie (``ray``). Not part of any stage's config hash, so
    switching engines never makes a stage stale."""

    kind: Literal["local", "ray"] = "local"
    address: str | None = None
    num_cpus: int | None = Field(None, ge=1, le=4096)
    cpus_per_movie: float = Field(1.0, gt=0.0, le=4096.0)
    object_store_mb: int = Field(256, ge=75, le=1_000_000)
    #: Seconds one movie's Ray task may take; None: from ``pipeline.stage_timeout_s`` (engine.task_timeout).
    task_timeout_s: float | None = Field(None, gt=0.0, le=366 * 86_400.0)


class PipelineSettings(Section):
    """How any run behaves, whatever its stages: how long a stage notebook may take before it
    counts as hung, and when another machine's lock on a run folder counts as abandoned. Not part
    of any stage's config hash."""

    #: Seconds one stage notebook may run before its kernel is stopped: ``auto`` (scaled to the
    #: movie's length: :attr:`stage_timeout_base_s` + :attr:`stage_timeout_per_minute_s` per minute
    #: of movie, see ``runner.stage_timeout``), a number, or None (no limit). Why scaled: a fixed
    #: day let a hung stage on a two-minute clip sit for 24 h (and a Ray task nine days).
    stage_timeout_s: Literal["auto"] | Annotated[float, Field(gt=0.0, le=366 * 86_400.0)] | None = "auto"
    #: ``auto``: what any stage may take whatever the movie's length (a model's download, a
    #: training on a GPU).
    stage_timeout_base_s: float = Field(14_400.0, gt=0.0, le=366 * 86_400.0)
    #: ``auto``: and this many seconds per minute of movie (a paid caption provider at 60 requests a
    #: minute takes ~42 s for a minute's kept frames; the other stages a few seconds).
    stage_timeout_per_minute_s: float = Field(60.0, ge=0.0, le=86_400.0)
    #: Seconds without a heartbeat after which another host's lock on a run folder is taken over.
    lock_stale_s: float = Field(120.0, ge=10.0, le=86_400.0)


class RunConfig(Section):
    """The sections the machinery reads itself; :class:`diffusion_bunny.config.Config` adds one
    section per stage."""

    run: RunSettings = RunSettings()
    paths: PathsSettings = PathsSettings()
    engine: EngineSettings = EngineSettings()
    pipeline: PipelineSettings = PipelineSettings()

    def section_values(self, *declared: str) -> dict[str, Any]:
        """The values of whole sections (``quality``) and single keys (``run.seed``), as JSON:
        what a stage's manifest records of the settings it declared."""
        out: dict[str, Any] = {}
        for name in sorted(declared):
            section, _, key = name.partition(".")
            value = getattr(self, section).model_dump(mode="json")
            out[recorded_name(name)] = value[key] if key else value
        return out

    def section_hash(self, *declared: str) -> str:
        """A stable hash of the declared sections and keys, so a stage reruns only when its own
        settings move."""
        blob = json.dumps(self.section_values(*declared), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def output_root(cfg: RunConfig) -> Path:
    """The folder that holds one run folder per movie (``paths.output_dir``, relative to the
    workspace unless absolute; ``~`` is the home folder, as in the other folder settings: it
    made a folder named ``~`` in the workspace)."""
    out = Path(cfg.paths.output_dir).expanduser()
    return out if out.is_absolute() else workspace_root() / out


_BOOL, _INT, _FLOAT = "tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
_TIMESTAMP = "tag:yaml.org,2002:timestamp"


class Yaml12Loader(yaml.SafeLoader):
    """YAML 1.2's core schema for a ``--set`` value and a settings file: PyYAML reads YAML 1.1,
    where ``yes``, ``no``, ``on`` and ``off`` are booleans and ``010`` is octal 8 (``--set
    run.seed=010`` gave seed 8, ``--set generate.negative_prompt=no`` the boolean False; a file
    and ``--set`` read one value alike), and a float needs a dot (``1e4`` was the text '1e4'). A
    setting that is a boolean still takes ``yes``/``no``. Nor has YAML 1.2 dates: a trigger word
    ``2024-01-01`` was ``datetime.date(2024, 1, 1)`` and refused as no text."""

    yaml_implicit_resolvers: ClassVar[dict[str, list[tuple[str, re.Pattern[str]]]]] = {
        first: [(tag, rx) for tag, rx in resolvers if tag not in (_BOOL, _INT, _FLOAT, _TIMESTAMP)]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }


Yaml12Loader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
# The core schema's integers: decimal, 0o octal and 0x hexadecimal (a seed written 0xC0FFEE).
Yaml12Loader.add_implicit_resolver(
    _INT, re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$"), list("-+0123456789")
)
Yaml12Loader.add_constructor(_INT, lambda loader, node: _core_int(loader.construct_scalar(node)))
# The core schema's floats, after its integers (``10`` is an integer): ``1e4`` and ``1.`` too, and
# ``.inf``, ``.nan``; not YAML 1.1's ``1_000.5`` or sexagesimal ``1:30.5``.
Yaml12Loader.add_implicit_resolver(
    _FLOAT,
    re.compile(
        r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+.0123456789"),
)


def _core_int(text: str) -> int:
    """A YAML 1.2 core-schema integer: ``010`` is ten (not YAML 1.1's octal 8), ``0o10`` eight."""
    if text.startswith("0o"):
        return int(text[2:], 8)
    if text.startswith("0x"):
        return int(text[2:], 16)
    return int(text)


def parse_override(text: str, text_setting: Callable[[str], bool] | None = None) -> tuple[str, Any]:
    """Split ``section.key=value``; the value is read as YAML 1.2 (:class:`Yaml12Loader`) so
    numbers, booleans, null and lists keep their types (``--set extract.detector.threshold=30``).
    A ``#`` in a plain value is text, not a YAML comment (``negative_prompt=blurry #2`` lost its
    ``#2``, and ``=#blurry`` became null). For a key ``text_setting`` says takes text (the
    machinery knows no stage's settings: the configuration says which), a value YAML reads as
    something else is the text as typed: ``captions.trigger_word=2024`` was refused as "not a
    valid string" and ``negative_prompt=- blurry`` became a list; quoted, null, or already text,
    YAML's reading stands."""
    key, value = _parse_override(text)
    raw = text.partition("=")[2].strip()
    if text_setting is None:
        return key, value
    if value is not None and not isinstance(value, str) and text_setting(key):
        value = raw
    elif value == raw and raw.startswith("[") and raw.endswith("]") and not text_setting(key):
        # A list YAML could not read (``generate.prompts=[{trigger} a, {trigger} b]``: a brace
        # opens a mapping in YAML) was kept as one text, then taken as a list of one: one prompt,
        # brackets and all, drawn without a word.
        raise ConfigError(
            f"config error: {key} = {raw!r}: this list could not be read (a '{{', ':' or '#' in an "
            'item ends it); put each item in quotes: ["...", "..."]'
        )
    return key, value


def _parse_override(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or "." not in key or not all(key.split(".")):
        raise ConfigError(f"override '{text}' must look like section.key=value")
    if "#" in raw and not raw.lstrip().startswith(("[", "{", "'", '"')):  # quoted: YAML's own way
        return key, raw.strip()
    try:
        value = yaml.load(raw, Loader=Yaml12Loader) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key, value


class _DuplicateKey(yaml.YAMLError):
    """A key written twice in one mapping of a settings file (:class:`_SettingsLoader`)."""

    def __init__(self, key: Any, first: int, again: int):
        super().__init__(key, first, again)
        self.key, self.first, self.again = key, first, again


class _SettingsLoader(Yaml12Loader):
    """A settings file's loader: YAML 1.2, as ``--set`` (``seed: 010`` is 10, not octal 8), and a
    key written twice in one mapping is an error (PyYAML keeps the last one, so a section written
    twice silently lost everything the first one set). A merge key (``<<``) still overrides what
    it brings in, as YAML says."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                if key in seen:
                    raise _DuplicateKey(key, seen[key], key_node.start_mark.line + 1)
                seen[key] = key_node.start_mark.line + 1
            except TypeError:
                continue  # an unhashable key: the base class says so
        return super().construct_mapping(node, deep=deep)


def read_settings_file(path: Path) -> dict[str, Any]:
    """One settings file's sections; a section written with nothing under it (``extract:``)
    sets nothing (it was refused as "not a valid dictionary")."""
    try:
        # Bytes, so that PyYAML reads the encoding from a byte-order mark: Windows' Notepad and
        # PowerShell's `>` save UTF-16, which read as UTF-8 stopped the run with a bug.
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror}") from None
    try:
        data = yaml.load(raw, Loader=_SettingsLoader)  # a SafeLoader: no Python objects
    except _DuplicateKey as dup:
        raise ConfigError(
            f"config file {path} sets '{dup.key}' twice (line {dup.first} and line {dup.again}); only "
            f"the last one would count: write it once"
        ) from None
    except yaml.reader.ReaderError:
        raise ConfigError(
            f"config file {path} is not UTF-8 text (nor UTF-16 with its byte-order mark); save it as UTF-8"
        ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"config file {path} is not valid YAML{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, not {type(data).__name__}")
    return {section: {} if values is None else values for section, values in data.items()}


def save_local_settings(name: str, settings: dict[str, dict[str, Any]], root: Path | None = None) -> Path:
    """Merge ``settings`` into ``config/local_<name>.yaml`` (git-ignored), the layer that makes
    a headless rerun reproduce what a person chose in a widget."""
    root = root if root is not None else workspace_root()
    path = root / "config" / f"local_{name}.yaml"
    current: dict[str, Any] = {}
    if path.is_file():
        # Read as the settings files are (:func:`read_settings_file`: YAML 1.2, a byte-order mark,
        # a section with nothing under it): read otherwise, a user's `picture_box: off` was
        # written back as `false`, a UTF-16 file or an empty `quality:` stopped the save with a
        # traceback the widget's button never showed.
        current = read_settings_file(path)
    for old, new in SECTION_ALIASES.items():
        # A file written before a section was renamed: its settings move to the new name (the
        # values being saved win), so the file never holds a key under both names.
        if isinstance(current.get(old), dict):
            current[new] = {**current.pop(old), **(current.get(new) or {})}
    for section, values in settings.items():
        name = SECTION_ALIASES.get(section, section)
        if not isinstance(current.setdefault(name, {}), dict):  # `quality: 5` written by hand
            raise ConfigError(f"{path}: section '{name}' is not a mapping of settings; fix or remove it")
        current[name].update(values)
    body = yaml.safe_dump(current, sort_keys=True)
    atomic_write_bytes(path, (LOCAL_SETTINGS_HEADER + body).encode())
    return path


#: What a widget's saved line tells a person to do: the notebook read its settings once, in its
#: config cell, so rerunning the stage's cell alone kept the old ones ("up to date").
RERUN_HINT = (
    "rerun the notebook from its config cell (or bunny run) to apply it: stage {stage}'s cell alone "
    "still has the settings read before"
)


def save_from_widget(
    name: str, settings: dict[str, dict[str, Any]], root: Path | None, stage: str
) -> tuple[Path | None, str]:
    """:func:`save_local_settings` for a widget's button: the file (None when it could not be
    saved) and the line to show under the button (HTML), which says why not, or what to rerun.
    Shown: a traceback of a button's callback goes to JupyterLab's log console, unseen."""
    try:
        path = save_local_settings(name, settings, root)
    except (UserError, OSError) as exc:
        return None, f"<span style='color:#C0392B'>not saved: {html.escape(str(exc))}</span>"
    return path, f"saved to <code>{path}</code>; {RERUN_HINT.format(stage=stage)}"


def dotted_overrides(
    overrides: Any,
    text_setting: Callable[[str], bool] | None = None,
    group: Callable[[str], bool] | None = None,
) -> dict[str, Any]:
    """A notebook's ``overrides`` as ``{dotted key: value}``, whatever form they came in:
    papermill's ``-p overrides '{...}'`` hands the text (``dict()`` of it raised "dictionary
    update sequence element #0", in the notebook's config and in notebooks 01 and 02's widgets),
    ``--set``'s list of ``key=value`` is as ``bunny run`` reads it, and a nested mapping
    (``{"characters": {"frames": "all"}}``) is flattened: merged as one key over the last run's
    dotted ones, it took the whole section's place and dropped the recorded
    ``characters.reference_dir`` (every name lost), and a widget did not see that it hid a saved
    threshold. ``group`` says which keys hold settings under them (the configuration knows;
    without it, the sections): a mapping that is one setting's value
    (``captions.character_descriptions``, whose names may hold a dot) stays one key."""
    is_group = group or (lambda dotted: "." not in dotted)
    if overrides is None:
        return {}
    if isinstance(overrides, str):
        try:
            overrides = yaml.load(overrides, Loader=Yaml12Loader) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(
                f"overrides is not a mapping of settings ({str(exc).splitlines()[0]}); pass "
                "{'section.key': value} (papermill: -y '{\"overrides\": {...}}')"
            ) from None
    if isinstance(overrides, list | tuple):
        return dict(parse_override(str(item), text_setting) for item in overrides)
    if not isinstance(overrides, dict):
        raise ConfigError(
            f"overrides must be a mapping of settings ({{'section.key': value}}), "
            f"not {type(overrides).__name__}"
        )

    def flat(given: dict[str, Any], prefix: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in given.items():
            dotted = f"{prefix}{key}"
            if isinstance(value, dict) and value and is_group(dotted):
                out.update(flat(value, f"{dotted}."))
            else:
                out[dotted] = value
        return out

    return flat(overrides, "")


def later_layers(config_path: str | Path | None, overrides: dict[str, Any], section: str) -> dict[str, Any]:
    """The ``section`` settings a notebook's ``config_path`` (its ``section``) and ``overrides``
    (``section.<key>``) set: loaded after ``config/local_*.yaml``, they win over a widget's saved
    choice. Read here as they are written (a stage is given its configuration, and never loads the
    whole of it), under the section's old names too (``filtering`` for ``quality``, which still
    loads: a saved choice it hid went unwarned)."""
    names = [old for old, new in SECTION_ALIASES.items() if new == section] + [section]
    out: dict[str, Any] = {}
    if config_path is not None and Path(config_path).expanduser().is_file():
        with contextlib.suppress(UserError):  # a broken file is the run's to report
            sections = read_settings_file(Path(config_path).expanduser())
            for name in names:
                values = sections.get(name)
                out.update(values if isinstance(values, dict) else {})
    for name in names:
        out.update({k.split(".", 1)[1]: v for k, v in overrides.items() if k.startswith(f"{name}.")})
    return out


def overridden_note(
    section: str,
    saved: dict[str, Any],
    config_path: str | Path | None,
    overrides: dict[str, Any],
    same: Callable[[str, Any, Any], bool] | None = None,
) -> str:
    """The line a widget adds under "saved to" when the notebook's own ``config_path`` or
    ``overrides`` set one of the ``saved`` settings otherwise (they win over the saved file, so
    the choice would silently not apply); empty when none does. ``same(key, a, b)``: whether two
    values mean one setting (the section's model knows: ``best_per_batch`` 0 is null, "keep
    all", and the line said a recorded 0 hid the saved null)."""
    alike = same or (lambda _key, a, b: a == b)
    lost = [
        f"{section}.{k}"
        for k, v in later_layers(config_path, overrides, section).items()
        if k in saved and not alike(k, v, saved[k])
    ]
    if not lost:
        return ""
    return (
        f"<br><span style='color:#C0392B'>but {', '.join(lost)} {'is' if len(lost) == 1 else 'are'} "
        "set by this notebook's config_path or overrides (or bunny run --config/--set), which "
        "win over the saved file: change or remove them there</span>"
    )


#: The first lines of a ``config/local_<name>.yaml``: the widgets rewrite the file whole (its
#: values kept, comments not), and a person who wrote a note there lost it without a word.
LOCAL_SETTINGS_HEADER = (
    "# Written by the workspace's widgets (notebooks 01 and 02) each time a setting is saved there:\n"
    "# the values are kept, comments are not. Keep notes in config/main.yaml or a local_*.yaml of your own.\n"
)
