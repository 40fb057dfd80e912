"""The review board of stage 04 from Python: the folders it builds from a run, and the messages its
front end sends (a move, a refresh), handled exactly as they arrive from the browser (through the
widget's comm handler). ``test_browser.py`` drives the same board in JupyterLab."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys

import polars as pl
import pytest
from PIL import Image

from diffusion_bunny.stages.scenes.board import THUMB_WIDTH, ReviewBoard
from diffusion_bunny.stages.scenes.stage import board_state


def from_browser(board: ReviewBoard, content: dict) -> list[dict]:
    """Deliver ``content`` as the front end's ``model.send`` does; the messages sent back."""
    sent: list[dict] = []
    board.send = lambda msg, buffers=None: sent.append(msg)  # type: ignore[method-assign]
    board._handle_custom_msg(content, [])
    return sent


def folder(board: ReviewBoard, cluster_id: str) -> dict:
    return next(f for f in board.folders if f["id"] == cluster_id)


def ids_in(board: ReviewBoard, cluster_id: str) -> list[str]:
    return [f["frame_id"] for f in folder(board, cluster_id)["frames"]]


def scene_of(run, frame_id: str, level: str = "scene") -> pl.DataFrame:
    clusters = run.read_table("clusters")
    return clusters.filter((pl.col("frame_id") == frame_id) & (pl.col("level") == level))


def test_folders_follow_the_run_with_thumbnails(board_run):
    run, _ = board_run
    board = ReviewBoard(run)
    state = board_state(run.run_dir, "scene")
    assert [f["id"] for f in board.folders] == [f["id"] for f in state]
    assert board.folders[-1]["id"] == "noise" and board.folders[-1]["count"] >= 1
    assert [f["key"] for f in board.folders] == [str(i + 1) for i in range(len(state) - 1)] + ["n"]
    kept = run.read_table("quality").filter(pl.col("keep")).height
    assert sum(f["count"] for f in board.folders) == kept
    for shown, truth in zip(board.folders, state, strict=True):
        assert shown["name"] == truth["name"] and shown["more"] == 0
        assert [f["frame_id"] for f in shown["frames"]] == [f["frame_id"] for f in truth["frames"]]
    # Every frame's thumbnail is in the browser as a small JPEG data URL.
    frame_ids = [f["frame_id"] for fo in board.folders for f in fo["frames"]]
    assert sorted(board.thumbs) == sorted(frame_ids)
    for url in board.thumbs.values():
        assert url.startswith("data:image/jpeg;base64,")
        with Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))) as image:
            assert image.format == "JPEG" and image.width <= THUMB_WIDTH
    # What goes to the browser must be plain JSON (no numpy or polars values).
    json.dumps({"folders": board.folders, "thumbs": board.thumbs})
    noise = folder(board, "noise")["frames"][0]
    assert noise["similarity"] is None
    assert all(f["similarity"] is not None for f in board.folders[0]["frames"])


def test_a_drop_from_the_browser_appends_feedback_and_refreshes(board_run):
    run, _ = board_run
    board = ReviewBoard(run)
    frame = ids_in(board, "noise")[0]
    target = board.folders[0]["id"]
    count_before, noise_before = board.folders[0]["count"], folder(board, "noise")["count"]
    thumbs_before = board.thumbs
    sent = from_browser(board, {"type": "move", "frame_id": frame, "cluster_id": target, "level": "scene"})
    assert sent == [{"type": "done"}]
    feedback = run.read_table("feedback")
    assert feedback.height == 1
    row = feedback.row(0, named=True)
    assert (row["anchor_id"], row["from_cluster"], row["to_cluster"], row["label"], row["level"]) == (
        frame,
        "noise",
        target,
        1,
        "scene",
    )
    assert board.moves[0]["event_id"] == row["event_id"]
    on_disk = scene_of(run, frame)
    assert on_disk["cluster_id"][0] == target and on_disk["manual"][0]
    # The board shows the disk: the frame in its new folder, marked as placed by hand.
    assert frame in ids_in(board, target) and frame not in ids_in(board, "noise")
    assert folder(board, target)["count"] == count_before + 1
    assert folder(board, "noise")["count"] == noise_before - 1
    assert next(f for f in folder(board, target)["frames"] if f["frame_id"] == frame)["manual"]
    assert board.status_kind == "ok" and f"moved {frame} from noise to" in board.status
    assert board.thumbs is thumbs_before  # no picture is sent again for a move


def test_the_board_after_a_kernel_restart_shows_the_move(board_run):
    run, _ = board_run
    board = ReviewBoard(run)
    frame, target = ids_in(board, "noise")[0], board.folders[0]["id"]
    assert board.move(frame, target) is not None
    # A new process (as after a kernel restart) builds the board from disk alone.
    code = (
        "import sys; from diffusion_bunny.stages.scenes.board import ReviewBoard; "
        "print(ReviewBoard(sys.argv[1]).folder_of(sys.argv[2]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(run.run_dir), frame], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == target


def test_a_bad_move_says_why_on_the_board(board_run):
    run, _ = board_run
    board = ReviewBoard(run)
    folders_before = board.folders
    sent = from_browser(board, {"type": "move", "frame_id": "nope", "cluster_id": "s001", "level": "scene"})
    assert sent == [{"type": "done"}]  # the front end clears its pending marks on a refusal too
    assert board.status_kind == "error"
    assert board.status.startswith("not moved: frame 'nope' is not in this run's clusters")
    assert "Traceback" not in board.status and board.last_error == board.status
    frame = ids_in(board, "noise")[0]
    board.move(frame, "s999")
    assert "cluster 's999' does not exist at the scene level" in board.status
    # A drop that left the browser in one view and arrives after the switch to the other.
    from_browser(board, {"type": "move", "frame_id": frame, "cluster_id": "s001", "level": "character"})
    assert board.status_kind == "error" and "switched to the scene view" in board.status
    assert board.folders == folders_before
    assert not run.has_table("feedback") or run.read_table("feedback").is_empty()
    # The next good move clears the error.
    board.move(frame, board.folders[0]["id"])
    assert board.status_kind == "ok" and board.last_error is None


def test_an_unexpected_failure_stays_on_the_board(board_run, monkeypatch):
    import diffusion_bunny.stages.scenes.board

    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire")

    run, _ = board_run
    board = ReviewBoard(run)
    monkeypatch.setattr(diffusion_bunny.stages.scenes.board, "move_to_cluster", broken)
    assert board.move(ids_in(board, "noise")[0], "s001") is None
    assert board.status == "not moved, unexpected RuntimeError: disk on fire (a bug; see the kernel log)"
    assert from_browser(board, {"type": "dance"}) == [{"type": "done"}]
    assert board.status == "unknown message from the board: 'dance'"


def test_view_toggle_shows_character_sub_clusters(board_run):
    run, _ = board_run
    board = ReviewBoard(run)
    scene_ids = [f["id"] for f in board.folders]
    board.view = "character"  # as the front end's toggle sets it
    ids = [f["id"] for f in board.folders]
    assert ids == [f["id"] for f in board_state(run.run_dir, "character")]
    assert ids[-1] == "noise" and all("/" in i for i in ids[:-1])
    assert {i.split("/")[0] for i in ids[:-1]} <= set(scene_ids)
    names = {f["name"] for f in board.folders}
    assert any("astronaut" in n for n in names) and any("grace_hopper" in n for n in names)
    # A move in this view is a character-level move.
    frame = board.folders[0]["frames"][0]["frame_id"]
    other = next(i for i in ids[:-1] if i != board.folders[0]["id"])
    sent = from_browser(board, {"type": "move", "frame_id": frame, "cluster_id": other, "level": "character"})
    assert sent == [{"type": "done"}] and board.status_kind == "ok"
    assert run.read_table("feedback")["level"].to_list() == ["character"]
    assert scene_of(run, frame, "character")["cluster_id"][0] == other
    assert frame in ids_in(board, other)
    # A new folder is a scene-level thing.
    board.move(frame, "new")
    assert board.status_kind == "error" and "only be made at the scene level" in board.status
    board.view = "scene"
    assert [f["id"] for f in board.folders][-1] == "noise" and "/" not in board.folders[0]["id"]


def test_new_folder_and_reload(board_run):
    from diffusion_bunny.stages.scenes.stage import move_to_cluster

    run, _ = board_run
    board = ReviewBoard(run)
    frame = ids_in(board, "noise")[0]
    row = board.move(frame, "new")
    assert row is not None and row["to_cluster"] not in {f["id"] for f in board_state(run.run_dir)} - {
        row["to_cluster"]
    }
    assert ids_in(board, row["to_cluster"]) == [frame]
    # A move made elsewhere (another notebook) shows after **reload**.
    other = ids_in(board, "noise")[0]
    move_to_cluster(run.run_dir, other, row["to_cluster"])
    assert other not in ids_in(board, row["to_cluster"])
    assert from_browser(board, {"type": "refresh"}) == [{"type": "done"}]
    assert other in ids_in(board, row["to_cluster"])


def test_max_thumbs_caps_each_folder(board_run):
    run, _ = board_run
    board = ReviewBoard(run, max_thumbs=1)
    assert any(f["count"] > 1 for f in board.folders)
    for f in board.folders:
        assert len(f["frames"]) == min(1, f["count"]) and f["more"] == f["count"] - len(f["frames"])
    assert len(board.thumbs) == sum(len(f["frames"]) for f in board.folders)
    with pytest.raises(ValueError, match="max_thumbs must be at least 1"):
        ReviewBoard(run, max_thumbs=0)


def test_missing_thumbnail_and_empty_noise_bucket(board_run):
    run, _ = board_run
    board = ReviewBoard(run)
    first = board.folders[0]["frames"][0]["frame_id"]
    # No thumbnail: board_state falls back to the full frame, which goes out scaled down...
    (run.run_dir / "thumbs" / f"{first}.jpg").unlink()
    full = ReviewBoard(run).thumbs[first]
    with Image.open(io.BytesIO(base64.b64decode(full.split(",", 1)[1]))) as image:
        assert image.width == THUMB_WIDTH
    # ...and with neither file the board still opens, with a placeholder for that frame.
    (run.run_dir / "frames" / f"{first}.jpg").unlink()
    for frame in ids_in(board, "noise"):
        board.move(frame, board.folders[0]["id"])
    board = ReviewBoard(run)
    assert board.thumbs[first] is None
    # An empty noise bucket stays on the board: it is where a stray frame is dragged.
    assert board.folders[-1] == {
        "id": "noise",
        "name": "noise",
        "count": 0,
        "key": "n",
        "more": 0,
        "frames": [],
    }


def test_front_end_files_ship_inside_the_package():
    from diffusion_bunny.stages.scenes.board import STATIC

    js = (STATIC / "board.js").read_text()
    assert "export default { render }" in js and "data-lm-suppress-shortcuts" in js
    for hook in ("dataset.frameId", "dataset.clusterId", 'dataset.role = "status"'):
        assert hook in js
    assert (STATIC / "board.css").read_text().count(".db-") > 10
    assert str(ReviewBoard._esm) == (STATIC / "board.js").read_text()


def test_notebook_04_runs_headless_with_the_board(board_run, tmp_path):
    """Notebook 04 as JupyterLab runs it (interactive=True) in a kernel: the stage is up to date
    (same overrides), the summary prints, and the board's cell displays one board."""
    import nbformat
    import papermill
    from paths import ROOT as root

    run, overrides = board_run
    finished = run.read_manifest("scenes")["finished"]
    nb = papermill.execute_notebook(
        str(root / "notebook" / "04_cluster_scenes.ipynb"),
        str(tmp_path / "nb.ipynb"),
        parameters={
            "run_dir": str(run.run_dir),
            "overrides": overrides,
            "interactive": True,
            "simulate_reviewer": False,  # the demo test covers it; here only the board matters
        },
        kernel_name="python3",
        progress_bar=False,
        execution_timeout=600,
        cwd=str(root / "notebook"),
    )
    text = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
    noise = run.read_table("clusters").filter(
        (pl.col("level") == "scene") & (pl.col("cluster_id") == "noise")
    )
    assert f"{noise.height} in the noise bucket; 0 correction(s) by hand so far" in text
    board_cell = next(c for c in nb.cells if "ReviewBoard(" in c.source)
    views = [o for o in board_cell.outputs if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    assert len(views) == 1
    assert run.read_manifest("scenes")["finished"] == finished  # skipped: up to date
    nbformat.validate(nb)


def test_a_folders_key_and_place_stay_while_the_board_lives(board_run):
    """Keys were given by size on every refresh: after a move made the third folder the
    largest, pressing 3 again sent the next frame to another folder (a wrong move, which the
    adapter then learns from). Each folder keeps its key and place while the board lives."""
    run, _ = board_run
    board = ReviewBoard(run)
    before = {f["id"]: f["key"] for f in board.folders}
    order = [f["id"] for f in board.folders]
    numbered = [f for f in board.folders if f["id"] != "noise"]
    assert len(numbered) >= 2
    last, first = numbered[-1], numbered[0]
    for frame in ids_in(board, first["id"]):  # the first folder's frames all go to the last one
        board.move(frame, last["id"])
    assert folder(board, last["id"])["count"] > first["count"]  # the last one is the largest now
    assert {f["id"]: f["key"] for f in board.folders} == {
        k: v for k, v in before.items() if k in {f["id"] for f in board.folders}
    }
    assert [f["id"] for f in board.folders] == [i for i in order if i in {f["id"] for f in board.folders}]
    # A new board (a rerun of the cell) numbers the folders by size again.
    again = ReviewBoard(run)
    assert again.folders[0]["id"] == last["id"] and again.folders[0]["key"] == "1"
