"""Text detection: where the lines of text are in a picture (title cards, credits, subtitles,
signs), with the PP-OCR DBNet detector that ships inside the ``rapidocr`` wheel.

Why rapidocr: it packages PaddleOCR's detectors as ONNX files run by ONNX Runtime (already a
dependency, for TransNetV2), and its wheel holds the detector (PP-OCRv4 mobile, 4.7 MB), so the
stage works offline. Version 3.8 is pinned: it is the last whose wheel holds PP-OCRv4; 3.9 and
later ship PP-OCRv6 small, which took 1.6x the time here and drew boxes round flags, a coffee cup
and patterned cloth (the demo movie: 9 of 17 frames with a false line, against 1 for PP-OCRv4).
Its wish for plain ``opencv-python`` is lifted in ``pyproject.toml`` (``[tool.uv]
override-dependencies``): ``opencv-python-headless`` provides the same ``cv2``. The older
``rapidocr-onnxruntime`` wheel holds the same model but declares Python < 3.13, which the lock of
a ``>=3.11`` project cannot take without a marker. rapidocr's own pre-processing (normalisation,
sizes rounded to 32) and DB post-processing (binarise, contours, unclip with pyclipper) are used
as they are: only detection runs, no recognition (the rules need where the text is and how much
of the picture it covers, not what it says, and recognition would cost ten times as much).

One small protocol, as for faces: :class:`TextDetector` turns a BGR picture into
:class:`TextLine` boxes in that picture's pixels. :func:`load_text_detector` loads it once per
process, or raises :class:`~diffusion_bunny.errors.ModelError` naming ``quality.text_filter``.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from functools import cache, cached_property
from pathlib import Path

import numpy as np

from diffusion_bunny.codegraph import code_hash
from diffusion_bunny.errors import ModelError
from diffusion_bunny.paths import file_sha256

log = logging.getLogger(__name__)

#: The detector's file in the rapidocr wheel (its default detector; the only one it ships).
MODEL_FILE = "ch_PP-OCRv4_det_mobile.onnx"


@dataclass(frozen=True)
class TextLine:
    """One line (or block) of text: its axis-aligned box in the picture's pixels and the
    detector's confidence (0-1)."""

    left: float
    top: float
    right: float
    bottom: float
    score: float


class TextDetector:
    """rapidocr's DBNet text detector on one ONNX Runtime session (``threads`` intra-op threads).

    :meth:`detect` is safe to call from several threads at once: ONNX Runtime's ``run`` is, and
    rapidocr's pre- and post-processing keep no state between calls.
    """

    def __init__(self, threads: int = 1):
        try:
            from rapidocr import RapidOCR  # lazy: rapidocr takes 0.34 s to import
        except Exception as exc:  # not installed, or a broken install
            raise ModelError(
                f"the text detector cannot be loaded (rapidocr: {type(exc).__name__}: {exc}); run "
                "`uv sync`, or set quality.text_filter: false to skip the text rules"
            ) from None
        try:
            path = model_path()
            if not path.is_file():
                # Given a model_path, rapidocr never downloads: a missing file is an error here.
                raise FileNotFoundError(f"{path} is missing from the rapidocr install")
            params = {
                "Global.use_cls": False,
                "Global.use_rec": False,
                "Global.log_level": "critical",
                "Det.model_path": str(path),
                # The picture comes already reduced to the detection width: no resize beyond
                # rapidocr's rounding of each side to a multiple of 32.
                "Det.limit_type": "max",
                "Det.limit_side_len": 4096,
                "EngineConfig.onnxruntime.intra_op_num_threads": threads,
                "EngineConfig.onnxruntime.inter_op_num_threads": 1,
            }
            logging.getLogger("RapidOCR").setLevel(logging.CRITICAL)
            self._det = RapidOCR(params=params).text_det  # its ONNX session, loaded once
            self._model_path = path
        except Exception as exc:
            raise ModelError(
                f"the text detector cannot be loaded ({type(exc).__name__}: {exc}); reinstall it with "
                "`uv sync --reinstall-package rapidocr`, or set quality.text_filter: false to skip "
                "the text rules"
            ) from None

    @cached_property
    def key(self) -> str:
        """What identifies the detector's output (stage 02's text cache key): the code that runs
        it (this module, :func:`~diffusion_bunny.codegraph.code_hash`), the model and the model
        file's hash. Worked out once per detector: every frame's text key carries it, and the
        model file is megabytes to hash."""
        return f"{code_hash(__name__)}:{MODEL_FILE}:{_file_digest(self._model_path)}"

    def detect(self, bgr: np.ndarray) -> list[TextLine]:
        """The lines of text in ``bgr`` (uint8, H x W x 3), boxes in its pixels, top to bottom."""
        out = self._det(np.ascontiguousarray(bgr))
        if out.boxes is None or len(out.boxes) == 0:
            return []
        lines = []
        for quad, score in zip(out.boxes, out.scores, strict=True):
            xs, ys = quad[:, 0], quad[:, 1]
            lines.append(
                TextLine(float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max()), float(score))
            )
        return lines


def model_path() -> Path:
    """The detector's ONNX file inside the installed rapidocr wheel (raises ImportError when
    rapidocr is not installed)."""
    import rapidocr  # lazy: rapidocr takes 0.34 s to import

    return Path(rapidocr.__file__).parent / "models" / MODEL_FILE


@cache
def _file_digest(path: Path) -> str:
    return file_sha256(path)[:12]


_LOCK = threading.Lock()


@cache
def _shared(threads: int) -> TextDetector:
    return TextDetector(threads)


def load_text_detector(threads: int = 1) -> TextDetector:
    """The process's text detector (loaded once), or a
    :class:`~diffusion_bunny.errors.ModelError` naming ``quality.text_filter``."""
    with _LOCK:
        return _shared(threads)
