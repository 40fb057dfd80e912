"""The stage contract on a toy pipeline (no real stage): declarations drive the missing-input
message, the fingerprints and the settings a stage may read; manifests cannot lie about code,
outputs or a stage killed halfway."""

from __future__ import annotations

import importlib
import inspect
import json
import shutil
import sys
import textwrap
import threading
from dataclasses import replace
from pathlib import Path

import polars as pl
import pytest

from diffusion_bunny.config import load_config, recorded_name
from diffusion_bunny.errors import BadInputError, StageError, StageWarning
from diffusion_bunny.pipeline.contract import (
    ConfigView,
    Pipeline,
    Reads,
    Stage,
    StageOutput,
    UndeclaredSetting,
    behind_producers,
    config_changes,
    run_stage,
    stage_state,
)
from diffusion_bunny.pipeline.run import Run

TOY = '''
"""A toy stage package for the contract tests."""

from diffusion_bunny.pipeline.contract import Reads, Stage


def owns(run, cfg):
    return {"doubled/": run.run_dir / "doubled"}


STAGE = Stage(
    name="double",
    notebook="none.ipynb",
    package=__name__,
    summary=lambda m: f"{m['counts']['rows']} rows",
    reads=(Reads("numbers", "make", ("n",)),),
    config=("extract.motion_threshold",),
    writes=("doubled",),
    owns=owns,
)
'''

#: The toy stage's compute, found by the convention ``<package>.stage:compute``.
TOY_STAGE = '''
"""What the toy stage does."""

from diffusion_bunny.pipeline.contract import StageOutput


def compute(ctx):
    import polars as pl

    source = ctx.table("numbers")
    out = ctx.run.run_dir / "doubled"
    out.mkdir(exist_ok=True)
    (out / "n.txt").write_text(str(source.height))
    factor = ctx.cfg.extract.motion_threshold
    return StageOutput(
        tables={"doubled": source.select((pl.col("n") * factor).alias("n"))},
        counts={"rows": source.height},
    )
'''

MAKE_STAGE = '''
"""What the first toy stage does: the numbers the second one doubles."""

import polars as pl

from diffusion_bunny.pipeline.contract import StageOutput


def compute(ctx):
    return StageOutput(tables={"numbers": pl.DataFrame({"n": [1, 2, 3], "other": [0, 0, 0]})})
'''

TOY_MODULES = ("toy_double", "toy_double.stage", "toy_make", "toy_make.stage", "toy_label", "toy_label.stage")


def make_stage(run_dir):
    return Stage(
        name="make",
        notebook="none.ipynb",
        package="toy_make",
        summary=lambda m: "made",
        writes=("numbers",),
    )


@pytest.fixture
def toy(tmp_path, monkeypatch, cut_clip):
    """A pipeline of two stages, each a package of its own in a temporary folder."""
    src = tmp_path / "src"
    pkg = src / "toy_double"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(textwrap.dedent(TOY))
    (pkg / "stage.py").write_text(textwrap.dedent(TOY_STAGE))
    (src / "toy_make").mkdir()
    (src / "toy_make" / "__init__.py").write_text("")
    (src / "toy_make" / "stage.py").write_text(textwrap.dedent(MAKE_STAGE))
    monkeypatch.syspath_prepend(str(src))
    for name in TOY_MODULES:
        sys.modules.pop(name, None)
    module = importlib.import_module("toy_double")
    run = Run.create(tmp_path / "run", cut_clip[0])
    pipeline = Pipeline((make_stage(run.run_dir), module.STAGE))
    yield pipeline, run, pkg
    for name in TOY_MODULES:
        sys.modules.pop(name, None)


def test_missing_input_is_named_from_the_declaration(toy):
    pipeline, run, _ = toy
    cfg = load_config(None, {}, use_local=False)
    with pytest.raises(
        StageError,
        match=r"table 'numbers' is missing .*run stage make first \(bunny run MOVIE --stages make,double\)",
    ):
        run_stage(pipeline, run, "double", cfg, progress=False)
    # The same check backs bunny status.
    with pytest.raises(StageError):
        stage_state(pipeline, run, "double", cfg)


def test_done_then_stale_for_code_config_input_and_output_and_missing_for_a_deleted_folder(toy):
    pipeline, run, pkg = toy
    cfg = load_config(None, {}, use_local=False)
    run_stage(pipeline, run, "make", cfg, progress=False)
    out = run_stage(pipeline, run, "double", cfg, progress=False)["doubled"]
    assert out["n"].to_list() == [v * cfg.extract.motion_threshold for v in (1, 2, 3)]
    assert stage_state(pipeline, run, "double", cfg) == ("done", "up to date")
    manifest = run.read_manifest("double")
    # The section is recorded under its name before the rename (config.RECORDED_AS), so a run
    # finished before it stays done.
    assert manifest["config"] == {"extraction.motion_threshold": cfg.extract.motion_threshold}
    assert set(manifest["outputs"]["tables"]) == {"doubled"} and manifest["outputs"]["owned"]["doubled/"]

    # Only the declared key counts: another extraction setting changes nothing.
    other = load_config(None, {"extract.jpeg_quality": 50}, use_local=False)
    assert stage_state(pipeline, run, "double", other)[0] == "done"
    moved = load_config(None, {"extract.motion_threshold": 7.0}, use_local=False)
    # The reason names the setting that moved, under today's section name (recorded under the old).
    assert stage_state(pipeline, run, "double", moved) == (
        "stale",
        f"its config changed: extract.motion_threshold {cfg.extract.motion_threshold} -> 7.0",
    )

    # An undeclared column of the input changes nothing; a declared one makes it stale.
    numbers = run.read_table("numbers")
    run.write_table("numbers", numbers.with_columns(pl.lit(9).alias("other")))
    assert stage_state(pipeline, run, "double", cfg)[0] == "done"
    run.write_table("numbers", numbers.with_columns(pl.col("n") + 1))
    assert stage_state(pipeline, run, "double", cfg) == ("stale", "its inputs changed (numbers)")
    run.write_table("numbers", numbers)

    # An output changed or gone.
    (run.run_dir / "doubled" / "n.txt").write_text("many more rows than that")
    assert stage_state(pipeline, run, "double", cfg) == (
        "stale",
        "its output changed since it ran (doubled/)",
    )
    shutil.rmtree(run.run_dir / "doubled")
    assert stage_state(pipeline, run, "double", cfg) == ("missing", "its output doubled/ is gone")
    # Under settings that moved, those are the reason: an output's place may be a setting, and a
    # LoRA folder looked for under another train.output_dir was said to be gone (it was not).
    assert stage_state(pipeline, run, "double", moved) == (
        "stale",
        f"its config changed: extract.motion_threshold {cfg.extract.motion_threshold} -> 7.0",
    )
    run_stage(pipeline, run, "double", cfg, progress=False)
    assert stage_state(pipeline, run, "double", cfg)[0] == "done"
    # A table gone that the stage wrote is missing; one its last run did not write yet (the stage
    # writes a new table since) makes the run behind: stale, and said so.
    manifest = run.read_manifest("double")
    doubled = run.read_table("doubled")
    (run.run_dir / "tables" / "doubled.parquet").unlink()
    assert stage_state(pipeline, run, "double", cfg) == ("missing", "table doubled is gone")
    older = {**manifest, "outputs": {**manifest["outputs"], "tables": {}}}
    run.manifest_path("double").write_text(json.dumps(older))
    assert stage_state(pipeline, run, "double", cfg) == ("stale", "it ran before it wrote table doubled")
    run.write_table("doubled", doubled)
    run_stage(pipeline, run, "double", cfg, progress=False)
    assert stage_state(pipeline, run, "double", cfg)[0] == "done"

    # Its code is the module that computes and what that imports: a module of the package nothing
    # imports (figures) and a comment change nothing; a change to the code makes it stale.
    (pkg / "plots.py").write_text('"""Figures of the toy stage."""\n\nSIZE = 4\n')
    source = Path(inspect.getsourcefile(pipeline.get("double").stage_module()))
    source.write_text(source.read_text() + "\n# Nothing computes with this comment.\n")
    assert stage_state(pipeline, run, "double", cfg) == ("done", "up to date")
    source.write_text(source.read_text() + "\nFACTOR = 2\n")
    assert stage_state(pipeline, run, "double", cfg) == ("stale", "its code changed")


def test_a_config_change_is_named_key_by_key_old_value_to_new():
    stored = {
        "characters": {
            "reference_dir": "/home/ana/films/refs/a-long-folder-name/supertux",
            "fitted": {"steps": 1000},
        },
        "extraction.motion_threshold": 3.0,
    }
    fresh = {
        "characters": {"reference_dir": None, "fitted": {"steps": 500}},
        "extraction.motion_threshold": 3.0,
    }
    # Nested settings flattened to their dotted keys; a long value keeps its end (a path's folder),
    # cut inside its quotes at a folder's name ("...lms/refs/...supertux'" lost the opening quote).
    assert config_changes(stored, fresh) == (
        "characters.fitted.steps 1000 -> 500; characters.reference_dir "
        "'.../refs/a-long-folder-name/supertux' -> None"
    )
    # A long text with no folder in it keeps its end; a long list keeps its last items.
    assert config_changes({"k": "x" * 60}, {"k": "y"}) == f"k '...{'x' * 35}' -> 'y'"
    listed = config_changes({"k": list(range(30))}, {})
    assert listed == "k ..., 21, 22, 23, 24, 25, 26, 27, 28, 29] -> (unset)"
    many = config_changes({k: 1 for k in "abcde"}, {k: 2 for k in "abcde"})
    assert many == "a 1 -> 2; b 1 -> 2; c 1 -> 2; 2 more"
    # Another detector: its name first, not hidden among its settings' "-> None".
    cascade = {"extraction": {"detector": {"name": "cascade", **{k: 1.0 for k in "abcdefghij"}}}}
    content = {"extraction": {"detector": {"name": "content", "threshold": 27.0}}}
    assert config_changes(cascade, content).startswith("extract.detector.name 'cascade' -> 'content'; ")
    # A setting the record lacks (a stage's record of an earlier version) is unrecorded, not None,
    # and comes after those that moved; one no longer set is unset.
    upgraded = config_changes(
        {"captions": {"tone": "dry"}}, {"captions": {"trigger_word": "bny", "tone": "wry"}}
    )
    assert upgraded == "captions.tone 'dry' -> 'wry'; captions.trigger_word (unrecorded) -> 'bny'"
    assert config_changes({"a": 1, "b": 2}, {"a": 1}) == "b 2 -> (unset)"
    # a map the record holds empty: the key under it was recorded, as none
    described = config_changes(
        {"captions": {"descriptions": {}}}, {"captions": {"descriptions": {"al": "red"}}}
    )
    assert described == "captions.descriptions.al None -> 'red'"
    # A stage whose code changed and whose record lacks only settings it reads now (an upgrade):
    # the code is the cause, the new settings said beside it, none named as moved from None.
    from diffusion_bunny.pipeline.contract import _settings_or_code_moved

    record = {"config": {"captions": {"tone": "dry"}}, "config_hash": "a", "code_hash": "old"}
    now = {"captions": {"tone": "dry", "trigger_word": "bny"}}
    assert _settings_or_code_moved(record, "b", now, "new") == (
        "its code changed (and it reads settings it did not record: captions.trigger_word)"
    )
    assert _settings_or_code_moved(record, "b", now, "old").startswith("its config changed")
    empty = {"config": {"captions": {"descriptions": {}}}, "config_hash": "a", "code_hash": "old"}
    described = {"captions": {"descriptions": {"al": "red"}}}  # set by the user under a recorded {}
    assert _settings_or_code_moved(empty, "b", described, "new").startswith(
        "its config changed: captions.desc"
    )
    moved = {"captions": {"tone": "wry", "trigger_word": "bny"}}
    assert _settings_or_code_moved(record, "b", moved, "new").startswith("its config changed: captions.tone")
    # A manifest from before the config was recorded: nothing to name.
    assert config_changes(None, fresh) == "" and config_changes({}, fresh) == ""


def test_a_stage_that_fails_halfway_is_missing_and_its_old_tables_stay(toy, monkeypatch):
    pipeline, run, _ = toy
    cfg = load_config(None, {}, use_local=False)
    run_stage(pipeline, run, "make", cfg, progress=False)
    run_stage(pipeline, run, "double", cfg, progress=False)
    before = run.read_table("doubled")

    def broken(ctx):
        raise RuntimeError("killed halfway")

    with monkeypatch.context() as patch:
        patch.setattr(pipeline.get("double").stage_module(), "compute", broken)
        with pytest.raises(RuntimeError, match="killed halfway"):
            run_stage(pipeline, run, "double", cfg, force=True, progress=False)
    assert run.read_manifest("double") is None
    assert stage_state(pipeline, run, "double", cfg) == ("missing", "its last run did not finish")
    assert run.read_table("doubled").equals(before)


def test_a_stage_and_the_edits_people_make_meanwhile_share_one_commit_path(toy, monkeypatch):
    """A person's edit (``notes``, declared in ``Stage.edits``) made while the stage computes is
    folded in by the stage's merge, under the table locks the stage's commit holds: another
    writer waits for them, the holder may take them again. A person's commit keeps a backup;
    a commit whose block raises writes nothing."""
    from diffusion_bunny.pipeline.userwork import backup_path

    pipeline, run, pkg = toy
    cfg = load_config(None, {}, use_local=False)
    run_stage(pipeline, run, "make", cfg, progress=False)
    label = pkg.parent / "toy_label"
    label.mkdir()
    (label / "__init__.py").write_text("")
    (label / "stage.py").write_text('def compute(ctx):\n    raise NotImplementedError("set by the test")\n')
    waited: list[str] = []

    def note(text):  # the stage's editor, as a notebook widget would call it
        with run.commit("notes", by_hand=True) as tables:
            before = run.optional_table("notes")
            row = pl.DataFrame({"note": [text]})
            tables["notes"] = row if before is None else pl.concat([before, row])

    def other_writer():
        try:
            with run.commit("notes", timeout=0.2):
                pass
        except StageError as err:
            waited.append(str(err))

    def merge(tables):
        writer = threading.Thread(target=other_writer)
        writer.start()
        writer.join()
        with run.table_lock("notes"):  # the holder takes its lock again
            notes = ", ".join(run.read_table("notes")["note"].to_list())
        return {**tables, "labelled": tables["labelled"].with_columns(pl.lit(notes).alias("notes"))}

    def compute(ctx):
        note("typed while the stage computed")  # a person, meanwhile
        return StageOutput(tables={"labelled": ctx.table("numbers").select("n")}, merge=merge)

    monkeypatch.setattr(importlib.import_module("toy_label.stage"), "compute", compute)
    stage = Stage(
        name="label",
        notebook="none.ipynb",
        package="toy_label",
        summary=lambda m: "labelled",
        reads=(Reads("numbers", "make", ("n",)), Reads("notes", "label", optional=True, nonempty=True)),
        writes=("labelled",),
        edits=("notes",),
    )
    labelled = run_stage(Pipeline((pipeline.stages[0], stage)), run, "label", cfg, progress=False)["labelled"]
    assert labelled["notes"].to_list() == ["typed while the stage computed"] * 3
    assert run.read_table("labelled").equals(labelled)
    assert len(waited) == 1 and "has held the notes lock" in waited[0]  # the stage's commit held it
    assert backup_path(run.table_path("notes")).is_file()
    assert not backup_path(run.table_path("labelled")).is_file()  # a stage's table is rebuilt instead

    with pytest.raises(RuntimeError, match="halfway"), run.commit("notes", by_hand=True) as tables:
        tables["notes"] = pl.DataFrame({"note": ["never written"]})
        raise RuntimeError("the editor failed halfway")
    assert run.read_table("notes")["note"].to_list() == ["typed while the stage computed"]


def test_a_stage_made_from_an_out_of_date_stages_tables_says_so_and_a_persons_edit_does_not(toy):
    """Stage 03 run again and then stage 06 without stage 05 exported captions naming the old
    characters, without a word: a stage that computes from the tables of a stage that is behind
    its own settings, code or inputs says which and what to run. A person's edit, committed
    into the producer's tables at once, is not being behind."""
    pipeline, run, _ = toy
    make = Stage(
        name="make",
        notebook="none.ipynb",
        package="toy_make",
        summary=lambda m: "made",
        reads=(Reads("notes", "make", optional=True, nonempty=True),),
        config=("extract.jpeg_quality",),
        writes=("numbers",),
        edits=("notes",),
    )
    pipeline = Pipeline((make, pipeline.get("double")))
    cfg = load_config(None, {}, use_local=False)
    run_stage(pipeline, run, "make", cfg, progress=False)
    run_stage(pipeline, run, "double", cfg, progress=False)
    assert run.read_manifest("double")["warnings"] == []

    # A person's correction: the notes and the numbers they change, in one commit.
    with run.commit("notes", "numbers", by_hand=True) as tables:
        tables["notes"] = pl.DataFrame({"note": ["3 is 4"]})
        tables["numbers"] = pl.DataFrame({"n": [1, 2, 4], "other": [0, 0, 0]})
    assert stage_state(pipeline, run, "make", cfg)[0] == "stale"  # bunny status says so
    run_stage(pipeline, run, "double", cfg, progress=False)  # its input changed: it runs
    assert run.read_manifest("double")["warnings"] == []

    lower = load_config(None, {"extract.jpeg_quality": 50}, use_local=False)
    behind = (
        r"stage double read numbers from stage make, which is out of date \(its config changed: "
        rf"extract.jpeg_quality {cfg.extract.jpeg_quality} -> 50\): run stage make again, then double "
        r"\(bunny run MOVIE --stages make,double"
    )
    with pytest.warns(StageWarning, match=behind):  # which the notebooks leave out: they print it
        run_stage(pipeline, run, "double", lower, force=True, progress=False)
    assert len(run.read_manifest("double")["warnings"]) == 1
    # With a stage between the two, the advice names it too: "characters,export" exported new
    # crops beside old captions, and warned again that stage 05 was behind.
    middle = replace(make, name="middle", reads=(), edits=(), writes=("other",))
    (line,) = behind_producers(
        Pipeline((make, middle, pipeline.get("double"))), run, pipeline.get("double"), lower
    )
    assert line.endswith(
        "run stage make again, then middle, double "
        "(bunny run MOVIE --stages make,middle,double, or their notebooks)"
    )
    # ``bunny run --stages double`` skips it as up to date, and says that make is behind (it
    # said "up to date" and nothing else); with make in the command, make's own turn does.
    from diffusion_bunny.pipeline.runner import _behind_outside

    (skipped,) = _behind_outside(pipeline, run, "double", ["double"], lower)
    assert skipped.startswith("stage double read numbers from stage make, which is out of date")
    assert _behind_outside(pipeline, run, "double", ["make", "double"], lower) == []
    run_stage(pipeline, run, "make", lower, progress=False)
    run_stage(pipeline, run, "double", lower, progress=False)
    assert run.read_manifest("double")["warnings"] == []
    assert _behind_outside(pipeline, run, "double", ["double"], lower) == []

    run.manifest_path("make").unlink()  # a run of it stopped halfway: its old table stays
    with pytest.warns(UserWarning, match=r"out of date \(its last run did not finish\)"):
        run_stage(pipeline, run, "double", lower, force=True, progress=False)

    # A producer that cannot even tell (its reference folder moved away since it ran) is its own
    # run's business: the stage that reads its tables runs, and says nothing about it.
    def gone(run, view):
        raise BadInputError("characters.reference_dir = '/mnt/refs' is not a folder")

    run_stage(pipeline, run, "make", lower, progress=False)  # done, then its folder goes
    moved = Pipeline((replace(make, inputs=gone), pipeline.get("double")))
    run_stage(moved, run, "double", lower, force=True, progress=False)
    assert run.read_manifest("double")["warnings"] == []


def test_a_stage_that_reads_every_table_is_told_every_stage_behind_in_one_line(toy):
    """``bunny run --stages quality,report``: the report drew stage 06's dataset of the old
    frames beside stage 02's new ones, an export of 7 frames out of 5 kept, as if they belonged
    together. A stage that reads every table hears of each stage behind, in one line that says
    what to run (the stages behind and every later one that ran), and :class:`Context` carries
    it to the stage (the report puts it on its page)."""
    pipeline, run, pkg = toy
    (pkg.parent / "toy_report").mkdir()
    (pkg.parent / "toy_report" / "__init__.py").write_text("")
    (pkg.parent / "toy_report" / "stage.py").write_text(
        "from diffusion_bunny.pipeline.contract import StageOutput\n\n\n"
        "def compute(ctx):\n    return StageOutput(tables={}, facts={'behind': list(ctx.behind)})\n"
    )
    report = Stage(
        name="report", notebook="none.ipynb", package="toy_report", summary=str, reads_every_table=True
    )
    last = Stage(name="last", notebook="none.ipynb", package="toy_last", summary=str, writes=("never",))
    pipeline = Pipeline((*pipeline.stages, last, report))
    cfg = load_config(None, {}, use_local=False)
    run_stage(pipeline, run, "make", cfg, progress=False)
    run_stage(pipeline, run, "double", cfg, progress=False)
    assert behind_producers(pipeline, run, report, cfg) == []
    (run.run_dir / "tables" / "numbers.parquet").unlink()  # make's table rewritten: 4 rows now
    pl.DataFrame({"n": [1, 2, 3, 4], "other": [0, 0, 0, 0]}).write_parquet(run.table_path("numbers"))
    (line,) = behind_producers(pipeline, run, report, cfg)
    assert line == (
        "stage report read the tables of stages that are out of date: double (its inputs changed "
        "(numbers)); run them again (bunny run MOVIE --stages double,report, or their notebooks)"
    )
    with pytest.warns(StageWarning, match="tables of stages that are out of date"):
        run_stage(pipeline, run, "report", cfg, progress=False)
    assert run.read_manifest("report")["facts"]["behind"] == [line]
    # The stages behind are among its inputs: brought up to date, the page is stale (it went on
    # naming them); a setting changed with no rerun makes it stale too (it was up to date).
    assert stage_state(pipeline, run, "report", cfg)[0] == "done"
    run_stage(pipeline, run, "double", cfg, progress=False)
    assert "stages behind" in stage_state(pipeline, run, "report", cfg)[1]
    run_stage(pipeline, run, "report", cfg, progress=False)
    assert run.read_manifest("report")["facts"]["behind"] == []
    moved = load_config(None, {"extract.motion_threshold": 9}, use_local=False)
    assert stage_state(pipeline, run, "report", moved) == ("stale", "its inputs changed (stages behind)")
    sys.modules.pop("toy_report", None), sys.modules.pop("toy_report.stage", None)
    other = load_config(None, {"extract.motion_threshold": 7}, use_local=False)
    (line,) = behind_producers(pipeline, run, report, other)  # "last" never ran and wrote nothing
    assert (
        ": double (its config changed: extract.motion_threshold" in line and "--stages double,report" in line
    )


def test_a_damaged_manifest_is_a_stage_not_run_and_a_setting_is_named_before_the_code(toy):
    """A manifest that is not text or not a JSON object stopped ``bunny status`` and ``bunny
    run`` as a bug (UnicodeDecodeError, AttributeError); it now counts as not run. A switch of
    detector changes the code that runs as well as the setting: the setting is the reason."""
    pipeline, run, _ = toy
    cfg = load_config(None, {}, use_local=False)
    run_stage(pipeline, run, "make", cfg, progress=False)
    run_stage(pipeline, run, "double", cfg, progress=False)
    good = run.manifest_path("double").read_bytes()
    for damaged in (b"\xff\xfe\x00garbage", b"[]", b"{"):
        run.manifest_path("double").write_bytes(damaged)
        assert stage_state(pipeline, run, "double", cfg) == ("missing", "its last run did not finish")
    run_stage(pipeline, run, "double", cfg, progress=False)
    assert stage_state(pipeline, run, "double", cfg)[0] == "done"
    manifest = json.loads(good)
    run.manifest_path("double").write_text(json.dumps({**manifest, "code_hash": "another detector's"}))
    moved = load_config(None, {"extract.motion_threshold": 7.0}, use_local=False)
    assert stage_state(pipeline, run, "double", moved)[1].startswith(
        "its config changed: extract.motion_threshold"
    )
    assert stage_state(pipeline, run, "double", cfg) == ("stale", "its code changed")


def test_a_stage_reads_only_the_settings_it_declared():
    cfg = load_config(None, {}, use_local=False)
    view = ConfigView(cfg, ("quality", "run.seed"), "toy")
    assert view.quality == cfg.quality and view.run.seed == cfg.run.seed
    with pytest.raises(UndeclaredSetting, match="stage toy read the setting section 'scenes'"):
        view.scenes  # noqa: B018
    with pytest.raises(UndeclaredSetting, match=r"toy: run\.kernel was read without being declared"):
        view.run.kernel  # noqa: B018


def test_every_real_stage_reads_only_declared_settings_and_columns():
    """Each stage's declaration names sections or keys that exist and columns of the tables their
    producers declare (the stages' own schemas)."""
    from diffusion_bunny.stages import PIPELINE

    cfg = load_config(None, {}, use_local=False)
    writers = {table: stage.name for stage in PIPELINE.stages for table in (*stage.writes, *stage.edits)}
    assert len(writers) == sum(len(stage.writes) + len(stage.edits) for stage in PIPELINE.stages)  # one each
    for stage in PIPELINE.stages:
        values = cfg.section_values(*stage.config)
        assert set(values) == {recorded_name(name) for name in stage.config}, stage.name
        for reads in stage.reads:
            assert writers.get(reads.table) == reads.producer, (stage.name, reads)


def test_a_folder_setting_spelt_another_way_is_the_same_folder(toy, tmp_path, monkeypatch):
    """``refs`` in a settings file and ``--characters refs`` (made absolute from the workspace)
    name one folder: the stage stays done. Stage 03 was fitted again for nothing before."""
    pipeline, run, _ = toy
    monkeypatch.setenv("DIFFUSION_BUNNY_WORKSPACE", str(tmp_path))
    (tmp_path / "refs").mkdir()
    stage = replace(pipeline.get("double"), config=("extract.motion_threshold", "characters.reference_dir"))
    pipeline = Pipeline((pipeline.get("make"), stage))
    relative = load_config(None, {"characters.reference_dir": "refs"}, use_local=False)
    run_stage(pipeline, run, "make", relative, progress=False)
    run_stage(pipeline, run, "double", relative, progress=False)
    absolute = load_config(None, {"characters.reference_dir": str(tmp_path / "refs")}, use_local=False)
    assert stage_state(pipeline, run, "double", absolute) == ("done", "up to date")
    dotted = load_config(None, {"characters.reference_dir": "./refs/"}, use_local=False)
    assert stage_state(pipeline, run, "double", dotted) == ("done", "up to date")
    # Another folder, or one setting moved beside it, is a change, and the reason names only it.
    other = load_config(None, {"characters.reference_dir": str(tmp_path / "other")}, use_local=False)
    state, reason = stage_state(pipeline, run, "double", other)
    assert state == "stale" and "characters.reference_dir 'refs' -> " in reason
    both = load_config(
        None,
        {"characters.reference_dir": str(tmp_path / "refs"), "extract.motion_threshold": 7.0},
        use_local=False,
    )
    was = relative.extract.motion_threshold
    state, reason = stage_state(pipeline, run, "double", both)
    assert reason == f"its config changed: extract.motion_threshold {was} -> 7.0"


def test_a_recorded_folder_that_cannot_be_resolved_is_a_change_not_a_crash():
    """A manifest made by another user (``~olduser/refs``) or a folder through a symlink loop:
    resolving it raised RuntimeError in ``bunny status``; it is simply a setting that moved."""
    from diffusion_bunny.pipeline.contract import settings_moved

    stored = {"characters": {"reference_dir": "~no_such_user_here/refs"}}
    fresh = {"characters": {"reference_dir": "/data/refs"}}
    assert settings_moved(stored, fresh) == ["characters.reference_dir"]
    assert "'~no_such_user_here/refs' -> '/data/refs'" in config_changes(stored, fresh)


def test_a_damaged_table_a_person_edited_is_restored_before_its_stage_is_judged(toy):
    """``bunny status`` on a run whose edited table was damaged said "restored from its backup",
    then "stale (its output changed since it ran)": it had hashed the damaged bytes first."""
    from diffusion_bunny.pipeline.userwork import backup_path

    pipeline, run, _ = toy
    cfg = load_config(None, {}, use_local=False)
    run_stage(pipeline, run, "make", cfg, progress=False)
    with run.commit("numbers", by_hand=True) as tables:  # a person's fix: the table gets a backup
        tables["numbers"] = pl.DataFrame({"n": [1, 2, 4], "other": [0, 0, 0]})
    run_stage(pipeline, run, "make", cfg, progress=False)
    assert backup_path(run.table_path("numbers")).is_file()
    assert stage_state(pipeline, run, "make", cfg) == ("done", "up to date")
    path = run.table_path("numbers")
    path.write_bytes(path.read_bytes()[:-20])  # torn: no parquet footer
    with pytest.warns(UserWarning, match="restored from its backup"):
        assert stage_state(pipeline, run, "make", cfg) == ("done", "up to date")
