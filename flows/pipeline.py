"""`webdistill run CONFIG.yaml`: every stage as one Prefect flow, with student-in-the-loop rounds.

    workspace: workspace                 # relative paths are relative to this file's folder
    runner: local                        # or dask://HOST:PORT, dask://local, ray://HOST:PORT
    max_failure_fraction: 0.1            # per stage: more failed shards than this fails the flow
    crawl:  {url_list: urls.parquet, out: crawl}                       # optional
    ingest: {shards: [crawl]}
    embed:  {embedder: "open_clip:ViT-S-32", pretrained: ckpt.pt, batch_size: 256}
    index:  {dup_threshold: 0.95, kmeans_k: 64}
    knn_scores: [{name: digits, prompts: ["a photo of the digit 0", ...]}]
    score:  {teacher: teacher/teacher.json, options: {odin: true}}
    synthesize: {per_class: 100}                                       # optional (Nguyen et al.)
    select: {policy: "dedup | kd3 | balance:k=2000;by=msp"}
    distill: {student: tiny_cnn, loss: {method: kd}, epochs: 5, nproc: 2, eval: eval/test.tar}
    rounds: 2
    trust_model_code: false              # true: model files may run code (TorchScript, any module:factory)
    schedules: {crawl: "0 2 * * *", curation: "0 3 * * *", distill: "0 5 * * 0"}   # webdistill serve

Round 1 scores with the teacher alone, selects, and distils. Each later round re-scores the pool
with the previous round's student (agreement, KL/JS, KD^3's combined prediction), re-selects with
the same policy, and continues training from the previous student's weights. Every round's
selection and student are recorded in the catalog (`selections`, `students`, `runs`).
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from prefect import flow, get_run_logger, task

from curation import catalog
from curation.errors import UnsafeName, WebdistillError
from curation.workspace import check_name, remove_tree, resolve_workspace

from .runners import task_runner
from .stages import embed_flow, index_flow, ingest_flow, score_flow, select_flow, synthesize_flow

SECTIONS = ("crawl", "ingest", "embed", "index", "knn_scores", "score", "select", "synthesize", "distill")
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
        if p is None or "://" in p or p.startswith("pipe:"):
            return p
        if ":" in p.split("/")[0] and not Path(p).exists():  # a model spec, not a path
            return p
        return str((Path(self.base) / p).resolve())


def load_pipeline_config(path: str | Path) -> PipelineConfig:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise PipelineConfigError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except yaml.YAMLError as exc:
        raise PipelineConfigError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from exc
    if not isinstance(raw, dict):
        raise PipelineConfigError(f"{path} must be a mapping of sections")
    unknown = set(raw) - TOP_KEYS
    if unknown:
        raise PipelineConfigError(f"{path}: unknown key(s) {', '.join(sorted(unknown))} (known: {', '.join(sorted(TOP_KEYS))})")
    for needed in ("ingest", "score", "select"):
        if needed not in raw:
            raise PipelineConfigError(f"{path}: section {needed!r} is required")
    cfg = PipelineConfig(workspace="", base=str(path.resolve().parent), runner=raw.get("runner", "local"),
                         workers=int(raw.get("workers", 2)), max_failure_fraction=float(raw.get("max_failure_fraction", 0.1)),
                         rounds=int(raw.get("rounds", 1)), name=str(raw.get("name", path.stem)),
                         schedules=dict(raw.get("schedules") or {}), trust_model_code=raw.get("trust_model_code", False),
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


def run_distillation(ws_root: str, name: str, selection: str, options: dict, init_from: str | None = None,
                     stream=None) -> dict:
    """Write the job's config under students/<name>/, run it under torchrun, record the student.
    Both names pass `Workspace.owned`: the job writes, and a changed run deletes, only under students/."""
    from curation.workspace import Workspace
    from distill.launch import launch

    options = dict(options)
    ws = Workspace(ws_root)
    out = ws.owned("students", name, what="student run name")
    manifest = ws.owned("selections", selection, what="selection name") / "manifest.json"
    if not manifest.is_file():
        raise WebdistillError(f"no selection {selection!r} in {manifest.parent.parent} (see: webdistill sql "
                              "\"SELECT name, size FROM selections\")")
    out.mkdir(parents=True, exist_ok=True)
    nproc = int(options.pop("nproc", 1))
    job = {"selection": str(manifest), "out": str(out), "name": name, "progress": False, **options}
    if init_from:
        job["init_from"] = init_from
    config_path = out / "job.json"
    stamp = out / "selection.sha256"
    digest = hashlib.sha256(Path(job["selection"]).read_bytes()).hexdigest()
    if config_path.exists() and (json.loads(config_path.read_text()) != job
                                 or not stamp.exists() or stamp.read_text() != digest):
        # a new selection or config under this run name (a re-run round): train it from scratch
        remove_tree(out, ws.root / "students")
        out.mkdir(parents=True)
    config_path.write_text(json.dumps(job, indent=2))
    stamp.write_text(digest)
    summary = launch(config_path, nproc=nproc, stream=stream)
    catalog.record_student(ws, summary | {"selection": selection})
    return summary


distill_task = task(name="distill", retries=0)(run_distillation)


@flow(name="distill")
def distill_flow(workspace: str, name: str, selection: str, options: dict, init_from: str | None = None) -> dict:
    ws = resolve_workspace(workspace)
    return distill_task(str(ws.root), name, selection, dict(options), init_from)


def _abs_paths(cfg: PipelineConfig, section: dict, keys: tuple[str, ...]) -> dict:
    return {k: (cfg.path(v) if k in keys and isinstance(v, str) else v) for k, v in section.items()}


@flow(name="pipeline")
def pipeline_flow(config_path: str, trust_model_code: bool = False) -> dict:
    """Every stage of the config, with its rounds. Model code may run if the config or
    `trust_model_code` (the CLI's --trust-model-code) says so."""
    return run_stages(config_path, with_distill=True, trust_model_code=trust_model_code)


@flow(name="curation")
def curation_flow(config_path: str, trust_model_code: bool = False) -> dict:
    """The curation stages of the config (crawl to select), one round, no distillation."""
    return run_stages(config_path, with_distill=False, trust_model_code=trust_model_code)


def run_stages(config_path: str, with_distill: bool, trust_model_code: bool = False) -> dict:
    from curation.remote import is_remote, synced

    cfg = load_pipeline_config(config_path)
    cfg.trust_model_code = cfg.trust_model_code or trust_model_code
    if is_remote(cfg.workspace):  # mirror it locally for the stages, sync it back at the end
        with synced(cfg.workspace) as local:
            cfg.workspace = str(local)
            return _run_config(cfg, with_distill)
    return _run_config(cfg, with_distill)


def _run_config(cfg: PipelineConfig, with_distill: bool) -> dict:
    timings: dict[str, float] = {}

    def timed(label: str, fn, *args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            timings[label] = timings.get(label, 0.0) + time.perf_counter() - start

    log = get_run_logger()
    ws, s = cfg.workspace, cfg.sections
    runner = task_runner(cfg.runner, cfg.workers)
    frac, trust = cfg.max_failure_fraction, cfg.trust_model_code
    out: dict = {"workspace": ws, "rounds": [], "timings": timings}

    if "crawl" in s:
        from .crawl_flow import crawl_flow

        c = _abs_paths(cfg, s["crawl"], ("url_list", "out"))
        out["crawl"] = timed("crawl", crawl_flow.with_options(task_runner=runner), url_list=c.pop("url_list"),
                             out=c.pop("out"), options=c)
    ingest = s["ingest"]
    shards = [cfg.path(p) for p in (ingest["shards"] if isinstance(ingest["shards"], list) else [ingest["shards"]])]
    out["ingest"] = timed("ingest", ingest_flow.with_options(task_runner=runner),
                          ws, shards, **{k: v for k, v in ingest.items() if k != "shards"}, max_failure_fraction=frac)
    if "embed" in s:
        e = _abs_paths(cfg, s["embed"], ("pretrained", "teacher"))
        out["embed"] = timed("embed", embed_flow.with_options(task_runner=runner), ws, **e, max_failure_fraction=frac,
                             trust_model_code=trust)
        out["index"] = timed("index", index_flow, ws, e.get("embedder", "open_clip:ViT-S-32"), s.get("index") or {},
                             s.get("knn_scores") or [], cfg.workers, trust)
    score_opts = dict(s["score"])
    teacher = cfg.path(score_opts.pop("teacher"))
    select_opts = dict(s["select"])
    user_synthetic = list(select_opts.pop("synthetic", None) or [])
    distill_opts = _abs_paths(cfg, dict(s.get("distill") or {}), ("eval", "teacher")) if with_distill else {}
    if distill_opts and trust:
        distill_opts["trust_model_code"] = True
    student_ckpt = init_from = None
    for r in range(1, (cfg.rounds if with_distill else 1) + 1):
        name = f"{cfg.name}-round{r}"
        log.info("round %d: score, select%s", r, ", distill" if distill_opts else "")
        scored = timed(f"score r{r}", score_flow.with_options(task_runner=runner),
                       ws, teacher=teacher, student=student_ckpt, name=name, options=score_opts.get("options"),
                       max_failure_fraction=frac, trust_model_code=trust)
        synthetic, made = list(user_synthetic), None
        if "synthesize" in s:  # confident synthetic images, mixed into this round's selection
            made = timed(f"synthesize r{r}", synthesize_flow, ws, teacher=teacher, name=name, options=s["synthesize"],
                         trust_model_code=trust)
            synthetic.append(made["name"])
        chosen = timed(f"select r{r}", select_flow, ws, name=name, synthetic=synthetic, **select_opts)
        round_out = {"round": r, "score": scored, "selection": chosen, "synthetic": made}
        if distill_opts:
            student = timed(f"distill r{r}", distill_flow, ws, name, name, distill_opts, init_from)
            round_out["student"] = student
            student_ckpt = student["checkpoint"]
            init_from = student.get("state_dict") or str(Path(student["checkpoint"]).with_name("student.pt"))
        out["rounds"].append(round_out)
    return out
