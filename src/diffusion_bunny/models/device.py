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
    one is a :class:`ModelError` naming ``setting`` (e.g. ``training.device``). Without a GPU in
    the driver, ``auto`` is ``cpu`` at once, without importing torch."""
    if device == "cpu" or (device == "auto" and not cuda_driver_sees_gpu()):
        return "cpu"
    import torch

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
    import torch

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
