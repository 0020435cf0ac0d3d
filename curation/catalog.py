"""`catalog.duckdb`: views over the per-shard artifacts and small bookkeeping tables.
Users query it through the read-only surface of `user_sql` (re-exported here: `query`).

Views point at absolute globs, so they are rebuilt whenever the workspace moves
(`refresh` is cheap and runs after every stage). Plain DuckDB opens the file as is.
"""
from __future__ import annotations

import hashlib
import json
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import duckdb
import pyarrow as pa

from . import schemas
from .workspace import Workspace


@dataclass(frozen=True)
class ViewSpec:
    pattern: str  # artifacts: <workspace>/<pattern>, a glob of parquet files
    schema: pa.Schema  # used for an empty, typed view until the first artifact exists
    description: str


VIEWS: dict[str, ViewSpec] = {
    "samples": ViewSpec("samples/*.parquet", schemas.SAMPLES, "accepted samples: one row per valid image"),
    "rejects": ViewSpec("rejects/*.parquet", schemas.REJECTS, "refused samples and unreadable parts of shards, with a reason"),
    "shards": ViewSpec("shards/*.parquet", schemas.SHARDS, "one row per ingested shard: counts, fingerprint, timing"),
    "embeddings": ViewSpec("embeddings/*/*.parquet", schemas.EMBEDDINGS,
                           "id maps of the per-shard vectors: embedder, shard, row in the .npy, sample_id"),
    "dups": ViewSpec("dups/*.parquet", schemas.DUPS,
                     "near-duplicate clusters per embedder: cluster_id is the representative's sample_id"),
    "clusters": ViewSpec("clusters/*.parquet", schemas.CLUSTERS, "k-means cluster of every sample, per embedder"),
    "knn_scores": ViewSpec("knn_scores/*.parquet", schemas.KNN_SCORES,
                           "similarity to a named reference set (higher = closer), per sample"),
    "scores": ViewSpec("scores/*/*.parquet", schemas.SCORES,
                       "per-sample teacher/student scores of every scoring run (see score_columns)"),
}

TABLES = {
    "runs": """CREATE TABLE IF NOT EXISTS runs (
        run_id VARCHAR PRIMARY KEY, stage VARCHAR, started_at TIMESTAMPTZ, finished_at TIMESTAMPTZ,
        params JSON, summary JSON)""",
    "catalog_info": "CREATE TABLE IF NOT EXISTS catalog_info (key VARCHAR PRIMARY KEY, value VARCHAR)",
    "score_columns": "CREATE TABLE IF NOT EXISTS score_columns (name VARCHAR PRIMARY KEY, description VARCHAR)",
    "selections": """CREATE TABLE IF NOT EXISTS selections (
        name VARCHAR PRIMARY KEY, size BIGINT, query VARCHAR, policy VARCHAR, score_run VARCHAR,
        path VARCHAR, manifest_sha256 VARCHAR, created_at TIMESTAMPTZ, config JSON)""",
    "students": """CREATE TABLE IF NOT EXISTS students (
        name VARCHAR PRIMARY KEY, selection VARCHAR, loss VARCHAR, teacher_mode VARCHAR, eval_accuracy DOUBLE,
        checkpoint VARCHAR, created_at TIMESTAMPTZ, summary JSON)""",
}

def _connect_rw(ws: Workspace, timeout_s: float = 60.0) -> duckdb.DuckDBPyConnection:
    """A write connection; waits while another process holds the catalog's lock."""
    ws.root.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return duckdb.connect(str(ws.catalog_path))
        except duckdb.IOException as exc:
            if "lock" not in str(exc).lower() or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _duckdb_types(schema: pa.Schema) -> list[tuple[str, str]]:
    rel = duckdb.from_arrow(schema.empty_table())
    return list(zip(rel.columns, (str(t) for t in rel.types)))


def _view_sql(ws: Workspace, name: str, spec: ViewSpec) -> str:
    if any(ws.root.glob(spec.pattern)):
        glob = str(ws.root / spec.pattern).replace("'", "''")
        return f"CREATE OR REPLACE VIEW {name} AS SELECT * FROM read_parquet('{glob}', union_by_name=true)"
    cols = ", ".join(f'CAST(NULL AS {t}) AS "{c}"' for c, t in _duckdb_types(spec.schema))
    return f"CREATE OR REPLACE VIEW {name} AS SELECT {cols} WHERE false"


def refresh(ws: Workspace) -> None:
    """(Re)create every view and bookkeeping table. Idempotent."""
    con = _connect_rw(ws)
    try:
        for ddl in TABLES.values():
            con.execute(ddl)
        for name, spec in VIEWS.items():
            con.execute(_view_sql(ws, name, spec))
        con.executemany("INSERT OR REPLACE INTO score_columns VALUES (?, ?)", list(schemas.SCORE_COLUMNS.items()))
        sources = candidate_sources(ws)
        con.execute(_candidates_sql(sources))
        con.executemany("INSERT OR REPLACE INTO catalog_info VALUES (?, ?)",
                        [("workspace", str(ws.root))] + [(f"candidates.{k}", json.dumps(v)) for k, v in sources.items()])
    finally:
        con.close()


def _newest(paths) -> Path | None:
    paths = [p for p in paths if p.is_file()]
    return max(paths, key=lambda p: p.stat().st_mtime_ns) if paths else None


def candidate_sources(ws: Workspace) -> dict:
    """What the `candidates` view joins: the newest near-duplicate and k-means results, the newest
    finished scoring run, and every named kNN score."""
    dups = _newest(ws.root.glob("dups/*.parquet"))
    clusters = _newest(ws.root.glob("clusters/*.parquet"))
    run = _newest(ws.root.glob("scores/*/run.json"))
    return {"dups_embedder": dups.stem if dups else None, "clusters_embedder": clusters.stem if clusters else None,
            "score_run": run.parent.name if run else None,
            "knn": sorted(p.stem for p in ws.root.glob("knn_scores/*.parquet"))}


def _quote(value: str | None) -> str:
    return "NULL" if value is None else "'" + value.replace("'", "''") + "'"


def _candidates_sql(src: dict) -> str:
    knn_cols = "".join(f', k{i}.knn_sim AS "knn_{n}"' for i, n in enumerate(src["knn"]))
    knn_joins = "".join(f" LEFT JOIN (SELECT sample_id, knn_sim FROM knn_scores WHERE name = {_quote(n)}) k{i} USING (sample_id)"
                        for i, n in enumerate(src["knn"]))
    return f"""CREATE OR REPLACE VIEW candidates AS
        SELECT s.*, d.cluster_id, d.cluster_size, d.is_representative, c.cluster, c.centroid_sim,
               sc.* EXCLUDE (sample_id, shard, "row"){knn_cols}
        FROM samples s
        LEFT JOIN (SELECT * FROM dups WHERE embedder = {_quote(src["dups_embedder"])}) d USING (sample_id)
        LEFT JOIN (SELECT * FROM clusters WHERE embedder = {_quote(src["clusters_embedder"])}) c USING (sample_id)
        LEFT JOIN (SELECT * FROM scores WHERE run = {_quote(src["score_run"])}) sc USING (sample_id){knn_joins}"""


def record_run(ws: Workspace, stage: str, started_at: datetime, params: dict, summary: dict) -> str:
    run_id = uuid.uuid4().hex[:12]
    con = _connect_rw(ws)
    try:
        con.execute(TABLES["runs"])
        con.execute(
            "INSERT INTO runs VALUES (?, ?, ?, ?, ?, ?)",
            [run_id, stage, started_at, datetime.now(timezone.utc), json.dumps(params, default=str), json.dumps(summary, default=str)],
        )
    finally:
        con.close()
    return run_id


def _upsert(ws: Workspace, table: str, row: list) -> None:
    con = _connect_rw(ws)
    try:
        con.execute(TABLES[table])
        con.execute(f"INSERT OR REPLACE INTO {table} VALUES ({', '.join('?' * len(row))})", row)
    finally:
        con.close()


def record_selection(ws: Workspace, manifest: dict, path: Path) -> None:
    digest = hashlib.sha256((path / "manifest.json").read_bytes()).hexdigest()
    config = {k: manifest.get(k) for k in ("limit", "seed", "score_run", "teacher", "counts_per_class")}
    _upsert(ws, "selections", [manifest["name"], manifest["total"], manifest.get("query"), manifest.get("policy"),
                               manifest.get("score_run"), str(path), digest, datetime.now(timezone.utc),
                               json.dumps(config)])


def record_student(ws: Workspace, summary: dict) -> None:
    """A distillation run's summary.json, as a row of `students`."""
    _upsert(ws, "students", [summary["name"], summary.get("selection"), summary.get("loss"),
                             summary.get("teacher_mode"), summary.get("eval_accuracy"), summary.get("checkpoint"),
                             datetime.now(timezone.utc), json.dumps(summary, default=str)])


# The read-only SQL surface lives in user_sql; these names stay here for callers.
from .user_sql import Limits, check_read_only, connect_readonly, query  # noqa: E402,F401
