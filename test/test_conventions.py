"""Conventions a new user expects: --version, stage names in --help, .env.example, log files."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import pytest

from diffusion_bunny.cli import main
from diffusion_bunny.config import load_config
from diffusion_bunny.stages import PIPELINE, stage_names
from diffusion_bunny.stages.captions import providers as caption_providers

ROOT = Path(__file__).resolve().parents[1]


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert re.fullmatch(r"bunny \d+\.\d+\.\d+\S*\n", capsys.readouterr().out)


def test_stage_names_in_help(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert ", ".join(stage_names()) in help_text


def test_the_pipeline_runs_the_stages_in_the_order_of_their_notebooks():
    """The stage order is written once (the PIPELINE tuple); the notebooks users know, 01 to 09,
    must follow it, and each stage is its folder and its compute."""
    assert len(set(stage_names())) == len(PIPELINE.stages) == 9
    for number, stage in enumerate(PIPELINE.stages, start=1):
        assert stage.notebook.startswith(f"{number:02d}_"), stage.notebook
        assert (ROOT / "notebook" / stage.notebook).is_file(), stage.notebook
        assert stage.package == f"diffusion_bunny.stages.{stage.name}"
        assert callable(stage.stage_module().compute), stage.name


def test_env_example_lists_every_variable_the_providers_read():
    text = (ROOT / ".env.example").read_text()
    cfg = load_config(None, {}, use_local=False).captions
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


def test_the_command_line_is_logged_without_its_secrets(tmp_path, monkeypatch, capsys):
    """Logged first thing, before the settings are checked: a key typed into a URL's user part or
    query, or as a setting named like a key, must not land in the log file."""
    from diffusion_bunny import logs
    from diffusion_bunny.secrets import redact_command, redact_url

    monkeypatch.setattr(logs, "log_dir", lambda: tmp_path / "log")
    monkeypatch.setenv("MY_SERVICE_TOKEN", "tok-0123456789")
    args = [
        "status",
        str(tmp_path),
        "--set",
        "captions.local.base_url=https://me:sk-user-pass-1@llm.example/v1?key=sk-query-2&model=x",
        "--set",
        "captions.local.api_key=sk-setting-3",  # not a setting: the check fails after the log line
        "--set",
        "captions.local.api_key_env=MY_SERVICE_TOKEN",
        "--set",
        "captions.openai.base_url=https://tok-0123456789@proxy.example/v1",
        "--set=captions.openai.api_key=sk-joined-4",  # one argument: argparse takes it as --set KEY=VALUE
    ]
    assert main(args) == 2
    (path,) = (tmp_path / "log").glob("bunny-*.log")
    first, err = path.read_text().splitlines()[0], capsys.readouterr().err
    for secret in ("sk-user-pass-1", "sk-query-2", "sk-setting-3", "tok-0123456789", "sk-joined-4"):
        assert secret not in first and secret not in err
    assert "https://me:[redacted]@llm.example/v1?key=[redacted]&model=x" in first
    assert "captions.local.api_key=[redacted]" in first and "api_key_env=MY_SERVICE_TOKEN" in first
    assert redact_url("http://127.0.0.1:8000/v1") == "http://127.0.0.1:8000/v1"
    assert (
        redact_url("https://h/x?sig=abc&X-Amz-Signature=def&a=1")
        == "https://h/x?sig=[redacted]&X-Amz-Signature=[redacted]&a=1"
    )
    assert redact_command(["run", "movie.mp4", "--set", "run.seed=3"]) == "run movie.mp4 --set run.seed=3"


@pytest.mark.parametrize(
    ("flag", "shown"),
    [
        ("--verbose", ["an info line", "stage line", "warning: a warning", "error: an error"]),
        (None, ["stage line", "warning: a warning", "error: an error"]),
        ("--quiet", ["error: an error"]),
    ],
)
def test_verbose_and_quiet_choose_what_the_terminal_shows(tmp_path, monkeypatch, capsys, flag, shown):
    """The log file gets INFO and up whatever the flags; the terminal WARNING and up
    plus the runner's one line per stage, ``--verbose`` INFO too, ``--quiet`` errors only."""
    from diffusion_bunny import cli, logs

    monkeypatch.setattr(logs, "log_dir", lambda: tmp_path / "log")
    monkeypatch.delenv(logs.ENV, raising=False)

    def talk(args):
        log = logging.getLogger("diffusion_bunny.test")
        log.info("an info line")
        logs.say(log, "stage line")
        log.warning("a warning")
        log.error("an error")
        log.error("file only", extra=logs.FILE_ONLY)
        return 0

    monkeypatch.setattr(cli, "_cmd_status", talk)
    assert main(["status", str(tmp_path), *([flag] if flag else [])]) == 0
    lines = capsys.readouterr().err.strip().splitlines()
    # (the log's first INFO line repeats the command line, which may name test/pipeline/...)
    ours = [
        line
        for line in lines
        if not line.startswith("bunny ") and ("line" in line or "a warning" in line or "error" in line)
    ]
    assert ours == shown  # "file only" never reaches the terminal
    assert (flag == "--verbose") == any(line.startswith("bunny ") for line in lines)  # the log's INFO
    (path,) = (tmp_path / "log").glob("bunny-*.log")
    text = path.read_text()
    for line in ("an info line", "stage line", "a warning", "an error", "file only"):
        assert line in text


def test_progress_bars_slow_down_when_standard_error_is_no_terminal(monkeypatch):
    """Off a terminal every bar prints at most once per NON_TTY_INTERVAL_S seconds
    (children inherit TQDM_MININTERVAL); on a terminal the bars keep their pace."""
    import io
    import sys

    from diffusion_bunny import logs

    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.delenv("TQDM_MININTERVAL", raising=False)
    monkeypatch.setattr(sys, "stderr", Tty())
    logs.quiet_bars()
    assert "TQDM_MININTERVAL" not in os.environ
    assert logs.bar_options() == {"mininterval": 0.1}
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    logs.quiet_bars()
    assert float(os.environ["TQDM_MININTERVAL"]) == logs.NON_TTY_INTERVAL_S >= 2
    assert logs.bar_options() == {"mininterval": logs.NON_TTY_INTERVAL_S}


#: Longest a function in ``src/`` may be (``def`` line to last line, docstring included): past a
#: screen, a reader keeps the start in mind while reading the end.
MAX_FUNCTION_LINES = 80
#: The trainers keep their training loops whole, as diffusers' example scripts do: a step read
#: top to bottom beside the reference script it follows. Named one by one, so a new long
#: function in those files is still caught.
LONG_FUNCTIONS_ALLOWED = {"stages/train/lora.py:train_lora", "stages/train/lora.py:_train"}


def test_no_function_in_src_is_longer_than_a_screen():
    """Every function (methods and nested ones too) of the package fits in
    MAX_FUNCTION_LINES lines, except the trainers' two loops."""
    import ast

    package = ROOT / "src" / "diffusion_bunny"
    long = []
    for path in sorted(package.rglob("*.py")):
        name = path.relative_to(package).as_posix()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES and f"{name}:{node.name}" not in LONG_FUNCTIONS_ALLOWED:
                    long.append(f"{name}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(long)


#: Files whose functions import what they use on purpose: the stage kernel's warm-up script runs
#: in the notebook's own namespace, where a top-level ``import os`` would leave ``os`` behind.
FUNCTION_IMPORTS_ALLOWED = {"pipeline/kernel_warm.py"}


def _function_imports():
    """Every import statement inside a function of the package (but the files allowed), as
    (file, function name, statement)."""
    import ast

    package = ROOT / "src" / "diffusion_bunny"
    for path in sorted(package.rglob("*.py")):
        name = path.relative_to(package).as_posix()
        if name in FUNCTION_IMPORTS_ALLOWED:
            continue
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                for sub in ast.walk(node):
                    if isinstance(sub, ast.Import | ast.ImportFrom):
                        yield path, node.name, sub


def test_no_function_in_src_imports_the_standard_library():
    """A standard-library import costs a few milliseconds at most: it belongs at the top of its
    module, where a reader sees what the module uses (docs/development.md, "Habits")."""
    import ast
    import sys

    inside = []
    for path, func, sub in _function_imports():
        if isinstance(sub, ast.Import):
            modules = [alias.name for alias in sub.names]
        else:
            modules = [sub.module] if sub.level == 0 and sub.module else []
        std = [m for m in modules if m.split(".")[0] in sys.stdlib_module_names]
        if std:
            inside.append(f"{path.name}:{sub.lineno} {func} imports {', '.join(std)}")
    assert not inside, "standard-library imports inside functions:\n" + "\n".join(sorted(set(inside)))


def test_every_import_inside_a_function_says_why():
    """An import inside a function hides what a module uses: it is there only for a cost the
    module's users would otherwise pay (a slow library, a module that pulls one in, what
    ``bunny --help`` or ``bunny status`` does not need), and it says so on its line, or on the
    line above, as ``# lazy: <why>`` (docs/development.md, "Habits")."""
    import re

    silent = []
    for path, func, node in _function_imports():
        lines = path.read_text().splitlines()
        above = lines[node.lineno - 2].strip()
        near = lines[node.lineno - 1 : node.end_lineno] + ([above] if above.startswith("#") else [])
        if not any(re.search(r"# lazy: \S", line) for line in near):
            silent.append(f"{path.name}:{node.lineno} {func}: {lines[node.lineno - 1].strip()}")
    assert not silent, "imports inside functions without a `# lazy:` reason:\n" + "\n".join(silent)


def test_every_parquet_read_takes_its_path_as_a_name_not_a_pattern():
    """polars reads a path as a glob pattern unless told not to: a run folder named like a
    release (``Film (2019) [1080p]``) then "has no table" where the table is. Every read of a
    table in ``src/`` says ``glob=False``, and none uses ``read_parquet_schema`` (which cannot)."""
    import ast

    patterned = []
    for path in sorted((ROOT / "src").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            name = node.func.attr
            globbed = any(k.arg == "glob" for k in node.keywords)
            if name == "read_parquet_schema" or (name in ("read_parquet", "scan_parquet") and not globbed):
                patterned.append(f"{path.relative_to(ROOT)}:{node.lineno} {name}")
    assert not patterned, "parquet reads that take a path as a pattern:\n" + "\n".join(patterned)
