"""Stage 03's face truth set and how a detector is scored on it.

The set lives in ``test/stages/characters/data/face_truth/`` (``truth.json`` beside 44 small JPEGs,
built by ``python_script/make_face_truth.py`` from ../shared/testdata: source frames boxed by hand,
harder frames derived from them). A detection matches a counted face at IoU >= 0.4 (one-to-one,
best overlap first); a detection on an ``ignore`` face is neither a hit nor a false positive.
Recall is broken down by face height (pixels of the frame as stored) and by pose, and by the
kind of frame (source, rotated, small, dark, mirrored, cut, crop).

The fit and held-out parts (:data:`HOLD_OUT`) are split by origin, never frame by frame. The set
comes from three origins: the Hamilton clip (one stage and one audience, its frames seconds
apart), the photos of Obama, Biden and Alex Lacamoire, and the photos of Kit Harington and Rose
Leslie. The first two share people: Barack and Michelle Obama sit in the clip's audience
(hamilton_f225) and Alex Lacamoire is its pianist (hamilton_f000). A frame held out from a clip
whose other frames are fitted, or a photo of someone fitted on, does not test what was fitted
(the same light, camera and faces), so the held-out part is the one origin that shares no clip and no
person with the rest: the Kit Harington and Rose Leslie photos and every frame made from them
(``people`` in ``sources.json`` records who is in each source; :func:`split_overlap` checks it).
It is small (7 frames, 12 counted faces, 8 of them >= 32 px): one face there moves recall by an
eighth. The detector and its settings were chosen while these frames were still in the fit part,
so its figures check a part with no clip or person in common, not a part no choice has seen.

``python_script/eval_faces.py`` prints the table for every detector, fit and held-out apart; the
tests hold a floor.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from diffusion_bunny.models.faces import detect, detect_and_encode, read_rgb
from diffusion_bunny.paths import workspace_root

TRUTH_DIR = Path("test") / "stages" / "characters" / "data" / "face_truth"
#: Where eval_faces.py writes the table that notebook 03 and docs/face-detectors.md show.
RESULTS_FILE = "eval_results.json"
IOU = 0.4
#: Face height buckets (pixels): lower bounds.
SIZE_BUCKETS = ((0, "<32"), (32, "32-63"), (64, "64-127"), (128, "128+"))
POSES = ("frontal", "three-quarter", "profile", "down")
KINDS = ("source", "rot", "small", "dark", "mirror", "cut", "crop", "noface")
#: The sources whose frames (and the frames made from them) are kept out of fitting: the one
#: origin that shares no clip and no person with the others (the module's docstring says why).
HOLD_OUT = ("kit_with_rose", "johnsnow_test1", "kit_john1")


def truth_dir(root: Path | None = None) -> Path:
    """The truth set's folder in this checkout."""
    return (root or workspace_root()) / TRUTH_DIR


def load_truth(folder: Path | None = None) -> dict[str, Any]:
    """``truth.json`` with each frame's source name added (``source``: the frame it derives from)."""
    folder = folder or truth_dir()
    truth = json.loads((folder / "truth.json").read_text())
    for frame in truth["frames"]:
        frame["source"] = frame["file"].removesuffix(".jpg") if frame["kind"] == "source" else frame["from"]
    return truth


def iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """IoU of two (left, top, right, bottom) boxes."""
    x0, y0 = max(a[0], b[0]), max(a[1], b[1])
    x1, y1 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x1 - x0) * max(0.0, y1 - y0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def size_bucket(height: float) -> str:
    """The :data:`SIZE_BUCKETS` label of a face ``height`` px tall."""
    label = SIZE_BUCKETS[0][1]
    for low, name in SIZE_BUCKETS:
        if height >= low:
            label = name
    return label


def match_frame(faces: list[dict], boxes: list[tuple[float, ...]], threshold: float = IOU):
    """One frame: ``(hit per face, kind per detection)`` where a detection is ``"hit"``,
    ``"ignored"`` (it lies on an ignored face) or ``"false"``. Greedy one-to-one, best IoU first."""
    pairs = sorted(
        ((iou(f["box"], b), i, j) for i, f in enumerate(faces) for j, b in enumerate(boxes)), reverse=True
    )
    hit = [False] * len(faces)
    kind = ["false"] * len(boxes)
    used: set[int] = set()
    for overlap, i, j in pairs:
        if overlap < threshold or hit[i] or j in used:
            continue
        hit[i] = True
        used.add(j)
        kind[j] = "ignored" if faces[i].get("ignore") else "hit"
    return hit, kind


@dataclass
class Score:
    """Counts over a set of frames, and recall per bucket."""

    faces: int = 0
    found: int = 0
    detections: int = 0
    false: int = 0
    buckets: dict[str, list[int]] = field(default_factory=dict)

    def add_bucket(self, name: str, hit: bool) -> None:
        entry = self.buckets.setdefault(name, [0, 0])
        entry[0] += int(hit)
        entry[1] += 1

    def __iadd__(self, other: Score) -> Score:
        """Another score's counts added to these (the same frames searched another way)."""
        self.faces += other.faces
        self.found += other.found
        self.detections += other.detections
        self.false += other.false
        for name, (found, count) in other.buckets.items():
            entry = self.buckets.setdefault(name, [0, 0])
            entry[0] += found
            entry[1] += count
        return self

    @property
    def recall(self) -> float:
        return self.found / self.faces if self.faces else float("nan")

    @property
    def precision(self) -> float:
        kept = self.found + self.false
        return self.found / kept if kept else float("nan")

    def bucket_recall(self, name: str) -> float:
        found, total = self.buckets.get(name, (0, 0))
        return found / total if total else float("nan")


def score(
    truth: dict[str, Any],
    detections: dict[str, list[tuple[float, float, float, float, float]]],
    *,
    min_score: float = 0.0,
    frames: set[str] | None = None,
) -> Score:
    """Score ``detections`` (file -> [(left, top, right, bottom, score)]) against the truth,
    keeping detections scoring at least ``min_score``, over ``frames`` (files) or all."""
    out = Score()
    for frame in truth["frames"]:
        if frames is not None and frame["file"] not in frames:
            continue
        boxes = [d[:4] for d in detections.get(frame["file"], []) if d[4] >= min_score]
        hit, kind = match_frame(frame["faces"], boxes)
        out.detections += len(boxes)
        out.false += kind.count("false")
        for face, found in zip(frame["faces"], hit, strict=True):
            if face.get("ignore"):
                continue
            out.faces += 1
            out.found += int(found)
            height = face["box"][3] - face["box"][1]
            out.add_bucket(size_bucket(height), found)
            if height >= 32:
                out.add_bucket(">=32", found)
            out.add_bucket(face["pose"], found)
            out.add_bucket(f"kind:{frame['kind']}", found)
    return out


def held_out_files(truth: dict[str, Any], hold_out: tuple[str, ...] = HOLD_OUT) -> tuple[set[str], set[str]]:
    """(fit files, held-out files): frames of the ``hold_out`` sources and everything derived
    from them are held out of any fitting."""
    held = {f["file"] for f in truth["frames"] if f["source"] in hold_out}
    return {f["file"] for f in truth["frames"]} - held, held


def load_sources(folder: Path | None = None) -> list[dict[str, Any]]:
    """``sources.json``'s source frames: where each comes from (``video`` or ``photo``), who is in
    it (``people``) and its hand-drawn boxes."""
    return json.loads(((folder or truth_dir()) / "sources.json").read_text())["sources"]


def split_overlap(sources: list[dict[str, Any]], hold_out: tuple[str, ...] = HOLD_OUT) -> dict[str, set[str]]:
    """What the held-out sources share with the fit ones: ``clips`` (videos both take frames
    from) and ``people`` (people in both). Both empty for a split whose held-out part tests
    faces, light and cameras nothing was fitted on."""
    parts: dict[bool, dict[str, set[str]]] = {
        held: {"clips": set(), "people": set()} for held in (True, False)
    }
    for src in sources:
        part = parts[src["name"] in hold_out]
        if "video" in src:
            part["clips"].add(src["video"])
        part["people"].update(src["people"])
    return {key: parts[True][key] & parts[False][key] for key in ("clips", "people")}


def read_results(root: Path | None = None) -> dict[str, Any] | None:
    """The table eval_faces.py last wrote, or None when this checkout has none."""
    path = truth_dir(root) / RESULTS_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def boxes_of(detections: list[Any]) -> list[tuple[float, float, float, float, float]]:
    """:class:`~diffusion_bunny.models.face_detect.Detection` s (or faces with top/right/bottom/
    left and score) as (left, top, right, bottom, score) rows for :func:`score`."""
    rows = []
    for d in detections:
        top, right, bottom, left = d.box if hasattr(d, "box") else (d.top, d.right, d.bottom, d.left)
        rows.append((float(left), float(top), float(right), float(bottom), float(getattr(d, "score", 1.0))))
    return rows


def summary_row(s: Score) -> dict[str, float]:
    """The figures of one table row."""
    row = {"recall": s.recall, "precision": s.precision, "faces": s.faces, "false": s.false}
    for name in ("<32", "32-63", "64-127", "128+", ">=32", *POSES, *(f"kind:{k}" for k in KINDS)):
        row[name] = s.bucket_recall(name)
    return {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in row.items()}


# ---------------------------------------------------------------------------------------------
# Running detectors on the set (eval_faces.py, notebook 03, the tests)

#: The frames of the truth set are stored at (at most) 640 px, the width stage 03's detectors look
#: at (``characters.detect_width``); they stand for 1280x720 frames, so face sizes set in
#: full-resolution pixels (``min_face_px``) are halved on them.
FRAME_720P = (1280, 720)


def truth_settings(settings: Any) -> Any:
    """``settings`` as they act on a 720p frame, applied to a truth frame (half its size)."""
    scale = settings.detect_width / FRAME_720P[0] if settings.detect_width else 1.0
    return replace(settings, min_face_px=round(settings.min_face_px * scale))


def detect_truth(
    settings: Any, truth: dict[str, Any] | None = None, folder: Path | None = None, *, scale: float = 1.0
):
    """Every frame of the truth set through stage 03's detection (:func:`~diffusion_bunny.models.
    faces.detect`, no encoding): ``{file: [(left, top, right, bottom, score)]}``.

    ``scale``: each frame resized by it first (and searched at that size, boxes mapped back), so
    that its faces fall between an image pyramid's levels differently: a setting that only won
    by where the truth's few faces happen to sit against the pyramid does not hold at other
    scales (:func:`multi_scale_score`)."""
    folder = folder or truth_dir()
    truth = truth or load_truth(folder)
    on_truth = truth_settings(settings)
    if scale != 1.0:
        on_truth = replace(on_truth, detect_width=0)
    out = {}
    for frame in truth["frames"]:
        rgb = read_rgb(folder / frame["file"])
        if scale != 1.0:
            size = (round(rgb.shape[1] * scale), round(rgb.shape[0] * scale))
            rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
        out[frame["file"]] = [
            (left / scale, top / scale, right / scale, bottom / scale, s)
            for left, top, right, bottom, s in boxes_of(detect(rgb, on_truth))
        ]
    return out


#: The scales :func:`multi_scale_score` searches the truth set at (besides 1).
SCALES = (0.84, 0.92, 1.09, 1.19)


def multi_scale_score(settings: Any, truth: dict[str, Any], scales: tuple[float, ...] = SCALES) -> Score:
    """One :class:`Score` summed over the truth set searched at 1 and each of ``scales``."""
    return summed_score(truth, [detect_truth(settings, truth, scale=scale) for scale in (1.0, *scales)])


def summed_score(
    truth: dict[str, Any], searches: list[dict[str, list]], frames: set[str] | None = None
) -> Score:
    """One :class:`Score` summed over several searches of the truth set (each ``{file: boxes}``,
    e.g. one per scale), over ``frames`` (files) or all."""
    total = Score()
    for found in searches:
        total += score(truth, found, frames=frames)
    return total


def box_offsets(truth: dict[str, Any], detections: dict[str, list], files: set[str]) -> tuple[float, ...]:
    """Median (left, top, right, bottom) moves, in box widths and heights, that take a detector's
    boxes onto the truth's (frontal and three-quarter faces matched at IoU > 0.2, on ``files``):
    how models/blazeface.py's ``BOX_TO_FACE`` was fitted."""
    rows = []
    for frame in truth["frames"]:
        if frame["file"] not in files:
            continue
        for left, top, right, bottom, _ in detections.get(frame["file"], []):
            w, h = right - left, bottom - top
            for face in frame["faces"]:
                if face.get("ignore") or face.get("cut") or face["pose"] == "profile":
                    continue
                if w > 0 and h > 0 and iou(face["box"], (left, top, right, bottom)) > 0.2:
                    fl, ft, fr, fb = face["box"]
                    rows.append(((fl - left) / w, (ft - top) / h, (fr - right) / w, (fb - bottom) / h))
    return tuple(round(float(v), 3) for v in np.median(np.asarray(rows), axis=0)) if rows else (0.0,) * 4


def write_720p(folder: Path, truth: dict[str, Any] | None = None, source: Path | None = None) -> list[Path]:
    """Each truth frame scaled to fit 1280x720 and padded to it, as JPEGs in ``folder``: the
    frames the speed of a detector is measured on."""
    source = source or truth_dir()
    truth = truth or load_truth(source)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    width, height = FRAME_720P
    for frame in truth["frames"]:
        bgr = cv2.imread(str(source / frame["file"]))
        s = min(width / bgr.shape[1], height / bgr.shape[0])
        big = cv2.resize(
            bgr, (round(bgr.shape[1] * s), round(bgr.shape[0] * s)), interpolation=cv2.INTER_CUBIC
        )
        canvas = np.zeros((height, width, 3), np.uint8)
        y, x = (height - big.shape[0]) // 2, (width - big.shape[1]) // 2
        canvas[y : y + big.shape[0], x : x + big.shape[1]] = big
        path = folder / frame["file"]
        cv2.imwrite(str(path), canvas, [cv2.IMWRITE_JPEG_QUALITY, 90])
        out.append(path)
    return out


def _speed_init(settings: Any) -> None:
    # One thread per worker process, as stage 03's pool (torch reads this when first imported).
    os.environ["OMP_NUM_THREADS"] = "1"
    cv2.setNumThreads(1)


def _speed_job(job: tuple[str, Any, bool]) -> int:
    """Worker: read one JPEG, find its faces (and encode them with ``encode``); the face count."""
    path, settings, encode = job
    rgb = read_rgb(path)
    return len(detect_and_encode(rgb, settings) if encode else detect(rgb, settings))


def frames_per_second(
    settings: Any, paths: list[Path], *, workers: int = 2, encode: bool = True, repeat: int = 1
) -> float:
    """Frames/s of stage 03's per-frame step on ``paths`` (read the JPEG, detect, and with
    ``encode`` encode the faces found) on a pool of ``workers`` processes, as the stage runs it.
    The pool is warmed first (every worker has loaded its models), so the figure is the steady
    rate of a movie's thousands of frames, not a worker's start."""
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_speed_init, initargs=(settings,)) as pool:
        list(pool.map(_speed_job, [(str(p), settings, encode) for p in paths[: 2 * workers]]))
        jobs = [(str(p), settings, encode) for p in paths] * repeat
        started = time.perf_counter()
        list(pool.map(_speed_job, jobs, chunksize=2))
        return len(jobs) / (time.perf_counter() - started)
