"""Small ONNX graphs written node by node, run on the CPU by ONNX Runtime (:func:`cpu_session`)
or OpenVINO (:func:`openvino_session`).

Used where a network's weights ship in a wheel in a form no runtime we have runs fast on a CPU:
dlib's face descriptor (``models/dlib_resnet.py``: dlib-bin has no BLAS) and MTCNN's three nets
(``models/mtcnn.py``: torch's CPU max-pooling and per-box resampling were over half a frame).
The graphs are plain convolution stacks, so building them from the weights is a few lines each
and needs no exporter (torch's ONNX export needs onnxscript and changes between releases).
"""

from __future__ import annotations

import os
import threading
from typing import Any

import numpy as np

from diffusion_bunny.errors import ModelError

#: An input or output: (name, ONNX element type, shape with names for free axes).
Spec = tuple[str, int, list]


class GraphBuilder:
    """Collects nodes and weights; each :meth:`op` returns the name of its output."""

    def __init__(self) -> None:
        self.nodes: list[Any] = []
        self.inits: list[Any] = []

    def const(self, arr: np.ndarray) -> str:
        from onnx import numpy_helper

        name = f"c{len(self.inits)}"
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(arr), name))
        return name

    def op(self, kind: str, *inputs: str, out: str | None = None, **attrs: Any) -> str:
        from onnx import helper

        name = out or f"{kind.lower()}{len(self.nodes)}"
        self.nodes.append(helper.make_node(kind, list(inputs), [name], **attrs))
        return name

    def conv(self, x: str, weight: np.ndarray, bias: np.ndarray, stride: int = 1, padding: int = 0) -> str:
        return self.op(
            "Conv",
            x,
            self.const(weight.astype(np.float32)),
            self.const(bias.astype(np.float32)),
            strides=[stride] * 2,
            pads=[padding] * 4,
            kernel_shape=list(weight.shape[2:]),
        )

    def model(self, name: str, inputs: list[Spec], outputs: list[Spec]) -> Any:
        """The checked ``ModelProto``; ``inputs``/``outputs``: (name, onnx element type, shape)."""
        import onnx
        from onnx import helper

        graph = helper.make_graph(
            self.nodes,
            name,
            [helper.make_tensor_value_info(*spec) for spec in inputs],
            [helper.make_tensor_value_info(*spec) for spec in outputs],
            self.inits,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        onnx.checker.check_model(model)
        return model


def process_threads() -> int:
    """Threads one process's math should use: ``OMP_NUM_THREADS`` where set (stage 03's pool sets
    1 in each worker process: the pool already fills every core, and each worker's threads would
    spin for cores the other holds), else the cores this process may run on (a
    taskset, a container's cpuset, a pinned test worker), not the machine's."""
    try:
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    except (KeyError, ValueError):
        return max(1, len(os.sched_getaffinity(0)))


def cpu_session(model: Any, threads: int | None = None) -> Any:
    """An ONNX Runtime CPU session of ``model`` with ``threads`` intra-op threads (default
    :func:`process_threads`)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or process_threads()
    options.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


class OpenVinoSession:
    """An ONNX graph compiled by OpenVINO for the CPU, called as an ONNX Runtime session is
    (``run(None, {input: array})`` -> a list of arrays), so a net can move between the two.

    Why a second runtime: ONNX Runtime runs a PReLU as an operator of its own, outside the
    convolution, with its blocked layout converted back and forth around it; in MTCNN's refine
    net that took more time than the convolutions (13 of 31 ms for a frame's 171 crops, one
    core). OpenVINO's CPU plugin (oneDNN) computes the PReLU inside the convolution: the three
    MTCNN nets ran in about half the time, the same boxes to 1e-3 px on the face truth set
    (docs/face-detectors.md). dlib's ResNet (ReLUs, which ONNX Runtime fuses too) ran as fast on
    either and stays on ONNX Runtime.

    Settings, and why: ``threads`` inference threads (stage 03 runs one process per core, one
    thread each); pinning off (OpenVINO pins its threads to cores by default, and two worker
    processes each pinned to core 0 shared one core: frames/s halved); f32 (on CPUs with bf16
    or AMX OpenVINO would otherwise compute in bfloat16, and MTCNN's thresholds were measured in
    f32); shapes left free (the pyramid's levels and the crop counts change every frame; one
    compiled model serves them all). One inference request per thread: a request holds its
    buffers and is not safe to share."""

    def __init__(self, model: Any, threads: int = 1) -> None:
        try:
            import openvino
        except ImportError as exc:
            raise ModelError(
                f"the OpenVINO runtime cannot be imported ({exc}); it runs stage 03's CenterFace and MTCNN: "
                "`uv sync` installs it (or `uv sync --reinstall-package openvino`)"
            ) from exc
        core = openvino.Core()
        config = {
            "INFERENCE_NUM_THREADS": int(threads),
            "NUM_STREAMS": 1,
            "PERFORMANCE_HINT": "LATENCY",
            "ENABLE_CPU_PINNING": False,
            "INFERENCE_PRECISION_HINT": "f32",
        }
        self.compiled = core.compile_model(core.read_model(model.SerializeToString()), "CPU", config)
        self.inputs = [port.get_any_name() for port in self.compiled.inputs]
        self._local = threading.local()

    def run(self, output_names: list[str] | None, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Every output (``output_names`` must be None: all of them, in the graph's order)."""
        if output_names is not None:
            raise ValueError("OpenVinoSession.run returns every output; pass None")
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self.compiled.create_infer_request()
        arrays = [np.ascontiguousarray(feed[name], np.float32) for name in self.inputs]
        # The request's output buffers are reused by its next call: copy them out.
        return [np.array(out) for out in request.infer(arrays, share_inputs=True).to_tuple()]


def openvino_session(model: Any, threads: int | None = None) -> OpenVinoSession:
    """:class:`OpenVinoSession` of ``model`` with ``threads`` (default :func:`process_threads`)."""
    return OpenVinoSession(model, threads or process_threads())
