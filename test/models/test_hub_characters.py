"""The opt-in hub models for drawn and animated characters (models/hub_characters/): OWLv2 guided
by reference pictures or by text, DINOv2/CLIP features of each sighting, identity clusters
without references.

No test touches the network. The models are tiny real ones built in code (random, seeded weights)
and saved with ``save_pretrained`` into a folder with their processor and a real byte-level BPE
tokenizer: the files a hub snapshot holds, only small. They are loaded through the settings, as a
user's hub id is once it is in the cache. One tiny OWLv2 has its box head zeroed, so every patch
predicts the box OWLv2's grid bias gives it (centre at the patch's lower-right corner, one patch
wide): where each box must land in the frame's pixels is then known exactly.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from pydantic import ValidationError
from tiny_models import GRID, SIDE, write_tiny_clip, write_tiny_dinov2, write_tiny_owlv2

from diffusion_bunny.errors import ModelError
from diffusion_bunny.models.hub_characters import HubCharacterSettings
from diffusion_bunny.models.hub_characters import finder as hub_characters
from diffusion_bunny.models.hub_characters.finder import (
    GREY,
    HubFeatures,
    HubFinder,
    cluster_appearances,
    on_grey,
)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub_characters")
    return {
        "owl": write_tiny_owlv2(root / "owl"),
        "grid": write_tiny_owlv2(root / "grid", grid_boxes=True),
        "dino": write_tiny_dinov2(root / "dino"),
    }


@pytest.fixture(scope="module")
def dino(folders):
    return HubFeatures(str(folders["dino"]), "cpu", batch_size=4)


def settings(folders, detector="owl", **kw) -> HubCharacterSettings:
    return HubCharacterSettings(
        detector=str(folders[detector]), features=str(folders["dino"]), device="cpu", **kw
    )


def cutout(colour, size=(40, 24), seed=0) -> np.ndarray:
    """An RGBA cut-out: an ellipse of ``colour`` (with a little texture) on transparency."""
    import cv2

    h, w = size
    rgba = np.zeros((h + 10, w + 10, 4), np.uint8)
    noise = np.random.default_rng(seed).integers(-20, 21, (h + 10, w + 10, 3))
    rgba[..., :3] = np.clip(np.array(colour) + noise, 0, 255)
    mask = np.zeros((h + 10, w + 10), np.uint8)
    cv2.ellipse(mask, ((w + 10) // 2, (h + 10) // 2), (w // 2, h // 2), 0, 0, 360, 255, -1)
    rgba[..., 3] = mask
    return rgba


def frame(width=96, height=48, seed=1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


REFS = {
    "bob": [cutout((200, 40, 40)), cutout((190, 60, 50), (30, 30), 1)],
    "amy": [cutout((40, 60, 200), seed=2)],
}


# ---------------------------------------------------------------------------------------------
# Settings


def test_settings_defaults_are_the_issues_models_and_unknown_keys_are_refused():
    s = HubCharacterSettings()
    assert s.detector == "google/owlv2-base-patch16-ensemble" and s.features == "facebook/dinov2-small"
    assert (s.min_score, s.discover_score, s.device, s.batch_size) == (0.5, 0.2, "auto", 8)
    assert "a cartoon animal" in s.discover_queries
    with pytest.raises(ValidationError):
        HubCharacterSettings(detectr="x/y")
    with pytest.raises(ValidationError):
        HubCharacterSettings(min_score=1.5)
    with pytest.raises(ValidationError):
        s.min_score = 0.1  # frozen: one object shared by the whole run


def test_importing_the_settings_pulls_in_no_torch_numpy_or_transformers():
    """The configuration imports HubCharacterSettings on every command."""
    code = (
        "import sys, diffusion_bunny.models.hub_characters as m; m.HubCharacterSettings();"
        "print(sorted(k for k in ('torch', 'numpy', 'transformers', 'cv2', 'sklearn') if k in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------------------------------------
# Loading


@pytest.fixture
def empty_offline_cache(tmp_path, monkeypatch):
    """HF_HUB_OFFLINE=1 and an empty Hugging Face cache; any call to the hub that is not a look
    into the local cache fails the test."""
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf_home" / "hub"))
    real = huggingface_hub.snapshot_download
    asked = []

    def local_only(repo_id, **kw):
        asked.append(repo_id)
        assert kw.get("local_files_only") is True, "a download was attempted under HF_HUB_OFFLINE=1"
        return real(repo_id, cache_dir=str(tmp_path / "hf_home" / "hub"), **kw)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", local_only)
    return asked


@pytest.mark.parametrize("which", ["detector", "features"])
def test_a_hub_id_missing_offline_is_one_line_naming_the_setting(folders, empty_offline_cache, which):
    missing = "nobody-here/no-such-model-xyz"
    kw = {"detector": str(folders["owl"]), "features": str(folders["dino"]), which: missing}
    with pytest.raises(ModelError) as err:
        HubFinder(HubCharacterSettings(device="cpu", **kw), REFS)
    message = str(err.value)
    assert "\n" not in message
    assert f"characters.hub.{which} = '{missing}'" in message
    assert "HF_HUB_OFFLINE" in message and "characters.backend: offline" in message
    # The cache was looked into (its safetensors, then its .bin weights), nothing else.
    assert set(empty_offline_cache) == {missing}


def test_what_is_no_model_is_one_line_naming_the_setting(folders, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.bin").write_bytes(b"x")
    cases = [
        (
            {"detector": str(tmp_path / "empty")},
            "characters.hub.detector = '%s' holds no config.json" % (tmp_path / "empty"),
        ),
        ({"detector": str(folders["dino"])}, "not OWLv2"),
        ({"detector": str(tmp_path / "file.bin")}, "is a file, not a model folder"),
        ({"detector": "not a path nor an id"}, "no hub id"),
        ({"features": str(tmp_path / "empty")}, "characters.hub.features"),
    ]
    for override, says in cases:
        kw = {"detector": str(folders["owl"]), "features": str(folders["dino"]), **override}
        with pytest.raises(ModelError) as err:
            HubFinder(HubCharacterSettings(device="cpu", **kw), REFS)
        assert says in str(err.value) and "\n" not in str(err.value), str(err.value)
        assert "characters.backend: offline" in str(err.value)


def test_references_must_show_something(folders, dino):
    with pytest.raises(ModelError, match="no reference picture of 'amy'"):
        HubFinder(settings(folders), {"amy": []}, features=dino)
    with pytest.raises(ModelError, match="transparent everywhere"):
        HubFinder(settings(folders), {"amy": [np.zeros((8, 8, 4), np.uint8)]}, features=dino)


# ---------------------------------------------------------------------------------------------
# Pictures and features


def test_cutouts_go_on_grey():
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (10, 20, 30, 255)
    rgba[0, 1] = (250, 250, 250, 0)
    rgba[1, 0] = (0, 0, 0, 128)
    rgb = on_grey(rgba)
    assert rgb.shape == (2, 2, 3) and rgb.dtype == np.uint8
    assert rgb[0, 0].tolist() == [10, 20, 30] and rgb[0, 1].tolist() == [GREY] * 3
    assert rgb[1, 0].tolist() == [64] * 3  # half of grey on black


def test_features_are_unit_rows_batched_and_deterministic(folders, dino):
    crops = [frame(20, 50, seed=s) for s in range(5)] + [cutout((200, 40, 40))]
    out = dino.embed(crops)
    assert out.shape == (6, 32) and out.dtype == np.float32  # DINOv2's CLS token: its hidden size
    assert np.allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    assert np.abs(out[0] - out[1]).max() > 1e-3  # different pictures, different features
    other = HubFeatures(str(folders["dino"]), "cpu", batch_size=1).embed(crops[::-1])
    assert np.allclose(other[::-1], out, atol=1e-5)
    assert dino.embed([]).shape == (0, 32)


def test_dinov2_features_are_its_cls_token_of_the_crop_on_a_grey_square(folders, dino):
    import torch
    from transformers import AutoImageProcessor, Dinov2Model

    crop = cutout((30, 160, 90), (50, 20))
    model = Dinov2Model.from_pretrained(folders["dino"]).eval()
    processor = AutoImageProcessor.from_pretrained(folders["dino"])
    square, x, y = hub_characters.square_on_grey(on_grey(crop))
    assert square.shape == (60, 60, 3) and (x, y) == (15, 0)  # centred: the processor crops the middle
    with torch.inference_mode():
        cls = model(**processor(images=[square], return_tensors="pt")).last_hidden_state[0, 0].numpy()
    assert np.allclose(dino.embed([crop])[0], cls / np.linalg.norm(cls), atol=1e-5)


def test_clip_features_are_its_projected_image_feature(tmp_path):
    clip = HubFeatures(str(write_tiny_clip(tmp_path / "clip")), "cpu")
    out = clip.embed([frame(30, 30), frame(10, 40, seed=3)])
    assert out.shape == (2, 16)  # the projection's width, not the vision tower's 32
    assert np.allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Detection


def grid_boxes(width: int, height: int) -> list[tuple[float, ...]]:
    """Where the zeroed box head's boxes must land in a width x height frame: the frame padded at
    its bottom and right to a square of its longer side, patch (i, j)'s box centred on the grid
    corner ((j + 1), (i + 1)) patches, one patch wide; clipped to the frame, slivers dropped."""
    side, cell = max(width, height), max(width, height) / GRID
    boxes = []
    for i in range(GRID):
        for j in range(GRID):
            cx, cy = (j + 1) * cell, (i + 1) * cell
            box = (
                max(0, cx - cell / 2),
                max(0, cy - cell / 2),
                min(width, cx + cell / 2),
                min(height, cy + cell / 2),
            )
            if box[2] - box[0] >= 2 and box[3] - box[1] >= 2:
                boxes.append(box)
    assert side >= width
    return sorted(boxes)


@pytest.mark.parametrize(("width", "height"), [(96, 48), (40, 24), (30, 60)])
def test_boxes_come_back_in_the_frames_pixels_through_the_square_padding(folders, dino, width, height):
    """Frames larger than OWLv2's input (scaled down) and smaller (scaled up), wide and tall."""
    finder = HubFinder(settings(folders, "grid", min_score=0.0), REFS, features=dino)
    hits = finder.detect(frame(width, height))
    want = grid_boxes(width, height)
    got = sorted(h.box for h in hits)
    assert len(got) == len(want)
    assert np.allclose(np.array(got), np.array(want), atol=0.05)


def test_detect_names_each_box_by_the_best_of_each_characters_references(folders, dino):
    """A character's score is its best reference's; a box goes to the character that scores best,
    by its place among the sorted names."""
    picture = frame()

    def scores(refs):
        finder = HubFinder(settings(folders, "grid", min_score=0.0), refs, features=dino)
        return {tuple(round(v, 3) for v in h.box): h for h in finder.detect(picture)}

    both = scores(REFS)
    assert HubFinder(settings(folders, "grid"), REFS, features=dino).names == ["amy", "bob"]
    alone = [scores({"x": [r]}) for r in (*REFS["bob"], *REFS["amy"])]
    assert len(both) == len(alone[0]) == 32
    wins = set()
    for box, hit in both.items():
        bob, amy = max(alone[0][box].score, alone[1][box].score), alone[2][box].score
        assert hit.score == pytest.approx(max(bob, amy), abs=1e-6)
        if abs(bob - amy) > 1e-4:  # the tiny model scores many patches 0.5 for every query
            assert hit.index == (1 if bob > amy else 0)
            wins.add(hit.index)
    assert wins == {0, 1}  # both characters won somewhere: the test could tell them apart


def test_detect_is_transformers_image_guided_detection(folders, dino, monkeypatch):
    """With the overlap rule off, a reference's query is the one transformers' own
    ``image_guided_detection`` takes (the most object-like box), and each patch's score is its."""
    import torch
    from transformers import Owlv2ForObjectDetection, Owlv2Processor

    monkeypatch.setattr(hub_characters, "QUERY_IOU_SHARE", 0.0)
    picture = frame(SIDE, SIDE)
    ref = cutout((200, 40, 40))
    finder = HubFinder(settings(folders, "grid", min_score=0.0), {"x": [ref]}, features=dino)
    ours = sorted(h.score for h in finder.detect(picture))

    model = Owlv2ForObjectDetection.from_pretrained(folders["grid"]).eval()
    processor = Owlv2Processor.from_pretrained(folders["grid"])
    query, _ = hub_characters.reference_square(ref)
    inputs = processor(images=picture, query_images=query, return_tensors="pt")
    with torch.inference_mode():
        logits = model.image_guided_detection(**inputs).logits
    theirs = sorted(torch.sigmoid(logits[0, :, 0]).tolist())
    assert len(ours) == GRID * GRID
    assert np.allclose(ours, theirs, atol=1e-5)


def test_discover_is_transformers_text_guided_detection(folders, dino):
    import torch
    from transformers import Owlv2ForObjectDetection, Owlv2Processor

    queries = ("a cat", "a dog")
    picture = frame(SIDE, SIDE, seed=4)
    finder = HubFinder(
        settings(folders, "grid", discover_score=1e-12, discover_queries=queries), {}, features=dino
    )
    hits = finder.discover(picture)
    assert {h.index for h in hits} == {-1}

    model = Owlv2ForObjectDetection.from_pretrained(folders["grid"]).eval()
    processor = Owlv2Processor.from_pretrained(folders["grid"])
    inputs = processor(text=[list(queries)], images=picture, return_tensors="pt")
    with torch.inference_mode():
        outputs = model(**inputs)
    [theirs] = processor.post_process_grounded_object_detection(
        outputs, threshold=1e-12, target_sizes=[(SIDE, SIDE)]
    )
    assert np.allclose(sorted(h.score for h in hits), sorted(theirs["scores"].tolist()), atol=1e-5)
    top = theirs["scores"] == theirs["scores"].max()  # several may saturate at 1.0
    best = theirs["boxes"][top].clamp(0, SIDE)
    assert hits[0].score == pytest.approx(float(theirs["scores"].max()), abs=1e-6)
    assert (best - torch.tensor(hits[0].box)).abs().amax(1).min() < 1e-3


def test_hits_are_in_the_frame_suppressed_with_unit_features_and_deterministic(folders, dino):
    from diffusion_bunny.models.fitted.detector import iou

    picture = frame(80, 56, seed=5)
    finder = HubFinder(settings(folders, min_score=0.0, discover_score=0.0), REFS, features=dino)
    hits = finder.detect(picture)
    assert hits and all(h.index in (0, 1) for h in hits)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    for h in hits:
        left, top, right, bottom = h.box
        assert 0 <= left < right <= 80 and 0 <= top < bottom <= 56
        assert 0.0 <= h.score <= 1.0
        assert h.feature.shape == (32,) and abs(float(np.linalg.norm(h.feature)) - 1) < 1e-5
    for a in range(len(hits)):  # no two kept boxes of one character overlap by 0.4 or more
        for b in range(a):
            if hits[a].index == hits[b].index:
                assert iou(hits[a].box, hits[b].box) < 0.4
    # The feature is the crop's own.
    top = hits[0]
    x0, y0, x1, y1 = (round(v) for v in top.box)
    assert np.allclose(
        top.feature, dino.embed([picture[int(top.box[1]) : y1, int(top.box[0]) : x1]])[0], atol=1e-5
    )
    assert x0 >= 0 and y0 >= 0

    again = HubFinder(settings(folders, min_score=0.0, discover_score=0.0), REFS, features=dino)
    for first, second in ((hits, again.detect(picture)), (finder.discover(picture), again.discover(picture))):
        assert [(h.index, h.box) for h in first] == [(h.index, h.box) for h in second]
        assert np.allclose([h.score for h in first], [h.score for h in second], atol=1e-6)
        assert np.allclose(
            np.stack([h.feature for h in first]), np.stack([h.feature for h in second]), atol=1e-6
        )


def test_thresholds_batches_and_empty_queries(folders, dino):
    pictures = [frame(80, 56, seed=s) for s in range(3)]
    low = HubFinder(settings(folders, min_score=0.0, batch_size=2), REFS, features=dino)
    one_by_one = [low.detect(p) for p in pictures]
    batched = low.detect_frames(pictures)
    assert [[h.box for h in hits] for hits in batched] == [[h.box for h in hits] for hits in one_by_one]
    cut = sorted(h.score for h in one_by_one[0])[len(one_by_one[0]) // 2]
    high = HubFinder(settings(folders, min_score=cut), REFS, features=dino)
    kept = high.detect(pictures[0])
    assert kept and all(h.score >= cut for h in kept) and len(kept) < len(one_by_one[0])
    nothing = HubFinder(settings(folders, discover_queries=()), {}, features=dino)
    assert nothing.detect(pictures[0]) == [] and nothing.discover(pictures[0]) == []


# ---------------------------------------------------------------------------------------------
# Identities without references


def test_clusters_group_sightings_of_one_and_leave_singletons_as_noise():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 16))
    rows, truth = [], []
    for k, count in enumerate((5, 4, 1)):
        for _ in range(count):
            rows.append(centres[k] + 0.05 * rng.normal(size=16))
            truth.append(k)
    order = rng.permutation(len(rows))
    features = np.array(rows)[order]
    truth = [truth[i] for i in order]
    labels = cluster_appearances(features, 0.3)
    assert len(labels) == 10
    for a in range(10):
        for b in range(10):
            if truth[a] != 2 and truth[b] != 2:
                assert (labels[a] == labels[b]) == (truth[a] == truth[b])
    assert labels[truth.index(2)] == -1  # the one-off is noise
    assert sorted(set(labels)) == [-1, 0, 1] and labels[next(i for i, t in enumerate(truth) if t != 2)] == 0
    # Scale does not matter (cosine), and a loose threshold merges everyone.
    assert cluster_appearances(features * 7.0, 0.3) == labels
    assert set(cluster_appearances(features, 1.99)) == {0}
    assert cluster_appearances(features, 0.3, min_size=5) == [0 if t == 0 else -1 for t in truth]


def test_clusters_of_nothing_one_thing_and_zero_rows():
    assert cluster_appearances(np.zeros((0, 4)), 0.3) == []
    assert cluster_appearances(np.ones((1, 4)), 0.3) == [-1]
    assert cluster_appearances(np.array([[1.0, 0], [0.99, 0.01], [0, 0]]), 0.3) == [0, 0, -1]
    with pytest.raises(ValueError):
        cluster_appearances(np.ones((3, 4)), 0.0)
