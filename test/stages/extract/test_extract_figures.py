"""Notebook 01's slider and figures, driven from Python."""

from __future__ import annotations

from io import BytesIO

import numpy as np
import polars as pl
import pytest
import yaml
from PIL import Image

from diffusion_bunny.config import load_config, save_local_settings
from diffusion_bunny.demo.metrics import match_boundaries
from diffusion_bunny.errors import ConfigError
from diffusion_bunny.pipeline.run import Run
from diffusion_bunny.stages import run_stage
from diffusion_bunny.stages.extract.plots import (
    contact_sheet,
    decision_counts,
    decision_plot,
    motion_plot,
    shot_length_plot,
)
from diffusion_bunny.stages.extract.widgets import MotionThresholdExplorer


@pytest.fixture(scope="module")
def clip_run(cut_clip, tmp_path_factory):
    path, _ = cut_clip
    run = Run.create(tmp_path_factory.mktemp("wrun"), path)
    run_stage(run, "extract", load_config(), progress=False)
    return run


def test_slider_reclassifies_without_decoding(clip_run, tmp_path):
    explorer = MotionThresholdExplorer(clip_run, 1.5, config_root=tmp_path)
    assert explorer.summary == {"static": 2, "dynamic": 2, "keyframes": 8}
    # No Output widgets: headless executors (papermill/nbclient) hang on images inside them.
    import ipywidgets

    def walk(w):
        yield w
        for child in getattr(w, "children", ()):
            yield from walk(child)

    assert not any(isinstance(w, ipywidgets.Output) for w in walk(explorer.widget))
    sheet_before = bytes(explorer.sheet_img.value)
    assert bytes(explorer.plot_img.value).startswith(b"\x89PNG") and sheet_before.startswith(b"\xff\xd8")
    explorer.set_threshold(explorer.slider.max)
    assert explorer.summary == {"static": 4, "dynamic": 0, "keyframes": 4}
    # The contact sheet now holds one keyframe per shot: a narrower picture, redrawn.
    width = Image.open(BytesIO(bytes(explorer.sheet_img.value))).width
    assert width < Image.open(BytesIO(sheet_before)).width
    assert "<b>4</b> static shots" in explorer.counts.value
    explorer.set_threshold(0.0)
    assert explorer.summary["dynamic"] == 4
    assert explorer.picks()["frame_index"].n_unique() == explorer.picks().height
    explorer.set_threshold(5.0)
    path = explorer.save()
    assert yaml.safe_load(path.read_text()) == {"extract": {"motion_threshold": 5.0}}
    cfg = load_config(root=tmp_path)
    assert cfg.extract.motion_threshold == 5.0
    # A configured threshold above every shot's motion and above 5 is what the slider opens on
    # (ipywidgets clamped it to the range, and saving wrote the clamped value).
    above = round(float(clip_run.read_table("shots")["motion"].max()) * 2 + 5.03, 2)
    high = MotionThresholdExplorer(clip_run, above, config_root=tmp_path)
    assert high.slider.value == above and high.summary["dynamic"] == 0


def test_slider_sheet_is_the_notebooks_and_save_names_the_overrides_that_win(clip_run, tmp_path):
    """The widget's sheet is the one notebook 01 draws for the same threshold (it lacked the film's
    size, so no picture box and no note on too-short shots); and a threshold the notebook's own
    overrides set wins over the saved file, which the line under the button says (it said only
    "saved to")."""
    from diffusion_bunny.stages.extract.keyframes import select_keyframes
    from diffusion_bunny.stages.extract.plots import contact_sheet

    overrides = {"extract.motion_threshold": 2.0}
    explorer = MotionThresholdExplorer(clip_run, 1.5, config_root=tmp_path, overrides=overrides)
    facts = clip_run.read_manifest("extract")["facts"]
    shots = clip_run.read_table("shots")
    kept = select_keyframes(clip_run.read_table("keyframe_candidates"), shots, 1.5)
    size = (facts["width"], facts["height"])
    drawn = np.asarray(contact_sheet(clip_run.run_dir, kept, shots, max_shots=30, frame_size=size), float)
    shown = np.asarray(Image.open(BytesIO(bytes(explorer.sheet_img.value))).convert("RGB"), float)
    far = (np.abs(shown - drawn).max(axis=2) > 60).mean()  # JPEG moves few pixels that far
    assert shown.shape == drawn.shape and far < 0.002, far
    explorer.set_threshold(0.5)
    assert explorer.save() is not None
    assert "extract.motion_threshold is set by this notebook" in explorer.saved.value
    explorer.set_threshold(2.0)
    explorer.save()
    assert "win over the saved file" not in explorer.saved.value
    for form in (
        '{"extract.motion_threshold": 2.0}',
        ["extract.motion_threshold=2"],
        {"extract": {"motion_threshold": 2}},
    ):
        formed = MotionThresholdExplorer(clip_run, 1.5, config_root=tmp_path, overrides=form)
        formed.set_threshold(0.5)
        formed.save()
        assert "extract.motion_threshold is set by this notebook" in formed.saved.value, form
    # A --set of the last bunny run of the folder is a layer the notebook opens with: said too.
    clip_run.write_settings(None, {"extract.motion_threshold": 3.0})
    try:
        recorded = MotionThresholdExplorer(clip_run, 1.5, config_root=tmp_path)
        recorded.set_threshold(0.5)
        recorded.save()
        assert "extract.motion_threshold is set by this notebook" in recorded.saved.value
    finally:
        (clip_run.run_dir / "settings.json").unlink()


def test_save_local_settings_merges(tmp_path):
    save_local_settings("x", {"extract": {"jpeg_quality": 80}}, tmp_path)
    path = save_local_settings("x", {"extract": {"motion_threshold": 2.0}}, tmp_path)
    assert yaml.safe_load(path.read_text()) == {"extract": {"jpeg_quality": 80, "motion_threshold": 2.0}}
    # A section written by hand as something else than settings is one line, not an AttributeError.
    path.write_text("extract: 5\n")
    with pytest.raises(ConfigError, match="section 'extract' is not a mapping of settings"):
        save_local_settings("x", {"extract": {"motion_threshold": 2.0}}, tmp_path)


def test_figures_render(clip_run, tmp_path):
    shots = clip_run.read_table("shots")
    frames = clip_run.read_table("frames")
    for i, plot in enumerate([shot_length_plot(shots), motion_plot(shots, 1.5)]):
        out = tmp_path / f"p{i}.png"
        plot.save(out, verbose=False)
        assert out.stat().st_size > 5_000
    sheet = contact_sheet(clip_run.run_dir, frames, shots, path_column="path", thumb_width=160)
    # 4 shot rows of 90 px thumbnails (320x180 frames) plus titles; 3 columns for dynamic shots.
    assert sheet.size == (130 + 3 * (160 + 4), 4 * (90 + 16 + 4))
    pixels = np.asarray(sheet)
    first_thumb = pixels[16 : 16 + 90, 130 : 130 + 160]
    assert first_thumb.std() > 20  # a real picture was pasted, not the blank canvas
    cands = clip_run.read_table("keyframe_candidates")
    small = contact_sheet(clip_run.run_dir, cands, shots, max_shots=2, thumb_width=160)
    assert small.size[1] == 22 + 2 * (90 + 16 + 4)  # header line "first 2 of 4 shots"
    broken = frames.with_columns(pl.lit("frames/missing.jpg").alias("path"))
    assert contact_sheet(clip_run.run_dir, broken, shots, path_column="path").size[0] > 0


def test_decision_plot_counts_every_candidate_by_its_rule(clip_run, tmp_path):
    cands = clip_run.read_table("boundary_candidates")
    assert cands.height >= 3  # the clip's three cuts are candidates
    counts = decision_counts(cands)
    assert int(counts["candidates"].sum()) == cands.height
    for row in counts.iter_rows(named=True):
        kind, reason = row["rule"].split(": ", 1)
        same = cands.filter(
            (pl.col("kind") == kind)
            & (pl.col("decision") == row["decision"])
            & (pl.col("reason").fill_null(pl.col("decision")) == reason)
        )
        assert same.height == row["candidates"]
    facts = clip_run.read_manifest("extract")["facts"]
    plot = decision_plot(cands, facts)
    judged = int(cands["decision"].is_in(["confirmed", "rejected"]).sum())
    assert plot.labels.title == f"{cands.height} boundary candidates, {judged} judged by TransNetV2"
    assert f"{100 * facts['model_frames_per_decoded']:.1f}% of the decoded frames" in plot.labels.subtitle
    out = tmp_path / "decisions.png"
    plot.save(out, verbose=False)
    assert out.stat().st_size > 5_000
    # A detector without candidates (PySceneDetect's, TransNetV2 alone): nothing to plot.
    assert decision_plot(cands.clear()) is None


def test_boundary_matching_is_one_to_one():
    s = match_boundaries([10, 11, 50], [10, 30], tolerance=1)
    assert (s.tp, s.fp, s.fn) == (1, 2, 1)
    assert s.precision == pytest.approx(1 / 3) and s.recall == 0.5
    assert match_boundaries([12], [10], tolerance=2).f1 == 1.0
    assert match_boundaries([12], [10], tolerance=1).f1 == 0.0
    assert match_boundaries([], []).f1 == 1.0
