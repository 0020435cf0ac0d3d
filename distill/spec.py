"""Loading a teacher or student from a spec string. Weights load with `weights_only=True`.

A spec is one of:
    path/to/spec.json               {"factory": "module:fn", "weights": "w.pt", "input_size": 32,
                                     "mean": [...], "std": [...], "classes": [...]}  (paths relative to the json)
    path/to/model.torchscript.pt    a TorchScript file (preprocessing from a .json beside it, if any)
    module:factory[@weights.pt]     a Python factory and, optionally, a state_dict
    torchvision:resnet18[@w.pt]     a torchvision architecture name
    timm:resnet18[@w.pt]            a timm architecture name (needs timm installed)
"""
from __future__ import annotations

import importlib
import json
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ModelSpecError(ValueError):
    """The spec names nothing loadable, or its weights are unsafe or do not fit."""


@dataclass
class LoadedModel:
    module: nn.Module
    spec: str
    input_size: int = 224
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    classes: list[str] = field(default_factory=list)
    scripted: bool = False


def load_state_dict(path: str | Path) -> dict:
    """A state_dict from disk, refusing any pickle that carries code."""
    path = Path(path)
    if not path.is_file():
        raise ModelSpecError(f"weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ModelSpecError(f"{path} is not a plain state_dict: it would need code to unpickle, which is "
                             "refused (torch.load weights_only=True)") from exc
    except (RuntimeError, EOFError, zipfile.BadZipFile) as exc:
        raise ModelSpecError(f"cannot read weights {path}: {str(exc).splitlines()[0]}") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]  # common checkpoint layout
    if not isinstance(state, dict):
        raise ModelSpecError(f"{path} holds a {type(state).__name__}, not a state_dict")
    return state


def build_architecture(name: str) -> nn.Module:
    """An untrained model from an architecture name: torchvision:NAME, timm:NAME or module:factory."""
    if name.startswith("torchvision:"):
        import torchvision

        try:
            return torchvision.models.get_model(name.split(":", 1)[1], weights=None)
        except ValueError as exc:
            raise ModelSpecError(f"unknown torchvision architecture {name!r}") from exc
    if name.startswith("timm:"):
        try:
            import timm
        except ImportError as exc:
            raise ModelSpecError("timm specs need `pip install timm`") from exc
        return timm.create_model(name.split(":", 1)[1], pretrained=False)
    module_name, _, fn_name = name.partition(":")
    if not fn_name:
        raise ModelSpecError(f"not a model spec: {name!r} (expected a .json, a TorchScript file, or module:factory)")
    try:
        fn = getattr(importlib.import_module(module_name), fn_name)
    except (ImportError, AttributeError) as exc:
        raise ModelSpecError(f"cannot import {name!r}: {exc}") from exc
    return fn()


def _is_torchscript(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as zf:
            return any(n.endswith("constants.pkl") or "/code/" in n for n in zf.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def _with_weights(model: nn.Module, weights: str | Path | None, spec: str) -> nn.Module:
    if weights is not None:
        try:
            model.load_state_dict(load_state_dict(weights))
        except RuntimeError as exc:  # missing / unexpected keys, shape mismatch
            raise ModelSpecError(f"weights {weights} do not fit {spec}: {str(exc).splitlines()[0]}") from exc
    return model.eval()


def load_model(spec: str) -> LoadedModel:
    """Load a model from a spec string (see the module docstring). Always in eval mode, on the CPU."""
    path = Path(spec)
    if path.suffix == ".json" and path.is_file():
        try:
            cfg = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ModelSpecError(f"{path} is not valid JSON: {exc}") from exc
        if "factory" not in cfg:
            raise ModelSpecError(f"{path} has no 'factory'")
        weights = path.parent / cfg["weights"] if cfg.get("weights") else None
        model = _with_weights(build_architecture(cfg["factory"]), weights, spec)
        return LoadedModel(model, spec, int(cfg.get("input_size", 224)), tuple(cfg.get("mean", IMAGENET_MEAN)),
                           tuple(cfg.get("std", IMAGENET_STD)), list(cfg.get("classes", [])))
    if path.is_file():
        if not _is_torchscript(path):
            raise ModelSpecError(f"{path} is neither a TorchScript file nor a .json spec; "
                                 "for a state_dict, use module:factory@weights.pt")
        module = torch.jit.load(str(path), map_location="cpu").eval()
        sidecar = next((p for p in (path.with_suffix(".json"), path.parent / "teacher.json") if p.is_file()), None)
        cfg = json.loads(sidecar.read_text()) if sidecar else {}
        return LoadedModel(module, spec, int(cfg.get("input_size", 224)), tuple(cfg.get("mean", IMAGENET_MEAN)),
                           tuple(cfg.get("std", IMAGENET_STD)), list(cfg.get("classes", [])), scripted=True)
    name, _, weights = spec.partition("@")
    if ":" not in name:
        raise ModelSpecError(f"model spec not found: {spec}")
    return LoadedModel(_with_weights(build_architecture(name), weights or None, spec), spec)
