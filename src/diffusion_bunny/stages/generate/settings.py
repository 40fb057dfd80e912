"""Stage 08's settings (``generate``): the grid of prompts, seeds, scales and checkpoints.

Read by the configuration (:mod:`diffusion_bunny.config`) on every command, so it imports
nothing heavier than pydantic.
"""

from __future__ import annotations

import re
import string
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from diffusion_bunny.section import MAX_SEED, YES_NO_FOR_A_NUMBER, Section, multiple_of_eight

#: The placeholders a generation prompt template may use.
PROMPT_FIELDS = ("trigger", "character")


class GenerateSettings(Section):
    """Settings of stage 08 (``generate``): a grid of images per character (prompts x seeds x LoRA
    scales x checkpoints), scored by face identity and, where configured, CLIP."""

    prompts: tuple[str, ...] = (
        "{trigger} {character}, close-up portrait",
        "{trigger} {character}, full body",
    )
    negative_prompt: str = ""
    trigger_word: str | None = None
    characters: tuple[str, ...] | None = None
    seeds: tuple[int, ...] = (0, 1)
    #: LoRA strengths drawn; 0 is the base model alone. Only 0: no LoRA is read, so stage 08 runs
    #: before anything was trained (what the base model makes of the prompts).
    lora_scales: tuple[float, ...] = (0.0, 0.5, 1.0)
    checkpoints: Literal["all", "final"] | tuple[str, ...] = "all"
    steps: int = Field(20, ge=1, le=1000)
    #: Images drawn in one pipeline call (same checkpoint and LoRA scale). Each denoising step then
    #: runs once for the batch: much faster on a CPU and for small models; on a GPU it needs the
    #: batch's activations in memory (a 1024 px SDXL or FLUX.1 batch of 8 does not fit 24 GB).
    #: None: 8 for the built-in tiny presets, 1 for a real model.
    batch_size: int | None = Field(None, ge=1, le=64)
    guidance_scale: float | None = Field(None, ge=0.0, le=50.0)
    max_sequence_length: int | None = Field(None, ge=8, le=512)
    resolution: int | None = Field(None, ge=64, le=4096)
    base_model: str | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    clip_model: str | None = None

    @field_validator("prompts")
    @classmethod
    def _prompt_templates(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("give at least one prompt template, e.g. '{trigger} {character}, portrait'")
        for template in value:
            try:
                parsed = [(f, spec, conv) for _, f, spec, conv in string.Formatter().parse(template)]
            except ValueError as exc:
                raise ValueError(f"prompt {template!r} is not a valid template ({exc})") from None
            fields = [f for f, _, _ in parsed if f is not None]
            # "{character!r}" put quotes into every prompt, "{character:>20}" spaces.
            shaped = [f for f, spec, conv in parsed if f is not None and (spec or conv)]
            if shaped:
                raise ValueError(
                    f"prompt {template!r} shapes {{{shaped[0]}}} (a '!' or ':' after its name); write "
                    f"{{{shaped[0]}}} alone"
                )
            unknown = [f for f in fields if f not in PROMPT_FIELDS]
            if unknown:
                raise ValueError(
                    f"prompt {template!r} uses {{{unknown[0]}}}; the placeholders are {{trigger}} and "
                    "{character}"
                )
        return value

    @field_validator("seeds", "lora_scales", "characters")
    @classmethod
    def _non_empty_unique(cls, value: tuple[Any, ...] | None, info: ValidationInfo) -> tuple[Any, ...] | None:
        # A character named twice drew, scored and counted each of its pictures twice; an unset
        # or empty list of characters is judged by _some_characters.
        if not value and info.field_name == "characters":
            return value
        if not value:
            raise ValueError("must list at least one value")
        if len(set(value)) != len(value):
            raise ValueError("lists a value twice")
        return value

    @field_validator("seeds")
    @classmethod
    def _seeds_non_negative(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if any(not 0 <= s <= MAX_SEED for s in value):
            raise ValueError(f"seeds must lie between 0 and {MAX_SEED}")
        return value

    @field_validator("characters")
    @classmethod
    def _some_characters(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        # An empty list drew a grid of nothing and then failed on its empty table.
        if value is not None and not value:
            raise ValueError("list at least one character, or leave it unset (null) for every named one")
        return value

    @model_validator(mode="before")
    @classmethod
    def _names_joined_in_one_text(cls, data: Any) -> Any:
        # `--set generate.characters=alice,bob` is one text, taken as a list of one: refused only
        # at stage 08, after the training, as no character of the run. A name in a list may hold
        # a comma (a folder `Doe, Jane`); one text with a comma is two names run together.
        joined = data.get("characters") if isinstance(data, dict) else None
        if isinstance(joined, str) and "," in joined:
            names = ", ".join(part.strip() for part in joined.split(","))
            raise PydanticCustomError(  # the keyed refusal config's line names the key from
                YES_NO_FOR_A_NUMBER,
                "{key} = {value}: {refusal}",
                {"key": "characters", "value": joined, "refusal": f"one character per item: write [{names}]"},
            )
        return data

    @field_validator("resolution")
    @classmethod
    def _multiple_of_eight(cls, value: int | None) -> int | None:
        return multiple_of_eight(value)

    @field_validator("lora_scales")
    @classmethod
    def _scales_in_range(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if any(not -4.0 <= s <= 4.0 for s in value):
            raise ValueError(
                "LoRA scales must lie between -4 and 4 (0: the base model, 1: the LoRA as trained)"
            )
        return value

    @field_validator("checkpoints", mode="before")
    @classmethod
    def _checkpoint_names(cls, value: Any) -> Any:
        # One clear message instead of pydantic's one per member of the union.
        if value in ("all", "final"):
            return value
        if isinstance(value, list | tuple) and value:
            names = []
            for item in value:
                name = f"checkpoint-{item}" if isinstance(item, int) and not isinstance(item, bool) else item
                if not isinstance(name, str) or not (
                    name == "final" or re.fullmatch(r"checkpoint-\d+", name)
                ):
                    raise ValueError(
                        f"unknown checkpoint {item!r}: list 'final', 'checkpoint-<step>' or training steps"
                    )
                names.append(name)
            return tuple(names)
        raise ValueError(
            "must be 'all', 'final' or a list of checkpoints ('checkpoint-<step>', 'final' or steps)"
        )
