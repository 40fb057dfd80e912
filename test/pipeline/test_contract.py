"""The stage contract on a toy pipeline (no real stage): declarations drive the missing-input
message, the fingerprints and the settings a stage may read; manifests cannot lie about code,
outputs or a stage killed halfway."""

from __future__ import annotations

import importlib
import inspect
import shutil
import sys
import textwrap
from pathlib import Path

import polars as pl
import pytest

from diffusion_bunny.config import load_config
from diffusion_bunny.errors import StageError
from diffusion_bunny.pipeline.contract import (
    ConfigView,
    Pipeline,
    Stage,
    StageOutput,
    UndeclaredSetting,
    run_stage,
    stage_state,
)
from diffusion_bunny.pipeline.run import Run

TOY = '''
"""A toy stage package for the contract tests."""

from diffusion_bunny.pipeline.contract import Reads, Stage, StageOutput


def compute(ctx):
    import polars as pl

    source = ctx.table("numbers")
    out = ctx.run.run_dir / "doubled"
    out.mkdir(exist_ok=True)
    (out / "n.txt").write_text(str(source.height))
    factor = ctx.cfg.extraction.motion_threshold
    return StageOutput(
        tables={"doubled": source.select((pl.col("n") * factor).alias("n"))},
        counts={"rows": source.height},
    )


def owns(run, cfg):
    return {"doubled/": run.run_dir / "doubled"}


STAGE = Stage(
    name="double",
    number=2,
    notebook="none.ipynb",
    package=__name__,
    compute=compute,
    summary=lambda m: f"{m['counts']['rows']} rows",
    reads=(Reads("numbers", "make", ("n",)),),
    config=("extraction.motion_threshold",),
    writes=("doubled",),
    owns=owns,
)
'''


def make_stage(run_dir):
    def compute(ctx):
        return StageOutput(tables={"numbers": pl.DataFrame({"n": [1, 2, 3], "other": [0, 0, 0]})})

    return Stage(
        name="make",
        number=1,
        notebook="none.ipynb",
        package="diffusion_bunny.pipeline",
        compute=compute,
        summary=lambda m: "made",
        writes=("numbers",),
    )


@pytest.fixture
def toy(tmp_path, monkeypatch, cut_clip):
    """A pipeline of two stages, the second a package of its own in a temporary folder."""
    pkg = tmp_path / "src" / "toy_double"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(textwrap.dedent(TOY))
    monkeypatch.syspath_prepend(str(tmp_path / "src"))
    sys.modules.pop("toy_double", None)
    module = importlib.import_module("toy_double")
    run = Run.create(tmp_path / "run", cut_clip[0])
    pipeline = Pipeline((make_stage(run.run_dir), module.STAGE))
    yield pipeline, run, pkg
    sys.modules.pop("toy_double", None)


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
    assert out["n"].to_list() == [v * cfg.extraction.motion_threshold for v in (1, 2, 3)]
    assert stage_state(pipeline, run, "double", cfg) == ("done", "up to date")
    manifest = run.read_manifest("double")
    assert manifest["config"] == {"extraction.motion_threshold": cfg.extraction.motion_threshold}
    assert set(manifest["outputs"]["tables"]) == {"doubled"} and manifest["outputs"]["owned"]["doubled/"]

    # Only the declared key counts: another extraction setting changes nothing.
    other = load_config(None, {"extraction.jpeg_quality": 50}, use_local=False)
    assert stage_state(pipeline, run, "double", other)[0] == "done"
    moved = load_config(None, {"extraction.motion_threshold": 7.0}, use_local=False)
    assert stage_state(pipeline, run, "double", moved) == ("stale", "its config changed")

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
    run_stage(pipeline, run, "double", cfg, progress=False)
    assert stage_state(pipeline, run, "double", cfg)[0] == "done"

    # Its code is the module that computes and what that imports: a module of the package nothing
    # imports (figures) and a comment change nothing; a change to the code makes it stale.
    (pkg / "plots.py").write_text('"""Figures of the toy stage."""\n\nSIZE = 4\n')
    source = Path(inspect.getsourcefile(pipeline.get("double").compute))
    source.write_text(source.read_text() + "\n# Nothing computes with this comment.\n")
    assert stage_state(pipeline, run, "double", cfg) == ("done", "up to date")
    source.write_text(source.read_text() + "\nFACTOR = 2\n")
    assert stage_state(pipeline, run, "double", cfg) == ("stale", "its code changed")


def test_a_stage_that_fails_halfway_is_missing_and_its_old_tables_stay(toy):
    pipeline, run, _ = toy
    cfg = load_config(None, {}, use_local=False)
    run_stage(pipeline, run, "make", cfg, progress=False)
    run_stage(pipeline, run, "double", cfg, progress=False)
    before = run.read_table("doubled")
    stage = pipeline.get("double")

    def broken(ctx):
        raise RuntimeError("killed halfway")

    crashing = Pipeline((pipeline.stages[0], Stage(**{**stage.__dict__, "compute": broken})))
    with pytest.raises(RuntimeError, match="killed halfway"):
        run_stage(crashing, run, "double", cfg, force=True, progress=False)
    assert run.read_manifest("double") is None
    assert stage_state(pipeline, run, "double", cfg) == ("missing", "never ran")
    assert run.read_table("doubled").equals(before)


def test_a_stage_reads_only_the_settings_it_declared():
    cfg = load_config(None, {}, use_local=False)
    view = ConfigView(cfg, ("quality", "run.seed"), "toy")
    assert view.quality == cfg.quality and view.run.seed == cfg.run.seed
    with pytest.raises(UndeclaredSetting, match="stage toy read the setting section 'scenes'"):
        view.scenes  # noqa: B018
    with pytest.raises(UndeclaredSetting, match=r"toy: run\.output_dir was read without being declared"):
        view.run.output_dir  # noqa: B018


def test_every_real_stage_reads_only_declared_settings_and_columns():
    """Each stage's declaration names sections or keys that exist and columns of the tables their
    producers declare (the stages' own schemas)."""
    from diffusion_bunny.stages import PIPELINE

    cfg = load_config(None, {}, use_local=False)
    writers = {table: stage.name for stage in PIPELINE.stages for table in stage.writes}
    for stage in PIPELINE.stages:
        values = cfg.section_values(*stage.config)
        assert set(values) == set(stage.config), stage.name
        for reads in stage.reads:
            if reads.table in ("feedback", "caption_edits"):
                continue  # written by the corrections APIs of stages 04 and 05
            assert writers.get(reads.table) == reads.producer, (stage.name, reads)
