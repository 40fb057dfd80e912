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


# ---------------------------------------------------------------------------------------------
# Characters from the hub (models/hub_characters/): tiny OWLv2 and DINOv2

#: The tiny OWLv2's input side and patch size: an 8 x 8 grid of patches, one box each.
SIDE, PATCH = 64, 8
GRID = SIDE // PATCH


def write_tiny_owlv2(folder: Path, seed: int = 0, grid_boxes: bool = False) -> Path:
    """A tiny random OWLv2 (hidden size 32, two layers, 64 px input, 8 px patches) with its
    processor (``Owlv2ImageProcessor`` + a CLIP tokenizer that pads with "!", id 0, as OWLv2's
    does: a query whose first token is 0 is padding to the model). ``grid_boxes``: the box head's
    last layer zeroed, so each patch's box is the grid bias alone."""
    import torch
    from transformers import (
        CLIPTokenizer,
        Owlv2Config,
        Owlv2ForObjectDetection,
        Owlv2ImageProcessor,
        Owlv2Processor,
    )

    from diffusion_bunny.models.tiny_clip import BOS, EOS, write_clip_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = write_clip_tokenizer(folder, model_max_length=16, pad_token="!")
    text = {
        "vocab_size": len(vocab),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 16,
        "bos_token_id": vocab[BOS],
        "eos_token_id": vocab[EOS],
        "pad_token_id": 0,
    }
    vision = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "image_size": SIDE,
        "patch_size": PATCH,
    }
    # The class head compares patch embeddings (text width) with text embeddings (projection
    # width): as in the real models, the two are one width.
    config = Owlv2Config(text_config=text, vision_config=vision, projection_dim=32)
    torch.manual_seed(seed)
    model = Owlv2ForObjectDetection(config).eval()
    if grid_boxes:
        with torch.no_grad():
            model.box_head.dense2.weight.zero_()
            model.box_head.dense2.bias.zero_()
    model.save_pretrained(folder)
    processor = Owlv2Processor(
        image_processor=Owlv2ImageProcessor(size={"height": SIDE, "width": SIDE}),
        tokenizer=CLIPTokenizer.from_pretrained(folder),
    )
    processor.save_pretrained(folder)
    return folder


def write_tiny_dinov2(folder: Path, seed: int = 0) -> Path:
    """A tiny random DINOv2 (hidden size 32, 32 px input) with the image processor DINOv2's hub
    repositories name (``BitImageProcessor``: shortest side, then the middle cropped)."""
    import torch
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    config = Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2, image_size=32, patch_size=8
    )
    Dinov2Model(config).eval().save_pretrained(folder)
    BitImageProcessor(
        size={"shortest_edge": 36},
        crop_size={"height": 32, "width": 32},
        do_center_crop=True,
        resample=3,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    ).save_pretrained(folder)
    return folder
