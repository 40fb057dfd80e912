"""A real T5 (SentencePiece-Unigram) tokenizer written in code with the ``tokenizers`` library.

The ``tiny-flux`` and ``tiny-sd3`` presets need a T5 tokenizer whose folder
``T5TokenizerFast.from_pretrained`` (what FluxPipeline / StableDiffusion3Pipeline and diffusers'
example scripts call) loads without a download and without ``sentencepiece``: a ``tokenizer.json``
holding a Unigram model plus a ``tokenizer_config.json``.

transformers 5 quirk (measured): ``T5Tokenizer`` (= ``T5TokenizerFast``) has its own ``__init__``,
so ``from_pretrained`` takes only the *vocabulary*, post-processor, padding and truncation from
tokenizer.json and rebuilds the normaliser / pre-tokeniser itself (WhitespaceSplit + Metaspace).
The model in the file must therefore be a Unigram (a WordLevel vocabulary is handed to Unigram
and fails), and ``extra_ids`` must be 0 or the class appends 100 ``<extra_id_N>`` tokens past the
vocabulary (ids the tiny T5's embedding table would not have).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from diffusion_bunny.models.tiny_clip import DEFAULT_WORDS

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"
SPACE = "\u2581"  # SentencePiece's word-start marker
ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789,.;:-'!?()"


def tiny_t5_pieces(words: Iterable[str] = DEFAULT_WORDS) -> list[tuple[str, float]]:
    """(piece, log probability) in id order: pad 0, eos 1, unk 2 (T5's ids), the bare word
    marker, whole words (likelier than their letters, so Unigram prefers them), then every
    character alone and word-initial."""
    pieces: list[tuple[str, float]] = [(PAD, 0.0), (EOS, 0.0), (UNK, 0.0), (SPACE, -2.0)]
    seen = {p for p, _ in pieces}
    for i, word in enumerate(dict.fromkeys(words)):
        piece = SPACE + word
        if piece not in seen:
            pieces.append((piece, -4.0 - 0.01 * i))
            seen.add(piece)
    for ch in ALPHABET:
        for piece, score in ((ch, -10.0), (SPACE + ch, -10.5)):
            if piece not in seen:
                pieces.append((piece, score))
                seen.add(piece)
    return pieces


def write_t5_tokenizer(
    folder: Path, *, model_max_length: int = 512, words: Iterable[str] = DEFAULT_WORDS
) -> int:
    """Write ``tokenizer.json`` + ``tokenizer_config.json`` of a T5 tokenizer into ``folder``;
    returns the vocabulary size (the T5 encoder's ``vocab_size``)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pieces = tiny_t5_pieces(words)
    tok = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="always"),
        ]
    )
    tok.decoder = decoders.Metaspace(replacement=SPACE, prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single=["$A", EOS], pair=["$A", EOS, "$B", EOS], special_tokens=[(EOS, 1)]
    )
    tok.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "T5Tokenizer",
        "model_max_length": model_max_length,
        "eos_token": EOS,
        "unk_token": UNK,
        "pad_token": PAD,
        "extra_ids": 0,
        "additional_special_tokens": [],
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return len(pieces)
