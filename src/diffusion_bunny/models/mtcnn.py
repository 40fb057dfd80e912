"""MTCNN (Zhang et al. 2016) from ``facenet-pytorch``, on the CPU.

facenet-pytorch ships the cascade's three networks (``data/pnet.pt``, ``rnet.pt``, ``onet.pt``) in
its wheel and loads them itself, so nothing is downloaded. Its release pins torch < 2.3; the pin
is lifted in pyproject.toml (``[[tool.uv.dependency-metadata]]``) and its MTCNN runs unchanged on
our torch (test/models/test_face_detectors.py). The wheel's files are checked first so a broken
install is one line naming the package, not a traceback from ``torch.load``.
"""

from __future__ import annotations

import numpy as np

from diffusion_bunny.models.face_common import Detection, clip_box, package_file

WEIGHTS = ("data/pnet.pt", "data/rnet.pt", "data/onet.pt")
#: Thresholds of the three stages: facenet-pytorch's own (0.6, 0.7, 0.7) but for the last, the
#: face score, raised to 0.9. At 0.7, false faces scoring 0.8-0.88 came through (a patch of the
#: demo movie, the bottom of knn's obama.jpg, which then "showed 2 faces"); on the face truth set
#: 0.9 gives precision 1.00 against 0.96 for 0.82 against 0.86 of the faces >= 32 px
#: (python_script/eval_faces.py, rows "mtcnn" and "mtcnn min_score=0.7").
THRESHOLDS = (0.6, 0.7, 0.9)
#: Each pyramid level's size over the one before (``characters.scale_step``; see :class:`Mtcnn`).
SCALE_STEP = 0.76


class Mtcnn:
    """facenet-pytorch's ``MTCNN`` (every face, no cropping): :meth:`detect` returns
    :class:`~.face_detect.Detection` s. ``min_face``: the smallest face searched for, in pixels
    (the image pyramid starts there, so it sets the cost); ``min_score``: the output network's
    threshold (None: 0.9); ``scale_step``: each pyramid level's size over the one before (None:
    :data:`SCALE_STEP`). At facenet-pytorch's 0.709 faces between two levels' sizes were missed:
    0.76 found 58 of the truth set's 65 faces >= 32 px instead of 56 (with
    :func:`~.faces.auto_levels`; 0.8 found 59 but let a fourth false face through) for about a
    fifth more time (13.7 frames/s against 16.4)."""

    name = "mtcnn"

    def __init__(
        self, *, min_face: int = 20, min_score: float | None = None, scale_step: float | None = None
    ):
        for relative in WEIGHTS:
            package_file("facenet_pytorch", relative, distribution="facenet-pytorch")
        from facenet_pytorch import MTCNN

        thresholds = list(THRESHOLDS)
        if min_score is not None:
            thresholds[2] = float(min_score)
        self.min_score = thresholds[2]
        self._net = MTCNN(
            keep_all=True,
            min_face_size=max(12, int(min_face)),
            thresholds=thresholds,
            factor=float(scale_step or SCALE_STEP),
            post_process=False,
            select_largest=False,
            device="cpu",
        )

    def detect(self, rgb: np.ndarray) -> list[Detection]:
        import torch

        from diffusion_bunny.models.device import torch_threads

        # One torch thread: MTCNN's networks are small, and torch's OpenMP threads spin-wait for a
        # core held by another process (44 truth frames took 61 s on 2 threads beside other jobs
        # on 2 cores, 13 s on one). Stage 03 runs one process per core for speed instead.
        with torch_threads(1), torch.inference_mode():
            boxes, scores, points = self._net.detect(np.ascontiguousarray(rgb), landmarks=True)
        if boxes is None:
            return []
        out = []
        for (x0, y0, x1, y1), score, five in zip(boxes, scores, points, strict=True):
            # MTCNN's points: eye, eye, nose, mouth corner, mouth corner, image-left first.
            out.append(
                Detection(clip_box((y0, x1, y1, x0), rgb.shape), float(score), five.astype(np.float32))
            )
        return out
