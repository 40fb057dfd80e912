"""A real JupyterLab server and a headless Chromium for browser tests.

Kept apart from the tests so a person can drive the same harness by hand while working on a widget
(``python test/browser_harness.py NOTEBOOK_DIR NOTEBOOK`` opens a notebook and keeps it open).

The server is started from this interpreter (``sys.executable -m jupyter lab``, so it sees the
project's venv: its kernel ``python3`` and the anywidget lab extension) on 127.0.0.1, a free port
and a random token, with its own settings, workspace and runtime folders inside the test's tmp
folder, so nothing of the user's JupyterLab set-up leaks in and nothing is left behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def chromium_path() -> str | None:
    """Debian's ``chromium`` (Playwright's own download needs the network; .ci/run installs it)."""
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    return None


@dataclass
class Lab:
    """A running JupyterLab server."""

    url: str
    token: str
    root: Path
    log: Path
    process: subprocess.Popen

    def lab_url(self, notebook: str) -> str:
        return f"{self.url}/lab/tree/{notebook}?token={self.token}"

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.is_file() else ""


def browser_marks() -> list:
    """The marks of a browser test module: ``browser``, ``slow``, and a skip naming the package
    to install where Debian's chromium is missing (``.ci/run`` installs it, so CI runs them)."""
    import pytest

    return [
        pytest.mark.browser,
        pytest.mark.slow,
        pytest.mark.skipif(
            chromium_path() is None,
            reason="Debian's chromium is not installed (apt-get install chromium; .ci/run does this)",
        ),
    ]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


SETTINGS = {
    # No news or update checks: no network here, and a toast could cover the page.
    "@jupyterlab/apputils-extension/notification": {"fetchNews": "false", "checkForUpdates": False},
}


def _write_settings(settings_dir: Path) -> None:
    for name, values in SETTINGS.items():
        path = settings_dir / f"{name}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))


@contextlib.contextmanager
def jupyter_lab(root: Path, state: Path, start_timeout: float = 240.0) -> Iterator[Lab]:
    """Start ``jupyter lab`` serving ``root``; its settings and logs go under ``state``. The
    server (and the kernels it started) are shut down on exit, whatever happened."""
    state.mkdir(parents=True, exist_ok=True)
    _write_settings(state / "settings")
    port, token = free_port(), secrets.token_hex(16)
    env = {
        **os.environ,
        "JUPYTERLAB_SETTINGS_DIR": str(state / "settings"),
        "JUPYTERLAB_WORKSPACES_DIR": str(state / "workspaces"),
        "JUPYTER_RUNTIME_DIR": str(state / "runtime"),
        "JUPYTER_CONFIG_DIR": str(state / "config"),
        "PYTHONUNBUFFERED": "1",
    }
    args = [
        sys.executable,
        "-m",
        "jupyter",
        "lab",
        "--no-browser",
        "--ip=127.0.0.1",
        f"--port={port}",
        "--ServerApp.port_retries=0",  # fail rather than serve on a port the test does not know
        f"--IdentityProvider.token={token}",
        f"--ServerApp.root_dir={root}",
        "--ServerApp.terminals_enabled=False",
        "--LabApp.extension_manager=readonly",  # the PyPI extension manager would go online
    ]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        args.append("--allow-root")  # CI containers run as root
    log = state / "jupyter.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            args, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    lab = Lab(f"http://127.0.0.1:{port}", token, root, log, process)
    try:
        deadline = time.monotonic() + start_timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"jupyter lab exited with {process.returncode}:\n{lab.log_tail()}")
            try:
                with urllib.request.urlopen(f"{lab.url}/api/status?token={token}", timeout=5) as resp:
                    if resp.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"jupyter lab did not answer within {start_timeout:.0f} s:\n{lab.log_tail()}"
                )
            time.sleep(0.5)  # polling a server that is starting: there is nothing to wait on instead
        yield lab
    finally:
        stop_lab(lab)


def stop_lab(lab: Lab) -> None:
    """Ask the server to shut down (it stops its kernels first), then make sure its process
    group is gone: the server was started in a session of its own, so only its processes go."""
    if lab.process.poll() is None:
        with contextlib.suppress(OSError, urllib.error.URLError):
            req = urllib.request.Request(
                f"{lab.url}/api/shutdown", method="POST", headers={"Authorization": f"token {lab.token}"}
            )
            urllib.request.urlopen(req, timeout=10).close()
        try:
            lab.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(lab.process.pid, signal.SIGTERM)
            try:
                lab.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(lab.process.pid, signal.SIGKILL)
                lab.process.wait(timeout=10)
    # Kernels are children in the same session; any still alive after the server went are ours.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(lab.process.pid, signal.SIGKILL)


@contextlib.contextmanager
def chromium_page(viewport: tuple[int, int] = (1400, 1000)):
    """A page in headless Debian Chromium driven by Playwright."""
    from playwright.sync_api import sync_playwright

    path = chromium_path()
    if path is None:
        raise RuntimeError("chromium is not installed (apt-get install chromium; .ci/run does this)")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=path, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": viewport[0], "height": viewport[1]})
            yield page
        finally:
            browser.close()


# While waiting for the widget: a cell's error output or a dialog ends the wait at once (with its
# text) instead of after the whole timeout.
_WAIT_FOR = """
([ready]) => {
  if (document.querySelector(ready)) return "ready";
  const err = document.querySelector('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.error"]');
  if (err) return "error: " + err.textContent.slice(0, 3000);
  const dialog = document.querySelector(".jp-Dialog");
  return dialog ? "dialog: " + dialog.textContent.slice(0, 500) : false;
}
"""


def kernel_idle(lab: Lab, notebook: str) -> bool:
    """Whether the server has a session for ``notebook`` whose kernel has started and is idle."""
    req = urllib.request.Request(f"{lab.url}/api/sessions", headers={"Authorization": f"token {lab.token}"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        sessions = json.load(resp)
    return any(
        s.get("path", "").endswith(notebook) and (s.get("kernel") or {}).get("execution_state") == "idle"
        for s in sessions
    )


def run_all(
    page, lab: Lab, notebook: str, ready: str, *, start: bool = True, timeout_s: float = 300.0
) -> None:
    """Open ``notebook`` in JupyterLab and run every cell from the **Run** menu (``start``; else
    only wait, after the caller started a run some other way), until ``ready`` (a CSS selector)
    is on the page. A cell's error output or an unexpected dialog fails at once with its text."""
    page.set_default_timeout(60_000)
    if start:
        page.goto(lab.lab_url(notebook), wait_until="domcontentloaded", timeout=180_000)
        page.locator(".jp-Notebook .jp-Cell").first.wait_for(timeout=180_000)
        # Run All before the page is connected to the kernel asks which kernel to start. The page
        # shows "idle" for a moment before it even connects, so the server's word counts first.
        deadline = time.monotonic() + 180
        while not kernel_idle(lab, notebook):
            if time.monotonic() > deadline:
                raise AssertionError(f"the kernel of {notebook} did not start:\n{lab.log_tail()}")
            page.wait_for_timeout(500)
        page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']").wait_for(timeout=60_000)
        page.get_by_role("menuitem", name="Run", exact=True).click()
        page.get_by_role("menuitem", name="Run All Cells", exact=True).click()
    accepted = 0
    deadline = time.monotonic() + timeout_s
    while True:
        left = max(1.0, deadline - time.monotonic())
        outcome = page.wait_for_function(
            _WAIT_FOR, arg=[ready], timeout=left * 1000, polling=250
        ).json_value()
        if outcome == "ready":
            return
        if outcome.startswith("dialog: Select Kernel") and accepted == 0:
            # Still a race on a slow machine: take the notebook's own kernel, as a person would.
            accepted += 1
            page.locator(".jp-Dialog .jp-mod-accept").click()
            page.locator(".jp-Dialog").wait_for(state="detached")
            continue
        raise AssertionError(f"running {notebook} in JupyterLab failed:\n{outcome}")


if __name__ == "__main__":  # pragma: no cover - a tool for working on widgets by hand
    folder, name = Path(sys.argv[1]).resolve(), sys.argv[2]
    with jupyter_lab(folder, folder / ".lab-state") as lab:
        print(lab.lab_url(name), flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            lab.process.wait()
