"""Bad input through the real command line: one clear line, a non-zero exit, nothing left behind.

Every case runs `edgeseg.cli.app.main` (the console script's entry point: it turns a UserError into
one `error:` line and exit code 2) in-process with its own argv, and checks:

- a non-zero exit code;
- stderr is exactly one non-empty line starting with "error:", and no "Traceback" anywhere;
- the expected fragment is in that line (so the message names what is wrong);
- nothing changed on disk: the listing and contents of the case's folder and of the shared fixtures
  are the same before and after (no partial output, no temporary file, no clobbered file).

Two cases also go through `python -m edgeseg` in a subprocess, to check that the in-process harness
sees what a user sees. Set EDGESEG_RELIABILITY_JSON=path to dump the observed messages and exit
codes (benchmarks/reliability_table.py renders them into docs/reliability.md).
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import traceback
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
OBSERVED: list[dict] = []


# ------------------------------------------------------------------------------------- harness


@dataclass
class Outcome:
    code: int
    stdout: str
    stderr: str

    @property
    def lines(self) -> list[str]:
        return [ln for ln in self.stderr.splitlines() if ln.strip()]


def run_main(args: list[str], capsys: pytest.CaptureFixture) -> Outcome:
    """`edgeseg ARGS` in-process through the console-script entry point; an escaping exception is
    printed as Python would (a traceback, exit code 1), so the checks see what a user would."""
    from edgeseg.cli.app import main

    capsys.readouterr()
    saved = sys.argv
    sys.argv = ["edgeseg", *map(str, args)]
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001 - an uncaught exception is exactly what the suite looks for
        sys.stderr.write(traceback.format_exc())
        code = 1
    finally:
        sys.argv = saved
    out, err = capsys.readouterr()
    return Outcome(code, out, err)


def listing(*roots: Path) -> dict[str, str]:
    """Every file (with its SHA-256) and folder under `roots`."""
    out = {}
    for root in roots:
        for path in sorted(root.rglob("*")):
            key = f"{root.name}/{path.relative_to(root)}"
            out[key] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "<dir>"
    return out


@dataclass
class Ctx:
    """What a case builds from: its own folder, the shared read-only kit, and monkeypatch for faults."""

    tmp: Path
    kit: types.SimpleNamespace
    monkeypatch: pytest.MonkeyPatch

    def copy(self, source: Path, name: str | None = None) -> Path:
        target = self.tmp / (name or source.name)
        if source.is_dir():
            shutil.copytree(source, target)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
        return target

    def dataset(self, name: str = "data") -> Path:
        return self.copy(self.kit.dataset, name)


@dataclass(frozen=True)
class Case:
    id: str
    command: str
    what: str  # the bad input, in words (for the table)
    build: Callable[[Ctx], list[str]]  # makes the bad input in ctx.tmp, returns argv
    expect: tuple[str, ...]  # fragments of the error line
    subprocess: bool = False  # also run through `python -m edgeseg`
    xfail: str = ""  # a known failure in code this suite may not change: what must change, and where


# ------------------------------------------------------------------------------------- bad files


def nifti(path: Path, array: np.ndarray, affine: np.ndarray | None = None, dtype=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = nib.Nifti1Image(array, np.eye(4) if affine is None else affine, dtype=dtype)
    image.to_filename(str(path))
    return path


def image_16(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(16, 16, 16)).astype(np.float32)


def header_dims(path: Path, dims: list[int]) -> Path:
    """A .nii.gz whose header says `dims` (data: a valid 4^3 volume); for absurd or zero sizes."""
    raw = bytearray(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)).to_bytes())
    raw[40:56] = struct.pack("<8h", len(dims), *dims, *[1] * (7 - len(dims)))
    path.write_bytes(gzip.compress(bytes(raw)))
    return path


def corrupt_nifti(path: Path) -> Path:
    path.write_bytes(np.random.default_rng(0).bytes(2048))
    return path


def truncated_nifti(path: Path, source: Path) -> Path:
    data = source.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def nan_nifti(path: Path, value: float) -> Path:
    array = image_16()
    array[3, 4, 5] = value
    return nifti(path, array)


def scaled_overflow_nifti(path: Path) -> Path:
    """int16 voxels whose scl_slope pushes them past the float32 range."""
    image = nib.Nifti1Image(np.full((16, 16, 16), 30000, np.int16), np.eye(4))
    image.header.set_slope_inter(1e36, 0)
    image.to_filename(str(path))
    return path


def replace_case(data: Path, which: str, array: np.ndarray, affine: np.ndarray | None = None, dtype=None) -> None:
    """Replace phantom_000's image or label in a copied dataset."""
    nifti(data / which / "phantom_000.nii.gz", array, affine, dtype)


def first_test_case(data: Path) -> str:
    """A case of the test split of the phantom dataset (what `evaluate --split test` reads)."""
    return json.loads((data / "splits.json").read_text())["test"][0]


def edit_manifest(bundle: Path, **changes) -> Path:
    path = bundle / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest.update(changes)
    path.write_text(json.dumps(manifest))
    return bundle


def disk_full(ctx: Ctx) -> None:
    """Every fsync fails with ENOSPC, as a full disk makes the flush of buffered data fail."""
    def fsync(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    ctx.monkeypatch.setattr(os, "fsync", fsync)


def fake_tensorrt(ctx: Ctx, built_for: dict) -> Path:
    """A bundle with a cached engine whose record says it was built for `built_for` (TensorRT, GPU),
    under the file name this machine's TensorRT 10.3 / Orin would look for (e.g. copied from another device)."""
    from edgeseg.runtime import trt_build
    from edgeseg.runtime.bundle import load_bundle

    gpu = trt_build.GpuInfo(name="Orin (nvgpu)", compute_capability="8.7")
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.3.0.30"
    trt.Builder = object
    cudart = types.ModuleType("cuda.bindings.runtime")
    ctx.monkeypatch.setitem(sys.modules, "tensorrt", trt)
    ctx.monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", cudart)
    ctx.monkeypatch.setattr(trt_build, "detect_gpu", lambda: gpu)
    bundle = ctx.copy(ctx.kit.bundle)
    loaded = load_bundle(bundle)
    form = loaded.manifest.pick_form("tensorrt")
    digest = trt_build.sha256_hex(loaded.model_bytes(form))
    engine = trt_build.engine_dir(bundle) / trt_build.engine_file_name(form, digest, 1, ctx.kit.tile, trt.__version__, gpu)
    engine.parent.mkdir()
    engine.write_bytes(b"serialized engine of another device")
    engine.with_name(engine.name + ".json").write_text(json.dumps(built_for))
    return bundle


def report_config(ctx: Ctx) -> Path:
    path = ctx.tmp / "exp.yaml"
    path.write_text(f"data:\n  root: {ctx.kit.dataset}\n  class_names: [background, sphere, blob]\n"
                    "  patch_size: [16, 16, 16]\nmodel:\n  depth: 1\n  base_width: 2\n")
    return path


def yaml_config(ctx: Ctx, text: str) -> Path:
    path = ctx.tmp / "exp.yaml"
    path.write_text(text)
    return path


TINY_DATA = "data:\n  patch_size: [16, 16, 16]\n  class_names: [background, sphere, blob]\n  root: {root}\n"


# ------------------------------------------------------------------------------------- the cases


def _segment(ctx: Ctx, image: Path, *extra: str) -> list[str]:
    return ["segment", ctx.kit.bundle, image, "--out", ctx.tmp / "masks", "--backend", "onnxruntime", *extra]


def _evaluate_bundle(ctx: Ctx, data: Path, *extra: str) -> list[str]:
    return ["evaluate", ctx.kit.bundle, "--data", data, "--split", "test", *extra]


def _bad_test_label(ctx: Ctx, array: np.ndarray, affine=None, dtype=None) -> Path:
    data = ctx.dataset()
    nifti(data / "labels" / first_test_case(data), array, affine, dtype)
    return data


def _bad_image(ctx: Ctx, write: Callable[[Path], object], suffix: str = ".nii.gz",
               label: np.ndarray | None = None) -> list[str]:
    """`evaluate BUNDLE --data` on a copied dataset whose test case's image is replaced by what `write` makes
    (the runtime's reading path: `edgeseg segment` reads volumes the same way, one case at a time)."""
    data = ctx.dataset()
    name = first_test_case(data)
    (data / "images" / name).unlink()
    stem = name.removesuffix(".nii.gz")
    write(data / "images" / f"{stem}{suffix}")
    if label is not None:
        nifti(data / "labels" / name, label)
    splits = json.loads((data / "splits.json").read_text())
    splits["test"] = [stem if n == name else n for n in splits["test"]]
    (data / "splits.json").write_text(json.dumps(splits))
    return _evaluate_bundle(ctx, data)


def _json_disk_full(ctx: Ctx) -> list[str]:
    disk_full(ctx)
    return _evaluate_bundle(ctx, ctx.kit.dataset, "--json", ctx.tmp / "metrics.json")


def _existing_json(ctx: Ctx) -> list[str]:
    (ctx.tmp / "metrics.json").write_text('{"earlier": true}\n')
    return _evaluate_bundle(ctx, ctx.kit.dataset, "--json", ctx.tmp / "metrics.json")


def _json_is_input(ctx: Ctx) -> list[str]:
    bundle = ctx.copy(ctx.kit.bundle)
    return ["evaluate", bundle, "--data", ctx.kit.dataset, "--json", bundle / "manifest.json", "--overwrite"]


def _modified_onnx(ctx: Ctx) -> list[str]:
    bundle = ctx.copy(ctx.kit.bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    weights = next(name for name in manifest["files"] if name != manifest["forms"]["float"]["file"])
    data = bytearray((bundle / weights).read_bytes())
    data[-1] ^= 0x01  # one bit of one weight
    (bundle / weights).write_bytes(bytes(data))
    return ["segment", bundle, ctx.kit.image, "--out", ctx.tmp / "masks"]


def _engine_mismatch(ctx: Ctx) -> list[str]:
    bundle = fake_tensorrt(ctx, {"tensorrt": "8.6.1", "gpu": {"name": "NVIDIA GeForce RTX 3090",
                                                              "compute_capability": "8.6"}})
    return ["segment", bundle, ctx.kit.image, "--out", ctx.tmp / "masks", "--backend", "tensorrt"]


def _engine_record_damaged(ctx: Ctx) -> list[str]:
    bundle = fake_tensorrt(ctx, {})
    record = next((bundle / "engines").glob("*.json"))
    record.write_text('{"tensorrt": "10.3.0.30", "gpu": ')  # cut short by a crash or a bad copy
    return ["segment", bundle, ctx.kit.image, "--out", ctx.tmp / "masks", "--backend", "tensorrt"]


def _zip_member_traversal(ctx: Ctx) -> list[str]:
    import zipfile

    archive = ctx.tmp / "evil.zip"
    with zipfile.ZipFile(ctx.kit.archive) as good, zipfile.ZipFile(archive, "w") as bad:
        manifest = json.loads(good.read("manifest.json"))
        for name in good.namelist():
            if name != "manifest.json":
                bad.writestr("../" + name, good.read(name))
        manifest["files"] = {"../" + k: v for k, v in manifest["files"].items()}
        manifest["forms"]["float"]["file"] = "../" + manifest["forms"]["float"]["file"]
        bad.writestr("manifest.json", json.dumps(manifest))
    return ["segment", archive, ctx.kit.image, "--out", ctx.tmp / "masks"]


def _bundle_out_is_input(ctx: Ctx) -> list[str]:
    model = ctx.copy(ctx.kit.onnx)
    return ["bundle", "--onnx", model, "--out", model, "--classes", "background,sphere,blob", "--tile", "16,16,16",
            "--overwrite"]


def _bundle_out_is_input_folder(ctx: Ctx) -> list[str]:
    model = ctx.copy(ctx.kit.onnx, "models/m.onnx")
    (ctx.tmp / "models" / "notes.txt").write_text("not a bundle: must survive --overwrite")
    return ["bundle", "--onnx", model, "--out", ctx.tmp / "models", "--classes", "background,sphere,blob",
            "--tile", "16,16,16", "--overwrite"]


def _bundle_disk_full(ctx: Ctx) -> list[str]:
    disk_full(ctx)
    return ["bundle", "--onnx", ctx.kit.onnx, "--out", ctx.tmp / "b", "--classes", "background,sphere,blob",
            "--tile", "16,16,16"]


def _report_overwrite_foreign(ctx: Ctx) -> list[str]:
    (ctx.tmp / "home").mkdir()
    (ctx.tmp / "home" / "thesis.tex").write_text("years of work")
    return ["report", "--out", ctx.tmp / "home", "--bundles", ctx.kit.bundle, "--data", ctx.kit.dataset, "--overwrite",
            "--no-memory"]


def _train_existing(ctx: Ctx) -> list[str]:
    run = ctx.copy(ctx.kit.run)
    return ["train", ctx.copy(ctx.kit.run / "config.yaml", "exp.yaml"), "--out", run]


def _train_2d_data(ctx: Ctx) -> list[str]:
    from edgeseg.data.phantoms import write_phantom_dataset

    data = write_phantom_dataset(ctx.tmp / "em", n_cases=3, shape=(16, 16), seed=0)
    return ["train", yaml_config(ctx, TINY_DATA.format(root=data)), "--out", ctx.tmp / "run"]


def _train_empty_data(ctx: Ctx) -> list[str]:
    (ctx.tmp / "empty").mkdir()
    return ["train", yaml_config(ctx, TINY_DATA.format(root=ctx.tmp / "empty")), "--out", ctx.tmp / "run"]


def _train_bad_label(ctx: Ctx) -> list[str]:
    data = ctx.dataset()
    for label in (data / "labels").iterdir():
        array = np.asarray(nib.load(str(label)).dataobj)
        nifti(label, np.where(array == 2, 7, array).astype(np.uint8))
    return ["train", yaml_config(ctx, TINY_DATA.format(root=data)), "--out", ctx.tmp / "run"]


def _quantize_existing(ctx: Ctx) -> list[str]:
    (ctx.tmp / "q").mkdir()
    (ctx.tmp / "q" / "config.yaml").write_text("an earlier quantized run\n")
    return ["quantize", ctx.kit.run, "--out", ctx.tmp / "q", "--bits", "8/8", "--epochs", "0"]


def _export_existing(ctx: Ctx) -> list[str]:
    (ctx.tmp / "b").mkdir()
    (ctx.tmp / "b" / "manifest.json").write_text("{}")
    return ["export", ctx.kit.run, "--out", ctx.tmp / "b"]


def _export_out_is_run(ctx: Ctx) -> list[str]:
    run = ctx.copy(ctx.kit.run)
    return ["export", run, "--out", run, "--overwrite"]


def a_file(ctx: Ctx) -> Path:
    (ctx.tmp / "file").write_text("a file, not a folder")
    return ctx.tmp / "file"


def shifted(mm: float) -> np.ndarray:
    affine = np.eye(4)
    affine[0, 3] = mm
    return affine


def _export_unwritable(ctx: Ctx) -> list[str]:
    return ["export", ctx.kit.run, "--out", a_file(ctx) / "bundle"]


def _no_tensorrt(ctx: Ctx) -> list[str]:
    ctx.monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError
    return ["build-engine", ctx.copy(ctx.kit.bundle)]


def _damaged_last_checkpoint(ctx: Ctx, damage: str) -> list[str]:
    run = ctx.copy(ctx.kit.run)
    best = (run / "checkpoints" / "best.safetensors").read_bytes()
    last = run / "checkpoints" / "last.safetensors"
    last.write_bytes(best[: len(best) // 2] if damage == "truncated" else b"PK\x03\x04" + bytes(60))
    return ["train", run / "config.yaml", "--out", run, "--resume"]


def _manifest_not_json(ctx: Ctx) -> list[str]:
    bundle = ctx.copy(ctx.kit.bundle)
    (bundle / "manifest.json").write_text("{oops")
    return ["segment", bundle, ctx.kit.image, "--out", ctx.tmp / "masks"]


def _run_on_corrupt_data(ctx: Ctx) -> list[str]:
    data = ctx.dataset()
    corrupt_nifti(data / "images" / first_test_case(data))
    return ["evaluate", ctx.kit.run, "--data", data]


def _run_config_not_yaml(ctx: Ctx) -> list[str]:
    run = ctx.copy(ctx.kit.run)
    (run / "config.yaml").write_text("data: [unclosed\n")
    return ["evaluate", run, "--data", ctx.kit.dataset]


CASES = [
    # --- segment: unreadable and malformed images
    Case("corrupt-nifti", "evaluate", "random bytes named .nii.gz",
         lambda c: _bad_image(c, corrupt_nifti), ("not a readable NIfTI image",), subprocess=True),
    Case("truncated-nifti", "evaluate", "a .nii.gz cut in half",
         lambda c: _bad_image(c, lambda p: truncated_nifti(p, c.kit.image)), ("corrupt or truncated",)),
    Case("png-not-an-image", "evaluate", "a text file named .png",
         lambda c: _bad_image(c, lambda p: p.write_text("hello"), ".png"), ("not a readable image",)),
    Case("2d-for-3d-model", "evaluate", "a 2D NIfTI (and label) for a 3D model",
         lambda c: _bad_image(c, lambda p: nifti(p, image_16()[0]), label=np.zeros((16, 16), np.uint8)), ("a 2D image, but the bundle's model is 3D",)),
    Case("5d-volume", "evaluate", "a 5D NIfTI (8x8x8x2x2)",
         lambda c: _bad_image(c, lambda p: nifti(p, np.zeros((8, 8, 8, 2, 2), np.float32))), ("5D data",)),
    Case("zero-sized-dim", "evaluate", "header dims 16x0x16",
         lambda c: _bad_image(c, lambda p: header_dims(p, [16, 0, 16])), ("zero-sized image",)),
    Case("absurd-header-dims", "evaluate", "header dims 30000^3",
         lambda c: _bad_image(c, lambda p: header_dims(p, [30000, 30000, 30000])), ("implausible image size",)),
    Case("nan-intensity", "evaluate", "one NaN voxel",
         lambda c: _bad_image(c, lambda p: nan_nifti(p, np.nan)), ("NaN or Inf",)),
    Case("inf-intensity", "evaluate", "one +Inf voxel",
         lambda c: _bad_image(c, lambda p: nan_nifti(p, np.inf)), ("NaN or Inf",)),
    Case("scaled-int-overflow", "evaluate", "int16 voxels x scl_slope 1e36 (beyond float32)",
         lambda c: _bad_image(c, scaled_overflow_nifti), ("float32 range",)),
    Case("empty-input-folder", "segment", "an input folder without images",
         lambda c: _segment(c, (c.tmp / "in").mkdir() or c.tmp / "in"), ("no image files in this folder",)),
    # --- segment: options
    Case("negative-overlap", "segment", "--overlap -0.5",
         lambda c: _segment(c, c.kit.image, "--overlap", "-0.5"), ("--overlap must be within [0, 1)",)),
    Case("overlap-one", "segment", "--overlap 1",
         lambda c: _segment(c, c.kit.image, "--overlap", "1"), ("--overlap must be within [0, 1)",)),
    Case("zero-tile", "segment", "--tile 0,16,16",
         lambda c: _segment(c, c.kit.image, "--tile", "0,16,16"), ("sizes must be positive",)),
    Case("negative-tile", "segment", "--tile -16,16,16",
         lambda c: _segment(c, c.kit.image, "--tile", "-16,16,16"), ("sizes must be positive",)),
    Case("tile-wrong-rank", "segment", "--tile 16,16 for a 3D model",
         lambda c: _segment(c, c.kit.image, "--tile", "16,16"), ("needs 3 values",)),
    # --- segment: outputs
    Case("output-is-input", "segment", "--out is the input folder (with --overwrite)",
         lambda c: ["segment", c.kit.bundle, c.copy(c.kit.image, "in/x.nii.gz"), "--out", c.tmp / "in", "--overwrite"],
         ("would replace an input file",)),
    Case("unwritable-output", "evaluate", "--json below a regular file",
         lambda c: _evaluate_bundle(c, c.kit.dataset, "--json", a_file(c) / "metrics.json"), ("is a file, not a folder",)),
    Case("disk-full", "evaluate", "no space left while writing --json", _json_disk_full, ("No space left on device",)),
    # --- bundles
    Case("modified-onnx", "segment", "one bit of the bundle's weights flipped", _modified_onnx,
         ("does not match its SHA-256",)),
    Case("newer-schema", "segment", "manifest schema_version 99",
         lambda c: ["segment", edit_manifest(c.copy(c.kit.bundle), schema_version=99), c.kit.image, "--out",
                    c.tmp / "masks"], ("newer than this edgeseg",)),
    Case("manifest-not-json", "segment", "manifest.json that is not JSON",
         _manifest_not_json, ("not valid JSON",)),
    Case("zip-path-traversal", "segment", "a .zip bundle whose members are named ../x", _zip_member_traversal,
         ("unsafe or reserved file name",)),
    Case("engine-other-trt-gpu", "segment", "cached engine built for TensorRT 8.6 on an RTX 3090", _engine_mismatch,
         ("was built for TensorRT 8.6.1",)),
    Case("engine-record-damaged", "segment", "engine's .json record cut short", _engine_record_damaged,
         ("engine record",)),
    Case("bundle-onnx-garbage", "bundle", "--onnx: random bytes",
         lambda c: ["bundle", "--onnx", corrupt_nifti(c.tmp / "m.onnx"), "--out", c.tmp / "b", "--classes", "a,b,c"],
         ("not a valid ONNX model",)),
    Case("bundle-classes-mismatch", "bundle", "--classes with 2 names for 3 output channels",
         lambda c: ["bundle", "--onnx", c.kit.onnx, "--out", c.tmp / "b", "--classes", "a,b", "--tile", "16,16,16"],
         ("one channel per --classes name",)),
    Case("bundle-out-is-input", "bundle", "--out is the --onnx file (with --overwrite)", _bundle_out_is_input,
         ("would replace",)),
    Case("bundle-out-is-input-folder", "bundle", "--out is the folder holding --onnx (with --overwrite)",
         _bundle_out_is_input_folder, ("would replace",)),
    Case("bundle-disk-full", "bundle", "no space left while writing the bundle", _bundle_disk_full,
         ("No space left on device",)),
    Case("bundle-zero-tile", "bundle", "--tile 0,16,16",
         lambda c: ["bundle", "--onnx", c.kit.onnx, "--out", c.tmp / "b", "--classes", "a,b,c", "--tile", "0,16,16"],
         ("sizes must be positive",)),
    # --- evaluate
    Case("label-outside-classes", "evaluate", "label value 7 with 3 classes",
         lambda c: _evaluate_bundle(c, _bad_test_label(c, np.full((16, 16, 16), 7, np.uint8))),
         ("outside the class list",)),
    Case("label-shape-mismatch", "evaluate", "label 16x16x12 for a 16^3 image",
         lambda c: _evaluate_bundle(c, _bad_test_label(c, np.zeros((16, 16, 12), np.uint8))),
         ("does not match the image shape",)),
    Case("label-affine-mismatch", "evaluate", "label shifted by 5 mm",
         lambda c: _evaluate_bundle(c, _bad_test_label(c, np.zeros((16, 16, 16), np.uint8), affine=shifted(5.0))),
         ("affine differs",)),
    Case("label-uint64-overflow", "evaluate", "uint64 label value 2^63 + 5",
         lambda c: _evaluate_bundle(c, _bad_test_label(c, np.full((16, 16, 16), 2**63 + 5, np.uint64),
                                                       dtype=np.uint64)),
         ("too large to be a class index",)),
    Case("label-fractional", "evaluate", "float label 0.5",
         lambda c: _evaluate_bundle(c, _bad_test_label(c, np.full((16, 16, 16), 0.5, np.float32))),
         ("not integers",)),
    Case("evaluate-empty-data", "evaluate", "--data: an empty folder",
         lambda c: _evaluate_bundle(c, (c.tmp / "empty").mkdir() or c.tmp / "empty"), ("no cases found",)),
    Case("evaluate-json-exists", "evaluate", "--json file exists, no --overwrite", _existing_json,
         ("already exists",)),
    Case("evaluate-json-is-input", "evaluate", "--json is the bundle's manifest.json (with --overwrite)",
         _json_is_input, ("would replace",)),
    Case("evaluate-run-corrupt-image", "evaluate", "a run evaluated on data with a corrupt test image",
         _run_on_corrupt_data, ("not a readable NIfTI image",)),
    # --- train
    Case("unknown-config-key", "train", "train.epoch (typo) in the YAML",
         lambda c: ["train", yaml_config(c, "train:\n  epoch: 3\n"), "--out", c.tmp / "run"],
         ("unknown config key 'train.epoch'",)),
    Case("wrong-config-type", "train", "train.epochs: three",
         lambda c: ["train", yaml_config(c, "train:\n  epochs: three\n"), "--out", c.tmp / "run"],
         ("expected an integer",)),
    Case("wrong-set-type", "train", "--set model.dropout=[0.1]",
         lambda c: ["train", REPO / "configs" / "demo.yaml", "--out", c.tmp / "run", "--set", "model.dropout=[0.1]"],
         ("expected a number",)),
    Case("config-not-yaml", "train", "a config file that is not YAML",
         lambda c: ["train", yaml_config(c, "data: [unclosed\n"), "--out", c.tmp / "run"], ("not valid YAML",)),
    Case("config-not-mapping", "train", "a YAML list at the top level",
         lambda c: ["train", yaml_config(c, "- 1\n- 2\n"), "--out", c.tmp / "run"], ("must be a mapping",)),
    Case("train-existing-run", "train", "--out holds a run, no --resume", _train_existing, ("already holds a run",)),
    Case("train-resume-nothing", "train", "--resume on an empty folder",
         lambda c: ["train", REPO / "configs" / "demo.yaml", "--out", (c.tmp / "run").mkdir() or c.tmp / "run",
                    "--resume"], ("nothing to resume",)),
    Case("resume-truncated-checkpoint", "train", "--resume with last.safetensors cut in half",
         lambda c: _damaged_last_checkpoint(c, "truncated"), ("not a readable checkpoint",)),
    Case("resume-garbage-checkpoint", "train", "--resume with last.safetensors replaced by other bytes",
         lambda c: _damaged_last_checkpoint(c, "garbage"), ("not a readable checkpoint",)),
    Case("train-empty-data", "train", "data.root: an empty folder", _train_empty_data, ("no cases found",)),
    Case("train-2d-data-3d-model", "train", "2D PNG data with data.spatial_dims 3", _train_2d_data,
         ("the data is 2D",)),
    Case("train-label-outside-classes", "train", "label value 7 with 3 classes", _train_bad_label,
         ("outside the class list",)),
    # --- quantize / export / report
    Case("bits-4-9", "quantize", "--bits 4/9",
         lambda c: ["quantize", c.kit.run, "--out", c.tmp / "q", "--bits", "4/9"], ("activation bits must be within 2..8",)),
    Case("bits-garbage", "quantize", "--bits four",
         lambda c: ["quantize", c.kit.run, "--out", c.tmp / "q", "--bits", "four"], ("expected W/A",)),
    Case("quantize-out-is-run", "quantize", "--out is the float run",
         lambda c: ["quantize", c.kit.run, "--out", c.kit.run, "--bits", "8/8"], ("must differ",)),
    Case("quantize-existing", "quantize", "--out holds a quantized run", _quantize_existing, ("already holds a run",)),
    Case("quantize-unknown-key", "quantize", "--set quant.bitz=4/4",
         lambda c: ["quantize", c.kit.run, "--out", c.tmp / "q", "--set", "quant.bitz=4/4"],
         ("unknown config key 'quant.bitz'",)),
    Case("export-existing", "export", "--out exists, no --overwrite", _export_existing, ("already exists",)),
    Case("export-out-is-run", "export", "--out is the run directory (with --overwrite)", _export_out_is_run,
         ("would replace",)),
    Case("export-unwritable", "export", "--out below a regular file", _export_unwritable, ("is a file, not a folder",)),
    Case("export-zero-tile", "export", "--tile 0,16,16",
         lambda c: ["export", c.kit.run, "--out", c.tmp / "b", "--tile", "0,16,16"], ("sizes must be positive",)),
    Case("export-not-a-run", "export", "a bundle given as the run directory",
         lambda c: ["export", c.kit.bundle, "--out", c.tmp / "b"], ("not an edgeseg run directory",)),
    Case("zip-not-a-zip", "segment", "a bundle.zip of random bytes",
         lambda c: ["segment", corrupt_nifti(c.tmp / "bundle.zip"), c.kit.image, "--out", c.tmp / "masks"],
         ("not a bundle directory or .zip archive",)),
    Case("build-engine-no-tensorrt", "build-engine", "no TensorRT installed on this machine", _no_tensorrt,
         ("TensorRT is not available",)),
    Case("evaluate-unknown-split", "evaluate", "--split tset",
         lambda c: _evaluate_bundle(c, c.kit.dataset)[:-2] + ["--split", "tset"], ("unknown split 'tset'",)),
    Case("run-config-not-yaml", "evaluate", "a run directory whose config.yaml is not YAML", _run_config_not_yaml,
         ("not valid YAML",)),
    Case("report-bits-9-4", "report", "--bits fp32,9/4",
         lambda c: ["report", "--out", c.tmp / "r", "--bits", "fp32,9/4", "--config", report_config(c)],
         ("weight bits must be within 2..8",)),
    Case("report-overwrite-foreign", "report", "--out is a folder that is no report (with --overwrite)",
         _report_overwrite_foreign, ("not an edgeseg report folder",)),
    Case("report-missing-bundle", "report", "--bundles names a missing path",
         lambda c: ["report", "--out", c.tmp / "r", "--bundles", c.tmp / "nope"], ("bundle not found",)),
]


@pytest.fixture(scope="module", autouse=True)
def dump_observed():
    yield
    target = os.environ.get("EDGESEG_RELIABILITY_JSON")
    if target:
        Path(target).write_text(json.dumps(OBSERVED, indent=2) + "\n")


def _display(text: str, ctx: Ctx) -> str:
    return text.replace(str(ctx.tmp), "<tmp>").replace(str(ctx.kit.root), "<kit>").replace(str(REPO), "<repo>")


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=[pytest.mark.xfail(reason=c.xfail, strict=True)]
                                                  if c.xfail else []) for c in CASES])
def test_bad_input_is_one_line_and_leaves_nothing(case: Case, kit, tmp_path, monkeypatch, capsys):
    work = tmp_path / "case"
    work.mkdir()
    ctx = Ctx(work, kit, monkeypatch)
    args = [str(a) for a in case.build(ctx)]
    before = listing(work, kit.root)
    outcome = run_main(args, capsys)
    monkeypatch.undo()  # fault injections end with the command
    after = listing(work, kit.root)
    OBSERVED.append({"id": case.id, "command": case.command, "what": case.what, "xfail": case.xfail,
                     "argv": [_display(a, ctx) for a in args], "exit_code": outcome.code,
                     "stderr": _display(outcome.stderr.strip(), ctx), "unchanged_on_disk": before == after})
    assert "Traceback" not in outcome.stdout + outcome.stderr, outcome.stderr
    assert outcome.code != 0, outcome.stdout
    assert len(outcome.lines) == 1 and outcome.lines[0].startswith("error:"), outcome.stderr
    for fragment in case.expect:
        assert fragment in outcome.lines[0], outcome.lines[0]
    added = sorted(set(after) - set(before))
    removed = sorted(set(before) - set(after))
    changed = sorted(k for k in set(before) & set(after) if before[k] != after[k])
    assert (added, removed, changed) == ([], [], []), "left on disk"


SUBPROCESS_CASES = [c for c in CASES if c.subprocess]


@pytest.mark.parametrize("case", SUBPROCESS_CASES, ids=[c.id for c in SUBPROCESS_CASES])
def test_the_console_script_prints_the_same_line(case: Case, kit, tmp_path, monkeypatch, capsys):
    """`python -m edgeseg` (a real process) gives the exit code and line the in-process harness sees."""
    ctx_a, ctx_b = (Ctx(tmp_path / n, kit, monkeypatch) for n in ("a", "b"))
    for ctx in (ctx_a, ctx_b):
        ctx.tmp.mkdir()
    inprocess = run_main([str(a) for a in case.build(ctx_a)], capsys)
    args = [str(a) for a in case.build(ctx_b)]
    result = subprocess.run([sys.executable, "-m", "edgeseg", *args], check=False, capture_output=True, text=True,
                            timeout=120,
                            env={**os.environ, "COLUMNS": "400"})
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in result.stderr
    assert result.returncode == inprocess.code != 0
    assert len(lines) == 1
    assert _display(lines[0], ctx_b) == _display(inprocess.lines[0], ctx_a)


def test_a_bad_volume_in_a_segment_batch_fails_alone(kit, tmp_path, capsys):
    """`edgeseg segment` over many volumes keeps going past a bad one: the good masks are written whole,
    the bad case leaves no file, the run exits 1 naming it, and a re-run keeps the finished masks."""
    from edgeseg.runtime.batch import SUMMARY_FILE

    inputs, out = tmp_path / "in", tmp_path / "masks"
    inputs.mkdir()
    shutil.copy2(kit.image, inputs / "good.nii.gz")
    corrupt_nifti(inputs / "bad.nii.gz")
    args = ["segment", kit.bundle, inputs, "--out", out, "--backend", "onnxruntime"]
    first = run_main(args, capsys)
    assert first.code == 1 and "Traceback" not in first.stdout + first.stderr
    assert any(ln.strip().startswith("failed bad.nii.gz:") and "not a readable NIfTI image" in ln
               for ln in first.stdout.splitlines()), first.stdout
    assert sorted(p.name for p in out.iterdir()) == ["good.nii.gz", SUMMARY_FILE]  # nothing partial, no temporary
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert "bad.nii.gz" in json.dumps(summary) and "failed" in json.dumps(summary)
    mask = nib.load(str(out / "good.nii.gz"))
    assert mask.shape == nib.load(str(kit.image)).shape
    kept = (out / "good.nii.gz").read_bytes()
    second = run_main(args, capsys)
    assert second.code == 1 and (out / "good.nii.gz").read_bytes() == kept
