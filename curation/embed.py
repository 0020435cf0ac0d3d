"""Embed: one L2-normalised float16 `.npy` per shard, with its id map.

    embeddings/<embedder>/<shard>.npy      (n, dim) float16, row i = the i-th accepted sample
    embeddings/<embedder>/<shard>.parquet  embedder, shard, row, sample_id  (the id map; its commit record)

Images come from the shard reader (curation/shard_reader.py); the model runs batched under
inference_mode in the main process. A shard is skipped when its id map carries the same ingest
stamp and embedder config.
"""
from __future__ import annotations

import time
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from . import schemas
from .embedders import Embedder
from .shard_reader import ShardJob, per_shard_outputs, shard_jobs
from .workspace import Workspace, atomic_path, check_name, config_hash, read_parquet_metadata, write_parquet_atomic

EMBED_VERSION = 1


@dataclass
class EmbedSummary:
    embedder: str
    embedded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    samples: int = 0
    failed_images: int = 0
    seconds: float = 0.0


def _paths(ws: Workspace, embedder: str, shard: str) -> tuple[Path, Path]:
    d = ws.owned("embeddings", embedder, what="embedder")  # shard: a name read back from samples/
    return d / f"{check_name(shard, 'shard name')}.npy", d / f"{shard}.parquet"


def plan_jobs(ws: Workspace, embedder: Embedder,
              only: Collection[str] | None = None) -> tuple[list[ShardJob], list[str]]:
    """Shards that need embedding, and those already done for the same inputs and config
    (`only`: restrict to these shard names, for one task per shard)."""
    chash = config_hash(embedder.config | {"version": EMBED_VERSION})
    jobs, skipped = [], []
    for job in shard_jobs(ws, {"config_hash": chash}, only):
        npy, ids = _paths(ws, embedder.name, job.shard)
        if npy.exists() and read_parquet_metadata(ids).get("stamp") == job.stamp:
            skipped.append(job.shard)
        else:
            jobs.append(job)
    return jobs, skipped


def _write_shard(ws: Workspace, embedder: Embedder, job: ShardJob, vectors: np.ndarray, ok: np.ndarray) -> None:
    npy, ids = _paths(ws, embedder.name, job.shard)
    with atomic_path(npy) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, vectors.astype(np.float16))
    n = len(job.keys)
    table = pa.table({"embedder": [embedder.name] * n, "shard": [job.shard] * n, "row": np.arange(n, dtype=np.int32),
                      "sample_id": job.sample_ids, "ok": ok}, schema=schemas.EMBEDDINGS)
    write_parquet_atomic(table, ids, {"stamp": job.stamp, "dim": embedder.dim, "config": embedder.config,
                                         "args": embedder.args})


def embed(ws: Workspace, embedder: Embedder, batch_size: int = 256, workers: int = 1,
          progress: bool = True, only: Collection[str] | None = None) -> EmbedSummary:
    """Embed every ingested shard (or those named in `only`) not yet embedded with this config."""
    jobs, skipped = plan_jobs(ws, embedder, only)
    summary = EmbedSummary(embedder.name, skipped=skipped)
    if not jobs:
        return summary
    start = time.perf_counter()
    outputs = per_shard_outputs(jobs, embedder.preprocess, lambda x: {"vec": embedder.encode_images(x).numpy()},
                                batch_size, workers, progress, desc=f"embed {embedder.name}")
    for j, out, ok in outputs:
        _write_shard(ws, embedder, jobs[j], out["vec"], ok)
        summary.embedded.append(jobs[j].shard)
        summary.failed_images += int((~ok).sum())
    summary.samples = sum(len(job.keys) for job in jobs)
    summary.seconds = time.perf_counter() - start
    return summary
