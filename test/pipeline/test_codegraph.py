"""A stage's code hash covers what computes its tables, and only that: its ``stage`` module and
what that imports (face detectors in ``models/`` included), not its figures, widgets, board, a
comment, another stage's compute or the machinery. Edits are made to copies, never to the source.
The caches kept across runs key on the same hash of the code that fills them."""

from __future__ import annotations

import ast
import shutil
import textwrap
from pathlib import Path

import pytest

from diffusion_bunny import codegraph
from diffusion_bunny.config import load_config
from diffusion_bunny.registry import FACE_DETECTORS, SHOT_DETECTORS
from diffusion_bunny.stages import PIPELINE

#: The default settings (cascade, centerface).
CFG = load_config(None, {}, use_local=False)


def _append(path: Path, text: str) -> None:
    path.write_text(path.read_text() + text)


@pytest.fixture
def copy(tmp_path, monkeypatch) -> Path:
    """A copy of the package's source that every code hash reads instead of the package."""
    dst = tmp_path / "diffusion_bunny"
    shutil.copytree(codegraph.PACKAGE, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    real = {stage.name: stage.code(CFG) for stage in PIPELINE.stages}
    monkeypatch.setattr(codegraph, "_package_of", lambda module: dst)
    # Where the files are is not part of the hash.
    assert {stage.name: stage.code(CFG) for stage in PIPELINE.stages} == real
    return dst


def test_a_stage_is_stale_for_what_computes_it_and_only_that(copy):
    def codes() -> dict[str, str]:
        return {stage.name: stage.code(CFG) for stage in PIPELINE.stages}

    def changed(before: dict[str, str], after: dict[str, str]) -> set[str]:
        return {name for name in after if after[name] != before[name]}

    before = codes()
    # A stage's figures: only the report, whose figures are its output, changes.
    _append(copy / "stages" / "quality" / "plots.py", "\nBINS = 99\n")
    after = codes()
    assert changed(before, after) == {"report"}
    before = after
    # Widgets, the board and its static files, comments and docstrings: nothing.
    _append(copy / "stages" / "characters" / "widgets.py", "\nCOLUMNS = 9\n")
    _append(copy / "stages" / "scenes" / "board.py", "\nWIDTH = 9\n")
    for static in (copy / "stages" / "scenes" / "static").iterdir():
        _append(static, "\n/* restyled */\n")
    _append(copy / "stages" / "characters" / "stage.py", "\n# A comment.\n")
    stage_py = copy / "stages" / "quality" / "stage.py"
    stage_py.write_text(stage_py.read_text().replace('"""Stage 02', '"""Stage two', 1))
    # The machinery that stores tables computes none of them.
    _append(copy / "pipeline" / "run.py", "\nSPARE = 1\n")
    assert codes() == before, "a widget, comment or machinery edit changed a code hash"

    # What every face detector goes through in models/: stage 03, stage 08 (which finds faces in
    # its images) and the report (which draws faces) change.
    _append(copy / "models" / "face_detect.py", "\nSPARE = 1\n")
    after = codes()
    assert changed(before, after) == {"characters", "generate", "report"}

    # Another stage's compute is not this stage's code.
    before = after
    _append(copy / "stages" / "scenes" / "stage.py", "\nSPARE = 1\n")
    assert changed(before, codes()) == {"scenes"}


def _module_file(copy: Path, module: str) -> Path:
    return copy.joinpath(*module.split(".")[1:]).with_suffix(".py")


@pytest.mark.parametrize(
    ("setting", "registry"), [("characters.detector", FACE_DETECTORS), ("extract.detector", SHOT_DETECTORS)]
)
def test_a_stage_is_stale_for_the_detector_it_runs_and_not_the_others(copy, setting, registry):
    """Each registered detector's module edited in turn: with that detector chosen, the stages
    that run it go stale; with another chosen, they do not, unless the chosen one runs that
    module's code too (CenterFace uses MTCNN's non-maximum suppression)."""
    runs_it = {"characters.detector": {"characters", "generate"}, "extract.detector": {"extract"}}[setting]
    for name in registry.names():
        module = registry.get(name).module
        chosen = load_config(None, {setting: name}, use_local=False)
        for cfg in (chosen, CFG):
            before = {stage.name: stage.code(cfg) for stage in PIPELINE.stages}
            original = _module_file(copy, module).read_text()
            _append(_module_file(copy, module), "\nSPARE = 1\n")
            after = {stage.name: stage.code(cfg) for stage in PIPELINE.stages}
            _module_file(copy, module).write_text(original)
            stale = {s for s in after if after[s] != before[s]}
            default = CFG.extract.detector if setting == "extract.detector" else CFG.characters.detector
            runs = cfg is chosen or module in codegraph.computing_modules(registry.get(default.name).module)
            # The report draws faces from the whole face-finding code: it does not choose.
            expected = (runs_it if runs else set()) | ({"report"} if "report" in stale else set())
            assert stale == expected, (name, "chosen" if cfg is chosen else "default", stale)
    # CenterFace runs MTCNN's code; none of the detectors runs another's otherwise.
    assert "diffusion_bunny.models.mtcnn" in codegraph.computing_modules("diffusion_bunny.models.centerface")


def test_only_the_report_draws_figures_among_what_computes():
    """The rule above holds because no compute module imports a figure or a widget; the report is
    the exception, its figures are its output (an edited plot makes the report stale)."""
    presentation = ("plots", "widgets", "board")
    for stage in PIPELINE.stages:
        modules = codegraph.computing_modules(f"{stage.package}.stage")
        shown = sorted(m for m in modules if m.rpartition(".")[2] in presentation)
        assert not any(codegraph.is_machinery(m) for m in modules), stage.name
        if stage.name == "report":
            assert "diffusion_bunny.stages.quality.plots" in shown
        else:
            assert shown == [], f"stage {stage.name} computes with {shown}"
    characters = codegraph.computing_modules("diffusion_bunny.stages.characters.stage")
    assert {
        "diffusion_bunny.models.face_detect",
        "diffusion_bunny.models.mtcnn",
        "diffusion_bunny.models.centerface",
    } <= set(characters)


PROBE = {
    "__init__.py": '"""A probe package."""\n',
    "compute.py": '''
        """What computes."""
        from typing import TYPE_CHECKING

        from probe_pkg import helper

        if TYPE_CHECKING:
            from probe_pkg import typed
        else:
            from probe_pkg import untyped


        def run():
            from probe_pkg.lazy import go

            return go() + helper.one()
        ''',
    "helper.py": "def one():\n    return 1\n",
    "lazy.py": "def go():\n    return 2\n",
    "typed.py": "class T: ...\n",
    "untyped.py": "X = 1\n",
    "plots.py": "from probe_pkg import compute\n",
}


@pytest.fixture
def probe(tmp_path) -> Path:
    pkg = tmp_path / "probe_pkg"
    pkg.mkdir()
    for name, text in PROBE.items():
        (pkg / name).write_text(textwrap.dedent(text).lstrip())
    return pkg


def test_the_walk_follows_imports_in_functions_and_leaves_type_checking_out(probe):
    found = codegraph.computing_modules("probe_pkg.compute", probe)
    assert set(found) == {f"probe_pkg.{m}" for m in ("compute", "helper", "lazy", "untyped")}
    # The layout test's graph keeps every import, TYPE_CHECKING included (a cycle there is one).
    graph = codegraph.imports_of(probe / "compute.py", codegraph.package_modules(probe), package=probe)
    assert "probe_pkg.typed" in graph and "probe_pkg.lazy" in graph


def test_the_hash_reads_each_file_once_per_process_until_it_changes(probe, monkeypatch):
    first = codegraph.code_hash("probe_pkg.compute", probe)
    parsed: list[int] = []
    real_parse = ast.parse
    monkeypatch.setattr(codegraph.ast, "parse", lambda *a, **k: parsed.append(1) or real_parse(*a, **k))
    assert codegraph.code_hash("probe_pkg.compute", probe) == first and parsed == []
    _append(probe / "lazy.py", "\n# A comment is no code.\n")
    assert codegraph.code_hash("probe_pkg.compute", probe) == first and len(parsed) == 1
    _append(probe / "lazy.py", "\ndef stop():\n    return 3\n")
    second = codegraph.code_hash("probe_pkg.compute", probe)
    assert second != first
    _append(probe / "typed.py", "\nY = 2\n")  # imported only for type checking
    _append(probe / "plots.py", "\nZ = 3\n")  # imports the compute module, not imported by it
    assert codegraph.code_hash("probe_pkg.compute", probe) == second


def test_the_caches_kept_across_runs_key_on_the_code_that_fills_them(monkeypatch):
    """Stage 03's faces per frame, stage 02's text per frame and stage 08's images are reused
    from the last run only while the code that made them is the same (no version to bump)."""
    from diffusion_bunny.models import faces, text
    from diffusion_bunny.stages.generate import render
    from diffusion_bunny.stages.generate.grid import GridItem

    assert {
        "diffusion_bunny.models.face_detect",
        "diffusion_bunny.models.mtcnn",
        "diffusion_bunny.models.centerface",
    } <= set(codegraph.computing_modules(faces.__name__))
    assert "diffusion_bunny.models.diffusion" in codegraph.computing_modules(render.__name__)
    settings = faces.DetectSettings()
    item = GridItem("a", 0, "a portrait", 0, 1.0, "final", None)
    look = render.RenderSettings("tiny", "", 2, 7.5, 64, 64)

    def detector():  # no model loaded: its key reads one file only
        unloaded = object.__new__(text.TextDetector)
        unloaded._model_path = Path(text.__file__)
        return unloaded

    # A detector works its key out once (every frame carries it); the next run's detector sees
    # the edited code.
    keys = (settings.key(), look.key(item, None), detector().key)
    for module in (faces, render, text):
        monkeypatch.setattr(module, "code_hash", lambda name, **kwargs: "edited")
    assert settings.key() != keys[0] and look.key(item, None) != keys[1] and detector().key != keys[2]


def test_the_parsed_files_are_kept_between_processes_and_an_edit_is_read_again(copy, monkeypatch):
    """A new process (here: the per-process cache emptied) finds every file's digest in the
    package's cache file instead of parsing the files again; an edited file is parsed again."""
    first = codegraph.code_hash("diffusion_bunny.stages.extract.stage")
    assert codegraph._cache_file(copy).is_file()
    monkeypatch.setattr(codegraph, "_PARSED", {})
    monkeypatch.setattr(codegraph, "_LOADED", set())
    parsed: list[int] = []
    real_parse = ast.parse

    def counted(source, *args, **kwargs):
        parsed.append(1)
        return real_parse(source, *args, **kwargs)

    monkeypatch.setattr(codegraph.ast, "parse", counted)
    assert codegraph.code_hash("diffusion_bunny.stages.extract.stage") == first
    assert parsed == []  # nothing parsed: every file came from the cache file
    _append(copy / "stages" / "extract" / "keyframes.py", "\nEDITED = 1\n")
    assert codegraph.code_hash("diffusion_bunny.stages.extract.stage") != first
    assert parsed == [1]  # the edited file, and only it
