"""Tests of the built-in demo movie (`diffusion_bunny.demo.movie`).

Every later stage is graded against this movie's ground truth, so the tests check two things:
that the ground truth is self-consistent, and that the decoded pixels really show what it
claims (cuts where it says, blur, darkness, motion, repeats and faces), measured the way the
later stages will measure them.  The full movie is built once per session (conftest's ``demo``
fixture, shared with the other test modules); the reuse / rebuild logic is tested on a tiny
stand-in recipe so it costs milliseconds.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from dataclasses import dataclass
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

import diffusion_bunny.demo.movie as demo_module
from diffusion_bunny.demo.movie import (
    DEMO_FPS,
    DEMO_SIZE,
    RECIPE,
    RECIPE_VERSION,
    Camera,
    DemoMovie,
    ShotSpec,
    build_demo_movie,
    ground_truth_for,
    render_shot,
)

PEOPLE = ("astronaut", "grace_hopper")
SMALL = (256, 144)  # size of the grayscale copy used for the motion score


def sha256(path: Path) -> str:
    """Hex digest of a file, to compare builds byte for byte."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass
class Decoded:
    """What the tests need from one decode of the movie (kept small: no full RGB frames)."""

    codec: str
    width: int
    height: int
    rate: float
    pix_fmt: str
    small: np.ndarray  # (n, 144, 256) float32 grayscale
    brightness: np.ndarray  # (n,) mean gray level of each frame
    lap_var: np.ndarray  # (n,) variance of the Laplacian of the full-size gray frame
    rgb: dict[int, np.ndarray]  # a few full frames, by index, for the face check

    @property
    def small_lap_var(self) -> np.ndarray:
        """Variance of the Laplacian of the small gray frames: detail, with the noise averaged."""
        return np.array([cv2.Laplacian(f, cv2.CV_32F).var() for f in self.small])


@pytest.fixture(scope="session")
def gt(demo: DemoMovie) -> dict:
    """Parsed ground truth of the session's movie."""
    return demo.ground_truth()


def face_probe_frames(gt: dict) -> set[int]:
    """Frames checked for faces: near the start, in the middle and near the end of each shot."""
    probes = set()
    for s in gt["shots"]:
        a, b = s["start_frame"], s["end_frame"]
        probes |= {a + 2, (a + b) // 2, b - 3}
    return probes


@pytest.fixture(scope="session")
def decoded(demo: DemoMovie, gt: dict) -> Decoded:
    """Decode the movie once with PyAV and keep per-frame measurements."""
    probes = face_probe_frames(gt)
    small, bright, lap, rgb_keep = [], [], [], {}
    with av.open(str(demo.path)) as container:
        stream = container.streams.video[0]
        info = (
            stream.codec_context.name,
            stream.width,
            stream.height,
            float(stream.average_rate),
            stream.codec_context.pix_fmt,
        )
        for i, frame in enumerate(container.decode(stream)):
            rgb = frame.to_ndarray(format="rgb24")
            gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
            small.append(cv2.resize(gray, SMALL, interpolation=cv2.INTER_AREA).astype(np.float32))
            bright.append(float(gray.mean()))
            lap.append(float(cv2.Laplacian(gray, cv2.CV_32F).var()))
            if i in probes:
                rgb_keep[i] = rgb
    return Decoded(*info, np.stack(small), np.array(bright), np.array(lap), rgb_keep)


def frame_diffs(decoded: Decoded) -> np.ndarray:
    """``d[i]`` = mean absolute difference between small gray frames ``i`` and ``i + 1``."""
    return np.abs(np.diff(decoded.small, axis=0)).mean(axis=(1, 2))


def shots_where(gt: dict, **conditions: object) -> list[dict]:
    """Shots whose fields equal all ``conditions``."""
    return [s for s in gt["shots"] if all(s[k] == v for k, v in conditions.items())]


def plain_shots(gt: dict) -> list[dict]:
    """Shots with nothing wrong with them (neither blurred nor dark)."""
    return shots_where(gt, blurred=False, dark=False)


def shot_mean(values: np.ndarray, shot: dict) -> float:
    """Mean of a per-frame measurement over one shot."""
    return float(values[shot["start_frame"] : shot["end_frame"]].mean())


# ------------------------------------------------------------------------------------------
# Ground truth
# ------------------------------------------------------------------------------------------


def test_ground_truth_header(gt: dict) -> None:
    assert gt["recipe_version"] == RECIPE_VERSION
    assert (gt["fps"], gt["width"], gt["height"]) == (DEMO_FPS, *DEMO_SIZE)
    assert 40 <= gt["n_frames"] / DEMO_FPS <= 48  # about 45 s
    assert gt == {**ground_truth_for(RECIPE), "movie_sha256": gt["movie_sha256"]}


def test_shots_are_contiguous_and_match_cuts(gt: dict) -> None:
    shots = gt["shots"]
    assert [s["shot_id"] for s in shots] == list(range(len(shots)))
    assert shots[0]["start_frame"] == 0
    assert shots[-1]["end_frame"] == gt["n_frames"]
    for prev, cur in itertools.pairwise(shots):
        assert cur["start_frame"] == prev["end_frame"]
    assert gt["cuts"] == [s["start_frame"] for s in shots[1:]]
    for s in shots:
        assert 3 * DEMO_FPS <= s["end_frame"] - s["start_frame"] <= 4 * DEMO_FPS


def test_every_required_kind_of_shot_is_present(gt: dict) -> None:
    shots = gt["shots"]
    assert len(shots) >= 10
    assert shots_where(gt, kind="static") and shots_where(gt, kind="dynamic")
    assert shots_where(gt, blurred=True)
    assert shots_where(gt, dark=True)
    repeats = [s for s in shots if s["repeat_of"] is not None]
    assert repeats
    for s in repeats:
        orig = shots[s["repeat_of"]]
        assert orig["shot_id"] < s["shot_id"] - 1  # earlier and not adjacent
        same = ("kind", "source", "blurred", "dark", "faces")
        assert {k: s[k] for k in same} == {k: orig[k] for k in same}
        assert s["end_frame"] - s["start_frame"] == orig["end_frame"] - orig["start_frame"]
    for person in PEOPLE:
        with_person = [s for s in shots if person in s["faces"]]
        assert len(with_person) >= 2, person
        assert {s["kind"] for s in with_person} == {"static", "dynamic"}, person
        assert all(s["source"] == person and not s["dark"] for s in with_person)
    for prev, cur in itertools.pairwise(shots):
        assert prev["source"] != cur["source"]  # each cut changes the picture


# ------------------------------------------------------------------------------------------
# Files, build and reuse
# ------------------------------------------------------------------------------------------


def test_stream_properties(decoded: Decoded, gt: dict) -> None:
    assert decoded.codec == "h264"
    assert (decoded.width, decoded.height) == DEMO_SIZE
    assert decoded.rate == DEMO_FPS
    assert decoded.pix_fmt == "yuv420p"
    assert len(decoded.small) == gt["n_frames"]


@pytest.mark.slow
def test_build_is_byte_identical(demo: DemoMovie, gt: dict, tmp_path: Path) -> None:
    again = build_demo_movie(tmp_path, progress=False)
    assert sha256(again.path) == sha256(demo.path) == gt["movie_sha256"]
    assert again.ground_truth_path.read_bytes() == demo.ground_truth_path.read_bytes()


def test_encoder_settings_are_reproducible_ones(demo: DemoMovie) -> None:
    """x264 records its settings in the stream; one thread is what makes builds portable."""
    blob = demo.path.read_bytes()
    start = blob.index(b"x264 - core")
    settings = blob[start : blob.index(b"\x00", start)].decode("ascii").split()
    assert "threads=1" in settings
    assert "crf=18.0" in settings


def test_existing_build_is_reused(demo: DemoMovie) -> None:
    before = [os.stat(p).st_mtime_ns for p in (demo.path, demo.ground_truth_path)]
    again = build_demo_movie(demo.path.parent, progress=False)
    assert again == demo
    assert [os.stat(p).st_mtime_ns for p in (again.path, again.ground_truth_path)] == before
    # Nothing but the two outputs is left in the folder (no temp files). `bunny demo` also writes
    # its reference portraits to `characters/` there, so a demo run earlier in the session (the
    # fixture is shared) may have left that folder: it is not a leftover of the build.
    names = sorted(p.name for p in demo.path.parent.iterdir() if p.name != "characters")
    assert names == sorted([demo.path.name, demo.ground_truth_path.name])


TINY_RECIPE = (
    ShotSpec(source="astronaut", n_frames=3, start=Camera(256.0, 144.0, 512.0)),
    ShotSpec(source="coffee", n_frames=3, start=Camera(300.0, 200.0, 600.0)),
)


@pytest.fixture
def tiny(monkeypatch: pytest.MonkeyPatch) -> None:
    """Swap in a 6-frame recipe so the rebuild logic can be tested in milliseconds."""
    monkeypatch.setattr(demo_module, "RECIPE", TINY_RECIPE)


def mtimes(m: DemoMovie) -> list[int]:
    """Modification times of the movie and its ground truth, in ns."""
    return [os.stat(p).st_mtime_ns for p in (m.path, m.ground_truth_path)]


@pytest.mark.usefixtures("tiny")
def test_rebuild_triggers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    m = build_demo_movie(tmp_path, progress=False)
    assert m.ground_truth()["n_frames"] == 6
    # Make any rewrite visible in the mtime even on coarse-grained file systems.
    for p in (m.path, m.ground_truth_path):
        os.utime(p, ns=(1, 1))
    build_demo_movie(tmp_path, progress=False)
    assert mtimes(m) == [1, 1]  # reused

    build_demo_movie(tmp_path, force=True, progress=False)
    assert mtimes(m) != [1, 1]  # forced

    gt = m.ground_truth()
    for stale in ({"recipe_version": "older"}, {"recipe_fingerprint": "0" * 16}):
        m.ground_truth_path.write_text(json.dumps({**gt, **stale}), encoding="utf-8")
        build_demo_movie(tmp_path, progress=False)
        assert m.ground_truth() == gt, stale  # stale build replaced

    m.ground_truth_path.write_text("{ truncated", encoding="utf-8")
    build_demo_movie(tmp_path, progress=False)
    assert m.ground_truth() == gt  # unreadable ground truth rebuilt

    m.path.unlink()
    build_demo_movie(tmp_path, progress=False)
    assert m.path.is_file()  # missing movie rebuilt

    # Editing the recipe without bumping the version still invalidates the cached build.
    longer = (TINY_RECIPE[0], ShotSpec(source="coffee", n_frames=4, start=TINY_RECIPE[1].start))
    monkeypatch.setattr(demo_module, "RECIPE", longer)
    build_demo_movie(tmp_path, progress=False)
    assert m.ground_truth()["n_frames"] == 7


@pytest.mark.usefixtures("tiny")
def test_failed_build_leaves_no_half_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_encode(frames: object, path: Path, total: int, progress: bool) -> None:
        path.write_bytes(b"partial")
        raise RuntimeError("encoder crashed")

    monkeypatch.setattr(demo_module, "_encode", broken_encode)
    with pytest.raises(RuntimeError):
        build_demo_movie(tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_recipe_invariants_are_enforced() -> None:
    cam = Camera(256.0, 144.0, 512.0)
    same_image_twice = (ShotSpec("astronaut", 3, cam), ShotSpec("astronaut", 3, cam))
    with pytest.raises(ValueError, match="same image"):
        ground_truth_for(same_image_twice)
    adjacent_repeat = (ShotSpec("astronaut", 3, cam), ShotSpec("astronaut", 3, cam, repeat_of=0))
    with pytest.raises(ValueError, match="non-adjacent"):
        ground_truth_for(adjacent_repeat)
    coffee = ShotSpec("coffee", 3, Camera(300.0, 200.0, 600.0))
    unfaithful = (ShotSpec("astronaut", 3, cam), coffee, ShotSpec("astronaut", 4, cam, repeat_of=0))
    with pytest.raises(ValueError, match="differs"):
        ground_truth_for(unfaithful)
    with pytest.raises(ValueError, match="too short"):
        ground_truth_for((ShotSpec("astronaut", 1, cam),))


def test_bad_sources_and_framings_are_refused() -> None:
    with pytest.raises(KeyError, match="unknown demo source"):
        demo_module.load_source("lena")
    too_wide = ShotSpec("astronaut", 2, Camera(256.0, 144.0, 600.0))
    with pytest.raises(ValueError, match="leaves the source image"):
        next(render_shot(too_wide, 0))
    too_low = ShotSpec("astronaut", 2, Camera(256.0, 400.0, 512.0))
    with pytest.raises(ValueError, match="leaves the source image"):
        next(render_shot(too_low, 0))


# ------------------------------------------------------------------------------------------
# The pixels show what the ground truth says
# ------------------------------------------------------------------------------------------


def test_cuts_are_large_and_shots_are_smooth(decoded: Decoded, gt: dict) -> None:
    d = frame_diffs(decoded)
    cut_pairs = np.array(gt["cuts"]) - 1  # d[c - 1] compares the last and first frames
    inside = np.ones_like(d, dtype=bool)
    inside[cut_pairs] = False
    assert d[cut_pairs].min() > 30, d[cut_pairs]
    assert d[inside].max() < 20
    assert d[cut_pairs].min() > 2 * d[inside].max()
    for s in shots_where(gt, kind="static"):
        assert d[s["start_frame"] : s["end_frame"] - 1].max() < 1.5, s


def test_motion_score_separates_static_from_dynamic(decoded: Decoded, gt: dict) -> None:
    d = frame_diffs(decoded)
    score = {s["shot_id"]: float(d[s["start_frame"] : s["end_frame"] - 1].mean()) for s in gt["shots"]}
    static = [score[s["shot_id"]] for s in shots_where(gt, kind="static")]
    dynamic = [score[s["shot_id"]] for s in shots_where(gt, kind="dynamic")]
    assert max(static) < 1.0, score
    assert min(dynamic) > 3.0, score
    # Static shots are not frozen: the sensor noise makes every frame differ.
    assert min(static) > 0.05, score


def test_content_detector_finds_exactly_the_cuts(demo: DemoMovie, gt: dict) -> None:
    from scenedetect import ContentDetector, detect

    scenes = detect(str(demo.path), ContentDetector(threshold=27))
    assert [start.frame_num for start, _ in scenes][1:] == gt["cuts"]


def frames_of(values: np.ndarray, shots: list[dict]) -> np.ndarray:
    """A per-frame measurement, restricted to the frames of ``shots``."""
    return np.concatenate([values[s["start_frame"] : s["end_frame"]] for s in shots])


def test_blurred_shot_is_much_blurrier(decoded: Decoded, gt: dict) -> None:
    sharpest_blurred = max(shot_mean(decoded.lap_var, s) for s in shots_where(gt, blurred=True))
    least_sharp_plain = min(shot_mean(decoded.lap_var, s) for s in plain_shots(gt))
    assert sharpest_blurred < 0.25 * least_sharp_plain
    # Frame by frame too, so a per-frame sharpness filter can tell them apart at full size.
    blurred_frames = frames_of(decoded.lap_var, shots_where(gt, blurred=True))
    assert blurred_frames.max() < frames_of(decoded.lap_var, plain_shots(gt)).min()
    # At full size the sensor noise dominates the Laplacian of blurred frames, so it cannot
    # tell strong from mild blur; at 256x144 the noise is averaged away and the detail left
    # must be a small fraction of that of a sharp shot of the same image.
    small = decoded.small_lap_var
    for b in shots_where(gt, blurred=True):
        twins = [s for s in plain_shots(gt) if s["source"] == b["source"]] or plain_shots(gt)
        assert frames_of(small, [b]).max() < 0.1 * min(shot_mean(small, s) for s in twins)


def test_dark_shot_is_dark(decoded: Decoded, gt: dict) -> None:
    brightest_dark = frames_of(decoded.brightness, shots_where(gt, dark=True)).max()
    darkest_other = frames_of(decoded.brightness, shots_where(gt, dark=False)).min()
    assert brightest_dark < 30
    assert darkest_other > 50


def test_repeat_has_identical_frames(decoded: Decoded, gt: dict) -> None:
    for s in gt["shots"]:
        if s["repeat_of"] is None:
            continue
        orig = gt["shots"][s["repeat_of"]]
        # Rendered frames (before encoding) are identical, noise included ...
        rendered = zip(
            render_shot(RECIPE[s["shot_id"]], s["shot_id"]),
            render_shot(RECIPE[orig["shot_id"]], orig["shot_id"]),
            strict=True,
        )
        for a, b in rendered:
            np.testing.assert_array_equal(a, b)
        # ... so the decoded ones differ only by coding noise, far less than any other shot.
        n = s["end_frame"] - s["start_frame"]
        rep = decoded.small[s["start_frame"] : s["end_frame"]]
        ori = decoded.small[orig["start_frame"] : orig["start_frame"] + n]
        assert np.abs(rep - ori).mean() < 1.5
        assert np.abs(rep[0] - decoded.small[s["start_frame"] - 1]).mean() > 30


def test_static_shot_has_per_frame_noise() -> None:
    first, second = itertools.islice(render_shot(RECIPE[0], 0), 2)
    diff = first.astype(np.int16) - second.astype(np.int16)
    assert 1.5 < diff.std() < 4.5  # two independent draws of sigma ~2


def test_faces_are_where_ground_truth_says(decoded: Decoded, gt: dict) -> None:
    """An independent detector (scikit-image's LBP cascade) finds a face iff one is listed."""
    from skimage.data import lbp_frontal_face_cascade_filename
    from skimage.feature import Cascade

    detector = Cascade(lbp_frontal_face_cascade_filename())
    for s in gt["shots"]:
        for i in sorted(k for k in decoded.rgb if s["start_frame"] <= k < s["end_frame"]):
            found = detector.detect_multi_scale(
                img=decoded.rgb[i],
                scale_factor=1.2,
                step_ratio=1,
                min_size=(60, 60),
                max_size=(360, 360),
            )
            if s["faces"]:
                assert found, (s, i)
                assert max(f["height"] for f in found) >= 80, (s, i)
            else:
                assert not found, (s, i)


def test_the_demos_run_folder_of_an_older_demo_movie_is_made_again(demo: DemoMovie, tmp_path: Path) -> None:
    """A run folder keeps one movie; the demo's own folder, left by another demo movie (an earlier
    version's build), is the demo's to replace, while its run of this movie is kept."""
    from diffusion_bunny.demo.run import _forget_older_demo
    from diffusion_bunny.pipeline.run import Run

    run_dir = tmp_path / "demo"
    Run.create(run_dir, demo.path)
    (run_dir / "tables").mkdir()
    _forget_older_demo(run_dir, demo.path)
    assert (run_dir / "tables").is_dir()  # this movie's run: kept
    meta = json.loads((run_dir / "run.json").read_text())
    (run_dir / "run.json").write_text(json.dumps({**meta, "movie_key": "0123abcd"}))
    _forget_older_demo(run_dir, demo.path)
    assert not run_dir.exists()
    _forget_older_demo(run_dir, demo.path)  # nothing there: nothing to do
