"""Stage 05 captions: the template, the providers over real HTTP (a scripted fake server on
127.0.0.1) and boto3 (botocore's Stubber), retries, the circuit breaker and fallback order, the
disk cache that makes every paid answer happen once (also across a kill), edits, and secrets."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time

import polars as pl
import pytest
from fake_llm_server import FakeLLMServer, caption_text, image_digest
from paths import ROOT

from diffusion_bunny.config import load_config
from diffusion_bunny.errors import BadInputError, ConfigError, ProviderError, StageError
from diffusion_bunny.pipeline.run import Run
from diffusion_bunny.stages import PIPELINE, run_stage, stage_state
from diffusion_bunny.stages.captions.facts import caption_facts, framing_of, light_of, template_caption
from diffusion_bunny.stages.captions.providers import (
    PROMPT_VERSION,
    PROVIDER_DOWN,
    RETRY,
    CaptionCache,
    CircuitBreaker,
    RateLimiter,
    backoff_delay,
    classify,
    make_provider,
)
from diffusion_bunny.stages.captions.settings import CaptionsSettings
from diffusion_bunny.stages.captions.stage import answers_dir, edit_caption, read_edits
from diffusion_bunny.stages.captions.tables import crop_template_caption, word_frequencies

FAST = {  # retries in milliseconds, no pacing: the tests are about what happens, not when
    "captions.backoff_base_s": 0.01,
    "captions.backoff_max_s": 0.05,
    "captions.requests_per_minute": 60000,
    "captions.timeout_s": 2,
}


def _cfg(tmp_path, base: dict, **over):
    return load_config(
        None, {**base, **{k.replace("__", "."): v for k, v in over.items()}}, root=tmp_path / "nocfg"
    )


def _expected_image(run: Run, rel_path: str, max_side: int) -> bytes:
    """What a paid provider must be sent for a frame, computed here from ``frames.path`` with
    Pillow alone (not with the code under test): the full frame, long side scaled to
    ``max_side``, as a quality-90 JPEG."""
    import io

    from PIL import Image

    with Image.open(run.run_dir / rel_path) as img:
        img = img.convert("RGB")
        if max(img.size) > max_side:
            img.thumbnail((max_side, max_side))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _digests(run: Run, max_side: int | None = None) -> dict[str, str]:
    """frame id -> the digest the fake server computes of what it must be sent."""
    max_side = max_side or CaptionsSettings().image_max_side
    out = {}
    frames = run.read_table("frames")
    kept = run.read_table("quality").filter("keep")["frame_id"].to_list()
    for rec in frames.filter(pl.col("frame_id").is_in(kept)).iter_rows(named=True):
        out[rec["frame_id"]] = image_digest(_expected_image(run, rec["path"], max_side))
    return out


# --------------------------------------------------------------------------------------------
# pure parts


def test_framing_light_and_template_caption():
    cfg = CaptionsSettings(scene_names={"s002": "kitchen"})
    assert framing_of(None, cfg) == "wide shot"
    assert framing_of(0.05, cfg) == "wide shot"
    assert framing_of(0.2, cfg) == "medium shot"
    assert framing_of(0.5, cfg) == "close-up"
    assert light_of(20, cfg) == "dark" and light_of(220, cfg) == "bright" and light_of(120, cfg) == ""
    facts = {
        "characters": ["astronaut", "grace_hopper"],
        "unknown_faces": 1,
        "framing": "close-up",
        "motion": "static shot",
        "scene": "s002",
        "light": "dark",
    }
    text, tags = template_caption(facts, cfg)
    assert text == (
        "bunnystyle, astronaut and grace_hopper and 1 other person, close-up, static shot, dark, "
        "in the kitchen"
    )
    assert tags[:2] == ["astronaut", "grace_hopper"] and "scene:s002" in tags
    empty = {
        **facts,
        "characters": [],
        "unknown_faces": 0,
        "scene": "noise",
        "light": "",
        "nobody_known": True,
    }
    text, tags = template_caption(empty, cfg)
    assert text == "bunnystyle, no people, close-up, static shot" and "no people" in tags
    # Nobody found where that proves nothing (a drawn film, a frame not searched): nothing said.
    text, tags = template_caption({**empty, "nobody_known": False}, cfg)
    assert text == "bunnystyle, close-up, static shot" and "no people" not in tags
    # A YAML block (``>``) ends in a line break, which kohya took for the caption's end; a name
    # that has its article ("the kitchen") was said "in the the kitchen".
    blocks = load_config(
        None, {"captions.character_descriptions": {"astronaut": "a woman in\na space suit\n"}}
    ).captions
    assert blocks.character_descriptions == {"astronaut": "a woman in a space suit"}
    named = CaptionsSettings(scene_names={"s002": "the  kitchen\n", "s003": "A cave"})
    assert template_caption({**facts, "characters": ["astronaut"], "unknown_faces": 0}, named)[0].endswith(
        ", dark, in the kitchen"
    )
    assert template_caption({**facts, "scene": "s003"}, named)[0].endswith(", dark, in A cave")


def test_a_crop_gets_the_template_caption_of_what_it_shows():
    cfg = CaptionsSettings(
        scene_names={"s002": "kitchen"}, character_descriptions={"biscuit": "a cartoon dog"}
    )
    frame = {
        "characters": ["astronaut", "biscuit"],
        "unknown_faces": 2,
        "framing": "wide shot",
        "motion": "moving shot",
        "scene": "s002",
        "light": "dark",
    }
    text, tags = template_caption(frame, cfg)
    # Beside others, a description is in brackets: each one stays with its own name.
    assert text.startswith("bunnystyle, astronaut and biscuit (a cartoon dog) and 2 other people, wide shot")
    two = CaptionsSettings(character_descriptions={"fatbat": "a cartoon bat", "owl": "a cartoon owl"})
    pair = template_caption({**frame, "characters": ["fatbat", "owl"], "unknown_faces": 0}, two)[0]
    assert pair.startswith("bunnystyle, fatbat (a cartoon bat) and owl (a cartoon owl), wide shot")
    # The dog's crop: only the dog, the crop's framing, the frame's motion, light and scene.
    assert crop_template_caption(tags, ["biscuit"], "", cfg) == (
        "bunnystyle, biscuit, a cartoon dog, moving shot, dark, in the kitchen"
    )
    assert crop_template_caption(tags, ["astronaut"], "close-up", cfg) == (
        "bunnystyle, astronaut, close-up, moving shot, dark, in the kitchen"
    )
    assert crop_template_caption(tags, ["astronaut"], "upper body", cfg, unknown=2) == (
        "bunnystyle, astronaut and 2 other people, upper body, moving shot, dark, in the kitchen"
    )
    # A frame in ordinary light, outside any scene: nothing made up.
    plain = template_caption({**frame, "light": "", "scene": ""}, cfg)[1]
    assert (
        crop_template_caption(plain, ["astronaut"], "close-up", cfg)
        == "bunnystyle, astronaut, close-up, moving shot"
    )


def test_caption_facts_from_tables():
    cfg = CaptionsSettings()
    frames = pl.DataFrame(
        {
            "frame_id": ["a", "b", "c"],
            "path": ["a.jpg", "b.jpg", "c.jpg"],
            "shot_id": [0, 1, 1],
            "width": [160] * 3,
            "height": [100] * 3,
        }
    )
    quality = pl.DataFrame(
        {"frame_id": ["a", "b", "c"], "keep": [True, True, False], "brightness": [30.0, 120, 90]}
    )
    faces = pl.DataFrame(
        {
            "frame_id": ["a", "a", "b"],
            "character": ["zoe", None, None],
            "top": [0, 0, 10],
            "bottom": [40, 10, 25],
        }
    )
    shots = pl.DataFrame({"shot_id": [0, 1], "kind": ["static", "dynamic"]})
    clusters = pl.DataFrame(
        {"frame_id": ["a", "b"], "level": ["scene", "scene"], "cluster_id": ["s001", "noise"]}
    )
    facts = caption_facts(frames, cfg, quality=quality, faces=faces, shots=shots, clusters=clusters)
    assert facts["frame_id"].to_list() == ["a", "b"]  # c was not kept
    a, b = facts.to_dicts()
    assert (a["characters"], a["unknown_faces"], a["framing"], a["motion"], a["light"], a["scene"]) == (
        ["zoe"],
        1,
        "close-up",
        "static shot",
        "dark",
        "s001",
    )
    assert (b["characters"], b["unknown_faces"], b["framing"], b["motion"]) == (
        [],
        1,
        "medium shot",
        "moving shot",
    )
    everything = caption_facts(frames, CaptionsSettings(frames="all"), quality=quality)
    assert everything.height == 3 and everything["framing"].to_list() == ["wide shot"] * 3
    assert not everything["nobody_known"].any()  # stage 03 searched nothing: nobody's absence unknown


def test_no_people_is_said_only_where_finding_nobody_means_nobody_is_there():
    """A frame stage 03 searched in a film whose faces it finds: "no people". A frame it did not
    search, a film with drawn characters (whose detector misses many sightings), or a film with
    no face anywhere (a cartoon searched without pictures): nothing said about who is there."""
    cfg = CaptionsSettings(frames="all")
    frames = pl.DataFrame(
        {
            "frame_id": ["a", "b", "c"],
            "path": ["a.jpg", "b.jpg", "c.jpg"],
            "shot_id": [0, 0, 1],
            "width": [160] * 3,
            "height": [100] * 3,
        }
    )
    quality = pl.DataFrame({"frame_id": ["a", "b", "c"], "keep": [True] * 3, "brightness": [120.0] * 3})
    searched = pl.DataFrame({"frame_id": ["a", "b"], "status": ["ok", "ok"]})  # c was not searched
    people = pl.DataFrame(
        {"frame_id": ["a"], "character": ["zoe"], "top": [0], "bottom": [40], "kind": ["face"]}
    )

    def captions(faces, face_frames):
        facts = caption_facts(frames, cfg, quality=quality, faces=faces, face_frames=face_frames)
        return [template_caption(row, cfg)[0] for row in facts.to_dicts()]

    assert captions(people, searched) == [
        "bunnystyle, zoe, close-up",
        "bunnystyle, no people, wide shot",
        "bunnystyle, wide shot",
    ]
    drawn = people.with_columns(pl.lit("drawn").alias("kind"), pl.lit("red_guard").alias("character"))
    assert captions(drawn, searched)[1:] == ["bunnystyle, wide shot"] * 2
    # People and drawn characters in one film (the demo's): the drawn ones' detector misses, so
    # finding nobody says nothing there either (though an unnamed face is a person there).
    mixed = pl.concat([people, drawn.with_columns(pl.lit("c").alias("frame_id"))])
    assert captions(mixed, searched)[1] == "bunnystyle, wide shot"
    assert captions(people.clear(), searched) == ["bunnystyle, wide shot"] * 3
    assert captions(people, None)[1:] == ["bunnystyle, wide shot"] * 2


def test_an_unnamed_face_is_a_person_only_in_a_film_of_people():
    """Wesnoth's captions read "a person" (the painted knight the drawn detector missed) and
    "orc_ruler and 1 other person" (a skull on his pole): in a film of drawn characters an
    unnamed face is not said. Where a face was named from a photo (people and drawn characters
    in one film, as the demo's), an unnamed face is still a person."""
    cfg = CaptionsSettings(frames="all")
    frames = pl.DataFrame(
        {
            "frame_id": ["a", "b"],
            "path": ["a.jpg", "b.jpg"],
            "shot_id": [0, 1],
            "width": [160] * 2,
            "height": [100] * 2,
        }
    )
    quality = pl.DataFrame({"frame_id": ["a", "b"], "keep": [True] * 2, "brightness": [120.0] * 2})
    found = pl.DataFrame(
        {
            "frame_id": ["a", "a", "b"],
            "character": ["orc_ruler", None, None],
            "top": [0, 0, 0],
            "bottom": [90, 10, 10],
            "kind": ["drawn", "face", "face"],
            "low_confidence": [False, False, False],
        }
    )

    def captions(faces):
        facts = caption_facts(frames, cfg, quality=quality, faces=faces)
        return [template_caption(row, cfg)[0] for row in facts.to_dicts()]

    # The orc's figure fills 90% of the picture (judged as FIGURE_HEADS heads): a medium shot;
    # a whole figure of two thirds of it (the demo's girl) stays a wide shot.
    assert captions(found) == ["bunnystyle, orc_ruler, medium shot", "bunnystyle, wide shot"]
    heir = pl.DataFrame(
        {"frame_id": ["b"], "character": ["orc_ruler"], "top": [0], "bottom": [10], "kind": ["face"]}
    ).with_columns(pl.lit(True).alias("low_confidence"))
    assert captions(pl.concat([found, heir], how="diagonal"))[0] == "bunnystyle, orc_ruler, medium shot"
    person = heir.with_columns(pl.lit("zoe").alias("character"), pl.lit(False).alias("low_confidence"))
    # A film of people too: frame a's unnamed face is a person, and frames the picture (10%: wide).
    assert captions(pl.concat([found, person], how="diagonal")) == [
        "bunnystyle, orc_ruler and 1 other person, wide shot",
        "bunnystyle, zoe and 1 other person, wide shot",
    ]


def test_framing_in_a_film_of_drawn_characters_comes_from_who_is_there():
    """A face nobody named is no person in a film of drawn characters (a skull on the warlord's
    pole), so it frames nothing: Wesnoth's orc read "close-up" for the skull. A drawn character's
    figure frames the picture where no face does: one filling the frame is not a wide shot."""
    cfg = CaptionsSettings(frames="all")
    ids = ["skull", "small", "two_thirds", "whole", "named_face"]
    frames = pl.DataFrame(
        {"frame_id": ids, "path": [f"{i}.jpg" for i in ids], "shot_id": [0, 0, 1, 1, 2], "width": [160] * 5}
    ).with_columns(pl.lit(100).alias("height"))
    quality = pl.DataFrame({"frame_id": ids, "keep": [True] * 5, "brightness": [120.0] * 5})
    found = pl.DataFrame(
        {
            "frame_id": ["skull", "skull", "small", "two_thirds", "whole", "named_face", "named_face"],
            "character": ["orc_ruler", None, "orc_ruler", "orc_ruler", "orc_ruler", "orc_ruler", "orc_ruler"],
            "top": [60, 0, 70, 33, 0, 20, 20],
            "bottom": [90, 50, 95, 100, 100, 100, 55],
            "kind": ["drawn", "face", "drawn", "drawn", "drawn", "drawn", "face"],
            # A face on a named drawn figure is named after it, low confidence (faces_of_drawn).
            "low_confidence": [False] * 6 + [True],
        }
    )
    facts = caption_facts(frames, cfg, quality=quality, faces=found)
    assert dict(zip(facts["frame_id"], facts["framing"], strict=True)) == {
        "skull": "wide shot",  # the 50% face is no one's; the orc's figure is 30% of the picture
        "small": "wide shot",
        "two_thirds": "wide shot",  # a whole figure in its scene, as the demo's girl
        "whole": "medium shot",
        "named_face": "close-up",  # his own face (named after him on his figure) frames it: 35%
    }
    assert facts["unknown_faces"].to_list() == [0] * 5


def test_a_face_fixed_to_none_is_nobody_and_frames_nothing():
    """A face a person fixed to none in notebook 03 (``edited``, no name) is a false sighting:
    the Hamilton clip's frame kept "4 people, close-up" after two of its four faces were fixed
    so, and a named face fixed to none turned "lin_manuel_miranda, close-up" into "a person"."""
    cfg = CaptionsSettings(frames="all")
    ids = ["crowd", "ghost", "lin"]
    frames = pl.DataFrame(
        {"frame_id": ids, "path": [f"{i}.jpg" for i in ids], "shot_id": [0, 1, 2], "width": [160] * 3}
    ).with_columns(pl.lit(100).alias("height"))
    quality = pl.DataFrame({"frame_id": ids, "keep": [True] * 3, "brightness": [120.0] * 3})
    searched = pl.DataFrame({"frame_id": ids, "status": ["ok"] * 3})
    faces = pl.DataFrame(
        {
            "frame_id": ["crowd"] * 4 + ["ghost", "lin"],
            # The crowd's two large faces and the ghost were fixed to none, lin's face is named.
            "character": [None, None, None, None, None, "lin"],
            "top": [0, 0, 0, 0, 0, 0],
            "bottom": [50, 40, 10, 10, 60, 40],
            "kind": ["face"] * 6,
            "edited": [True, True, False, False, True, False],
        }
    )

    def captions(table):
        facts = caption_facts(frames, cfg, quality=quality, faces=table, face_frames=searched)
        return [template_caption(row, cfg)[0] for row in facts.to_dicts()]

    assert captions(faces) == [
        "bunnystyle, 2 people, wide shot",  # the two faces left, 10% of the picture
        "bunnystyle, no people, wide shot",  # its one face was no one
        "bunnystyle, lin, close-up",
    ]
    # Lin's face fixed to none as well: nobody there, no close-up.
    unnamed = faces.with_columns(
        pl.when(pl.col("frame_id") == "lin").then(None).otherwise(pl.col("character")).alias("character"),
        (pl.col("edited") | (pl.col("frame_id") == "lin")).alias("edited"),
    )
    assert captions(unnamed)[2] == "bunnystyle, no people, wide shot"
    # Not fixed, the same faces are people (a table from before fixes counts every face).
    assert captions(faces.drop("edited")) == [
        "bunnystyle, 4 people, close-up",
        "bunnystyle, a person, close-up",
        "bunnystyle, lin, close-up",
    ]


def test_rate_limiter_paces_requests():
    now = [0.0]
    slept = []

    def sleep(s):
        slept.append(s)
        now[0] += s

    limiter = RateLimiter(60, burst=2, clock=lambda: now[0], sleep=sleep)
    waits = [limiter.acquire() for _ in range(5)]
    assert waits[:2] == [0.0, 0.0]  # the burst
    assert all(w == pytest.approx(1.0) for w in waits[2:])  # then one a second
    assert now[0] == pytest.approx(3.0)


def test_backoff_is_capped_full_jitter():
    import random

    rng = random.Random(1)
    for attempt in range(8):
        values = [backoff_delay(attempt, 0.5, 4.0, rng) for _ in range(200)]
        assert min(values) >= 0 and max(values) <= min(4.0, 0.5 * 2**attempt)
    assert max(backoff_delay(6, 0.5, 4.0, rng) for _ in range(200)) > 2.0  # spread, not constant


def test_circuit_breaker_opens_after_consecutive_failures():
    breaker = CircuitBreaker(3)
    breaker.failure("x")
    breaker.failure("x")
    breaker.success()  # a success resets the run of failures
    breaker.failure("x")
    breaker.failure("x")
    assert not breaker.open
    breaker.failure("third")
    assert breaker.open and breaker.reason == "third"
    fatal = CircuitBreaker(10)
    fatal.failure("key refused", fatal=True)
    assert fatal.open


def test_errors_are_classified():
    from botocore.exceptions import ClientError, ReadTimeoutError
    from dspy.utils.exceptions import AdapterParseError, LMAuthError, LMRateLimitError, LMServerError

    assert classify(LMRateLimitError("slow down")) == RETRY
    assert classify(LMServerError("boom")) == RETRY
    assert classify(LMAuthError("bad key")) == PROVIDER_DOWN
    assert classify(ReadTimeoutError(endpoint_url="https://x")) == RETRY
    throttled = ClientError({"Error": {"Code": "ThrottlingException", "Message": "m"}}, "Converse")
    denied = ClientError({"Error": {"Code": "AccessDeniedException", "Message": "m"}}, "Converse")
    assert classify(throttled) == RETRY and classify(denied) == PROVIDER_DOWN
    try:  # dspy wraps what an engine raises: the cause decides
        try:
            raise throttled
        except ClientError as inner:
            raise RuntimeError("wrapped") from inner
    except RuntimeError as outer:
        assert classify(outer) == RETRY
    from diffusion_bunny.stages.captions.providers import caption_signature

    parse = AdapterParseError(adapter_name="ChatAdapter", signature=caption_signature(), lm_response="x")
    assert classify(parse) == "item_failed"


def test_config_rejects_unknown_provider_and_bad_orders(tmp_path):
    with pytest.raises(ConfigError, match=r"captions\.provider.*'gpt'"):
        load_config(None, {"captions.provider": "gpt"}, root=tmp_path)
    with pytest.raises(ConfigError, match=r"captions\.fallback"):
        load_config(None, {"captions.fallback": ["template", "nope"]}, root=tmp_path)
    with pytest.raises(ConfigError, match="medium_ratio"):
        load_config(None, {"captions.medium_ratio": 0.5}, root=tmp_path)
    cfg = load_config(
        None, {"captions.provider": "local", "captions.fallback": ["local", "template"]}, root=tmp_path
    )
    assert cfg.captions.chain() == ["local", "template"]


def test_word_frequencies():
    captions = pl.DataFrame({"caption": ["bunnystyle, a cat, close-up", "bunnystyle, cat on mat", None]})
    freq = word_frequencies(captions, skip=("bunnystyle",))
    assert freq.row(0) == ("cat", 2)
    assert "bunnystyle" not in freq["word"].to_list()
    # Captions holding the word, each once: "shot" is in 2 captions, not 3 (the axis's words).
    twice = pl.DataFrame({"caption": ["a b, medium shot, static shot", "a cat, long shot"]})
    assert dict(word_frequencies(twice).iter_rows())["shot"] == 2


# --------------------------------------------------------------------------------------------
# the stage


def test_template_stage_captions_every_kept_frame_offline(cap_run, tmp_path):
    run, overrides = cap_run
    cfg = _cfg(tmp_path, overrides)
    captions = run_stage(run, "captions", cfg, progress=False)["captions"]
    kept = run.read_table("quality").filter("keep")["frame_id"].sort().to_list()
    assert captions["frame_id"].to_list() == kept
    assert (captions["status"] == "ok").all() and (captions["provider"] == "template").all()
    assert captions["caption"].str.starts_with("bunnystyle, ").all()
    faces = run.read_table("faces").filter(pl.col("character").is_not_null())
    for fid, name in zip(faces["frame_id"], faces["character"], strict=True):
        assert name in captions.filter(pl.col("frame_id") == fid)["caption"][0]
    assert set(captions.columns) >= {"frame_id", "caption", "provider", "model", "status", "tags"}
    manifest = run.read_manifest("captions")
    assert manifest["counts"]["paid_requests"] == 0 and manifest["facts"]["prompt_version"] == PROMPT_VERSION
    assert stage_state(run, "captions", cfg)[0] == "done"
    # A face confirmed (or doubted) in notebook 03 changes whether unnamed faces are people in a
    # film with drawn characters: the captions are out of date, as for a new name.
    faces = run.read_table("faces")
    run.write_table("faces", faces.with_columns(~pl.col("low_confidence").fill_null(False)))
    assert stage_state(run, "captions", cfg)[0] == "stale"
    for stage in ("captions", "export"):
        reads = next(r for r in PIPELINE.get(stage).reads if r.table == "faces")
        assert "low_confidence" in reads.columns, stage


def test_missing_tables_and_no_kept_frames(tmp_path, demo_run):
    empty = Run.create(tmp_path / "empty", demo_run.movie)
    with pytest.raises(StageError, match=r"table 'frames' is missing.*run stage extract"):
        run_stage(empty, "captions", load_config(root=tmp_path))
    shutil.copytree(demo_run.run_dir, tmp_path / "r")
    run = Run.open(tmp_path / "r")
    run.write_table("quality", run.read_table("quality").with_columns(pl.lit(False).alias("keep")))
    with pytest.raises(StageError, match=r"no frames to caption.*captions\.frames: all"):
        run_stage(run, "captions", load_config(root=tmp_path))


def test_local_server_with_faults_captions_every_frame_exactly_once(cap_run, tmp_path):
    """429, 500 and a hung request among the answers, 4 requests in flight: every frame gets the
    server's caption, each image is answered (paid) exactly once, the failures are retried and
    logged; a forced rerun makes no request at all (the cache)."""
    run, overrides = cap_run
    digests = _digests(run)
    with FakeLLMServer(script=["429", "500", "hang", "ok", "429", "500"], hang_s=10) as srv:
        cfg = _cfg(
            tmp_path,
            {**overrides, **FAST},
            captions__provider="local",
            captions__local__base_url=srv.base_url,
            captions__concurrency=4,
        )
        tables = run_stage(run, "captions", cfg, progress=False)
        captions, calls = tables["captions"], tables["caption_calls"]
        assert (captions["status"] == "ok").all() and (captions["provider"] == "local").all()
        for rec in captions.iter_rows(named=True):
            assert rec["caption"] == "bunnystyle, " + caption_text(digests[rec["frame_id"]])
            assert rec["tags"] == ["fake", digests[rec["frame_id"]]] and rec["input_tokens"] == 120
        assert set(srv.answered) == set(digests.values())
        assert all(n == 1 for n in srv.answered.values())  # paid once each
        assert sorted(srv.behaviours()).count("429") == 2 and "hang" in srv.behaviours()
        assert (calls["outcome"] == "retry").sum() == 4
        assert calls.filter(pl.col("outcome") == "retry")["error"].str.contains("429|500").all()
        # The hung request: asked once more at most, and the table says it may have been billed.
        (timeout,) = calls.filter(pl.col("outcome") == "timeout")["error"].to_list()
        assert (
            "timed out after 2 s" in timeout and "may have answered and billed it; asked once more" in timeout
        )
        from diffusion_bunny.stages.captions.stage import provider_summary

        summary = provider_summary(calls).row(0, named=True)
        assert (summary["requests"], summary["answered"], summary["retries"], summary["timeouts"]) == (
            len(digests) + 5,
            len(digests),
            4,
            1,
        )
        assert summary["input_tokens"] == 120 * len(digests)
        sent = srv.requests[-1]["body"]
        assert sent["model"] == "qwen2.5-vl-7b-instruct"
        assert "bunnystyle" in json.dumps(sent["messages"])  # the trigger word is in the prompt
        n = len(srv.requests)
        again = run_stage(run, "captions", cfg, progress=False, force=True)
        assert len(srv.requests) == n  # no new request: every answer came from the cache
        assert again["captions"]["caption"].to_list() == captions["caption"].to_list()
        assert (again["caption_calls"]["outcome"] == "cached").sum() == len(digests)


def test_circuit_breaker_falls_back_in_order(cap_run, tmp_path, monkeypatch):
    """The local server always fails: after ``breaker_failures`` frames its circuit opens and
    the rest of the run goes straight to the next provider (anthropic on a second server),
    then the template closes the chain."""
    run, overrides = cap_run
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test")
    digests = _digests(run)
    with FakeLLMServer(default="500") as bad, FakeLLMServer() as good:
        cfg = _cfg(
            tmp_path,
            {**overrides, **FAST},
            captions__provider="local",
            captions__fallback=["anthropic", "template"],
            captions__local__base_url=bad.base_url,
            captions__anthropic__base_url=good.root_url,  # /v1 is added
            captions__max_retries=1,
            captions__breaker_failures=2,
            captions__concurrency=1,
        )
        tables = run_stage(run, "captions", cfg, progress=False)
        captions = tables["captions"]
        assert (captions["provider"] == "anthropic").all()
        assert len(bad.requests) == 2 * 2  # two frames x (1 try + 1 retry), then the circuit is open
        assert all(r["path"].endswith("/v1/messages") for r in good.requests)
        assert good.requests[0]["headers"].get("x-api-key") == "sk-ant-test"
        assert set(good.answered) == set(digests.values())
        manifest = run.read_manifest("captions")
        assert "local" in manifest["facts"]["open_circuits"]
        assert any("circuit opened" in w for w in manifest["warnings"])
    # A server nobody answers at: the preflight fails before any work, naming the setting.
    with pytest.raises(ProviderError, match=r"cannot reach.*captions\.local\.base_url"):
        run_stage(
            run,
            "captions",
            _cfg(
                tmp_path,
                {**overrides, **FAST},
                captions__provider="local",
                captions__local__base_url="http://127.0.0.1:9/v1",
            ),
            progress=False,
        )


def test_unusable_answers_fall_back_to_the_template_and_are_recorded(cap_run, tmp_path):
    run, overrides = cap_run
    with FakeLLMServer(default="garbage") as srv:
        cfg = _cfg(
            tmp_path,
            {**overrides, **FAST},
            captions__provider="local",
            captions__fallback=["template"],
            captions__local__base_url=srv.base_url,
            captions__breaker_failures=1000,
            captions__concurrency=2,
        )
        tables = run_stage(run, "captions", cfg, progress=False)
        captions, calls = tables["captions"], tables["caption_calls"]
        assert (captions["provider"] == "template").all() and (captions["status"] == "ok").all()
        assert len(srv.requests) == captions.height  # one request each: no hidden second try
        failed = calls.filter(pl.col("outcome") == "unparsable")
        assert failed.height == captions.height and failed["error"].str.contains("Parse").all()


def test_every_frame_failing_is_one_clear_error_and_keeps_earlier_captions(cap_run, tmp_path):
    """Also with a caption typed by hand: counted as a frame captioned, it made a run whose every
    request failed (a wrong model, a server down) write its failures over every caption of the
    last run, exit 0. It stops as without the edit, and the table is kept."""
    run, overrides = cap_run
    run_stage(run, "captions", _cfg(tmp_path, overrides), progress=False)
    with FakeLLMServer(default="500") as srv:
        cfg = _cfg(
            tmp_path,
            {**overrides, **FAST},
            captions__provider="local",
            captions__local__base_url=srv.base_url,
            captions__max_retries=0,
        )
        for typed in (False, True):
            if typed:
                edit_caption(run.run_dir, run.read_table("captions")["frame_id"][0], "a man typed by hand")
            before = run.read_table("captions")
            with pytest.raises(
                ProviderError, match=r"no frame could be captioned.*template to captions\.fallback"
            ):
                run_stage(run, "captions", cfg, progress=False)
            assert run.read_table("captions").equals(before)
            assert before["caption"].is_not_null().all()


def test_missing_key_and_unreachable_server_fail_before_any_work(cap_run, tmp_path):
    run, overrides = cap_run
    with pytest.raises(ProviderError, match="needs the environment variable OPENAI_API_KEY"):
        run_stage(run, "captions", _cfg(tmp_path, overrides, captions__provider="openai"), progress=False)
    with pytest.raises(ProviderError, match="ANTHROPIC_API_KEY"):
        run_stage(
            run, "captions", _cfg(tmp_path, overrides, captions__fallback=["anthropic"]), progress=False
        )
    cfg = _cfg(
        tmp_path, overrides, captions__provider="local", captions__local__base_url="http://127.0.0.1:9/v1"
    )
    with pytest.raises(
        ProviderError, match=r"cannot reach the caption server at http://127.0.0.1:9/v1.*local\.base_url"
    ):
        run_stage(run, "captions", cfg, progress=False)
    assert not run.has_table("captions")


def test_a_key_no_header_can_carry_is_one_line_that_never_repeats_it(monkeypatch):
    """A key copied shortened from a dashboard (``…``) ended in UnicodeEncodeError's traceback
    as the request was made; with a space inside, in a refusal from the server."""
    from diffusion_bunny.stages.captions.providers import make_provider

    for key, at in (("sk-proj-Ab3\u2026x9Qz", 12), ("sk-ab cd", 6)):
        monkeypatch.setenv("OPENAI_API_KEY", key)
        with pytest.raises(ProviderError) as err:
            make_provider("openai", CaptionsSettings(provider="openai"))
        assert str(err.value).startswith(
            "captions.provider 'openai': the key in OPENAI_API_KEY has a character no key has "
            f"at position {at} of"
        )
        assert key not in str(err.value) and "x9Qz" not in str(err.value)
    monkeypatch.setenv("LOCAL_LLM_API_KEY", "tok\u00e9n")
    with pytest.raises(ProviderError, match="the key in LOCAL_LLM_API_KEY has a character no key has"):
        make_provider("local", CaptionsSettings(provider="local"))


def test_a_provider_down_before_the_first_frame_falls_back_when_the_chain_can(cap_run, tmp_path):
    """A provider down with captions.fallback ending in template: the template captions every
    frame and the run says which provider was down and why, instead of stopping at the preflight
    (which the chain was configured to survive). With no fallback left it still stops."""
    run, overrides = cap_run
    down = {"captions__provider": "local", "captions__local__base_url": "http://127.0.0.1:9/v1"}
    cfg = _cfg(tmp_path, overrides, captions__fallback=["template"], **down)
    run_stage(run, "captions", cfg, progress=False)
    captions = run.read_table("captions")
    assert captions.height and (captions["status"] == "ok").all()
    assert (captions["provider"] == "template").all()
    manifest = run.read_manifest("captions")
    assert "cannot reach the caption server" in manifest["facts"]["open_circuits"]["local"]
    warning = next(w for w in manifest["warnings"] if "provider local's circuit opened" in w)
    assert "captions.fallback" not in warning, warning  # it told a chain ending in template to end so
    # Rerun with the server back, the stage is up to date: the line says what brings its frames
    # back to the provider.
    assert warning.endswith("they keep those captions until the stage runs with --force once local answers")

    cfg = _cfg(tmp_path, overrides, captions__fallback=[], **down)
    with pytest.raises(ProviderError, match="cannot reach the caption server"):
        run_stage(run, "captions", cfg, progress=False, force=True)


@contextlib.contextmanager
def _refusing_server(status: int):
    """A server that answers ``status`` (401, 403) to every GET (the preflight's /models)."""
    import http.server
    import threading

    class Refuse(http.server.BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refuse)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()


def test_refused_key_is_named(cap_run, tmp_path, monkeypatch):
    """A server that answers 401 to the preflight: the key is named, nothing else is asked."""
    with _refusing_server(401) as root:
        run, overrides = cap_run
        monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong")
        cfg = _cfg(tmp_path, overrides, captions__provider="openai", captions__openai__base_url=root + "/v1")
        with pytest.raises(ProviderError, match=r"refused the key in OPENAI_API_KEY \(HTTP 401\)"):
            run_stage(run, "captions", cfg, progress=False)


def test_a_refused_key_names_the_variable_that_holds_it_not_the_base_url(tmp_path, monkeypatch):
    """A 401/403 from /models named the base-URL setting (``captions.local.base_url: ... refused
    the key``), sending people to fix an address that was right: the line names the key's
    environment variable, ``captions.local.api_key_env``'s for a local server."""
    for var in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "MY_VLLM_KEY"):
        monkeypatch.setenv(var, "sk-wrong")
    with _refusing_server(403) as root:
        for name, over, variable in (
            ("openai", {"openai": {"base_url": root + "/v1"}}, "OPENAI_API_KEY"),
            ("anthropic", {"anthropic": {"base_url": root}}, "ANTHROPIC_API_KEY"),
            ("local", {"local": {"base_url": root + "/v1", "api_key_env": "MY_VLLM_KEY"}}, "MY_VLLM_KEY"),
        ):
            provider = make_provider(name, CaptionsSettings(provider=name, **over))
            with pytest.raises(ProviderError) as err:
                provider.preflight()
            assert f"refused the key in {variable} (HTTP 403)" in str(err.value)
            assert "base_url" not in str(err.value)


KILL_SCRIPT = textwrap.dedent(
    """
    import sys
    from diffusion_bunny.config import load_config
    from diffusion_bunny.pipeline.run import Run
    from diffusion_bunny.stages import run_stage
    import json
    from pathlib import Path
    overrides = json.loads(sys.argv[2])
    cfg = load_config(None, overrides, root=Path(sys.argv[3]))
    run_stage(Run.open(sys.argv[1]), "captions", cfg, progress=False)
    """
)


def test_kill_in_the_middle_then_resume_pays_each_frame_once(cap_run, tmp_path):
    """A run is killed (SIGKILL) while its 5th request hangs; the rerun asks only for what is not
    in the cache: over both runs every image was answered exactly once."""
    run, overrides = cap_run
    digests = _digests(run)
    assert len(digests) > 6
    script = tmp_path / "cap.py"
    script.write_text(KILL_SCRIPT)
    answered = {}
    with FakeLLMServer(script=["ok"] * 4 + ["hang"], hang_s=60) as srv:
        over = {
            **overrides,
            **FAST,
            "captions.provider": "local",
            "captions.local.base_url": srv.base_url,
            "captions.concurrency": 1,
            "captions.timeout_s": 60,
        }
        proc = subprocess.Popen(
            [sys.executable, str(script), str(run.run_dir), json.dumps(over), str(tmp_path / "nocfg")],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 120
        while len(srv.requests) < 5 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert len(srv.requests) == 5, proc.communicate()[1].decode()[-2000:]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        answered.update(srv.answered)
    assert not run.has_table("captions") and run.read_manifest("captions") is None
    with FakeLLMServer() as srv2:
        cfg = _cfg(tmp_path, over, captions__local__base_url=srv2.base_url)
        captions = run_stage(run, "captions", cfg, progress=False)["captions"]
        calls = run.read_table("caption_calls")
        assert (calls["outcome"] == "cached").sum() == 4
        for digest, n in srv2.answered.items():
            answered[digest] = answered.get(digest, 0) + n
    assert sorted(answered) == sorted(digests.values())
    assert set(answered.values()) == {1}
    assert (captions["status"] == "ok").all() and captions.height == len(digests)


def test_bedrock_through_botocore_stubber(cap_run, tmp_path):
    """The Converse request carries the image bytes, the system prompt and the inference settings;
    a ThrottlingException is retried; the answer's tokens are recorded; a second run is cached."""
    import boto3
    from botocore.stub import ANY, Stubber

    from diffusion_bunny.pipeline.contract import Context
    from diffusion_bunny.stages.captions import STAGE
    from diffusion_bunny.stages.captions.stage import compute

    run, overrides = cap_run
    cfg = _cfg(tmp_path, {**overrides, **FAST}, captions__provider="bedrock", captions__concurrency=1)

    def bedrock_at(endpoint: str):
        # The stubbed calls never leave the process; the stage's unsigned "is it there?" does.
        return boto3.client(
            "bedrock-runtime",
            region_name="us-east-1",
            endpoint_url=endpoint,
            aws_access_key_id="AKIDTEST",
            aws_secret_access_key="secret",
        )

    kept = run.read_table("quality").filter("keep").height
    seen: list[dict] = []

    def caption_with_bedrock(client):
        tables = {name: None for name in ("shots", "clusters", "caption_edits")}
        tables.update({name: run.read_table(name) for name in ("frames", "quality", "faces", "face_frames")})
        ctx = Context("captions", run, STAGE.view(cfg), tables, progress=False, writes=STAGE.writes)
        return compute(ctx, bedrock_client=client)

    # An endpoint that does not answer stops the stage before the first request (it asked for
    # every frame, and counted each as paid, before it stopped).
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
    client = bedrock_at(closed)
    with Stubber(client), pytest.raises(ProviderError) as err:  # a request would fail unstubbed
        caption_with_bedrock(client)
    message = str(err.value)
    assert message.startswith(f"cannot reach the caption server at {closed}/") and "\n" not in message
    assert "captions.bedrock.region" in message and "captions.fallback with template" in message

    with FakeLLMServer() as there, Stubber(client := bedrock_at(there.root_url)) as stub:
        stub.add_client_error("converse", service_error_code="ThrottlingException", http_status_code=429)
        for i in range(kept):
            stub.add_response(
                "converse",
                {
                    "output": {
                        "message": {
                            "role": "assistant",
                            "content": [
                                {
                                    "text": f"[[ ## caption ## ]]\nbunnystyle, frame {i}\n\n"
                                    f'[[ ## tags ## ]]\n["t{i}"]\n\n[[ ## completed ## ]]'
                                }
                            ],
                        }
                    },
                    "stopReason": "end_turn",
                    "usage": {"inputTokens": 900, "outputTokens": 12, "totalTokens": 912},
                    "metrics": {"latencyMs": 5},
                },
                expected_params={
                    "modelId": cfg.captions.bedrock.model_id,
                    "messages": ANY,
                    "system": ANY,
                    "inferenceConfig": {"maxTokens": 300, "temperature": 0.2},
                },
            )

        def record(params, **kwargs):
            seen.append(params)

        client.meta.events.register("provide-client-params.bedrock-runtime.Converse", record)
        result = caption_with_bedrock(client)
        stub.assert_no_pending_responses()
    captions = result.tables["captions"]
    assert captions["caption"].to_list() == [f"bunnystyle, frame {i}" for i in range(kept)]
    assert (captions["provider"] == "bedrock").all() and (captions["input_tokens"] == 900).all()
    assert (result.tables["caption_calls"]["outcome"] == "retry").sum() == 1
    content = seen[0]["messages"][0]["content"]
    image = next(b["image"] for b in content if "image" in b)
    assert image["format"] == "jpeg" and image["source"]["bytes"][:2] == b"\xff\xd8"
    assert "bunnystyle" in json.dumps([b.get("text", "") for b in content])
    assert seen[0]["system"][0]["text"].startswith("Your input fields are")
    # Cached: a second run with a client that would fail on any call makes none (and, with every
    # frame answered already, asks no endpoint whether it is there).
    client = bedrock_at(closed)
    with Stubber(client):
        again = caption_with_bedrock(client)
    assert again.tables["captions"]["caption"].to_list() == captions["caption"].to_list()


def test_bedrock_settings_missing_are_named(tmp_path, monkeypatch):
    from diffusion_bunny.stages.captions.providers import bedrock_client

    for var in (
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
        "AWS_REGION",
        "AWS_DEFAULT_REGION",
    ):
        monkeypatch.delenv(var, raising=False)
    (tmp_path / "empty").write_text("")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "empty"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "empty"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(ProviderError, match=r"needs a region: set captions\.bedrock\.region or AWS_REGION"):
        bedrock_client(CaptionsSettings(provider="bedrock"))
    with pytest.raises(ProviderError, match=r"captions\.bedrock\.profile"):
        bedrock_client(CaptionsSettings(provider="bedrock", bedrock={"profile": "nope"}))
    with pytest.raises(ProviderError, match=r"no AWS credentials.*AWS_ACCESS_KEY_ID"):
        bedrock_client(CaptionsSettings(provider="bedrock", bedrock={"region": "us-east-1"}))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDTEST")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    client = bedrock_client(CaptionsSettings(provider="bedrock", bedrock={"region": "eu-west-1"}))
    assert client.meta.region_name == "eu-west-1" and client.meta.config.retries["total_max_attempts"] == 1
    # AWS_REGION, which the settings name (botocore itself reads AWS_DEFAULT_REGION only).
    monkeypatch.setenv("AWS_REGION", "ap-south-1")
    assert bedrock_client(CaptionsSettings(provider="bedrock")).meta.region_name == "ap-south-1"
    # A profile named by AWS_PROFILE, the setting null: the name and the variable, not 'None'.
    monkeypatch.setenv("AWS_PROFILE", "myprofile")
    with pytest.raises(ProviderError, match=r"the AWS profile 'myprofile' \(AWS_PROFILE\) is not in"):
        bedrock_client(CaptionsSettings(provider="bedrock"))


def test_edits_are_kept_marked_and_never_overwritten(cap_run, tmp_path, caplog):
    run, overrides = cap_run
    cfg = _cfg(tmp_path, overrides)
    captions = run_stage(run, "captions", cfg, progress=False)["captions"]
    fid = captions["frame_id"][0]
    edited = edit_caption(run.run_dir, fid, "  bunnystyle,   my own   words ")
    row = edited.filter(pl.col("frame_id") == fid).row(0, named=True)
    assert (row["caption"], row["status"]) == ("bunnystyle, my own words", "edited")
    assert read_edits(run.run_dir).height == 1
    assert stage_state(run, "captions", cfg)[0] == "stale"  # an edit is an input
    with FakeLLMServer() as srv:  # even another provider on a forced rerun keeps it
        other = _cfg(
            tmp_path,
            {**overrides, **FAST},
            captions__provider="local",
            captions__local__base_url=srv.base_url,
        )
        again = run_stage(run, "captions", other, progress=False, force=True)["captions"]
        asked = len(srv.requests)
    kept = again.filter(pl.col("frame_id") == fid).row(0, named=True)
    assert (kept["caption"], kept["status"]) == ("bunnystyle, my own words", "edited")
    assert (again.filter(pl.col("frame_id") != fid)["provider"] == "local").all()
    assert run.read_manifest("captions")["counts"]["edited"] == 1
    # The frame a person captioned is asked of no provider: its answer was paid for and thrown away.
    assert asked == again.height - 1
    # A caption typed without the trigger word opens with it in the dataset; after
    # captions.trigger_word changed, one that opens with the old word gets the new one.
    second = again["frame_id"][1]
    typed = edit_caption(run.run_dir, second, "a man sings on a stage")
    assert typed.filter(pl.col("frame_id") == second)["caption"][0] == "bunnystyle, a man sings on a stage"
    renamed = _cfg(tmp_path, overrides, captions__trigger_word="hamstyle")
    final = run_stage(run, "captions", renamed, progress=False)["captions"]
    by_frame = dict(final.select("frame_id", "caption").iter_rows())
    assert by_frame[fid] == "hamstyle, my own words"
    assert by_frame[second] == "hamstyle, a man sings on a stage"
    assert all(c.startswith("hamstyle") for c in by_frame.values())
    # And at every later run (the swap held once: the next run gave "hamstyle, bunnystyle, ...").
    later = _cfg(tmp_path, overrides, captions__trigger_word="hamstyle", captions__dark_below=50)
    last = run_stage(run, "captions", later, progress=False)["captions"]
    row = last.filter(pl.col("frame_id") == fid).row(0, named=True)
    assert row["caption"] == "hamstyle, my own words"
    # An edited frame, asked of nobody, keeps the provider of the caption it started from.
    assert row["provider"] not in ("-", None) and (last["provider"] != "-").all()
    with pytest.raises(BadInputError, match="empty"):
        edit_caption(run.run_dir, fid, "   ")
    with pytest.raises(BadInputError, match="no caption row"):
        edit_caption(run.run_dir, "nope", "x")
    # The box opens with the trigger word: the description deleted left "hamstyle," alone, saved,
    # marked edited and exported as a training caption.
    before, edits = run.read_table("captions"), read_edits(run.run_dir).height
    for lone in ("hamstyle", "Hamstyle, ", "hamstyle ."):
        with pytest.raises(BadInputError, match=r"is only the trigger word 'hamstyle'; type what"):
            edit_caption(run.run_dir, fid, lone)
    assert run.read_table("captions").equals(before) and read_edits(run.run_dir).height == edits
    # An edit changed by hand to no caption (the table is a parquet file) stopped the stage with
    # a TypeError naming nothing: it is left out, in a line naming the table and the frame.
    table = run.read_table("caption_edits")
    run.write_table(
        "caption_edits",
        table.with_columns(
            pl.when(pl.col("frame_id") == second).then(None).otherwise("caption").alias("caption")
        ),
    )
    with caplog.at_level("WARNING"):
        rows = run_stage(run, "captions", later, progress=False, force=True)["captions"]
    assert rows.filter(pl.col("frame_id") == second)["status"][0] != "edited"
    assert rows.filter(pl.col("frame_id") == fid)["caption"][0] == "hamstyle, my own words"
    said = [
        r
        for r in caplog.records
        if "caption_edits" in r.getMessage() and f"left out ({second})" in r.getMessage()
    ]
    assert len(said) == 1  # once for the run, not once per read of the table (three in one run)


def test_an_edit_of_a_frame_no_longer_kept_is_said_and_kept(cap_run, tmp_path):
    """A caption edited by hand, then its frame left out by a rerun of stage 01 or 02: the edit
    waits unused (it comes back with the frame), and stage 05's line says so."""
    from diffusion_bunny.stages.captions import summary

    run, overrides = cap_run
    cfg = _cfg(tmp_path, overrides)
    captions = run_stage(run, "captions", cfg, progress=False)["captions"]
    gone, kept = captions["frame_id"][0], captions["frame_id"][1]
    edit_caption(run.run_dir, gone, "bunnystyle, typed by hand")
    edit_caption(run.run_dir, kept, "bunnystyle, also typed")
    frames = run.read_table("frames")
    run.write_table("frames", frames.filter(pl.col("frame_id") != gone))
    again = run_stage(run, "captions", cfg, progress=False)["captions"]
    assert gone not in again["frame_id"].to_list()
    manifest = run.read_manifest("captions")
    assert manifest["counts"]["edited"] == 1 and manifest["counts"]["edits_on_frames_gone"] == 1
    assert "1 edited by hand (1 more of frames no longer kept);" in summary(manifest)
    assert read_edits(run.run_dir).height == 2
    run.write_table("frames", frames)
    back = run_stage(run, "captions", cfg, progress=False)["captions"]
    assert back.filter(pl.col("frame_id") == gone)["caption"][0] == "bunnystyle, typed by hand"
    assert run.read_manifest("captions")["counts"]["edits_on_frames_gone"] == 0


def test_caption_editor_widget_saves_an_edit(cap_run, tmp_path):
    from diffusion_bunny.stages.captions.widgets import CaptionEditor

    run, overrides = cap_run
    run_stage(run, "captions", _cfg(tmp_path, overrides), progress=False)
    editor = CaptionEditor(run, page_size=5)
    assert len(editor.rows.children) == 5 and editor.pages() == -(-run.read_table("captions").height // 5)
    first = editor.rows.children[0]
    picture, (info, box, button) = first.children[0], first.children[1].children
    assert type(picture).__name__ == "Image" and picture.value[:2] == b"\xff\xd8"
    fid = run.read_table("captions")["frame_id"][0]
    assert fid in info.value
    box.value = "bunnystyle, typed in the box"
    button.click()
    assert "saved" in editor.status.value
    assert run.read_table("captions").filter(pl.col("frame_id") == fid)["status"][0] == "edited"
    box2 = editor.rows.children[0].children[1].children[1]
    box2.value = " "
    editor.rows.children[0].children[1].children[2].click()
    assert "empty" in editor.status.value
    # Text typed in other rows and not saved survives a save (the page is drawn again) and a
    # trip to another page; it was thrown away without a word.
    boxes = lambda: [row.children[1].children[1] for row in editor.rows.children]  # noqa: E731
    boxes()[2].value, boxes()[3].value = "bunnystyle, third, not saved", "bunnystyle, fourth, not saved"
    boxes()[1].value = "bunnystyle, second, saved"
    editor.rows.children[1].children[1].children[2].click()
    assert [b.value for b in boxes()[2:4]] == [
        "bunnystyle, third, not saved",
        "bunnystyle, fourth, not saved",
    ]
    assert "not saved" in editor.rows.children[2].children[1].children[0].value
    editor.go(1)
    editor.go(0)
    assert boxes()[3].value == "bunnystyle, fourth, not saved"
    third = run.read_table("captions")["frame_id"][2]
    assert run.read_table("captions").filter(pl.col("frame_id") == third)["status"][0] != "edited"
    editor.go(99)
    assert editor.page == editor.pages() - 1
    editor.only_failed.value = True
    assert editor.rows.children == ()


def test_cache_key_changes_with_prompt_inputs(tmp_path):
    facts = {"characters": ["b", "a"]}
    key = CaptionCache.key("sha", "local", "m", facts, "bunnystyle")
    assert key == CaptionCache.key("sha", "local", "m", {"characters": ["a", "b"]}, "bunnystyle")
    assert key.startswith(PROMPT_VERSION)
    for other in (
        CaptionCache.key("sha2", "local", "m", facts, "bunnystyle"),
        CaptionCache.key("sha", "openai", "m", facts, "bunnystyle"),
        CaptionCache.key("sha", "local", "m2", facts, "bunnystyle"),
        CaptionCache.key("sha", "local", "m", {"characters": ["a"]}, "bunnystyle"),
        CaptionCache.key("sha", "local", "m", facts, "otherword"),
        CaptionCache.key("sha", "local", "m", facts, "bunnystyle", 1024),
    ):
        assert other != key
    cache = CaptionCache(tmp_path / "c")
    cache.set(key, {"caption": "x", "tags": []})
    cache.close()
    assert CaptionCache(tmp_path / "c").get(key)["caption"] == "x"  # on disk, across instances


def test_prompt_version_is_the_prompt_and_only_the_prompt():
    """PROMPT_VERSION keys every paid answer: derived from the prompt's texts (a changed
    instruction or field description is asked again), pinned for today's prompt (a refactor that
    re-keyed it would pay for every stored answer again), and its ``v1`` names the signature's
    layout, pinned here too: a new role or type of a field fails until the prefix changes."""
    import dspy

    from diffusion_bunny.stages.captions.providers import (
        FIELD_DESCRIPTIONS,
        INSTRUCTIONS,
        caption_signature,
        prompt_version,
    )

    assert PROMPT_VERSION == prompt_version(INSTRUCTIONS, FIELD_DESCRIPTIONS) == "v1-a7155a72"
    assert prompt_version(INSTRUCTIONS + " Be brief.", FIELD_DESCRIPTIONS) != PROMPT_VERSION
    assert prompt_version(INSTRUCTIONS, {**FIELD_DESCRIPTIONS, "tags": "keywords"}) != PROMPT_VERSION
    signature = caption_signature()
    layout = {
        name: (role, field.annotation)
        for role, fields in (("in", signature.input_fields), ("out", signature.output_fields))
        for name, field in fields.items()
    }
    assert layout == {
        "image": ("in", dspy.Image),
        "characters": ("in", list[str]),
        "trigger_word": ("in", str),
        "caption": ("out", str),
        "tags": ("out", list[str]),
    }
    assert list(layout) == list(FIELD_DESCRIPTIONS) and signature.instructions == INSTRUCTIONS


def test_canary_key_appears_in_no_notebook_log_manifest_or_table(cap_run, tmp_path, monkeypatch):
    """Keys planted in the environment are used (the server sees them) but written nowhere: not
    in the executed notebook, the manifest, any table, log or cache file of the run, even when
    the server's failure answer echoes the request headers (the key among them)."""
    import papermill

    run, overrides = cap_run
    canary = "sk-CANARY-7f3a9c1e5b"
    monkeypatch.setenv("LOCAL_LLM_API_KEY", canary)
    monkeypatch.setenv("OPENAI_API_KEY", canary + "-openai")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", canary + "-aws")
    with FakeLLMServer(script=["echo"]) as srv:
        over = {
            **overrides,
            **FAST,
            "captions.provider": "local",
            "captions.local.base_url": srv.base_url,
        }
        out_nb = run.run_dir / "notebooks" / "05_caption.ipynb"
        out_nb.parent.mkdir(parents=True, exist_ok=True)
        papermill.execute_notebook(
            str(ROOT / "notebook" / "05_caption.ipynb"),
            str(out_nb),
            parameters={"run_dir": str(run.run_dir), "overrides": over, "interactive": True},
            kernel_name="python3",
            progress_bar=False,
            execution_timeout=600,
            cwd=str(ROOT / "notebook"),
        )
        assert srv.requests and all(
            r["headers"].get("Authorization") == f"Bearer {canary}" for r in srv.requests
        )
    text = out_nb.read_text()
    assert "paid request(s) this run" in text and "failed only" in text
    calls = run.read_table("caption_calls")
    assert calls["error"].drop_nulls().str.contains(r"\[redacted\]").any()  # the echo was stored
    leaks = []
    for path in run.run_dir.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            if canary.encode() in data or base64.b64encode(canary.encode()) in data:
                leaks.append(str(path))
    assert leaks == []
    assert (run.run_dir / "manifests" / "captions.json").is_file()


def test_the_trigger_word_must_open_the_caption_as_a_whole_word():
    from diffusion_bunny.stages.captions.providers import _with_trigger

    assert _with_trigger("Catherine sits by a window", "cat") == "cat, Catherine sits by a window"
    assert _with_trigger("bunnystyled poster", "bunnystyle") == "bunnystyle, bunnystyled poster"
    assert _with_trigger('"bunnystyle, a man on stage"', "bunnystyle") == "bunnystyle, a man on stage"
    assert _with_trigger("\u201ca man\u201d", "bunnystyle") == "bunnystyle, a man"
    assert _with_trigger("BunnyStyle,  a man", "bunnystyle") == "BunnyStyle, a man"
    assert _with_trigger("bunnystyle a man", "bunnystyle") == "bunnystyle a man"
    # Quotes inside the answer are its own: only a pair around the whole of it goes.
    quoted = '"Hamilton" is on a sign, he says "wait"'
    assert _with_trigger(quoted, "bunnystyle") == f"bunnystyle, {quoted}"
    assert _with_trigger("'Tis night, he says 'hi'", "bunnystyle") == "bunnystyle, 'Tis night, he says 'hi'"


def test_rate_limiter_starts_at_most_requests_per_minute_in_any_minute():
    """A burst as large as the concurrency is still within the minute's limit: at 3 a minute
    with 8 threads, 3 start in the first minute (the bucket alone let 10)."""
    now = [0.0]

    def sleep(s):
        now[0] += s

    limiter = RateLimiter(3, burst=8, clock=lambda: now[0], sleep=sleep)
    starts = []
    for _ in range(9):
        limiter.acquire()
        starts.append(now[0])
    for t in starts:
        assert sum(t <= s < t + 60 for s in starts) <= 3
    assert starts[:3] == [0.0, 0.0, 0.0] and starts[3] == pytest.approx(60.0)
    assert starts[-1] == pytest.approx(120.0)
    # A fractional limit holds over the long run (1.5 a minute, not 1), at most 2 in any minute.
    now[0] = 0.0
    limiter = RateLimiter(1.5, burst=1, clock=lambda: now[0], sleep=sleep)
    starts = []
    for _ in range(31):
        limiter.acquire()
        starts.append(now[0])
    assert 30 / (starts[-1] / 60) == pytest.approx(1.5, rel=0.05)
    assert all(sum(t <= s < t + 60 for s in starts) <= 2 for t in starts)


def test_a_relative_cache_dir_is_under_the_workspace(tmp_path, monkeypatch):
    """``captions.cache_dir: answers`` in a settings file starts from the workspace, as the docs
    say; the stage's kernel works in ``notebook/`` and took it from there."""
    workspace, elsewhere = tmp_path / "ws", tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.setenv("DIFFUSION_BUNNY_WORKSPACE", str(workspace))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(elsewhere)
    run_dir = tmp_path / "run"
    assert answers_dir(run_dir, CaptionsSettings(cache_dir="answers")) == workspace / "answers"
    assert answers_dir(run_dir, CaptionsSettings(cache_dir="~/answers")) == tmp_path / "home" / "answers"
    assert answers_dir(run_dir, CaptionsSettings(cache_dir=str(tmp_path / "abs"))) == tmp_path / "abs"


def test_the_paid_request_cap_counts_runs_that_go_on_at_once(tmp_path):
    """Each run read the other runs' count once, at its start: two runs of one movie started
    together could each spend the whole cap (3 + 2 against a cap of 3)."""
    from diffusion_bunny.errors import StageError
    from diffusion_bunny.stages.captions.stage import SpentLedger, _Budget

    first = _Budget(3, SpentLedger(tmp_path, "movie"))
    second = _Budget(3, SpentLedger(tmp_path, "movie"))  # started before the first paid anything
    first.take()
    first.take()
    second.take()
    for budget in (first, second):
        with pytest.raises(StageError, match=r"captions\.max_paid_requests is 3"):
            budget.take()


def test_a_typed_caption_gets_the_trigger_word_in_place_of_an_old_one_keeping_what_follows():
    from diffusion_bunny.stages.captions.stage import _failed
    from diffusion_bunny.stages.captions.tables import with_trigger, without_trigger

    assert with_trigger("a man", "bunnystyle") == "bunnystyle, a man"
    assert with_trigger("Bunnystyle: a man", "bunnystyle") == "Bunnystyle: a man"
    for typed, swapped in (("SKS: a man", "bunnystyle: a man"), ("sks's dog", "bunnystyle's dog")):
        assert with_trigger(typed, "bunnystyle", ("sks",)) == swapped
    assert with_trigger("sksx, a man", "bunnystyle", ("sks",)) == "bunnystyle, sksx, a man"
    assert without_trigger("bunnystyle,  a man", "bunnystyle") == "a man"
    assert without_trigger("bunnystyle's dog", "bunnystyle") == "bunnystyle's dog"
    assert without_trigger("bunnystyle", "bunnystyle") == "bunnystyle"
    # Frames captioned by hand are asked of nobody: every frame asked failing is "no frame could
    # be captioned" with them too; one frame asked and captioned is not.
    rows = pl.DataFrame({"frame_id": ["a", "b"], "status": ["failed", "edited"], "error": ["refused", None]})
    calls = pl.DataFrame({"outcome": ["refused"], "provider": ["local"]})
    with pytest.raises(ProviderError, match="no frame could be captioned"):
        _failed(rows, calls)
    with pytest.raises(ProviderError, match="no frame could be captioned"):
        _failed(rows.head(1), calls)
    ok = pl.DataFrame({"frame_id": ["c"], "status": ["ok"], "error": [None]}, schema=rows.schema)
    assert _failed(pl.concat([rows, ok]), calls).height == 1
