"""Stage 09 ``report``: a QA report of one run, and one across the movies of a batch.

* :mod:`.sections`: one section per stage with its figures (each stage's own plots), or a line
  saying the stage did not run;
* :mod:`.funnel`, :mod:`.figures`: the report's own figures (frames in and out of each step,
  identity per checkpoint), pure over the tables;
* :mod:`.document`: the page, built as a small notebook document and converted by nbconvert;
* :mod:`.combined`: the batch report's figure; :mod:`.stage`: the stage on a run, and the batch
  report's writer (``batch_report``, which the pipeline finds there by convention).

Every table of the run is its input, with what it reads from the other stages' manifests: any
change makes it stale.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from diffusion_bunny.pipeline.contract import ConfigView, Stage
from diffusion_bunny.pipeline.run import Run


def _owns(run: Run, cfg: ConfigView) -> dict[str, Path]:
    return {"report/": run.run_dir / "report"}


def _inputs(run: Run, cfg: ConfigView) -> dict[str, Any]:
    """What the sections read from other stages' manifests (not tables): stage 02's thresholds
    (drawn on its figure), stage 01's decoded frames (the funnel's first bar), stage 03's
    characters found in no frame and whether pictures were given. A rerun of stage 02 with new
    thresholds that kept the same frames changed no table, and the report went on showing the
    old thresholds as the ones it last ran with. (Not the whole manifests: they hold timings.)"""

    def manifest(stage: str) -> dict[str, Any]:
        found = run.read_manifest(stage)
        return found if isinstance(found, dict) else {}

    facts = manifest("characters").get("facts") or {}
    characters = [facts.get("characters_not_found"), facts.get("reference_dir"), "hub" in facts]
    return {
        # The page's title names the movie: a movie renamed (its run folder goes on) kept its
        # old name there, the report skipped as up to date.
        "movie name": Path(str((run.meta() or {}).get("movie", run.run_dir.name))).name,
        "manifests read": {
            "quality config": manifest("quality").get("config"),
            "decoded frames": (manifest("extract").get("counts") or {}).get("decoded_frames"),
            "characters": characters,
        },
    }


def summary(manifest: dict[str, Any]) -> str:
    """One line about a run of stage 09: where the page is, and which stages it could not show."""
    c, f = manifest["counts"], manifest["facts"]
    missing = c.get("stages_not_run") or []
    page = Path(manifest.get("run_folder", "")) / f["html"]
    line = f"{c['figures']} figures in {page}"
    return line + (f"; stages that did not run: {', '.join(missing)}" if missing else "")


STAGE = Stage(
    name="report",
    notebook="09_qa_report.ipynb",
    package=__name__,
    summary=summary,
    config=(
        "report",
        "characters.tolerance",
        "characters.fitted",
        "characters.backend",
        "characters.hub",
    ),
    writes=("report_figures", "report_funnel"),
    owns=_owns,
    inputs=_inputs,
    reads_every_table=True,
)
