"""Stage 03's face search on OpenVINO against ONNX Runtime, in one run: is OpenVINO worth a second
inference runtime?

The project keeps one runtime for the models it ships (ONNX Runtime) unless another is measured
at least 1.5x faster on the whole stage in the same run. CenterFace and MTCNN are ONNX graphs
that either runtime can run; this script times stage 03's
:func:`~diffusion_bunny.stages.characters.stage.detect_faces` (detection, landmarks and
encodings, from the saved JPEG to the faces) on the same frames with each, rounds interleaved
(a slow minute of a shared machine then lowers one round of each), in one process (one thread
per session, as in each of stage 03's workers), and prints each median and the ratio.

The frames are those of ``bench_characters.py``: real 720p frames with faces (the Hamilton clip
of ``../shared/testdata`` when present, and the demo movie).

    uv run --with openvino python python_script/bench_face_runtime.py [--frames 240] [--rounds 3]

OpenVINO is not a dependency of the project (this measurement is why): ``--with openvino`` brings
it for the run. Measured 2026-11-26 on a 2-core AVX-512 Xeon, 240 frames, 3 rounds: CenterFace
OpenVINO 18.2 frames/s, ONNX Runtime 22.6 (0.80x); MTCNN 15.8 and 11.1 (1.42x); the same faces
(322 and 248) on both; a second run: 0.82x and 1.40x.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_characters import make_frames

from diffusion_bunny.models import centerface, mtcnn
from diffusion_bunny.models.device import cpu_summary
from diffusion_bunny.models.face_common import package_file
from diffusion_bunny.models.faces import DetectSettings
from diffusion_bunny.models.onnx_graph import cpu_session
from diffusion_bunny.stages.characters.stage import detect_faces

#: The figure that would justify OpenVINO beside ONNX Runtime.
TARGET = 1.5


class _OpenVino:
    """An ONNX graph compiled by OpenVINO for the CPU, called as an ONNX Runtime session is: one
    inference thread, threads not pinned to cores (two pinned worker processes shared one core),
    f32 (not bfloat16 on CPUs that have it), shapes left free (MTCNN's pyramid changes them)."""

    def __init__(self, model, threads: int):
        try:
            import openvino
        except ImportError:
            raise SystemExit("OpenVINO is not installed: run with `uv run --with openvino`") from None
        core = openvino.Core()
        config = {
            "INFERENCE_NUM_THREADS": threads,
            "NUM_STREAMS": 1,
            "PERFORMANCE_HINT": "LATENCY",
            "ENABLE_CPU_PINNING": False,
            "INFERENCE_PRECISION_HINT": "f32",
        }
        self.compiled = core.compile_model(core.read_model(model.SerializeToString()), "CPU", config)
        self.inputs = [port.get_any_name() for port in self.compiled.inputs]
        self.request = self.compiled.create_infer_request()

    def run(self, names, feed):
        arrays = [np.ascontiguousarray(feed[name], np.float32) for name in self.inputs]
        return [np.array(out) for out in self.request.infer(arrays, share_inputs=True).to_tuple()]


class _OnnxRuntime:
    """An ONNX Runtime session fed as :class:`~diffusion_bunny.models.onnx_graph.OpenVinoSession`
    is (inputs as float32: CenterFace is handed the picture's uint8 array)."""

    def __init__(self, model, threads: int):
        self.session = cpu_session(model, threads)

    def run(self, names, feed):
        return self.session.run(names, {k: np.ascontiguousarray(v, np.float32) for k, v in feed.items()})


def _sessions(runtime: str) -> tuple:
    """CenterFace's session and MTCNN's three, on ``runtime``, one thread each."""
    make = _OpenVino if runtime == "openvino" else _OnnxRuntime
    net = make(centerface.load_model(package_file(centerface.PACKAGE, centerface.MODEL_FILE)), 1)
    nets = tuple(
        make(mtcnn._net_model(name, mtcnn._state(weights), layers, heads), 1)
        for name, (weights, layers, heads) in mtcnn.NETS.items()
    )
    return net, nets


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=240)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    print(f"cpu: {cpu_summary()}; load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    work = Path(tempfile.mkdtemp(prefix="bench_face_runtime_"))
    try:
        frames = make_frames(work, args.frames)
        runtimes = {name: _sessions(name) for name in ("openvino", "onnxruntime")}
        for detector in ("centerface", "mtcnn"):
            settings = DetectSettings(detector=detector)
            fps: dict[str, list[float]] = {name: [] for name in runtimes}
            faces: dict[str, int] = {}
            for _ in range(args.rounds):
                for name, (net, nets) in runtimes.items():
                    centerface._session = lambda net=net: net  # what CenterFace.detect runs
                    mtcnn._sessions = lambda nets=nets: nets
                    start = time.perf_counter()
                    table = detect_faces(work, frames, settings, workers=1, progress=False)[0]
                    fps[name].append(frames.height / (time.perf_counter() - start))
                    faces[name] = table.height
            median = {name: statistics.median(values) for name, values in fps.items()}
            ratio = median["openvino"] / median["onnxruntime"]
            print(
                f"{detector}: OpenVINO {median['openvino']:.1f} frames/s, ONNX Runtime "
                f"{median['onnxruntime']:.1f} (rounds {fps}); faces {faces}; OpenVINO / ONNX Runtime = "
                f"{ratio:.2f} (a second runtime needs >= {TARGET}: {'yes' if ratio >= TARGET else 'no'})"
            )
        print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
