"""FLUX.1 / SD3.5 base models: the tiny presets, family detection, and the two LoRA file
layouts (diffusers and kohya/ComfyUI) loaded back through the pipeline's ``load_lora_weights``."""

from __future__ import annotations

import json

import numpy as np
import pytest

from diffusion_bunny.errors import ModelError

FAMILIES = ("flux", "sd3")
PROMPT = "bunnystyle a photo of the cat"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _pipe(family: str):
    from diffusion_bunny.models.diffusion import load_pipeline

    return load_pipeline(f"tiny-{family}")


def _draw(pipe) -> np.ndarray:
    import torch

    out = pipe(
        prompt=PROMPT,
        num_inference_steps=2,
        height=64,
        width=64,
        max_sequence_length=32,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    )
    return out.images[0]


def _random_lora(pipe, targets: str, rank: int = 4, alpha: float = 3.0):
    """Add a peft LoRA (random A and B, so it changes the output) on the transformer's layers."""
    import torch
    from peft import LoraConfig

    from diffusion_bunny.models.lora_keys import lora_target_names

    names = lora_target_names(pipe.transformer, targets)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=names, init_lora_weights="gaussian")
    pipe.transformer.add_adapter(config, adapter_name="mem")
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in pipe.transformer.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return config, names


@pytest.mark.parametrize("family", FAMILIES)
def test_preset_is_an_ordinary_pipeline_folder_detected_from_its_config(family, tmp_path):
    import importlib.util

    from transformers import T5TokenizerFast

    from diffusion_bunny.models.diffusion import family_of_folder, resolve_base_model

    assert importlib.util.find_spec("sentencepiece") is None  # the T5 tokenizer needs only tokenizer.json
    pipe = _pipe(family)
    assert type(pipe).__name__ == {"flux": "FluxPipeline", "sd3": "StableDiffusion3Pipeline"}[family]
    assert pipe.vae.config.latent_channels == 16 and pipe.vae.config.shift_factor
    t5 = pipe.tokenizer_2 if family == "flux" else pipe.tokenizer_3
    assert isinstance(t5, T5TokenizerFast)
    ids = t5(PROMPT).input_ids
    assert ids[-1] == 1 and 2 not in ids  # </s> appended, no <unk>
    encoder = pipe.text_encoder_2 if family == "flux" else pipe.text_encoder_3
    assert len(t5) == encoder.config.vocab_size

    # the family comes from the folder's config: the class name, else the transformer's class
    folder = pipe.bunny_base.path
    assert family_of_folder(folder) == family
    copy = tmp_path / "renamed"
    copy.mkdir()
    index = json.loads((folder / "model_index.json").read_text())
    index["_class_name"] = "SomeOtherPipeline"
    (copy / "model_index.json").write_text(json.dumps(index))
    assert family_of_folder(copy) == family
    with pytest.raises(ModelError, match=r"train\.family = sd1"):
        resolve_base_model(f"tiny-{family}", "sd1")
    assert resolve_base_model("tiny", family).name == f"tiny-{family}"


def test_a_component_handed_in_is_used_and_the_folders_copy_never_read(tmp_path):
    """What the NF4 path relies on: the quantised transformer is loaded first and handed to
    load_pipeline, so the bf16 one in the folder is never read (here it is not even there)."""
    import shutil

    from diffusion_bunny.models.diffusion import load_pipeline

    pipe = _pipe("flux")
    folder = tmp_path / "no-transformer-weights"
    shutil.copytree(pipe.bunny_base.path, folder)
    for weights in (folder / "transformer").glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(ModelError, match="could not be loaded"):
        load_pipeline(str(folder))
    loaded = load_pipeline(str(folder), components={"transformer": pipe.transformer})
    assert loaded.transformer is pipe.transformer and loaded.bunny_base.family == "flux"


def test_a_folder_of_another_family_is_one_line_naming_the_setting(tmp_path):
    from diffusion_bunny.models.diffusion import resolve_base_model

    (tmp_path / "model_index.json").write_text(
        json.dumps({"_class_name": "WanPipeline", "transformer": ["diffusers", "WanTransformer3DModel"]})
    )
    with pytest.raises(ModelError) as err:
        resolve_base_model(str(tmp_path))
    message = str(err.value)
    assert "train.base_model" in message and "sd1, sdxl, flux, sd3" in message
    assert "\n" not in message


@pytest.mark.parametrize(("family", "targets"), [("flux", "attention+mlp"), ("sd3", "attention")])
def test_diffusers_and_kohya_files_load_back_like_the_adapter_in_memory(family, targets, tmp_path):
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file

    from diffusion_bunny.models.diffusion import load_lora
    from diffusion_bunny.models.lora_keys import is_kohya, save_kohya_flow

    trained = _pipe(family)
    base = _draw(trained)
    config, names = _random_lora(trained, targets)
    in_memory = _draw(trained)
    assert np.abs(in_memory - base).max() > 1e-3  # the LoRA changes the picture

    state = get_peft_model_state_dict(trained.transformer, adapter_name="mem")
    type(trained).save_lora_weights(
        tmp_path / "diffusers",
        transformer_lora_layers=state,
        transformer_lora_adapter_metadata=config.to_dict(),
    )
    diffusers_file = tmp_path / "diffusers" / "pytorch_lora_weights.safetensors"
    kohya_file = save_kohya_flow(state, tmp_path / "kohya.safetensors", family, 3.0, trained.transformer)
    kohya = load_file(kohya_file)
    assert is_kohya(kohya) and all(k.startswith("lora_unet_") for k in kohya)
    if family == "flux":  # q, k, v and the MLP input are one module in BFL's checkpoint
        assert "lora_unet_single_blocks_0_linear1.lora_down.weight" in kohya
    else:
        assert "lora_unet_joint_blocks_0_x_block_attn2_qkv.lora_down.weight" in kohya
    # SD3's last block is context_pre_only: its text queries reach nothing and are not trained
    assert family == "flux" or "transformer_blocks.1.attn.add_q_proj" not in names

    fresh = _pipe(family)
    np.testing.assert_allclose(_draw(fresh), base, atol=1e-6)
    # the pipeline's own load_lora_weights, on the diffusers file (alpha from its metadata)
    fresh.load_lora_weights(str(diffusers_file), adapter_name="d")
    np.testing.assert_allclose(_draw(fresh), in_memory, atol=1e-5)
    fresh.delete_adapters("d")
    # our loader on both files: the layer check, then load_lora_weights
    for path in (diffusers_file, kohya_file):
        load_lora(fresh, path, 1.0, adapter_name="x")
        np.testing.assert_allclose(_draw(fresh), in_memory, atol=1e-5)
    load_lora(fresh, kohya_file, 0.0, adapter_name="x")
    np.testing.assert_allclose(_draw(fresh), base, atol=1e-6)


def test_a_flux_lora_on_the_sd3_preset_is_one_line_naming_the_file(tmp_path):
    from peft.utils import get_peft_model_state_dict

    from diffusion_bunny.models.diffusion import load_lora

    flux = _pipe("flux")
    _random_lora(flux, "attention")
    state = get_peft_model_state_dict(flux.transformer, adapter_name="mem")
    type(flux).save_lora_weights(tmp_path, transformer_lora_layers=state)
    with pytest.raises(ModelError, match="does not match base model 'tiny-sd3'"):
        load_lora(_pipe("sd3"), tmp_path / "pytorch_lora_weights.safetensors")


def test_kohya_flux_file_reads_back_through_diffusers_own_converter_at_real_sizes():
    """diffusers' kohya FLUX reader hard-codes FLUX.1's layer sizes, so ComfyUI-style files must
    have exactly its layout: checked on a FLUX.1-sized transformer on the meta device (no
    weights), two blocks of each kind, against our writer."""
    import torch
    from accelerate import init_empty_weights
    from diffusers import FluxPipeline, FluxTransformer2DModel

    from diffusion_bunny.models.lora_keys import diffusers_to_kohya, lora_target_names

    with init_empty_weights():
        tf = FluxTransformer2DModel(num_layers=2, num_single_layers=2, guidance_embeds=True)
    gen = torch.Generator().manual_seed(0)
    state = {}
    for n in lora_target_names(tf, "attention+mlp"):
        lin = tf.get_submodule(n)
        state[f"{n}.lora_A.weight"] = torch.randn(4, lin.in_features, generator=gen) * 0.01
        state[f"{n}.lora_B.weight"] = torch.randn(lin.out_features, 4, generator=gen) * 0.01
    kohya = diffusers_to_kohya(state, tf, "flux", alpha=3.0)
    theirs = FluxPipeline.lora_state_dict(kohya)
    theirs = theirs[0] if isinstance(theirs, tuple) else theirs
    for n in lora_target_names(tf, "attention+mlp"):
        a, b = state[f"{n}.lora_A.weight"], state[f"{n}.lora_B.weight"]
        x = torch.randn(a.shape[1], generator=gen)
        ours = b @ (a @ x) * (3.0 / 4)
        ta, tb = theirs[f"transformer.{n}.lora_A.weight"], theirs[f"transformer.{n}.lora_B.weight"]
        got = tb.float() @ (ta.float() @ x)
        assert torch.allclose(got, ours, rtol=1e-4, atol=1e-7), n
