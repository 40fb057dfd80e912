"""Stage 03 with characters that are no photographed faces: reference pictures of any kind, the
detector fitted to them, labelling drawn sightings, and the demo's drawn girl and cartoon dog.

The characters are drawn in code (:mod:`diffusion_bunny.demo.cartoons`), in poses the references
never show; the backgrounds are pictures that ship in installed wheels.
"""

from __future__ import annotations

import io
import json
import os
import threading
from pathlib import Path

import cv2
import numpy as np
import polars as pl
import pytest
from damaged import damaged_avifs
from PIL import Image
from relay import relayed_bar

from diffusion_bunny.config import load_config
from diffusion_bunny.demo.cartoons import Pose, cast, draw
from diffusion_bunny.demo.character_truth import truth_dir
from diffusion_bunny.demo.movie import build_demo_references, walk_at
from diffusion_bunny.demo.run import DEMO_SETTINGS
from diffusion_bunny.errors import ConfigError, ModelError
from diffusion_bunny.media.samples import load_source
from diffusion_bunny.models.device import cuda_driver_sees_gpu
from diffusion_bunny.models.faces import DetectSettings, ReferenceSet
from diffusion_bunny.models.fitted import FittedSettings
from diffusion_bunny.models.fitted import detector as fitted_module
from diffusion_bunny.models.fitted.detector import (
    FittedDetector,
    FittedSearch,
    batch_threads,
    film_cast,
    fit_detector,
    fit_film_detector,
    fit_key,
)
from diffusion_bunny.pipeline.progress import follow
from diffusion_bunny.stages.characters.identify import label_faces
from diffusion_bunny.stages.characters.references import (
    GREY,
    ReferenceProblem,
    cut_out,
    grabcut_mask,
    load_character_references,
    on_grey,
    rare_colour_mask,
    read_shrunk,
)
from diffusion_bunny.stages.characters.settings import CharactersSettings
from diffusion_bunny.stages.characters.tables import DETECTIONS_SCHEMA

pytestmark = pytest.mark.slow


def save(path: Path, array: np.ndarray, fmt: str = "PNG") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt)
    path.write_bytes(buf.getvalue())
    return path


def on_plain_ground(rgba: np.ndarray, colour: tuple[int, int, int], pad: int = 40) -> np.ndarray:
    """A drawing on a plain ground with room around it, as a user's crop of a picture."""
    h, w = rgba.shape[:2]
    ground = np.empty((h + 2 * pad, w + 2 * pad, 3), np.float32)
    ground[:] = colour
    alpha = rgba[..., 3:4] / 255.0
    ground[pad : pad + h, pad : pad + w] = (
        ground[pad : pad + h, pad : pad + w] * (1 - alpha) + rgba[..., :3] * alpha
    )
    return ground.round().astype(np.uint8)


def test_transparent_pixels_show_on_neutral_grey_not_black():
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)
    rgba[1, 1] = (0, 0, 0, 128)
    rgb = on_grey(rgba)
    assert tuple(rgb[3, 3]) == GREY and tuple(rgb[0, 0]) == (255, 0, 0)
    assert tuple(rgb[1, 1]) == (64, 64, 64)  # half black over grey


def test_a_sprite_and_a_drawing_on_a_plain_ground_are_cut_out():
    rgba = draw(cast("rin"), Pose(turn=0.3), 200).rgba
    cut, how, box = cut_out(rgba)
    assert how == "transparency" and cut.shape[:2] == (box[3] - box[1], box[2] - box[0])
    flat = on_plain_ground(rgba, (235, 230, 200))
    cut, how, box = cut_out(np.dstack([flat, np.full(flat.shape[:2], 255, np.uint8)]))
    assert how == "grabcut"
    # The subject found is the drawing (its opaque part, 40 px in from every side), give or take
    # an antialiased edge.
    ys, xs = np.nonzero(rgba[..., 3] > 16)
    drawn = (xs.min() + 40, ys.min() + 40, xs.max() + 41, ys.max() + 41)
    assert all(abs(a - b) <= 8 for a, b in zip(box, drawn, strict=True)), (box, drawn)
    # Most of the plain ground is transparent, most of the girl opaque.
    alpha = cut[..., 3] > 128
    assert 0.3 < alpha.mean() < 0.95


def test_a_poster_grabcut_cannot_separate_is_cut_out_by_the_colours_its_border_lacks():
    # FLARE's water wyvern (the character truth set's poster reference): small, blue, among
    # pillars and domes whose colours fill any rectangle GrabCut could start from.
    path = truth_dir() / "refs" / "flare" / "wyvern_water" / "poster_swing_d5_4.jpg"
    rgb = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
    assert grabcut_mask(rgb) is None
    cut, how, box = cut_out(np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)]))
    assert how == "rare colours"
    # The wyvern, boxed by hand on the poster (797 x 580): wing tip to tail.
    wyvern = (225, 200, 595, 425)
    inter = max(0, min(box[2], wyvern[2]) - max(box[0], wyvern[0])) * max(
        0, min(box[3], wyvern[3]) - max(box[1], wyvern[1])
    )
    union = (box[2] - box[0]) * (box[3] - box[1]) + (wyvern[2] - wyvern[0]) * (wyvern[3] - wyvern[1]) - inter
    assert inter / union > 0.7, box
    assert 0.2 < (cut[..., 3] > 128).mean() < 0.7  # the wyvern, not its box
    # A picture without a subject stays one line: noise, a plain gradient.
    rng = np.random.default_rng(0)
    gradient = np.dstack([np.tile(np.linspace(0, 255, 300), (200, 1))] * 3).astype(np.uint8)
    for picture in (rng.integers(0, 256, (200, 300, 3), dtype=np.uint8), gradient):
        assert rare_colour_mask(picture) is None
        with pytest.raises(ReferenceProblem, match="no subject that stands out"):
            cut_out(np.dstack([picture, np.full(picture.shape[:2], 255, np.uint8)]))


def test_reference_pictures_of_every_kind_say_what_was_taken(tmp_path):
    refs = tmp_path / "refs"
    build_demo_references(tmp_path / "demo_refs")
    (refs / "astronaut").mkdir(parents=True)
    (refs / "astronaut" / "astronaut.png").write_bytes(
        (tmp_path / "demo_refs/astronaut/astronaut.png").read_bytes()
    )
    # The same photo as a phone stores it: its pixels turned, an EXIF tag saying how to turn them back.
    with Image.open(tmp_path / "demo_refs/astronaut/astronaut.png") as photo:
        exif = Image.Exif()
        exif[0x0112] = 6  # Orientation: turn 90 degrees clockwise to view
        photo.convert("RGB").transpose(Image.Transpose.ROTATE_90).save(
            refs / "astronaut" / "phone.jpg", exif=exif.tobytes(), quality=92
        )
    sprite = draw(cast("mika"), Pose(arms_up=1.0), 220).rgba
    save(refs / "mika" / "sprite.png", sprite)
    save(
        refs / "mika" / "on_paper.jpg",
        on_plain_ground(draw(cast("mika"), Pose(turn=-0.5), 220).rgba, (240, 240, 230)),
        "JPEG",
    )
    save(refs / "mika" / "sprite.webp", sprite, "WEBP")
    save(refs / "mika" / "web.avif", sprite, "AVIF")  # what web pages serve, saved from a browser
    # a picture the user sorted into a folder of its own, inside the character's
    save(refs / "mika" / "poses" / "arms_down.png", draw(cast("mika"), Pose(), 200).rgba)
    save(
        refs / "mika" / "saved.jfif",  # a JPEG as Windows' browsers name it
        on_plain_ground(draw(cast("mika"), Pose(turn=0.4), 220).rgba, (235, 240, 240)),
        "JPEG",
    )
    (refs / "mika" / "notes.txt").write_text("not a picture")
    (refs / "mika" / "logo.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg"/>')
    (refs / "mika" / "IMG_0001.HEIC").write_bytes(b"\x00\x00\x00\x18ftypheic")  # an iPhone's photo
    save(refs / "blank" / "white.png", np.full((120, 120, 3), 255, np.uint8))
    save(refs / "tiny" / "speck.png", np.pad(sprite[::20, ::20], ((2, 2), (2, 2), (0, 0))))
    save(refs / "Smith, John" / "empty.png", np.full((90, 90, 3), 255, np.uint8))  # "last, first"
    save(refs / "Tom+Jerry" / "empty.png", np.full((90, 90, 3), 255, np.uint8))
    (refs / "broken").mkdir()
    (refs / "broken" / "half.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(40)))
    # What the operating system leaves: a zip made on a Mac, Windows' thumbnail cache
    (refs / "__MACOSX" / "mika").mkdir(parents=True)
    (refs / "__MACOSX" / "mika" / "._sprite.png").write_bytes(b"\x00\x05\x16\x07")
    (refs / "__MACOSX" / "resource.bin").write_bytes(b"\x00\x05\x16\x07")
    (refs / "mika" / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    (refs / "mika" / "desktop.ini").write_text("[.ShellClassInfo]")
    # Names that are not UTF-8 (a Latin-1 archive): a character folder and a picture
    save(Path(os.fsdecode(bytes(refs) + b"/Zo\xeb/sprite.png")), sprite)
    save(Path(os.fsdecode(bytes(refs) + b"/mika/caf\xe9.png")), sprite)

    faces, pictures, warnings = load_character_references(refs, DetectSettings())
    assert not any("MACOSX" in w or "Thumbs.db" in w or "desktop.ini" in w for w in warnings)
    commas = [w for w in warnings if "character 'Smith, John'" in w and "reads as 2 tags" in w]
    assert len(commas) == 1 and "'John Smith'" in commas[0]
    # '+' joins a picture's characters in the kohya folders: "Tom+Jerry" would read as two.
    assert [w for w in warnings if "'+'" in w] == [
        "character 'Tom+Jerry': '+' joins the characters a picture shows in the dataset's kohya folders, "
        "so its folder reads as 'Tom' and 'Jerry' together; name its folder without '+'"
    ]
    misnamed = [w for w in warnings if "is not UTF-8 text" in w]
    assert len(misnamed) == 2 and "Zo\\xeb" in "".join(misnamed) and "caf\\xe9.png" in "".join(misnamed)
    assert all(t.character.isascii() and "\udce9" not in str(t.path) for t in pictures.taken)
    # ... nor does it make stage 03 stale (its references' fingerprint), as a new picture does;
    # nor Windows' thumbnails in a folder a stage wrote (frames/ seen from a share) that stage
    from diffusion_bunny.models.faces import references_fingerprint
    from diffusion_bunny.pipeline.manifest import path_fingerprint

    mark, owned = references_fingerprint(refs), path_fingerprint(refs / "mika")
    (refs / "mika" / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0 more thumbnails")
    (refs / "__MACOSX" / "mika" / "._on_paper.jpg").write_bytes(b"\x00\x05")
    assert references_fingerprint(refs) == mark and path_fingerprint(refs / "mika") == owned
    save(refs / "mika" / "poses" / "another.png", sprite)
    assert references_fingerprint(refs) != mark and path_fingerprint(refs / "mika") != owned
    taken = {(t.character, t.path.name): t for t in pictures.taken}
    # The photograph is a human face, encoded; the girl's pictures are cut-outs for the fitted detector.
    assert faces.names == ["astronaut"] and taken[("astronaut", "astronaut.png")].use == "face"
    # Read upright (lying down it would be no photo of her face), the phone's copy is the same
    # photo: left out, one line, as two encodings of it made a set in close agreement and set the
    # adaptive threshold at its floor (a copy beside the Hamilton singer's photo named him nowhere).
    phone = taken[("astronaut", "phone.jpg")]
    assert phone.use == "left out"
    assert phone.problem == "is the same photo as astronaut.png (a copy adds nothing)"
    assert len(faces.encodings) == 1 and sum("phone.jpg is the same photo" in w for w in warnings) == 1
    assert pictures.drawn() == ["mika"] and len(pictures.cutouts["mika"]) == 6
    assert taken[("mika", "arms_down.png")].how == "transparency"
    assert taken[("mika", "sprite.png")].how == "transparency"
    assert taken[("mika", "sprite.webp")].how == "transparency"
    assert taken[("mika", "web.avif")].how == "transparency"
    assert taken[("mika", "saved.jfif")].how == "grabcut"
    assert taken[("mika", "on_paper.jpg")].how == "grabcut"
    # Each picture that gives nothing: one line naming it and why.
    problems = {t.path.name: t.problem for t in pictures.taken if t.use == "left out"}
    assert "is not a picture" in problems["notes.txt"]
    assert "is a vector drawing (SVG), which is not read; export it as PNG" in problems["logo.svg"]
    assert "is a HEIC photo, which is not read; save it as JPEG or PNG" in problems["IMG_0001.HEIC"]
    assert "is blank" in problems["white.png"]
    assert "too small" in problems["speck.png"]
    assert "cannot be read" in problems["half.png"]
    for name in ("notes.txt", "white.png", "speck.png", "half.png"):
        assert sum(name in w for w in warnings) == 1
    for folder in ("blank", "tiny", "broken"):
        assert any(f"character '{folder}' has no usable reference picture" in w for w in warnings)


def test_a_crop_of_a_photo_is_that_photo_and_two_photos_on_one_plain_page_are_two(tmp_path):
    """A photo cropped closer is the same photo (its face 0.04 from the photo's), which counted as
    a second picture narrowed the character's threshold to its floor; two photos of two people
    shrunk onto one white page hash alike, yet are two photos (their faces are not alike)."""
    demo = build_demo_references(tmp_path / "demo")
    refs = tmp_path / "refs"
    with Image.open(demo / "astronaut" / "astronaut.png") as photo:
        photo = photo.convert("RGB")
        (refs / "astronaut").mkdir(parents=True)
        photo.save(refs / "astronaut" / "a_photo.png")
        w, h = photo.size
        photo.crop((w // 8, h // 10, w - w // 8, h - h // 10)).save(refs / "astronaut" / "b_closer.png")
    # (the pages in a folder of their own: the astronaut's face under two names is left out of both)
    pages = tmp_path / "pages"
    (pages / "page").mkdir(parents=True)
    for i, name in enumerate(("astronaut", "grace_hopper")):
        page = Image.new("RGB", (1280, 800), "white")
        with Image.open(demo / name / f"{name}.png") as photo:
            small = photo.convert("RGB")
            small.thumbnail((240, 240))
            page.paste(small, (520, 280))
        page.save(pages / "page" / f"{i}_{name}.png")
    taken = {
        (t.character, t.path.name): t
        for folder in (refs, pages)
        for t in load_character_references(folder, DetectSettings())[1].taken
    }
    assert (
        taken[("astronaut", "b_closer.png")].problem
        == "is the same photo as a_photo.png (a copy adds nothing)"
    )
    assert (
        taken[("page", "0_astronaut.png")].use == "face"
        and taken[("page", "1_grace_hopper.png")].use == "face"
    )


def test_a_picture_too_large_to_open_is_one_line(tmp_path, monkeypatch):
    """Pillow refuses a picture over its decompression-bomb limit (~179 megapixels; lowered here
    so a small file crosses it): the reference is left out with one line, not a traceback."""
    save(tmp_path / "poster.png", np.full((120, 120, 3), 90, np.uint8))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5_000)
    with pytest.raises(ReferenceProblem, match="too large to read"):
        read_shrunk(tmp_path / "poster.png")[0]


def test_a_damaged_avif_reference_is_one_line_and_the_run_goes_on(tmp_path):
    """A truncated AVIF (Pillow's AVIF plugin: SyntaxError) and one without its image item
    (RuntimeError) stopped stage 03 as a bug; each is left out with one line now."""
    (tmp_path / "refs" / "mika").mkdir(parents=True)
    damaged = damaged_avifs(tmp_path / "refs" / "mika")
    faces, pictures, warnings = load_character_references(tmp_path / "refs", DetectSettings())
    for path, error in zip(damaged, ("SyntaxError", "RuntimeError"), strict=True):
        line = f"reference {path} cannot be read as a picture ({error}); left out"
        assert warnings.count(line) == 1
    assert [t.use for t in pictures.taken] == ["left out", "left out"] and not faces.names
    assert any("character 'mika' has no usable reference picture" in w for w in warnings)


def test_a_sixteen_bit_grey_picture_is_read_as_its_greys(tmp_path):
    """Line art saved as a 16-bit grey PNG (Krita, GIMP, a scanner): Pillow's own conversion
    clips every value at 255, and the reference was a white picture ("is blank")."""
    import cv2

    grey = np.tile(np.linspace(0, 255, 64).round().astype(np.uint8), (48, 1))
    grey[10:30, 20:40] = 40
    cv2.imwrite(str(tmp_path / "lineart.png"), grey.astype(np.uint16) * 257)
    assert Image.open(tmp_path / "lineart.png").mode.startswith("I")
    rgba = read_shrunk(tmp_path / "lineart.png")[0]
    assert rgba.dtype == np.uint8 and rgba.shape == (48, 64, 4)
    assert np.abs(rgba[..., 0].astype(int) - grey).max() <= 1 and (rgba[..., 3] == 255).all()
    assert (rgba[..., 0] == rgba[..., 2]).all()
    from diffusion_bunny.media.figures import as_rgb  # the reference sheet shows it so too

    with Image.open(tmp_path / "lineart.png") as im:
        assert np.abs(np.asarray(as_rgb(im))[..., 1].astype(int) - grey).max() <= 1
    # A dark one (no value over 255) is still 16-bit: near black, not 257 times as bright.
    cv2.imwrite(str(tmp_path / "dark.png"), (grey // 16).astype(np.uint16))
    assert read_shrunk(tmp_path / "dark.png")[0][..., 0].max() <= 1
    # Its transparent value (tRNS) is transparency, not black.
    with Image.open(tmp_path / "lineart.png") as im:
        im.save(tmp_path / "keyed.png", transparency=40 * 257)
    keyed = read_shrunk(tmp_path / "keyed.png")[0]
    assert (keyed[10:30, 20:40, 3] == 0).all() and keyed[0, 63, 3] == 255
    # A 0-1 float TIFF is its greys, not black.
    Image.fromarray(grey.astype(np.float32) / 255).save(tmp_path / "float.tif")
    assert np.abs(read_shrunk(tmp_path / "float.tif")[0][..., 0].astype(int) - grey).max() <= 1


def frames_with(names: list[str], poses: list[Pose], seed: int) -> tuple[np.ndarray, list[tuple[str, tuple]]]:
    """A 640x360 frame (a photo from a wheel) with ``names`` drawn in ``poses``, and their boxes."""
    rng = np.random.default_rng(seed)
    sources = ["coffee", "rocket", "motorcycle", "chelsea"]
    import cv2

    frame = cv2.resize(load_source(sources[seed % len(sources)]), (640, 360), interpolation=cv2.INTER_AREA)
    frame = frame.astype(np.float32)
    boxes = []
    for i, (name, pose) in enumerate(zip(names, poses, strict=True)):
        rgba = draw(cast(name), pose, int(rng.integers(130, 200))).rgba
        h, w = rgba.shape[:2]
        x = 40 + i * 300 + int(rng.integers(0, 40))
        y = int(rng.integers(0, 360 - h))
        alpha = rgba[..., 3:4] / 255.0
        frame[y : y + h, x : x + w] = frame[y : y + h, x : x + w] * (1 - alpha) + rgba[..., :3] * alpha
        ys, xs = np.nonzero(rgba[..., 3] > 16)
        boxes.append((name, (x + xs.min(), y + ys.min(), x + xs.max() + 1, y + ys.max() + 1)))
    return frame.round().astype(np.uint8), boxes


def overlap(a: tuple, b: tuple) -> float:
    inter = max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


@pytest.fixture(scope="module")
def fitted():
    """A detector fitted to the girl and the dog (one picture each) on photos from the wheels."""
    import cv2

    cutouts = {
        "mika": [draw(cast("mika"), Pose(arms_up=1.0, turn=-0.4), 200).rgba],
        "biscuit": [draw(cast("biscuit"), Pose(step=0.3), 160).rgba],
    }
    backgrounds = [
        cv2.resize(load_source(n), (320, 180), interpolation=cv2.INTER_AREA)
        for n in ("coffee", "rocket", "motorcycle", "chelsea", "astronaut")
    ]
    settings = FittedSettings(steps=300, batch=12, crop=160, widths=(320,), self_training=False)
    return fit_detector(cutouts, backgrounds, settings, progress=False), cutouts, backgrounds, settings


def test_fitted_detector_finds_each_character_in_poses_no_reference_shows(fitted):
    detector = fitted[0]
    assert detector.names == ["biscuit", "mika"]
    found = wrong = 0
    for seed in range(4):
        poses = [
            Pose(step=0.1 * seed, turn=0.5 - 0.3 * seed, mouth="sad", mirror=seed % 2 == 1),
            Pose(step=0.6),
        ]
        frame, truth = frames_with(["mika", "biscuit"], poses, seed)
        hits = detector.detect(frame)
        for name, box in truth:
            best = max((h for h in hits if overlap(h.box, box) >= 0.4), key=lambda h: h.score, default=None)
            found += best is not None and detector.names[best.index] == name
            wrong += best is not None and detector.names[best.index] != name
    assert found >= 6 and wrong == 0, (found, wrong)
    # A picture with neither of them: nothing named.
    empty, _ = frames_with([], [], 5)
    assert detector.detect(empty) == []


def test_fitted_detector_file_round_trip_and_key(fitted, tmp_path):
    detector, cutouts, backgrounds, settings = fitted
    frame, _ = frames_with(["mika"], [Pose(turn=0.2)], 1)
    path = tmp_path / "fitted.pt"
    path.write_bytes(detector.to_bytes())
    again = FittedDetector.load(path)
    assert again.names == detector.names and again.settings == settings
    first, second = detector.detect(frame, 0.1), again.detect(frame, 0.1)
    assert [(h.index, round(h.score, 5), tuple(round(v, 2) for v in h.box)) for h in first] == [
        (h.index, round(h.score, 5), tuple(round(v, 2) for v in h.box)) for h in second
    ]
    # A damaged file is fitted again, not an error.
    path.write_bytes(b"not torch")
    assert FittedDetector.load(path) is None
    # The key follows the pictures, the frames and the settings.
    key = fit_key(cutouts, backgrounds, settings)
    changed = {**cutouts, "mika": [cutouts["mika"][0][:, ::-1].copy()]}
    assert fit_key(changed, backgrounds, settings) != key
    assert fit_key(cutouts, backgrounds[:-1], settings) != key
    assert fit_key(cutouts, backgrounds, settings.model_copy(update={"steps": 301})) != key
    # The score a sighting needs is applied after the search: no new fit for it.
    assert fit_key(cutouts, backgrounds, settings.model_copy(update={"min_score": 0.3})) == key
    # Nor for where it trains: a fit made on a GPU serves the CPU and the other way round.
    assert fit_key(cutouts, backgrounds, settings.model_copy(update={"device": "cpu"})) == key
    assert fit_key(cutouts, backgrounds, settings) == key
    # Nor for torch's threads (0 and 1 are one setting), nor for a picture renamed so that it
    # sorts elsewhere: each refitted and searched every frame again.
    assert fit_key(cutouts, backgrounds, settings.model_copy(update={"threads": 1})) == key
    two = {**cutouts, "mika": [cutouts["mika"][0], cutouts["mika"][0][:, ::-1].copy()]}
    swapped = {**cutouts, "mika": two["mika"][::-1]}
    assert fit_key(swapped, backgrounds, settings) == fit_key(two, backgrounds, settings) != key


def test_the_fit_trains_where_its_device_says_and_comes_back_on_the_cpu(fitted, monkeypatch):
    """``characters.fitted.device`` is resolved as every device setting is (the setting named in
    its errors), and the device's plumbing changes no arithmetic: trained on the CPU it chose, a
    fit asked for ``auto`` is the very fit ``cpu`` makes; the detector comes back on the CPU,
    where it is searched, saved and exported. (The resolution is recorded and answered ``cpu``
    here, so a machine with a GPU checks the same.)"""
    _, cutouts, backgrounds, settings = fitted
    asked = []
    monkeypatch.setattr(
        fitted_module, "resolve_device", lambda device, setting: asked.append((device, setting)) or "cpu"
    )
    short = settings.model_copy(update={"steps": 12, "self_training": True})  # searches at steps 6, 9
    weights = {}
    for device in ("auto", "cpu"):
        chosen = short.model_copy(update={"device": device})
        detector = fit_detector(cutouts, backgrounds, chosen, progress=False)
        assert {p.device.type for p in detector.net.parameters()} == {"cpu"}
        weights[device] = detector.net.state_dict()
    assert weights["auto"].keys() == weights["cpu"].keys()
    assert all(np.array_equal(weights["auto"][k].numpy(), weights["cpu"][k].numpy()) for k in weights["cpu"])
    assert asked == [("auto", "characters.fitted.device"), ("cpu", "characters.fitted.device")]


def test_one_thread_makes_the_batches_it_always_made_and_several_make_the_same_on_every_run(
    fitted, monkeypatch
):
    """On a GPU several threads make the training pictures (the step waits for them there). With
    one, the CPU's default, they are drawn from the one stream a single maker always drew from
    (so the fit is the one it was); with several, each thread has a stream of its own and makes
    every k-th step, so a fit, searches of the film's frames included, is the same on every run
    however the threads are scheduled; and the count is not part of the fit's key."""
    _, cutouts, backgrounds, settings = fitted
    names = sorted(cutouts)
    synth = fitted_module.Synthesizer([cutouts[n] for n in names], backgrounds, settings.crop)
    short = settings.model_copy(update={"steps": 6, "batch": 3, "seed": 7})
    batches = fitted_module._Batches(synth, short, len(names), set(), 1)
    try:
        made = [batches.get(step)[0] for step in range(short.steps)]
    finally:
        batches.close()
    rng = np.random.default_rng(7)
    one_stream = [[synth.example(rng).image for _ in range(short.batch)] for _ in range(short.steps)]
    assert all(
        np.array_equal(a, b)
        for got, want in zip(made, one_stream, strict=True)
        for a, b in zip(got, want, strict=True)
    )

    monkeypatch.setattr(fitted_module, "resolve_device", lambda device, setting: "cpu")
    three = settings.model_copy(
        update={"steps": 14, "self_training": True, "batch_threads": 3}
    )  # searches at 7, 10
    weights = [fit_detector(cutouts, backgrounds, three, progress=False).net.state_dict() for _ in range(2)]
    assert all(np.array_equal(weights[0][k].numpy(), weights[1][k].numpy()) for k in weights[0])
    assert fit_key(cutouts, backgrounds, three) == fit_key(
        cutouts, backgrounds, three.model_copy(update={"batch_threads": 0})
    )
    # Left to itself: one beside torch's step on the CPU; on a GPU up to 4, a core left to the step.
    assert batch_threads(three, "cuda") == 3
    auto = three.model_copy(update={"batch_threads": 0})
    monkeypatch.setattr(fitted_module.os, "sched_getaffinity", lambda pid: set(range(16)))
    assert (batch_threads(auto, "cpu"), batch_threads(auto, "cuda")) == (1, 4)
    monkeypatch.setattr(fitted_module.os, "sched_getaffinity", lambda pid: {0, 1})
    assert batch_threads(auto, "cuda") == 1


def test_a_failing_batch_maker_stops_the_fit_with_its_error(fitted, monkeypatch):
    """A thread making the batches that fails hands its error to the fit (no hang on a queue
    nobody fills), and the other makers stop."""
    _, cutouts, backgrounds, settings = fitted
    real, made = fitted_module.Synthesizer.example, []

    def failing(self, rng):
        made.append(1)
        if len(made) == 40:  # a few steps in, on whichever thread makes that picture
            raise ValueError("a broken cut-out")
        return real(self, rng)

    monkeypatch.setattr(fitted_module.Synthesizer, "example", failing)
    chosen = settings.model_copy(update={"steps": 12, "batch_threads": 3, "device": "cpu"})
    with pytest.raises(ValueError, match="a broken cut-out"):
        fit_detector(cutouts, backgrounds, chosen, progress=False)
    assert not [t for t in threading.enumerate() if t.name.startswith("fit-batches")]


@pytest.mark.parametrize("where", ["network", "bar"])
def test_a_fit_that_fails_before_its_first_step_leaves_torch_and_no_maker_behind(fitted, monkeypatch, where):
    """A fit that fails as it starts (the network moved to a GPU that is out of memory, the bar
    that cannot be made) gives the kernel its torch threads back and leaves no thread making
    pictures, blocked on a queue nobody reads, with the film's frames in memory."""
    import torch

    _, cutouts, backgrounds, settings = fitted

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory")

    target = "build_net" if where == "network" else "relay_bar_class"
    monkeypatch.setattr(fitted_module, target, out_of_memory)
    before = torch.get_num_threads()
    torch.set_num_threads(before + 1)
    try:
        chosen = settings.model_copy(update={"steps": 12, "batch_threads": 2, "device": "cpu"})
        with pytest.raises(RuntimeError, match="out of memory"):
            fit_detector(cutouts, backgrounds, chosen, progress=False)
        assert torch.get_num_threads() == before + 1
    finally:
        torch.set_num_threads(before)
    assert not [t for t in threading.enumerate() if t.name.startswith("fit-batches")]


def test_the_fit_shows_its_steps_on_the_terminal_of_bunny_run(fitted, tmp_path, monkeypatch):
    """The fit is stage 03's longest wait (minutes on a CPU): under ``bunny run`` its bar is
    relayed beside the stage's progress file, which the terminal follows, as a download's is
    (here the stage's side runs in this process, as in a kernel started by ``bunny``)."""
    from diffusion_bunny import logs

    _, cutouts, backgrounds, settings = fitted
    monkeypatch.setenv(logs.ENV, str(tmp_path / "bunny.log"))
    path = tmp_path / ".progress-characters.json"
    with logs.relaying(path):
        fit_detector(cutouts, backgrounds, settings.model_copy(update={"steps": 12}), desc="fit them")
    relayed, bar = relayed_bar(path)
    shown = (bar["desc"], bar["unit"], bar["done"], bar["total"], bar["closed"])
    assert shown == ("fit them", "step", 12, 12, True)
    # and the terminal shows it, then removes the file
    stop = threading.Event()
    stop.set()
    follow(path, stop, 0.01)
    assert not relayed.exists()


@pytest.mark.skipif(cuda_driver_sees_gpu(), reason="this machine has a GPU")
def test_a_fit_asked_of_a_gpu_the_machine_lacks_is_one_line_naming_the_setting(fitted):
    _, cutouts, backgrounds, settings = fitted
    asked = r"characters\.fitted\.device is 'cuda' but torch sees no CUDA GPU.*set characters\.fitted\.device"
    with pytest.raises(ModelError, match=asked):
        fit_detector(cutouts, backgrounds, settings.model_copy(update={"device": "cuda"}), progress=False)
    with pytest.raises(ConfigError, match=r"characters\.fitted\.device"):
        load_config(overrides={"characters.fitted.device": "tpu"})


def test_onnx_search_finds_what_the_torch_detector_finds(fitted, tmp_path):
    """Stage 03's workers search with the ``.onnx`` file on ONNX Runtime (no torch in them): the
    same hits, scores, boxes and features as the fitted network in torch, at any frame size."""
    detector, _, _, settings = fitted
    path = tmp_path / "fitted.onnx"
    path.write_bytes(detector.onnx_bytes())
    search = FittedSearch.load(path)
    assert search.names == detector.names and search.settings == settings and search.key == detector.key
    seen = 0
    for seed, size in ((1, None), (2, (400, 300)), (3, (1280, 720))):
        frame, _ = frames_with(["mika", "biscuit"], [Pose(turn=0.2), Pose(turn=-0.3)], seed)
        if size:
            frame = cv2.resize(frame, size)
        first, second = detector.detect(frame, 0.1), search.detect(frame, 0.1)
        assert [(h.index, round(h.score, 3), tuple(round(v, 1) for v in h.box)) for h in first] == [
            (h.index, round(h.score, 3), tuple(round(v, 1) for v in h.box)) for h in second
        ]
        for a, b in zip(first, second, strict=True):
            assert np.allclose(a.feature, b.feature, atol=1e-4)
        seen += len(first)
    assert seen >= 2  # the comparison compared sightings, not two empty lists
    # A damaged or foreign file is no search (stage 03 writes it again from the torch file).
    path.write_bytes(b"not onnx")
    assert FittedSearch.load(path) is None


def test_a_search_in_this_process_uses_the_network_now_in_the_file(fitted, tmp_path):
    """Stage 03 searches in its own process when a pool does not pay (a few frames, one
    worker), as a notebook's kernel does run after run. A fit made again under the same name (on
    a GPU, other weights from the same pictures) is searched with, not the network that process
    read before: its sightings are filed under the new network's digest."""
    import torch

    from diffusion_bunny.stages.characters.stage import KEEP_SCORE, detect_faces

    detector = fitted[0]
    frame, _ = frames_with(["mika", "biscuit"], [Pose(turn=0.2), Pose(turn=-0.3)], 1)
    cv2.imwrite(str(tmp_path / "f1.png"), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    frames = pl.DataFrame(
        {"frame_id": ["f1"], "path": ["f1.png"], "width": [frame.shape[1]], "height": [frame.shape[0]]}
    )
    path = tmp_path / "fitted-samekey.pt"
    settings = DetectSettings()

    def search_with(net: FittedDetector) -> tuple[list[float], list[float], str]:
        path.write_bytes(net.to_bytes())
        path.with_suffix(".onnx").write_bytes(net.onnx_bytes())
        found, status, facts = detect_faces(
            tmp_path, frames, settings, workers=1, progress=False, fitted=path
        )
        assert facts["frames_detected"] == 1 and status["status"].to_list() == ["ok"]
        got = sorted(round(s, 4) for s in found.filter(pl.col("kind") == "drawn")["detector_score"])
        hits = FittedSearch.load(path.with_suffix(".onnx")).detect(frame, KEEP_SCORE)
        want = sorted(round(h.score, 4) for h in hits if h.box[3] - h.box[1] >= settings.min_face_px)
        return got, want, status["detect_key"][0]

    first, first_want, first_key = search_with(detector)
    assert first == first_want and first  # the frame holds sightings to compare
    other = FittedDetector.load(path)
    with torch.no_grad():
        other.net.heat.bias.add_(1.5)  # every heat-map score rises: another network, the same key
    second, second_want, second_key = search_with(other)
    assert second_key != first_key
    assert second == second_want and second != first


def test_the_film_cast_is_the_characters_found_in_its_frames(fitted):
    detector = fitted[0]
    film = [frames_with(["mika"], [Pose(turn=0.2 * seed, step=0.1 * seed)], seed)[0] for seed in range(3)]
    assert film_cast(detector, film, 0.5) == ["mika"]
    both = [frames_with(["mika", "biscuit"], [Pose(), Pose(step=0.6)], 1)[0]]
    assert film_cast(detector, both, 0.5) == ["biscuit", "mika"]
    assert film_cast(detector, [frames_with([], [], 5)[0]], 0.5) == []


def test_a_film_is_fitted_again_for_the_characters_in_it_under_the_same_key(fitted, monkeypatch, capsys):
    """The refit's wiring: the characters the first fit finds in the film (here said by a
    stand-in for :func:`film_cast`, whose judgement the test above and the truth set's films
    check), fitted again alone, saved under the key of every character's pictures."""
    _, cutouts, backgrounds, _ = fitted
    settings = FittedSettings(steps=40, batch=8, crop=128, widths=(320,), self_training=False)
    casts: list[list[str]] = []

    def cast_of(detector, frames, score):
        casts.append(list(detector.names))
        assert score == settings.cast_score and frames is backgrounds
        return ["mika"]

    monkeypatch.setattr(fitted_module, "film_cast", cast_of)
    capsys.readouterr()
    detector = fit_film_detector(cutouts, backgrounds, settings, progress=True)
    bars = capsys.readouterr().err
    assert "fit characters" in bars and "fit again for the 1 of 2 characters in the film" in bars
    assert casts == [["biscuit", "mika"]]  # judged once, on the fit of every character
    assert detector.names == ["mika"] and detector.key == fit_key(cutouts, backgrounds, settings)

    # Every character in the film, none of them, or the check turned off: the first fit is kept.
    for cast_now, update in ((["biscuit", "mika"], {}), ([], {}), (["mika"], {"cast_score": None})):
        monkeypatch.setattr(fitted_module, "film_cast", lambda *_, c=cast_now: c)
        kept = fit_film_detector(cutouts, backgrounds, settings.model_copy(update=update), progress=False)
        assert kept.names == ["biscuit", "mika"]


def drawn_rows(spec: list[tuple]) -> pl.DataFrame:
    """Detections as stage 03's workers write them: (frame, shot, index, label, score, box, feature)."""
    rows = []
    for k, (fid, _, _, label, score, box, feature) in enumerate(spec):
        left, top, right, bottom = box
        rows.append(
            {
                "face_id": f"{fid}_{k:02d}",
                "frame_id": fid,
                "top": top,
                "right": right,
                "bottom": bottom,
                "left": left,
                "embedding": list(feature),
                "sharpness": 100.0,
                "detector_score": score,
                "yaw": 0.0,
                "kind": "drawn",
                "label": label,
            }
        )
    return pl.DataFrame(rows, schema=DETECTIONS_SCHEMA)


def face_row(face_id: str, frame_id: str, box: tuple[int, int, int, int], encoding: np.ndarray) -> dict:
    """An unnamed human-face detection (``box`` left, top, right, bottom) as stage 03 writes it."""
    left, top, right, bottom = box
    return {
        "face_id": face_id,
        "frame_id": frame_id,
        "top": top,
        "right": right,
        "bottom": bottom,
        "left": left,
        "embedding": list(encoding),
        "sharpness": 100.0,
        "detector_score": 0.9,
        "yaw": 0.0,
        "kind": "face",
        "label": None,
    }


def test_drawn_sightings_are_named_by_the_detector_voted_along_a_shot_and_dropped_under_the_score():
    a, b = np.eye(64, dtype=np.float32)[0], np.eye(64, dtype=np.float32)[1]
    spec = [
        ("f0", 1, 10, "mika", 0.9, (10, 10, 60, 110), a),
        ("f1", 1, 20, "mika", 0.8, (12, 10, 62, 110), a),
        # The same girl in the next frame, called the dog by a weak peak: her track names her.
        ("f2", 1, 30, "biscuit", 0.55, (14, 10, 64, 110), a),
        # Under characters.fitted.min_score: no appearance.
        ("f2", 1, 30, "biscuit", 0.2, (300, 200, 380, 260), b),
        # The dog in another shot, alone in its track.
        ("f3", 2, 40, "biscuit", 0.7, (300, 200, 380, 260), b),
    ]
    det = drawn_rows(spec)
    frames = pl.DataFrame(
        {
            "frame_id": [s[0] for s in spec],
            "shot_id": [s[1] for s in spec],
            "frame_index": [s[2] for s in spec],
            "timestamp_s": [s[2] / 24 for s in spec],
        }
    ).unique("frame_id", maintain_order=True)
    faces = label_faces(det, frames, ReferenceSet(), CharactersSettings())
    assert faces.height == 4 and set(faces["kind"]) == {"drawn"}
    by_id = {r["face_id"]: r for r in faces.iter_rows(named=True)}
    assert by_id["f2_02"]["character"] == "mika" and by_id["f2_02"]["raw_character"] == "biscuit"
    assert by_id["f2_02"]["low_confidence"]
    assert by_id["f0_00"]["character"] == "mika" and not by_id["f0_00"]["low_confidence"]
    assert (
        by_id["f3_04"]["character"] == "biscuit" and by_id["f3_04"]["track_id"] != by_id["f0_00"]["track_id"]
    )
    assert by_id["f0_00"]["distance"] == pytest.approx(0.1)
    assert by_id["f2_02"]["distance"] == pytest.approx(0.45)
    # A higher score needed: the weak sightings are no appearances any more.
    strict = CharactersSettings(fitted=FittedSettings(min_score=0.75))
    assert label_faces(det, frames, ReferenceSet(), strict)["face_id"].to_list() == ["f0_00", "f1_01"]


def test_a_face_on_a_named_drawn_figure_is_that_character_and_so_is_the_rest_of_its_track():
    """A painted knight boxed by his breastplate, his face just above the box: the face detector's
    face there is his face, not "1 other person", and in the next frame, where the drawn
    detector missed him, the same face (its track) is his. A face beside him stays unknown."""
    knight, stranger = np.eye(128, dtype=np.float32)[0], np.eye(128, dtype=np.float32)[5]
    feature = np.eye(64, dtype=np.float32)[0]
    drawn = drawn_rows(
        [
            ("f0", 1, 10, "marshal", 0.9, (270, 342, 532, 661), feature),
            ("f2", 2, 40, "marshal", 0.9, (270, 342, 532, 661), feature),
        ]
    )

    faces_in = pl.DataFrame(
        [
            face_row("f0_f", "f0", (374, 248, 460, 356), knight),  # above his breastplate's box
            face_row("f1_f", "f1", (378, 250, 464, 358), knight),  # the next frame: no drawn sighting
            face_row("f1_g", "f1", (900, 100, 980, 200), stranger),
            face_row("f2_f", "f2", (600, 300, 690, 400), stranger),  # beside him, not on his figure
        ],
        schema=DETECTIONS_SCHEMA,
    )
    frames = pl.DataFrame(
        {"frame_id": ["f0", "f1", "f2"], "shot_id": [1, 1, 2], "frame_index": [10, 20, 40]}
    ).with_columns((pl.col("frame_index") / 24).alias("timestamp_s"))
    faces = label_faces(pl.concat([drawn, faces_in]), frames, ReferenceSet(), CharactersSettings())
    by_id = {r["face_id"]: r for r in faces.iter_rows(named=True)}
    assert "f0_f" not in by_id  # one appearance of him in f0: the drawn one, with his head
    knight_box = [by_id["f0_00"][k] for k in ("left", "top", "right", "bottom")]
    assert knight_box == [270, 248, 532, 661]
    assert [by_id["f2_01"][k] for k in ("left", "top", "right", "bottom")] == [270, 342, 532, 661]
    assert by_id["f1_f"]["character"] == "marshal" and by_id["f1_f"]["low_confidence"]
    assert by_id["f1_f"]["cluster"] is None
    assert by_id["f1_g"]["character"] is None and by_id["f2_f"]["character"] is None
    assert by_id["f2_f"]["cluster"] is not None
    # Raised by less than the face's height, the same face a little higher is no longer on him.
    high = faces_in.with_columns(
        pl.when(pl.col("face_id") == "f0_f").then(pl.col("top") - 60).otherwise(pl.col("top")).alias("top"),
        pl.when(pl.col("face_id") == "f0_f")
        .then(pl.col("bottom") - 60)
        .otherwise(pl.col("bottom"))
        .alias("bottom"),
    )
    apart = label_faces(pl.concat([drawn, high]), frames, ReferenceSet(), CharactersSettings())
    assert apart.filter(pl.col("kind") == "face")["character"].null_count() == 4
    # A face a person named by hand is theirs: kept, named, and its track keeps no other name.
    edits = pl.DataFrame({"face_id": ["f0_f"], "character": ["bob"], "ts": [1.0]})
    fixed = label_faces(pl.concat([drawn, faces_in]), frames, ReferenceSet(), CharactersSettings(), edits)
    by_id = {r["face_id"]: r for r in fixed.iter_rows(named=True)}
    assert by_id["f0_f"]["character"] == "bob" and by_id["f0_f"]["edited"]
    assert by_id["f1_f"]["character"] is None
    assert [by_id["f0_00"][k] for k in ("top", "bottom")] == [342, 661]


def test_a_fix_of_a_drawn_sighting_whose_box_grew_by_a_large_face_holds_on_a_rerun(tmp_path):
    """A breastplate boxed under a large head: the appearance a person sees (and fixes) has the
    box grown by the face; the rerun matches fixes against the detector's own box, which
    overlaps the grown one by less than the fixes' IoU, so the fix "none of the characters"
    was not seen when the face rule ran: his face was dropped again and its track named after
    the sighting the person had said was not him. The fix keeps the detector's box too. A fix
    whose box merely holds another character (a poster behind a girl) is not hers."""
    from diffusion_bunny.pipeline.run import Run
    from diffusion_bunny.stages.characters.stage import fix_appearance, read_appearance_edits
    from diffusion_bunny.stages.characters.tables import apply_appearance_edits

    head = np.eye(128, dtype=np.float32)[0]
    drawn = drawn_rows([("f0", 1, 10, "knight", 0.9, (100, 200, 200, 260), np.eye(64, dtype=np.float32)[0])])
    faces_in = pl.DataFrame(
        [
            face_row("f0_f", "f0", (110, 120, 190, 200), head),
            face_row("f1_f", "f1", (112, 122, 192, 202), head),
        ],
        schema=DETECTIONS_SCHEMA,
    )
    detections = pl.concat([drawn, faces_in])
    frames = pl.DataFrame(
        {"frame_id": ["f0", "f1"], "shot_id": [1, 1], "frame_index": [10, 20], "timestamp_s": [0.4, 0.8]}
    )
    first = label_faces(detections, frames, ReferenceSet(), CharactersSettings())
    sighting = first.filter(pl.col("kind") == "drawn").row(0, named=True)
    assert (sighting["top"], first.filter(pl.col("face_id") == "f1_f")["character"][0]) == (120, "knight")
    run = Run(tmp_path / "run")
    run.run_dir.mkdir()
    (run.run_dir / "run.json").write_text(json.dumps({"movie": "knight.mp4"}))
    run.write_table("detections", detections)
    run.write_table("faces", first)
    fixed = fix_appearance(run.run_dir, sighting["face_id"], None)
    assert fixed.filter(pl.col("face_id") == sighting["face_id"])["character"][0] is None
    fix = read_appearance_edits(run.run_dir)
    assert fix.select("top", "raw_top").row(0) == (120, 200)

    rerun = label_faces(detections, frames, ReferenceSet(), CharactersSettings(), fix)
    again = apply_appearance_edits(rerun, fix)  # as the stage's merge does
    by_id = {r["face_id"]: r for r in again.iter_rows(named=True)}
    assert by_id[sighting["face_id"]]["character"] is None and by_id[sighting["face_id"]]["edited"]
    assert "f0_f" in by_id  # his face is an appearance again, no longer taken into the sighting
    assert by_id["f0_f"]["character"] is None and by_id["f1_f"]["character"] is None

    # A poster boxed 400x400 and fixed as none; a rerun finds only the girl in front of it.
    sides = ("left", "top", "right", "bottom")
    poster = fix.with_columns(
        [pl.lit(v).alias(c) for c, v in zip(sides, (100, 100, 500, 500), strict=True)]
        + [pl.lit(None, pl.Int64).alias(f"raw_{c}") for c in sides]
    )
    girl = again.filter(pl.col("face_id") == sighting["face_id"]).with_columns(
        pl.lit(200).alias("left"),
        pl.lit(200).alias("top"),
        pl.lit(420).alias("right"),
        pl.lit(440).alias("bottom"),
        pl.lit("girl").alias("character"),
        pl.lit(False).alias("edited"),
    )
    assert apply_appearance_edits(girl, poster).select("character", "edited").row(0) == ("girl", False)


def test_a_face_on_a_drawn_sighting_fixed_to_nobody_is_not_named_by_its_track():
    """The girl's drawn sighting in f0 fixed to "none of the characters": the face on it became
    an appearance again, and its track (her face in f2, on her figure there) named it after her,
    in the very frame a person said she was not: captioned with her and exported as her close-up."""
    from diffusion_bunny.stages.characters.tables import APPEARANCE_EDIT_SCHEMA, apply_appearance_edits

    head, feature = np.eye(128, dtype=np.float32)[0], np.eye(64, dtype=np.float32)[0]
    box = (270, 342, 532, 661)
    drawn = drawn_rows([("f0", 1, 10, "mika", 0.9, box, feature), ("f2", 1, 30, "mika", 0.9, box, feature)])
    faces_in = pl.DataFrame(
        [
            face_row("f0_f", "f0", (374, 248, 460, 356), head),
            face_row("f2_f", "f2", (376, 250, 462, 358), head),
        ],
        schema=DETECTIONS_SCHEMA,
    )
    frames = pl.DataFrame(
        {"frame_id": ["f0", "f2"], "shot_id": [1, 1], "frame_index": [10, 30]}
    ).with_columns((pl.col("frame_index") / 24).alias("timestamp_s"))
    detections = pl.concat([drawn, faces_in])
    first = label_faces(detections, frames, ReferenceSet(), CharactersSettings())
    assert first.filter(pl.col("kind") == "face").is_empty()  # both faces are hers, in her figures
    sighting = first.filter((pl.col("kind") == "drawn") & (pl.col("frame_id") == "f0")).row(0, named=True)
    fix = pl.DataFrame(
        [
            {
                "event_id": "e1",
                "ts": __import__("datetime").datetime(2026, 11, 29),
                "face_id": sighting["face_id"],
                "character": None,
                "frame_id": "f0",
                "kind": "drawn",
                **{k: sighting[k] for k in ("left", "top", "right", "bottom")},
            }
        ],
        schema=APPEARANCE_EDIT_SCHEMA,
    )
    again = apply_appearance_edits(
        label_faces(detections, frames, ReferenceSet(), CharactersSettings(), fix), fix
    )
    by_id = {r["face_id"]: r for r in again.iter_rows(named=True)}
    assert by_id[sighting["face_id"]]["character"] is None
    assert "f0_f" in by_id and by_id["f0_f"]["character"] is None  # an appearance again, of no one
    assert "f2_f" not in by_id  # hers in f2, on her figure there


def test_a_face_on_the_track_is_not_the_character_where_the_detector_found_her_elsewhere():
    """Wesnoth's warlord carries a skull on a pole: the face detector's "face" on the skull lies
    on his figure in one frame, and its track was named after him in every frame, exported as his
    close-up, even where the detector boxed him away from it. A track names a face only in
    frames where she was missed."""
    skull = np.eye(128, dtype=np.float32)[0]
    feature = np.eye(64, dtype=np.float32)[0]
    drawn = drawn_rows(
        [
            ("f0", 1, 10, "orc", 0.9, (270, 342, 532, 661), feature),
            ("f2", 1, 30, "orc", 0.9, (20, 400, 130, 560), feature),  # found, far from the skull
        ]
    )

    faces_in = pl.DataFrame(
        [
            face_row("f0_f", "f0", (374, 248, 460, 356), skull),  # on his figure
            face_row("f1_f", "f1", (378, 250, 464, 358), skull),  # he is missed here
            face_row("f2_f", "f2", (380, 250, 466, 358), skull),
        ],
        schema=DETECTIONS_SCHEMA,
    )
    frames = pl.DataFrame(
        {"frame_id": ["f0", "f1", "f2"], "shot_id": [1, 1, 1], "frame_index": [10, 20, 30]}
    ).with_columns((pl.col("frame_index") / 24).alias("timestamp_s"))
    faces = label_faces(pl.concat([drawn, faces_in]), frames, ReferenceSet(), CharactersSettings())
    by_id = {r["face_id"]: r for r in faces.iter_rows(named=True)}
    assert "f0_f" not in by_id
    assert by_id["f1_f"]["character"] == "orc" and by_id["f1_f"]["low_confidence"]
    assert by_id["f2_f"]["character"] is None


def test_a_face_on_two_drawn_figures_is_the_one_it_overlaps_most():
    feature = np.eye(64, dtype=np.float32)[0]
    drawn = drawn_rows(
        [
            # Listed first, and the face is on her figure too, but less than on his.
            ("f0", 1, 10, "girl", 0.9, (175, 140, 400, 400), feature),
            ("f0", 1, 10, "knight", 0.9, (100, 150, 300, 400), feature),
        ]
    )
    face = face_row("f0_f", "f0", (150, 120, 230, 180), np.eye(128, dtype=np.float32)[0])
    frames = pl.DataFrame({"frame_id": ["f0"], "shot_id": [1], "frame_index": [10], "timestamp_s": [0.4]})
    faces = label_faces(
        pl.concat([drawn, pl.DataFrame([face], schema=DETECTIONS_SCHEMA)]),
        frames,
        ReferenceSet(),
        CharactersSettings(),
    )
    assert faces["kind"].to_list() == ["drawn", "drawn"]
    by_name = {r["character"]: r for r in faces.iter_rows(named=True)}
    assert (by_name["knight"]["top"], by_name["girl"]["top"]) == (120, 140)  # his box took the face


def test_demo_drawn_characters_found_in_their_shots_and_nowhere_else(demo_run, demo, tmp_path):
    """Stage 03 on the demo movie with its references: the girl and the dog are found in the
    shots they walk through, under their names, with boxes on them, and named nowhere else."""
    import shutil

    import torch

    from diffusion_bunny.pipeline.run import Run
    from diffusion_bunny.stages import run_stage

    refs = build_demo_references(tmp_path / "refs")
    shutil.copytree(demo_run.run_dir, tmp_path / "run")
    run = Run.open(tmp_path / "run")
    overrides = {**DEMO_SETTINGS, "characters.reference_dir": str(refs)}
    faces = run_stage(run, "characters", load_config(None, overrides), progress=False)["faces"]
    truth = demo.ground_truth()
    drawn = faces.filter(pl.col("kind") == "drawn")
    assert set(drawn["character"].drop_nulls()) == {"mika", "biscuit"}
    for row in drawn.filter(pl.col("character").is_not_null()).iter_rows(named=True):
        shot = next(s for s in truth["shots"] if s["start_frame"] <= row["frame_index"] < s["end_frame"])
        assert row["character"] in shot["characters"], row
        spec_walk = shot_walk(shot["shot_id"])
        _, box = walk_at(
            spec_walk, row["frame_index"] - shot["start_frame"], shot["end_frame"] - shot["start_frame"]
        )
        assert overlap((row["left"], row["top"], row["right"], row["bottom"]), box) >= 0.4, row
    # Every demo shot with a drawn character has it named in at least one of its frames.
    named_shots = set(drawn.filter(pl.col("character").is_not_null())["shot_id"])
    assert named_shots == {s["shot_id"] for s in truth["shots"] if set(s["characters"]) & {"mika", "biscuit"}}
    facts = run.read_manifest("characters")["facts"]
    assert facts["fitted"]["characters"] == ["biscuit", "mika"]
    taken = {Path(t["path"]).name: t for t in facts["references_taken"]}
    assert (
        taken["mika_sprite.png"]["how"] == "transparency" and taken["biscuit_poster.jpg"]["how"] == "grabcut"
    )
    # Each cut-out is kept as the fitted detector learns it: the poster's background taken away.
    cut = Image.open(taken["biscuit_poster.jpg"]["cutout"])
    alpha = np.asarray(cut.convert("RGBA"))[..., 3]
    left, top, right, bottom = taken["biscuit_poster.jpg"]["box"]
    assert cut.size == (right - left, bottom - top)
    assert 0.05 < (alpha < 128).mean() < 0.9
    json.dumps(facts)  # the manifest holds plain JSON

    # A rerun (a new threshold) searches no frame again; a fit made anew under the same key (on
    # a GPU the same pictures and frames give other weights) is another network, and every frame
    # is searched.
    run_stage(
        run,
        "characters",
        load_config(None, {**overrides, "characters.fitted.min_score": 0.45}),
        progress=False,
    )
    again = run.read_manifest("characters")["facts"]
    assert again["frames_detected"] == 0 and again["frames_cached"] == facts["frames_detected"] > 0
    assert again["fitted"]["fitted_now"] is False
    path = Path(facts["fitted"]["file"])
    other = FittedDetector.load(path)
    with torch.no_grad():
        next(other.net.parameters()).mul_(1.01)
    path.write_bytes(other.to_bytes())
    path.with_suffix(".onnx").write_bytes(other.onnx_bytes())
    cfg = load_config(None, overrides)
    run_stage(run, "characters", cfg, progress=False)
    refitted = run.read_manifest("characters")["facts"]
    assert refitted["fitted"]["fitted_now"] is False
    assert refitted["frames_cached"] == 0 and refitted["frames_detected"] == facts["frames_detected"]
    # --force reuses nothing: the detector is fitted again and every frame searched (it reused
    # both, and no setting made stage 03 search again short of deleting its cache by hand).
    run_stage(run, "characters", cfg, progress=False, force=True)
    forced = run.read_manifest("characters")["facts"]
    assert forced["fitted"]["fitted_now"] is True
    assert forced["frames_cached"] == 0 and forced["frames_detected"] == facts["frames_detected"]


def test_the_reference_sheet_shows_a_cut_out_on_grey_and_the_box_when_its_file_is_gone(tmp_path):
    from diffusion_bunny.stages.characters.plots import reference_sheet

    picture = np.zeros((200, 240, 3), np.uint8)
    picture[:] = (200, 40, 40)  # a red poster ...
    picture[70:130, 90:150] = (40, 40, 200)  # ... with a blue character in it
    save(tmp_path / "poster.png", picture)
    cutout = np.zeros((100, 100, 4), np.uint8)
    cutout[..., 0] = 200  # the poster's box, red ...
    cutout[20:80, 20:80] = (40, 40, 200, 255)  # ... with only the character kept
    save(tmp_path / "cut.png", cutout)
    row = {"path": str(tmp_path / "poster.png"), "character": "blue", "use": "cutout", "how": "grabcut"}
    row["box"] = [70, 50, 170, 150]

    def count(sheet: Image.Image, colour: tuple[int, int, int]) -> int:
        return int((np.asarray(sheet.convert("RGB")) == colour).all(axis=2).sum())

    shown = reference_sheet([{**row, "cutout": str(tmp_path / "cut.png")}])
    # Grey where the background was taken away; nothing of the poster's red.
    assert count(shown, (128, 128, 128)) > 2000 and count(shown, (200, 40, 40)) == 0
    # Without the cut-out's file (a cleaned cache), the box of the picture is shown instead.
    fallback = reference_sheet([{**row, "cutout": str(tmp_path / "gone.png")}])
    assert count(fallback, (200, 40, 40)) > 2000 and count(fallback, (128, 128, 128)) < 50


def shot_walk(shot_id: int):
    from diffusion_bunny.demo.movie import RECIPE

    return RECIPE[shot_id].walks[0]


def test_one_sightings_hits_are_fused_into_one_box_and_other_characters_kept():
    from diffusion_bunny.models.fitted.detector import Hit, suppress

    f = np.zeros(4, np.float32)
    hits = [
        Hit(0, 0.9, (100.0, 100.0, 200.0, 300.0), f),
        Hit(0, 0.3, (110.0, 100.0, 210.0, 300.0), f),  # the same girl, a little to the right
        Hit(0, 0.5, (120.0, 120.0, 180.0, 180.0), f),  # her head, nested in her figure
        Hit(1, 0.6, (400.0, 100.0, 500.0, 300.0), f),  # the dog beside her
        Hit(1, 0.2, (105.0, 100.0, 205.0, 300.0), f),  # the dog's label on the girl's place
    ]
    kept = suppress(hits)
    assert [k.index for k in kept] == [0, 1]
    girl = kept[0]
    assert girl.score == 0.9
    # Weighted by scores: 0.9 * 100 + 0.3 * 110 + 0.5 * 120 over 1.7.
    assert girl.box[0] == pytest.approx((90 + 33 + 60) / 1.7)
    # Scores of 0 (a search at threshold 0) still give a box: the plain mean.
    zero = suppress([Hit(0, 0.0, (0.0, 0.0, 10.0, 10.0), f), Hit(0, 0.0, (2.0, 0.0, 12.0, 10.0), f)])
    assert zero[0].box == pytest.approx((1.0, 0.0, 11.0, 10.0))


def test_references_behind_links_unreadable_folders_and_pictures_in_two_folders(tmp_path, monkeypatch):
    """What a user's folder of pictures holds besides pictures: a linked folder of poses is read
    (it was "empty"), a link to a missing file, a folder that cannot be listed, a picture copied
    into two characters' folders and folders named as the workspace's unnamed appearances each
    give one line naming the file and what to do, and the rest is taken."""
    from diffusion_bunny.models.faces import references_fingerprint

    sprite = draw(cast("mika"), Pose(), 160).rgba
    other = draw(cast("biscuit"), Pose(), 160).rgba
    refs = tmp_path / "refs"
    save(tmp_path / "elsewhere" / "poses" / "arms_down.png", sprite)
    save(refs / "mika" / "front.png", draw(cast("mika"), Pose(turn=0.4), 160).rgba)
    (refs / "mika" / "poses").symlink_to(tmp_path / "elsewhere" / "poses")
    (refs / "mika" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    (refs / "mika" / "everyone").symlink_to(refs)  # a loop up: it took in every character's pictures
    (refs / "mika" / "up").symlink_to(tmp_path)
    save(refs / "biscuit" / "dog.png", other)
    save(refs / "biscuit" / "copied_by_mistake.png", sprite)  # mika's pose, in the dog's folder too
    (refs / "biscuit" / "mika_too").symlink_to(refs / "mika")
    save(refs / "unknown" / "x.png", other)
    save(refs / "Noise" / "x.png", other)
    save(refs / "locked" / "inside" / "x.png", other)
    real_scandir = os.scandir

    def scandir(path="."):  # a folder the user may not read (chmod 000; the tests run as root)
        if Path(path) == refs / "locked" / "inside":
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    faces, pictures, warnings = load_character_references(refs, DetectSettings())
    taken = {(t.character, t.path.name) for t in pictures.taken if t.use == "cutout"}
    assert taken == {("mika", "front.png"), ("biscuit", "dog.png")}
    text = "\n".join(warnings)
    assert f"reference {refs / 'mika' / 'gone.png'} is a link to a missing file" in text
    doubled = [w for w in warnings if "are one picture under 2 characters (biscuit, mika)" in w]
    assert len(doubled) == 1 and "copied_by_mistake.png" in doubled[0] and "arms_down.png" in doubled[0]
    assert f"character folder {refs / 'unknown'}: 'unknown' is what the workspace calls" in text
    assert f"character folder {refs / 'Noise'}: 'Noise'" in text
    assert f"reference folder {refs / 'locked' / 'inside'} cannot be read (Permission denied)" in text
    assert (
        f"reference folder {refs / 'mika' / 'everyone'} is a link to the reference folder or a folder above"
        in text
    )
    assert (
        f"reference folder {refs / 'mika' / 'up'} is a link to the reference folder or a folder above" in text
    )
    assert (
        f"reference folder {refs / 'biscuit' / 'mika_too'} is a link into another character's folder" in text
    )
    assert "locked is empty" not in text and "is empty" not in text
    assert pictures.drawn() == ["biscuit", "mika"] and not faces.names

    # A picture that cannot be read leaves the fingerprint (stage 03's input check) standing.
    real_read = Path.read_bytes
    monkeypatch.setattr(
        Path,
        "read_bytes",
        lambda self: (
            (_ for _ in ()).throw(PermissionError(13, "denied"))
            if self.name == "dog.png"
            else real_read(self)
        ),
    )
    assert references_fingerprint(refs)["sha256"]


def test_a_loop_of_links_a_dead_folder_link_a_copy_a_line_and_a_fade_in(tmp_path):
    """Folders and pictures as users leave them: a link back into a folder already read
    (``poses/again -> ../poses``) took its pictures 41 times and named the path where the system
    stopped as a missing file; a character folder linked to a drive not mounted vanished without
    a word; one picture twice in a folder was taught twice as often; a picture one pixel wide was
    "empty"; an animated sprite fading in from a blank frame "showed nothing"."""
    from diffusion_bunny.models.faces import load_references

    refs = tmp_path / "refs"
    save(refs / "mika" / "front.png", draw(cast("mika"), Pose(), 120).rgba)
    save(refs / "mika" / "poses" / "turned.png", draw(cast("mika"), Pose(turn=0.4), 120).rgba)
    (refs / "mika" / "poses" / "again").symlink_to(Path("..") / "poses")
    (refs / "mika" / "poses" / "link.png").symlink_to(Path("turned.png"))  # a link beside the file
    (refs / "mika" / "more").symlink_to(Path("poses"))  # sorts before the folder it links to
    save(tmp_path / "usb" / "art" / "side.png", draw(cast("mika"), Pose(turn=-0.4), 120).rgba)
    (refs / "mika" / "art").symlink_to(tmp_path / "usb" / "art")
    (refs / "mika" / "art_too").symlink_to(tmp_path / "usb" / "art")
    (refs / "mika" / "front").write_bytes(
        (refs / "mika" / "front.png").read_bytes()
    )  # saved again, no extension
    save(refs / "biscuit" / "dog.png", draw(cast("biscuit"), Pose(), 120).rgba)
    save(refs / "biscuit" / "line.png", np.full((500, 1, 3), 90, np.uint8))
    (refs / "owl").symlink_to(tmp_path / "usb" / "owl")  # the drive is not mounted
    blank = Image.new("RGBA", (120, 120), (0, 0, 0, 0))
    shown = Image.fromarray(draw(cast("rin"), Pose(), 120).rgba).resize((120, 120))
    (refs / "pip").mkdir()
    blank.save(refs / "pip" / "fade_in.gif", save_all=True, append_images=[shown, shown], disposal=2)

    _, pictures, warnings = load_character_references(refs, DetectSettings())
    taken = sorted((t.character, t.path.relative_to(refs).as_posix()) for t in pictures.taken)
    used = {t.path.relative_to(refs).as_posix(): t.use for t in pictures.taken}
    assert taken == [
        ("biscuit", "biscuit/dog.png"),
        ("biscuit", "biscuit/line.png"),
        ("mika", "mika/art/side.png"),
        ("mika", "mika/front"),
        ("mika", "mika/front.png"),
        ("mika", "mika/poses/link.png"),
        ("mika", "mika/poses/turned.png"),
        ("pip", "pip/fade_in.gif"),
    ]
    assert used["mika/poses/turned.png"] == used["pip/fade_in.gif"] == used["mika/front.png"] == "cutout"
    assert used["mika/poses/link.png"] == used["biscuit/line.png"] == used["mika/front"] == "left out"
    assert used["mika/art/side.png"] == "cutout"
    text = "\n".join(warnings)
    assert (
        f"reference folder {refs / 'mika' / 'poses' / 'again'} is a link to {refs / 'mika' / 'poses'}, read "
        "in this folder; its pictures are taken once" in text
    )
    assert "missing file" not in text
    assert (
        f"reference folder {refs / 'mika' / 'more'} is a link to {refs / 'mika' / 'poses'}, read in" in text
    )
    assert not any(w.startswith(f"reference folder {refs / 'mika' / 'poses'} ") for w in warnings)
    assert (
        f"reference folder {refs / 'mika' / 'art_too'} is a link to a folder already read (a second" in text
    )
    assert (
        f"references {refs / 'mika' / 'poses' / 'link.png'} of 'mika' are the same picture as "
        f"{refs / 'mika' / 'poses' / 'turned.png'}; it is taken once" in text
    )
    assert f"reference {refs / 'biscuit' / 'line.png'} is too small: 1x500 px" in text
    usb = tmp_path / "usb" / "owl"
    dead = (
        f"character folder {refs / 'owl'} is a link to a folder that is not there ({usb}); "
        "connect the drive it is on or copy the folder itself here; left out"
    )
    assert dead in warnings
    assert dead in load_references(refs, DetectSettings())[1]  # the faces-only reading says it too
    assert "fully transparent" not in text and "pip" not in text
    assert pictures.drawn() == ["biscuit", "mika", "pip"]


def test_a_large_picture_is_read_shrunk_and_its_box_is_in_its_own_pixels(tmp_path):
    """A 24-megapixel poster took 11.5 s and 1.1 GB to read and cut out; pictures are read at
    most MAX_PICTURE_SIDE a side (a JPEG decoded at a fraction of its size), and what the
    reference sheet crops, the box, stays in the file's own pixels."""
    from diffusion_bunny.stages.characters.references import MAX_PICTURE_SIDE

    refs = tmp_path / "refs"
    poster = Image.new("RGB", (6000, 3000), (90, 140, 200))
    figure = Image.fromarray(draw(cast("rin"), Pose(), 2400).rgba)
    poster.paste(figure, (2000, 300), figure)
    poster.save(tmp_path / "poster.jpg", quality=92)
    rgba, scale = read_shrunk(tmp_path / "poster.jpg")
    assert max(rgba.shape[:2]) == MAX_PICTURE_SIDE and scale == pytest.approx(
        MAX_PICTURE_SIDE / 6000, rel=1e-3
    )
    sprite = Image.new("RGBA", (6000, 3000), (0, 0, 0, 0))
    sprite.paste(figure, (2000, 300), figure)
    (refs / "rin").mkdir(parents=True)
    sprite.save(refs / "rin" / "sprite.png")
    _, pictures, warnings = load_character_references(refs, DetectSettings())
    (taken,) = pictures.taken
    assert taken.use == "cutout" and taken.how == "transparency" and not warnings
    ys, xs = np.nonzero(np.asarray(figure)[..., 3] > 0)  # the figure's own box, in the sprite
    own = (2000 + xs.min(), 300 + ys.min(), 2001 + xs.max(), 301 + ys.max())
    assert np.abs(np.subtract(taken.box, own)).max() <= 4, (taken.box, own)


def test_loose_gifs_in_the_reference_folder_are_counted_in_its_line(tmp_path):
    """A folder of loose sprites (GIFs, as game wikis serve them) is told to sort them into a
    folder per character; GIFs were not counted, so the line said nothing of them."""
    from diffusion_bunny.errors import BadInputError
    from diffusion_bunny.stages.characters.tables import reference_dir

    (tmp_path / "refs").mkdir()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "refs" / "tux.gif")
    cfg = CharactersSettings(reference_dir=str(tmp_path / "refs"))
    with pytest.raises(BadInputError, match=r"holds 1 picture\(s\) of its own, in no sub-folder"):
        reference_dir(tmp_path / "run", cfg)


def test_a_picture_beside_the_character_folders_is_one_line_each(tmp_path):
    """``refs/villain.png`` beside ``refs/lin/`` names no character and was passed over without a
    word; each such picture is one line now (the operating system's files and other files none)."""
    from diffusion_bunny.models.faces import load_references

    refs = tmp_path / "refs"
    (refs / "lin").mkdir(parents=True)
    (refs / "lin" / "notes.txt").write_text("not a picture")  # read without a face detector
    save(refs / "villain.png", np.full((40, 40, 3), 90, np.uint8))
    save(refs / "Zoë.GIF", np.full((40, 40, 3), 90, np.uint8), "GIF")
    (refs / "README.txt").write_text("one folder per character")
    (refs / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    (refs / ".hidden.png").write_bytes(b"")
    # A hidden folder of pictures is left out with a line (a tool's folder without any, none).
    save(refs / ".villain" / "front.png", np.full((40, 40, 3), 90, np.uint8))
    (refs / ".ipynb_checkpoints").mkdir()
    (refs / ".ipynb_checkpoints" / "notes-checkpoint.txt").write_text("")
    _, _, warnings = load_character_references(refs, DetectSettings())
    _, face_warnings = load_references(refs, DetectSettings())
    for lines in (warnings, face_warnings):
        loose = [w for w in lines if "is in no character folder" in w]
        assert loose == [
            f"reference {refs / name} is in no character folder; move it into {refs}/<name>/, "
            "the folder of the character it shows; left out"
            for name in ("Zoë.GIF", "villain.png")
        ]
        hidden = [w for w in lines if "is hidden" in w]
        assert hidden == [
            f"folder {refs / '.villain'} is hidden (its name starts with '.'), so its pictures are not "
            "read; rename it without the '.' if it is a character's"
        ]


def test_pictures_left_out_before_reading_are_rows_of_the_reference_sheet(tmp_path, monkeypatch):
    """A picture under two characters and one in a folder named as the workspace's unnamed
    appearances were left out with a line but no row, so the reference sheet and the manifest's
    ``references_taken`` missed them and a character's "N of M pictures used" was wrong."""
    from diffusion_bunny.stages.characters import plots

    refs = tmp_path / "refs"
    sprite = draw(cast("mika"), Pose(), 120).rgba
    save(refs / "mika" / "front.png", sprite)
    save(refs / "biscuit" / "copied_by_mistake.png", sprite)
    save(refs / "unknown" / "x.png", sprite[::2, ::2])
    _, pictures, warnings = load_character_references(refs, DetectSettings())
    rows = {(t.character, t.path.name): t.as_fact() for t in pictures.taken}
    assert set(rows) == {("mika", "front.png"), ("biscuit", "copied_by_mistake.png"), ("unknown", "x.png")}
    assert all(r["use"] == "left out" and r["box"] is None for r in rows.values())
    doubled = "is one picture under 2 characters (biscuit, mika); keep it only in the folder of the character"
    assert rows[("mika", "front.png")]["problem"].startswith(doubled)
    assert rows[("biscuit", "copied_by_mistake.png")]["problem"].startswith(doubled)
    assert "'unknown' is what the workspace calls" in rows[("unknown", "x.png")]["problem"]
    assert sum("are one picture under 2 characters" in w for w in warnings) == 1  # one line, as before
    # Each character's block on the sheet counts its pictures, the ones left out too.
    titles = []
    monkeypatch.setattr(plots, "tile_sheet", lambda blocks, _: titles.extend(b.title for b in blocks))
    plots.reference_sheet(list(rows.values()))
    assert sorted(titles) == [
        f"{name} (unusable): 0 of 1 pictures used" for name in ("biscuit", "mika", "unknown")
    ]


def test_a_folder_whose_only_picture_is_misnamed_is_not_called_empty(tmp_path):
    """A character folder holding one picture whose name is not UTF-8 got that picture's line and
    "is empty; add reference pictures to it", which contradicts it; a folder with nothing in it
    is still empty."""
    from diffusion_bunny.models.faces import load_references

    refs = tmp_path / "refs"
    save(Path(os.fsdecode(bytes(refs) + b"/ok/\xe9t\xe9.png")), np.full((40, 40, 3), 90, np.uint8))
    save(Path(os.fsdecode(bytes(refs) + b"/ok/poses/caf\xe9/a.png")), np.full((40, 40, 3), 90, np.uint8))
    (refs / "nothing").mkdir()
    _, _, warnings = load_character_references(refs, DetectSettings())
    _, face_warnings = load_references(refs, DetectSettings())
    for lines, noun in ((warnings, "picture"), (face_warnings, "image")):
        assert sum("\\xe9t\\xe9.png: its name is not UTF-8 text" in w for w in lines) == 1
        assert f"character 'ok' has no usable reference {noun} in {refs / 'ok'}" in lines
        assert not any(f"{refs / 'ok'} is empty" in w for w in lines)
        assert f"character folder {refs / 'nothing'} is empty; add reference {noun}s to it" in lines
