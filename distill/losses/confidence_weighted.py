"""KD weighted per sample by the teacher's confidence: OUR INTERPRETATION of Nguyen et al.'s loss.

Nguyen et al. distil on data the teacher classifies confidently; their exact loss formula is not
available to us, so this is a reading of it, not a reproduction:

    l_i = c_i * T^2 * KL(softmax(z_T,i/T) || softmax(z_S,i/T)),   c_i = max_c softmax(z_T,i)_c

with `c_i` the teacher's maximum softmax probability at temperature 1 (no gradient), so that
samples the teacher is unsure about (off its training distribution) teach less. The batch loss
is `sum(w_i*l_i)/sum(w_i)` with the selection's sample weights `w_i` (all 1 without them); it is
not renormalised by `sum(c_i)`, so a batch of unsure samples gives a smaller loss.

Config: {"method": "confidence_weighted", "T": 4.0, "weights": {"kd": 1.0}}.
"""
from __future__ import annotations

from typing import Annotated

import torch
from torch import Tensor

from .base import LogitDistiller, LossParams, Positive, weighted_mean
from .kd import kd_per_sample


def teacher_confidence(teacher_logits: Tensor) -> Tensor:
    """max softmax probability per sample (B,), detached."""
    return torch.softmax(teacher_logits.detach(), dim=1).amax(dim=1)


class ConfidenceWeightedKD(LogitDistiller):
    method = "confidence_weighted"
    TERMS = {"kd": 1.0}

    class Params(LossParams):
        T: Annotated[float, Positive] = 4.0

    def logit_terms(self, student_logits, teacher_logits, sample_weights):
        def loss() -> Tensor:
            per_sample = kd_per_sample(student_logits, teacher_logits, self.params["T"])
            return weighted_mean(teacher_confidence(teacher_logits) * per_sample, sample_weights)
        return self.weighted_terms({"kd": loss})
