"""One Prefect flow per stage. Each calls the stage's runner in flows/stage_runner.py, the same one
the CLI calls, so a flow records what the verb records; the flow adds only what Prefect is for:
per-shard tasks mapped with retries (`prefect_map`), the failure fraction, and logging.

A shard whose task still fails after its retries is reported; the flow fails only when more than
`max_failure_fraction` of the shards failed (the runner's `check_failures`). Every flow takes
plain, JSON-able parameters, so it can be served as a deployment.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from prefect import flow, get_run_logger, task, unmapped

from curation.workspace import resolve_workspace

from . import artifacts, stage_runner
from .stage_runner import StageFailed, failure_reason  # noqa: F401 - StageFailed: what a failed flow raises

RETRIES = 2
RETRY_DELAY_S = 2


def gather(futures, labels: Sequence[str], stage: str) -> tuple[list, dict[str, str]]:
    """Wait for mapped tasks; return (results of those that completed, {label: error} of the rest),
    each failure logged. Whether they fail the stage is the runner's `check_failures`."""
    results, failed = [], {}
    for label, fut in zip(labels, futures):
        out = fut.result(raise_on_failure=False)
        if isinstance(out, BaseException) or not fut.state.is_completed():
            failed[label] = failure_reason(out) if isinstance(out, BaseException) else str(out)
        else:
            results.append(out)
    logger = get_run_logger()
    for label, why in failed.items():
        logger.warning("%s: shard %s failed after %d retries: %s", stage, label, RETRIES, why)
    return results, failed


def _run_shard(fn: Callable, item: Any) -> Any:
    return fn(item)


def prefect_map(task_name: str) -> stage_runner.MapShards:
    """A runner's `map_shards` as Prefect tasks (one per item, with retries), on the flow's task
    runner (threads, Dask or Ray)."""
    shard_task = task(_run_shard, name=task_name, retries=RETRIES, retry_delay_seconds=RETRY_DELAY_S)

    def map_shards(fn: Callable, items: Sequence, labels: Sequence[str]) -> tuple[list, dict[str, str]]:
        if not items:
            return [], {}
        return gather(shard_task.map(unmapped(fn), list(items)), labels, task_name.split("-")[0])

    return map_shards


@flow(name="ingest")
def ingest_flow(workspace: str, shards: list[str], source: str | None = None, max_image_bytes: int = 32 * 2**20,
                max_pixels: int = 40_000_000, min_side: int = 8, max_failure_fraction: float = 0.1) -> dict:
    from curation.validate import ValidationConfig

    ws = resolve_workspace(workspace)
    config = ValidationConfig(max_image_bytes=max_image_bytes, max_pixels=max_pixels, min_side=min_side)
    summary = stage_runner.run_ingest(ws, shards, config, source, map_shards=prefect_map("ingest-shard"),
                                      max_failure_fraction=max_failure_fraction)
    if summary["missing"]:
        get_run_logger().warning("ingest: no shard matches %s", "; ".join(summary["missing"]))
    artifacts.publish_summary("ingest", summary)
    return summary


@flow(name="embed")
def embed_flow(workspace: str, embedder: str = "open_clip:ViT-S-32", pretrained: str | None = None,
               teacher: str | None = None, precision: str = "fp32", batch_size: int = 256, workers: int = 2,
               shards_per_task: int = 8, max_failure_fraction: float = 0.1, trust_model_code: bool = False,
               device: str | None = None, feature_layers: list[str] | str | None = None) -> dict:
    """Shards are embedded in groups (one model load per group, decode workers inside)."""
    summary = stage_runner.run_embed(resolve_workspace(workspace), embedder, pretrained, teacher, device, precision,
                                     batch_size, workers, trust_model_code, map_shards=prefect_map("embed-shards"),
                                     shards_per_task=shards_per_task, max_failure_fraction=max_failure_fraction,
                                     feature_layers=feature_layers)
    artifacts.publish_summary("embed", summary)
    return summary


@flow(name="index")
def index_flow(workspace: str, embedder: str = "open_clip:ViT-S-32", config: dict | None = None,
               knn_scores: list[dict] | None = None, workers: int = 2, trust_model_code: bool = False) -> dict:
    """The index, its clusters, then each kNN score: {"name": ..., "prompts": [...]} or {"name": ..., "sql": "..."}
    (optional "k", default 5)."""
    ws = resolve_workspace(workspace)
    # phase lines through the flow's logger: `run` shows it, while task-run INFO lines are hidden by default
    out = task(stage_runner.run_index, name="index")(ws, embedder, config or {}, workers, say=get_run_logger().info)
    knn = task(stage_runner.run_knn_score, name="knn-score")
    # a pipeline's YAML is each kNN score's definition: a changed one replaces it
    out["knn"] = {ref["name"]: knn(ws, ref["name"], embedder, ref.get("k", 5), prompts=ref.get("prompts"),
                                   sql=ref.get("sql"), trust_model_code=trust_model_code, overwrite=True)
                  for ref in knn_scores or []}
    index = out["index"]
    artifacts.publish_summary("index", {"embedder": index.get("embedder"), "index": index.get("kind"),
                                        "vectors": index.get("size"), "dup_clusters": out["dups"].get("clusters"),
                                        "kmeans_k": out["kmeans_k"], "knn_scores": sorted(out["knn"])})
    return out


@flow(name="score")
def score_flow(workspace: str, teacher: str, student: str | None = None, name: str = "default",
               options: dict | None = None, shards_per_task: int = 8, max_failure_fraction: float = 0.1,
               trust_model_code: bool = False) -> dict:
    from curation.score import ScoreConfig

    config = ScoreConfig(teacher=teacher, student=student, name=name, **(options or {}),
                         trust_model_code=trust_model_code)
    # a pipeline's YAML (and its rounds' students) define the run: a changed one replaces it
    summary = stage_runner.run_score(resolve_workspace(workspace), config, map_shards=prefect_map("score-shards"),
                                     shards_per_task=shards_per_task, max_failure_fraction=max_failure_fraction,
                                     overwrite=True)
    artifacts.publish_summary("score", summary)
    return summary


@flow(name="select")
def select_flow(workspace: str, name: str, sql: str | None = None, policy: str | None = None,
                limit: int | None = None, shard_size: int = 1000, seed: int = 0,
                synthetic: list[str] | None = None, score_run: str | None = None) -> dict:
    """`score_run`: the scoring run whose scores the candidates carry (None: the newest finished one)."""
    from curation.select import SelectConfig

    config = SelectConfig(name=name, sql=sql, policy=policy, limit=limit, shard_size=shard_size, seed=seed,
                          synthetic=tuple(synthetic or ()), score_run=score_run)
    # a pipeline's YAML is the selection's definition: a changed one replaces it (its students retrain)
    summary = task(stage_runner.run_select, name="select", retries=1)(resolve_workspace(workspace), config,
                                                                      overwrite=True)
    artifacts.publish_summary("select", summary)
    artifacts.publish_coverage(summary)
    return summary


@flow(name="synthesize")
def synthesize_flow(workspace: str, teacher: str, name: str, options: dict | None = None,
                    trust_model_code: bool = False) -> dict:
    """Nguyen et al.: confident synthetic images per class, from a cVAE of the scored pool."""
    from curation.synthesize import SynthConfig

    config = SynthConfig(teacher=teacher, name=name, **{**(options or {}), "trust_model_code": trust_model_code})
    summary = task(stage_runner.run_synthesize, name="synthesize", retries=1)(resolve_workspace(workspace), config)
    artifacts.publish_summary("synthesize", summary)
    return summary


@flow(name="report")
def report_flow(workspace: str, out: str | None = None, selections: list[str] | None = None,
                truth: str | None = None) -> dict:
    """The self-contained HTML report (default: <workspace>/report.html); with `truth` (a parquet of
    shard, key, in_domain), ROC curves and precision, and the AUROC table as an artifact."""
    summary = task(stage_runner.run_report, name="report")(resolve_workspace(workspace), out, selections, truth)
    artifacts.publish_report(summary)
    return summary


def flows_by_name() -> dict[str, Any]:
    return {"ingest": ingest_flow, "embed": embed_flow, "index": index_flow, "score": score_flow,
            "select": select_flow, "synthesize": synthesize_flow, "report": report_flow}
