"""The terminal follows a stage's progress file while the notebook runs in its kernel."""

from __future__ import annotations

import threading
import time

from diffusion_bunny.pipeline.progress import ProgressFile, follow


def test_progress_file_is_followed_and_cleaned_up(tmp_path, capsys):
    path = tmp_path / ".progress-extract.json"
    writer = ProgressFile(path, "extract x.mp4", total=100, unit="frame", interval=0.0)
    stop = threading.Event()
    watcher = threading.Thread(target=follow, args=(path, stop, 0.02))
    watcher.start()
    for done in (10, 50, 100):
        writer.update(done)
        time.sleep(0.1)
    assert path.is_file()
    stop.set()
    watcher.join(timeout=5)
    assert not path.exists()
    err = capsys.readouterr().err
    assert "extract x.mp4" in err and "100/100" in err


def test_throttling_and_no_path(tmp_path):
    path = tmp_path / "p.json"
    writer = ProgressFile(path, "d", total=None, unit="frame", interval=60.0)
    writer.update(1)
    writer.update(2)  # within the interval: not written
    assert '"done": 1' in path.read_text()
    writer.update(3, force=True)
    assert '"done": 3' in path.read_text()
    writer.close()
    assert not path.exists()
    ProgressFile(None, "d", None, "frame").update(5, force=True)  # no file wanted: nothing happens
