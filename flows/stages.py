"""One Prefect flow per stage. Each maps per-shard tasks (with retries) over the stage's plain
functions in `curation/` and `distill/`, which know nothing of Prefect.

A shard whose task still fails after its retries is reported; the flow fails only when more than
`max_failure_fraction` of the shards failed. Every flow takes plain, JSON-able parameters, so it
can be served as a deployment.
"""
from __future__ import annotations

import functools
from datetime import datetime, timezone
from typing import Any, Callable, Sequence

from prefect import flow, get_run_logger, task

from curation import catalog
from curation.errors import WebdistillError
from curation.workspace import Workspace, resolve_workspace

RETRIES = 2
RETRY_DELAY_S = 2


class StageFailed(WebdistillError):
    """More shards failed than the configured failure fraction allows."""


def _chunks(items: Sequence, size: int) -> list[list]:
    size = max(1, size)
    return [list(items[i:i + size]) for i in range(0, len(items), size)]


def gather(futures, labels: list[str], stage: str, max_failure_fraction: float) -> tuple[list, dict[str, str]]:
    """Wait for mapped tasks; return (results of those that completed, {label: error} of the rest).
    Raises StageFailed when the failed share exceeds `max_failure_fraction`."""
    results, failed = [], {}
    for label, fut in zip(labels, futures):
        out = fut.result(raise_on_failure=False)
        if isinstance(out, BaseException) or not fut.state.is_completed():
            first = str(out).strip().splitlines()[0] if str(out).strip() else out.__class__.__name__
            failed[label] = f"{out.__class__.__name__}: {first}"
        else:
            results.append(out)
    if failed:
        logger = get_run_logger()
        for label, why in failed.items():
            logger.warning("%s: shard %s failed after %d retries: %s", stage, label, RETRIES, why)
        if len(failed) > max_failure_fraction * max(len(labels), 1):
            raise StageFailed(f"{stage}: {len(failed)} of {len(labels)} shard(s) failed (allowed fraction "
                              f"{max_failure_fraction}); first: {next(iter(failed.items()))}")
    return results, failed


def _record(ws: Workspace, stage: str, started: datetime, params: dict, summary: dict) -> None:
    catalog.refresh(ws)
    catalog.record_run(ws, stage, started, params, summary)


def _shard_task(name: str) -> Callable:
    """A Prefect task with the stage's retry policy, named after the stage."""
    return functools.partial(task, name=name, retries=RETRIES, retry_delay_seconds=RETRY_DELAY_S)


# --- ingest ---------------------------------------------------------------------------------

@_shard_task("ingest-shard")()
def ingest_shard_task(ws_root: str, ref, config):
    from curation.ingest import ingest_shard

    return ingest_shard(ws_root, ref, config)


@flow(name="ingest")
def ingest_flow(workspace: str, shards: list[str], source: str | None = None, max_image_bytes: int = 32 * 2**20,
                max_pixels: int = 40_000_000, min_side: int = 8, max_failure_fraction: float = 0.1) -> dict:
    from curation.shards import expand_shards
    from curation.validate import ValidationConfig

    ws = resolve_workspace(workspace)
    started = datetime.now(timezone.utc)
    config = ValidationConfig(max_image_bytes=max_image_bytes, max_pixels=max_pixels, min_side=min_side)
    refs, missing = expand_shards(shards, source)
    if missing:
        get_run_logger().warning("ingest: no shard matches %s", "; ".join(missing))
    if not refs:
        raise StageFailed(f"ingest: no shard found in {shards}")
    futures = ingest_shard_task.map(str(ws.root), refs, config)
    results, failed = gather(futures, [r.url for r in refs], "ingest", max_failure_fraction)
    summary = {"shards": len(refs), "skipped": sum(r.skipped for r in results),
               "accepted": sum(r.n_accepted for r in results if not r.skipped),
               "rejected": sum(r.n_rejected for r in results if not r.skipped), "failed": failed, "missing": missing}
    _record(ws, "ingest", started, {"shards": shards, "source": source}, summary)
    return summary


# --- embed ----------------------------------------------------------------------------------

@_shard_task("embed-shards")()
def embed_task(ws_root: str, embedder_args: dict, shards: list[str], batch_size: int, workers: int,
               trust_model_code: bool = False) -> dict:
    from curation.embed import embed
    from curation.embedders import make_embedder

    embedder = make_embedder(**embedder_args, trust_model_code=trust_model_code)
    s = embed(Workspace(ws_root), embedder, batch_size=batch_size, workers=workers, progress=False, only=shards)
    if s.failed_images:
        raise WebdistillError(f"{s.failed_images} image(s) could not be read again")
    return {"embedded": s.embedded, "skipped": s.skipped, "samples": s.samples, "seconds": s.seconds}


@flow(name="embed")
def embed_flow(workspace: str, embedder: str = "open_clip:ViT-S-32", pretrained: str | None = None,
               teacher: str | None = None, precision: str = "fp32", batch_size: int = 256, workers: int = 2,
               shards_per_task: int = 8, max_failure_fraction: float = 0.1, trust_model_code: bool = False) -> dict:
    """Shards are embedded in groups (one model load per group, decode workers inside)."""
    from curation.shard_reader import shard_jobs

    ws = resolve_workspace(workspace)
    started = datetime.now(timezone.utc)
    args = {"name": embedder, "pretrained": pretrained, "teacher": teacher, "precision": precision}
    groups = _chunks([j.shard for j in shard_jobs(ws)], shards_per_task)
    futures = embed_task.map(str(ws.root), [args] * len(groups), groups, batch_size, workers, trust_model_code)
    results, failed = gather(futures, [",".join(g) for g in groups], "embed", max_failure_fraction)
    summary = {"embedded": sum(len(r["embedded"]) for r in results), "skipped": sum(len(r["skipped"]) for r in results),
               "samples": sum(r["samples"] for r in results), "seconds": sum(r["seconds"] for r in results),
               "failed": failed}
    _record(ws, "embed", started, args, summary)
    return summary


# --- index, near-duplicates, k-means, kNN scores ---------------------------------------------

@task(name="index")
def index_task(ws_root: str, embedder: str, config: dict, knn_scores: list[dict], workers: int = 2,
               trust_model_code: bool = False) -> dict:
    from curation.embedders import embedder_dir_name, embedder_from_workspace
    from curation.index import IndexConfig, build_index, kmeans_clusters, knn_score, near_duplicates

    ws, name = Workspace(ws_root), embedder_dir_name(embedder)
    cfg = IndexConfig(**config)
    out = {"index": build_index(ws, name, cfg), "dups": near_duplicates(ws, name, cfg, workers=workers),
           "kmeans_k": kmeans_clusters(ws, name, cfg)["k"], "knn": {}}
    for ref in knn_scores:  # {"name": ..., "prompts": [...]} or {"name": ..., "sql": "..."}
        if "prompts" in ref:
            embedder_model = embedder_from_workspace(ws.root, name, trust_model_code=trust_model_code)
            vectors = embedder_model.encode_text(ref["prompts"]).numpy()
            what = f"prompts: {ref['prompts']}"
        else:
            from curation.index import vectors_of

            ids = catalog.query(ws, ref["sql"]).column("sample_id").to_pylist()
            vectors, what = vectors_of(ws, name, ids), f"sql: {ref['sql']}"
        out["knn"][ref["name"]] = knn_score(ws, name, ref["name"], vectors, k=ref.get("k", 5), description=what)
    return out


@flow(name="index")
def index_flow(workspace: str, embedder: str = "open_clip:ViT-S-32", config: dict | None = None,
               knn_scores: list[dict] | None = None, workers: int = 2, trust_model_code: bool = False) -> dict:
    ws = resolve_workspace(workspace)
    started = datetime.now(timezone.utc)
    out = index_task(str(ws.root), embedder, config or {}, knn_scores or [], workers, trust_model_code)
    _record(ws, "index", started, {"embedder": embedder, **(config or {})},
            {"kind": out["index"]["kind"], "dup_clusters": out["dups"].get("clusters"), "kmeans_k": out["kmeans_k"]})
    return out


# --- score ----------------------------------------------------------------------------------

@_shard_task("score-shards")()
def score_task(ws_root: str, config: dict, shards: list[str]):
    from curation.score import ScoreConfig, score_pass1

    return score_pass1(Workspace(ws_root), ScoreConfig(**config), progress=False, only=shards)


@flow(name="score")
def score_flow(workspace: str, teacher: str, student: str | None = None, name: str = "default",
               options: dict | None = None, shards_per_task: int = 8, max_failure_fraction: float = 0.1,
               trust_model_code: bool = False) -> dict:
    from curation.shard_reader import shard_jobs
    from curation.score import ScoreConfig, ScoreSummary, finish

    ws = resolve_workspace(workspace)
    started = datetime.now(timezone.utc)
    config = {"teacher": teacher, "student": student, "name": name, **(options or {}),
              "trust_model_code": trust_model_code}
    groups = _chunks([j.shard for j in shard_jobs(ws)], shards_per_task)
    futures = score_task.map(str(ws.root), [config] * len(groups), groups)
    results, failed = gather(futures, [",".join(g) for g in groups], "score", max_failure_fraction)
    merged = ScoreSummary(name, scored=[s for r in results for s in r.scored],
                          skipped=[s for r in results for s in r.skipped], samples=sum(r.samples for r in results),
                          seconds=sum(r.seconds for r in results),
                          teacher=next((r.teacher for r in results if r.teacher), None))
    summary = finish(ws, ScoreConfig(**config), merged, started)
    out = {"name": name, "scored": len(summary.scored), "skipped": len(summary.skipped), "samples": summary.samples,
           "reference_samples": summary.reference_samples, "unscored": summary.unscored, "failed": failed}
    _record(ws, "score", started, config, out)
    return out


# --- select ---------------------------------------------------------------------------------

@flow(name="select")
def select_flow(workspace: str, name: str, sql: str | None = None, policy: str | None = None,
                limit: int | None = None, shard_size: int = 1000, seed: int = 0,
                synthetic: list[str] | None = None) -> dict:
    from curation.select import SelectConfig, select

    ws = resolve_workspace(workspace)
    started = datetime.now(timezone.utc)
    config = SelectConfig(name=name, sql=sql, policy=policy, limit=limit, shard_size=shard_size, seed=seed,
                          synthetic=tuple(synthetic or ()))
    result = task(name="select", retries=1)(select)(ws, config)
    out = {"name": name, "size": result.size, "path": str(result.path), "unchanged": result.unchanged,
           "counts_per_class": result.manifest["counts_per_class"], "lost": len(result.manifest.get("lost", []))}
    _record(ws, "select", started, {"name": name, "sql": sql, "policy": policy, "limit": limit}, out)
    return out


# --- synthesize -----------------------------------------------------------------------------

@flow(name="synthesize")
def synthesize_flow(workspace: str, teacher: str, name: str, options: dict | None = None,
                    trust_model_code: bool = False) -> dict:
    """Nguyen et al.: confident synthetic images per class, from a cVAE of the scored pool."""
    import torch

    from curation.synthesize import SynthConfig, synthesize

    ws = resolve_workspace(workspace)
    started = datetime.now(timezone.utc)
    config = SynthConfig(teacher=teacher, name=name, **{**(options or {}), "trust_model_code": trust_model_code})
    torch.set_num_threads(1)  # small models: one thread beats two fighting the decode worker
    result = task(name="synthesize", retries=1)(synthesize)(ws, config, progress=False)
    out = {"name": name, "size": result.size, "unchanged": result.unchanged,
           "pass_rate": result.manifest.get("pass_rate"), "counts_per_class": result.manifest["counts_per_class"]}
    _record(ws, "synthesize", started, {"teacher": teacher, "name": name, **(options or {})}, out)
    return out


def flows_by_name() -> dict[str, Any]:
    return {"ingest": ingest_flow, "embed": embed_flow, "index": index_flow, "score": score_flow,
            "select": select_flow, "synthesize": synthesize_flow}
