"""Layered, validated configuration.

Layers, later wins: the defaults below (mirrored, with comments, in ``config/main.yaml``), then
``config/main.yaml`` itself, then ``config/local_*.yaml`` (git-ignored, written by widgets), then an
explicit ``--config FILE``, then ``--set section.key=value`` overrides (papermill passes the same
overrides dict). Secrets never live here: they come from the environment or ``.env``.

The merged dict is validated into frozen pydantic models with ``extra="forbid"`` so that a typo
is an error that names the key instead of a setting silently ignored.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from diffusion_bunny.errors import ConfigError
from diffusion_bunny.models.fitted import FittedSettings
from diffusion_bunny.models.hub_characters import HubCharacterSettings

VIDEO_EXTENSIONS = (
    ".mp4",
    ".m4v",
    ".mkv",
    ".mov",
    ".avi",
    ".webm",
    ".mpg",
    ".mpeg",
    ".ts",
    ".wmv",
    ".flv",
)

# Each PySceneDetect detector measures something different, so each has its own default and range.
# ``transnetv2`` and ``cascade`` use ``transnetv2_threshold`` and the ``candidate_*`` keys instead.
DETECTOR_THRESHOLDS: dict[str, tuple[float, float, float]] = {
    # name: (default, minimum, maximum)
    "content": (27.0, 0.0, 255.0),
    "adaptive": (3.0, 0.0, 255.0),
    "threshold": (12.0, 0.0, 255.0),
    "hash": (0.35, 0.0, 1.0),
    "histogram": (0.20, 0.0, 1.0),
}


# Stage 02's brightness rules (see QualityConfig and stages/quality/rules.py): a film whose median
# frame brightness is REFERENCE_BRIGHTNESS gets min_brightness and max_brightness as they are; a
# darker or brighter film moves them with its median, never past the absolute BLACK_FLOOR and
# WHITE_CEILING. Measured in python_script/calibrate_quality.py (memory_bank/progress.md).
REFERENCE_BRIGHTNESS = 100.0
# The cascade's contrast scaling: around a candidate whose shots' contrast (standard deviation of
# gray on the 48x27 copy, 0-128) is under this, the absolute thresholds scale with it (see
# stages/extract/detectors/cascade.py).
REFERENCE_SHOT_CONTRAST = 30.0
# Stage 02's relative sharpness: a film whose median frame contrast (standard deviation of gray,
# 0-128) is REFERENCE_CONTRAST or more gets min_sharpness as it is; a flatter film (a night grade)
# scales it by the square of its contrast over this (see quality/rules.py).
REFERENCE_CONTRAST = 40.0
BLACK_FLOOR = 10.0
WHITE_CEILING = 245.0
#: Width in pixels of the copy of the picture the text detector looks at.
TEXT_WIDTH = 480

#: Sections renamed: old name -> new name. The old name still loads (any YAML layer, ``--set``),
#: mapped to the new one with a warning; the same key under both names in one layer is an error.
SECTION_ALIASES = {"filtering": "quality"}
#: Renamed settings, (section, old key) -> new key: an old config still loads, with one warning.
KEY_ALIASES = {("characters", "model"): "detector"}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class RunConfig(_Section):
    """Settings of a whole run, shared by every stage."""

    output_dir: str = "data/output"
    seed: int = Field(0, ge=0)
    video_extensions: tuple[str, ...] = VIDEO_EXTENSIONS
    kernel: str = "python3"


class ExtractionConfig(_Section):
    """Settings of stage 01 (decode, shot detection, keyframe choice)."""

    method: Literal["shots", "interval", "keyframe"] = "shots"
    detector: Literal["cascade", "transnetv2", "content", "adaptive", "threshold", "hash", "histogram"] = (
        "cascade"
    )
    threshold: float | None = None
    transnetv2_threshold: float = Field(0.5, gt=0.0, lt=1.0)
    candidate_threshold: float = Field(10.0, ge=0.0, le=255.0)
    candidate_ratio: float = Field(2.0, ge=1.0, le=100.0)
    gradual_threshold: float = Field(10.0, ge=0.0, le=255.0)
    accept_threshold: float | None = Field(40.0, ge=0.0, le=255.0)
    accept_colour_threshold: float | None = Field(0.15, ge=0.0, le=1.0)
    reference_contrast: float | None = Field(REFERENCE_SHOT_CONTRAST, gt=0.0, le=128.0)
    transnetv2_unsure: float = Field(0.25, ge=0.0, lt=1.0)
    motion_compensation: bool = True
    device: Literal["auto", "cpu", "cuda"] = "auto"
    runtime: Literal["auto", "onnx", "torch"] = "auto"
    transnetv2_precision: Literal["int8", "fp32"] = "int8"
    min_shot_seconds: float = Field(0.5, ge=0.0, le=60.0)
    analysis_width: int = Field(256, ge=32, le=1920)
    detect_width: int = Field(128, ge=32, le=1920)
    thumb_width: int = Field(320, ge=32, le=1920)
    motion_threshold: float = Field(1.0, ge=0.0, le=255.0)
    keyframe_window_seconds: float = Field(0.5, gt=0.0, le=30.0)
    #: A shot longer than this also keeps a frame of every stretch this long its other keyframes
    #: leave out (null: none).
    keyframe_gap_seconds: float | None = Field(4.0, gt=0.0, le=3600.0)
    interval_seconds: float = Field(2.0, gt=0.0, le=3600.0)
    jpeg_quality: int = Field(95, ge=1, le=100)
    picture_box: Literal["auto", "off"] = "auto"
    deinterlace: Literal["auto", "on", "off"] = "auto"

    @model_validator(mode="after")
    def _threshold_in_detector_range(self) -> ExtractionConfig:
        if self.threshold is not None and self.detector not in DETECTOR_THRESHOLDS:
            raise ValueError(
                f"threshold applies to the PySceneDetect detectors only; detector '{self.detector}' "
                "uses transnetv2_threshold (and candidate_threshold, gradual_threshold for cascade)"
            )
        if self.threshold is not None:
            _, low, high = DETECTOR_THRESHOLDS[self.detector]
            if not low <= self.threshold <= high:
                raise ValueError(
                    f"threshold {self.threshold} is out of range for detector "
                    f"'{self.detector}': allowed {low} to {high}, or null for the default "
                    f"({DETECTOR_THRESHOLDS[self.detector][0]})"
                )
        return self

    @property
    def uses_transnetv2(self) -> bool:
        """Whether the detector needs the TransNetV2 model."""
        return self.detector in ("transnetv2", "cascade")

    @property
    def effective_threshold(self) -> float:
        """The threshold in force: the configured one, or the detector's own default (for
        ``transnetv2`` and ``cascade``: the model's ``transnetv2_threshold``)."""
        if self.uses_transnetv2:
            return self.transnetv2_threshold
        if self.threshold is None:
            return DETECTOR_THRESHOLDS[self.detector][0]
        return self.threshold


class QualityConfig(_Section):
    """Thresholds of stage 02 (``quality``), applied to scores computed once per frame (the
    section was called ``filtering`` before; that name still loads, with a warning)."""

    min_sharpness: float = Field(50.0, ge=0.0, le=100_000.0)
    min_brightness: float = Field(35.0, ge=0.0, le=255.0)
    max_brightness: float = Field(230.0, ge=0.0, le=255.0)
    max_clipped: float = Field(0.6, ge=0.0, le=1.0)
    relative_brightness: bool = True
    reference_brightness: float = Field(REFERENCE_BRIGHTNESS, gt=0.0, lt=255.0)
    black_floor: float = Field(BLACK_FLOOR, ge=0.0, le=255.0)
    white_ceiling: float = Field(WHITE_CEILING, ge=0.0, le=255.0)
    relative_sharpness: bool = True
    reference_contrast: float = Field(REFERENCE_CONTRAST, gt=0.0, le=128.0)
    dup_distance: int = Field(4, ge=0, le=64)
    batch: Literal["shot"] | int = "shot"
    best_per_batch: int | None = Field(None, ge=1)
    text_filter: bool = True
    subtitles: Literal["crop", "drop", "keep"] = "crop"
    text_width: int = Field(TEXT_WIDTH, ge=64, le=4096)
    max_text_share: float = Field(0.5, ge=0.0, le=1.0)
    max_text_area: float = Field(0.2, ge=0.0, le=1.0)
    subtitle_band: float = Field(0.25, gt=0.0, le=0.5)
    min_crop_height: float = Field(0.6, ge=0.0, le=1.0)

    @field_validator("batch", mode="before")
    @classmethod
    def _batch_is_shot_or_positive(cls, value: Any) -> Any:
        # One clear message instead of pydantic's two (one per member of the union).
        if value == "shot" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            return value
        raise ValueError("must be 'shot' or a positive number of consecutive frames")

    @model_validator(mode="after")
    def _brightness_window(self) -> QualityConfig:
        if self.min_brightness >= self.max_brightness:
            raise ValueError(
                f"min_brightness ({self.min_brightness}) must be under max_brightness ({self.max_brightness})"
            )
        if self.black_floor > self.min_brightness:
            raise ValueError(
                f"black_floor ({self.black_floor}) must not exceed min_brightness ({self.min_brightness})"
            )
        if self.white_ceiling < self.max_brightness:
            raise ValueError(
                f"white_ceiling ({self.white_ceiling}) must be at least max_brightness "
                f"({self.max_brightness})"
            )
        return self


#: The former name of :class:`QualityConfig` (notebooks written before the rename import it).
FilteringConfig = QualityConfig


class CharactersConfig(_Section):
    """Settings of stage 03 (``characters``): face detection, encodings, naming and tracks."""

    reference_dir: str | None = None
    frames: Literal["kept", "all"] = "kept"
    detector: Literal["hog", "cnn", "mediapipe", "mtcnn", "centerface"] = "centerface"
    min_score: float | None = Field(None, ge=0.0, le=1.0)
    align: Literal["dlib", "detector"] = "dlib"
    #: Stretch the searched copy's brightness between its 1st and 99.5th percentiles first
    #: (low-key stage and night frames; python_script/eval_faces.py).
    auto_levels: bool = True
    #: MTCNN's image pyramid: each level this much smaller than the one before (facenet-pytorch's
    #: own 0.709 skips more face sizes; finer costs time, measured in eval_faces.py).
    scale_step: float = Field(0.76, ge=0.5, le=0.95)
    #: Where MTCNN's pyramid starts, in multiples of min_face_px (lower finds more small faces, slower).
    pyramid_start: float = Field(1.1, ge=0.5, le=4.0)
    #: MTCNN scores a face on its crop and the crop mirrored (fewer false faces at one threshold).
    mirror_score: bool = True
    detect_width: int = Field(640, ge=0, le=8192)
    upsample: int = Field(1, ge=0, le=4)
    num_jitters: int = Field(1, ge=1, le=100)
    landmarks: Literal["large", "small"] = "large"
    min_face_px: int = Field(30, ge=0, le=4096)
    trust_min_px: int = Field(48, ge=0, le=4096)
    trust_max_yaw: float = Field(0.6, gt=0.0, le=2.0)
    tolerance: float = Field(0.6, gt=0.0, le=2.0)
    adaptive_thresholds: bool = True
    min_threshold: float = Field(0.45, gt=0.0, le=2.0)
    threshold_margin: float = Field(0.1, ge=0.0, le=1.0)
    low_confidence_margin: float = Field(0.05, ge=0.0, le=1.0)
    track_distance: float = Field(0.5, gt=0.0, le=2.0)
    track_iou: float = Field(0.0, ge=0.0, le=1.0)
    cluster_threshold: float = Field(0.5, gt=0.0, le=2.0)
    workers: int = Field(0, ge=0, le=256)
    #: What finds drawn and animated characters: ``offline`` (a detector fitted at run time to the
    #: references, nothing downloaded) or ``hub`` (OWLv2 and a features model from the Hugging
    #: Face hub, ``characters.hub``; it also finds characters nobody gave pictures of).
    backend: Literal["offline", "hub"] = "offline"
    #: The detector fitted to the pictures of drawn and animated characters (models/fitted).
    fitted: FittedSettings = FittedSettings()
    #: The hub's models, read only with ``backend: hub`` (models/hub_characters/).
    hub: HubCharacterSettings = HubCharacterSettings()
    #: Two sightings of a drawn character in consecutive sampled frames of a shot are one track
    #: when their features (unit length) are within this distance.
    drawn_track_distance: float = Field(0.8, gt=0.0, le=2.0)

    @model_validator(mode="after")
    def _threshold_window(self) -> CharactersConfig:
        if self.min_threshold > self.tolerance:
            raise ValueError(
                f"min_threshold ({self.min_threshold}) must not exceed tolerance ({self.tolerance})"
            )
        return self


class ScenesConfig(_Section):
    """Settings of stage 04 (``scenes``): scene embeddings, two-level clustering, the adapter
    learned from a person's corrections, and the shared library of clusters."""

    embedder: Literal["descriptor", "clip"] = "descriptor"
    clip_model: str = "openai/clip-vit-base-patch32"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    batch_size: int = Field(32, ge=1, le=4096)
    frames: Literal["kept", "all"] = "kept"
    assign_threshold: float = Field(0.85, gt=-1.0, le=1.0)
    noise_threshold: float = Field(0.5, ge=-1.0, lt=1.0)
    index_min_frames: int = Field(50_000, ge=0, le=100_000_000)
    library_dir: str | None = None
    adapter: Literal["auto", "off"] = "auto"
    adapter_hidden: int = Field(0, ge=0, le=4096)
    adapter_epochs: int = Field(300, ge=1, le=100_000)
    adapter_lr: float = Field(0.01, gt=0.0, le=10.0)
    adapter_margin: float = Field(0.2, gt=0.0, le=2.0)
    adapter_identity_weight: float = Field(1.0, ge=0.0, le=1000.0)
    seed: int = Field(0, ge=0)
    board_max_thumbs: int = Field(120, ge=1, le=100_000)

    @model_validator(mode="after")
    def _threshold_order(self) -> ScenesConfig:
        if self.noise_threshold >= self.assign_threshold:
            raise ValueError(
                f"noise_threshold ({self.noise_threshold}) must be under assign_threshold "
                f"({self.assign_threshold})"
            )
        return self


def _no_credentials_in_url(value: str | None) -> str | None:
    """A base URL must not carry ``user:token@``: it would be written into manifests and notebook
    parameters. Keys belong in the environment (or ``.env``)."""
    if value:
        from urllib.parse import urlsplit

        try:
            parts = urlsplit(value)
            has_credentials = parts.username is not None or parts.password is not None
        except ValueError:
            has_credentials = "@" in value.split("/")[2] if value.count("/") >= 2 else False
        if has_credentials:
            raise ValueError(
                "must not carry credentials (user:token@host); remove them and put the key in the "
                "environment or .env (the provider's key variable)"
            )
    return value


class OpenAIProviderConfig(_Section):
    """The OpenAI chat API (key in ``OPENAI_API_KEY``)."""

    model: str = "gpt-4o-mini"
    base_url: str | None = None

    _base_url_clean = field_validator("base_url")(classmethod(lambda cls, v: _no_credentials_in_url(v)))


class AnthropicProviderConfig(_Section):
    """The Anthropic messages API (key in ``ANTHROPIC_API_KEY``)."""

    model: str = "claude-3-5-haiku-latest"
    base_url: str | None = None

    _base_url_clean = field_validator("base_url")(classmethod(lambda cls, v: _no_credentials_in_url(v)))


class LocalProviderConfig(_Section):
    """Any OpenAI-compatible server (vLLM, Ollama, llama.cpp, LM Studio) at ``base_url``."""

    model: str = "qwen2.5-vl-7b-instruct"
    base_url: str = "http://127.0.0.1:8000/v1"
    api_key_env: str = "LOCAL_LLM_API_KEY"

    _base_url_clean = field_validator("base_url")(classmethod(lambda cls, v: _no_credentials_in_url(v)))


class BedrockProviderConfig(_Section):
    """AWS Bedrock's Converse API through boto3 (credentials from the environment or a profile)."""

    model_id: str = "anthropic.claude-3-5-sonnet-20240620-v1:0"
    region: str | None = None
    profile: str | None = None


class CaptioningConfig(_Section):
    """Settings of stage 05 (``captions``): which provider writes the captions, how hard it may be
    called, and how the offline template describes a frame."""

    provider: Literal["template", "bedrock", "openai", "anthropic", "local"] = "template"
    fallback: list[Literal["template", "bedrock", "openai", "anthropic", "local"]] = []
    trigger_word: str = Field("bunnystyle", min_length=1, max_length=64)
    frames: Literal["kept", "all"] = "kept"
    concurrency: int = Field(4, ge=1, le=256)
    requests_per_minute: float = Field(60.0, gt=0.0, le=100_000.0)
    timeout_s: float = Field(60.0, gt=0.0, le=3600.0)
    max_retries: int = Field(4, ge=0, le=20)
    backoff_base_s: float = Field(1.0, ge=0.0, le=600.0)
    backoff_max_s: float = Field(30.0, ge=0.0, le=3600.0)
    breaker_failures: int = Field(5, ge=1, le=10_000)
    breaker_cooldown_s: float = Field(60.0, ge=0.0, le=86_400.0)
    max_tokens: int = Field(300, ge=16, le=8192)
    temperature: float = Field(0.2, ge=0.0, le=2.0)
    retry: list[Literal["empty", "refused", "truncated", "unparsable", "unreadable"]] = []
    max_paid_requests: int = Field(10_000, ge=0, le=10_000_000)
    image_max_side: int = Field(768, ge=64, le=4096)
    cache: bool = True
    cache_dir: str | None = None
    close_up_ratio: float = Field(0.3, gt=0.0, le=1.0)
    medium_ratio: float = Field(0.12, gt=0.0, le=1.0)
    dark_below: float = Field(60.0, ge=0.0, le=255.0)
    bright_above: float = Field(180.0, ge=0.0, le=255.0)
    scene_names: dict[str, str] = {}
    #: What a character is, said after its name in the template's captions ("a cartoon dog").
    character_descriptions: dict[str, str] = {}
    openai: OpenAIProviderConfig = OpenAIProviderConfig()
    anthropic: AnthropicProviderConfig = AnthropicProviderConfig()
    local: LocalProviderConfig = LocalProviderConfig()
    bedrock: BedrockProviderConfig = BedrockProviderConfig()

    @field_validator("trigger_word")
    @classmethod
    def _one_token(cls, value: str) -> str:
        if not value.strip() or value != value.strip():
            raise ValueError("must be a word without leading or trailing spaces")
        return value

    @model_validator(mode="after")
    def _orders(self) -> CaptioningConfig:
        if self.medium_ratio >= self.close_up_ratio:
            raise ValueError(
                f"medium_ratio ({self.medium_ratio}) must be under close_up_ratio ({self.close_up_ratio})"
            )
        if self.dark_below >= self.bright_above:
            raise ValueError(
                f"dark_below ({self.dark_below}) must be under bright_above ({self.bright_above})"
            )
        if self.backoff_max_s < self.backoff_base_s:
            raise ValueError(
                f"backoff_max_s ({self.backoff_max_s}) must be at least backoff_base_s "
                f"({self.backoff_base_s})"
            )
        return self

    def chain(self) -> list[str]:
        """The providers in the order they are tried: the chosen one, then the fallbacks."""
        out: list[str] = []
        for name in [self.provider, *self.fallback]:
            if name not in out:
                out.append(name)
        return out


class ExportConfig(_Section):
    """Settings of stage 06 (``export``): which crops, how the training set is balanced and split,
    and how the images are written (Hugging Face imagefolder + kohya folders)."""

    crops: tuple[Literal["full", "face", "half_body", "character"], ...] = ("full", "face", "character")
    face_margin: float = Field(0.5, ge=0.0, le=5.0)
    #: A drawn character's crop: its box with this share of its size added on every side.
    character_margin: float = Field(0.1, ge=0.0, le=5.0)
    #: Widest (or tallest) a character crop may be, width over height or height over width; a
    #: longer box gets more of the frame on its short sides.
    character_max_aspect: float = Field(2.0, ge=1.0, le=4.0)
    #: The side the trainer sees pictures at; a face or character crop it would enlarge more than
    #: max_upscale times is left out (null: no limit).
    crop_resolution: int = Field(512, ge=32, le=8192)
    max_upscale: float | None = Field(2.0, ge=1.0, le=64.0)
    #: A face or character crop whose sharpness is under this share of the median of the named
    #: appearances of its kind in the movie is out of focus: left out.
    min_sharpness_ratio: float = Field(0.3, ge=0.0, le=1.0)
    half_body_face_heights: float = Field(4.0, ge=1.5, le=20.0)
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
    # Shot clips for a video LoRA (issue 19 item 6); off by default: see stages/export/clips.py.
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
        import re

        if not re.fullmatch(r"[\w][\w .'-]{0,63}", value.strip()):
            raise ValueError(
                "must be usable as a folder name: letters, digits, spaces, '.', \"'\", '-' or '_' "
                "(at most 64, not starting with a symbol)"
            )
        return value.strip()

    @model_validator(mode="after")
    def _repeats_window(self) -> ExportConfig:
        if self.max_repeats < self.base_repeats:
            raise ValueError(
                f"max_repeats ({self.max_repeats}) must be at least base_repeats ({self.base_repeats})"
            )
        return self


class TrainingConfig(_Section):
    """Settings of stage 07 (``train``): a LoRA on the UNet (and optionally the text encoders) of a
    Stable Diffusion 1.x or SDXL base model, or on the transformer of a FLUX.1 or SD3.5 base model
    (the family is read from the model's config), on the dataset stage 06 exported.

    The keys from ``lora_targets`` to ``quantize_base`` apply to FLUX.1 and SD3.5 only (the
    flow-matching objective of diffusers' ``train_dreambooth_lora_{flux,sd3}.py``)."""

    base_model: str = "tiny"
    family: Literal["auto", "sd1", "sdxl", "flux", "sd3"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    resolution: int | None = Field(None, ge=64, le=4096)
    rank: int = Field(4, ge=1, le=1024)
    alpha: float = Field(4.0, gt=0.0, le=4096.0)
    learning_rate: float = Field(1e-4, gt=0.0, le=1.0)
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "constant"
    lr_warmup_steps: int = Field(0, ge=0, le=1_000_000)
    max_train_steps: int = Field(30, ge=1, le=10_000_000)
    train_batch_size: int = Field(2, ge=1, le=1024)
    gradient_accumulation_steps: int = Field(1, ge=1, le=1024)
    max_grad_norm: float = Field(1.0, gt=0.0, le=1000.0)
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "auto"
    gradient_checkpointing: bool = False
    cache_latents: bool = True
    buckets: bool = True
    min_snr_gamma: float | None = Field(None, gt=0.0, le=100.0)
    train_text_encoder: bool = False
    prior_preservation: bool = False
    class_prompt: str | None = None
    class_data_dir: str | None = None
    num_class_images: int = Field(8, ge=1, le=100_000)
    prior_loss_weight: float = Field(1.0, ge=0.0, le=100.0)
    checkpoint_every: int = Field(10, ge=1, le=10_000_000)
    keep_resumable: int = Field(1, ge=1, le=1_000_000)
    checkpoints_total_limit: int | None = Field(None, ge=1, le=10_000_000)
    validation_every: int = Field(15, ge=0, le=10_000_000)
    validation_prompts: tuple[str, ...] = ()
    validation_inference_steps: int = Field(8, ge=1, le=1000)
    output_dir: str | None = None
    start_over: bool = False
    tensorboard: bool = True
    seed: int = Field(0, ge=0)
    # FLUX.1 / SD3.5 only (see stages/train/flow.py)
    lora_targets: Literal["attention", "attention+mlp"] | tuple[str, ...] = "attention"
    weighting_scheme: Literal["logit_normal", "mode", "uniform", "sigma_sqrt", "cosmap"] = "logit_normal"
    logit_mean: float = Field(0.0, ge=-10.0, le=10.0)
    logit_std: float = Field(1.0, gt=0.0, le=10.0)
    mode_scale: float = Field(1.29, ge=0.0, le=10.0)
    timestep_shift: Literal["auto", "none"] | float = "auto"
    flux_guidance: float = Field(1.0, ge=0.0, le=100.0)
    caption_dropout: float = Field(0.0, ge=0.0, le=0.5)
    max_sequence_length: int | None = Field(None, ge=8, le=512)
    quantize_base: Literal["none", "nf4"] = "none"

    @field_validator("timestep_shift")
    @classmethod
    def _positive_shift(cls, value: Any) -> Any:
        if isinstance(value, float) and not value > 0:
            raise ValueError("a fixed timestep_shift must be > 0 (or auto / none)")
        return value

    @field_validator("lora_targets")
    @classmethod
    def _some_targets(cls, value: Any) -> Any:
        if isinstance(value, tuple) and not [v for v in value if str(v).strip()]:
            raise ValueError("give attention, attention+mlp or a non-empty list of layer names (to_q, ...)")
        return value

    @model_validator(mode="after")
    def _prior_needs_a_class_prompt(self) -> TrainingConfig:
        if self.prior_preservation and not (self.class_prompt or "").strip():
            raise ValueError("prior_preservation needs class_prompt (e.g. 'a photo of a person')")
        return self


#: The placeholders a generation prompt template may use.
PROMPT_FIELDS = ("trigger", "character")


class GenerationConfig(_Section):
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
        import string

        if not value:
            raise ValueError("give at least one prompt template, e.g. '{trigger} {character}, portrait'")
        for template in value:
            try:
                fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
            except ValueError as exc:
                raise ValueError(f"prompt {template!r} is not a valid template ({exc})") from None
            unknown = [f for f in fields if f not in PROMPT_FIELDS]
            if unknown:
                raise ValueError(
                    f"prompt {template!r} uses {{{unknown[0]}}}; the placeholders are {{trigger}} and "
                    "{character}"
                )
        return value

    @field_validator("seeds", "lora_scales")
    @classmethod
    def _non_empty_unique(cls, value: tuple[Any, ...]) -> tuple[Any, ...]:
        if not value:
            raise ValueError("must list at least one value")
        if len(set(value)) != len(value):
            raise ValueError("lists a value twice")
        return value

    @field_validator("seeds")
    @classmethod
    def _seeds_non_negative(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if any(s < 0 for s in value):
            raise ValueError("seeds must be 0 or more")
        return value

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


class ReportConfig(_Section):
    """Settings of stage 09 (``report``): the figures of the QA report and its contact sheets."""

    dpi: int = Field(100, ge=30, le=600)
    contact_sheet_faces: int = Field(24, ge=1, le=1000)
    dataset_sheet_pictures: int = Field(8, ge=1, le=1000)
    max_characters: int = Field(12, ge=1, le=1000)


class EngineConfig(_Section):
    """How ``bunny run`` processes the movies of a folder: one after another in this process
    (``local``) or as one Ray task per movie (``ray``). Not part of any stage's config hash, so
    switching engines never makes a stage stale."""

    kind: Literal["local", "ray"] = "local"
    address: str | None = None
    num_cpus: int | None = Field(None, ge=1, le=4096)
    cpus_per_movie: float = Field(1.0, gt=0.0, le=4096.0)
    object_store_mb: int = Field(256, ge=75, le=1_000_000)
    #: Seconds one movie's Ray task may take; None: from ``pipeline.stage_timeout_s`` (engine.task_timeout).
    task_timeout_s: float | None = Field(None, gt=0.0, le=366 * 86_400.0)


class PipelineConfig(_Section):
    """How any run behaves, whatever its stages: how long a stage notebook may take before it
    counts as hung, and when another machine's lock on a run folder counts as abandoned. Not part
    of any stage's config hash."""

    #: Seconds one stage notebook may run before its kernel is stopped: ``auto`` (scaled to the
    #: movie's length: :attr:`stage_timeout_base_s` + :attr:`stage_timeout_per_minute_s` per minute
    #: of movie, see ``runner.stage_timeout``), a number, or None (no limit). Why scaled: a fixed
    #: day let a hung stage on a two-minute clip sit for 24 h (and a Ray task nine days).
    stage_timeout_s: Literal["auto"] | Annotated[float, Field(gt=0.0, le=366 * 86_400.0)] | None = "auto"
    #: ``auto``: what any stage may take whatever the movie's length (a model's download, a
    #: training on a GPU).
    stage_timeout_base_s: float = Field(14_400.0, gt=0.0, le=366 * 86_400.0)
    #: ``auto``: and this many seconds per minute of movie (a paid caption provider at 60 requests a
    #: minute takes ~42 s for a minute's kept frames; the other stages a few seconds).
    stage_timeout_per_minute_s: float = Field(60.0, ge=0.0, le=86_400.0)
    #: Seconds without a heartbeat after which another host's lock on a run folder is taken over.
    lock_stale_s: float = Field(120.0, ge=10.0, le=86_400.0)


class Config(_Section):
    """The whole validated configuration."""

    run: RunConfig = RunConfig()
    extraction: ExtractionConfig = ExtractionConfig()
    quality: QualityConfig = QualityConfig()
    characters: CharactersConfig = CharactersConfig()
    scenes: ScenesConfig = ScenesConfig()
    captioning: CaptioningConfig = CaptioningConfig()
    export: ExportConfig = ExportConfig()
    training: TrainingConfig = TrainingConfig()
    generation: GenerationConfig = GenerationConfig()
    report: ReportConfig = ReportConfig()
    engine: EngineConfig = EngineConfig()
    pipeline: PipelineConfig = PipelineConfig()

    @property
    def filtering(self) -> QualityConfig:
        """The former name of :attr:`quality` (notebooks written before the rename read it)."""
        return self.quality

    def section_values(self, *declared: str) -> dict[str, Any]:
        """The values of whole sections (``quality``) and single keys (``run.seed``), as JSON:
        what a stage's manifest records of the settings it declared."""
        out: dict[str, Any] = {}
        for name in sorted(declared):
            section, _, key = name.partition(".")
            value = getattr(self, section).model_dump(mode="json")
            out[name] = value[key] if key else value
        return out

    def section_hash(self, *declared: str) -> str:
        """A stable hash of the declared sections and keys, so a stage reruns only when its own
        settings move."""
        blob = json.dumps(self.section_values(*declared), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def project_root() -> Path | None:
    """The checkout this package runs from (editable install), else the nearest parent of the
    working directory that holds ``config/main.yaml``; None when neither exists."""
    here = Path(__file__).resolve().parents[2]
    if (here / "config" / "main.yaml").is_file():
        return here
    for parent in [Path.cwd(), *Path.cwd().parents]:
        if (parent / "config" / "main.yaml").is_file():
            return parent
    return None


#: Set by the Ray engine for its tasks: the workspace of the head (``bunny run``'s machine), so a
#: relative setting (``training.output_dir``, ``run.output_dir``) means the same folder on every node.
WORKSPACE_ENV = "DIFFUSION_BUNNY_WORKSPACE"


def workspace_root() -> Path:
    """Where ``data/`` and ``config/local_*.yaml`` live: ``$DIFFUSION_BUNNY_WORKSPACE`` (a Ray task:
    the head's), else the checkout, else the working folder."""
    env = os.environ.get(WORKSPACE_ENV)
    if env:
        return Path(env)
    root = project_root()
    return root if root is not None else Path.cwd()


def output_root(cfg: Config) -> Path:
    """The folder that holds one run folder per movie (``run.output_dir``, relative to the
    workspace unless absolute)."""
    out = Path(cfg.run.output_dir)
    return out if out.is_absolute() else workspace_root() / out


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"config file {path} is not valid YAML{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, not {type(data).__name__}")
    return data


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_override(text: str) -> tuple[str, Any]:
    """Split ``section.key=value``; the value is read as YAML so numbers, booleans, null and
    lists keep their types (``--set extraction.threshold=30``)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or "." not in key or not all(key.split(".")):
        raise ConfigError(f"override '{text}' must look like section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key, value


def overrides_to_tree(overrides: dict[str, Any] | list[str] | None) -> dict[str, Any]:
    """Turn ``{"extraction.threshold": 30}`` or ``["extraction.threshold=30"]`` into nested dicts."""
    if not overrides:
        return {}
    pairs = (
        [parse_override(item) for item in overrides]
        if isinstance(overrides, list | tuple)
        else list(overrides.items())
    )
    tree: dict[str, Any] = {}
    for dotted, value in pairs:
        node = tree
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{dotted}' conflicts with another override")
        node[leaf] = value
    return tree


def _rename_sections(layer: dict[str, Any], source: str) -> dict[str, Any]:
    """``layer`` with renamed sections (:data:`SECTION_ALIASES`) under their new name, and one
    warning per old name used. A key set under both names in the same layer is a
    :class:`ConfigError` naming both: which one was meant cannot be told."""
    out = layer
    for old, new in SECTION_ALIASES.items():
        if old not in layer:
            continue
        legacy = layer[old]
        if legacy is None:
            legacy = {}
        if not isinstance(legacy, dict):
            raise ConfigError(f"config error: {old} must be a mapping of settings (it is now called '{new}')")
        current = layer.get(new) or {}
        both = sorted(set(legacy) & set(current)) if isinstance(current, dict) else []
        if both:
            raise ConfigError(
                f"config error: {source} sets {old}.{both[0]} and {new}.{both[0]}; '{old}' is the old "
                f"name of '{new}': keep only {new}.{both[0]}"
            )
        out = {k: v for k, v in out.items() if k != old}
        out[new] = {**legacy, **current} if isinstance(current, dict) else current
        keys = ", ".join(f"{new}.{k}" for k in legacy) or new
        # A log record, not a Python warning: the command line shows it as one "warning: ..."
        # line (a warning would carry its file, line and source line).
        logging.getLogger(__name__).warning(
            "%s: the config section '%s' is now called '%s'; write %s", source, old, new, keys
        )
    for (section, old), new in KEY_ALIASES.items():
        values = out.get(section)
        if not isinstance(values, dict) or old not in values:
            continue
        if new in values:
            raise ConfigError(
                f"config error: {source} sets {section}.{old} and {section}.{new}; '{old}' is the old "
                f"name of '{new}': keep only {section}.{new}"
            )
        out = {**out, section: {(new if k == old else k): v for k, v in values.items()}}
        logging.getLogger(__name__).warning(
            "%s: the setting %s.%s is now called %s.%s", source, section, old, section, new
        )
    return out


def _allowed_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        if field is None or not (
            isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
        ):
            return []
        model = field.annotation
    return sorted(model.model_fields)


def _format_validation_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = tuple(p for p in err["loc"] if not isinstance(p, int))
    key = ".".join(str(p) for p in loc) or "config"
    if err["type"] == "extra_forbidden":
        allowed = _allowed_keys(Config, loc)
        return f"config error: unknown key '{key}' (allowed here: {', '.join(allowed)})"
    msg = err["msg"].removeprefix("Value error, ")
    value = err.get("input")
    # A value refused for carrying credentials is not repeated (the error may be stored).
    if isinstance(value, dict) or "must not carry credentials" in msg:
        return f"config error: {key}: {msg}"
    return f"config error: {key} = {value!r}: {msg}"


def validate_config(data: dict[str, Any]) -> Config:
    """Validate a merged dict, raising :class:`ConfigError` with one line naming the key."""
    if not isinstance(data, dict):
        raise ConfigError("config must be a mapping of sections")
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc)) from None


def load_config(
    config_path: str | os.PathLike[str] | None = None,
    overrides: dict[str, Any] | list[str] | None = None,
    *,
    root: Path | None = None,
    use_local: bool = True,
) -> Config:
    """Load every layer and validate. ``root`` defaults to :func:`project_root`."""
    from dotenv import load_dotenv

    root = root if root is not None else project_root()
    merged: dict[str, Any] = {}
    if root is not None:
        main = root / "config" / "main.yaml"
        if main.is_file():
            merged = _deep_merge(merged, _rename_sections(_read_yaml(main), str(main)))
        if use_local:
            for local in sorted((root / "config").glob("local_*.yaml")):
                merged = _deep_merge(merged, _rename_sections(_read_yaml(local), str(local)))
        # Secrets for later stages (API keys) come from .env into the environment, never into
        # the config object, so they cannot leak into manifests or notebooks.
        load_dotenv(root / ".env", override=False)
    if config_path:
        merged = _deep_merge(merged, _rename_sections(_read_yaml(Path(config_path)), str(config_path)))
    merged = _deep_merge(merged, _rename_sections(overrides_to_tree(overrides), "--set"))
    return validate_config(merged)


def config_to_yaml(cfg: Config) -> str:
    """The resolved config as YAML, for the run folder (it holds no secrets by construction)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def save_local_settings(name: str, settings: dict[str, dict[str, Any]], root: Path | None = None) -> Path:
    """Merge ``settings`` into ``config/local_<name>.yaml`` (git-ignored), the layer that makes
    a headless rerun reproduce what a person chose in a widget."""
    from diffusion_bunny.pipeline.atomic import atomic_write_bytes

    root = root if root is not None else workspace_root()
    path = root / "config" / f"local_{name}.yaml"
    current: dict[str, Any] = {}
    if path.is_file():
        current = yaml.safe_load(path.read_text()) or {}
    for old, new in SECTION_ALIASES.items():
        # A file written before a section was renamed: its settings move to the new name (the
        # values being saved win), so the file never holds a key under both names.
        if isinstance(current.get(old), dict):
            current[new] = {**current.pop(old), **(current.get(new) or {})}
    for section, values in settings.items():
        current.setdefault(SECTION_ALIASES.get(section, section), {}).update(values)
    atomic_write_bytes(path, yaml.safe_dump(current, sort_keys=True).encode())
    return path
