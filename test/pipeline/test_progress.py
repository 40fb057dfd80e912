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


def test_a_stage_in_a_kernel_shows_its_lines_its_note_and_a_download_on_the_terminal(
    tmp_path, monkeypatch, capsys
):
    """What a stage says and the bars it relays (a model's download through huggingface_hub, with
    the bar class the hub module gives it) reach the terminal that follows the stage, with the
    stage bar's note; here the stage's side runs in a thread of this process, as in a kernel
    (``DIFFUSION_BUNNY_LOG`` set by ``bunny``, no terminal handler of its own)."""
    import huggingface_hub

    from diffusion_bunny import logs
    from diffusion_bunny.models import hub

    monkeypatch.setenv(logs.ENV, str(tmp_path / "bunny.log"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def fake_download(repo_id, *, allow_patterns=None, tqdm_class=None, local_files_only=False, **kw):
        if local_files_only:
            raise huggingface_hub.errors.LocalEntryNotFoundError("not cached")
        bar = tqdm_class(total=3 * 1000 * 1000, desc="Downloading bytes", unit="B", unit_scale=True)
        for _ in range(3):
            bar.update(1000 * 1000)
            time.sleep(0.35)
        bar.close()
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    path = tmp_path / ".progress-train.json"
    stop = threading.Event()
    watcher = threading.Thread(target=follow, args=(path, stop, 0.05))
    watcher.start()
    with logs.relaying(path):
        stage_bar = ProgressFile(path, "train", total=10, unit="step", interval=0.0)
        stage_bar.update(2, note="4 paid requests (6 answered from the store)")
        hub.download("someone/model", "train.base_model", ["*.json"], instead="tiny")
        time.sleep(0.3)
    stop.set()
    watcher.join(timeout=10)
    err = capsys.readouterr().err
    assert "train.base_model = 'someone/model' is not in the local Hugging Face cache: downloading" in err
    assert "Downloading bytes" in err and "3.00M/3.00M" in err
    assert "4 paid requests (6 answered from the store)" in err
    assert list(tmp_path.glob(".progress-train.json*")) == []  # the relay files are gone


def test_nothing_is_relayed_outside_bunny(tmp_path, monkeypatch):
    """In JupyterLab (no ``DIFFUSION_BUNNY_LOG``) nobody follows: nothing is written."""
    from diffusion_bunny import logs

    monkeypatch.delenv(logs.ENV, raising=False)
    path = tmp_path / ".progress-captions.json"
    with logs.relaying(path):
        logs.say(logs.logging.getLogger("diffusion_bunny.test"), "a line")
        bar = logs.relay_bar_class()(total=2, desc="x")
        bar.update(2)
        bar.close()
    assert list(tmp_path.iterdir()) == []
