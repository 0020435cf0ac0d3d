"""The pipeline YAML (`webdistill run` / `serve`): its keys, checked on load, and paths in it made
absolute against the file's folder. Shared by flows/pipeline.py and flows/crawl_flow.py, which
both import it and not each other."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from curation.errors import UnsafeName, WebdistillError, first_line
from curation.files import is_remote
from curation.workspace import check_name

SECTIONS = ("crawl", "ingest", "embed", "index", "knn_scores", "score", "select", "synthesize", "distill", "report")
TOP_KEYS = {"workspace", "runner", "workers", "max_failure_fraction", "rounds", "schedules", "name", "trust_model_code",
            *SECTIONS}


class PipelineConfigError(WebdistillError):
    """The pipeline YAML is unreadable, or has an unknown or missing key."""


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
    unknown = set(raw) - TOP_KEYS
    if unknown:
        raise PipelineConfigError(f"{path}: unknown key(s) {', '.join(sorted(unknown))} "
                                  f"(known: {', '.join(sorted(TOP_KEYS))})")
    for needed in ("ingest", "score", "select"):
        if needed not in raw:
            raise PipelineConfigError(f"{path}: section {needed!r} is required")
    for section in ("select", "synthesize"):
        if isinstance(raw.get(section), dict) and "score_run" in raw[section]:
            raise PipelineConfigError(f"{path}: {section}.score_run: each round reads the scoring run it made; "
                                      "leave the key out")
    cfg = PipelineConfig(workspace="", base=str(path.resolve().parent), runner=raw.get("runner", "local"),
                         workers=int(raw.get("workers", 2)),
                         max_failure_fraction=float(raw.get("max_failure_fraction", 0.1)),
                         rounds=int(raw.get("rounds", 1)), name=str(raw.get("name", path.stem)),
                         schedules=dict(raw.get("schedules") or {}),
                         trust_model_code=raw.get("trust_model_code", False),
                         sections={k: raw[k] for k in SECTIONS if k in raw})
    cfg.workspace = cfg.path(raw.get("workspace", "workspace"))
    if cfg.rounds < 1:
        raise PipelineConfigError(f"{path}: rounds must be >= 1")
    if not isinstance(cfg.trust_model_code, bool):
        raise PipelineConfigError(f"{path}: trust_model_code must be true or false")
    # every round's scoring run, synthetic set, selection and student is a folder named <name>-round<r>
    try:
        check_name(cfg.name, "pipeline name")
        check_name(f"{cfg.name}-round{cfg.rounds}", "pipeline round name")
    except UnsafeName as exc:
        raise PipelineConfigError(f"{path}: {exc} (set `name:` in the config)") from None
    if cfg.rounds > 1 and "distill" not in raw:
        raise PipelineConfigError(f"{path}: rounds > 1 need a 'distill' section (a student to re-score with)")
    return cfg
