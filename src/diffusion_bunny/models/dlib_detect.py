"""dlib's HOG and CNN face detectors (``characters.detector: hog`` or ``cnn``) behind stage 03's
detector protocol, with their settings. Apart from :mod:`.dlib_faces` (dlib's models, which the
encoder uses whichever detector finds the faces), so that a stage's code hash covers this module
only when one of these detectors is chosen."""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from diffusion_bunny.models.dlib_faces import model_path, raw_face_locations
from diffusion_bunny.models.face_common import Detection, FaceDetectorSettings, clip_box
from diffusion_bunny.registry import FACE_DETECTORS


class DlibDetector:
    """dlib's HOG or CNN detector (``upsample``: times the image is doubled first). Landmarks are
    left empty (NaN): the encoder's 68-point shape gives them."""

    def __init__(self, model: str = "hog", upsample: int = 1):
        self.name = model
        self.upsample = upsample

    def detect(self, rgb: np.ndarray) -> list[Detection]:
        raw = raw_face_locations(np.ascontiguousarray(rgb), self.upsample, self.name)
        out = []
        for item in raw:
            rect = item.rect if self.name == "cnn" else item
            score = float(item.confidence) if self.name == "cnn" else 1.0
            box = clip_box((rect.top(), rect.right(), rect.bottom(), rect.left()), rgb.shape)
            out.append(Detection(box, score, np.full((5, 2), np.nan, np.float32)))
        return out


class _DlibSettings(FaceDetectorSettings):
    #: Times the detector doubles the copy first (0-4): each step finds faces half as small and
    #: costs about 4x. HOG's window is 80 px, so 1 finds faces from about 40 px at detect_width.
    upsample: int = Field(1, ge=0, le=4)

    #: The model files the detector needs besides the encoder's.
    _models: tuple[str, ...] = ()

    def check(self) -> None:
        for model in self._models:
            model_path(model)

    def build(self, min_face: float) -> DlibDetector:
        return DlibDetector(self.name, self.upsample)

    def finer(self) -> _DlibSettings:
        return self.model_copy(update={"upsample": self.upsample + 1})


@FACE_DETECTORS.register
class HogSettings(_DlibSettings):
    """``characters.detector: hog``: dlib's HOG and linear SVM (near-frontal faces only)."""

    name: Literal["hog"] = "hog"


@FACE_DETECTORS.register
class CnnSettings(_DlibSettings):
    """``characters.detector: cnn``: dlib's MMOD CNN (more poses; slow without a GPU)."""

    name: Literal["cnn"] = "cnn"
    _models = ("cnn_detector",)
