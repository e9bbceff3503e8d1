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


def test_segmentation_table_and_notes_are_unchanged(bundles, fake_evaluator):
    # The Dice report's columns and cells, written by hand from the fake cases (conftest.fake_cases).
    from edgeseg.report.render import build_results, render_markdown, table

    rows = collect([("fp32", bundles["fp32"])], data=None, evaluate=fake_evaluator({"fp32": (0.9, 0.8)}),
                   measure_memory=None)
    results = build_results(rows, split="test", data=None)
    assert results["accuracy_metric"] == "dice" and rows[0]["accuracy_mean"] == pytest.approx(0.80)
    header, cells = table(results)
    assert header == ["setting", "Pareto", "bundle kB", "weights at rest", "mean Dice", "Dice sphere", "Dice blob",
                      "HD95 sphere (mm)", "HD95 blob (mm)", "vol. err. sphere (mm³)", "vol. err. blob (mm³)",
                      "latency s/vol", "peak RSS MiB"]
    assert cells == [["fp32", "yes", "4.0", "float32", "0.800", "0.850", "0.750", "2.00", "- (2 inf)", "10.0",
                      "30.0", "0.200", "-"]]
    md = render_markdown(results)
    assert ("at least as accurate (mean Dice). HD95 is the mean over finite values; '(k inf)' counts cases where "
            "exactly one of prediction and reference was empty.") in md
    assert "![size](dice_vs_size.png)\n![latency](dice_vs_latency.png)\n![classes](per_class_dice.png)" in md
