"""Student architectures by name.

- `tiny_cnn`, `small_cnn`: the demo's small CNNs (`distill.models`), with the feature API that the
  feature-based losses need (`forward_features`, `pool`, `classifier`).
- `torchvision:<name>`, `timm:<name>`, `module:factory`: built (untrained) through `distill.spec`,
  then given a classifier head of `num_classes` outputs.
"""
from __future__ import annotations

from typing import Callable

from torch import nn

from .models import mnist_teacher, tiny_student
from .spec import ModelSpecError, build_architecture

STUDENTS: dict[str, Callable[[int], nn.Module]] = {
    "tiny_cnn": tiny_student,    # about 17k parameters
    "small_cnn": mnist_teacher,  # the demo teacher's shape, about 65k parameters
}


class StudentError(ValueError):
    """The student name builds nothing, or its classifier head cannot be sized."""


def _fit_head(model: nn.Module, num_classes: int, name: str) -> nn.Module:
    """Give the model `num_classes` outputs: timm's own API, else replace the last nn.Linear."""
    if hasattr(model, "reset_classifier") and hasattr(model, "get_classifier"):  # timm
        if model.get_classifier().out_features != num_classes:
            model.reset_classifier(num_classes)
        return model
    owner, attr, last = None, None, None
    for module_name, module in model.named_modules():
        for child_name, child in module.named_children():
            if isinstance(child, nn.Linear):
                owner, attr, last = module, child_name, child
    if last is None:
        raise StudentError(f"student {name!r} has no nn.Linear classifier to resize to {num_classes} classes")
    if last.out_features != num_classes:
        setattr(owner, attr, nn.Linear(last.in_features, num_classes, bias=last.bias is not None))
    return model


def build_student(name: str, num_classes: int) -> nn.Module:
    """An untrained student with `num_classes` outputs, in train mode."""
    if name in STUDENTS:
        return STUDENTS[name](num_classes).train()
    if ":" not in name:
        raise StudentError(f"unknown student {name!r} (known: {', '.join(STUDENTS)}, "
                           "torchvision:<name>, timm:<name>, module:factory)")
    try:
        model = build_architecture(name)
    except ModelSpecError as exc:
        raise StudentError(f"student {name!r}: {exc}") from exc
    return _fit_head(model, num_classes, name).train()


def is_student_name(name: str) -> bool:
    """True for a registry name or a prefixed architecture name (checked without building it)."""
    return name in STUDENTS or ":" in name
