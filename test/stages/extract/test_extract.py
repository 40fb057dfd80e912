"""Stage 01: decoding, shot detection, keyframe choice, formats, rotation, VFR, bad input."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import polars as pl
import pytest
from clips import ffmpeg, write_clip
from PIL import Image

from diffusion_bunny.config import ExtractionConfig, load_config
from diffusion_bunny.demo.metrics import match_boundaries
from diffusion_bunny.errors import BadInputError
from diffusion_bunny.media.video import VideoReader, probe_video
from diffusion_bunny.stages.extract.keyframes import (
    MIDDLE_BUCKETS,
    FrameCandidate,
    OpenShot,
    classify_shots,
    select_keyframes,
)
from diffusion_bunny.stages.extract.stage import extract_frames


def cfg(**kw) -> ExtractionConfig:
    return load_config(None, {f"extraction.{k}": v for k, v in kw.items()}, use_local=False).extraction


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


def test_rotation_metadata_is_applied(cut_clip, tmp_path, ffmpeg_bin):
    src, _ = cut_clip
    rotated = tmp_path / "rot.mp4"
    ffmpeg("-i", str(src), "-c", "copy", "-metadata:s:v:0", "rotate=90", str(rotated))
    assert probe_video(rotated).rotation in (90, 270)
    result = extract_frames(rotated, cfg(), tmp_path / "run", progress=False)
    row = result.tables["frames"].row(0, named=True)
    assert (row["width"], row["height"]) == (180, 320)
    ours = np.asarray(Image.open(tmp_path / "run" / row["path"]).convert("RGB"), dtype=np.float32)
    # ffmpeg itself autorotates when decoding: its picture of the same frame must match ours.
    ref_png = tmp_path / "ref.png"
    ffmpeg("-i", str(rotated), "-vf", f"select=eq(n\\,{row['frame_index']})", "-frames:v", "1", str(ref_png))
    ref = np.asarray(Image.open(ref_png).convert("RGB"), dtype=np.float32)
    assert ref.shape == ours.shape
    assert np.abs(ref - ours).mean() < 6.0


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


@pytest.mark.parametrize(
    ("name", "args"),
    [
        ("h264.mkv", ["-c", "copy"]),
        ("h264.mov", ["-c", "copy"]),
        ("mpeg4.avi", ["-c:v", "mpeg4", "-q:v", "3"]),
        (
            "vp9.webm",
            ["-c:v", "libvpx-vp9", "-crf", "30", "-b:v", "0", "-deadline", "realtime", "-cpu-used", "8"],
        ),
        ("hevc10.mp4", ["-c:v", "libx265", "-pix_fmt", "yuv420p10le", "-x265-params", "log-level=error"]),
    ],
)
def test_containers_and_codecs(cut_clip, tmp_path, ffmpeg_bin, name, args):
    src, cuts = cut_clip
    path = tmp_path / name
    ffmpeg("-i", str(src), *args, str(path))
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


def test_keyframe_method_decodes_only_codec_keyframes(cut_clip, tmp_path, ffmpeg_bin):
    src, _ = cut_clip
    path = tmp_path / "gop10.mp4"
    ffmpeg(
        "-i", str(src), "-c:v", "libx264", "-g", "10", "-keyint_min", "10", "-sc_threshold", "0", str(path)
    )
    result = extract_frames(path, cfg(method="keyframe"), tmp_path / "run", progress=False)
    assert result.tables["frames"]["frame_index"].to_list() == list(range(0, 125, 10))
    assert result.facts["decoded_frames"] == 13
    assert set(result.tables["frames"]["role"]) == {"keyframe"}


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: None, "no such file"),
        (lambda p: p.mkdir(), "is a folder"),
        (lambda p: p.write_bytes(b""), r"the file is empty \(0 bytes\)"),
        (lambda p: p.write_text("hello, I am not a movie\n" * 100), "not a video FFmpeg can read"),
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


def test_audio_only_file_is_rejected(tmp_path, ffmpeg_bin):
    path = tmp_path / "sound.mp4"
    ffmpeg("-f", "lavfi", "-i", "sine=frequency=440:duration=1", str(path))
    with pytest.raises(BadInputError, match="no video stream"):
        probe_video(path)


def test_truncated_without_index_is_a_clear_error(cut_clip, tmp_path):
    src, _ = cut_clip  # PyAV writes the mp4 index at the end: cut it off and nothing is readable
    data = src.read_bytes()
    path = tmp_path / "cut.mp4"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(BadInputError, match=r"corrupt|truncated"):
        probe_video(path)


@pytest.mark.parametrize("suffix", [".mkv", ".mp4"])
def test_truncated_video_is_processed_up_to_the_break(cut_clip, tmp_path, ffmpeg_bin, suffix):
    src, _ = cut_clip
    full = tmp_path / f"full{suffix}"
    ffmpeg(
        "-i", str(src), "-c", "copy", *(["-movflags", "+faststart"] if suffix == ".mp4" else []), str(full)
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


def test_ffprobe_agrees_on_frame_count(cut_clip):
    path, _ = cut_clip
    out = subprocess.run(
        [
            "ffprobe",
            "-v",
            "error",
            "-count_frames",
            "-select_streams",
            "v:0",
            "-show_entries",
            "stream=nb_read_frames",
            "-of",
            "json",
            str(path),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert int(json.loads(out.stdout)["streams"][0]["nb_read_frames"]) == 125
