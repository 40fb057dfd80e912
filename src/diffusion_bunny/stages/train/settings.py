"""Stage 07's settings (``train``): the base model, the LoRA and the training loop.

Read by the configuration (:mod:`diffusion_bunny.config`) on every command, so it imports
nothing heavier than pydantic.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from diffusion_bunny.section import MAX_SEED, Section, multiple_of_eight

#: The largest fixed ``train.timestep_shift``.
MAX_TIMESTEP_SHIFT = 100.0


class TrainSettings(Section):
    """Settings of stage 07 (``train``): a LoRA on the UNet (and optionally the text encoders) of a
    Stable Diffusion 1.x or SDXL base model, or on the transformer of a FLUX.1 or SD3.5 base model
    (the family is read from the model's config), on the dataset stage 06 exported.

    The keys from ``lora_targets`` to ``quantize_base`` apply to FLUX.1 and SD3.5 only (the
    flow-matching objective of diffusers' ``train_dreambooth_lora_{flux,sd3}.py``)."""

    base_model: str = "tiny"
    family: Literal["auto", "sd1", "sdxl", "flux", "sd3"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    resolution: int | None = Field(None, ge=64, le=4096)
    rank: int = Field(4, ge=1, le=1024)
    alpha: float = Field(4.0, gt=0.0, le=4096.0)
    learning_rate: float = Field(1e-4, gt=0.0, le=1.0)
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "constant"
    lr_warmup_steps: int = Field(0, ge=0, le=1_000_000)
    max_train_steps: int = Field(30, ge=1, le=10_000_000)
    train_batch_size: int = Field(2, ge=1, le=1024)
    gradient_accumulation_steps: int = Field(1, ge=1, le=1024)
    max_grad_norm: float = Field(1.0, gt=0.0, le=1000.0)
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "auto"
    gradient_checkpointing: bool = False
    cache_latents: bool = True
    buckets: bool = True
    min_snr_gamma: float | None = Field(None, gt=0.0, le=100.0)
    train_text_encoder: bool = False
    prior_preservation: bool = False
    class_prompt: str | None = None
    class_data_dir: str | None = None
    num_class_images: int = Field(8, ge=1, le=100_000)
    prior_loss_weight: float = Field(1.0, ge=0.0, le=100.0)
    checkpoint_every: int = Field(10, ge=1, le=10_000_000)
    keep_resumable: int = Field(1, ge=1, le=1_000_000)
    checkpoints_total_limit: int | None = Field(None, ge=1, le=10_000_000)
    validation_every: int = Field(15, ge=0, le=10_000_000)
    validation_prompts: tuple[str, ...] = ()
    validation_inference_steps: int = Field(8, ge=1, le=1000)
    output_dir: str | None = None
    start_over: bool = False
    tensorboard: bool = True
    seed: int = Field(0, ge=0, le=MAX_SEED)
    # FLUX.1 / SD3.5 only (see stages/train/flow.py)
    lora_targets: Literal["attention", "attention+mlp"] | tuple[str, ...] = "attention"
    weighting_scheme: Literal["logit_normal", "mode", "uniform", "sigma_sqrt", "cosmap"] = "logit_normal"
    logit_mean: float = Field(0.0, ge=-10.0, le=10.0)
    logit_std: float = Field(1.0, gt=0.0, le=10.0)
    mode_scale: float = Field(1.29, ge=0.0, le=10.0)
    timestep_shift: Literal["auto", "none"] | float = "auto"
    flux_guidance: float = Field(1.0, ge=0.0, le=100.0)
    caption_dropout: float = Field(0.0, ge=0.0, le=0.5)
    max_sequence_length: int | None = Field(None, ge=8, le=512)
    quantize_base: Literal["none", "nf4"] = "none"

    @field_validator("resolution")
    @classmethod
    def _multiple_of_eight(cls, value: int | None) -> int | None:
        return multiple_of_eight(value)

    @field_validator("timestep_shift")
    @classmethod
    def _positive_shift(cls, value: Any) -> Any:
        """A shift the noise levels survive: ``.inf`` or ``1e308`` (even ``nan``) passed, and every
        sigma came out NaN. SD3 and FLUX use about 3; 100 already puts nearly every step at full
        noise."""
        if isinstance(value, float) and not 0 < value <= MAX_TIMESTEP_SHIFT:
            raise ValueError(
                f"a fixed timestep_shift must be over 0 and at most {MAX_TIMESTEP_SHIFT:g}, e.g. 3.0 "
                "(or auto / none)"
            )
        return value

    @field_validator("lora_targets")
    @classmethod
    def _some_targets(cls, value: Any) -> Any:
        if isinstance(value, tuple) and not [v for v in value if str(v).strip()]:
            raise ValueError("give attention, attention+mlp or a non-empty list of layer names (to_q, ...)")
        return value

    @model_validator(mode="after")
    def _prior_needs_a_class_prompt(self) -> TrainSettings:
        if self.prior_preservation and not (self.class_prompt or "").strip():
            raise ValueError("prior_preservation needs class_prompt (e.g. 'a photo of a person')")
        return self
