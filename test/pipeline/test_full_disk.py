"""A full disk under each writer (frames, tables, the dataset; stage 07's latents, checkpoints and
LoRA are in ``test/stages/train/test_train.py``): one line naming the file a user knows (never a
temporary name) and what is free, no partial file taken for done, and a rerun once space is
freed that picks up where the run stopped.

The disk is a real small file system where the tests run as root (a tmpfs the test mounts, filled
to the byte count it wants by a ballast file: :mod:`small_disk`); elsewhere each writer gets the
error it gets on a full disk, injected (:func:`small_disk.inject_full_disk`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import polars as pl
import pytest
from clips import write_clip
from small_disk import inject_full_disk, small_disk

from diffusion_bunny.cli import main
from diffusion_bunny.config import load_config
from diffusion_bunny.errors import StorageError, storage_error
from diffusion_bunny.pipeline.run import Run

MB = 1 << 20


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    movie = tmp_path_factory.mktemp("full_disk") / "clip.mp4"
    write_clip(movie, [(71, 12, 0.0), (72, 12, 2.0)], width=480, height=272)
    return movie


def leftovers(folder: Path) -> list[str]:
    """Temporary files and staging folders of atomic writes still there."""
    return [p.name for p in folder.rglob(".*") if any(k in p.name for k in (".tmp-", ".staging-", ".old-"))]


def one_line(error: BaseException) -> str:
    """The line ``bunny`` prints for ``error`` (a StorageError as it is, an OSError converted)."""
    if not isinstance(error, StorageError):
        error = storage_error(error)
    assert error is not None, "not a storage error"
    message = str(error)
    assert "\n" not in message
    return message


def test_tables_on_a_full_disk_keep_the_old_table_and_name_the_file(tmp_path, monkeypatch, clip):
    big = pl.DataFrame({"frame_id": [f"f{i:07d}" for i in range(200_000)], "score": range(200_000)})
    with small_disk(tmp_path, 32 * MB) as disk:
        root = disk.root if disk else tmp_path
        run = Run.create(root / "run", clip)
        run.write_table("quality", big.head(10))
        before = run.table_path("quality").read_bytes()
        if disk:
            disk.fill(leave=64 * 1024)
        else:
            inject_full_disk(monkeypatch, run.run_dir)
        with pytest.raises(OSError) as err, run.commit("quality") as tables:
            tables["quality"] = big
        message = one_line(err.value)
        assert message.startswith(f"could not write {run.table_path('quality')}: No space left on device (")
        assert "free there" in message
        assert run.table_path("quality").read_bytes() == before and leftovers(run.run_dir) == []
        if disk:
            disk.empty()
        else:
            monkeypatch.undo()
        with run.commit("quality") as tables:
            tables["quality"] = big
        assert run.read_table("quality").height == big.height


def test_an_edit_of_two_tables_on_a_full_disk_writes_neither(tmp_path, monkeypatch, clip):
    """A hand edit writes its record and the table it changes: the disk filled in the second, the
    first (and its backup) was already written, so an edit reported as failed was applied by the
    next run of the stage. Every table is now whole on disk before any is renamed into place."""
    import errno

    big = pl.DataFrame({"frame_id": [f"f{i:07d}" for i in range(200_000)], "score": range(200_000)})
    with small_disk(tmp_path, 32 * MB) as disk:
        root = disk.root if disk else tmp_path
        run = Run.create(root / "run", clip)
        with run.commit("caption_edits", "captions", by_hand=True) as tables:
            tables["caption_edits"] = pl.DataFrame({"frame_id": ["f0"], "caption": ["old words"]})
            tables["captions"] = big.head(10)
        before = {n: run.table_path(n).read_bytes() for n in ("caption_edits", "captions")}
        backups = sorted((run.tables_dir / "backup").iterdir())
        kept = {p.name: p.read_bytes() for p in backups}
        if disk:
            disk.fill(leave=64 * 1024)
        else:
            write = pl.DataFrame.write_parquet

            def full(df, path, *a, **k):
                if df.height > 1000:
                    raise OSError(errno.ENOSPC, "No space left on device")
                return write(df, path, *a, **k)

            monkeypatch.setattr(pl.DataFrame, "write_parquet", full)
        with pytest.raises(OSError) as err, run.commit("caption_edits", "captions", by_hand=True) as tables:
            tables["caption_edits"] = pl.DataFrame({"frame_id": ["f0"], "caption": ["new words"]})
            tables["captions"] = big
        assert one_line(err.value).startswith(f"could not write {run.table_path('captions')}: No space left")
        assert {n: run.table_path(n).read_bytes() for n in before} == before
        assert {p.name: p.read_bytes() for p in sorted((run.tables_dir / "backup").iterdir())} == kept
        assert leftovers(run.run_dir) == []


def test_frames_on_a_full_disk_are_one_line_and_the_rerun_extracts(tmp_path, monkeypatch, clip):
    from diffusion_bunny.stages import run_stage

    cfg = load_config(None, {"extract.detector": "content"}, root=tmp_path)
    with small_disk(tmp_path, 64 * MB) as disk:
        root = disk.root if disk else tmp_path
        run = Run.create(root / "run", clip)
        if disk:
            disk.fill(leave=96 * 1024)  # the lock's lease goes in, the frames do not
        else:
            inject_full_disk(monkeypatch, run.run_dir / ".frames")
            inject_full_disk(monkeypatch, run.run_dir / ".thumbs")
        with pytest.raises(OSError) as err:
            run_stage(run, "extract", cfg, progress=False)
        message = one_line(err.value)
        # The picture the user will look for, not the staging folder it was written through.
        assert message.startswith(
            (f"could not write {run.run_dir}/frames/", f"could not write {run.run_dir}/thumbs/")
        )
        assert ".staging-" not in message and "No space left on device" in message
        assert not (run.run_dir / "frames").exists() and leftovers(run.run_dir) == []
        assert run.read_manifest("extract") is None and not run.has_table("frames")
        if disk:
            disk.empty()
        else:
            monkeypatch.undo()
        tables = run_stage(run, "extract", cfg, progress=False)
        assert all((run.run_dir / p).is_file() for p in tables["frames"]["path"])


def test_the_dataset_on_a_full_disk_is_one_line_and_the_rerun_exports(tmp_path, monkeypatch, scenes_demo_run):
    from diffusion_bunny.stages import run_stage

    demo, overrides = scenes_demo_run
    cfg = load_config(None, overrides, root=tmp_path / "noconfig")
    with small_disk(tmp_path, 256 * MB) as disk:
        root = disk.root if disk else tmp_path
        shutil.copytree(demo.run_dir, root / "run")
        run = Run.open(root / "run")
        kept = run.read_table("quality").filter(pl.col("keep"))["frame_id"].to_list()
        captions = pl.DataFrame(
            {
                "frame_id": kept,
                "caption": [f"bunnystyle, frame {i}" for i in range(len(kept))],
                "tags": [["frame"]] * len(kept),
                "provider": "template",
                "status": "ok",
            }
        )
        run.write_table("captions", captions)
        if disk:
            disk.fill(leave=96 * 1024)
        else:
            inject_full_disk(monkeypatch, run.run_dir / ".dataset")
        with pytest.raises(OSError) as err:
            run_stage(run, "export", cfg, progress=False)
        message = one_line(err.value)
        assert message.startswith(f"could not write {run.run_dir}/dataset/") and ".staging-" not in message
        assert not (run.run_dir / "dataset").exists() and leftovers(run.run_dir) == []
        assert run.read_manifest("export") is None
        if disk:
            disk.empty()
        else:
            monkeypatch.undo()
        tables = run_stage(run, "export", cfg, progress=False)
        assert tables["dataset_items"].height and (run.run_dir / "dataset" / "hf" / "train").is_dir()


def test_bunny_run_on_a_full_disk_says_it_in_one_line_and_exit_status_2(tmp_path, clip, capsys):
    """Through a stage notebook's kernel, where only the error's text crosses back."""
    with small_disk(tmp_path, 64 * MB) as disk:
        if disk is None:
            pytest.skip("needs a small file system of its own (root, to mount a tmpfs)")
        out = disk.root / "run"
        args = ["run", str(clip), "--out", str(out), "--stages", "extract", "--quiet"]
        args += ["--set", "extract.detector=content"]
        disk.fill(leave=48 * 1024)  # run.json, the lease and the notebook's copy go in, not the frames
        capsys.readouterr()
        assert main(args) == 2
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and "Traceback" not in err, err
        assert lines[0].startswith(f"error: could not write {out}/") and ".staging-" not in lines[0], lines[0]
        assert "No space left on device (" in lines[0] and "free there" in lines[0]
        disk.empty()
        assert main(args) == 0
        assert pl.read_parquet(out / "tables" / "frames.parquet").height > 0


def test_a_file_where_the_cache_folder_should_be_is_one_line(tmp_path, monkeypatch, clip, capsys):
    """``DIFFUSION_BUNNY_CACHE`` under a file (a typo, a file named like the folder): stage 05's
    answer store could not be made, and the run stopped "with a bug" (NotADirectoryError)."""
    (tmp_path / "afile").write_text("x")
    monkeypatch.setenv("DIFFUSION_BUNNY_CACHE", str(tmp_path / "afile" / "cache"))
    out = tmp_path / "run"
    stages = "extract,quality,characters,scenes,captions"
    args = ["run", str(clip), "--out", str(out), "--stages", stages, "--set", "extract.detector=content"]
    assert main([*args, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "could not write " + str(tmp_path / "afile" / "cache") in err
    assert "a file stands where a folder of this path should be" in err and "bug" not in err
    assert Run.open(out).read_manifest("scenes")  # the stages before it are kept
