"""STIPPLE's prior-driven activations (O. Petit, PhD thesis, CNAM 2021; ../shared/methods.md): the prior map
p enters the network's output as a log-prior added to the logits.

    softmax:  y_k = exp(s_k + ln p_k) / sum_c exp(s_c + ln p_c)
    sigmoid (binary task):  y = sigma(s - ln(1 - p) + ln p)

p is clipped to [eps, 1] (softmax) or [eps, 1 - eps] (sigmoid) so that a prior of exactly 0 or 1 gives a
finite result; then p = 0 all but forbids a class and p = 1/2 (sigmoid) or a uniform p (softmax) changes
nothing. Computed in float64 with scipy, returned as float32.
"""

from __future__ import annotations

import numpy as np
from scipy.special import expit, softmax


def log_prior(prior: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """ln p with p floored at `eps`: the term added to the logits by the prior-driven softmax."""
    return np.log(np.maximum(prior.astype(np.float64), eps))


def prior_softmax(logits: np.ndarray, prior: np.ndarray, axis: int = 0, eps: float = 1e-6) -> np.ndarray:
    """softmax(s + ln p) along the class `axis`; `prior` broadcasts against `logits`."""
    return softmax(logits.astype(np.float64) + log_prior(prior, eps), axis=axis).astype(np.float32)


def prior_sigmoid(logit: np.ndarray, prior: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """sigma(s - ln(1 - p) + ln p) for a binary task's single logit s and foreground prior p."""
    p = np.clip(prior.astype(np.float64), eps, 1.0 - eps)
    return expit(logit.astype(np.float64) + np.log(p) - np.log1p(-p)).astype(np.float32)


def reweight_probabilities(probabilities: np.ndarray, prior: np.ndarray, axis: int = 0,
                           eps: float = 1e-6) -> np.ndarray:
    """The prior-driven softmax from softmax probabilities q = softmax(s) instead of logits: since
    exp(s_k + ln p_k) is proportional to q_k p_k, y_k = q_k p_k / sum_c q_c p_c. This lets a runtime that
    stitches probabilities (not logits) apply the prior after stitching. A voxel where every q_c p_c is 0
    keeps q."""
    weighted = probabilities.astype(np.float64) * np.maximum(prior.astype(np.float64), eps)
    total = weighted.sum(axis=axis, keepdims=True)
    out = np.where(total > 0, weighted / np.where(total > 0, total, 1.0), probabilities)
    return out.astype(np.float32)
