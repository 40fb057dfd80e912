"""A folder of movies run again as people change it: renamed and copied movies keep their run
folders, one folder run per ``--out`` at a time, ``paths.output_dir`` checked as ``--out`` is, one
movie of a folder run run alone, and ``bunny status`` of a folder that holds its run folders."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from clips import write_clip

from diffusion_bunny.cli import main
from diffusion_bunny.errors import StageError
from diffusion_bunny.pipeline.run import Run, check_batch_folder, given_run_folder, movie_id, run_folder_in


def _finished(run_dir: Path) -> str:
    return json.loads((run_dir / "manifests" / "extract.json").read_text())["finished"]


def _run_folders(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if (p / "run.json").is_file())


def test_a_renamed_or_copied_movie_goes_on_in_its_run_folder(tmp_path, capsys):
    """A movie renamed in its folder, or the copy of it a folder now runs, made a second run folder
    of the same frames and did every stage again: the corrections made by hand in the first were
    left behind. Its run folder is found by its content; a single movie's ``--out`` that is a
    folder run's goes to the movie's run folder there, as ``bunny status`` reads it."""
    folder = tmp_path / "movies"
    folder.mkdir()
    write_clip(folder / "hamilton.mp4", [(11, 20, 0.0), (12, 20, 0.0)])
    write_clip(folder / "other.mp4", [(13, 20, 0.0)])
    out = tmp_path / "out"
    assert main(["run", str(folder), "--out", str(out), "--stages", "extract", "--quiet"]) == 0
    first = out / movie_id(folder / "hamilton.mp4")
    done = _finished(first)
    assert _run_folders(out) == sorted([first.name, movie_id(folder / "other.mp4")])

    (folder / "hamilton.mp4").rename(folder / "Hamilton Live.mp4")
    assert run_folder_in(out, folder / "Hamilton Live.mp4") == first
    assert main(["run", str(folder), "--out", str(out), "--stages", "extract", "--quiet"]) == 0
    assert _run_folders(out) == sorted([first.name, movie_id(folder / "other.mp4")])
    assert _finished(first) == done  # up to date: nothing done again
    assert Run.open(first).movie == (folder / "Hamilton Live.mp4").resolve()

    shutil.copy(folder / "Hamilton Live.mp4", folder / "ham.mp4")  # a shorter name: the one run
    capsys.readouterr()
    assert main(["run", str(folder), "--out", str(out), "--stages", "extract", "--quiet"]) == 0
    assert f"ham.mp4: {first}" in capsys.readouterr().out
    assert _run_folders(out) == sorted([first.name, movie_id(folder / "other.mp4")])
    assert _finished(first) == done

    # One movie of the folder run alone, with the folder run's --out: its run folder there.
    assert given_run_folder(out, folder / "ham.mp4") == first
    assert main(["run", str(folder / "ham.mp4"), "--out", str(out), "--stages", "extract", "--quiet"]) == 0
    assert _finished(first) == done
    assert _run_folders(out) == sorted([first.name, movie_id(folder / "other.mp4")])
    # A new folder, a run folder and a folder of other things stay what --out names.
    assert given_run_folder(tmp_path / "new", folder / "ham.mp4") == tmp_path / "new"
    assert given_run_folder(first, folder / "other.mp4") == first
    # A damaged run.json of the same key is not taken for the movie's.
    (folder / "solo").mkdir()
    write_clip(folder / "solo" / "s.mp4", [(15, 10, 0.0)])
    fake = out / f"x-{movie_id(folder / 'solo' / 's.mp4')[-8:]}"
    fake.mkdir()
    (fake / "run.json").write_text("{not json")
    assert run_folder_in(out, folder / "solo" / "s.mp4") == out / movie_id(folder / "solo" / "s.mp4")


def test_status_of_a_folder_that_holds_its_run_folders_lists_each_movie_once(tmp_path, capsys):
    """``bunny run FOLDER --out FOLDER`` then ``bunny status FOLDER``: each movie was listed twice,
    done (its run folder in FOLDER) and never run (under paths.output_dir)."""
    folder = tmp_path / "movies"
    folder.mkdir()
    write_clip(folder / "a.mp4", [(11, 20, 0.0)])
    write_clip(folder / "b.mp4", [(12, 20, 0.0)])
    assert main(["run", str(folder), "--out", str(folder), "--stages", "extract", "--quiet"]) == 0
    capsys.readouterr()
    (folder / ".locks").mkdir(exist_ok=True)  # held by the folder run: not a run folder
    (folder / ".locks" / "run.json").write_text("{}")
    elsewhere = ["--set", f"paths.output_dir={tmp_path / 'elsewhere'}"]
    main(["status", str(folder), *elsewhere])
    shown = [line for line in capsys.readouterr().out.splitlines() if "stages done" in line]
    assert len(shown) == 2 and all(str(folder) in line for line in shown), shown
    # Run there too, both places are listed: the run folders found and those bunny run uses.
    assert main(["run", str(folder), "--stages", "extract", "--quiet", *elsewhere]) == 0
    capsys.readouterr()
    main(["status", str(folder), *elsewhere])
    shown = [line for line in capsys.readouterr().out.splitlines() if "stages done" in line]
    assert len(shown) == 4 and sum(str(tmp_path / "elsewhere") in line for line in shown) == 2, shown


def test_a_second_folder_run_of_one_out_is_refused_at_once(tmp_path, capsys):
    """Two ``bunny run FOLDER`` at once each found the other's movies in use and failed them, and
    the combined report of the last called the other's finished movies failed: the second stops
    in one line before any movie, naming the first."""
    folder = tmp_path / "movies"
    folder.mkdir()
    write_clip(folder / "a.mp4", [(11, 20, 0.0)])
    write_clip(folder / "b.mp4", [(12, 20, 0.0)])
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from diffusion_bunny.pipeline import lock\n"
            "with lock.run_lock(sys.argv[1] + '/.locks/folder-run', what='bunny run (a folder)'):\n"
            "    print('held', flush=True)\n"
            "    time.sleep(120)\n",
            str(out),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        capsys.readouterr()
        assert main(["run", str(folder), "--out", str(out), "--stages", "extract", "--quiet"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{out.resolve()} is in use by process {holder.pid}" in err, err
        assert "(bunny run (a folder), since" in err
        assert "one run per folder at a time" in err
        assert _run_folders(out) == [] and not (out / "report").exists()
    finally:
        holder.kill()
        holder.wait()
    assert main(["run", str(folder), "--out", str(out), "--stages", "extract", "--quiet"]) == 0
    assert len(_run_folders(out)) == 2


def test_paths_output_dir_is_checked_as_out_is_and_a_report_file_is_refused(tmp_path, capsys):
    """Without --out a folder run wrote into ``paths.output_dir`` unchecked: a movie's run folder
    there got the batch nested inside it and its report's figures deleted. A ``report`` that is
    a file ended every movie's run in "bug: FileExistsError"."""
    folder = tmp_path / "movies"
    folder.mkdir()
    write_clip(folder / "a.mp4", [(11, 20, 0.0)])
    write_clip(folder / "b.mp4", [(12, 20, 0.0)])
    single = tmp_path / "single"
    Run.create(single, folder / "a.mp4")
    (single / "report" / "figures").mkdir(parents=True)
    (single / "report" / "figures" / "funnel.png").write_bytes(b"its figure")
    capsys.readouterr()
    args = ["run", str(folder), "--stages", "extract", "--quiet", "--set", f"paths.output_dir={single}"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {single} is the run folder of one movie; ") and err.count("\n") == 1
    assert (single / "report" / "figures" / "funnel.png").read_bytes() == b"its figure"
    assert sorted(p.name for p in single.iterdir()) == ["report", "run.json"]

    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "report").write_text("my notes")
    with pytest.raises(StageError, match="report is a file; a folder run writes its combined report"):
        check_batch_folder(plain)
    assert main(["run", str(folder), "--out", str(plain), "--stages", "extract", "--quiet"]) == 2
    assert sorted(p.name for p in plain.iterdir()) == ["report"]


def test_a_run_folder_is_taken_for_a_movie_of_the_same_content_only(tmp_path, monkeypatch):
    """The key is the first megabyte: two cuts of one film that differ only at their end share
    it. Taken for each other's, one run folder held both and stage 01 ran again at every run,
    each in turn. An earlier run folder is this movie's when its movie is gone from where it
    was (renamed, moved) or is a copy of it; a notebook opened on the movie finds it too."""
    from diffusion_bunny.config import load_config
    from diffusion_bunny.nbtools import open_run

    root = tmp_path / "out"
    x = tmp_path / "x.mp4"
    write_clip(x, [(11, 20, 0.0)])
    with x.open("ab") as fh:  # past the first megabyte, which the key reads
        fh.write(bytes(2 << 20))
    earlier = Run.create(root / movie_id(x), x).run_dir
    y = tmp_path / "y.mp4"
    data = bytearray(x.read_bytes())
    data[-1] ^= 0xFF  # the same size and first megabyte, another end
    y.write_bytes(bytes(data))
    assert movie_id(y)[-8:] == movie_id(x)[-8:]
    assert run_folder_in(root, y) == root / movie_id(y)
    shutil.copy(x, tmp_path / "x copy.mp4")
    assert run_folder_in(root, tmp_path / "x copy.mp4") == earlier
    x.rename(tmp_path / "renamed.mp4")
    assert run_folder_in(root, tmp_path / "renamed.mp4") == earlier
    cfg = load_config(None, {"paths.output_dir": str(root)}, use_local=False)
    monkeypatch.setattr("diffusion_bunny.nbtools.show_pictures_as_jpeg", lambda: False)
    assert open_run(None, tmp_path / "renamed.mp4", cfg).run_dir == earlier


def test_a_movie_the_folder_run_had_not_reached_runs_alone_in_its_run_folder(tmp_path, capsys):
    """After a folder run stopped before a movie (Ctrl-C), that movie given alone with the folder
    run's --out was refused: "already holds files and is no run folder"."""
    folder = tmp_path / "movies"
    folder.mkdir()
    write_clip(folder / "a.mp4", [(11, 20, 0.0)])
    write_clip(folder / "b.mp4", [(13, 20, 0.0)])
    out = tmp_path / "out"
    assert main(["run", str(folder), "--out", str(out), "--stages", "extract", "--quiet"]) == 0
    shutil.rmtree(out / movie_id(folder / "b.mp4"))  # as if the run stopped before it
    assert given_run_folder(out, folder / "b.mp4") == out / movie_id(folder / "b.mp4")
    assert main(["run", str(folder / "b.mp4"), "--out", str(out), "--stages", "extract", "--quiet"]) == 0
    assert _run_folders(out) == sorted(movie_id(folder / name) for name in ("a.mp4", "b.mp4"))
    # A folder of the user's own things stays what --out names, and is refused.
    own = tmp_path / "own"
    own.mkdir()
    (own / "notes.txt").write_text("mine")
    assert given_run_folder(own, folder / "b.mp4") == own


def test_a_damaged_run_json_does_not_let_another_movie_take_the_folder(tmp_path, capsys):
    """A run folder whose run.json was cut short was rewritten for whatever movie was given: its
    frames, tables and the corrections made by hand in it were replaced by another movie's."""
    a, b = tmp_path / "a.mp4", tmp_path / "b.mp4"
    write_clip(a, [(11, 20, 0.0)])
    write_clip(b, [(13, 20, 0.0)])
    run_dir = tmp_path / "run"
    assert main(["run", str(a), "--out", str(run_dir), "--stages", "extract", "--quiet"]) == 0
    frames = Run.open(run_dir).read_table("frames")["frame_id"].to_list()
    (run_dir / "run.json").write_text(json.dumps({"movie": str(a)})[:-1])  # cut short
    capsys.readouterr()
    assert main(["run", str(b), "--out", str(run_dir), "--stages", "extract", "--quiet"]) == 2
    assert "holds the run of another movie" in capsys.readouterr().err
    assert (run_dir / "run.json").read_text().endswith('"')  # left as it was
    # Its own movie repairs it, and finds its frames.
    assert main(["run", str(a), "--out", str(run_dir), "--stages", "extract", "--quiet"]) == 0
    assert Run.open(run_dir).read_table("frames")["frame_id"].to_list() == frames
