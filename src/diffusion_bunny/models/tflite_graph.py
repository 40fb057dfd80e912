"""A TensorFlow Lite model (``.tflite``) rewritten as an ONNX graph, so ONNX Runtime runs it.

BlazeFace (``models/blazeface.py``) ships inside the mediapipe wheel as ``.tflite`` files only, and
the project keeps one inference runtime for the models it ships (ONNX Runtime). tflite2onnx, the
converter made for this, stopped at TensorFlow 2.4's operators: it has no ``DENSIFY``, which the
full-range model's sparse weights need, and warns that it has not tested float16 weights; tf2onnx
needs TensorFlow itself. So this module reads the flatbuffer with the ``tflite`` package (the
schema's generated readers, kept in step with TensorFlow's releases) and writes the few operators
these graphs use with :class:`~.onnx_graph.GraphBuilder`:

- constants: ``DENSIFY`` (sparse weights, :func:`densify`) and ``DEQUANTIZE`` (float16 weights) are
  folded into float32 initializers here, as LiteRT itself does on its first run;
- ``CONV_2D``, ``DEPTHWISE_CONV_2D``, ``MAX_POOL_2D`` (``SAME``/``VALID`` padding written out as
  explicit pads: TensorFlow puts the odd pixel after, as ONNX's ``SAME_UPPER``), their fused
  ``RELU``/``RELU6``, ``ADD``, ``RELU``, ``PAD``, ``CONCATENATION``, ``RESHAPE``,
  ``RESIZE_BILINEAR`` and ``DEPTH_TO_SPACE`` (TensorFlow's order is ONNX's ``DCR``).

TensorFlow Lite lays images out NHWC, ONNX's convolutions NCHW: the input is transposed once, every
4-D tensor stays NCHW, and a tensor goes back to NHWC only where its memory order matters (before a
``RESHAPE``, or as a graph output). An operator outside this list is a :class:`ModelError` naming
it, not a wrong graph. ``test/models/test_face_detectors.py`` checks the graphs' outputs against
LiteRT's on a real face.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from diffusion_bunny.errors import ModelError
from diffusion_bunny.models.onnx_graph import GraphBuilder

#: NHWC axis -> NCHW axis.
TO_NCHW_AXIS = {0: 0, 1: 2, 2: 3, 3: 1}


def _vector(table: Any, kind: int) -> np.ndarray:
    """A ``SparseIndexVector`` union (Int32Vector, Uint16Vector or Uint8Vector) as an array."""
    import tflite  # lazy: keeps tflite out of `bunny --help` (0.09 s)

    cls = {
        tflite.SparseIndexVector.Int32Vector: tflite.Int32Vector,
        tflite.SparseIndexVector.Uint16Vector: tflite.Uint16Vector,
        tflite.SparseIndexVector.Uint8Vector: tflite.Uint8Vector,
    }[kind]
    vec = cls()
    vec.Init(table.Bytes, table.Pos)
    return vec.ValuesAsNumpy().astype(np.int64)


def densify(
    values: np.ndarray,
    shape: tuple[int, ...],
    traversal_order: list[int],
    block_map: list[int],
    levels: list[tuple[str, int, np.ndarray | None, np.ndarray | None]],
) -> np.ndarray:
    """TensorFlow Lite's sparse tensor format (``SparsityParameters``) to a dense array.

    The tensor is seen as ``len(traversal_order)`` dimensions: its own (each blocked one divided by
    its block size) followed by one per block (``block_map`` names the dimension each blocks). They
    are walked in ``traversal_order``; each level (``levels[k]``: format ``"dense"`` with its
    size, or ``"csr"`` with segments and indices) is either every index, or, for each position of
    the level above, the indices ``indices[segments[p]:segments[p + 1]]``. ``values`` are stored in
    the order of that walk. Written level by level over arrays (the full-range BlazeFace has
    300 thousand weights) after LiteRT's ``FormatConverter::SparseToDense``."""
    rank = len(shape)
    block_size = {dim: levels[traversal_order.index(rank + k)][1] for k, dim in enumerate(block_map)}
    positions = np.zeros(1, np.int64)  # the position at the current level, per path
    index = np.zeros((1, len(traversal_order)), np.int64)  # expanded coordinates, per path
    for level, (fmt, size, segments, indices) in enumerate(levels):
        dim = traversal_order[level]
        if fmt == "dense":
            index = np.repeat(index, size, axis=0)
            here = np.tile(np.arange(size), len(positions))
            positions = np.repeat(positions, size) * size + here
        else:
            starts, ends = segments[positions], segments[positions + 1]
            counts = ends - starts
            index = np.repeat(index, counts, axis=0)
            positions = np.repeat(starts - np.cumsum(counts) + counts, counts) + np.arange(counts.sum())
            here = indices[positions]
        index[:, dim] = here
    if len(index) != len(values):
        raise ModelError(f"a sparse tensor holds {len(values)} values but its index walks {len(index)}")
    coords = []
    for dim in range(rank):
        coord = index[:, dim]
        if dim in block_size:
            coord = coord * block_size[dim] + index[:, rank + block_map.index(dim)]
        coords.append(coord)
    dense = np.zeros(shape, values.dtype)
    dense[tuple(coords)] = values
    return dense


def _same_pads(size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """TensorFlow's ``SAME`` padding of one axis: (before, after), the odd pixel after."""
    out = -(-size // stride)
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


class _Converter:
    def __init__(self, data: bytes, source: str):
        # lazy: `import tflite` loads ~200 generated modules (0.09 s); only BlazeFace needs it
        import tflite

        self.tfl = tflite
        self.source = source
        self.model = tflite.Model.GetRootAsModel(data, 0)
        self.graph = self.model.Subgraphs(0)
        self.builder = GraphBuilder()
        self.consts: dict[int, np.ndarray] = {}
        self.names: dict[int, str] = {}
        self.nchw: set[int] = set()  # tensors held NCHW in the ONNX graph
        self.codes = {
            getattr(tflite.BuiltinOperator, name): name
            for name in dir(tflite.BuiltinOperator)
            if not name.startswith("_")
        }

    # -- tensors ---------------------------------------------------------------------------------
    def shape(self, t: int) -> list[int]:
        return [int(v) for v in self.graph.Tensors(t).ShapeAsNumpy()]

    def const(self, t: int) -> np.ndarray | None:
        """Tensor ``t``'s value when it is a constant (its buffer holds data), else None."""
        if t in self.consts:
            return self.consts[t]
        tensor = self.graph.Tensors(t)
        buffer = self.model.Buffers(tensor.Buffer())
        if buffer is None or buffer.DataLength() == 0:
            return None
        dtype = {
            self.tfl.TensorType.FLOAT32: np.float32,
            self.tfl.TensorType.FLOAT16: np.float16,
            self.tfl.TensorType.INT32: np.int32,
            self.tfl.TensorType.INT64: np.int64,
        }.get(tensor.Type())
        if dtype is None:
            raise ModelError(f"{self.source}: tensor type {tensor.Type()} is not supported here")
        flat = np.frombuffer(buffer.DataAsNumpy().tobytes(), dtype)
        sparsity = tensor.Sparsity()
        if sparsity is None:
            value = flat.reshape(self.shape(t)) if self.shape(t) else flat.reshape(())
        else:
            levels = []
            for k in range(sparsity.DimMetadataLength()):
                meta = sparsity.DimMetadata(k)
                if meta.Format() == self.tfl.DimensionType.DENSE:
                    levels.append(("dense", int(meta.DenseSize()), None, None))
                else:
                    segments = _vector(meta.ArraySegments(), meta.ArraySegmentsType())
                    indices = _vector(meta.ArrayIndices(), meta.ArrayIndicesType())
                    levels.append(("csr", 0, segments, indices))
            traversal = [int(v) for v in sparsity.TraversalOrderAsNumpy()]
            blocks = [int(v) for v in sparsity.BlockMapAsNumpy()] if sparsity.BlockMapLength() else []
            value = densify(flat, tuple(self.shape(t)), traversal, blocks, levels)
        self.consts[t] = value
        return value

    def name(self, t: int) -> str:
        """Tensor ``t`` as an ONNX value (a constant becomes an initializer on first use)."""
        if t not in self.names:
            value = self.const(t)
            if value is None:
                raise ModelError(f"{self.source}: tensor {t} is used before it is computed")
            self.names[t] = self.builder.const(value.astype(np.float32))
        return self.names[t]

    def nhwc(self, t: int) -> str:
        """Tensor ``t`` in TensorFlow Lite's own memory order."""
        name = self.name(t)
        if t in self.nchw:
            return self.builder.op("Transpose", name, perm=[0, 2, 3, 1])
        return name

    def activate(self, x: str, fused: int) -> str:
        kind = self.tfl.ActivationFunctionType
        if fused == kind.NONE:
            return x
        if fused == kind.RELU:
            return self.builder.op("Relu", x)
        if fused == kind.RELU6:
            low, high = self.builder.const(np.float32(0)), self.builder.const(np.float32(6))
            return self.builder.op("Clip", x, low, high)
        raise ModelError(f"{self.source}: fused activation {fused} is not supported here")

    def options(self, op: Any, cls: Any) -> Any:
        table = op.BuiltinOptions()
        opts = cls()
        opts.Init(table.Bytes, table.Pos)
        return opts

    def window_pads(self, t: int, kernel: tuple[int, int], stride: tuple[int, int], padding: int, dil=(1, 1)):
        if padding == self.tfl.Padding.VALID:
            return [0, 0, 0, 0]
        _, h, w, _ = self.shape(t)
        top, bottom = _same_pads(h, kernel[0], stride[0], dil[0])
        left, right = _same_pads(w, kernel[1], stride[1], dil[1])
        return [top, left, bottom, right]

    # -- operators -------------------------------------------------------------------------------
    def _conv(self, op: Any, ins: list[int], depthwise: bool) -> str:
        tfl, b, x = self.tfl, self.builder, ins[0]
        o = self.options(op, tfl.DepthwiseConv2DOptions if depthwise else tfl.Conv2DOptions)
        # TensorFlow Lite's filters are [out, h, w, in], depthwise ones [1, h, w, channels].
        order = (3, 0, 1, 2) if depthwise else (0, 3, 1, 2)
        weight = self.const(ins[1]).astype(np.float32).transpose(order)
        has_bias = len(ins) > 2 and ins[2] >= 0
        bias = self.const(ins[2]) if has_bias else np.zeros(weight.shape[0], np.float32)
        stride, dil = (o.StrideH(), o.StrideW()), (o.DilationHFactor(), o.DilationWFactor())
        y = b.op(
            "Conv",
            self.name(x),
            b.const(weight),
            b.const(bias.astype(np.float32)),
            strides=list(stride),
            dilations=list(dil),
            kernel_shape=list(weight.shape[2:]),
            group=self.shape(x)[3] if depthwise else 1,
            pads=self.window_pads(x, weight.shape[2:], stride, o.Padding(), dil),
        )
        return self.activate(y, o.FusedActivationFunction())

    def _max_pool(self, op: Any, x: int) -> str:
        o = self.options(op, self.tfl.Pool2DOptions)
        kernel, stride = (o.FilterHeight(), o.FilterWidth()), (o.StrideH(), o.StrideW())
        y = self.builder.op(
            "MaxPool",
            self.name(x),
            kernel_shape=list(kernel),
            strides=list(stride),
            pads=self.window_pads(x, kernel, stride, o.Padding()),
        )
        return self.activate(y, o.FusedActivationFunction())

    def _same_layout(self, name: str, ins: list[int]) -> None:
        if len({t in self.nchw for t in ins}) > 1:
            raise ModelError(f"{self.source}: {name} of tensors in two layouts is not supported here")

    def _concat(self, op: Any, ins: list[int]) -> str:
        o = self.options(op, self.tfl.ConcatenationOptions)
        self._same_layout("CONCATENATION", ins)
        axis = o.Axis() % len(self.shape(ins[0]))
        if ins[0] in self.nchw:
            axis = TO_NCHW_AXIS[axis]
        y = self.builder.op("Concat", *[self.name(t) for t in ins], axis=axis)
        return self.activate(y, o.FusedActivationFunction())

    def _resize(self, op: Any, ins: list[int]) -> str:
        o = self.options(op, self.tfl.ResizeBilinearOptions)
        n, _, _, c = self.shape(ins[0])
        height, width = (int(v) for v in self.const(ins[1]))
        mode = "asymmetric"
        if o.AlignCorners():
            mode = "align_corners"
        elif o.HalfPixelCenters():
            mode = "half_pixel"
        sizes = self.builder.const(np.asarray([n, c, height, width], np.int64))
        resize = {"mode": "linear", "coordinate_transformation_mode": mode}
        return self.builder.op("Resize", self.name(ins[0]), "", "", sizes, **resize)

    def convert(self, op: Any) -> None:
        """Operator ``op`` into the ONNX graph (or, for constants, into :attr:`consts`)."""
        tfl, b = self.tfl, self.builder
        code = self.model.OperatorCodes(op.OpcodeIndex())
        kind = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
        name = self.codes.get(kind, str(kind))
        ins = [int(v) for v in op.InputsAsNumpy()]
        out = int(op.OutputsAsNumpy()[0])
        x = ins[0]
        if name in ("DENSIFY", "DEQUANTIZE"):
            value = self.const(x)
            if value is None:
                raise ModelError(f"{self.source}: {name} of a computed tensor is not supported here")
            self.consts[out] = value.astype(np.float32)
            return
        if name in ("CONV_2D", "DEPTHWISE_CONV_2D"):
            y = self._conv(op, ins, depthwise=name == "DEPTHWISE_CONV_2D")
        elif name == "MAX_POOL_2D":
            y = self._max_pool(op, x)
        elif name == "ADD":
            self._same_layout(name, ins)
            y = b.op("Add", self.name(ins[0]), self.name(ins[1]))
            y = self.activate(y, self.options(op, tfl.AddOptions).FusedActivationFunction())
        elif name == "RELU":
            y = b.op("Relu", self.name(x))
        elif name == "PAD":
            pads = self.const(ins[1]).astype(np.int64)
            if x in self.nchw:
                pads = pads[[0, 3, 1, 2]]
            y = b.op("Pad", self.name(x), b.const(np.concatenate([pads[:, 0], pads[:, 1]])))
        elif name == "CONCATENATION":
            y = self._concat(op, ins)
        elif name == "RESHAPE":
            self.names[out] = b.op("Reshape", self.nhwc(x), b.const(np.asarray(self.shape(out), np.int64)))
            return
        elif name == "RESIZE_BILINEAR":
            y = self._resize(op, ins)
        elif name == "DEPTH_TO_SPACE":
            o = self.options(op, tfl.DepthToSpaceOptions)
            y = b.op("DepthToSpace", self.name(x), blocksize=o.BlockSize(), mode="DCR")
        else:
            raise ModelError(f"{self.source}: the TensorFlow Lite operator {name} is not supported here")
        self.names[out] = y
        if len(self.shape(out)) == 4:
            self.nchw.add(out)

    def run(self) -> Any:
        from onnx import TensorProto  # lazy: onnx takes 0.11 s to import

        b = self.builder
        (inp,) = [int(v) for v in self.graph.InputsAsNumpy()]
        in_shape = self.shape(inp)
        b_in = "input"
        self.names[inp] = b.op("Transpose", b_in, perm=[0, 3, 1, 2])
        self.nchw.add(inp)
        for k in range(self.graph.OperatorsLength()):
            self.convert(self.graph.Operators(k))
        outputs = []
        for t in (int(v) for v in self.graph.OutputsAsNumpy()):
            tensor_name = self.graph.Tensors(t).Name().decode()
            b.op("Identity", self.nhwc(t), out=tensor_name)
            outputs.append((tensor_name, TensorProto.FLOAT, self.shape(t)))
        return b.model(Path(self.source).stem, [(b_in, TensorProto.FLOAT, in_shape)], outputs)


def tflite_to_onnx(path: Path) -> Any:
    """The ONNX ``ModelProto`` of the ``.tflite`` file at ``path`` (its first subgraph; one input;
    the outputs under their TensorFlow Lite names)."""
    return _Converter(Path(path).read_bytes(), str(path)).run()
