"""Stage 02's settings (``quality``): the thresholds applied to the scores computed once per frame.

Read by the configuration (:mod:`diffusion_bunny.config`) on every command, so it imports
nothing heavier than pydantic.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from diffusion_bunny.section import Section

# Stage 02's brightness rules (see QualitySettings and stages/quality/rules.py): a film whose median
# frame brightness is REFERENCE_BRIGHTNESS gets min_brightness and max_brightness as they are; a
# darker or brighter film moves them with its median, never past the absolute BLACK_FLOOR and
# WHITE_CEILING. Measured in python_script/calibrate_quality.py (memory_bank/progress.md).
REFERENCE_BRIGHTNESS = 100.0
# Stage 02's relative sharpness: a film whose median frame contrast (standard deviation of gray,
# 0-128) is REFERENCE_CONTRAST or more gets min_sharpness as it is; a flatter film (a night grade)
# scales it by the square of its contrast over this (see quality/rules.py).
REFERENCE_CONTRAST = 40.0
BLACK_FLOOR = 10.0
# A frame outside the brightness window whose detail (sharpness less its noise, the units of
# min_sharpness) is at least this still shows its picture: a snowfield or a night sky drawn with
# crisp lines is a scene's look, not a fault of exposure (see quality/rules.py, _first_reason).
# Its own setting, not a multiple of min_sharpness: turning the blur rule off must not keep
# every black frame.
EXPOSURE_DETAIL = 75.0
WHITE_CEILING = 245.0
#: Width in pixels of the copy of the picture the text detector looks at.
TEXT_WIDTH = 480


class QualitySettings(Section):
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
    exposure_detail: float | None = Field(EXPOSURE_DETAIL, ge=0.0, le=100_000.0)
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
        # One clear message instead of pydantic's two (one per member of the union); a yes/no is
        # refused before this, by every section (Section).
        if value == "shot" or (isinstance(value, int) and value >= 1):
            return value
        raise ValueError("must be 'shot' or a positive number of consecutive frames")

    @field_validator("best_per_batch", mode="before")
    @classmethod
    def _zero_keeps_all(cls, value: Any) -> Any:
        # Notebook 02's slider says "0 keeps all": the same 0 in a settings file or --set was
        # refused ("greater than or equal to 1"). 0 is null here too: every frame of a batch.
        return None if value == 0 and not isinstance(value, bool) else value

    @model_validator(mode="after")
    def _brightness_window(self) -> QualitySettings:
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
