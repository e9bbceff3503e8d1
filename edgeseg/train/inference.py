"""Whole-volume prediction with a PyTorch model, for validation and evaluation during training.

Volumes that fit into the training patch are padded to it (the context the model was trained
with — see shared/research/reference-runs.md); larger ones go through the runtime's tiler
(the same code the device runs), with the torch model as its predictor.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from edgeseg.data.patches import crop_padding, pad_to_shape, round_up_shape
from edgeseg.train.softseg import activate


def _activate(scores: torch.Tensor, activation: str) -> torch.Tensor:
    """`edgeseg.train.softseg.activate`, plus "heatmap": the keypoint scheme's sigmoid heatmaps, channel 0 unused
    (`edgeseg.train.keypoints.heatmap_activation`)."""
    if activation == "heatmap":
        from edgeseg.train.keypoints import heatmap_activation  # here: that module imports this one

        return heatmap_activation(scores)
    return activate(scores, activation)


@torch.no_grad()
def predict_probabilities(
    model: torch.nn.Module,
    image: np.ndarray,
    patch_size: tuple[int, ...],
    device: torch.device,
    overlap: float = 0.5,
    batch_size: int = 2,
    activation: str = "softmax",
    inputs: Sequence[np.ndarray] = (),
) -> np.ndarray:
    """Per-class values for one case: softmax probabilities, SoftSeg's normalized-ReLU soft maps or keypoint
    heatmaps (`activation`, see `_activate`). `inputs`: the case's extra model inputs (FiLM
    metadata (D,), HeMIS modality mask (C,); `PreparedCase.model_inputs`), given with every tile.
    Shape: image (C, *S) -> (K, *S) float32."""
    model.eval()
    multiple = getattr(model, "min_input_multiple", 1)
    spatial = image.shape[1:]

    def run(batch: np.ndarray) -> torch.Tensor:
        extra = [torch.from_numpy(np.repeat(np.asarray(v, np.float32)[None], len(batch), axis=0)).to(device)
                 for v in inputs]
        return model(torch.from_numpy(np.ascontiguousarray(batch)).to(device), *extra).float()

    if all(s <= p for s, p in zip(spatial, patch_size)):
        target = round_up_shape(tuple(patch_size), multiple)
        padded, widths = pad_to_shape(image, target)
        probs = _activate(run(padded[None]), activation)[0].cpu().numpy()
        return np.ascontiguousarray(crop_padding(probs, widths))
    from edgeseg.runtime.tiling import sliding_window_probabilities

    tile = round_up_shape(tuple(patch_size), multiple)

    def predict(batch: np.ndarray) -> np.ndarray:
        return _activate(run(batch), activation).cpu().numpy()

    return sliding_window_probabilities(image, predict, tile, overlap=overlap, batch_size=batch_size)


def predict_labels(model, image, patch_size, device, spatial_dims: int, slice_axis: int = 2,
                   activation: str = "softmax", inputs: Sequence[np.ndarray] = ()) -> np.ndarray:
    """Argmax labels; 2D models on 3D volumes are applied slice by slice; `inputs` as in
    `predict_probabilities`. Shape: (C, *S) -> (*S) uint8."""
    if spatial_dims == 2 and image.ndim == 4:
        out = np.zeros(image.shape[1:], dtype=np.uint8)
        for i in range(image.shape[slice_axis + 1]):
            sl = np.take(image, i, axis=slice_axis + 1)
            probs = predict_probabilities(model, sl, patch_size, device, activation=activation, inputs=inputs)
            index = [slice(None)] * 3
            index[slice_axis] = i
            out[tuple(index)] = probs.argmax(0)
        return out
    return predict_probabilities(model, image, patch_size, device, activation=activation,
                                 inputs=inputs).argmax(0).astype(np.uint8)
