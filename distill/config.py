"""The distillation job's config: a YAML or JSON file, checked key by key.

Relative paths in the file (`selection`, `eval`, `out`, a file `teacher` spec) are taken relative
to the config file's folder, as a spec.json's weights are relative to the json: the same config runs
the same way from any working directory (and a rerun finds its checkpoint).

Example:
    selection: ../workspace/selections/digits/manifest.json
    student: tiny_cnn
    teacher_mode: stored          # logits from the shards; `live` runs the teacher (feature losses)
    loss: {method: kd, T: 4.0}
    epochs: 10
    batch_size: 64
    out: ../workspace/students/digits-kd
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml
from braceexpand import braceexpand

from curation.errors import WebdistillError, first_line
from curation.files import is_remote

from .students import STUDENTS, is_student_name


class ConfigError(WebdistillError, ValueError):
    """A config key is unknown, missing, or has a value that does not fit. One line, naming the key."""


OPTIMIZERS = ("sgd", "adamw")
TEACHER_MODES = ("stored", "live")
LR_SCHEDULES = ("cosine", "constant")
# Keys that do not change what is trained: a rerun may change them and still resume its checkpoint.
RUNTIME_KEYS = ("out", "eval", "eval_batch_size", "checkpoint_every", "log_every", "progress", "threads", "name",
                "trust_model_code", "collective_timeout_s")


@dataclass
class DistillConfig:
    selection: str                      # a curated selection's manifest.json (or its folder)
    student: str                        # a name in distill.students (tiny_cnn, torchvision:resnet18, ...)
    out: str                            # run folder: checkpoint, metrics.jsonl, exports, summary.json
    loss: dict = field(default_factory=lambda: {"method": "kd"})
    teacher: str | None = None          # model spec; default: the manifest's teacher
    teacher_mode: str = "stored"
    epochs: int = 10
    samples_per_epoch: int | None = None  # per rank; default: manifest total // world size
    batch_size: int = 64                # per rank
    lr: float = 0.05
    lr_schedule: str = "cosine"         # cosine decay to 0 over all steps, per step
    optimizer: str = "sgd"
    momentum: float = 0.9               # sgd only
    weight_decay: float = 5e-4
    seed: int = 0
    workers: int = 2                    # DataLoader workers per rank (0: decode in the training process)
    shuffle_buffer: int = 1000          # samples per worker's shuffle buffer
    eval: str | list[str] | None = None  # labelled WebDataset shards (image + cls): path, brace pattern or list
    eval_batch_size: int = 256
    checkpoint_every: int = 200         # steps; also at every epoch end and on exit
    log_every: int = 10                 # steps between metrics.jsonl lines
    input_size: int | None = None       # preprocessing; default: manifest, then the teacher spec
    mean: list[float] | None = None
    std: list[float] | None = None
    use_sample_weights: bool = True     # weight each sample's loss terms by the selection's `weight`
    find_unused_parameters: bool | None = None  # DDP; default: off for logit-only losses, on for feature losses
    threads: int | None = None          # torch intra-op threads per rank (default: torch's, 1 under torchrun)
    collective_timeout_s: float = 300.0  # a rank that waits longer on the others (one hung or dead) fails the job
    progress: bool = True               # tqdm bar on rank 0
    name: str | None = None             # run name in summary.json; default: the out folder's name
    init_from: str | None = None        # start from these weights: a previous run's student.pt (rounds)
    trust_model_code: bool = False      # let the teacher/student specs run code (TorchScript, any module:factory)

    @property
    def out_dir(self) -> Path:
        return Path(self.out)

    @property
    def run_name(self) -> str:
        return self.name or self.out_dir.name

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def trajectory_hash(self) -> str:
        """A hash of everything that decides the data order and the loss trajectory."""
        keep = {k: v for k, v in self.to_dict().items() if k not in RUNTIME_KEYS}
        return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]


_REQUIRED = [f.name for f in fields(DistillConfig) if f.default is dataclasses.MISSING
             and f.default_factory is dataclasses.MISSING]


_BAD = object()


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# How each annotation of DistillConfig's fields is checked: (value -> coerced value or _BAD, description).
_KINDS: dict[str, tuple[Callable[[Any], Any], str]] = {
    "int": (lambda v: v if isinstance(v, int) and not isinstance(v, bool) else _BAD, "an integer"),
    "float": (lambda v: float(v) if _number(v) else _BAD, "a number"),
    "bool": (lambda v: v if isinstance(v, bool) else _BAD, "true or false"),
    "str": (lambda v: v if isinstance(v, str) and v else _BAD, "a non-empty string"),
    "dict": (lambda v: v if isinstance(v, dict) else _BAD, "a mapping"),
    "list[float]": (lambda v: [float(x) for x in v] if isinstance(v, (list, tuple)) and len(v) == 3
                    and all(map(_number, v)) else _BAD, "a list of 3 numbers"),
    "list[str]": (lambda v: list(v) if isinstance(v, list) and v and all(isinstance(x, str) and x for x in v)
                  else _BAD, "a list of strings"),
}
_FIELD_KINDS = {f.name: [k.strip() for k in str(f.type).split("|")] for f in fields(DistillConfig)}


def _type_ok(name: str, value: Any) -> Any:
    """The value coerced where harmless (int -> float), else a ConfigError naming the key."""
    kinds = _FIELD_KINDS[name]
    if value is None and "None" in kinds:
        return None
    for kind in kinds:
        if kind != "None" and (coerced := _KINDS[kind][0](value)) is not _BAD:
            return coerced
    wanted = " or ".join(_KINDS[k][1] for k in kinds if k != "None")
    raise ConfigError(f"config key {name!r} must be {wanted}, got {value!r}")


def _check_ranges(cfg: DistillConfig) -> None:
    def positive(*names: str) -> None:
        for n in names:
            v = getattr(cfg, n)
            if v is not None and v <= 0:
                raise ConfigError(f"config key {n!r} must be > 0, got {v}")

    positive("epochs", "samples_per_epoch", "batch_size", "lr", "shuffle_buffer", "eval_batch_size",
             "checkpoint_every", "log_every", "input_size", "threads", "collective_timeout_s")
    for name, allowed in (("optimizer", OPTIMIZERS), ("teacher_mode", TEACHER_MODES), ("lr_schedule", LR_SCHEDULES)):
        if getattr(cfg, name) not in allowed:
            raise ConfigError(f"config key {name!r} must be one of {', '.join(allowed)}, got {getattr(cfg, name)!r}")
    for name in ("workers", "weight_decay", "momentum", "seed"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"config key {name!r} must be >= 0, got {getattr(cfg, name)}")
    if cfg.std is not None and any(s <= 0 for s in cfg.std):
        raise ConfigError(f"config key 'std' must be positive, got {cfg.std}")
    if not is_student_name(cfg.student):
        raise ConfigError(f"config key 'student': unknown student {cfg.student!r} (known: {', '.join(STUDENTS)}, "
                          "torchvision:<name>, timm:<name>, module:factory)")
    if not isinstance(cfg.loss.get("method"), str):
        raise ConfigError("config key 'loss' needs a 'method' (kd, kd3, sakd, confidence_weighted, ...)")
    if cfg.samples_per_epoch is not None and cfg.samples_per_epoch < cfg.batch_size:
        raise ConfigError(f"config key 'samples_per_epoch' ({cfg.samples_per_epoch}) is below "
                          f"'batch_size' ({cfg.batch_size}): an epoch would have no step")


def _resolve_paths(cfg: DistillConfig, base: Path) -> None:
    def resolve(p: str) -> str:
        if is_remote(p):
            return p
        p = p.removeprefix("file://")  # a local path spelled as a URL
        return str((base / Path(p).expanduser()).resolve()) if not Path(p).expanduser().is_absolute() else p

    cfg.out = resolve(cfg.out)
    if Path(cfg.out).is_symlink():  # the job writes (and a changed run deletes) there: only what the config says
        raise ConfigError(f"config key 'out': {cfg.out} is a symlink; give the folder itself")
    selection = Path(resolve(cfg.selection))
    cfg.selection = str(selection / "manifest.json" if selection.is_dir() else selection)
    if not Path(cfg.selection).is_file():
        raise ConfigError(f"config key 'selection': no manifest at {cfg.selection}")
    if cfg.eval is not None:
        cfg.eval = [resolve(p) for p in cfg.eval] if isinstance(cfg.eval, list) else resolve(cfg.eval)
        for pattern in cfg.eval if isinstance(cfg.eval, list) else [cfg.eval]:
            for shard in braceexpand(pattern):  # local shards are checked now, not after an epoch of training
                if not is_remote(shard) and not Path(shard).is_file():
                    raise ConfigError(f"config key 'eval': shard not found: {shard}")
    if cfg.init_from is not None:
        cfg.init_from = resolve(cfg.init_from)
        if not Path(cfg.init_from).is_file():
            raise ConfigError(f"config key 'init_from': no weights at {cfg.init_from}")
    if cfg.teacher is not None:
        # A file spec (spec.json, TorchScript, factory@weights) may be relative to the config.
        name, at, weights = cfg.teacher.partition("@")
        if at:
            cfg.teacher = f"{name}@{resolve(weights)}"
        elif (base / cfg.teacher).is_file():
            cfg.teacher = resolve(cfg.teacher)


def config_from_dict(raw: Any, base: str | Path = ".") -> DistillConfig:
    """Check a parsed config (unknown keys, types, ranges, the manifest's existence) and resolve its paths."""
    if not isinstance(raw, dict):
        raise ConfigError(f"a config must be a mapping of keys to values, got {type(raw).__name__}")
    known = {f.name for f in fields(DistillConfig)}
    for key in raw:
        if key not in known:
            raise ConfigError(f"unknown config key {key!r} (known: {', '.join(sorted(known))})")
    for key in _REQUIRED:
        if raw.get(key) is None:
            raise ConfigError(f"config key {key!r} is required")
    cfg = DistillConfig(**{k: _type_ok(k, v) for k, v in raw.items()})
    _check_ranges(cfg)
    _resolve_paths(cfg, Path(base))
    return cfg


def load_config(path: str | Path) -> DistillConfig:
    """A config from a .yaml/.yml/.json file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    text = path.read_text()
    try:
        raw = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        kind = "JSON" if path.suffix == ".json" else "YAML"
        raise ConfigError(f"{path} is not valid {kind}: {first_line(exc)}") from exc
    return config_from_dict(raw, path.resolve().parent)


def write_config(cfg: DistillConfig | dict, path: str | Path) -> Path:
    """Write a config as JSON (what `webdistill distill` and the tests hand to the job)."""
    path = Path(path)
    data = cfg.to_dict() if isinstance(cfg, DistillConfig) else cfg
    path.write_text(json.dumps(data, indent=2))
    return path
