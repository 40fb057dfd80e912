"""TransNetV2 alone on every frame, with the network's own windows."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import numpy as np

from diffusion_bunny.registry import SHOT_DETECTORS
from diffusion_bunny.stages.extract.detectors.base import MAX_RUN, Blankness, Boundaries, InOrder, RunTracker
from diffusion_bunny.stages.extract.detectors.transnet import (
    ModelHandle,
    TransNetModel,
    TransNetV2Options,
    WindowedPredictor,
    describe,
    rgb48,
)


class TransNetV2Boundaries(Boundaries):
    """TransNetV2 on every frame (the network's own 100-frame windows, 50-frame step)."""

    name = "transnetv2"

    def __init__(
        self, model: ModelHandle | TransNetModel, threshold: float, min_len: int = 0, fps: float | None = None
    ):
        self.model = model
        self.predictor = WindowedPredictor(model)
        self.runs = RunTracker(threshold)
        self.lookahead = self.predictor.lookahead + MAX_RUN + 1
        self.blankness = Blankness(self.lookahead + min_len + 2)
        self.order = InOrder(self.lookahead, min_len, self.blankness, fps)
        self.threshold = threshold
        self.frames = 0

    def _feed(self, pairs: list[tuple[int, float]]) -> None:
        for index, p in pairs:
            found = self.runs.feed(index, p)
            if found is not None:
                self.order.add(*found)

    def push(self, index: int, small_bgr: np.ndarray, time_s: float | None = None) -> list[int]:
        self.frames += 1
        small = rgb48(small_bgr)
        self.blankness.add(index, small, time_s)
        self._feed(self.predictor.push(index, small))
        return self.order.release(index - self.lookahead)

    def finish(self, last_index: int) -> list[int]:
        self._feed(self.predictor.finish())
        found = self.runs.close()
        if found is not None and found[0] <= last_index:
            self.order.add(*found)
        return self.order.release(None)

    def facts(self) -> dict[str, Any]:
        model = self.model.get() if isinstance(self.model, ModelHandle) else self.model
        return {
            "detector": self.name,
            "transnetv2_threshold": self.threshold,
            **describe(model, self.predictor.frames_run, self.predictor.seconds),
        }


@SHOT_DETECTORS.register
class TransNetV2Settings(TransNetV2Options):
    """``extract.detector: transnetv2``: TransNetV2 on every frame."""

    name: Literal["transnetv2"] = "transnetv2"
    needs_model_at_once: ClassVar[bool] = True

    def build(self, fps: float, min_len: int, model: Any) -> TransNetV2Boundaries:
        return TransNetV2Boundaries(model, self.transnetv2_threshold, min_len, fps)
