"""Student architectures by name: the registry that specs may name without trusting any code.

- `tiny_cnn`, `small_cnn`: the demo's small CNNs (`distill.models`), with the feature API that the
  feature-based losses need (`forward_features`, `pool`, `classifier`).
- `torchvision:<name>`, `timm:<name>`: built (untrained) through `distill.spec`, then given a
  classifier head of `num_classes` outputs.
- `module:factory`: the same, but it imports and runs a module: only with trust_model_code.
- `student_from_spec`: the deployable student that a run's student.json describes (any of the above,
  or KD^3's backbone + projector + classifier), so that it loads with weights_only and keeps its features.
"""
from __future__ import annotations

from collections.abc import Callable

from torch import nn

from curation.errors import WebdistillError

from .models import mnist_teacher, tiny_student
from .spec import ModelSpecError, build_architecture

STUDENTS: dict[str, Callable[[int], nn.Module]] = {
    "tiny_cnn": tiny_student,    # about 17k parameters
    "small_cnn": mnist_teacher,  # the demo teacher's shape, about 65k parameters
}


class StudentError(WebdistillError, ValueError):
    """The student name builds nothing, or its classifier head cannot be sized."""


def _fit_head(model: nn.Module, num_classes: int, name: str) -> nn.Module:
    """Give the model `num_classes` outputs: timm's own API, else replace the last nn.Linear."""
    if hasattr(model, "reset_classifier") and hasattr(model, "get_classifier"):  # timm
        if model.get_classifier().out_features != num_classes:
            model.reset_classifier(num_classes)
        return model
    owner, attr, last = None, None, None
    for _, module in model.named_modules():
        for child_name, child in module.named_children():
            if isinstance(child, nn.Linear):
                owner, attr, last = module, child_name, child
    if last is None:
        raise StudentError(f"student {name!r} has no nn.Linear classifier to resize to {num_classes} classes")
    if last.out_features != num_classes:
        setattr(owner, attr, nn.Linear(last.in_features, num_classes, bias=last.bias is not None))
    return model


def build_student(name: str, num_classes: int, trust_model_code: bool = False) -> nn.Module:
    """An untrained student with `num_classes` outputs, in train mode."""
    if name in STUDENTS:
        return STUDENTS[name](num_classes).train()
    if ":" not in name:
        raise StudentError(f"unknown student {name!r} (known: {', '.join(STUDENTS)}, "
                           "torchvision:<name>, timm:<name>, module:factory)")
    try:
        model = build_architecture(name, trust_model_code)
    except ModelSpecError as exc:
        raise StudentError(f"student {name!r}: {exc}") from exc
    return _fit_head(model, num_classes, name).train()


def _positive_int(cfg: dict, key: str) -> int:
    value = cfg.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 1_000_000:
        raise StudentError(f"{key!r} must be an integer in 1..1000000, got {str(value)[:40]}")
    return value


def student_from_spec(cfg: dict, trust_model_code: bool = False) -> nn.Module:
    """The untrained deployable student of a spec: {"factory": NAME, "num_classes": N} and, for a KD^3
    run, {"kd3": {"teacher_channels": C, "factor": F}} (backbone, projector to the teacher's C
    channels, global average pooling and a linear classifier over C). In eval mode."""
    num_classes = _positive_int(cfg, "num_classes")
    student = build_student(cfg["factory"], num_classes, trust_model_code)
    kd3 = cfg.get("kd3")
    if kd3 is None:
        return student.eval()
    from .losses.kd3 import KD3Student, _out_channels, projector

    if not isinstance(kd3, dict):
        raise StudentError("'kd3' must be an object {teacher_channels, factor}")
    channels, factor = _positive_int(kd3, "teacher_channels"), _positive_int(kd3, "factor")
    if not hasattr(student, "forward_features"):
        raise StudentError(f"student {cfg['factory']!r} has no forward_features for KD^3")
    return KD3Student(student, projector(_out_channels(student), channels, factor), nn.AdaptiveAvgPool2d(1),
                      nn.Linear(channels, num_classes)).eval()


def is_student_name(name: str) -> bool:
    """True for a registry name or a `family:name` architecture name (whether the family has that
    name is checked by `webdistill validate`, and by build_student when the job starts)."""
    family, colon, arch = name.partition(":")
    return name in STUDENTS or bool(colon and family and arch)
