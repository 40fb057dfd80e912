"""Tiny diffusion models built in code (random weights, tiny configs, tokenizers written by the
code): the ``tiny`` (SD 1.x), ``tiny-sdxl``, ``tiny-flux`` (FLUX.1-dev) and ``tiny-sd3`` (SD3.5
medium) presets the demo and the tests train and draw with on a CPU in seconds, saved once as
ordinary diffusers pipeline folders in the user cache, so diffusers' own scripts (among them
``train_dreambooth_lora_flux.py``, which the benchmark runs) load them too. Nothing is downloaded.

The rectified-flow presets keep every size that matters to the code paths at the real model's
value, only narrow: a four-level VAE (8x spatial factor) with 16 latent channels, no quant convs
and the real ``scaling_factor`` / ``shift_factor``; FLUX's ``in_channels`` 64 (16 channels packed
2x2), guidance embedding, RoPE axes summing to the head size; SD3.5's patch 2, MMDiT-X dual
attention in block 0 and RMS qk-norm, with the T5 width >= both CLIP widths together (SD3 pads
the CLIP sequence to the T5 width); the real FlowMatchEuler scheduler configs."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Literal

from diffusion_bunny.models.cache import cache_dir
from diffusion_bunny.models.tiny_clip import DEFAULT_WORDS, clip_text_config, write_clip_tokenizer
from diffusion_bunny.models.tiny_t5 import write_t5_tokenizer

#: The model families this workspace trains (diffusers' pipeline classes differ per family).
Family = Literal["sd1", "sdxl", "flux", "sd3"]

#: The rectified-flow transformer families (trained with the flow-matching objective).
FLOW_FAMILIES: tuple[Family, ...] = ("flux", "sd3")

#: Presets built in code. Bump :data:`PRESET_VERSION` whenever the build changes, so a cached
#: folder from an older build is not reused.
PRESETS: dict[str, Family] = {"tiny": "sd1", "tiny-sdxl": "sdxl", "tiny-flux": "flux", "tiny-sd3": "sd3"}

PRESET_VERSION = 1
PRESET_SEED = 0


# ---------------------------------------------------------------------------------------------
# Presets


def _tiny_vae(latent_channels: int = 4, scaling: float = 0.18215, **flow: Any) -> Any:
    """An AutoencoderKL with SD's four resolution levels (so latents are 1/8 of the image and the
    bucket arithmetic matches real models) and few channels per level; 4 latent channels for SD,
    16 with the real scaling/shift factors (``flow``: shift_factor, no quant convs) for
    FLUX.1/SD3.5."""
    from diffusers import AutoencoderKL  # lazy: diffusers takes 2.7 s to import

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 32, 32),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=128,
        scaling_factor=scaling,
        **flow,
    )


def _tiny_unet(**conditioning: Any) -> Any:
    """The UNet both SD families share: two levels (plain, then cross-attention) of 32 and 64
    channels on 4 latent channels; ``conditioning`` holds what a family adds (its attention
    heads, cross-attention width and, for SDXL, the pooled-text and size embeddings)."""
    from diffusers import UNet2DConditionModel  # lazy: diffusers takes 2.7 s to import

    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=32,
        **conditioning,
    )


def _clip(vocab: dict[str, int], hidden: int, projection: int | None) -> Any:
    """A tiny CLIP text encoder, with a projection (``CLIPTextModelWithProjection``) when
    ``projection`` is given."""
    from transformers import (  # lazy: transformers takes 0.56 s to import
        CLIPTextModel,
        CLIPTextModelWithProjection,
    )

    config = clip_text_config(vocab, hidden, projection_dim=projection)
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def _scheduler_kwargs() -> dict[str, Any]:
    # Stable Diffusion's noise schedule (both families train on it).
    return {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "steps_offset": 1,
    }


def _save(pipe: Any, folder: Path, tokenizer_src: Path) -> Path:
    """``save_pretrained`` the pipeline into ``folder`` and drop the tokenizer sources it was
    built from (the pipeline saved its own copy of the tokenizers)."""
    pipe.save_pretrained(folder, safe_serialization=True)
    shutil.rmtree(tokenizer_src, ignore_errors=True)
    return folder


#: Words merged into whole tokens beyond the tokenizer's defaults: the demo's trigger word and
#: prompts.
PROMPT_WORDS = ("bunnystyle", "bunny", "in", "style", "person", "portrait")


def build_tiny_pipeline(folder: Path, family: Family = "sd1", seed: int = PRESET_SEED) -> Path:
    """Build a small random Stable Diffusion (``sd1``), SDXL (``sdxl``), FLUX.1 (``flux``) or
    SD3.5 (``sd3``) pipeline with fixed seeds and ``save_pretrained`` it into ``folder``;
    returns ``folder``.

    The layout is the real one (UNet with cross-attention blocks, four-level VAE, CLIP text
    encoder(s) and tokenizer(s), a scheduler), only narrow, so every code path of training and
    generation runs on it on a CPU in seconds. The parts are made in a fixed order after one
    seed (VAE, UNet, text encoders), which is what keeps a preset's weights the same bytes on
    every machine.
    """
    import torch  # lazy: torch takes 1.1 s to import
    from transformers import CLIPTokenizer  # lazy: transformers takes 0.56 s to import

    if family in FLOW_FAMILIES:
        return build_tiny_flow_pipeline(folder, family, seed=seed)
    folder = Path(folder)
    src = folder / "_tokenizer_src"
    vocab = write_clip_tokenizer(src, model_max_length=77, words=(*DEFAULT_WORDS, *PROMPT_WORDS))
    tokenizer = CLIPTokenizer.from_pretrained(src)
    torch.manual_seed(seed)
    vae = _tiny_vae()
    build = _sd1_pipeline if family == "sd1" else _sdxl_pipeline
    return _save(build(vae, vocab, tokenizer), folder, src)


def _sd1_pipeline(vae: Any, vocab: dict[str, int], tokenizer: Any) -> Any:
    from diffusers import PNDMScheduler, StableDiffusionPipeline  # lazy: diffusers takes 2.7 s to import

    unet = _tiny_unet(cross_attention_dim=32, attention_head_dim=8)
    text_encoder = _clip(vocab, 32, None)
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=PNDMScheduler(**_scheduler_kwargs(), skip_prk_steps=True),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _sdxl_pipeline(vae: Any, vocab: dict[str, int], tokenizer: Any) -> Any:
    from diffusers import (  # lazy: diffusers takes 2.7 s to import
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
    )

    text_dim, time_dim = 32, 8
    unet = _tiny_unet(
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        transformer_layers_per_block=(1, 2),
        # pooled text embedding of text_encoder_2 + six size/crop numbers, each embedded
        projection_class_embeddings_input_dim=text_dim + 6 * time_dim,
        cross_attention_dim=2 * text_dim,  # both encoders' hidden states, concatenated
    )
    text_encoder = _clip(vocab, text_dim, None)
    text_encoder_2 = _clip(vocab, text_dim, text_dim)
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=EulerDiscreteScheduler(**_scheduler_kwargs(), timestep_spacing="leading"),
    )


# ---------------------------------------------------------------------------------------------
# Rectified-flow presets (FLUX.1, SD3.5)

#: Real scheduler configs (scheduler/scheduler_config.json of the hub repos).
FLUX_DEV_SCHEDULER = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}
FLUX_SCHNELL_SCHEDULER = {"num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": False}
SD3_SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0}
#: (scaling_factor, shift_factor) of the real VAEs.
VAE_FACTORS = {"flux": (0.3611, 0.1159), "sd3": (1.5305, 0.0609)}
FLOW_WORDS = ("close-up", "full", "body", "upper", *PROMPT_WORDS)


def _flow_vae(family: str) -> Any:
    scaling, shift = VAE_FACTORS[family]
    return _tiny_vae(16, scaling, shift_factor=shift, use_quant_conv=False, use_post_quant_conv=False)


def _t5(vocab_size: int, d_model: int) -> Any:
    from transformers import T5Config, T5EncoderModel  # lazy: transformers takes 0.56 s to import

    config = T5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=8,
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",  # T5 v1.1, as FLUX.1 and SD3 use
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return T5EncoderModel(config)


def build_tiny_flow_pipeline(
    folder: Path, family: Family = "flux", *, seed: int = PRESET_SEED, guidance_embeds: bool = True
) -> Path:
    """Build and ``save_pretrained`` a tiny random FLUX.1 pipeline (dev layout; ``guidance_embeds``
    False gives schnell's) or SD3.5-medium pipeline into ``folder``; returns ``folder``. Made
    after one seed in a fixed order (VAE, transformer, CLIP encoder(s), T5), as the SD presets."""
    import torch  # lazy: torch takes 1.1 s to import
    from transformers import CLIPTokenizer, T5TokenizerFast  # lazy: transformers takes 0.56 s to import

    if family not in FLOW_FAMILIES:
        raise ValueError(f"not a rectified-flow family: {family!r}")
    folder = Path(folder)
    words = (*DEFAULT_WORDS, *FLOW_WORDS)
    src = folder / "_tokenizer_src"
    vocab = write_clip_tokenizer(src / "clip", model_max_length=77, words=words)
    t5_vocab = write_t5_tokenizer(src / "t5", model_max_length=512, words=words)
    tokenizers = (CLIPTokenizer.from_pretrained(src / "clip"), T5TokenizerFast.from_pretrained(src / "t5"))
    torch.manual_seed(seed)
    vae = _flow_vae(family)
    if family == "flux":
        pipe = _flux_pipeline(vae, vocab, t5_vocab, tokenizers, guidance_embeds)
    else:
        pipe = _sd3_pipeline(vae, vocab, t5_vocab, tokenizers)
    return _save(pipe, folder, src)


def _flux_pipeline(
    vae: Any, vocab: dict[str, int], t5_vocab: int, tokenizers: tuple[Any, Any], guidance_embeds: bool
) -> Any:
    from diffusers import (  # lazy: diffusers takes 2.7 s to import
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
    )

    clip_width, t5_width = 32, 32
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=t5_width,
        pooled_projection_dim=clip_width,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 6, 6),
    )
    text_encoder = _clip(vocab, clip_width, None)
    text_encoder_2 = _t5(t5_vocab, t5_width)
    sched = FLUX_DEV_SCHEDULER if guidance_embeds else FLUX_SCHNELL_SCHEDULER
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**sched),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizers[0],
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizers[1],
        transformer=transformer,
    )


def _sd3_pipeline(vae: Any, vocab: dict[str, int], t5_vocab: int, tokenizers: tuple[Any, Any]) -> Any:
    from diffusers import (  # lazy: diffusers takes 2.7 s to import
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    clip_width, t5_width = 32, 64  # T5 width >= CLIP-L + CLIP-G widths (SD3 pads CLIP to it)
    transformer = SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=16,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=t5_width,
        caption_projection_dim=32,
        pooled_projection_dim=2 * clip_width,
        out_channels=16,
        pos_embed_max_size=64,
        dual_attention_layers=(0,),
        qk_norm="rms_norm",
    )
    text_encoder = _clip(vocab, clip_width, clip_width)
    text_encoder_2 = _clip(vocab, clip_width, clip_width)
    text_encoder_3 = _t5(t5_vocab, t5_width)
    return StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizers[0],
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizers[0],
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizers[1],
        transformer=transformer,
    )


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
