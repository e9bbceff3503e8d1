"""Report files from rows: present, consistent with the evaluation, self-contained HTML."""

import json

import pytest

from edgeseg.report.collect import collect
from edgeseg.report.render import PLOTS, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def rows(bundles, fake_evaluator):
    fake = fake_evaluator({"fp32": (0.9, 0.8), "w8a8": (0.95, 0.75)}, fail={"w4a6"})
    return collect(list(bundles.items()), data=None, evaluate=fake, measure_memory=lambda b, d, s: 123 * 2**20)


def test_report_files_and_json_fields(rows, tmp_path):
    out = tmp_path / "report"
    write_report(out, rows, split="test", data=None)
    for name in ["results.json", "report.md", "report.html", *PLOTS.values()]:
        assert (out / name).is_file(), name
    for name in PLOTS.values():
        assert (out / name).read_bytes().startswith(PNG_MAGIC)
    results = json.loads((out / "results.json").read_text())
    by_name = {s["name"]: s for s in results["settings"]}
    assert set(by_name) == {"fp32", "8/8", "4/6"}
    # Consistent with the (fake) evaluation: mean Dice by hand; 8/8 (1000 B, .80) beats fp32 (4000 B, .80)
    # on size at equal Dice, so the front is 8/8 alone (4/6 failed).
    assert by_name["fp32"]["dice_mean"] == pytest.approx(0.80)
    assert by_name["8/8"]["dice_mean"] == pytest.approx(0.80)
    assert results["pareto_front"] == ["8/8"]
    assert by_name["8/8"]["pareto"] and not by_name["fp32"]["pareto"]
    assert by_name["fp32"]["bundle_bytes"] == 4000 and by_name["fp32"]["bits_nominal"] == "fp32"
    assert by_name["fp32"]["peak_rss_bytes"] == 123 * 2**20
    assert by_name["fp32"]["latency_s_median"] == pytest.approx(0.2)
    assert by_name["fp32"]["per_class"]["blob"]["hd95"] is None  # every blob HD95 was inf
    assert by_name["4/6"]["status"] == "failed"
    assert by_name["fp32"]["summary"]["sphere"]["dice"]["n"] == 2


def test_markdown_and_html_show_the_table_and_failures(rows, tmp_path):
    out = tmp_path / "report"
    write_report(out, rows, split="test", data=None)
    md = (out / "report.md").read_text()
    assert "| fp32 |" in md and "0.800" in md and "4.0" in md  # 4000 B = 4.0 kB
    assert "onnxruntime refused the graph" in md
    assert "123" in md  # peak RSS MiB
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 3
    assert "src='http" not in html and "dice_vs_size.png" not in html  # self-contained
    assert "onnxruntime refused the graph" in html
