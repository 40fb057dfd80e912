"""Config layering and validation: errors name the key and what is allowed."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import yaml

from diffusion_bunny.cli import main
from diffusion_bunny.config import (
    Config,
    load_config,
    output_root,
    overrides_to_tree,
    parse_override,
    text_setting,
)
from diffusion_bunny.errors import ConfigError
from diffusion_bunny.paths import file_sha256, project_root, workspace_root
from diffusion_bunny.pipeline.runner import overrides_from_args
from diffusion_bunny.stages.captions.providers import load_dotenv_once

ROOT = Path(__file__).resolve().parents[1]


def test_main_yaml_documents_every_default():
    """config/main.yaml holds exactly the model defaults, each key with a comment above it."""
    text = (ROOT / "config" / "main.yaml").read_text()
    assert yaml.safe_load(text) == Config().model_dump(mode="json")
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("  ") and not line.strip().startswith("#") and ":" in line:
            assert lines[i - 1].strip().startswith("#"), f"setting without a comment: {line.strip()}"


def test_project_root_is_the_checkout():
    assert project_root() == ROOT


def test_layers_later_wins(tmp_path):
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "main.yaml").write_text("extract:\n  motion_threshold: 1.0\n  jpeg_quality: 80\n")
    (tmp_path / "config" / "local_a.yaml").write_text("extract:\n  motion_threshold: 2.0\n")
    extra = tmp_path / "extra.yaml"
    extra.write_text("extract:\n  jpeg_quality: 70\n")
    cfg = load_config(extra, ["extract.detector=adaptive"], root=tmp_path)
    assert cfg.extract.motion_threshold == 2.0
    assert cfg.extract.jpeg_quality == 70
    assert cfg.extract.detector.name == "adaptive"
    assert cfg.extract.effective_threshold == 3.0
    assert load_config(extra, {"extract.motion_threshold": 9}, root=tmp_path).extract.motion_threshold == 9
    assert load_config(root=tmp_path, use_local=False).extract.motion_threshold == 1.0
    # The detector a file tunes, named again on the command line, keeps the file's tuning;
    # another detector named replaces it whole.
    tuned = tmp_path / "tuned.yaml"
    tuned.write_text("extract:\n  detector: {name: content, threshold: 30}\n")
    assert load_config(tuned, ["extract.detector=content"], root=tmp_path).extract.detector.threshold == 30
    assert load_config(tuned, ["extract.detector=adaptive"], root=tmp_path).extract.effective_threshold == 3.0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["extract.treshold=3"],
            "unknown key 'extract.treshold' (allowed here: analysis_width, deinterlace, detect_width, "
            "detector,",
        ),
        (
            ["extractoin.threshold=3"],
            "unknown key 'extractoin' (allowed here: captions, characters, engine, export, extract, "
            "generate, paths, pipeline, quality, report, run, scenes, train)",
        ),
        (
            ["extract.method=frames"],
            "extract.method = 'frames': Input should be 'shots', 'interval' or",
        ),
        (
            ["extract.jpeg_quality=0"],
            "extract.jpeg_quality = 0: Input should be greater than or equal to 1",
        ),
        (
            ["extract.detector=content", "extract.detector.threshold=300"],
            "extract.detector.threshold = 300: Input should be less than or equal to 255",
        ),
        (["extract.detector=hash", "extract.detector.threshold=2"], "less than or equal to 1"),
        (  # a union: every form it may take, not the first member's internal name
            ["pipeline.stage_timeout_s=-5"],
            "pipeline.stage_timeout_s = -5: Input should be 'auto'; or Input should be greater than 0",
        ),
        (
            ["extract.detector=cascade", "extract.detector.threshold=30"],
            "unknown key 'extract.detector.threshold' (allowed here: accept_colour_threshold, "
            "accept_threshold, candidate_ratio,",
        ),
        (
            ["extract.motion_threshold=abc"],
            "extract.motion_threshold = 'abc': Input should be a valid number",
        ),
        (  # nothing after '=': was "Input should be a valid dictionary or object to extract fields"
            ["extract.detector="],
            "config error: extract.detector is empty; give it a value, or leave the key out for its default",
        ),
        (["train.seed="], "config error: train.seed is empty; give it a value"),
        (  # was "Input should be a valid integer" of a setting that takes a list
            ["generate.seeds=1,2"],
            "config error: generate.seeds = '1,2': a list is written in brackets: [1,2]",
        ),
        (  # was the one extension '.mp4,mkv': a folder of movies held "no video file"
            ["run.video_extensions=mp4,mkv"],
            "config error: run.video_extensions = ['mp4,mkv']: a list is written in brackets: [mp4,mkv]",
        ),
        (  # the key once, not "extract.detector: extract.detector: 'bogus' ..."
            ["extract.detector.name=bogus"],
            "config error: extract.detector: 'bogus' is not a shot detector; choose one of adaptive,",
        ),
    ],
)
def test_bad_values_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_a_dotted_key_in_a_settings_file_says_to_nest_it(tmp_path):
    """``paths.output_dir: x`` in a file (the form --set takes, and the one docs/configuration.md
    quotes in the text) was "unknown key 'paths.output_dir'", with no word on what to write."""
    settings = tmp_path / "mine.yaml"
    settings.write_text("paths.output_dir: sub/out\n")
    with pytest.raises(ConfigError) as err:
        load_config(settings, root=tmp_path)
    assert str(err.value).endswith(
        "unknown key 'paths.output_dir' (allowed here: captions, characters, engine, export, extract, "
        "generate, paths, pipeline, quality, report, run, scenes, train); a settings file nests its keys: "
        "'paths:', then '  output_dir: ...' indented under it"
    )
    settings.write_text("extract:\n  detector.name: content\n")  # one level down, the same
    with pytest.raises(ConfigError, match=r"nests its keys: 'detector:', then '  name: \.\.\.' indented"):
        load_config(settings, root=tmp_path)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        (
            "extract.detector.accept_threshold=false",
            "extract.detector.accept_threshold = False: a number is needed, not true/false "
            "(null turns it off)",
        ),
        ("export.jpeg_quality=true", "export.jpeg_quality = True: a number is needed, not true/false"),
        ("quality.best_per_batch=true", "quality.best_per_batch = True: a number is needed"),
        ("quality.batch=true", "quality.batch = True: 'shot' or a number is needed, not true/false"),
        ("characters.fitted.seed=false", "characters.fitted.seed = False: a number is needed"),
    ],
)
def test_a_yes_no_where_a_number_goes_is_refused(setting, message):
    """``true``/``false`` in a number setting was read as 1/0: ``accept_threshold=false``, meant
    as "off", made the cascade accept every candidate without its network."""
    with pytest.raises(ConfigError) as err:
        load_config(None, [setting], use_local=False)
    assert f"config error: {message}" in str(err.value)
    assert "\n" not in str(err.value)


def test_yes_no_settings_still_take_yes_and_no():
    cfg = load_config(None, ["quality.text_filter=no", "characters.fitted.self_training=no"], use_local=False)
    assert cfg.quality.text_filter is False and cfg.characters.fitted.self_training is False
    assert load_config(None, ["quality.text_filter=yes"], use_local=False).quality.text_filter is True
    off = load_config(None, ["extract.detector.accept_threshold=null"], use_local=False)
    assert off.extract.detector.accept_threshold is None


def test_override_parsing():
    assert parse_override("extract.threshold=30") == ("extract.threshold", 30)
    assert parse_override("run.video_extensions=[.mp4, .mkv]") == ("run.video_extensions", [".mp4", ".mkv"])
    assert parse_override("extract.threshold=null") == ("extract.threshold", None)
    assert overrides_to_tree({"a.b": 1, "a.c": 2}) == {"a": {"b": 1, "c": 2}}
    # YAML 1.2, not PyYAML's 1.1: no octal by a leading zero, "yes"/"no" stay words; a "#" is text.
    assert parse_override("run.seed=010") == ("run.seed", 10)
    assert parse_override("generate.checkpoints=[0500, 1000]")[1] == [500, 1000]
    assert parse_override("generate.negative_prompt=no")[1] == "no"
    assert parse_override("export.flip=true")[1] is True and parse_override("a.b=False")[1] is False
    assert parse_override("generate.negative_prompt=blurry #2")[1] == "blurry #2"
    assert parse_override("generate.negative_prompt=#blurry, lowres")[1] == "#blurry, lowres"
    assert parse_override('generate.negative_prompt="quoted # x"')[1] == "quoted # x"
    cfg = load_config(None, {"run.seed": parse_override("run.seed=010")[1]}, use_local=False)
    assert cfg.run.seed == 10
    for bad in ("threshold=3", "extract.threshold", ".x=1"):
        with pytest.raises(ConfigError, match=r"section\.key=value"):
            parse_override(bad)


def test_a_text_setting_on_the_command_line_keeps_the_text_as_typed(tmp_path, capsys):
    """YAML reads ``2024`` as a number, ``style: cartoon`` as a mapping and ``- blurry`` as a list:
    for a setting that takes text that was refused as "not a valid string" or became a list. The
    text as typed, unless quoted or null; given otherwise (a settings file, papermill's
    parameters) the value is shown, with a word on quotes."""
    typed = [
        "generate.negative_prompt=style: cartoon",
        "captioning.trigger_word=2024",
        "generate.trigger_word=null",
        "run.kernel='quoted'",
        "run.seed=010",
    ]
    for cfg in (
        load_config(None, overrides_from_args(typed, text_setting)),
        load_config(None, typed),
    ):
        assert cfg.generate.negative_prompt == "style: cartoon" and cfg.captions.trigger_word == "2024"
        assert cfg.generate.trigger_word is None and cfg.run.kernel == "quoted" and cfg.run.seed == 10
    assert load_config(None, ["generate.negative_prompt=- blurry"]).generate.negative_prompt == "- blurry"
    assert parse_override("generate.negative_prompt=[a, b]", text_setting)[1] == "[a, b]"
    assert parse_override("run.video_extensions=[.mp4]", text_setting)[1] == [".mp4"]
    # A mapping of text to text is a mapping (it was kept as text, then refused as no dictionary).
    described = ["captions.character_descriptions={biscuit: a cartoon dog}", "captions.scene_names={}"]
    cfg = load_config(None, overrides_from_args(described, text_setting))
    assert cfg.captions.character_descriptions == {"biscuit": "a cartoon dog"}
    assert cfg.captions.scene_names == {}
    # One name's text in it is text as typed (``style: dog`` was a mapping, refused with no hint).
    named = ["captions.character_descriptions.biscuit=style: dog", "captions.scene_names.hall=2024"]
    cfg = load_config(None, overrides_from_args(named, text_setting))
    assert cfg.captions.character_descriptions == {"biscuit": "style: dog"}
    assert cfg.captions.scene_names == {"hall": "2024"}
    with pytest.raises(ConfigError) as info:
        load_config(None, {"generate.negative_prompt": 2024})
    assert str(info.value) == (
        "config error: generate.negative_prompt = 2024: Input should be a valid string; "
        "put the text in quotes"
    )
    # A mapping's values are not repeated (one may be a secret); an empty value is not fixed by quotes.
    with pytest.raises(ConfigError) as info:
        load_config(None, {"generate.negative_prompt": {"password": "hunter2"}})
    assert str(info.value) == (
        "config error: generate.negative_prompt.password: generate.negative_prompt takes one value, "
        "not settings under it: Input should be a valid string"
    )
    with pytest.raises(
        ConfigError, match=r"captions.trigger_word is empty: .*give it text, or leave the key out"
    ):
        load_config(None, {"captions.trigger_word": None})
    # A text that takes '' (a tag adding nothing) says how to give it; the trigger word, which
    # refuses it, does not (above).
    with pytest.raises(
        ConfigError, match=r"""give it text \('' for none: --set "export.half_body_tag=''"\)"""
    ):
        load_config(None, {"export.half_body_tag": None})
    movie = tmp_path / "x.mp4"
    movie.write_bytes(b"x")
    argv = ["status", str(movie), "--out", str(tmp_path / "out"), "--set", "captions.trigger_word=2024"]
    assert main(argv) == 0, capsys.readouterr().err


def test_a_bad_value_names_the_settings_file_that_set_it(tmp_path):
    # Three layers can set a key: the error says which file to open, and a value typed in
    # --set, which overrides the files, is named by key alone.
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "main.yaml").write_text("run:\n  seed: 3\nquality:\n  min_sharpness: 20\n")
    local = tmp_path / "config" / "local_me.yaml"
    local.write_text("quality:\n  min_sharpness: sharp\n")
    in_local = r"^config error in .*local_me\.yaml: "
    with pytest.raises(ConfigError, match=in_local + r"quality\.min_sharpness = 'sharp'"):
        load_config(root=tmp_path)
    with pytest.raises(ConfigError) as typed:
        load_config(None, ["quality.min_sharpness=blunt"], root=tmp_path)
    assert str(typed.value).startswith("config error: quality.min_sharpness = 'blunt'")
    extra = tmp_path / "mine.yaml"
    extra.write_text("run:\n  seed: [1]\n")
    with pytest.raises(ConfigError, match=r"^config error in .*mine\.yaml: run\.seed"):
        load_config(extra, ["quality.min_sharpness=5"], root=tmp_path)
    local.write_text("quality:\n  sharpnes: 5\n")
    with pytest.raises(ConfigError, match=in_local + r"unknown key 'quality\.sharpnes'"):
        load_config(root=tmp_path)


def test_a_key_under_a_setting_of_one_value_is_named_as_such():
    # ``run.seed.x=1`` said "run.seed: Input should be a valid integer", as if the seed were wrong.
    for given, expected in {
        "run.seed.x=1": "config error: run.seed.x: run.seed takes one value, not settings under it: ",
        "extract.method.every=2": "config error: extract.method.every: extract.method takes one value",
    }.items():
        with pytest.raises(ConfigError) as err:
            load_config(None, [given])
        assert str(err.value).startswith(expected)
    # A group of settings given as a group is no such error.
    assert load_config(None, ["characters.detector.min_score=0.7"]).characters.detector.min_score == 0.7


def test_a_number_where_a_key_goes_is_named_as_a_key(tmp_path):
    # YAML reads ``1:`` as a number: "run = 1: Keys should be strings" named it as a value.
    settings = tmp_path / "s.yaml"
    settings.write_text("run:\n  1: 2\n")
    with pytest.raises(ConfigError, match=r": unknown key 'run\.1' \(allowed here: kernel, seed, video_ext"):
        load_config(settings, root=tmp_path)
    settings.write_text("captions:\n  scene_names:\n    1: hall\n")
    with pytest.raises(
        ConfigError, match=r": captions\.scene_names: the name 1 is a number here; put it in quotes"
    ):
        load_config(settings, root=tmp_path)
    settings.write_text("captions:\n  scene_names:\n    '1': hall\n")
    assert load_config(settings, root=tmp_path).captions.scene_names == {"1": "hall"}


def test_a_list_of_prompts_yaml_cannot_read_is_refused_not_drawn_as_one():
    # ``{`` opens a mapping in YAML: the list was kept as one text and drawn as one prompt,
    # brackets and all.
    typed = "generate.prompts=[{trigger} {character} portrait, {trigger} {character} full body]"
    with pytest.raises(ConfigError, match=r"^config error: generate\.prompts = .*put each item in quotes"):
        overrides_from_args([typed], text_setting)
    quoted = 'generate.prompts=["{trigger} {character} portrait", "{trigger} {character} full body"]'
    assert len(load_config(None, overrides_from_args([quoted], text_setting)).generate.prompts) == 2
    # A text setting keeps such text as typed.
    kept = overrides_from_args(["generate.negative_prompt=[{blurry}]"], text_setting)
    assert load_config(None, kept).generate.negative_prompt == "[{blurry}]"


def test_bad_config_files(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("extraction: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_config(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(bad)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    # Windows' Notepad and PowerShell's `>` save UTF-16 (with a byte-order mark), some editors a
    # UTF-8 byte-order mark and CRLF: read as they are (UTF-16 stopped the run with a bug)
    for encoding in ("utf-16", "utf-8-sig"):
        saved = tmp_path / f"{encoding}.yaml"
        saved.write_bytes("extract:\r\n  jpeg_quality: 80\r\n".encode(encoding))
        assert load_config(saved).extract.jpeg_quality == 80
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("captions:\n  trigger_word: café\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"is not UTF-8 text .*save it as UTF-8"):
        load_config(latin)


def test_a_key_written_twice_in_a_file_is_one_line(tmp_path):
    """PyYAML keeps the last of two equal keys: a section written twice lost all the first one
    set, silently. Now the file, both lines and the key; a merge key (``<<``) still overrides."""
    twice = tmp_path / "twice.yaml"
    twice.write_text("run:\n  kernel: mine\nextract:\n  method: interval\nrun:\n  seed: 7\n")
    with pytest.raises(ConfigError) as info:
        load_config(twice, root=tmp_path)
    assert str(info.value) == (
        f"config file {twice} sets 'run' twice (line 1 and line 5); only the last one would count: "
        "write it once"
    )
    twice.write_text("extract: {method: shots, method: interval}\n")
    with pytest.raises(ConfigError, match=r"sets 'method' twice \(line 1 and line 1\)"):
        load_config(twice, root=tmp_path)
    merged = tmp_path / "merged.yaml"
    merged.write_text("run: {<<: {seed: 1, kernel: k}, seed: 2}\n")
    assert load_config(merged, root=tmp_path, use_local=False).run.seed == 2


def test_a_settings_file_reads_a_value_as_set_does(tmp_path):
    """YAML 1.2 in a file too: ``seed: 010`` was octal 8 (``--set run.seed=010`` is 10), and
    ``negative_prompt: no`` the boolean False; a boolean setting still takes ``no``."""
    layer = tmp_path / "layer.yaml"
    layer.write_text("run:\n  seed: 010\ngenerate:\n  negative_prompt: no\nexport:\n  balance: no\n")
    cfg = load_config(layer, root=tmp_path)
    assert cfg.run.seed == 10 and cfg.generate.negative_prompt == "no" and cfg.export.balance is False
    # The core schema's other integers, as YAML 1.1 read them too: 0x hexadecimal, 0o octal.
    layer.write_text("run:\n  seed: 0xC0FFEE\nreport:\n  dpi: 0o144\n")
    cfg = load_config(layer, root=tmp_path)
    assert (cfg.run.seed, cfg.report.dpi) == (0xC0FFEE, 100)
    # No dates in YAML 1.2: a trigger word 2024-01-01 was datetime.date(2024, 1, 1), refused.
    dated = "captions:\n  trigger_word: 2024-01-01\ngenerate:\n  negative_prompt: 2024-01-01 12:00:00\n"
    layer.write_text(dated)
    cfg = load_config(layer, root=tmp_path)
    assert (cfg.captions.trigger_word, cfg.generate.negative_prompt) == ("2024-01-01", "2024-01-01 12:00:00")


def test_a_widget_saving_its_choice_keeps_the_values_it_did_not_set(tmp_path):
    """``config/local_*.yaml`` read back as YAML 1.1 by the widget's save: ``picture_box: off``
    was written back as ``false`` (refused at the next load), ``seed: 010`` as 8."""
    from diffusion_bunny.pipeline.settings import save_local_settings

    (tmp_path / "config").mkdir()
    local = tmp_path / "config" / "local_extract.yaml"
    local.write_text("extract:\n  picture_box: off\nrun:\n  seed: 010\ngenerate:\n  negative_prompt: no\n")
    save_local_settings("extract", {"extract": {"jpeg_quality": 80}}, tmp_path)
    cfg = load_config(None, root=tmp_path)
    assert (cfg.extract.picture_box, cfg.run.seed, cfg.generate.negative_prompt) == ("off", 10, "no")
    assert cfg.extract.jpeg_quality == 80


def test_a_section_with_nothing_under_it_sets_nothing(tmp_path):
    """``extract:`` alone (null) was refused as "not a valid dictionary" (its old name loaded)."""
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "main.yaml").write_text("extract:\n  jpeg_quality: 70\n")
    empty = tmp_path / "empty.yaml"
    empty.write_text("extract:\ncaptions:\nrun:\n")
    cfg = load_config(empty, root=tmp_path)
    assert cfg.extract.jpeg_quality == 70 and cfg.captions == Config().captions


def test_a_dotenv_not_in_utf8_is_one_line(tmp_path, monkeypatch):
    """A Latin-1 ``.env`` (``# clé API``) stopped every command with a UnicodeDecodeError as a bug;
    the caption stage reads the working folder's ``.env`` too."""
    (tmp_path / ".env").write_bytes("# cl\xe9 API\nBUNNY_TEST_VAR=x\n".encode("latin-1"))
    monkeypatch.delenv("BUNNY_TEST_VAR", raising=False)
    with pytest.raises(ConfigError) as info:
        load_config(root=tmp_path)
    assert str(info.value) == (
        f"config error: {tmp_path / '.env'} is not UTF-8 text; save it as UTF-8 (it holds KEY=value lines)"
    )
    monkeypatch.setenv("DIFFUSION_BUNNY_WORKSPACE", str(tmp_path / "ws"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"\.env is not UTF-8 text; save it as UTF-8"):
        load_dotenv_once()


def test_a_dotenv_folder_is_under_the_dotenv_s_own_folder(tmp_path, monkeypatch):
    """``HF_HOME=hfcache`` in the workspace's ``.env`` reached the stages, which run in the
    notebooks' folder, as ``notebook/hfcache``. A value given in the environment wins, as any."""
    (tmp_path / ".env").write_text("HF_HOME=hfcache\nTORCH_HOME=/abs/torch\nAWS_CONFIG_FILE=aws/config\n")
    monkeypatch.delenv("HF_HOME", raising=False)
    monkeypatch.delenv("TORCH_HOME", raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "mine")  # set before: the .env does not touch it
    monkeypatch.chdir(tmp_path.parent)
    try:
        load_config(root=tmp_path)
        assert os.environ["HF_HOME"] == str(tmp_path / "hfcache")
        assert os.environ["TORCH_HOME"] == "/abs/torch" and os.environ["AWS_CONFIG_FILE"] == "mine"
    finally:  # set by the .env, outside monkeypatch's records
        os.environ.pop("HF_HOME", None)
        os.environ.pop("TORCH_HOME", None)


def test_section_hash_moves_only_with_its_section():
    a = load_config()
    b = load_config(None, ["run.seed=5"])
    c = load_config(None, ["extract.motion_threshold=3"])
    assert a.section_hash("extract") == b.section_hash("extract")
    assert a.section_hash("extract") != c.section_hash("extract")


def test_cli_config_error_is_one_line_exit_2(capsys, tmp_path):
    movie = tmp_path / "x.mp4"
    movie.write_bytes(b"x")
    assert main(["run", str(movie), "--set", "extract.treshold=3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: config error: unknown key 'extract.treshold'")
    assert err.count("\n") == 1 and "Traceback" not in err
    assert main(["run", str(movie), "--stages", "extract,bogus"]) == 2
    available = "extract, quality, characters, scenes, captions, export, train, generate, report"
    assert f"unknown stage 'bogus' (available: {available}; or their numbers 1-9" in capsys.readouterr().err
    # An empty --config (an unset shell variable) was taken for none at all, silently.
    for command in ("run", "status"):
        assert main([command, str(movie), "--config", ""]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: --config '': give a settings file") and err.count("\n") == 1
    # So are an empty --out (the run went into the workspace's output folder), --characters
    # (judged without pictures) and --address (run locally), nothing written.
    for option, command in (
        ("--out", "run"),
        ("--out", "status"),
        ("--characters", "run"),
        ("--address", "run"),
    ):
        assert main([command, str(movie), option, " "]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {option} ' ': give ") and err.count("\n") == 1
    # An --out through two links to each other, or with a name too long for the file system.
    (tmp_path / "loop_a").symlink_to(tmp_path / "loop_b")
    (tmp_path / "loop_b").symlink_to(tmp_path / "loop_a")
    assert main(["run", str(movie), "--out", str(tmp_path / "loop_a" / "x")]) == 2
    assert "its path loops through links" in capsys.readouterr().err
    # A folder name that is not UTF-8 (tables and notebooks hold it as text): a bug after stage 01.
    latin = os.fsdecode(bytes(tmp_path / "caf") + b"\xe9")
    assert main(["run", str(movie), "--out", latin]) == 2
    assert "the name of the folder or file given as --out is not UTF-8 text" in capsys.readouterr().err
    from diffusion_bunny.errors import storage_error

    long = OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG), str(tmp_path / ("a" * 300)))
    assert "File name too long" in str(storage_error(long))


def test_run_output_dir_moved_to_paths_still_loads_with_one_warning(tmp_path, caplog):
    """``run.output_dir`` is now ``paths.output_dir``: an old file, or ``--set``, still puts the
    runs where it says, with one warning line; both in one layer is an error naming both."""
    (tmp_path / "config").mkdir()
    layer = tmp_path / "config" / "local_old.yaml"
    layer.write_text(yaml.safe_dump({"run": {"output_dir": "elsewhere", "seed": 3}}))
    with caplog.at_level("WARNING", logger="diffusion_bunny.config"):
        cfg = load_config(None, [], root=tmp_path)
    assert cfg.paths.output_dir == "elsewhere" and cfg.run.seed == 3
    assert output_root(cfg) == workspace_root() / "elsewhere"
    lines = [r.getMessage() for r in caplog.records if r.name == "diffusion_bunny.config"]
    assert lines == [f"{layer}: the setting run.output_dir is now called paths.output_dir"]
    assert load_config(None, ["run.output_dir=/tmp/runs"], root=tmp_path).paths.output_dir == "/tmp/runs"
    with pytest.raises(ConfigError, match=r"sets run\.output_dir and paths\.output_dir"):
        load_config(None, ["run.output_dir=a", "paths.output_dir=b"], root=tmp_path)
    assert not hasattr(cfg.run, "output_dir")


def test_a_home_folder_in_output_dir_is_expanded(tmp_path, monkeypatch):
    """``paths.output_dir: ~/runs`` is under the home folder, as in the other folder settings (it
    made a folder named ``~`` in the workspace)."""
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = load_config(None, {"paths.output_dir": "~/bunny_runs"}, root=tmp_path)
    assert output_root(cfg) == tmp_path / "bunny_runs"


@pytest.mark.parametrize(
    ("old", "new", "key", "value"),
    [
        ("extraction", "extract", "motion_threshold", 2.0),
        ("captioning", "captions", "trigger_word", "oldword"),
        ("training", "train", "rank", 8),
        ("generation", "generate", "steps", 5),
    ],
)
def test_a_section_under_its_old_name_still_loads_with_one_warning(tmp_path, caplog, old, new, key, value):
    (tmp_path / "config").mkdir()
    layer = tmp_path / "config" / "local_old.yaml"
    layer.write_text(yaml.safe_dump({old: {key: value}}))
    with caplog.at_level("WARNING", logger="diffusion_bunny.config"):
        cfg = load_config(None, [], root=tmp_path)
    assert getattr(getattr(cfg, new), key) == value
    lines = [r.getMessage() for r in caplog.records if r.name == "diffusion_bunny.config"]
    assert lines == [f"{layer}: the config section '{old}' is now called '{new}'; write {new}.{key}"]
    # A finished run stays done: its manifest recorded the section under the old name.
    assert list(cfg.section_values(new)) == [old]


@pytest.mark.parametrize("blank", ["", "  "])
def test_a_blank_output_dir_is_refused_and_a_blank_library_is_none(blank):
    """``Path("")`` is the current folder: a blank ``paths.output_dir`` put the run folders, and a
    blank ``scenes.library_dir`` the scene library, into the checkout."""
    from diffusion_bunny.stages.scenes.stage import library_path

    with pytest.raises(ConfigError) as err:
        load_config(None, {"paths.output_dir": blank}, use_local=False)
    assert str(err.value) == (
        f"config error: paths.output_dir = {blank!r}: must name a folder; leave the key out for the "
        "default (data/output)"
    )
    cfg = load_config(None, {"scenes.library_dir": blank}, use_local=False)
    assert cfg.scenes.library_dir is None and library_path(cfg.scenes) is None


def test_a_notebook_setting_a_recorded_setting_under_its_new_name_wins(tmp_path, capsys):
    """A run recorded with an old name (``--set extraction.motion_threshold=2``) would not open in
    a notebook setting the new name: the two layers were merged by spelling, and the one setting
    was set twice ("--set sets extraction.motion_threshold and extract.motion_threshold")."""
    from diffusion_bunny.config import current_name
    from diffusion_bunny.nbtools import notebook_config
    from diffusion_bunny.pipeline.run import Run

    assert current_name("extraction.motion_threshold") == "extract.motion_threshold"
    assert current_name("run.output_dir") == "paths.output_dir"
    assert current_name("extract.threshold") == "extract.detector.threshold"
    assert current_name("characters.model.min_face") == "characters.detector.min_face"
    old = {"extraction.motion_threshold": 2, "run.output_dir": str(tmp_path / "a"), "export.jpeg_quality": 80}
    Run(tmp_path).write_settings(None, old)
    cfg = notebook_config(tmp_path, None, None, {"extract.motion_threshold": 3, "paths.output_dir": "b"})
    assert cfg.extract.motion_threshold == 3 and cfg.paths.output_dir == "b"
    assert cfg.export.jpeg_quality == 80  # the rest of the record is still taken
    # the other way round: a run recorded with today's name, a notebook written with the old one
    Run(tmp_path).write_settings(None, {"extract.motion_threshold": 2})
    assert (
        notebook_config(tmp_path, None, None, {"extraction.motion_threshold": 4}).extract.motion_threshold
        == 4
    )


@pytest.mark.parametrize("key", ["scenes.seed", "characters.fitted.seed"])
def test_a_seed_torch_cannot_take_is_refused(key):
    """A seed over 64 bits passed validation and stopped the stage inside torch ("Overflow when
    unpacking long long"): it is refused up front, and the largest seed taken still works."""
    import torch

    from diffusion_bunny.section import MAX_SEED

    with pytest.raises(ConfigError, match=rf"^config error: {key} = {2**64}: Input should be less than"):
        load_config(None, {key: 2**64}, use_local=False)
    section, *rest = key.split(".")
    value = getattr(load_config(None, {key: MAX_SEED}, use_local=False), section)
    for part in rest:
        value = getattr(value, part)
    torch.manual_seed(value)


@pytest.mark.parametrize("value", ["inf", ".inf", "1e308", "nan", "0", "-1", "101"])
def test_a_timestep_shift_the_noise_levels_do_not_survive_is_refused(value):
    """``train.timestep_shift: .inf`` (or ``1e308``) was taken, and every sigma came out NaN."""
    with pytest.raises(
        ConfigError, match=r"^config error: train\.timestep_shift = .*: a fixed timestep_shift"
    ):
        load_config(
            None, overrides_from_args([f"train.timestep_shift={value}"], text_setting), use_local=False
        )
    for fine in ("3.0", "100", "auto", "none"):
        load_config(
            None, overrides_from_args([f"train.timestep_shift={fine}"], text_setting), use_local=False
        )


def test_video_extensions_are_suffixes(tmp_path):
    """``run.video_extensions: [mp4, mkv]`` (no dot) or ``[]`` matched no movie of a folder
    (movies are found by their suffix, ``.mp4``): a folder of movies ran none."""
    from diffusion_bunny.pipeline.runner import find_movies

    cfg = load_config(None, ["run.video_extensions=[mp4, MKV, .mp4]"], use_local=False)
    assert cfg.run.video_extensions == (".mp4", ".mkv")
    (tmp_path / "a.mkv").write_bytes(b"")
    assert [p.name for p in find_movies(tmp_path, cfg)] == ["a.mkv"]
    for empty in ("[]", "['.mp4', ' ']"):
        with pytest.raises(ConfigError) as err:
            load_config(None, [f"run.video_extensions={empty}"], use_local=False)
        assert str(err.value).endswith(": give one or more extensions, none blank, e.g. [.mp4, .mkv]")


@pytest.mark.parametrize(
    ("setting", "listed"),
    [
        ("generate.characters=alice", ("alice",)),
        ("generate.seeds=1", (1,)),
        ("captions.fallback=openai", ["openai"]),
        ("characters.fitted.widths=320", (320,)),
        ("run.video_extensions=mp4", (".mp4",)),
    ],
)
def test_a_lone_value_where_a_list_goes_is_a_list_of_one(setting, listed):
    """``--set generate.characters=alice`` was "Input should be a valid tuple"."""
    key, _ = setting.split("=")
    value = load_config(None, [setting], use_local=False)
    for part in key.split("."):
        value = getattr(value, part)
    assert value == listed


def test_a_setting_that_takes_one_text_too_keeps_it():
    cfg = load_config(None, ["train.lora_targets=attention", "generate.checkpoints=final"], use_local=False)
    assert (cfg.train.lora_targets, cfg.generate.checkpoints) == ("attention", "final")
    assert load_config(None, ["generate.characters=null"], use_local=False).generate.characters is None


def test_a_number_with_an_exponent_is_a_number(tmp_path):
    """YAML 1.2 reads ``1e4`` as a number; PyYAML's 1.1 rule needs a dot and read the text '1e4'
    (refused where a whole number goes). A whole number written so is taken, as ``10000.0`` is."""
    assert parse_override("train.learning_rate=1e-4") == ("train.learning_rate", 1e-4)
    assert parse_override("x.y=.inf")[1] == float("inf") and parse_override("x.y=1.")[1] == 1.0
    assert parse_override("x.y=10")[1] == 10 and isinstance(parse_override("x.y=10")[1], int)
    assert parse_override("x.y=1_000.5")[1] == "1_000.5"  # YAML 1.1's underscores are text in 1.2
    settings = tmp_path / "steps.yaml"
    settings.write_text("train:\n  max_train_steps: 1e4\n")
    assert load_config(settings, use_local=False).train.max_train_steps == 10000
    with pytest.raises(ConfigError, match="fractional part"):
        load_config(None, ["train.max_train_steps=1.55e1"], use_local=False)
    assert load_config(None, ["captions.trigger_word=1e4"], use_local=False).captions.trigger_word == "1e4"


def test_one_content_hash_for_every_key_that_names_a_file_by_its_bytes(tmp_path):
    """References, latent caches and model files are keyed by one chunked sha256: a file over
    several chunks hashes as the whole file does, and the three keys agree with it."""
    import hashlib

    from diffusion_bunny.models.faces import file_digest
    from diffusion_bunny.stages.train.data import file_hash

    big = tmp_path / "big.bin"
    big.write_bytes(bytes(range(256)) * (5 * 4096 + 7))  # 5 MiB and a piece: several chunks
    whole = hashlib.sha256(big.read_bytes()).hexdigest()
    assert file_sha256(big) == whole
    assert file_digest(big) == bytes.fromhex(whole) and file_hash(big) == whole[:24]
    big.write_bytes(big.read_bytes()[:-1] + b"x")  # one byte changed at the end
    assert file_sha256(big) != whole


def test_a_settings_files_empty_group_loads_as_an_empty_section_does(tmp_path):
    """Every key under ``fitted:`` commented out was "characters.fitted is empty; give it a
    value" while an empty section beside it loaded; a setting left empty is still said."""
    path = tmp_path / "mine.yaml"
    path.write_text("characters:\n  fitted:\n  workers: 1\ncaptions:\n")
    cfg = load_config(path, root=tmp_path / "none")
    assert cfg.characters.workers == 1 and cfg.characters.fitted == load_config(None).characters.fitted
    path.write_text("characters:\n  min_face_px:\n")
    with pytest.raises(ConfigError, match=r"characters.min_face_px is empty; give it a value"):
        load_config(path, root=tmp_path / "none")
