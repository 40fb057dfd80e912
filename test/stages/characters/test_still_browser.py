"""Notebook 03's still picker in a real JupyterLab, driven by headless Chromium: a box dragged with
the mouse around a part of a frame (the frame reached by typing its shot in the "go to" box), a
name typed and **add still** pressed put the still on disk,
cut from that frame where the box was drawn (in the frame's own pixels, whatever size the picture
is shown at).

Needs Debian's ``chromium`` (``.ci/run`` installs it); skipped with that reason where it is absent.
The waits are selector waits with generous limits, never fixed sleeps.
"""

from __future__ import annotations

import shutil
import time

import cv2
import numpy as np
from browser_harness import browser_marks, chromium_page, jupyter_lab, kernel_idle, run_all
from paths import ROOT

from diffusion_bunny.media.images import read_rgb
from diffusion_bunny.pipeline.run import Run
from diffusion_bunny.stages.characters.stage import DRAWN_MARGIN

NOTEBOOK = "03_detect_characters.ipynb"
#: The box drawer's picture once the frame's bytes reached it (jupyter_bbox_widget shows them as a
#: blob under the SVG it draws the boxes on; ipywidgets' own pictures are blobs too).
DRAWER = "div.image:has(svg) img[src^='blob:']"

pytestmark = browser_marks()


def prepare_notebook(run_dir, dest) -> None:
    """Notebook 03 with its parameters set (as papermill would run it), not executed: JupyterLab
    runs it. No reference folder: stage 03 runs on the copy and the still goes to the run's own
    ``references/``."""
    import papermill

    papermill.execute_notebook(
        str(ROOT / "notebook" / NOTEBOOK),
        str(dest),
        parameters={"run_dir": str(run_dir), "interactive": True, "preview_frames": 0},
        prepare_only=True,
        kernel_name="python3",
        progress_bar=False,
    )


def test_drag_a_box_and_add_a_still_in_jupyterlab(demo_run, tmp_path):
    from playwright.sync_api import expect

    shutil.copytree(demo_run.run_dir, tmp_path / "run")
    run = Run.open(tmp_path / "run")
    root = tmp_path / "lab"
    root.mkdir()
    prepare_notebook(run.run_dir, root / NOTEBOOK)

    with jupyter_lab(root, tmp_path / "lab-state") as lab, chromium_page() as page:
        try:
            run_all(page, lab, NOTEBOOK, ready=DRAWER)
            deadline = time.monotonic() + 300
            while not kernel_idle(lab, NOTEBOOK):  # the cells after the picker too
                assert time.monotonic() < deadline, f"notebook 03 did not finish:\n{lab.log_tail()}"
                page.wait_for_timeout(500)
            picker = page.locator(f".widget-vbox:has({DRAWER})").last  # the innermost: the picker
            # Go to the second shot by typing it, as a user who saw the character there would.
            frames = run.read_table("frames").sort("frame_index")
            shot = sorted(set(frames["shot_id"].to_list()))[1]
            frame = frames.filter(frames["shot_id"] == shot).row(0, named=True)
            before = page.locator(DRAWER).first.get_attribute("src")
            go = picker.locator("input[placeholder^='go to']")
            go.fill(f"shot {shot}")
            go.press("Enter")
            expect(picker.locator(".widget-html", has_text=frame["frame_id"])).to_be_visible(timeout=60_000)
            # The drawer shows that frame: its picture's blob is replaced and loaded.
            page.wait_for_function(
                "([before, css]) => { const i = document.querySelector(css);"
                " return i !== null && i.src !== before && i.complete && i.naturalWidth > 0; }",
                arg=[before, DRAWER],
                timeout=60_000,
            )
            picture = page.locator(DRAWER).first
            picture.scroll_into_view_if_needed()
            natural = picture.evaluate("img => [img.naturalWidth, img.naturalHeight]")
            shown = picture.bounding_box()
            rgb = read_rgb(run.run_dir / frame["path"])
            assert natural == [rgb.shape[1], rgb.shape[0]]

            # Drag from 30% / 25% to 55% / 70% of the picture as shown.
            x0, y0 = shown["x"] + 0.30 * shown["width"], shown["y"] + 0.25 * shown["height"]
            x1, y1 = shown["x"] + 0.55 * shown["width"], shown["y"] + 0.70 * shown["height"]
            page.mouse.move(x0, y0)
            page.mouse.down()
            for k in range(1, 11):
                page.mouse.move(x0 + (x1 - x0) * k / 10, y0 + (y1 - y0) * k / 10)
            page.mouse.up()
            picker.locator("input[placeholder='character name']").fill("cosmo")
            picker.locator("button", has_text="add still").click()
            status = picker.locator(".widget-html", has_text="added 1 still(s)")
            expect(status).to_be_visible(timeout=60_000)
            # The box written leaves the drawer (jupyter_bbox_widget draws each box as SVG rects).
            expect(picker.locator("div.image svg rect")).to_have_count(0)
            page.screenshot(path=str(tmp_path / "still_picker.png"))

            stills = sorted((run.run_dir / "references" / "cosmo").glob("*.png"))
            assert len(stills) == 1
            still = read_rgb(stills[0])
            # The box in the frame's pixels, as dragged on the picture shown smaller or larger.
            scale = natural[0] / shown["width"]
            w, h = (x1 - x0) * scale, (y1 - y0) * scale
            expect_h, expect_w = h * (1 + 2 * DRAWN_MARGIN), w * (1 + 2 * DRAWN_MARGIN)
            assert abs(still.shape[0] - expect_h) <= 4 and abs(still.shape[1] - expect_w) <= 4, still.shape
            # Cut from that frame, where the box was drawn.
            found = cv2.matchTemplate(rgb, still, cv2.TM_SQDIFF_NORMED)
            _, _, best, _ = cv2.minMaxLoc(found)
            assert found.min() < 1e-6
            left = (x0 - shown["x"]) * scale - DRAWN_MARGIN * w
            top = (y0 - shown["y"]) * scale - DRAWN_MARGIN * h
            assert np.allclose(best, (left, top), atol=4), (best, left, top)
        except Exception:
            page.screenshot(path=str(tmp_path / "failure.png"))
            print(f"JupyterLab log (tail):\n{lab.log_tail()}\nscreenshot: {tmp_path / 'failure.png'}")
            raise
