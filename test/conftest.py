"""Shared fixtures: synthetic clips, the demo movie, real footage from ../shared/testdata."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

ROOT = Path(__file__).resolve().parents[1]
TESTDATA = ROOT.parent / "shared" / "testdata"
HAMILTON = TESTDATA / "face_recognition_examples" / "short_hamilton_clip.mp4"


@pytest.fixture(scope="session")
def hamilton() -> Path:
    """The real stage clip with known cuts (frames 20, 82, 211)."""
    if not HAMILTON.is_file():
        pytest.skip(f"real footage not available here: {HAMILTON} (it ships beside the project, not in it)")
    return HAMILTON


@pytest.fixture(scope="session")
def ffmpeg_bin() -> str:
    """Debian's ffmpeg, needed to make rotated and container-variant clips (.ci/run installs it)."""
    path = shutil.which("ffmpeg")
    if path is None:
        pytest.fail("ffmpeg is not installed: `apt-get install ffmpeg` (.ci/run does this)")
    return path


@pytest.fixture(scope="session")
def cut_clip(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[int]]:
    """Four shots with hard cuts: static, panning, static, panning."""
    from clips import write_clip

    path = tmp_path_factory.mktemp("clips") / "cuts.mp4"
    cuts = write_clip(path, [(1, 30, 0.0), (2, 40, 3.0), (3, 25, 0.0), (4, 30, 2.0)])
    return path, cuts


@pytest.fixture(scope="session")
def demo(tmp_path_factory: pytest.TempPathFactory):
    """The built-in demo movie, built once per test session."""
    from diffusion_bunny.demo import build_demo_movie

    return build_demo_movie(tmp_path_factory.mktemp("demo"), progress=False)


@pytest.fixture(scope="session")
def demo_run(demo, tmp_path_factory):
    """The demo movie through stages 01 and 02, in-process, once per session. Tests read it;
    a test that changes a run copies it first."""
    from diffusion_bunny.config import load_config
    from diffusion_bunny.run import Run
    from diffusion_bunny.stages import run_stage

    run = Run.create(tmp_path_factory.mktemp("demo_run") / "run", demo.path)
    cfg = load_config(root=tmp_path_factory.mktemp("noconfig"))
    run_stage(run, "extract", cfg, progress=False)
    run_stage(run, "quality", cfg, progress=False)
    return run
