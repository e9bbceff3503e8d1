"""Count-ception (Cohen et al. 2017) as adapted by ivadomed for keypoint heatmaps, built from a layer factory."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from edgeseg.nets.base import SegmentationNet
from edgeseg.nets.capabilities import Capabilities, NoOptions
from edgeseg.nets.layers import LayerFactory

# ivadomed's widths (its `Countception`, base_width 16 reproduces them); scaled by base_width / 16.
_REFERENCE_WIDTH = 16
# padding of the first convolution: ivadomed's `patch_size`; with the kernels below it makes the
# output exactly as large as the input and the receptive field centred on each output pixel.
INPUT_PADDING = 40
# initial heatmap value everywhere: the head's bias starts at logit(HEATMAP_PRIOR) (see _init_weights)
HEATMAP_PRIOR = 0.01


@dataclass(frozen=True)
class ConvSpec:
    """One conv -> norm -> act block: output width (at base width 16), kernel, zero padding."""

    width: int
    kernel: int
    padding: int = 0


@dataclass(frozen=True)
class InceptionSpec:
    """ivadomed's `SimpleBlock`: three parallel convs (3x3 pad 0, 5x5 pad 1, 9x9 pad 3), concatenated.

    Every branch shrinks the map by 2 and is centred on the same pixel, so they concatenate.
    The first branch has `width_small` channels, the other two `width_large` each.
    """

    width_small: int
    width_large: int

    BRANCHES = ((3, 0), (5, 1), (9, 3))  # (kernel, padding)


# ivadomed's Countception (its `conv1` ... `conv5`, `simple1` ... `simple6`), in order.
TRUNK: tuple[tuple[str, ConvSpec | InceptionSpec], ...] = (
    ("conv1", ConvSpec(64, 3, INPUT_PADDING)),
    ("simple1", InceptionSpec(16, 16)),
    ("simple2", InceptionSpec(16, 32)),
    ("conv2", ConvSpec(16, 14)),
    ("simple3", InceptionSpec(112, 48)),
    ("simple4", InceptionSpec(64, 32)),
    ("simple5", InceptionSpec(40, 40)),
    ("simple6", InceptionSpec(32, 96)),
    ("conv3", ConvSpec(32, 20)),
    ("conv4", ConvSpec(64, 10)),
    ("conv5", ConvSpec(32, 9)),
    ("conv6", ConvSpec(32, 20, 1)),  # ivadomed's last conv (there 32 -> out_channels, see the class docstring)
)


def _window(spec: ConvSpec | InceptionSpec) -> tuple[int, int]:
    """Input offsets [first, last] that one output pixel of a block reads, relative to its index."""
    kernels = InceptionSpec.BRANCHES if isinstance(spec, InceptionSpec) else ((spec.kernel, spec.padding),)
    return min(-p for _, p in kernels), max(k - 1 - p for k, p in kernels)


def trunk_window() -> tuple[int, int]:
    """Input offsets [first, last] that one output pixel of the whole network reads (per axis)."""
    first = last = 0
    for _, spec in TRUNK:
        lo, hi = _window(spec)
        first, last = first + lo, last + hi
    return first, last


def _padded(conv: nn.Module, padding: int, spatial_dims: int) -> nn.Module:
    """Give a factory-built convolution ivadomed's Count-ception zero padding instead of the factory's `kernel // 2`.

    Works for nn.ConvNd and for the quantizing factory's brevitas convs (subclasses of nn.ConvNd,
    whose forward reads `padding`); zero padding is exact in the quantized graph too (zero point 0).
    """
    if not isinstance(getattr(conv, "padding", None), tuple):
        raise TypeError(f"the layer factory returned {type(conv).__name__}, which has no ConvNd padding")
    conv.padding = (padding,) * spatial_dims  # type: ignore[assignment]  # a ConvNd attribute, not a submodule
    return conv


class CountceptionConv(nn.Sequential):
    """conv (explicit padding) -> norm -> activation; a Sequential so that batch norm folds into the conv."""

    def __init__(self, layers: LayerFactory, name: str, cin: int, cout: int, kernel: int, padding: int):
        super().__init__()
        self.add_module("conv", _padded(layers.conv(f"{name}.conv", cin, cout, kernel), padding, layers.spatial_dims))
        self.add_module("norm", layers.norm(f"{name}.norm", cout))
        self.add_module("act", layers.act(f"{name}.act"))


class InceptionBlock(nn.Module):
    """ivadomed's `SimpleBlock`: 3x3, 5x5 and 9x9 branches concatenated (its 1x1 max pool is the identity).

    Shape: (B, cin, H, W) -> (B, small + 2 * large, H - 2, W - 2).
    """

    def __init__(self, layers: LayerFactory, name: str, cin: int, small: int, large: int, dropout: float):
        super().__init__()
        widths = (small, large, large)
        self.branches = nn.ModuleList(
            CountceptionConv(layers, f"{name}.branch{k}", cin, w, k, p)
            for w, (k, p) in zip(widths, InceptionSpec.BRANCHES)
        )
        # the factory concatenates pairs: ((3x3, 5x5), 9x9)
        self.cat1 = layers.concat(f"{name}.cat1", (small, large))
        self.cat2 = layers.concat(f"{name}.cat2", (small + large, large))
        self.drop = layers.dropout(f"{name}.drop", dropout) if dropout > 0 else nn.Identity()
        self.out_channels = small + 2 * large

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b, c = (branch(x) for branch in self.branches)
        return self.drop(self.cat2(self.cat1(a, b), c))


class Countception(SegmentationNet):
    """Count-ception keypoint network: one heatmap (logit) channel per keypoint class, same size as the input.

    Cohen, Boucher, Glastonbury, Lo & Bengio 2017, "Count-ception: Counting by Fully Convolutional
    Redundant Counting" (ICCV workshops): a stride-free, pool-free Inception-style network whose
    every output pixel regresses what lies in its own receptive field; the windows overlap, so each
    object is predicted redundantly by many output pixels, which averages errors out.
    Adapted as in ivadomed (`ivadomed.models.Countception`, used there for intervertebral-disc
    detection): the first conv pads by 40, the Inception blocks have 3x3/5x5/9x9 branches, and the
    paper's 1x1 head is replaced by 10x10, 9x9 and 20x20 convs, so that the output has the input's
    size and each output pixel sees a 119 x 119 window centred on it (`receptive_field`). The
    targets are Gaussian heatmaps (`edgeseg.data.heatmaps`), trained with the Adaptive Wing loss
    (Wang et al. 2019, loss "adaptive_wing") instead of the paper's redundant count maps.

    Differences from ivadomed, each so the network builds through the layer factory and quantizes:
    - ReLU (the factory's activation) instead of LeakyReLU(0.01);
    - ivadomed's last block (20x20 conv 32 -> out_channels, batch norm, LeakyReLU(0.3)) becomes a
      20x20 conv 32 -> 32 block followed by a 1x1 head with float logits: the heatmap is
      sigmoid(logits), applied by the loss (`heatmap_activation`) and at inference, and the head is
      the layer `quant.first_last_bits` applies to;
    - optional dropout after each Inception block (`dropout` > 0; ivadomed has none) for MC dropout.
    Widths are ivadomed's times base_width / 16 (base_width 16 reproduces them). `depth` and
    `decoder` do not apply (no pooling, no decoder) and are ignored. Xavier-uniform initialisation
    as in ivadomed; the head's bias starts at logit(0.01), so the initial heatmap is ~0.01 (Lin et al. 2017).

    2D only: the 9x9..20x20 kernels that give the 119-pixel receptive field would cost 20x as much
    per layer in 3D (the 20^3 conv alone has 57 M weights at base width 16); ivadomed also runs it
    on 2D (mid-sagittal) slices.

    Shape: input (B, in_channels, H, W), any H, W >= 1; output logits (B, out_channels, H, W).
    """

    capabilities = Capabilities(
        spatial_dims=(2,), quantizable=True, exportable=True, mc_dropout=True,
        notes="2D only (its 20x20 kernels do not scale to 3D); every convolution is quantized, the head's "
              "logits stay float",
    )
    Options = NoOptions

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        depth: int = 3,
        base_width: int = 16,
        norm: str = "batch",
        dropout: float = 0.0,
        decoder: str = "upsample",
        layers: LayerFactory | None = None,
    ):
        super().__init__()
        if spatial_dims != 2:
            raise ValueError(f"Countception is 2D only, got spatial_dims={spatial_dims}")
        del depth, decoder  # no pooling, no decoder
        layers = self._init_front(spatial_dims, norm, layers, min_input_multiple=1)
        first, last = trunk_window()
        self.receptive_field = last - first + 1

        def width(w: int) -> int:
            return max(1, round(w * base_width / _REFERENCE_WIDTH))

        blocks: list[nn.Module] = []
        cin = in_channels
        for name, spec in TRUNK:
            block: nn.Module
            if isinstance(spec, InceptionSpec):
                inception = InceptionBlock(layers, name, cin, width(spec.width_small), width(spec.width_large), dropout)
                block, cin = inception, inception.out_channels
            else:
                block = CountceptionConv(layers, name, cin, width(spec.width), spec.kernel, spec.padding)
                cin = width(spec.width)
            blocks.append(block)
        self.trunk = nn.Sequential(*blocks)
        self.head = layers.head("head", cin, out_channels)
        self._init_weights()

    def _init_weights(self) -> None:
        """ivadomed's initialisation (Xavier-uniform conv weights with LeakyReLU(0.01) gain, BN weight 1, bias 0),
        and the head's bias at logit(HEATMAP_PRIOR).

        The prior bias is the usual start for sparse sigmoid targets (Lin et al. 2017, "Focal Loss for
        Dense Object Detection", section 4.1): nearly every pixel of a keypoint heatmap is background,
        and starting from sigmoid(0) = 0.5 everywhere spends the first steps pushing it down.
        """
        gain = nn.init.calculate_gain("leaky_relu", 0.01)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.xavier_uniform_(module.weight, gain=gain)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        head_bias = getattr(self.head, "bias", None)
        if head_bias is not None:
            nn.init.constant_(head_bias, math.log(HEATMAP_PRIOR / (1.0 - HEATMAP_PRIOR)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(self.input_quant(x)))
