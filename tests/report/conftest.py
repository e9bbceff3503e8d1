"""Fake bundles and a fake runtime evaluator for the report tests (no model is trained)."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgeseg.export.bundle_writer import write_bundle
from edgeseg.metrics.summary import aggregate
from edgeseg.runtime.bundle import Manifest, ModelForm

CLASSES = ["background", "sphere", "blob"]


def fake_bundle(path: Path, payload_bytes: int, nominal: str) -> Path:
    """A bundle whose only file is `payload_bytes` long (the manifest is real, the model is not)."""
    manifest = Manifest(
        spatial_dims=3, in_channels=1, class_names=CLASSES, tile_size=[16, 16, 16], min_input_multiple=4,
        preprocess={}, forms={"cpu": ModelForm(file="model.onnx", backend="onnxruntime", precision="fp32")},
        files={}, bits={"nominal": nominal, "weights_at_rest": "float32", "deployed": {"cpu": ["float32"]}},
    )
    write_bundle(path, {"model.onnx": b"\0" * payload_bytes}, manifest)
    return path


def fake_cases(dice_sphere: float, dice_blob: float) -> list[dict]:
    """Two cases' `case_metrics`-shaped dicts with the given Dice (the other metrics fixed)."""
    def case(ds, db):
        return {"sphere": {"dice": ds, "hd95": 2.0, "abs_volume_error_mm3": 10.0},
                "blob": {"dice": db, "hd95": float("inf"), "abs_volume_error_mm3": 30.0}}
    return [case(dice_sphere, dice_blob), case(dice_sphere - 0.1, dice_blob - 0.1)]


class FakeEvaluator:
    """Dice per bundle name; records calls so tests can see what was reused."""

    def __init__(self, dice: dict[str, tuple[float, float]], fail: set[str] = frozenset()):
        self.dice, self.fail, self.calls = dice, set(fail), []

    def __call__(self, bundle: Path, data, split: str) -> dict:
        self.calls.append(Path(bundle).name)
        if Path(bundle).name in self.fail:
            raise RuntimeError("onnxruntime refused the graph")
        cases = fake_cases(*self.dice[Path(bundle).name])
        return {"summary": aggregate(cases), "cases": cases, "seconds_per_case": [0.3, 0.1, 0.2]}


@pytest.fixture
def bundles(tmp_path):
    """Three fake bundles: fp32 (4000 B), 8/8 (1000 B), 4/6 (600 B)."""
    root = tmp_path / "bundles"
    return {
        "fp32": fake_bundle(root / "fp32", 4000, "fp32"),
        "8/8": fake_bundle(root / "w8a8", 1000, "8/8"),
        "4/6": fake_bundle(root / "w4a6", 600, "4/6"),
    }


@pytest.fixture
def fake_evaluator():
    """The FakeEvaluator class (a fixture: test modules do not import conftest under --import-mode=importlib)."""
    return FakeEvaluator


@pytest.fixture
def make_bundle():
    """The fake_bundle function."""
    return fake_bundle
