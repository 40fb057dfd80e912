"""The nine stages, in order, as one :class:`~diffusion_bunny.pipeline.contract.Pipeline`.

Each stage is a package (``stages/<name>/``) whose ``__init__`` declares it (tables read and
written, settings, owned folders, ``summary``) and whose ``stage.py`` has its ``compute``, found
by that convention; this module only lists them. :data:`PIPELINE` is the one place the stage
order is written: the CLI's ``--stages`` help, ``bunny status``, the runner and the tests all
read it from here (the notebooks' numbers, ``01_`` to ``09_``, follow it). The functions below
bind the generic machinery of :mod:`diffusion_bunny.pipeline.contract` to this pipeline, so
notebooks, tests and scripts write ``run_stage(run, "quality", cfg)``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from diffusion_bunny.pipeline import contract
from diffusion_bunny.pipeline.contract import Pipeline
from diffusion_bunny.pipeline.run import Run
from diffusion_bunny.stages import (
    captions,
    characters,
    export,
    extract,
    generate,
    quality,
    report,
    scenes,
    train,
)

if TYPE_CHECKING:
    import polars as pl

    from diffusion_bunny.pipeline.manifest import StageState
    from diffusion_bunny.pipeline.settings import RunConfig

PIPELINE = Pipeline(
    stages=(
        extract.STAGE,
        quality.STAGE,
        characters.STAGE,
        scenes.STAGE,
        captions.STAGE,
        export.STAGE,
        train.STAGE,
        generate.STAGE,
        report.STAGE,
    ),
    # report/stage.py's batch_report: the report across the movies of a folder.
    batch_reporter=report.STAGE.name,
)


def stage_names() -> list[str]:
    """Stage names in pipeline order."""
    return PIPELINE.names()


def stage_state(run: Run, name: str, cfg: RunConfig) -> tuple[StageState, str]:
    """``done``/``stale``/``missing`` for one stage of a run, with the reason."""
    return contract.stage_state(PIPELINE, run, name, cfg)


def run_stage(
    run: Run, name: str, cfg: RunConfig, *, force: bool = False, progress: bool = True
) -> dict[str, pl.DataFrame]:
    """Run one stage (or skip it when its manifest matches) and return the tables it wrote."""
    return contract.run_stage(PIPELINE, run, name, cfg, force=force, progress=progress)


def summary(run: Run, name: str) -> str:
    """The stage's one-line summary of its last run (from its manifest), or why there is none."""
    manifest = run.read_manifest(name)
    if manifest is None:
        return f"stage {name} has not run"
    return contract.stage_summary(PIPELINE.get(name), manifest, run.run_dir)


__all__ = ["PIPELINE", "run_stage", "stage_names", "stage_state", "summary"]
