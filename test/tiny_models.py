"""Tiny models built in code, so tests exercise the real loading code without any download.

A tiny CLIP here is a real ``CLIPModel`` (random, seeded weights; hidden size 32, two layers,
32x32 images) saved with ``save_pretrained`` next to a real byte-level BPE tokenizer and an image
processor config: the same files a hub snapshot of ``openai/clip-vit-base-patch32`` holds, only
small. ``make_embedder`` then loads the folder exactly as it would load a user's model.
"""

from __future__ import annotations

import json
from pathlib import Path

from diffusion_bunny.models.tiny_clip import clip_text_config, tiny_clip_vocab, write_clip_tokenizer


def write_tiny_clip(folder: Path, seed: int = 0) -> Path:
    """Write a tiny random CLIP (model, tokenizer, image processor) into ``folder`` and return it."""
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, _ = tiny_clip_vocab()
    text = clip_text_config(vocab, 32, max_positions=32)
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
    )
    config = CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=16)
    torch.manual_seed(seed)
    CLIPModel(config).eval().save_pretrained(folder)

    write_clip_tokenizer(folder, model_max_length=32)
    # The values of openai/clip-vit-base-patch32's preprocessor_config.json, at the tiny image size.
    (folder / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "image_processor_type": "CLIPImageProcessor",
                "processor_class": "CLIPProcessor",
                "do_resize": True,
                "size": {"shortest_edge": 32},
                "resample": 3,
                "do_center_crop": True,
                "crop_size": {"height": 32, "width": 32},
                "do_rescale": True,
                "rescale_factor": 1 / 255,
                "do_normalize": True,
                "image_mean": [0.48145466, 0.4578275, 0.40821073],
                "image_std": [0.26862954, 0.26130258, 0.27577711],
                "do_convert_rgb": True,
            }
        ),
        encoding="utf-8",
    )
    return folder
