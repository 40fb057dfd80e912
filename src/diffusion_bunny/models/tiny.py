"""Tiny Stable Diffusion models built in code (random weights, tiny configs, a tokenizer written by
the code): the ``tiny`` and ``tiny-sdxl`` presets the demo and the tests train and draw with on a
CPU in seconds, saved once as ordinary diffusers pipeline folders in the user cache, so diffusers'
own scripts load them too. Nothing is downloaded."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Literal

from diffusion_bunny.models.cache import cache_dir

#: The model families this workspace trains (diffusers' pipeline classes differ per family).
Family = Literal["sd1", "sdxl"]

#: Presets built in code. Bump :data:`PRESET_VERSION` whenever the build changes, so a cached
#: folder from an older build is not reused.
PRESETS: dict[str, Family] = {"tiny": "sd1", "tiny-sdxl": "sdxl"}

PRESET_VERSION = 1
PRESET_SEED = 0


# ---------------------------------------------------------------------------------------------
# Presets


def _tiny_text_config(vocab: dict[str, int], projection_dim: int | None = None) -> Any:
    from transformers import CLIPTextConfig

    extra = {"projection_dim": projection_dim} if projection_dim is not None else {}
    return CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
        hidden_act="quick_gelu",
        **extra,
    )


def _tiny_vae() -> Any:
    """An AutoencoderKL with SD's four resolution levels (so latents are 1/8 of the image and the
    bucket arithmetic matches real models), 4 latent channels, and few channels per level."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=128,
        scaling_factor=0.18215,
    )


def _scheduler_kwargs() -> dict[str, Any]:
    # Stable Diffusion's noise schedule (both families train on it).
    return {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "steps_offset": 1,
    }


def build_tiny_pipeline(folder: Path, family: Family = "sd1", seed: int = PRESET_SEED) -> Path:
    """Build a small random Stable Diffusion (``sd1``) or SDXL (``sdxl``) pipeline with fixed
    seeds and ``save_pretrained`` it into ``folder``; returns ``folder``.

    The layout is the real one (UNet with cross-attention blocks, four-level VAE, CLIP text
    encoder(s) and tokenizer(s), a scheduler), only narrow, so every code path of training and
    generation runs on it on a CPU in seconds.
    """
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from diffusion_bunny.models.tiny_clip import DEFAULT_WORDS, write_clip_tokenizer

    folder = Path(folder)
    words = (*DEFAULT_WORDS, "bunnystyle", "bunny", "in", "style", "person", "portrait")
    tok_dir = folder / "_tokenizer_src"
    vocab = write_clip_tokenizer(tok_dir, model_max_length=77, words=words)
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)

    torch.manual_seed(seed)
    vae = _tiny_vae()
    if family == "sd1":
        from diffusers import PNDMScheduler, StableDiffusionPipeline

        unet = UNet2DConditionModel(
            sample_size=16,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=32,
        )
        text_encoder = CLIPTextModel(_tiny_text_config(vocab))
        scheduler = PNDMScheduler(**_scheduler_kwargs(), skip_prk_steps=True)
        pipe = StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    else:
        from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

        text_dim, time_dim = 32, 8
        unet = UNet2DConditionModel(
            sample_size=16,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=time_dim,
            transformer_layers_per_block=(1, 2),
            # pooled text embedding of text_encoder_2 + six size/crop numbers, each embedded
            projection_class_embeddings_input_dim=text_dim + 6 * time_dim,
            cross_attention_dim=2 * text_dim,  # both encoders' hidden states, concatenated
            norm_num_groups=32,
        )
        text_encoder = CLIPTextModel(_tiny_text_config(vocab))
        text_encoder_2 = CLIPTextModelWithProjection(_tiny_text_config(vocab, projection_dim=text_dim))
        scheduler = EulerDiscreteScheduler(**_scheduler_kwargs(), timestep_spacing="leading")
        pipe = StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer,
            unet=unet,
            scheduler=scheduler,
        )
    pipe.save_pretrained(folder, safe_serialization=True)
    shutil.rmtree(tok_dir, ignore_errors=True)
    return folder


def preset_path(name: str) -> Path:
    """The cache folder of a preset (built or not)."""
    return cache_dir() / f"sd-preset-{name}-v{PRESET_VERSION}"


def ensure_preset(name: str) -> Path:
    """The preset's pipeline folder, built first if this machine has none. Built into a temporary
    sibling and renamed, so two processes building at once never see half a folder."""
    folder = preset_path(name)
    if (folder / "model_index.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    build_tiny_pipeline(tmp, PRESETS[name])
    if folder.exists() and not (folder / "model_index.json").is_file():
        shutil.rmtree(folder, ignore_errors=True)  # an interrupted older build
    try:
        os.replace(tmp, folder)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # another process finished first; its copy is the same
    return folder
