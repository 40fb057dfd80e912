"""A real CLIP byte-level BPE tokenizer written in code, for the tiny models built without a download.

The ``tiny`` Stable Diffusion presets (``sd_models``) and the test suite's tiny CLIP need a
tokenizer whose files are the ones a hub snapshot holds (``vocab.json``, ``merges.txt``, the
special-token and tokenizer configs), so that ``CLIPTokenizer.from_pretrained`` and diffusers'
own scripts load them by path. The vocabulary is every byte (alone and word-final), a few merged
words (so the BPE step really merges) and the two special tokens: about 560 entries.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

#: Words whose letters get merged into whole-word tokens, so the tokenizer has real merges to apply
#: (a vocabulary of single bytes would never exercise the BPE step).
DEFAULT_WORDS = (
    "a",
    "photo",
    "of",
    "the",
    "cat",
    "dog",
    "man",
    "woman",
    "on",
    "stage",
    "rocket",
    "coffee",
    "cup",
)

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"


def bytes_to_unicode() -> dict[int, str]:
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


def tiny_clip_vocab(words: Iterable[str] = DEFAULT_WORDS) -> tuple[dict[str, int], list[str]]:
    """A CLIP-style vocabulary (every byte, alone and word-final with ``</w>``, merged word pieces,
    then the two special tokens) and its merge list, in merge order."""
    alphabet = list(bytes_to_unicode().values())
    tokens = alphabet + [c + "</w>" for c in alphabet]
    merges: list[str] = []
    for word in words:
        pieces = [*word[:-1], word[-1] + "</w>"]
        while len(pieces) > 1:
            merge = f"{pieces[0]} {pieces[1]}"
            joined = pieces[0] + pieces[1]
            if merge not in merges:
                merges.append(merge)
                if joined not in tokens:
                    tokens.append(joined)
            pieces = [joined, *pieces[2:]]
    tokens += [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}, merges


def write_clip_tokenizer(
    folder: Path, *, model_max_length: int = 77, words: Iterable[str] = DEFAULT_WORDS, pad_token: str = EOS
) -> dict[str, int]:
    """Write a CLIP tokenizer's files into ``folder`` (created) and return its vocabulary, so the
    caller can size the text model's embedding table and special-token ids from it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = tiny_clip_vocab(words)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS}
    (folder / "special_tokens_map.json").write_text(
        json.dumps({**special, "pad_token": pad_token}), encoding="utf-8"
    )
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "CLIPTokenizer",
                "model_max_length": model_max_length,
                "pad_token": pad_token,
                "do_lower_case": True,
                **special,
            }
        ),
        encoding="utf-8",
    )
    return vocab


def clip_text_config(
    vocab: dict[str, int], hidden: int = 32, *, projection_dim: int | None = None, max_positions: int = 77
) -> Any:
    """The config of a tiny CLIP text tower over ``vocab`` (two layers of four heads, an MLP twice
    ``hidden`` wide, the vocabulary's special tokens), so every tiny model sizes its text encoder
    one way: the presets' encoders (``projection_dim`` for the ones with a projection, as SDXL's
    and SD3's second encoder) and the test suite's tiny CLIP (its 32 positions)."""
    from transformers import CLIPTextConfig  # lazy: transformers takes 0.56 s to import

    return CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=max_positions,
        bos_token_id=vocab[BOS],
        eos_token_id=vocab[EOS],
        pad_token_id=vocab[EOS],
        hidden_act="quick_gelu",
        **({"projection_dim": projection_dim} if projection_dim else {}),
    )
