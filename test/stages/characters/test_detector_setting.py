"""``characters.detector``: one tagged setting that chooses a registered face detector and holds its
own settings; the older forms (``characters.model``, a detector's settings at the section's level)
still load, with one warning each."""

from __future__ import annotations

import pytest

from diffusion_bunny.config import ConfigError, load_config
from diffusion_bunny.models.centerface import CenterFaceSettings
from diffusion_bunny.models.dlib_detect import HogSettings
from diffusion_bunny.models.mtcnn import MtcnnSettings


def test_model_is_the_old_name_of_detector(tmp_path, caplog):
    (tmp_path / "config").mkdir()
    old = tmp_path / "config" / "local_settings.yaml"
    old.write_text("characters:\n  model: cnn\n")
    with caplog.at_level("WARNING", logger="diffusion_bunny.config"):
        cfg = load_config(None, [], root=tmp_path)
    assert cfg.characters.detector.name == "cnn"
    lines = [r.getMessage() for r in caplog.records if r.name == "diffusion_bunny.config"]
    assert lines == [f"{old}: the setting characters.model is now called characters.detector"]
    assert load_config(None, ["characters.model=hog"], root=tmp_path).characters.detector == HogSettings()
    # Both names in one layer cannot be resolved: one line naming both.
    with pytest.raises(ConfigError) as info:
        load_config(None, ["characters.model=hog", "characters.detector=mtcnn"], root=tmp_path)
    assert "sets characters.model and characters.detector" in str(info.value)
    # A detector that does not exist names the key and the choices.
    with pytest.raises(ConfigError) as info:
        load_config(None, ["characters.detector=retina"], root=tmp_path)
    assert str(info.value) == (
        "config error: characters.detector = 'retina': 'retina' is not a face "
        "detector; choose one of centerface, cnn, hog, mediapipe, mtcnn"
    )


def test_the_detector_holds_its_own_settings(tmp_path):
    # Its name alone: its defaults, written once, in its own module.
    assert (
        load_config(None, ["characters.detector=mtcnn"], root=tmp_path).characters.detector == MtcnnSettings()
    )
    tuned = load_config(None, {"characters.detector": {"name": "hog", "upsample": 2}}, root=tmp_path)
    assert tuned.characters.detector == HogSettings(upsample=2)
    # Another detector's setting is refused, naming the ones this detector has.
    with pytest.raises(ConfigError) as info:
        load_config(None, {"characters.detector": {"name": "hog", "scale_step": 0.8}}, root=tmp_path)
    assert str(info.value) == (
        "config error: unknown key 'characters.detector.scale_step' (allowed here: name, upsample)"
    )
    with pytest.raises(ConfigError) as info:
        load_config(None, {"characters.detector": {"name": "mtcnn", "scale_step": 2}}, root=tmp_path)
    assert str(info.value) == (
        "config error: characters.detector.scale_step = 2: Input should be less than or equal to 0.95"
    )


def test_layers_tune_the_detector_named_below_and_a_new_name_replaces_it(tmp_path):
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "main.yaml").write_text(
        "characters:\n  detector:\n    name: mtcnn\n    min_score: 0.9\n"
    )
    # Tuned without naming it: the detector named below, with its other settings kept.
    tuned = load_config(None, ["characters.detector.scale_step=0.8"], root=tmp_path).characters.detector
    assert tuned == MtcnnSettings(min_score=0.9, scale_step=0.8)
    # Another detector named: its own defaults, not MTCNN's min_score 0.9.
    other = load_config(None, {"characters.detector": {"name": "centerface"}}, root=tmp_path)
    assert other.characters.detector == CenterFaceSettings()
    assert load_config(None, ["characters.detector=centerface"], root=tmp_path).characters.detector == (
        CenterFaceSettings()
    )


def test_a_detector_setting_at_the_sections_level_still_loads(tmp_path, caplog):
    with caplog.at_level("WARNING"):
        cfg = load_config(
            None,
            ["characters.detector=mtcnn", "characters.scale_step=0.8", "characters.upsample=2"],
            root=tmp_path,
        )
    assert cfg.characters.detector == MtcnnSettings(scale_step=0.8)
    lines = [r.getMessage() for r in caplog.records]
    assert "--set: the setting characters.scale_step is now characters.detector.scale_step" in lines
    assert "characters.upsample is not a setting of the face detector mtcnn; it is ignored" in lines
    # A layer above still wins over it: the flat key moved within its own layer.
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "local_old.yaml").write_text("characters:\n  detector: mtcnn\n  scale_step: 0.8\n")
    tuned = load_config(None, ["characters.detector.scale_step=0.9"], root=tmp_path).characters.detector
    assert tuned == MtcnnSettings(scale_step=0.9)
    assert load_config(None, [], root=tmp_path).characters.detector == MtcnnSettings(scale_step=0.8)


def test_a_detector_setting_under_both_names_in_one_layer_is_one_line(tmp_path):
    """The old place and the new one in one layer (a file, or ``--set``) cannot be resolved: the
    old one silently won (and with ``--set`` the new one was lost). A ``detector`` that is neither
    a name nor a mapping next to an old key, and a ``name`` that is a list or a mapping, are one
    line too, not a bug's traceback."""
    layer = tmp_path / "both.yaml"
    layer.write_text("extract:\n  threshold: 30\n  detector:\n    name: content\n    threshold: 20\n")
    with pytest.raises(ConfigError) as info:
        load_config(layer, [], root=tmp_path)
    assert str(info.value).startswith(
        f"config error: {layer} sets extract.threshold and extract.detector.threshold"
    )
    assert str(info.value).endswith("keep only extract.detector.threshold")
    for both in (
        ["extract.threshold=30", "extract.detector.threshold=20"],
        ["characters.min_score=0.9", "characters.detector.min_score=0.3"],
    ):
        with pytest.raises(ConfigError, match=r"^config error: --set sets \S+ and \S+; .*keep only"):
            load_config(None, both, root=tmp_path)
    for chosen in ("[1, 2]", "5"):
        with pytest.raises(ConfigError) as info:
            load_config(None, [f"extract.detector={chosen}", "extract.threshold=3"], root=tmp_path)
        assert str(info.value) == (
            f"config error: --set sets extract.detector = {chosen}: extract.detector must be a detector "
            "name or a mapping"
        )
    for name in ([1, 2], {"a": 1}):
        with pytest.raises(ConfigError) as info:
            load_config(None, {"characters.detector": {"name": name}}, root=tmp_path)
        assert f"'{name}' is not a face detector; choose one of centerface, cnn" in str(info.value)
        assert "\n" not in str(info.value)
