"""Stage 03 with ``characters.backend: hub``: OWLv2 and a features model find the drawn characters
(tiny random models built in code stand in for the hub's, loaded from local folders the way a
user's downloaded ones are)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from tiny_models import write_tiny_dinov2, write_tiny_owlv2

from diffusion_bunny.config import load_config
from diffusion_bunny.demo.movie import build_demo_references
from diffusion_bunny.errors import ModelError
from diffusion_bunny.pipeline.run import Run
from diffusion_bunny.stages import run_stage
from diffusion_bunny.stages.characters import stage as characters_stage
from diffusion_bunny.stages.characters.identify import cluster_drawn


@pytest.fixture(scope="module")
def tiny_hub(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("hub")
    owl = write_tiny_owlv2(folder / "owlv2", grid_boxes=True)
    dino = write_tiny_dinov2(folder / "dinov2")
    return {
        "characters.backend": "hub",
        "characters.hub.detector": str(owl),
        "characters.hub.features": str(dino),
        "characters.hub.batch_size": 4,
    }


def copy_run(demo_run: Run, dest: Path) -> Run:
    shutil.copytree(demo_run.run_dir, dest)
    return Run.open(dest)


def test_named_by_their_pictures_and_a_rerun_loads_no_model(demo_run, tiny_hub, tmp_path, monkeypatch):
    """With references, the hub's sightings are drawn appearances under the references' names,
    boxes in the frame; the manifest says what found them and nothing was fitted. A rerun for a
    setting applied after the search reuses every frame's sightings and loads no model; weights saved over a
    model folder in place are another model, and every frame is searched again."""
    refs = build_demo_references(tmp_path / "refs")
    run = copy_run(demo_run, tmp_path / "run")
    overrides = {**tiny_hub, "characters.reference_dir": str(refs), "characters.hub.min_score": 0.0}
    cfg = load_config(None, overrides)
    faces = run_stage(run, "characters", cfg, progress=False)["faces"]
    drawn = faces.filter(pl.col("kind") == "drawn")
    assert drawn.height > 0
    # At score 0 every sighting of the search is a named one: only the drawn references' names.
    assert set(drawn["character"].drop_nulls()) <= {"mika", "biscuit"}
    assert drawn["character"].null_count() == 0
    frames = run.read_table("frames")
    size = dict(zip(frames["frame_id"], zip(frames["width"], frames["height"], strict=True), strict=True))
    for row in drawn.iter_rows(named=True):
        width, height = size[row["frame_id"]]
        assert 0 <= row["left"] < row["right"] <= width and 0 <= row["top"] < row["bottom"] <= height
        assert row["bottom"] - row["top"] >= cfg.characters.min_face_px
        assert len(row["embedding"]) == 32  # the tiny DINOv2's feature, not the fitted detector's
    facts = run.read_manifest("characters")["facts"]
    assert "fitted" not in facts and not list((run.run_dir / "cache").glob("characters/fitted-*.pt"))
    assert facts["hub"]["appearances"] == drawn.height and facts["hub"]["named"] == drawn.height
    assert "+hub-" in facts["detect_key"]

    def no_model(*args, **kwargs):
        raise AssertionError("a rerun that reuses every frame's sightings loads no model")

    # A rerun for a setting applied after the search (how near a cluster's sightings are).
    relabel = load_config(None, {**overrides, "characters.hub.cluster_distance": 0.3})
    with monkeypatch.context() as patch:
        patch.setattr(characters_stage, "HubFinder", no_model)
        again = run_stage(run, "characters", relabel, progress=False)["faces"]
    assert again.filter(pl.col("kind") == "drawn").height == drawn.height
    assert run.read_manifest("characters")["facts"]["frames_detected"] == 0

    # The detector's folder holds other weights now (saved over it in place): searched anew.
    weights = max(Path(tiny_hub["characters.hub.detector"]).iterdir(), key=lambda f: f.stat().st_size)
    later = weights.stat().st_mtime_ns + 2_000_000_000
    os.utime(weights, ns=(later, later))
    run_stage(run, "characters", cfg, progress=False)
    searched = run.read_manifest("characters")["facts"]
    assert searched["frames_detected"] == facts["frames_detected"] > 0 and searched["frames_cached"] == 0
    assert searched["detect_key"] != facts["detect_key"]


def test_without_pictures_characters_are_discovered_clustered_and_a_cluster_named(
    demo_run, tiny_hub, tmp_path
):
    """Without references the text queries find characters of any name; their tracks are
    clustered by feature (``drawn_NN``, a lone sighting is noise), and naming a cluster writes its
    sightings as reference pictures that the next run names them by."""
    from diffusion_bunny.stages.characters.stage import name_cluster

    run = copy_run(demo_run, tmp_path / "run")
    overrides = {**tiny_hub, "characters.hub.discover_score": 0.0, "characters.hub.cluster_distance": 1.0}
    faces = run_stage(run, "characters", load_config(None, overrides), progress=False)["faces"]
    drawn = faces.filter(pl.col("kind") == "drawn")
    assert drawn.height > 0 and drawn["character"].null_count() == drawn.height
    clusters = drawn["cluster"].drop_nulls()
    assert clusters.len() > 0 and all(c.startswith("drawn_") for c in clusters)
    facts = run.read_manifest("characters")["facts"]["hub"]
    assert facts["clusters"] == clusters.n_unique() and facts["noise"] == drawn["cluster"].null_count()

    biggest = clusters.value_counts(sort=True)["cluster"][0]
    result = name_cluster(run.run_dir, biggest, "pip", load_config(None, overrides))
    written = [Path(p) for p in result["references_added"]]
    assert written
    assert all(p.parent == run.run_dir / "references" / "pip" and p.suffix == ".png" for p in written)
    after = run.read_table("faces")
    # The new references guide the search now, and at score 0.5 of a random tiny model a few or
    # none pass; what must hold is that the run was labelled again with pip as a character.
    assert run.read_manifest("characters")["counts"]["references"].get("pip", 0) == len(written)
    assert after.filter(pl.col("kind") == "drawn")["character"].drop_nulls().is_in(["pip"]).all()
    # Searched with no score floor, pip's pictures are what names the sightings: pip is found.
    floor = {**overrides, "characters.hub.min_score": 0.0}
    named = run_stage(run, "characters", load_config(None, floor), progress=False)["faces"]
    assert named.filter((pl.col("kind") == "drawn") & (pl.col("character") == "pip")).height > 0


def test_a_hub_model_that_cannot_be_had_is_one_line_naming_the_setting(
    demo_run, tiny_hub, tmp_path, monkeypatch
):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run = copy_run(demo_run, tmp_path / "run")
    overrides = {**tiny_hub, "characters.hub.detector": "nobody-here/no-such-owl"}
    with pytest.raises(ModelError) as caught:
        run_stage(run, "characters", load_config(None, overrides), progress=False)
    text = str(caught.value)
    assert "\n" not in text and "characters.hub.detector" in text and "characters.backend: offline" in text
    assert run.read_manifest("characters") is None  # nothing half-written


def test_drawn_clusters_follow_tracks_and_leave_a_lone_sighting_as_noise():
    rng = np.random.default_rng(0)
    a, b, c = (rng.normal(size=16) for _ in range(3))
    features = np.stack([a, a + 0.01, b, b + 0.02, b - 0.01, c]).astype(np.float32)
    # Rows 0 and 1 one track; the second character in two tracks; the third alone.
    tracks = [0, 0, 1, 1, 2, 3]
    labels = cluster_drawn(features, tracks, threshold=0.3)
    assert labels[0] == labels[1] and labels[2] == labels[3] == labels[4]
    assert labels[2] == 0 and labels[0] == 1  # largest first
    assert labels[5] == -1
    assert cluster_drawn(np.zeros((0, 16), np.float32), [], 0.3) == []
