"""BlazeFace, MediaPipe's face detector, from the ``.tflite`` files inside the ``mediapipe`` wheel,
rewritten as ONNX graphs (:func:`~.tflite_graph.tflite_to_onnx`) and run by ONNX Runtime, without
MediaPipe's own Python API.

Why not ``mediapipe.solutions.face_detection``: mediapipe 0.10.14 is the last wheel that ships
``face_detection_short_range.tflite`` and ``face_detection_full_range_sparse.tflite``, and its
Python API needs protobuf < 5 (its graph runs, then reading the result calls
``SymbolDatabase.GetPrototype``, which protobuf 5 removed), while onnx and tensorboard here need
protobuf >= 6. So the wheel is installed for its model files only (pyproject.toml says how) and
the few steps of MediaPipe's graph around the network are written out below, from its
``face_detection_*.pbtxt`` settings: letterbox the image into the model's square input, scale
it to [-1, 1], decode the boxes and 6 keypoints against SSD anchors, and merge overlapping boxes
by MediaPipe's weighted non-maximum suppression.

Models: ``full`` (``face_detection_full_range_sparse``, 192x192, faces up to about 5 m from the
camera, the one for films) and ``short`` (128x128, selfie distance). A frame whose faces are
small against it is also searched in overlapping square tiles (``tile``): the full-range model sees
a 640x360 frame at 192x108, where a 32-px face is 10 px; a 360-px tile shows it at 17 px.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np
from pydantic import Field

from diffusion_bunny.models.face_common import Detection, FaceDetectorSettings, clip_box, package_file
from diffusion_bunny.models.onnx_graph import cpu_session
from diffusion_bunny.models.tflite_graph import tflite_to_onnx
from diffusion_bunny.registry import FACE_DETECTORS

MEDIAPIPE_DIR = "modules/face_detection"


@dataclass(frozen=True)
class BlazeModel:
    """One BlazeFace variant and the settings of its MediaPipe graph."""

    file: str
    size: int
    strides: tuple[int, ...]
    #: Anchors per grid cell of each stride (MediaPipe's SsdAnchorsCalculator with
    #: fixed_anchor_size: every anchor is 1x1, only the centres differ).
    per_cell: int
    min_score: float


MODELS = {
    # face_detection_short_range.pbtxt: num_layers 4, strides [8, 16, 16, 16],
    # interpolated_scale_aspect_ratio 1.0 -> 2 anchors per layer and cell; min_score_thresh 0.5.
    "short": BlazeModel("face_detection_short_range.tflite", 128, (8, 16, 16, 16), 2, 0.5),
    # face_detection_full_range.pbtxt: one layer of stride 4, one anchor per cell; 0.6.
    "full": BlazeModel("face_detection_full_range_sparse.tflite", 192, (4,), 1, 0.6),
}
#: MediaPipe's NonMaxSuppressionCalculator for faces: weighted, IoU threshold 0.3.
NMS_IOU = 0.3
#: BlazeFace's box runs from the brows to below the mouth, squarer than a face; these move its
#: left, top, right and bottom edges (in box widths and heights) to the forehead-to-chin box
#: stage 03 and the face truth set use (MTCNN's and the truth's boxes agree to 1 %). Medians over
#: the fit frames of the truth set (held-out sources excluded; eval_faces.py --fit-boxes).
BOX_TO_FACE = (0.086, -0.129, -0.042, 0.0)


def anchors(model: BlazeModel) -> np.ndarray:
    """``[n, 2]`` anchor centres (x, y) in [0, 1], in the network's output order."""
    out = []
    strides = list(model.strides)
    i = 0
    while i < len(strides):
        # Consecutive layers of one stride share a grid (SsdAnchorsCalculator merges them).
        j = i
        while j < len(strides) and strides[j] == strides[i]:
            j += 1
        grid = math.ceil(model.size / strides[i])
        per_cell = model.per_cell * (j - i)
        ys, xs = np.meshgrid((np.arange(grid) + 0.5) / grid, (np.arange(grid) + 0.5) / grid, indexing="ij")
        centres = np.stack([xs.ravel(), ys.ravel()], axis=1)
        out.append(np.repeat(centres, per_cell, axis=0))
        i = j
    return np.concatenate(out).astype(np.float32)


def weighted_nms(boxes: np.ndarray, scores: np.ndarray, points: np.ndarray, iou: float = NMS_IOU):
    """MediaPipe's weighted non-maximum suppression: the best remaining face takes every box that
    overlaps it by more than ``iou`` and becomes their score-weighted mean (box and keypoints),
    with its own score. ``boxes`` are ``[n, 4]`` (x0, y0, x1, y1)."""
    order = np.argsort(-scores)
    boxes, scores, points = boxes[order], scores[order], points[order]
    kept_boxes, kept_scores, kept_points = [], [], []
    alive = np.ones(len(boxes), bool)
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    for k in range(len(boxes)):
        if not alive[k]:
            continue
        x0 = np.maximum(boxes[k, 0], boxes[:, 0])
        y0 = np.maximum(boxes[k, 1], boxes[:, 1])
        x1 = np.minimum(boxes[k, 2], boxes[:, 2])
        y1 = np.minimum(boxes[k, 3], boxes[:, 3])
        inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
        overlap = inter / np.maximum(areas[k] + areas - inter, 1e-9)
        group = alive & (overlap > iou)
        group[k] = True
        w = scores[group][:, None]
        kept_boxes.append((boxes[group] * w).sum(0) / w.sum())
        kept_points.append((points[group] * w[:, :, None]).sum(0) / w.sum())
        kept_scores.append(scores[k])
        alive &= ~group
    if not kept_boxes:
        return np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros((0, 6, 2), np.float32)
    return np.stack(kept_boxes), np.asarray(kept_scores), np.stack(kept_points)


def tile_windows(
    width: int, height: int, tile: int, overlap: float = 0.25
) -> list[tuple[int, int, int, int]]:
    """The whole image, then (when it is larger than ``tile``) square windows of ``tile`` px that
    overlap by ``overlap`` of their side, the last ones flush with the far edges."""
    windows = [(0, 0, width, height)]
    if tile <= 0 or max(width, height) <= tile * 1.2:
        return windows
    side = min(tile, width, height)
    step = max(1, round(side * (1 - overlap)))

    def starts(length: int) -> list[int]:
        if length <= side:
            return [0]
        out = list(range(0, length - side, step))
        return [*out, length - side]

    windows += [(x, y, x + side, y + side) for y in starts(height) for x in starts(width)]
    return windows


def letterbox(rgb: np.ndarray, size: int) -> tuple[np.ndarray, float, int, int]:
    """The network's input for ``rgb``: ``[1, size, size, 3]`` in [-1, 1], the picture scaled to
    fit and centred on a zero border (MediaPipe's ImageToTensorCalculator with
    keep_aspect_ratio); also the scale and the border's left and top widths."""
    h, w = rgb.shape[:2]
    scale = size / max(h, w)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    canvas = np.zeros((size, size, 3), np.float32)
    px, py = (size - nw) // 2, (size - nh) // 2
    # Bilinear, as MediaPipe's own warp: area averaging moved scores near the threshold by up to
    # 0.05 against MediaPipe's graph.
    canvas[py : py + nh, px : px + nw] = cv2.resize(rgb, (nw, nh), interpolation=cv2.INTER_LINEAR)
    return (canvas / 127.5 - 1.0)[None], scale, px, py


@functools.cache
def onnx_model(model: str = "full"):
    """The ONNX graph of BlazeFace ``model`` (``full`` or ``short``), converted from the wheel's
    ``.tflite`` file once a process (0.2 s for the full-range model)."""
    return tflite_to_onnx(package_file("mediapipe", f"{MEDIAPIPE_DIR}/{MODELS[model].file}"))


class BlazeFace:
    """BlazeFace on the CPU: :meth:`detect` returns :class:`~.face_detect.Detection` s.

    ``min_score`` None: the graph's own threshold (0.6 full range, 0.5 short range). ``tile`` 0
    searches the whole frame only."""

    name = "mediapipe"

    def __init__(
        self, model: str = "full", *, min_score: float | None = None, tile: int = 360, threads: int = 1
    ):
        self.model = MODELS[model]
        self.min_score = self.model.min_score if min_score is None else float(min_score)
        self.tile = tile
        self._net = cpu_session(onnx_model(model), threads)
        outputs = sorted(self._net.get_outputs(), key=lambda o: int(o.shape[-1]), reverse=True)
        # The box regressors (16 numbers an anchor) and the face logits (1), by their sizes: the
        # two files name them differently.
        self._outputs = [outputs[0].name, outputs[1].name]
        self._anchors = anchors(self.model)

    def _window(self, rgb: np.ndarray, x0: int, y0: int):
        """Boxes (x0, y0, x1, y1), scores and keypoints of one window, in image pixels."""
        size = self.model.size
        tensor, scale, px, py = letterbox(rgb, size)
        regressors, logits = self._net.run(self._outputs, {"input": tensor})
        raw = regressors[0]
        logits = np.clip(logits[0, :, 0].astype(np.float64), -100, 100)
        scores = 1.0 / (1.0 + np.exp(-logits))
        keep = scores >= self.min_score
        if not keep.any():
            return np.zeros((0, 4)), np.zeros(0), np.zeros((0, 6, 2))
        raw, scores, anchor = raw[keep], scores[keep], self._anchors[keep]
        # reverse_output_order: x, y, w, h, then 6 keypoints (x, y), all in input pixels.
        cx = raw[:, 0] / size + anchor[:, 0]
        cy = raw[:, 1] / size + anchor[:, 1]
        bw, bh = raw[:, 2] / size, raw[:, 3] / size
        kp = raw[:, 4:16].reshape(-1, 6, 2) / size + anchor[:, None, :]

        def to_image(x, y):
            return (x * size - px) / scale + x0, (y * size - py) / scale + y0

        bx0, by0 = to_image(cx - bw / 2, cy - bh / 2)
        bx1, by1 = to_image(cx + bw / 2, cy + bh / 2)
        kx, ky = to_image(kp[..., 0], kp[..., 1])
        return np.stack([bx0, by0, bx1, by1], 1), scores, np.stack([kx, ky], -1)

    def detect(self, rgb: np.ndarray) -> list[Detection]:
        h, w = rgb.shape[:2]
        parts = [self._window(rgb[y0:y1, x0:x1], x0, y0) for x0, y0, x1, y1 in tile_windows(w, h, self.tile)]
        boxes = np.concatenate([p[0] for p in parts]).reshape(-1, 4)
        scores = np.concatenate([p[1] for p in parts])
        points = np.concatenate([p[2] for p in parts]).reshape(-1, 6, 2)
        boxes, scores, points = weighted_nms(boxes, scores, points)
        out = []
        for (bx0, by0, bx1, by1), score, kp in zip(boxes, scores, points, strict=True):
            # Keypoints: the person's right eye (image left), left eye, nose tip, mouth centre,
            # right and left ear tragion. The mouth's centre stands for both corners.
            five = np.stack([kp[0], kp[1], kp[2], kp[3], kp[3]]).astype(np.float32)
            bw, bh = bx1 - bx0, by1 - by0
            dl, dt, dr, db = BOX_TO_FACE
            face = (by0 + dt * bh, bx1 + dr * bw, by1 + db * bh, bx0 + dl * bw)
            out.append(Detection(clip_box(face, rgb.shape), float(score), five))
        return out


@FACE_DETECTORS.register
class BlazeFaceSettings(FaceDetectorSettings):
    """``characters.detector: mediapipe``: BlazeFace (full range) from the mediapipe wheel."""

    name: Literal["mediapipe"] = "mediapipe"
    #: The score a face needs (0-1; the graph's own: 0.6).
    min_score: float = Field(MODELS["full"].min_score, ge=0.0, le=1.0)

    def check(self) -> None:
        package_file("mediapipe", f"{MEDIAPIPE_DIR}/{MODELS['full'].file}")

    def build(self, min_face: float) -> BlazeFace:
        return BlazeFace(min_score=self.min_score)
