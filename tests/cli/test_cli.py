"""The CLI through its real entry point: user mistakes end in one line and a non-zero exit."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "edgeseg", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def assert_user_error(result, *fragments):
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    lines = [ln for ln in result.stderr.strip().splitlines() if ln.strip()]
    text = " ".join(lines)
    assert text.startswith("error:"), result.stderr
    for fragment in fragments:
        assert fragment in text, text


def test_help_lists_commands():
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("train", "evaluate", "list", "demo"):
        assert command in result.stdout


def test_list_models_and_losses():
    assert "unet" in run_cli("list", "models").stdout
    assert "dice_ce" in run_cli("list", "losses").stdout
    assert_user_error(run_cli("list", "modles"), "unknown list target 'modles'", "did you mean 'models'")


def test_missing_config_file(tmp_path):
    assert_user_error(run_cli("train", tmp_path / "nope.yaml", "--out", tmp_path / "run"), "config file not found")
    assert not (tmp_path / "run").exists()


def test_unknown_config_key_suggests(tmp_path):
    result = run_cli("train", REPO / "configs" / "demo.yaml", "--out", tmp_path / "run", "--set", "train.epoch=3")
    assert_user_error(result, "unknown config key 'train.epoch'", "did you mean 'epochs'")
    assert not (tmp_path / "run").exists()


def test_bad_option_value(tmp_path):
    result = run_cli("train", REPO / "configs" / "demo.yaml", "--out", tmp_path / "run", "--set", "model.norm=bach")
    assert_user_error(result, "config 'model.norm'", "did you mean 'batch'")


def test_missing_data_folder(tmp_path):
    result = run_cli("train", REPO / "configs" / "demo.yaml", "--out", tmp_path / "run",
                     "--set", f"data.root={tmp_path / 'nowhere'}")
    assert_user_error(result, "data folder not found")


def test_evaluate_not_a_run(tmp_path):
    assert_user_error(run_cli("evaluate", tmp_path), "not an edgeseg run directory")
    assert_user_error(run_cli("evaluate", tmp_path / "missing"), "run directory or bundle not found")


def test_demo_config_file_matches_builtin():
    from edgeseg.cli.demo import demo_config
    from edgeseg.config import load_experiment

    assert load_experiment(REPO / "configs" / "demo.yaml") == demo_config()
