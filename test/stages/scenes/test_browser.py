"""Notebook 04's review board in a real JupyterLab, driven by headless Chromium: a frame dragged
out of the noise bucket onto a folder ends up on disk (``feedback`` + ``clusters``), and survives
a kernel restart.

Needs Debian's ``chromium`` (``.ci/run`` installs it); skipped with that reason where it is absent.
On 2 cores the first JupyterLab start, the kernel and the notebook take 30-60 s; the waits are
selector waits with generous limits, never fixed sleeps.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import polars as pl
from browser_harness import browser_marks, chromium_page, jupyter_lab, run_all
from paths import ROOT

SCREENS = ROOT / "data" / "screens"
NOTEBOOK = "04_cluster_scenes.ipynb"

pytestmark = browser_marks()


def prepare_notebook(run_dir: Path, overrides: dict, dest: Path) -> None:
    """Notebook 04 with its parameters set, as papermill would run it but not executed: JupyterLab
    runs it. The overrides are the ones the run's stage 04 was made with, so the notebook's
    ``run_stage`` finds the stage up to date."""
    import papermill

    papermill.execute_notebook(
        str(ROOT / "notebook" / NOTEBOOK),
        str(dest),
        parameters={
            "run_dir": str(run_dir),
            "overrides": overrides,
            "interactive": True,
            "simulate_reviewer": False,
        },
        prepare_only=True,
        kernel_name="python3",
        progress_bar=False,
    )


def board_locator(page, *, fresh: bool = True):
    """The board of the current run of the notebook (``fresh``: not one marked stale below)."""
    return page.locator(".db-board:not([data-stale])" if fresh else ".db-board")


def test_drag_from_noise_onto_a_folder_in_jupyterlab(board_run, tmp_path):
    from playwright.sync_api import expect

    run, overrides = board_run
    root = tmp_path / "lab"
    root.mkdir()
    prepare_notebook(run.run_dir, overrides, root / NOTEBOOK)
    clusters_before = run.read_table("clusters")
    noise_on_disk = clusters_before.filter((pl.col("level") == "scene") & (pl.col("cluster_id") == "noise"))
    assert noise_on_disk.height, f"no frame in the noise bucket with {overrides}; the test needs one"

    with jupyter_lab(root, tmp_path / "lab-state") as lab, chromium_page() as page:
        try:
            run_all(page, lab, NOTEBOOK, ready=".db-board .db-folder[data-cluster-id='noise'] .db-thumb")
            board = board_locator(page)
            board.scroll_into_view_if_needed()
            expect(board).to_have_attribute("data-view", "scene")

            # Drag the first picture of the noise bucket onto the first folder (HTML5 drag and drop).
            source = board.locator(".db-folder[data-cluster-id='noise'] .db-thumb").first
            frame = source.get_attribute("data-frame-id")
            target = board.locator(
                ".db-folder:not([data-cluster-id='noise']):not([data-cluster-id='new'])"
            ).first
            cluster = target.get_attribute("data-cluster-id")
            count_before = int(target.locator("[data-role='count']").inner_text())
            source.drag_to(target)

            # The kernel wrote the move and sent the folders back: the picture is in its new folder.
            moved = board.locator(
                f".db-folder[data-cluster-id='{cluster}'] .db-thumb[data-frame-id='{frame}']"
            )
            expect(moved).to_be_visible(timeout=60_000)
            expect(board.locator("[data-role='status']")).to_contain_text(f"moved {frame} from noise to")
            expect(target.locator("[data-role='count']")).to_have_text(str(count_before + 1))
            expect(
                board.locator(f".db-folder[data-cluster-id='noise'] [data-frame-id='{frame}']")
            ).to_have_count(0)
            SCREENS.mkdir(parents=True, exist_ok=True)
            board.screenshot(path=str(SCREENS / "review_board.png"))
            shutil.copy(SCREENS / "review_board.png", tmp_path / "review_board.png")

            # On disk: one feedback row for that drop, and the clusters table changed accordingly.
            feedback = run.read_table("feedback")
            assert feedback.height == 1
            row = feedback.row(0, named=True)
            assert (row["anchor_id"], row["from_cluster"], row["to_cluster"], row["label"]) == (
                frame,
                "noise",
                cluster,
                1,
            )
            assert row["level"] == "scene"
            after = run.read_table("clusters")
            scene_row = after.filter((pl.col("frame_id") == frame) & (pl.col("level") == "scene"))
            assert scene_row["cluster_id"][0] == cluster and scene_row["manual"][0]
            character_row = after.filter((pl.col("frame_id") == frame) & (pl.col("level") == "character"))
            assert character_row["cluster_id"][0].startswith(cluster + "/")
            changed = after.join(clusters_before, on=["frame_id", "level"], suffix="_before").filter(
                pl.col("cluster_id") != pl.col("cluster_id_before")
            )
            assert sorted(changed["frame_id"].unique()) == [frame]

            # Second way: click a picture and press a folder's number. JupyterLab binds "2" to
            # "make this cell a heading" in command mode; the board keeps the key to itself.
            second = board.locator(".db-folder[data-cluster-id='noise'] .db-thumb").first
            second_frame = second.get_attribute("data-frame-id")
            second.click()
            expect(second).to_have_class(re.compile(r"\bdb-selected\b"))
            page.keyboard.press("Escape")  # clears the selection, and does not leave the board
            expect(board.locator(".db-thumb.db-selected")).to_have_count(0)
            code_cells = page.locator(".jp-CodeCell").count()
            second.click()
            keyed = board.locator(".db-folder").nth(1)
            keyed_cluster = keyed.get_attribute("data-cluster-id")
            expect(keyed.locator(".db-key")).to_have_text("2")
            page.keyboard.press("2")
            expect(
                board.locator(
                    f".db-folder[data-cluster-id='{keyed_cluster}'] [data-frame-id='{second_frame}']"
                )
            ).to_be_visible(timeout=60_000)
            last = run.read_table("feedback").row(-1, named=True)
            assert (last["anchor_id"], last["from_cluster"], last["to_cluster"]) == (
                second_frame,
                "noise",
                keyed_cluster,
            )
            assert page.locator(".jp-CodeCell").count() == code_cells  # no code cell became a heading

            # The character view shows the frame in a sub-cluster of that scene.
            board.locator("button[data-view='character']").click()
            expect(board).to_have_attribute("data-view", "character")
            sub = board.locator(f".db-thumb[data-frame-id='{frame}']")
            expect(sub).to_have_attribute("data-cluster-id", character_row["cluster_id"][0])
            expect(board.locator(".db-folder[data-cluster-id='new']")).to_have_count(0)
            board.screenshot(path=str(tmp_path / "review_board_characters.png"))

            # Restart the kernel and run everything again: the stage reruns (the correction made it
            # stale) and keeps the move; the rebuilt board shows the frame where it was put.
            board.evaluate("node => { node.dataset.stale = '1'; }")
            page.get_by_role("menuitem", name="Kernel", exact=True).click()
            page.get_by_role("menuitem", name=re.compile(r"^Restart Kernel and Run All Cells")).click()
            page.locator(".jp-Dialog .jp-mod-accept").click()  # "Restart"
            run_all(
                page,
                lab,
                NOTEBOOK,
                ready=f".db-board:not([data-stale]) .db-folder[data-cluster-id='{cluster}'] "
                f".db-thumb[data-frame-id='{frame}']",
                start=False,
            )
            assert run.read_table("feedback").height == 2  # the rerun never rewrites feedback
            board_locator(page).screenshot(path=str(tmp_path / "review_board_after_restart.png"))
        except Exception:
            page.screenshot(path=str(tmp_path / "failure.png"))
            print(f"JupyterLab log (tail):\n{lab.log_tail()}\nscreenshot: {tmp_path / 'failure.png'}")
            raise
