"""Stage 01's settings (``extract``): decoding, the shot detector, keyframe choice.

Read by the configuration (:mod:`diffusion_bunny.config`) on every command. The shot detector's
own settings live with each detector (``detectors/<detector>.py``, registered in
:data:`~diffusion_bunny.registry.SHOT_DETECTORS`); ``extract.detector`` chooses one.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from diffusion_bunny.registry import SHOT_DETECTORS
from diffusion_bunny.section import Section
from diffusion_bunny.stages.extract.detectors import CascadeSettings

#: The shot detector: a registered detector's name, or its name and settings.
ShotDetectorChoice = SHOT_DETECTORS.choice(CascadeSettings().name)
#: Keys that were settings of the whole section and are now a detector's own
#: (``extract.candidate_threshold`` -> ``extract.detector.candidate_threshold``).
MOVED_TO_DETECTOR = (
    "threshold",
    "transnetv2_threshold",
    "candidate_threshold",
    "candidate_ratio",
    "gradual_threshold",
    "accept_threshold",
    "accept_colour_threshold",
    "reference_contrast",
    "transnetv2_unsure",
    "motion_compensation",
    "device",
    "runtime",
    "transnetv2_precision",
)


class ExtractSettings(Section):
    """Settings of stage 01 (decode, shot detection, keyframe choice)."""

    method: Literal["shots", "interval", "keyframe"] = "shots"
    #: The shot detector and its own settings (``{name: content, threshold: 30}``, or its name
    #: alone for its defaults).
    detector: ShotDetectorChoice = CascadeSettings()
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

    @property
    def uses_transnetv2(self) -> bool:
        """Whether the detector needs the TransNetV2 model."""
        return self.detector.uses_transnetv2

    @property
    def effective_threshold(self) -> float:
        """The threshold the detector decides a cut by (TransNetV2's for ``cascade`` and
        ``transnetv2``, the PySceneDetect detector's own for the others)."""
        return self.detector.threshold_in_force
