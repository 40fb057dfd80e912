"""Stage 03's settings (``characters``): what finds characters, how they are named and tracked.

Read by the configuration (:mod:`diffusion_bunny.config`) on every command. The face detector's
own settings live with each detector (``models/<detector>.py``, registered in
:data:`~diffusion_bunny.registry.FACE_DETECTORS`); ``characters.detector`` chooses one.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from diffusion_bunny.models.centerface import CenterFaceSettings
from diffusion_bunny.models.face_detect import FACE_DETECTORS
from diffusion_bunny.models.fitted import FittedSettings
from diffusion_bunny.models.hub_characters import HubCharacterSettings
from diffusion_bunny.section import Section

#: The face detector: a registered detector's name, or its name and settings.
FaceDetectorChoice = FACE_DETECTORS.choice(CenterFaceSettings().name)
#: Keys that were settings of the whole section and are now a detector's own
#: (``characters.scale_step`` -> ``characters.detector.scale_step``).
MOVED_TO_DETECTOR = ("min_score", "scale_step", "pyramid_start", "mirror_score", "upsample")


class CharactersSettings(Section):
    """Settings of stage 03 (``characters``): face detection, encodings, naming and tracks."""

    reference_dir: str | None = None
    frames: Literal["kept", "all"] = "kept"
    #: The face detector and its own settings (``{name: mtcnn, scale_step: 0.8}``, or its name
    #: alone for its defaults).
    detector: FaceDetectorChoice = CenterFaceSettings()
    align: Literal["dlib", "detector"] = "dlib"
    #: Stretch the searched copy's brightness between its 1st and 99.5th percentiles first
    #: (low-key stage and night frames; python_script/eval_faces.py).
    auto_levels: bool = True
    detect_width: int = Field(640, ge=0, le=8192)
    num_jitters: int = Field(1, ge=1, le=100)
    landmarks: Literal["large", "small"] = "large"
    min_face_px: int = Field(30, ge=0, le=4096)
    trust_min_px: int = Field(48, ge=0, le=4096)
    trust_max_yaw: float = Field(0.6, gt=0.0, le=2.0)
    tolerance: float = Field(0.6, gt=0.0, le=2.0)
    adaptive_thresholds: bool = True
    min_threshold: float = Field(0.45, gt=0.0, le=2.0)
    threshold_margin: float = Field(0.1, ge=0.0, le=1.0)
    low_confidence_margin: float = Field(0.05, ge=0.0, le=1.0)
    track_distance: float = Field(0.5, gt=0.0, le=2.0)
    track_iou: float = Field(0.0, ge=0.0, le=1.0)
    cluster_threshold: float = Field(0.5, gt=0.0, le=2.0)
    workers: int = Field(0, ge=0, le=256)
    #: What finds drawn and animated characters: ``offline`` (a detector fitted at run time to the
    #: references, nothing downloaded) or ``hub`` (OWLv2 and a features model from the Hugging
    #: Face hub, ``characters.hub``; it also finds characters nobody gave pictures of).
    backend: Literal["offline", "hub"] = "offline"
    #: The detector fitted to the pictures of drawn and animated characters (models/fitted).
    fitted: FittedSettings = FittedSettings()
    #: The hub's models, read only with ``backend: hub`` (models/hub_characters/).
    hub: HubCharacterSettings = HubCharacterSettings()
    #: Two sightings of a drawn character in consecutive sampled frames of a shot are one track
    #: when their features (unit length) are within this distance.
    drawn_track_distance: float = Field(0.8, gt=0.0, le=2.0)

    @model_validator(mode="after")
    def _threshold_window(self) -> CharactersSettings:
        if self.min_threshold > self.tolerance:
            raise ValueError(
                f"min_threshold ({self.min_threshold}) must not exceed tolerance ({self.tolerance})"
            )
        return self
