"""Fold batch norm into the preceding convolution, before the quantized twin is built.

Why fold first: a deployed integer graph should be conv (int32 bias) -> ReLU -> requantize with
no float islands. Folding after QAT would change the weights the quantizers were trained on;
folding before makes the quantized weights *be* the folded ones (what the engine runs).
In eval mode, conv followed by BN equals the folded conv exactly (up to float rounding).

Which pairs are folded: a conv / transposed conv immediately followed by a BatchNorm inside the
same `nn.Sequential` (the only container whose child order is its data flow). Any BatchNorm
left over is refused with its name, because it would become an unquantized float island.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from edgeseg.errors import UserError

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@torch.no_grad()
def fold_batch_norms(model: nn.Module) -> list[str]:
    """Fold every (conv, BatchNorm) pair in place, replacing the BN by nn.Identity; returns the BN names.

    The model must hold trained running statistics; it is put in eval mode. Raises UserError
    naming any BatchNorm that does not directly follow a conv in an nn.Sequential.
    """
    model.eval()
    folded: list[str] = []
    for parent_name, parent in model.named_modules():
        if not isinstance(parent, nn.Sequential):
            continue
        children = list(parent.named_children())
        for (conv_name, conv), (bn_name, bn) in itertools.pairwise(children):
            if not isinstance(bn, _BATCH_NORMS) or not isinstance(conv, _CONVS + _TRANSPOSED):
                continue
            if bn.running_mean is None or bn.running_var is None:
                continue  # no running statistics: normalises per batch, cannot fold
            transpose = isinstance(conv, _TRANSPOSED)
            weight, bias = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var,
                                                bn.eps, bn.weight, bn.bias, transpose=transpose)
            conv.weight = weight
            conv.bias = bias
            setattr(parent, bn_name, nn.Identity())
            folded.append(f"{parent_name}.{bn_name}" if parent_name else bn_name)
    leftover = [name for name, m in model.named_modules() if isinstance(m, _BATCH_NORMS)]
    if leftover:
        raise UserError(f"cannot fold batch norm '{leftover[0]}' into a conv (it must directly follow a conv "
                        f"in an nn.Sequential and have running statistics); {len(leftover)} left unfolded")
    return folded
