"""The QA report as a person sees it: ``report/index.html`` of the demo run (stages 01-04) opened
in headless Debian Chromium from a file:// URL. Every section is there, every figure loads, no
code shows, and the screenshots (``data/screens/report.png``: the top of the page;
``report_full.png``: all of it) are kept for the README.

Needs Debian's ``chromium`` (``.ci/run`` installs it); skipped with that reason where it is absent.
"""

from __future__ import annotations

import shutil

from browser_harness import browser_marks, chromium_page
from paths import ROOT

from diffusion_bunny.config import load_config
from diffusion_bunny.pipeline.run import Run
from diffusion_bunny.stages import run_stage
from diffusion_bunny.stages.report.sections import SECTIONS

SCREENS = ROOT / "data" / "screens"

pytestmark = browser_marks()


def test_report_opens_in_chromium_with_every_section(scenes_demo_run, tmp_path):
    from playwright.sync_api import expect

    src, overrides = scenes_demo_run
    shutil.copytree(src.run_dir, tmp_path / "run")
    run = Run.open(tmp_path / "run")
    run_stage(run, "report", load_config(None, overrides, root=tmp_path / "noconfig"), progress=False)
    html = run.run_dir / "report" / "index.html"
    n_figures = run.read_table("report_figures")["figure"].is_not_null().sum()

    with chromium_page(viewport=(1200, 900)) as page:
        requested: list[str] = []
        page.on("request", lambda request: requested.append(request.url))
        page.goto(html.as_uri())
        expect(page.locator("h1")).to_contain_text("QA report: demo_movie.mp4")
        headings = page.locator("h2").all_inner_texts()
        assert [h.rstrip("¶").strip() for h in headings] == [title for title, _, _ in SECTIONS.values()]
        images = page.locator("img")
        expect(images).to_have_count(n_figures)
        # Every embedded PNG decoded (a broken one has naturalWidth 0).
        widths = images.evaluate_all("imgs => imgs.map(i => i.complete ? i.naturalWidth : 0)")
        assert all(w > 100 for w in widths), widths
        assert page.locator("img[alt='Contact sheet: astronaut']").count() == 1
        body = page.locator("body").inner_text()
        assert "stage captions did not run" in body and "stage train did not run" in body
        assert "with a named character" in body  # the funnel table
        assert page.locator(".jp-InputArea-editor, .jp-InputPrompt").count() == 0
        # Self-contained: nothing fetched from the network (require.js and MathJax came from cdnjs).
        page.wait_for_load_state("networkidle")
        assert [u for u in requested if not u.startswith(("file:", "data:"))] == [], requested
        SCREENS.mkdir(parents=True, exist_ok=True)
        # Playwright's default 30 s ran out for a screenshot on a loaded CI machine (2026-11-30).
        page.screenshot(path=str(SCREENS / "report.png"), timeout=180_000)
        page.screenshot(path=str(SCREENS / "report_full.png"), full_page=True, timeout=180_000)
    assert (SCREENS / "report.png").stat().st_size > 10_000
