"""``bunny status``: each stage's state per movie from the manifests (done, stale and why,
missing), for a run folder, a folder of run folders, a movie or a folder of movies."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys

import pytest
from clips import write_clip

from diffusion_bunny.cli import main
from diffusion_bunny.config import current_name, load_config, text_setting
from diffusion_bunny.errors import UserError
from diffusion_bunny.pipeline.recorded import dropped_settings_note
from diffusion_bunny.pipeline.run import Run, movie_id
from diffusion_bunny.pipeline.runner import overrides_from_args
from diffusion_bunny.pipeline.status import resolve_runs, run_status, settings_note
from diffusion_bunny.stages import PIPELINE, run_stage, stage_names


def _states(run_dir, cfg) -> dict[str, tuple[str, str]]:
    return {stage: (state, reason) for stage, state, reason in run_status(PIPELINE, run_dir, cfg)}


def test_done_stale_after_a_config_change_and_missing(cut_clip, tmp_path, capsys):
    path, _ = cut_clip
    cfg = load_config(root=tmp_path / "noconfig")
    run = Run.create(tmp_path / "out" / "run", path)
    run_stage(run, "extract", cfg, progress=False)
    states = _states(run.run_dir, cfg)
    assert states["extract"] == ("done", "up to date")
    assert states["quality"] == ("missing", "never ran")
    # Stage 04 cannot even fingerprint its inputs (no quality table): missing, saying what to run.
    assert states["scenes"][0] == "missing" and "run stage quality first" in states["scenes"][1]
    assert states["report"] == ("missing", "never ran")

    changed = load_config(None, {"extract.motion_threshold": 200}, root=tmp_path / "noconfig")
    moved = f"its config changed: extract.motion_threshold {cfg.extract.motion_threshold} -> 200.0"
    assert _states(run.run_dir, changed)["extract"] == ("stale", moved)

    assert main(["status", str(run.run_dir)]) == 0
    out = capsys.readouterr().out
    assert f"cuts.mp4  ({run.run_dir}; 1 of {len(stage_names())} stages done)" in out
    assert "  extract     done\n" in out and "  quality     missing  (never ran)" in out
    assert main(["status", str(run.run_dir), "--set", "extract.motion_threshold=200"]) == 0
    assert f"  extract     stale  ({moved})" in capsys.readouterr().out
    # Judged by the command's own settings, and said so where the run's last bunny run had others
    # (a stage made with --characters read "stale" to a status typed without it, unexplained).
    assert "its last bunny run was given" not in out  # no settings.json: nothing to compare
    run.write_settings(None, {"extract.motion_threshold": 200, "engine.kind": "local"})
    assert main(["status", str(run.run_dir)]) == 0
    said = capsys.readouterr().out
    assert (
        "  its last bunny run was given --set extract.motion_threshold=200; judged here by this "
        "command's (no settings of its own): give the same to judge by those\n"
    ) in said
    assert "  extract     done\n" in said
    assert main(["status", str(run.run_dir), "--set", "extract.motion_threshold=200"]) == 0
    said = capsys.readouterr().out
    assert "its last bunny run was given" not in said and f"  extract     stale  ({moved})" in said
    # --characters is said as typed; where the stages run (engine.*) is in no stage's settings.
    refs = {"characters.reference_dir": "/films/refs"}
    run.write_settings("/films/mine.yaml", {**refs, "engine.kind": "ray"})
    assert settings_note(run, {"config_path": "/films/mine.yaml", "overrides": refs}) is None
    assert settings_note(run, {"config_path": None, "overrides": {"engine.kind": "local"}}) == (
        "its last bunny run was given --config /films/mine.yaml --characters /films/refs; judged here "
        "by this command's (no settings of its own): give the same to judge by those"
    )
    # bunny run says only what it leaves out (other values given are a choice, said by the stages).
    recorded = {"config_path": "/films/mine.yaml", "overrides": {**refs, "engine.kind": "ray"}}
    assert dropped_settings_note(recorded, {"config_path": "/films/mine.yaml", "overrides": refs}) is None
    other = {"characters.reference_dir": "/films/other"}
    assert dropped_settings_note(recorded, {"config_path": "/films/b.yaml", "overrides": other}) is None
    assert dropped_settings_note(None, {"config_path": None, "overrides": {}}) is None
    # A setting given under its name today is not left out under the name the last run used.
    old_name = {"config_path": None, "overrides": {"extract.threshold": 30}}
    new_name = {"config_path": None, "overrides": {"extract.detector.threshold": 30}}
    assert dropped_settings_note(old_name, new_name, current_name) is None
    assert "--set extract.threshold=30, this one not" in dropped_settings_note(old_name, new_name)
    assert dropped_settings_note(recorded, {"config_path": None, "overrides": {"engine.kind": "local"}}) == (
        "its last bunny run was given --config /films/mine.yaml --characters /films/refs, this one not: "
        "the stages those settings touch run without them (and the folder's notebooks start without "
        "them); give the same to keep them"
    )
    # The flags said can be typed back: values as --set reads them, words quoted for the shell
    # ("=None" read back as the text None; "blurry, ugly" unquoted was two words).
    typed = {
        "generate.trigger_word": None,
        "generate.negative_prompt": "blurry, ugly",
        "generate.seeds": [1, 2],
    }
    run.write_settings(None, typed)
    note = settings_note(run, {"config_path": None, "overrides": {}})
    flags = note.removeprefix("its last bunny run was given ").partition(";")[0]
    assert flags == (
        "--set generate.trigger_word=null --set 'generate.negative_prompt=blurry, ugly' "
        "--set 'generate.seeds=[1, 2]'"
    )
    words = shlex.split(flags)
    assert overrides_from_args(words[1::2], text_setting) == typed
    assert (
        settings_note(run, {"config_path": None, "overrides": overrides_from_args(words[1::2], text_setting)})
        is None
    )
    run.write_settings(None, {})
    # --characters as bunny run takes it: a folder that is not there is one line, exit status 2.
    assert main(["status", str(run.run_dir), "--characters", str(tmp_path / "nope")]) == 2
    assert f"--characters {tmp_path / 'nope'}: " in capsys.readouterr().err

    # A rewritten input table makes the next stage stale.
    run_stage(run, "quality", cfg, progress=False)
    assert _states(run.run_dir, cfg)["quality"] == ("done", "up to date")
    run_stage(run, "extract", cfg, force=True, progress=False)  # same frames, new file
    frames = run.read_table("frames")
    run.write_table("frames", frames.head(frames.height - 1))
    states = _states(run.run_dir, cfg)
    # (stage 01 forced wrote its frame files again too: stage 02 reads them, so they count)
    assert states["quality"] == ("stale", "its inputs changed (frame_files, frames)")
    # Stage 01's own manifest notices that its table was changed behind its back.
    assert states["extract"] == ("stale", "its output changed since it ran (frames)")
    # A table gone: missing again.
    run.table_path("quality").unlink()
    assert _states(run.run_dir, cfg)["quality"] == ("missing", "table quality is gone")
    # A folder a stage owns gone: the stage is missing, though all its tables are there.
    shutil.rmtree(run.run_dir / "frames")
    assert _states(run.run_dir, cfg)["extract"] == ("missing", "its output frames/ is gone")


def test_folders_movies_and_bad_paths(cut_clip, tmp_path, capsys):
    path, _ = cut_clip
    cfg = load_config(root=tmp_path / "noconfig")
    movies = tmp_path / "movies"
    movies.mkdir()
    shutil.copy(path, movies / "one.mp4")
    write_clip(movies / "two.mp4", [(21, 15, 0.0), (22, 15, 0.0)])
    out = tmp_path / "out"
    done = Run.create(out / movie_id(movies / "one.mp4"), movies / "one.mp4")
    run_stage(done, "extract", cfg, progress=False)

    # A folder of movies maps to their run folders under --out; "two" has none yet.
    refs = resolve_runs(movies, cfg, out)
    assert [(r.movie, r.run_dir) for r in refs] == [
        ("one.mp4", done.run_dir),
        ("two.mp4", (out / movie_id(movies / "two.mp4")).resolve()),
    ]
    assert main(["status", str(movies), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    n = len(stage_names())
    assert "one.mp4" in text and f"1 of {n} stages done" in text and "two.mp4" in text
    assert f"0 of {n} stages done" in text
    assert not (out / movie_id(movies / "two.mp4")).exists()  # status never creates anything

    # A folder of run folders (data/output), and one movie with --out as its run folder.
    assert [r.movie for r in resolve_runs(out, cfg)] == ["one.mp4"]
    assert [r.run_dir for r in resolve_runs(movies / "one.mp4", cfg, done.run_dir)] == [done.run_dir]
    # One movie with the --out of a folder run (one run folder per movie under it): its own.
    assert [r.run_dir for r in resolve_runs(movies / "one.mp4", cfg, out)] == [done.run_dir]

    # Another movie's run folder as --out: not shown as this movie's stages (bunny run refuses it).
    other = resolve_runs(movies / "two.mp4", cfg, done.run_dir)
    assert [(r.movie, r.run_dir) for r in other] == [("two.mp4", None)]
    assert "is the run folder of another movie (one.mp4)" in other[0].problem
    assert main(["status", str(movies / "two.mp4"), "--out", str(done.run_dir)]) == 0
    text = capsys.readouterr().out
    assert f"0 of {n} stages done" in text and "extract     done" not in text
    # A run.json that is JSON but names no movie as text: the folder is listed, not a bug.
    broken = tmp_path / "runs" / "broken"
    shutil.copytree(done.run_dir, broken)
    (broken / "run.json").write_text('{"movie": null}')
    assert main(["status", str(broken.parent)]) == 0
    text = capsys.readouterr().out
    assert "broken  (" in text and "does not describe a run" in text

    for bad, message in [
        (tmp_path / "nothing", "no such file or folder"),
        (tmp_path / "empty", "neither a run folder"),
    ]:
        if bad.name == "empty":
            bad.mkdir()
        with pytest.raises(UserError, match=message):
            resolve_runs(bad, cfg)
        assert main(["status", str(bad)]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_a_folder_that_is_its_own_out_lists_each_movie_once_and_a_copy_as_bunny_run(tmp_path, capsys):
    """``--out`` the movies' own folder listed a movie twice (its run folder found there, and the
    movie's run folder again); a copy ``bunny run`` skipped showed as never run, forever."""
    cfg = load_config(root=tmp_path / "noconfig")
    movies = tmp_path / "movies"
    movies.mkdir()
    write_clip(movies / "a.mp4", [(21, 15, 0.0)])
    shutil.copy(movies / "a.mp4", movies / "a (1).mp4")
    write_clip(movies / "b.mp4", [(23, 15, 0.0)])
    run = Run.create(movies / movie_id(movies / "a.mp4"), movies / "a.mp4")
    capsys.readouterr()
    refs = resolve_runs(movies, cfg, movies)
    assert [(r.movie, r.run_dir) for r in refs] == [
        ("a.mp4", run.run_dir),
        ("b.mp4", (movies / movie_id(movies / "b.mp4")).resolve()),
    ]
    assert "a (1).mp4: the same file as a.mp4" in capsys.readouterr().err
    out = tmp_path / "out"
    assert [r.movie for r in resolve_runs([movies / "a (1).mp4", movies / "a.mp4"], cfg, out)] == ["a.mp4"]
    assert main(["status", str(movies), "--out", str(movies)]) == 0
    text = capsys.readouterr().out
    assert text.count("a.mp4  (") == 1 and "a (1).mp4  (" not in text and text.count("b.mp4  (") == 1


def test_an_unreadable_movie_is_shown_with_why_not_a_write_error(tmp_path, monkeypatch, capsys):
    """A movie the user may not read stopped ``bunny status`` with "could not write ...:
    Permission denied" (its run folder's name reads the file); now it is listed, each stage
    missing, saying that it cannot be read, and the others are shown."""
    from unreadable import make_unreadable

    cfg = load_config(root=tmp_path / "noconfig")
    movies = tmp_path / "movies"
    movies.mkdir()
    write_clip(movies / "a.mp4", [(21, 15, 0.0)])
    write_clip(movies / "c.mp4", [(23, 15, 0.0)])
    make_unreadable(monkeypatch, movies / "c.mp4")
    out = tmp_path / "out"
    refs = resolve_runs(movies, cfg, out)
    assert [(r.movie, r.run_dir) for r in refs] == [
        ("a.mp4", (out / movie_id(movies / "a.mp4")).resolve()),
        ("c.mp4", None),
    ]
    assert refs[1].problem.startswith(f"{movies / 'c.mp4'}: cannot read the file (Permission denied)")
    capsys.readouterr()
    assert main(["status", str(movies), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    n = len(stage_names())
    assert f"c.mp4  (no run folder; 0 of {n} stages done)" in captured.out
    assert (
        "cannot read the file (Permission denied)" in captured.out and "could not write" not in captured.err
    )


def test_the_report_goes_stale_when_stage_02s_thresholds_change_and_its_tables_do_not(cut_clip, tmp_path):
    """The report draws stage 02's thresholds (from its manifest) on its figure: a rerun of stage
    02 with a new ``min_sharpness`` that kept the same frames changed no table, and the report
    was "up to date", still showing the old line."""
    path, _ = cut_clip
    cfg = load_config(root=tmp_path / "noconfig")
    run = Run.create(tmp_path / "run", path)
    for stage in ("extract", "quality", "report"):
        run_stage(run, stage, cfg, progress=False)
    assert _states(run.run_dir, cfg)["report"] == ("done", "up to date")
    quality = run.read_table("quality")
    half = {"quality.min_sharpness": cfg.quality.min_sharpness / 2}
    lower = load_config(None, half, root=tmp_path / "noconfig")
    run_stage(run, "quality", lower, progress=False)
    assert run.read_table("quality").equals(quality)  # the same frames kept, the same table
    state, reason = _states(run.run_dir, lower)["report"]
    assert (state, reason) == ("stale", "its inputs changed (manifests read)")
    # A manifest that is JSON but no manifest is said, as a damaged one is.
    run.manifest_path("extract").write_text("[]")
    import logging

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("diffusion_bunny.pipeline.run").addHandler(handler)
    try:
        assert run.read_manifest("extract") is None
    finally:
        logging.getLogger("diffusion_bunny.pipeline.run").removeHandler(handler)
    assert any("cannot be read; stage extract counts as not run" in r.getMessage() for r in records)


def test_a_stage_that_failed_on_its_first_run_did_not_finish_rather_than_never_ran(
    cut_clip, tmp_path, monkeypatch
):
    """A stage that fails before it writes a table (stage 04 on a film whose frames stage 02
    all dropped) left no table and no manifest: ``bunny status`` said it "never ran"."""
    from diffusion_bunny.stages.quality import stage as quality_stage

    path, _ = cut_clip
    cfg = load_config(root=tmp_path / "noconfig")
    run = Run.create(tmp_path / "run", path)
    run_stage(run, "extract", cfg, progress=False)

    def fails(ctx):
        raise UserError("no frame could be scored")

    monkeypatch.setattr(quality_stage, "compute", fails)
    with pytest.raises(UserError):
        run_stage(run, "quality", cfg, progress=False)
    assert _states(run.run_dir, cfg)["quality"] == ("missing", "its last run did not finish")
    monkeypatch.undo()
    run_stage(run, "quality", cfg, progress=False)
    assert _states(run.run_dir, cfg)["quality"] == ("done", "up to date")
    assert sorted(p.name for p in run.manifests_dir.iterdir()) == ["extract.json", "quality.json"]


def test_a_movie_bunny_run_refuses_has_no_run_folder_and_says_why(tmp_path, capsys):
    """An empty file, a file that is not a video and a name that is not UTF-8 were shown as
    "never ran" with a run folder that would never exist (``bunny run`` refuses them); now each
    is listed without a run folder, its stages saying what ``bunny run`` says."""
    import os

    cfg = load_config(root=tmp_path / "noconfig")
    movies = tmp_path / "movies"
    movies.mkdir()
    write_clip(movies / "a.mp4", [(21, 15, 0.0)])
    (movies / "empty.mp4").write_bytes(b"")
    (movies / "notes.mp4").write_text("not a video")
    latin1 = movies / os.fsdecode(b"caf\xe9.mp4")
    write_clip(latin1, [(22, 15, 0.0)])
    write_clip(movies / "b.mp4", [(23, 15, 0.0)])
    out = tmp_path / "out"
    refs = {r.movie: r for r in resolve_runs(movies, cfg, out)}
    assert refs["b.mp4"].run_dir == (out / movie_id(movies / "b.mp4")).resolve()
    assert refs["empty.mp4"].run_dir is None and "the file is empty (0 bytes)" in refs["empty.mp4"].problem
    assert refs["notes.mp4"].run_dir is None and "not a video FFmpeg can read" in refs["notes.mp4"].problem
    assert refs[latin1.name].run_dir is None and "is not UTF-8 text" in refs[latin1.name].problem
    capsys.readouterr()
    assert main(["status", str(movies), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    n = len(stage_names())
    for name in ("empty.mp4", "notes.mp4", "caf\\xe9.mp4"):
        assert f"{name}  (no run folder; 0 of {n} stages done)" in text
    # each of their stages says why, not "never ran" (only a.mp4's and b.mp4's do)
    assert text.count("the file is empty (0 bytes)") == n and text.count("is not UTF-8 text") == n
    assert text.count("(no run folder;") == 3 and not out.exists()
    # Two refused movies of one file name in two folders are two blocks, each named by its path
    # (the second, and its problem, were dropped as the first's duplicate).
    (tmp_path / "s2").mkdir()
    (tmp_path / "s2" / "empty.mp4").write_text("not a video")
    assert main(["status", str(movies / "empty.mp4"), str(tmp_path / "s2" / "empty.mp4")]) == 0
    text = capsys.readouterr().out
    assert f"{movies / 'empty.mp4'}  (no run folder; 0 of {n} stages done)" in text
    assert f"{tmp_path / 's2' / 'empty.mp4'}  (no run folder; 0 of {n} stages done)" in text
    assert text.count("the file is empty (0 bytes)") == n and text.count("not a video FFmpeg can read") == n


def test_a_movie_named_is_a_movie_whatever_its_extension_as_bunny_run_takes_it(tmp_path, capsys):
    """``bunny run anim.gif`` ran (a file named is a movie) and ``bunny status anim.gif`` said it
    was "neither a run folder ..., a movie nor a folder of movies": status kept a named file to
    ``run.video_extensions``, which pick only a folder's movies (they still do)."""
    cfg = load_config(root=tmp_path / "noconfig")
    movies = tmp_path / "movies"
    movies.mkdir()
    gif = movies / "anim.gif"
    write_clip(gif, [(21, 15, 0.0), (22, 15, 0.0)], codec="gif", pix_fmt="rgb8")
    write_clip(movies / "a.mp4", [(23, 15, 0.0)])
    run = Run.create(tmp_path / "out", gif)
    run_stage(run, "extract", cfg, progress=False)
    assert [(r.movie, r.run_dir, r.problem) for r in resolve_runs(gif, cfg, run.run_dir)] == [
        ("anim.gif", run.run_dir, None)
    ]
    assert main(["status", str(gif), "--out", str(run.run_dir)]) == 0
    assert f"anim.gif  ({run.run_dir}; 1 of {len(stage_names())} stages done)" in capsys.readouterr().out
    # a folder's movies are still those of a video extension
    assert [r.movie for r in resolve_runs(movies, cfg, tmp_path / "other")] == ["a.mp4"]
    # a file named that is no video is listed with what bunny run says of it, not refused
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    [ref] = resolve_runs(notes, cfg)
    assert ref.run_dir is None and "not a video FFmpeg can read" in ref.problem
    assert main(["status", str(notes)]) == 0
    assert f"notes.txt  (no run folder; 0 of {len(stage_names())} stages done)" in capsys.readouterr().out


def test_a_shells_star_lists_what_bunny_run_of_it_runs(tmp_path, capsys):
    """``bunny status DIR/*`` takes the targets as ``bunny run DIR/*`` does: a subtitle file and a
    poster were listed as movies that can never run, and a folder with no video (``extras/``)
    stopped the command, while ``bunny run`` of the same targets passed them over."""
    cfg = load_config(root=tmp_path / "noconfig")
    movies = tmp_path / "movies"
    (movies / "extras").mkdir(parents=True)
    (movies / "extras" / "notes.txt").write_text("behind the scenes")
    write_clip(movies / "a.mp4", [(21, 15, 0.0)])
    (movies / "a.srt").write_text("1\n00:00:00,000 --> 00:00:01,000\nhi\n")
    (movies / "poster.jpg").write_bytes(b"not really a picture")
    targets = sorted(movies.iterdir())
    refs = resolve_runs(targets, cfg, tmp_path / "out")
    assert [(r.movie, r.problem) for r in refs] == [("a.mp4", None)]
    assert main(["status", *map(str, targets), "--out", str(tmp_path / "out")]) == 0
    text = capsys.readouterr().out
    assert "a.mp4  (" in text and "a.srt" not in text and "poster.jpg" not in text
    # files named otherwise alone are still each a movie as typed, and nothing at all is one line
    [ref] = resolve_runs([movies / "a.srt", movies / "extras"], cfg)
    assert ref.movie == "a.srt" and "holds no video stream" in ref.problem
    with pytest.raises(UserError, match=r"none of the 2 targets .*\(extras/, extras/\)"):
        resolve_runs([movies / "extras", movies / "extras"], cfg)


def test_the_run_folder_of_a_movie_since_replaced_says_so_in_one_line(tmp_path, capsys):
    """A movie replaced by another file of the same name (a folder run on ``ep1.webm``, then a new
    ``ep1.webm``, run again) left its old run folder shown as "extract stale (its inputs changed
    (movie))" for good: no rerun touches it (``bunny run`` refuses it as another movie's)."""
    cfg = load_config(root=tmp_path / "noconfig")
    movies, out = tmp_path / "movies", tmp_path / "out"
    movies.mkdir()
    write_clip(movies / "ep1.mp4", [(21, 15, 0.0)])
    old = Run.create(out / movie_id(movies / "ep1.mp4"), movies / "ep1.mp4")
    run_stage(old, "extract", cfg, progress=False)
    write_clip(movies / "ep1.mp4", [(25, 20, 0.0)])
    new = Run.create(out / movie_id(movies / "ep1.mp4"), movies / "ep1.mp4")
    run_stage(new, "extract", cfg, progress=False)
    assert new.run_dir != old.run_dir
    # the movies' folder: the new file's run folder only
    assert [r.run_dir for r in resolve_runs(movies, cfg, out)] == [new.run_dir]
    assert main(["status", str(out)]) == 0
    text = capsys.readouterr().out
    n = len(stage_names())
    line = "ep1.mp4 is now another file; this run folder holds the earlier file's run"
    assert f"ep1.mp4  ({old.run_dir}; an earlier file's run)\n  {line}" in text
    assert f"ep1.mp4  ({new.run_dir}; 1 of {n} stages done)\n  extract     done" in text
    assert "stale" not in text and text.count(line) == 1
    # The earlier file kept elsewhere (an archive beside the new cut) is that folder's movie:
    # bunny run goes on there with it, so status shows its stages, not "an earlier file's run".
    archive = tmp_path / "archive"
    archive.mkdir()
    write_clip(archive / "ep1.mp4", [(21, 15, 0.0)])
    assert main(["status", str(archive), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"ep1.mp4  ({old.run_dir}; 1 of {n} stages done)\n  extract     done" in text
    assert "an earlier file's run" not in text


def test_a_reader_that_stops_early_ends_the_lines_quietly(cut_clip, tmp_path):
    """``bunny status | true`` (or ``| head``): the reader closed the pipe, the work was done, and
    the BrokenPipeError of printing it was "error: bug", exit status 1."""
    path, _ = cut_clip
    script = "import sys; from diffusion_bunny.cli import main; raise SystemExit(main(sys.argv[1:]))"
    command = [sys.executable, "-c", script, "status", str(path), "--out", str(tmp_path / "out")]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path)
    proc.stdout.close()  # as `| true` does, before a line is printed
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0, err
    assert err == ""
