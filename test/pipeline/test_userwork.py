"""Tables a person made (cluster moves in ``feedback`` and ``clusters``, typed captions
in ``caption_edits``) keep a backup of their last good version; a damaged one is restored from it
with a warning, and without a readable backup one line names the file and how to recover."""

from __future__ import annotations

import logging

import polars as pl
import pytest

from diffusion_bunny.config import load_config
from diffusion_bunny.errors import StageError
from diffusion_bunny.pipeline.userwork import backup_path, read_kept, write_kept


def _damage(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # a torn file: no parquet footer


def test_damaged_table_is_restored_from_its_backup_or_named_in_one_line(tmp_path):
    path = tmp_path / "tables" / "feedback.parquet"
    path.parent.mkdir()
    first = pl.DataFrame({"event_id": ["a"], "label": [1]})
    write_kept(path, first)
    latest = pl.concat([first, pl.DataFrame({"event_id": ["b"], "label": [0]})])
    write_kept(path, latest)
    assert pl.read_parquet(backup_path(path)).equals(latest)  # the last good version, not the one before

    _damage(path)
    with pytest.warns(UserWarning, match=r"feedback.parquet was damaged .* restored from its backup"):
        assert read_kept(path).equals(latest)
    assert pl.read_parquet(path).equals(latest)
    assert len(list(backup_path(path).parent.glob("feedback.damaged-*.parquet"))) == 1  # kept to look at

    _damage(path)
    _damage(backup_path(path))
    with pytest.raises(StageError) as err:
        read_kept(path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message
    assert "no readable backup" in message and "move it aside to start the corrections over" in message


def test_a_damaged_table_in_a_folder_that_cannot_be_written_is_read_from_its_backup(tmp_path, monkeypatch):
    """``bunny status`` on a read-only run folder whose table of corrections was damaged ended on
    the restore's write (exit 2, no status): the backup is read as it is, and the restore waits
    for a command that may write."""
    import errno

    from diffusion_bunny.pipeline import userwork
    from diffusion_bunny.pipeline.run import Run

    run = Run(tmp_path / "run")
    path = run.table_path("caption_edits")
    path.parent.mkdir(parents=True)
    edits = pl.DataFrame({"frame_id": ["f1"], "caption": ["my words"]})
    write_kept(path, edits)
    want = run.table_fingerprint("caption_edits")
    _damage(path)
    torn = path.read_bytes()

    def read_only(src, dst, *a, **k):
        raise PermissionError(errno.EACCES, "Permission denied", str(dst))

    monkeypatch.setattr(userwork.shutil, "copyfile", read_only)
    with pytest.warns(
        UserWarning, match=r"caption_edits.parquet is damaged .* could not be put back \(Permission denied\)"
    ):
        assert read_kept(path).equals(edits)
    assert path.read_bytes() == torn and not list(backup_path(path).parent.glob("*.damaged-*"))
    with pytest.warns(UserWarning, match="could not be put back"):
        assert run.table_fingerprint("caption_edits")["sha256"] == want["sha256"]  # as once restored
    monkeypatch.undo()  # writable again: the next read restores it
    with pytest.warns(UserWarning, match="restored from its backup"):
        assert read_kept(path).equals(edits)
    assert pl.read_parquet(path).equals(edits)


def test_a_damaged_table_of_corrections_without_a_backup_is_not_sent_to_be_rebuilt(tmp_path):
    """A run made before backups (or copied without ``tables/backup/``): its damaged
    ``appearance_edits`` was called a stage's table to "run again with --force", which cannot
    rebuild corrections and gave the same line again. The tables people write are named by the
    stages' ``edits``, backup or not."""
    from diffusion_bunny.pipeline.run import Run
    from diffusion_bunny.stages import PIPELINE

    assert {e for stage in PIPELINE.stages for e in stage.edits} == {
        "appearance_edits",
        "feedback",
        "caption_edits",
    }
    run = Run(tmp_path / "run")
    path = run.table_path("appearance_edits")
    path.parent.mkdir(parents=True)
    pl.DataFrame({"face_id": ["f0_00"], "character": ["anna"]}).write_parquet(path)
    assert run.read_table("appearance_edits")["character"].to_list() == ["anna"]
    _damage(path)
    assert not backup_path(path).exists()
    with pytest.raises(StageError) as err:
        run.read_table("appearance_edits")
    message = str(err.value)
    assert "corrections made by hand" in message and "--force" not in message and "\n" not in message
    # Its fingerprint (what bunny status and a stage's inputs read first) and its height say so too.
    for read in (run.table_fingerprint, run.table_height):
        with pytest.raises(StageError, match="corrections made by hand") as err:
            read("appearance_edits")
        assert "--force" not in str(err.value)


# The stages' side (04 and 05 on a damaged table) is in test/stages/captions/test_caption_reliability.py,
# beside the other tests on the demo run through stage 04 (one session fixture per xdist worker).


def test_a_damaged_stage_table_is_one_line_and_its_stage_rebuilds_it(tmp_path):
    """A table a stage computed (here ``frames``) is not restored but rebuilt: reading it is one
    line saying so, ``bunny status`` shows its stage stale, and rerunning that stage heals it."""
    from clips import write_clip

    from diffusion_bunny.pipeline.run import Run
    from diffusion_bunny.pipeline.status import run_status
    from diffusion_bunny.stages import PIPELINE, run_stage

    movie = tmp_path / "tiny.mp4"
    write_clip(movie, [(51, 12, 0.0), (52, 12, 0.0)], width=96, height=64)
    cfg = load_config(root=tmp_path / "nocfg")
    run = Run.create(tmp_path / "run", movie)
    run_stage(run, "extract", cfg, progress=False)
    frames = run.read_table("frames")
    _damage(run.table_path("frames"))
    with pytest.raises(StageError) as err:
        run_stage(run, "quality", cfg, progress=False)
    message = str(err.value)
    assert "\n" not in message and f"table {run.table_path('frames')} is damaged" in message
    assert "run the stage that writes it again with --force" in message
    assert (
        dict((s, st) for s, st, _ in run_status(PIPELINE, run.run_dir, cfg, ["extract"]))["extract"]
        == "stale"
    )
    run_stage(run, "extract", cfg, progress=False, force=True)
    assert run.read_table("frames").equals(frames)
    run_stage(run, "quality", cfg, progress=False)
    # A stage whose own table is damaged reads it as work to reuse (stage 02's text scores): the
    # rerun the message advises computes it again instead of stopping at the same line.
    quality = run.read_table("quality")
    _damage(run.table_path("quality"))
    run_stage(run, "quality", cfg, progress=False, force=True)
    assert run.read_table("quality").equals(quality)


def test_a_run_folder_named_like_a_release_reads_its_tables(tmp_path):
    """Brackets and the other characters of a glob pattern in a run folder's path (``Film (2019)
    [1080p]``, a common folder name) are a name: its stages read their tables, ``bunny status``
    sees them done, a hand-made table and its damage check work there too."""
    from clips import write_clip

    from diffusion_bunny.pipeline.run import Run
    from diffusion_bunny.pipeline.status import run_status
    from diffusion_bunny.stages import PIPELINE, run_stage

    movie = tmp_path / "tiny.mp4"
    write_clip(movie, [(51, 12, 0.0), (52, 12, 0.0)], width=96, height=64)
    cfg = load_config(root=tmp_path / "nocfg")
    run = Run.create(tmp_path / "Film (2019) [1080p] {a,b} *?", movie)
    run_stage(run, "extract", cfg, progress=False)
    run_stage(run, "quality", cfg, progress=False)
    assert run.read_table("frames").height == run.table_height("frames") > 0
    states = dict((s, st) for s, st, _ in run_status(PIPELINE, run.run_dir, cfg, ["extract", "quality"]))
    assert states == {"extract": "done", "quality": "done"}
    kept = run.table_path("feedback")
    write_kept(kept, pl.DataFrame({"event_id": ["a"]}))
    _damage(kept)
    with pytest.warns(UserWarning, match="restored from its backup"):
        assert read_kept(kept)["event_id"].to_list() == ["a"]


def test_a_restore_cut_short_leaves_the_damaged_table_not_none(tmp_path, monkeypatch):
    """The damaged table was moved aside before the backup was copied in: a kill or a full disk
    between the two left no table, read as "no edits yet", and the next edit wrote a table of
    one row over the backup. The restore now replaces the table in one rename."""
    from diffusion_bunny.pipeline import userwork

    path = tmp_path / "tables" / "caption_edits.parquet"
    path.parent.mkdir()
    edits = pl.DataFrame({"frame_id": ["a", "b", "c"], "caption": ["one", "two", "three"]})
    write_kept(path, edits)
    _damage(path)

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(userwork, "atomic_path", full_disk)
    with pytest.warns(UserWarning, match=r"could not be put back \(No space left on device\)"):
        assert read_kept(path).equals(edits)  # from the backup, the table left as it was
    assert path.is_file() and pl.read_parquet(backup_path(path)).equals(edits)
    monkeypatch.undo()
    with pytest.warns(UserWarning, match="restored from its backup"):
        assert read_kept(path).equals(edits)


def test_a_restored_table_is_one_warning_line_on_the_terminal(tmp_path, capsys):
    """The restore's warning reached the terminal as Python prints a warning, with the source
    file and line under it; a user reads one ``warning:`` line (the log file keeps the rest). A
    warning of another package is shown as before."""
    import warnings

    from clips import write_clip

    from diffusion_bunny.cli import main
    from diffusion_bunny.pipeline.run import Run

    movie = tmp_path / "tiny.mp4"
    write_clip(movie, [(51, 12, 0.0)], width=96, height=64)
    run = Run.create(tmp_path / "run", movie)
    path = run.table_path("feedback")
    write_kept(path, pl.DataFrame({"event_id": ["a"], "label": [1]}))
    _damage(path)
    capsys.readouterr()
    main(["status", str(run.run_dir)])
    err = capsys.readouterr().err.splitlines()
    lines = [line for line in err if "was damaged" in line or line[:2] == "  "]
    assert len(lines) == 1 and lines[0].startswith(f"warning: {path} was damaged ("), lines
    assert "UserWarning" not in lines[0] and "restored from its backup" in lines[0]

    from diffusion_bunny.logs import _terminal_text

    other = warnings.formatwarning("old", DeprecationWarning, "/venv/site-packages/x/y.py", 3, "call()")
    record = logging.LogRecord("py.warnings", logging.WARNING, "", 0, other, None, None)
    assert _terminal_text(record) == other


def test_a_table_of_corrections_that_is_gone_while_its_backup_is_there_is_said(tmp_path):
    """``rm tables/caption_edits.parquet``: the edits were read as none and dropped without a
    word, their backup beside them. The table is not put back on its own (deleting it may be how
    a person starts over), but a warning says where the edits are and what to do."""
    from diffusion_bunny.pipeline.run import Run
    from diffusion_bunny.stages import PIPELINE

    assert "caption_edits" in {e for stage in PIPELINE.stages for e in stage.edits}
    run = Run(tmp_path / "run")
    path = run.table_path("caption_edits")
    path.parent.mkdir(parents=True)
    write_kept(path, pl.DataFrame({"frame_id": ["f1"], "caption": ["my words"]}))
    assert run.has_table("caption_edits")
    path.unlink()
    with pytest.warns(UserWarning) as caught:
        assert not run.has_table("caption_edits")
    (message,) = [str(w.message) for w in caught]
    assert message.startswith(f"{path} is gone, so the corrections made by hand in it are not applied")
    assert f"cp '{backup_path(path)}' '{path}'" in message
    backup_path(path).unlink()  # both gone: no corrections, nothing to say
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not run.has_table("caption_edits") and not run.has_table("frames")
