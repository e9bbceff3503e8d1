"""Run the reliability suite and write what it observed into docs/reliability.md.

    python benchmarks/reliability_table.py               # runs the suite (about 1 minute), rewrites the doc's tables
    python benchmarks/reliability_table.py --check       # exit 1 when the doc's tables differ from a fresh run

The bad-input suite (tests/reliability/test_bad_inputs.py) dumps every case's exit code and error
line to JSON (EDGESEG_RELIABILITY_JSON), the kill/resume test its kills and loss curves
(EDGESEG_RELIABILITY_KILL_JSON). This script runs both with pytest and replaces the text between the
`<!-- cases:begin -->` / `<!-- cases:end -->` and `<!-- kill:begin -->` / `<!-- kill:end -->` markers
of docs/reliability.md, so the tables only ever hold observed messages. Paths in messages are shown
as <tmp> (the case's folder), <kit> (the shared fixtures) and <repo>.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "reliability.md"


def run_suite(workdir: Path) -> tuple[list[dict], dict, int]:
    cases, kill = workdir / "cases.json", workdir / "kill.json"
    env = {**os.environ, "EDGESEG_RELIABILITY_JSON": str(cases), "EDGESEG_RELIABILITY_KILL_JSON": str(kill)}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:xdist", "-p", "no:cacheprovider",
               "tests/reliability/test_bad_inputs.py", "tests/reliability/test_kill_resume.py"]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    print(result.stdout.strip().splitlines()[-1] if result.stdout.strip() else result.stderr[-2000:])
    return json.loads(cases.read_text()), json.loads(kill.read_text()) if kill.is_file() else {}, result.returncode


def _code(text: str) -> str:
    """A markdown table cell holding `text` verbatim (double-backtick span, pipes escaped); a traceback
    is shortened to its first and last lines."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    start = next((i for i, ln in enumerate(lines) if ln.startswith("Traceback")), None)
    if start is not None:
        last = next((ln for ln in reversed(lines) if not ln[:1].isspace()), lines[-1])  # the exception line
        text = f"{lines[start]} ... ({len(lines) - start} lines) ... {last}"
    text = " ".join(text.split()).replace("|", "\\|")
    return f"`` {text} ``" if text else "(nothing on stderr)"


def cases_table(cases: list[dict]) -> str:
    lines = [f"{len(cases)} cases; observed with Python {platform.python_version()} on {platform.system()}.", "",
             "| # | case | command | bad input | exit | stderr (the whole of it) | disk unchanged |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for i, case in enumerate(cases, 1):
        known = " (xfail: known gap)" if case.get("xfail") else ""
        lines.append(f"| {i} | `{case['id']}`{known} | `{case['command']}` | {case['what'].replace('|', '/')} | "
                     f"{case['exit_code']} | {_code(case['stderr'])} | {'yes' if case['unchanged_on_disk'] else '**no**'} |")
    return "\n".join(lines)


def kill_table(kill: dict) -> str:
    if not kill:
        return "(the kill/resume test did not run)"
    lines = [f"Seed {kill['seed']}, {kill['epochs']} epochs, {kill['seconds']} s for the whole test.", "",
             "| kill | after epoch's checkpoint | random delay (s) | epochs in the log at the kill | exit |",
             "| --- | --- | --- | --- | --- |"]
    for i, k in enumerate(kill["kills"], 1):
        lines.append(f"| {i} | {k['after_epoch']} | {k['delay_s']} | {k['epochs_logged_at_kill']} | {k['returncode']} |")
    lines += ["", "| epoch | train loss, uninterrupted | train loss, killed twice and resumed |", "| --- | --- | --- |"]
    for epoch, (a, b) in enumerate(zip(kill["loss_uninterrupted"], kill["loss_resumed"]), 1):
        lines.append(f"| {epoch} | {a!r} | {b!r} |")
    weights = (f"Weights: {kill['tensors_compared']} tensors compared, identical: "
               f"{'yes' if kill['weights_identical'] else 'no'} (largest difference "
               f"{kill['max_abs_weight_difference']}). Orphaned hidden temporaries: "
               f"{', '.join(kill['orphaned_temporaries']) or 'none'}.")
    lines += ["", weights]
    return "\n".join(lines)


def replace_between(text: str, name: str, body: str) -> str:
    pattern = re.compile(rf"(<!-- {name}:begin -->\n).*?(<!-- {name}:end -->)", re.DOTALL)
    if not pattern.search(text):
        raise SystemExit(f"{DOC}: markers <!-- {name}:begin --> / <!-- {name}:end --> not found")
    return pattern.sub(lambda m: m.group(1) + (body + "\n" if body else "") + m.group(2), text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare only (case ids, exit codes, messages)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cases, kill, status = run_suite(Path(tmp))
    text = DOC.read_text(encoding="utf-8")
    new = replace_between(replace_between(text, "cases", cases_table(cases)), "kill", kill_table(kill))
    if args.check:
        same = replace_between(text, "kill", "") == replace_between(new, "kill", "")
        print("docs/reliability.md is up to date" if same else "docs/reliability.md differs from this run")
        return 0 if same and status == 0 else 1
    DOC.write_text(new, encoding="utf-8")
    print(f"wrote {DOC} ({len(cases)} cases)")
    return status


if __name__ == "__main__":
    sys.exit(main())
