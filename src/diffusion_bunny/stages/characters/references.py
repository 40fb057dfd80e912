"""Reference pictures of any kind, and what stage 03 takes from each.

A user shows a character with whatever pictures they have: a face photo, a drawing, a sprite with
transparency, a head crop, a full-body crop, a poster, a still from the film. Each picture either
gives the character's appearance or one line that names the file and says why not.

* A **human face** is a picture in which the face detector finds exactly one face (no other of
  comparable size) that dlib's HOG detector, trained on photographs, also finds: CenterFace also
  fires on drawn faces, whose dlib encodings cannot tell two drawn characters apart, so a face
  only counts as human when a detector of photographs agrees. Such pictures are encoded with
  dlib's ResNet (:mod:`diffusion_bunny.models.faces`), as before.
* Every other picture is a **cut-out** for the fitted detector (:mod:`diffusion_bunny.models.fitted`):
  its transparency where it has one (a sprite), else the subject GrabCut separates from the
  picture's border (a drawing on a plain ground, a poster crop; OpenCV's GrabCut, Rother et al.
  2004, started from a rectangle inside the picture, because users crop around the character).
  A picture whose subject does not stand out is left out: pasted whole, its background would be
  learnt as the character.

A character whose pictures include a human face is a human character (its other pictures are left
out with a line each); any other character is drawn (or rendered), found by the fitted detector.
Transparent pixels are composited on neutral grey (:data:`GREY`), never read as black.
"""

from __future__ import annotations

import itertools
import os
import stat
from dataclasses import dataclass, field, replace
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from diffusion_bunny.media.images import eight_bit
from diffusion_bunny.media.probe import shown
from diffusion_bunny.models import dlib_faces
from diffusion_bunny.models.faces import (
    LOOP_READ_ONCE,
    REFERENCE_SUFFIXES,
    ReferenceSet,
    character_folders,
    dead_folder_links,
    file_digest,
    hidden_folders,
    holds_any,
    loose_pictures,
    misnamed_paths,
    misnamed_references,
    name_key,
    portrait_faces,
    walk_references,
)
from diffusion_bunny.models.fitted.detector import content_box

#: What a transparent pixel is shown on (and what the face detectors see there).
GREY = (128, 128, 128)
#: A picture's subject must be at least this many pixels on its shorter side.
MIN_SUBJECT_PX = 16
#: Photo formats of phones and cameras that Pillow and OpenCV do not read (HEIC/HEIF and
#: raw files): named in the line that leaves them out, with what to do.
PHOTO_ONLY_SUFFIXES = (".heic", ".heif", ".dng", ".cr2", ".nef", ".arw")
#: GrabCut runs on a copy at most this many pixels on its longer side.
GRABCUT_SIDE = 320
#: The rectangle GrabCut starts from leaves this share of the picture on each side as background
#: (a poster crop: the character stands inside, with room around it) ...
GRABCUT_INSET = 0.15
#: ... unless the subject found runs along that rectangle's edge (this share of its edge is
#: subject: a head crop, cut by the picture's edges), when it starts again from this inset.
GRABCUT_EDGE_SHARE = 0.25
GRABCUT_TIGHT_INSET = 0.03
#: Where GrabCut finds no subject, the colours rare on the picture's border: the band of this
#: share of the shorter side around the picture is its background's sample ...
BORDER_BAND = 0.08
#: ... a colour (Lab, 8 x 16 x 16 bins) of which the band holds less than this share is rare ...
RARE_SHARE = 1e-3
#: ... and the largest part of the rare pixels is taken when it covers this much of the picture.
RARE_SUBJECT = (0.01, 0.5)


@dataclass(frozen=True)
class Taken:
    """What was taken from one reference picture (a row of notebook 03's reference sheet)."""

    path: Path
    character: str
    #: ``face`` (a human face, encoded), ``cutout`` (for the fitted detector) or ``left out``.
    use: str
    #: How the character was separated: ``face box``, ``transparency`` or ``grabcut``.
    how: str
    #: The part used, (left, top, right, bottom) in the picture's pixels; None when left out.
    box: tuple[int, int, int, int] | None
    #: Why it was left out (one line), None otherwise.
    problem: str | None = None

    def as_fact(self) -> dict[str, object]:
        """This row as the manifest keeps it (``facts.references_taken``)."""
        return {
            "path": str(self.path),
            "character": self.character,
            "use": self.use,
            "how": self.how,
            "box": list(self.box) if self.box else None,
            "problem": self.problem,
        }


@dataclass
class ReferencePictures:
    """Every character's usable pictures: encodings of human faces (in ``faces``, a
    :class:`~diffusion_bunny.models.faces.ReferenceSet`) and cut-outs of drawn characters."""

    cutouts: dict[str, list[np.ndarray]] = field(default_factory=dict)
    taken: list[Taken] = field(default_factory=list)

    def drawn(self) -> list[str]:
        """Names of the characters the fitted detector looks for."""
        return sorted(self.cutouts)


class ReferenceProblem(Exception):
    """A picture that cannot serve as a reference; the message says why, in a few words."""


def read_shrunk(path: Path) -> tuple[np.ndarray, float]:
    """A picture file as RGBA uint8 (opaque where the file has no transparency), upright, at most
    :data:`MAX_PICTURE_SIDE` a side, and the factor it was shrunk by (1 for most). Palette and
    grey pictures, 16-bit PNGs and animated ones (:func:`_first_shown_frame`) are converted.

    Upright: a phone stores a photo as its sensor saw it and says in the EXIF orientation how to
    turn it; read without that, a portrait lies on its side, the face detector finds no face, and
    the person was taken as a drawn character (OpenCV's decoder, which reads the film's frames and
    the faces-only references, turns it as well). A picture too large for Pillow to open (over
    ~179 megapixels, its guard against decompression bombs) is one line, not a crash, and so is a
    truncated or damaged AVIF: Pillow's AVIF plugin raises SyntaxError (a frame that does not
    decode) and RuntimeError (no image item), not OSError, and such a file stopped stage 03."""
    try:
        with Image.open(path) as im:
            rgba, scale = _first_shown_frame(im)
    except Image.DecompressionBombError:
        raise ReferenceProblem("is too large to read (over 179 megapixels); scale it down") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, RuntimeError) as exc:
        raise ReferenceProblem(f"cannot be read as a picture ({type(exc).__name__})") from None
    if rgba.ndim != 3 or rgba.size == 0:
        raise ReferenceProblem("is empty")
    if min(rgba.shape[:2]) < 2:  # a line of pixels: "empty" said the file held nothing
        raise ReferenceProblem(
            f"is too small: {rgba.shape[1]}x{rgba.shape[0]} px (at least {MIN_SUBJECT_PX} px a side)"
        )
    return np.ascontiguousarray(rgba), scale


#: Frames of an animated picture searched for one that shows something.
MAX_ANIMATION_FRAMES = 300
#: The longest side a picture is read at. The fit pastes a character at most a frame's size and
#: a face is encoded from a 150 px chip, so more pixels teach nothing; a 24-megapixel poster took
#: 11.5 s and 1.1 GB to read and cut out (a 12000 px one 40 s and 5.2 GB), 1.2 s at this size.
MAX_PICTURE_SIDE = 2048


def _first_shown_frame(im: Image.Image) -> tuple[np.ndarray, float]:
    """An opened picture as RGBA, upright, its longest side at most :data:`MAX_PICTURE_SIDE`, and
    the factor it was shrunk by: its first frame, or for an animation (GIF, WebP, APNG) its first
    frame that shows something. A sprite's animation often fades in from a blank frame, and the
    reference was "fully transparent" while the user saw the character move."""
    longest = max(im.size)  # the file's own (a turn keeps it)
    frames = min(getattr(im, "n_frames", 1), MAX_ANIMATION_FRAMES)
    if frames == 1 and longest > MAX_PICTURE_SIDE:
        # A JPEG decoded at a whole fraction of its size, still at least the size it is shrunk to.
        scale = MAX_PICTURE_SIDE / longest
        im.draft(im.mode, (int(im.width * scale) + 1, int(im.height * scale) + 1))
    chosen = None
    for index in range(frames):
        im.seek(index)
        rgba = _upright_rgba(im)
        shown = frames == 1 or _shows_something(rgba)
        if chosen is None or shown:
            chosen = rgba
        if shown:
            break
    return chosen, max(chosen.shape[:2]) / max(longest, 1)


def _shows_something(rgba: np.ndarray) -> bool:
    """Whether a frame has a visible pixel and more than one colour."""
    opaque = rgba[..., 3] > 0
    return bool(opaque.any()) and float(rgba[..., :3][opaque].std(axis=0).max(initial=0.0)) >= 2.0


def _upright_rgba(im: Image.Image) -> np.ndarray:
    """The current frame of ``im`` as RGBA, turned as its EXIF says, shrunk to
    :data:`MAX_PICTURE_SIDE` (premultiplied, so that transparent pixels' colours do not bleed into
    the character's edge)."""
    picture = eight_bit(ImageOps.exif_transpose(im)).convert("RGBA")
    if max(picture.size) > MAX_PICTURE_SIDE:
        scale = MAX_PICTURE_SIDE / max(picture.size)
        size = (max(1, round(picture.width * scale)), max(1, round(picture.height * scale)))
        picture = picture.convert("RGBa").resize(size, Image.Resampling.LANCZOS).convert("RGBA")
    return np.asarray(picture)


def _name_warnings(ref_dir: Path, names: list[str]) -> list[str]:
    """One line per folder or picture of ``ref_dir`` whose name cannot serve (not UTF-8 text),
    per character of ``names`` whose name holds a comma or a '+', and per group of names that differ only
    by case, spaces, '-' or '_' (a name typed so before it was read as the known one made a
    folder of its own: two characters, two kohya folders, each drawn in stage 08)."""
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(name_key(name), []).append(name)
    return (
        misnamed_references(ref_dir)
        + [
            f"character '{name}': captions are tags parted by commas, so its name reads as "
            f"{name.count(',') + 1} tags there; name its folder without a comma (e.g. '{_uncomma(name)}')"
            for name in names
            if "," in name
        ]
        + [
            f"character '{name}': '+' joins the characters a picture shows in the dataset's kohya "
            f"folders, so its folder reads as {' and '.join(repr(p) for p in name.split('+'))} together; "
            "name its folder without '+'"
            for name in names
            if "+" in name
        ]
        + [
            f"character folders {', '.join(repr(n) for n in sorted(same))} in {ref_dir} are one name "
            "spelt two ways, so two characters: move the pictures of one into the other"
            for same in groups.values()
            if len(same) > 1
        ]
    )


def _uncomma(name: str) -> str:
    """``"Smith, John"`` as ``"John Smith"`` (a "last, first" name), else without its commas."""
    parts = [p.strip() for p in name.split(",") if p.strip()]
    return f"{parts[1]} {parts[0]}" if len(parts) == 2 else " ".join(parts)


def on_grey(rgba: np.ndarray) -> np.ndarray:
    """RGB with transparent parts composited on :data:`GREY`."""
    alpha = rgba[..., 3:4].astype(np.float32) / 255.0
    grey = np.asarray(GREY, np.float32)
    return (rgba[..., :3].astype(np.float32) * alpha + grey * (1.0 - alpha)).round().astype(np.uint8)


def has_transparency(rgba: np.ndarray) -> bool:
    """Whether at least 2% of the picture is (partly) transparent: a sprite, not a photo."""
    return bool((rgba[..., 3] < 250).mean() >= 0.02)


def _largest_parts(mask: np.ndarray, keep: float = 0.1) -> np.ndarray:
    """``mask`` with only its connected parts of at least ``keep`` of its largest part's area (a
    neighbour's arm at the edge of a poster crop is not the character)."""
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    if count <= 2:
        return mask
    areas = stats[1:, cv2.CC_STAT_AREA]
    wanted = 1 + np.flatnonzero(areas >= keep * areas.max())
    return np.isin(labels, wanted)


def _grabcut(small: np.ndarray, inset: float, seed: int) -> tuple[np.ndarray, float] | None:
    """GrabCut from a rectangle ``inset`` inside the picture: the subject's mask and the share of
    the rectangle's edge it covers; None when OpenCV gives up."""
    h, w = small.shape[:2]
    dx, dy = max(1, round(w * inset)), max(1, round(h * inset))
    mask = np.zeros((h, w), np.uint8)
    bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    cv2.setRNGSeed(seed)
    try:
        cv2.grabCut(
            cv2.cvtColor(small, cv2.COLOR_RGB2BGR),
            mask,
            (dx, dy, w - 2 * dx, h - 2 * dy),
            bgd,
            fgd,
            4,
            cv2.GC_INIT_WITH_RECT,
        )
    except cv2.error:
        return None
    subject = (mask == cv2.GC_FGD) | (mask == cv2.GC_PR_FGD)
    edge = np.concatenate(
        [
            subject[dy, dx : w - dx],
            subject[h - dy - 1, dx : w - dx],
            subject[dy : h - dy, dx],
            subject[dy : h - dy, w - dx - 1],
        ]
    )
    return subject, float(edge.mean()) if edge.size else 0.0


def _shrunk(rgb: np.ndarray) -> np.ndarray:
    """``rgb`` at most :data:`GRABCUT_SIDE` pixels on its longer side: what a subject is
    separated on (the mask is scaled back to the picture)."""
    height, width = rgb.shape[:2]
    scale = min(1.0, GRABCUT_SIDE / max(height, width))
    size = (max(8, round(width * scale)), max(8, round(height * scale)))
    return cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)


def grabcut_mask(rgb: np.ndarray, seed: int = 0) -> np.ndarray | None:
    """The subject of an opaque picture as a boolean mask, by GrabCut from a rectangle
    :data:`GRABCUT_INSET` inside the border (from :data:`GRABCUT_TIGHT_INSET` when the subject
    runs along that rectangle: a head crop); None when it finds no plausible subject (under 5% or
    over 95% of the picture)."""
    height, width = rgb.shape[:2]
    small = _shrunk(rgb)
    found = _grabcut(small, GRABCUT_INSET, seed)
    if found is not None and found[1] > GRABCUT_EDGE_SHARE:
        found = _grabcut(small, GRABCUT_TIGHT_INSET, seed)
    if found is None:
        return None
    opened = cv2.morphologyEx(found[0].astype(np.uint8), cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    subject = _largest_parts(opened > 0)
    if not 0.05 <= float(subject.mean()) <= 0.95:
        return None
    return cv2.resize(subject.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST) > 0


def rare_colour_mask(rgb: np.ndarray) -> np.ndarray | None:
    """The subject of an opaque picture as the largest part of the pixels whose colour is rare on
    the picture's border (:data:`BORDER_BAND`, :data:`RARE_SHARE`), or None when that part is
    under or over :data:`RARE_SUBJECT` of the picture.

    Why: GrabCut, started from a rectangle, learns the subject's colours from all of that
    rectangle; in a poster where the character is small among a busy scene whose colours run
    into the rectangle (FLARE's water wyvern among pillars and domes) it calls everything
    background. A poster's border shows its background and rarely the character, so the colours
    the border lacks mark the character (the boundary prior of salient-object detection): the
    water wyvern came out whole, where GrabCut from any rectangle, even one around the wyvern,
    gave nothing. It is only asked when GrabCut finds no subject, so what GrabCut cuts out stays
    as it was."""
    height, width = rgb.shape[:2]
    lab = cv2.cvtColor(_shrunk(rgb), cv2.COLOR_RGB2LAB)
    h, w = lab.shape[:2]
    band = max(2, round(BORDER_BAND * min(h, w)))
    border = np.zeros((h, w), np.uint8)
    border[:band] = border[-band:] = 1
    border[:, :band] = border[:, -band:] = 1
    hist = cv2.calcHist([lab], [0, 1, 2], border, [8, 16, 16], [0, 256, 0, 256, 0, 256])
    hist /= max(float(hist.sum()), 1.0)
    share = hist[lab[..., 0] // 32, lab[..., 1] // 16, lab[..., 2] // 16]
    rare = ((share < RARE_SHARE) & (border == 0)).astype(np.uint8)
    rare = cv2.morphologyEx(rare, cv2.MORPH_CLOSE, np.ones((5, 5), np.uint8))
    subject = _largest_parts(rare > 0, keep=1.0)
    if not RARE_SUBJECT[0] <= float(subject.mean()) <= RARE_SUBJECT[1]:
        return None
    return cv2.resize(subject.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST) > 0


def cut_out(rgba: np.ndarray) -> tuple[np.ndarray, str, tuple[int, int, int, int]]:
    """The character of one picture, cut out: (RGBA cropped to it, how it was separated, its box
    in the picture). Raises :class:`ReferenceProblem` when nothing usable is left."""
    if has_transparency(rgba):
        cut, how = rgba, "transparency"
    else:
        rgb = np.ascontiguousarray(rgba[..., :3])
        if float(rgb.reshape(-1, 3).std(axis=0).max()) < 2.0:
            raise ReferenceProblem("is blank (one colour)")
        mask, how = grabcut_mask(rgb), "grabcut"
        if mask is None:
            mask, how = rare_colour_mask(rgb), "rare colours"
        if mask is None:
            # The whole picture would teach its background as the character.
            raise ReferenceProblem(
                "shows no subject that stands out from its background; crop it closer around the "
                "character or give a picture with transparency"
            )
        alpha = cv2.GaussianBlur(mask.astype(np.uint8) * 255, (3, 3), 0)
        cut = np.dstack([rgb, alpha])
    box = content_box(cut[..., 3])
    if box is None:
        raise ReferenceProblem("shows nothing (fully transparent)")
    left, top, right, bottom = box
    if min(right - left, bottom - top) < MIN_SUBJECT_PX:
        raise ReferenceProblem(
            f"is too small: its subject is {right - left}x{bottom - top} px "
            f"(at least {MIN_SUBJECT_PX} px a side)"
        )
    return np.ascontiguousarray(cut[top:bottom, left:right]), how, box


def photographed_face(rgb: np.ndarray, box: tuple[int, int, int, int]) -> bool:
    """Whether dlib's HOG detector, trained on photographs, also finds the face at ``box``
    (top, right, bottom, left): searched in the face with half its size around it, scaled so the
    face is about 160 px tall (HOG's window is 80 px)."""
    top, right, bottom, left = box
    h, w = bottom - top, right - left
    y0, y1 = max(0, top - h // 2), min(rgb.shape[0], bottom + h // 2)
    x0, x1 = max(0, left - w // 2), min(rgb.shape[1], right + w // 2)
    crop = rgb[y0:y1, x0:x1]
    scale = 160.0 / max(1, h)
    crop = cv2.resize(
        crop, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
    )
    found = dlib_faces.raw_face_locations(np.ascontiguousarray(crop), 0, "hog")
    face = ((top - y0) * scale, (right - x0) * scale, (bottom - y0) * scale, (left - x0) * scale)
    for rect in found:
        other = (rect.top(), rect.right(), rect.bottom(), rect.left())
        inter_h = min(face[2], other[2]) - max(face[0], other[0])
        inter_w = min(face[1], other[1]) - max(face[3], other[3])
        if (
            inter_h > 0
            and inter_w > 0
            and inter_h * inter_w >= 0.3 * (face[2] - face[0]) * (face[1] - face[3])
        ):
            return True
    return False


#: Names the workspace gives appearances it cannot name and the clusters' noise bucket: a
#: character folder of that name would be merged with them in every table and count.
RESERVED_NAMES = ("unknown", "noise")


def _check_file(path: Path) -> None:
    """A :class:`ReferenceProblem` for a file that is no picture the loader reads, saying what to
    do about it."""
    suffix = path.suffix.lower()
    if path.is_symlink() and not path.exists():
        raise ReferenceProblem(
            f"is a link to a missing file ({os.readlink(path)}); copy the picture itself here"
        )
    if suffix in PHOTO_ONLY_SUFFIXES:
        # A phone's own format (iPhones save HEIC): no wheel here reads it.
        raise ReferenceProblem(
            f"is a {suffix[1:].upper()} photo, which is not read; save it as JPEG "
            "or PNG (a phone's share or export menu does)"
        )
    if suffix in (".svg", ".svgz"):
        # A cartoon character from a wiki or a vector editor: drawn in lines, no pixels.
        raise ReferenceProblem(
            "is a vector drawing (SVG), which is not read; export it as PNG (a browser, "
            "Inkscape or the editor it came from does), with a transparent background"
        )
    if suffix not in REFERENCE_SUFFIXES:
        raise ReferenceProblem(
            f"is not a picture the workspace reads ({path.suffix or 'no extension'}); if it is one, "
            f"rename it to end in .png or .jpg"
        )
    info = path.stat()
    if not stat.S_ISREG(info.st_mode):  # a pipe's read waits for a writer: the run hung there
        raise ReferenceProblem("is not a file (a pipe or a device); put the picture itself here")
    if info.st_size == 0:
        raise ReferenceProblem("is empty (0 bytes: a download or copy that failed); copy the picture again")


def _screened(
    pictures_of: dict[str, list[Path]], folders_of: dict[str, list[Path]]
) -> tuple[dict[str, list[Path]], list[str], dict[str, list[Taken]]]:
    """``pictures_of`` less what cannot be a character's picture, one line for each and a ``left
    out`` row per picture (per character, for the reference sheet and ``references_taken``, which
    show what was taken from every picture: without them a character's "N of M pictures used"
    missed its doubled pictures): a folder whose name is one the workspace keeps for unnamed
    appearances (or only spaces), a picture found under two characters (one drawing taught as
    each of them makes the fit learn to tell it from itself; the same face photo gives two
    characters one encoding), and a picture's second copy in one character. A user copying a
    sprite into the wrong folder is told which files, and keeps the folder it belongs in."""
    kept: dict[str, list[Path]] = {}
    warnings = []
    left: dict[str, list[Taken]] = {}
    for name, files in pictures_of.items():
        if not name or name.casefold() in RESERVED_NAMES:
            what = (
                f"'{name}' is what the workspace calls the appearances it cannot name"
                if name
                else "its name is blank"
            )
            warnings.append(
                f"character folder {shown(folders_of[name][0])}: {what}; rename the folder; left out"
            )
            problem = f"is in a folder that cannot name a character ({what}); rename the folder"
            left[name] = [Taken(path, name, "left out", "", None, problem) for path in files]
        else:
            kept[name] = files
    owners: dict[bytes, list[tuple[str, Path]]] = {}
    for name, files in kept.items():
        for path in files:
            try:
                # Only what may be a picture: two empty files or two copies of one note were "one
                # picture under 2 characters", and what they are went unsaid.
                _check_file(path)
                owners.setdefault(file_digest(path), []).append((name, path))
            except (OSError, ReferenceProblem):
                continue  # read again, and named, when it is loaded
    doubled: set[Path] = set()
    for group in owners.values():
        names = sorted({n for n, _ in group})
        if len(names) == 1 and len(group) > 1:
            # One picture twice in one folder (a copy, a link to it beside it): taught twice as
            # often as the character's other pictures. Taken once (the file itself rather than a
            # link to it), the others named.
            name, first = names[0], min((p for _, p in group), key=_first_kept)
            again = sorted(p for _, p in group if p != first)
            doubled |= set(again)
            warnings.append(
                f"references {', '.join(shown(p) for p in again)} of '{name}' are the same picture as "
                f"{shown(first)}; it is taken once"
            )
            problem = f"is the same picture as {shown(first)}, which is taken"
            left.setdefault(name, []).extend(Taken(p, name, "left out", "", None, problem) for p in again)
        if len(names) > 1:
            doubled |= {p for _, p in group}
            what = f"one picture under {len(names)} characters ({', '.join(names)})"
            warnings.append(
                f"references {', '.join(shown(p) for _, p in group)} are {what}; keep it only in "
                "the folder of the character it shows; left out"
            )
            problem = f"is {what}; keep it only in the folder of the character it shows"
            for name, path in group:
                left.setdefault(name, []).append(Taken(path, name, "left out", "", None, problem))
    kept = {n: [p for p in files if p not in doubled] for n, files in kept.items()}
    return kept, warnings, left


def _first_kept(path: Path) -> tuple[bool, bool, Path]:
    """Which of a picture's copies in one folder is taken: one whose name says it is a picture
    (a copy saved without its extension is refused later, and the good one was left out for
    it), the file itself rather than a link to it, then the first by name."""
    return path.suffix.lower() not in REFERENCE_SUFFIXES, path.is_symlink(), path


def _folder_warnings(ref_dir: Path, names: list[str], unreadable: dict[Path, str]) -> list[str]:
    """The lines about ``ref_dir`` as a whole, before any picture is read: names that cannot
    serve (:func:`_name_warnings`), pictures beside the character folders rather than in one
    (:func:`~diffusion_bunny.models.faces.loose_pictures`) and folders whose pictures are not read
    (``unreadable``, from :func:`~diffusion_bunny.models.faces.walk_references`)."""
    return (
        _name_warnings(ref_dir, names)
        + loose_pictures(ref_dir)
        + hidden_folders(ref_dir)
        + [
            f"reference folder {shown(path)} {why}"
            + ("" if why.endswith(LOOP_READ_ONCE) else "; its pictures are left out")
            + (
                ": fix its permissions (or copy them into a folder of your own)"
                if why.startswith("cannot")
                else ""
            )
            for path, why in unreadable.items()
        ]
        + dead_folder_links(ref_dir)
    )


#: Differing bits of two pictures' difference hashes up to which they are one photo: a copy
#: re-saved as JPEG or WebP, halved or mirrored differs in 0-2 of 64 (face_recognition's example
#: photos), two photos, of one person or of two, in 23 or more; of the face crops a named cluster
#: saves from the face truth set, the darkened, mirrored and shrunk copies of one photo 0-4, crops
#: of two photos 14 or more.
SAME_PHOTO_BITS = 6
#: dlib distances between a photo's face and its copy's: re-saved or halved 0.03-0.15, mirrored
#: 0.14-0.23, cropped closer 0.04; between two photos of one person 0.35-0.44 (the same examples).
SAME_PHOTO_DISTANCE = 0.3
CROP_DISTANCE = 0.15


def picture_hash(rgb: np.ndarray) -> np.ndarray:
    """A picture's difference hash (64 bits: is each pixel of a 9x8 grey copy brighter than its
    right neighbour), and its mirror image's below it. Of the whole picture, not of the face the
    detector boxes: boxes found on a copy move by a few pixels, and a face crop's hash with them."""
    small = cv2.resize(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), (9, 8), interpolation=cv2.INTER_AREA)
    small = small.astype(np.int16)
    mirrored = small[:, ::-1]
    return np.stack([(small[:, 1:] > small[:, :-1]).ravel(), (mirrored[:, 1:] > mirrored[:, :-1]).ravel()])


def same_photo(
    mine: tuple[np.ndarray, np.ndarray], others: list[tuple[Path, np.ndarray, np.ndarray]]
) -> Path | None:
    """The picture among ``others`` (path, :func:`picture_hash`, face encoding) that is the same
    photo as ``mine`` (its hash and encoding), or None: a copy re-saved, resized or mirrored (the
    pictures' hashes within :data:`SAME_PHOTO_BITS` and the faces within
    :data:`SAME_PHOTO_DISTANCE`: two small photos on one plain page hash alike), or a crop of it
    (the faces within :data:`CROP_DISTANCE`, whatever the hashes). Why: a copy beside the one photo
    of a person made the references look in close agreement, and the adaptive threshold
    (:func:`~diffusion_bunny.stages.characters.identify.character_thresholds`) fell to
    ``min_threshold``: the Hamilton clip's singer, 0.44-0.47 from his photo, was named nowhere."""
    hashed, encoding = mine
    for path, theirs, their_encoding in others:
        distance = float(np.linalg.norm(encoding - their_encoding))
        alike = int((hashed != theirs[0]).sum(axis=1).min()) <= SAME_PHOTO_BITS
        if distance < CROP_DISTANCE or (alike and distance < SAME_PHOTO_DISTANCE):
            return path
    return None


def _in_file_pixels(box: tuple[int, int, int, int], scale: float) -> tuple[int, int, int, int]:
    """A box found in a picture read shrunk by ``scale`` (:func:`read_shrunk`), in the file's own
    upright pixels, where the reference sheet crops it."""
    if scale == 1.0:
        return box
    return tuple(round(v / scale) for v in box)  # type: ignore[return-value]


#: Across two characters' folders (human faces, dlib distances): a picture this near another
#: character's picture, and this far from its own character's others, is of that other person
#: (a photo put in the wrong folder); two characters whose pictures come this near look like one
#: person under two names. Measured (2026-12-02) on the MIT-licensed face_recognition examples,
#: five people with 2-3 photos each: photos of one person 0.35-0.44 apart (0.39 across two
#: folders of one man), of two people 0.70 or more; a photo moved into another person's folder
#: 0.44 from its own person's, 0.79-0.85 from its new folder's. dlib's own tolerance is 0.6.
LIKE_ANOTHER = 0.5
UNLIKE_OWN = 0.6
ONE_PERSON = 0.45

_Human = tuple[Path, np.ndarray, tuple[int, int, int, int], np.ndarray]


def load_character_references(ref_dir: Path, settings) -> tuple[object, ReferencePictures, list[str]]:
    """Every picture under ``ref_dir`` (one sub-folder per character): the human faces' encodings
    (a :class:`~diffusion_bunny.models.faces.ReferenceSet`), the drawn characters' cut-outs and
    what was taken from each picture, and one warning per picture or character that gives nothing.
    ``settings`` are stage 03's :class:`~diffusion_bunny.models.faces.DetectSettings`."""
    faces = ReferenceSet()
    pictures = ReferencePictures()
    warnings: list[str] = []
    encodings: list[np.ndarray] = []
    owners: list[int] = []
    ref_settings = replace(settings, min_face_px=0)  # portraits are often small; no minimum size
    (given, unreadable), folders_of = walk_references(ref_dir), character_folders(ref_dir)
    pictures_of, screened, left_out = _screened(given, folders_of)
    warnings += _folder_warnings(ref_dir, list(pictures_of), unreadable) + screened
    read: dict[str, tuple[list[_Human], list[Taken], dict[Path, np.ndarray]]] = {}
    for name, files in pictures_of.items():
        pictures.taken += left_out.pop(name, [])  # its doubled pictures
        read[name] = _read_pictures(name, files, ref_settings, pictures, warnings)
    dropped = _across_characters(
        {n: [(h[0], h[1]) for h in r[0]] for n, r in read.items()}, pictures, warnings
    )
    for name, (human, cutouts, cut) in read.items():
        kept = [h for h in human if h[0] not in dropped]
        if kept:
            index = len(faces.names)
            faces.names.append(name)
            for path, encoding, box, _ in kept:
                encodings.append(encoding)
                owners.append(index)
                faces.files.append(str(path))
                pictures.taken.append(Taken(path, name, "face", "face box", box))
        if human:  # a person's character: its pictures without a photographed face say nothing
            for taken in cutouts:
                problem = (
                    "shows no face a detector of photographs finds, while the character's other "
                    "pictures are of a human face"
                )
                pictures.taken.append(Taken(taken.path, name, "left out", "", None, problem))
                warnings.append(f"reference {taken.path} {problem}; left out")
            if not kept:
                warnings.append(
                    f"character '{name}' has no usable reference picture in {folders_of[name][0]}"
                )
        elif cutouts:
            pictures.cutouts[name] = [cut[t.path] for t in cutouts]
            pictures.taken.extend(cutouts)
        elif given[name] or holds_any(folders_of[name], misnamed_paths(ref_dir)):
            warnings.append(f"character '{name}' has no usable reference picture in {folders_of[name][0]}")
        elif not holds_any(folders_of[name], unreadable):
            warnings.append(f"character folder {folders_of[name][0]} is empty; add reference pictures to it")
    pictures.taken += [t for rows in left_out.values() for t in rows]  # folders of reserved names
    if encodings:
        faces.encodings = np.stack(encodings).astype(np.float32)
        faces.owners = np.asarray(owners, dtype=np.int64)
    return faces, pictures, warnings


def _read_pictures(
    name: str, files: list[Path], ref_settings, pictures: ReferencePictures, warnings: list[str]
) -> tuple[list[_Human], list[Taken], dict[Path, np.ndarray]]:
    """One character's pictures read: its photographed faces (path, encoding, box, hash), its
    cut-outs and their pixels; a picture that gives nothing is left out with one line."""
    human: list[_Human] = []
    cutouts: list[Taken] = []
    cut: dict[Path, np.ndarray] = {}
    for path in files:
        try:
            _check_file(path)
            rgba, scale = read_shrunk(path)
            rgb = on_grey(rgba)
            found = portrait_faces(rgb, ref_settings)  # transparent too: a cut-out portrait
            photographed = [f for f in found if photographed_face(rgb, (f.top, f.right, f.bottom, f.left))]
            if len(photographed) > 1:
                raise ReferenceProblem(f"shows {len(photographed)} faces (a reference must show one)")
            if photographed:
                f = photographed[0]
                box = _in_file_pixels((f.left, f.top, f.right, f.bottom), scale)
                hashed = picture_hash(rgb)
                copy = same_photo((hashed, f.encoding), [(p, h, e) for p, e, _, h in human])
                if copy is not None:
                    raise ReferenceProblem(f"is the same photo as {copy.name} (a copy adds nothing)")
                human.append((path, f.encoding, box, hashed))
                continue
            cutout, how, box = cut_out(rgba)
            box = _in_file_pixels(box, scale)
        except ReferenceProblem as problem:
            pictures.taken.append(Taken(path, name, "left out", "", None, str(problem)))
            warnings.append(f"reference {path} {problem}; left out")
            continue
        cut[path] = cutout
        cutouts.append(Taken(path, name, "cutout", how, box))
    return human, cutouts, cut


def _across_characters(
    faces_of: dict[str, list[tuple[Path, np.ndarray]]], pictures: ReferencePictures, warnings: list[str]
) -> set[Path]:
    """The photographed faces of every character held against the other characters': the
    pictures left out, each with one line, and a line per two characters that look like one.

    Why: a photo of someone else in a character's folder was taken in silence; it widened that
    character's threshold and named the other person as them (Biden named Obama in 3 of his 5
    shots). The same face under two names (a copy, a crop) is left out of both; a picture near
    another character's and unlike its own character's others (:data:`LIKE_ANOTHER`,
    :data:`UNLIKE_OWN`) is left out of its folder; two characters whose pictures come within
    :data:`ONE_PERSON` are said (one man's photos in two folders split his faces between them)."""
    everyone = [(name, path) for name, rows in faces_of.items() for path, _ in rows]
    if not everyone:
        return set()
    encodings = np.stack([enc for rows in faces_of.values() for _, enc in rows])
    apart = np.linalg.norm(encodings[:, None, :] - encodings[None, :, :], axis=2)  # every pair, once
    names = np.array([name for name, _ in everyone])
    dropped: dict[Path, tuple[str, str]] = {}
    for i, (name, path) in enumerate(everyone):
        own, others = (names == name), (names != name)
        own[i] = False
        if not others.any():
            continue
        j = int(np.flatnonzero(others)[np.argmin(apart[i, others])])
        distance, (other, theirs) = float(apart[i, j]), everyone[j]
        if distance < CROP_DISTANCE:
            dropped[path] = (
                name,
                f"is the same face as {theirs} (of '{other}'): one face cannot name two characters",
            )
        elif own.any() and apart[i, own].min() >= UNLIKE_OWN and distance < LIKE_ANOTHER:
            dropped[path] = (
                name,
                f"looks like '{other}' ({distance:.2f} from {theirs.name}), unlike the other pictures of "
                f"'{name}' ({apart[i, own].min():.2f} or more apart): move it to {other}'s folder if it "
                "is of them",
            )
    for path, (name, problem) in dropped.items():
        pictures.taken.append(Taken(path, name, "left out", "", None, problem))
        warnings.append(f"reference {path} {problem}; left out")
    kept = np.array([path not in dropped for _, path in everyone])
    for a, b in itertools.combinations(sorted(set(names[kept])), 2):
        distance = float(apart[np.ix_(kept & (names == a), kept & (names == b))].min())
        if distance < ONE_PERSON and name_key(a) != name_key(b):  # one name spelt two ways: said
            warnings.append(
                f"characters '{a}' and '{b}' look like one person (pictures {distance:.2f} apart; two "
                f"people's are {UNLIKE_OWN} or more): merge their folders if they are, or each face is "
                "named either"
            )
    return set(dropped)
