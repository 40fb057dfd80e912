"""The package's layout rules, checked on its imports (every ``import`` statement in every module,
including those inside functions and under ``TYPE_CHECKING``: a cycle hidden in a function is
still a cycle a reader has to untangle).

* no import cycle anywhere;
* ``pipeline``, ``media`` and ``models`` know no stage (and ``media``/``models`` no pipeline);
  none of them, nor a stage, imports the whole configuration (``diffusion_bunny.config``, which
  imports every stage's settings): they are given it;
* a stage imports another stage only through what that stage declares: its package (the
  declaration), its ``settings`` (the model of its config section), its ``tables`` module
  (schemas, folders and helpers on its tables) or, for the report that shows every stage, its
  ``plots``; never its ``stage.py`` or other internals.
"""

from __future__ import annotations

import ast
from collections import defaultdict

from paths import ROOT, STAGE_ORDER

from diffusion_bunny.codegraph import imports_of, package_modules

PACKAGE = ROOT / "src" / "diffusion_bunny"
#: What one stage may import of another (the module after ``diffusion_bunny.stages.<other>``).
DECLARED = {"", "settings", "tables"}
#: The report stage draws every stage's figures with that stage's own plot code.
REPORT_MAY_USE = DECLARED | {"plots"}


def import_graph() -> dict[str, set[str]]:
    modules = package_modules()
    return {name: imports_of(path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, it = work[-1]
            nxt = next(it, None)
            if nxt is not None:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    out.append(sorted(component))
    return out


def test_the_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_import_walker_sees_imports_inside_functions(tmp_path):
    """``imports_of`` (the walker every rule here stands on) finds imports written only inside a
    function, in both forms: ``from package import module`` and ``from module import name``,
    and not those under ``if TYPE_CHECKING:`` when asked to leave them out."""
    package = tmp_path / "pkg"
    package.mkdir()
    for name in ("__init__", "b", "c", "d"):
        (package / f"{name}.py").write_text("")
    (package / "a.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from pkg import d\n"
        "def f():\n"
        "    from pkg import b  # lazy: test\n"
        "    def g():\n"
        "        from pkg.c import name  # lazy: test\n"
        "    return b, g\n"
    )
    modules = package_modules(package)
    a = package / "a.py"
    assert imports_of(a, modules, package=package) == {"pkg.b", "pkg.c", "pkg.d"}
    assert imports_of(a, modules, package=package, type_checking=False) == {"pkg.b", "pkg.c"}


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_machinery_knows_no_stage():
    bad = defaultdict(set)
    for module, targets in import_graph().items():
        mine = layer(module)
        for target in targets:
            theirs = layer(target)
            if mine in ("pipeline", "media", "models") and theirs in ("stages", "demo", "cli", "nbtools"):
                bad[module].add(target)
            if mine in ("media", "models") and theirs == "pipeline":
                bad[module].add(target)
            # The whole configuration puts every stage's settings together: the machinery and
            # the stages are given a validated one and never load it themselves.
            if mine in ("pipeline", "media", "models", "stages") and target == "diffusion_bunny.config":
                bad[module].add(target)
    assert not bad, dict(bad)


def test_stages_import_each_other_only_through_declarations():
    bad = []
    for module, targets in import_graph().items():
        parts = module.split(".")
        if len(parts) < 4 or parts[1] != "stages":
            continue
        mine = parts[2]
        allowed = REPORT_MAY_USE if mine == "report" else DECLARED
        for target in targets:
            tparts = target.split(".")
            if len(tparts) < 3 or tparts[1] != "stages" or tparts[2] == mine:
                continue
            rest = ".".join(tparts[3:])
            if rest not in allowed:
                bad.append(f"{module} -> {target}")
    assert not bad, "a stage reaches into another stage's internals:\n" + "\n".join(sorted(bad))


def test_stage_code_stays_out_of_the_demo():
    """The demo uses the stages, never the other way round: what a stage needs (extract's
    TransNetV2 calibration clips, say) lives in the stage's folder or in media/models."""
    bad = [
        f"{module} -> {target}"
        for module, targets in import_graph().items()
        if layer(module) == "stages"
        for target in targets
        if layer(target) == "demo"
    ]
    assert not bad, "stage code imports the demo:\n" + "\n".join(sorted(bad))


def test_every_stage_has_its_folder_and_files():
    """A stage is its folder: a declaration in ``__init__.py`` and a ``compute`` in ``stage.py``
    (found by that convention, :meth:`~diffusion_bunny.pipeline.contract.Stage.stage_module`),
    with no ``compute`` in the declaration."""
    for name in STAGE_ORDER:
        folder = PACKAGE / "stages" / name
        assert (folder / "__init__.py").is_file(), name
        assert (folder / "stage.py").is_file(), name
        stage_defs = {
            n.name
            for n in ast.parse((folder / "stage.py").read_text()).body
            if isinstance(n, ast.FunctionDef)
        }
        assert "compute" in stage_defs, name
        init_defs = {
            n.name
            for n in ast.parse((folder / "__init__.py").read_text()).body
            if isinstance(n, ast.FunctionDef)
        }
        assert not init_defs & {"compute", "_compute"}, name
