"""Synthetic clips with known ground truth, made in the tests with PyAV and ffmpeg."""

from __future__ import annotations

import subprocess
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np


def shot_image(seed: int, width: int, height: int) -> np.ndarray:
    """A textured RGB picture with its own dominant hue: blobs and stripes, so it has edges
    (sharpness) and clearly differs from the picture of any other seed."""
    rng = np.random.default_rng(seed)
    hue = (seed * 47) % 180
    hsv = np.zeros((height, width, 3), np.uint8)
    hsv[..., 0] = hue
    hsv[..., 1] = 150 + rng.integers(0, 80)
    hsv[..., 2] = 90 + rng.integers(0, 60)
    img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    for _ in range(25):
        c = tuple(int(v) for v in rng.integers(0, 256, 3))
        center = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        cv2.circle(img, center, int(rng.integers(5, height // 4)), c, -1)
    for _ in range(8):
        c = tuple(int(v) for v in rng.integers(0, 256, 3))
        x = int(rng.integers(0, width))
        cv2.line(img, (x, 0), (x + int(rng.integers(-50, 50)), height), c, 3)
    return img


def render_shot(seed: int, n: int, width: int, height: int, pan: float = 0.0) -> list[np.ndarray]:
    """``n`` frames of one shot; ``pan`` pixels per frame of horizontal camera movement."""
    big = shot_image(seed, int(width + abs(pan) * n + 2), height)
    frames = []
    for i in range(n):
        x = abs(pan) * i
        m = np.float32([[1, 0, -x], [0, 1, 0]])
        frames.append(cv2.warpAffine(big, m, (width, height), borderMode=cv2.BORDER_REFLECT))
    return frames


def write_clip(
    path: Path,
    shots: list[tuple[int, int, float]],
    *,
    width: int = 320,
    height: int = 180,
    fps: int = 25,
    codec: str = "libx264",
    pix_fmt: str = "yuv420p",
    times: list[float] | None = None,
) -> list[int]:
    """Encode shots ``(seed, n_frames, pan)`` back to back with hard cuts; returns the cut frames.
    ``times`` gives explicit presentation times (variable frame rate)."""
    frames: list[np.ndarray] = []
    cuts = []
    for seed, n, pan in shots:
        if frames:
            cuts.append(len(frames))
        frames += render_shot(seed, n, width, height, pan)
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        if codec == "libx264":
            stream.options = {"crf": "18", "preset": "veryfast"}
        if times is not None:
            stream.codec_context.time_base = Fraction(1, 1000)
        for i, img in enumerate(frames):
            vf = av.VideoFrame.from_ndarray(img, format="rgb24")
            if times is not None:
                vf.pts = round(times[i] * 1000)
                vf.time_base = Fraction(1, 1000)
            out.mux(stream.encode(vf))
        out.mux(stream.encode(None))
    return cuts


def ffmpeg(*args: str) -> None:
    """Run Debian's ffmpeg quietly, failing the test on error."""
    subprocess.run(["ffmpeg", "-v", "error", "-y", *args], check=True)
