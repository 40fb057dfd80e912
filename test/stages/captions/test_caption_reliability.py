"""Stage 05 under faults: full frames sent, raw answers cached before parsing in a JSON
store that never evicts, identical requests asked once, edits kept while the stage writes,
secrets redacted from everything stored, and a circuit breaker that closes again. Every
paid answer recorded with its status (empty, refused, truncated, unparsable) and not asked again
unless captions.retry says so; the paid requests announced and capped before the first."""

from __future__ import annotations

import base64
import io
import json
import os
import re
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

from diffusion_bunny.config import load_config
from diffusion_bunny.errors import ConfigError, ProviderError, StageError, StorageError
from diffusion_bunny.pipeline.run import Run
from diffusion_bunny.stages import run_stage
from diffusion_bunny.stages.captions.providers import (
    PROMPT_VERSION,
    CaptionCache,
    CircuitBreaker,
    RawAnswer,
    make_provider,
    redact,
)
from diffusion_bunny.stages.captions.settings import CaptionsSettings
from diffusion_bunny.stages.captions.stage import caption_frames, edit_caption, frame_hashes

FAST = {
    "captions.backoff_base_s": 0.01,
    "captions.backoff_max_s": 0.05,
    "captions.requests_per_minute": 60000,
    "captions.timeout_s": 5,
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
    ``captions.image_max_side`` (not the 320-px thumbnail); another size is another request."""
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
                captions__provider="local",
                captions__local__base_url=srv.base_url,
                captions__image_max_side=max_side,
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
            captions__provider="local",
            captions__fallback=["template"],
            captions__local__base_url=srv.base_url,
            captions__breaker_failures=1000,
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


def test_answer_store_is_one_plain_json_file_per_answer_and_never_imports_diskcache(tmp_path):
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
    (path,) = (tmp_path / "c" / "answers").rglob("*.json")
    assert path == cache.path_of(key)
    assert json.loads(path.read_text()) == {"key": key, "raw": "text", "input_tokens": 3}
    assert CaptionCache(tmp_path / "c").get(key) == {"raw": "text", "input_tokens": 3}
    assert [p.name for p in (tmp_path / "c").rglob(".*")] == []  # written whole, renamed into place
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
            captions__provider="local",
            captions__local__base_url=srv.base_url,
            captions__concurrency=4,
        ).captions
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
    real_write = Run._write_staged
    editor: list[threading.Thread] = []

    def write_table(self, stack, name, df, *args, **kwargs):
        if name == "captions" and not editor:
            thread = threading.Thread(target=edit_caption, args=(run.run_dir, fid, "a hand-made caption"))
            editor.append(thread)
            thread.start()
            thread.join(timeout=1.0)  # without the lock the edit is done by now, and lost below
        return real_write(self, stack, name, df, *args, **kwargs)

    monkeypatch.setattr(Run, "_write_staged", write_table)
    run_stage(run, "captions", cfg, progress=False, force=True)
    editor[0].join(timeout=30)
    captions = run.read_table("captions")
    row = captions.filter(pl.col("frame_id") == fid).row(0, named=True)
    assert row["caption"] == "a hand-made caption" and row["status"] == "edited"
    # (Saved while the stage ran, its manifest gone, the trigger word in force was not known; the
    # next run puts it in front, as for every typed caption.)
    again = run_stage(run, "captions", cfg, progress=False)["captions"]
    assert again.filter(pl.col("frame_id") == fid)["caption"][0] == "bunnystyle, a hand-made caption"


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
            captions__provider="local",
            captions__fallback=["template"],
            captions__local__base_url=srv.base_url,
            captions__max_retries=0,
            captions__breaker_failures=2,
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


def test_a_key_echoed_in_a_paid_answer_is_not_written_to_the_answer_store(cap_run, tmp_path, monkeypatch):
    """The store kept a 200 answer's text and refusal as they came: a server that echoes the
    request headers in them put the key on disk, in the user's store beside every run folder."""
    run, overrides = cap_run
    canary = "sk-CANARY-echo200-9c1e"
    monkeypatch.setenv("LOCAL_LLM_API_KEY", canary)
    with FakeLLMServer(default="echo200") as srv:
        keep_asking = {"captions__fallback": ["template"], "captions__breaker_failures": 1000}
        cfg = _local(tmp_path, overrides, srv, **keep_asking)
        run_stage(run, "captions", cfg, progress=False)
        assert srv.requests and srv.requests[0]["headers"]["Authorization"] == f"Bearer {canary}"
    store = tmp_path / "user_cache"
    answers = [p for p in store.rglob("*") if p.is_file() and b"[redacted]" in p.read_bytes()]
    assert answers  # the echo reached the store, redacted
    leaks = [
        str(p)
        for p in [*store.rglob("*"), *run.run_dir.rglob("*")]
        if p.is_file() and canary.encode() in p.read_bytes()
    ]
    assert leaks == []


def test_a_429_retry_after_is_waited_for_up_to_backoff_max_s(tmp_path):
    """A 429's ``Retry-After`` was ignored: the retry came after the jittered backoff alone
    (milliseconds here), earning another 429. The wait is at least what the server asked,
    held to ``captions.backoff_max_s``."""
    facts = _plain_frames(tmp_path / "run", 1)
    for asked, cap, waited in (("7", 10.0, 7.0), ("120", 10.0, 10.0)):
        slept: list[float] = []
        with FakeLLMServer(script=["429"], retry_after=asked) as srv:
            cfg = _cfg(
                tmp_path,
                FAST,
                captions__provider="local",
                captions__local__base_url=srv.base_url,
                captions__backoff_max_s=cap,
                captions__cache_dir=str(tmp_path / f"answers{asked}"),
            ).captions
            cache = CaptionCache(tmp_path / f"answers{asked}")
            try:
                result = caption_frames(
                    tmp_path / "run",
                    facts,
                    [make_provider("local", cfg)],
                    cfg,
                    cache,
                    frame_hashes(tmp_path / "run", facts),
                    progress=False,
                    sleep=slept.append,
                )
            finally:
                cache.close()
        assert srv.behaviours() == ["429", "ok"]
        assert result.captions["status"].to_list() == ["ok"]
        assert max(slept) == pytest.approx(waited)


def test_a_run_stopped_while_its_request_waits_for_the_rate_limit_counts_only_what_was_sent(tmp_path):
    """The paid-request count was taken before the rate limiter's wait: a run stopped while a
    request waited (Ctrl-C) had it on the movie's count, never sent, and the cap came sooner."""
    from diffusion_bunny.stages.captions.stage import SpentLedger

    facts = _plain_frames(tmp_path / "run", 2)

    def stopped(seconds: float) -> None:
        raise KeyboardInterrupt

    with FakeLLMServer() as srv:
        cfg = _cfg(
            tmp_path,
            FAST,
            captions__provider="local",
            captions__local__base_url=srv.base_url,
            captions__requests_per_minute=1,
            captions__concurrency=1,
        ).captions
        ledger = SpentLedger(tmp_path / "store", "movie")
        cache = CaptionCache(tmp_path / "store")
        try:
            with pytest.raises(KeyboardInterrupt):
                caption_frames(
                    tmp_path / "run",
                    facts,
                    [make_provider("local", cfg)],
                    cfg,
                    cache,
                    frame_hashes(tmp_path / "run", facts),
                    progress=False,
                    sleep=stopped,
                    ledger=ledger,
                )
        finally:
            cache.close()
    assert len(srv.requests) == 1  # the second waited for the limit and was never sent
    assert json.loads(ledger.path.read_text())["requests"] == 1
    assert SpentLedger(tmp_path / "store", "movie").earlier == 1


def test_a_caption_whose_tags_are_not_a_json_list_is_kept_fresh_and_from_the_store(tmp_path):
    """dspy's parser threw a paid answer away as ``unparsable`` when its caption was fine but its
    tags were a bare comma list (``stage, performer, dark``) or missing. The caption is kept, the
    tags read leniently; an answer stored as unparsable by then is read again as a caption, with
    no request."""
    facts = _plain_frames(tmp_path / "run", 3)
    hashes = frame_hashes(tmp_path / "run", facts)

    def run(srv: FakeLLMServer, cache: CaptionCache):
        cfg = _cfg(
            tmp_path,
            FAST,
            captions__provider="local",
            captions__local__base_url=srv.base_url,
            captions__concurrency=1,
            captions__max_retries=0,
        ).captions
        provider = make_provider("local", cfg)
        return (
            provider,
            cfg,
            caption_frames(tmp_path / "run", facts.head(2), [provider], cfg, cache, hashes, progress=False),
        )

    cache = CaptionCache(tmp_path / "store")
    try:
        with FakeLLMServer(script=["loosetags", "notags"]) as srv:
            provider, cfg, result = run(srv, cache)
        assert result.captions["status"].to_list() == ["ok", "ok"]
        assert result.captions["caption"].str.contains("seen by the fake server").all()
        assert sorted(map(list, result.captions["tags"].to_list())) == [[], ["stage", "performer", "dark"]]
        # An answer an earlier release stored as unparsable is a caption now, asked of nobody.
        third = facts.row(2, named=True)
        key = CaptionCache.key_for(hashes["f2"], provider, third, cfg)
        text = "[[ ## caption ## ]]\na red stage\n\n[[ ## tags ## ]]\nstage, red\n\n[[ ## completed ## ]]"
        cache.set(key, {"raw": text, "status": "unparsable", "detail": "AdapterParseError: tags"})
        with FakeLLMServer(default="500") as srv:
            cfg = _cfg(
                tmp_path, FAST, captions__provider="local", captions__local__base_url=srv.base_url
            ).captions
            provider = make_provider("local", cfg)
            stored = caption_frames(
                tmp_path / "run", facts.slice(2), [provider], cfg, cache, hashes, progress=False
            )
            assert srv.requests == []
    finally:
        cache.close()
    assert stored.captions["status"].to_list() == ["ok"]
    assert stored.captions["caption"][0].endswith("a red stage")
    assert list(stored.captions["tags"][0]) == ["stage", "red"]
    # Not of an answer cut at max_tokens (its caption ends mid-word) or stopped by the filter.
    cut = "[[ ## caption ## ]]\nA woman in a long red coat stands at the stage's edge, her left hand rais"
    assert provider.status(RawAnswer(cut, finish_reason="length"))[0] == "truncated"
    assert provider.status(RawAnswer(cut, finish_reason="content_filter"))[0] == "refused"
    assert provider.status(RawAnswer(cut + "es.", finish_reason="stop"))[0] == "ok"
    # An answer whose caption says nothing (the trigger word alone, quotes, "N/A") was stored ok,
    # exported, and never asked again: it is no caption, and captions.retry can ask it again.
    for nothing in ("bunnystyle", '""', "N/A", "bunnystyle, none."):
        said = f"[[ ## caption ## ]]\n{nothing}\n\n[[ ## tags ## ]]\nstage\n\n[[ ## completed ## ]]"
        status, detail = provider.status(RawAnswer(said, finish_reason="stop"))
        assert status == "unparsable" and "caption says nothing" in detail, (nothing, status, detail)
    said = "[[ ## caption ## ]]\nbunnystyle, N/A sign\n\n[[ ## tags ## ]]\nsign\n\n[[ ## completed ## ]]"
    assert provider.status(RawAnswer(said, finish_reason="stop"))[0] == "ok"


def test_credentials_in_a_base_url_are_refused(tmp_path):
    for key in ("captions.local.base_url", "captions.openai.base_url", "captions.anthropic.base_url"):
        with pytest.raises(ConfigError, match=rf"{key}: must not carry credentials") as err:
            load_config(None, {key: "http://me:tok-SECRET@127.0.0.1:8000/v1"}, root=tmp_path / "nocfg")
        assert "tok-SECRET" not in str(err.value)
        # A key in the query string was written into settings.json, the manifest and the notebook.
        with pytest.raises(
            ConfigError, match=rf"{key}: must not carry a key in its query \(api_key\)"
        ) as err:
            load_config(None, {key: "http://127.0.0.1:8000/v1?api_key=sk-SECRET9"}, root=tmp_path / "nocfg")
        assert "sk-SECRET9" not in str(err.value)
    # A key in a URL that is mistyped too: refused for the key, never repeated (the form's error
    # repeats the value, printed and logged).
    for url in (
        "http://u:sk-SECRET1@host:99999/v1",
        "u:sk-SECRET1@host:8000/v1",
        "http//h/v1?key=sk-SECRET1",
        "http//h/v1?api_token=sk-SECRET1",
        "http://h/v1?x-api-key=sk-SECRET1",
        "http://h/v1?subscription-key=sk-SECRET1",
        "http://h/v1?auth=sk-SECRET1",
    ):
        with pytest.raises(ConfigError, match="must not carry") as err:
            load_config(None, {"captions.local.base_url": url}, root=tmp_path / "nocfg")
        assert "sk-SECRET1" not in str(err.value)
    # Parameters whose names only contain a key's word hold none.
    for url in (
        "https://h.example/v1?version=2",
        "http://127.0.0.1:8000/v1?tokenizer=auto",
        "http://gw.example/v1?auth_mode=none",
        "https://x.openai.azure.com/openai?api-version=2024-02-01",
        "http://[::1]:8000/v1",
        "https://h.example.com/v1/models/m@2024/",  # an "@" in the path is no user part
    ):
        load_config(None, {"captions.local.base_url": url}, root=tmp_path / "nocfg")


@pytest.mark.parametrize(
    "url, says",
    [
        ("http//127.0.0.1:8000/v1", "must be an http:// or https:// URL with a host"),
        ("/v1", "must be an http:// or https:// URL with a host"),
        ("http://127.0.0.1:8000a/v1", "is not a usable URL"),
    ],
)
def test_a_mistyped_base_url_is_a_config_error_naming_it(tmp_path, url, says):
    """urllib refused these inside stage 05 (``unknown url type``, ``nonnumeric port``) and the
    run ended as a bug report with exit status 1."""
    with pytest.raises(ConfigError, match=rf"captions.local.base_url = '{re.escape(url)}': {says}"):
        load_config(None, {"captions.local.base_url": url}, root=tmp_path / "nocfg")


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
            captions__provider="local",
            captions__fallback=["template"],
            captions__local__base_url=srv.base_url,
            captions__max_retries=0,
            captions__breaker_failures=1,
            captions__breaker_cooldown_s=0,
            captions__concurrency=1,
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
    assert isinstance(CaptionsSettings().breaker_cooldown_s, float)


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
        setting = {"local": "captions__local__base_url", "anthropic": "captions__anthropic__base_url"}[api]
        url = srv.base_url if api == "local" else srv.root_url
        cfg = _cfg(tmp_path, FAST, captions__provider=api, **{setting: url}).captions
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
    """Every recorded answer's status, by key (the user's store: one JSON file per answer)."""
    from diffusion_bunny.models.cache import cache_dir

    files = (cache_dir() / "captions" / "answers").rglob("*.json")
    return {v["key"]: v.get("status") for v in (json.loads(f.read_text()) for f in files)}


def test_paid_answers_without_a_caption_are_recorded_and_asked_again_only_on_request(
    cap_run, tmp_path, capsys
):
    """Provider that bills but answers nothing: every answer is recorded with its
    status; the rerun the error advises pays nothing more; captions.retry asks those statuses
    (and only those) again."""
    run, overrides = cap_run
    n = _kept_frames(run).height
    script = ["empty", "refused", "filtered", "length", "garbage"]
    with FakeLLMServer(script=list(script), default="empty") as srv:
        base = {
            **overrides,
            **FAST,
            "captions.provider": "local",
            "captions.local.base_url": srv.base_url,
            "captions.concurrency": 1,
            "captions.breaker_failures": 1000,
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
            tmp_path, {**base, "captions.retry": ["empty", "refused"], "captions.fallback": ["template"]}
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
            "captions.provider": "local",
            "captions.local.base_url": srv.base_url,
            "captions.concurrency": 1,
        }
        with pytest.raises(
            StageError, match=rf"would make {n} paid request\(s\) to local .* nothing was asked"
        ):
            run_stage(
                run,
                "captions",
                _cfg(tmp_path, {**base, "captions.max_paid_requests": n - 1}),
                progress=False,
            )
        assert srv.requests == []
        # n frames fit, but two retries do not: the run stops at the cap, and what was answered is kept.
        with pytest.raises(StageError, match=rf"stopped after {n} paid request\(s\).*is not asked again"):
            run_stage(
                run, "captions", _cfg(tmp_path, {**base, "captions.max_paid_requests": n}), progress=False
            )
        assert len(srv.requests) == n
        run_stage(run, "captions", _cfg(tmp_path, base), progress=False)
        assert len(srv.requests) == n + 2  # only the two frames the cap left unanswered
        assert set(srv.answered.values()) == {1}


def test_answers_in_flight_when_the_cap_is_reached_are_kept(cap_run, tmp_path):
    """With ``captions.concurrency`` above 1, the worker that reached the cap stopped the stage at
    once: the requests the other workers had sent (paid already) were answered, but their answers
    never reached the store, and the next run asked and paid for those frames again. The frames
    still queued are not asked; those in flight are waited for and kept."""
    run, overrides = cap_run
    n = _kept_frames(run).height
    before = len(_store(run))
    with FakeLLMServer(script=["500", "500"], delay_s=0.4) as srv:
        base = {
            **overrides,
            **FAST,
            "captions.provider": "local",
            "captions.local.base_url": srv.base_url,
            "captions.concurrency": 4,
        }
        with pytest.raises(StageError, match=rf"stopped after {n} paid request\(s\)"):
            run_stage(
                run, "captions", _cfg(tmp_path, {**base, "captions.max_paid_requests": n}), progress=False
            )
        assert len(_store(run)) - before == sum(srv.answered.values())  # every answer paid for
        run_stage(run, "captions", _cfg(tmp_path, base), progress=False)
        assert set(srv.answered.values()) == {1}  # no frame paid twice


# ------------------------------------------------------------------ paid once per user


def _plain_frames(run_dir: Path, n: int) -> pl.DataFrame:
    """``n`` small frames of plain colours in ``run_dir/frames/`` and their facts (no characters):
    what a test of the asking needs, without a run of stages 01-04."""
    (run_dir / "frames").mkdir(parents=True)
    rows = []
    for i, colour in enumerate([(90, 30, 200), (10, 200, 40), (200, 200, 10)][:n]):
        Image.new("RGB", (64, 48), colour).save(run_dir / "frames" / f"f{i}.jpg")
        rows.append({"frame_id": f"f{i}", "path": f"frames/f{i}.jpg", "characters": []})
    return pl.DataFrame(rows)


def _local(tmp_path, overrides, srv, **over):
    base = {
        **overrides,
        **FAST,
        "captions.provider": "local",
        "captions.local.base_url": srv.base_url,
        "captions.concurrency": 1,
    }
    return _cfg(tmp_path, base, **over)


def _second_run_folder(run: Run, tmp_path: Path, name: str) -> Run:
    """The same movie's run through stage 04 in another folder (as another ``--out`` makes it)."""
    other = tmp_path / name / run.run_dir.name  # the same folder name, somewhere else
    shutil.copytree(run.run_dir, other, ignore=shutil.ignore_patterns("cache", "captions.parquet"))
    return Run.open(other)


def test_a_movie_is_paid_for_once_per_user_whatever_its_run_folder(cap_run, tmp_path, capsys):
    """The answers live in one store per user (the user cache) that every run folder reads: the
    movie captioned into a second run folder pays nothing again; ``captions.cache: false`` keeps
    them in the run folder only (then a second folder pays again, its own rerun does not)."""
    from diffusion_bunny.models.cache import cache_dir

    run, overrides = cap_run
    n = _kept_frames(run).height
    with FakeLLMServer() as srv:
        run_stage(run, "captions", _local(tmp_path, overrides, srv), progress=False)
        assert len(srv.requests) == n
        assert len(list((cache_dir() / "captions" / "answers").rglob("*.json"))) == n
        assert not (run.run_dir / "cache" / "captions").exists()  # not in the run folder
        err = capsys.readouterr().err
        assert f"captions: {n} paid requests (0 answered from the store)" in err

        second = _second_run_folder(run, tmp_path, "elsewhere")
        tables = run_stage(second, "captions", _local(tmp_path, overrides, srv), progress=False)
        assert len(srv.requests) == n  # paid once
        assert (tables["caption_calls"]["outcome"] == "cached").sum() == n
        assert f"captions: 0 paid requests ({n} answered from the store)" in capsys.readouterr().err
        assert second.read_manifest("captions")["counts"]["paid_requests"] == 0

        third = _second_run_folder(run, tmp_path, "own_store")
        cfg = _local(tmp_path, overrides, srv, captions__cache=False)
        run_stage(third, "captions", cfg, progress=False)
        assert len(srv.requests) == 2 * n
        assert len(list((third.run_dir / "cache" / "captions" / "answers").rglob("*.json"))) == n
        run_stage(third, "captions", cfg, progress=False, force=True)
        assert len(srv.requests) == 2 * n
        # Paid with the store off, then the store back on: taken into it, not paid again.
        fourth = _second_run_folder(run, tmp_path, "own_then_shared")
        own = _local(tmp_path, overrides, srv, captions__cache=False, captions__local__model="own-model")
        run_stage(fourth, "captions", own, progress=False)
        assert len(srv.requests) == 3 * n
        shared = _local(tmp_path, overrides, srv, captions__local__model="own-model")
        run_stage(fourth, "captions", shared, progress=False, force=True)
        assert len(srv.requests) == 3 * n
        assert fourth.read_manifest("captions")["counts"]["paid_requests"] == 0


def test_the_cap_is_per_movie_and_kept_across_runs(cap_run, tmp_path):
    """Every paid attempt of every run of a movie counts against captions.max_paid_requests:
    a second run folder asking another model is stopped before its first request when the two
    runs together would pass it."""
    run, overrides = cap_run
    n = _kept_frames(run).height
    with FakeLLMServer() as srv:
        run_stage(
            run, "captions", _local(tmp_path, overrides, srv, captions__max_paid_requests=n), progress=False
        )
        second = _second_run_folder(run, tmp_path, "again")
        other_model = {"captions__local__model": "another-model", "captions__max_paid_requests": n + 1}
        with pytest.raises(StageError) as err:
            run_stage(second, "captions", _local(tmp_path, overrides, srv, **other_model), progress=False)
        message = str(err.value)
        assert (
            f"would make {n} paid request(s) to local (another-model) and the {n} made for this movie"
            in message
        )
        assert f"captions.max_paid_requests={2 * n}" in message and "nothing was asked" in message
        assert len(srv.requests) == n
        other_model["captions__max_paid_requests"] = 2 * n
        run_stage(second, "captions", _local(tmp_path, overrides, srv, **other_model), progress=False)
        assert len(srv.requests) == 2 * n


def test_a_200_with_an_unreadable_body_is_recorded_like_a_refusal(cap_run, tmp_path):
    """Billed (the server said 200) but nothing to read: recorded with status unreadable, never
    asked again unless captions.retry lists it."""
    run, overrides = cap_run
    n = _kept_frames(run).height
    with FakeLLMServer(script=["unreadable", "html"]) as srv:
        cfg = _local(tmp_path, overrides, srv, captions__fallback=["template"])
        tables = run_stage(run, "captions", cfg, progress=False)
        assert len(srv.requests) == n  # neither was asked again in the run
        calls = tables["caption_calls"]
        bad = calls.filter(pl.col("outcome") == "unreadable")
        assert bad.height == 2 and bad["error"].str.contains("HTTP 200").all()
        assert sorted(_store(run).values()).count("unreadable") == 2
        assert tables["captions"].filter(pl.col("provider") == "template").height == 2
        run_stage(run, "captions", cfg, progress=False, force=True)
        assert len(srv.requests) == n  # the rerun pays nothing
        run_stage(
            run,
            "captions",
            _local(tmp_path, overrides, srv, captions__retry=["unreadable"]),
            progress=False,
        )
        assert len(srv.requests) == n + 2


def test_a_timed_out_request_is_asked_once_more_at_most_and_logged_as_maybe_billed(cap_run, tmp_path, caplog):
    run, overrides = cap_run
    n = _kept_frames(run).height
    with FakeLLMServer(script=["hang", "hang"], hang_s=5) as srv:
        cfg = _local(
            tmp_path,
            overrides,
            srv,
            captions__timeout_s=0.5,
            captions__max_retries=4,
            captions__fallback=["template"],
        )
        with caplog.at_level("WARNING", logger="diffusion_bunny"):
            tables = run_stage(run, "captions", cfg, progress=False)
        assert len(srv.requests) == n + 1  # the first frame: asked, timed out, asked once more, timed out
        timeouts = tables["caption_calls"].filter(pl.col("outcome") == "timeout")["error"].to_list()
        assert len(timeouts) == 2
        assert "asked once more" in timeouts[0] and "not asked again in this run" in timeouts[1]
        logged = [r.getMessage() for r in caplog.records if "timed out" in r.getMessage()]
        assert len(logged) == 2 and all("the server may have answered and billed it" in m for m in logged)
        assert tables["captions"].filter(pl.col("provider") == "template").height == 1


def test_a_damaged_answer_store_is_moved_aside_and_nothing_readable_is_paid_again(cap_run, tmp_path):
    from diffusion_bunny.models.cache import cache_dir

    run, overrides = cap_run
    n = _kept_frames(run).height
    store = cache_dir() / "captions"
    with FakeLLMServer() as srv:
        cfg = _local(tmp_path, overrides, srv)
        run_stage(run, "captions", cfg, progress=False)
        files = sorted((store / "answers").rglob("*.json"))
        files[0].write_bytes(b"\x00\x13 not json")  # a disk error, a hand edit
        (store / CaptionCache.FILE).write_bytes(b"this is not a database")  # an earlier store, damaged
        with pytest.warns(UserWarning) as warned:
            run_stage(run, "captions", cfg, progress=False, force=True)
        assert len(srv.requests) == n + 1  # the damaged answer only
        lines = [str(w.message) for w in warned if "moved aside" in str(w.message)]
        assert len(lines) == 2 and all("\n" not in line for line in lines)
        assert any(f"a damaged answer file ({files[0].name})" in line for line in lines)
        assert any(f"the answer store {store / CaptionCache.FILE} is damaged" in line for line in lines)
        assert len(list((store / "damaged").iterdir())) == 2
        assert json.loads(files[0].read_text())["status"] == "ok"  # asked again, stored again


def test_answers_an_earlier_version_kept_in_the_run_folder_are_read_in(cap_run, tmp_path):
    """Earlier versions kept a run's answers in ``<run>/cache/captions/answers.sqlite3`` (WAL): the
    first run with the user's store reads them in, so nothing already paid for is asked again."""
    run, overrides = cap_run
    n = _kept_frames(run).height
    with FakeLLMServer() as srv:
        first = tmp_path / "first_store"
        run_stage(
            run,
            "captions",
            _local(tmp_path, overrides, srv, captions__cache_dir=str(first)),
            progress=False,
        )
        old = run.run_dir / "cache" / "captions"
        old.mkdir(parents=True)
        with sqlite3.connect(old / CaptionCache.FILE) as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("CREATE TABLE answers (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            for path in (first / "answers").rglob("*.json"):
                value = json.loads(path.read_text())
                db.execute("INSERT INTO answers VALUES (?, ?)", (value.pop("key"), json.dumps(value)))
        run_stage(run, "captions", _local(tmp_path, overrides, srv), progress=False, force=True)
        assert len(srv.requests) == n  # nothing asked again
        assert (old / f"{CaptionCache.FILE}.imported").is_file() and not (old / CaptionCache.FILE).exists()


def test_dspy_keeps_no_history_of_the_frames_sent(tmp_path):
    """dspy's LM history (its own and the process-wide one) would hold every request's messages,
    the frame as base64 included: about 1 GB over a feature film."""
    from dspy.clients import base_lm

    with FakeLLMServer() as srv:
        cfg = CaptionsSettings(provider="local", local={"base_url": srv.base_url})
        provider = make_provider("local", cfg)
        for shade in range(3):
            buf = io.BytesIO()
            Image.new("RGB", (64, 48), (shade * 60, 10, 10)).save(buf, format="JPEG")
            assert provider.caption(buf.getvalue(), {"characters": []}).caption.startswith("bunnystyle")
    assert provider.lm.history == []
    assert not any("base64," in json.dumps(e, default=str) for e in base_lm.GLOBAL_HISTORY)


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

    _tear(run.table_path("caption_edits"))
    with pytest.warns(UserWarning, match="caption_edits.parquet was damaged"):
        captions = run_stage(run, "captions", cfg, progress=False, force=True)["captions"]
    assert captions.filter(pl.col("frame_id") == frame)["caption"][0] == "bunnystyle, typed by hand"
    assert pl.read_parquet(run.table_path("caption_edits")).equals(edits)
    # (torn now: stage 05's look at whether stage 04 is behind reads feedback, and restores it too)
    _tear(run.table_path("feedback"))
    with pytest.warns(UserWarning, match="feedback.parquet was damaged"):
        run_stage(run, "scenes", cfg, progress=False, force=True)
    assert run.read_table("feedback").equals(feedback)
    moved = run.read_table("clusters").filter((pl.col("level") == "scene") & (pl.col("frame_id") == noise))
    assert moved["cluster_id"][0] != "noise"  # the move survived the rerun


# ----------------------------------------------------------------------------------- 31.6


def test_a_full_answer_store_is_one_line_naming_it(cap_run, tmp_path, monkeypatch):
    """The store on a small file system of its own (a tmpfs as root, else the error injected),
    full after a few answers: one line naming the answer file, the requests stopped at the first
    answer it could not keep, and the answers kept before are read back by the rerun."""
    from small_disk import inject_full_disk, small_disk

    run, overrides = cap_run
    n = _kept_frames(run).height
    with small_disk(tmp_path, 16 << 20) as disk, FakeLLMServer(delay_s=0.05) as srv:
        store = disk.root / "answers" if disk else tmp_path / "answers"
        cfg = _cfg(
            tmp_path,
            {**overrides, **FAST},
            captions__provider="local",
            captions__local__base_url=srv.base_url,
            captions__concurrency=1,
            captions__cache_dir=str(store),
        )
        real_set = CaptionCache.set

        def set_then_fill(self, key, value):  # the disk fills after the third answer
            real_set(self, key, value)
            if len(self) == 3 and disk:
                disk.fill(leave=0)
            elif len(self) == 3:
                inject_full_disk(monkeypatch, store)

        monkeypatch.setattr(CaptionCache, "set", set_then_fill)
        with pytest.raises(StorageError) as err:
            run_stage(run, "captions", cfg, progress=False)
        message = str(err.value)
        # The count of paid requests, written before each request, is the first write to fail.
        assert message.startswith(f"could not write {store}/spent/")
        assert "No space left on device" in message and "\n" not in message and ".tmp-" not in message
        assert len(srv.requests) == 3  # it stopped before paying for what it could not keep
        assert not run.has_table("captions")
        monkeypatch.undo()
        if disk:
            disk.empty()
        run_stage(run, "captions", cfg, progress=False)
        assert len(srv.requests) == n  # the three kept are read back, never paid again


def test_bunny_run_shows_the_paid_requests_on_the_terminal_while_they_happen(cap_run, tmp_path, capsys):
    """Under ``bunny run`` the stage runs in a notebook's kernel, whose standard error the
    terminal never sees: the announcement and the count of paid requests are relayed to it."""
    from diffusion_bunny.cli import main

    run, overrides = cap_run
    n = _kept_frames(run).height
    with FakeLLMServer(delay_s=0.2) as srv:
        settings = {
            **overrides,
            **FAST,
            "captions.provider": "local",
            "captions.local.base_url": srv.base_url,
            "captions.concurrency": 1,
        }
        args = ["run", str(run.movie), "--out", str(run.run_dir), "--stages", "captions"]
        args += [
            a
            for k, v in settings.items()
            for a in ("--set", f"{k}={json.dumps(v) if isinstance(v, (list, dict)) else v}")
        ]
        capsys.readouterr()
        assert main(args) == 0
        err = capsys.readouterr().err
        assert f"captions: {n} paid request(s) to local" in err
        assert f"captions: {n} paid requests (0 answered from the store)" in err
        assert len(srv.requests) == n
        assert main([*args, "--force"]) == 0
        assert f"captions: 0 paid requests ({n} answered from the store)" in capsys.readouterr().err
    log = Path(sorted((Path(os.environ["DIFFUSION_BUNNY_LOG_DIR"])).glob("bunny-*.log"))[-1])
    assert log.read_text().count(f"captions: 0 paid requests ({n} answered from the store)") == 1  # not twice


def test_a_circuit_of_the_chains_last_provider_does_not_say_frames_went_to_a_next_one():
    """With one provider and no fallback, "later frames went to the next provider" named a
    provider that does not exist: those frames got no caption."""
    from diffusion_bunny.stages.captions.stage import _warnings

    empty = pl.DataFrame({"error": []}, schema={"error": pl.Utf8})
    calls = pl.DataFrame()
    breakers = {"local": ("timed out", True, 1), "openai": ("429", False, 2)}
    lines = _warnings(None, empty, calls, breakers, last="local")
    assert "provider local's circuit opened 1 time(s) (timed out); later frames got no caption" in lines
    assert any("openai's circuit" in w and "went to the next provider until a probe" in w for w in lines)


def test_a_frame_file_that_cannot_be_decoded_goes_on_to_the_template(cap_run, tmp_path):
    """A damaged frame file skips the paid providers, not the chain: the template reads the
    tables, so a chain ending with it captions every frame, and the log says why."""
    run, overrides = cap_run
    frames = _kept_frames(run)
    bad_id, bad_file = frames["frame_id"][0], run.run_dir / frames["path"][0]
    bad_file.write_bytes(bad_file.read_bytes()[:200])
    with FakeLLMServer() as srv:
        cfg = _local(tmp_path, overrides, srv, captions__fallback=["template"])
        tables = run_stage(run, "captions", cfg, progress=False, force=True)
        assert len(srv.requests) == frames.height - 1
    row = tables["captions"].filter(pl.col("frame_id") == bad_id).row(0, named=True)
    assert (row["status"], row["provider"]) == ("ok", "template")
    assert row["caption"].startswith("bunnystyle")
    outcomes = tables["caption_calls"].filter(pl.col("frame_id") == bad_id)["outcome"].to_list()
    assert "unreadable" in outcomes
    others = tables["captions"].filter(pl.col("frame_id") != bad_id)
    assert (others["provider"] == "local").all()

    # Without a template the frame fails, naming its file.
    with FakeLLMServer() as srv:
        cfg = _local(tmp_path, overrides, srv)
        row = (
            run_stage(run, "captions", cfg, progress=False, force=True)["captions"]
            .filter(pl.col("frame_id") == bad_id)
            .row(0, named=True)
        )
    assert row["status"] == "failed" and f"frame file unreadable: {bad_file.name}" in row["error"]


def test_an_answer_recorded_as_unparsable_is_parsed_again_from_the_store(cap_run, tmp_path):
    """An answer an older (or stricter) parser could not read is parsed again on the next run:
    paid for once, it becomes the caption when it parses now, with no new request."""
    from diffusion_bunny.models.cache import cache_dir

    run, overrides = cap_run
    n = _kept_frames(run).height
    with FakeLLMServer() as srv:
        cfg = _local(tmp_path, overrides, srv, captions__fallback=["template"])
        first = run_stage(run, "captions", cfg, progress=False)["captions"]
        assert len(srv.requests) == n and (first["provider"] == "local").all()
        for f in (cache_dir() / "captions" / "answers").rglob("*.json"):
            record = json.loads(f.read_text())
            f.write_text(json.dumps({**record, "status": "unparsable", "detail": "an older parser"}))
        again = run_stage(run, "captions", cfg, progress=False, force=True)
        assert len(srv.requests) == n  # nothing paid again
    assert (again["captions"]["provider"] == "local").all()
    assert again["captions"]["caption"].to_list() == first["caption"].to_list()
    assert (again["caption_calls"]["outcome"] == "cached").all()
