"""`python -m labkit sft|dpo`: settings from defaults, a config file and flags; bad input is one line, status 2."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from labkit.__main__ import main
from labkit.cli import build_config, parser_for, read_examples
from labkit.dpo import DPOConfig
from labkit.sft import SFTConfig

ROOT = Path(__file__).resolve().parent.parent
TRAIN = ROOT / "data" / "train.jsonl"
PAIRS = ROOT / "data" / "preferences_train.jsonl"


def config_from(argv: list[str], command: str = "sft"):
    return build_config(parser_for(command).parse_args(["--data", "x", "--out", "y", *argv]), command)


def only_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "Traceback" not in err[0]
    return err[0]


def test_every_config_field_has_a_flag():
    flags = parser_for("dpo").format_help()
    for name in DPOConfig.__dataclass_fields__:
        assert f"--{name.replace('_', '-')}" in flags


def test_flags_override_the_config_file_which_overrides_the_defaults(tmp_path):
    (tmp_path / "run.yaml").write_text("steps: 7\nlr: 0.002\ntarget_modules: [q_proj, v_proj]\n")
    config = config_from(["--config", str(tmp_path / "run.yaml"), "--lr", "0.005"])
    assert (config.steps, config.lr, config.target_modules, config.r) == (7, 0.005, ["q_proj", "v_proj"], SFTConfig.r)


def test_a_json_config_file_and_comma_separated_lists_are_read(tmp_path):
    (tmp_path / "run.json").write_text(json.dumps({"beta": 0.3}))
    config = config_from(["--config", str(tmp_path / "run.json"), "--target-modules", "q_proj,k_proj"], "dpo")
    assert (config.beta, config.target_modules, config.steps) == (0.3, ["q_proj", "k_proj"], DPOConfig.steps)


def test_an_unknown_setting_in_the_config_file_is_named(tmp_path, capsys):
    (tmp_path / "run.yaml").write_text("stepz: 7\n")
    assert main(["sft", "--data", str(TRAIN), "--out", str(tmp_path), "--config", str(tmp_path / "run.yaml")]) == 2
    assert "'stepz' is not a sft setting" in only_line(capsys)


def test_a_missing_data_file_is_one_line_and_status_2(tmp_path, capsys):
    assert main(["sft", "--data", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path)]) == 2
    assert "nope.jsonl: no such file" in only_line(capsys)


def test_an_unknown_flag_is_one_line_and_status_2(tmp_path, capsys):
    assert main(["sft", "--data", str(TRAIN), "--out", str(tmp_path), "--stepz", "3"]) == 2
    assert "unrecognized arguments: --stepz 3" in only_line(capsys)


def test_a_missing_required_flag_is_one_line_and_status_2(capsys):
    assert main(["dpo", "--data", str(PAIRS)]) == 2
    assert "--out" in only_line(capsys)


def test_preference_pairs_given_to_sft_point_to_dpo(tmp_path, capsys):
    assert main(["sft", "--data", str(PAIRS), "--out", str(tmp_path)]) == 2
    line = only_line(capsys)
    assert "preferences_train.jsonl:1:messages" in line and "python -m labkit dpo" in line


def test_a_file_that_is_not_json_lines_is_one_line(tmp_path, capsys):
    (tmp_path / "bad.jsonl").write_text("this is not json\nnor this\nnor this\n")
    assert main(["sft", "--data", str(tmp_path / "bad.jsonl"), "--out", str(tmp_path)]) == 2
    assert "bad.jsonl" in only_line(capsys)


def test_chat_examples_are_read_for_sft_and_pairs_for_dpo():
    assert len(read_examples(str(TRAIN), "sft")) > 100
    assert set(read_examples(str(PAIRS), "dpo")[0]) >= {"prompt", "chosen", "rejected"}


def test_the_command_itself_prints_no_traceback(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "labkit", "sft", "--data", str(tmp_path / "nope.jsonl"),
                           "--out", str(tmp_path)], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and done.stderr.startswith("error: ")
