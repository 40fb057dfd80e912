"""Stage 06 shot clips (``export.video_clips``): a real clip cut from footage and from the demo
movie checked for frame count, fps, size and never spanning a cut; planning and settings."""

from __future__ import annotations

import shutil
import tomllib

import numpy as np
import polars as pl
import pytest

from diffusion_bunny.config import load_config
from diffusion_bunny.errors import ConfigError
from diffusion_bunny.media.clips import clip_frames_rgb, cover_crop, decode_clip, encode_mp4
from diffusion_bunny.pipeline.run import Run
from diffusion_bunny.stages import run_stage, stage_state, summary
from diffusion_bunny.stages.export.clips import clip_span, plan_clips
from diffusion_bunny.stages.export.plots import clip_strips
from diffusion_bunny.stages.export.settings import ExportSettings
from diffusion_bunny.stages.export.tables import CLIP_SCHEMA, dataset_dir


def test_trainer_configs_read_back_whatever_the_run_folder_is_called():
    """Paths were pasted between quotes: a run folder under /home/o'neil, a quote or a
    backslash in a folder name, or a Windows path made a file the trainer could not read."""
    import tomllib

    from diffusion_bunny.stages.export.clips import diffusion_pipe_toml, musubi_toml

    for folder in (
        "/home/o'neil/runs/film/dataset/video",
        '/data/"quoted"/video',
        "C:\\Users\\me\\temp\\video",
    ):
        musubi = tomllib.loads(musubi_toml(folder, folder + "_cache", (256, 144), 17))
        assert musubi["datasets"][0]["video_directory"] == folder
        assert musubi["datasets"][0]["cache_directory"] == folder + "_cache"
        assert tomllib.loads(diffusion_pipe_toml(folder, (256, 144), 17))["directory"][0]["path"] == folder
    # The aspect buckets take in the clips' own shape (they stopped at 2:1 whatever the clips).
    for size, span in (((256, 144), (0.5, 2.0)), ((1024, 256), (0.5, 4.0)), ((256, 1024), (0.25, 2.0))):
        config = tomllib.loads(diffusion_pipe_toml("/v", size, 17))
        assert (config["min_ar"], config["max_ar"]) == span


def test_clip_span_lies_inside_the_shot_or_is_none():
    fps = 30000 / 1001
    start, end = 82 / fps, 211 / fps
    t0, t1 = clip_span(start, end, fps, 16.0, 33)
    assert start <= t0 and t0 + 32 / 16 <= end - 1 / fps + 1e-9 and t1 == pytest.approx(t0 + 33 / 16)
    assert clip_span(20 / fps, 82 / fps, fps, 16.0, 33) is not None  # 2.03 s usable, 2.0 s clip
    assert clip_span(20 / fps, 82 / fps, fps, 16.0, 49) is None  # 3.0 s clip
    assert clip_span(start, end, fps, 16.0, 81) is None  # 5 s


def test_plan_clips_takes_named_shots_and_counts_short_ones():
    shots = pl.DataFrame(
        {"shot_id": [0, 1, 2, 3], "start_s": [0.0, 4.0, 8.0, 8.5], "end_s": [4.0, 8.0, 8.5, 12.0]}
    )
    items = pl.DataFrame(
        {
            "shot_id": [0, 0, 1, 2, 3],
            "frame_index": [10, 20, 100, 200, 210],
            "crop": ["face", "full", "full", "full", "full"],
            "characters": [["bob"], ["ann", "bob"], [], ["ann"], ["cy"]],
            "text": ["face cap", "full cap", "nobody", "short", "three"],
            # Full pictures are the frames' regions: a letterboxed picture (bars of 140 px in
            # 1080p), in shot 3 less a subtitle band at its bottom; the face crop is inside it.
            "left": [900, 0, 0, 0, 0],
            "top": [300, 140, 140, 140, 140],
            "right": [1100, 1920, 1920, 1920, 1920],
            "bottom": [500, 940, 940, 940, 860],
        }
    )
    clips, short = plan_clips(shots, items, 25.0, 16.0, 33, (320, 192))
    assert clips.schema == pl.Schema(CLIP_SCHEMA)
    assert clips["shot_id"].to_list() == [0, 3]  # shot 1 names nobody, shot 2 is 0.5 s
    assert short == 1
    row = clips.row(0, named=True)
    assert (row["caption"], row["characters"], row["frames"]) == ("full cap", ["ann", "bob"], 33)
    # A clip shows the picture without its bars (the full pictures' region, not a face crop)...
    assert (row["crop_left"], row["crop_top"], row["crop_right"], row["crop_bottom"]) == (0, 140, 1920, 940)
    # ...and without a subtitle band cut off its frames.
    assert clips.row(1, named=True)["crop_bottom"] == 860


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"clip_frames": 32}, "export.clip_frames"),
        ({"clip_width": 500}, "export.clip_width"),
        ({"clip_fps": 0}, "export.clip_fps"),
    ],
)
def test_bad_clip_settings_name_the_key(override, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        load_config(None, {f"export.{k}": v for k, v in override.items()}, root=tmp_path)
    assert ExportSettings().video_clips is False


@pytest.mark.parametrize("declared", [30, 1000])
def test_each_clip_frame_is_the_source_frame_nearest_its_time_at_any_declared_rate(
    tmp_path, monkeypatch, declared
):
    """A clip's frame k is the source frame nearest ``start + k / clip_fps``. It was the frame
    before wherever the next came later than half a frame at the declared rate: in a Matroska
    file declaring 1000 fps (a 1 ms time base) that was 0.5 ms, and "nearest" became "the one
    before" for 17 of 33 frames of a real variable-rate clip."""
    from clips import write_clip

    import diffusion_bunny.media.clips as clips

    times = [i / 10 for i in range(30)] + [3 + i / 30 for i in range(90)]  # 10 fps, then 30
    movie = tmp_path / "vfr.mkv"
    write_clip(movie, [(5, len(times), 1.0)], fps=declared, times=times)
    used = []
    shown = clips.frame_to_bgr
    monkeypatch.setattr(
        clips,
        "frame_to_bgr",
        lambda frame, *a: (used.append(round(float(frame.time), 3)), shown(frame, *a))[1],
    )
    start, count, rate = 1.0, 48, 16.0
    decode_clip(movie, start, count, rate, 0.0, 6.0, (64, 64))
    nearest = {min(times, key=lambda t: abs(t - (start + k / rate))) for k in range(count)}
    assert set(used) == {round(t, 3) for t in nearest}


def test_a_clip_of_an_mpeg_ts_recording_starts_at_its_own_first_frame(tmp_path, monkeypatch):
    """MPEG-TS has no index: a seek lands on a packet that need not start a picture, and the
    decoder drops all up to the next keyframe. With a long GOP a clip began with one picture held
    for seconds (or, with the keyframe in the next shot, stage 06 failed as a bug)."""
    from clips import write_clip

    import diffusion_bunny.media.clips as clips

    movie = tmp_path / "recording.ts"
    write_clip(
        movie, [(5, 200, 1.0)], fps=25, options={"x264-params": "keyint=150:min-keyint=150:scenecut=0"}
    )
    used = []
    shown = clips.frame_to_bgr
    monkeypatch.setattr(
        clips,
        "frame_to_bgr",
        lambda frame, *a: (used.append(float(frame.time)), shown(frame, *a))[1],
    )
    start, count, rate = 3.0, 16, 8.0
    pictures = decode_clip(movie, start, count, rate, 0.0, 8.0, (64, 64))
    assert len(pictures) == count and len(used) == count  # sixteen pictures, none held
    assert np.allclose(np.diff(used), 1 / rate, atol=0.041), np.diff(used)  # 1/8 s apart, at 25 fps


def test_a_clip_whose_frames_cannot_be_decoded_is_left_out_with_a_line(tmp_path):
    """A shot whose frames could not be decoded again ended stage 06 as a bug, with nothing of
    the dataset written: now that clip alone is left out, named in a warning."""
    from clips import write_clip

    from diffusion_bunny.stages.export.stage import write_clips

    movie = tmp_path / "film.mp4"
    write_clip(movie, [(5, 50, 1.0)])  # 2 s at 25 fps
    shots = pl.DataFrame({"shot_id": [0, 1], "start_s": [0.0, 2.0], "end_s": [2.0, 4.0]})
    row = {"frames": 9, "width": 64, "height": 64, "characters": [], "caption": "a shot"}
    box = {"crop_left": 0, "crop_top": 0, "crop_right": 320, "crop_bottom": 180}
    clips = pl.DataFrame(
        [
            {"clip_id": "shot00000", "shot_id": 0, "start_s": 0.2, "end_s": 1.2, **row, **box},
            {
                "clip_id": "shot00001",
                "shot_id": 1,
                "start_s": 2.2,
                "end_s": 3.2,
                **row,
                **box,
            },  # past the end
        ],
        schema=CLIP_SCHEMA,
    )
    warnings: list[str] = []
    kept = write_clips(movie, shots, clips, tmp_path / "out", 8.0, warnings)
    assert kept["clip_id"].to_list() == ["shot00000"]
    assert sorted(p.name for p in (tmp_path / "out" / "video").iterdir()) == [
        "shot00000.mp4",
        "shot00000.txt",
    ]
    assert len(warnings) == 1 and warnings[0].startswith("1 clip(s) left out") and "shot00001" in warnings[0]


def test_no_clip_writes_no_video_dataset_file(tmp_path):
    """With no clip made (every shot shorter than a clip), the two trainers' dataset files were
    still written, naming an empty folder: diffusion-pipe stops on it ("had no images/videos")."""
    from clips import write_clip

    from diffusion_bunny.stages.export.stage import _write_video

    movie = tmp_path / "film.mp4"
    write_clip(movie, [(5, 25, 1.0)])
    shots = pl.DataFrame({"shot_id": [0], "start_s": [0.0], "end_s": [1.0]})
    staging = tmp_path / "staging"
    staging.mkdir()
    warnings: list[str] = []
    cfg = ExportSettings(video_clips=True)
    kept = _write_video(tmp_path, staging, movie, shots, pl.DataFrame(schema=CLIP_SCHEMA), cfg, warnings)
    assert kept.is_empty() and not list(staging.glob("*.toml"))
    assert len(warnings) == 1 and "no clip was made, so no video dataset file" in warnings[0]


def test_real_clip_is_cut_inside_the_shot_resampled_and_encoded(hamilton, tmp_path):
    """Hamilton: shots begin at frames 20, 82, 211 (29.97 fps). A 16 fps, 33-frame clip of the shot
    82-210 lies inside it: the frames before the cut (81) and after it (211) differ more from the
    clip's first and last frames than the shot's own first and last frames do."""
    import av

    fps = 30000 / 1001
    start, end = 82 / fps, 211 / fps
    t0, _ = clip_span(start, end, fps, 16.0, 33)
    images = decode_clip(hamilton, t0, 33, 16.0, start, end, (320, 176))
    info = clip_frames_rgb(encode_mp4(tmp_path / "c.mp4", images, 16.0))
    assert (info["frames"], info["fps"], info["width"], info["height"], info["codec"]) == (
        33,
        16.0,
        320,
        176,
        "h264",
    )
    with av.open(str(hamilton)) as c:
        frames = [f.to_image() for i, f in enumerate(c.decode(video=0)) if i in (81, 82, 210, 211)]

    def dist(a, b):
        return float(
            np.abs(np.asarray(cover_crop(a, (320, 176)), np.float32) - np.asarray(b, np.float32)).mean()
        )

    assert dist(frames[1], images[0]) < dist(frames[0], images[0])
    assert dist(frames[2], images[-1]) < dist(frames[3], images[-1])
    # A whole shot's length at the movie's own rate: every frame is the shot's, none from the next.
    whole = decode_clip(hamilton, start, 129, fps, start, end, (320, 176))
    assert dist(frames[2], whole[-1]) < 1.0


def test_demo_export_writes_clips_inside_shots(scenes_demo_run, tmp_path):
    """The demo through stage 06 with clips on: every clip file has the planned frames, fps and
    size, lies inside its shot, has a caption file, and the two trainer configs point at them."""
    run, overrides = scenes_demo_run
    shutil.copytree(run.run_dir, tmp_path / "run")
    run = Run.open(tmp_path / "run")
    kept = run.read_table("quality").filter(pl.col("keep"))["frame_id"].to_list()
    from test_export import add_captions

    add_captions(run)
    over = {
        **overrides,
        "export.video_clips": True,
        "export.clip_frames": 17,
        "export.clip_width": 256,
        "export.clip_height": 144,
    }
    cfg = load_config(None, over, root=tmp_path / "noconfig")
    run_stage(run, "export", cfg, progress=False)
    assert kept
    clips = run.read_table("clips")
    shots = run.read_table("shots")
    assert clips.height > 0
    video = dataset_dir(run.run_dir) / "video"
    for clip in clips.iter_rows(named=True):
        shot = shots.filter(pl.col("shot_id") == clip["shot_id"]).row(0, named=True)
        assert shot["start_s"] <= clip["start_s"] and clip["start_s"] + 16 / 16 < shot["end_s"]
        info = clip_frames_rgb(video / f"{clip['clip_id']}.mp4")
        assert (info["frames"], info["fps"], info["width"], info["height"]) == (17, 16.0, 256, 144)
        assert (video / f"{clip['clip_id']}.txt").read_text().strip() == clip["caption"]
        assert clip["characters"]
    for name in ("musubi_dataset.toml", "diffusion_pipe_dataset.toml"):
        assert str(video) in (dataset_dir(run.run_dir) / name).read_text()
    # musubi's latent cache outside dataset/, which each export replaces whole (it was removed).
    musubi = tomllib.loads((dataset_dir(run.run_dir) / "musubi_dataset.toml").read_text())
    assert musubi["datasets"][0]["cache_directory"] == str(run.run_dir / "cache" / "musubi")
    # Only the training pictures' shots give clips: a validation shot was trained on as video.
    items = run.read_table("dataset_items")
    held_out = set(items.filter(pl.col("split") == "validation")["shot_id"]) - set(
        items.filter(pl.col("split") == "train")["shot_id"]
    )
    assert not held_out & set(clips["shot_id"])
    strip = clip_strips(video, clips)
    assert strip is not None and strip.height >= 96

    # The run folder moved: the export stays up to date (nothing exported again), and its README
    # and trainer files name the dataset where it is now (they named the old folder: a musubi
    # training from a copy cached into the other run).
    old_root = dataset_dir(run.run_dir)
    run = Run.open(shutil.move(run.run_dir, tmp_path / "moved"))
    root = dataset_dir(run.run_dir)
    started = run.read_manifest("export")["started"]
    assert stage_state(run, "export", cfg) == ("done", "up to date")
    run_stage(run, "export", cfg, progress=False)
    manifest = run.read_manifest("export")
    assert manifest["started"] == started and manifest["facts"]["dataset_folder"] == str(root)
    for name in ("musubi_dataset.toml", "diffusion_pipe_dataset.toml", "README.md"):
        text = (root / name).read_text()
        assert str(root) in text and str(old_root) not in text, name
    assert f"data_dir={str(root / 'hf')!r}" in (root / "README.md").read_text()
    assert stage_state(run, "export", cfg) == ("done", "up to date")
    assert summary(run, "export").endswith(f") in {root}")
    # Copied again and run by bunny run, which skips an up-to-date stage before run_stage could
    # rewrite them: the copy's trainer files named the folder it was copied from.
    from diffusion_bunny.pipeline.runner import RunOptions, run_movie
    from diffusion_bunny.stages import PIPELINE

    copy = Run.open(shutil.copytree(run.run_dir, tmp_path / "copied"))
    options = RunOptions(PIPELINE, cfg, stages=("export",), overrides=over, progress=False)
    report = run_movie(copy.movie, copy.run_dir, options)
    assert report.error is None and [s.status for s in report.stages] == ["skipped"]
    new_root = dataset_dir(copy.run_dir)
    for name in ("musubi_dataset.toml", "diffusion_pipe_dataset.toml", "README.md"):
        text = (new_root / name).read_text()
        assert str(new_root) in text and str(root) not in text, name
    assert copy.read_manifest("export")["facts"]["dataset_folder"] == str(new_root)


def test_a_clip_without_full_pictures_is_captioned_as_its_frame_and_an_exact_shot_gives_one():
    """With ``export.crops: [face]`` a clip took a face crop's caption ("close-up") for a clip
    that shows the whole frame; a shot exactly a clip long (times stored to the microsecond)
    was a rounding error short."""
    assert clip_span(20.541667, 22.583333, 24.0, 16.0, 33) is not None  # frames 493-541 at 24 fps
    shots = pl.DataFrame({"shot_id": [0], "start_s": [0.0], "end_s": [4.0]})
    items = pl.DataFrame(
        {
            "shot_id": [0],
            "frame_id": ["m_0000010"],
            "frame_index": [10],
            "crop": ["face"],
            "characters": [["bob"]],
            "text": ["bs, bob, close-up"],
            "left": [900],
            "top": [300],
            "right": [1100],
            "bottom": [500],
        }
    )
    captions = {"m_0000010": "bs, bob, medium shot, a stage"}
    clips, _ = plan_clips(shots, items, 25.0, 16.0, 33, (320, 192), captions)
    assert clips["caption"].to_list() == ["bs, bob, medium shot, a stage"]


def test_clips_are_deinterlaced_as_stage_01_recorded_its_frames():
    """Stage 06 cut its clips after asking the film's pictures (``idet``) again: it takes stage
    01's recorded decision now, and the setting only where stage 01 recorded none."""
    from types import SimpleNamespace

    from diffusion_bunny.stages.export.stage import deinterlaced

    def run(manifest):
        return SimpleNamespace(read_manifest=lambda stage: manifest if stage == "extract" else None)

    assert deinterlaced(run({"facts": {"deinterlaced": True}}), "auto") is True
    assert deinterlaced(run({"facts": {"deinterlaced": False}}), "on") is False
    assert deinterlaced(run(None), "auto") is None and deinterlaced(run({"facts": []}), "on") is True
    assert deinterlaced(run({"facts": {"deinterlaced": "yes"}}), "off") is False  # edited by hand
