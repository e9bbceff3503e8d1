"""Report rows from bundles: manifest facts, runtime metrics, latency, memory, failures, reuse."""

import os
import sys
import textwrap

import pytest

from edgeseg.report.collect import bundle_facts, collect, subprocess_peak_rss


def test_bundle_facts_read_manifest_sizes(bundles):
    facts = bundle_facts(bundles["8/8"])
    # The only file is 1000 bytes: bundle_bytes counts the model files, not the manifest.
    assert facts["bundle_bytes"] == 1000
    assert facts["bits_nominal"] == "8/8"
    assert facts["bits_deployed"] == {"cpu": ["float32"]}


def test_rows_hold_metrics_latency_and_failures(bundles, tmp_path, fake_evaluator):
    fake = fake_evaluator({"fp32": (0.9, 0.8), "w8a8": (0.85, 0.75)}, fail={"w4a6"})
    settings = list(bundles.items())
    rows = collect(settings, data=None, cache_dir=tmp_path / "cache", evaluate=fake, measure_memory=None)
    fp32, w8, w4 = rows
    assert [r["name"] for r in rows] == ["fp32", "8/8", "4/6"]
    assert fp32["status"] == "ok" and fp32["bundle_bytes"] == 4000
    # Dice of the two cases, by hand: sphere (0.9 + 0.8) / 2, blob (0.8 + 0.7) / 2, mean of the four.
    assert fp32["per_class"]["sphere"]["dice"] == pytest.approx(0.85)
    assert fp32["per_class"]["blob"]["dice"] == pytest.approx(0.75)
    assert fp32["dice_mean"] == pytest.approx(0.80)
    assert fp32["per_class"]["blob"]["hd95"] is None and fp32["per_class"]["blob"]["hd95_n_inf"] == 2
    assert fp32["per_class"]["sphere"]["abs_volume_error_mm3"] == pytest.approx(10.0)
    assert fp32["latency_s_median"] == pytest.approx(0.2)  # median of 0.3, 0.1, 0.2
    assert w8["dice_mean"] == pytest.approx(0.75)
    assert w4["status"] == "failed" and "onnxruntime refused the graph" in w4["error"]


def test_finished_rows_are_reused_and_failed_ones_retried(bundles, tmp_path, fake_evaluator):
    fake = fake_evaluator({"fp32": (0.9, 0.8), "w8a8": (0.85, 0.75)}, fail={"w4a6"})
    settings = list(bundles.items())
    collect(settings, data=None, cache_dir=tmp_path / "cache", evaluate=fake, measure_memory=None)
    assert fake.calls == ["fp32", "w8a8", "w4a6"]
    fake2 = fake_evaluator({"fp32": (0.0, 0.0), "w8a8": (0.0, 0.0), "w4a6": (0.7, 0.6)})
    rows = collect(settings, data=None, cache_dir=tmp_path / "cache", evaluate=fake2, measure_memory=None)
    assert fake2.calls == ["w4a6"]  # only the failed one is redone
    assert [r["reused"] for r in rows] == [True, True, False]
    assert rows[0]["dice_mean"] == pytest.approx(0.80)  # the earlier result, not fake2's zeros
    assert rows[2]["status"] == "ok"


def test_duplicate_names_are_a_user_error(bundles, fake_evaluator):
    from edgeseg.errors import UserError

    with pytest.raises(UserError, match="unique"):
        collect([("a", bundles["fp32"]), ("a", bundles["8/8"])], data=None, evaluate=fake_evaluator({}),
                measure_memory=None)


def test_subprocess_peak_rss_sees_a_large_allocation(tmp_path, bundles):
    # Oracle: a child that touches 200 MiB more than another must peak ~200 MiB higher (>= 180 MiB: slack for
    # allocator and kernel accounting). Run under pytest (torch loaded, ~365 MB): a probe that read the
    # parent's rusage of the child reported the same number for both.
    (tmp_path / "fake_eval.py").write_text(textwrap.dedent("""
        import numpy as np
        def small(bundle, data, split):
            return {}
        def large(bundle, data, split):
            block = np.ones(200 * 2**20, dtype=np.uint8)
            return {"total": int(block.sum())}
    """))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    small = subprocess_peak_rss(bundles["fp32"], None, "test", evaluator="fake_eval:small", env=env)
    large = subprocess_peak_rss(bundles["fp32"], None, "test", evaluator="fake_eval:large", env=env)
    assert large - small >= 180 * 2**20
    with pytest.raises(RuntimeError, match="memory probe exited"):
        subprocess_peak_rss(bundles["fp32"], None, "test", evaluator="fake_eval:missing", env=env)


def test_a_changed_bundle_is_evaluated_again(bundles, tmp_path, fake_evaluator, make_bundle):
    import shutil

    fake = fake_evaluator({"fp32": (0.9, 0.8)})
    settings = [("fp32", bundles["fp32"])]
    collect(settings, data=None, cache_dir=tmp_path / "cache", evaluate=fake, measure_memory=None)
    shutil.rmtree(bundles["fp32"])
    make_bundle(bundles["fp32"], 4000, "fp32-retrained")  # same path and size, different manifest
    rows = collect(settings, data=None, cache_dir=tmp_path / "cache", evaluate=fake, measure_memory=None)
    assert fake.calls == ["fp32", "fp32"] and rows[0]["reused"] is False
    assert rows[0]["bits_nominal"] == "fp32-retrained"


def test_run_evaluation_scores_what_the_run_scored(tmp_path):
    # The report must evaluate a run's bundles on the run's own data folder, split file, layout and
    # seed, and score class 0 when the run did (EM membranes): the evaluator gets those options.
    from edgeseg.config import load_experiment
    from edgeseg.report.collect import default_evaluate, run_evaluation
    from edgeseg.train.rundir import RunDir, RunInfo

    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    run.write_config(load_experiment(None, ["data.layout=png", "data.splits=my_splits.json", "train.seed=7"]))
    run.write_info(RunInfo(spatial_dims=2, in_channels=1, class_names=["membrane", "cell"], patch_size=[8, 8],
                           tile_size=[8, 8], preprocess={}, data_root=str(tmp_path / "em"),
                           evaluate_background=True))
    data, evaluate = run_evaluation(run.path, None, default_evaluate)
    assert data == tmp_path / "em"
    assert evaluate.keywords == {"include_background": True, "layout": "png", "splits_file": "my_splits.json",
                                 "seed": 7, "label_suffixes": None}
    # a sidecar run's label files too (e.g. the spinal-cord grey matter only)
    run.write_config(load_experiment(None, ["data.layout=sidecar", "data.label_suffixes=[_gm, _gm2]"]))
    _, evaluate = run_evaluation(run.path, None, default_evaluate)
    assert evaluate.keywords["layout"] == "sidecar" and evaluate.keywords["label_suffixes"] == ("_gm", "_gm2")
    other, _ = run_evaluation(run.path, tmp_path / "elsewhere", default_evaluate)
    assert other == tmp_path / "elsewhere"  # --data wins over the run's folder


def test_default_evaluate_without_data_is_a_user_error(tmp_path):
    from edgeseg.errors import UserError
    from edgeseg.report.collect import default_evaluate

    with pytest.raises(UserError, match="--data"):
        default_evaluate(tmp_path / "bundle", None, "test")


def test_rows_cached_before_the_accuracy_fields_are_reused_as_dice(bundles, tmp_path, fake_evaluator):
    import json

    cache = tmp_path / "cache"
    collect([("fp32", bundles["fp32"])], data=None, cache_dir=cache, evaluate=fake_evaluator({"fp32": (0.9, 0.8)}),
            measure_memory=None)
    path = cache / "fp32.json"
    row = json.loads(path.read_text())
    for key in ("accuracy_metric", "accuracy_mean", "output_kind"):  # the row as written before those existed
        del row[key]
    path.write_text(json.dumps(row))
    fake = fake_evaluator({})
    (reused,) = collect([("fp32", bundles["fp32"])], data=None, cache_dir=cache, evaluate=fake, measure_memory=None)
    assert fake.calls == [] and reused["reused"]
    assert reused["accuracy_metric"] == "dice" and reused["output_kind"] == "logits"
    assert reused["accuracy_mean"] == pytest.approx(0.80) and reused["dice_mean"] == pytest.approx(0.80)
