"""Fixtures of the reliability suite: a tiny dataset, bundle and run, made once per session.

- `dataset`: a "pairs" phantom dataset (4 cases of 16^3 voxels, 3 classes, splits.json);
- `bundle`: a float 3D bundle wrapping one 3x3x3 convolution (1 -> 3 channels, tile 16^3), made by
  `edgeseg bundle`'s code path (`make_bundle`, no torch), as a directory and as a `.zip`;
- `run_dir`: a float run directory as `edgeseg train` leaves it (config.yaml, run.json,
  checkpoints/best.safetensors of an untrained depth-1 U-Net; no training needed for bad-input cases).

Tests must treat all of them as read-only: a case copies what it mutates into its own tmp_path.
"""

from __future__ import annotations

import types
from pathlib import Path

import numpy as np
import pytest

CLASSES = ["background", "sphere", "blob"]
TILE = [16, 16, 16]


def conv_onnx(path: Path, classes: int = len(CLASSES), seed: int = 0) -> Path:
    """A one-convolution ONNX segmentation model: image (N, 1, D, H, W) -> logits (N, classes, D, H, W)."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto as T
    from onnx import helper, numpy_helper

    weight = np.random.default_rng(seed).normal(size=(classes, 1, 3, 3, 3)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("Conv", ["image", "w"], ["logits"], pads=[1] * 6)], "g",
                              [helper.make_tensor_value_info("image", T.FLOAT, ["N", 1, "D", "H", "W"])],
                              [helper.make_tensor_value_info("logits", T.FLOAT, ["N", classes, "D", "H", "W"])],
                              [numpy_helper.from_array(weight, "w")])
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def tiny_run(root: Path, data_root: Path) -> Path:
    """A float run directory of an untrained depth-1 U-Net (what `edgeseg train` writes, minus training)."""
    from edgeseg.config import load_experiment
    from edgeseg.nets import build_from_config
    from edgeseg.train.checkpoint import save_weights
    from edgeseg.train.rundir import RunDir, RunInfo
    from edgeseg.train.setup import preprocess_spec

    cfg = load_experiment(None, [f"data.root={data_root}", f"data.class_names=[{', '.join(CLASSES)}]",
                                 "data.patch_size=[16, 16, 16]", "model.depth=1", "model.base_width=2",
                                 "train.epochs=1", "train.steps_per_epoch=1", "train.batch_size=1",
                                 "quant.epochs=0", "quant.calibration_batches=1"])
    run = RunDir(root)
    root.mkdir(parents=True)
    run.write_config(cfg)
    run.write_info(RunInfo(spatial_dims=3, in_channels=1, class_names=list(CLASSES), patch_size=list(TILE),
                           tile_size=list(TILE), preprocess=preprocess_spec(cfg).to_dict(), data_root=str(data_root)))
    model = build_from_config(cfg.model, spatial_dims=3, in_channels=1, out_channels=len(CLASSES))
    save_weights(run.best, model.eval(), {"epoch": 0, "val_dice": None})
    return root


@pytest.fixture(scope="session")
def kit(tmp_path_factory) -> types.SimpleNamespace:
    """Everything the bad-input cases start from (read-only; see the module docstring)."""
    from edgeseg.data.phantoms import write_phantom_dataset
    from edgeseg.export.third_party import make_bundle

    root = tmp_path_factory.mktemp("reliability_kit")
    dataset = write_phantom_dataset(root / "data", n_cases=4, shape=(16, 16, 16), seed=0, num_classes=len(CLASSES))
    model = conv_onnx(root / "model.onnx")
    bundle = root / "bundle"
    make_bundle(model, bundle, class_names=CLASSES, tile=TILE)
    archive = root / "bundle.zip"
    make_bundle(model, archive, class_names=CLASSES, tile=TILE)
    run = tiny_run(root / "run", dataset)
    image = dataset / "images" / "phantom_000.nii.gz"
    return types.SimpleNamespace(root=root, dataset=dataset, onnx=model, bundle=bundle, archive=archive, run=run,
                                 image=image, label=dataset / "labels" / "phantom_000.nii.gz", classes=CLASSES,
                                 tile=TILE)
