"""`edgeseg report` command function, through a local typer app (app.py registration is the lead's)."""

import json

import pytest
import typer
from typer.testing import CliRunner

from edgeseg.cli.report_cmd import report
from edgeseg.errors import UserError


@pytest.fixture
def invoke():
    app = typer.Typer()
    app.command()(report)
    return lambda *args: CliRunner().invoke(app, [str(a) for a in args])


def test_bad_bits_is_a_user_error(invoke, tmp_path):
    result = invoke("--out", tmp_path / "r", "--bits", "fp32,4/9")
    assert isinstance(result.exception, UserError) and "4/9" in str(result.exception)
    assert not (tmp_path / "r").exists()


def test_missing_bundle_is_a_user_error(invoke, tmp_path):
    result = invoke("--out", tmp_path / "r", "--bundles", tmp_path / "nope")
    assert isinstance(result.exception, UserError) and "bundle not found" in str(result.exception)


def test_existing_bundles_form_writes_a_report_even_when_evaluation_fails(invoke, tmp_path, bundles):
    # Whatever the runtime evaluator does here (missing, or refusing the fake model bytes), each
    # setting becomes a "failed" row and the report is still written: failures are not fatal.
    out = tmp_path / "r"
    empty = tmp_path / "no_cases"
    empty.mkdir()
    result = invoke("--out", out, "--no-memory", "--data", empty, "--bundles", f"float={bundles['fp32']}",
                    "--bundles", bundles["8/8"])
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert [s["name"] for s in results["settings"]] == ["float", "w8a8"]
    assert all(s["status"] == "failed" for s in results["settings"])
    assert (out / "report.html").is_file() and "failed settings" in result.output


def test_existing_bundles_without_data_is_one_clear_error(invoke, tmp_path, bundles):
    # Bundles do not record their dataset folder: evaluating them with none used to fail every
    # setting with a TypeError deep in the evaluator; now the command refuses up front.
    out = tmp_path / "r"
    result = invoke("--out", out, "--no-memory", "--bundles", bundles["8/8"])
    assert isinstance(result.exception, UserError) and "--data" in str(result.exception)
    assert not (out / "results.json").exists()
