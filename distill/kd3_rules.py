"""KD^3's dynamic-selection rules (Tang et al., ICCV 2023), in one place.

The scoring stage (combined prediction, threshold flag), the `kd3` selection policy and the
`kd3` loss's per-epoch selection all call these functions. The defaults are the official code's
(`tangjialiang97/KD3`, `KDDD/dataset/I32.py: train_loader_select`, `KDDD/helper/util.py: time_d`);
webdistill's earlier rules stay available as options (docs/methods.md says what each changes).

- `combine_weight(e, E)`: the teacher's weight `a(e)` in `z = a*z_T + (1-a)*z_S`, for 0-based epoch e:
  `a(e) = 1 - exp(-5((e+2)/R - 1)^2)` while `e + 1 < E/2`, else 0 (student only), with `R = 2E/3`.
  The official loop counts epochs from 1 and calls `time_d(epoch, 120)` = `1 - exp(-5((epoch+1)/160 - 1)^2)`
  for epoch < 120, E = 240: this is that rule, with e = epoch - 1.
- `combined_prediction(z_T, z_S, a, mix)`: the label and confidence of the combined prediction.
  `mix="logits"` (official): `softmax(a*z_T + (1-a)*z_S)`. `mix="probabilities"` (webdistill's earlier
  rule): `a*softmax(z_T) + (1-a)*softmax(z_S)`; where the two networks disagree it is rarely confident.
- `class_thresholds(labels, confidences, n_classes, tau, count)`: FlexMatch-style class-adaptive
  thresholds `tau_c = tau * s_c / (2 - s_c)`, `s_c = N_c / max_c N_c`. `count="all"` (official,
  `Counter(predlist)`): N_c counts every sample whose combined prediction is c, confident or not, so
  a "sink" class that collects many unsure predictions gets a threshold near tau and admits few.
  `count="confident"` (earlier): only predictions above tau count; a class with many predictions,
  none confident, then gets threshold 0 and is admitted wholesale. While no class has any counted
  sample, every class gets `tau`.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal

import numpy as np

if TYPE_CHECKING:  # tensors only pass through: the selection policies use these rules without torch
    import torch

DEFAULT_TAU = 0.95
Count = Literal["all", "confident"]
Mix = Literal["logits", "probabilities"]
COUNTS: tuple[Count, ...] = ("all", "confident")
MIXES: tuple[Mix, ...] = ("logits", "probabilities")


def combine_weight(epoch: int, epochs: int) -> float:
    """The teacher's weight a(e) in the combined prediction at 0-based `epoch` of `epochs`."""
    if epochs <= 0:
        raise ValueError("epochs must be positive")
    if epoch + 1 >= epochs / 2:
        return 0.0
    ramp = 2.0 * epochs / 3.0
    return 1.0 - math.exp(-5.0 * ((epoch + 2) / ramp - 1.0) ** 2)


def class_counts(labels: np.ndarray, confidences: np.ndarray, n_classes: int, tau: float = DEFAULT_TAU,
                 count: Count = "all") -> np.ndarray:
    """N_c per class (n_classes,): every prediction (`all`) or those above tau (`confident`)."""
    labels = np.asarray(labels).astype(np.int64)
    if count == "confident":
        labels = labels[np.asarray(confidences) > tau]
    elif count != "all":
        raise ValueError(f"count must be one of {COUNTS}, got {count!r}")
    return np.bincount(labels, minlength=n_classes)[:n_classes]


def thresholds_from_counts(counts: np.ndarray, tau: float = DEFAULT_TAU) -> np.ndarray:
    """`tau * s_c / (2 - s_c)` with `s_c = N_c / max N`; tau for every class while no class has a count."""
    counts = np.asarray(counts, dtype=np.float64)
    if counts.max(initial=0) == 0:
        return np.full(len(counts), tau)
    s = counts / counts.max()
    return tau * s / (2.0 - s)


def class_thresholds(labels: np.ndarray, confidences: np.ndarray, n_classes: int,
                     tau: float = DEFAULT_TAU, count: Count = "all") -> np.ndarray:
    """Per-class thresholds (n_classes,) from the pool's combined predictions."""
    return thresholds_from_counts(class_counts(labels, confidences, n_classes, tau, count), tau)


def passes_threshold(labels: np.ndarray, confidences: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """True where a sample's combined confidence exceeds its predicted class's threshold."""
    labels = np.asarray(labels).astype(np.int64)
    return np.asarray(confidences) > np.asarray(thresholds)[labels]


def combined_prediction(teacher_logits: torch.Tensor, student_logits: torch.Tensor | None,
                        a: float, mix: Mix = "logits") -> tuple[torch.Tensor, torch.Tensor]:
    """(label, confidence) of the combined prediction, without gradient; the teacher's own
    prediction when there is no student."""
    z_t = teacher_logits.detach()
    z_s = None if student_logits is None else student_logits.detach().to(z_t.dtype)
    if z_s is None:
        p = z_t.softmax(-1)
    elif mix == "logits":
        p = (a * z_t + (1 - a) * z_s).softmax(-1)
    elif mix == "probabilities":
        p = a * z_t.softmax(-1) + (1 - a) * z_s.softmax(-1)
    else:
        raise ValueError(f"mix must be one of {MIXES}, got {mix!r}")
    conf, label = p.max(-1)
    return label, conf
