"""Stage 01's shot-boundary detectors: one interface (:class:`~.base.Boundaries`: ``push`` a
frame, get the cuts it is now sure of), one module per algorithm, as PySceneDetect keeps one file
per detector.

* :mod:`.cascade` (the default): cheap signals propose, TransNetV2 judges the doubtful;
* :mod:`.transnetv2`: TransNetV2 on every frame;
* :mod:`.scenedetect`: PySceneDetect's own detectors fed the same frames;
* :mod:`.transnet`: the TransNetV2 model itself (weights from its package, ONNX on the CPU).
"""

from __future__ import annotations

from diffusion_bunny.stages.extract.detectors.base import Boundaries
from diffusion_bunny.stages.extract.detectors.cascade import CascadeBoundaries
from diffusion_bunny.stages.extract.detectors.scenedetect import SceneDetectBoundaries, make_detector
from diffusion_bunny.stages.extract.detectors.transnet import ModelHandle, TransNetModel
from diffusion_bunny.stages.extract.detectors.transnetv2 import TransNetV2Boundaries
from diffusion_bunny.stages.extract.settings import ExtractSettings


def make_boundaries(
    cfg: ExtractSettings, fps: float, model: ModelHandle | TransNetModel | None
) -> Boundaries:
    """The configured detector. ``model`` is needed for ``transnetv2`` and ``cascade``, which
    keep every boundary they confirm (short shots are marked by stage 01, not merged) except the
    second half of a fade through black shorter than ``min_shot_seconds``; the PySceneDetect
    detectors merge cuts closer than that (their ``min_scene_len``, part of how they tell a
    flash from a cut)."""
    min_len = max(1, round(cfg.min_shot_seconds * fps))
    if cfg.detector == "transnetv2":
        assert model is not None
        return TransNetV2Boundaries(model, cfg.transnetv2_threshold, min_len)
    if cfg.detector == "cascade":
        assert model is not None
        return CascadeBoundaries(model, cfg, min_len)
    return SceneDetectBoundaries(make_detector(cfg, fps), cfg.detector, fps)
