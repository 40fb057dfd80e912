"""LoRA fine-tuning of a Stable Diffusion 1.x or SDXL base model (stage 07), resumable. FLUX.1 and
SD3.5 train through the same loop with :class:`~diffusion_bunny.stages.train.flow.FlowLoraTrainer`
(the flow-matching objective), passed as ``trainer_class``.

The loop is the one of diffusers' example scripts (``train_text_to_image_lora.py``, its SDXL
sibling and ``train_dreambooth_lora.py``), rebuilt around what this workspace needs:

- peft LoRA adapters on the UNet's attention projections (``to_q``, ``to_k``, ``to_v``,
  ``to_out.0``) and optionally on the text encoders' (``q_proj``, ``k_proj``, ``v_proj``,
  ``out_proj``); everything else frozen. accelerate does mixed precision, gradient accumulation
  and clipping.
- Aspect-ratio buckets: every image goes to the bucket (width x height, multiples of the bucket
  step, about ``resolution``² pixels) whose aspect is nearest its own, is scaled to cover it and
  centre-cropped; a batch holds images of one bucket only.
- Cached latents: each image is encoded once by the VAE and the Gaussian it maps to (mean and log
  variance) is kept on disk, keyed by the image's bytes, the VAE's weights and the bucket size; a
  step samples from it, as the uncached path does from the VAE's output. The frozen text
  encoders' outputs are kept in memory per caption.
- Checkpoints: every ``checkpoint_every`` steps ``checkpoint-<step>/`` gets the LoRA in diffusers
  format plus ``training_state.pt`` (adapter weights, optimizer, learning-rate schedule, the
  noise generator, the position in the epoch, the log so far), written to a temporary folder and
  renamed, so a killed process leaves either a whole checkpoint or none. A rerun with the same
  settings continues from the latest one: the batch order of an epoch is a function of the seed
  and the epoch number, so the resumed run sees the batches the killed one would have. Only the
  newest ``keep_resumable`` checkpoints keep their state (three times the LoRA's size: the
  optimizer's two moments and the weights); every checkpoint keeps its LoRA weights for stage
  08 to compare, up to ``checkpoints_total_limit`` of them (:func:`prune_checkpoints`). Before
  the first step the disk it will take is estimated (:func:`disk_needs`) and a training that
  will not fit stops in one line. A LoRA folder is held by one training at a time
  (:func:`lora_lock`).
- Optional Min-SNR-gamma weighting, DreamBooth prior preservation (class images from a folder, or
  generated once by the base model into the user cache), validation images every
  ``validation_every`` steps (and before the first step, the base model's own picture).
- Output: ``pytorch_lora_weights.safetensors`` (diffusers format, loads with
  ``pipe.load_lora_weights``) and ``<name>_kohya.safetensors`` (kohya/A1111 key names).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl
from tqdm.auto import tqdm

from diffusion_bunny.errors import BadInputError, ModelError, StageError
from diffusion_bunny.logs import log_dir
from diffusion_bunny.models.cache import cache_dir
from diffusion_bunny.models.device import resolve_device
from diffusion_bunny.models.diffusion import load_pipeline, pipeline_class, resolve_base_model
from diffusion_bunny.paths import workspace_root
from diffusion_bunny.pipeline.atomic import (
    atomic_path,
    check_free_space,
    disk_errors,
    swap_in,
    sweep_leftovers,
    temp_path,
)
from diffusion_bunny.pipeline.lock import RunBusy, current_holder, run_lock
from diffusion_bunny.pipeline.progress import ProgressFile
from diffusion_bunny.stages.train.data import (
    PixelMemory,
    Sample,
    TrainImage,
    bucket_step,
    class_images_from_dir,
    dataset_key,
    epoch_batches,
    file_hash,
    image_size,
    make_buckets,
    nearest_bucket,
)
from diffusion_bunny.stages.train.settings import TrainSettings as _Cfg
from diffusion_bunny.stages.train.tables import (
    LORA_FILE,
    STATE_FILE,
    TRAINING_LOG_SCHEMA,
    VALIDATION_SCHEMA,
    earlier_resume_keys,
    lora_name,
    tensorboard_name,
)

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    import torch

    from diffusion_bunny.models.diffusion import BaseModelRef
    from diffusion_bunny.stages.train.settings import TrainSettings

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
#: The training keys that only FLUX.1 / SD3.5 use.
FLOW_KEYS = (
    "lora_targets",
    "weighting_scheme",
    "logit_mean",
    "logit_std",
    "mode_scale",
    "timestep_shift",
    "flux_guidance",
    "caption_dropout",
    "max_sequence_length",
    "quantize_base",
)

#: Settings that change how fast a step runs and how much memory it takes, not its result:
#: gradient checkpointing recomputes the same activations, cached latents are the VAE's same
#: encoding read back (a difference of about 1e-7). A run killed and restarted with either
#: changed resumes in its folder instead of starting over in a new one (:func:`resume_key`).
SPEED_KEYS = ("gradient_checkpointing", "cache_latents")


@dataclass
class TrainResult:
    """What :func:`train_lora` leaves behind."""

    output_dir: Path
    lora_path: Path
    kohya_path: Path
    log: pl.DataFrame
    validation: pl.DataFrame
    resumed_from: int | None
    facts: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


class LoraTrainer:
    """A base model with LoRA adapters, its optimizer and schedule, and one training step.

    Built once per training run; :func:`train_lora` drives it. Tests use it directly for a
    fixed batch (``make_batch`` + ``loss`` + ``step``)."""

    #: AdamW's weight decay: diffusers' SD 1.x/SDXL scripts use 1e-2 (its FLUX/SD3 ones 1e-4).
    weight_decay = 1e-2
    #: What ``train.mixed_precision: auto`` means on a GPU (fp16 for the UNet families).
    auto_precision = "fp16"

    def __init__(
        self,
        cfg: TrainSettings,
        *,
        cache_dir: Path | None = None,
        device: str | None = None,
        tracker_dir: Path | None = None,
    ):
        """The steps every family shares, in the order that keeps a seeded run reproducible (the
        seed is set before the models load and the LoRA weights are drawn); what differs between
        the families is in the hooks :meth:`_check_family`, :meth:`_check_settings`,
        :meth:`_load_models` and :meth:`_add_lora`, which
        :class:`~diffusion_bunny.stages.train.flow.FlowLoraTrainer` overrides."""
        import torch  # lazy: torch takes 1.1 s to import
        from diffusers.optimization import get_scheduler  # lazy: diffusers takes 2.7 s to import

        self.cfg = cfg
        self.ref: BaseModelRef = resolve_base_model(cfg.base_model, cfg.family)
        self.family = self.ref.family
        self._check_family()
        self.device = resolve_device(device or cfg.device, "train.device")
        self._check_settings()
        mixed = cfg.mixed_precision
        if mixed == "auto":
            mixed = self.auto_precision if self.device.startswith("cuda") else "no"
        if mixed == "fp16" and not self.device.startswith("cuda"):
            raise ModelError("train.mixed_precision = fp16 needs a GPU; use bf16 or no on the CPU")
        self.mixed_precision = mixed
        self.accelerator = new_accelerator(cfg, mixed, self.device, tracker_dir)
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed, torch.float32)
        torch.manual_seed(cfg.seed)
        self._load_models()
        if self.weight_dtype != torch.float32:
            self.vae.to(torch.float32)  # kept in fp32 as diffusers' scripts do (fp16 VAEs overflow)
        trained = self._add_lora()
        self.params = [p for m in trained for p in m.parameters() if p.requires_grad]
        for param in self.params:
            param.data = param.data.float()  # LoRA weights train in fp32 under mixed precision
        if cfg.gradient_checkpointing:
            self.denoiser.enable_gradient_checkpointing()
            for encoder in trained[1:]:
                enable = getattr(encoder, "activation_checkpointing_enable", None)
                (enable or encoder.gradient_checkpointing_enable)()  # renamed in transformers 5
        optimizer = torch.optim.AdamW(self.params, lr=cfg.learning_rate, weight_decay=self.weight_decay)
        lr_scheduler = get_scheduler(
            cfg.lr_scheduler,
            optimizer=optimizer,
            num_warmup_steps=cfg.lr_warmup_steps,
            num_training_steps=cfg.max_train_steps,
        )
        # Prepared by accelerate so fp16 loss scaling and accumulation apply to the step.
        self.optimizer, self.lr_scheduler = self.accelerator.prepare(optimizer, lr_scheduler)
        self.generator = torch.Generator(device="cpu").manual_seed(cfg.seed)
        self.latent_cache_dir = Path(cache_dir) / "latents" if cache_dir is not None else None
        self._vae_key: str | None = None
        self._text_cache: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        # Cached latents once read, so a step after the first epoch touches neither disk nor hash.
        self._latent_memory: dict[tuple, tuple[torch.Tensor, tuple, tuple]] = {}
        self._pixels = PixelMemory()

    # -- what differs between the families (FlowLoraTrainer overrides these) --------------------

    def _check_family(self) -> None:
        """Refuse a base model this trainer does not train, before anything is loaded."""
        if self.family not in ("sd1", "sdxl"):
            raise ModelError(
                f"train.base_model = {self.cfg.base_model!r} is a {self.family} model: train it with "
                "stages.train.flow.FlowLoraTrainer (train_lora(..., trainer_class=trainer_class_for(...)))"
            )

    def _check_settings(self) -> None:
        """Refuse settings this family cannot train with on ``self.device`` (one line each); the
        UNet families take every setting."""

    def _load_models(self) -> None:
        """The pipeline and the parts the step uses (UNet, VAE, text encoders, noise schedule),
        the training resolution, everything frozen."""
        from diffusers import DDPMScheduler  # lazy: diffusers takes 2.7 s to import

        pipe = load_pipeline(self.ref, dtype=self.weight_dtype, device=self.device)
        self.pipe = pipe
        self.unet, self.vae = pipe.unet, pipe.vae
        self.text_encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if self.family == "sdxl" else [])
        self.tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if self.family == "sdxl" else [])
        self.noise_scheduler = DDPMScheduler.from_pretrained(self.ref.path, subfolder="scheduler")
        self.vae_scale = int(pipe.vae_scale_factor)
        self.resolution = int(self.cfg.resolution or self.unet.config.sample_size * self.vae_scale)
        for module in (self.unet, self.vae, *self.text_encoders):
            module.requires_grad_(False)

    def _add_lora(self) -> list[Any]:
        """Add the LoRA adapters; returns the modules they train, the denoiser first (then the
        text encoders with ``train.train_text_encoder``)."""
        from peft import LoraConfig  # lazy: peft takes 4.0 s to import

        cfg = self.cfg
        self.unet_lora_config = LoraConfig(
            r=cfg.rank, lora_alpha=cfg.alpha, init_lora_weights="gaussian", target_modules=UNET_TARGETS
        )
        self.unet.add_adapter(self.unet_lora_config)
        self.text_lora_config = None
        if cfg.train_text_encoder:
            self.text_lora_config = LoraConfig(
                r=cfg.rank, lora_alpha=cfg.alpha, init_lora_weights="gaussian", target_modules=TEXT_TARGETS
            )
            for encoder in self.text_encoders:
                encoder.add_adapter(self.text_lora_config)
        return [self.unet, *(self.text_encoders if cfg.train_text_encoder else [])]

    # -- encoding --------------------------------------------------------------------------

    def vae_key(self) -> str:
        """A fingerprint of the VAE (config + a few weights), part of every latent-cache key."""
        if self._vae_key is None:
            digest = hashlib.sha256(json.dumps(dict(self.vae.config), sort_keys=True, default=str).encode())
            params = list(self.vae.parameters())
            for p in (params[0], params[len(params) // 2], params[-1]):
                digest.update(p.detach().float().cpu().numpy().tobytes())
            self._vae_key = digest.hexdigest()[:16]
        return self._vae_key

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """The VAE's latent Gaussian (mean and log variance, stacked on channels) of a batch."""
        import torch  # lazy: torch takes 1.1 s to import

        with torch.no_grad():
            return self.vae.encode(pixels.to(self.device, torch.float32)).latent_dist.parameters

    def _cached_latents(self, image: TrainImage, size: tuple[int, int]) -> tuple[Any, Path | None, tuple]:
        """(found entry or None, the cache file to write or None, the in-memory key) for one
        image, from memory or disk."""
        from safetensors.torch import load_file  # lazy: pulls in torch (1.1 s)

        stat = image.path.stat()
        memo_key = (str(image.path), stat.st_size, stat.st_mtime_ns, size)
        cache = self.latent_cache_dir
        if cache is None or not self.cfg.cache_latents:
            return None, None, memo_key
        if memo_key in self._latent_memory:
            return self._latent_memory[memo_key], None, memo_key
        path = cache / f"{file_hash(image.path)}-{self.vae_key()}-{size[0]}x{size[1]}.safetensors"
        if path.is_file():
            try:
                data = load_file(path)
                found = (data["parameters"], tuple(data["original"].tolist()), tuple(data["crop"].tolist()))
                self._latent_memory[memo_key] = found
                return found, None, memo_key
            except Exception:
                path.unlink(missing_ok=True)  # a damaged cache file is simply encoded again
        return None, path, memo_key

    def latent_batch(
        self, images: Sequence[TrainImage], size: tuple[int, int]
    ) -> list[tuple[Any, tuple, tuple]]:
        """(latent Gaussian parameters, original size, crop) of each image at ``size``. With
        ``cache_latents`` they come from the disk cache (encoded and stored the first time, then
        kept in memory too: about 130 KB per image at SD 1.5's 512 px); images not cached are
        encoded together in one VAE pass.

        A batch may hold one picture more than once (a small dataset with repeats, or two
        exported files with the same bytes, which share one cache file): each distinct picture
        is encoded and stored once and its entry given to every place it holds."""
        import torch  # lazy: torch takes 1.1 s to import
        from safetensors.torch import save_file  # lazy: pulls in torch (1.1 s)

        found: list[Any] = [None] * len(images)
        # Distinct pictures still to encode, keyed by their cache file (content) or, uncached,
        # by their path: indices in the batch, the cache file, the in-memory keys.
        todo: dict[str, tuple[list[int], Path | None, list[tuple]]] = {}
        for i, image in enumerate(images):
            entry, path, memo_key = self._cached_latents(image, size)
            if entry is not None:
                found[i] = entry
                continue
            slot = todo.setdefault(str(path or image.path), ([], path, []))
            slot[0].append(i)
            slot[2].append(memo_key)
        if todo:
            slots = list(todo.values())
            prepared = [self._pixels.prepare(images[indices[0]].path, size) for indices, _, _ in slots]
            params = self.encode_images(torch.stack([p[0] for p in prepared])).cpu()
            for (indices, path, memo_keys), (_, original, crop), param in zip(
                slots, prepared, params, strict=True
            ):
                entry = (param, original, crop)
                for i in indices:
                    found[i] = entry
                if path is not None:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    tensors = {"parameters": param.contiguous(), "original": torch.tensor(original)}
                    with atomic_path(path) as tmp:
                        save_file({**tensors, "crop": torch.tensor(crop)}, tmp)
                    for key in memo_keys:
                        self._latent_memory[key] = entry
        return found

    def _encode_text_now(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        hidden_states, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders, strict=True):
            ids = tokenizer(
                texts,
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids.to(self.device)
            if self.family == "sd1":
                hidden_states.append(encoder(ids, return_dict=False)[0])
            else:
                out = encoder(ids, output_hidden_states=True, return_dict=False)
                pooled = out[0]  # the last encoder's pooled (projected) embedding
                hidden_states.append(out[-1][-2])  # SDXL conditions on the penultimate layer
        return torch_cat(hidden_states, dim=-1), pooled

    def encode_text(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Text-encoder hidden states (and SDXL's pooled embedding) for a batch of captions; with
        frozen encoders and ``cache_latents`` they are computed once per caption and kept."""
        import torch  # lazy: torch takes 1.1 s to import

        if self.cfg.train_text_encoder:
            return self._encode_text_now(texts)
        if not self.cfg.cache_latents:
            with torch.no_grad():
                return self._encode_text_now(texts)
        missing = [t for t in dict.fromkeys(texts) if t not in self._text_cache]
        if missing:
            with torch.no_grad():
                hidden, pooled = self._encode_text_now(missing)
            for i, text in enumerate(missing):
                self._text_cache[text] = (hidden[i], pooled[i] if pooled is not None else None)
        hidden = torch.stack([self._text_cache[t][0] for t in texts])
        pooled = None if self.family == "sd1" else torch.stack([self._text_cache[t][1] for t in texts])  # type: ignore[misc]
        return hidden, pooled

    def prepare_texts(self, texts: Sequence[str]) -> None:
        """Called once before the first step with every caption and validation prompt; the UNet
        families cache their (small) text embeddings lazily in memory, so nothing to do here."""

    def text_cache_bytes(self, texts: Sequence[str]) -> int:
        """Bytes :meth:`prepare_texts` will write to disk for ``texts`` (none here: in memory)."""
        return 0

    def latent_bytes(self, size: tuple[int, int]) -> int:
        """Bytes of one cached latent file at bucket ``size`` (the Gaussian's mean and log
        variance in fp32, and the file's small header)."""
        channels = int(self.vae.config.latent_channels)
        return 2 * channels * (size[0] // self.vae_scale) * (size[1] // self.vae_scale) * 4 + 512

    # -- one step ----------------------------------------------------------------------------

    def make_batch(self, images: Sequence[TrainImage], size: tuple[int, int]) -> dict[str, Any]:
        """A batch at one bucket size: latent Gaussians, captions, and SDXL's size/crop numbers."""
        import torch  # lazy: torch takes 1.1 s to import

        parts = self.latent_batch(images, size)
        return {
            "parameters": torch.stack([p[0] for p in parts]),
            "texts": [image.text for image in images],
            "time_ids": torch.tensor([[*p[1], *p[2], size[1], size[0]] for p in parts], dtype=torch.float32),
        }

    def loss(self, batch: dict[str, Any], n_prior: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The denoising loss of a batch (noise and timesteps drawn from the trainer's generator);
        with ``n_prior`` class images at the end of the batch, (instance loss + weighted prior
        loss, prior loss)."""
        import torch  # lazy: torch takes 1.1 s to import
        import torch.nn.functional as F  # lazy: torch takes 1.1 s to import
        from diffusers.models.autoencoders.vae import (  # lazy: diffusers takes 2.7 s to import
            DiagonalGaussianDistribution,
        )
        from diffusers.training_utils import compute_snr  # lazy: diffusers takes 2.7 s to import

        dist = DiagonalGaussianDistribution(batch["parameters"].to(self.device, torch.float32))
        gen = self.generator
        eps = torch.randn(dist.mean.shape, generator=gen).to(self.device)
        latents = (dist.mean + dist.std * eps) * self.vae.config.scaling_factor
        latents = latents.to(self.weight_dtype)
        noise = torch.randn(latents.shape, generator=gen).to(self.device, latents.dtype)
        bsz = latents.shape[0]
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (bsz,), generator=gen)
        timesteps = timesteps.to(self.device).long()
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        hidden, pooled = self.encode_text(batch["texts"])
        added = None
        if self.family == "sdxl":
            added = {
                "text_embeds": pooled.to(self.weight_dtype),
                "time_ids": batch["time_ids"].to(self.device, self.weight_dtype),
            }
        with self.accelerator.autocast():
            pred = self.unet(
                noisy, timesteps, hidden.to(self.weight_dtype), added_cond_kwargs=added, return_dict=False
            )[0]
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        if self.cfg.min_snr_gamma is not None:
            # Min-SNR-gamma (Hang et al. 2023, section 3.4), in the noise-prediction form of section 4.2.
            snr = compute_snr(self.noise_scheduler, timesteps)
            weights = torch.clamp(snr, max=self.cfg.min_snr_gamma)
            weights = (
                weights / (snr + 1)
                if self.noise_scheduler.config.prediction_type == "v_prediction"
                else weights / snr
            )
            per_sample = per_sample * weights
        return self.batch_loss(per_sample, n_prior)

    def batch_loss(self, per_sample: torch.Tensor, n_prior: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The loss of a batch from each sample's: the mean, or with ``n_prior`` class images at
        the end, (instance mean + ``prior_loss_weight`` x prior mean, the prior mean), as
        DreamBooth's prior preservation weighs them (both objectives)."""
        if n_prior:
            instance, prior = per_sample[:-n_prior].mean(), per_sample[-n_prior:].mean()
            return instance + self.cfg.prior_loss_weight * prior, prior.detach()
        return per_sample.mean(), None

    @property
    def denoiser(self) -> torch.nn.Module:
        """The network the LoRA trains (the UNet here; FLUX.1/SD3.5's transformer in flow.py)."""
        return self.unet

    def step(self, batch: dict[str, Any], n_prior: int = 0) -> tuple[float, float | None, bool]:
        """One micro-batch: forward, backward, and (at the end of an accumulation cycle) clip,
        optimizer and schedule step. Returns (loss, prior loss, whether the optimizer stepped)."""
        self.denoiser.train()
        with self.accelerator.accumulate(self.denoiser):
            loss, prior = self.loss(batch, n_prior)
            self.accelerator.backward(loss)
            stepped = self.accelerator.sync_gradients
            if stepped:
                self.accelerator.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
                self.optimizer.step()
                self.lr_scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach()), (float(prior) if prior is not None else None), stepped

    # -- saving ------------------------------------------------------------------------------

    def peft_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """The trained adapter weights per component, in peft's key format (fp32, on the CPU)."""
        from peft.utils import get_peft_model_state_dict  # lazy: peft takes 4.0 s to import

        out = {"unet": get_peft_model_state_dict(self.unet)}
        if self.cfg.train_text_encoder:
            for name, encoder in zip(("text_encoder", "text_encoder_2"), self.text_encoders, strict=False):
                out[name] = get_peft_model_state_dict(encoder)
        return {c: {k: v.detach().float().cpu().contiguous() for k, v in sd.items()} for c, sd in out.items()}

    def load_peft_state(self, state: dict[str, dict[str, torch.Tensor]]) -> None:
        """Put saved adapter weights (from :meth:`peft_state`) back into the models."""
        from peft.utils import set_peft_model_state_dict  # lazy: peft takes 4.0 s to import

        set_peft_model_state_dict(self.unet, state["unet"])
        for name, encoder in zip(("text_encoder", "text_encoder_2"), self.text_encoders, strict=False):
            if name in state:
                set_peft_model_state_dict(encoder, state[name])

    def save_lora(self, folder: Path, kohya_name: str | None = None) -> tuple[Path, Path | None]:
        """Write ``pytorch_lora_weights.safetensors`` (diffusers format, with the LoRA configs as
        metadata so alpha survives) into ``folder``, and a kohya/A1111 copy when ``kohya_name``."""
        from diffusers.utils import convert_state_dict_to_diffusers  # lazy: diffusers takes 2.7 s to import

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = self.peft_state()
        kwargs: dict[str, Any] = {
            "unet_lora_layers": convert_state_dict_to_diffusers(state["unet"]),
            "unet_lora_adapter_metadata": self.unet_lora_config.to_dict(),
        }
        for name in ("text_encoder", "text_encoder_2"):
            if name in state:
                kwargs[f"{name}_lora_layers"] = convert_state_dict_to_diffusers(state[name])
                kwargs[f"{name}_lora_adapter_metadata"] = self.text_lora_config.to_dict()  # type: ignore[union-attr]
        save = pipeline_class(self.family).save_lora_weights
        write_lora_file(folder, lambda staging: save(staging, safe_serialization=True, **kwargs))
        kohya_path = None
        if kohya_name is not None:
            kohya_path = folder / f"{kohya_name}_kohya.safetensors"
            save_kohya(state, kohya_path, alpha=self.cfg.alpha)
        return folder / LORA_FILE, kohya_path

    # -- validation ------------------------------------------------------------------------------

    def validation_images(self, prompts: Sequence[str], seed: int, size: int) -> list[Any]:
        """One image per prompt from the base model with the current LoRA (fixed seeds, so images
        of different checkpoints compare)."""
        import torch  # lazy: torch takes 1.1 s to import

        self.unet.eval()
        for encoder in self.text_encoders:
            encoder.eval()
        images = []
        with torch.no_grad(), self.accelerator.autocast():
            for i, prompt in enumerate(prompts):
                generator = torch.Generator(device="cpu").manual_seed(seed + i)
                out = self.pipe(
                    prompt,
                    num_inference_steps=self.cfg.validation_inference_steps,
                    height=size,
                    width=size,
                    generator=generator,
                )
                images.append(out.images[0])
        self.unet.train()
        return images


def torch_cat(tensors: list[torch.Tensor], dim: int) -> torch.Tensor:
    """``torch.cat`` (kept apart so the module imports without torch)."""
    import torch  # lazy: torch takes 1.1 s to import

    return torch.cat(tensors, dim=dim)


def new_accelerator(cfg: TrainSettings, mixed_precision: str, device: str, tracker_dir: Path | None):
    """The trainer's ``Accelerator``; with ``tracker_dir``, its TensorBoard tracker writes under it
    (:func:`train_lora` starts it with :func:`start_tracker`)."""
    from accelerate import Accelerator  # lazy: accelerate takes 1.3 s to import
    from accelerate.state import AcceleratorState, GradientState  # lazy: accelerate takes 1.3 s to import

    # accelerate keeps process-wide singletons; a second trainer in the same kernel (another
    # mixed_precision, another accumulation) would otherwise be refused or inherit the first's.
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    return Accelerator(
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        mixed_precision=mixed_precision,
        cpu=not device.startswith("cuda"),
        log_with="tensorboard" if tracker_dir is not None else None,
        project_dir=str(tracker_dir) if tracker_dir is not None else None,
    )


def tensorboard_dir() -> Path:
    """``log/tensorboard/`` of the workspace (``$DIFFUSION_BUNNY_LOG_DIR/tensorboard`` when set):
    one folder per LoRA folder below it (:func:`~.tables.tensorboard_name`)."""
    return log_dir() / "tensorboard"


def wait_past_event_files(folder: Path) -> None:
    """Wait until the clock's second is later than that of every event file in ``folder``.

    TensorBoard reads a folder's event files in name order, and a file is named
    ``events.out.tfevents.<second>.<host>.<pid>.<n>``: a resumed run that starts within the second
    the killed run started in is ordered by pid, so when its pid is the smaller one TensorBoard
    reads the new steps first and the killed run's after them, and the purge of what the killed
    run logged past its checkpoint misses (seen in CI on a fast host). Waiting under a second
    for the next one keeps the new file last."""
    stamps = []
    for path in Path(folder).glob("events.out.tfevents.*"):
        part = path.name.split(".")[3]
        if part.isdigit():
            stamps.append(int(part))
    if not stamps:
        return
    latest = max(stamps)
    if latest - time.time() > 2.0:
        # Stamped ahead of the clock (it stepped back: a VM restored from a snapshot, a clock
        # reset): waiting for that second hung the resume as long, without a word. TensorBoard
        # may then order this run's file first; its steps are still all there.
        log.warning(
            "event files in %s are stamped %.0f s ahead of the clock; not waiting",
            folder,
            latest - time.time(),
        )
        return
    while int(time.time()) <= latest:
        time.sleep(min(0.05, max(0.001, latest + 1 - time.time())))


def start_tracker(trainer: LoraTrainer, run_name: str, cfg: TrainSettings, resumed_from: int | None) -> Any:
    """Start the trainer's TensorBoard tracker in ``<tracker_dir>/<run_name>/`` and record the
    settings as text; None when the trainer has none. Each step shows once: a run that starts
    over removes the folder's old event files (its checkpoints are gone too), and a resumed run
    purges what the killed run logged after the checkpoint (``purge_step``, applied by
    TensorBoard when it reads the folder)."""
    accelerator = trainer.accelerator
    if not accelerator.log_with:
        return None
    kwargs: dict[str, Any] = {}
    if resumed_from:
        kwargs["purge_step"] = resumed_from + 1
        wait_past_event_files(Path(accelerator.logging_dir) / run_name)
    else:
        shutil.rmtree(Path(accelerator.logging_dir) / run_name, ignore_errors=True)
    accelerator.init_trackers(run_name, init_kwargs={"tensorboard": kwargs})
    tracker = accelerator.get_tracker("tensorboard", unwrap=False)
    settings = json.dumps(cfg.model_dump(mode="json"), indent=1, sort_keys=True)
    indented = "\n".join("    " + line for line in settings.splitlines())  # markdown code block
    header = f"base model {trainer.ref.name} ({trainer.family})"
    tracker.log({"settings": f"{header}\n\n{indented}"}, step=resumed_from or 0)
    return tracker


def write_lora_file(folder: Path, write: Callable[[Path], Any]) -> Path:
    """``folder``'s ``pytorch_lora_weights.safetensors``, which ``write`` (diffusers'
    ``save_lora_weights``, of any pipeline) writes into the folder it is given. diffusers writes
    the file in place under a fixed name: here it writes into a temporary folder beside the final
    file instead, which is flushed and renamed over it (a killed run leaves the previous LoRA,
    and the temporary folder is swept by the next run), and a full disk, which safetensors reports
    its own way, is the one-line storage error naming the file."""
    final = Path(folder) / LORA_FILE
    staging = temp_path(final)
    try:
        try:
            with disk_errors(final):
                write(staging)
        except OSError as exc:
            # Named after the file, the staging folder read back as the file it stands for:
            # ``.../pytorch_lora_weights.safetensors/pytorch_lora_weights.safetensors``.
            if str(exc.filename or "").startswith(str(staging)):
                exc.filename = str(final)
            raise
        with atomic_path(final) as tmp:
            os.replace(staging / LORA_FILE, tmp)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def save_kohya(state: dict[str, dict[str, torch.Tensor]], path: Path, alpha: float) -> Path:
    """Write the adapters in kohya/A1111 key format (``lora_unet_...lora_down.weight``,
    ``lora_te_`` for SD 1.x, ``lora_te1_`` and ``lora_te2_`` for SDXL, an ``alpha`` per layer;
    diffusers' converter writes alpha = rank, so the real alpha is put back), atomically."""
    import torch  # lazy: torch takes 1.1 s to import
    from diffusers.utils.state_dict_utils import (  # lazy: diffusers takes 2.7 s to import
        convert_state_dict_to_kohya,
    )
    from safetensors.torch import save_file  # lazy: pulls in torch (1.1 s)

    flat = {f"{component}.{key}": value for component, sd in state.items() for key, value in sd.items()}
    kohya = convert_state_dict_to_kohya(flat)
    # diffusers names any text encoder ``lora_te1_``; kohya's sd-scripts (networks/lora.py) and
    # A1111 read ``lora_te1_``/``lora_te2_`` for SDXL's two, ``lora_te_`` for SD 1.x's one.
    single = not any(k.startswith("lora_te2") for k in kohya)
    kohya = {
        (f"lora_te{k[8:]}" if single and k.startswith("lora_te1") else k): (
            torch.tensor(float(alpha)) if k.endswith(".alpha") else v.contiguous()
        )
        for k, v in kohya.items()
    }
    with disk_errors(path), atomic_path(path) as tmp:
        save_file(kohya, tmp, metadata={"ss_network_module": "networks.lora", "ss_network_alpha": str(alpha)})
    return path


# ---------------------------------------------------------------------------------------------
# Checkpoints


def checkpoint_steps(output_dir: Path) -> list[int]:
    """Steps of the resumable checkpoints in ``output_dir`` (those with their state file), ascending."""
    return [step for step, resumable in _checkpoints(output_dir) if resumable]


def _checkpoints(output_dir: Path) -> list[tuple[int, bool]]:
    """``(step, resumable)`` of every checkpoint in ``output_dir`` that holds its LoRA weights (a
    folder renamed into place is complete), ascending."""
    found = []
    if Path(output_dir).is_dir():
        for child in Path(output_dir).iterdir():
            name = child.name
            if name.startswith("checkpoint-") and name[11:].isdigit():
                if (child / LORA_FILE).is_file():
                    found.append((int(name[11:]), (child / STATE_FILE).is_file()))
                elif (child / STATE_FILE).is_file():  # written before LoRA files were checked
                    found.append((int(name[11:]), True))
    return sorted(found)


def prune_checkpoints(output_dir: Path, keep_resumable: int, total_limit: int | None) -> list[str]:
    """Keep the state file (optimizer, schedule, generator: what a resume needs) of the newest
    ``keep_resumable`` checkpoints only, and at most ``total_limit`` checkpoints in all (None:
    every one, as diffusers' ``checkpoints_total_limit``), the oldest going first. Returns what was
    removed. Called after a new checkpoint is complete on disk, so a kill in between leaves one
    state more, never one less.

    Why: for SDXL over a few thousand steps the states of every checkpoint were tens of GB, and
    only the newest is ever resumed from; the LoRA weights of each (a few MB to a few hundred)
    stay for stage 08's comparison of checkpoints."""
    removed = []
    found = _checkpoints(output_dir)
    if total_limit is not None and len(found) > total_limit:
        for step, _ in found[: len(found) - total_limit]:
            shutil.rmtree(Path(output_dir) / f"checkpoint-{step}", ignore_errors=True)
            removed.append(f"checkpoint-{step}/")
        found = found[len(found) - total_limit :]
    resumable = [step for step, has_state in found if has_state]
    for step in resumable[: max(0, len(resumable) - keep_resumable)]:
        (Path(output_dir) / f"checkpoint-{step}" / STATE_FILE).unlink(missing_ok=True)
        removed.append(f"checkpoint-{step}/{STATE_FILE}")
    return removed


def unused_flow_keys(cfg: TrainSettings, family: str | None) -> list[str]:
    """The FLUX.1/SD3.5-only settings (:data:`FLOW_KEYS`) set away from their defaults for a
    model of ``family`` that does not read them (SD 1.x, SDXL): they do nothing there, so they
    get a warning, and no place in :func:`resume_key` (they were a full retrain in a new folder)."""
    if family not in ("sd1", "sdxl"):
        return []
    defaults = _Cfg()
    return [k for k in FLOW_KEYS if getattr(cfg, k) != getattr(defaults, k)]


def resume_keys(cfg: TrainSettings, dataset_key: str, family: str | None = None) -> list[str]:
    """:func:`resume_key`, then the key the same settings and data had before the speed settings
    and the flow keys a family ignores were left out of it (2026-11-29), where that differs: a
    run with ``gradient_checkpointing: true`` made before found no folder of its key, and trained
    its LoRA again from step 0."""
    keys = [resume_key(cfg, dataset_key, family)]
    before = resume_key(cfg, dataset_key, legacy=True)
    return keys if before in keys else [*keys, before]


def resume_key(
    cfg: TrainSettings, dataset_key: str, family: str | None = None, *, legacy: bool = False
) -> str:
    """What must not change for a checkpoint to be resumed: the base model, the adapters' shape,
    the data and everything that changes what a step computes. Step counts, checkpoint and
    validation settings may change (more steps continue the run; the validation's step count
    not where it makes prior preservation's class images), except under a ``linear`` or
    ``cosine`` schedule, whose rate at a step depends on the total: a run of 30 steps continued
    to 60 had decayed to 0 at step 30 and jumped back up at 31, not what 60 steps from the start
    give. The FLUX.1/SD3.5 keys count only when set away from their defaults, so checkpoints of
    SD 1.x/SDXL runs made before those keys existed still resume, and never for a ``family`` that
    does not read them (:func:`unused_flow_keys`); :data:`SPEED_KEYS` never count (``legacy``:
    the key as it was before those two rules, :func:`resume_keys`)."""
    defaults = _Cfg()
    at_default = {k for k in FLOW_KEYS if getattr(cfg, k) == getattr(defaults, k)}
    if not legacy:
        at_default |= set(unused_flow_keys(cfg, family))
    by_total = cfg.lr_scheduler in ("linear", "cosine")
    # Class images generated by the base model are made with the validation's step count: other
    # steps, other prior-preservation data, which a resumed run must not change halfway.
    makes_class_images = cfg.prior_preservation and not cfg.class_data_dir
    keep = cfg.model_dump(
        mode="json",
        exclude={
            *(() if by_total else ("max_train_steps",)),
            "checkpoint_every",
            "validation_every",
            "validation_prompts",
            *(() if makes_class_images else ("validation_inference_steps",)),
            "output_dir",
            "start_over",
            "device",
            "tensorboard",
            "keep_resumable",
            "checkpoints_total_limit",
            *at_default,
        },
    )
    # Written at their defaults, not left out: the key (and the LoRA folder named from it) of
    # every run made before stays what it was.
    if not legacy:
        keep.update({k: getattr(defaults, k) for k in SPEED_KEYS})
    blob = json.dumps({"cfg": keep, "data": dataset_key}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def start_over(output_dir: Path) -> list[str]:
    """``train.start_over``: remove the checkpoints, final LoRA files and validation pictures
    of one LoRA folder (its ``training.json`` stays); returns what was removed. The only place a
    LoRA is deleted, and only when the user set it."""
    removed = []
    for child in sorted(Path(output_dir).iterdir()) if Path(output_dir).is_dir() else []:
        if child.name.startswith("checkpoint-") or child.name in ("validation", DAMAGED_DIR):
            shutil.rmtree(child, ignore_errors=True)
            removed.append(child.name + "/")
        elif child.is_file() and child.name.endswith(".safetensors"):
            child.unlink()
            removed.append(child.name)
    return removed


def _write_checkpoint(
    output_dir: Path, trainer: LoraTrainer, step: int, state: dict[str, Any], cfg: TrainSettings
) -> Path:
    """``checkpoint-<step>/`` complete on disk (written aside, flushed, renamed into place), then
    the older checkpoints pruned (:func:`prune_checkpoints`)."""
    import torch  # lazy: torch takes 1.1 s to import

    final = output_dir / f"checkpoint-{step}"
    tmp = temp_path(final)  # named by pid: a killed run's half checkpoint is swept, a live one's kept
    try:
        trainer.save_lora(tmp)
        with disk_errors(tmp / STATE_FILE):  # torch.save says only "unexpected pos" on a full disk
            torch.save(
                {
                    **state,
                    "peft": trainer.peft_state(),
                    "optimizer": trainer.optimizer.state_dict(),
                    "lr_scheduler": trainer.lr_scheduler.state_dict(),
                    "generator": trainer.generator.get_state(),
                },
                tmp / STATE_FILE,
            )
            for written in (tmp / LORA_FILE, tmp / STATE_FILE):
                fd = os.open(written, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # never taken for a checkpoint, and the space is back
        raise
    swap_in(tmp, final)  # the old folder of that step (if any) is renamed aside first
    prune_checkpoints(output_dir, cfg.keep_resumable, cfg.checkpoints_total_limit)
    return final


def read_checkpoint(folder: Path) -> dict[str, Any]:
    """The state of a checkpoint, read with ``weights_only=True``: tensors and plain Python values
    only, so a state file someone swapped in cannot run code when it is read (torch's full
    unpickler would)."""
    import torch  # lazy: torch takes 1.1 s to import

    return torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)


# ---------------------------------------------------------------------------------------------
# The loop


def disk_needs(
    trainer: LoraTrainer,
    cfg: TrainSettings,
    output_dir: Path,
    samples: Sequence[Sample],
    prior: Sequence[TrainImage],
    n_prompts: int,
    start: int,
) -> list[tuple[Path, int, str]]:
    """What a training from step ``start`` will write, as ``(folder, bytes, what)`` for
    :func:`~diffusion_bunny.pipeline.atomic.check_free_space`: its checkpoints (LoRA weights: 4
    bytes per trained parameter and a header per tensor; a state: the weights again and AdamW's two
    moments, 12 bytes per parameter; ``keep_resumable`` + 1 states at the peak, as the new one is
    written before the old is pruned), the final LoRA and its kohya copy, the validation pictures,
    and the latents and text embeddings not cached yet. An estimate on the safe side: a training
    refused by it would have filled the disk."""
    params = sum(p.numel() for p in trainer.params)
    tensors = len(trainer.params)
    lora = 4 * params + 256 * tensors + 4096
    state = 12 * params + 3 * 512 * tensors + 64 * 1024
    steps = [s for s in range(start + 1, cfg.max_train_steps + 1) if not s % cfg.checkpoint_every]
    if cfg.max_train_steps > start and cfg.max_train_steps not in steps:
        steps.append(cfg.max_train_steps)
    kept = len(steps) if cfg.checkpoints_total_limit is None else min(len(steps), cfg.checkpoints_total_limit)
    states = min(len(steps), cfg.keep_resumable + 1)
    validations = 0
    if cfg.validation_every and n_prompts:
        at = [s for s in range(start + 1, cfg.max_train_steps + 1) if not s % cfg.validation_every]
        validations = len(at) + (start == 0) + (cfg.max_train_steps % cfg.validation_every != 0)
    side = trainer.resolution
    pictures = validations * n_prompts * (3 * side * side + 4096)
    needs = [
        (output_dir, kept * lora, f"{kept} checkpoint(s) of LoRA weights"),
        (output_dir, states * state, f"{states} optimizer state(s)"),
        (output_dir, (2 * lora if cfg.max_train_steps > start else 0) + pictures, "the LoRA and pictures"),
    ]
    cache = trainer.latent_cache_dir
    if cache is not None and cfg.cache_latents and cfg.max_train_steps > start:
        buckets = {s.bucket for s in samples}  # a class image is cached at the size of each batch it joins
        sizes = {(s.image.path, s.bucket) for s in samples} | {(im.path, b) for im in prior for b in buckets}
        # Only this training's latents not cached yet: the cache is shared by every dataset
        # trained with this VAE, and counting the others' files as this one's underestimated.
        vae = trainer.vae_key()
        hashes = {path: file_hash(path) for path, _ in sizes}
        latents = sum(
            trainer.latent_bytes(size)
            for path, size in sizes
            if not (cache / f"{hashes[path]}-{vae}-{size[0]}x{size[1]}.safetensors").is_file()
        )
        needs.append((cache, latents, "cached latents"))
        texts = [*(s.image.text for s in samples), *(p.text for p in prior)]
        needs.append((cache, trainer.text_cache_bytes(texts), "cached text embeddings"))
    return needs


def _resume_note(start: int) -> str:
    return f"; a rerun resumes from checkpoint-{start}" if start else ""


def class_images(trainer: LoraTrainer | None, cfg: TrainSettings, resolution: int) -> list[TrainImage]:
    """Prior-preservation images: from ``class_data_dir`` when set, else generated once by the base
    model (no LoRA) into the user cache, keyed by model, prompt, count, size and seed."""
    prompt = str(cfg.class_prompt)
    if cfg.class_data_dir:
        folder = Path(cfg.class_data_dir).expanduser()
        folder = folder if folder.is_absolute() else workspace_root() / folder
        if not folder.is_dir():
            raise BadInputError(
                f"train.class_data_dir = {cfg.class_data_dir!r} is not a folder; fix it or set it to null"
            )
        found = class_images_from_dir(folder, prompt, cfg.num_class_images)
        if not found:
            raise BadInputError(f"train.class_data_dir {folder} holds no images; add some or set it to null")
        return found
    if trainer is None:
        raise StageError(
            "train.class_data_dir is not set, and class images need the base model to generate them"
        )
    blob = json.dumps(
        [
            str(trainer.ref.path),
            prompt,
            cfg.num_class_images,
            resolution,
            cfg.seed,
            cfg.validation_inference_steps,
        ]
    ).encode()
    folder = cache_dir() / "class_images" / hashlib.sha256(blob).hexdigest()[:16]
    files = [folder / f"{i:04d}.png" for i in range(cfg.num_class_images)]
    missing = [i for i, f in enumerate(files) if not f.is_file()]
    if missing:
        folder.mkdir(parents=True, exist_ok=True)
        # Called before any step or resumed state: the adapters' B matrices are still zero (peft's
        # gaussian init), so these are the base model's own pictures.
        for i in missing:
            image = trainer.validation_images([prompt], cfg.seed + 1000 + i, resolution)[0]
            with atomic_path(files[i]) as tmp:
                image.save(tmp, format="PNG")
    return [TrainImage(path=f, text=prompt) for f in files]


def train_lora(
    images: Sequence[TrainImage],
    cfg: TrainSettings,
    output_dir: Path,
    *,
    validation_prompts: Sequence[str] = (),
    progress: bool = True,
    progress_path: Path | None = None,
    device: str | None = None,
    cache_dir: Path | None = None,
    trainer_class: type[LoraTrainer] | None = None,
    name: str | None = None,
    resume_from: Sequence[Path] = (),
) -> TrainResult:
    """Train (or continue training) a LoRA on ``images`` and write everything into ``output_dir``.

    Resumes from the latest resumable checkpoint (its settings and data must match: a folder
    holding another training's checkpoints is an error, nothing is deleted unless
    ``train.start_over``), in ``output_dir`` or in one of the ``resume_from`` folders (the same
    settings and data trained for fewer steps: a longer training continues from there into a
    folder of its own). ``name`` names the kohya file (default:
    :func:`~diffusion_bunny.stages.train.tables.lora_name` of the folder) and, with a hash of the
    folder's path, its TensorBoard run (:func:`~.tables.tensorboard_name`). Latents are cached
    under ``cache_dir`` (default ``output_dir``).
    ``trainer_class`` is :class:`LoraTrainer` (SD 1.x/SDXL, the default) or ``FlowLoraTrainer``
    (FLUX.1/SD3.5; ``stages.train.flow.trainer_class_for`` picks by the base model).
    With ``train.tensorboard`` the loss, learning rate and validation images also go to
    TensorBoard in ``log/tensorboard/<name>-<path hash>/`` (the ``training_log`` table is the same
    either way). The folder is held for the whole training (:func:`lora_lock`): a second
    training of it, on this machine or another, stops at once."""
    if not images:
        raise StageError("no training images; check the dataset (stage export)")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    with lora_lock(output_dir):
        return _train_locked(
            images,
            cfg,
            output_dir,
            validation_prompts=validation_prompts,
            progress=progress,
            progress_path=progress_path,
            device=device,
            cache_dir=cache_dir,
            trainer_class=trainer_class,
            name=name,
            resume_from=resume_from,
        )


@contextlib.contextmanager
def lora_lock(folder: Path) -> Iterator[None]:
    """Hold the LoRA folder ``folder`` while training writes into it: another training of the same
    folder (a second ``bunny run`` of the same movie and settings into a shared
    ``train.output_dir``, on this machine or another node) is refused at once, naming the
    holder, instead of both writing the same checkpoints. The run lock's machinery (an OS file
    lock and a lease with a heartbeat, :mod:`diffusion_bunny.pipeline.lock`) on the folder."""
    try:
        with run_lock(folder, what="training"):
            yield
    except RunBusy:
        holder = current_holder(folder)
        by = f" by {holder.describe()}" if holder is not None else ""
        raise StageError(
            f"the LoRA folder {folder} is being trained{by}; wait for that training to finish or stop it "
            "(one training per LoRA folder at a time; its checkpoints are kept for the next run)"
        ) from None


def _train_locked(
    images: Sequence[TrainImage],
    cfg: TrainSettings,
    output_dir: Path,
    *,
    validation_prompts: Sequence[str],
    progress: bool,
    progress_path: Path | None,
    device: str | None,
    cache_dir: Path | None,
    trainer_class: type[LoraTrainer] | None,
    name: str | None,
    resume_from: Sequence[Path],
) -> TrainResult:
    warnings: list[str] = []
    data_key = dataset_key(images)
    family = resolve_base_model(cfg.base_model, cfg.family).family  # the trainer resolves it again
    keys = resume_keys(cfg, data_key, family)
    if unused_flow_keys(cfg, family):
        warnings.append(
            f"{', '.join('train.' + k for k in unused_flow_keys(cfg, family))}: for FLUX.1 and SD3.5 "
            f"only, ignored for this {family} model"
        )
    if cfg.start_over:
        removed = start_over(output_dir)
        if removed:
            warnings.append(
                f"train.start_over: the earlier LoRA of this configuration in {output_dir} "
                f"({', '.join(removed)}) was removed and training started from step 0"
            )
    sweep_leftovers(output_dir)  # checkpoints and files the killed process never finished
    # Settings changed since the last checkpoint (keep_resumable, checkpoints_total_limit) apply now.
    prune_checkpoints(output_dir, cfg.keep_resumable, cfg.checkpoints_total_limit)

    # Find what to resume from before loading any model: this folder's latest checkpoint, else
    # the latest of a folder of the same settings and data trained for fewer steps.
    resume_state, resumed_from, resumed_folder = _resume_point(
        output_dir, [] if cfg.start_over else list(resume_from), cfg, keys, warnings
    )
    if resume_state is None and not cfg.start_over:
        _refuse_to_start_over_unasked(output_dir)
    trainer = (trainer_class or LoraTrainer)(
        cfg,
        cache_dir=cache_dir or output_dir,
        device=device,
        tracker_dir=tensorboard_dir() if cfg.tensorboard else None,
    )
    name = name or lora_name(output_dir)
    board = tensorboard_name(output_dir, name)
    if resumed_folder is not None and resumed_folder != output_dir and trainer.accelerator.log_with:
        # The TensorBoard run continues the one it resumed from: its events up to the checkpoint.
        earlier = Path(trainer.accelerator.logging_dir) / tensorboard_name(resumed_folder)
        if earlier.is_dir() and not (Path(trainer.accelerator.logging_dir) / board).exists():
            shutil.copytree(earlier, Path(trainer.accelerator.logging_dir) / board)
    try:
        return _train(
            trainer,
            images,
            cfg,
            output_dir,
            prompts=validation_prompts,
            progress=progress,
            progress_path=progress_path,
            resume_state=resume_state,
            resumed_from=resumed_from,
            resumed_folder=resumed_folder,
            key=keys[0],
            warnings=warnings,
            name=name,
            board=board,
        )
    finally:
        if trainer.accelerator.trackers:
            trainer.accelerator.end_training()  # closes the TensorBoard writer, also after an error


def _refuse_to_start_over_unasked(output_dir: Path) -> None:
    """One line, before any model loads, when ``output_dir`` holds a trained LoRA or checkpoints
    but no state to resume from (the newest checkpoint's folder deleted to free space, or its
    state found damaged): training from step 0 there replaced the finished LoRA, its checkpoints
    and its TensorBoard history without a word, which only ``train.start_over`` is to do."""
    steps = [step for step, _ in _checkpoints(output_dir)]
    finished = (Path(output_dir) / LORA_FILE).is_file()
    if not steps and not finished:
        return
    held = " and ".join(
        [
            *(["the finished LoRA"] if finished else []),
            *([f"checkpoints up to step {max(steps)}"] if steps else []),
        ]
    )
    raise StageError(
        f"{output_dir} holds {held} but no training state to resume from (no checkpoint-N/{STATE_FILE}: "
        "the newest checkpoint was removed or is damaged); training from step 0 would replace them: "
        "put the removed checkpoint back, or set train.start_over: true to train this LoRA again"
    )


#: Where a damaged training state is set aside, in the LoRA's folder.
DAMAGED_DIR = "damaged"


def _resume_point(
    output_dir: Path, others: list[Path], cfg: TrainSettings, keys: Sequence[str], warnings: list[str]
) -> tuple[dict[str, Any] | None, int | None, Path | None]:
    """``(state, step, folder)`` of the checkpoint to resume from (Nones: start at step 0): the
    highest resumable step up to ``max_train_steps`` in ``output_dir`` or ``others``, this folder
    winning a tie. A damaged state file is skipped with a warning; a checkpoint of other settings
    in ``output_dir`` itself is an error (a caller naming another training's folder)."""
    candidates = [(step, 1, output_dir) for step in checkpoint_steps(output_dir)]
    candidates += [(step, 0, folder) for folder in others for step in checkpoint_steps(folder)]
    for step, own, folder in sorted(candidates, reverse=True):
        checkpoint = folder / f"checkpoint-{step}"
        try:
            state = read_checkpoint(checkpoint)
        except Exception:
            warnings.append(f"checkpoint {checkpoint} is damaged and was skipped")
            if own:
                # Set aside, not deleted: left as it was it stayed the newest resumable state, and
                # the pruning that keeps the newest states removed the good ones written after it.
                # Outside the checkpoint's folder, which a training that reaches that step again
                # replaces whole (the file the warning said was kept was gone).
                aside = output_dir / DAMAGED_DIR / f"{checkpoint.name}-{STATE_FILE}"
                with contextlib.suppress(OSError):
                    aside.parent.mkdir(exist_ok=True)
                    os.replace(checkpoint / STATE_FILE, aside)
                    warnings[-1] += f" (its state file kept as {aside})"
            continue
        if state.get("resume_key") not in {*keys, *earlier_resume_keys(folder)}:
            if not own:
                continue
            # Never deleted behind the user's back: stage 07 trains each configuration
            # in its own folder, so this is a caller naming a folder of another training.
            raise StageError(
                f"{output_dir} holds a LoRA trained with other settings or data (checkpoint-{step}); "
                "train into another folder, or set train.start_over: true to replace it"
            )
        if step > cfg.max_train_steps:
            continue
        return state, step, folder
    return None, None, None


def _train(
    trainer: LoraTrainer,
    images: Sequence[TrainImage],
    cfg: TrainSettings,
    output_dir: Path,
    *,
    prompts: Sequence[str],
    progress: bool,
    progress_path: Path | None,
    resume_state: dict[str, Any] | None,
    resumed_from: int | None,
    resumed_folder: Path | None,
    key: str,
    warnings: list[str],
    name: str,
    board: str,
) -> TrainResult:
    """The loop of :func:`train_lora` once the trainer is built and the checkpoint to resume from
    (if any) is read; ``name`` names the kohya file, ``board`` the TensorBoard run."""
    resolution = trainer.resolution
    buckets = make_buckets(resolution, bucket_step(resolution, trainer.vae_scale)) if cfg.buckets else []
    square = (resolution - resolution % trainer.vae_scale,) * 2
    samples: list[Sample] = []
    for image in images:
        bucket = nearest_bucket(*image_size(image.path), buckets) if cfg.buckets else square
        samples += [Sample(image, bucket)] * image.repeats
    prior: list[TrainImage] = class_images(trainer, cfg, resolution) if cfg.prior_preservation else []

    prompts = list(prompts) if cfg.validation_every else []
    start = resumed_from or 0
    check_free_space(
        disk_needs(trainer, cfg, output_dir, samples, prior, len(prompts), start),
        f"free some space there (older LoRA folders that bunny status lists, or caches), set "
        f"train.checkpoints_total_limit or a larger train.checkpoint_every, or point "
        f"train.output_dir at a larger disk; nothing was trained{_resume_note(start)}",
    )
    trainer.prepare_texts([*(s.image.text for s in samples), *(p.text for p in prior), *prompts])
    tracker = start_tracker(trainer, board, cfg, resumed_from)
    log_rows: list[dict[str, Any]] = []
    validation_rows: list[dict[str, Any]] = []
    step, epoch, batch_index, elapsed_before = 0, 0, 0, 0.0
    if resume_state is not None:
        trainer.load_peft_state(resume_state["peft"])
        trainer.optimizer.load_state_dict(resume_state["optimizer"])
        trainer.lr_scheduler.load_state_dict(resume_state["lr_scheduler"])
        trainer.generator.set_state(resume_state["generator"])
        step, epoch, batch_index = resume_state["step"], resume_state["epoch"], resume_state["batch_index"]
        elapsed_before = float(resume_state["elapsed_s"])
        log_rows = list(resume_state["log"])
        validation_rows = list(resume_state["validation"])

    def validate(at: int) -> None:
        if not prompts:
            return
        folder = output_dir / "validation" / f"step-{at:06d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(trainer.validation_images(prompts, cfg.seed, resolution)):
            path = folder / f"{i:02d}.png"
            with atomic_path(path) as tmp:  # a killed run never leaves half a PNG
                image.save(tmp, format="PNG")
            validation_rows.append(
                {"step": at, "index": i, "prompt": prompts[i], "seed": cfg.seed + i, "path": str(path)}
            )
            if tracker is not None:
                tracker.log_images(
                    {f"validation/{i:02d}": np.asarray(image.convert("RGB"))[None]}, at, dataformats="NHWC"
                )

    if step == 0 and cfg.validation_every:
        validate(0)
    reporter = ProgressFile(progress_path, "train", cfg.max_train_steps, "step")
    bar = tqdm(total=cfg.max_train_steps, initial=step, desc="train steps", unit="step", disable=not progress)
    started = time.monotonic() - elapsed_before
    micro_losses: list[float] = []
    micro_prior: list[float] = []
    # Where the class images go on: kept in the state (an estimate from full batches sent a
    # resumed run to other class images than an uninterrupted one, the last batch of an epoch
    # and buckets being smaller); a state from before it was kept is estimated as before.
    prior_cursor = int(
        (resume_state or {}).get(
            "prior_cursor", step * cfg.gradient_accumulation_steps * cfg.train_batch_size
        )
    )
    while step < cfg.max_train_steps:
        batches = epoch_batches([s.bucket for s in samples], cfg.train_batch_size, cfg.seed, epoch)
        while batch_index < len(batches) and step < cfg.max_train_steps:
            members = [samples[i] for i in batches[batch_index]]
            size = members[0].bucket
            batch_images = [m.image for m in members]
            n_prior = 0
            if prior:
                n_prior = len(batch_images)
                batch_images += [prior[(prior_cursor + j) % len(prior)] for j in range(n_prior)]
                prior_cursor += n_prior
            loss, prior_loss, stepped = trainer.step(trainer.make_batch(batch_images, size), n_prior)
            batch_index += 1
            micro_losses.append(loss)
            if prior_loss is not None:
                micro_prior.append(prior_loss)
            if not stepped:
                continue
            step += 1
            log_rows.append(
                {
                    "step": step,
                    "loss": sum(micro_losses) / len(micro_losses),
                    "lr": float(trainer.lr_scheduler.get_last_lr()[0]),
                    "epoch": epoch,
                    "elapsed_s": time.monotonic() - started,
                    "prior_loss": (sum(micro_prior) / len(micro_prior)) if micro_prior else None,
                }
            )
            micro_losses, micro_prior = [], []
            if tracker is not None:
                row = log_rows[-1]
                scalars = {"loss": row["loss"], "lr": row["lr"], "epoch": row["epoch"]}
                if row["prior_loss"] is not None:
                    scalars["prior_loss"] = row["prior_loss"]
                tracker.log(scalars, step=step)
            bar.update(1)
            bar.set_postfix(loss=f"{log_rows[-1]['loss']:.4f}")
            reporter.update(step)
            if cfg.validation_every and step % cfg.validation_every == 0:
                validate(step)
            if step % cfg.checkpoint_every == 0 or step == cfg.max_train_steps:
                if step == cfg.max_train_steps and cfg.validation_every and step % cfg.validation_every:
                    validate(step)
                _write_checkpoint(
                    output_dir,
                    trainer,
                    step,
                    cfg=cfg,
                    state={
                        "step": step,
                        "epoch": epoch,
                        "batch_index": batch_index,
                        "prior_cursor": prior_cursor,
                        "elapsed_s": time.monotonic() - started,
                        "log": log_rows,
                        "validation": validation_rows,
                        "resume_key": key,
                        "seed": cfg.seed,
                    },
                )
        if batch_index >= len(batches):
            epoch, batch_index = epoch + 1, 0
    bar.close()
    reporter.close()

    lora_path, kohya_path = trainer.save_lora(output_dir, kohya_name=name)
    log = (
        pl.DataFrame(log_rows, schema=TRAINING_LOG_SCHEMA)
        if log_rows
        else pl.DataFrame(schema=TRAINING_LOG_SCHEMA)
    )
    validation = (
        pl.DataFrame(validation_rows, schema=VALIDATION_SCHEMA)
        if validation_rows
        else pl.DataFrame(schema=VALIDATION_SCHEMA)
    )
    facts = {
        "base_model": trainer.ref.name,
        "base_model_path": str(trainer.ref.path),
        "family": trainer.family,
        "device": trainer.device,
        "mixed_precision": trainer.mixed_precision,
        "resolution": resolution,
        "buckets": sorted({f"{s.bucket[0]}x{s.bucket[1]}" for s in samples}),
        "samples_per_epoch": len(samples),
        "class_images": len(prior),
        "resumed_from": resumed_from,
        "resumed_from_folder": (
            str(resumed_folder) if resumed_folder is not None and resumed_folder != output_dir else None
        ),
        "output_dir": str(output_dir),
        "lora_path": str(lora_path),
        "kohya_path": str(kohya_path),
        "trainable_parameters": sum(p.numel() for p in trainer.params),
    }
    return TrainResult(
        output_dir=output_dir,
        lora_path=lora_path,
        kohya_path=kohya_path,  # type: ignore[arg-type]
        log=log,
        validation=validation,
        resumed_from=resumed_from,
        facts=facts,
        warnings=warnings,
    )
