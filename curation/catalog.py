"""`catalog.duckdb`: views over the per-shard artifacts, small bookkeeping tables, and
the read-only SQL surface users query.

Views point at absolute globs, so they are rebuilt whenever the workspace moves
(`refresh` is cheap and runs after every stage). Plain DuckDB opens the file as is.
"""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone

import duckdb
import pyarrow as pa

from . import schemas
from .errors import CatalogMissing, SQLError, SQLRefused
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
}

TABLES = {
    "runs": """CREATE TABLE IF NOT EXISTS runs (
        run_id VARCHAR PRIMARY KEY, stage VARCHAR, started_at TIMESTAMPTZ, finished_at TIMESTAMPTZ,
        params JSON, summary JSON)""",
    "catalog_info": "CREATE TABLE IF NOT EXISTS catalog_info (key VARCHAR PRIMARY KEY, value VARCHAR)",
}

# User SQL may only read. DuckDB's own parser names each statement's type.
ALLOWED_STATEMENTS = {duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN}
USER_MEMORY_LIMIT = "4GB"
USER_THREADS = 2


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
        con.execute("INSERT OR REPLACE INTO catalog_info VALUES ('workspace', ?)", [str(ws.root)])
    finally:
        con.close()


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


def _needs_refresh(ws: Workspace) -> bool:
    try:
        con = duckdb.connect(str(ws.catalog_path), read_only=True)
    except duckdb.Error:
        return False
    try:
        rows = con.execute("SELECT value FROM catalog_info WHERE key = 'workspace'").fetchall()
        return not rows or rows[0][0] != str(ws.root)
    except duckdb.Error:
        return True
    finally:
        con.close()


def connect_readonly(ws: Workspace) -> duckdb.DuckDBPyConnection:
    """A connection that can read the workspace and nothing else, and can change nothing."""
    if not ws.catalog_path.exists():
        raise CatalogMissing(f"no catalog at {ws.catalog_path}; run `webdistill ingest` first")
    if _needs_refresh(ws):  # the workspace was moved: repoint the views
        refresh(ws)
    try:
        con = duckdb.connect(str(ws.catalog_path), read_only=True)
    except duckdb.IOException as exc:  # a stage holds the write lock for a moment
        raise SQLError(f"the catalog is busy ({_first_line(exc)}); try again in a moment") from exc
    allowed = str(ws.root).replace("'", "''") + "/"
    for setting in (
        f"SET allowed_directories=['{allowed}']",
        "SET enable_external_access=false",
        "SET autoinstall_known_extensions=false",
        "SET autoload_known_extensions=false",
        f"SET memory_limit='{USER_MEMORY_LIMIT}'",
        f"SET threads={USER_THREADS}",
        "SET lock_configuration=true",  # last: nothing above can be undone from SQL
    ):
        con.execute(setting)
    return con


def check_read_only(query: str) -> None:
    """Refuse anything but one SELECT/EXPLAIN statement, before it reaches the database."""
    try:
        statements = duckdb.extract_statements(query)
    except duckdb.Error as exc:
        raise SQLError(_first_line(exc)) from exc
    if len(statements) != 1:
        raise SQLRefused(f"give exactly one statement (got {len(statements)})")
    kind = statements[0].type
    if kind not in ALLOWED_STATEMENTS:
        raise SQLRefused(f"read-only SQL: {kind.name} statements are not allowed, only SELECT")


def query(ws: Workspace, sql: str) -> pa.Table:
    """Run read-only user SQL against the catalog and return an Arrow table."""
    check_read_only(sql)
    con = connect_readonly(ws)
    try:
        return con.sql(sql).to_arrow_table()
    except duckdb.PermissionException as exc:
        raise SQLRefused(_first_line(exc)) from exc
    except duckdb.InvalidInputException as exc:
        msg = _first_line(exc)
        if "read-only" in msg or "locked" in msg:
            raise SQLRefused(msg) from exc
        raise SQLError(msg) from exc
    except duckdb.Error as exc:
        raise SQLError(_first_line(exc)) from exc
    finally:
        con.close()


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
