"""The pipeline YAML (`webdistill run` / `serve`): its keys, checked on load, and paths in it made
absolute against the file's folder. Shared by flows/pipeline.py and flows/crawl_flow.py, which
both import it and not each other.

Every section is checked against its stage's config before any stage runs: a typo anywhere
(`distill: {epoch: 3}`, `index: {dup_treshold: 0.9}`) or a bad policy string is one line naming the
full key, not a failure hours later when that stage starts. The sections themselves are kept as
written: the stages read them as they always did."""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, NonNegativeInt, PositiveInt, ValidationError
from pydantic import dataclasses as pydantic_dataclasses

from curation.config_errors import validation_line
from curation.crawl import CrawlConfig
from curation.errors import UnsafeName, WebdistillError, first_line
from curation.feature_taps import check_layer_names
from curation.files import is_remote
from curation.index import IndexConfig
from curation.policies import PolicyError, parse_policy
from curation.score import ScoreConfig
from curation.select import SelectConfig
from curation.synthesize import SynthConfig
from curation.workspace import check_name
from distill.config import DistillConfig

SECTIONS = ("crawl", "ingest", "embed", "index", "knn_scores", "score", "select", "synthesize", "distill", "report")
TOP_KEYS = {"workspace", "runner", "workers", "max_failure_fraction", "rounds", "schedules", "name", "trust_model_code",
            *SECTIONS}


class PipelineConfigError(WebdistillError):
    """The pipeline YAML is unreadable, or has an unknown or missing key."""


# --- each section's keys: the stage's own config, less what the pipeline sets for each round --------

def _stage_options(section: str, filled: dict[str, Any], why: dict[str, str], value: Any) -> Any:
    """A section's dict with the keys the pipeline sets filled in, so that the stage's config checks
    the rest; a key the pipeline sets is refused (`why` says so for the keys users try)."""
    if value is None:
        value = {}
    if not isinstance(value, dict):
        return value  # the stage's model says it must be a mapping
    for key in value:
        if key in filled:
            raise ValueError(f"{section}.{key}: " + why.get(key, "the pipeline sets it; leave the key out"))
    return value | filled


def _section(model: type, section: str, filled: dict[str, Any] | None = None, why: dict[str, str] | None = None):
    return Annotated[model, BeforeValidator(partial(_stage_options, section, filled or {}, why or {}))]


_EACH_ROUND = {"score_run": "each round reads the scoring run it made; leave the key out"}


@pydantic_dataclasses.dataclass(frozen=True, kw_only=True, config=ConfigDict(extra="forbid"))
class CrawlSection(CrawlConfig):
    url_list: str
    out: str


class _Keys(BaseModel):
    model_config = ConfigDict(extra="forbid")


class IngestSection(_Keys):
    shards: str | list[str]
    source: str | None = None
    max_image_bytes: PositiveInt = 32 * 2**20
    max_pixels: PositiveInt = 40_000_000
    min_side: NonNegativeInt = 8


class EmbedSection(_Keys):
    embedder: str = "open_clip:ViT-S-32"
    pretrained: str | None = None
    teacher: str | None = None
    precision: str = "fp32"
    batch_size: PositiveInt = 256
    workers: NonNegativeInt = 2
    shards_per_task: PositiveInt = 8
    device: str | None = None
    # the teacher embedder's layers (default: its penultimate features); checked as score.options.feature_layers
    feature_layers: Annotated[tuple[str, ...] | None, BeforeValidator(lambda v: v if v is None else
                                                                       check_layer_names(v))] = None


class KnnScore(_Keys):
    name: str
    k: PositiveInt = 5
    prompts: list[str] | None = None
    sql: str | None = None


class ScoreSection(_Keys):
    teacher: str
    options: _section(ScoreConfig, "score.options",
                      {"teacher": "pipeline", "name": "pipeline", "student": None, "trust_model_code": False}) = None
    shards_per_task: PositiveInt = 8  # shards per Prefect task, as embed's: 1 spreads a few shards over workers


class DistillSection(DistillConfig):
    nproc: PositiveInt = 1  # processes under torchrun


class ReportSection(_Keys):
    out: str | None = None
    selections: list[str] | None = None
    truth: str | None = None


class PipelineKeys(_Keys):
    workspace: str = "workspace"
    runner: str = "local"
    workers: int = 2
    max_failure_fraction: Annotated[float, Field(ge=0, le=1)] = 0.1
    rounds: Annotated[int, Field(ge=1)] = 1
    name: str | None = None
    schedules: dict[str, str] | None = None
    trust_model_code: Annotated[bool, Field(strict=True)] = False
    crawl: _section(CrawlSection, "crawl") = None
    ingest: IngestSection
    embed: _section(EmbedSection, "embed") = None
    index: _section(IndexConfig, "index") = None
    knn_scores: list[KnnScore] | None = None
    score: ScoreSection
    select: _section(SelectConfig, "select", {"name": "pipeline", "score_run": None}, _EACH_ROUND) = None
    synthesize: _section(SynthConfig, "synthesize", {"teacher": "pipeline", "name": "pipeline", "score_run": None,
                                                     "trust_model_code": False}, _EACH_ROUND) = None
    distill: _section(DistillSection, "distill", {"selection": "pipeline", "out": "pipeline"}) = None
    report: _section(ReportSection, "report") = None


def check_keys(raw: dict, where: str = "") -> None:
    """Every key of a parsed pipeline YAML, every section against its stage's config, and the
    select policy parsed: PipelineConfigError naming the first bad key."""
    try:
        PipelineKeys.model_validate(raw)
        policy = (raw.get("select") or {}).get("policy")
        if policy is not None:
            parse_policy(policy)
    except ValidationError as exc:
        raise PipelineConfigError(validation_line(exc, PipelineKeys, where)) from None
    except PolicyError as exc:
        raise PipelineConfigError(f"{where}select.policy: {exc}") from None
    except UnsafeName as exc:  # a name in a section (select.synthetic)
        raise PipelineConfigError(f"{where}{exc}") from None


@dataclass
class PipelineConfig:
    workspace: str
    base: str  # the config file's folder: relative paths are relative to it
    runner: str = "local"
    workers: int = 2
    max_failure_fraction: float = 0.1
    rounds: int = 1
    name: str = "pipeline"
    schedules: dict = field(default_factory=dict)
    sections: dict = field(default_factory=dict)
    trust_model_code: bool = False  # the user's word that the config's model files may run code

    def path(self, p: str | None) -> str | None:
        """A path from the config, made absolute against the config's folder. URLs, `pipe:` commands
        and model specs such as `module:factory` or `torchvision:resnet18` are left as they are."""
        if p is None or is_remote(p) or p.startswith("file://"):
            return p
        if ":" in p.split("/")[0] and not Path(p).exists():  # a model spec, not a path
            return p
        return str((Path(self.base) / p).resolve())

    def abs_paths(self, section: dict, keys: tuple[str, ...]) -> dict:
        """A copy of a section whose `keys` (paths) are made absolute with `path`."""
        return {k: (self.path(v) if k in keys and isinstance(v, str) else v) for k, v in section.items()}

    def select_options(self, round_name: str) -> dict:
        """A round's select options as `run` passes them: the section (absent: the default policy),
        with the round's synthetic set mixed in when there is a synthesize section."""
        options = dict(self.sections.get("select") or {})
        options["synthetic"] = list(options.get("synthetic") or []) + ([round_name] if "synthesize" in
                                                                        self.sections else [])
        return options

    def distill_options(self) -> dict:
        """The distill section as `run` hands it to each round's job: paths absolute, trust added."""
        options = self.abs_paths(dict(self.sections.get("distill") or {}), ("eval", "teacher"))
        if options and self.trust_model_code:
            options["trust_model_code"] = True
        return options


def load_pipeline_config(path: str | Path) -> PipelineConfig:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise PipelineConfigError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except yaml.YAMLError as exc:
        raise PipelineConfigError(f"{path} is not valid YAML: {first_line(exc)}") from exc
    if not isinstance(raw, dict):
        raise PipelineConfigError(f"{path} must be a mapping of sections")
    check_keys(raw, f"{path}: ")
    cfg = PipelineConfig(workspace="", base=str(path.resolve().parent), runner=raw.get("runner", "local"),
                         workers=int(raw.get("workers", 2)),
                         max_failure_fraction=float(raw.get("max_failure_fraction", 0.1)),
                         rounds=int(raw.get("rounds", 1)), name=str(raw.get("name", path.stem)),
                         schedules=dict(raw.get("schedules") or {}),
                         trust_model_code=raw.get("trust_model_code", False),
                         sections={k: raw[k] for k in SECTIONS if k in raw})
    cfg.workspace = cfg.path(raw.get("workspace", "workspace"))
    # every round's scoring run, synthetic set, selection and student is a folder named <name>-round<r>
    try:
        check_name(cfg.name, "pipeline name")
        check_name(f"{cfg.name}-round{cfg.rounds}", "pipeline round name")
    except UnsafeName as exc:
        raise PipelineConfigError(f"{path}: {exc} (set `name:` in the config)") from None
    if cfg.rounds > 1 and "distill" not in raw:
        raise PipelineConfigError(f"{path}: rounds > 1 need a 'distill' section (a student to re-score with)")
    return cfg


def _fields(model: type) -> dict[str, Any]:
    """A section model's keys and their defaults (pydantic models and dataclasses alike)."""
    fields = getattr(model, "model_fields", None) or getattr(model, "__pydantic_fields__", {})
    return {name: info.get_default(call_default_factory=True) for name, info in fields.items()}


def _pipeline_sets(info) -> dict:
    """The keys of a section the pipeline fills in itself (named in its BeforeValidator)."""
    for meta in info.metadata:
        func = getattr(meta, "func", None)
        if isinstance(func, partial) and func.func is _stage_options:
            return func.args[1]
    return {}


def _keys_line(model: type, skip: dict) -> str:
    shown = []
    for key, default in _fields(model).items():
        if key in skip:
            continue
        if isinstance(default, type) or repr(default).startswith("PydanticUndefined"):
            shown.append(f"{key} (required)")
        elif key == "options" and model is ScoreSection:
            shown.append("options: {" + _keys_line(ScoreConfig, _pipeline_sets(model.model_fields[key])) + "}")
        else:
            shown.append(key if default is None else f"{key}={default}")
    return ", ".join(shown)


def keys_reference() -> str:
    """Every key of the pipeline YAML with its default, generated from the configs the stages check
    (so `run --help` cannot drift from what `run` accepts)."""
    lines, top = [], []
    for name, info in PipelineKeys.model_fields.items():
        model = next((a for a in (info.annotation, *getattr(info.annotation, "__args__", ()))
                      if isinstance(a, type) and (hasattr(a, "model_fields") or hasattr(a, "__pydantic_fields__"))),
                     None)
        if name == "knn_scores":
            lines.append(f"  knn_scores (a list): {_keys_line(KnnScore, {})}")
        elif model is None:
            default = info.get_default(call_default_factory=True)
            top.append(f"{name}={default}" if default is not None and "Undefined" not in repr(default) else name)
        else:
            lines.append(f"  {name}{'' if info.is_required() else ' (optional)'}: "
                         f"{_keys_line(model, _pipeline_sets(info))}")
    return "top-level keys: " + ", ".join(top) + "\nsections (each key is the stage's option of that name):\n" + \
        "\n".join(lines)
