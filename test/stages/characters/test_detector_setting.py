"""characters.detector replaced characters.model (issue 30): an old config still loads."""

from __future__ import annotations

import pytest

from diffusion_bunny.config import ConfigError, load_config


def test_model_is_the_old_name_of_detector(tmp_path, caplog):
    (tmp_path / "config").mkdir()
    old = tmp_path / "config" / "local_settings.yaml"
    old.write_text("characters:\n  model: cnn\n")
    with caplog.at_level("WARNING", logger="diffusion_bunny.config"):
        cfg = load_config(None, [], root=tmp_path)
    assert cfg.characters.detector == "cnn"
    lines = [r.getMessage() for r in caplog.records if r.name == "diffusion_bunny.config"]
    assert lines == [f"{old}: the setting characters.model is now called characters.detector"]
    assert load_config(None, ["characters.model=hog"], root=tmp_path).characters.detector == "hog"
    # Both names in one layer cannot be resolved: one line naming both.
    with pytest.raises(ConfigError) as info:
        load_config(None, ["characters.model=hog", "characters.detector=mtcnn"], root=tmp_path)
    assert "sets characters.model and characters.detector" in str(info.value)
    # A detector that does not exist names the key and the choices.
    with pytest.raises(ConfigError) as info:
        load_config(None, ["characters.detector=retina"], root=tmp_path)
    assert "characters.detector" in str(info.value) and "mtcnn" in str(info.value)
