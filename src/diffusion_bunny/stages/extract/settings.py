"""Stage 01's settings (``extract``): decoding, the shot detector, keyframe choice.

Read by the configuration (:mod:`diffusion_bunny.config`) on every command, so it imports
nothing heavier than pydantic.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from diffusion_bunny.section import Section

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


# The cascade's contrast scaling: around a candidate whose shots' contrast (standard deviation of
# gray on the 48x27 copy, 0-128) is under this, the absolute thresholds scale with it (see
# stages/extract/detectors/cascade.py).
REFERENCE_SHOT_CONTRAST = 30.0


class ExtractSettings(Section):
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
    def _threshold_in_detector_range(self) -> ExtractSettings:
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
