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

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from braceexpand import braceexpand
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    field_validator,
    model_validator,
)

from curation.config_errors import validation_line
from curation.errors import WebdistillError, first_line
from curation.files import is_remote

from .losses import LOSSES, check_loss_config
from .students import STUDENTS, is_student_name


class ConfigError(WebdistillError, ValueError):
    """A config key is unknown, missing, or has a value that does not fit. One line, naming the key."""


# Keys that do not change what is trained: a rerun may change them and still resume its checkpoint.
RUNTIME_KEYS = ("out", "eval", "eval_batch_size", "checkpoint_every", "log_every", "progress", "threads", "name",
                "trust_model_code", "collective_timeout_s")

Text = Annotated[str, Field(min_length=1)]
PerChannel = Field(min_length=3, max_length=3)  # mean, std: one value per RGB channel


class DistillConfig(BaseModel):
    # strict: an int is not a bool, "3" is not a number; an int where a float goes is taken as a float
    model_config = ConfigDict(extra="forbid", strict=True)

    selection: Text                     # a curated selection's manifest.json (or its folder)
    student: Text                       # a name in distill.students (tiny_cnn, torchvision:resnet18, ...)
    out: Text                           # run folder: checkpoint, metrics.jsonl, exports, summary.json
    loss: dict = Field(default_factory=lambda: {"method": "kd"})
    teacher: Text | None = None         # model spec; default: the manifest's teacher
    teacher_mode: Literal["stored", "live"] = "stored"
    epochs: PositiveInt = 10
    samples_per_epoch: PositiveInt | None = None  # per rank; default: manifest total // world size
    batch_size: PositiveInt = 64        # per rank
    lr: PositiveFloat = 0.05
    lr_schedule: Literal["cosine", "constant"] = "cosine"  # cosine decay to 0 over all steps, per step
    optimizer: Literal["sgd", "adamw"] = "sgd"
    momentum: NonNegativeFloat = 0.9    # sgd only
    weight_decay: NonNegativeFloat = 5e-4
    seed: NonNegativeInt = 0
    workers: NonNegativeInt = 2         # DataLoader workers per rank (0: decode in the training process)
    shuffle_buffer: PositiveInt = 1000  # samples per worker's shuffle buffer
    # labelled WebDataset shards (image + cls): path, brace pattern or list
    eval: Text | Annotated[list[Text], Field(min_length=1)] | None = None
    eval_batch_size: PositiveInt = 256
    checkpoint_every: PositiveInt = 200  # steps; also at every epoch end and on exit
    log_every: PositiveInt = 10         # steps between metrics.jsonl lines
    input_size: PositiveInt | None = None  # preprocessing; default: manifest, then the teacher spec
    mean: Annotated[list[float], PerChannel] | None = None
    std: Annotated[list[PositiveFloat], PerChannel] | None = None
    use_sample_weights: bool = True     # weight each sample's loss terms by the selection's `weight`
    find_unused_parameters: bool | None = None  # DDP; default: off for logit-only losses, on for feature losses
    threads: PositiveInt | None = None  # torch intra-op threads per rank (default: torch's, 1 under torchrun)
    collective_timeout_s: PositiveFloat = 300.0  # a rank that waits longer on the others (one hung or dead) fails
    progress: bool = True               # tqdm bar on rank 0
    name: Text | None = None            # run name in summary.json; default: the out folder's name
    init_from: Text | None = None       # start from these weights: a previous run's student.pt (rounds)
    trust_model_code: bool = False      # let the teacher/student specs run code (TorchScript, any module:factory)

    @field_validator("student")
    @classmethod
    def _known_student(cls, student: str) -> str:
        if not is_student_name(student):
            raise ValueError(f"config key 'student': unknown student {student!r} (known: {', '.join(STUDENTS)}, "
                             "torchvision:<name>, timm:<name>, module:factory)")
        return student

    @field_validator("loss")
    @classmethod
    def _loss_is_known(cls, loss: dict) -> dict:
        if not isinstance(loss.get("method"), str):
            raise ValueError(f"config key 'loss' needs a 'method' ({', '.join(LOSSES)})")
        check_loss_config(loss)  # methods, parameters, weights: before any process starts
        return loss

    @model_validator(mode="after")
    def _an_epoch_has_a_step(self) -> DistillConfig:
        if self.samples_per_epoch is not None and self.samples_per_epoch < self.batch_size:
            raise ValueError(f"config key 'samples_per_epoch' ({self.samples_per_epoch}) is below "
                             f"'batch_size' ({self.batch_size}): an epoch would have no step")
        return self

    @property
    def out_dir(self) -> Path:
        return Path(self.out)

    @property
    def run_name(self) -> str:
        return self.name or self.out_dir.name

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()

    def trajectory_hash(self) -> str:
        """A hash of everything that decides the data order and the loss trajectory, paths as spelled
        (what checkpoints from before content_hash carry)."""
        return _hash({k: v for k, v in self.to_dict().items() if k not in RUNTIME_KEYS})

    def content_hash(self) -> str:
        """trajectory_hash by content: without the selection's path (a run hash adds its bytes), with
        the teacher, student and init_from files by their bytes, so a moved workspace resumes."""
        from .spec import by_content  # torch and the model registry: only where a run is hashed

        keep = {k: v for k, v in self.to_dict().items() if k not in (*RUNTIME_KEYS, "selection")}
        return _hash(keep | {k: by_content(keep[k]) for k in ("teacher", "student", "init_from") if keep[k]})


def _hash(keep: dict) -> str:
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]


def missing_eval_shard(patterns: list[str]) -> str | None:
    """Why the eval shards cannot be read (None when every local one is a file; URLs are read when
    the job evaluates). Patterns are absolute paths, brace patterns or URLs."""
    for pattern in patterns:
        for shard in braceexpand(pattern):
            if not is_remote(shard) and not Path(shard).is_file():
                return f"shard not found: {shard}"
    return None


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
        missing = missing_eval_shard(cfg.eval if isinstance(cfg.eval, list) else [cfg.eval])
        if missing:  # local shards are checked now, not after an epoch of training
            raise ConfigError(f"config key 'eval': {missing}")
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
    try:
        cfg = DistillConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(validation_line(exc, DistillConfig, noun="config key")) from exc
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
