"""Pluggable image embedders: `open_clip:<model>` (any open_clip model, `pretrained` = a tag or a
local checkpoint) and `teacher` (the teacher's penultimate features, meaningful offline).

An embedder turns PIL images into L2-normalised vectors; CLIP models also embed text.
Preprocessing runs in DataLoader workers, so it must be picklable and model-free.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms

from distill.spec import spec_fingerprint  # noqa: F401 - where the stages import it from

from .errors import WebdistillError, first_line
from .files import file_digest
from .stage_config import check_device
from .workspace import Workspace, check_name

MODEL_CONFIGS = Path(__file__).parent / "model_configs"  # our own open_clip configs (the demo's tiny CLIP)


class EmbedderError(WebdistillError):
    """Unknown embedder, or a model that cannot be built or loaded."""


def _uint8_chw(im: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)


@dataclass
class Geometry:
    """The decode-side half of a model's preprocessing, run in DataLoader workers: decode JPEGs at
    the smallest DCT scale that still covers the input (much less work for small models), resize,
    crop, and hand over uint8 (4x less to pass between processes than float). Scaling and
    normalisation run batched in the main process (`Embedder.encode_images`)."""

    size: int
    resize: Callable[[Image.Image], Image.Image]

    def __call__(self, im: Image.Image) -> torch.Tensor:
        if im.format == "JPEG":
            im.draft("RGB", (self.size, self.size))
        return _uint8_chw(self.resize(im.convert("RGB")))


@dataclass
class SquareResize:
    """Resize to size x size, as `distill.preprocess.image_to_tensor` does for teachers."""

    size: int

    def __call__(self, im: Image.Image) -> Image.Image:
        return im.resize((self.size, self.size), Image.BILINEAR)


class Embedder:
    name: str  # a directory name under embeddings/ and index/
    args: dict  # make_embedder(**args) builds it again (for queries by image or text)
    config: dict  # everything that changes the vectors: part of the artifacts' skip key
    dim: int
    preprocess: Callable[[Image.Image], torch.Tensor]
    device: torch.device = torch.device("cpu")
    precision: str = "fp32"

    def forward_images(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def encode_images(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) uint8 from `preprocess` -> (B, dim) L2-normalised float32, on the CPU."""
        with torch.inference_mode():
            x = x.to(self.device, non_blocking=True).float().div_(255.0)
            mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
            std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
            x = x.sub_(mean).div_(std).contiguous(memory_format=self.memory_format)
            with self._autocast():
                y = self.forward_images(x)
        return F.normalize(y.float(), dim=-1).cpu()

    memory_format = torch.contiguous_format

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        raise EmbedderError(f"embedder {self.name} has no text tower")

    @property
    def has_text(self) -> bool:
        return False

    def _autocast(self):
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        if self.precision == "fp16" and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.float16)
        return torch.autocast(self.device.type, enabled=False)


class OpenClipEmbedder(Embedder):
    def __init__(self, model_name: str, pretrained: str | None, device: str, precision: str):
        import open_clip

        open_clip.add_model_config(MODEL_CONFIGS)
        if model_name not in open_clip.list_models():
            raise EmbedderError(f"unknown open_clip model {model_name!r} (see open_clip.list_models())")
        if pretrained and ("/" in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors"))) \
                and not os.path.isfile(pretrained):
            raise EmbedderError(f"checkpoint not found: {pretrained}")
        if not pretrained:  # the CLI says it in one line of its own
            logging.disable(logging.WARNING)
        try:
            model, _, val_transform = open_clip.create_model_and_transforms(
                model_name, pretrained=pretrained or None, device=device, weights_only=True)
        except RuntimeError as exc:  # an unknown tag, or a checkpoint that does not fit the model
            raise EmbedderError(f"cannot load open_clip {model_name} with pretrained={pretrained}: "
                                f"{first_line(exc)}") from exc
        finally:
            logging.disable(logging.NOTSET)
        self.model = model.eval()
        if type(model.visual).__name__ != "VisionTransformer":  # conv towers run faster channels_last on CPU
            self.memory_format = torch.channels_last
            self.model.visual.to(memory_format=torch.channels_last)
        self.tokenizer = open_clip.get_tokenizer(model_name)
        size = model.visual.image_size
        size = size[0] if isinstance(size, (tuple, list)) else size
        cfg = model.visual.preprocess_cfg
        self.mean, self.std = tuple(cfg["mean"]), tuple(cfg["std"])
        geometric = ("Resize", "CenterCrop", "ResizeKeepRatio")
        geometry = [t for t in val_transform.transforms if type(t).__name__ in geometric]
        self.preprocess = Geometry(int(size), transforms.Compose(geometry))
        self.device, self.precision = torch.device(device), precision
        self.dim = int(self.encode_images(torch.zeros(1, 3, size, size, dtype=torch.uint8)).shape[1])
        self.name = "open_clip-" + model_name
        self.args = {"name": f"open_clip:{model_name}", "pretrained": pretrained, "precision": precision}
        weights = "sha256:" + file_digest(pretrained) if pretrained and os.path.isfile(pretrained) else pretrained
        self.config = {"embedder": "open_clip", "model": model_name, "pretrained": weights, "precision": precision}

    def forward_images(self, x):
        return self.model.encode_image(x)

    @property
    def has_text(self) -> bool:
        return True

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        with torch.inference_mode():
            y = self.model.encode_text(self.tokenizer(texts).to(self.device))
        return F.normalize(y.float(), dim=-1).cpu()


class TeacherEmbedder(Embedder):
    """Pooled features of the teacher, whatever its model file (curation/feature_taps.py): by default
    its penultimate features (the input of its classifier); with `feature_layers`, each named layer's
    vector L2-normalised, then concatenated (every layer weighs the same)."""

    def __init__(self, teacher_spec: str, device: str, precision: str, trust_model_code: bool = False,
                 feature_layers: tuple[str, ...] | list[str] | str | None = None):
        from distill.spec import ModelSpecError, load_model

        from .feature_taps import PENULTIMATE, LayerNotFound, check_layer_names, feature_taps

        try:
            layers = check_layer_names(feature_layers or (PENULTIMATE,))
            loaded = load_model(teacher_spec, trust_model_code)
        except (ModelSpecError, ValueError) as exc:
            raise EmbedderError(str(exc)) from exc
        self.model = loaded.module.to(device)
        if loaded.eager:  # a compiled graph (.pt2, TorchScript) keeps the layout it was exported with
            self.memory_format = torch.channels_last
            self.model.to(memory_format=torch.channels_last)
        self.taps = feature_taps(self.model, loaded.input_size)
        try:
            self.layers = self.taps.resolve(list(layers))
        except LayerNotFound as exc:
            raise EmbedderError(f"the teacher embedder: {exc}") from None
        self.preprocess = Geometry(loaded.input_size, SquareResize(loaded.input_size))
        self.mean, self.std = tuple(loaded.mean), tuple(loaded.std)
        self.device, self.precision = torch.device(device), precision
        size = loaded.input_size
        self.dim = int(self.encode_images(torch.zeros(1, 3, size, size, dtype=torch.uint8)).shape[1])
        self.name = "teacher"
        chosen = None if feature_layers is None else list(layers)  # the default stays out of the records
        self.args = {"name": "teacher", "teacher": teacher_spec, "precision": precision, "feature_layers": chosen}
        self.config = {"embedder": "teacher", "spec": spec_fingerprint(teacher_spec), "precision": precision} | (
            {"feature_layers": chosen} if chosen else {})

    def forward_images(self, x):
        with torch.inference_mode():
            _, pooled = self.taps(x, self.layers)
        vectors = [pooled[n].float() for n in self.layers]
        return vectors[0] if len(vectors) == 1 else torch.cat([F.normalize(v, dim=-1) for v in vectors], -1)


def make_embedder(name: str, pretrained: str | None = None, teacher: str | None = None,
                  device: str | None = None, precision: str = "fp32", trust_model_code: bool = False,
                  feature_layers: tuple[str, ...] | list[str] | str | None = None) -> Embedder:
    """`open_clip:<model>` or `teacher` (with `teacher` = a model spec; TorchScript or a factory outside
    the allowlist only with `trust_model_code`; `feature_layers`: the teacher's layers, default its
    penultimate features)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        check_device(device)
    except ValueError as exc:
        raise EmbedderError(str(exc)) from None
    if feature_layers is not None and name != "teacher":
        raise EmbedderError("--feature-layers is an option of --embedder teacher")
    if name.startswith("open_clip:"):
        return OpenClipEmbedder(name.split(":", 1)[1], pretrained, device, precision)
    if name == "teacher":
        if not teacher:
            raise EmbedderError("the teacher embedder needs --teacher SPEC")
        return TeacherEmbedder(teacher, device, precision, trust_model_code, feature_layers)
    raise EmbedderError(f"unknown embedder {name!r}: use open_clip:<model name> or teacher")


def embedder_dir_name(name: str) -> str:
    """`open_clip:ViT-S-32` and `open_clip-ViT-S-32` both name the artifacts of that embedder; a name
    that is not one plain folder name (`../x`, `open_clip:a/b`) is refused (UnsafeName)."""
    return check_name(name.replace(":", "-", 1) if isinstance(name, str) else name, "embedder")


def embedder_from_workspace(ws_root: Path, name: str, device: str | None = None,
                            trust_model_code: bool = False) -> Embedder:
    """Rebuild the embedder that wrote a workspace's embeddings, from the args stored with them (a
    workspace from elsewhere names the model: its code runs only with `trust_model_code`)."""
    import pyarrow.parquet as pq

    folder = Workspace(ws_root).owned("embeddings", embedder_dir_name(name))
    first = next(iter(sorted(folder.glob("*.parquet"))), None)
    if first is None:
        raise EmbedderError(Workspace(ws_root).no_embeddings(name))
    import json

    try:
        meta = json.loads((pq.read_schema(first).metadata or {}).get(b"args", b"null"))
    except ValueError:
        meta = None
    layers = meta.get("feature_layers") if isinstance(meta, dict) else None
    if not isinstance(meta, dict) or not isinstance(meta.get("name"), str) or not all(
            isinstance(meta.get(k), (str, type(None))) for k in ("pretrained", "teacher", "precision")) or not (
            layers is None or (isinstance(layers, list) and all(isinstance(n, str) for n in layers))):
        raise EmbedderError(f"embeddings for {name!r} do not record how they were made; embed again")
    return make_embedder(meta["name"], meta.get("pretrained"), meta.get("teacher"), device,
                         meta.get("precision") or "fp32",
                         trust_model_code, layers)
