"""Scene embeddings: the descriptor's similarities on the demo movie's frames and under changes
that keep the place, its error messages, and CLIP through a tiny model loaded by the real code."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from relay import relayed_bar

from diffusion_bunny import logs
from diffusion_bunny.errors import BadInputError, ModelError, UserError
from diffusion_bunny.models.clip import ClipEmbedder
from diffusion_bunny.stages.scenes.embeddings import (
    DESCRIPTOR_VERSION,
    DescriptorEmbedder,
    Embedder,
    describe,
    make_embedder,
)
from diffusion_bunny.stages.scenes.settings import ScenesSettings

ASSIGN = ScenesSettings().assign_threshold  # 0.85: a frame joins a cluster
NOISE = ScenesSettings().noise_threshold  # 0.5: below, the noise bucket


@pytest.fixture(scope="module")
def demo_frames(demo_run, demo) -> tuple[list[Path], np.ndarray, np.ndarray]:
    """The demo run's frame files (all of them, sorted by time), their shot ids and their places
    (the ground truth's ``source`` of each shot)."""
    import polars as pl

    frames = pl.read_parquet(demo_run.run_dir / "tables" / "frames.parquet").sort("frame_index")
    source = {s["shot_id"]: s["source"] for s in demo.ground_truth()["shots"]}
    paths = [demo_run.run_dir / p for p in frames["path"]]
    shots = frames["shot_id"].to_numpy()
    return paths, shots, np.array([source[s] for s in shots])


@pytest.fixture(scope="module")
def descriptor() -> DescriptorEmbedder:
    embedder = make_embedder(ScenesSettings())
    assert isinstance(embedder, DescriptorEmbedder)
    return embedder


def _write(path: Path, image: np.ndarray) -> Path:
    assert cv2.imwrite(str(path), image, [cv2.IMWRITE_JPEG_QUALITY, 95])
    return path


# --------------------------------------------------------------------------------------------
# descriptor
# --------------------------------------------------------------------------------------------


def test_descriptor_vectors_are_float32_unit_rows(descriptor, demo_frames):
    paths = demo_frames[0]
    vectors = descriptor.embed_images(paths)
    assert isinstance(descriptor, Embedder)
    assert descriptor.name == DESCRIPTOR_VERSION and not descriptor.supports_text
    assert vectors.dtype == np.float32 and vectors.shape == (len(paths), descriptor.dim)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert descriptor.embed_images([]).shape == (0, descriptor.dim)


def test_descriptor_values_are_pinned_to_its_name():
    """``DESCRIPTOR_VERSION`` names a vector space that scene libraries keep across runs and
    movies, so it is a name rather than a code hash (a refactor must not orphan a library). This
    pins the space: the descriptor of a picture drawn in code, seen through 8 fixed projections.
    A change of a constant, a block or a weight moves them (a 5 % change of one block's weight
    moves one by 0.01 or more); when it does, give the descriptor a new name and new values here."""
    y, x = np.mgrid[0:120, 0:160].astype(np.float64)
    image = np.stack([x * 255 / 159, y * 255 / 119, 128 + 100 * np.sin(x / 7.0) * np.cos(y / 11.0)], -1)
    image = image.clip(0, 255).astype(np.uint8)
    cv2.rectangle(image, (30, 20), (90, 70), (20, 200, 60), -1)
    cv2.circle(image, (120, 80), 25, (240, 240, 240), -1)
    vector = describe(image)
    projections = vector @ np.cos(np.outer(np.arange(vector.size), np.arange(1, 9)) * 0.37)
    assert DESCRIPTOR_VERSION == "descriptor-v1" and vector.size == 313
    pinned = [-0.775, -0.2123, 0.6079, 0.0136, 1.7388, -0.5751, 0.5183, -0.0633]
    np.testing.assert_allclose(projections, pinned, atol=2e-3)


def test_descriptor_same_place_above_different_places_on_demo(descriptor, demo_frames):
    """The stage's thresholds must mean something on the demo: frames of one place (the same
    shot, the exact repeat of shot 0, the blurred and sharp cat) mostly join a cluster, frames of
    different places never do, and most different-place pairs are noise."""
    paths, shots, places = demo_frames
    sims = descriptor.embed_images(paths) @ descriptor.embed_images(paths).T
    iu = np.triu_indices(len(paths), 1)
    same = (places[:, None] == places[None, :])[iu]
    within, across = sims[iu][same], sims[iu][~same]
    assert within.size >= 10 and across.size >= 50
    assert np.median(within) >= 0.9, np.sort(within)
    assert (within >= ASSIGN).mean() >= 0.7, np.sort(within)
    assert across.max() < ASSIGN, across.max()
    assert np.median(across) < NOISE, np.median(across)
    assert np.percentile(within, 25) > np.percentile(across, 99)
    # The repeat of shot 0 (shot 9) and the cat sharp (10) vs blurred (3): same place.
    first = {int(s): i for i, s in reversed(list(enumerate(shots)))}
    assert sims[first[0], first[9]] >= 0.99
    assert sims[first[3], first[10]] >= ASSIGN


def test_descriptor_keeps_place_under_brightness_crop_and_resolution(descriptor, demo_frames, tmp_path):
    paths = demo_frames[0]
    for k, path in enumerate(paths[::4]):
        img = cv2.imread(str(path))
        h, w = img.shape[:2]
        changed = {
            "darker": np.clip(img * 0.8, 0, 255).astype(np.uint8),
            "brighter": np.clip(img.astype(np.int16) + 20, 0, 255).astype(np.uint8),
            "crop": img[h // 40 : h - h // 40, w // 40 : w - w // 40],
            "1080p": cv2.resize(img, (1920, 1080), interpolation=cv2.INTER_CUBIC),
        }
        files = [path] + [_write(tmp_path / f"{k}_{name}.jpg", im) for name, im in changed.items()]
        vectors = descriptor.embed_images(files)
        sims = dict(zip(changed, vectors[1:] @ vectors[0], strict=True))
        assert min(sims.values()) >= 0.88, (path.name, sims)
        assert sims["1080p"] >= 0.98, (path.name, sims)  # the reduced decode sees the same picture


def test_descriptor_describes_the_picture_box_not_the_bars(descriptor, demo_frames, tmp_path):
    """A frame letterboxed into 1920x1080 (a 2.40:1 release), described inside its picture box,
    is the picture itself; described whole, its bars would make it another place."""
    from diffusion_bunny.demo.overlays import letterbox

    paths = demo_frames[0]
    for k, path in enumerate(paths[::4]):
        rgb = cv2.imread(str(path))[..., ::-1]
        h, w = rgb.shape[:2]
        scope = np.ascontiguousarray(rgb[(h - round(w / 2.4)) // 2 :][: round(w / 2.4)])
        framed, box = letterbox(scope, (1920, 1080))
        files = [
            _write(tmp_path / f"{k}_picture.jpg", scope[..., ::-1]),
            _write(tmp_path / f"{k}_released.jpg", framed[..., ::-1]),
        ]
        picture, inside = descriptor.embed_images(files, regions=[None, box])
        whole = descriptor.embed_images(files[1:])[0]
        assert float(inside @ picture) >= 0.97, path.name
        assert float(whole @ picture) < ASSIGN, path.name  # would not join the picture's cluster


def test_descriptor_scores_unrelated_images_low(descriptor, demo_frames, tmp_path):
    rng = np.random.default_rng(0)
    noise = _write(tmp_path / "noise.jpg", rng.integers(0, 256, (360, 640, 3), dtype=np.uint8))
    stripes = np.zeros((360, 640, 3), np.uint8)
    stripes[:, ::40] = (40, 200, 250)
    stripes = _write(tmp_path / "stripes.jpg", cv2.GaussianBlur(stripes, (0, 0), 3))
    flat = _write(tmp_path / "flat.jpg", np.full((360, 640, 3), 128, np.uint8))
    frames = descriptor.embed_images(demo_frames[0])
    others = descriptor.embed_images([noise, stripes, flat])
    sims = frames @ others.T
    assert np.isfinite(others).all()  # a flat frame has no texture: no division by zero
    assert sims[:, [0, 2]].max() < NOISE, sims
    # Thin bright stripes on black share the dominant vertical structure of many frames and the
    # darkness of the under-exposed shot (0.87 with it, a known limit of a colour/texture
    # descriptor); against most frames they are still noise.
    assert np.median(sims[:, 1]) < NOISE, sims[:, 1]


def test_descriptor_is_order_independent_and_deterministic(descriptor, demo_frames):
    paths = demo_frames[0]
    order = np.random.default_rng(1).permutation(len(paths))
    vectors = descriptor.embed_images(paths, progress=True)
    shuffled = descriptor.embed_images([paths[i] for i in order])
    np.testing.assert_array_equal(shuffled, vectors[order])
    np.testing.assert_array_equal(DescriptorEmbedder().embed_images(paths[:3]), vectors[:3])


def test_descriptor_has_no_text_side(descriptor):
    with pytest.raises(UserError, match=r"scenes\.embedder: clip"):
        descriptor.embed_texts(["a cat"])


def test_unreadable_frames_name_the_file(descriptor, demo_frames, tmp_path):
    good = demo_frames[0][0]
    missing = tmp_path / "missing.jpg"
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    text = tmp_path / "text.jpg"
    text.write_text("not an image")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    for bad in (missing, empty, text, truncated):
        with pytest.raises(BadInputError, match=bad.name):
            descriptor.embed_images([good, bad])


def test_descriptor_path_never_imports_torch(demo_frames):
    """The default embedder must not pay torch's import (seconds, hundreds of MB)."""
    code = (
        "import sys\n"
        "from diffusion_bunny.config import ScenesSettings\n"
        "from diffusion_bunny.stages.scenes.embeddings import make_embedder\n"
        f"make_embedder(ScenesSettings()).embed_images([{str(demo_frames[0][0])!r}])\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'torch imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------------------------
# CLIP, through a tiny model written by test/tiny_models.py
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    from tiny_models import write_tiny_clip

    return write_tiny_clip(tmp_path_factory.mktemp("tiny_clip") / "clip")


def _clip(folder: Path | str, batch_size: int = 32) -> ClipEmbedder:
    embedder = make_embedder(
        ScenesSettings(embedder="clip", clip_model=str(folder), device="cpu", batch_size=batch_size)
    )
    assert isinstance(embedder, ClipEmbedder)
    return embedder


def test_clip_images_shapes_norms_and_determinism(tiny_clip, demo_frames):
    paths = demo_frames[0][:5]
    embedder = _clip(tiny_clip)
    assert isinstance(embedder, Embedder) and embedder.supports_text
    assert embedder.name == f"clip:{tiny_clip}" and embedder.dim == 16
    vectors = embedder.embed_images(paths, progress=True)
    assert vectors.dtype == np.float32 and vectors.shape == (5, 16)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert np.abs(vectors[0] - vectors[1]).max() > 1e-3  # different frames, different vectors
    np.testing.assert_allclose(_clip(tiny_clip).embed_images(paths), vectors, atol=1e-6)
    assert embedder.embed_images([]).shape == (0, 16)


def test_both_embedders_show_their_frames_on_the_terminal_of_bunny_run(
    descriptor, tiny_clip, demo_frames, tmp_path, monkeypatch
):
    """Stage 04's embedding (CLIP on a CPU: minutes for a film) relays its bar beside the stage's
    progress file under ``bunny run``, which the terminal follows (as a kernel started by
    ``bunny`` does: ``DIFFUSION_BUNNY_LOG`` set)."""
    paths = demo_frames[0][:4]
    monkeypatch.setenv(logs.ENV, str(tmp_path / "bunny.log"))
    path = tmp_path / ".progress-scenes.json"
    for embedder, desc in ((descriptor, "embed"), (_clip(tiny_clip), "embed (clip)")):
        with logs.relaying(path):
            embedder.embed_images(paths, progress=True)
        relayed, bar = relayed_bar(path)
        assert (bar["desc"], bar["done"], bar["total"], bar["closed"]) == (desc, 4, 4, True)
        relayed.unlink()


def test_clip_images_match_the_model_run_by_hand(tiny_clip, demo_frames):
    """Same features as transformers' own recipe on the RGB picture: the reduced decode and the
    channel order must not change what the model sees."""
    import torch
    from PIL import Image
    from transformers import AutoProcessor, CLIPModel

    paths = demo_frames[0][:3]
    model = CLIPModel.from_pretrained(tiny_clip, local_files_only=True).eval()
    processor = AutoProcessor.from_pretrained(tiny_clip, local_files_only=True)
    images = [Image.open(p).convert("RGB") for p in paths]
    with torch.inference_mode():
        ref = model.get_image_features(**processor(images=images, return_tensors="pt")).pooler_output
    ref = torch.nn.functional.normalize(ref, dim=-1).numpy()
    cos = np.sum(_clip(tiny_clip).embed_images(paths) * ref, axis=1)
    assert cos.min() > 0.99, cos


def test_clip_batch_size_does_not_change_vectors(tiny_clip, demo_frames):
    paths = demo_frames[0][:5]
    texts = ["a photo of the cat", "a man on stage", "rocket", "a coffee cup on the table, seen from above"]
    one, two = _clip(tiny_clip, batch_size=1), _clip(tiny_clip, batch_size=2)
    big = _clip(tiny_clip, batch_size=64)
    np.testing.assert_allclose(one.embed_images(paths), big.embed_images(paths), atol=1e-5)
    np.testing.assert_allclose(two.embed_images(paths), big.embed_images(paths), atol=1e-5)
    # Texts of different lengths are padded differently per batch; padding must not leak in.
    np.testing.assert_allclose(one.embed_texts(texts), big.embed_texts(texts), atol=1e-5)


def test_clip_text_embeddings(tiny_clip):
    embedder = _clip(tiny_clip)
    vectors = embedder.embed_texts(["a photo of the cat", "a dog", "a photo of the cat"])
    assert vectors.dtype == np.float32 and vectors.shape == (3, 16)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(vectors[0], vectors[2], atol=1e-6)
    assert np.abs(vectors[0] - vectors[1]).max() > 1e-3
    # The tokenizer applies the merges written by tiny_models (whole-word tokens, not bytes).
    tokens = embedder.processor.tokenizer("a photo of the cat")["input_ids"]
    assert len(tokens) == 7, tokens  # start, 5 words, end


def test_clip_missing_model_says_what_to_do(tmp_path):
    for value in ("nobody-here/not-a-clip-model", str(tmp_path / "no_such_folder")):
        with pytest.raises(ModelError) as err:
            _clip(value)
        message = str(err.value)
        assert "scenes.clip_model" in message and value in message, message
        assert "hf download" in message and "scenes.embedder: descriptor" in message, message
        assert "\n" not in message


def test_clip_hub_id_offline_says_the_fix_once(monkeypatch, tmp_path):
    """A hub id not in the cache under HF_HUB_OFFLINE: the hub's line ends in "set <setting> to
    <what instead>", which once held the whole hint again ("... to a local folder (download it
    once ..., or set scenes.clip_model to a local folder ..."), for stage 04 and stage 08 alike."""
    import huggingface_hub.constants

    from diffusion_bunny.stages.generate.identity import load_clip

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError) as err:
        _clip("openai/clip-vit-base-patch32")
    message = str(err.value)
    assert message.count("set scenes.clip_model to") == 1, message
    assert message.split("set scenes.clip_model to")[1].count("(") == 1, message  # no hint inside
    assert "hf download" in message and message.endswith("or use scenes.embedder: descriptor"), message
    with pytest.raises(ModelError) as err:
        load_clip("openai/clip-vit-base-patch32", "cpu")
    message = str(err.value)
    assert message.count("set generate.clip_model to") == 1, message
    assert message.endswith("or to null for no CLIP score"), message


@pytest.mark.parametrize("damage", ["weights", "config", "tokenizer"])
def test_clip_corrupt_folder_says_what_to_do(tiny_clip, tmp_path, damage):
    folder = Path(shutil.copytree(tiny_clip, tmp_path / "clip"))
    if damage == "weights":
        (folder / "model.safetensors").write_bytes(b"\x00garbage" * 100)
    elif damage == "config":
        (folder / "config.json").write_text("{ not json")
    else:
        for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
            (folder / name).unlink()
    with pytest.raises(ModelError) as err:
        _clip(folder)
    message = str(err.value)
    assert "scenes.clip_model" in message and str(folder) in message, message
    assert "scenes.embedder: descriptor" in message and "\n" not in message, message
