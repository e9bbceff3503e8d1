"""The report's example slice: one test case segmented through the runtime with flip TTA (and MC
dropout where the bundle has it), drawn as image | mask overlay | voxel-wise entropy.

Torch-free, like the rest of the report's evaluation: the figure shows what the device delivers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeseg.errors import UserError

EXAMPLE_PNG = "example_slice.png"
MC_PASSES = 2  # with flip TTA: 2 x 2**dims samples, enough for an entropy map and cheap on a CPU


@dataclass(frozen=True)
class ExampleSlice:
    """One 2D slice of a segmented case: intensities, labels and entropy (nats) on the input grid."""

    setting: str
    case: str
    axis: int | None  # None for a 2D image
    index: int | None
    image: np.ndarray  # (H, W) float
    labels: np.ndarray  # (H, W) int
    uncertainty: np.ndarray  # (H, W) float32
    class_names: list[str]
    samples: int


def busiest_slice(labels: np.ndarray, axis: int) -> int:
    """Index along `axis` of the slice with the most foreground voxels (the middle one if none has any)."""
    other = tuple(a for a in range(labels.ndim) if a != axis)
    counts = np.count_nonzero(labels, axis=other)
    return int(np.argmax(counts)) if counts.any() else labels.shape[axis] // 2


def segment_example(setting: str, bundle_path: Path, data: Path, split: str = "test", *, layout: str = "auto",
                    splits_file: str | None = "splits.json", seed: int = 0,
                    label_suffixes: Sequence[str] | None = None) -> ExampleSlice:
    """Segment the first labelled case of the split with TTA (+ MC dropout) and cut its busiest slice."""
    from edgeseg.data.discovery import discover_cases, load_splits
    from edgeseg.data.io import read_image
    from edgeseg.runtime.backends import open_backend
    from edgeseg.runtime.bundle import load_bundle
    from edgeseg.runtime.pipeline import prepare, segment_prepared

    bundle = load_bundle(bundle_path)
    manifest = bundle.manifest
    cases = discover_cases(Path(data), layout, label_suffixes=label_suffixes)
    refs = cases if split == "all" else load_splits(Path(data), splits_file, cases, seed=seed).get(split, [])
    if not refs:
        raise UserError(f"{data}: no cases in the '{split}' split for the example slice")
    ref = refs[0]
    volume = read_image(list(ref.images))
    mc = MC_PASSES if manifest.mc_available else 0
    tta_axes = list(range(manifest.spatial_dims))
    engine = open_backend(bundle, "auto", mc=mc > 0, batch_size=manifest.batch)
    try:
        seg = segment_prepared(prepare(volume, manifest, str(ref.images[0])), manifest, engine, tta_axes=tta_axes,
                               mc_passes=mc, uncertainty=True, batch_size=manifest.batch)
    finally:
        engine.close()
    image = volume.array if volume.array.ndim == seg.labels.ndim else volume.array[0]  # first channel
    assert seg.uncertainty is not None  # uncertainty=True with >= 2 samples
    axis = index = None
    labels, entropy = seg.labels, seg.uncertainty
    if labels.ndim == 3:
        axis = 2
        index = busiest_slice(labels, axis)
        image, labels, entropy = (np.take(a, index, axis=axis) for a in (image, labels, entropy))
    return ExampleSlice(setting=setting, case=ref.name, axis=axis, index=index, image=np.asarray(image, float),
                        labels=np.asarray(labels), uncertainty=np.asarray(entropy, np.float32),
                        class_names=list(manifest.class_names), samples=seg.sampling.num_samples)


def plot_example(example: ExampleSlice) -> bytes:
    """Three panels: the image, the mask over it (one colour per class), the entropy map over it."""
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    from edgeseg.report.render import figure_png, pyplot

    plt = pyplot()
    # Rows of a NIfTI slice are the first array axis; transpose so the slice reads like a viewer's.
    image, labels, entropy = example.image.T, example.labels.T, example.uncertainty.T
    lo, hi = np.percentile(image, [1, 99]) if image.size else (0.0, 1.0)
    colours = plt.get_cmap("tab10")(np.arange(10))
    n = len(example.class_names)
    mask_cmap = ListedColormap([(0, 0, 0, 0)] + [tuple(colours[i % 10][:3]) + (0.55,) for i in range(n - 1)])
    fig, axes = plt.subplots(1, 3, figsize=(10.5, 3.8), dpi=100)

    def draw() -> None:
        for ax in axes:
            ax.imshow(image, cmap="gray", vmin=lo, vmax=hi, origin="lower", interpolation="nearest")
            ax.set_axis_off()
        axes[0].set_title("image")
        axes[1].imshow(np.ma.masked_equal(labels, 0), cmap=mask_cmap, vmin=0, vmax=n - 1, origin="lower",
                       interpolation="nearest")
        axes[1].set_title("mask (runtime)", fontsize=9)
        axes[1].legend(handles=[Patch(color=colours[i % 10][:3], label=name)
                                for i, name in enumerate(example.class_names[1:])],
                       loc="lower right", fontsize=7, framealpha=0.7)
        shown = axes[2].imshow(np.ma.masked_less(entropy, 1e-3), cmap="magma", alpha=0.8, origin="lower",
                               vmin=0, vmax=max(float(np.log(n)), 1e-3), interpolation="nearest")
        axes[2].set_title(f"entropy over {example.samples} samples (nats)", fontsize=9)
        fig.colorbar(shown, ax=axes[2], fraction=0.046, pad=0.04)
        where = "" if example.axis is None else f", slice {example.index} of axis {example.axis}"
        fig.suptitle(f"{example.setting}: {example.case}{where}", fontsize=10)

    return figure_png(fig, draw)


def example_setting(results: dict[str, Any]) -> dict[str, Any] | None:
    """The setting the example shows: the smallest bundle on the Pareto front (the deployment candidate)."""
    front = [s for s in results["settings"] if s.get("pareto") and s.get("status") == "ok"]
    return min(front, key=lambda s: s["bundle_bytes"]) if front else None


def example_writer(data: Path | None, split: str, **options: Any):
    """write_report's `example` callback: segment and draw the example of the chosen setting.

    Any failure is recorded in the report (the example is an illustration, never fatal).
    """

    def draw(results: dict[str, Any]) -> tuple[dict[str, Any], bytes | None]:
        chosen = example_setting(results)
        if chosen is None or data is None:
            return {"error": "no successful setting on the Pareto front" if chosen is None else "no dataset folder"}, None
        try:
            example = segment_example(chosen["name"], Path(chosen["bundle"]), Path(data), split, **options)
            png = plot_example(example)
        except Exception as exc:  # noqa: BLE001 - an illustration that fails is reported, not fatal
            return {"setting": chosen["name"], "error": f"{type(exc).__name__}: {exc}"}, None
        return {"setting": example.setting, "case": example.case, "axis": example.axis, "index": example.index,
                "samples": example.samples, "png": EXAMPLE_PNG}, png

    return draw
