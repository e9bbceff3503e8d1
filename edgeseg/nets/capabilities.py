"""What a model class supports, declared on the class and checked by the contract tests.

Like the capability flags of segmentation_models.pytorch / timm: the pipeline asks before it
acts (`edgeseg quantize` and `edgeseg export` refuse a model that declares it cannot), and
tests/nets/test_contracts.py checks every claim against the real model.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Capabilities:
    """Declared support of one model class.

    spatial_dims: which of 2 and 3 the model builds for.
    quantizable: `edgeseg quantize` can fold, twin (QuantLayers), calibrate and fine-tune it.
    exportable: `edgeseg export` can write it (float and, when quantizable, quantized forms).
    mc_dropout: with dropout > 0 it holds McDropout layers usable for Monte Carlo sampling.
    extra_inputs: names of inputs besides the image, in `forward(x, extra)` order
        (e.g. "metadata", "modality_mask"); empty for image-only models.
    notes: what stays float in the quantized model, or why a capability is off.
    """

    spatial_dims: tuple[int, ...]
    quantizable: bool
    exportable: bool
    mc_dropout: bool
    extra_inputs: tuple[str, ...] = ()
    notes: str = ""

    def __post_init__(self) -> None:
        if not self.spatial_dims or any(d not in (2, 3) for d in self.spatial_dims):
            raise ValueError(f"spatial_dims must be a non-empty subset of (2, 3), got {self.spatial_dims}")

    def summary(self) -> str:
        """One line for `edgeseg list models`, e.g. "2D/3D, quantizable, exportable, MC dropout"."""
        parts = ["/".join(f"{d}D" for d in self.spatial_dims)]
        parts.append("quantizable" if self.quantizable else "not quantizable")
        parts.append("exportable" if self.exportable else "not exportable")
        if self.mc_dropout:
            parts.append("MC dropout")
        if self.extra_inputs:
            parts.append("needs " + " + ".join(self.extra_inputs))
        return ", ".join(parts)


@dataclass(frozen=True)
class NoOptions:
    """Options dataclass of a model that has no architecture-specific settings."""
