"""Safe loading: nothing edgeseg reads can run code or write outside where it was asked to.

- a source scan (Python's own parser, not text search) of edgeseg/ for pickle and its relatives,
  `torch.load` without `weights_only=True`, `numpy.load(allow_pickle=True)`, non-safe YAML loaders,
  eval/exec and archive extraction;
- the loaders themselves, fed hostile files: a YAML config with a `!!python/object` tag, a pickle
  disguised as a checkpoint, a `.zip` bundle with `../` members — each refused with a UserError,
  and the marker file the payload would create never appears.
"""

from __future__ import annotations

import ast
import json
import pickle
import zipfile
from pathlib import Path

import pytest

from edgeseg.errors import UserError

PACKAGE = Path(__file__).resolve().parents[2] / "edgeseg"
SOURCES = sorted(PACKAGE.rglob("*.py"))
BANNED_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
SAFE_YAML = {"safe_load", "safe_load_all", "safe_dump", "safe_dump_all", "dump", "YAMLError"}


def _dotted(node: ast.AST) -> str:
    """`a.b.c` for Name/Attribute chains, '' otherwise."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else ""
    return ""


def _keyword(call: ast.Call, name: str) -> ast.AST | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def unsafe_calls(source: str, filename: str) -> list[str]:
    """Every construct that can unpickle, evaluate or extract, as 'file:line what'."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            found += [f"{where} import {a.name}" for a in node.names if a.name.split(".")[0] in BANNED_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in BANNED_MODULES:
            found.append(f"{where} from {node.module} import ...")
        elif isinstance(node, ast.Attribute) and _dotted(node).startswith("yaml.") and node.attr not in SAFE_YAML:
            found.append(f"{where} {_dotted(node)}")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            method = node.func.attr if isinstance(node.func, ast.Attribute) else ""
            if name in ("eval", "exec") or method in ("extractall", "extract"):
                found.append(f"{where} {name or method}()")
            elif name == "torch.load":
                flag = _keyword(node, "weights_only")
                if not (isinstance(flag, ast.Constant) and flag.value is True):
                    found.append(f"{where} torch.load without weights_only=True")
            elif name in ("np.load", "numpy.load"):
                flag = _keyword(node, "allow_pickle")
                if isinstance(flag, ast.Constant) and flag.value is True:
                    found.append(f"{where} {name}(allow_pickle=True)")
            elif name.endswith("torch.serialization.load"):
                found.append(f"{where} {name}")
    return found


def test_the_scan_finds_what_it_looks_for():
    """The scanner itself, on code that does every banned thing (so an empty result below means something)."""
    bad = ("import pickle\nfrom dill import loads\nimport yaml, torch, numpy as np, zipfile\n"
           "yaml.load(s)\nyaml.unsafe_load(s)\nyaml.load(s, Loader=yaml.Loader)\ntorch.load(p)\n"
           "torch.load(p, weights_only=False)\nnp.load(p, allow_pickle=True)\neval('1')\n"
           "zipfile.ZipFile(p).extractall(d)\n")
    found = unsafe_calls(bad, "bad.py")
    for what in ("import pickle", "from dill", "yaml.load", "yaml.unsafe_load", "yaml.Loader", "eval()",
                 "extractall", "allow_pickle=True"):
        assert any(what in f for f in found), (what, found)
    assert sum("torch.load without" in f for f in found) == 2
    ok = "import yaml, torch, numpy as np\nyaml.safe_load(s)\ntorch.load(p, weights_only=True)\nnp.load(p)\n"
    assert unsafe_calls(ok, "ok.py") == []


def test_no_pickle_eval_unsafe_yaml_or_extraction_in_edgeseg():
    assert len(SOURCES) > 40  # the scan really covers the package
    found = [f for path in SOURCES for f in unsafe_calls(path.read_text(encoding="utf-8"), str(path.relative_to(PACKAGE)))]
    assert found == []


class _Payload:
    """Unpickling this creates `marker` (what a malicious pickle would do, harmlessly)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


def test_yaml_tags_that_build_python_objects_are_refused(tmp_path):
    from edgeseg.config import load_experiment

    marker = tmp_path / "marker"
    config = tmp_path / "evil.yaml"
    config.write_text(f"train:\n  epochs: !!python/object/apply:pathlib.Path.touch [!!python/object/apply:pathlib.Path ['{marker}']]\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_experiment(config)
    assert not marker.exists()


def test_a_run_directory_config_with_python_tags_is_refused(tmp_path):
    from edgeseg.train.rundir import RunDir

    marker = tmp_path / "marker"
    (tmp_path / "config.yaml").write_text(f"!!python/object/apply:pathlib.Path.touch [!!python/object/apply:pathlib.Path ['{marker}']]\n")
    with pytest.raises(Exception) as info:  # yaml.safe_load refuses the tag (ConstructorError) before any call
        RunDir(tmp_path).read_config()
    assert "python/object" in str(info.value)
    assert not marker.exists()


@pytest.mark.parametrize("loader", ["load_weights", "load_training_state"])
def test_a_pickle_disguised_as_a_checkpoint_is_refused_unexecuted(tmp_path, loader):
    torch = pytest.importorskip("torch")
    from edgeseg.train import checkpoint

    marker = tmp_path / "marker"
    path = tmp_path / "best.safetensors"
    path.write_bytes(pickle.dumps({"state_dict": _Payload(marker)}))
    model = torch.nn.Linear(2, 2)
    args = (model,) if loader == "load_weights" else (model, torch.optim.SGD(model.parameters(), lr=0.1), None)
    with pytest.raises(UserError, match="not a readable checkpoint"):
        getattr(checkpoint, loader)(path, *args)
    assert not marker.exists()


def test_zip_bundles_are_read_by_name_and_never_extracted(kit, tmp_path):
    """A `../` member listed in the manifest is refused; an unlisted one is ignored; nothing lands on disk."""
    from edgeseg.runtime.bundle import load_bundle

    with zipfile.ZipFile(kit.archive) as good:
        members = {n: good.read(n) for n in good.namelist()}
    manifest = json.loads(members["manifest.json"])
    sandbox = tmp_path / "sandbox"
    sandbox.mkdir()

    extra = sandbox / "extra.zip"  # a valid bundle plus an unlisted ../evil member
    with zipfile.ZipFile(extra, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
        archive.writestr("../evil", b"outside")
        archive.writestr("/abs/evil", b"absolute")
    bundle = load_bundle(extra)
    assert set(bundle.manifest.files) == set(manifest["files"])

    listed = sandbox / "listed.zip"  # the manifest itself points outside the archive's root
    manifest["files"]["../evil"] = {"sha256": "0" * 64, "bytes": 7}
    with zipfile.ZipFile(listed, "w") as archive:
        archive.writestr("manifest.json", json.dumps(manifest))
        for name, data in members.items():
            if name != "manifest.json":
                archive.writestr(name, data)
        archive.writestr("../evil", b"outside")
    with pytest.raises(UserError, match="unsafe or reserved file name '../evil'"):
        load_bundle(listed)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["extra.zip", "listed.zip", "sandbox"]
