"""Stage 06's settings (``export``): crops, balance, split and the files written.

Read by the configuration (:mod:`diffusion_bunny.config`) on every command, so it imports
nothing heavier than pydantic.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from diffusion_bunny.section import Section


class ExportSettings(Section):
    """Settings of stage 06 (``export``): which crops, how the training set is balanced and split,
    and how the images are written (Hugging Face imagefolder + kohya folders)."""

    crops: tuple[Literal["full", "face", "half_body", "character"], ...] = ("full", "face", "character")
    face_margin: float = Field(0.5, ge=0.0, le=5.0)
    #: A drawn character's crop: its box with this share of its size added on every side.
    character_margin: float = Field(0.1, ge=0.0, le=5.0)
    #: Widest (or tallest) a character crop may be, width over height or height over width; a
    #: longer box gets more of the frame on its short sides.
    character_max_aspect: float = Field(2.0, ge=1.0, le=4.0)
    #: A character crop the trainer would enlarge more than max_upscale times takes in more of
    #: the frame around the character, its side up to this many times the framed box's, before
    #: it is left out as upscaled (1: never widened).
    character_max_context: float = Field(2.0, ge=1.0, le=8.0)
    #: The side the trainer sees pictures at; a face or character crop it would enlarge more than
    #: max_upscale times is left out (null: no limit).
    crop_resolution: int = Field(512, ge=32, le=8192)
    max_upscale: float | None = Field(2.0, ge=1.0, le=64.0)
    #: A face or character crop whose sharpness is under this share of the median of the named
    #: appearances of its kind in the movie is out of focus: left out.
    min_sharpness_ratio: float = Field(0.3, ge=0.0, le=1.0)
    half_body_face_heights: float = Field(4.0, ge=2.0, le=20.0)  # under 2 it is a face crop: none made
    half_body_aspect: float = Field(0.75, ge=0.25, le=4.0)
    min_face_px: int = Field(64, ge=0, le=4096)
    face_tag: str = "close-up"
    half_body_tag: str = "upper body"
    character_tag: str = ""
    include_unnamed: bool = True
    unnamed_concept: str = "scene"
    balance: bool = True
    base_repeats: int = Field(1, ge=1, le=1000)
    max_repeats: int = Field(10, ge=1, le=1000)
    validation_fraction: float = Field(0.1, ge=0.0, le=0.5)
    split_phash_distance: int | None = Field(10, ge=0, le=64)
    seed: int = Field(0, ge=0)
    max_side: int = Field(1024, ge=64, le=8192)
    image_format: Literal["jpg", "png", "webp"] = "jpg"
    jpeg_quality: int = Field(95, ge=1, le=100)
    metadata_format: Literal["parquet", "jsonl"] = "parquet"
    kohya: bool = True
    # Shot clips for a video LoRA; off by default: see stages/export/clips.py.
    video_clips: bool = False
    clip_fps: float = Field(16.0, gt=0.0, le=60.0)
    clip_frames: int = Field(33, ge=1, le=257)
    clip_width: int = Field(512, ge=64, le=2048)
    clip_height: int = Field(320, ge=64, le=2048)

    @field_validator("clip_frames")
    @classmethod
    def _clip_frames_4n_plus_1(cls, value: int) -> int:
        # Wan and HunyuanVideo compress 4 frames per latent after the first: 4n+1 frames.
        if value % 4 != 1:
            raise ValueError("must be 4n+1 frames (e.g. 17, 33, 49, 81), as Wan/HunyuanVideo need")
        return value

    @field_validator("clip_width", "clip_height")
    @classmethod
    def _clip_side_multiple_of_16(cls, value: int) -> int:
        if value % 16:
            raise ValueError("must be a multiple of 16 (the video VAE's and patch's stride)")
        return value

    @field_validator("crops")
    @classmethod
    def _crops_listed_once(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("list at least one crop: full, face, half_body or character")
        if len(set(value)) != len(value):
            raise ValueError("each crop may be listed once")
        return value

    @field_validator("face_tag", "half_body_tag", "character_tag")
    @classmethod
    def _tag_one_line(cls, value: str) -> str:
        if "\n" in value or "," in value:
            raise ValueError("must be one short phrase without commas or line breaks ('' adds nothing)")
        return value.strip()

    @field_validator("unnamed_concept")
    @classmethod
    def _concept_is_a_folder_name(cls, value: str) -> str:
        if not re.fullmatch(r"[\w][\w .'-]{0,63}", value.strip()):
            raise ValueError(
                "must be usable as a folder name: letters, digits, spaces, '.', \"'\", '-' or '_' "
                "(at most 64, not starting with a symbol)"
            )
        return value.strip()

    @model_validator(mode="after")
    def _repeats_window(self) -> ExportSettings:
        if self.max_repeats < self.base_repeats:
            raise ValueError(
                f"max_repeats ({self.max_repeats}) must be at least base_repeats ({self.base_repeats})"
            )
        return self
