"""Loading a teacher or student from a spec string. Nothing that came with a model file runs unless
the user trusts it (`trust_model_code`, the CLI's --trust-model-code).

A spec is one of:
    path/to/spec.json               {"factory": NAME, "weights": "w.pt", "input_size": 32, "mean": [...],
                                     "std": [...], "classes": [...], "num_classes": N}  (paths relative to the json)
    path/to/model.pt2               a torch.export program (preprocessing from a .json beside it, if any)
    torchvision:resnet18[@w.pt]     a torchvision architecture name, and optionally a state_dict
    timm:resnet18[@w.pt]            a timm architecture name (needs timm installed)
    module:factory[@weights.pt]     a Python factory
    path/to/model.torchscript.pt    a TorchScript file

Loaded without trust: state_dicts (torch.load weights_only=True), .pt2 programs (checked before torch
reads them, see `distill.model_files`), JSON specs, and factories on the allowlist: the student registry
(`distill.students.STUDENTS`), the demo's factories (PROJECT_FACTORIES) and torchvision:/timm:
architecture names. A TorchScript file runs its own code (it can read and write files when loaded and
run) and any other module:factory imports and runs a module: both need trust, else UntrustedModelCode
says why. A .pt2 that fails the checks loads, unchecked, only with trust too. A JSON spec's factory
follows the same rules; with "num_classes" it names a student, built by
`distill.students.student_from_spec` (registry names, a resized head, KD^3's deployable student).
"""
from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from curation.errors import first_line
from curation.files import file_digest

from .model_files import (
    ModelSpecError,
    UntrustedModelCode,
    archive_kind,
    check_zip,
    load_exported_program,
    load_state_dict,
    load_torchscript,
    read_json_object,
    read_model_file,
    trust_hint,
)
from .models import mnist_teacher, tiny_student

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "LoadedModel", "ModelSpecError", "PROJECT_FACTORIES", "UntrustedModelCode",
           "build_architecture", "load_model", "load_state_dict", "spec_files"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


PROJECT_FACTORIES = {  # the project's own factories that JSON specs it writes name (the demo teacher's)
    "distill.models:mnist_teacher": mnist_teacher,
    "distill.models:tiny_student": tiny_student,
}
MAX_INPUT_SIZE = 4096  # a sidecar's input_size: images are resized to it, so it bounds memory


@dataclass
class LoadedModel:
    module: nn.Module
    spec: str
    input_size: int = 224
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    classes: list[str] = field(default_factory=list)
    kind: str = "module"  # "module" (built here), "pt2" (torch.export) or "torchscript"

    @property
    def eager(self) -> bool:
        """A module built from Python classes (hooks and submodules work), not a compiled graph."""
        return self.kind == "module"


def _run_factory(fn, name: str) -> nn.Module:
    try:
        model = fn()
    except Exception as exc:  # noqa: BLE001 - a (trusted) factory may raise anything
        raise ModelSpecError(f"factory {name!r} failed: {type(exc).__name__}: {str(exc)[:200]}") from exc
    if not isinstance(model, nn.Module):
        raise ModelSpecError(f"factory {name!r} gave a {type(model).__name__}, not a torch nn.Module")
    return model


def build_architecture(name: str, trust_model_code: bool = False) -> nn.Module:
    """An untrained model from an architecture name: torchvision:NAME, timm:NAME, a project factory, or
    (trusted only) any module:factory."""
    if name.startswith("torchvision:"):
        import torchvision

        arch = name.split(":", 1)[1]
        if arch not in torchvision.models.list_models():
            raise ModelSpecError(f"unknown torchvision architecture {name!r}")
        return _run_factory(lambda: torchvision.models.get_model(arch, weights=None), name)
    if name.startswith("timm:"):
        try:
            import timm
        except ImportError as exc:
            raise ModelSpecError("timm specs need `pip install timm`") from exc
        arch = name.split(":", 1)[1]
        if arch not in timm.list_models():  # plain names only: no hf-hub: or local-dir: configs
            raise ModelSpecError(f"unknown timm architecture {name!r}")
        return _run_factory(lambda: timm.create_model(arch, pretrained=False), name)
    if name in PROJECT_FACTORIES:
        return _run_factory(PROJECT_FACTORIES[name], name)
    module_name, _, fn_name = name.partition(":")
    if not module_name or not fn_name:
        raise ModelSpecError(f"not a model spec: {name!r} (expected a .json, a .pt2, torchvision:NAME, "
                             "timm:NAME or module:factory)")
    if not trust_model_code:
        raise UntrustedModelCode(f"factory {name!r} would import and run module {module_name!r}, which is not on "
                                 "the allowlist (the student registry, distill.models factories, torchvision:NAME, "
                                 f"timm:NAME); {trust_hint()}")
    try:
        fn = getattr(importlib.import_module(module_name), fn_name)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ModelSpecError(f"cannot import {name!r}: {exc}") from exc
    return _run_factory(fn, name)


def _with_weights(model: nn.Module, weights: str | Path | None, spec: str) -> nn.Module:
    if weights is not None:
        state = load_state_dict(weights)
        try:
            model.load_state_dict(state)
        except (RuntimeError, TypeError, ValueError, AttributeError, KeyError) as exc:  # keys, shapes, non-tensors
            raise ModelSpecError(f"weights {weights} do not fit {spec}: {first_line(exc, 300)}") from exc
    return model.eval()


def _number_list(cfg: dict, key: str, default: tuple, where) -> tuple[float, ...]:
    value = cfg.get(key, default)
    if (not isinstance(value, (list, tuple)) or len(value) != 3
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
            or (key == "std" and min(value) <= 0)):
        raise ModelSpecError(f"{where}: {key!r} must be 3 finite numbers" + (" > 0" if key == "std" else "")
                             + f", got {str(value)[:80]}")
    return tuple(float(v) for v in value)


def _preprocessing(cfg: dict, where) -> dict:
    """input_size, mean, std and classes from a spec or sidecar, checked (they come with the model)."""
    size = cfg.get("input_size", 224)
    if not isinstance(size, int) or isinstance(size, bool) or not 1 <= size <= MAX_INPUT_SIZE:
        raise ModelSpecError(f"{where}: 'input_size' must be an integer in 1..{MAX_INPUT_SIZE}, got {str(size)[:40]}")
    classes = cfg.get("classes", [])
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise ModelSpecError(f"{where}: 'classes' must be a list of strings")
    return {"input_size": size, "mean": _number_list(cfg, "mean", IMAGENET_MEAN, where),
            "std": _number_list(cfg, "std", IMAGENET_STD, where), "classes": list(classes)}


def _from_json(path: Path, spec: str, trust_model_code: bool) -> LoadedModel:
    cfg = read_json_object(path, "model spec")
    factory, weights = cfg.get("factory"), cfg.get("weights")
    if not isinstance(factory, str) or not factory:
        raise ModelSpecError(f"{path}: 'factory' must be a non-empty string")
    if weights is not None and (not isinstance(weights, str) or not weights):
        raise ModelSpecError(f"{path}: 'weights' must be a file name relative to the spec")
    prep = _preprocessing(cfg, path)
    from .students import STUDENTS, StudentError, student_from_spec

    if "num_classes" in cfg or factory in STUDENTS:  # a student: the registry builds it
        try:
            model = student_from_spec(cfg, trust_model_code)
        except StudentError as exc:
            raise ModelSpecError(f"{path}: {exc}") from exc
    else:
        model = build_architecture(factory, trust_model_code)
    model = _with_weights(model, path.parent / weights if weights else None, spec)
    return LoadedModel(model, spec, **prep)


def _sidecar(path: Path) -> dict:
    """Preprocessing for a model file: from NAME.json beside it, else teacher.json, else the defaults."""
    for candidate in (path.with_suffix(".json"), path.parent / "teacher.json"):
        if candidate.is_file():  # is_file: a FIFO or folder of that name is not read
            return _preprocessing(read_json_object(candidate, "preprocessing sidecar"), candidate)
    return _preprocessing({}, path)


def _from_file(path: Path, spec: str, trust_model_code: bool) -> LoadedModel:
    data = read_model_file(path)
    kind = archive_kind(check_zip(data, f"model file {path}"))
    if kind == "torchscript" and not trust_model_code:
        raise UntrustedModelCode(f"{path} is TorchScript, which runs its own code when loaded and run (it can read "
                                 f"and write files); use a .pt2 export or a .json spec, or {trust_hint()}")
    if kind == "state_dict":
        raise ModelSpecError(f"{path} holds weights only: use a .json spec or ARCH@{path} "
                             "(e.g. torchvision:resnet18@weights.pt)")
    prep = _sidecar(path)
    module = (load_exported_program(data, path, prep["input_size"], checked=not trust_model_code) if kind == "pt2"
              else load_torchscript(data, path))
    return LoadedModel(module.eval(), spec, kind=kind, **prep)


def load_model(spec: str, trust_model_code: bool = False) -> LoadedModel:
    """Load a model from a spec string (see the module docstring). Always in eval mode, on the CPU."""
    path = Path(spec)
    if path.suffix == ".json" or path.exists() or path.is_symlink():
        return _from_json(path, spec, trust_model_code) if path.suffix == ".json" else \
            _from_file(path, spec, trust_model_code)
    name, _, weights = spec.partition("@")
    if ":" not in name:
        raise ModelSpecError(f"model spec not found: {spec}")
    return LoadedModel(_with_weights(build_architecture(name, trust_model_code), weights or None, spec), spec)


def spec_files(spec: str) -> list[Path]:
    """The files a spec reads (the spec, its weights), for fingerprints; nothing is loaded."""
    path = Path(spec)
    if path.suffix == ".json" and path.is_file():
        weights = read_json_object(path, "model spec").get("weights")
        return [path] + ([path.parent / weights] if isinstance(weights, str) and weights else [])
    if path.is_file():
        return [path]
    _, at, weights = spec.partition("@")
    return [Path(weights)] if at and weights else []


def spec_fingerprint(spec: str) -> str:
    """A model spec by content: the bytes of the files it reads (the spec, its weights), plus the
    architecture name of an `ARCH@weights` spec. Retraining a teacher in place changes it; moving
    it does not."""
    files = [f for f in spec_files(spec) if f.is_file()]
    name = "" if Path(spec).is_file() else spec.partition("@")[0]
    return name + "|" + "|".join("sha256:" + file_digest(f) for f in files)


def by_content(value: str) -> str:
    """A model spec or data file as the bytes it reads, anything else (tiny_cnn, a brace pattern) as
    itself: what a job reads, wherever the workspace and its files were copied or moved."""
    return spec_fingerprint(value) if any(f.is_file() for f in spec_files(value)) else value
