"""Hinton et al.'s KD, with Begon & Geurts' "better learning signal" options.

    kd  = T^2 * KL(softmax(z_T/T) || softmax(z_S/T))      (per sample, then the weighted mean)
    mse = mean_c (z_S - z_T)^2                            (`mse: true`: logit matching, T unused)

Config: {"method": "kd", "T": 4.0, "mse": false, "weights": {"kd": 1.0}}.
"""
from __future__ import annotations

from typing import Annotated

import torch.nn.functional as F
from torch import Tensor

from .base import LogitDistiller, LossParams, Positive, weighted_mean


def kd_per_sample(student_logits: Tensor, teacher_logits: Tensor, T: float) -> Tensor:
    """T^2 * KL(p_T || p_S) at temperature T, one value per sample (B,)."""
    log_p_s = F.log_softmax(student_logits / T, dim=1)
    log_p_t = F.log_softmax(teacher_logits / T, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="none", log_target=True).sum(dim=1) * (T * T)


def logit_mse_per_sample(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Mean squared difference of the raw logits, one value per sample (B,)."""
    return (student_logits - teacher_logits).pow(2).mean(dim=1)


class KD(LogitDistiller):
    method = "kd"
    TERMS = {"kd": 1.0}

    class Params(LossParams):
        T: Annotated[float, Positive] = 4.0
        mse: bool = False

    def per_sample(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        if self.params["mse"]:
            return logit_mse_per_sample(student_logits, teacher_logits)
        return kd_per_sample(student_logits, teacher_logits, self.params["T"])

    def logit_terms(self, student_logits, teacher_logits, sample_weights):
        return self.weighted_terms({
            "kd": lambda: weighted_mean(self.per_sample(student_logits, teacher_logits), sample_weights)})
