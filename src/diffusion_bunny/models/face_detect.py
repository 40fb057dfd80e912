"""Face detectors behind one small protocol: an RGB image in, boxes with a score and 5 landmarks out.

Stage 03 (and stage 08's identity score) ask for faces through :func:`make_detector`, whatever
finds them (issue 30):

* ``hog``: dlib's HOG + linear SVM (the first default; near-frontal faces only);
* ``cnn``: dlib's MMOD CNN (more poses, far slower without a GPU);
* ``mediapipe``: BlazeFace, the model of MediaPipe's face detection, run from the ``.tflite`` file
  inside the installed ``mediapipe`` wheel (:mod:`.blazeface`);
* ``mtcnn``: the MTCNN cascade of ``facenet-pytorch`` (:mod:`.mtcnn`).

Every detector gives 5 landmarks in one order (:data:`LANDMARKS`), so the encoder can align a face
on them whichever detector found it. dlib's detectors have none of their own: theirs come from
dlib's 68-point shape predictor, which the encoder runs on their boxes anyway.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from diffusion_bunny.errors import ModelError

#: The detector names ``characters.detector`` takes.
DETECTORS = ("hog", "cnn", "mediapipe", "mtcnn")
#: The 5 landmarks, in image terms (``eye_left`` is the eye on the image's left, the person's
#: right eye). BlazeFace gives the mouth's centre only: both mouth points are that centre.
LANDMARKS = ("eye_left", "eye_right", "nose", "mouth_left", "mouth_right")


@dataclass(frozen=True)
class Detection:
    """One face: ``box`` (top, right, bottom, left) in the pixels of the image searched, the
    detector's confidence, and ``landmarks`` as a (5, 2) array of x, y (:data:`LANDMARKS`)."""

    box: tuple[int, int, int, int]
    score: float
    landmarks: np.ndarray

    @property
    def height(self) -> int:
        return self.box[2] - self.box[0]


class FaceDetector(Protocol):
    """What every detector module provides."""

    name: str

    def detect(self, rgb: np.ndarray) -> list[Detection]:
        """Faces in an RGB uint8 image, boxes clipped to it."""
        ...


def package_file(package: str, relative: str, *, distribution: str | None = None) -> Path:
    """A model file shipped inside an installed package, found without importing the package
    (mediapipe's ``__init__`` would need protobuf < 5). One line naming the package and how to
    reinstall it when the package or the file is missing."""
    dist = distribution or package
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"the package {dist} is not installed; `uv sync` installs it "
            f"(reinstall: `uv sync --reinstall-package {dist}`)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise ModelError(
            f"the model file {relative} is missing from the installed {dist} package ({path}); "
            f"reinstall it: `uv sync --reinstall-package {dist}`"
        )
    return path


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
    from diffusion_bunny.models import dlib_faces

    # Every detector's faces are encoded by dlib's ResNet.
    for model in ("cnn_detector", "encoder") if name == "cnn" else ("encoder",):
        dlib_faces.model_path(model)


def clip_box(box: tuple[float, float, float, float], shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    """A (top, right, bottom, left) box rounded and clipped to an image of ``shape``."""
    top, right, bottom, left = box
    height, width = shape[:2]
    return (
        max(0, round(top)),
        min(width, round(right)),
        min(height, round(bottom)),
        max(0, round(left)),
    )


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
def make_detector(name: str, upsample: int = 1, min_face: int = 20, min_score: float | None = None) -> Any:
    """The detector called ``name`` (one per process and setting: models load once).

    ``upsample`` is dlib's; ``min_face`` the smallest face in pixels of the image searched
    (MTCNN's image pyramid starts there); ``min_score`` the confidence a face needs (None: the
    detector's own default)."""
    if name in ("hog", "cnn"):
        return DlibDetector(name, upsample)
    if name == "mediapipe":
        from diffusion_bunny.models.blazeface import BlazeFace

        return BlazeFace(min_score=min_score)
    if name == "mtcnn":
        from diffusion_bunny.models.mtcnn import Mtcnn

        return Mtcnn(min_face=min_face, min_score=min_score)
    require(name)  # raises: the name is not one of DETECTORS
    raise AssertionError(name)  # pragma: no cover
