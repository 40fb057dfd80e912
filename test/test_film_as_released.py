"""A film as released, built from the Hamilton clip and the knn photos by
:mod:`diffusion_bunny.demo.release` with its truth known by construction: letterboxed 2.40:1 in
1080p, an anamorphic PAL DVD, 10-bit PQ HDR, interlaced 576i and night-graded variants, title cards
and credits, subtitles over one shot, a dark scene with a named face, an 8-frame insert.

Stage 01 is checked on every variant (square pixels, picture boxes, tone mapping, deinterlacing,
the cuts around a short shot); the exported dataset of the full pipeline is judged in
``test_the_exported_dataset_*``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import polars as pl
import pytest
from paths import TESTDATA

from diffusion_bunny.config import load_config
from diffusion_bunny.demo import release
from diffusion_bunny.stages.extract.stage import extract_frames

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def films(tmp_path_factory):
    """The five variants, built once for the module (about a minute on 2 cores)."""
    if not release.HAMILTON.is_file() or not (TESTDATA / "face_recognition_examples").is_dir():
        pytest.skip(f"real footage not available here: {TESTDATA} (it ships beside the project, not in it)")
    out = tmp_path_factory.mktemp("release")
    hamilton = release.load_hamilton()
    return {v: release.build_release(out, v, hamilton) for v in release.VARIANTS}


@pytest.fixture(scope="module")
def extracted(films, tmp_path_factory):
    """Stage 01 on every variant as a user runs it (``run_stage``, the defaults, progress off):
    ``(result, run folder)``: the tables written, the manifest's facts, counts and start time. The
    datasets below start from these runs (stage 01 found done), so each film is decoded once."""
    from types import SimpleNamespace

    from diffusion_bunny.pipeline.run import Run
    from diffusion_bunny.stages import run_stage

    cfg = load_config(None, {}, root=tmp_path_factory.mktemp("noconfig"))
    out = {}
    for name, movie in films.items():
        run = Run.create(tmp_path_factory.mktemp(f"x-{name}") / "run", movie)
        tables = run_stage(run, "extract", cfg, progress=False)
        manifest = run.read_manifest("extract")
        result = SimpleNamespace(
            tables=tables, facts=manifest["facts"], counts=manifest["counts"], started=manifest["started"]
        )
        out[name] = (result, run.run_dir)
    return out


def truth_of(movie: Path) -> dict:
    return json.loads(movie.with_suffix(".truth.json").read_text())


def comb(gray: np.ndarray) -> float:
    """Interlace combing: how much each line stands out from the two around it in the same
    direction (the zig-zag of two fields from different instants), mean over the picture."""
    g = gray.astype(np.float32)
    mid, up, down = g[1:-1], g[:-2], g[2:]
    return float(np.maximum(0.0, (mid - up) * (mid - down)).mean())


@pytest.mark.parametrize("variant", sorted(release.VARIANTS))
def test_every_cut_is_found_and_the_short_insert_keeps_both_its_cuts(extracted, films, variant):
    result, _ = extracted[variant]
    truth = truth_of(films[variant])
    shots = result.tables["shots"]
    found = shots["start_frame"].to_list()[1:]
    if variant == "interlaced":
        # A woven frame holds the next instant's field: the frame before a cut is already half
        # the new shot, and either frame is the cut.
        assert len(found) == len(truth["cuts"])
        assert all(c - 1 <= f <= c for f, c in zip(found, truth["cuts"], strict=True)), found
    else:
        assert found == truth["cuts"]
    # The 8-frame insert is a shot of its own, kept and marked, sampled for no frame.
    index = next(i for i, s in enumerate(truth["shots"]) if s["kind"] == "insert")
    row = shots.row(index, named=True)
    assert row["too_short"] and row["end_frame"] - row["start_frame"] == 8
    assert row["shot_id"] not in set(result.tables["frames"]["shot_id"].to_list())
    assert result.counts["too_short_shots"] == 1


@pytest.mark.parametrize("variant", sorted(release.VARIANTS))
def test_picture_boxes_hold_the_picture_and_no_bar(extracted, films, variant):
    result, run = extracted[variant]
    spec = release.VARIANTS[variant]
    left, top, right, bottom = spec.picture
    facts = result.facts
    assert (facts["width"], facts["height"]) == spec.display
    for shot in result.tables["shots"].iter_rows(named=True):
        box = (shot["box_left"], shot["box_top"], shot["box_right"], shot["box_bottom"])
        # Inside the picture (never a bar row), and losing at most 6 px of it on any side.
        assert left <= box[0] <= left + 6 and top <= box[1] <= top + 6, (shot, spec.picture)
        assert right - 6 <= box[2] <= right and bottom - 6 <= box[3] <= bottom, (shot, spec.picture)
    # The saved frames are the whole frame as shown; inside the box of a shot of the picture (not
    # a card on black) there is no black bar row.
    kinds = [s["kind"] for s in truth_of(films[variant])["shots"]]
    for row in result.tables["frames"].iter_rows(named=True):
        image = cv2.imread(str(run / row["path"]))
        assert (image.shape[1], image.shape[0]) == spec.display
        if kinds[row["shot_id"]] != "picture":
            continue
        picture = image[row["box_top"] : row["box_bottom"], row["box_left"] : row["box_right"]]
        rows_max = picture.max(axis=(1, 2))
        assert rows_max[0] > 30 and rows_max[-1] > 30, row["frame_id"]


def test_anamorphic_frames_are_stored_squeezed_and_shown_square(extracted):
    result, run = extracted["anamorphic"]
    facts = result.facts
    assert (facts["coded_width"], facts["coded_height"], facts["sample_aspect"]) == (704, 576, "16:11")
    assert (facts["width"], facts["height"]) == (1024, 576)
    film = release.Film(release.VARIANTS["anamorphic"], release.load_hamilton())
    row = result.tables["frames"].filter(result.tables["frames"]["shot_id"] == 3).row(0, named=True)
    saved = cv2.imread(str(run / row["path"]))[..., ::-1].astype(np.float32)
    truth = film.frame_at(row["frame_index"]).astype(np.float32)
    # The picture as shown (the squeeze undone): close to the film's own frame, and far from it
    # when the squeeze is not undone (stretched back naively it would still be 704 wide).
    assert np.abs(saved - truth).mean() < 8.0


def test_hdr_frames_are_tone_mapped_not_washed_out(extracted):
    result, run = extracted["hdr"]
    facts = result.facts
    assert facts["hdr"] == "pq" and facts["tone_mapped"] and facts["bit_depth"] == 10
    film = release.Film(release.VARIANTS["hdr"], release.load_hamilton())
    left, top, right, bottom = release.VARIANTS["hdr"].picture
    for row in result.tables["frames"].iter_rows(named=True):
        saved = cv2.imread(str(run / row["path"]))[top:bottom, left:right, ::-1].astype(np.float32)
        truth = film.frame_at(row["frame_index"])[top:bottom, left:right].astype(np.float32)
        # The SDR grade the HDR was made from comes back: same light and the same contrast...
        assert np.abs(saved - truth).mean() < 6.0, row["frame_id"]
        assert saved.std() > 0.9 * truth.std()
    # ...where reading the PQ code values as SDR gives the washed-out grey of a plain conversion.
    from diffusion_bunny.media import hdr

    sample = film.frame_at(result.tables["frames"]["frame_index"][0])[top:bottom, left:right]
    plain = hdr.sdr_to_hdr_rgb(sample) * 255
    assert plain.std() < 0.8 * sample.astype(np.float32).std()


def test_interlaced_video_is_detected_and_deinterlaced(films, extracted, tmp_path):
    result, run = extracted["interlaced"]
    facts = result.facts
    assert facts["deinterlaced"] and facts["field_order"] in ("tt", "tb")
    assert facts["interlace_check"]["tff"] > facts["interlace_check"]["progressive"]
    # The same frames without deinterlacing show the combing of two fields from two instants.
    woven = extract_frames(
        films["interlaced"], load_config().extract.model_copy(update={"deinterlace": "off"}),
        tmp_path, progress=False,
    )  # fmt: skip
    assert not woven.facts["deinterlaced"]

    def combing(table, folder):
        # The performer's shots, where he moves (shots 3 and 6: lit and dark).
        rows = [r for r in table.iter_rows(named=True) if r["shot_id"] in (3, 6)]
        assert rows
        return np.mean([comb(cv2.imread(str(folder / r["path"]), cv2.IMREAD_GRAYSCALE)) for r in rows])

    assert combing(result.tables["frames"], run) < 0.5 * combing(woven.tables["frames"], tmp_path)


def test_keyframes_alone_of_interlaced_video_are_deinterlaced(tmp_path):
    """``extract.method: keyframe`` decodes keyframes seconds apart, no neighbours for bwdif: they
    were never deinterlaced, even with ``extract.deinterlace: on``. One field of each, scaled
    back to the frame's height, shows no comb."""
    import itertools

    import av
    from clips import render_shot

    from diffusion_bunny.media.video import VideoReader

    pictures = render_shot(7, 41, 320, 240, pan=6.0)  # a fast pan: two instants differ
    movie = tmp_path / "576i.mp4"
    with av.open(str(movie), "w") as out:
        stream = out.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 320, 240, "yuv420p"
        stream.options = {"crf": "16", "x264-params": "interlaced=1:tff=1:keyint=10:min-keyint=10"}
        for first, second in itertools.pairwise(pictures):
            woven = first.copy()
            woven[1::2] = second[1::2]  # the bottom field a field's time later
            out.mux(stream.encode(av.VideoFrame.from_ndarray(woven, format="rgb24")))
        out.mux(stream.encode(None))
    combs = {}
    for deinterlace in (True, False):
        reader = VideoReader(movie, keyframes_only=True, deinterlace=deinterlace)
        frames = [d.frame.to_ndarray(format="gray") for d in reader.frames()]
        assert len(frames) == 4 and {f.shape for f in frames} == {(240, 320)}
        combs[deinterlace] = np.mean([comb(f) for f in frames])
    assert combs[True] < 0.2 * combs[False], combs


def _pulled_down(pictures: list[np.ndarray]) -> list[np.ndarray]:
    """Film's pictures as hard telecine stores them at 30 frames a second (3:2 pulldown: AA AB BC
    CC DD, two frames in five woven from two pictures)."""
    frames = []
    for a, b, c, d in zip(*(iter(pictures),) * 4, strict=False):
        bc, cd = b.copy(), c.copy()
        bc[1::2], cd[1::2] = c[1::2], d[1::2]
        frames += [a, b, bc, cd, d]
    return frames


def test_hard_telecined_film_stored_as_progressive_is_deinterlaced(tmp_path):
    """A DVD rip of film is often hard-telecined: 24 pictures a second spread over 30 frames, two
    of every five woven from two pictures, and the file says progressive. Its combed frames went
    into the dataset; the pictures are asked now whatever the flags, away from the opening."""
    import av
    from clips import render_shot

    from diffusion_bunny.media.video import VideoReader

    pictures = render_shot(7, 120, 320, 240, pan=6.0)  # film's pictures, a fast pan
    movie = tmp_path / "telecined.mp4"
    with av.open(str(movie), "w") as out:
        stream = out.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = 320, 240, "yuv420p"
        stream.options = {"crf": "16"}
        for frame in _pulled_down(pictures):
            out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        out.mux(stream.encode(None))
    reader = VideoReader(movie, deinterlace=None)
    assert reader.deinterlace and reader.interlace["tff"] >= 24 and not reader.info.interlaced_flag
    kept = [d.frame.to_ndarray(format="gray") for d in reader.frames()]
    woven = [d.frame.to_ndarray(format="gray") for d in VideoReader(movie, deinterlace=False).frames()]
    assert len(kept) == len(woven) == 150
    assert np.mean([comb(f) for f in kept]) < 0.2 * np.mean([comb(f) for f in woven])


def test_a_telecined_film_is_asked_away_from_its_black_opening_whatever_its_first_timestamp(tmp_path):
    """An unflagged film's pictures are asked from a third of its length on (12 s of black open
    this one, which show no combs), counted from its first timestamp: a broadcast capture's
    starts far from 0, and the seek landed before it, in the opening."""
    from fractions import Fraction

    import av
    from clips import render_shot

    from diffusion_bunny.media.video import interlace_decision, probe_video

    pictures = render_shot(7, 480, 320, 240, pan=3.0)
    frames = [np.zeros((240, 320, 3), np.uint8)] * 360 + _pulled_down(pictures)
    for name, first in (("film.mp4", 0), ("capture.ts", 3000)):
        with av.open(str(tmp_path / name), "w") as out:
            stream = out.add_stream("libx264", rate=30)
            stream.width, stream.height, stream.pix_fmt = 320, 240, "yuv420p"
            stream.options = {"crf": "23", "preset": "ultrafast"}
            for n, picture in enumerate(frames):
                frame = av.VideoFrame.from_ndarray(picture, format="rgb24")
                frame.pts, frame.time_base = first + n, Fraction(1, 30)
                out.mux(stream.encode(frame))
            out.mux(stream.encode(None))
        deinterlace, verdict = interlace_decision(probe_video(tmp_path / name))
        assert deinterlace and verdict["tff"] >= 48, (name, verdict)


def test_progressive_sources_are_not_deinterlaced(extracted):
    for variant in ("sdr", "anamorphic", "hdr"):
        assert not extracted[variant][0].facts["deinterlaced"]


def test_a_night_release_keeps_a_frame_of_every_picture_shot(extracted, films, tmp_path):
    """The film night-graded (mean luma ~24, a third of the contrast, noise, a blue tint): stage
    01 found every cut above (its thresholds scale with the shots' contrast); stage 02 keeps a
    frame of every shot of the picture, the dark scene of the night included, and still drops
    the title card on black. Its absolute rules kept none."""
    from diffusion_bunny.pipeline.run import Run
    from diffusion_bunny.stages import run_stage
    from diffusion_bunny.stages.quality.rules import apply_quality_rules
    from diffusion_bunny.stages.quality.settings import QualitySettings

    result, folder = extracted["night"]
    truth = truth_of(films["night"])
    shutil.copytree(folder, tmp_path / "run")
    run = Run.open(tmp_path / "run")
    table = run_stage(run, "quality", load_config(None, {}, root=tmp_path), progress=False)["quality"]
    frames = result.tables["frames"]
    by_index = dict(zip(frames["frame_id"], frames["frame_index"], strict=True))

    def shots_kept(t: pl.DataFrame) -> set[int]:
        return {_shot_of(truth, by_index[f])["shot"] for f in t.filter(pl.col("keep"))["frame_id"]}

    sampled = {_shot_of(truth, i)["shot"] for i in frames["frame_index"]}
    pictures = {s["shot"] for s in truth["shots"] if s["kind"] == "picture"} & sampled
    assert len(pictures) == 4 and any(truth["shots"][s]["dark"] for s in pictures)
    assert shots_kept(table) == pictures  # every picture shot, and no card
    facts = run.read_manifest("quality")["facts"]
    assert facts["sharpness_scale"] < 0.5  # a flat film: its blur threshold scaled
    absolute = QualitySettings(relative_sharpness=False, relative_brightness=False, exposure_detail=None)
    assert not shots_kept(apply_quality_rules(table, frames, absolute)) & pictures


# ------------------------------------------------------------------------ the exported dataset

INGEST = ("extract", "quality", "characters", "scenes", "captions", "export")


@pytest.fixture(scope="module")
def datasets(films, extracted, tmp_path_factory):
    """Stages 01-06 (and the report) on the letterboxed 1080p film and on the anamorphic DVD,
    with the two people's reference photos, as a user runs them: the datasets a LoRA would see."""
    from diffusion_bunny.pipeline.run import Run
    from diffusion_bunny.stages import run_stage

    out = {}
    for variant in ("sdr", "anamorphic"):
        movie = films[variant]
        folder = tmp_path_factory.mktemp(f"d-{variant}")
        shutil.copytree(extracted[variant][1], folder / "run")  # stage 01 done, same settings
        run = Run.open(folder / "run")
        overrides = {"characters.reference_dir": str(movie.parent / "refs"), "export.crops": ["full", "face"]}
        if variant == "anamorphic":  # shot clips for a video LoRA too, from the stored 704x576
            overrides["export.video_clips"] = True
        cfg = load_config(None, overrides, root=tmp_path_factory.mktemp("noconfig"))
        for stage in (*INGEST, "report") if variant == "sdr" else INGEST:
            run_stage(run, stage, cfg, progress=False)
        assert run.read_manifest("extract")["started"] == extracted[variant][0].started  # not decoded again
        out[variant] = (run, truth_of(movie))
    return out


def _items(run):
    """The exported pictures with the film's shot each comes from (by frame index)."""
    items = run.read_table("dataset_items")
    frames = run.read_table("frames").select("frame_id", "frame_index")
    return items.join(frames, on="frame_id", how="left", suffix="_f")


def _shot_of(truth: dict, frame_index: int) -> dict:
    return next(s for s in truth["shots"] if s["start_frame"] <= frame_index < s["end_frame"])


@pytest.mark.parametrize("variant", ["sdr", "anamorphic"])
def test_the_exported_dataset_holds_no_bar_and_no_text_frame(datasets, variant):
    run, truth = datasets[variant]
    items = _items(run)
    assert items.height > 0
    left, top, right, bottom = release.VARIANTS[variant].picture
    root = run.run_dir / "dataset" / "hf"
    for row in items.iter_rows(named=True):
        shot = _shot_of(truth, row["frame_index"])
        # No title card and no credits: a LoRA would learn to write.
        assert not shot["text"], (row["file_name"], shot)
        # Every crop lies inside the picture: no letterbox bar in any exported picture.
        assert left <= row["left"] and top <= row["top"] and row["right"] <= right and row["bottom"] <= bottom
        image = cv2.imread(str(root / row["split"] / row["file_name"]))
        assert image is not None and (image.shape[1], image.shape[0]) == (row["width"], row["height"])
        # And in the pixels: no edge of the picture is a bar. The film's bars are digital black
        # (0-3 after coding); its darkest picture edges, the curtain of the stage, measure 10 and up.
        gray = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
        for name, edge in (
            ("top", gray[:2]),
            ("bottom", gray[-2:]),
            ("left", gray[:, :2]),
            ("right", gray[:, -2:]),
        ):
            assert edge.max() > 6, (row["file_name"], name, edge.max())
        if row["crop"] == "full" and not shot["subtitles"]:
            # As wide as the picture is (2.40:1), whatever the stored pixels' shape (a subtitled
            # shot's picture is shorter by its subtitle band: see the subtitle test).
            assert abs(row["width"] / row["height"] - release.PICTURE_ASPECT) < 0.05, row
    # The title cards and the credits on colour were found as text (a sharp, unique frame
    # otherwise): dropped with reason text. Those on black may go first (the text detector reads
    # only the frames the other rules keep): as too_dark, or, their letters being detail that
    # saves them from their darkness (quality.exposure_detail), as clipped (crushed to black).
    quality = run.read_table("quality").join(
        run.read_table("frames").select("frame_id", "frame_index"), on="frame_id"
    )
    on_colour = 0
    for row in quality.iter_rows(named=True):
        shot = _shot_of(truth, row["frame_index"])
        if shot["text"]:
            on_black = ("text", "too_dark", "clipped")
            assert row["reject_reason"] in (on_black if shot["on_black"] else ("text",)), row
            on_colour += not shot["on_black"]
    assert on_colour >= 2  # the title and the end card on colour were both sampled


def test_the_exported_dataset_has_subtitles_cropped_or_dropped(datasets):
    run, truth = datasets["sdr"]
    items = _items(run)
    root = run.run_dir / "dataset" / "hf"
    subtitled = [s for s in truth["shots"] if s["subtitles"]]
    assert subtitled
    from_subtitled = [
        r for r in items.iter_rows(named=True) if _shot_of(truth, r["frame_index"])["subtitles"]
    ]
    for row in from_subtitled:
        image = cv2.imread(str(root / row["split"] / row["file_name"]))
        hsv = cv2.cvtColor(image, cv2.COLOR_BGR2HSV)
        # The subtitles' yellow (hue ~25-35 in OpenCV's 0-180, saturated, bright) is gone.
        yellow = cv2.inRange(hsv, (20, 120, 150), (40, 255, 255))
        assert int(yellow.sum() // 255) < 40, row["file_name"]


def test_the_named_character_survives_the_dark_scene(datasets):
    run, truth = datasets["sdr"]
    items = _items(run)
    dark = [r for r in items.iter_rows(named=True) if _shot_of(truth, r["frame_index"])["dark"]]
    assert dark, "no picture of the dark scene was exported"
    assert any("lin_manuel_miranda" in (r["characters"] or []) for r in dark)


def _face_shape(rgb: np.ndarray) -> float:
    """Eye distance over eye-to-mouth distance of the largest face (dlib's 68 landmarks): 0.69x as
    wide a face (an anamorphic frame left squeezed) gives 0.69x this ratio."""
    from diffusion_bunny.models import dlib_faces

    boxes = dlib_faces.face_locations(rgb, 1, "hog")
    assert boxes, "no face found"
    box = max(boxes, key=lambda b: (b[2] - b[0]) * (b[1] - b[3]))
    marks = dlib_faces.face_landmarks(rgb, [box])[0]
    eyes = [np.asarray(marks[k], dtype=np.float64).mean(axis=0) for k in ("left_eye", "right_eye")]
    mouth = np.asarray(marks["top_lip"] + marks["bottom_lip"], dtype=np.float64).mean(axis=0)
    return float(np.linalg.norm(eyes[0] - eyes[1]) / np.linalg.norm((eyes[0] + eyes[1]) / 2 - mouth))


def test_faces_of_the_anamorphic_film_are_not_squashed(datasets):
    run, _ = datasets["anamorphic"]
    items = run.read_table("dataset_items").filter(
        (pl.col("crop") == "face") & pl.col("characters").list.contains("lin_manuel_miranda")
    )
    assert items.height
    reference = cv2.cvtColor(cv2.imread(str(release.LIN_REFERENCE)), cv2.COLOR_BGR2RGB)
    expected = _face_shape(reference)
    root = run.run_dir / "dataset" / "hf"
    shapes = [
        _face_shape(cv2.cvtColor(cv2.imread(str(root / r["split"] / r["file_name"])), cv2.COLOR_BGR2RGB))
        for r in items.iter_rows(named=True)
    ]
    # Within 15% of the reference portrait's shape (a squeezed face would be at 69%).
    assert 0.85 < float(np.median(shapes)) / expected < 1.15, (shapes, expected)


def test_the_report_shows_what_the_lora_will_see(datasets):
    run, _ = datasets["sdr"]
    figures = run.read_table("report_figures")
    section = figures.filter(pl.col("section") == "dataset")
    assert set(section["figure"].drop_nulls()) == {"dataset_sheet", "dropped"}
    message = section["message"][0]
    assert "dropped on the way:" in message and "text " in message
    assert (run.run_dir / "report" / "figures" / "dataset_sheet.png").is_file()


def test_caption_providers_are_sent_the_picture_without_bars_or_subtitles(datasets, tmp_path):
    """What a paid caption provider receives (over real HTTP, from the scripted fake server) is
    the picture: no letterbox bar above or below it, and a subtitled shot's picture without its
    subtitle band. Run on a copy of the letterboxed film's run folder."""
    import shutil

    from fake_llm_server import FakeLLMServer, _images_in

    from diffusion_bunny.pipeline.run import Run
    from diffusion_bunny.stages import run_stage

    source, truth = datasets["sdr"]
    run = Run.open(shutil.copytree(source.run_dir, tmp_path / "run"))
    kept = run.read_table("quality").filter("keep")
    frames = run.read_table("frames").filter(pl.col("frame_id").is_in(kept["frame_id"].to_list()))
    with FakeLLMServer() as srv:
        overrides = {
            "characters.reference_dir": str(run.movie.parent / "refs"),
            "captions.provider": "local",
            "captions.local.base_url": srv.base_url,
            "captions.image_max_side": 960,
            "captions.cache_dir": str(tmp_path / "answers"),  # not the user's store: asked every time
        }
        cfg = load_config(None, overrides, root=tmp_path / "noconfig")
        run_stage(run, "captions", cfg, progress=False, force=True)
    sent = [
        cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR)
        for r in srv.requests
        for b in _images_in(r["body"])
    ]
    assert len(sent) == frames.height > 0
    subtitled = sum(_shot_of(truth, i)["subtitles"] for i in frames["frame_index"])
    aspects = sorted(image.shape[1] / image.shape[0] for image in sent)
    for image in sent:
        rows = image.max(axis=(1, 2))
        # No black bar: the first and last rows hold the picture (the film's bars are pure black).
        assert rows[:3].min() > 30 and rows[-3:].min() > 30, image.shape
        yellow = cv2.inRange(cv2.cvtColor(image, cv2.COLOR_BGR2HSV), (20, 120, 150), (40, 255, 255))
        assert int(yellow.sum() // 255) < 20  # no subtitle reached the provider
    # Pictures of 2.40:1 (the frame is 16:9 = 1.78), and the subtitled ones wider still (their
    # subtitle band cut off the bottom).
    assert all(a > 2.3 for a in aspects)
    assert sum(a > 2.5 for a in aspects) == subtitled > 0


def _clip_truth(film, clip: dict, index: int, size: tuple[int, int], squeeze: float = 1.0) -> np.ndarray:
    """Film frame ``index`` as a clip should show it: the clip's crop of the picture as shown,
    cover-cropped to ``size``; with ``squeeze`` < 1 the picture as an anamorphic file stores it
    (narrower), which a clip that ignored the sample aspect would show."""
    from PIL import Image

    from diffusion_bunny.media.clips import cover_crop

    left, _, right, _ = film.variant.picture
    image = Image.fromarray(film.frame_at(index)[clip["crop_top"] : clip["crop_bottom"], left:right])
    if squeeze != 1.0:
        image = image.resize((round(image.width * squeeze), image.height))
    return np.asarray(cover_crop(image, size), np.float32)


def test_video_clips_of_the_anamorphic_film_are_the_picture_in_square_pixels(datasets):
    """Shot clips (video LoRA) are cut from the stored 704x576 PAL frames: each clip frame is the
    picture as shown (1024x576, squeeze undone), without its bars, cover-cropped to the clip size.
    Compared with the film's own frames at the clip's times; a clip left squeezed would be far."""
    import av

    run, _ = datasets["anamorphic"]
    clips = run.read_table("clips")
    assert clips.height >= 1
    film = release.Film(release.VARIANTS["anamorphic"], release.load_hamilton())
    top, bottom = release.VARIANTS["anamorphic"].picture[1::2]
    clip_fps = load_config().export.clip_fps
    for clip in clips.iter_rows(named=True):
        assert top <= clip["crop_top"] < clip["crop_bottom"] <= bottom
        with av.open(str(run.run_dir / "dataset" / "video" / f"{clip['clip_id']}.mp4")) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        size = (frames[0].shape[1], frames[0].shape[0])
        assert len(frames) == clip["frames"] and size == (clip["width"], clip["height"])
        for j in (0, len(frames) // 2, len(frames) - 1):
            got = frames[j].astype(np.float32)
            rows = got.max(axis=(1, 2))
            assert rows[:2].min() > 30 and rows[-2:].min() > 30, (clip["clip_id"], j)  # no bar
            index = round((clip["start_s"] + j / clip_fps) * release.FPS)
            near = range(max(0, index - 1), index + 2)
            square = min(float(np.abs(got - _clip_truth(film, clip, i, size)).mean()) for i in near)
            squeezed = min(
                float(np.abs(got - _clip_truth(film, clip, i, size, 704 / 1024)).mean()) for i in near
            )
            assert square < 10.0 and square < 0.6 * squeezed, (clip["clip_id"], j, square, squeezed)
