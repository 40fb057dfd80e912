"""Where the tests find the checkout and the real footage beside it (importable from every test
folder: conftest.py puts this folder on ``sys.path``)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTDATA = ROOT.parent / "shared" / "testdata"
HAMILTON = TESTDATA / "face_recognition_examples" / "short_hamilton_clip.mp4"

# The nine stages in the order users know them (notebooks 01-09); tests compare the package with it.
STAGE_ORDER = (
    "extract",
    "quality",
    "characters",
    "scenes",
    "captions",
    "export",
    "train",
    "generate",
    "report",
)
