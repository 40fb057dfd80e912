"""PySceneDetect's detectors (content, adaptive, threshold, hash, histogram) fed stage 01's frames."""

from __future__ import annotations

from fractions import Fraction
from typing import Any, ClassVar, Literal

import cv2
import numpy as np
from pydantic import Field

from diffusion_bunny.registry import SHOT_DETECTORS
from diffusion_bunny.stages.extract.detectors.base import Boundaries, ShotDetectorSettings

#: Video range (black 16, white 235) to full range, as OpenCV's own decoding (what PySceneDetect
#: reads movies with) gives it.
_FULL_RANGE = np.clip(np.round((np.arange(256) - 16) * 255.0 / 219.0), 0, 255).astype(np.uint8)


class SceneDetectBoundaries(Boundaries):
    """A PySceneDetect detector fed our analysis copies."""

    def __init__(self, detector: Any, name: str, fps: float, reports_back_s: float = 0.0):
        from scenedetect.common import FrameTimecode  # lazy: scenedetect takes 0.23 s to import

        self.detector = detector
        self.name = name
        self._tc = FrameTimecode
        self.rate = Fraction(fps).limit_denominator(100_000)
        # A detector that reports a cut where it was, after the fact (the threshold detector:
        # the middle of a dip to black, once the picture is back) needs frames held that long;
        # a cut older than the delay line closes the shot late (a dip put in the shot before).
        self.lookahead = max(int(detector.event_buffer_length), round(reports_back_s * fps))

    #: Stretch the analysis copy from video range (16-235) to 0-255 before it reaches the
    #: detector (set by stage 01 for a limited-range movie, the most common kind; see
    #: :data:`ThresholdSettings.expands_range`).
    expand_range = False

    def push(self, index: int, small_bgr: np.ndarray, time_s: float | None = None) -> list[int]:
        if self.expand_range:
            small_bgr = cv2.LUT(small_bgr, _FULL_RANGE)
        cuts = self.detector.process_frame(self._tc(index, fps=self.rate), small_bgr)
        return [c.frame_num for c in cuts]

    def finish(self, last_index: int) -> list[int]:
        return [c.frame_num for c in self.detector.post_process(self._tc(last_index, fps=self.rate))]


class _SceneDetectSettings(ShotDetectorSettings):
    """A PySceneDetect detector: each measures something different, so each has its own
    threshold's default and range."""

    threshold: float
    #: The class in ``scenedetect.detectors`` and the keyword its threshold goes by.
    detector_class: ClassVar[str]
    threshold_keyword: ClassVar[str] = "threshold"

    @property
    def threshold_in_force(self) -> float:
        return self.threshold

    def detector(self, min_len: int) -> Any:
        """PySceneDetect's detector with this threshold and shots of at least ``min_len`` frames
        (PySceneDetect is imported here: 0.2 s that the other shot detectors need not pay)."""
        from scenedetect import detectors  # lazy: scenedetect takes 0.23 s to import

        cls = getattr(detectors, self.detector_class)
        return cls(**{self.threshold_keyword: self.threshold}, min_scene_len=min_len)

    #: Whether the detector's threshold is an absolute brightness, which a limited-range movie's
    #: analysis copy (black at 16) never reaches: the threshold detector's default 12 never
    #: fired on ordinary 8-bit video. The others compare frames with each other.
    expands_range: ClassVar[bool] = False

    #: How far back the detector may report a cut (seconds): see :class:`SceneDetectBoundaries`.
    reports_back_s: ClassVar[float] = 0.0

    def build(self, fps: float, min_len: int, model: Any) -> SceneDetectBoundaries:
        return SceneDetectBoundaries(self.detector(min_len), self.name, fps, self.reports_back_s)


@SHOT_DETECTORS.register
class ContentSettings(_SceneDetectSettings):
    """``extract.detector: content``: change in HSV and edges between frames (0-255)."""

    name: Literal["content"] = "content"
    threshold: float = Field(27.0, ge=0.0, le=255.0)
    detector_class: ClassVar[str] = "ContentDetector"


@SHOT_DETECTORS.register
class AdaptiveSettings(_SceneDetectSettings):
    """``extract.detector: adaptive``: content change over its rolling average (0-255)."""

    name: Literal["adaptive"] = "adaptive"
    threshold: float = Field(3.0, ge=0.0, le=255.0)
    detector_class: ClassVar[str] = "AdaptiveDetector"
    threshold_keyword: ClassVar[str] = "adaptive_threshold"


@SHOT_DETECTORS.register
class ThresholdSettings(_SceneDetectSettings):
    """``extract.detector: threshold``: fades through black (mean brightness, 0-255)."""

    name: Literal["threshold"] = "threshold"
    threshold: float = Field(12.0, ge=0.0, le=255.0)
    detector_class: ClassVar[str] = "ThresholdDetector"
    expands_range: ClassVar[bool] = True
    #: A dip of up to 4 s placed at its middle (a longer one at 2 s before its end).
    reports_back_s: ClassVar[float] = 2.0


@SHOT_DETECTORS.register
class HashSettings(_SceneDetectSettings):
    """``extract.detector: hash``: perceptual hash distance (0-1)."""

    name: Literal["hash"] = "hash"
    threshold: float = Field(0.35, ge=0.0, le=1.0)
    detector_class: ClassVar[str] = "HashDetector"


@SHOT_DETECTORS.register
class HistogramSettings(_SceneDetectSettings):
    """``extract.detector: histogram``: YUV histogram difference (0-1)."""

    name: Literal["histogram"] = "histogram"
    threshold: float = Field(0.20, ge=0.0, le=1.0)
    detector_class: ClassVar[str] = "HistogramDetector"
