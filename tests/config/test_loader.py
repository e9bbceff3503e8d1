from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from edgeseg.config import ExperimentConfig, apply_overrides, from_dict, load_experiment, to_dict
from edgeseg.errors import UserError

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Inner:
    size: tuple[int, int] = (1, 2)
    mode: Literal["a", "b"] = "a"


@dataclass(frozen=True)
class Outer:
    inner: Inner = field(default_factory=Inner)
    rate: float = 0.1
    name: str | None = None


def test_nested_and_coercion():
    obj = from_dict(Outer, {"inner": {"size": [3, 4], "mode": "b"}, "rate": 1, "name": "x"})
    assert obj == Outer(Inner((3, 4), "b"), 1.0, "x")
    assert isinstance(obj.rate, float)


@pytest.mark.parametrize(
    "data, message",
    [
        ({"rat": 1.0}, "unknown config key 'rat' (did you mean 'rate'?)"),
        ({"inner": {"mode": "c"}}, "config 'inner.mode': 'c' is not one of 'a', 'b'"),
        ({"inner": {"size": [1]}}, "config 'inner.size': expected 2 values, got 1"),
        ({"rate": "fast"}, "config 'rate': expected a number, got 'fast'"),
        ({"inner": {"size": [1, "x"]}}, "config 'inner.size[1]': expected an integer, got 'x'"),
        ({"inner": 3}, "config inner: expected a mapping, got int"),
    ],
)
def test_errors_name_the_field(data, message):
    with pytest.raises(UserError) as info:
        from_dict(Outer, data)
    assert str(info.value).startswith(message)


def test_overrides_parse_yaml_scalars():
    data = apply_overrides({}, ["train.lr=0.5", "data.patch_size=[8, 8]", "data.root=some/where", "x.flag=true"])
    assert data == {"train": {"lr": 0.5}, "data": {"patch_size": [8, 8], "root": "some/where"}, "x": {"flag": True}}
    with pytest.raises(UserError, match="expects key=value"):
        apply_overrides({}, ["train.lr"])


def test_round_trip_through_dict():
    cfg = load_experiment(None, ["data.label_map={255: 1}", "model.depth=4"])
    assert from_dict(ExperimentConfig, to_dict(cfg)) == cfg


def test_validation_rules_are_user_errors():
    with pytest.raises(UserError, match="patch_size .* spatial_dims is 2"):
        load_experiment(None, ["data.spatial_dims=2"])
    with pytest.raises(UserError, match="model.depth must be between 1 and 6"):
        load_experiment(None, ["model.depth=9"])
    with pytest.raises(UserError, match="label_map 255: 7 is not a class index"):
        load_experiment(None, ["data.label_map={255: 7}"])


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = load_experiment(path)
    assert len(cfg.data.patch_size) == cfg.data.spatial_dims


def test_bad_yaml_is_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_experiment(bad)
    with pytest.raises(UserError, match="config file not found"):
        load_experiment(tmp_path / "missing.yaml")


def test_list_configs_shows_each_configs_header_line_and_path():
    from typer.testing import CliRunner

    from edgeseg.cli.app import app
    from edgeseg.cli.demo import shipped_configs

    configs = shipped_configs()
    assert len(configs) >= 10  # one per method and dataset
    result = CliRunner().invoke(app, ["list", "configs"], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    for path in configs:
        first = path.read_text().splitlines()[0].lstrip("#").strip()  # every shipped config starts with a comment
        assert first and f"{path.stem}  {first}" in result.output
        assert str(path) in result.output
    # the first sentence, across lines: countception's header sentence runs onto its second line
    assert "intervertebral discs) on synthetic 2D keypoint phantoms:" in result.output
