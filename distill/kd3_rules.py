"""KD^3's dynamic-selection rules (Tang et al., ICCV 2023), in one place.

The scoring stage (combined prediction, threshold flag), the `kd3` selection policy and the
`kd3` loss's per-epoch selection all call these two functions.

- `combine_weight(e, E)`: the teacher's weight `a(e)` in `z = a*z_T + (1-a)*z_S`:
  `a(e) = 1 - exp(-5((e+1)/R - 1)^2)` for `e < E/2`, else 0 (student only), with `R = 2E/3`.
  The reference code's R = 160 and cut-off 120 for E = 240 are this rule at E = 240.
- `combined_prediction(z_T, z_S, a)`: the label and confidence of `a*softmax(z_T) + (1-a)*softmax(z_S)`.
  We mix probabilities, as KD^3 mixes the two networks' predictions, so the confidence is a probability.
- `class_thresholds(labels, confidences, n_classes, tau)`: FlexMatch-style class-adaptive
  thresholds `tau_c = tau * s_c / (2 - s_c)`, `s_c = N_c / max_c N_c`, where `N_c` counts the
  samples whose combined prediction is `c` with confidence above `tau` (the class's "learning
  effect"). While no class has any such sample, every class gets `tau`.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # tensors only pass through: the selection policies use these rules without torch
    import torch

DEFAULT_TAU = 0.95


def combine_weight(epoch: int, epochs: int) -> float:
    """The teacher's weight a(e) in the combined prediction at 0-based `epoch` of `epochs`."""
    if epochs <= 0:
        raise ValueError("epochs must be positive")
    if epoch >= epochs / 2:
        return 0.0
    ramp = 2.0 * epochs / 3.0
    return 1.0 - math.exp(-5.0 * ((epoch + 1) / ramp - 1.0) ** 2)


def class_thresholds(labels: np.ndarray, confidences: np.ndarray, n_classes: int,
                     tau: float = DEFAULT_TAU) -> np.ndarray:
    """Per-class thresholds (n_classes,) from the pool's combined predictions."""
    labels = np.asarray(labels)
    confident = labels[np.asarray(confidences) > tau]
    counts = np.bincount(confident.astype(np.int64), minlength=n_classes)[:n_classes].astype(np.float64)
    if counts.max() == 0:
        return np.full(n_classes, tau)
    s = counts / counts.max()
    return tau * s / (2.0 - s)


def passes_threshold(labels: np.ndarray, confidences: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """True where a sample's combined confidence exceeds its predicted class's threshold."""
    labels = np.asarray(labels).astype(np.int64)
    return np.asarray(confidences) > np.asarray(thresholds)[labels]


def thresholds_from_counts(counts: np.ndarray, tau: float = DEFAULT_TAU) -> np.ndarray:
    """`class_thresholds` from per-class counts of confident predictions (each counted sample is one
    label of confidence 1 > tau), for callers that accumulate counts instead of keeping samples."""
    counts = np.asarray(counts, dtype=np.int64)
    labels = np.repeat(np.arange(len(counts)), counts)
    return class_thresholds(labels, np.ones(len(labels)), len(counts), tau)


def combined_prediction(teacher_logits: torch.Tensor, student_logits: torch.Tensor | None,
                        a: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(label, confidence) of `a*softmax(z_T) + (1-a)*softmax(z_S)`, without gradient; the
    teacher's own prediction when there is no student."""
    p = teacher_logits.detach().softmax(-1)
    if student_logits is not None:
        p = a * p + (1 - a) * student_logits.detach().softmax(-1)
    conf, label = p.max(-1)
    return label, conf
