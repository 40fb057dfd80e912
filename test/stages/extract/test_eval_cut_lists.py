"""Stage 01's cut lists on the clips of ``python_script/eval_shots.py`` stay what they were.

The cascade's rules were changed for real footage (fast accepts, motion compensation, the
network on contiguous stretches with less context, int8); none of that may move a cut on the
synthetic evaluation clips (hard cuts, dissolves, fades, wipes, flashes, fast pans) or on the real
Hamilton clip; and the same clip night-graded (a third of the contrast, mean luma ~19), where an
absolute candidate threshold found none of its three cuts, must keep all three (the cascade's
thresholds scale with the shots' contrast); and the same clip as a flickering old print (every
frame's exposure drawn anew), where frame differences alone lost its second cut and asked the
network about 200 of its frames, must keep all three. The expected lists are
``data/eval_cut_lists.json``, written by ``eval_shots.py --save-cuts`` (default variants, the
config's TransNetV2 precision); a deliberate change writes that file again, and the diff shows
which clip moved.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from paths import HAMILTON, ROOT

from diffusion_bunny.config import load_config
from diffusion_bunny.stages.extract.detectors.transnet import load_model

GOLDEN = Path(__file__).with_name("data") / "eval_cut_lists.json"


def _eval_shots():
    spec = importlib.util.spec_from_file_location("eval_shots", ROOT / "python_script" / "eval_shots.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def eval_clips(tmp_path_factory):
    golden = json.loads(GOLDEN.read_text())
    eval_shots = _eval_shots()
    items = eval_shots.make_items(tmp_path_factory.mktemp("eval_shots"), golden["variants"])
    return eval_shots, items, golden


@pytest.mark.parametrize("detector", ["cascade", "content"])
def test_cut_lists_on_the_eval_clips_are_unchanged(eval_clips, detector):
    eval_shots, items, golden = eval_clips
    precision = load_config(None, {}, use_local=False).extract.detector.transnetv2_precision
    assert golden["precision"] == precision
    model = load_model("cpu", precision=precision) if detector == "cascade" else None
    expected = golden["cuts"][detector]
    names = [item.path.name for item in items]
    if not HAMILTON.is_file():
        expected = {
            k: v
            for k, v in expected.items()
            if k not in (HAMILTON.name, "hamilton-night.mp4", "hamilton-flicker.mp4")
        }
    assert names == list(expected), "the clips eval_shots makes changed"
    found = {item.path.name: eval_shots.detect(item.path, detector, model)[0] for item in items}
    moved = {name: (found[name], cuts) for name, cuts in expected.items() if found[name] != cuts}
    assert not moved, f"cuts moved (found, expected): {moved}"
    if detector == "cascade":
        # The lists pinned are right where the cascade is known to be: every hard cut, flash
        # (no cut) and fast pan clip exactly at the truth, dissolves and fades within 2 frames.
        for item in items:
            cuts = found[item.path.name]
            exact = ("hard cuts", "flashes", "fast pans", "hamilton (real)", "hamilton night (real)")
            exact += ("hamilton flicker (real)",)
            if item.sets[0] in exact:
                assert cuts == item.truth, item.path.name
            elif item.sets[0] in ("dissolves", "fades (black)"):
                from diffusion_bunny.demo.metrics import match_boundaries

                assert match_boundaries(cuts, item.truth, 2).f1 == 1.0, item.path.name
