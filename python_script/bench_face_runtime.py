"""Stage 03's face search on each inference runtime a detector could use, in one run: is another
runtime worth having beside ONNX Runtime?

The project keeps one runtime for the models it ships (ONNX Runtime) unless another is measured
at least 1.5x faster on the whole stage in the same run. CenterFace and MTCNN are ONNX graphs
that OpenVINO could run as well; BlazeFace (``mediapipe``) ships as ``.tflite`` files, which
LiteRT runs as they are and :mod:`diffusion_bunny.models.tflite_graph` rewrites for ONNX Runtime.
This script times stage 03's :func:`~diffusion_bunny.stages.characters.stage.detect_faces`
(detection, landmarks and encodings, from the saved JPEG to the faces) on the same frames with
each, rounds interleaved (a slow minute of a shared machine then lowers one round of each), in one
process (one thread per session, as in each of stage 03's workers), and prints each median, the
ratio and the faces each found.

The frames are those of ``bench_characters.py``: real 720p frames with faces (the Hamilton clip
of ``../shared/testdata`` when present, and the demo movie).

    uv run --with openvino --with ai-edge-litert python python_script/bench_face_runtime.py \
        [--detectors centerface,mtcnn,mediapipe] [--frames 240] [--rounds 3]

Neither OpenVINO nor LiteRT is a dependency of the project (this measurement is why): ``--with``
brings them for the run. ``--litert-reference FILE`` writes LiteRT's raw BlazeFace outputs on a
face of the truth set, which ``test/models/test_face_detectors.py`` holds the ONNX graphs to.

Measured 2026-11-26 on a 2-core AVX-512 Xeon, 240 frames, 3 rounds: CenterFace OpenVINO 18.2
frames/s, ONNX Runtime 22.6 (0.80x); MTCNN 15.8 and 11.1 (1.42x); the same faces (322 and 248) on
both; a second run: 0.82x and 1.40x. BlazeFace: see docs/face-detectors.md.
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
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_characters import make_frames

from diffusion_bunny.models import blazeface, centerface, mtcnn
from diffusion_bunny.models.device import cpu_summary
from diffusion_bunny.models.face_common import package_file
from diffusion_bunny.models.faces import DetectSettings
from diffusion_bunny.models.onnx_graph import cpu_session
from diffusion_bunny.stages.characters.stage import detect_faces

ROOT = Path(__file__).resolve().parents[1]
#: The truth set's frame the LiteRT reference is taken on.
REFERENCE_FRAME = "two_people.jpg"
#: The figure that would justify another runtime beside ONNX Runtime.
TARGET = 1.5
#: The runtimes each detector is timed on; the first is the one measured against ONNX Runtime.
RUNTIMES = {"centerface": "openvino", "mtcnn": "openvino", "mediapipe": "litert"}


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


class _LiteRt:
    """A ``.tflite`` file in LiteRT's interpreter, called as the ONNX Runtime session of its
    converted graph is (:class:`~diffusion_bunny.models.blazeface.BlazeFace` asks for its outputs
    by the names the two share)."""

    def __init__(self, path: Path, threads: int):
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError:
            raise SystemExit("LiteRT is not installed: run with `uv run --with ai-edge-litert`") from None
        self.net = Interpreter(model_path=str(path), num_threads=threads)
        self.net.allocate_tensors()
        self.input = self.net.get_input_details()[0]["index"]
        self.outputs = {d["name"]: d for d in self.net.get_output_details()}

    def get_outputs(self):
        return [SimpleNamespace(name=name, shape=list(d["shape"])) for name, d in self.outputs.items()]

    def run(self, names, feed):
        self.net.set_tensor(self.input, np.ascontiguousarray(feed["input"], np.float32))
        self.net.invoke()
        return [self.net.get_tensor(self.outputs[name]["index"]) for name in names]


def _tflite(model: str) -> Path:
    return package_file("mediapipe", f"{blazeface.MEDIAPIPE_DIR}/{blazeface.MODELS[model].file}")


class _OnnxRuntime:
    """An ONNX Runtime session fed as :class:`_OpenVino` is (inputs as float32: CenterFace is
    handed the picture's uint8 array)."""

    def __init__(self, model, threads: int):
        self.session = cpu_session(model, threads)

    def run(self, names, feed):
        return self.session.run(names, {k: np.ascontiguousarray(v, np.float32) for k, v in feed.items()})


def _use(detector: str, runtime: str) -> None:
    """Point ``detector``'s sessions at ``runtime`` (what :func:`detect_faces` then runs)."""
    if detector == "mediapipe":
        if runtime == "litert":
            blazeface.cpu_session = lambda model, threads: _LiteRt(_tflite(_model_of(model)), threads)
        else:
            blazeface.cpu_session = cpu_session
        return
    make = _OpenVino if runtime == "openvino" else _OnnxRuntime
    if detector == "centerface":
        net = make(centerface.load_model(package_file(centerface.PACKAGE, centerface.MODEL_FILE)), 1)
        centerface._session = lambda: net
    else:
        nets = tuple(
            make(mtcnn._net_model(name, mtcnn._state(weights), layers, heads), 1)
            for name, (weights, layers, heads) in mtcnn.NETS.items()
        )
        mtcnn._sessions = lambda: nets


def _model_of(onnx_model) -> str:
    """``full`` or ``short``: the BlazeFace model whose ``.tflite`` file ``onnx_model`` came from."""
    return next(k for k, m in blazeface.MODELS.items() if Path(m.file).stem == onnx_model.graph.name)


def write_litert_reference(path: Path) -> None:
    """LiteRT's outputs of both BlazeFace models on a face of the truth set: every face logit, and
    the box regressors of the 64 anchors that score highest."""
    from diffusion_bunny.demo import face_truth as ft
    from diffusion_bunny.models.faces import read_rgb

    rgb = read_rgb(ROOT / ft.TRUTH_DIR / REFERENCE_FRAME)
    arrays = {}
    for model in blazeface.MODELS:
        net = _LiteRt(_tflite(model), 1)
        tensor = blazeface.letterbox(rgb, blazeface.MODELS[model].size)[0]
        outputs = sorted(net.get_outputs(), key=lambda o: o.shape[-1], reverse=True)
        regressors, logits = net.run([o.name for o in outputs], {"input": tensor})
        top = np.argsort(-logits[0, :, 0])[:64]
        arrays[f"{model}_logits"] = logits[0, :, 0]
        arrays[f"{model}_top"] = top
        arrays[f"{model}_regressors"] = regressors[0, top]
    np.savez_compressed(path, frame=REFERENCE_FRAME, **arrays)
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--detectors", default=",".join(RUNTIMES), help="comma-separated")
    parser.add_argument("--frames", type=int, default=240)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--litert-reference", type=Path, help="write LiteRT's BlazeFace outputs and stop")
    args = parser.parse_args(argv)
    if args.litert_reference:
        write_litert_reference(args.litert_reference)
        return 0
    detectors = [d for d in args.detectors.split(",") if d]
    unknown = sorted(set(detectors) - set(RUNTIMES))
    if unknown:
        parser.error(f"--detectors: {', '.join(unknown)} (choose from {', '.join(RUNTIMES)})")
    print(f"cpu: {cpu_summary()}; load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    work = Path(tempfile.mkdtemp(prefix="bench_face_runtime_"))
    try:
        frames = make_frames(work, args.frames)
        for detector in detectors:
            other = RUNTIMES[detector]
            settings = DetectSettings(detector=detector)
            fps: dict[str, list[float]] = {other: [], "onnxruntime": []}
            faces: dict[str, int] = {}
            for _ in range(args.rounds):
                for runtime in fps:
                    _use(detector, runtime)
                    start = time.perf_counter()
                    table = detect_faces(work, frames, settings, workers=1, progress=False)[0]
                    fps[runtime].append(frames.height / (time.perf_counter() - start))
                    faces[runtime] = table.height
            median = {name: statistics.median(values) for name, values in fps.items()}
            ratio = median[other] / median["onnxruntime"]
            print(
                f"{detector}: {other} {median[other]:.1f} frames/s, ONNX Runtime "
                f"{median['onnxruntime']:.1f} (rounds {fps}); faces {faces}; {other} / ONNX Runtime = "
                f"{ratio:.2f} (a second runtime needs >= {TARGET}: {'yes' if ratio >= TARGET else 'no'})"
            )
        print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
