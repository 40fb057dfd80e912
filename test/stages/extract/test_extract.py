"""Stage 01: decoding, shot detection, keyframe choice, formats, rotation, VFR, bad input."""

from __future__ import annotations

import io
import itertools
import re
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
import polars as pl
import pytest
from clips import (
    count_frames,
    remux,
    render_shot,
    transcode,
    write_clip,
    write_film_with_cover,
    write_song_with_cover,
    write_tone,
)
from PIL import Image

from diffusion_bunny.config import load_config
from diffusion_bunny.demo.metrics import match_boundaries
from diffusion_bunny.errors import BadInputError
from diffusion_bunny.media.video import VideoReader, probe_video
from diffusion_bunny.stages.extract.detectors.base import Blankness, InOrder
from diffusion_bunny.stages.extract.keyframes import (
    MIDDLE_BUCKETS,
    FrameCandidate,
    OpenShot,
    classify_shots,
    select_keyframes,
)
from diffusion_bunny.stages.extract.settings import ExtractSettings
from diffusion_bunny.stages.extract.stage import extract_frames


def cfg(**kw) -> ExtractSettings:
    return load_config(None, {f"extract.{k}": v for k, v in kw.items()}, use_local=False).extract


def starts(result) -> list[int]:
    return result.tables["shots"]["start_frame"].to_list()[1:]


@pytest.mark.parametrize("detector", ["content", "adaptive", "hash", "histogram"])
def test_cuts_found_exactly_on_synthetic_clip(cut_clip, tmp_path, detector):
    path, cuts = cut_clip
    result = extract_frames(path, cfg(detector=detector), tmp_path, progress=False)
    assert match_boundaries(starts(result), cuts, tolerance=1).f1 == 1.0
    if detector == "content":
        assert starts(result) == cuts
    shots = result.tables["shots"]
    assert shots["start_frame"][0] == 0 and shots["end_frame"][-1] == 125
    assert (shots["end_frame"][:-1] == shots["start_frame"][1:]).all()
    assert result.facts["detector"] == detector


def test_the_pass_runs_opencv_on_one_thread_and_gives_its_pool_back(cut_clip, tmp_path, monkeypatch):
    """OpenCV's pool, spinning for cores the decoder wants, is one thread during the pass only."""
    import diffusion_bunny.stages.extract.stage as stage

    seen = []
    measure = stage.laplacian_variance

    def counted(gray):
        seen.append(cv2.getNumThreads())
        return measure(gray)

    monkeypatch.setattr(stage, "laplacian_variance", counted)
    before = cv2.getNumThreads()
    cv2.setNumThreads(2)
    try:
        extract_frames(cut_clip[0], cfg(detector="content"), tmp_path, progress=False)
        assert seen and set(seen) == {1}
        assert cv2.getNumThreads() == 2
    finally:
        cv2.setNumThreads(before)


def test_static_and_dynamic_keyframes(cut_clip, tmp_path):
    path, _ = cut_clip
    result = extract_frames(path, cfg(), tmp_path, progress=False)
    assert result.tables["shots"]["kind"].to_list() == ["static", "dynamic", "static", "dynamic"]
    per_shot = result.tables["frames"].group_by("shot_id").len().sort("shot_id")["len"].to_list()
    assert per_shot == [1, 3, 1, 3]
    roles = result.tables["frames"].filter(pl.col("shot_id") == 1)["role"].to_list()
    assert roles == ["start", "middle", "end"]
    # The static shot's keyframe sits near its middle (frames 0-29), the windows are respected.
    middle = result.tables["frames"].filter(pl.col("shot_id") == 0)["frame_index"][0]
    assert abs(middle - 14.5) <= 6.5
    start, _, end = result.tables["frames"].filter(pl.col("shot_id") == 1)["frame_index"].to_list()
    assert 30 <= start < 30 + 13 and 70 - 13 <= end < 70
    for row in result.tables["frames"].iter_rows(named=True):
        img = Image.open(tmp_path / row["path"])
        assert img.size == (320, 180) == (row["width"], row["height"])
    assert result.tables["frames"]["frame_id"].is_unique().all()
    # Every candidate has a thumbnail, so the notebook's slider needs no decoding.
    for rel in result.tables["keyframe_candidates"]["thumb_path"]:
        assert (tmp_path / rel).is_file()


def test_threshold_is_applied_by_pure_functions(cut_clip, tmp_path):
    path, _ = cut_clip
    result = extract_frames(path, cfg(), tmp_path, progress=False)
    assert classify_shots(result.tables["shots"], 1000.0)["kind"].unique().to_list() == ["static"]
    assert select_keyframes(result.tables["keyframe_candidates"], result.tables["shots"], 1000.0).height == 4
    assert classify_shots(result.tables["shots"], 0.0)["kind"].unique().to_list() == ["dynamic"]
    everything = select_keyframes(result.tables["keyframe_candidates"], result.tables["shots"], 0.0)
    assert everything.height == result.tables["keyframe_candidates"]["frame_index"].n_unique()
    # At the configured threshold the selection equals what was saved as full frames.
    picked = select_keyframes(
        result.tables["keyframe_candidates"], result.tables["shots"], cfg().motion_threshold
    )
    assert picked["frame_index"].to_list() == result.tables["frames"]["frame_index"].to_list()


def test_keyframes_out_of_order_are_told_from_a_joined_recording():
    """On the stream's own times (an MPEG-TS clock makes any step back a reset, and the check
    after it never fired for .ts/.m2ts, the commonest open-GOP files): a step back then past the
    latest time, or two steps back running, is out of order; a restart that goes on below the
    earlier times is a second recording."""
    from diffusion_bunny.media.video import _KeyframeOrder

    def first_wrong(times):
        order = _KeyframeOrder()
        return next((found for t in times if (found := order.see(t)) is not None), None)

    assert first_wrong([1.467, 6.972, 4.97, 9.341, 2.968]) == (6.972, 4.97)  # open GOP in MPEG-TS
    assert first_wrong([2.0, 1.0, 0.0]) == (2.0, 1.0)
    assert first_wrong([10.0, 20.0, 30.0, 1.0, 11.0, 21.0, 31.0, 41.0]) is None  # joined recordings
    assert first_wrong([0.0, None, 2.0, 4.0]) is None


def test_the_slider_shows_a_long_shots_extra_frames_as_a_rerun_saves_them(cut_clip, tmp_path):
    """A shot longer than ``keyframe_gap_seconds`` keeps extra frames where its kind's frames
    leave a stretch empty, so which ones depends on the kind: the slider showed the kind's of the
    run for either, and a rerun at another motion threshold saved others."""
    path, _ = cut_clip
    result = extract_frames(path, cfg(keyframe_gap_seconds=0.5), tmp_path / "run", progress=False)
    cands, shots = result.tables["keyframe_candidates"], result.tables["shots"]
    assert {"extra_static", "extra_dynamic"} & set(cands["role"])
    for threshold in (0.0, 255.0):
        again = extract_frames(
            path,
            cfg(keyframe_gap_seconds=0.5, motion_threshold=threshold),
            tmp_path / f"{threshold}",
            progress=False,
        )
        shown = select_keyframes(cands, shots, threshold)["frame_index"].to_list()
        assert shown == again.tables["frames"]["frame_index"].to_list(), threshold
    assert set(result.tables["frames"]["role"]) <= {"start", "middle", "end", "extra"}


def test_middle_buckets_stay_bounded_and_centred():
    shot = OpenShot(0, 0, 0.0, window=12)
    for i in range(10_000):
        shot.add(FrameCandidate(i, i / 25, sharp=float(i % 7), frame=None), diff=1.0)
    assert len(shot.buckets) <= MIDDLE_BUCKETS + 1
    middle = shot.candidates()["middle"]
    assert abs(middle.index - 5000) <= 10_000 / MIDDLE_BUCKETS
    assert shot.candidates()["end"].index >= 10_000 - 12
    assert shot.candidates()["start"].index < 12
    assert shot.motion == 1.0


def test_hamilton_clip_cuts_match_readme(hamilton, tmp_path):
    result = extract_frames(hamilton, cfg(), tmp_path, progress=False)
    assert starts(result) == [20, 82, 211]
    assert result.facts["decoded_frames"] == 275
    assert result.warnings == []


#: Display matrices as a camera writes them into the track header (QuickTime's ``tkhd`` matrix,
#: which FFmpeg hands on as ``AV_PKT_DATA_DISPLAYMATRIX``): nine numbers ``a b u c d v x y w``,
#: ``a``-``d``, ``x``, ``y`` in 16.16 fixed point. A stored pixel ``(p, q)`` (``q`` counted down
#: from the top, as in the file format's coordinates) is shown at ``(a p + c q + x, b p + d q + y)``.
#: The first is the matrix of a phone held upright (its sensor's landscape picture turned a
#: quarter clockwise); the rotation is what PyAV's ``frame.rotation`` reads (degrees
#: counter-clockwise) for a matrix that only turns, as stage 01 records it. The mirrored ones
#: (a negative determinant) are what ``ffmpeg -display_hflip`` / ``-display_vflip`` write
#: (``av_display_matrix_flip``), alone and after a quarter turn: players show them mirrored, and
#: PyAV's angle alone (-180 for the first) turned them upside down; the rotation recorded is the
#: turn left once the mirror is undone, and ``mirrored`` is True.
ONE = 1 << 16
DISPLAY_MATRICES = {
    "quarter-clockwise": ((0, ONE, 0, -ONE, 0, 0, 0, 0, 1 << 30), (270, False)),
    "half-turn": ((-ONE, 0, 0, 0, -ONE, 0, 0, 0, 1 << 30), (180, False)),
    "quarter-counter-clockwise": ((0, -ONE, 0, ONE, 0, 0, 0, 0, 1 << 30), (90, False)),
    "mirrored-left-right": ((-ONE, 0, 0, 0, ONE, 0, 0, 0, 1 << 30), (0, True)),
    "mirrored-top-bottom": ((ONE, 0, 0, 0, -ONE, 0, 0, 0, 1 << 30), (180, True)),
    "transposed": ((0, ONE, 0, ONE, 0, 0, 0, 0, 1 << 30), (270, True)),
    "anti-transposed": ((0, -ONE, 0, -ONE, 0, 0, 0, 0, 1 << 30), (90, True)),
}


def _shown(matrix, p: float, q: float) -> tuple[float, float]:
    """Where the display matrix shows the stored point ``(p, q)``."""
    a, b, _, c, d, _, x, y, _ = (v / ONE for v in matrix)
    return a * p + c * q + x, b * p + d * q + y


def _shown_centres(matrix, boxes, size) -> tuple[tuple[int, int], list[tuple[float, float]]]:
    """The shown picture's (width, height) and the centres of the stored ``boxes`` (left, top,
    right, bottom) in it, as fractions of its width and height: from the matrix alone."""
    w, h = size
    corners = [_shown(matrix, p, q) for p in (0, w) for q in (0, h)]
    xs, ys = [c[0] for c in corners], [c[1] for c in corners]
    shown_w, shown_h = max(xs) - min(xs), max(ys) - min(ys)
    centres = []
    for left, top, right, bottom in boxes:
        cx, cy = _shown(matrix, (left + right) / 2, (top + bottom) / 2)
        centres.append(((cx - min(xs)) / shown_w, (cy - min(ys)) / shown_h))
    return (round(shown_w), round(shown_h)), centres


def _marker_centres(rgb: np.ndarray) -> list[tuple[float, float]]:
    """Centres of the red and of the green marker in ``rgb``, as fractions of its width and height."""
    img = rgb.astype(int)
    r, g, b = img[..., 0], img[..., 1], img[..., 2]
    out = []
    for mask in ((r > 150) & (g < 100) & (b < 100), (g > 150) & (r < 100) & (b < 100)):
        rows, cols = np.nonzero(mask)
        assert rows.size, "a marker is missing"
        out.append(((cols.mean() + 0.5) / img.shape[1], (rows.mean() + 0.5) / img.shape[0]))
    return out


@pytest.mark.parametrize("turn", list(DISPLAY_MATRICES))
def test_rotation_metadata_is_applied(tmp_path, turn):
    """A clip whose stored picture has a red square in its top-left corner and a green one in its
    top-right corner, stored with a display matrix: the frames and thumbnails stage 01 writes
    show the squares where the matrix shows them (worked out from the matrix's numbers here,
    independent of the code that turns pictures), at the shown width and height."""
    matrix, (rotation, mirrored) = DISPLAY_MATRICES[turn]
    w, h, side = 160, 96, 32
    boxes = [(0, 0, side, side), (w - side, 0, w, side)]
    stored = np.full((h, w, 3), 128, np.uint8)
    stored[:side, :side] = (230, 20, 20)
    stored[:side, w - side :] = (20, 230, 20)
    plain = _write_frames(tmp_path / "stored.mp4", [stored] * 25)
    path = remux(plain, tmp_path / "shown.mp4", display_matrix=matrix)
    (shown_w, shown_h), expected = _shown_centres(matrix, boxes, (w, h))
    result = extract_frames(path, cfg(), tmp_path / "run", progress=False)
    row = result.tables["frames"].row(0, named=True)
    assert (row["width"], row["height"]) == (shown_w, shown_h)
    full = np.asarray(Image.open(tmp_path / "run" / row["path"]).convert("RGB"))
    assert full.shape[:2] == (shown_h, shown_w)
    # Its thumbnail (shrunk from the upright full frame off the decoding thread) is upright too.
    cands = result.tables["keyframe_candidates"]
    thumb_path = cands.filter(pl.col("frame_index") == row["frame_index"])["thumb_path"][0]
    thumb = np.asarray(Image.open(tmp_path / "run" / thumb_path).convert("RGB"))
    assert thumb.shape[0] / thumb.shape[1] == pytest.approx(shown_h / shown_w, rel=0.02)
    for picture in (full, thumb):
        for (x, y), (ex, ey) in zip(_marker_centres(picture), expected, strict=True):
            assert (x, y) == (pytest.approx(ex, abs=0.03), pytest.approx(ey, abs=0.03))
    info = probe_video(path)
    assert (info.rotation, info.mirrored) == (rotation, mirrored)


def test_a_turn_that_is_no_right_angle_is_shown_as_stored(tmp_path):
    """``rotate=45``: the sizes were swapped by ``rotation % 180`` (a 640x360 picture "inside
    bars" of a 360x640 movie) while the frames were turned by ``rotation // 90``, not at all.
    Pictures turn by quarter turns only, as FFmpeg's autorotate does; within a degree of one, by it."""
    from diffusion_bunny.media.probe import quarter_turn

    assert [quarter_turn(a) for a in (45, -90, 89.6, 180.4, 271, 300, -0.4)] == [0, 270, 90, 180, 270, 0, 0]
    plain = _write_frames(tmp_path / "stored.mp4", [np.full((96, 160, 3), 128, np.uint8)] * 5)
    info = probe_video(remux(plain, tmp_path / "tilted.mp4", rotation=45))
    assert info.rotation == 0 and info.display_size == (160, 96)


@pytest.mark.parametrize(("rotation", "mirrored"), itertools.product([0, 90, 180, 270], [False, True]))
def test_picture_box_moves_with_the_pixels(rotation, mirrored):
    """A shot's picture box is written in the saved frames' pixels: turned and mirrored as the
    picture is, so that it still holds the picture (not the bars on the other side)."""
    from diffusion_bunny.media.video import rotate_box, rotate_image

    w, h = 40, 24
    box = (3, 5, 17, 21)
    stored = np.zeros((h, w), np.uint8)
    stored[box[1] : box[3], box[0] : box[2]] = 1
    rows, cols = np.nonzero(rotate_image(stored, rotation, mirrored))
    shown = (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)
    assert rotate_box(box, (w, h), rotation, mirrored) == shown


@pytest.mark.parametrize("rotation", [0, 90, 180, 270])
def test_thumbnails_from_the_full_frame_match_libswscales(cut_clip, rotation):
    """A frame saved full gets its thumbnail shrunk from that array by OpenCV (each pixel the
    mean of the block it covers), one not saved full by libswscale: the two have the same size
    and orientation, and the reused libswscale context gives the pixels of a fresh one."""
    from av.video.reformatter import VideoReformatter

    from diffusion_bunny.media.video import Display, frame_to_bgr, shrink_upright, thumbnail, thumbnail_size

    path, _ = cut_clip
    shared = VideoReformatter()
    with av.open(str(path)) as c:
        for i, frame in enumerate(c.decode(video=0)):
            if i % 20:
                continue
            display = Display((frame.width, frame.height), rotation)
            full = frame_to_bgr(frame, display, shared)
            assert np.array_equal(full, frame_to_bgr(frame, display))
            size = thumbnail_size(frame.width, frame.height, 160)
            ours = shrink_upright(full, size, rotation)
            theirs = thumbnail(frame, 160, display, shared)
            assert np.array_equal(theirs, thumbnail(frame, 160, display))
            assert ours.shape == theirs.shape == ((90, 160, 3) if rotation in (0, 180) else (160, 90, 3))
            upright = frame_to_bgr(frame, Display((frame.width, frame.height)), shared)
            blocks = upright.astype(np.float32).reshape(90, 2, 160, 2, 3).mean(axis=(1, 3))
            assert np.abs(shrink_upright(upright, size, 0) - blocks).max() <= 1.0


def test_variable_frame_rate_keeps_presentation_times(tmp_path):
    # 20 frames at 40 ms, then 20 at 100 ms, then a cut to a new shot at 120 ms steps.
    times = [i * 0.04 for i in range(20)]
    times += [times[-1] + (i + 1) * 0.1 for i in range(20)]
    times += [times[-1] + (i + 1) * 0.12 for i in range(20)]
    path = tmp_path / "vfr.mp4"
    cuts = write_clip(path, [(5, 40, 0.0), (6, 20, 0.0)], times=times)
    result = extract_frames(path, cfg(min_shot_seconds=0.2), tmp_path / "run", progress=False)
    assert starts(result) == cuts == [40]
    assert result.tables["shots"]["start_s"][1] == pytest.approx(times[40], abs=1e-3)
    for row in result.tables["frames"].iter_rows(named=True):
        assert row["timestamp_s"] == pytest.approx(times[row["frame_index"]], abs=1e-3)


#: Every third frame of 30 fps dropped: 120 frames in 6 s, 20 a second throughout.
VFR_TIMES = [i / 30 for i in range(180) if i % 3]


@pytest.mark.parametrize(
    ("declared", "tags"),
    [
        (30, {}),  # a variable-rate file muxed from a 30 fps source
        (1000, {}),  # a 1 ms DefaultDuration
        (30, {"NUMBER_OF_FRAMES": "1200"}),  # a release's count kept by a cut from it: not read
        (20, {}),  # a declared rate the packets agree with is kept
    ],
)
def test_a_matroska_films_frame_rate_is_its_frames_not_its_default_duration(tmp_path, declared, tags):
    """Matroska counts no frames, so FFmpeg's average rate is the track's DefaultDuration: a
    variable-frame-rate file declaring 30 (or 1000) fps while its frames run at 20 had every
    window in seconds counted in the wrong number of frames."""
    path = tmp_path / "vfr.mkv"
    write_clip(path, [(5, len(VFR_TIMES), 0.0)], fps=declared, times=VFR_TIMES, metadata=tags)
    info = probe_video(path)
    assert info.fps == pytest.approx(20.0, rel=0.02) and info.declared_frames is None
    result = extract_frames(path, cfg(), tmp_path / "run", progress=False)
    assert result.facts["fps"] == pytest.approx(20.0, rel=0.02)
    assert result.facts["decoded_frames"] == 120


def test_a_matroska_film_with_a_slow_intro_keeps_its_rate(tmp_path):
    """Measured on its first seconds alone, a film opening on a still at 2 fps (a screen
    recorder, mpdecimate) before 24 fps read 13.8: a film longer than a clip that declares a
    film's rate keeps it."""
    times = [i / 2 for i in range(20)] + [10 + i / 24 for i in range(24 * 50)]
    path = tmp_path / "intro.mkv"
    options = {"x264-params": "keyint=48"}
    write_clip(path, [(5, len(times), 0.0)], width=64, height=48, fps=24, times=times, options=options)
    assert probe_video(path).fps == 24.0


@pytest.mark.parametrize("suffix", [".mkv", ".webm"])
def test_a_constant_rate_matroska_film_keeps_its_exact_rate(tmp_path, suffix):
    """Measured on its packets' millisecond times a 29.97 film is 29.968; it keeps 30000/1001."""
    path = tmp_path / f"cfr{suffix}"
    codec = "libvpx-vp9" if suffix == ".webm" else "libx264"
    write_clip(path, [(5, 40, 0.0)], fps=Fraction(30000, 1001), codec=codec)
    assert probe_video(path).fps == pytest.approx(30000 / 1001, abs=1e-9)


def test_a_matroska_tracks_own_length_is_read_from_its_duration_tag():
    """The container's duration is the longest track's (often the sound's): a film's rate from
    mkvmerge's frame count is taken over the picture track's own ``DURATION`` tag."""
    from types import SimpleNamespace

    from diffusion_bunny.media.probe import _tagged_seconds

    def tagged(metadata, whole=None):
        return _tagged_seconds(SimpleNamespace(metadata=metadata), whole)

    assert tagged({"DURATION-eng": "00:23:40.042000000"}) == pytest.approx(1420.042)
    assert tagged({"DURATION": "soon"}) is None and tagged({}) is None
    # a cut made by FFmpeg from a release keeps the release's tag beside its own: its own first,
    # and one longer than the file is another file's
    cut = {"DURATION-eng": "01:45:00.000000000", "DURATION": "00:00:19.541000000"}
    assert tagged(cut, 19.6) == pytest.approx(19.541)
    assert tagged({"DURATION-eng": "01:45:00.000000000"}, 19.6) is None


def test_a_variable_frame_rate_shot_is_too_short_by_its_time_not_its_frames(tmp_path):
    """Shots of 1.5 s at 60 fps around one of 0.93 s at 15 fps (14 frames; the film averages 49
    fps, where min_shot_seconds 0.5 is 25 frames): the middle shot is longer than the minimum,
    so it is kept whole and sampled, as its neighbours are; a shot of 20 frames at 60 fps
    (0.33 s, more frames than 15 fps half a second holds) is too short."""
    rates = ((1, 90, 60), (2, 14, 15), (3, 90, 60), (4, 20, 60), (5, 90, 60))
    times, t = [], 0.0
    for _, n, fps in rates:
        times += [round(t + i / fps, 4) for i in range(n)]
        t += n / fps
    path = tmp_path / "vfr.mp4"
    cuts = write_clip(path, [(seed, n, 0.0) for seed, n, _ in rates], fps=60, times=times)
    result = extract_frames(path, cfg(), tmp_path / "run", progress=False)
    shots = result.tables["shots"]
    assert starts(result) == cuts == [90, 104, 194, 214]
    assert shots["too_short"].to_list() == [False, False, False, True, False]
    assert shots["end_s"][1] - shots["start_s"][1] == pytest.approx(14 / 15, abs=0.01)
    kept = set(result.tables["frames"]["shot_id"].to_list())
    assert kept == {0, 1, 2, 4}


def test_a_variable_frame_rate_shot_longer_than_the_minimum_is_no_fade_dip():
    """The dip rule (a boundary closer than min_shot_seconds after the last, a blank frame
    between, is a fade's second half) judges by the frames' times: 8 frames over 0.8 s with a
    black one among them are a shot, though fewer than the 12 frames 0.5 s holds at 24 fps; the
    same 8 frames in 0.2 s are a dip."""
    rng = np.random.default_rng(0)
    for step, kept in ((0.1, [18, 26, 40]), (0.025, [18, 40])):
        blank = Blankness(keep=100)
        t = 0.0
        for i in range(60):
            frame = np.zeros((27, 48, 3), np.uint8) if i == 20 else rng.integers(0, 255, (27, 48, 3))
            blank.add(i, frame.astype(np.uint8), t)
            t += step if 18 <= i < 26 else 1 / 24
        order = InOrder(lookahead=5, min_len=12, blankness=blank, fps=24.0)
        for frame in (18, 26, 40):
            order.add(frame, 0.9)
        assert order.release(None) == kept, step


@pytest.mark.parametrize(
    ("name", "make"),
    [
        ("h264.mkv", lambda src, dst: remux(src, dst)),
        ("h264.mov", lambda src, dst: remux(src, dst)),
        ("mpeg4.avi", lambda src, dst: transcode(src, dst, "mpeg4", qscale=3)),
        (
            "vp9.webm",
            lambda src, dst: transcode(
                src,
                dst,
                "libvpx-vp9",
                options={"crf": "30", "b": "0", "deadline": "realtime", "cpu-used": "8"},
            ),
        ),
        (
            "hevc10.mp4",
            lambda src, dst: transcode(
                src, dst, "libx265", pix_fmt="yuv420p10le", options={"x265-params": "log-level=error"}
            ),
        ),
    ],
)
def test_containers_and_codecs(cut_clip, tmp_path, name, make):
    src, cuts = cut_clip
    path = make(src, tmp_path / name)
    info = probe_video(path)
    assert info.codec == {"h264.mkv": "h264", "h264.mov": "h264", "mpeg4.avi": "mpeg4"}.get(
        name, {"vp9.webm": "vp9", "hevc10.mp4": "hevc"}.get(name)
    )
    result = extract_frames(path, cfg(), tmp_path / "run", progress=False)
    assert match_boundaries(starts(result), cuts, tolerance=1).f1 == 1.0
    assert result.tables["frames"].height == 8


def test_interval_method(cut_clip, tmp_path):
    path, _ = cut_clip
    result = extract_frames(path, cfg(method="interval", interval_seconds=1.0), tmp_path, progress=False)
    times = result.tables["frames"]["timestamp_s"].to_list()
    assert len(times) == 5  # 5.0 s of video, one frame per second
    for k, t in enumerate(times):
        assert k <= t < k + 0.5
    assert set(result.tables["frames"]["role"]) == {"interval"}
    assert result.tables["shots"].height == 4


def test_keyframe_method_decodes_only_codec_keyframes(cut_clip, tmp_path):
    src, _ = cut_clip
    path = transcode(
        src,
        tmp_path / "gop10.mp4",
        "libx264",
        gop=10,
        options={"x264-params": "keyint=10:min-keyint=10:scenecut=0"},
    )
    result = extract_frames(
        path, cfg(method="keyframe", interval_seconds=0.4), tmp_path / "run", progress=False
    )
    assert result.tables["frames"]["frame_index"].to_list() == list(range(0, 125, 10))
    assert result.facts["decoded_frames"] == 13
    assert set(result.tables["frames"]["role"]) == {"keyframe"}
    # At most one saved every interval_seconds in a shot (2 s by default): a keyframe every 0.4 s
    # (a broadcast stream; an all-intra master has one every frame) gave a frame file of each.
    spaced = extract_frames(path, cfg(method="keyframe"), tmp_path / "spaced", progress=False)
    cands = spaced.tables["keyframe_candidates"]
    assert cands["frame_index"].to_list() == list(range(0, 125, 10))  # each still a candidate
    frames = spaced.tables["frames"]
    assert 0 < frames.height < 13 and set(frames["role"]) == {"keyframe"}
    for _, shot in frames.group_by("shot_id"):
        assert (shot["timestamp_s"].diff().drop_nulls() >= 2.0 - 1e-6).all()
    first_of_shot = cands.group_by("shot_id").agg(pl.col("frame_index").min())["frame_index"]
    assert set(first_of_shot) <= set(frames["frame_index"])
    assert len(list((tmp_path / "spaced" / "frames").iterdir())) == frames.height
    # Keyframes far apart: the last one is a second before the end of a whole file. The last shot
    # ran to that keyframe only (one frame, "too short"), and the file was said to be corrupt.
    sparse = transcode(
        src,
        tmp_path / "gop100.mp4",
        "libx264",
        gop=100,
        options={"x264-params": "keyint=100:min-keyint=100:scenecut=0"},
    )
    result = extract_frames(sparse, cfg(method="keyframe"), tmp_path / "run100", progress=False)
    assert result.facts["decoded_frames"] == 2
    last = result.tables["shots"].row(-1, named=True)
    assert last["end_frame"] == 125 and last["end_s"] == pytest.approx(5.0) and not last["too_short"]
    assert not any("were lost" in w for w in result.warnings), result.warnings
    # Cut short (a download that stopped: no decoder error), more than a group of pictures is
    # lost: said so, and the last shot ends a group of pictures after its last keyframe at most.
    whole = remux(path, tmp_path / "gop10.mkv")
    (tmp_path / "cut.mkv").write_bytes(whole.read_bytes()[: int(whole.stat().st_size * 0.5)])
    cut = extract_frames(tmp_path / "cut.mkv", cfg(method="keyframe"), tmp_path / "runcut", progress=False)
    assert any("were lost" in w for w in cut.warnings), cut.warnings
    # An open-GOP encode (keyframes that are not IDR, B-frames across them): the decoder told to
    # skip every other frame gave its keyframes out of order (2, 1, 0 s), each saved under the
    # index of a time it was not shown at, and the file was said to be truncated. One line now.
    open_gop = transcode(
        src,
        tmp_path / "open_gop.mp4",
        "libx264",
        gop=30,
        options={"x264-params": "open-gop=1:keyint=30:min-keyint=30:bframes=3:scenecut=0"},
    )
    with pytest.raises(BadInputError, match=r"open_gop.mp4: with extract.method: keyframe .* out of order"):
        extract_frames(open_gop, cfg(method="keyframe"), tmp_path / "runopen", progress=False)
    assert extract_frames(open_gop, cfg(), tmp_path / "runall", progress=False).facts["decoded_frames"] == 125
    assert cut.tables["shots"]["end_frame"][-1] <= cut.tables["keyframe_candidates"]["frame_index"].max() + 11


def test_keyframes_of_variable_frame_rate_footage_never_share_an_index(tmp_path):
    """40 frames at 30 fps, 40 at 10 fps, 40 at 30 fps, every frame a keyframe (all-intra): a
    keyframe's frame_index is its time at the average rate (15 fps), and two of them were both
    frame 1, one JPEG written over the other. Indices now never repeat; on constant-rate footage
    they are the stream's (the test above)."""
    times, t = [], 0.0
    for fps in (30, 10, 30):
        times += [round(t + i / fps, 4) for i in range(40)]
        t += 40 / fps
    path = tmp_path / "vfr.mp4"
    options = {"x264-params": "keyint=1:min-keyint=1:scenecut=0"}
    write_clip(path, [(5, 60, 1.0), (6, 60, 1.0)], fps=30, times=times, options=options)
    result = extract_frames(
        path, cfg(method="keyframe", interval_seconds=0.01), tmp_path / "run", progress=False
    )
    frames = result.tables["frames"]
    indices = frames["frame_index"].to_list()
    assert frames.height == 120 and indices == sorted(set(indices))
    assert len(list((tmp_path / "run" / "frames").iterdir())) == frames.height
    shots = result.tables["shots"]
    assert (shots["end_frame"][:-1] == shots["start_frame"][1:]).all()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: None, "no such file"),
        (lambda p: p.mkdir(), "is a folder"),
        (lambda p: p.write_bytes(b""), r"the file is empty \(0 bytes\)"),
        (
            lambda p: p.write_text("hello, I am not a movie\n" * 100),
            "not a video FFmpeg can read .*: copy or download it again, or check that it plays",
        ),
        (lambda p: p.write_bytes(np.random.default_rng(0).bytes(50_000)), "not a video FFmpeg can read"),
    ],
)
def test_bad_input_messages(tmp_path, make, message):
    path = tmp_path / "movie.mp4"
    make(path)
    with pytest.raises(BadInputError, match=message):
        probe_video(path)
    with pytest.raises(BadInputError):
        extract_frames(path, cfg(), tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "frames").exists()


@pytest.mark.parametrize("name", ["photo.jpg", "photo.png", "photo.webp", "photo.mp4"])
def test_a_still_picture_given_as_the_movie_is_one_line(tmp_path, name):
    """A photo given as the movie (a picture meant for --characters) ran every stage on one frame
    without a word; it is refused in one line, whatever its name says. An animated GIF is a film
    and is read as one."""
    from PIL import Image as PILImage

    picture = PILImage.fromarray(np.random.default_rng(0).integers(0, 255, (90, 160, 3), dtype=np.uint8))
    path = tmp_path / name
    picture.save(path, format={".jpg": "JPEG", ".mp4": "JPEG"}.get(path.suffix, path.suffix[1:].upper()))
    with pytest.raises(BadInputError, match="is a still picture, not a film; give a video file"):
        probe_video(path)
    frames = [picture.rotate(angle) for angle in (0, 90, 180)]
    frames[0].save(tmp_path / "moving.gif", save_all=True, append_images=frames[1:], duration=100)
    assert probe_video(tmp_path / "moving.gif").width == 160
    # A bare Motion-JPEG stream (a webcam's .mjpeg: JPEGs one after another) is read by the same
    # picture reader as a photo, and is a film.
    stream = io.BytesIO()
    for frame in frames:
        frame.save(stream, format="JPEG")
    (tmp_path / "webcam.mjpeg").write_bytes(stream.getvalue())
    info = probe_video(tmp_path / "webcam.mjpeg")
    assert info.container == "jpeg_pipe" and len(list(VideoReader(tmp_path / "webcam.mjpeg").frames())) == 3


def test_audio_only_file_is_rejected(tmp_path):
    path = write_tone(tmp_path / "sound.mp4")
    with pytest.raises(BadInputError, match="no video stream"):
        probe_video(path)


def test_a_song_with_album_art_is_no_movie(tmp_path):
    path = write_song_with_cover(tmp_path / "song.mp3")
    with pytest.raises(BadInputError, match="holds only a cover picture"):
        probe_video(path)


def test_the_film_is_read_not_the_cover_before_it_nor_is_its_start_after_the_sound_a_loss(tmp_path):
    """A Matroska file with a one-picture cover as its first video track and the film's 50
    frames starting 1 s after the sound: the film is probed and decoded, every frame once, and
    its length is the picture's own (2 s, not the file's 3 s: nothing was lost)."""
    path = write_film_with_cover(tmp_path / "film.mkv", n=50, fps=25, start_s=1.0)
    info = probe_video(path)
    assert (info.width, info.height, info.codec) == (320, 180, "h264")
    assert info.duration_s == pytest.approx(2.0, abs=0.05)
    reader = VideoReader(path)
    assert [d.index for d in reader.frames()] == list(range(50))
    assert reader.loss_message() is None
    result = extract_frames(path, cfg(), tmp_path / "run", progress=False)
    assert result.facts["decoded_frames"] == 50 and not result.warnings


@pytest.mark.parametrize("container", ["mkv", "ts"])
def test_a_film_alone_in_its_file_starting_late_loses_nothing(tmp_path, container):
    """The picture, alone in a Matroska file, starting at 1 s (an MP4 re-encoded without its
    sound keeps the picture's start): Matroska's duration runs from timestamp 0, and stage 01
    warned that the last second was lost. An MPEG-TS's runs from its first packet."""
    from clips import render_shot

    path = tmp_path / f"late.{container}"
    with av.open(str(path), "w") as out:
        video = out.add_stream("libx264", rate=25)
        video.width, video.height, video.pix_fmt = 160, 96, "yuv420p"
        for i, img in enumerate(render_shot(3, 50, 160, 96, 1.0)):
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts, frame.time_base = 25 + i, Fraction(1, 25)
            out.mux(video.encode(frame))
        out.mux(video.encode(None))
    assert probe_video(path).duration_s == pytest.approx(2.0, abs=0.1)
    reader = VideoReader(path)
    assert len(list(reader.frames())) == 50 and reader.loss_message() is None


def test_a_recording_that_begins_partway_through_a_group_of_pictures_says_what_it_lost(tmp_path):
    """A TV recording starts wherever the tuner did: its frames up to the first keyframe cannot be
    decoded, and stage 01 dropped the first 1.6 s of such a file without a word (only a loss at
    the end was measured)."""
    from clips import write_clip

    whole = tmp_path / "whole.ts"
    write_clip(whole, [(5, 150, 1.0)], options={"x264-params": "keyint=100:min-keyint=100:scenecut=0"})
    data = whole.read_bytes()
    cut = tmp_path / "recording.ts"
    cut.write_bytes(data[188 * (len(data) // 188 // 5) :])  # a fifth of its packets gone, mid-GOP
    reader = VideoReader(cut)
    assert len(list(reader.frames())) == 50  # the second group of pictures, from its keyframe
    assert reader.report.first_time_s > 0.5
    message = reader.loss_message()
    assert message.startswith(
        f"recording.ts: the first {reader.report.first_time_s:.1f} s could not be decoded"
    )
    assert message.endswith("the rest was read")
    # Keyframes alone say nothing of it: the first decoded is the first keyframe, seconds into a
    # trimmed MP4 (an edit list) whose every frame before it decodes.
    reader = VideoReader(cut, keyframes_only=True)
    assert list(reader.frames()) and "could not be decoded" not in (reader.loss_message() or "")
    reader = VideoReader(whole)
    assert (
        len(list(reader.frames())) == 150
        and reader.report.first_time_s == 0.0
        and reader.loss_message() is None
    )


def test_an_avi_whose_picture_starts_late_loses_nothing(tmp_path):
    """An Xvid AVI with B-frames whose first frame, a keyframe, is timed 1 s in (its source's
    picture began late): the first packet read is that keyframe, so nothing before it was lost,
    yet the run said "the first 1.0 s could not be decoded (the file begins partway through a
    group of pictures ...)"."""
    path = tmp_path / "late.avi"
    pictures = np.random.default_rng(0).integers(0, 255, (50, 96, 160, 3), dtype=np.uint8)
    with av.open(str(path), "w") as out:
        video = out.add_stream("mpeg4", rate=25, options={"bf": "2"})
        video.width, video.height, video.pix_fmt = 160, 96, "yuv420p"
        for i, img in enumerate(pictures):
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts, frame.time_base = 25 + i, Fraction(1, 25)
            out.mux(video.encode(frame))
        out.mux(video.encode(None))
    reader = VideoReader(path)
    assert len(list(reader.frames())) == 50 and reader.report.first_time_s == pytest.approx(1.0)
    assert reader.loss_message() is None


def test_a_matroska_film_whose_sound_runs_past_its_picture_loses_nothing(tmp_path, monkeypatch):
    """The Segment's duration is the longest track's: a 2 s picture with 4 s of sound was said
    to have lost its last half, "truncated or corrupt". The picture's own DURATION tag tells."""
    from clips import render_shot

    path = tmp_path / "long_sound.mkv"
    with av.open(str(path), "w") as out:
        video = out.add_stream("libx264", rate=25)
        video.width, video.height, video.pix_fmt = 160, 96, "yuv420p"
        audio = out.add_stream("aac", rate=16000)
        audio.layout = "mono"
        for img in render_shot(3, 50, 160, 96, 1.0):
            out.mux(video.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        out.mux(video.encode(None))
        for i in range(4 * 16000 // 1024):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, i * 1024
            out.mux(audio.encode(frame))
        out.mux(audio.encode(None))
    assert probe_video(path).duration_s == pytest.approx(2.0, abs=0.1)
    reader = VideoReader(path)
    assert len(list(reader.frames())) == 50 and reader.loss_message() is None
    # Without the tags (mkvmerge --disable-track-statistics-tags, GStreamer): the picture's own
    # last packet tells. The tags' names are spoilt in place, so the file stays whole.
    untagged = tmp_path / "untagged.mkv"
    untagged.write_bytes(path.read_bytes().replace(b"DURATION", b"DURATIOX"))
    assert probe_video(untagged).duration_s == pytest.approx(2.0, abs=0.1)
    reader = VideoReader(untagged)
    assert len(list(reader.frames())) == 50 and reader.loss_message() is None
    # Where the seek finds no index near the end (it lands at the start), a large file is not
    # read whole for its tail on every probe: the picture is then taken to end with the file.
    from diffusion_bunny.media import probe

    monkeypatch.setattr(probe, "TAIL_S", 0.5)
    monkeypatch.setattr(probe, "TAIL_READ_WHOLE", 0)
    probe._tail_ends.cache_clear()
    assert probe_video(untagged).duration_s == pytest.approx(4.0, abs=0.1)
    monkeypatch.undo()
    probe._tail_ends.cache_clear()
    # A file cut short stops every track early: its lost end is still said.
    cut = tmp_path / "cut.mkv"
    cut.write_bytes(untagged.read_bytes()[: untagged.stat().st_size * 4 // 5])
    reader = VideoReader(cut)
    list(reader.frames())
    assert "truncated or corrupt" in (reader.loss_message() or "")


def _glitched_clip(tmp_path, start: int | None = None, size: int = 2048):
    """Three shots of 40, 45 and 40 frames (25 fps) with ``size`` bytes of garbage from byte
    ``start`` (default: halfway through the file)."""
    import random

    clean = tmp_path / "clean.mp4"
    write_clip(clean, [(1, 40, 2.0), (2, 45, 1.0), (3, 40, 3.0)])
    data = bytearray(clean.read_bytes())
    rng, start = random.Random(0), len(data) // 2 if start is None else start
    data[start : start + size] = bytes(rng.randrange(256) for _ in range(size))
    path = tmp_path / "glitch.mp4"
    path.write_bytes(bytes(data))
    return path


def test_a_damaged_first_keyframe_does_not_refuse_the_movie(tmp_path):
    """Garbage in the first keyframe: the probe passes it for the next whole frame (it refused the
    movie: "the video stream cannot be decoded"), and the shots after it are read as they are."""
    path = _glitched_clip(tmp_path, start=200, size=1024)
    info = probe_video(path)
    assert (info.width, info.height) == (320, 180)
    whole = VideoReader(tmp_path / "clean.mp4").frames()
    clean = {round(d.time_s, 3): d.small_gray.astype(int) for d in whole}
    read = list(VideoReader(path).frames())
    assert len(read) >= 80 and read[0].time_s >= 1.5  # the first shot, built on that keyframe, is gone
    assert max(float(np.abs(d.small_gray.astype(int) - clean[round(d.time_s, 3)]).mean()) for d in read) < 3.0


def test_a_shot_clip_across_a_damaged_stretch_is_made(tmp_path):
    """Stage 06's shot clips read the movie past damage as stage 01 did (they raised there)."""
    from diffusion_bunny.media.clips import decode_clip

    pictures = decode_clip(_glitched_clip(tmp_path), 1.6, 9, 5.0, 1.6, 3.4, (64, 36))
    assert len(pictures) == 9 and {p.size for p in pictures} == {(64, 36)}


def test_a_damaged_stretch_is_left_out_and_the_rest_read(tmp_path):
    """2 kB of garbage halfway through a 125-frame clip (a glitch in a download or a recording):
    the packets the decoder cannot read are skipped and the frames decoded from the damage up to
    the next keyframe (smeared with pieces of other pictures) left out; every frame read is the
    clean clip's own picture, and the movie is read to its end (decoding the whole stream at
    once ended at the first damaged packet, losing the rest)."""
    path = _glitched_clip(tmp_path)
    whole = VideoReader(tmp_path / "clean.mp4").frames()
    clean = {round(d.time_s, 3): d.small_gray.astype(int) for d in whole}
    reader = VideoReader(path)
    read = list(reader.frames())
    report = reader.report
    assert report.damaged_packets >= 1 and report.damaged_frames >= 1 and report.stopped_by_error is None
    assert len(read) + report.damaged_packets + report.damaged_frames == 125
    assert len(read) >= 95 and read[-1].time_s == pytest.approx(124 / 25, abs=0.05)  # to the end
    worst = max(float(np.abs(d.small_gray.astype(int) - clean[round(d.time_s, 3)]).mean()) for d in read)
    assert worst < 3.0, worst  # no smeared frame among them
    assert "the picture is damaged in places" in reader.loss_message()
    result = extract_frames(path, cfg(), tmp_path / "run", progress=False)
    assert result.facts["damaged_packets"] == report.damaged_packets
    assert result.tables["shots"]["end_frame"][-1] == len(read) and len(result.tables["shots"]) == 3
    assert any("damaged in places" in w for w in result.warnings)


def test_damage_that_took_whole_packets_says_how_much_picture_is_missing(tmp_path):
    """A tenth of a Matroska file overwritten halfway (a broken copy): the demuxer skips to the
    next cluster, so few packets fail to decode while a stretch of the film has no frame at all.
    The line said "1 packet(s) could not be decoded, and the 2 frame(s) ... were left out"; it
    now says how many seconds from where are missing (the truth: 125 frames at 25 fps)."""
    import random

    clean = remux(_glitched_clip(tmp_path).with_name("clean.mp4"), tmp_path / "clean.mkv")
    data = bytearray(clean.read_bytes())
    size = len(data) // 10
    start = len(data) // 2 - size // 2
    rng = random.Random(0)
    data[start : start + size] = bytes(rng.randrange(256) for _ in range(size))
    path = tmp_path / "broken.mkv"
    path.write_bytes(bytes(data))
    reader = VideoReader(path)
    read = [d.time_s for d in reader.frames()]
    missing = r"; (\d+\.\d) s of picture from (\d+\.\d) s are missing; the rest was read$"
    said = re.search(missing, reader.loss_message())
    assert said is not None, reader.loss_message()
    gaps = np.diff(read)
    assert float(said.group(1)) == pytest.approx(gaps.max() - 1 / reader.info.fps, abs=0.06)
    assert float(said.group(2)) == pytest.approx(read[int(gaps.argmax())], abs=0.06)
    assert float(said.group(1)) >= 1.0 and (125 - len(read)) / 25 >= float(said.group(1)) - 0.2


def _cluster_lost_in_silence(tmp_path: Path) -> Path:
    """A Matroska file (a keyframe, so a cluster, every second) overwritten from the start of the
    1.52 s packet to the start of the 2.52 s one: the demuxer resyncs at the 3 s cluster, and no
    packet it hands on is damaged (nor is a frame flagged, with any number of decoder threads)."""
    import random

    every_second = {"x264-params": "keyint=25:scenecut=0:bframes=0"}
    write_clip(tmp_path / "clean.mp4", [(1, 125, 2.0)], options=every_second)
    clean = remux(tmp_path / "clean.mp4", tmp_path / "clean.mkv")
    with av.open(str(clean)) as container:
        stream = container.streams.video[0]
        at = {round(float(p.pts * p.time_base), 2): p.pos for p in container.demux(stream) if p.size}
    start, end = at[1.52], at[2.52]
    data = bytearray(clean.read_bytes())
    data[start:end] = bytes(random.Random(0).randrange(256) for _ in range(end - start))
    path = tmp_path / "broken.mkv"
    path.write_bytes(bytes(data))
    return path


def test_picture_the_demuxer_passed_over_in_silence_is_said(tmp_path):
    """Damage from a packet's edge: Matroska's demuxer skips to the next cluster without an
    error and the decoder meets no damaged packet. 1.5 s of picture were gone and the run said
    nothing (a CI machine's encode of the test below came out so); the bytes no packet was read
    from are now the damage's witness."""
    reader = VideoReader(_cluster_lost_in_silence(tmp_path))
    read = [d.time_s for d in reader.frames()]
    report = reader.report
    assert report.damaged_packets == report.damaged_frames == 0 and len(read) == 88  # in silence
    [(after, size)] = report.unread
    assert after == pytest.approx(3.0) and size > 4096
    message = reader.loss_message()
    assert message is not None and "kB of the file could not be read and were passed over" in message
    assert message.endswith("; 1.5 s of picture from 1.5 s are missing; the rest was read"), message
    result = extract_frames(reader.info.path, cfg(), tmp_path / "run", progress=False)
    assert any("1.5 s of picture from 1.5 s are missing" in w for w in result.warnings)


@pytest.mark.parametrize("options", [{}, {"movflags": "frag_keyframe+empty_moov"}], ids=["mkv", "fragmented"])
def test_a_whole_film_with_sound_leaves_no_bytes_unread(tmp_path, options):
    """A whole film's bytes between packets are headers, and a fragmented MP4 reads its audio
    before the video stored ahead of it: no stretch unread, no loss said (a still two seconds
    long in it too)."""
    suffix = ".mp4" if options else ".mkv"
    path = tmp_path / f"sound{suffix}"
    pictures = [*render_shot(1, 25, 160, 96, 1.0), *render_shot(2, 100, 160, 96, 2.0)]
    with av.open(str(path), "w", options=options) as out:
        video = out.add_stream("libx264", rate=25)
        video.width, video.height, video.pix_fmt = 160, 96, "yuv420p"
        sound = out.add_stream("aac", rate=48000)
        done = 0
        for i, img in enumerate(pictures):
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts, frame.time_base = i if i < 25 else i + 50, Fraction(1, 25)
            out.mux(video.encode(frame))
            while done < (frame.pts + 1) * 48000 / 25:
                tone = (np.sin(np.arange(done, done + 1024) / 20) * 0.3).astype(np.float32)
                samples = av.AudioFrame.from_ndarray(np.stack([tone, tone]), format="fltp", layout="stereo")
                samples.sample_rate, samples.pts = 48000, done
                out.mux(sound.encode(samples))
                done += 1024
        out.mux(video.encode(None))
        out.mux(sound.encode(None))
    reader = VideoReader(path)
    assert len(list(reader.frames())) == 125 and reader.report.gaps  # the still
    assert reader.report.unread == [] and reader.loss_message() is None


def test_a_still_of_a_variable_rate_film_is_not_the_damages_loss(tmp_path):
    """A variable-rate film holds its first shot's last frame for 2 s, and damage two seconds
    later costs a second of picture: the line names the second the damage took (from 4.0 s), not
    the still, the film's longest stretch without a new frame."""
    import random

    from clips import render_shot

    path = tmp_path / "still.mkv"
    with av.open(str(path), "w") as out:
        video = out.add_stream("libx264", rate=25, options={"x264-params": "keyint=25"})
        video.width, video.height, video.pix_fmt = 160, 96, "yuv420p"
        pictures = [*render_shot(1, 25, 160, 96, 1.0), *render_shot(2, 100, 160, 96, 2.0)]
        for i, img in enumerate(pictures):
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts, frame.time_base = i if i < 25 else i + 50, Fraction(1, 25)
            out.mux(video.encode(frame))
        out.mux(video.encode(None))
    reader = VideoReader(path)
    assert len(list(reader.frames())) == 125 and reader.loss_message() is None  # the still is no loss
    data = bytearray(path.read_bytes())
    start, rng = int(len(data) * 0.6), random.Random(0)
    data[start : start + 512] = bytes(rng.randrange(256) for _ in range(512))
    damaged = tmp_path / "damaged.mkv"
    damaged.write_bytes(bytes(data))
    reader = VideoReader(damaged)
    read = len(list(reader.frames()))
    assert read < 125 and reader.loss_message().endswith(
        f"; {(125 - read) / 25 - 0.04:.1f} s of picture from 4.0 s are missing; the rest was read"
    )


def test_a_theora_film_that_repeats_frames_is_read_whole(tmp_path):
    """Theora shows a frame for longer with an empty packet (``data/theora_repeats.ogv``: FFmpeg's
    test pattern at 5 fps stored at 25, ``ffmpeg -f lavfi -i testsrc=size=160x96:rate=5:duration=2
    -r 25 -c:v libtheora -q:v 5``: 29 of its packets empty). The decoder refuses such a packet
    ("Invalid argument"), which stopped stage 01 at the first: a Theora film read as corrupt, or
    its last 72% lost. They are passed over, as ``ffmpeg`` passes them over."""
    path = Path(__file__).with_name("data") / "theora_repeats.ogv"
    info = probe_video(path)
    assert (info.codec, info.width, info.height) == ("theora", 160, 96)
    reader = VideoReader(path)
    times = [d.time_s for d in reader.frames()]
    assert reader.report.stopped_by_error is None and reader.loss_message() is None
    assert len(times) == 20 and times[0] == 0.0 and times[-1] == pytest.approx(1.92)
    result = extract_frames(path, cfg(), tmp_path / "run", progress=False)
    assert result.tables["frames"].height >= 1 and not any("lost" in w for w in result.warnings)


def test_a_bare_h264_stream_keeps_its_own_frame_rate(tmp_path):
    """A bare H.264 stream (a camera's or a drone's ``.h264``) has no container to time it:
    FFmpeg's demuxer says 25 frames a second and gives its frames no times. A 29.97 camera file
    was read at 25 (every shot a fifth too long, its EDL at 25 fps); the stream's own timing is
    the rate, as ``ffmpeg`` encodes it on."""
    path = tmp_path / "camera.h264"
    with av.open(str(path), "w", format="h264") as out:
        stream = out.add_stream("libx264", rate=Fraction(30000, 1001))
        stream.width, stream.height, stream.pix_fmt = 160, 96, "yuv420p"
        for i in range(60):
            frame = av.VideoFrame.from_ndarray(np.full((96, 160, 3), 40 if i < 30 else 200, np.uint8))
            frame.pts = i
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    info = probe_video(path)
    assert info.container == "h264" and info.fps == 30000 / 1001
    times = [d.time_s for d in VideoReader(path).frames()]
    assert len(times) == 60 and times[-1] == pytest.approx(59 * 1001 / 30000)


def test_truncated_without_index_is_a_clear_error(cut_clip, tmp_path):
    src, _ = cut_clip  # PyAV writes the mp4 index at the end: cut it off and nothing is readable
    data = src.read_bytes()
    path = tmp_path / "cut.mp4"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(BadInputError, match=r"corrupt|truncated"):
        probe_video(path)


@pytest.mark.parametrize("suffix", [".mkv", ".mp4"])
def test_truncated_video_is_processed_up_to_the_break(cut_clip, tmp_path, suffix):
    src, _ = cut_clip
    full = remux(
        src, tmp_path / f"full{suffix}", options={"movflags": "+faststart"} if suffix == ".mp4" else None
    )
    data = full.read_bytes()
    path = tmp_path / f"half{suffix}"
    path.write_bytes(data[: int(len(data) * 0.55)])
    result = extract_frames(path, cfg(), tmp_path / "run", progress=False)
    decoded = result.facts["decoded_frames"]
    assert 20 < decoded < 125
    assert len(result.warnings) == 1 and "were lost" in result.warnings[0]
    assert result.tables["shots"]["end_frame"][-1] == decoded


def test_reader_reports_no_loss_on_a_whole_file(cut_clip):
    path, _ = cut_clip
    reader = VideoReader(path)
    n = sum(1 for _ in reader.frames())
    assert n == 125 and reader.loss_message() is None
    assert reader.analysis_step == 1  # 320 px wide: analysed at full width


def test_an_independent_count_agrees_on_frame_count(cut_clip, tmp_path):
    """On clips of a known length (the four shots of ``cut_clip``: 125 frames; one shot of 37,
    not a multiple of the decoder's threads or the encoder's B-frame groups), the reader yields
    every frame once, in order, the probe declares them all, and packets demuxed and frames
    decoded by a plain PyAV loop (what ``ffprobe -count_frames`` reports) agree."""
    odd = tmp_path / "odd.mp4"
    write_clip(odd, [(7, 37, 2.0)])
    for path, known in ((cut_clip[0], 125), (odd, 37)):
        reader = VideoReader(path)
        assert [d.index for d in reader.frames()] == list(range(known))
        assert reader.report.decoded == known and reader.loss_message() is None
        assert reader.info.declared_frames == known
        assert count_frames(path) == (known, known)


def _write_frames(path, frames, fps=25, sar=None):
    """Encode RGB frames as they are (H.264), optionally with a sample aspect ratio."""
    from fractions import Fraction

    h, w = frames[0].shape[:2]
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"crf": "18", "preset": "veryfast"}
        if sar is not None:
            stream.codec_context.sample_aspect_ratio = Fraction(sar)
        for img in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        out.mux(stream.encode(None))
    return path


def test_an_absurd_sample_aspect_is_treated_as_square_with_a_warning(tmp_path):
    from clips import render_shot

    path = _write_frames(tmp_path / "sar.mp4", render_shot(3, 20, 160, 96), sar="5/1")
    info = probe_video(path)
    assert info.sample_aspect == 1 and "absurd" in info.warnings[0]
    result = extract_frames(path, cfg(), tmp_path / "run", progress=False)
    assert (result.facts["width"], result.facts["height"]) == (160, 96)
    assert result.facts["sample_aspect"] == "1:1"
    assert any("sample aspect ratio 5 is absurd" in w for w in result.warnings)


def test_a_movie_black_throughout_uses_the_full_frame_with_a_warning(tmp_path):
    path = _write_frames(tmp_path / "black.mp4", [np.zeros((96, 160, 3), np.uint8)] * 30)
    result = extract_frames(path, cfg(), tmp_path / "run", progress=False)
    shot = result.tables["shots"].row(0, named=True)
    assert (shot["box_left"], shot["box_top"], shot["box_right"], shot["box_bottom"]) == (0, 0, 160, 96)
    assert shot["box_source"] == "black (full)"
    assert any("black throughout" in w and "the full frame" in w for w in result.warnings)


def test_a_pillarboxed_insert_in_a_letterboxed_film_gets_its_own_box(tmp_path):
    """A film that changes aspect: letterboxed shots around a pillarboxed one (an archive insert);
    each shot gets its own bars, the black first frame of a shot does not shrink its box."""
    from clips import render_shot

    def framed(frames, box):
        left, top, right, bottom = box
        out = []
        for img in frames:
            canvas = np.zeros((180, 320, 3), np.uint8)
            canvas[top:bottom, left:right] = cv2.resize(img, (right - left, bottom - top))
            out.append(canvas)
        return out

    scope, archive = (0, 24, 320, 156), (40, 0, 280, 180)
    frames = framed(render_shot(1, 30, 320, 180, 2.0), scope)
    frames += [np.zeros((180, 320, 3), np.uint8), *framed(render_shot(2, 29, 320, 180), archive)]
    frames += framed(render_shot(3, 30, 320, 180, -2.0), scope)
    path = _write_frames(tmp_path / "aspects.mp4", frames)
    result = extract_frames(path, cfg(detector="content"), tmp_path / "run", progress=False)
    shots = result.tables["shots"]
    assert shots.height == 3
    boxes = [
        (r["box_left"], r["box_top"], r["box_right"], r["box_bottom"]) for r in shots.iter_rows(named=True)
    ]
    for got, want in zip(boxes, [scope, archive, scope], strict=True):
        assert all(
            0 <= (g - w) * (1 if i < 2 else -1) <= 6 for i, (g, w) in enumerate(zip(got, want, strict=True))
        ), (got, want)
    assert result.facts["picture_box"]["film_box"][1] >= 24


@pytest.mark.parametrize("n", [1, 6])
def test_a_movie_shorter_than_a_shot_keeps_a_frame(tmp_path, n):
    """A clip under extract.min_shot_seconds (one frame, a fifth of a second) is no flash between
    two shots: it is the whole movie, and it gives a frame instead of an empty dataset."""
    from clips import render_shot

    path = _write_frames(tmp_path / "short.mp4", render_shot(5, n, 160, 96))
    result = extract_frames(path, cfg(), tmp_path / "run", progress=False)
    shots = result.tables["shots"]
    assert shots.height == 1 and not shots["too_short"][0]
    assert result.tables["frames"].height == 1
    assert not any("no frame kept" in w for w in result.warnings)


def test_a_film_of_only_too_short_shots_warns_that_nothing_was_kept(tmp_path):
    from clips import render_shot

    frames = [img for seed in (1, 2, 3) for img in render_shot(seed * 11, 10, 160, 96)]
    path = _write_frames(tmp_path / "flashes.mp4", frames)
    result = extract_frames(path, cfg(), tmp_path / "run", progress=False)
    assert result.tables["shots"]["too_short"].to_list() == [True, True, True]
    assert result.tables["frames"].is_empty()
    assert any("no frame kept" in w and "extract.min_shot_seconds" in w for w in result.warnings)


def test_an_animated_gif_is_measured_from_its_picture_not_its_bgra_bytes(tmp_path):
    """A GIF decodes to packed BGRA, whose first plane is no luma: read as one, every shot was
    "black throughout" and the letterbox bars went unseen."""
    from clips import render_shot

    frames = []
    for seed in (4, 9):
        for img in render_shot(seed, 12, 160, 72):
            canvas = np.zeros((96, 160, 3), np.uint8)
            canvas[12:84] = img
            frames.append(canvas)
    path = tmp_path / "anim.gif"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("gif", rate=10)
        stream.width, stream.height, stream.pix_fmt = 160, 96, "rgb8"
        for img in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        out.mux(stream.encode(None))
    result = extract_frames(path, cfg(), tmp_path / "run", progress=False)
    assert not any("black throughout" in w for w in result.warnings)
    shots = result.tables["shots"]
    assert shots.height == 2
    for shot in shots.iter_rows(named=True):
        assert (shot["box_left"], shot["box_right"]) == (0, 160)
        assert 10 <= shot["box_top"] <= 14 and 82 <= shot["box_bottom"] <= 86, shot


def test_a_gifs_rate_is_its_frames_over_its_length_not_ffmpegs_guess(tmp_path):
    """A GIF times each frame by its own delay; FFmpeg's average rate is a guess from its first
    frames (100/7 here, 50/3 for a 15 fps GIF made by ffmpeg), and stage 01 counted its windows
    in frames with it."""
    frames = [Image.fromarray(np.full((40, 60, 3), i * 12, np.uint8)) for i in range(20)]
    path = tmp_path / "delays.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=[60] * 5 + [80] * 15)
    info = probe_video(path)
    assert info.duration_s == pytest.approx(1.5) and info.fps == pytest.approx(20 / 1.5)


def test_a_variable_rate_films_last_shot_ends_with_the_film(tmp_path):
    """The last frame was given the film's mean frame length (1/17 s here), not its own (1/30 s):
    the last shot ended after the picture did."""
    from clips import render_shot

    path = tmp_path / "vfr.mp4"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = 160, 96, "yuv420p"
        stream.codec_context.time_base = Fraction(1, 1000)
        pts = 0
        for i, img in enumerate([*render_shot(3, 40, 160, 96, 1.0), *render_shot(5, 40, 160, 96, 1.0)]):
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts, frame.time_base = pts, Fraction(1, 1000)
            out.mux(stream.encode(frame))
            pts += 100 if 20 <= i < 50 else 33  # a slow stretch in the middle
        out.mux(stream.encode(None))
    info = probe_video(path)
    assert info.fps < 20  # the mean rate: 80 frames in 4.65 s
    shots = extract_frames(path, cfg(), tmp_path / "run", progress=False).tables["shots"]
    assert shots["end_s"].max() == pytest.approx(info.duration_s)


def _joined_recording(tmp_path):
    """Two MPEG-TS pieces joined byte for byte (``cat a.ts b.ts``, as TV recordings and stream
    downloads are): the second piece's timestamps start again, and it is stored larger."""
    pieces = []
    for i, (shots, size) in enumerate(
        (([(1, 40, 2.0), (2, 35, 1.0)], (320, 180)), ([(3, 45, 3.0), (4, 30, 1.0)], (480, 270)))
    ):
        piece = tmp_path / f"piece{i}.ts"
        write_clip(piece, shots, width=size[0], height=size[1])
        pieces.append(piece.read_bytes())
    path = tmp_path / "joined.ts"
    path.write_bytes(b"".join(pieces))
    return path


def test_a_joined_recording_keeps_its_times_running_on(tmp_path):
    """``cat a.ts b.ts``, the second piece larger: the times started again at the join, so the
    shot across it ended before it began (2.74 -> 2.58 s on a joined real clip) and frames of the
    second piece had the first piece's times. They now run on, one frame after the frame before
    the join, as ffmpeg's."""
    path = _joined_recording(tmp_path)
    reader = VideoReader(path)
    decoded = list(reader.frames())
    times = [d.time_s for d in decoded]
    assert len(times) == 150 and reader.report.timestamp_resets == 1
    # the larger piece is measured at the movie's size, as the first piece (analysis copies of
    # another shape went to the cut detector and the picture-box profiles)
    assert {d.small_gray.shape for d in decoded} == {decoded[0].small_gray.shape}
    assert reader.report.resized_frames == 75
    assert all(b > a for a, b in itertools.pairwise(times))
    assert times[-1] == pytest.approx(149 / 25, abs=0.01)
    result = extract_frames(path, cfg(), tmp_path / "run", progress=False)
    shots = result.tables["shots"]
    assert len(shots) == 4 and (shots["end_s"] > shots["start_s"]).all()
    assert shots["end_s"][-1] == pytest.approx(150 / 25, abs=0.01)
    assert result.facts["timestamp_resets"] == 1 and result.facts["resized_frames"] == 75
    assert any("start again 1 time(s)" in w for w in result.warnings)
    assert any("75 frame(s) are stored at another size" in w for w in result.warnings)
    saved = [Image.open(tmp_path / "run" / p).size for p in result.tables["frames"]["path"]]
    assert len(saved) >= 4 and set(saved) == {(320, 180)}


def test_times_run_on_only_where_the_format_allows_joins():
    """MPEG-TS and -PS are joined by ``cat``; an MP4's or a Matroska file's time that goes back
    is a glitch in one frame, and shifting every later frame by it would be the bigger error."""
    from diffusion_bunny.media.video import MonotonicClock

    joined, glitched = MonotonicClock(25, discontinuous=True), MonotonicClock(25, discontinuous=False)
    raw = [0.0, 0.04, 0.08, 0.0, 0.04, 30.0, 30.04]  # a restart at the 4th frame, a leap at the 6th
    assert [round(joined(t), 3) for t in raw] == [0.0, 0.04, 0.08, 0.12, 0.16, 0.2, 0.24]
    assert joined.resets == 2
    assert [glitched(t) for t in raw] == raw and glitched.resets == 0


def test_shot_clips_are_not_cut_from_a_joined_recording(tmp_path):
    """A clip is found by a seek to its time, which lands in either piece of a joined recording:
    stage 06 reads stage 01's count of joins, says so and cuts none; a file of one piece has no
    join."""
    from diffusion_bunny.pipeline.run import Run
    from diffusion_bunny.stages import run_stage
    from diffusion_bunny.stages.export.settings import ExportSettings
    from diffusion_bunny.stages.export.stage import _plan_clips, timestamp_joins

    path = _joined_recording(tmp_path)
    cfg_all = load_config(None, {"extract.detector": "content"}, root=tmp_path)
    joined = Run.create(tmp_path / "joined", path)
    piece = Run.create(tmp_path / "piece", tmp_path / "piece0.ts")
    for run in (joined, piece):
        run_stage(run, "extract", cfg_all, progress=False)
    assert timestamp_joins(joined) == 1 and timestamp_joins(piece) == 0
    warnings: list[str] = []
    shots = pl.DataFrame({"shot_id": [0], "start_s": [0.0], "end_s": [6.0]})
    settings = ExportSettings(video_clips=True)
    clips, short = _plan_clips(pl.DataFrame(), shots, path, settings, warnings, timestamp_joins(joined))
    assert clips.is_empty() and short == 0
    assert len(warnings) == 1 and "no clips" in warnings[0] and "-c copy" in warnings[0]


def test_the_threshold_detector_finds_a_fade_through_black_in_ordinary_video(tmp_path):
    """Most video is limited range (black stored as 16): the analysis copy kept it, and the
    threshold detector (mean brightness, default 12, as PySceneDetect documents it on 0-255)
    never saw black. A fade out, 20 black frames and a fade in is a cut now, as PySceneDetect's
    own run on the file finds it."""
    import av

    from diffusion_bunny.media.video import analysis_in_video_range

    picture = np.full((180, 320, 3), 170, np.uint8)
    levels = (
        [1.0] * 40
        + [1 - i / 10 for i in range(1, 11)]
        + [0.0] * 20
        + [i / 10 for i in range(1, 11)]
        + [1.0] * 40
    )
    path = tmp_path / "fade.mp4"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 320, 180, "yuv420p"
        for level in levels:
            out.mux(
                stream.encode(av.VideoFrame.from_ndarray((picture * level).astype(np.uint8), format="rgb24"))
            )
        out.mux(stream.encode(None))
    assert analysis_in_video_range(probe_video(path))
    result = extract_frames(path, cfg(detector="threshold"), tmp_path / "run", progress=False)
    assert result.tables["shots"].height == 2
    assert 55 <= starts(result)[0] <= 64  # the middle of the dip, as PySceneDetect puts it (59)


def test_a_shot_with_no_profiled_frame_is_not_black():
    """Brightness profiles are taken on every 4th frame: a bright shot of 1-3 frames can hold
    none, and was called black throughout (a false warning, a black count too high). It takes
    its neighbours' box, as an unseen shot, not as a black one."""
    from diffusion_bunny.stages.extract.picturebox import ShotProfile, decide_boxes

    lit = ShotProfile()
    rows, cols = np.zeros(180), np.zeros(320)
    rows[20:160], cols[:] = 1.0, 1.0  # letterboxed
    lit.add((rows, cols))
    black = ShotProfile()
    black.add((np.zeros(180), np.zeros(320)))
    decision = decide_boxes(
        [lit, ShotProfile(), lit, black], [40, 3, 40, 20], (320, 180), [0.0, 1.6, 1.72, 3.3]
    )
    assert decision.sources[1] == "near" and decision.boxes[1] == decision.boxes[0]
    assert decision.sources[3].startswith("black") and decision.black_shots == 1


def test_a_picture_box_edge_at_the_frames_border_stays_there_on_an_odd_size():
    """321x181 with no bars gave the box (0, 0, 320, 180): the summary said "picture 320x180
    inside bars", and turned a quarter, the top row was taken for a bar."""
    from diffusion_bunny.stages.extract.picturebox import to_display

    assert to_display((0, 0, 321, 181), (321, 181), (321, 181)) == (0, 0, 321, 181)
    assert to_display((3, 21, 321, 161), (321, 181), (321, 181)) == (4, 22, 321, 160)  # inner edges even
    assert to_display((0, 0, 704, 576), (704, 576), (1024, 576)) == (0, 0, 1024, 576)


def test_a_motion_jpeg_clip_whose_frames_carry_exif_is_read(tmp_path):
    """A camera's Motion-JPEG clip: each frame a JPEG with EXIF, which FFmpeg's decoder attaches
    to the frame as side data PyAV 18 cannot name. Reading the frame's side data for its display
    matrix stopped the run with a bug (ValueError: 31 is not a valid Type)."""
    exif = Image.Exif()
    exif[0x010F] = "a camera"  # Make
    path = tmp_path / "camera.avi"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mjpeg", rate=10)
        stream.width, stream.height, stream.pix_fmt = 96, 64, "yuvj420p"
        for i in range(10):
            buffer = io.BytesIO()
            Image.new("RGB", (96, 64), (20 * i, 80, 160)).save(buffer, "JPEG", exif=exif)
            packet = av.Packet(buffer.getvalue())
            packet.stream, packet.pts, packet.dts, packet.time_base = stream, i, i, Fraction(1, 10)
            packet.is_keyframe = True
            out.mux(packet)
    info = probe_video(path)
    assert (info.width, info.height, info.rotation, info.mirrored) == (96, 64, 0, False)
    result = extract_frames(path, cfg(), tmp_path / "run", progress=False)
    assert result.tables["frames"].height >= 1


def _dark_vignetted(img: np.ndarray, gain: float, lift: float) -> np.ndarray:
    """A picture as a dark stage filmed through an old lens: ``gain`` of its light plus ``lift``
    gray levels, and corners at a quarter of that (a cos^4 vignette, as old film shows it)."""
    from diffusion_bunny.demo.realclips import vignette_gain

    h, w = img.shape[:2]
    return ((img * gain + lift) * vignette_gain(w, h, np.pi / 4)).astype(np.uint8)


def test_a_vignetted_pillarboxed_picture_loses_its_bars(tmp_path):
    """Old film in a 4:3 pillarbox: a vignette dims the picture's outer columns until they light
    10-40% of their pixels, under what a confident edge needed, and every shot kept the full
    frame: the bars went into the dataset. A bar is black in every frame; the picture runs lit
    from its border, however dim."""
    from clips import render_shot

    picture = (40, 0, 280, 180)
    frames = []
    for seed in (4, 9):
        for img in render_shot(seed, 30, 240, 180, 1.5):
            canvas = np.zeros((180, 320, 3), np.uint8)
            canvas[:, 40:280] = _dark_vignetted(img, 0.06, 4)
            frames.append(canvas)
    path = _write_frames(tmp_path / "old_film.mp4", frames)
    result = extract_frames(path, cfg(detector="content"), tmp_path / "run", progress=False)
    for row in result.tables["shots"].iter_rows(named=True):
        got = (row["box_left"], row["box_top"], row["box_right"], row["box_bottom"])
        assert picture[0] <= got[0] <= picture[0] + 6 and picture[2] - 6 <= got[2] <= picture[2], got
        assert (got[1], got[3]) == (0, 180)


def test_text_on_black_is_no_bar_and_picture():
    """Lines of a title or of credits on black light a column here and there, with black between
    their letters: no picture runs lit from a bar there, so they give no confident edge."""
    from diffusion_bunny.stages.extract.picturebox import Edges, own_edges

    cols = np.zeros(320, np.float32)
    for left in range(60, 260, 12):  # letters 8 px wide, 4 px apart
        cols[left : left + 8] = 0.3
    edges = own_edges(cols)
    assert not edges.start_ok and not edges.end_ok
    dim = np.full(320, 0.15, np.float32)  # a dim picture edge with no bar beside it
    dim[40:280] = 0.3
    assert not own_edges(dim).start_ok
    dim[:20] = dim[-20:] = 0.0  # the same picture between bars
    assert own_edges(dim) == Edges(20, 300, True, True, True, cliff=True)


@pytest.mark.parametrize("bar", ["bottom", "top"])
def test_a_subtitle_in_a_bar_does_not_cost_the_other_bar(bar):
    """A 2.39:1 release subtitled in its bottom bar, in every shot: the subtitle's rows were the
    lit edge, not confident, and the whole axis went with it (the confident top edge too): with
    no clean shot near and no film box, every picture kept both bars. The picture's edge is
    found past the text and the black between them; a dark band inside a picture with no bar
    opposite it is not cut off."""
    from diffusion_bunny.stages.extract.picturebox import ShotProfile, decide_boxes, own_edges

    rows = np.zeros(360, np.float32)
    rows[46:314] = 0.9  # the picture
    text = slice(322, 340) if bar == "bottom" else slice(20, 38)
    rows[text] = 0.33  # a subtitle line in the bar, 8 black rows from the picture
    rows[text.start + 5 : text.start + 7] = 0.43  # its busiest rows (a bold font, measured)
    edges = own_edges(rows)
    assert (edges.start, edges.end, edges.start_ok, edges.end_ok) == (46, 314, True, True)
    shot = ShotProfile()
    shot.add((rows, np.full(640, 0.9, np.float32)))
    decision = decide_boxes([shot], [100], (640, 360))
    assert decision.boxes == [(0, 48, 640, 312)] and decision.sources == ["own"]
    unbarred = np.full(360, 0.9, np.float32)
    unbarred[300:314], unbarred[314:] = 0.0, 0.3  # a dark band, a dim floor; no bar on top
    shot = ShotProfile()
    shot.add((unbarred, np.full(640, 0.9, np.float32)))
    assert decide_boxes([shot], [100], (640, 360)).boxes == [(0, 0, 640, 360)]


def test_an_edge_found_at_a_bar_only_is_not_lent_to_a_neighbour():
    """Scrolling credits on black light every row between their first and last line in some
    frame, and can pass for a dim picture between two bars: such an edge holds for its own shot,
    but a dark shot beside it takes the full frame (or a lit neighbour's box), not the credits'."""
    from diffusion_bunny.stages.extract.picturebox import ShotProfile, decide_boxes

    credits, dark = ShotProfile(), ShotProfile()
    rows = np.zeros(180, np.float32)
    rows[12:168] = 0.3  # lines of text scrolled through every row, none in the top and bottom 12
    credits.add((rows, np.full(320, 0.3, np.float32)))
    dark.add((np.full(180, 0.1, np.float32), np.full(320, 0.1, np.float32)))
    decision = decide_boxes([dark, credits], [100, 100], (320, 180), [0.0, 10.0])
    assert decision.boxes[1][1] > 0  # its own edge, believed for itself
    assert decision.boxes[0] == (0, 0, 320, 180) and decision.film is None


def test_a_bar_edge_counts_for_the_film_where_a_sample_of_the_film_saw_the_same_bars():
    """Every shot of a vignetted pillarboxed film finds its bars at their borders alone; a dark
    shot among them had no box to take and kept its bars. The film's sample (a third of the way
    in, taken before the pass) saw the same bars: those edges count for the film's box, and the
    dark shot takes it. Without such a witness they do not (credits on black could pass)."""
    from diffusion_bunny.stages.extract.picturebox import ShotProfile, decide_boxes

    vignetted, dark = ShotProfile(), ShotProfile()
    cols = np.zeros(320, np.float32)
    cols[40:280] = 0.3  # dim edges: no confident edge but at the bars
    vignetted.add((np.full(180, 0.8, np.float32), cols))
    dark.add((np.full(180, 0.1, np.float32), np.where(cols > 0, 0.1, 0.0).astype(np.float32)))
    shots = [vignetted, dark, vignetted]
    times = [0.0, 100.0, 200.0]  # further apart than a neighbour is looked for
    alone = decide_boxes(shots, [100, 50, 100], (320, 180), times)
    assert alone.boxes[1][0] == 0 and (alone.film is None or alone.film[0] == 0)
    seen = decide_boxes(shots, [100, 50, 100], (320, 180), times, witness=(40, 0, 280, 180))
    assert seen.sources[1] == "film" and 40 <= seen.boxes[1][0] <= 44 and 276 <= seen.boxes[1][2] <= 280
    other = decide_boxes(shots, [100, 50, 100], (320, 180), times, witness=(0, 0, 320, 180))
    assert other.film is None or (other.film[0], other.film[2]) == (0, 320)


@pytest.mark.parametrize("deinterlace", [None, False])
def test_the_reader_samples_the_picture_box_before_the_pass(tmp_path, deinterlace):
    """The picture box of the frames the interlace check decodes, known before the pass: from
    the same decode when the check runs, decoded for it alone when the setting forces the answer."""
    from clips import render_shot

    from diffusion_bunny.media.video import VideoReader
    from diffusion_bunny.stages.extract.picturebox import sample_box

    frames = []
    for img in render_shot(3, 40, 120, 90, 1.0):
        canvas = np.zeros((90, 160, 3), np.uint8)
        canvas[:, 20:140] = img
        frames.append(canvas)
    path = _write_frames(tmp_path / "pillarbox.mp4", frames)
    reader = VideoReader(path, 160, deinterlace=deinterlace, sample_profiles=True)
    assert reader.sample is not None
    rows, cols = reader.sample
    assert rows.shape == (90,) and cols.shape == (160,) and cols[:16].max() == 0 and cols[22:138].min() > 0.5
    box = sample_box(reader.sample, (160, 90))
    assert box is not None and abs(box[0] - 20) <= 2 and abs(box[2] - 140) <= 2
    assert (box[1], box[3]) == (0, 90)
    assert VideoReader(path, 160, deinterlace=deinterlace).sample is None


def test_a_film_flagged_interlaced_is_sampled_past_its_opening(tmp_path):
    """The interlace check of a film flagged interlaced reads its first frames, which may be a
    letterboxed opening or credits on black: the picture box's sample is still taken a third of
    the way in (the film, pillarboxed here), not from the check's frames."""
    from clips import render_shot

    from diffusion_bunny.media.video import VideoReader, flagged_interlaced
    from diffusion_bunny.stages.extract.picturebox import sample_box

    frames = []
    for img in render_shot(1, 250, 160, 60, 1.0):  # a 10 s letterboxed opening
        canvas = np.zeros((120, 160, 3), np.uint8)
        canvas[30:90] = img
        frames.append(canvas)
    for img in render_shot(2, 500, 120, 120, 1.0):  # the film, pillarboxed
        canvas = np.zeros((120, 160, 3), np.uint8)
        canvas[:, 20:140] = img
        frames.append(canvas)
    path = tmp_path / "flagged.mp4"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 160, 120, "yuv420p"
        stream.options = {"crf": "18", "preset": "veryfast", "x264-params": "interlaced=1:tff=1"}
        for img in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        out.mux(stream.encode(None))
    reader = VideoReader(path, 160, deinterlace=None, sample_profiles=True)
    assert flagged_interlaced(reader.info)
    box = sample_box(reader.sample, (160, 120))
    assert box is not None and abs(box[0] - 20) <= 2 and abs(box[2] - 140) <= 2
    assert (box[1], box[3]) == (0, 120)
