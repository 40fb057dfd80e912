"""Stage 01's per-frame measures: the cheaper ways of computing them give the values of the
plain numpy and OpenCV expressions they replace (cut detection, sharpness and keyframe choice
were calibrated on those values)."""

from __future__ import annotations

import av
import cv2
import numpy as np
import pytest

from diffusion_bunny.media.images import laplacian_variance
from diffusion_bunny.media.video import analysis_copy
from diffusion_bunny.stages.extract.detectors.base import BLANK_STD, Blankness


def _pictures() -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    noise = rng.integers(0, 256, (144, 256), dtype=np.uint8)
    return [
        noise,
        cv2.GaussianBlur(noise, (0, 0), 3.0),  # soft: a small variance
        np.full((90, 160), 37, np.uint8),  # flat: none at all
        rng.integers(100, 110, (33, 47), dtype=np.uint8),  # odd size, low contrast
    ]


@pytest.mark.parametrize("index", range(4))
def test_laplacian_variance_is_the_float_laplacians_variance(index):
    gray = _pictures()[index]
    expected = float(cv2.Laplacian(gray, cv2.CV_32F).var())
    assert laplacian_variance(gray) == pytest.approx(expected, rel=1e-5, abs=1e-6)


def _yuv_frame(width: int, height: int) -> av.VideoFrame:
    rng = np.random.default_rng(width)
    bgr = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    bgr = cv2.GaussianBlur(bgr, (0, 0), 2.0)
    return av.VideoFrame.from_ndarray(bgr, format="bgr24").reformat(format="yuv420p")


@pytest.mark.parametrize(
    ("width", "height", "step", "factor"), [(1280, 720, 5, 2), (1282, 722, 5, 2), (642, 362, 3, 1)]
)
def test_analysis_copies_are_the_planes_stride_samples(width, height, step, factor):
    frame = _yuv_frame(width, height)
    y, u, v = (np.frombuffer(p, np.uint8).reshape(p.height, p.line_size)[:, : p.width] for p in frame.planes)
    bgr, gray = analysis_copy(frame, step, factor)
    # What the copies are by definition: every step-th luma pixel, and for the detector's copy
    # every (step * factor)-th pixel of luma and of both chroma planes, as YCrCb to BGR.
    assert np.array_equal(gray, y[::step, ::step])
    dstep = step * factor
    small_y = y[::dstep, ::dstep]
    h, w = small_y.shape
    cy = max(1, round(dstep * u.shape[0] / height))
    cx = max(1, round(dstep * u.shape[1] / width))
    small_u, small_v = (np.ascontiguousarray(c[::cy, ::cx][:h, :w]) for c in (u, v))
    if small_u.shape != (h, w):  # chroma sampled more coarsely than luma: stretched to it
        small_u, small_v = (
            cv2.resize(c, (w, h), interpolation=cv2.INTER_NEAREST) for c in (small_u, small_v)
        )
    ycrcb = np.dstack([small_y, small_v, small_u])
    assert bgr.shape == (h, w, 3)
    assert np.array_equal(bgr, cv2.cvtColor(np.ascontiguousarray(ycrcb), cv2.COLOR_YCrCb2BGR))
    assert gray.flags.c_contiguous and bgr.flags.c_contiguous


def test_blankness_keeps_the_recent_frames_and_judges_by_the_deviation_over_all_channels():
    blank = Blankness(keep=10)
    rng = np.random.default_rng(0)
    # A picture whose channels are each flat but differ from one another is not blank: the
    # deviation is over all its values, as numpy's std() of the whole array.
    split = np.zeros((27, 48, 3), np.uint8)
    split[..., 0] = 100
    assert float(split.std()) > BLANK_STD
    for t in range(40):
        frame = np.full((27, 48, 3), 50, np.uint8) if t % 7 == 0 else rng.integers(0, 255, (27, 48, 3))
        blank.add(t, split if t == 39 else frame.astype(np.uint8))
    assert sorted(blank.blank) == list(range(29, 40))
    assert [t for t, b in sorted(blank.blank.items()) if b] == [35]
    assert blank.any_blank(30, 36) and not blank.any_blank(36, 40)
    assert not blank.any_blank(0, 28)  # forgotten frames count as not blank
