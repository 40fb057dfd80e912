"""MTCNN (Zhang et al. 2016) with ``facenet-pytorch``'s weights, run on ONNX Runtime.

facenet-pytorch ships the cascade's three networks (``data/pnet.pt``, ``rnet.pt``, ``onet.pt``,
torch state dicts) in its wheel, so nothing is downloaded. Its own ``MTCNN.detect`` took 125 ms a
640-px frame on one core, more than half of it outside the convolutions: torch's CPU max-pooling
(39 ms) and resampling every candidate box with ``interpolate(mode="area")`` one box at a time
(32 ms); this code takes 66 ms on the same pyramid. Here the same weights are built into three
small ONNX graphs (:class:`~.onnx_graph.GraphBuilder`) run by ONNX Runtime (OpenVINO, which fuses
the PReLUs into the convolutions, ran stage 03 1.42x as fast with MTCNN: under the 1.5x a second
runtime must earn, ``python_script/bench_face_runtime.py``), the pyramid and the box crops are
resampled from a summed-area table, and the cascade around them is facenet-pytorch's
``detect_face`` step for step (thresholds, the three non-maximum suppressions, box regression,
squaring, its clipped crops), plus one step of ours: the face score averaged with the mirror
image's (``mirror``; off in :func:`detect_faces` unless asked, on in stage 03 by default,
``characters.mirror_score``); the truth set's figures (python_script/eval_faces.py) were
measured again on this code.

facenet-pytorch's release pins torch < 2.3; the pin is lifted in pyproject.toml
(``[[tool.uv.dependency-metadata]]``); only its weight files are read here (``torch.load``, with
``weights_only``). The wheel's files are checked first so a broken install is one line naming the
package.
"""

from __future__ import annotations

import functools
from typing import Any, Literal

import cv2
import numpy as np
from pydantic import Field

from diffusion_bunny.errors import ModelError
from diffusion_bunny.models.face_common import Detection, FaceDetectorSettings, clip_box, package_file
from diffusion_bunny.models.onnx_graph import GraphBuilder, cpu_session
from diffusion_bunny.registry import FACE_DETECTORS

WEIGHTS = ("data/pnet.pt", "data/rnet.pt", "data/onet.pt")
#: Thresholds of the three stages: facenet-pytorch's own (0.6, 0.7, 0.7) but for the last, the
#: face score, raised to 0.85 (it is the mean of the score on the face and on its mirror image:
#: :func:`_mirror_nms`). Scored on the face alone, false faces scoring 0.8-0.88 came through at
#: 0.7 (a patch of the demo movie, the bottom of knn's obama.jpg, which then "showed 2 faces"),
#: and 0.9 was the default; with the mirror, 0.85 keeps precision >= 0.95 on the face truth set
#: searched at five scales (python_script/eval_faces.py, column "xs prec").
THRESHOLDS = (0.6, 0.7, 0.85)
#: Each pyramid level's size over the one before (``characters.scale_step``; see :class:`Mtcnn`).
SCALE_STEP = 0.76
#: MTCNN's image pyramid starts at faces this many times ``min_face_px`` (its first level is the
#: largest and the dearest: at 720p, 130 of the 307 thousand pixels the proposal net ran over
#: when it started at 0.8, where its boxes, which run inside the forehead-to-chin height, equal
#: min_face_px). Faces a little under the first level's size are still found there. On the face
#: truth set searched at five scales (python_script/eval_faces.py, columns "xs": faces fall
#: between the levels differently at each), recall on faces >= 32 px was 0.90 from 0.8 and from
#: 1.1, and the search ran at 30.6 frames/s instead of 22.2 (rows "mtcnn", "mtcnn
#: pyramid_start=0.8"); in scratch runs the start made no difference to it between 0.8 and 1.2.
PYRAMID_START = 1.1
#: Candidate boxes through the refine and output nets per call (memory stays small).
BATCH = 256
#: Mirror images scored per output-net call in :func:`_mirror_nms`.
MIRROR_BATCH = 2


def _state(relative: str) -> dict[str, np.ndarray]:
    import torch  # lazy: torch takes 1.1 s to import

    path = package_file("facenet_pytorch", relative, distribution="facenet-pytorch")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        return {k: v.numpy().astype(np.float32) for k, v in state.items()}
    except Exception as exc:  # a truncated or replaced file: torch raises several kinds
        raise ModelError(
            f"the model file {relative} of the installed facenet-pytorch package ({path}) cannot be "
            f"read ({type(exc).__name__}); reinstall it: `uv sync --reinstall-package facenet-pytorch`"
        ) from exc


def _net_model(
    name: str, state: dict[str, np.ndarray], layers: list[tuple], heads: list[tuple[str, str]]
) -> Any:
    """One of the three nets as an ONNX graph. ``layers``: ("conv", layer, its PReLU),
    ("pool", size, stride) with ceil mode, ("flatten",) in torch's ``permute(0, 3, 2, 1)`` order,
    ("dense", layer, its PReLU); ``heads``: (output, dense or 1x1 conv layer), ``prob`` through a
    softmax. The input is ``image``: (N, H, W, 3) float32, already scaled to [-1, 1)."""
    from onnx import TensorProto  # lazy: onnx takes 0.11 s to import

    g = GraphBuilder()
    x = g.op("Transpose", "image", perm=[0, 3, 1, 2])
    dense = False
    for layer in layers:
        kind = layer[0]
        if kind == "pool":
            x = g.op("MaxPool", x, kernel_shape=[layer[1]] * 2, strides=[layer[2]] * 2, ceil_mode=1)
        elif kind == "flatten":
            x = g.op("Flatten", g.op("Transpose", x, perm=[0, 3, 2, 1]))
            dense = True
        else:
            prefix, prelu = layer[1], layer[2]
            if dense:
                x = g.op(
                    "Gemm", x, g.const(state[f"{prefix}.weight"]), g.const(state[f"{prefix}.bias"]), transB=1
                )
                slope = state[f"{prelu}.weight"]
            else:
                x = g.conv(x, state[f"{prefix}.weight"], state[f"{prefix}.bias"])
                slope = state[f"{prelu}.weight"][:, None, None]
            x = g.op("PRelu", x, g.const(slope))
    outputs = []
    for out, prefix in heads:
        w, b = state[f"{prefix}.weight"], state[f"{prefix}.bias"]
        head = g.op("Gemm", x, g.const(w), g.const(b), transB=1) if dense else g.conv(x, w, b)
        if out == "prob":
            g.op("Softmax", head, axis=1, out=out)
        else:
            g.op("Identity", head, out=out)
        outputs.append((out, TensorProto.FLOAT, ["n", "c", "h", "w"] if not dense else ["n", "c"]))
    return g.model(f"mtcnn_{name}", [("image", TensorProto.FLOAT, ["n", "h", "w", 3])], outputs)


_C1, _C2, _C3, _C4 = (("conv", f"conv{i}", f"prelu{i}") for i in (1, 2, 3, 4))
_POOL2, _POOL3, _FLAT = ("pool", 2, 2), ("pool", 3, 2), ("flatten",)
#: facenet-pytorch's PNet, RNet and ONet, layer by layer under their state-dict names: weight
#: file, layers and heads (see :func:`_net_model`).
NETS = {
    "pnet": (WEIGHTS[0], [_C1, _POOL2, _C2, _C3], [("prob", "conv4_1"), ("reg", "conv4_2")]),
    "rnet": (
        WEIGHTS[1],
        [_C1, _POOL3, _C2, _POOL3, _C3, _FLAT, ("dense", "dense4", "prelu4")],
        [("prob", "dense5_1"), ("reg", "dense5_2")],
    ),
    "onet": (
        WEIGHTS[2],
        [_C1, _POOL3, _C2, _POOL3, _C3, _POOL2, _C4, _FLAT, ("dense", "dense5", "prelu5")],
        [("prob", "dense6_1"), ("reg", "dense6_2"), ("points", "dense6_3")],
    ),
}


@functools.cache
def _sessions() -> tuple[Any, ...]:
    """PNet, RNet and ONet sessions, built once per process (~0.3 s), on ONNX Runtime. One thread
    each: the nets are small, and stage 03 runs one process per core instead."""
    return tuple(
        cpu_session(_net_model(name, _state(weights), layers, heads), 1)
        for name, (weights, layers, heads) in NETS.items()
    )


def _areas(boxes: np.ndarray, pixel: bool) -> np.ndarray:
    one = 1.0 if pixel else 0.0
    return (boxes[:, 2] - boxes[:, 0] + one) * (boxes[:, 3] - boxes[:, 1] + one)


def _overlaps(
    boxes: np.ndarray, area: np.ndarray, i: int | np.ndarray, rest: np.ndarray, pixel: bool, by_min: bool
) -> np.ndarray:
    """Overlap of box ``i`` with each box of ``rest`` (indices), as :func:`nms` measures it;
    ``i`` an array of indices gives a matrix (a row per ``i``). ``area``: :func:`_areas`."""
    one = 1.0 if pixel else 0.0
    x0, y0, x1, y1 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    a = np.asarray(i)[:, None] if np.ndim(i) else i
    w = np.maximum(0.0, np.minimum(x1[a], x1[rest]) - np.maximum(x0[a], x0[rest]) + one)
    h = np.maximum(0.0, np.minimum(y1[a], y1[rest]) - np.maximum(y0[a], y0[rest]) + one)
    inter = w * h
    return inter / (np.minimum(area[a], area[rest]) if by_min else area[a] + area[rest] - inter)


#: Up to this many boxes :func:`nms` measures every pair's overlap at once (4 MB a matrix).
NMS_MATRIX = 1024


def nms(
    boxes: np.ndarray, scores: np.ndarray, threshold: float, *, pixel: bool = False, by_min: bool = False
) -> np.ndarray:
    """Greedy non-maximum suppression: indices kept, best score first. ``pixel``: areas counted
    in whole pixels (+1, as MTCNN's original code); ``by_min``: overlap over the smaller box's
    area instead of the union (the output stage's "Min"). Own code: torchvision's ``nms`` has
    neither variant, and these arrays are tens to hundreds of boxes long.

    Up to :data:`NMS_MATRIX` boxes, every pair's overlap is measured in one step and the greedy
    pass only reads rows: the suppression after the pyramid keeps 95 of 99 boxes a frame, and a
    pass that measured the rest against each kept box took 4.1 ms of a 720p frame, this 0.8 ms
    (the same boxes: the overlaps are the same sums). Beyond it the matrix would grow with the
    square of the count, so the pass measures one row at a time."""
    if len(boxes) == 0:
        return np.zeros(0, np.int64)
    area = _areas(boxes, pixel)
    order = np.argsort(-scores, kind="stable")
    keep = []
    if len(boxes) <= NMS_MATRIX:
        every = np.arange(len(boxes))
        over = _overlaps(boxes, area, every, every, pixel, by_min) > threshold
        gone = np.zeros(len(boxes), bool)
        for i in order:
            if not gone[i]:
                keep.append(i)
                gone |= over[i]
        return np.asarray(keep, np.int64)
    while order.size:
        i, rest = order[0], order[1:]
        keep.append(i)
        order = rest[_overlaps(boxes, area, i, rest, pixel, by_min) <= threshold]
    return np.asarray(keep, np.int64)


def _square(boxes: np.ndarray) -> np.ndarray:
    """Each box made a square of its longer side about its centre (``rerec``)."""
    out = boxes.copy()
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    side = np.maximum(w, h)
    out[:, 0] = boxes[:, 0] + w * 0.5 - side * 0.5
    out[:, 1] = boxes[:, 1] + h * 0.5 - side * 0.5
    out[:, 2] = out[:, 0] + side
    out[:, 3] = out[:, 1] + side
    return out


def _regress(boxes: np.ndarray, reg: np.ndarray) -> np.ndarray:
    """Box regression in whole-pixel sizes (``bbreg``)."""
    out = boxes.copy()
    w = boxes[:, 2] - boxes[:, 0] + 1
    h = boxes[:, 3] - boxes[:, 1] + 1
    out[:, 0] += reg[:, 0] * w
    out[:, 1] += reg[:, 1] * h
    out[:, 2] += reg[:, 2] * w
    out[:, 3] += reg[:, 3] * h
    return out


def _bins(size_in: np.ndarray, size_out: int) -> tuple[np.ndarray, np.ndarray]:
    """torch's adaptive-average-pooling bins (``interpolate(mode="area")``): output cell i of
    ``size_out`` averages input rows floor(i*n/out) to ceil((i+1)*n/out), per input size n."""
    i = np.arange(size_out)
    n = np.asarray(size_in)[..., None]
    return (i * n) // size_out, -((-(i + 1) * n) // size_out)


def area_resize(integral: np.ndarray, top, left, height, width, out_h: int, out_w: int) -> np.ndarray:
    """Regions of an image (``top``, ``left``, ``height``, ``width``: arrays of N) resized to
    (N, out_h, out_w, C) by torch's "area" interpolation, from the image's summed-area table
    (:func:`integral_image`).

    Own code because the boxes MTCNN keeps depend on its resampler: OpenCV's ``INTER_AREA``
    (fractional area weights) instead of torch's whole-pixel bins found 2 fewer of the truth
    set's faces; and facenet-pytorch resized each candidate box in its own torch call (32 ms a
    frame). Four gathers from the table give every box's every cell at once."""
    y0, y1 = _bins(height, out_h)
    x0, x1 = _bins(width, out_w)
    y0, y1 = y0 + np.asarray(top)[..., None], y1 + np.asarray(top)[..., None]
    x0, x1 = x0 + np.asarray(left)[..., None], x1 + np.asarray(left)[..., None]
    # Indices into the flat table, one per corner, cell and channel: a take of single values is
    # 3x faster than 2-D fancy indexing and 1.5x faster than taking rows of C values.
    channels = integral.shape[2]
    stride = integral.shape[1] * channels
    flat = integral.reshape(-1)
    ya, yb = y0[:, :, None, None] * stride, y1[:, :, None, None] * stride
    xa = x0[:, None, :, None] * channels + np.arange(channels)
    xb = x1[:, None, :, None] * channels + np.arange(channels)
    sums = flat.take(yb + xb)
    sums -= flat.take(ya + xb)
    sums -= flat.take(yb + xa)
    sums += flat.take(ya + xa)
    sums = sums.astype(np.float32)
    sums /= ((y1 - y0)[:, :, None] * (x1 - x0)[:, None, :]).astype(np.float32)[..., None]
    return sums


def area_level(integral: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """The whole image resized as :func:`area_resize` does, (1, out_h, out_w, C): rows first
    (whole rows of the table gathered), then columns; 2 ms for the first pyramid level of a
    640-px frame, 3x faster than four gathers per cell."""
    y0, y1 = _bins(integral.shape[0] - 1, out_h)
    x0, x1 = _bins(integral.shape[1] - 1, out_w)
    rows = integral[y1] - integral[y0]
    sums = (np.take(rows, x1, axis=1) - np.take(rows, x0, axis=1)).astype(np.float32)
    sums /= ((y1 - y0)[:, None] * (x1 - x0)[None, :]).astype(np.float32)[..., None]
    return sums[None]


def integral_image(rgb: np.ndarray) -> np.ndarray:
    """The summed-area table :func:`area_level` and :func:`area_resize` read, in int32 where no
    sum can overflow it (a 640-px copy: half the memory traffic of float64, and exact), else
    float64 (a DCI 4K frame searched at full size: 4096 x 2160 x 255 > 2**31)."""
    rgb = np.ascontiguousarray(rgb, np.uint8)
    exact = rgb.shape[0] * rgb.shape[1] * 255 < 2**31
    return cv2.integral(rgb, sdepth=cv2.CV_32S if exact else cv2.CV_64F)


def _crops(integral: np.ndarray, boxes: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Each box's part inside the image resized to ``size`` and scaled to [-1, 1) (facenet-pytorch's
    ``pad`` clips a box to the image, 1-based, and stretches what is left), and which boxes had
    any."""
    h, w = integral.shape[0] - 1, integral.shape[1] - 1
    b = np.trunc(boxes[:, :4]).astype(np.int64)
    x0, y0 = np.maximum(b[:, 0], 1), np.maximum(b[:, 1], 1)
    x1, y1 = np.minimum(b[:, 2], w), np.minimum(b[:, 3], h)
    ok = (y1 > y0 - 1) & (x1 > x0 - 1)
    if not ok.any():
        return np.zeros((0, size, size, 3), np.float32), ok
    y0, y1, x0, x1 = y0[ok] - 1, y1[ok], x0[ok] - 1, x1[ok]
    crops = area_resize(integral, y0, x0, y1 - y0, x1 - x0, size, size)
    return (crops - 127.5) * 0.0078125, ok


def _run(session: Any, images: np.ndarray) -> list[np.ndarray]:
    parts = [
        session.run(None, {"image": np.ascontiguousarray(images[i : i + BATCH], np.float32)})
        for i in range(0, len(images), BATCH)
    ]
    return [np.concatenate(p) for p in zip(*parts, strict=True)]


def detect_faces(
    rgb: np.ndarray,
    min_face: int,
    thresholds: tuple[float, float, float],
    factor: float,
    *,
    mirror: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """MTCNN on one RGB image: boxes (N, 5: x0, y0, x1, y1, score) and points (N, 5, 2), as
    facenet-pytorch's ``detect_face`` computes them. ``mirror``: a face's score is the mean of
    the output net's score on its crop and on the crop mirrored (:func:`_mirror_nms`)."""

    pnet, rnet, onet = _sessions()
    integral = integral_image(rgb)
    h, w = rgb.shape[:2]
    scale = 12.0 / min_face
    shortest = min(h, w) * scale
    scales = []
    while shortest >= 12:
        scales.append(scale)
        scale *= factor
        shortest *= factor

    # Stage 1: the proposal net over the pyramid; NMS 0.5 within each level, 0.7 over all.
    found = []
    for s in scales:
        level = area_level(integral, int(h * s + 1), int(w * s + 1))
        prob, reg = pnet.run(None, {"image": ((level - 127.5) * 0.0078125).astype(np.float32, copy=False)})
        yy, xx = np.nonzero(prob[0, 1] >= thresholds[0])
        if len(yy) == 0:
            continue
        q0 = np.floor((np.stack([xx, yy], 1) * 2 + 1) / s)
        q1 = np.floor((np.stack([xx, yy], 1) * 2 + 12) / s)
        cand = np.hstack([q0, q1, prob[0, 1, yy, xx, None], reg[0][:, yy, xx].T]).astype(np.float32)
        found.append(cand[nms(cand[:, :4], cand[:, 4], 0.5)])
    if not found:
        return np.zeros((0, 5), np.float32), np.zeros((0, 5, 2), np.float32)
    boxes = np.concatenate(found)
    boxes = boxes[nms(boxes[:, :4], boxes[:, 4], 0.7)]
    bw, bh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    moved = boxes[:, :4] + boxes[:, 5:9] * np.stack([bw, bh, bw, bh], 1)
    boxes = _square(np.hstack([moved, boxes[:, 4:5]]))

    # Stage 2: the refine net on 24-px crops.
    crops, ok = _crops(integral, boxes, 24)
    boxes = boxes[ok]
    if len(boxes):
        prob, reg = _run(rnet, crops)
        keep = prob[:, 1] > thresholds[1]
        boxes = np.hstack([boxes[keep, :4], prob[keep, 1:2]])
        reg = reg[keep]
        pick = nms(boxes[:, :4], boxes[:, 4], 0.7)
        boxes = _square(_regress(boxes[pick], reg[pick]))

    # Stage 3: the output net on 48-px crops: score, box and five points.
    points = np.zeros((0, 5, 2), np.float32)
    crops, ok = _crops(integral, boxes, 48)
    if len(crops):
        boxes = boxes[ok]
        prob, reg, marks = _run(onet, crops)
        bw = boxes[:, 2] - boxes[:, 0] + 1
        bh = boxes[:, 3] - boxes[:, 1] + 1
        px = bw[:, None] * marks[:, :5] + boxes[:, 0:1] - 1
        py = bh[:, None] * marks[:, 5:] + boxes[:, 1:2] - 1
        regressed = _regress(boxes[:, :4], reg)
        if mirror:
            pick, score = _mirror_nms(onet, crops, prob[:, 1], regressed, thresholds[2])
        else:
            score = prob[:, 1]
            kept = np.flatnonzero(score > thresholds[2])
            pick = kept[nms(regressed[kept], score[kept], 0.7, pixel=True, by_min=True)]
        boxes = np.hstack([regressed[pick], score[pick, None]])
        points = np.stack([px, py], 2)[pick]
    else:
        boxes = np.zeros((0, 5), np.float32)
    return boxes.astype(np.float32), points.astype(np.float32)


def _mirror_nms(
    onet: Any, crops: np.ndarray, score: np.ndarray, boxes: np.ndarray, threshold: float
) -> tuple[np.ndarray, np.ndarray]:
    """The output stage's last step with mirror-averaged face scores: the crops kept (indices,
    best first) and the scores, averaged with the mirror image's wherever that was scored (every
    kept crop's was). A face's score is the mean of the output net's score on
    its crop and on the crop mirrored left to right; a crop is kept if that mean is over
    ``threshold`` and no better-scoring kept box covers 70% of it (``nms``, pixel areas, overlap
    over the smaller box), exactly as if every crop had been scored both ways first.

    A face scores about the same both ways; hair, a hand or a rose petal that happens to score
    0.8-0.9 one way seldom does the other. On the face truth set searched at five scales
    (python_script/eval_faces.py, columns "xs"), at 0.85: recall on faces >= 32 px 0.90 either
    way, precision 0.96 against 0.95; in scratch runs over eight scales, 0.894 / 0.962 against
    0.879 / 0.955 for the plain score at 0.9 (the default before).

    Own code because the mirror images are scored lazily, inside the suppression: the
    refine stage leaves several overlapping crops on each face (19 crops a frame for 1.7 faces on
    the truth set), and the mirror image of a crop that a better one suppresses changes nothing.
    A crop whose mirror image is not scored yet counts at the most it could reach, (score + 1)/2;
    the best crop is only taken once its mean is known and no unscored crop could beat it. Crops
    under 2t - 1 cannot reach ``threshold`` whatever their mirror scores and are never run again.
    On the truth set at 720p this scores about 4 mirror images a frame instead of 12, for the
    same boxes (6 ms a frame less on one core)."""
    final = np.full(len(score), np.nan, np.float32)
    bound = (score + 1) / 2
    alive = np.flatnonzero(score >= 2 * threshold - 1)
    area = _areas(boxes, True)
    keep: list[int] = []
    while alive.size:
        known = ~np.isnan(final[alive])
        key = np.where(known, final[alive], bound[alive])
        order = np.lexsort((alive, -key))  # the best first; the lower index on a tie, as nms
        top = alive[order[0]]
        if not known[order[0]]:
            # Score the unscored crops ranked above the best scored one, a few at a time.
            ahead = order[: np.argmax(known[order])] if known.any() else order
            batch = alive[ahead[:MIRROR_BATCH]]
            flipped = np.ascontiguousarray(crops[batch, :, ::-1])
            final[batch] = (score[batch] + _run(onet, flipped)[0][:, 1]) / 2
            continue
        if final[top] <= threshold:
            break  # every other crop's score is at most this one's
        keep.append(top)
        rest = alive[alive != top]
        alive = rest[_overlaps(boxes, area, top, rest, True, True) <= 0.7]
    return np.asarray(keep, np.int64), np.where(np.isnan(final), score, final)


class Mtcnn:
    """MTCNN as a stage 03 detector: :meth:`detect` returns :class:`~.face_detect.Detection` s.
    ``min_face``: the smallest face searched for, in pixels (the image pyramid starts there, so it
    sets the cost); ``min_score``: the output network's threshold (None: 0.85); ``scale_step``:
    each pyramid level's size over the one before (None: :data:`SCALE_STEP`). At facenet-pytorch's
    0.709 faces between two levels' sizes were missed: 0.76 found 58 of the truth set's 65 faces
    >= 32 px instead of 56 (with :func:`~.faces.auto_levels`; 0.8 found 59 but let a fourth false
    face through) for about a fifth more time."""

    name = "mtcnn"

    def __init__(
        self,
        *,
        min_face: int = 20,
        min_score: float | None = None,
        scale_step: float | None = None,
        mirror: bool = True,
    ):
        first, second, final = THRESHOLDS
        self.thresholds = (first, second, final if min_score is None else float(min_score))
        self.min_face = max(12, int(min_face))
        self.factor = float(scale_step or SCALE_STEP)
        self.mirror = bool(mirror)
        _sessions()  # the weights read (one line naming the package if a file is missing)

    def detect(self, rgb: np.ndarray) -> list[Detection]:
        boxes, points = detect_faces(rgb, self.min_face, self.thresholds, self.factor, mirror=self.mirror)
        out = []
        for (x0, y0, x1, y1, score), five in zip(boxes, points, strict=True):
            # MTCNN's points: eye, eye, nose, mouth corner, mouth corner, image-left first.
            out.append(
                Detection(clip_box((y0, x1, y1, x0), rgb.shape), float(score), five.astype(np.float32))
            )
        return out


@FACE_DETECTORS.register
class MtcnnSettings(FaceDetectorSettings):
    """``characters.detector: mtcnn``: the MTCNN cascade (weights from facenet-pytorch)."""

    name: Literal["mtcnn"] = "mtcnn"
    #: The output network's threshold (0-1), on its score for the face and for its mirror image
    #: averaged (``mirror_score``).
    min_score: float = Field(THRESHOLDS[2], ge=0.0, le=1.0)
    #: Each pyramid level this much of the one before (0.5-0.95; :class:`Mtcnn` says why not
    #: facenet-pytorch's 0.709).
    scale_step: float = Field(SCALE_STEP, ge=0.5, le=0.95)
    #: Where the pyramid starts, in multiples of ``min_face_px`` (:data:`PYRAMID_START` says why).
    pyramid_start: float = Field(PYRAMID_START, ge=0.5, le=4.0)
    #: Score each face on its crop and the crop mirrored (fewer false faces at one threshold).
    mirror_score: bool = True

    def check(self) -> None:
        for relative in WEIGHTS:
            package_file("facenet_pytorch", relative, distribution="facenet-pytorch")

    def build(self, min_face: float) -> Mtcnn:
        return Mtcnn(
            min_face=max(12, int(min_face * self.pyramid_start)),
            min_score=self.min_score,
            scale_step=self.scale_step,
            mirror=self.mirror_score,
        )
