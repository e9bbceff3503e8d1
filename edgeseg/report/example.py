"""The report's example slice: one test case segmented through the runtime with flip TTA (and MC
dropout where the bundle has it), drawn as image | mask overlay | voxel-wise entropy.

The case is fed as `edgeseg evaluate BUNDLE` feeds it (FiLM metadata, HeMIS modalities, STIPPLE prior).
STIPPLE bundles place their prior on the mean probabilities, so they have no per-sample entropy: the third
panel says so. Keypoint bundles show their decoded keypoints over the image and the strongest heatmap.

Torch-free, like the rest of the report's evaluation: the figure shows what the device delivers.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgeseg.errors import UserError

EXAMPLE_PNG = "example_slice.png"
MC_PASSES = 2  # with flip TTA: 2 x 2**dims samples, enough for an entropy map and cheap on a CPU
ACCURACY_SLACK = 0.05  # of mean Dice / keypoint F1: how far below the best front setting the example may be
NO_ENTROPY_STIPPLE = "no per-sample entropy: STIPPLE places its prior on the mean probabilities"


@dataclass(frozen=True)
class ExampleSlice:
    """One 2D slice of a segmented case on the input grid: intensities, labels and one map (entropy or heatmap)."""

    setting: str
    case: str
    axis: int | None  # None for a 2D image
    index: int | None
    image: np.ndarray  # (H, W) float
    labels: np.ndarray  # (H, W) int (all 0 for keypoint bundles: their result is `points`)
    uncertainty: np.ndarray | None  # (H, W) float32 entropy in nats; None where the bundle has no per-sample outputs
    class_names: list[str]
    samples: int
    heatmap: np.ndarray | None = None  # keypoint bundles: (H, W) max over classes of the mean heatmaps
    points: list[tuple[int, float, float]] = field(default_factory=list)  # keypoints here: (class, row, column)
    note: str | None = None  # why the third panel shows no map


    def caption(self) -> str:
        """What the figure shows, for the report's text."""
        if self.heatmap is not None:
            return f"the runtime's keypoints and its strongest heatmap, mean of {self.samples} flip-TTA samples"
        if self.uncertainty is None:
            return f"the runtime's mask (mean of {self.samples} flip-TTA samples); {self.note or 'no entropy map'}"
        return f"the runtime's mask and its voxel-wise entropy over {self.samples} flip-TTA / MC-dropout samples"


def busiest_slice(labels: np.ndarray, axis: int) -> int:
    """Index along `axis` of the slice with the most foreground voxels (the middle one if none has any)."""
    other = tuple(a for a in range(labels.ndim) if a != axis)
    counts = np.count_nonzero(labels, axis=other)
    return int(np.argmax(counts)) if counts.any() else labels.shape[axis] // 2


def segment_example(setting: str, bundle_path: Path, data: Path, split: str = "test", *, layout: str = "auto",
                    splits_file: str | None = "splits.json", seed: int = 0,
                    label_suffixes: Sequence[str] | None = None) -> ExampleSlice:
    """Segment the first case of the split with TTA (+ MC dropout) and cut its busiest slice."""
    from edgeseg.data.discovery import load_splits
    from edgeseg.data.io import read_image
    from edgeseg.runtime.backends import open_backend
    from edgeseg.runtime.bundle import load_bundle
    from edgeseg.runtime.evaluate_bundle import bundle_cases, cases_metadata, prepare_case
    from edgeseg.runtime.pipeline import segment_prepared

    bundle = load_bundle(bundle_path)
    manifest = bundle.manifest
    prior = bundle.stipple_prior()
    keypoints = manifest.output_kind == "heatmap"
    root = Path(data)
    cases = bundle_cases(manifest, root, layout, label_suffixes)
    refs = cases if split == "all" else load_splits(root, splits_file, cases, seed=seed).get(split, [])
    if not refs:
        raise UserError(f"{data}: no cases in the '{split}' split for the example slice")
    ref = refs[0]
    raw_metadata = cases_metadata(manifest, [ref], root)
    volume = read_image(list(ref.images))
    per_sample = prior is None and not keypoints  # entropy needs per-sample labels
    mc = MC_PASSES if manifest.mc_available and per_sample else 0
    engine = open_backend(bundle, "auto", mc=mc > 0, batch_size=manifest.batch)
    try:
        prepared = prepare_case(manifest, ref, volume, raw_metadata)
        original = prepared.original
        seg = segment_prepared(prepared, manifest, engine, tta_axes=list(range(manifest.spatial_dims)),
                               mc_passes=mc, uncertainty=per_sample, probabilities=keypoints,
                               batch_size=manifest.batch, prior=prior)
    finally:
        engine.close()
    labels, entropy, heatmap, points = seg.labels, seg.uncertainty, None, []
    image = volume.array if volume.array.ndim == labels.ndim else volume.array[0]  # the first channel
    if keypoints:
        from edgeseg.runtime.keypoints import decode_volume

        assert seg.probabilities is not None  # probabilities=True: the mean heatmaps on the input's grid
        heatmap = seg.probabilities[1:].max(axis=0)
        labels = np.zeros(heatmap.shape, np.uint8)
        points = [(int(r["label"]), *r["voxel"]) for r in decode_volume(seg.probabilities, original, manifest)]
    axis = index = None
    if labels.ndim == 3:
        axis = 2
        index = busiest_slice(labels, axis) if heatmap is None else int(np.argmax(heatmap.max(axis=(0, 1))))
        image, labels = (np.take(a, index, axis=axis) for a in (image, labels))
        entropy = None if entropy is None else np.take(entropy, index, axis=axis)
        heatmap = None if heatmap is None else np.take(heatmap, index, axis=axis)
        points = [(k, *p[:2]) for k, *p in points if abs(p[2] - index) < 0.5]
    return ExampleSlice(setting=setting, case=ref.name, axis=axis, index=index, image=np.asarray(image, float),
                        labels=np.asarray(labels), uncertainty=None if entropy is None else np.asarray(entropy, np.float32),
                        class_names=list(manifest.class_names), samples=seg.sampling.num_samples,
                        heatmap=heatmap, points=[(k, float(r), float(c)) for k, r, c in points],
                        note=NO_ENTROPY_STIPPLE if prior is not None else None)


def plot_example(example: ExampleSlice) -> bytes:
    """Three panels: the image, the mask (or keypoints) over it, the entropy (or heatmap) map over it."""
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    from edgeseg.report.render import figure_png, pyplot

    plt = pyplot()
    # Rows of a NIfTI slice are the first array axis; transpose so the slice reads like a viewer's.
    image, labels = example.image.T, example.labels.T
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
        if example.heatmap is None:
            axes[1].imshow(np.ma.masked_equal(labels, 0), cmap=mask_cmap, vmin=0, vmax=n - 1, origin="lower",
                           interpolation="nearest")
            axes[1].set_title("mask (runtime)", fontsize=9)
        else:  # transposed display: a keypoint at (row, column) of the slice is drawn at x=row, y=column
            for k, row, column in example.points:
                axes[1].plot(row, column, marker="+", markersize=12, mew=2, color=colours[(k - 1) % 10][:3])
            axes[1].set_title(f"keypoints (runtime): {len(example.points)}", fontsize=9)
        axes[1].legend(handles=[Patch(color=colours[i % 10][:3], label=name)
                                for i, name in enumerate(example.class_names[1:])],
                       loc="lower right", fontsize=7, framealpha=0.7)
        if example.uncertainty is not None:
            shown = axes[2].imshow(np.ma.masked_less(example.uncertainty.T, 1e-3), cmap="magma", alpha=0.8,
                                   origin="lower", vmin=0, vmax=max(float(np.log(n)), 1e-3), interpolation="nearest")
            axes[2].set_title(f"entropy over {example.samples} samples (nats)", fontsize=9)
            fig.colorbar(shown, ax=axes[2], fraction=0.046, pad=0.04)
        elif example.heatmap is not None:
            shown = axes[2].imshow(example.heatmap.T, cmap="magma", alpha=0.8, origin="lower",
                                   interpolation="nearest")
            axes[2].set_title(f"strongest heatmap, mean of {example.samples} samples", fontsize=9)
            fig.colorbar(shown, ax=axes[2], fraction=0.046, pad=0.04)
        else:
            axes[2].text(0.5, 0.5, textwrap.fill(example.note or "no map", 28), ha="center", va="center", fontsize=8,
                         transform=axes[2].transAxes, color="white", backgroundcolor=(0, 0, 0, 0.6))
        where = "" if example.axis is None else f", slice {example.index} of axis {example.axis}"
        fig.suptitle(f"{example.setting}: {example.case}{where}", fontsize=10)

    return figure_png(fig, draw)


def example_setting(results: dict[str, Any]) -> dict[str, Any] | None:
    """The setting the example shows, the deployment candidate: the smallest bundle on the Pareto front whose mean
    accuracy is within ACCURACY_SLACK of the front's best. (The smallest bundle is always on the front, however
    poor: a 4/6 Count-ception with keypoint F1 0 beside an 8/8 with F1 1 was once drawn as the example.)"""
    front = [s for s in results["settings"] if s.get("pareto") and s.get("status") == "ok"]
    if not front:
        return None
    accuracy = {s["name"]: s["accuracy_mean"] or 0.0 for s in front}  # build_results gives every ok row one
    best = max(accuracy.values())
    return min((s for s in front if accuracy[s["name"]] >= best - ACCURACY_SLACK), key=lambda s: s["bundle_bytes"])


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
                "samples": example.samples, "caption": example.caption(), "png": EXAMPLE_PNG}, png

    return draw
