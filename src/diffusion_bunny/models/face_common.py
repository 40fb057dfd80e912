"""What every face detector module shares: :class:`Detection`, the 5 landmarks' order, the base
of a detector's settings (:class:`FaceDetectorSettings`), clipping a box to its image and finding
a model file inside an installed wheel. Apart from :mod:`.face_detect` so that its detector
modules import these without importing it."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from diffusion_bunny.errors import ModelError
from diffusion_bunny.registry import DetectorSettings

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


class FaceDetectorSettings(DetectorSettings):
    """A face detector's own settings (``characters.detector``): each detector module subclasses
    it, with its defaults, and registers it once (``@FACE_DETECTORS.register``)."""

    def check(self) -> None:
        """Raise :class:`ModelError` (one line naming the package) when the detector's model files
        are not installed or cannot be read: checked once before any frame is searched."""

    def build(self, min_face: float) -> Any:
        """The detector (``detect(rgb) -> list[Detection]``), for faces from ``min_face`` pixels
        of the image searched."""
        raise NotImplementedError

    def finer(self) -> FaceDetectorSettings:
        """These settings searching finer, for a picture where they found no face (a small
        reference crop); the same settings for a detector without such a knob."""
        return self


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
