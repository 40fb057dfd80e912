"""CLIP through transformers, from a local folder or the Hugging Face cache only: stage 04's
``clip`` embedder (images and text in one space) and stage 08's CLIP score. A missing or broken
model is one :class:`~diffusion_bunny.errors.ModelError` naming the setting."""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from diffusion_bunny.errors import ModelError
from diffusion_bunny.logs import bar_options, relay_bar_class
from diffusion_bunny.media.images import Region, l2_rows, read_image
from diffusion_bunny.models.device import resolve_device
from diffusion_bunny.models.hub import HUB_ID, TRANSFORMERS_FILES, hub_model, short_reason, snapshot_hint
from diffusion_bunny.paths import local_model_path

# --------------------------------------------------------------------------------------------
# CLIP
# --------------------------------------------------------------------------------------------

#: What ``scenes.clip_model`` may be set to instead of a hub id that cannot be had (the tail of
#: :func:`hub_model`'s "... or set scenes.clip_model to <this>").
CLIP_INSTEAD = (
    "a local folder holding a CLIP model (`hf download openai/clip-vit-base-patch32` on a machine "
    "with network, then copy the Hugging Face cache or the folder here), or use scenes.embedder: descriptor"
)


class ClipEmbedder:
    """A ``transformers`` CLIP model: image and text features, L2-normalised.

    ``model`` is a hub id (from the local Hugging Face cache, downloaded with a progress bar when
    it is not there and the hub can be reached) or a local folder. Loading happens in the
    constructor so a missing model fails before any work.
    """

    def __init__(
        self,
        model: str,
        device: str = "auto",
        batch_size: int = 32,
        *,
        setting: str = "scenes.clip_model",
        instead: str = CLIP_INSTEAD,
    ):
        # ``setting``/``instead``: the config key a load failure names (stage 08 loads its CLIP from
        # generate.clip_model through this same code) and what it may be set to instead. Each
        # message says "set <setting> to <instead>" once (the hub's message ends in those words,
        # and it used to be given a whole hint that said them again inside its parentheses).
        hint = f"set {setting} to {instead}"
        import torch  # lazy: torch takes 1.1 s to import
        from transformers import (
            AutoConfig,
            AutoProcessor,
            CLIPModel,
        )  # lazy: transformers takes 0.56 s to import

        self.model_id = model
        self.batch_size = int(batch_size)
        self.device = resolve_device(device, "scenes.device")
        self.name = f"clip:{model}"  # as embedder_name()
        path = local_model_path(model)
        source = str(path) if path.exists() else model
        if path.exists() and not path.is_dir():
            raise ModelError(f"{setting} '{model}' is a file, not a model folder; {hint}")
        if not path.exists() and HUB_ID.match(model):
            # Not a folder here: a hub id, from the cache or downloaded now.
            source = str(hub_model(model, setting, TRANSFORMERS_FILES, instead=instead))
        try:
            kind = AutoConfig.from_pretrained(source, local_files_only=True).model_type
            if kind != "clip":  # loaded as CLIP anyway, with random weights and a warning table
                raise ValueError(f"it holds a {kind!r} model, not CLIP (clip)")
            self.model = CLIPModel.from_pretrained(source, local_files_only=True)
            # PIL backend, as before torchvision came in (through facenet-pytorch):
            # with torchvision installed transformers picks its torchvision image processor,
            # whose resize differs slightly, and every stored scene embedding would drift.
            self.processor = AutoProcessor.from_pretrained(source, local_files_only=True, backend="pil")
        except Exception as exc:  # every failure mode of from_pretrained means "no usable model"
            # transformers' own text for a missing hub id talks about the internet connection,
            # which misleads offline; for a folder that exists, its reason names what is broken.
            if path.exists():
                where = f"from that folder: {short_reason(exc)}"
            elif source != model:  # a hub id whose cached snapshot does not load
                where = f"from its cached snapshot {source}: {short_reason(exc)}{snapshot_hint(source, exc)}"
            else:
                where = "(no such folder here, and not a hub id: owner/name)"
            message = f"cannot load the CLIP model {setting}='{model}' {where}; {hint}"
            raise ModelError(message) from None
        if (
            getattr(self.processor, "tokenizer", None) is None
            or getattr(self.processor, "image_processor", None) is None
        ):
            raise ModelError(
                f"{setting}='{model}' has no tokenizer or image processor next to the weights; {hint}"
            )
        # transformers 5 builds an empty tokenizer when vocab.json/merges.txt/tokenizer.json are
        # missing instead of failing, and every text would then embed to the same vector. A
        # byte-level BPE holds at least its 256 byte symbols, and no id may exceed the model's table.
        vocab = len(self.processor.tokenizer)
        if not 256 <= vocab <= int(self.model.config.text_config.vocab_size):
            raise ModelError(
                f"{setting}='{model}' has no usable tokenizer ({vocab} tokens for a model of "
                f"{self.model.config.text_config.vocab_size}; are vocab.json and merges.txt or "
                f"tokenizer.json missing?); {hint}"
            )
        self.model.to(self.device).eval()
        self.dim = int(self.model.config.projection_dim)
        self._torch = torch
        crop = getattr(self.processor.image_processor, "crop_size", None) or {}
        # Decode at a reduction that still leaves twice the model's input size, so the processor's
        # own resize (not libjpeg's DCT scaling) decides the pixels the model sees.
        self._min_side = 2 * int(max(crop.get("height", 224), crop.get("width", 224)) if crop else 224)

    @property
    def supports_text(self) -> bool:
        """True: CLIP embeds text into the image space."""
        return True

    @staticmethod
    def _features(out: Any) -> Any:
        # transformers 5 returns a model output whose pooler_output is the projected feature;
        # 4.x returned the tensor itself.
        return out if hasattr(out, "shape") else out.pooler_output

    def embed_images(
        self, paths: Sequence[Path], progress: bool = False, regions: Sequence[Region | None] | None = None
    ) -> np.ndarray:
        """Image features of ``paths`` (of each one's ``regions`` entry only, when given: a frame's
        picture box), batched by ``batch_size``, float32 ``[n, dim]``."""
        torch = self._torch
        boxes = list(regions) if regions is not None else [None] * len(paths)
        out = np.zeros((len(paths), self.dim), dtype=np.float32)
        # relayed: under `bunny run` the terminal shows it too (CLIP on a CPU takes minutes)
        bar = relay_bar_class()(
            total=len(paths), unit="frame", desc="embed (clip)", disable=not progress, **bar_options(0.5)
        )
        workers = min(max(len(paths), 1), os.cpu_count() or 1)
        try:
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="embed") as pool:
                for start in range(0, len(paths), self.batch_size):
                    chunk = [Path(p) for p in paths[start : start + self.batch_size]]
                    images = list(pool.map(self._read_rgb, chunk, boxes[start : start + self.batch_size]))
                    inputs = self.processor(images=images, return_tensors="pt")
                    with torch.inference_mode():
                        feats = self._features(
                            self.model.get_image_features(pixel_values=inputs["pixel_values"].to(self.device))
                        )
                    out[start : start + len(chunk)] = feats.float().cpu().numpy()
                    bar.update(len(chunk))
        finally:
            bar.close()
        return l2_rows(out)

    def _read_rgb(self, path: Path, region: Region | None = None) -> np.ndarray:
        return cv2.cvtColor(read_image(path, self._min_side, region), cv2.COLOR_BGR2RGB)

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Text features, batched by ``batch_size``, float32 ``[n, dim]``."""
        torch = self._torch
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        max_len = int(self.model.config.text_config.max_position_embeddings)
        for start in range(0, len(texts), self.batch_size):
            chunk = [str(t) for t in texts[start : start + self.batch_size]]
            tokens = self.processor.tokenizer(
                chunk, padding=True, truncation=True, max_length=max_len, return_tensors="pt"
            )
            with torch.inference_mode():
                feats = self._features(
                    self.model.get_text_features(
                        input_ids=tokens["input_ids"].to(self.device),
                        attention_mask=tokens["attention_mask"].to(self.device),
                    )
                )
            out[start : start + len(chunk)] = feats.float().cpu().numpy()
        return l2_rows(out)
