"""The package's import graph, read from its source (never by importing it), and the hash of the
code a module runs.

Two users:

* ``test/test_layout.py`` checks the layout rules on the graph (:func:`package_modules`,
  :func:`imports_of`: every import statement, including those inside functions and under
  ``TYPE_CHECKING``: a cycle hidden there is still a cycle a reader has to untangle);
* :func:`code_hash`: "this code changed" as a fact about the source rather than a version number
  someone has to remember to bump. A stage's manifest records the hash of the modules that compute
  its tables (:func:`diffusion_bunny.pipeline.manifest.code_hash`), and the caches kept from one
  run to the next key their entries on the hash of the modules that made them (stage 03's faces
  per frame, :meth:`diffusion_bunny.models.faces.DetectSettings.key`; stage 02's text per frame,
  :attr:`diffusion_bunny.models.text.TextDetector.key`; stage 08's images,
  :meth:`diffusion_bunny.stages.generate.render.RenderSettings.key`).

It sits at the package's top and imports nothing of the package: ``models/`` and ``media/`` may
not import ``pipeline/`` (a layout rule), yet their caches need the hash.

What :func:`code_hash` covers, starting at one module and following its imports transitively:

* imports inside functions count: the package imports its heavy modules where they are used (the
  face detectors, CLIP, diffusers), so leaving those out would leave out most of what computes;
* imports under ``if TYPE_CHECKING:`` do not: they never run, and a type named in an annotation
  computes nothing;
* only modules of the starting module's own top-level package are followed (a library upgrade
  is no code of this package; manifests record the main libraries' ``versions``), and not the
  generic machinery
  (:data:`MACHINERY`): ``pipeline/`` decides how tables are stored, locked and fingerprinted,
  not what they hold, and making every run of every stage stale for an edit there would make the
  machinery costly to touch (its correctness is its own tests' job); ``config`` (the values of
  the settings a stage reads are hashed into its manifest as ``config_hash``, so a changed
  default already makes it stale), ``errors`` and ``logs`` (messages change no table), and the
  command line and notebook helpers;
* a stage's figures and widgets (``plots.py``, ``widgets.py``, the scene board and its
  ``static/`` files) and the notebooks are not reached because no module that computes a table
  imports them; the report is the exception by its nature, its figures are its output
  (``test/pipeline/test_codegraph.py`` holds both);
* each module is hashed as its syntax tree without docstrings and line numbers: a comment, a
  docstring or a reformat makes nothing stale and invalidates no cache. The tree's form can
  differ between Python versions, so a new Python may make stages stale once (every manifest
  records the Python version too).

The hash is cached per file, on the file's size and modification time: ``bunny status`` hashes
every stage of every run, and each file is read and parsed once, while a file edited during the
process (a notebook kernel with autoreload) is read again. The cache is also kept between
processes, in the package's ``__pycache__`` beside the bytecode (``codegraph.<python>.json``):
parsing and dumping the ~20 files of stage 01's code took 0.3-0.5 s on 2 cores, paid by every
``bunny run`` twice before the stage starts (the command checks the stage, then the kernel
records its hash), now a stat of each file. A cache that cannot be read or written is ignored.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import importlib.util
import json
import os
import sys
import threading
from collections.abc import Container, Iterator
from pathlib import Path

#: The installed package's own folder (``src/diffusion_bunny``).
PACKAGE = Path(__file__).resolve().parent

#: Modules that are machinery, not computation: never part of a :func:`code_hash` (see the module
#: docstring). ``diffusion_bunny.pipeline`` stands for every module under it.
MACHINERY = frozenset(
    {
        "diffusion_bunny",
        "diffusion_bunny.pipeline",
        "diffusion_bunny.config",
        "diffusion_bunny.errors",
        "diffusion_bunny.logs",
        "diffusion_bunny.cli",
        "diffusion_bunny.nbtools",
        "diffusion_bunny.codegraph",
    }
)


# ---------------------------------------------------------------------------------- the graph


def module_name(path: Path, package: Path = PACKAGE) -> str:
    """The dotted name of the module in ``path``, a file of the top-level package ``package``."""
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules(package: Path = PACKAGE) -> dict[str, Path]:
    """Every module of the top-level package ``package``, by dotted name."""
    return {module_name(p, package): p for p in package.rglob("*.py")}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.AST, type_checking: bool) -> Iterator[ast.Import | ast.ImportFrom]:
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        elif not type_checking and isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)  # the ``else`` of ``if TYPE_CHECKING`` does run
        else:
            stack.extend(ast.iter_child_nodes(node))


def imports_of(
    path: Path,
    modules: Container[str],
    *,
    package: Path = PACKAGE,
    type_checking: bool = True,
    tree: ast.Module | None = None,
) -> set[str]:
    """The modules in ``modules`` that ``path`` imports (``from a import b`` counts as ``a.b`` when
    that is a module, else ``a``); relative imports are resolved against the module's package.
    Imports inside functions count; those under ``if TYPE_CHECKING:`` only with ``type_checking``."""
    me = module_name(path, package)
    parent = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found: set[str] = set()
    for node in _import_nodes(tree or ast.parse(path.read_bytes()), type_checking):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            base = node.module or ""
            if node.level:
                anchor = parent.rsplit(".", node.level - 1)[0] if node.level > 1 else parent
                base = f"{anchor}.{base}" if base else anchor
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        found.update(n for n in names if n in modules and n != me)
    return found


# ----------------------------------------------------------------------------------- the hash


class _OnDisk:
    """The modules of one top-level package as a container, looked up on disk (a module added
    while the process runs is found)."""

    def __init__(self, package: Path):
        self.package = package

    def path(self, name: str) -> Path | None:
        top, _, rest = name.partition(".")
        if top != self.package.name:
            return None
        folder = self.package.joinpath(*rest.split(".")) if rest else self.package
        if rest and folder.with_suffix(".py").is_file():
            return folder.with_suffix(".py")
        init = folder / "__init__.py"
        return init if init.is_file() else None

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.path(name) is not None


def is_machinery(name: str) -> bool:
    """Whether module ``name`` is left out of every :func:`code_hash` (:data:`MACHINERY`)."""
    return name in MACHINERY or name.startswith("diffusion_bunny.pipeline.")


class _Strip(ast.NodeTransformer):
    """Removes docstrings: they explain the code and change nothing it computes."""

    def generic_visit(self, node: ast.AST) -> ast.AST:
        super().generic_visit(node)
        body = getattr(node, "body", None)
        if (
            isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
            and isinstance(body, list)
            and body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)
        ):
            node.body = body[1:]  # type: ignore[attr-defined]
        return node


#: Per file: (size, mtime) it was read at, the package's modules it imports when it runs, and the
#: digest of its code.
_PARSED: dict[Path, tuple[tuple[int, int], frozenset[str], str]] = {}
_LOCK = threading.Lock()
#: The packages whose cache file this process has read.
_LOADED: set[Path] = set()


def _cache_file(package: Path) -> Path:
    """Where :data:`_PARSED` is kept between processes for ``package``: per Python version, as the
    syntax tree's form (and so the digest) may differ between versions."""
    return package / "__pycache__" / f"codegraph.{sys.implementation.cache_tag}.json"


def _load(package: Path) -> None:
    with _LOCK:
        if package in _LOADED:
            return
        _LOADED.add(package)
    try:
        entries = json.loads(_cache_file(package).read_text())
        loaded = {
            package.parent / name: ((int(size), int(mtime)), frozenset(imports), str(digest))
            for name, (size, mtime, imports, digest) in entries.items()
        }
    except (OSError, ValueError, TypeError):  # none yet, or unreadable: parsed again
        return
    with _LOCK:
        for path, entry in loaded.items():
            _PARSED.setdefault(path, entry)


def _save(package: Path) -> None:
    with _LOCK:
        entries = {
            str(path.relative_to(package.parent)): [*stamp, sorted(imports), digest]
            for path, (stamp, imports, digest) in _PARSED.items()
            if path.is_relative_to(package)
        }
    target = _cache_file(package)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}")
    with contextlib.suppress(OSError):  # a read-only install: parsed again next time
        target.parent.mkdir(exist_ok=True)
        tmp.write_text(json.dumps(entries))
        tmp.replace(target)  # whole, for a process reading it meanwhile
    with contextlib.suppress(OSError):
        tmp.unlink(missing_ok=True)


def _parsed(path: Path, modules: _OnDisk) -> tuple[frozenset[str], str, bool]:
    """``path``'s imports and digest, and whether it was parsed now (not found in the cache)."""
    stat = path.stat()
    stamp = (stat.st_size, stat.st_mtime_ns)
    with _LOCK:
        cached = _PARSED.get(path)
    if cached is not None and cached[0] == stamp:
        return cached[1], cached[2], False
    tree = ast.parse(path.read_bytes())
    imports = frozenset(imports_of(path, modules, package=modules.package, type_checking=False, tree=tree))
    digest = hashlib.sha256(ast.dump(_Strip().visit(tree)).encode()).hexdigest()
    with _LOCK:
        _PARSED[path] = (stamp, imports, digest)
    return imports, digest, True


def _package_of(module: str) -> Path:
    top = module.partition(".")[0]
    spec = importlib.util.find_spec(top)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"{top} is not a package on the path")
    return Path(next(iter(spec.submodule_search_locations))).resolve()


def _walk(
    module: str, package: Path | None, leave_out: frozenset[str] = frozenset()
) -> dict[str, tuple[Path, str]]:
    """``module`` and the modules it computes with, each with its file and its code's digest;
    the modules of ``leave_out`` are not followed (a detector the settings did not choose)."""
    on_disk = _OnDisk(package or _package_of(module))
    start = on_disk.path(module)
    if start is None:
        raise ModuleNotFoundError(f"no source file for module {module}")
    _load(on_disk.package)
    found: dict[str, tuple[Path, str]] = {}
    queued = {module: start}
    todo = [module]
    parsed = False
    while todo:
        name = todo.pop()
        imports, digest, new = _parsed(queued[name], on_disk)
        parsed |= new
        found[name] = (queued[name], digest)
        for other in sorted(imports):
            skip = other in queued or other in leave_out or is_machinery(other)
            other_path = None if skip else on_disk.path(other)
            if other_path is not None:
                queued[other] = other_path
                todo.append(other)
    if parsed:
        _save(on_disk.package)
    return found


def _chosen(
    module: str, package: Path | None, choices: tuple[tuple[frozenset[str], str], ...]
) -> dict[str, tuple[Path, str]]:
    """What :func:`code_hash` covers: ``module``'s code without any module of a choice, then the
    chosen module of each choice and what it imports (its own choices' other modules included:
    they are code the chosen one runs)."""
    leave_out = frozenset().union(*(options for options, _ in choices))
    found = _walk(module, package, leave_out)
    for _, chosen in choices:
        found.update(_walk(chosen, package))
    return found


def computing_modules(
    module: str,
    package: Path | None = None,
    choices: tuple[tuple[frozenset[str], str], ...] = (),
) -> dict[str, Path]:
    """``module`` and every module of its package it imports, transitively, leaving out the
    machinery: what :func:`code_hash` covers, by name (read from the source; nothing imported).
    ``package``: the folder of ``module``'s top-level package (default: where Python finds it)."""
    return {name: path for name, (path, _) in sorted(_chosen(module, package, choices).items())}


def code_hash(
    module: str,
    package: Path | None = None,
    choices: tuple[tuple[frozenset[str], str], ...] = (),
) -> str:
    """A 16-hex-digit hash of the code ``module`` runs: its own and that of every module of its
    package it imports (see the module docstring for what is followed and what is not). The
    files' places are not part of it: a copy of the package hashes the same.

    ``choices``: ``(modules, chosen)`` pairs, one per setting that chooses one of several
    modules (a detector): only the chosen one, and what it imports, is covered."""
    h = hashlib.sha256()
    for name, (_, digest) in sorted(_chosen(module, package, choices).items()):
        h.update(f"{name}\0{digest}\n".encode())
    return h.hexdigest()[:16]
