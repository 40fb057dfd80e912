"""``bunny demo``: build the demo movie once, run every stage on it, and compare with its
ground truth, so a new user sees in one command what the workspace does and how well."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import polars as pl

from diffusion_bunny.config import current_name, load_config, output_root
from diffusion_bunny.demo.metrics import adjusted_rand, match_boundaries
from diffusion_bunny.demo.movie import DemoMovie, build_demo_movie, build_demo_references
from diffusion_bunny.errors import StageError
from diffusion_bunny.paths import workspace_root
from diffusion_bunny.pipeline.contract import stage_summary
from diffusion_bunny.pipeline.engine import run_target
from diffusion_bunny.pipeline.run import Run, movie_key
from diffusion_bunny.stages import PIPELINE

#: Settings ``bunny demo`` runs with (the caller's overrides win): the demo trains the tiny
#: preset at 128 px, so its face crops are judged at that size, and its two drawn characters are
#: simple drawings that a third of the default fit finds.
DEMO_SETTINGS: dict[str, Any] = {"export.crop_resolution": 128, "characters.fitted.steps": 300}


def demo_dir() -> Path:
    """Where the demo movie is built: ``data/demo`` of the checkout (or of the working folder)."""
    return workspace_root() / "data" / "demo"


def demo_movie(*, force: bool = False, progress: bool = True, movie_dir: Path | None = None) -> DemoMovie:
    """The demo movie, built on first use (in ``movie_dir``, default :func:`demo_dir`)."""
    return build_demo_movie(movie_dir or demo_dir(), force=force, progress=progress)


def expected_reasons(truth: dict[str, Any]) -> dict[int, str | None]:
    """What stage 02 should say about each shot of the demo: ``blurry`` for the out-of-focus
    shot, ``too_dark`` for the under-exposed one, ``duplicate`` for the repeat, None (kept) else."""
    out: dict[int, str | None] = {}
    for shot in truth["shots"]:
        reason = None
        if shot["blurred"]:
            reason = "blurry"
        elif shot["dark"]:
            reason = "too_dark"
        elif shot["repeat_of"] is not None:
            reason = "duplicate"
        out[shot["shot_id"]] = reason
    return out


def truth_shot(truth: dict[str, Any], frame_index: int) -> dict[str, Any] | None:
    """The ground-truth shot holding ``frame_index`` (None outside every shot)."""
    return next((t for t in truth["shots"] if t["start_frame"] <= frame_index < t["end_frame"]), None)


def summarize(run: Run, truth: dict[str, Any]) -> str:
    """One line per stage that ran: the stage's own summary, then how it compares with the demo's
    ground truth where there is one."""
    compare = {
        "extract": extract_truth,
        "quality": quality_truth,
        "characters": characters_truth,
        "scenes": scenes_truth,
        "captions": captions_truth,
    }
    lines = [f"demo run folder: {run.run_dir}"]
    for stage in PIPELINE.stages:
        manifest = run.read_manifest(stage.name)
        if manifest is None:
            continue
        line = f"{stage.name}: {stage_summary(stage, manifest, run.run_dir)}"
        if stage.name in compare:
            line += f"; {compare[stage.name](run, truth)}"
        lines.append(line)
    return "\n".join(lines)


def extract_truth(run: Run, truth: dict[str, Any]) -> str:
    """Cuts found against the true ones (within a frame), and static/dynamic shots as made."""
    shots = run.read_table("shots")
    score = match_boundaries(shots["start_frame"].to_list()[1:], truth["cuts"], tolerance=1)
    kinds = {s["shot_id"]: s["kind"] for s in truth["shots"]}
    agree = sum(
        1
        for row in shots.iter_rows(named=True)
        if any(
            t["start_frame"] == row["start_frame"] and kinds[t["shot_id"]] == row["kind"]
            for t in truth["shots"]
        )
    )
    n = len(truth["shots"])
    return (
        f"against the ground truth ({n} shots): cuts within 1 frame precision {score.precision:.2f} "
        f"recall {score.recall:.2f}, static/dynamic right for {agree} of {n} shots"
    )


def quality_truth(run: Run, truth: dict[str, Any]) -> str:
    """Frames whose verdict (kept, or the reason) is the one the demo's shot was made for."""
    quality = run.read_table("quality").join(
        run.read_table("frames").select("frame_id", "frame_index"), on="frame_id"
    )
    expected = expected_reasons(truth)
    right = 0
    for row in quality.iter_rows(named=True):
        shot = truth_shot(truth, row["frame_index"])
        right += shot is not None and expected[shot["shot_id"]] == row["reject_reason"]
    return f"verdict as the ground truth for {right} of {quality.height} frames"


def captions_truth(run: Run, truth: dict[str, Any]) -> str:
    """How many captions name exactly the people the ground truth puts in the frame's shot (a
    missing or an extra name counts as wrong)."""
    captions = run.read_table("captions").join(
        run.read_table("frames").select("frame_id", "frame_index"), on="frame_id"
    )
    names = {n for s in truth["shots"] for n in s["faces"]}
    right = 0
    for row in captions.filter(pl.col("caption").is_not_null()).iter_rows(named=True):
        shot = truth_shot(truth, row["frame_index"])
        said = {n for n in names if n in row["caption"]}
        right += shot is not None and said == set(shot["faces"])
    done = int(captions["caption"].is_not_null().sum())
    return f"the caption names the ground truth's people in {right} of {done}"


def scenes_truth(run: Run, truth: dict[str, Any]) -> str:
    """Scene clusters against the ground truth's places (each shot's source picture): adjusted Rand
    index, with every noise frame its own group."""
    scene = (
        run.read_table("clusters")
        .filter(pl.col("level") == "scene")
        .join(run.read_table("frames").select("frame_id", "frame_index"), on="frame_id")
    )
    places, labels = [], []
    for row in scene.iter_rows(named=True):
        shot = truth_shot(truth, row["frame_index"])
        if shot is not None:
            places.append(shot["source"])
            labels.append(row["cluster_id"])
    return (
        f"against the ground truth's {len(set(places))} places: adjusted Rand index "
        f"{adjusted_rand(places, labels):.2f}"
    )


def characters_truth(run: Run, truth: dict[str, Any]) -> str:
    """How many scanned frames have exactly the named characters the ground truth puts in their
    shot (a face missed, a wrong name or an extra name all count as wrong)."""
    faces = run.read_table("faces")
    scanned = run.read_table("face_frames").join(
        run.read_table("frames").select("frame_id", "frame_index"), on="frame_id"
    )
    named: dict[str, set[str]] = {}
    for row in faces.filter(faces["character"].is_not_null()).iter_rows(named=True):
        named.setdefault(row["frame_id"], set()).add(row["character"])
    right = 0
    for row in scanned.iter_rows(named=True):
        shot = truth_shot(truth, row["frame_index"])
        right += shot is not None and set(shot.get("characters", shot["faces"])) == named.get(
            row["frame_id"], set()
        )
    return f"the named characters match the ground truth in {right} of {scanned.height} frames"


def run_demo(
    *,
    out: Path | None = None,
    overrides: dict[str, Any] | None = None,
    force: bool = False,
    progress: bool = True,
    movie_dir: Path | None = None,
) -> str:
    """Build the demo movie (once, in ``movie_dir``) and run every stage on it; returns a summary.
    The settings are checked first: a mistyped key was said after the movie's build (50 s)."""
    load_config(None, {**DEMO_SETTINGS, **(overrides or {})})
    demo = demo_movie(force=force, progress=progress, movie_dir=movie_dir)
    overrides = demo_overrides(demo, overrides)
    cfg = load_config(None, overrides)
    run_dir = out if out is not None else output_root(cfg) / "demo"
    if out is None:
        _forget_older_demo(run_dir, demo.path)
    run_target(
        PIPELINE,
        demo.path,
        cfg,
        overrides=overrides,
        out=run_dir,
        force=force,
        progress=progress,
        current_name=current_name,
    )
    return summarize(Run.open(run_dir), demo.ground_truth())


def demo_overrides(demo: DemoMovie, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The settings ``bunny demo`` runs with (:data:`DEMO_SETTINGS`; the demo names its people
    and drawn characters from reference pictures written next to the movie), under ``overrides``
    (the caller's win). A notebook opened on the demo takes them too: with its own defaults it
    found the demo's stages stale, and ran 03 again without the pictures (every name lost)."""
    out = dict(overrides or {})
    for key, value in DEMO_SETTINGS.items():
        out.setdefault(key, value)
    out.setdefault("characters.reference_dir", str(build_demo_references(demo.path.parent / "characters")))
    return out


def _forget_older_demo(run_dir: Path, movie: Path) -> None:
    """Remove the demo's own run folder when it holds the run of another demo movie (one built by
    an earlier version, or by ``--force`` with another encoder): a run folder keeps one movie
    (:func:`~diffusion_bunny.pipeline.run.check_run_folder`), and this one is the demo's."""
    try:
        meta = Run(run_dir).meta()
    except StageError:  # damaged: the run rewrites it for the demo movie
        return
    if meta is not None and meta.get("movie_key") not in (None, movie_key(movie)):
        shutil.rmtree(run_dir)
