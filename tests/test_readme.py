"""The README's two fresh-machine commands stay true: CI runs the test one verbatim."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    return re.findall(r"```bash\n(python3 -m venv .*?)\n```", text)


def test_ci_runs_the_readme_test_command():
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    command = ci[ci.index("# README test command:") + 1]
    assert command in _readme_commands()


def test_readme_leads_with_demo_and_test_commands():
    demo, tests = _readme_commands()[:2]
    assert demo.endswith("edgeseg demo")
    assert "pytest" in tests
