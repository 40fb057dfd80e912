"""Stage 08 on FLUX.1 and SD3.5: FluxPipeline / StableDiffusion3Pipeline draw the grid
with the LoRA in either file layout (diffusers, kohya/ComfyUI), scored and chosen as for SD."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffusion_bunny.models.faces import DetectSettings
from diffusion_bunny.stages.generate.grid import Checkpoint
from diffusion_bunny.stages.generate.identity import CharacterReferences
from diffusion_bunny.stages.generate.render import DEFAULT_GUIDANCE, default_size, pipe_family
from diffusion_bunny.stages.generate.settings import GenerateSettings
from diffusion_bunny.stages.generate.stage import draw_and_score
from diffusion_bunny.stages.train.tables import LORA_FILE


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def write_flow_lora(pipe, folder: Path, family: str) -> tuple[Path, Path]:
    """A LoRA with random non-zero weights on the transformer's attention, saved as stage 07
    saves it: the diffusers file and the kohya/ComfyUI file."""
    import torch
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from diffusion_bunny.models.lora_keys import lora_target_names, save_kohya_flow

    config = LoraConfig(r=4, lora_alpha=2, target_modules=lora_target_names(pipe.transformer, "attention"))
    pipe.transformer.add_adapter(config, adapter_name="_write")
    try:
        generator = torch.Generator().manual_seed(1)
        layers = {
            k: torch.randn(v.shape, generator=generator) * 0.3
            for k, v in get_peft_model_state_dict(pipe.transformer, adapter_name="_write").items()
        }
        folder.mkdir(parents=True, exist_ok=True)
        type(pipe).save_lora_weights(
            folder, transformer_lora_layers=layers, transformer_lora_adapter_metadata=config.to_dict()
        )
        kohya = save_kohya_flow(layers, folder / "run_kohya.safetensors", family, 2.0, pipe.transformer)
    finally:
        pipe.transformer.delete_adapters("_write")
    return folder / LORA_FILE, kohya


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_flow_pipelines_draw_the_grid_with_both_lora_files(family, tmp_path):
    from diffusion_bunny.models.diffusion import load_pipeline

    pipe = load_pipeline(f"tiny-{family}", device="cpu")
    assert pipe_family(pipe) == family and default_size(pipe) == 128
    diffusers_file, kohya_file = write_flow_lora(pipe, tmp_path / "lora" / "checkpoint-1", family)
    checkpoints = [Checkpoint("checkpoint-1", 1, diffusers_file), Checkpoint("checkpoint-2", 2, kohya_file)]
    cfg = GenerateSettings(
        prompts=("{trigger} {character}, portrait",),
        seeds=(0,),
        lora_scales=(0.0, 1.0),
        steps=2,
        max_sequence_length=32,
    )
    result = draw_and_score(
        tmp_path / "run",
        cfg,
        pipe_loader=lambda: pipe,
        checkpoints=checkpoints,
        references=CharacterReferences(),
        detect=DetectSettings(),
        trigger="bunnystyle",
        resolution=64,
        base_model=f"tiny-{family}",
    )
    gen = result.tables["generations"]
    assert sorted(gen["checkpoint"].to_list()) == ["base", "checkpoint-1", "checkpoint-2"]
    pixels = {
        row["checkpoint"]: np.asarray(Image.open(tmp_path / "run" / row["path"]), dtype=np.int16)
        for row in gen.iter_rows(named=True)
    }
    assert pixels["base"].shape == (64, 64, 3)
    assert np.abs(pixels["checkpoint-1"] - pixels["base"]).max() > 0  # the LoRA changes the picture
    # the kohya/ComfyUI file draws what the diffusers file draws (PNG rounding aside)
    assert np.abs(pixels["checkpoint-1"] - pixels["checkpoint-2"]).max() <= 1
    # no face in noise: the latest checkpoint, as for SD
    assert result.facts["best_checkpoint"] == "checkpoint-2"
    assert DEFAULT_GUIDANCE[family] != 7.5
