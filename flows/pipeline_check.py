"""The pipeline YAML checked whole before any work: its keys (flows/pipeline_config.py), then every
model it names, without loading one. A teacher spec that is not there, an architecture torchvision
does not have, a student the distill job could not build, an open_clip model that does not exist, a
device this machine lacks, input shards that match nothing or a local eval shard or ground truth that
is not there are one line naming the key, before Prefect starts and before any stage runs:

    p.yaml: score.teacher: model spec not found: /data/teacher/techer.json

No model file is loaded and no module is imported here (a spec that would run code is only named),
so checking a config is safe on untrusted configs and fast.
"""
from __future__ import annotations

from pathlib import Path

from curation.errors import first_line
from curation.files import is_remote

from .pipeline_config import PipelineConfig, PipelineConfigError, load_pipeline_config


def spec_problem(spec: str, trust_model_code: bool = False) -> str | None:
    """Why a model spec cannot work (None when it looks right): a missing file, a .json spec without
    its factory or weights, an unknown torchvision/timm/registry name, untrusted module code."""
    from distill.model_files import read_json_object
    from distill.spec import PROJECT_FACTORIES, ModelSpecError
    from distill.students import STUDENTS

    path = Path(spec)
    if path.suffix == ".json" or path.exists():
        if not path.is_file():
            return f"model spec not found: {spec}"
        if path.suffix != ".json":
            return None  # a .pt2 / TorchScript file: its loader checks it (and refuses untrusted code)
        try:
            doc = read_json_object(path, "model spec")
        except (ModelSpecError, OSError, ValueError) as exc:
            return first_line(exc)
        factory, weights = doc.get("factory"), doc.get("weights")
        if not isinstance(factory, str) or not factory:
            return f"{spec}: 'factory' must be a non-empty string"
        if isinstance(weights, str) and weights and not (path.parent / weights).is_file():
            return f"{spec}: its weights file {path.parent / weights} is not there"
        known = factory in STUDENTS or factory in PROJECT_FACTORIES or "num_classes" in doc
        return None if known else _architecture_problem(factory, trust_model_code, spec)
    name, at, weights = spec.partition("@")
    if ":" not in name and name not in STUDENTS:
        return f"model spec not found: {spec}"
    if at and not Path(weights).is_file():
        return f"weights file not found: {weights}"
    return None if name in STUDENTS or name in PROJECT_FACTORIES else _architecture_problem(name, trust_model_code,
                                                                                             spec)


def _architecture_problem(name: str, trust_model_code: bool, spec: str) -> str | None:
    family, _, arch = name.partition(":")
    if family == "torchvision":
        import torchvision

        return None if arch in torchvision.models.list_models() else f"unknown torchvision architecture {name!r}"
    if family == "timm":
        try:
            import timm
        except ImportError:
            return "timm specs need `pip install timm`"
        return None if arch in timm.list_models() else f"unknown timm architecture {name!r}"
    if not family or not arch:
        return f"not a model spec: {spec!r} (expected a .json, a .pt2, torchvision:NAME, timm:NAME or module:factory)"
    if not trust_model_code:
        return (f"{spec!r} would import and run module {family!r}: set trust_model_code: true (or "
                "--trust-model-code) if you trust it")
    return None


def _open_clip_problem(name: str, pretrained: str | None) -> str | None:
    import open_clip

    from curation.embedders import MODEL_CONFIGS

    model = name.split(":", 1)[1]
    ours = {p.stem for p in MODEL_CONFIGS.glob("*.json")}
    if model not in ours and model not in open_clip.list_models():
        return f"unknown open_clip model {model!r}"
    looks_like_path = pretrained is not None and ("/" in pretrained or Path(pretrained).suffix in
                                                  (".pt", ".pth", ".bin", ".safetensors"))
    if looks_like_path and not is_remote(pretrained) and not Path(pretrained).is_file():
        return f"pretrained weights not found: {pretrained}"
    return None


def _device_problem(device: str | None) -> str | None:
    from curation.stage_config import check_device

    if device is None:
        return None
    try:
        check_device(device)
    except ValueError as exc:
        return str(exc)
    return None


def student_problem(name: str, trust_model_code: bool = False) -> str | None:
    """Why the distill job could not build this student (None when it can), resolved as build_student
    resolves it: the registry, a project factory, a torchvision/timm name, or a module:factory (only
    named, never imported, and refused without trust, as a teacher's)."""
    from distill.spec import PROJECT_FACTORIES
    from distill.students import STUDENTS

    if name in STUDENTS or name in PROJECT_FACTORIES:
        return None
    if ":" not in name:
        return (f"unknown student {name!r} (known: {', '.join(STUDENTS)}, torchvision:<name>, timm:<name>, "
                "module:factory)")
    return _architecture_problem(name, trust_model_code, name)


def _local_paths(cfg: PipelineConfig, value: str | list[str]) -> list[str]:
    """A path key's local paths, absolute: URLs and `pipe:` commands are the stage's to read."""
    paths = [cfg.path(p) for p in ([value] if isinstance(value, str) else value)]
    return [p.removeprefix("file://") for p in paths if not is_remote(p)]


def _shards_problem(cfg: PipelineConfig) -> str | None:
    """Input shards that match nothing, when no crawl section makes them first (URLs are not fetched)."""
    from curation.shards import expand_shards

    local = _local_paths(cfg, cfg.sections["ingest"]["shards"])
    if "crawl" in cfg.sections or not local:
        return None
    _, missing = expand_shards(local)
    return f"no shard matches {missing[0]}" if missing else None


def _file_problem(cfg: PipelineConfig, value: str | None) -> str | None:
    """A local file the config names that is not there (a URL is the stage's to read)."""
    missing = [p for p in _local_paths(cfg, value or []) if not Path(p).is_file()]
    return f"file not found: {missing[0]}" if missing else None


def model_problems(cfg: PipelineConfig) -> list[tuple[str, str]]:
    """(key, why) for every model, device and input of the config that cannot work; empty when all can."""
    s, trust, found = cfg.sections, cfg.trust_model_code, []

    def check(key: str, why: str | None) -> None:
        if why:
            found.append((key, why))

    check("ingest.shards", _shards_problem(cfg))
    if "embed" in s:
        embed = s["embed"] or {}
        name = embed.get("embedder", "open_clip:ViT-S-32")
        if name.startswith("open_clip:"):
            check("embed.embedder", _open_clip_problem(name, cfg.path(embed.get("pretrained"))))
        elif name == "teacher":
            teacher = embed.get("teacher")
            check("embed.teacher", spec_problem(cfg.path(teacher), trust) if teacher else
                  "the teacher embedder needs a teacher spec (embed.teacher)")
        else:
            check("embed.embedder", f"unknown embedder {name!r}: use open_clip:<model name> or teacher")
        check("embed.device", _device_problem(embed.get("device")))
    check("score.teacher", spec_problem(cfg.path(s["score"]["teacher"]), trust))
    check("score.options.device", _device_problem((s["score"].get("options") or {}).get("device")))
    distill = s.get("distill") or {}
    if distill.get("student"):
        check("distill.student", student_problem(distill["student"], trust))
    if distill.get("teacher"):
        check("distill.teacher", spec_problem(cfg.path(distill["teacher"]), trust))
    if distill.get("eval"):
        from distill.config import missing_eval_shard

        check("distill.eval", missing_eval_shard(_local_paths(cfg, distill["eval"])))
    check("report.truth", _file_problem(cfg, (s.get("report") or {}).get("truth")))
    return found


def validate_pipeline(path: str | Path, trust_model_code: bool = False) -> PipelineConfig:
    """The config loaded, its keys and its models checked: PipelineConfigError naming the first bad key."""
    cfg = load_pipeline_config(path)
    cfg.trust_model_code = cfg.trust_model_code or trust_model_code
    problems = model_problems(cfg)
    if problems:
        key, why = problems[0]
        more = f" (and {len(problems) - 1} more: {', '.join(k for k, _ in problems[1:])})" if len(problems) > 1 else ""
        raise PipelineConfigError(f"{path}: {key}: {why}{more}")
    return cfg
