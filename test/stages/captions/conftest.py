"""Fixtures shared by the caption tests."""

from __future__ import annotations

import shutil

import pytest

from diffusion_bunny.pipeline.run import Run


@pytest.fixture
def cap_run(scenes_demo_run, tmp_path, monkeypatch):
    """A private copy of the demo run through stage 04; no provider key in the environment, and a
    user cache of its own (the answer store every run folder of this user reads)."""
    for var in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "LOCAL_LLM_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("DIFFUSION_BUNNY_CACHE", str(tmp_path / "user_cache"))
    run, overrides = scenes_demo_run
    shutil.copytree(run.run_dir, tmp_path / "run")
    return Run.open(tmp_path / "run"), overrides
