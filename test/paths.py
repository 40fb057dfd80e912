"""Where the tests find the checkout and the real footage beside it (importable from every test
folder: conftest.py puts this folder on ``sys.path``)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTDATA = ROOT.parent / "shared" / "testdata"
HAMILTON = TESTDATA / "face_recognition_examples" / "short_hamilton_clip.mp4"
#: The character truth set (committed; docs/character-truth.md): six short films of game art.
CHARACTER_TRUTH = ROOT / "test" / "stages" / "characters" / "data" / "character_truth"


def _stage_order() -> tuple[str, ...]:
    from diffusion_bunny.stages import PIPELINE

    return tuple(PIPELINE.names())


#: The nine stages in pipeline order, read from the one place it is written
#: (:data:`diffusion_bunny.stages.PIPELINE`; test_conventions.py checks it against the notebooks' numbers).
STAGE_ORDER = _stage_order()
