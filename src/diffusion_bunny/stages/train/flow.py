"""LoRA fine-tuning of a FLUX.1 or SD3.5 base model (stage 07): the flow-matching objective.

:class:`FlowLoraTrainer` is a :class:`~diffusion_bunny.stages.train.lora.LoraTrainer` that
differs only where the models differ; the data pipeline (buckets, repeats, cached VAE latents),
checkpoints, resume and validation are the SD 1.x/SDXL ones. The objective is the one of
diffusers' ``train_dreambooth_lora_flux.py`` / ``train_dreambooth_lora_sd3.py``:

- x_t = (1 - sigma) x0 + sigma eps, target eps - x0, weighted by
  ``compute_loss_weighting_for_sd3(train.weighting_scheme, sigma)``; ``logit_normal``,
  ``mode`` and ``uniform`` shape the density of u (``compute_density_for_timestep_sampling``),
  ``sigma_sqrt`` and ``cosmap`` sample u uniformly and weight the loss. Every draw comes from the
  trainer's own generator, so a resumed run draws what the killed run would have.
- The resolution-dependent shift (``train.timestep_shift: auto``): FLUX.1-dev
  mu = ``calculate_shift(h/2 * w/2)``, sigma = e^mu / (e^mu + 1/u - 1), as its inference does
  (kohya's ``flux_shift``; diffusers' script leaves sigma unshifted). SD3 and FLUX.1-schnell
  sigma = s u / (1 + (s - 1) u) with the scheduler's shift. A number forces a fixed shift, ``none``
  gives sigma = u.
- FLUX: latents packed 2x2 (``FluxPipeline._pack_latents``), 2-D image ids, zero text ids,
  ``timestep = sigma``; ``guidance = train.flux_guidance`` when the model embeds guidance (dev).
  The loss is taken in packed space (the target is packed instead of unpacking the prediction:
  the same MSE). SD3: ``timestep = 1000 sigma``.
- Text: the pipeline's own ``encode_prompt`` (CLIP and T5), so training conditions exactly as
  generation does. With ``train.cache_latents`` every caption (and "" for caption dropout, and
  the validation prompts) is encoded once before the first step and kept on disk beside the
  latents; then the text encoders are dropped from the pipeline, so none is on the device during
  the steps. Caption dropout replaces a caption by the "" embedding with probability
  ``train.caption_dropout``.
- peft LoRA on the transformer's attention (``train.lora_targets: attention``), optionally its
  MLPs (``attention+mlp``), or the layers named; an explicit sorted list of layer names goes to
  peft (:func:`diffusion_bunny.models.lora_keys.lora_target_names`). LoRA weights in fp32, bf16
  autocast on CUDA (``mixed_precision: auto``; fp16 is refused: T5 overflows in it), gradient
  checkpointing, ``train.quantize_base: nf4`` through diffusers' bitsandbytes config (CUDA
  only; the ``nf4`` extra).
- Files: ``pytorch_lora_weights.safetensors`` (diffusers; the LoRA config as metadata so alpha
  and the targets survive) and ``<name>_kohya.safetensors`` (the kohya/ComfyUI layout,
  :mod:`diffusion_bunny.models.lora_keys`).
"""

from __future__ import annotations

import gc
import hashlib
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from diffusion_bunny.errors import ModelError
from diffusion_bunny.models.diffusion import load_pipeline, resolve_base_model
from diffusion_bunny.models.lora_keys import lora_target_names, save_kohya_flow
from diffusion_bunny.pipeline.atomic import atomic_path, disk_errors
from diffusion_bunny.stages.train.lora import LoraTrainer, write_lora_file
from diffusion_bunny.stages.train.tables import LORA_FILE

if TYPE_CHECKING:
    import torch

    from diffusion_bunny.stages.train.settings import TrainSettings

#: T5 tokens per caption when ``train.max_sequence_length`` is null: the reference scripts'
#: defaults (FLUX.1-dev 512, SD3 77 in diffusers' script; 256 is what SD3.5 was trained with),
#: 64 for the tiny presets (their captions are short and CPU time matters).
MAX_SEQUENCE = {"flux": 512, "sd3": 256, "preset": 64}


def shift_sigmas(u: Any, shift: float) -> Any:
    """SD3's time shift: s u / (1 + (s - 1) u)."""
    return shift * u / (1 + (shift - 1) * u)


def flux_mu(seq_len: int, sched_config: dict[str, Any]) -> float:
    """FLUX.1-dev's resolution-dependent shift exponent (``calculate_shift``, as its pipeline)."""
    from diffusers.pipelines.flux.pipeline_flux import (  # lazy: diffusers takes 2.7 s to import
        calculate_shift,
    )

    return calculate_shift(
        seq_len,
        sched_config.get("base_image_seq_len", 256),
        sched_config.get("max_image_seq_len", 4096),
        sched_config.get("base_shift", 0.5),
        sched_config.get("max_shift", 1.15),
    )


def check_flow_settings(cfg: TrainSettings, device: str) -> None:
    """Settings that do not apply to FLUX.1 / SD3.5, or need what this machine lacks: one line each."""
    if cfg.min_snr_gamma is not None:
        raise ModelError(
            "train.min_snr_gamma is for the noise-prediction objective of SD 1.x/SDXL; FLUX.1 and "
            "SD3.5 train with flow matching: set it to null (train.weighting_scheme weights their loss)"
        )
    if cfg.train_text_encoder:
        raise ModelError(
            "train.train_text_encoder is not supported for FLUX.1 / SD3.5 (LoRA on the transformer "
            "only, as the reference scripts' default): set it to false"
        )
    if cfg.mixed_precision == "fp16":
        raise ModelError("train.mixed_precision = fp16: FLUX.1 / SD3.5 train in bf16 (T5 overflows in fp16)")
    if cfg.quantize_base == "nf4":
        import torch  # lazy: torch takes 1.1 s to import

        if not (device.startswith("cuda") and torch.cuda.is_available()):
            raise ModelError(
                "train.quantize_base = nf4 needs a CUDA GPU (bitsandbytes 4-bit); this run has none: "
                "set train.quantize_base: none"
            )
        try:
            import bitsandbytes  # lazy: optional extra (nf4, CUDA only): its absence is reported below  # noqa: F401
        except ImportError:
            raise ModelError(
                "train.quantize_base = nf4 needs the bitsandbytes package: uv sync --extra nf4 "
                "(or set train.quantize_base: none)"
            ) from None


def load_nf4_transformer(base: Path, family: str, compute_dtype: Any) -> Any:
    """The transformer quantised to NF4 by bitsandbytes through diffusers' BitsAndBytesConfig,
    prepared for k-bit training as diffusers' ``research_projects/flux_lora_quantization`` does."""
    from diffusers import (  # lazy: diffusers takes 2.7 s to import
        BitsAndBytesConfig,
        FluxTransformer2DModel,
        SD3Transformer2DModel,
    )
    from peft import prepare_model_for_kbit_training  # lazy: peft takes 4.0 s to import

    cls = FluxTransformer2DModel if family == "flux" else SD3Transformer2DModel
    config = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype
    )
    model = cls.from_pretrained(
        base, subfolder="transformer", quantization_config=config, dtype=compute_dtype, local_files_only=True
    )
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def trainer_class_for(cfg: TrainSettings) -> type[LoraTrainer]:
    """The trainer of the base model's family (read from its config): FLUX.1/SD3.5 here,
    SD 1.x/SDXL :class:`LoraTrainer`."""
    family = resolve_base_model(cfg.base_model, cfg.family).family
    return FlowLoraTrainer if family in ("flux", "sd3") else LoraTrainer


class FlowLoraTrainer(LoraTrainer):
    """A FLUX.1 / SD3.5 pipeline with a LoRA on its transformer, its optimizer and schedule, and
    one flow-matching step; :func:`~diffusion_bunny.stages.train.lora.train_lora` drives it as it
    drives :class:`LoraTrainer`."""

    #: diffusers' FLUX/SD3 LoRA scripts' AdamW weight decay.
    weight_decay = 1e-4
    #: ``train.mixed_precision: auto`` on a GPU: bf16 (fp16 is refused, T5 overflows in it).
    auto_precision = "bf16"

    def __init__(
        self,
        cfg: TrainSettings,
        *,
        cache_dir: Path | None = None,
        device: str | None = None,
        tracker_dir: Path | None = None,
    ):
        """:class:`LoraTrainer`'s set-up through this family's hooks, then the text-embedding
        caches only this family keeps (on disk, see :meth:`prepare_texts`)."""
        super().__init__(cfg, cache_dir=cache_dir, device=device, tracker_dir=tracker_dir)
        self.text_cache_dir = Path(cache_dir) / "text" if cache_dir is not None else None
        self._text: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._text_key: str | None = None
        self.encoders_dropped = False

    def _check_family(self) -> None:
        if self.family not in ("flux", "sd3"):
            raise ModelError(
                f"train.base_model = {self.cfg.base_model!r} is {self.family}, not FLUX.1 or SD3.5"
            )

    def _check_settings(self) -> None:
        check_flow_settings(self.cfg, self.device)

    def _load_models(self) -> None:
        """The pipeline (its transformer quantised to NF4 first with ``train.quantize_base``),
        the sizes the transformer takes, everything frozen; the UNet-only parts are None/empty."""
        import torch  # lazy: torch takes 1.1 s to import

        cfg = self.cfg
        components = None
        if cfg.quantize_base == "nf4":
            # Loaded (and quantised) first and handed to the pipeline, so the bf16 transformer is
            # never read: on a GPU that only fits the NF4 one, loading it first would not fit.
            nf4 = load_nf4_transformer(self.ref.path, self.family, self.weight_dtype)
            components = {"transformer": nf4.to(self.device)}
        pipe = load_pipeline(self.ref, dtype=self.weight_dtype, device=self.device, components=components)
        self.pipe = pipe
        self.transformer, self.vae = pipe.transformer, pipe.vae
        self.unet = None
        self.text_encoders: list[Any] = []
        self.sched_config = dict(pipe.scheduler.config)
        # Bucket sides must be multiples of the VAE factor times the 2x2 patch (FLUX packing, SD3 patch).
        self.vae_scale = int(pipe.vae_scale_factor) * 2
        default = 128 if self.ref.source == "preset" else 1024
        if self.family == "sd3" and self.ref.source != "preset":
            default = int(self.transformer.config.sample_size) * int(pipe.vae_scale_factor)
        self.resolution = int(cfg.resolution or default)
        self.max_sequence_length = int(
            cfg.max_sequence_length or MAX_SEQUENCE["preset" if self.ref.source == "preset" else self.family]
        )
        for module in pipe.components.values():
            if isinstance(module, torch.nn.Module):
                module.requires_grad_(False)

    def _add_lora(self) -> list[Any]:
        """A LoRA on the transformer's layers that ``train.lora_targets`` names."""
        from peft import LoraConfig  # lazy: peft takes 4.0 s to import

        try:
            self.targets = lora_target_names(self.transformer, self.cfg.lora_targets)
        except ValueError as exc:
            raise ModelError(str(exc)) from None
        self.lora_config = LoraConfig(
            r=self.cfg.rank,
            lora_alpha=self.cfg.alpha,
            init_lora_weights="gaussian",
            target_modules=self.targets,
        )
        self.transformer.add_adapter(self.lora_config)
        return [self.transformer]

    # -- text ----------------------------------------------------------------------------------

    def _encode_now(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(sequence embeddings (B, L, D), pooled (B, P)) from the pipeline's own encode_prompt."""
        import torch  # lazy: torch takes 1.1 s to import

        with torch.no_grad():
            if self.family == "flux":
                embeds, pooled, _ = self.pipe.encode_prompt(
                    texts, prompt_2=None, device=self.device, max_sequence_length=self.max_sequence_length
                )
            else:
                embeds, _, pooled, _ = self.pipe.encode_prompt(
                    texts,
                    prompt_2=None,
                    prompt_3=None,
                    device=self.device,
                    do_classifier_free_guidance=False,
                    max_sequence_length=self.max_sequence_length,
                )
        return embeds, pooled

    def text_key(self) -> str:
        """A fingerprint of the text encoders (configs + a few weights) and the sequence length,
        part of every text-cache file name."""
        if self._text_key is None:
            digest = hashlib.sha256(f"{self.family}:{self.max_sequence_length}".encode())
            for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
                encoder = getattr(self.pipe, name, None)
                if encoder is None:
                    continue
                digest.update(json.dumps(encoder.config.to_dict(), sort_keys=True, default=str).encode())
                params = list(encoder.parameters())
                for p in (params[0], params[len(params) // 2], params[-1]):
                    digest.update(p.detach().float().cpu().numpy().tobytes())
            self._text_key = digest.hexdigest()[:16]
        return self._text_key

    def text_cache_bytes(self, texts: Sequence[str]) -> int:
        """Bytes :meth:`prepare_texts` will write for the captions not on disk yet: per caption the
        sequence embeddings (FLUX.1: T5's tokens; SD3.5: CLIP's 77 and T5's) and the pooled one, in
        the encoders' precision (FLUX.1-dev at 512 tokens: 4 MB a caption in bf16)."""
        if not self.cfg.cache_latents or self.text_cache_dir is None:
            return 0
        config = self.transformer.config
        length = self.max_sequence_length + (77 if self.family == "sd3" else 0)
        width = int(config.joint_attention_dim) * length + int(config.pooled_projection_dim)
        element = int(self.weight_dtype.itemsize)
        todo = [
            t
            for t in dict.fromkeys([*texts, ""])
            if not (self.text_cache_dir / f"{self._text_file(t)}.safetensors").is_file()
        ]
        return len(todo) * (width * element + 512)

    def _text_file(self, text: str) -> str:
        return hashlib.sha256(f"{self.text_key()}\0{text}".encode()).hexdigest()[:24]

    def prepare_texts(self, texts: Sequence[str]) -> None:
        """With ``cache_latents``: every caption (plus "" for caption dropout) encoded once, read
        from or written to the disk cache, then the text encoders dropped from the pipeline so
        none holds device memory during the steps. Without it: nothing (encoded every step)."""

        from safetensors.torch import load_file, save_file  # lazy: pulls in torch (1.1 s)

        if not self.cfg.cache_latents:
            return
        todo = [t for t in dict.fromkeys([*texts, ""]) if t not in self._text]
        if todo and self.encoders_dropped:
            raise ModelError(f"caption not cached before the text encoders were dropped: {todo[0]!r}")
        missing: list[tuple[str, Path | None]] = []
        for text in todo:
            path = None
            if self.text_cache_dir is not None:
                path = self.text_cache_dir / f"{self._text_file(text)}.safetensors"
                if path.is_file():
                    try:
                        data = load_file(path)
                        self._text[text] = (data["embeds"], data["pooled"])
                        continue
                    except Exception:
                        path.unlink(missing_ok=True)  # a damaged cache file is encoded again
            missing.append((text, path))
        for start in range(0, len(missing), 16):
            part = missing[start : start + 16]
            embeds, pooled = self._encode_now([t for t, _ in part])
            for j, (text, path) in enumerate(part):
                entry = (embeds[j].cpu().clone(), pooled[j].cpu().clone())
                self._text[text] = entry
                if path is not None:
                    # Flushed and renamed into place: a full disk or a kill never leaves half a file
                    # that a later run would take for the embedding (a killed writer's is swept).
                    with atomic_path(path) as tmp:
                        save_file({"embeds": entry[0].contiguous(), "pooled": entry[1].contiguous()}, tmp)
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
            if getattr(self.pipe, name, None) is not None:
                self.pipe.register_modules(**{name: None})
        self.encoders_dropped = True
        gc.collect()

    def encode_text(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings of a batch, with caption dropout (a dropped caption becomes "")."""
        import torch  # lazy: torch takes 1.1 s to import

        p = self.cfg.caption_dropout
        if p > 0:
            draws = torch.rand(len(texts), generator=self.generator).tolist()
            texts = ["" if d < p else t for t, d in zip(texts, draws, strict=True)]
        if self.encoders_dropped:
            missing = [t for t in texts if t not in self._text]
            if missing:
                raise ModelError(f"caption not cached before the text encoders were dropped: {missing[0]!r}")
            embeds = torch.stack([self._text[t][0] for t in texts])
            pooled = torch.stack([self._text[t][1] for t in texts])
        else:
            embeds, pooled = self._encode_now(texts)
        return embeds.to(self.device, self.weight_dtype), pooled.to(self.device, self.weight_dtype)

    # -- noise levels --------------------------------------------------------------------------

    def sample_sigmas(self, bsz: int, latent_hw: tuple[int, int]) -> torch.Tensor:
        """Noise levels of a batch: u from the weighting scheme's density, then shifted."""
        from diffusers.training_utils import (  # lazy: diffusers takes 2.7 s to import
            compute_density_for_timestep_sampling,
        )

        cfg = self.cfg
        scheme = cfg.weighting_scheme
        u = compute_density_for_timestep_sampling(
            weighting_scheme=scheme if scheme in ("logit_normal", "mode") else "none",
            batch_size=bsz,
            logit_mean=cfg.logit_mean,
            logit_std=cfg.logit_std,
            mode_scale=cfg.mode_scale,
            generator=self.generator,
        )
        u = u.clamp(1e-5, 1 - 1e-5)
        shift = cfg.timestep_shift
        if shift == "none":
            sigmas = u
        elif shift == "auto" and self.family == "flux" and self.sched_config.get("use_dynamic_shifting"):
            h, w = latent_hw
            mu = flux_mu((h // 2) * (w // 2), self.sched_config)
            sigmas = math.exp(mu) / (math.exp(mu) + (1 / u - 1))
        elif shift == "auto":
            sigmas = shift_sigmas(u, float(self.sched_config.get("shift", 1.0)))
        else:
            sigmas = shift_sigmas(u, float(shift))
        return sigmas.to(self.device)

    # -- one step ------------------------------------------------------------------------------

    def loss(self, batch: dict[str, Any], n_prior: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The flow-matching loss of a batch (draws from the trainer's generator); with
        ``n_prior`` class images at the end, (instance + weighted prior loss, prior loss)."""
        import torch  # lazy: torch takes 1.1 s to import
        from diffusers.models.autoencoders.vae import (  # lazy: diffusers takes 2.7 s to import
            DiagonalGaussianDistribution,
        )
        from diffusers.training_utils import (  # lazy: diffusers takes 2.7 s to import
            compute_loss_weighting_for_sd3,
        )

        dist = DiagonalGaussianDistribution(batch["parameters"].to(self.device, torch.float32))
        eps = torch.randn(dist.mean.shape, generator=self.generator).to(self.device)
        vae = self.vae.config
        x0 = ((dist.mean + dist.std * eps - (vae.shift_factor or 0.0)) * vae.scaling_factor).to(
            self.weight_dtype
        )
        bsz, c, h, w = x0.shape
        noise = torch.randn(x0.shape, generator=self.generator).to(self.device, x0.dtype)
        sigmas = self.sample_sigmas(bsz, (h, w))
        s4 = sigmas.view(-1, 1, 1, 1).to(x0.dtype)
        noisy = (1.0 - s4) * x0 + s4 * noise
        target = noise - x0
        embeds, pooled = self.encode_text(batch["texts"])
        with self.accelerator.autocast():
            if self.family == "flux":
                from diffusers import FluxPipeline  # lazy: diffusers takes 2.7 s to import

                packed = FluxPipeline._pack_latents(noisy, bsz, c, h, w)
                img_ids = FluxPipeline._prepare_latent_image_ids(bsz, h // 2, w // 2, self.device, x0.dtype)
                txt_ids = torch.zeros(embeds.shape[1], 3, device=self.device, dtype=x0.dtype)
                guidance = None
                if self.transformer.config.guidance_embeds:
                    guidance = torch.full(
                        (bsz,), self.cfg.flux_guidance, device=self.device, dtype=torch.float32
                    )
                pred = self.transformer(
                    hidden_states=packed,
                    timestep=sigmas.to(x0.dtype),
                    guidance=guidance,
                    pooled_projections=pooled,
                    encoder_hidden_states=embeds,
                    txt_ids=txt_ids,
                    img_ids=img_ids,
                    return_dict=False,
                )[0]
                target = FluxPipeline._pack_latents(target, bsz, c, h, w)
            else:
                pred = self.transformer(
                    hidden_states=noisy,
                    timestep=(sigmas * 1000).to(x0.dtype),
                    encoder_hidden_states=embeds,
                    pooled_projections=pooled,
                    return_dict=False,
                )[0]
        weighting = compute_loss_weighting_for_sd3(self.cfg.weighting_scheme, sigmas).float()
        per_sample = weighting * ((pred.float() - target.float()) ** 2).reshape(bsz, -1).mean(1)
        return self.batch_loss(per_sample, n_prior)

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.transformer

    # -- saving --------------------------------------------------------------------------------

    def peft_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """The transformer's adapter weights (fp32, on the CPU, copied: for fp32 CPU tensors
        ``.float().cpu()`` would return the live parameter, which training then changes)."""
        from peft.utils import get_peft_model_state_dict  # lazy: peft takes 4.0 s to import

        sd = get_peft_model_state_dict(self.transformer)
        return {"transformer": {k: v.detach().float().cpu().clone().contiguous() for k, v in sd.items()}}

    def load_peft_state(self, state: dict[str, dict[str, torch.Tensor]]) -> None:
        from peft.utils import set_peft_model_state_dict  # lazy: peft takes 4.0 s to import

        set_peft_model_state_dict(self.transformer, state["transformer"])

    def save_lora(self, folder: Path, kohya_name: str | None = None) -> tuple[Path, Path | None]:
        """``pytorch_lora_weights.safetensors`` (diffusers) and, with ``kohya_name``, the
        kohya/ComfyUI layout beside it."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = self.peft_state()["transformer"]
        save = type(self.pipe).save_lora_weights
        # As the SD trainer's: written aside and renamed into place, a full disk in one line.
        write_lora_file(
            folder,
            lambda staging: save(
                staging,
                transformer_lora_layers=state,
                transformer_lora_adapter_metadata=self.lora_config.to_dict(),
                safe_serialization=True,
            ),
        )
        kohya_path = None
        if kohya_name is not None:
            kohya_path = folder / f"{kohya_name}_kohya.safetensors"
            with disk_errors(kohya_path):
                save_kohya_flow(state, kohya_path, self.family, self.cfg.alpha, self.transformer)
        return folder / LORA_FILE, kohya_path

    # -- validation ----------------------------------------------------------------------------

    def validation_images(self, prompts: Sequence[str], seed: int, size: int) -> list[Any]:
        """One image per prompt with the current LoRA (fixed seeds); from the cached embeddings
        when the text encoders were dropped (SD3's negative is the "" embedding)."""
        import torch  # lazy: torch takes 1.1 s to import

        self.transformer.eval()
        images = []
        with torch.no_grad(), self.accelerator.autocast():
            for i, prompt in enumerate(prompts):
                kwargs: dict[str, Any] = {
                    "num_inference_steps": self.cfg.validation_inference_steps,
                    "height": size,
                    "width": size,
                    "generator": torch.Generator(device="cpu").manual_seed(seed + i),
                    "max_sequence_length": self.max_sequence_length,
                }
                if self.encoders_dropped:
                    embeds, pooled = self._text[prompt]
                    kwargs |= {
                        "prompt_embeds": embeds[None].to(self.device, self.weight_dtype),
                        "pooled_prompt_embeds": pooled[None].to(self.device, self.weight_dtype),
                    }
                    if self.family == "sd3":
                        neg, neg_pooled = self._text[""]
                        kwargs |= {
                            "negative_prompt_embeds": neg[None].to(self.device, self.weight_dtype),
                            "negative_pooled_prompt_embeds": neg_pooled[None].to(
                                self.device, self.weight_dtype
                            ),
                        }
                else:
                    kwargs["prompt"] = prompt
                images.append(self.pipe(**kwargs).images[0])
        self.transformer.train()
        return images
