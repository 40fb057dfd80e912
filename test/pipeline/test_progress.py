"""The terminal follows a stage's progress file while the notebook runs in its kernel."""

from __future__ import annotations

import json
import threading
import time

from relay import relayed_bar

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


def test_a_bar_collected_after_its_stage_writes_nothing_the_next_run_would_show(tmp_path, monkeypatch):
    """tqdm closes a bar again when the bar is collected, which in the kernel a movie's stages
    share can happen stages later, after the runner removed the stage's relay files. A file
    written then stayed in the run folder (seen after a folder run: stage 03's "fit characters"
    bar, written during stage 06), and the next run of the stage showed that bar again, done,
    before a run that fitted nothing."""
    import gc

    from diffusion_bunny import logs
    from diffusion_bunny.pipeline.progress import remove_relay_files

    monkeypatch.setenv(logs.ENV, str(tmp_path / "bunny.log"))
    path = tmp_path / ".progress-characters.json"
    with logs.relaying(path):
        bar = logs.relay_bar_class()(range(3), desc="fit characters", unit="step")
        for _ in bar:
            pass
        bar.close()
        assert relayed_bar(path)[1]["closed"]
    remove_relay_files(path)  # what the runner does when the stage's notebook ends
    with logs.relaying(tmp_path / ".progress-export.json"):  # a later stage in the same kernel
        bar.close()
        del bar
        gc.collect()
    assert list(tmp_path.glob(".progress-*")) == []


def test_what_an_earlier_run_left_beside_a_stage_is_not_shown_as_this_runs(tmp_path, capsys):
    """Relay files an earlier run left (a kernel killed mid-stage, or a version before the fix
    above) are removed before the terminal follows the stage: neither their bars nor their lines
    are shown again."""
    from diffusion_bunny import logs
    from diffusion_bunny.pipeline.progress import start_following

    path = tmp_path / ".progress-characters.json"
    stale = {"done": 1000, "total": 1000, "closed": True, "unit": "step", "desc": "fit characters"}
    (tmp_path / (path.name + logs.BAR_SUFFIX + "0393f7e8")).write_text(json.dumps(stale))
    (tmp_path / (path.name + logs.SAY_SUFFIX)).write_text(json.dumps({"say": "an old line"}) + "\n")
    stop = threading.Event()
    watcher = start_following(path, stop, interval=0.02)
    writer = ProgressFile(path, "characters", total=2, unit="frame", interval=0.0)
    writer.update(2)
    time.sleep(0.2)
    stop.set()
    watcher.join(timeout=5)
    err = capsys.readouterr().err
    assert "characters" in err and "2/2" in err
    assert "fit characters" not in err and "an old line" not in err
    assert list(tmp_path.iterdir()) == []


def test_nothing_to_count_shows_no_bar(tmp_path, capsys):
    """A rerun whose frames all come from the cache has nothing to count: no bar in the notebook
    and no file for the terminal (it showed an empty "faces: 0frame" twice)."""
    from diffusion_bunny.pipeline.progress import tracked

    path = tmp_path / ".progress-characters.json"
    with tracked(0, desc="faces", progress=True, progress_path=path) as done:
        done(0)
        assert not path.exists()
    assert "faces" not in capsys.readouterr().err
    with tracked(2, desc="faces", progress=True, progress_path=path) as done:
        done(1)
        assert json.loads(path.read_text())["total"] == 2


def test_a_stage_ends_though_its_follower_waits_on_a_lock_an_interrupt_left_taken(tmp_path, monkeypatch):
    """A SIGTERM raised in the main thread while tqdm made its write lock left that lock taken
    (tqdm takes and gives it back without a ``finally``); the follower's next bar waited on it
    for good, and the stage's end joined the follower without a bound: the run outlived the
    signal, its kernel and all. The end now waits a few seconds at most."""
    from tqdm.std import TqdmDefaultWriteLock

    from diffusion_bunny.pipeline import progress
    from diffusion_bunny.pipeline.progress import start_following, stop_following

    monkeypatch.setattr(progress, "FOLLOW_JOIN_S", 0.5)
    monkeypatch.setattr(TqdmDefaultWriteLock, "th_lock", threading.RLock())  # this test's own
    for cls in progress.tqdm.__mro__:  # as in a run's first bar: tqdm makes its write lock now
        if "_lock" in vars(cls):
            monkeypatch.delattr(cls, "_lock")
    taken, done = threading.Event(), threading.Event()

    def interrupted_holder():  # the main thread, where the interrupt landed
        TqdmDefaultWriteLock.th_lock.acquire()
        taken.set()
        done.wait(10)
        TqdmDefaultWriteLock.th_lock.release()

    holder = threading.Thread(target=interrupted_holder, daemon=True)
    holder.start()
    taken.wait(5)
    path = tmp_path / ".progress-extract.json"
    stop = threading.Event()
    watcher = start_following(path, stop, 0.02)
    ProgressFile(path, "extract x.mp4", total=100, unit="frame", interval=0.0).update(10)
    time.sleep(0.3)  # the follower now waits on the lock to draw its bar
    started = time.monotonic()
    stop_following(stop, watcher)
    assert time.monotonic() - started < 3 and watcher.is_alive()
    done.set()
    watcher.join(5)
    assert not watcher.is_alive()
