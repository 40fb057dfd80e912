"""Stage 05 under faults (issue 17): full frames sent, raw answers cached before parsing in a JSON
store that never evicts, identical requests asked once, edits kept while the stage writes,
secrets redacted from everything stored, and a circuit breaker that closes again. Issue 31: every
paid answer recorded with its status (empty, refused, truncated, unparsable) and not asked again
unless captioning.retry says so; the paid requests announced and capped before the first."""

from __future__ import annotations

import base64
import io
import json
import shutil
import sqlite3
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import polars as pl
import pytest
from fake_llm_server import FakeLLMServer, caption_text, image_digest
from PIL import Image

from diffusion_bunny.config import CaptioningConfig, load_config
from diffusion_bunny.errors import ConfigError, ProviderError, StageError, StorageError
from diffusion_bunny.pipeline.run import Run
from diffusion_bunny.stages import run_stage
from diffusion_bunny.stages.captions.providers import (
    PROMPT_VERSION,
    CaptionCache,
    CircuitBreaker,
    make_provider,
    redact,
)
from diffusion_bunny.stages.captions.stage import caption_frames, edit_caption, frame_hashes

FAST = {
    "captioning.backoff_base_s": 0.01,
    "captioning.backoff_max_s": 0.05,
    "captioning.requests_per_minute": 60000,
    "captioning.timeout_s": 5,
}


def _cfg(tmp_path, base: dict, **over):
    return load_config(
        None, {**base, **{k.replace("__", "."): v for k, v in over.items()}}, root=tmp_path / "nocfg"
    )


def _kept_frames(run: Run) -> pl.DataFrame:
    kept = run.read_table("quality").filter("keep")["frame_id"].to_list()
    return run.read_table("frames").filter(pl.col("frame_id").is_in(kept))


def _expected(run: Run, rel_path: str, max_side: int) -> bytes:
    """The image a paid provider must get, from ``frames.path`` with Pillow alone."""
    with Image.open(run.run_dir / rel_path) as img:
        img = img.convert("RGB")
        if max(img.size) > max_side:
            img.thumbnail((max_side, max_side))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _sent_images(srv: FakeLLMServer) -> list[bytes]:
    out = []
    for req in srv.requests:
        text = json.dumps(req["body"])
        start = text.index("base64,") + len("base64,")
        out.append(base64.b64decode(text[start : text.index('"', start)]))
    return out


# ----------------------------------------------------------------------------------- 17.1


def test_paid_captions_see_the_full_frame_scaled_to_image_max_side(cap_run, tmp_path):
    """What the server receives is the full frame of ``frames.path`` scaled to
    ``captioning.image_max_side`` (not the 320-px thumbnail); another size is another request."""
    run, overrides = cap_run
    frames = _kept_frames(run)
    full_side = max(Image.open(run.run_dir / frames["path"][0]).size)
    thumb_side = max(Image.open(run.run_dir / "thumbs" / f"{frames['frame_id'][0]}.jpg").size)
    assert full_side > thumb_side  # the demo's frames are larger than their thumbnails
    for max_side in (full_side, thumb_side + 40):
        with FakeLLMServer() as srv:
            cfg = _cfg(
                tmp_path,
                {**overrides, **FAST},
                captioning__provider="local",
                captioning__local__base_url=srv.base_url,
                captioning__image_max_side=max_side,
            )
            captions = run_stage(run, "captions", cfg, progress=False, force=True)["captions"]
            expected = {
                r["frame_id"]: image_digest(_expected(run, r["path"], max_side))
                for r in frames.iter_rows(named=True)
            }
            assert len(srv.requests) == frames.height  # a new size is a new question
            for rec in captions.iter_rows(named=True):
                assert rec["caption"] == "bunnystyle, " + caption_text(expected[rec["frame_id"]])
            sides = {max(Image.open(io.BytesIO(b)).size) for b in _sent_images(srv)}
            assert sides == {min(max_side, full_side)}


# ----------------------------------------------------------------------------- 17.3 / 18.6b


def test_unparsable_answer_is_paid_once_and_the_warning_is_true(cap_run, tmp_path):
    """A garbage answer is cached raw before parsing: a forced rerun asks nothing again."""
    run, overrides = cap_run
    with FakeLLMServer(default="garbage") as srv:
        cfg = _cfg(
            tmp_path,
            {**overrides, **FAST},
            captioning__provider="local",
            captioning__fallback=["template"],
            captioning__local__base_url=srv.base_url,
            captioning__breaker_failures=1000,
        )
        first = run_stage(run, "captions", cfg, progress=False)
        n = len(srv.requests)
        assert n == first["captions"].height
        again = run_stage(run, "captions", cfg, progress=False, force=True)
        assert len(srv.requests) == n  # not paid again
        calls = again["caption_calls"]
        assert (calls.filter(pl.col("provider") == "local")["outcome"] == "cached_unparsable").all()
        assert (again["captions"]["provider"] == "template").all()
        assert run.read_manifest("captions")["counts"]["paid_requests"] == 0


def test_answer_store_is_plain_json_in_sqlite_and_never_imports_diskcache(tmp_path):
    facts = {"characters": ["a"]}
    key = CaptionCache.key("sha", "local", "m", facts, "w")
    assert key.startswith(PROMPT_VERSION)
    for other in (
        CaptionCache.key("sha", "local", "m", facts, "w", max_tokens=301),
        CaptionCache.key("sha", "local", "m", facts, "w", temperature=0.3),
        CaptionCache.key("sha", "local", "m", facts, "w", 1024),
    ):
        assert other != key
    cache = CaptionCache(tmp_path / "c")
    cache.set(key, {"raw": "text", "input_tokens": 3})
    cache.close()
    with sqlite3.connect(tmp_path / "c" / CaptionCache.FILE) as db:
        (value,) = db.execute("SELECT value FROM answers WHERE key = ?", (key,)).fetchone()
    assert json.loads(value) == {"raw": "text", "input_tokens": 3}
    assert CaptionCache(tmp_path / "c").get(key)["raw"] == "text"
    # An old diskcache folder is noticed (for the one-time warning), never read.
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "cache.db").write_bytes(b"not read")
    assert CaptionCache(tmp_path / "old").legacy == tmp_path / "old" / "cache.db"
    code = "import sys, diffusion_bunny.stages.captions.stage; print('diskcache' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    src = Path(__file__).parents[3] / "src"
    assert not any("import diskcache" in p.read_text() for p in src.rglob("*.py"))


def test_identical_requests_in_flight_are_asked_once(cap_run, tmp_path):
    """Four frames with the same file, four threads, a slow server: one request."""
    run, overrides = cap_run
    frames = _kept_frames(run).head(1)
    rec = frames.row(0, named=True)
    copies = []
    for i in range(4):
        rel = f"frames/dup_{i}.jpg"
        shutil.copy(run.run_dir / rec["path"], run.run_dir / rel)
        copies.append({**rec, "frame_id": f"dup_{i}", "path": rel})
    facts = pl.DataFrame([{"frame_id": c["frame_id"], "path": c["path"], "characters": []} for c in copies])
    with FakeLLMServer(delay_s=0.5) as srv:
        cfg = _cfg(
            tmp_path,
            {**overrides, **FAST},
            captioning__provider="local",
            captioning__local__base_url=srv.base_url,
            captioning__concurrency=4,
        ).captioning
        provider = make_provider("local", cfg)
        cache = CaptionCache(tmp_path / "answers")
        try:
            result = caption_frames(
                run.run_dir, facts, [provider], cfg, cache, frame_hashes(run.run_dir, facts), progress=False
            )
        finally:
            cache.close()
    assert len(srv.requests) == 1
    assert (result.captions["status"] == "ok").all() and result.captions["caption"].n_unique() == 1
    assert sorted(result.calls["outcome"].to_list()) == ["cached", "cached", "cached", "ok"]


# ----------------------------------------------------------------------------------- 17.5 / 17.7


def test_an_edit_saved_while_the_stage_writes_is_kept(cap_run, tmp_path, monkeypatch):
    """An edit from another thread lands right when the runner is about to write ``captions``:
    it waits for the table locks of the runner's commit and goes on top, instead of being
    overwritten."""
    run, overrides = cap_run
    cfg = _cfg(tmp_path, overrides)
    run_stage(run, "captions", cfg, progress=False)
    fid = run.read_table("captions")["frame_id"][0]
    real_write = Run.write_table
    editor: list[threading.Thread] = []

    def write_table(self, name, df, **kwargs):
        if name == "captions" and not editor:
            thread = threading.Thread(target=edit_caption, args=(run.run_dir, fid, "a hand-made caption"))
            editor.append(thread)
            thread.start()
            thread.join(timeout=1.0)  # without the lock the edit is done by now, and lost below
        return real_write(self, name, df, **kwargs)

    monkeypatch.setattr(Run, "write_table", write_table)
    run_stage(run, "captions", cfg, progress=False, force=True)
    editor[0].join(timeout=30)
    captions = run.read_table("captions")
    row = captions.filter(pl.col("frame_id") == fid).row(0, named=True)
    assert row["caption"] == "a hand-made caption" and row["status"] == "edited"


def test_caption_lock_timeout_is_one_clear_error(cap_run, tmp_path):
    """Another process holds the lock: a clear StageError (exit status 2), not filelock's."""
    run, _ = cap_run
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                f"""
                import sys, time
                from diffusion_bunny.pipeline.run import Run
                with Run.open({str(run.run_dir)!r}).table_lock("captions"):
                    print("held", flush=True)
                    time.sleep(30)
                """
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        lock = run.table_lock("captions", timeout=0.2)
        with pytest.raises(StageError, match=r"another process has held the captions lock .* for 0 s"):
            lock.__enter__()
    finally:
        holder.kill()
        holder.wait()


# ----------------------------------------------------------------------------------- 17.8


def test_a_header_echoing_server_leaks_no_secret(cap_run, tmp_path, monkeypatch):
    run, overrides = cap_run
    canary = "sk-CANARY-echo-4d2b7e"
    monkeypatch.setenv("LOCAL_LLM_API_KEY", canary)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", canary + "-aws")
    with FakeLLMServer(default="echo") as srv:
        cfg = _cfg(
            tmp_path,
            {**overrides, **FAST},
            captioning__provider="local",
            captioning__fallback=["template"],
            captioning__local__base_url=srv.base_url,
            captioning__max_retries=0,
            captioning__breaker_failures=2,
        )
        with pytest.warns(UserWarning):
            tables = run_stage(run, "captions", cfg, progress=False)
        assert srv.requests[0]["headers"]["Authorization"] == f"Bearer {canary}"
    errors = tables["caption_calls"]["error"].drop_nulls()
    assert errors.str.contains(r"\[redacted\]").any()  # the echo reached the stored error
    manifest = run.read_manifest("captions")
    assert any("[redacted]" in w for w in manifest["warnings"])
    leaks = [
        str(p)
        for p in run.run_dir.rglob("*")
        if p.is_file() and (canary.encode() in p.read_bytes() or b"Q0FOQVJZ" in p.read_bytes())
    ]
    assert leaks == []
    assert redact(f"x {canary}-aws y") == "x [redacted] y"


def test_credentials_in_a_base_url_are_refused(tmp_path):
    for key in ("captioning.local.base_url", "captioning.openai.base_url", "captioning.anthropic.base_url"):
        with pytest.raises(ConfigError, match=rf"{key}: must not carry credentials") as err:
            load_config(None, {key: "http://me:tok-SECRET@127.0.0.1:8000/v1"}, root=tmp_path / "nocfg")
        assert "tok-SECRET" not in str(err.value)


# ----------------------------------------------------------------------------------- 17.9


def test_breaker_half_open_probe_closes_or_reopens():
    now = [0.0]
    breaker = CircuitBreaker(2, 10.0, clock=lambda: now[0])
    breaker.failure("a")
    breaker.failure("b")
    assert breaker.open and breaker.allow() == "" and breaker.blocked()
    now[0] = 10.0
    assert not breaker.blocked()
    assert breaker.allow() == "probe" and breaker.allow() == ""  # one probe at a time
    breaker.failure("c")  # the probe failed: open for another cool-down
    assert breaker.state == "open" and breaker.allow() == ""
    now[0] = 20.0
    assert breaker.allow() == "probe"
    breaker.success()
    assert breaker.state == "closed" and breaker.allow() == "closed" and breaker.reason == "b"
    fatal = CircuitBreaker(5, 0.0, clock=lambda: now[0])
    fatal.failure("key refused", fatal=True)
    now[0] = 1000.0
    assert fatal.allow() == ""  # a refused key is not probed


def test_circuit_closes_again_after_a_successful_probe(cap_run, tmp_path):
    """The server fails twice, then recovers: the circuit opens on the first frame, its probe
    on the second fails (and is not retried), the probe on the third closes it, and the rest of
    the run goes to the server again."""
    run, overrides = cap_run
    with FakeLLMServer(script=["500", "500"]) as srv:
        cfg = _cfg(
            tmp_path,
            {**overrides, **FAST},
            captioning__provider="local",
            captioning__fallback=["template"],
            captioning__local__base_url=srv.base_url,
            captioning__max_retries=0,
            captioning__breaker_failures=1,
            captioning__breaker_cooldown_s=0,
            captioning__concurrency=1,
        )
        with pytest.warns(UserWarning, match="opened 1 time"):
            tables = run_stage(run, "captions", cfg, progress=False)
    captions = tables["captions"].sort("frame_id")
    assert srv.behaviours()[:3] == ["500", "500", "ok"]
    assert (captions["provider"] == "template").sum() == 2
    assert (captions["provider"] == "local").sum() == captions.height - 2
    manifest = run.read_manifest("captions")
    assert manifest["facts"]["open_circuits"] == {}
    assert any("until a probe succeeded" in w for w in manifest["warnings"])
    assert isinstance(CaptioningConfig().breaker_cooldown_s, float)


# ----------------------------------------------------------------------------------- 31.3


@pytest.mark.parametrize("api", ["local", "anthropic"])
def test_an_answer_without_a_caption_gets_its_status_and_is_handed_over_first(api, tmp_path, monkeypatch):
    """Each kind of paid answer that carries nothing reaches the recording hook (dspy raises on an
    empty one before it would parse it) and ends in AnswerError with its status, through the real
    client code over HTTP."""
    from diffusion_bunny.stages.captions.providers import AnswerError

    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test")
    image = _expected_image()
    expected = {"empty": "empty", "refused": "refused", "filtered": "refused", "length": "truncated"}
    expected["garbage"] = "unparsable"
    with FakeLLMServer(script=[*expected, "ok"]) as srv:
        setting = {"local": "captioning__local__base_url", "anthropic": "captioning__anthropic__base_url"}[
            api
        ]
        url = srv.base_url if api == "local" else srv.root_url
        cfg = _cfg(tmp_path, FAST, captioning__provider=api, **{setting: url}).captioning
        prov = make_provider(api, cfg)
        for behaviour, status in expected.items():
            kept = []
            with pytest.raises(AnswerError) as err:
                prov.caption(image, {"characters": []}, kept.append)
            assert err.value.status == status, behaviour
            assert len(kept) == 1 and prov.status(kept[0])[0] == status
        kept = []
        result = prov.caption(image, {"characters": []}, kept.append)
        assert result.caption == "bunnystyle, " + caption_text(image_digest(image))
        assert prov.status(kept[0]) == ("ok", "")
    assert len(srv.requests) == len(expected) + 1


def _expected_image() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 24), (200, 80, 40)).save(buf, format="JPEG")
    return buf.getvalue()


def _store(run: Run) -> dict[str, str]:
    """Every recorded answer's status, by key."""
    with sqlite3.connect(run.run_dir / "cache" / "captions" / CaptionCache.FILE) as db:
        rows = db.execute("SELECT key, value FROM answers").fetchall()
    return {key: json.loads(value).get("status") for key, value in rows}


def test_paid_answers_without_a_caption_are_recorded_and_asked_again_only_on_request(
    cap_run, tmp_path, capsys
):
    """Issue 31's provider that bills but answers nothing: every answer is recorded with its
    status; the rerun the error advises pays nothing more; captioning.retry asks those statuses
    (and only those) again."""
    run, overrides = cap_run
    n = _kept_frames(run).height
    script = ["empty", "refused", "filtered", "length", "garbage"]
    with FakeLLMServer(script=list(script), default="empty") as srv:
        base = {
            **overrides,
            **FAST,
            "captioning.provider": "local",
            "captioning.local.base_url": srv.base_url,
            "captioning.concurrency": 1,
            "captioning.breaker_failures": 1000,
        }
        cfg = _cfg(tmp_path, base)
        with pytest.raises(ProviderError) as err:
            run_stage(run, "captions", cfg, progress=False)
        assert len(srv.requests) == n
        message = str(err.value)
        assert "A rerun (--force) asks again only frames that got no answer" in message
        assert "(empty, refused, truncated, unparsable) are recorded and are not asked again" in message
        assert "will not be paid again" not in message
        assert f"captions: {n} paid request(s) to local" in capsys.readouterr().err
        statuses = sorted(_store(run).values())
        assert statuses == sorted(["empty"] * (n - 4) + ["refused", "refused", "truncated", "unparsable"])

        # The rerun the message advises: nothing is paid again, the same error comes back.
        with pytest.raises(ProviderError, match="are not asked again"):
            run_stage(run, "captions", cfg, progress=False, force=True)
        assert len(srv.requests) == n
        assert "paid request(s)" not in capsys.readouterr().err  # nothing to ask, nothing announced

        # The user asks for the empty and refused ones again (the server answers now).
        srv.default = "ok"
        cfg = _cfg(
            tmp_path, {**base, "captioning.retry": ["empty", "refused"], "captioning.fallback": ["template"]}
        )
        tables = run_stage(run, "captions", cfg, progress=False)
        assert len(srv.requests) == n + (n - 4) + 2
        captions, calls = tables["captions"], tables["caption_calls"]
        assert captions.filter(pl.col("provider") == "local").height == n - 2
        assert sorted(calls.filter(pl.col("outcome").str.starts_with("cached_"))["outcome"].to_list()) == [
            "cached_truncated",
            "cached_unparsable",
        ]
        assert (captions.filter(pl.col("provider") == "template").height, captions["status"].to_list()) == (
            2,
            ["ok"] * n,
        )
        counts = run.read_manifest("captions")["counts"]
        assert counts["paid_requests"] == n - 2 and counts["answers_truncated"] == 1
        assert sorted(_store(run).values()) == sorted(["ok"] * (n - 2) + ["truncated", "unparsable"])


def test_paid_requests_are_capped_before_the_first_and_during_the_run(cap_run, tmp_path):
    run, overrides = cap_run
    n = _kept_frames(run).height
    with FakeLLMServer(script=["500", "500"]) as srv:
        base = {
            **overrides,
            **FAST,
            "captioning.provider": "local",
            "captioning.local.base_url": srv.base_url,
            "captioning.concurrency": 1,
        }
        with pytest.raises(
            StageError, match=rf"would make {n} paid request\(s\) to local .* nothing was asked"
        ):
            run_stage(
                run,
                "captions",
                _cfg(tmp_path, {**base, "captioning.max_paid_requests": n - 1}),
                progress=False,
            )
        assert srv.requests == []
        # n frames fit, but two retries do not: the run stops at the cap, and what was answered is kept.
        with pytest.raises(StageError, match=rf"stopped after {n} paid request\(s\).*is not asked again"):
            run_stage(
                run, "captions", _cfg(tmp_path, {**base, "captioning.max_paid_requests": n}), progress=False
            )
        assert len(srv.requests) == n
        run_stage(run, "captions", _cfg(tmp_path, base), progress=False)
        assert len(srv.requests) == n + 2  # only the two frames the cap left unanswered
        assert set(srv.answered.values()) == {1}


# ----------------------------------------------------------------------------------- 31.5


def _tear(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # a torn file: no parquet footer


def test_stages_04_and_05_restore_the_corrections_they_read(board_run, tmp_path):
    """A damaged feedback or caption_edits used to fail stages 04/05 on every run until deleted;
    now the stages run on the restored table, with the moves and the typed caption kept."""
    from diffusion_bunny.pipeline.userwork import backup_path
    from diffusion_bunny.stages.scenes.stage import move_to_cluster

    run, overrides = board_run
    cfg = load_config(None, overrides, root=tmp_path / "nocfg")
    clusters = run.read_table("clusters").filter(pl.col("level") == "scene")
    noise = clusters.filter(pl.col("cluster_id") == "noise")["frame_id"][0]
    target = clusters.filter(pl.col("cluster_id") != "noise")["cluster_id"][0]
    move_to_cluster(run.run_dir, noise, target)
    feedback = run.read_table("feedback")
    assert backup_path(run.table_path("feedback")).is_file()
    assert backup_path(run.table_path("clusters")).is_file()

    captions = run_stage(run, "captions", cfg, progress=False)["captions"]
    frame = captions["frame_id"][0]
    edit_caption(run.run_dir, frame, "bunnystyle, typed by hand")
    edits = pl.read_parquet(run.table_path("caption_edits"))

    _tear(run.table_path("feedback"))
    _tear(run.table_path("caption_edits"))
    with pytest.warns(UserWarning, match="caption_edits.parquet was damaged"):
        captions = run_stage(run, "captions", cfg, progress=False, force=True)["captions"]
    assert captions.filter(pl.col("frame_id") == frame)["caption"][0] == "bunnystyle, typed by hand"
    assert pl.read_parquet(run.table_path("caption_edits")).equals(edits)
    with pytest.warns(UserWarning, match="feedback.parquet was damaged"):
        run_stage(run, "scenes", cfg, progress=False, force=True)
    assert run.read_table("feedback").equals(feedback)
    moved = run.read_table("clusters").filter((pl.col("level") == "scene") & (pl.col("frame_id") == noise))
    assert moved["cluster_id"][0] != "noise"  # the move survived the rerun


# ----------------------------------------------------------------------------------- 31.6


def _full_store(monkeypatch):
    """SQLite's own "database or disk is full": each connection may not grow the file past the
    pages it has (a page limit stands in for a full disk, which a test cannot make)."""
    original = CaptionCache._db

    def small(self):
        db = original(self)
        db.execute("PRAGMA max_page_count = 1")  # SQLite keeps the pages already there
        return db

    monkeypatch.setattr(CaptionCache, "_db", small)


def test_a_full_answer_store_is_one_line_naming_it(cap_run, tmp_path, monkeypatch):
    run, overrides = cap_run
    CaptionCache(run.run_dir / "cache" / "captions").close()  # the store as a first run leaves it
    _full_store(monkeypatch)
    with FakeLLMServer() as srv:
        cfg = _cfg(
            tmp_path,
            {**overrides, **FAST},
            captioning__provider="local",
            captioning__local__base_url=srv.base_url,
            captioning__concurrency=1,
        )
        with pytest.raises(StorageError) as err:
            run_stage(run, "captions", cfg, progress=False)
    message = str(err.value)
    store = run.run_dir / "cache" / "captions" / CaptionCache.FILE
    assert message.startswith(f"could not write the caption answer store {store}: database or disk is full")
    assert "\n" not in message and "stored before are kept" in message
    assert (
        0 < len(srv.requests) < _kept_frames(run).height
    )  # it stopped at the first answer it could not keep
    assert not run.has_table("captions")
