"""Device resolution shared by every model (TransNetV2, CLIP, diffusion): ``auto`` never imports
torch on a machine without a GPU driver, and a refused ``cuda`` names the setting to change."""

from __future__ import annotations

import pytest

from diffusion_bunny.errors import ModelError
from diffusion_bunny.models.device import cpu_summary, resolve_device


@pytest.mark.parametrize("setting", ["extract.device", "scenes.device", "train.device"])
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


def test_torch_threads_sets_and_restores(monkeypatch):
    import torch

    from diffusion_bunny.models.device import torch_threads
    from diffusion_bunny.stages.scenes import adapter

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch_threads(1):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with pytest.raises(RuntimeError), torch_threads(1):
            raise RuntimeError("boom")
        assert torch.get_num_threads() == 2
        # Stage 04's adapter trains on one thread (spinning threads on a busy machine: 3x slower).
        seen = []
        real = adapter.normalise
        monkeypatch.setattr(adapter, "normalise", lambda v: seen.append(torch.get_num_threads()) or real(v))
        import numpy as np

        vectors = np.random.default_rng(0).standard_normal((6, 4)).astype(np.float32)
        fitted = adapter.train_adapter(vectors, [adapter.Triplet(0, (1,), (5,))], epochs=3)
        assert seen == [1] and fitted.triplets == 1 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_tiny_presets_run_on_one_thread_on_the_cpu_and_real_models_keep_theirs(monkeypatch):
    """Stages 07/08 with a preset on the CPU: one torch thread (spinning threads made the demo's
    grid 10x slower beside another process); a real model or a GPU keeps torch's threads."""
    import torch

    from diffusion_bunny.models import device as dev

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    monkeypatch.setattr(dev, "cuda_driver_sees_gpu", lambda: False)
    try:
        for source, device, inside in [("preset", "auto", 1), ("preset", "cpu", 1), ("hub", "cpu", 2)]:
            with dev.cpu_threads_for(source, device, "train.device"):
                assert torch.get_num_threads() == inside, (source, device)
            assert torch.get_num_threads() == 2
        monkeypatch.setattr(dev, "cuda_driver_sees_gpu", lambda: True)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        with dev.cpu_threads_for("preset", "auto", "train.device"):
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_cpu_summary_names_the_model_and_its_vector_extensions() -> None:
    core = "model name\t: AMD EPYC 9B14\nflags\t\t: fpu sse2 avx avx2 fma avx512f avx512_vnni\n"
    two_cores = f"processor\t: 0\n{core}\nprocessor\t: 1\n{core}"
    assert cpu_summary(two_cores) == "AMD EPYC 9B14 (AVX-512 VNNI, AVX-512, AVX2)"
    assert cpu_summary("model name\t: AMD EPYC\nflags\t: fpu avx avx2 fma\n") == "AMD EPYC (AVX2)"
    # No vector extension worth naming, no model name (some ARM kernels), no cpuinfo at all.
    assert cpu_summary("model name : Old CPU\nflags : fpu sse2\n") == "Old CPU"
    assert cpu_summary("Features : fp asimd\n") == "unknown"
    assert cpu_summary("") == "unknown"


def test_a_pipeline_for_a_missing_gpu_names_the_stages_own_device_setting_before_loading(monkeypatch):
    """Stage 08 draws with ``train.base_model`` when ``generate.base_model`` is null: the refusal
    named ``train.device`` (already ``cpu``) after the whole model had been read."""
    import torch

    from diffusion_bunny.models import diffusion

    if torch.cuda.is_available():  # pragma: no cover - only on a GPU machine
        pytest.skip("this machine has a GPU")
    monkeypatch.setattr(diffusion, "pipeline_class", lambda family: pytest.fail("the model was read"))
    with pytest.raises(ModelError, match=r"^generate\.device is 'cuda'.*set generate\.device to auto or cpu"):
        diffusion.load_pipeline(
            "tiny", device="cuda", setting="train.base_model", device_setting="generate.device"
        )
    with pytest.raises(ModelError, match=r"^train\.device is 'cuda'"):
        diffusion.load_pipeline("tiny", device="cuda")
