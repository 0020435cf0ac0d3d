"""Distillation losses: one `Distiller` class per method (mdistiller style) and a plain registry.

Adding a method = one file + one line in `LOSSES`. A config is the job's `loss:` block, e.g.
    {"method": "kd", "T": 4.0, "weights": {"kd": 1.0}}
    {"method": "kd", "extra": [{"method": "confidence_weighted", "weight": 0.5}]}
`extra` methods must compare logits only (kd, confidence_weighted, ce); their terms are scaled by
`weight` and reported as "<method>.<term>".
"""
from __future__ import annotations

from typing import Any

from torch import nn

from .base import Distiller, LogitDistiller, LossConfigError, PoolPass, StepOutput, weighted_mean
from .ce import PseudoLabelCE
from .confidence_weighted import ConfidenceWeightedKD
from .kd import KD
from .kd3 import KD3
from .sakd import SAKD

LOSSES: dict[str, type[Distiller]] = {
    "kd": KD,
    "confidence_weighted": ConfidenceWeightedKD,
    "ce": PseudoLabelCE,
    "kd3": KD3,
    "sakd": SAKD,
}

__all__ = ["Distiller", "LogitDistiller", "LossConfigError", "PoolPass", "StepOutput", "LOSSES", "build_distiller",
           "check_loss_config", "weighted_mean"]

_RESERVED = ("method", "weights", "extra", "weight")


def _split(config: Any, where: str) -> tuple[type[Distiller], dict, dict]:
    """(class, params, weights) of one method's config."""
    if not isinstance(config, dict):
        raise LossConfigError(f"{where} must be a mapping with a 'method', got {type(config).__name__}")
    method = config.get("method")
    if not isinstance(method, str) or method not in LOSSES:
        raise LossConfigError(f"unknown loss method {method!r} in {where} (known: {', '.join(sorted(LOSSES))})")
    params = {k: v for k, v in config.items() if k not in _RESERVED}
    return LOSSES[method], params, config.get("weights") or {}


def _check_teacher(cls: type[Distiller], teacher: nn.Module | None) -> None:
    if cls.needs_live_teacher and teacher is None:
        raise LossConfigError(f"loss {cls.method!r} needs a live teacher (teacher_mode: live)")


def check_loss_config(config: Any) -> list[tuple[type[Distiller], dict, dict, float]]:
    """Everything about a loss config that needs no model: the methods, their parameters and term
    weights, the extras' kinds and weights. (class, params, weights, weight) for the main method
    and each extra; raises LossConfigError in one line. The launcher calls it before torchrun starts,
    so a typo costs one line, not a failed job."""
    cls, params, weights = _split(config, "loss config")
    if "weight" in config:
        raise LossConfigError("'weight' belongs to an 'extra' entry; use 'weights' for the main method's terms")
    cls.resolve_weights(weights, cls.resolve_params(params))  # checked here; the class resolves its own
    parts = [(cls, params, weights, 1.0)]
    extras = config.get("extra") or []
    if not isinstance(extras, list):
        raise LossConfigError("'extra' must be a list of loss configs")
    for i, extra_config in enumerate(extras):
        where = f"extra[{i}]"
        extra_cls, extra_params, extra_weights = _split(extra_config, where)
        if not issubclass(extra_cls, LogitDistiller):
            logit_methods = sorted(m for m, c in LOSSES.items() if issubclass(c, LogitDistiller))
            raise LossConfigError(f"{where}: {extra_cls.method!r} cannot be an extra (only logit methods: "
                                  f"{', '.join(logit_methods)})")
        if "extra" in extra_config:
            raise LossConfigError(f"{where}: extras cannot be nested")
        weight = extra_config.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
            raise LossConfigError(f"{where}: 'weight' must be a number >= 0, got {weight!r}")
        extra_cls.resolve_weights(extra_weights, extra_cls.resolve_params(extra_params))
        parts.append((extra_cls, extra_params, extra_weights, float(weight)))
    return parts


def build_distiller(config: dict, student: nn.Module, teacher: nn.Module | None,
                    num_classes: int) -> Distiller:
    """The configured distiller; the teacher (if any) is frozen: eval mode, no gradients."""
    (cls, params, weights, _), *extras = check_loss_config(config)
    _check_teacher(cls, teacher)
    distiller = cls(student, teacher, num_classes, params, weights)
    for extra_cls, extra_params, extra_weights, weight in extras:
        _check_teacher(extra_cls, teacher)
        distiller.add_extra(weight, extra_cls(student, teacher, num_classes, extra_params, extra_weights))
    if not distiller.term_names():
        raise LossConfigError(f"loss {distiller.method!r}: every term has weight 0, nothing to train")
    return distiller
