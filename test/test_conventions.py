"""Conventions a new user expects: --version, stage names in --help, .env.example, log files."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import pytest

from diffusion_bunny.cli import STAGE_NAMES, main
from diffusion_bunny.config import load_config
from diffusion_bunny.stages import stage_names
from diffusion_bunny.stages.captions import providers as caption_providers

ROOT = Path(__file__).resolve().parents[1]


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert re.fullmatch(r"bunny \d+\.\d+\.\d+\S*\n", capsys.readouterr().out)


def test_stage_names_in_help(capsys):
    assert list(STAGE_NAMES) == stage_names()
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert ", ".join(STAGE_NAMES) in help_text


def test_env_example_lists_every_variable_the_providers_read():
    text = (ROOT / ".env.example").read_text()
    cfg = load_config(None, {}, use_local=False).captioning
    names = set(caption_providers.KEY_VARIABLES.values()) | {cfg.local.api_key_env}
    names |= set(re.findall(r"\bAWS_[A-Z_]+\b", Path(caption_providers.__file__).read_text()))
    names -= {"AWS_DEFAULT_REGION"}  # named in a comment beside AWS_REGION
    missing = [n for n in sorted(names) if not re.search(rf"^# {n}=$", text, re.M)]
    assert not missing, missing


def test_a_command_logs_to_a_file_named_on_a_bug(tmp_path, monkeypatch, capsys):
    from diffusion_bunny import cli, logs

    monkeypatch.setattr(logs, "log_dir", lambda: tmp_path / "log")
    monkeypatch.delenv(logs.ENV, raising=False)

    def boom(args):
        logging.getLogger("diffusion_bunny.test").info("about to fail")
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(cli, "_cmd_status", boom)
    assert main(["status", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    (path,) = (tmp_path / "log").glob("bunny-*.log")
    assert err == [f"error: bug: ZeroDivisionError: division by zero (the traceback is in {path})"]
    text = path.read_text()
    assert "about to fail" in text and "Traceback" in text and "ZeroDivisionError" in text
    assert logs.last_path == path and logs.ENV not in os.environ  # handlers closed at the end
