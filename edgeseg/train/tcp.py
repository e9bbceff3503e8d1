"""INERRANT's learned confidence: a True-Class-Probability (TCP) head, `train.inerrant.confidence: tcp`.

The method (shared/methods.md, INERRANT): pseudo-labels are "ranked by confidence — either the maximum class
probability or a learned True-Class-Probability head (a small conv head on the features before the final 1x1
conv, trained with L2 to the TCP of the segmentation output)". The TCP criterion and its auxiliary network are
ConfidNet's (Corbiere et al., "Addressing Failure Prediction by Learning Model Confidence", NeurIPS 2019;
"Confidence Estimation via Auxiliary Models", TPAMI 2022): the confidence network reads the classifier's
features, is regressed with an L2 loss onto the probability the classifier gives to the true class, and is
trained with the classifier frozen, so it never changes the segmentation.

Here, with K sigmoids (one per foreground class k), the TCP of class k at a voxel is p_k where the label says
k and 1 - p_k where it says not-k, on known entries only: ambiguous entries (an unannotated class on voxels its
partial label calls background) have no true class and are excluded (`tcp_targets`). The head (`TcpHead`):
two 3x3 conv + ReLU layers and a 1x1 conv to K sigmoid outputs, on the input of the network's final 1x1 conv
`head` (read with a forward pre-hook, so no network changes and no new state_dict keys).

When it is trained (`TcpConfidence.fit`): at the start of each relabelling step t >= 1, just before step t's
pseudo-labels are ranked, for `train.inerrant.tcp_steps` Adam steps (lr `tcp_lr`) on training batches of the
partial labels alone (the previous step's pseudo-labels removed: they are the network's own guesses, not
annotations), with the segmentation network in eval mode under no_grad — the output whose correctness the
head must predict is the one of the network as step t finds it, the one that ranks the pseudo-labels, as
ConfidNet fits its confidence network after the classifier. The weights carry over from step to step (warm
start; a fresh optimizer each step) and are saved in the training checkpoint, so a resumed run continues
exactly. The head is training-only: it is not part of the model, so best.safetensors, export and quantize
are unchanged. Under torchrun every rank divides its squared errors by the global batch's number of known
entries and the ranks sum the head's gradients: every rank takes the single-process step on the global batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from edgeseg.config.schema import InerrantConfig
from edgeseg.errors import UserError
from edgeseg.train import distributed
from edgeseg.train.inference import predict_probabilities
from edgeseg.train.sampling import BatchSampler

# ------------------------------------------------------------------------------------- target, head and loss


def tcp_targets(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The TCP of each foreground class's sigmoid: p_k where the target is 1, 1 - p_k where it is 0, NaN where
    the target is NaN (ambiguous: excluded). Channel 0 (background) is not a sigmoid output and is dropped.
    Shape: scores (B, C, *S) logits, targets (B, C, *S) per-class targets with NaN -> (B, C - 1, *S) float32."""
    p = torch.sigmoid(scores[:, 1:].float())
    y = targets[:, 1:].float()
    tcp = torch.where(y >= 0.5, p, 1.0 - p)
    return torch.where(torch.isnan(y), torch.full_like(tcp, float("nan")), tcp)


def tcp_loss(confidence_logits: torch.Tensor, tcp: torch.Tensor, total: float | None = None) -> torch.Tensor:
    """Mean squared error between sigmoid(head output) and the TCP over the known (finite) entries: their squared
    errors summed and divided by `total` (under torchrun the known entries of the global batch), by default
    their number here; 0 (with a graph) when there are none. Shape: (B, K, *S), (B, K, *S) -> scalar."""
    known = torch.isfinite(tcp)
    count = float(known.sum()) if total is None else total
    if not count:
        return confidence_logits.sum() * 0.0
    return ((torch.sigmoid(confidence_logits.float())[known] - tcp[known]) ** 2).sum() / count


class TcpHead(nn.Module):
    """ConfidNet-style confidence head: two 3x3 conv + ReLU layers (width `features`) and a 1x1 conv to `classes`
    logits, whose sigmoids estimate each class's TCP. Shape: (B, features, *S) -> (B, classes, *S)."""

    def __init__(self, spatial_dims: int, features: int, classes: int):
        super().__init__()
        conv = {2: nn.Conv2d, 3: nn.Conv3d}[spatial_dims]
        self.layers = nn.Sequential(conv(features, features, 3, padding=1), nn.ReLU(inplace=True),
                                    conv(features, features, 3, padding=1), nn.ReLU(inplace=True),
                                    conv(features, classes, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def final_conv(model: nn.Module) -> nn.Conv2d | nn.Conv3d:
    """The network's final 1x1 conv (`model.head`); UserError when the model has none."""
    head = getattr(model, "head", None)
    if not isinstance(head, (nn.Conv2d, nn.Conv3d)) or tuple(head.kernel_size) != (1,) * (head.weight.ndim - 2):
        raise UserError(f"train.inerrant.confidence tcp reads the features before the network's final 1x1 conv "
                        f"`head`; {type(model).__name__} has none (use confidence max_probability)")
    return head


@contextlib.contextmanager
def tap_features(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """While active, every forward of `model` appends the input of its final 1x1 conv (the pre-head features)
    to the yielded list."""
    captured: list[torch.Tensor] = []
    handle = final_conv(model).register_forward_pre_hook(lambda _module, args: captured.append(args[0]))
    try:
        yield captured
    finally:
        handle.remove()


def features_and_scores(model: nn.Module, x: torch.Tensor,
                        extra: Sequence[torch.Tensor] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen network's pre-head features and logits, detached (no gradient reaches the network)."""
    with torch.no_grad(), tap_features(model) as captured:
        scores = model(x, *extra)
    return captured[-1].float(), scores.float()


def head_loss(model: nn.Module, head: TcpHead, x: torch.Tensor, targets: torch.Tensor,
              extra: Sequence[torch.Tensor] = ()) -> torch.Tensor:
    """The TCP head's L2 loss on one batch (the network itself is not differentiated)."""
    features, scores = features_and_scores(model, x, extra)
    return tcp_loss(head(features), tcp_targets(scores, targets))


class _WithConfidence(nn.Module):
    """The network and the head as one model for whole-volume prediction: (B, 2C, *S) = the network's C logits,
    a zero channel, then the head's C - 1 confidence logits (so the tiler blends both alike)."""

    def __init__(self, model: nn.Module, head: TcpHead):
        super().__init__()
        self.model, self.head = model, head
        self.min_input_multiple = getattr(model, "min_input_multiple", 1)

    def forward(self, x: torch.Tensor, *extra: torch.Tensor) -> torch.Tensor:
        with tap_features(self.model) as captured:
            scores = self.model(x, *extra).float()
        confidence = self.head(captured[-1].float())
        return torch.cat([scores, torch.zeros_like(scores[:, :1]), confidence], dim=1)


# ------------------------------------------------------------------------------------- training and prediction


class TcpConfidence:
    """The TCP head of one run: built on first use from the network's final conv (seeded by `seed`), fitted at
    each relabelling step (`fit`), read by the relabelling (`predict`), saved and restored with the training
    checkpoint (`tensors`, `restore`)."""

    PREFIX = "inerrant/tcp/"  # checkpoint tensors: PREFIX + the head's state_dict keys

    def __init__(self, steps: int, lr: float, batch_size: int, seed: int):
        self.steps, self.lr, self.batch_size, self.seed = steps, lr, batch_size, seed
        self.head: TcpHead | None = None
        self._saved: dict[str, torch.Tensor] = {}  # restored weights, loaded when the head is built
        self.last_loss: float | None = None

    def _head(self, model: nn.Module, device: torch.device) -> TcpHead:
        conv = final_conv(model)
        if self.head is None:
            with torch.random.fork_rng(devices=[]):  # the training's own RNG stream is left untouched
                torch.manual_seed(self.seed)
                self.head = TcpHead(conv.weight.ndim - 2, conv.in_channels, conv.out_channels - 1)
            if self._saved:
                try:
                    self.head.load_state_dict(self._saved)
                except RuntimeError as exc:
                    raise UserError(f"the checkpoint's TCP head does not fit this network ({exc})") from None
        return self.head.to(device)

    def check(self, model: nn.Module) -> None:
        """UserError now (not at the first relabelling step) when the network has no final 1x1 conv."""
        final_conv(model)

    def fit(self, model: nn.Module, sampler: BatchSampler, device: torch.device) -> float:
        """`steps` Adam steps of the head on `sampler`'s batches, the network frozen in eval mode; returns the
        mean loss of the last tenth of the steps."""
        head = self._head(model, device)
        model.eval()
        head.train()
        optimizer = torch.optim.Adam(head.parameters(), lr=self.lr)
        world = distributed.world_size()
        losses = []
        for _ in range(self.steps):
            batch = sampler.next_batch(self.batch_size)
            x = torch.from_numpy(batch.images).to(device)
            y = torch.from_numpy(batch.labels).to(device)
            extra = [torch.from_numpy(v).to(device) for v in batch.inputs.values()]
            optimizer.zero_grad(set_to_none=True)
            features, scores = features_and_scores(model, x, extra)
            tcp = tcp_targets(scores, y)
            total = None if world == 1 else distributed.mean_over_ranks(torch.isfinite(tcp).sum()) * world
            loss = tcp_loss(head(features), tcp, total)
            loss.backward()
            if world > 1:  # the global batch's gradient: every rank's head takes the same step
                for p in head.parameters():
                    if p.grad is not None:
                        torch.distributed.all_reduce(p.grad, op=torch.distributed.ReduceOp.SUM)
            optimizer.step()
            losses.append(distributed.mean_over_ranks(loss.detach()) * world)
        self.last_loss = float(np.mean(losses[-max(1, len(losses) // 10):])) if losses else None
        return self.last_loss if self.last_loss is not None else float("nan")

    def predict(self, model: nn.Module, image: np.ndarray, tile: tuple[int, ...],
                device: torch.device) -> tuple[np.ndarray, np.ndarray]:
        """One case's per-class maps as `sigmoid_multilabel` gives them and the head's confidence per class
        (sigmoid; channel 0 unused). Shape: image (C_in, *S) -> (C, *S), (C, *S) float32."""
        joint = _WithConfidence(model, self._head(model, device))
        out = predict_probabilities(joint, image, tile, device, activation="sigmoid_multilabel")
        classes = out.shape[0] // 2
        return out[:classes], out[classes:]

    def tensors(self) -> dict[str, torch.Tensor]:
        """The head's weights for the training checkpoint (none before the head exists)."""
        state = self.head.state_dict() if self.head is not None else self._saved
        return {self.PREFIX + k: v.detach().cpu() for k, v in state.items()}

    def restore(self, tensors: Mapping[str, torch.Tensor]) -> bool:
        """Take the head's weights from checkpoint tensors; False when they hold none."""
        saved = {k[len(self.PREFIX):]: v for k, v in tensors.items() if k.startswith(self.PREFIX)}
        if not saved:
            return False
        self._saved, self.head = saved, None
        return True


def build_confidence(settings: InerrantConfig, batch_size: int, seed: int) -> TcpConfidence | None:
    """The TCP head for train.inerrant.confidence tcp; None for max_probability."""
    if settings.confidence != "tcp":
        return None
    return TcpConfidence(settings.tcp_steps, settings.tcp_lr, batch_size, seed)
