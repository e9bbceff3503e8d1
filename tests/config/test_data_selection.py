"""data.label_suffixes validation, data.splits beside the config, and the spinal-cord grey-matter configs."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgeseg.config import load_experiment, to_dict
from edgeseg.errors import UserError
from edgeseg.train.setup import with_resolved_splits

REPO = Path(__file__).resolve().parents[2]


def test_label_suffixes_option():
    assert load_experiment(None).data.label_suffixes is None  # discovery's default list
    cfg = load_experiment(None, ["data.label_suffixes=[_gmseg_manual, _gmseg_goldstandard]"])
    assert cfg.data.label_suffixes == ("_gmseg_manual", "_gmseg_goldstandard")


@pytest.mark.parametrize("overrides, message", [
    (["data.label_suffixes=[]"], "non-empty list of non-empty strings"),
    (["data.label_suffixes=['_seg', ' ']"], "non-empty list of non-empty strings"),
    (["data.label_suffixes=[labels/_seg]"], "file-name endings, not paths"),
    (["data.label_suffixes=[_seg, _seg]"], "lists a suffix twice"),
    (["data.label_suffixes=[_seg]", "data.layout=pairs"], "sidecar layout"),
    (["data.label_suffixes=[3]"], "expected a string"),
])
def test_label_suffixes_errors(overrides, message):
    with pytest.raises(UserError, match=message):
        load_experiment(None, overrides)


def test_splits_file_beside_the_config(tmp_path):
    root, config_dir = tmp_path / "data", tmp_path / "configs"
    root.mkdir()
    config_dir.mkdir()
    (config_dir / "mine.json").write_text("{}")
    cfg = load_experiment(None, ["data.splits=mine.json"])
    assert with_resolved_splits(cfg, root, config_dir).data.splits == str((config_dir / "mine.json").resolve())
    assert with_resolved_splits(cfg, root, None).data.splits == "mine.json"  # no config file: unchanged
    (root / "mine.json").write_text("{}")  # a file under the data root wins (evaluate --data reads its own)
    assert with_resolved_splits(cfg, root, config_dir).data.splits == "mine.json"
    absolute = load_experiment(None, [f"data.splits={tmp_path / 'x.json'}"])
    assert with_resolved_splits(absolute, root, config_dir).data.splits == str(tmp_path / "x.json")
    missing = load_experiment(None, ["data.splits=nowhere.json"])  # neither: the seeded split, as before
    assert with_resolved_splits(missing, root, config_dir).data.splits == "nowhere.json"
    none = load_experiment(None, ["data.splits=null"])
    assert with_resolved_splits(none, root, config_dir).data.splits is None


def _flat(tree, prefix=""):
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}
    return {prefix[:-1]: tree}


def test_grey_matter_configs_differ_only_in_loss_and_scheme():
    soft = load_experiment(REPO / "configs" / "spinalcord_gm_softseg.yaml")
    dice = load_experiment(REPO / "configs" / "spinalcord_gm_dice.yaml")
    a, b = _flat(to_dict(soft)), _flat(to_dict(dice))
    assert {k for k in a if a[k] != b[k]} == {"loss.name", "loss.heatmap_activation", "train.scheme"}
    assert (soft.train.scheme, soft.loss.name, dice.train.scheme, dice.loss.name) == (
        "softseg", "adaptive_wing", "standard", "dice")
    assert soft.data.label_suffixes == ("_gmseg_manual", "_gmseg_goldstandard")
    assert (REPO / "configs" / soft.data.splits).is_file()
