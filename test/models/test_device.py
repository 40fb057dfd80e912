"""Device resolution shared by every model (TransNetV2, CLIP, diffusion): ``auto`` never imports
torch on a machine without a GPU driver, and a refused ``cuda`` names the setting to change."""

from __future__ import annotations

import pytest

from diffusion_bunny.errors import ModelError
from diffusion_bunny.models.device import resolve_device


@pytest.mark.parametrize("setting", ["extraction.device", "scenes.device", "training.device"])
def test_cuda_without_gpu_is_a_clear_error_naming_the_setting(setting):
    import torch

    assert resolve_device("cpu", setting) == "cpu"
    if torch.cuda.is_available():  # pragma: no cover - only on a GPU machine
        assert resolve_device("auto", setting) == "cuda"
        assert resolve_device("cuda", setting) == "cuda"
        return
    assert resolve_device("auto", setting) == "cpu"
    for device in ("cuda", "cuda:1"):
        with pytest.raises(ModelError, match=rf"{setting} is '{device}'.*torch sees no CUDA GPU") as err:
            resolve_device(device, setting)
        assert "\n" not in str(err.value)
