"""``bunny demo``'s work, as the README's first command runs it: every stage's notebook on the
demo movie, graded against its ground truth.

In a file of its own so pytest-xdist (``--dist loadfile``) can give this test, the longest of
the suite (nine notebooks, about a minute), a worker while the other headless-run tests of
``test_runner.py`` run on the other one.
"""

from __future__ import annotations

import nbformat
import polars as pl
import pytest
from notebooks import pictures

from diffusion_bunny.demo.run import run_demo
from diffusion_bunny.errors import ConfigError


def test_demo_runs_notebook_01_and_matches_ground_truth(demo, tmp_path):
    lora = tmp_path / "lora"  # not the workspace's checkpoint/ folder
    # 4 denoising steps per generated image instead of 20: the demo's grid (144 images) is the same
    # and nothing below depends on how sharp the tiny model's noise is (stage 08's own tests check
    # the images).
    summary = run_demo(
        out=tmp_path / "demo_run",
        movie_dir=demo.path.parent,
        progress=False,
        overrides={"train.output_dir": str(lora), "generate.steps": 4},
    )
    truth = demo.ground_truth()
    shots = pl.read_parquet(tmp_path / "demo_run" / "tables" / "shots.parquet")
    assert shots["start_frame"].to_list()[1:] == truth["cuts"]
    assert shots["kind"].to_list() == [s["kind"] for s in truth["shots"]]
    assert f"extract: {len(truth['shots'])} shots (" in summary
    assert f"against the ground truth ({len(truth['shots'])} shots)" in summary
    assert "precision 1.00 recall 1.00" in summary
    nb = nbformat.read(tmp_path / "demo_run" / "notebooks" / "01_extract_frames.ipynb", as_version=4)
    shown = pictures(nb)
    assert len(shown) == 4  # shot lengths, motion with threshold, boundary decisions, contact sheet
    # The charts are PNG; the contact sheet of frames is one JPEG, not a PNG beside it.
    assert len(pictures(nb, "image/png")) == 3 and len(pictures(nb, "image/jpeg")) == 1
    # Stage 02 ran through its notebook too, and agrees with the ground truth on every frame.
    n_frames = pl.read_parquet(tmp_path / "demo_run" / "tables" / "frames.parquet").height
    assert f"verdict as the ground truth for {n_frames} of {n_frames} frames" in summary
    assert ": 20 kept, 1 too_dark, 1 blurry, 1 duplicate" in summary
    nb = nbformat.read(tmp_path / "demo_run" / "notebooks" / "02_filter_quality.ipynb", as_version=4)
    shown = pictures(nb)
    assert len(shown) == 3  # histograms with thresholds, kept/rejected grid, the text strip
    # Stage 03 named both people from the demo's reference portraits, and the drawn girl and the
    # cartoon dog from a sprite and a poster, in every frame searched.
    kept = pl.read_parquet(tmp_path / "demo_run" / "tables" / "face_frames.parquet").height
    assert f"the named characters match the ground truth in {kept} of {kept} frames" in summary
    nb = nbformat.read(tmp_path / "demo_run" / "notebooks" / "03_detect_characters.ipynb", as_version=4)
    shown = pictures(nb)
    # What was taken from each reference, faces per character, screen-time timeline, the strips of
    # appearances, the detector preview, whose cell also printed the eval table of the face detectors.
    assert len(shown) == 5
    assert any(
        "mtcnn mirror_score=False" in o.get("text", "") for c in nb.cells for o in c.get("outputs", [])
    )
    # Stage 04 grouped the frames by place; its notebook drew its figures, the learning curve and the
    # exports.
    assert "scenes: " in summary and "adjusted Rand index" in summary
    ari = float(summary.split("adjusted Rand index ")[1].split()[0])
    assert ari > 0.8
    nb = nbformat.read(tmp_path / "demo_run" / "notebooks" / "04_cluster_scenes.ipynb", as_version=4)
    shown = pictures(nb)
    assert len(shown) == 4  # cluster sizes, similarity histogram, cluster sheet, learning curve
    text = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
    assert "through the adapter" in text and "TITLE:" in text
    assert (tmp_path / "demo_run" / "export" / "clusters_scene.edl").is_file()
    # Stage 05 captioned every kept frame offline, naming exactly the people of each shot.
    n_kept = pl.read_parquet(tmp_path / "demo_run" / "tables" / "captions.parquet").height
    assert f"captions: {n_kept} of {n_kept} frames captioned (template {n_kept})" in summary
    assert f"the caption names the ground truth's people in {n_kept} of {n_kept}" in summary
    nb = nbformat.read(tmp_path / "demo_run" / "notebooks" / "05_caption.ipynb", as_version=4)
    shown = pictures(nb)
    assert len(shown) == 2  # caption lengths, word frequencies
    # Stages 06-08 exported the dataset, trained the tiny LoRA and drew the grids, through their notebooks.
    items = pl.read_parquet(tmp_path / "demo_run" / "tables" / "dataset_items.parquet")
    assert (
        f"export: {items.height} pictures" in summary and (tmp_path / "demo_run" / "dataset" / "hf").is_dir()
    )
    assert (
        "train: 30 steps" in summary
        and len(list(lora.glob("tiny-30steps-*/pytorch_lora_weights.safetensors"))) == 1
    )
    generations = pl.read_parquet(tmp_path / "demo_run" / "tables" / "generations.parquet")
    assert generations.height > 0 and generations["best"].any() and "generate: " in summary
    # Its two people and its two drawn characters are drawn; the drawn ones scored by stage 03's detector.
    assert set(generations["character"]) == {"astronaut", "grace_hopper", "biscuit", "mika"}
    drawn = generations.filter(pl.col("character").is_in(["biscuit", "mika"]))
    assert drawn["drawn_score"].null_count() == 0 and "drawn score " in summary
    for name in ("06_export_dataset", "07_finetune_lora", "08_generate"):
        nb = nbformat.read(tmp_path / "demo_run" / "notebooks" / f"{name}.ipynb", as_version=4)
        assert pictures(nb), name
    # Stage 09 made the QA report: every section with figures (the dataset section adds the
    # exported pictures with their crops and the frames dropped by reason; stage 08's the drawn
    # characters' scores per checkpoint).
    assert f"report: 19 figures in {tmp_path / 'demo_run' / 'report' / 'index.html'}" in summary
    nb = nbformat.read(tmp_path / "demo_run" / "notebooks" / "09_qa_report.ipynb", as_version=4)
    shown = pictures(nb)
    # funnel, the dataset's 2 (exported pictures, drops by reason), quality, 2 shot figures, screen
    # time, 4 contact sheets and the 4 characters' exported pictures, clusters, caption lengths,
    # training loss, the drawn characters per checkpoint (identity per checkpoint has no face to
    # score on the tiny model's noise): every figure of the report
    assert len(shown) == 19


def test_a_mistyped_setting_is_said_before_the_demo_movie_is_built(tmp_path):
    """``bunny demo --set extract.treshold=1`` built the movie and its reference pictures (50 s)
    before it said the key was unknown; now nothing is built."""
    with pytest.raises(ConfigError, match=r"unknown key 'extract\.treshold'"):
        typo = {"extract.treshold": 1}
        run_demo(out=tmp_path / "run", movie_dir=tmp_path / "movie", progress=False, overrides=typo)
    assert not (tmp_path / "movie").exists() and not (tmp_path / "run").exists()
