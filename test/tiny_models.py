"""Tiny models built in code, so tests exercise the real loading code without any download.

A tiny CLIP here is a real ``CLIPModel`` (random, seeded weights; hidden size 32, two layers,
32x32 images) saved with ``save_pretrained`` next to a real byte-level BPE tokenizer and an image
processor config: the same files a hub snapshot of ``openai/clip-vit-base-patch32`` holds, only
small. ``make_embedder`` then loads the folder exactly as it would load a user's model.
"""

from __future__ import annotations

import json
from pathlib import Path

#: Words whose letters get merged into whole-word tokens, so the tokenizer has real merges to apply
#: (a vocabulary of single bytes would never exercise the BPE step).
_WORDS = ("a", "photo", "of", "the", "cat", "dog", "man", "woman", "on", "stage", "rocket", "coffee", "cup")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable characters (the BPE alphabet)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    keep += list(range(ord("®"), ord("ÿ") + 1))
    chars = keep[:]
    n = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(keep, (chr(c) for c in chars), strict=True))


def tiny_clip_vocab() -> tuple[dict[str, int], list[str]]:
    """A CLIP-style vocabulary (every byte, alone and word-final with ``</w>``, merged word pieces,
    then the two special tokens) and its merge list, in merge order."""
    alphabet = list(_bytes_to_unicode().values())
    tokens = alphabet + [c + "</w>" for c in alphabet]
    merges: list[str] = []
    for word in _WORDS:
        pieces = [*word[:-1], word[-1] + "</w>"]
        while len(pieces) > 1:
            merge = f"{pieces[0]} {pieces[1]}"
            joined = pieces[0] + pieces[1]
            if merge not in merges:
                merges.append(merge)
                if joined not in tokens:
                    tokens.append(joined)
            pieces = [joined, *pieces[2:]]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def write_tiny_clip(folder: Path, seed: int = 0) -> Path:
    """Write a tiny random CLIP (model, tokenizer, image processor) into ``folder`` and return it."""
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = tiny_clip_vocab()
    bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
    text = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=32,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=eos,
    )
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

    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    (folder / "special_tokens_map.json").write_text(
        json.dumps({**special, "pad_token": "<|endoftext|>"}), encoding="utf-8"
    )
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "CLIPTokenizer",
                "model_max_length": 32,
                "pad_token": "<|endoftext|>",
                "do_lower_case": True,
                **special,
            }
        ),
        encoding="utf-8",
    )
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
