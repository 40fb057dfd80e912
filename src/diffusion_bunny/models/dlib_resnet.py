"""dlib's face descriptor network run on ONNX Runtime: the same 128-d encodings, 12x faster.

Why our own code: dlib-bin (the prebuilt dlib wheel) is compiled without BLAS, so its ResNet
(``dlib_face_recognition_resnet_model_v1.dat``, 29 convolutions on a 150x150 face chip) costs
74 ms a face on one core, more than the rest of stage 03 together. dlib has no Python export of
its network's weights and no ONNX release of this model exists in a wheel, so this module reads
the weights from the ``.dat`` file the ``face_recognition_models`` wheel ships, rebuilds the
network (dlib's ``dnn_face_recognition_ex.cpp`` gives the architecture) as an ONNX graph in
memory and runs it on ONNX Runtime: 6.3 ms a face on one core (5.3 ms in batches of 8), with
descriptors within 1e-6 of dlib's own (``test/models/test_dlib_resnet.py`` compares them on real
photos).

dlib's serialisation, as far as this file needs it: integers are a length byte (low nibble; 0x80
marks a negative) followed by that many little-endian bytes; a string is its length then its
bytes; a tensor (version 2) is ``num_samples, k, nr, nc`` then raw little-endian float32. The
network is written from its input up, each layer as its type name (``con_4``, ``affine_``,
``fc_2``, ...) then its parameters, so the layers are read in order by finding each name after
the previous layer's parameters. The batch-norm layers were replaced by ``affine_`` (a per-channel
scale and shift) when the model was released; each is folded into the convolution before it.

Two details of dlib's layers the graph reproduces: a strided convolution has no padding (dlib pads
only stride-1 layers), and ``add_prev`` of two tensors of different shapes adds them as if both
were zero-padded to the larger one (channels, and rows/columns at the bottom/right): that happens
where a stride-2 block meets its 2x2 average-pooled shortcut (64 vs 32 channels; 3x3 vs 4x4).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import dlib
import numpy as np

from diffusion_bunny.errors import ModelError
from diffusion_bunny.models.onnx_graph import GraphBuilder, cpu_session

#: Side of the face chip the network reads, and the padding around the face dlib's
#: ``compute_face_descriptor`` cuts it with (``get_face_chip_details(shape, 150, 0.25)``).
CHIP_SIZE = 150
CHIP_PADDING = 0.25

#: Faces encoded in one ONNX Runtime call (batches of 8 run 1.2x faster a face than one by one;
#: larger ones gain nothing on a CPU).
BATCH = 16

#: The residual stages after the stem: (filters, blocks, first block halves the size).
STAGES = ((32, 3, False), (64, 4, True), (128, 3, True), (256, 3, True), (256, 1, True))

_LAYER_NAMES = re.compile(rb"\x01\x05con_4|\x01\x07affine_|\x01\x04fc_2|\x01\x15input_rgb_image_sized")


@dataclass
class Conv:
    """One convolution with the affine layer after it folded in."""

    weight: np.ndarray  # (filters, channels, rows, cols)
    bias: np.ndarray
    stride: int
    padding: int


@dataclass
class ResNetWeights:
    mean_rgb: np.ndarray  # subtracted from each pixel before dividing by 256
    convs: list[Conv]
    fc: np.ndarray  # (256, 128): descriptor = pooled features @ fc


def _int(buf: bytes, at: int) -> tuple[int, int]:
    head = buf[at]
    n = head & 0x0F
    value = int.from_bytes(buf[at + 1 : at + 1 + n], "little")
    return (-value if head & 0x80 else value), at + 1 + n


def _float(buf: bytes, at: int) -> tuple[float, int]:
    """dlib's portable float: an int64 mantissa and an int16 exponent."""
    mantissa, at = _int(buf, at)
    exponent, at = _int(buf, at)
    return float(np.ldexp(float(mantissa), exponent)), at


def _tensor(buf: bytes, at: int) -> tuple[np.ndarray, int]:
    version, at = _int(buf, at)
    if version != 2:
        raise ValueError(f"tensor version {version} at byte {at} (only version 2 is known)")
    dims = []
    for _ in range(4):
        d, at = _int(buf, at)
        dims.append(d)
    n = int(np.prod(dims))
    return np.frombuffer(buf, "<f4", n, at).astype(np.float32), at + 4 * n


def read_weights(path: Path) -> ResNetWeights:
    """The network's weights from dlib's ``.dat`` file; :class:`ModelError` if the file is not
    the 29-convolution face descriptor model this module knows."""
    buf = Path(path).read_bytes()
    try:
        return _read(buf)
    except (ValueError, IndexError) as exc:
        raise ModelError(
            f"{path} is not dlib's face descriptor model as expected ({exc}); reinstall "
            "face-recognition-models (`uv sync --reinstall-package face-recognition-models`)"
        ) from exc


def _read(buf: bytes) -> ResNetWeights:
    mean_rgb = None
    convs: list[Conv] = []
    fc = None
    at = 0
    while (m := _LAYER_NAMES.search(buf, at)) is not None:
        name, at = m.group()[2:], m.end()
        if name == b"input_rgb_image_sized":
            means = []
            for _ in range(3):
                v, at = _float(buf, at)
                means.append(v)
            mean_rgb = np.array(means, np.float32)
        elif name == b"con_4":
            params, at = _tensor(buf, at)
            fields = []
            for _ in range(7):
                v, at = _int(buf, at)
                fields.append(v)
            filters, rows, cols, stride, _sx, padding, _px = fields
            channels = (params.size - filters) // (filters * rows * cols)
            n = filters * channels * rows * cols
            if n + filters != params.size:
                raise ValueError(f"convolution of {params.size} parameters does not fit {fields}")
            w = params[:n].reshape(filters, channels, rows, cols)
            convs.append(Conv(w, params[n:].copy(), stride, padding))
        elif name == b"affine_":
            params, at = _tensor(buf, at)
            gamma, beta = np.split(params, 2)
            if not convs or convs[-1].bias.size != gamma.size:
                raise ValueError("an affine layer that does not follow a convolution of its size")
            conv = convs[-1]
            conv.weight = conv.weight * gamma[:, None, None, None]
            conv.bias = conv.bias * gamma + beta
        else:  # fc_2
            outputs, at = _int(buf, at)
            inputs, at = _int(buf, at)
            params, at = _tensor(buf, at)
            fc = params[: inputs * outputs].reshape(inputs, outputs)
    expected = 1 + 2 * sum(blocks for _, blocks, _ in STAGES)
    if mean_rgb is None or fc is None or len(convs) != expected or fc.shape != (256, 128):
        raise ValueError(
            f"found {len(convs)} convolutions (expected {expected}) and fc {getattr(fc, 'shape', None)}"
        )
    return ResNetWeights(mean_rgb, convs, fc)


def to_onnx(weights: ResNetWeights) -> Any:
    """The network as an ONNX model: ``chips`` (N, 150, 150, 3) uint8 RGB in, ``descriptors``
    (N, 128) float32 out."""
    from onnx import TensorProto  # lazy: onnx takes 0.11 s to import

    g = GraphBuilder()
    convs = iter(weights.convs)

    def conv(x: str) -> str:
        c = next(convs)
        return g.conv(x, c.weight, c.bias, c.stride, c.padding)

    def pad(x: str, channels: int = 0, rows: int = 0) -> str:
        # Zero-pad at the end of the channel axis and at the bottom/right (dlib's add_prev).
        return g.op("Pad", x, g.const(np.array([0, 0, 0, 0, 0, channels, rows, rows], np.int64)))

    x = g.op("Cast", "chips", to=TensorProto.FLOAT)
    x = g.op("Mul", g.op("Sub", x, g.const(weights.mean_rgb)), g.const(np.array(1 / 256, np.float32)))
    x = g.op("Transpose", x, perm=[0, 3, 1, 2])
    x = g.op("MaxPool", g.op("Relu", conv(x)), kernel_shape=[3, 3], strides=[2, 2])
    size, channels = (CHIP_SIZE - 7) // 2 + 1, weights.convs[0].weight.shape[0]
    size = (size - 3) // 2 + 1
    for filters, blocks, halves in STAGES:
        for block in range(blocks):
            y = conv(g.op("Relu", conv(x)))
            if block == 0 and halves:
                shortcut = g.op("AveragePool", x, kernel_shape=[2, 2], strides=[2, 2])
                conv_size, pool_size = (size - 3) // 2 + 1, (size - 2) // 2 + 1
                if conv_size < pool_size:
                    y = pad(y, rows=pool_size - conv_size)
                if channels < filters:
                    shortcut = pad(shortcut, channels=filters - channels)
                size, channels = pool_size, filters
                x = g.op("Relu", g.op("Add", y, shortcut))
            else:
                x = g.op("Relu", g.op("Add", y, x))
    x = g.op("Flatten", g.op("GlobalAveragePool", x))
    g.op("MatMul", x, g.const(weights.fc), out="descriptors")
    return g.model(
        "dlib_face_recognition_resnet_model_v1",
        [("chips", TensorProto.UINT8, ["n", CHIP_SIZE, CHIP_SIZE, 3])],
        [("descriptors", TensorProto.FLOAT, ["n", 128])],
    )


class FaceEncoder:
    """dlib's face descriptor on ONNX Runtime (one per process: ``dlib_faces.face_encoder``)."""

    def __init__(self, path: Path, threads: int | None = None) -> None:
        self.session = cpu_session(to_onnx(read_weights(path)), threads)

    def encode_chips(self, chips: np.ndarray) -> np.ndarray:
        """(N, 128) float32 descriptors of (N, 150, 150, 3) uint8 RGB face chips."""
        chips = np.ascontiguousarray(chips, np.uint8)
        if chips.ndim != 4 or chips.shape[1:] != (CHIP_SIZE, CHIP_SIZE, 3):
            raise ValueError(f"face chips must be (N, {CHIP_SIZE}, {CHIP_SIZE}, 3) uint8, got {chips.shape}")
        if len(chips) == 0:
            return np.zeros((0, 128), np.float32)
        parts = [
            self.session.run(None, {"chips": chips[i : i + BATCH]})[0] for i in range(0, len(chips), BATCH)
        ]
        return np.concatenate(parts)

    def encode(self, rgb: np.ndarray, shapes: list[Any], num_jitters: int = 1) -> np.ndarray:
        """(len(shapes), 128) float32 descriptors of the faces of one RGB image, each aligned on a
        dlib ``full_object_detection`` (5 or 68 points) as dlib's ``compute_face_descriptor``
        does: its 150-px chip with 0.25 padding. With ``num_jitters`` > 1, the mean over that many
        jittered copies of each chip (:func:`jitter_chips`)."""
        if not shapes:
            return np.zeros((0, 128), np.float32)
        found = dlib.full_object_detections()
        found.extend(shapes)
        chips = np.stack(
            dlib.get_face_chips(np.ascontiguousarray(rgb, np.uint8), found, CHIP_SIZE, CHIP_PADDING)
        )
        if num_jitters <= 1:
            return self.encode_chips(chips)
        out = [self.encode_chips(jitter_chips(chip, num_jitters)).mean(0) for chip in chips]
        return np.stack(out).astype(np.float32)


def jitter_chips(chip: np.ndarray, count: int, seed: int = 0) -> np.ndarray:
    """``count`` jittered copies of a face chip, as dlib's ``jitter_image`` makes them (up to 3
    degrees of rotation, 2% of shift, 1-3% of zoom out, mirrored half the time).

    Own code rather than ``dlib.jitter_image`` because dlib draws from one process-wide random
    stream: a face's encoding would depend on how many faces the process had jittered before it
    (which pool worker, which order). Here the draws come from ``seed``: the same chip always
    gives the same copies, so a stage rerun gives the same encodings.
    """
    rng = np.random.default_rng(seed)
    side = chip.shape[0]
    inner = side - 6  # dlib jitters the chip shrunk by 3 px each side
    out = np.empty((count, *chip.shape), chip.dtype)
    centre = (side - 1) / 2
    for i in range(count):
        shift = rng.uniform(-0.02, 0.02, 2) * inner
        box = inner / rng.uniform(0.97, 0.99999)
        angle = rng.uniform(-3.0, 3.0)
        # Output pixel -> input: scale by box/side about the centre, rotate, shift.
        scale = box / side
        theta = np.deg2rad(angle)
        rot = scale * np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
        offset = np.array([centre, centre]) + shift - rot @ np.array([centre, centre])
        warp = np.hstack([rot, offset[:, None]])
        copy = cv2.warpAffine(
            chip,
            warp,
            (side, side),
            flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
            borderMode=cv2.BORDER_CONSTANT,
        )
        out[i] = copy[:, ::-1] if rng.random() > 0.5 else copy
    return out
