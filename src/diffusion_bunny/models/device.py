"""Which device a model runs on: the GPU when there is one, asked cheaply.

Stage 01's TransNetV2, stage 04's CLIP and stages 07-08's diffusion models all take a
``device`` setting (``auto``/``cpu``/``cuda``); the same rules apply to each, and the message of
a refused ``cuda`` names the setting the user has to change.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path

from diffusion_bunny.errors import ModelError


def cuda_driver_sees_gpu() -> bool:
    """Whether the NVIDIA driver reports a GPU, asked of ``libcuda`` directly: answering this
    through torch would import it (3 s, 500 MB) on every CPU-only machine just to learn "no"."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    count = ctypes.c_int(0)
    try:
        return lib.cuInit(0) == 0 and lib.cuDeviceGetCount(ctypes.byref(count)) == 0 and count.value > 0
    except AttributeError:  # pragma: no cover - a libcuda without the driver API
        return False


def resolve_device(device: str, setting: str) -> str:
    """``auto`` -> ``cuda`` when torch sees a GPU, else ``cpu``; ``cuda`` (or ``cuda:N``) without
    one is a :class:`ModelError` naming ``setting`` (e.g. ``train.device``). Without a GPU in
    the driver, ``auto`` is ``cpu`` at once, without importing torch."""
    if device == "cpu" or (device == "auto" and not cuda_driver_sees_gpu()):
        return "cpu"
    import torch  # lazy: torch takes 1.1 s to import

    has_cuda = torch.cuda.is_available()
    if device == "auto":
        return "cuda" if has_cuda else "cpu"
    if device.startswith("cuda") and not has_cuda:
        raise ModelError(
            f"{setting} is '{device}' but torch sees no CUDA GPU here; set {setting} to auto or cpu"
        )
    return device


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run torch's CPU operations on ``count`` intra-op threads inside the block, then restore.

    Why: on a small problem (stage 04's adapter: a few hundred frames by a few hundred numbers)
    torch's OpenMP threads wait for one another by spinning, and when another process holds a
    core (a second stage, a benchmark, the user's browser) each wait costs a scheduler slice:
    the demo's simulated reviewer took 26.8 s on 2 threads against 9.3 s on one with a video
    encode running beside it (2 cores), and no gain on a quiet machine."""
    import torch  # lazy: torch takes 1.1 s to import

    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def cpu_threads_for(source: str, device: str, setting: str) -> AbstractContextManager[None]:
    """One torch thread for a tiny preset (``source == "preset"``) on the CPU, else no change.

    The presets (the demo's and the tests' models) are a few hundred kilobytes: on 2 cores,
    stage 08's demo grid took 8.5 s on torch's 2 threads and 11.6 s on one with nothing else
    running, but 130.6 s against 12.7 s while a video decode held the cores (their OpenMP threads
    spin-wait; ``OMP_WAIT_POLICY=PASSIVE`` gave 16.3 s quiet). A real model on the CPU keeps every
    thread: its operations are large enough to share. ``device`` is resolved as the stage
    resolves it (:func:`resolve_device`; ``setting`` names it in the error)."""
    if source == "preset" and resolve_device(device, setting) == "cpu":
        return torch_threads(1)
    return nullcontext()


#: The vector extensions that decide how fast ONNX Runtime's and torch's CPU kernels run, widest
#: first: dlib's ResNet took 5.3 ms a face on one 2-core machine and 8.5 ms on another (AVX2
#: only) the next day.
_VECTOR_FLAGS = (
    ("avx512_vnni", "AVX-512 VNNI"),
    ("avx512f", "AVX-512"),
    ("avx_vnni", "AVX-VNNI"),
    ("avx2", "AVX2"),
)


def cpu_summary(cpuinfo: str | None = None) -> str:
    """The CPU's model name and its vector extensions, e.g. ``"AMD EPYC (AVX2)"``, from Linux's
    ``/proc/cpuinfo`` (or the text given). Benchmarks print it beside their frames/s, because two
    machines with the same core count can differ by half in speed: a figure is only comparable
    with one taken on the same kind of CPU. ``"unknown"`` where there is no cpuinfo."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return "unknown"
    model, flags = "unknown", set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and model == "unknown":
            model = value.strip()
        elif key.strip() == "flags" and not flags:
            flags = set(value.split())
    found = [name for flag, name in _VECTOR_FLAGS if flag in flags]
    return f"{model} ({', '.join(found)})" if found else model
