"""`webdistill run CONFIG.yaml`: every stage as one Prefect flow, with student-in-the-loop rounds.

    workspace: workspace                 # relative paths are relative to this file's folder
    runner: local                        # or dask://HOST:PORT, dask://local, ray://HOST:PORT
    max_failure_fraction: 0.1            # per stage: more failed shards than this fails the flow
    crawl:  {url_list: urls.parquet, out: crawl}                       # optional
    ingest: {shards: [crawl]}
    embed:  {embedder: "open_clip:ViT-S-32", pretrained: ckpt.pt, batch_size: 256}
    index:  {dup_threshold: 0.95, kmeans_k: 64}
    knn_scores: [{name: digits, prompts: ["a photo of the digit 0", ...]}]
    score:  {teacher: teacher/teacher.json, options: {odin: true}, shards_per_task: 8}
    synthesize: {per_class: 100}                                       # optional (Nguyen et al.)
    select: {limit: 2000}                # optional; without a policy the default one runs
    distill: {student: tiny_cnn, loss: {method: kd}, epochs: 5, nproc: 2, eval: eval/test.tar}
    report: {out: report.html, truth: ground_truth.parquet}                # optional; both keys optional
    rounds: 2
    trust_model_code: false              # true: model files may run code (TorchScript, any module:factory)
    schedules: {crawl: "0 2 * * *", curation: "0 3 * * *", distill: "0 5 * * 0"}   # webdistill serve

Round 1 scores with the teacher alone, selects, and distils. Each later round re-scores the pool
with the previous round's student (agreement, KL/JS, KD^3's combined prediction), re-selects with
the same policy, and continues training from the previous student's weights. Every round's
selection and student are recorded in the catalog (`selections`, `students`, `runs`). With a
`report` section, the HTML report is written at the end (default: <workspace>/report.html). Each
flow publishes its summary as Prefect artifacts (flows/artifacts.py); the pipeline adds the rounds.
"""
from __future__ import annotations

import time

from prefect import flow, get_run_logger, task

from curation.remote import is_remote, synced
from curation.workspace import resolve_workspace

from . import artifacts, stage_runner
from .crawl_flow import crawl_flow
from .pipeline_config import PipelineConfig, PipelineConfigError, load_pipeline_config  # noqa: F401 - re-exported
from .stages import (
    embed_flow,
    index_flow,
    ingest_flow,
    report_flow,
    score_flow,
    select_flow,
    synthesize_flow,
)
from .task_runners import shared_task_runner


@flow(name="distill")
def distill_flow(workspace: str, name: str, selection: str, options: dict, init_from: str | None = None) -> dict:
    ws = resolve_workspace(workspace)
    # the YAML is the run's definition: a changed one (or a re-scored selection) retrains it
    summary = task(stage_runner.run_distill, name="distill", retries=0)(str(ws.root), name, selection, dict(options),
                                                                        init_from, overwrite=True)
    artifacts.publish_summary("distill", summary, f"student {name} on selection {selection}: "
                              f"eval accuracy {summary.get('eval_accuracy')}")
    return summary


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
    cfg = load_pipeline_config(config_path)
    cfg.trust_model_code = cfg.trust_model_code or trust_model_code
    if is_remote(cfg.workspace):  # mirror it locally for the stages, sync it back at the end
        with synced(cfg.workspace) as local:
            cfg.workspace = str(local)
            return _run_config(cfg, with_distill)
    return _run_config(cfg, with_distill)


def _run_config(cfg: PipelineConfig, with_distill: bool) -> dict:
    with shared_task_runner(cfg.runner, cfg.workers) as runner:
        return _run_config_on(cfg, with_distill, runner)


def _run_config_on(cfg: PipelineConfig, with_distill: bool, runner) -> dict:
    timings: dict[str, float] = {}

    def timed(label: str, fn, *args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            timings[label] = timings.get(label, 0.0) + time.perf_counter() - start

    log = get_run_logger()
    ws, s = cfg.workspace, cfg.sections
    frac, trust = cfg.max_failure_fraction, cfg.trust_model_code
    out: dict = {"workspace": ws, "rounds": [], "timings": timings}

    if "crawl" in s:
        c = cfg.abs_paths(s["crawl"], ("url_list", "out"))
        out["crawl"] = timed("crawl", crawl_flow.with_options(task_runner=runner), url_list=c.pop("url_list"),
                             out=c.pop("out"), options=c)
    ingest = s["ingest"]
    shards = [cfg.path(p) for p in (ingest["shards"] if isinstance(ingest["shards"], list) else [ingest["shards"]])]
    out["ingest"] = timed("ingest", ingest_flow.with_options(task_runner=runner),
                          ws, shards, **{k: v for k, v in ingest.items() if k != "shards"}, max_failure_fraction=frac)
    if "embed" in s:
        e = cfg.abs_paths(s["embed"], ("pretrained", "teacher"))
        out["embed"] = timed("embed", embed_flow.with_options(task_runner=runner), ws, **e, max_failure_fraction=frac,
                             trust_model_code=trust)
        out["index"] = timed("index", index_flow, ws, e.get("embedder", "open_clip:ViT-S-32"), s.get("index") or {},
                             s.get("knn_scores") or [], cfg.workers, trust)
    score_opts = dict(s["score"])
    teacher = cfg.path(score_opts.pop("teacher"))
    distill_opts = cfg.distill_options() if with_distill else {}
    student_ckpt = init_from = None
    for r in range(1, (cfg.rounds if with_distill else 1) + 1):
        name = f"{cfg.name}-round{r}"
        log.info("round %d: score, select%s", r, ", distill" if distill_opts else "")
        scored = timed(f"score r{r}", score_flow.with_options(task_runner=runner),
                       ws, teacher=teacher, student=student_ckpt, name=name, options=score_opts.get("options"),
                       max_failure_fraction=frac, trust_model_code=trust,
                       **{k: score_opts[k] for k in ("shards_per_task",) if k in score_opts})  # else the flow's default
        # the round's scoring run, by name: synthesize and select read its scores, whichever run is newest
        made = None
        if "synthesize" in s:  # confident synthetic images named as the round, mixed into its selection
            made = timed(f"synthesize r{r}", synthesize_flow, ws, teacher=teacher, name=name,
                         options={**s["synthesize"], "score_run": scored["name"]}, trust_model_code=trust)
        chosen = timed(f"select r{r}", select_flow, ws, name=name, score_run=scored["name"],
                       **cfg.select_options(name))
        round_out = {"round": r, "score": scored, "selection": chosen, "synthetic": made}
        if distill_opts:
            student = timed(f"distill r{r}", distill_flow, ws, name, name, distill_opts, init_from)
            round_out["student"] = student
            student_ckpt = student["checkpoint"]
            init_from = stage_runner.student_weights(student)
        out["rounds"].append(round_out)
    if "report" in s:
        report = cfg.abs_paths(dict(s["report"] or {}), ("out", "truth"))
        out["report"] = timed("report", report_flow, ws, **report)
    artifacts.publish_rounds(out["rounds"])
    return out
