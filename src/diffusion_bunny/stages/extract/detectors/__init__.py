"""Stage 01's shot-boundary detectors: one interface (:class:`~.base.Boundaries`: ``push`` a
frame, get the cuts it is now sure of), one module per algorithm, as PySceneDetect keeps one file
per detector.

* :mod:`.cascade` (the default): cheap signals propose, TransNetV2 judges the doubtful;
* :mod:`.transnetv2`: TransNetV2 on every frame;
* :mod:`.scenedetect`: PySceneDetect's own detectors fed the same frames;
* :mod:`.transnet`: the TransNetV2 model itself (weights from its package, ONNX on the CPU).

Each detector's settings and defaults live in its module, registered once in
:data:`~diffusion_bunny.registry.SHOT_DETECTORS`; ``extract.detector`` chooses one, and its
settings build it (:meth:`~.base.ShotDetectorSettings.build`). Importing this package registers
every one of them.
"""

from __future__ import annotations

from typing import Any

from diffusion_bunny.registry import SHOT_DETECTORS
from diffusion_bunny.stages.extract.detectors.base import Boundaries, ShotDetectorSettings, shortest_shot
from diffusion_bunny.stages.extract.detectors.cascade import CascadeBoundaries, CascadeSettings
from diffusion_bunny.stages.extract.detectors.scenedetect import (
    AdaptiveSettings,
    ContentSettings,
    HashSettings,
    HistogramSettings,
    SceneDetectBoundaries,
    ThresholdSettings,
)
from diffusion_bunny.stages.extract.detectors.transnet import ModelHandle, TransNetModel
from diffusion_bunny.stages.extract.detectors.transnetv2 import TransNetV2Boundaries, TransNetV2Settings


def make_boundaries(cfg: Any, fps: float, model: Any, *, full_range: bool = True) -> Boundaries:
    """The detector ``cfg.detector`` (the ``extract`` settings' choice) for a movie at ``fps``.

    ``transnetv2`` and ``cascade`` (``model``: the TransNetV2 handle) keep every boundary they
    confirm (short shots are marked by stage 01, not merged) except the second half of a fade
    through black shorter than ``min_shot_seconds`` (in presentation time: ``push`` is given each
    frame's time); the PySceneDetect detectors merge cuts closer than that (their
    ``min_scene_len``, part of how they tell a flash from a cut), counted in frames at the
    average rate.
    ``full_range``: the movie's pixels use 0-255 (most video uses 16-235: a detector whose
    threshold is a brightness gets its copies stretched, ``expands_range``)."""
    boundaries = cfg.detector.build(fps, shortest_shot(cfg.min_shot_seconds, fps)[0], model)
    if isinstance(boundaries, SceneDetectBoundaries):
        boundaries.expand_range = cfg.detector.expands_range and not full_range
    return boundaries


__all__ = [
    "SHOT_DETECTORS",
    "AdaptiveSettings",
    "Boundaries",
    "CascadeBoundaries",
    "CascadeSettings",
    "ContentSettings",
    "HashSettings",
    "HistogramSettings",
    "ModelHandle",
    "SceneDetectBoundaries",
    "ShotDetectorSettings",
    "ThresholdSettings",
    "TransNetModel",
    "TransNetV2Boundaries",
    "TransNetV2Settings",
    "make_boundaries",
    "shortest_shot",
]
