"""Cross-entropy on the teacher's pseudo-labels (argmax of its logits): the hard-label baseline.

Config: {"method": "ce", "weights": {"ce": 1.0}}.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from .base import LogitDistiller, weighted_mean


def pseudo_label_ce_per_sample(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """CE of the student against the teacher's argmax, one value per sample (B,)."""
    return F.cross_entropy(student_logits, teacher_logits.argmax(dim=1), reduction="none")


class PseudoLabelCE(LogitDistiller):
    method = "ce"
    TERMS = {"ce": 1.0}

    def logit_terms(self, student_logits, teacher_logits, sample_weights):
        return self.weighted_terms({
            "ce": lambda: weighted_mean(pseudo_label_ce_per_sample(student_logits, teacher_logits),
                                        sample_weights)})
