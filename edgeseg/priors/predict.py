"""STIPPLE's prediction with the prior on a whole volume, without labels (torch-free): the one implementation
that `edgeseg evaluate RUN` (`edgeseg.train.stipple.PriorPredictor`, the network run by PyTorch) and the runtime
(`edgeseg segment` / `edgeseg evaluate BUNDLE`, the network run by ONNX Runtime or TensorRT) both call.

Given the network's softmax probabilities q (K, *S) of the whole volume on the preprocessed grid (stitched
tiles, and the mean of the TTA / MC samples at run time): the prior is placed by the KL-minimising translation
of q onto the reference's smoothed label (`edgeseg.priors.reference.centres_from_probabilities`), painted there
(`edgeseg.priors.stipple.prior_maps`, floored at eps), and combined as y_k = q_k p_k / sum_c q_c p_c
(`edgeseg.priors.activation.reweight_probabilities`); the labels are argmax_k y_k.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgeseg.priors.activation import reweight_probabilities
from edgeseg.priors.reference import Centres, Reference, centres_from_probabilities
from edgeseg.priors.stipple import SpatialPrior, prior_maps


@dataclass(frozen=True)
class Placed:
    """A volume's prediction with the prior: prior-driven probabilities (K, *S) float32, the translation found
    (voxels, relative to the reference volume) and the organ centres it puts the prior at (class index -> voxel)."""

    probabilities: np.ndarray
    shift: tuple[int, ...]
    centres: Centres

    def labels(self) -> np.ndarray:
        """argmax over the classes. Shape: (*S) uint8 (uint16 beyond 256 classes)."""
        dtype = np.uint8 if len(self.probabilities) <= 256 else np.uint16
        return self.probabilities.argmax(axis=0).astype(dtype)


@dataclass(frozen=True)
class PriorModel:
    """A STIPPLE prior ready to predict: the prior, its reference volume and the placement settings
    (`edgeseg.config.schema.StippleConfig`'s max_shift, factors, eps, reference_smoothing)."""

    prior: SpatialPrior
    reference: Reference
    max_shift: int = 16
    factors: tuple[int, ...] = (4, 2, 1)
    eps: float = 1e-6
    reference_smoothing: float = 0.1

    def place(self, probabilities: np.ndarray) -> Placed:
        """Place the prior on a volume from its softmax probabilities q and reweight them (module docstring).
        Shape: (K, *S) float -> Placed with (K, *S) float32."""
        if probabilities.ndim != 4 or len(probabilities) != len(self.prior.class_names):
            raise ValueError(f"expected ({len(self.prior.class_names)}, X, Y, Z) class probabilities, got "
                             f"{probabilities.shape}")
        centres, shift = centres_from_probabilities(probabilities, self.reference, self.max_shift, self.factors,
                                                    self.eps, self.reference_smoothing)
        maps = prior_maps(self.prior, centres, probabilities.shape[1:], self.eps)
        return Placed(reweight_probabilities(probabilities, maps, axis=0, eps=self.eps), tuple(shift), centres)
