"""Atomic writes of files and whole folders: a crash leaves the previous version, and what a killed
process left behind is repaired (or removed) by the next one, never what a live one is writing."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import polars as pl
import pytest

from diffusion_bunny.pipeline.atomic import (
    atomic_write_bytes,
    atomic_write_parquet,
    process_alive,
    process_started_at,
    recover_folder,
    staged_folder,
    sweep_leftovers,
    writer_alive,
)


def dead_pid() -> int:
    """The id of a process that has just ended."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_file_writes_replace_whole_files_and_leave_no_temporaries(tmp_path):
    atomic_write_bytes(tmp_path / "a" / "x.bin", b"one")
    atomic_write_bytes(tmp_path / "a" / "x.bin", b"two")
    atomic_write_parquet(tmp_path / "a" / "t.parquet", pl.DataFrame({"n": [1, 2]}))
    assert (tmp_path / "a" / "x.bin").read_bytes() == b"two"
    assert pl.read_parquet(tmp_path / "a" / "t.parquet")["n"].to_list() == [1, 2]
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["t.parquet", "x.bin"]
    # A write that fails leaves the old file and no temporary file.
    with pytest.raises(TypeError):
        atomic_write_bytes(tmp_path / "a" / "x.bin", "not bytes")  # type: ignore[arg-type]
    assert (tmp_path / "a" / "x.bin").read_bytes() == b"two"
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["t.parquet", "x.bin"]


def test_a_staged_folder_replaces_the_old_one_only_when_complete(tmp_path):
    final = tmp_path / "dataset"
    with staged_folder(final) as staging:
        (staging / "a.txt").write_text("first")
    assert (final / "a.txt").read_text() == "first"
    with pytest.raises(RuntimeError), staged_folder(final) as staging:
        (staging / "b.txt").write_text("half")
        raise RuntimeError("killed halfway")
    assert sorted(p.name for p in final.iterdir()) == ["a.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["dataset"]


def test_leftovers_of_dead_processes_are_repaired_and_a_live_ones_kept(tmp_path):
    final = tmp_path / "frames"
    dead = dead_pid()
    assert not process_alive(dead) and process_alive(os.getpid())
    # A swap cut short: the folder is gone, its old copy lies beside it.
    (tmp_path / f".frames.old-{dead}-00aa" / "x").mkdir(parents=True)
    (tmp_path / f".frames.staging-{dead}-00bb").mkdir()
    # Another process, still running, is writing its own staging folder.
    mine = tmp_path / f".frames.staging-{os.getpid()}-00cc"
    mine.mkdir()
    recover_folder(final)
    assert (final / "x").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == [mine.name, "frames"]
    # Both present: the swap finished; only the old copy is left to remove.
    (tmp_path / f".frames.old-{dead}-00dd").mkdir()
    recover_folder(final)
    assert sorted(p.name for p in tmp_path.iterdir()) == [mine.name, "frames"]


def test_a_process_start_is_read_as_a_wall_clock_time():
    before = time.time()
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        started = process_started_at(proc.pid)
        # The boot time it counts from is read to the second.
        assert started is not None and before - 1.5 <= started <= time.time() + 0.5
    finally:
        proc.kill()
        proc.wait()
    assert process_started_at(dead_pid()) is None


def test_a_leftover_whose_pid_now_names_a_later_process_is_repaired(tmp_path, monkeypatch):
    """Pids are reused (in a container the run's command is pid 1 every time): a swap cut short
    by a kill left ``.frames.old-<pid>-...`` whose pid now names a process, here this one, that
    started after it. Judged by the pid alone the folder was "in use" and never put back. A
    staging folder this process made after it started is still left alone. (A file's change
    time cannot be set back, so the later start is what is stood in for.)"""
    from diffusion_bunny.pipeline import atomic

    me = os.getpid()
    leftover = tmp_path / f".frames.old-{me}-00aa"
    (leftover / "x.jpg").parent.mkdir()
    (leftover / "x.jpg").write_text("kept")
    (tmp_path / f".tables.tmp-{me}-00bb").write_text("half")
    changed = os.lstat(leftover).st_ctime
    monkeypatch.setattr(atomic, "process_started_at", lambda pid: changed + 60 if pid == me else None)
    assert not writer_alive(me, leftover) and process_alive(me)
    sweep_leftovers(tmp_path)
    assert (tmp_path / "frames" / "x.jpg").read_text() == "kept"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["frames"]
    # Started before it (or its start unknown): its own work in progress.
    monkeypatch.setattr(atomic, "process_started_at", lambda pid: changed - 60)
    staging = tmp_path / f".thumbs.staging-{me}-00cc"
    staging.mkdir()
    sweep_leftovers(tmp_path)
    assert staging.is_dir() and writer_alive(me, staging)


def test_two_openers_recovering_one_cut_swap_both_go_on(tmp_path, monkeypatch):
    """A swap cut short leaves ``.frames.old-<pid>-...`` and no ``frames/``; two notebooks opening
    the run at once both saw it, one put it back, and the other stopped on a FileNotFoundError."""
    from diffusion_bunny.pipeline import atomic

    final = tmp_path / "frames"
    gone = tmp_path / ".frames.old-99999999-deadbeef"  # listed, then put back by the other opener
    monkeypatch.setattr(atomic, "_leftovers", lambda f, kind: [(gone, 99999999)] if kind == "old" else [])
    monkeypatch.setattr(atomic, "process_alive", lambda pid: False)
    atomic.recover_folder(final)  # no error: nothing left to do
