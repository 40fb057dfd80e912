"""Headless runs through the CLI and papermill: skip-on-rerun, --force, folders, bad input."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
from pathlib import Path

import nbformat
import polars as pl
import pytest
from clips import write_clip
from paths import ROOT, STAGE_ORDER

from diffusion_bunny import logs
from diffusion_bunny.cli import main
from diffusion_bunny.config import load_config
from diffusion_bunny.errors import BadInputError, UserError
from diffusion_bunny.pipeline.run import Run, movie_id
from diffusion_bunny.pipeline.runner import (
    RunOptions,
    StageKernel,
    execute_stage_notebook,
    find_movies,
    overrides_from_args,
    parse_stages,
)
from diffusion_bunny.stages import PIPELINE, run_stage, stage_state


def finished(run_dir) -> str:
    return json.loads((run_dir / "manifests" / "extract.json").read_text())["finished"]


def test_run_skip_force_and_config_change(cut_clip, tmp_path, capsys, monkeypatch):
    path, cuts = cut_clip
    starts: list[int] = []  # kernels started ahead of the first notebook
    start = StageKernel.start
    monkeypatch.setattr(StageKernel, "start", lambda self, *a: (starts.append(1), start(self, *a))[1])
    out = tmp_path / "run"
    assert main(["run", str(path), "--out", str(out), "--stages", "extract", "--quiet"]) == 0
    shots = pl.read_parquet(out / "tables" / "shots.parquet")
    assert shots["start_frame"].to_list()[1:] == cuts
    nb = nbformat.read(out / "notebooks" / "01_extract_frames.ipynb", as_version=4)
    assert nb.metadata["papermill"]["parameters"]["run_dir"] == str(out.resolve())
    assert any(c.get("outputs") for c in nb.cells if c.cell_type == "code")
    manifest = json.loads((out / "manifests" / "extract.json").read_text())
    assert manifest["counts"]["shots"] == 4 and manifest["facts"]["detector"] == "cascade"
    first = finished(out)
    capsys.readouterr()

    assert main(["run", str(path), "--out", str(out), "--stages", "extract", "--quiet"]) == 0
    # --quiet: what ran and why is in the command's log file, not on the terminal.
    assert capsys.readouterr().err == ""
    assert "extract is up to date, skipped" in logs.last_path.read_text()
    assert finished(out) == first
    assert starts == [1]  # nothing to run: no kernel started for nothing

    assert main(["run", str(path), "--out", str(out), "--stages", "extract", "--force", "--quiet"]) == 0
    second = finished(out)
    assert second != first
    assert starts == [1, 1]

    args = ["run", str(path), "--out", str(out), "--set", "extract.motion_threshold=200", "--quiet"]
    args += ["--stages", "extract"]
    assert main(args) == 0
    assert "its config changed" in logs.last_path.read_text()
    assert pl.read_parquet(out / "tables" / "shots.parquet")["kind"].unique().to_list() == ["static"]
    assert len(list((out / "frames").glob("*.jpg"))) == 4


def test_folder_runs_every_movie_and_reports_bad_ones(tmp_path, capsys):
    folder = tmp_path / "movies"
    folder.mkdir()
    write_clip(folder / "a.mp4", [(11, 20, 0.0), (12, 20, 0.0)])
    write_clip(folder / "b.mkv", [(13, 20, 0.0), (14, 20, 2.0)], codec="libx264")
    (folder / "broken.avi").write_bytes(b"")
    (folder / "notes.txt").write_text("not a movie, not even looked at")
    out = tmp_path / "out"
    assert main(["run", str(folder), "--out", str(out), "--stages", "extract", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "broken.avi: the file is empty" in err and "1 of 3 movies failed" in err
    for name in ("a.mp4", "b.mkv"):
        run_dir = out / movie_id(folder / name)
        assert pl.read_parquet(run_dir / "tables" / "shots.parquet").height == 2
    assert not (out / movie_id(folder / "broken.avi")).exists()


def test_a_movie_with_the_longest_name_a_file_may_have_gets_a_run_folder(tmp_path):
    """A file name may be 255 bytes; its slug with ``-`` and the key was 260, and ``bunny run``
    stopped with "bug: File name too long". A name that fitted keeps its run folder."""
    folder = tmp_path / "movies"
    folder.mkdir()
    movie = folder / ("y" * 251 + ".mp4")
    write_clip(movie, [(11, 20, 0.0), (12, 20, 0.0)])
    assert len(movie_id(movie)) == 255 and movie_id(movie).startswith("y" * 246 + "-")
    assert main(["run", str(folder), "--out", str(tmp_path / "out"), "--stages", "extract", "--quiet"]) == 0
    assert (tmp_path / "out" / movie_id(movie) / "tables" / "shots.parquet").is_file()
    short = folder / ("z" * 246 + ".mp4")
    write_clip(short, [(11, 20, 0.0)])
    assert movie_id(short) == "z" * 246 + "-" + movie_id(short)[-8:]


def test_a_copy_of_a_movie_in_the_folder_is_run_once(tmp_path, capsys):
    """``a (1).mp4`` beside ``a.mp4`` (a second download): one run folder, not the same frames
    twice in the folder's datasets; a movie that only starts the same is still run."""
    import shutil

    folder = tmp_path / "movies"
    folder.mkdir()
    write_clip(folder / "a.mp4", [(11, 20, 0.0), (12, 20, 0.0)])
    shutil.copy(folder / "a.mp4", folder / "a (1).mp4")
    write_clip(folder / "b.mp4", [(11, 20, 0.0), (12, 24, 0.0)])
    (folder / "empty1.mp4").write_bytes(b"")
    (folder / "empty2.mp4").write_bytes(b"")
    out = tmp_path / "out"
    assert main(["run", str(folder), "--out", str(out), "--stages", "extract"]) == 2
    err = capsys.readouterr().err
    assert "a (1).mp4: the same file as a.mp4" in err
    assert "empty1.mp4: the file is empty" in err and "empty2.mp4: the file is empty" in err
    made = sorted(p.name for p in out.iterdir() if p.is_dir() and p.name not in ("report", ".locks"))
    assert made == sorted([movie_id(folder / "a.mp4"), movie_id(folder / "b.mp4")])
    # Of one name in two folders, the folders are said: "a.mp4: the same file as a.mp4" did not
    # say which one runs.
    from diffusion_bunny.pipeline.runner import drop_copies

    (tmp_path / "backup").mkdir()
    shutil.copy(folder / "a.mp4", tmp_path / "backup" / "a.mp4")
    assert drop_copies([folder / "a.mp4", tmp_path / "backup" / "a.mp4"]) == [folder / "a.mp4"]
    assert f"{tmp_path / 'backup' / 'a.mp4'}: the same file as {folder / 'a.mp4'}" in capsys.readouterr().err


def test_several_movies_named_on_the_command_line_run_as_a_folder(tmp_path, capsys):
    """``bunny run *.mp4`` (the shell names each file): it stopped at "unrecognized arguments".
    Every movie gets a run folder under --out, a movie named twice or inside a named folder runs
    once, and ``bunny status`` takes the same words."""
    folder = tmp_path / "movies"
    (folder / "more").mkdir(parents=True)
    write_clip(folder / "a.mp4", [(11, 20, 0.0), (12, 20, 0.0)])
    write_clip(folder / "more" / "b.mp4", [(13, 20, 0.0), (14, 24, 0.0)])
    write_clip(folder / "c.mp4", [(15, 22, 0.0), (16, 20, 0.0)])
    out = tmp_path / "out"
    named = [str(folder / "a.mp4"), str(folder / "more"), str(folder / "a.mp4")]
    assert main(["run", *named, "--out", str(out), "--stages", "extract", "--quiet"]) == 0
    made = sorted(p.name for p in out.iterdir() if p.is_dir() and p.name not in ("report", ".locks"))
    assert made == sorted([movie_id(folder / "a.mp4"), movie_id(folder / "more" / "b.mp4")])
    assert (out / "report" / "index.html").is_file()  # the combined report, as for a folder
    capsys.readouterr()
    assert main(["status", str(folder / "a.mp4"), str(folder / "c.mp4"), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "a.mp4" in text and "c.mp4" in text and "b.mp4" not in text
    assert text.count("0 of") == 1  # c.mp4 has not run; a.mp4 has its extract done


def test_a_folder_setting_on_the_command_line_is_a_path_from_where_it_is_typed(tmp_path, monkeypatch):
    """``--set characters.reference_dir=refs`` typed beside ``refs/`` looked in the checkout
    (a settings file's relative paths start from the workspace); only folder settings move."""
    monkeypatch.chdir(tmp_path)
    got = overrides_from_args(
        [
            "characters.reference_dir=refs",
            "scenes.library_dir=../lib",
            "paths.output_dir=/data/out",
            "train.output_dir=null",
            "train.base_model=org/model",
            "captions.prompt=a/b",
        ]
    )
    assert got["characters.reference_dir"] == str(tmp_path / "refs")
    assert got["scenes.library_dir"] == str(tmp_path.parent / "lib")
    assert got["paths.output_dir"] == "/data/out" and got["train.output_dir"] is None
    assert got["train.base_model"] == "org/model" and got["captions.prompt"] == "a/b"
    # A model setting naming a folder that exists here is that folder (the stage kernels work in
    # notebook/, where models/sd then read as the hub id "models/sd"); a hub id stays one.
    (tmp_path / "models" / "sd").mkdir(parents=True)
    (tmp_path / "dino").mkdir()
    local = overrides_from_args(
        ["train.base_model=models/sd", "characters.hub.features=dino", "scenes.clip_model=openai/clip"]
    )
    assert local["train.base_model"] == str(tmp_path / "models" / "sd")
    assert local["characters.hub.features"] == str(tmp_path / "dino")
    assert local["scenes.clip_model"] == "openai/clip"


def test_a_movie_whose_name_is_not_utf8_is_one_line_and_the_folder_goes_on(tmp_path, capsys):
    """``caf\\xe9.mp4`` (a Latin-1 name from an old archive): it failed "with a bug" halfway
    and then the folder's combined report and ``bunny status`` crashed on its name."""
    folder = tmp_path / "movies"
    folder.mkdir()
    write_clip(folder / "a.mp4", [(11, 20, 0.0), (12, 20, 0.0)])
    latin = os.fsdecode(bytes(folder) + b"/caf\xe9.mp4")
    write_clip(Path(latin), [(13, 20, 0.0), (14, 24, 0.0)])
    out = tmp_path / "out"
    assert main(["run", str(folder), "--out", str(out), "--stages", "extract", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "caf\\xe9.mp4: the name of the movie is not UTF-8 text" in err and "rename it" in err
    assert "bug" not in err and "Logging error" not in err
    assert (out / movie_id(folder / "a.mp4") / "run.json").is_file()
    assert (out / "report" / "index.html").is_file()
    assert main(["status", str(folder), "--out", str(out)]) == 0
    assert "caf\\xe9.mp4" in capsys.readouterr().out


def test_a_web_address_is_named_as_one(tmp_path, capsys):
    """A pasted link read "https:/www.example.com/watch?v=x: no such file or folder"."""
    url = "https://www.example.com/watch?v=x"
    assert main(["run", url, "--out", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"{url} is a web address" in err and "download the movie first" in err
    assert err.count("\n") == 1
    assert main(["status", url]) == 2 and "is a web address" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: None, "no such file or folder"),
        (lambda p: p.write_bytes(b""), "the file is empty"),
        (lambda p: p.write_text("not a movie"), "not a video FFmpeg can read"),
    ],
)
def test_cli_bad_input_one_line_exit_2(tmp_path, capsys, make, message):
    movie = tmp_path / "film.mp4"
    make(movie)
    out = tmp_path / "run"
    assert main(["run", str(movie), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert f"(log: {logs.last_path})" in err  # the line names the command's log file
    assert not out.exists()


def test_user_error_inside_the_kernel_comes_back_as_one_line(cut_clip, tmp_path):
    src, _ = cut_clip
    movie = tmp_path / "gone.mp4"
    shutil.copy(src, movie)
    run = Run.create(tmp_path / "run", movie)
    movie.unlink()
    with pytest.raises(UserError, match=r"gone.mp4: no such file; check the path"):
        execute_stage_notebook(
            run, "extract", RunOptions(PIPELINE, load_config(None, {}), progress=False), "python3"
        )
    assert not run.has_table("shots")


def test_a_bug_inside_the_kernel_is_one_line_and_its_traceback_is_in_the_log(cut_clip, tmp_path, monkeypatch):
    """A bug in a stage's notebook comes back as one line naming the executed
    notebook, and the command's log file gets the kernel's own traceback (where it broke),
    without IPython's terminal colours."""
    from diffusion_bunny.pipeline import runner

    path, _ = cut_clip
    folder = tmp_path / "notebooks"
    folder.mkdir()
    nb = nbformat.read(ROOT / "notebook" / "01_extract_frames.ipynb", as_version=4)
    nb.cells.insert(2, nbformat.v4.new_code_cell("def broken_helper():\n    return 1 / 0\n\nbroken_helper()"))
    nbformat.write(nb, folder / "01_extract_frames.ipynb")
    monkeypatch.setattr(runner, "notebook_dir", lambda: folder)
    log_file = logs.start_cli_log(folder=tmp_path / "log")
    try:
        run = Run.create(tmp_path / "run", path)
        with pytest.raises(RuntimeError) as err:
            execute_stage_notebook(
                run, "extract", RunOptions(PIPELINE, load_config(None, {}), progress=False), "python3"
            )
    finally:
        logs.stop_cli_log()
    message = str(err.value)
    assert "\n" not in message and "ZeroDivisionError" in message
    assert str(run.notebooks_dir / "01_extract_frames.ipynb") in message
    text = log_file.read_text()
    assert "stage extract: the kernel's traceback:" in text
    assert "broken_helper" in text and "ZeroDivisionError" in text and "\x1b[" not in text


def test_an_executed_notebook_cut_off_by_a_full_disk_leaves_the_one_before(cut_clip, tmp_path, monkeypatch):
    """papermill wrote the executed notebook in place: a full disk left a cut-off file beside a
    stage that counted as done, which JupyterLab could not open and no rerun repaired."""
    import errno

    from diffusion_bunny.pipeline import runner

    run = Run.create(tmp_path / "run", cut_clip[0])
    target = run.notebooks_dir / "01_extract_frames.ipynb"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(ROOT / "notebook" / "01_extract_frames.ipynb", target)
    before = target.read_bytes()

    def full_disk(papermill, source, output, *args):
        Path(output).write_text('{"cells": [{"cell_type": "code", "source": "ab')
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(runner, "_papermill", full_disk)
    with pytest.raises(OSError) as err:
        execute_stage_notebook(
            run, "extract", RunOptions(PIPELINE, load_config(None, {}), progress=False), "python3"
        )
    assert err.value.filename == str(target)  # the notebook's own name, not the temporary one
    assert target.read_bytes() == before and sorted(p.name for p in target.parent.iterdir()) == [target.name]


@pytest.mark.parametrize("raised", [KeyboardInterrupt, RuntimeError])
def test_an_interrupted_notebook_on_a_nearly_full_disk_stays_interrupted(
    cut_clip, tmp_path, monkeypatch, raised
):
    """The executed notebook's temporary file once enclosed the whole papermill run in the
    atomic write, which takes an error other than the OS's on a disk under 1 MiB free for a full
    disk's: Ctrl-C, a stop or a kernel's death read "No space left on device"."""
    from diffusion_bunny.pipeline import atomic, runner

    def interrupted(*args):
        raise raised("stopped")

    monkeypatch.setattr(runner, "_papermill", interrupted)
    monkeypatch.setattr(atomic, "free_bytes", lambda path: 512 * 1024)
    run = Run.create(tmp_path / "run", cut_clip[0])
    with pytest.raises(raised, match="stopped"):
        execute_stage_notebook(
            run, "extract", RunOptions(PIPELINE, load_config(None, {}), progress=False), "python3"
        )
    assert list(run.notebooks_dir.iterdir()) == []


def test_a_notebook_whose_kernel_was_killed_leaves_the_one_before(cut_clip, tmp_path, monkeypatch):
    """A kernel killed outright (the out-of-memory killer) left the blank template in place of the
    executed notebook (papermill saves nothing then), beside a stage that may have finished."""
    from diffusion_bunny.pipeline import runner

    folder = tmp_path / "notebooks"
    folder.mkdir()
    nb = nbformat.read(ROOT / "notebook" / "01_extract_frames.ipynb", as_version=4)
    killer = "import os, signal\nprint('got this far', flush=True)\nos.kill(os.getpid(), signal.SIGKILL)"
    nb.cells.insert(2, nbformat.v4.new_code_cell(killer))
    nbformat.write(nb, folder / "01_extract_frames.ipynb")
    monkeypatch.setattr(runner, "notebook_dir", lambda: folder)
    run = Run.create(tmp_path / "run", cut_clip[0])
    target = run.notebooks_dir / "01_extract_frames.ipynb"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("the notebook of the run before")
    with pytest.raises(Exception, match=r"stage extract: the notebook's kernel died") as err:
        execute_stage_notebook(
            run, "extract", RunOptions(PIPELINE, load_config(None, {}), progress=False), "python3"
        )
    assert "\n" not in str(err.value)
    assert target.read_text() == "the notebook of the run before"
    assert [p.name for p in run.notebooks_dir.iterdir()] == [target.name]


def test_stage_callable_without_papermill(cut_clip, tmp_path):
    path, _ = cut_clip
    cfg = load_config()
    run = Run.create(tmp_path / "run", path)
    assert stage_state(run, "extract", cfg) == ("missing", "never ran")
    tables = run_stage(run, "extract", cfg, progress=False)
    assert set(tables) == {"shots", "frames", "keyframe_candidates", "boundary_candidates"}
    assert stage_state(run, "extract", cfg)[0] == "done"
    assert stage_state(run, "extract", load_config(None, ["extract.detector=adaptive"]))[0] == "stale"
    run.table_path("frames").unlink()
    assert stage_state(run, "extract", cfg) == ("missing", "table frames is gone")


def test_find_movies_and_stage_lists(tmp_path, caplog):
    cfg = load_config()
    with pytest.raises(UserError, match=r"holds no video file \(looked for [^)]*\)$"):
        find_movies(tmp_path, cfg)
    # A season in folders of its own: the line says which sub-folders hold videos.
    for episode in ("ep1", "ep2"):
        (tmp_path / episode).mkdir()
        (tmp_path / episode / "episode.MKV").write_bytes(b"")
    (tmp_path / "extras").mkdir()
    with pytest.raises(UserError, match=r"not searched, and 2 of them hold videos \(ep1, ep2\)"):
        find_movies(tmp_path, cfg)
    # A folder of frames (an animation exported as pictures): how to make it a movie
    frames = tmp_path / "render"
    frames.mkdir()
    for i in range(3):
        (frames / f"shot_{i:04d}.PNG").write_bytes(b"")
    with pytest.raises(UserError, match=r"holds 3 pictures: a picture sequence .* -i '\*\.PNG'"):
        find_movies(frames, cfg)
    dvd = tmp_path / "VIDEO_TS"
    dvd.mkdir()
    for name in ("VIDEO_TS.VOB", "VTS_01_0.VOB", "VTS_01_1.VOB", "VTS_01_2.VOB", "VTS_01_0.IFO"):
        (dvd / name).write_bytes(b"")
    with pytest.raises(UserError, match=r"a DVD's VIDEO_TS folder \(4 VTS files\): join one title's pieces"):
        find_movies(dvd, cfg)
    # A Blu-ray's streams and a camcorder's clips are movies too ("the folder holds no video file")
    disc = tmp_path / "BDMV"
    disc.mkdir()
    for name in ("00001.m2ts", "CLIP0001.MTS", "phone.3gp", "notes.txt"):
        (disc / name).write_bytes(b"")
    assert [p.name for p in find_movies(disc, cfg)] == ["00001.m2ts", "CLIP0001.MTS", "phone.3gp"]
    # One file typed two ways is one movie, in the order first typed (it was "the same file as
    # phone.3gp" of itself)
    twice = [disc / "phone.3gp", disc, disc / ".." / "BDMV" / "phone.3gp"]
    assert find_movies(twice, cfg) == [disc / "phone.3gp", disc / "00001.m2ts", disc / "CLIP0001.MTS"]
    # A shell's DIR/* runs as the folder would: subtitles, a poster and a folder without videos
    # are passed over in one line (the folder stopped the command; each file was a failed movie).
    show = tmp_path / "show"
    (show / "extras").mkdir(parents=True)
    for name in ("film.mkv", "film.srt", "poster.jpg"):
        (show / name).write_bytes(b"")
    given = sorted(show.iterdir())
    with caplog.at_level("INFO", logger="diffusion_bunny.pipeline.runner"):
        assert find_movies(given, cfg) == [show / "film.mkv"]
    (line,) = [r.getMessage() for r in caplog.records if "passed over" in r.getMessage()]
    assert line.startswith("3 of the 4 targets passed over: film.srt (not a video by its name), poster.jpg")
    assert "extras/ (no video in it)" in line
    # Files named otherwise alone are taken as typed; folders alone without videos are one line.
    assert find_movies([show / "film.srt", show / "poster.jpg"], cfg) == [
        show / "film.srt",
        show / "poster.jpg",
    ]
    with pytest.raises(BadInputError, match=r"none of the 2 targets holds a video file \(extras/ \(no video"):
        find_movies([show / "extras", show / "extras"], cfg)
    assert parse_stages(PIPELINE, None) == list(STAGE_ORDER)
    assert parse_stages(PIPELINE, "extract") == ["extract"]
    assert parse_stages(PIPELINE, "quality, extract") == ["extract", "quality"]
    with pytest.raises(UserError, match="--stages is empty"):
        parse_stages(PIPELINE, " , ")
    # By the notebooks' numbers, and spans, as the workspace's messages speak of stages
    assert parse_stages(PIPELINE, "01,02") == ["extract", "quality"]
    assert parse_stages(PIPELINE, "1-3") == ["extract", "quality", "characters"]
    assert parse_stages(PIPELINE, "extract-characters, 9") == ["extract", "quality", "characters", "report"]
    assert parse_stages(PIPELINE, "07") == ["train"]
    for bad, message in (("10", "unknown stage '10'"), ("0", "unknown stage '0'"), ("3-1", "comes after")):
        with pytest.raises(UserError, match=message):
            parse_stages(PIPELINE, bad)
    with pytest.raises(UserError, match=r"unknown stage 'extrct' \(available: extract, .*numbers 1-9"):
        parse_stages(PIPELINE, "extrct")


def test_cli_runs_extract_and_quality_and_reruns_only_what_changed(cut_clip, tmp_path, capsys):
    path, _ = cut_clip
    out = tmp_path / "run"
    args = ["run", str(path), "--out", str(out), "--stages", "extract,quality", "--quiet"]
    assert main(args) == 0
    quality = pl.read_parquet(out / "tables" / "quality.parquet")
    frames = pl.read_parquet(out / "tables" / "frames.parquet")
    assert quality["frame_id"].to_list() == frames["frame_id"].to_list()
    assert quality["readable"].all() and quality["sharpness"].min() > 0
    manifest = json.loads((out / "manifests" / "quality.json").read_text())
    assert manifest["inputs"]["frames"]["table"] == "frames"
    nb = nbformat.read(out / "notebooks" / "02_filter_quality.ipynb", as_version=4)
    assert nb.metadata["papermill"]["parameters"]["interactive"] is False
    # Both notebooks ran in one kernel, reset in between: stage 02's executed copy counts from 1.
    text = logs.last_path.read_text()
    assert "extract notebook took" in text and "quality notebook took" in text
    assert "(kernel of the earlier stage, reset)" in text.split("quality notebook took")[1].splitlines()[0]
    counts = [c.execution_count for c in nb.cells if c.cell_type == "code"]
    assert counts == list(range(1, len(counts) + 1))
    capsys.readouterr()
    # A quality threshold moves: extract is skipped, quality reruns and applies it.
    # (The clip's static shots are flat colour fields: blurry at any positive threshold.)
    assert main([*args, "--set", "quality.min_sharpness=0", "--set", "quality.dup_distance=64"]) == 0
    # --quiet: nothing but errors on the terminal; what ran and why is in the command's log file,
    # with the records of the stage notebook's kernel (another process) appended to it.
    assert capsys.readouterr().err == ""
    log_file = logs.last_path
    assert log_file.parent == Path(os.environ["DIFFUSION_BUNNY_LOG_DIR"])
    text = log_file.read_text()
    assert "extract is up to date, skipped" in text
    assert "quality (its config changed: quality.dup_distance " in text
    kernel_lines = [line for line in text.splitlines() if "diffusion_bunny.pipeline.contract" in line]
    assert any(": quality starts (" in line and "config " in line for line in kernel_lines)
    assert any(": quality done in " in line for line in kernel_lines)
    assert "exit status 0 after" in text
    quality = pl.read_parquet(out / "tables" / "quality.parquet")
    assert quality["keep"].sum() == 1 and set(quality["reject_reason"].drop_nulls()) == {"duplicate"}


def _execute_interactive(notebook: str, run: Run, tmp_path: Path) -> nbformat.NotebookNode:
    """Run a stage notebook in a kernel as JupyterLab would (interactive=True, widgets built)."""
    import papermill

    return papermill.execute_notebook(
        str(ROOT / "notebook" / notebook),
        str(tmp_path / "nb.ipynb"),
        parameters={"run_dir": str(run.run_dir), "interactive": True},
        kernel_name="python3",
        progress_bar=False,
        execution_timeout=120,
        cwd=str(ROOT / "notebook"),
    )


def _widget_views(nb: nbformat.NotebookNode) -> list[dict]:
    last = nb.cells[-1]
    return [o for o in last.outputs if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]


def _copy_of(run: Run, tmp_path: Path, drop: tuple[str, ...] = ()) -> Run:
    """A copy of a shared run folder (conftest's ``demo_run``: the demo through stages 01-02),
    without the tables and manifests of the stages in ``drop``, so that the test runs them."""
    shutil.copytree(run.run_dir, tmp_path / "run")
    for stage in drop:
        spec = PIPELINE.get(stage)
        for table in spec.writes:
            (tmp_path / "run" / "tables" / f"{table}.parquet").unlink()
        (tmp_path / "run" / "manifests" / f"{stage}.json").unlink()
    return Run.open(tmp_path / "run")


def test_notebook_02_interactive_path_runs_headless(demo_run, tmp_path):
    """Notebook 02's slider cell, as JupyterLab runs it, runs in a kernel."""
    run = _copy_of(demo_run, tmp_path, drop=("quality",))
    assert not run.has_table("quality")
    nb = _execute_interactive("02_filter_quality.ipynb", run, tmp_path)
    assert run.has_table("quality")
    assert len(_widget_views(nb)) == 1


def test_notebook_03_interactive_path_runs_headless(demo_run, tmp_path):
    """Notebook 03's widgets, as JupyterLab builds them, run in a kernel (no references: the two
    demo people and the drawn girl's and the dog's faces, which the face detector finds too, come
    out as four clusters to name; the fixer shows the appearances)."""
    run = _copy_of(demo_run, tmp_path)
    assert not run.has_table("faces")
    nb = _execute_interactive("03_detect_characters.ipynb", run, tmp_path)
    assert run.read_table("faces")["cluster"].n_unique() == 4
    assert len(_widget_views(nb)) == 1
    fixer = next(c for c in nb.cells if c.cell_type == "code" and "AppearanceFixer(run, cfg)" in c.source)
    assert sum("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in fixer.outputs) == 1


def test_notebooks_show_pictures_as_one_jpeg_and_transparent_ones_as_png():
    from IPython.core.formatters import DisplayFormatter
    from PIL import Image

    from diffusion_bunny.nbtools import show_pictures_as_jpeg

    sheet = Image.new("RGB", (320, 180), "#4C78A8")
    sprite = Image.new("RGBA", (64, 64), (255, 0, 0, 128))
    plain = DisplayFormatter()
    assert {"image/png", "image/jpeg"} <= set(plain.format(sheet)[0])  # Pillow offers both
    shell = type("Shell", (), {"display_formatter": DisplayFormatter()})()
    assert show_pictures_as_jpeg(shell)
    shown = shell.display_formatter.format(sheet)[0]
    assert "image/png" not in shown and shown["image/jpeg"][:2] == b"\xff\xd8"
    assert Image.open(io.BytesIO(shown["image/jpeg"])).size == (320, 180)
    # JPEG holds no transparency: a sprite is still shown, as PNG.
    shown = shell.display_formatter.format(sprite)[0]
    assert "image/jpeg" not in shown and shown["image/png"][:4] == b"\x89PNG"
    # Outside a notebook there is no shell to tell.
    assert not show_pictures_as_jpeg(object())


def test_notebooks_say_a_stage_warning_once(monkeypatch, tmp_path):
    """A stage's warnings reached a notebook twice: printed from the manifest by the stage cell
    (so they are said when the stage is up to date too) and as Python's UserWarning on stderr.
    In a notebook, ``open_run`` leaves the second out; other warnings stay."""
    import warnings

    from diffusion_bunny import nbtools
    from diffusion_bunny.errors import StageWarning

    monkeypatch.setattr(nbtools, "show_pictures_as_jpeg", lambda: True)  # as in a notebook
    monkeypatch.setattr(nbtools.Run, "open", staticmethod(lambda folder: folder))
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        assert nbtools.open_run(tmp_path, None, None) == tmp_path
        stale, restored = "stage double read a table that is out of date", "feedback.parquet was restored"
        warnings.warn(stale, StageWarning, stacklevel=1)
        warnings.warn(restored, UserWarning, stacklevel=1)
    assert [str(w.message) for w in said] == [restored]
    for name in ("03_detect_characters", "09_qa_report"):  # each stage cell prints them
        nb = nbformat.read(ROOT / "notebook" / f"{name}.ipynb", as_version=4)
        cell = next(c.source for c in nb.cells if c.cell_type == "code" and "run_stage(" in c.source)
        assert '["warnings"]:\n    print("WARNING:", warning)' in cell, name


def test_notebooks_show_a_chart_whole():
    """plotnine's own display cut what reached past the figure's edge (notebook 05's title read
    "3 frames captioned (0 failed)" for "8 of 8 frames captioned"): a chart is shown trimmed to
    what is drawn, as the report saves it, at twice its size for high-density screens."""
    import pandas as pd
    import plotnine as p9
    from IPython.core.formatters import DisplayFormatter
    from PIL import Image

    from diffusion_bunny.nbtools import show_pictures_as_jpeg

    title = "8 of 8 frames captioned (0 failed), 3 by hand, 5 by the template, lengths in words"
    chart = (
        p9.ggplot(pd.DataFrame({"x": [1, 2], "y": [3, 4]}), p9.aes("x", "y"))
        + p9.geom_point()
        + p9.labs(title=title)
        + p9.theme(figure_size=(2, 1.5), plot_title=p9.element_text(ha="right"))
    )
    shell = type("Shell", (), {"display_formatter": DisplayFormatter()})()
    assert show_pictures_as_jpeg(shell)
    data, meta = shell.display_formatter.format(chart)
    width, height = Image.open(io.BytesIO(data["image/png"])).size
    assert width > 2 * 200 and meta["image/png"] == {"width": width // 2, "height": height // 2}


def test_open_run_for_notebooks(cut_clip, tmp_path):
    from diffusion_bunny.nbtools import open_run

    path, _ = cut_clip
    cfg = load_config()
    run = open_run(tmp_path / "r", path, cfg)
    assert run.movie == path.resolve() and (tmp_path / "r" / "run.json").is_file()
    assert open_run(tmp_path / "r", None, cfg).movie == path.resolve()
    with pytest.raises(UserError, match="is not a run folder"):
        open_run(tmp_path / "nothing", None, cfg)
    with pytest.raises(UserError, match="no such file"):
        open_run(None, tmp_path / "missing.mp4", cfg)


def test_a_notebook_and_the_command_take_the_home_folder_as_a_shell_does(cut_clip, tmp_path, monkeypatch):
    """A notebook's parameters are no shell: ``movie = "~/film.mp4"`` was "no such file" and a
    run folder "~/runs/film" was looked for under the working folder; so with ``--out=~/runs``."""
    from diffusion_bunny.nbtools import open_run

    path, _ = cut_clip
    home = tmp_path / "home"
    (home / "Movies").mkdir(parents=True)
    shutil.copy(path, home / "Movies" / "film.mp4")
    (home / "extra.yaml").write_text("extract:\n  jpeg_quality: 80\n")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    cfg = load_config("~/extra.yaml")
    assert cfg.extract.jpeg_quality == 80
    run = open_run("~/runs/film", "~/Movies/film.mp4", cfg)
    assert run.run_dir == (home / "runs" / "film").resolve() and run.movie == (home / "Movies" / "film.mp4")
    assert open_run("~/runs/film", None, cfg).run_dir == run.run_dir
    assert not (tmp_path / "~").exists()
    assert main(["run", "~/Movies/film.mp4", "--out=~/out", "--stages", "extract", "--quiet"]) == 0
    assert (home / "out" / "run.json").is_file() and not (tmp_path / "~").exists()


def test_a_folder_of_the_users_own_or_another_movies_run_is_refused_before_anything_is_written(
    cut_clip, tmp_path, capsys
):
    """A run replaces whole folders in its run folder (frames/, tables/, report/): --out naming
    a folder of the user's own (with a frames folder of theirs) or the run folder of another
    movie stops with one line, exit 2, and nothing there is touched. The same movie moved (same
    content) keeps its folder, and hidden entries (.DS_Store) do not count."""
    path, _ = cut_clip
    mine = tmp_path / "thesis"
    (mine / "frames").mkdir(parents=True)
    (mine / "frames" / "figure1.png").write_bytes(b"mine")
    (mine / "notes.txt").write_text("mine")
    before = sorted(p.relative_to(mine) for p in mine.rglob("*"))
    args = ["run", str(path), "--stages", "extract", "--quiet"]
    assert main([*args, "--out", str(mine)]) == 2
    err = capsys.readouterr().err
    assert f"{mine} already holds files and is no run folder (no run.json): frames, notes.txt" in err
    assert sorted(p.relative_to(mine) for p in mine.rglob("*")) == before  # not even a lock
    with pytest.raises(UserError, match="already holds files"):
        Run.create(mine, path)  # a notebook's open_run
    assert main([*args, "--out", str(mine / "notes.txt")]) == 2
    assert f"{mine / 'notes.txt'} is a file, not a folder" in capsys.readouterr().err
    films = tmp_path / "films"  # a folder run, --out a file
    films.mkdir()
    shutil.copy(path, films / "a.mp4")
    shutil.copy(path, films / "b.mp4")
    assert main(["run", str(films), "--stages", "extract", "--quiet", "--out", str(mine / "notes.txt")]) == 2
    assert "not a folder; give --out a folder for the movies' run folders" in capsys.readouterr().err
    assert (mine / "notes.txt").read_text() == "mine"

    run_dir = tmp_path / "run"
    (run_dir).mkdir()
    (run_dir / ".DS_Store").write_bytes(b"")
    assert main([*args, "--out", str(run_dir)]) == 0
    frames = sorted((run_dir / "frames").iterdir())
    moved = tmp_path / "elsewhere" / "renamed.mp4"
    moved.parent.mkdir()
    shutil.copy(path, moved)
    other = tmp_path / "other.mp4"
    write_clip(other, [(5, 30, 0.0)])
    capsys.readouterr()
    assert main(["run", str(other), "--stages", "extract", "--quiet", "--out", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert f"{run_dir} is the run folder of another movie ({path.name}); give --out a new folder" in err
    assert sorted((run_dir / "frames").iterdir()) == frames
    assert main(["run", str(moved), "--stages", "extract", "--quiet", "--out", str(run_dir)]) == 0
    assert Run.open(run_dir).movie == moved.resolve() and sorted((run_dir / "frames").iterdir()) == frames
    # The same path with new content (a new cut, a download cut short): said so, not "the run
    # folder of another movie (renamed.mp4)", the very file given.
    write_clip(moved, [(6, 30, 0.0)])
    assert main(["run", str(moved), "--stages", "extract", "--quiet", "--out", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert f"{run_dir} is the run folder of renamed.mp4 as it was: the file has changed since" in err
    assert sorted((run_dir / "frames").iterdir()) == frames


def test_notebook_01_interactive_path_runs_headless(cut_clip, tmp_path):
    """The slider cell, as JupyterLab runs it (interactive=True), runs in a kernel and its
    widget state is saved with the executed notebook."""
    path, _ = cut_clip
    run = Run.create(tmp_path / "run", path)
    run_stage(run, "extract", load_config(), progress=False)
    nb = _execute_interactive("01_extract_frames.ipynb", run, tmp_path)
    assert len(_widget_views(nb)) == 1
    assert "widgets" in json.dumps(nb.metadata)  # widget state saved with the notebook


def test_atomic_writes_get_the_umask_mode_not_mkstemps_0600(tmp_path):
    """Run outputs are readable like any file the user writes (mkstemp alone would make them 0600)."""
    import os
    import stat

    from diffusion_bunny.pipeline.atomic import atomic_write_bytes, atomic_write_parquet

    old = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "a.bin", b"x")
        atomic_write_parquet(tmp_path / "t.parquet", pl.DataFrame({"a": [1]}))
    finally:
        os.umask(old)
    for name in ("a.bin", "t.parquet"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644
    assert pl.read_parquet(tmp_path / "t.parquet")["a"].to_list() == [1]


def test_stage_timeouts_scale_with_the_movies_length():
    """A fixed day per stage let a hung stage on a two-minute clip sit for 24 h, and a Ray task
    nine days; ``auto`` scales both with the movie."""
    from diffusion_bunny.errors import ConfigError
    from diffusion_bunny.pipeline.engine import task_timeout
    from diffusion_bunny.pipeline.runner import stage_timeout

    cfg = load_config(None, {}, use_local=False)
    assert cfg.pipeline.stage_timeout_s == "auto"
    base, per_minute = cfg.pipeline.stage_timeout_base_s, cfg.pipeline.stage_timeout_per_minute_s
    assert stage_timeout(cfg, 120.0) == base + 2 * per_minute
    assert stage_timeout(cfg, 3 * 3600.0) == base + 180 * per_minute
    assert stage_timeout(cfg, None) == stage_timeout(cfg, 3 * 3600.0)  # a length that cannot be read
    nine = ["extract", "quality", "characters", "scenes", "captions", "export", "train", "generate", "report"]
    assert task_timeout(cfg, nine, 120.0) == base + 9 * 2 * per_minute < 86_400.0
    fixed = load_config(None, {"pipeline.stage_timeout_s": 100}, use_local=False)
    assert stage_timeout(fixed, 3 * 3600.0) == 100.0 and task_timeout(fixed, nine, 60.0) == 900.0
    unbounded = load_config(None, {"pipeline.stage_timeout_s": None}, use_local=False)
    assert stage_timeout(unbounded, 60.0) is None and task_timeout(unbounded, nine) is None
    ray_limit = load_config(None, {"engine.task_timeout_s": 50}, use_local=False)
    assert task_timeout(ray_limit, nine, 3 * 3600.0) == 50.0
    with pytest.raises(ConfigError, match=r"pipeline\.stage_timeout_s"):
        load_config(None, {"pipeline.stage_timeout_s": "sometimes"}, use_local=False)


def test_bunny_keeps_bytecode_where_the_environment_says_not_to(monkeypatch):
    """Where PYTHONDONTWRITEBYTECODE is set, ``bunny`` and the kernels it starts (they inherit its
    environment) still cache bytecode: otherwise every run compiles its libraries from source."""
    import os
    import sys

    from diffusion_bunny import cli

    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    cli._keep_bytecode()
    assert "PYTHONDONTWRITEBYTECODE" not in os.environ and sys.dont_write_bytecode is False


def test_a_user_error_whose_traceback_cannot_be_shown_still_comes_back_as_one_line(
    cut_clip, tmp_path, monkeypatch
):
    """A cell's error output can go missing (IPython failing to format the traceback, or the
    output arriving after nbclient stopped waiting on a loaded machine); the kernel's execute
    reply still names the error, and the runner reads it from there: a full disk stays a full
    disk, not a bare ``CellExecutionError`` taken for a bug."""
    from diffusion_bunny.pipeline import runner

    path, _ = cut_clip
    folder = tmp_path / "notebooks"
    folder.mkdir()
    nb = nbformat.read(ROOT / "notebook" / "01_extract_frames.ipynb", as_version=4)
    cell = (
        "from diffusion_bunny import errors\n\n"
        "class StorageError(errors.StorageError):\n"
        "    def _render_traceback_(self):  # IPython asks the exception to format itself\n"
        "        raise RuntimeError('cannot format')\n\n"
        "raise StorageError('could not write /films/run/frames/f.jpg: No space left on device')"
    )
    nb.cells.insert(2, nbformat.v4.new_code_cell(cell))
    nbformat.write(nb, folder / "01_extract_frames.ipynb")
    monkeypatch.setattr(runner, "notebook_dir", lambda: folder)
    run = Run.create(tmp_path / "run", path)
    with pytest.raises(Exception) as err:
        execute_stage_notebook(
            run, "extract", RunOptions(PIPELINE, load_config(None, {}), progress=False), "python3"
        )
    assert isinstance(err.value, UserError), repr(err.value)  # bunny: one line, exit status 2
    assert str(err.value).startswith("could not write /films/run/frames/f.jpg: No space left on device")
    executed = nbformat.read(run.notebooks_dir / "01_extract_frames.ipynb", as_version=4)
    shown = [o for c in executed.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert any(
        o.get("output_type") == "stream" and "Unexpected exception formatting" in o.get("text", "")
        for o in shown
    )


def _descendants(pid: int) -> list[int]:
    """The processes under ``pid``, from /proc (no psutil needed)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _running(pids: dict[int, str]) -> dict[int, str]:
    """Those of ``pids`` (pid: start time, as read from /proc) still running: not gone, not a
    zombie (an ended process its new parent has not reaped; in a container whose first process
    reaps nothing it stays), and not a new process that took a reused pid. Value: its command."""
    out = {}
    for pid, started in pids.items():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # gone
        if fields[0] != "Z" and fields[19] == started:
            out[pid] = command
    return out


def _start_times(pids: list[int]) -> dict[int, str]:
    out = {}
    for pid in pids:
        with contextlib.suppress(OSError):
            out[pid] = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    return out


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads processes from /proc (Linux)")
def test_sigterm_stops_a_run_like_ctrl_c_and_leaves_no_process_behind(cut_clip, tmp_path):
    """``kill``, ``timeout``, Slurm or a closed terminal send SIGTERM/SIGHUP: Python ended without
    running a ``finally``, so the stage kernel was never closed and stage 03's workers stayed
    for good. Now it is an interrupt: one line, exit 128 + the signal, no process left."""
    import signal
    import subprocess
    import sys
    import time

    code = "import sys; from diffusion_bunny.cli import main; sys.exit(main(sys.argv[1:]))"
    args = [str(cut_clip[0]), "--out", str(tmp_path / "run"), "--stages", "extract,quality"]
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "run", *args], stderr=subprocess.PIPE, text=True, cwd=ROOT
    )
    deadline = time.monotonic() + 180
    under: dict[int, str] = {}
    # Stopped once the stage kernel runs (not at the first child: a short-lived probe is none).
    while proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
        under = _start_times(_descendants(proc.pid))
        if any("ipykernel" in command for command in _running(under).values()):
            break
    assert any("ipykernel" in command for command in _running(under).values()), "no kernel was started"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "SIGTERM; finished stages are kept, rerun to continue" in err
    # A kernel the run did not end ends itself once it sees its parent gone, saying so here.
    assert "Parent appears to have exited" not in err
    # A process killed outright takes a moment to end on a loaded machine (CI failed once with
    # the kernel's pid still there a second after); one left running stays for good.
    deadline = time.monotonic() + 30
    while _running(under) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _running(under), (_running(under), err)


def test_a_stopped_command_that_cannot_end_is_ended_with_its_children():
    """The interrupt is raised wherever the main thread stands: raised between tqdm's two write
    locks it left one held, and ``bunny run`` waited for itself forever after SIGTERM, its kernel
    beside it. A command that has not ended in its grace time ends, its child processes first."""
    import contextlib
    import signal
    import subprocess
    import sys
    import textwrap
    import time

    import psutil

    code = textwrap.dedent(
        """
        import subprocess, sys, threading, time
        from diffusion_bunny import cli
        cli.STOP_GRACE_S = 1.0
        child = subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(600)"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        held = threading.Lock()
        held.acquire()
        with cli._signals_as_interrupts():
            try:
                print(child.pid, flush=True)  # told once SIGTERM is handled, not before
                time.sleep(600)
            except cli.Stopped:
                held.acquire()  # a lock the interrupt left held: the command waits for itself
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    child = int(proc.stdout.readline())
    proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=60)
    finally:  # a failure leaves nothing running
        for pid in (proc.pid, child):
            with contextlib.suppress(psutil.Error):
                psutil.Process(pid).kill()
    assert proc.returncode == 128 + signal.SIGTERM
    assert "SIGTERM; finished stages are kept, rerun to continue (ended without its cleanup)" in err
    deadline = time.monotonic() + 10
    while psutil.pid_exists(child) and psutil.Process(child).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, "the child process was left running"
        time.sleep(0.1)


@pytest.mark.parametrize("how", ["interrupt", "turned into an import error", "turned into a plain interrupt"])
def test_a_command_stopped_while_it_starts_says_one_line(monkeypatch, capsys, how):
    """SIGTERM in the first second of ``bunny run`` (its imports, reading its arguments: before the
    command's own error handling) printed an import's traceback and exited 1."""
    import signal

    from diffusion_bunny import cli

    def stopped_here():
        if how == "interrupt":
            cli._raise_stopped(signal.SIGTERM, None)
        try:  # code that turned the interrupt into its own error (Ray's wait: a KeyboardInterrupt)
            cli._raise_stopped(signal.SIGTERM, None)
        except cli.Stopped:
            if how == "turned into a plain interrupt":
                raise KeyboardInterrupt from None
            raise ImportError("cannot import name 'x' (interrupted)") from None

    monkeypatch.setattr(cli, "_build_parser", stopped_here)
    assert cli.main(["run", "movie.mp4"]) == 128 + signal.SIGTERM
    assert capsys.readouterr().err == "SIGTERM; finished stages are kept, rerun to continue\n"
    assert cli._signalled is None and cli._stop_timer.finished.is_set()  # no os._exit 20 s later


def test_a_signal_ignored_by_whoever_started_bunny_stays_ignored():
    """``nohup bunny run`` ignores SIGHUP so that the run outlives its terminal: the handler
    that turns SIGHUP into an interrupt was put over that, and closing the SSH session stopped
    the run."""
    import signal

    from diffusion_bunny.cli import _raise_stopped, _signals_as_interrupts

    before = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with _signals_as_interrupts():
            assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) == _raise_stopped
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, before)


def test_a_notebook_on_the_demo_takes_the_settings_bunny_demo_ran_it_with(demo, monkeypatch):
    """A notebook opened on the demo with its default parameters judged the demo's stages with
    its own settings: stage 03 was stale (no pictures, another fit) and ran again without the
    reference pictures, every name lost; stage 06 exported again at 512 px."""
    import nbformat

    from diffusion_bunny import nbtools
    from diffusion_bunny.demo.run import DEMO_SETTINGS, demo_overrides

    monkeypatch.setattr(nbtools, "demo_movie", lambda progress=True: demo)
    got = nbtools.notebook_overrides(None, None, {"export.crop_resolution": 256})
    assert got == demo_overrides(demo, {"export.crop_resolution": 256})
    assert (
        got["export.crop_resolution"] == 256
        and got["characters.fitted.steps"] == DEMO_SETTINGS["characters.fitted.steps"]
    )
    assert Path(got["characters.reference_dir"]).is_dir()
    assert nbtools.notebook_overrides("runs/film", None, {"a.b": 1}) == {"a.b": 1}  # not the demo
    for path in sorted((ROOT / "notebook").glob("0*.ipynb")):
        code = "\n".join(c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code")
        assert "cfg = notebook_config(run_dir, movie, config_path, overrides)" in code, path.name


def test_a_notebook_on_a_run_takes_the_settings_its_last_bunny_run_ran_with(cut_clip, tmp_path, capsys):
    """Opened in JupyterLab on a run made with ``--characters``, notebook 03 loaded the defaults,
    found stage 03 stale and ran it again with no reference pictures: every name was lost."""
    from diffusion_bunny.nbtools import notebook_config

    path, _ = cut_clip
    out, refs, conf = tmp_path / "out", tmp_path / "refs", tmp_path / "mine.yaml"
    conf.write_text("export:\n  crop_resolution: 320\n")
    args = ["run", str(path), "--stages", "extract", "--quiet", "--config", str(conf)]
    args += ["--set", f"paths.output_dir={out}", "--set", "extract.motion_threshold=200"]
    assert main(args) == 0
    (run_dir,) = [p for p in out.iterdir() if (p / "run.json").is_file()]
    record = Run(run_dir).settings()
    assert record == {
        "config_path": str(conf.resolve()),
        "overrides": {"paths.output_dir": str(out), "extract.motion_threshold": 200},
    }
    capsys.readouterr()
    # by the movie (its run folder found as bunny run finds it), the notebook's own settings winning
    own = {"paths.output_dir": str(out), "characters.reference_dir": str(refs)}
    got = notebook_config(None, path, None, own)
    assert got.extract.motion_threshold == 200 and got.export.crop_resolution == 320
    assert got.characters.reference_dir == str(refs)
    said = capsys.readouterr().out
    assert f"settings of the last bunny run of {run_dir.name}: --config {conf.resolve()}" in said
    assert "extract.motion_threshold=200" in said
    # by the run folder; an override of the notebook's own wins, a config file of its own too
    assert notebook_config(run_dir, None, None, {"extract.motion_threshold": 5}).extract.motion_threshold == 5
    other = tmp_path / "other.yaml"
    other.write_text("export:\n  crop_resolution: 256\n")
    assert notebook_config(run_dir, None, str(other), {}).export.crop_resolution == 256
    # the stage notebooks bunny run ran were handed those same settings: the stage is up to date
    assert stage_state(Run(run_dir), "extract", got)[0] == "done"
    # a setting the configuration no longer knows, a settings file gone: left out, each said
    record["overrides"]["characters.old_key"] = 1
    (run_dir / "settings.json").write_text(json.dumps(record))
    conf.unlink()
    capsys.readouterr()
    again = notebook_config(run_dir, None, None, {})
    said = capsys.readouterr().out
    assert again.extract.motion_threshold == 200 and again.export.crop_resolution != 320
    assert f"was given --config {conf.resolve()}, which is gone: not used" in said
    assert "(not accepted now): characters.old_key" in said
    # settings valid only together (a floor under its threshold) are taken together
    record["overrides"] = {"quality.min_brightness": 60, "quality.black_floor": 50}
    (run_dir / "settings.json").write_text(json.dumps(record))
    both = notebook_config(run_dir, None, None, {}).quality
    assert (both.min_brightness, both.black_floor) == (60, 50)
    # a mistyped movie is the usual one line, not an OSError of the run folder's lookup
    with pytest.raises(UserError, match="no such file"):
        notebook_config(None, tmp_path / "typo.mp4", None, {})
    # a damaged record, or a run folder of an earlier version (bunny run saved its notebooks and
    # kept no settings.json): the settings its stages recorded, said; the notebook's own win
    (run_dir / "settings.json").write_text("{not json")
    capsys.readouterr()
    assert notebook_config(run_dir, None, None, {}).extract.motion_threshold == 200
    assert "settings its stages recorded are taken: extract.motion_threshold=200" in capsys.readouterr().out
    (run_dir / "settings.json").unlink()
    assert notebook_config(run_dir, None, None, {}).extract.motion_threshold == 200
    assert notebook_config(run_dir, None, None, {"extract.motion_threshold": 5}).extract.motion_threshold == 5
    # the notebook's own under an old spelling wins; one that does not go with a recorded
    # setting (a threshold under its recorded floor) leaves the recorded ones out, said
    assert (
        notebook_config(run_dir, None, None, {"extraction.motion_threshold": 6}).extract.motion_threshold == 6
    )
    manifest = run_dir / "manifests" / "extract.json"
    record = json.loads(manifest.read_text())
    record["config"]["scenes"] = {"assign_threshold": 0.9, "noise_threshold": 0.7}
    manifest.write_text(json.dumps(record))
    capsys.readouterr()
    low = notebook_config(run_dir, None, None, {"scenes.assign_threshold": 0.6})
    assert low.scenes.assign_threshold == 0.6 and low.extract.motion_threshold == 200  # the rest stay
    assert "stages recorded (not accepted now): scenes.noise_threshold" in capsys.readouterr().out
    record["config"]["extraction"]["jpeg_quality"] = 1000  # out of range alone: that one out, said
    manifest.write_text(json.dumps(record))
    kept = notebook_config(run_dir, None, None, {})
    assert kept.extract.motion_threshold == 200 and kept.extract.jpeg_quality != 1000
    assert "extract.jpeg_quality" in capsys.readouterr().out
    mine = tmp_path / "mine2.yaml"  # a settings file of the notebook's own wins too
    mine.write_text("extract:\n  motion_threshold: 7\n")
    assert notebook_config(run_dir, None, str(mine), {}).extract.motion_threshold == 7
    # no notebook saved by bunny run (a folder a notebook or a script made): the notebook's own
    shutil.rmtree(run_dir / "notebooks")
    assert notebook_config(run_dir, None, None, {}).extract.motion_threshold != 200


def test_a_notebooks_overrides_in_any_form_keep_the_last_runs_other_settings(cut_clip, tmp_path, capsys):
    """papermill run by hand: ``-p overrides '{...}'`` hands text (a ValueError of ``dict()``), a
    nested mapping took the whole section's place over the last run's dotted settings (its
    ``characters.reference_dir`` gone, every name lost), and naming another detector could not
    open over the last run's tuning of its own (``unknown key 'characters.detector.min_score'``)."""
    from diffusion_bunny.errors import ConfigError
    from diffusion_bunny.nbtools import notebook_config

    refs = tmp_path / "refs"
    (refs / "someone").mkdir(parents=True)  # --characters must hold a picture (cli checks it)
    (refs / "someone" / "face.png").write_bytes(b"")
    out = tmp_path / "run"
    args = ["run", str(cut_clip[0]), "--out", str(out), "--stages", "extract", "--quiet"]
    args += ["--set", "characters.detector.name=mtcnn", "--set", "characters.detector.min_score=0.9"]
    assert main([*args, "--characters", str(refs)]) == 0
    nested = notebook_config(out, None, None, {"characters": {"frames": "all"}})
    assert nested.characters.frames == "all" and nested.characters.reference_dir == str(refs.resolve())
    assert (nested.characters.detector.name, nested.characters.detector.min_score) == ("mtcnn", 0.9)
    assert notebook_config(out, None, None, '{"quality.min_sharpness": 80}').quality.min_sharpness == 80
    assert notebook_config(out, None, None, ["quality.min_sharpness=70"]).quality.min_sharpness == 70
    with pytest.raises(ConfigError, match="overrides must be a mapping of settings"):
        notebook_config(out, None, None, 5)
    capsys.readouterr()
    hog = notebook_config(out, None, None, {"characters.detector.name": "hog"}).characters
    assert hog.detector.name == "hog" and hog.reference_dir == str(refs.resolve())
    said = capsys.readouterr().out
    assert "left out, as the notebook chooses another detector: characters.detector.min_score" in said
    same = notebook_config(out, None, None, {"characters": {"detector": {"name": "mtcnn"}}}).characters
    assert same.detector.min_score == 0.9  # its own detector keeps the run's tuning
    # A setting whose value is a mapping stays one (its names may hold a dot), and replaces the
    # run's: flattened, "Dr. Who" became the key "captions.character_descriptions.Dr".
    record = json.loads((out / "settings.json").read_text())
    record["overrides"]["captions.character_descriptions"] = {"Bob": "a tall man"}
    record["overrides"]["characters.detector"] = {"name": "mtcnn", "min_score": 0.9}  # --set's map form
    (out / "settings.json").write_text(json.dumps(record))
    for given in (
        {"captions.character_descriptions": {"Dr. Who": "a time traveller"}},
        {"captions": {"character_descriptions": {"Dr. Who": "a time traveller"}}},
    ):
        cfg = notebook_config(out, None, None, given)
        assert cfg.captions.character_descriptions == {"Dr. Who": "a time traveller"}
    assert json.loads((out / "settings.json").read_text()) == record
    mapped = notebook_config(out, None, None, {"characters.detector.name": "mtcnn"}).characters
    assert mapped.detector.min_score == 0.9  # the run's mapping names the same detector
    # A user's error in a notebook is its one line, not a traceback through the workspace.
    assert ConfigError("config error: x")._render_traceback_() == ["ConfigError: config error: x"]


def test_a_signal_of_one_command_is_not_blamed_for_the_next(tmp_path, monkeypatch):
    """``_signalled`` outlived the command a signal stopped: a later ``main`` in the same process
    (a test, an API caller) reported a real bug as that signal."""
    from diffusion_bunny import cli

    monkeypatch.setattr(cli, "_signalled", 15)
    cli.main(["status", str(tmp_path / "nothing-here")])
    assert cli._signalled is None


def test_a_headless_rerun_for_new_thresholds_reuses_the_scores(tmp_path):
    """``bunny run`` passed every notebook ``force=True``: stage 02 scored every frame again for a
    new threshold, where the notebook in JupyterLab and the docs reuse the scores. ``--force``
    still scores again."""
    movie = tmp_path / "a.mp4"
    write_clip(movie, [(11, 20, 0.0), (12, 20, 0.0), (13, 20, 0.0)])
    out = tmp_path / "run"
    assert main(["run", str(movie), "--out", str(out), "--stages", "extract,quality", "--quiet"]) == 0
    frames = Run.open(out).read_table("frames").height
    facts = lambda: Run.open(out).read_manifest("quality")["facts"]  # noqa: E731
    assert "scores_reused" not in facts()
    new = ["--set", "quality.min_sharpness=1"]
    assert main(["run", str(movie), "--out", str(out), "--stages", "quality", "--quiet", *new]) == 0
    assert facts()["scores_reused"] == frames
    again = ["run", str(movie), "--out", str(out), "--stages", "quality", "--quiet", "--force", *new]
    assert main(again) == 0
    assert "scores_reused" not in facts()


def test_a_rerun_removes_the_progress_files_a_killed_run_left(tmp_path):
    """A cancelled Ray task or Ctrl-C left ``.progress-<stage>.json`` (and its relay files) in
    the run folder, and a rerun that skipped that stage kept them for good, though they mean a
    stage is running; the run that takes the folder's lock removes them, and nothing else."""
    from diffusion_bunny.pipeline.runner import run_movie

    movie = tmp_path / "a.mp4"
    write_clip(movie, [(41, 10, 0.0)])
    out = tmp_path / "run"
    Run.create(out, movie)
    left = [".progress-extract.json", ".progress-extract.json.tmp", ".progress-captions.json.say"]
    for name in left:
        (out / name).write_text("{}")
    (out / "notes.progress").write_text("kept")
    options = RunOptions(PIPELINE, load_config(None, {}), stages=(), progress=False)
    assert run_movie(movie, out, options).error is None
    assert not [name for name in left if (out / name).exists()]
    assert (out / "notes.progress").read_text() == "kept"


def test_a_dead_kernels_unretrieved_task_is_no_traceback_after_the_line(caplog):
    """A Ctrl-C sometimes printed asyncio's "Task exception was never retrieved" with nbclient's
    DeadKernelError after "interrupted; finished stages are kept": Python's last-resort handler
    (warnings and up) wrote it to the terminal. The runner's own line says why the kernel died,
    so that record is put at debug level; any other is left as it is."""
    from nbclient.exceptions import DeadKernelError

    from diffusion_bunny.pipeline.runner import _route_papermill_logs

    _route_papermill_logs()
    echo = logging.getLogger("asyncio")
    with caplog.at_level(logging.DEBUG, logger="asyncio"):
        for exc in (DeadKernelError("Kernel died"), ValueError("something else")):
            echo.error("Task exception was never retrieved", exc_info=(type(exc), exc, None))
    levels = [
        (type(r.exc_info[1]).__name__, r.levelno) for r in caplog.records if "never retrieved" in r.message
    ]
    assert levels == [("DeadKernelError", logging.DEBUG), ("ValueError", logging.ERROR)]
