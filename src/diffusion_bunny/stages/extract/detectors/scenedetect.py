"""PySceneDetect's detectors (content, adaptive, threshold, hash, histogram) fed stage 01's frames."""

from __future__ import annotations

from fractions import Fraction
from typing import Any

import numpy as np

from diffusion_bunny.stages.extract.detectors.base import Boundaries
from diffusion_bunny.stages.extract.settings import ExtractSettings


class SceneDetectBoundaries(Boundaries):
    """A PySceneDetect detector fed our analysis copies."""

    def __init__(self, detector: Any, name: str, fps: float):
        from scenedetect.common import FrameTimecode

        self.detector = detector
        self.name = name
        self._tc = FrameTimecode
        self.rate = Fraction(fps).limit_denominator(100_000)
        self.lookahead = int(detector.event_buffer_length)

    def push(self, index: int, small_bgr: np.ndarray) -> list[int]:
        cuts = self.detector.process_frame(self._tc(index, fps=self.rate), small_bgr)
        return [c.frame_num for c in cuts]

    def finish(self, last_index: int) -> list[int]:
        return [c.frame_num for c in self.detector.post_process(self._tc(last_index, fps=self.rate))]


def make_detector(cfg: ExtractSettings, fps: float) -> Any:
    """The configured PySceneDetect detector, with the minimum shot length in frames."""
    from scenedetect.detectors import (
        AdaptiveDetector,
        ContentDetector,
        HashDetector,
        HistogramDetector,
        ThresholdDetector,
    )

    min_len = max(1, round(cfg.min_shot_seconds * fps))
    thr = cfg.effective_threshold
    if cfg.detector == "content":
        return ContentDetector(threshold=thr, min_scene_len=min_len)
    if cfg.detector == "adaptive":
        return AdaptiveDetector(adaptive_threshold=thr, min_scene_len=min_len)
    if cfg.detector == "threshold":
        return ThresholdDetector(threshold=thr, min_scene_len=min_len)
    if cfg.detector == "hash":
        return HashDetector(threshold=thr, min_scene_len=min_len)
    return HistogramDetector(threshold=thr, min_scene_len=min_len)
