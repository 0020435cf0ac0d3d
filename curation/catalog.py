"""`catalog.duckdb`: views over the per-shard artifacts and small bookkeeping tables.
Users query it through the read-only surface of `user_sql` (re-exported here: `query`).

Views point at absolute globs, so they are rebuilt whenever the workspace moves
(`refresh` is cheap and runs after every stage). Plain DuckDB opens the file as is.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import pyarrow as pa

from . import catalog_compact, schemas
from .coverage import class_coverage
from .errors import CatalogBusy, CatalogCorrupt, WebdistillError, first_line, storage_error
from .user_sql import sql_literal
from .workspace import Workspace, discard, storage_errors, sweep_stale_temporaries, temporary_name


@dataclass(frozen=True)
class ViewSpec:
    pattern: str  # artifacts: <workspace>/<pattern>, a glob of parquet files
    schema: pa.Schema  # used for an empty, typed view until the first artifact exists
    description: str
    hidden_parents: bool = True  # False: skip files in dot-folders (a writer's temporaries, see shard_writer)


VIEWS: dict[str, ViewSpec] = {
    "samples": ViewSpec("samples/*.parquet", schemas.SAMPLES, "accepted samples: one row per valid image"),
    "rejects": ViewSpec("rejects/*.parquet", schemas.REJECTS,
                        "refused samples and unreadable parts of shards, with a reason"),
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
    "selected": ViewSpec("selections/*/members.parquet", schemas.SELECTED,
                         "the members of every selection's curated shards: selection, sample_id, weight, "
                         "shard (tar file), position in it", hidden_parents=False),
}

TABLES = {
    "runs": """CREATE TABLE IF NOT EXISTS runs (
        run_id VARCHAR PRIMARY KEY, stage VARCHAR, started_at TIMESTAMPTZ, finished_at TIMESTAMPTZ,
        params JSON, summary JSON)""",
    "catalog_info": "CREATE TABLE IF NOT EXISTS catalog_info (key VARCHAR PRIMARY KEY, value VARCHAR)",
    "score_columns": "CREATE TABLE IF NOT EXISTS score_columns (name VARCHAR PRIMARY KEY, description VARCHAR)",
    # class_entropy, min_class_share: the selection's class coverage (curation/coverage.py)
    "selections": """CREATE TABLE IF NOT EXISTS selections (
        name VARCHAR PRIMARY KEY, size BIGINT, query VARCHAR, policy VARCHAR, score_run VARCHAR,
        path VARCHAR, manifest_sha256 VARCHAR, created_at TIMESTAMPTZ, config JSON,
        class_entropy DOUBLE, min_class_share DOUBLE)""",
    "students": """CREATE TABLE IF NOT EXISTS students (
        name VARCHAR PRIMARY KEY, selection VARCHAR, loss VARCHAR, teacher_mode VARCHAR, eval_accuracy DOUBLE,
        checkpoint VARCHAR, created_at TIMESTAMPTZ, summary JSON, selection_sha256 VARCHAR)""",
}

# Columns added to a table after catalogs were made with it: refresh adds them to an older catalog
# (at the end, where the rows put them).
ADDED_COLUMNS = {"students": {"selection_sha256": "VARCHAR"},
                 "selections": {"class_entropy": "DOUBLE", "min_class_share": "DOUBLE"}}

# What DuckDB says of a file that is not a database, or of a damaged one.
_CORRUPT = ("not a valid duckdb database", "corrupt", "checksum", "invalidated", "serialization error",
            "failed to read database header", "unexpected end of file", "could not read enough bytes")


def catalog_error(ws: Workspace, exc: BaseException) -> WebdistillError | None:
    """A DuckDB error of the catalog as a typed error: StorageError when it could not be written (disk
    full, permissions), CatalogCorrupt when the file is damaged; None for anything else."""
    storage = storage_error(exc, ws.catalog_path, writing=True)
    if storage is not None:
        return storage
    text = str(exc).lower()
    if any(marker in text for marker in _CORRUPT):
        return CatalogCorrupt(f"{ws.catalog_path} is corrupt ({first_line(exc)})")
    return None


def _locked(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "could not set lock" in text or "conflicting lock" in text


def _create(ws: Workspace) -> None:
    """A new catalog appears whole or not at all: DuckDB writes its first blocks under a temporary
    name, which is then linked into place unless another process got there first. (A catalog that
    DuckDB began in place and a full disk or a kill cut short is a file no one can open again.)"""
    tmp = temporary_name(ws.catalog_path)
    try:
        with storage_errors(ws.catalog_path), _catalog_errors(ws):
            ws.root.mkdir(parents=True, exist_ok=True)
            sweep_stale_temporaries(ws.root)  # what a creator killed before its link left
            con = duckdb.connect(str(tmp))
            try:
                for ddl in TABLES.values():
                    con.execute(ddl)
            finally:
                con.close()
            try:
                os.link(tmp, ws.catalog_path)
            except FileExistsError:
                pass  # another stage created it meanwhile: use theirs
    finally:
        discard(tmp)
        discard(tmp.with_name(tmp.name + ".wal"))


def _connect_rw(ws: Workspace, timeout_s: float = 60.0) -> duckdb.DuckDBPyConnection:
    """A write connection; waits while another process holds the catalog's lock."""
    if not ws.catalog_path.exists():
        _create(ws)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return duckdb.connect(str(ws.catalog_path))
        except duckdb.Error as exc:
            if _locked(exc) and time.monotonic() < deadline:
                time.sleep(0.2)
                continue
            typed = catalog_error(ws, exc)
            if typed is None and _locked(exc):
                typed = CatalogBusy(f"{ws.catalog_path} stayed locked by another process for {timeout_s:.0f} s: "
                                    "try again when it has finished")
            if typed is None:
                raise
            raise typed from exc


@contextmanager
def _catalog_errors(ws: Workspace) -> Iterator[None]:
    """DuckDB errors of the catalog that `catalog_error` can name come out typed."""
    try:
        yield
    except duckdb.Error as exc:
        typed = catalog_error(ws, exc)
        if typed is None:
            raise
        raise typed from exc


@contextmanager
def _writing(ws: Workspace) -> Iterator[duckdb.DuckDBPyConnection]:
    """A write connection whose DuckDB errors (a full disk, a damaged file) come out typed."""
    con = _connect_rw(ws)
    try:
        with _catalog_errors(ws):
            yield con
    finally:
        con.close()


def _duckdb_types(schema: pa.Schema) -> list[tuple[str, str]]:
    rel = duckdb.from_arrow(schema.empty_table())
    return list(zip(rel.columns, (str(t) for t in rel.types)))


def _view_sql(ws: Workspace, name: str, spec: ViewSpec) -> str:
    if any(ws.root.glob(spec.pattern)):
        glob = sql_literal(ws.root / spec.pattern)
        if spec.hidden_parents:
            return f"CREATE OR REPLACE VIEW {name} AS SELECT * FROM read_parquet({glob}, union_by_name=true)"
        return (f"CREATE OR REPLACE VIEW {name} AS SELECT * EXCLUDE (filename) FROM read_parquet({glob}, "
                "union_by_name=true, filename=true) "
                "WHERE NOT starts_with(parse_filename(parse_dirpath(filename)), '.')")
    cols = ", ".join(f'CAST(NULL AS {t}) AS "{c}"' for c, t in _duckdb_types(spec.schema))
    return f"CREATE OR REPLACE VIEW {name} AS SELECT {cols} WHERE false"


def refresh(ws: Workspace, recompact: bool = False) -> None:
    """(Re)create every view and bookkeeping table, and bring the selections and students tables in
    line with the manifests and summaries on disk (a stage killed between writing its folder and its
    row, or a rebuilt catalog), and give older selections their members file. `candidates` reads
    its compacted copy (curation/catalog_compact.py), rebuilt here when its inputs changed
    (`recompact`: always). Idempotent."""
    from .selection_members import backfill  # reads tars: only where a selection lacks the file

    catalog_compact.path(ws, "candidates")  # a planted `compacted` link is refused before anything is written
    backfill(ws)
    with catalog_compact.compacting(ws, "candidates"):  # refreshes in turn: the last one sees the newest files
        sources = candidate_sources(ws)
        view_sqls = {name: _view_sql(ws, name, spec) for name, spec in VIEWS.items()}
        built = _compact_candidates(ws, sources, view_sqls, recompact)
        try:
            with _writing(ws) as con:
                for table in TABLES:
                    _create_table(con, table)
                for sql in view_sqls.values():
                    con.execute(sql)
                con.executemany("INSERT OR REPLACE INTO score_columns VALUES (?, ?)",
                                list(schemas.SCORE_COLUMNS.items()))
                con.execute(f"CREATE OR REPLACE VIEW candidates AS {_candidates_view(ws, sources, built)}")
                info = [("workspace", str(ws.root))] + [(f"candidates.{k}", json.dumps(v)) for k, v in sources.items()]
                con.executemany("INSERT OR REPLACE INTO catalog_info VALUES (?, ?)", info)
                _restore_records(ws, con)
        finally:
            if built is not None:
                discard(built)  # left only when the catalog could not be written


# What the `candidates` join reads, besides scores/<run>/: its compacted copy is rebuilt when these change.
_CANDIDATE_INPUTS = ("samples", "dups", "clusters", "knn_scores")


def _compact_candidates(ws: Workspace, sources: dict, view_sqls: dict[str, str], recompact: bool) -> Path | None:
    """A new compacted copy of the `candidates` join (a temporary file), or None when the one in
    place was made from the same inputs, or there are no samples to join."""
    if not any(ws.root.glob(VIEWS["samples"].pattern)):
        return None
    select_sql = candidates_query(sources)
    patterns = [VIEWS[v].pattern for v in _CANDIDATE_INPUTS]
    if sources["score_run"] is not None:
        patterns.append(f"scores/{sources['score_run']}/*.parquet")
    made_from = catalog_compact.stamp(ws, select_sql, patterns)
    if not recompact and catalog_compact.stamp_of(catalog_compact.path(ws, "candidates")) == made_from:
        return None
    return catalog_compact.build(ws, "candidates", [view_sqls[v] for v in (*_CANDIDATE_INPUTS, "scores")],
                                 select_sql, made_from)


def _candidates_view(ws: Workspace, sources: dict, built: Path | None) -> str:
    """The `candidates` view's query: its compacted copy (`built` is renamed into place first), or the
    join itself while there are no samples (and no copy is kept)."""
    copy = catalog_compact.path(ws, "candidates")
    if built is not None:
        catalog_compact.install(built, "candidates", ws)
    elif not any(ws.root.glob(VIEWS["samples"].pattern)):
        discard(copy)
    if copy.exists():
        return f"SELECT * FROM read_parquet({sql_literal(copy)})"
    return candidates_query(sources)


def rebuild(ws: Workspace) -> Path | None:
    """Set the catalog aside (catalog.duckdb.<UTC time>.bak, with its WAL) and build a new one from
    the artifacts. Lost: the `runs` log. Returns where the old file went (None if there was none)."""
    aside = None
    with storage_errors(ws.catalog_path):
        if ws.catalog_path.exists():
            aside = ws.catalog_path.with_name(f"catalog.duckdb.{datetime.now(UTC):%Y%m%dT%H%M%S%f}.bak")
            wal = ws.catalog_path.with_name(ws.catalog_path.name + ".wal")
            if wal.exists():
                os.replace(wal, aside.with_name(aside.name + ".wal"))
            os.replace(ws.catalog_path, aside)
    refresh(ws, recompact=True)
    return aside


def _newest(paths) -> Path | None:
    paths = [p for p in paths if p.is_file()]
    return max(paths, key=lambda p: p.stat().st_mtime_ns) if paths else None


class UnknownScoreRun(WebdistillError):
    """A scoring run named by the caller that has not finished in this workspace."""


def scoring_runs(ws: Workspace) -> list[str]:
    """The finished scoring runs (scores/<run>/run.json), newest first."""
    runs = [p for p in ws.root.glob("scores/*/run.json") if p.is_file()]
    return [p.parent.name for p in sorted(runs, key=lambda p: p.stat().st_mtime_ns, reverse=True)]


def candidate_sources(ws: Workspace, score_run: str | None = None, dups_embedder: str | None = None,
                      clusters_embedder: str | None = None) -> dict:
    """What the `candidates` view joins: near-duplicate and k-means results of an embedder, a
    finished scoring run, and every named kNN score. Each source not given is the newest on disk;
    a named scoring run that has not finished is refused (UnknownScoreRun, listing those that have)."""
    runs = scoring_runs(ws)
    if score_run is not None and score_run not in runs:
        raise UnknownScoreRun(f"no finished scoring run {score_run!r} in {ws.root / 'scores'}; "
                              + (f"finished runs: {', '.join(runs)}" if runs else "none yet (run `webdistill score`)"))
    if dups_embedder is None:
        dups = _newest(ws.root.glob("dups/*.parquet"))
        dups_embedder = dups.stem if dups else None
    if clusters_embedder is None:
        clusters = _newest(ws.root.glob("clusters/*.parquet"))
        clusters_embedder = clusters.stem if clusters else None
    return {"dups_embedder": dups_embedder, "clusters_embedder": clusters_embedder,
            "score_run": score_run if score_run is not None else (runs[0] if runs else None),
            "knn": sorted(p.stem for p in ws.root.glob("knn_scores/*.parquet"))}


def candidates_query(src: dict) -> str:
    """The `candidates` view's SELECT over the given sources (from `candidate_sources`): select
    reads it with a named scoring run, the view with the newest."""
    knn_cols = "".join(f', k{i}.knn_sim AS "knn_{n}"' for i, n in enumerate(src["knn"]))
    knn_joins = "".join(f" LEFT JOIN (SELECT sample_id, knn_sim FROM knn_scores WHERE name = {sql_literal(n)}) k{i}"
                        " USING (sample_id)"
                        for i, n in enumerate(src["knn"]))
    return f"""SELECT s.*, d.cluster_id, d.cluster_size, d.is_representative, c.cluster, c.centroid_sim,
               sc.* EXCLUDE (sample_id, shard, "row"){knn_cols}
        FROM samples s
        LEFT JOIN (SELECT * FROM dups WHERE embedder = {sql_literal(src["dups_embedder"])}) d USING (sample_id)
        LEFT JOIN (SELECT * FROM clusters WHERE embedder = {sql_literal(src["clusters_embedder"])}) c USING (sample_id)
        LEFT JOIN (SELECT * FROM scores WHERE run = {sql_literal(src["score_run"])}) sc USING (sample_id){knn_joins}"""


def record_run(ws: Workspace, stage: str, started_at: datetime, params: dict, summary: dict) -> str:
    run_id = uuid.uuid4().hex[:12]
    with _writing(ws) as con:
        con.execute(TABLES["runs"])
        con.execute(
            "INSERT INTO runs VALUES (?, ?, ?, ?, ?, ?)",
            [run_id, stage, started_at, datetime.now(UTC), json.dumps(params, default=str),
             json.dumps(summary, default=str)],
        )
    return run_id


def _create_table(con: duckdb.DuckDBPyConnection, table: str) -> None:
    """The table, with the columns added since an older catalog made it."""
    con.execute(TABLES[table])
    for column, kind in ADDED_COLUMNS.get(table, {}).items():
        con.execute(f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {column} {kind}")


def _upsert(con: duckdb.DuckDBPyConnection, table: str, row: list) -> None:
    _create_table(con, table)
    con.execute(f"INSERT OR REPLACE INTO {table} VALUES ({', '.join('?' * len(row))})", row)


def _selection_row(manifest: dict, path: Path, digest: str, created_at: datetime) -> list:
    config = {k: manifest.get(k) for k in ("limit", "seed", "score_run", "teacher", "counts_per_class",
                                           "policy_steps", "coverage")}
    coverage = manifest.get("coverage")
    if not isinstance(coverage, dict):  # a manifest from before coverage was recorded: from its counts
        counts = manifest.get("counts_per_class")
        coverage = class_coverage(counts if isinstance(counts, dict) else {}, manifest.get("num_classes"))
    return [path.name, manifest["total"], manifest.get("query"), manifest.get("policy"), manifest.get("score_run"),
            str(path), digest, created_at, json.dumps(config), coverage.get("class_entropy"),
            coverage.get("min_class_share")]


def _student_row(summary: dict, created_at: datetime) -> list:
    return [summary["name"], summary.get("selection"), summary.get("loss"), summary.get("teacher_mode"),
            summary.get("eval_accuracy"), summary.get("checkpoint"), created_at, json.dumps(summary, default=str),
            summary.get("selection_sha256")]


def record_selection(ws: Workspace, manifest: dict, path: Path) -> None:
    digest = hashlib.sha256((path / "manifest.json").read_bytes()).hexdigest()
    with _writing(ws) as con:
        _upsert(con, "selections", _selection_row(manifest | {"name": path.name}, path, digest,
                                                  datetime.now(UTC)))


def forget(ws: Workspace, table: str, name: str) -> None:
    """Drop the row of a deleted selection or student."""
    if table not in ("selections", "students"):
        raise ValueError(f"not a table of named records: {table}")
    with _writing(ws) as con:
        _create_table(con, table)
        con.execute(f"DELETE FROM {table} WHERE name = ?", [name])


def record_student(ws: Workspace, summary: dict) -> None:
    """A distillation run's summary.json, as a row of `students`."""
    with _writing(ws) as con:
        _upsert(con, "students", _student_row(summary, datetime.now(UTC)))


_RECORD_MAX_BYTES = 16 * 2**20  # a manifest or summary bigger than this is not one webdistill wrote


def _stored_documents(ws: Workspace, kind: str, filename: str) -> Iterator[tuple[Path, bytes, dict, datetime]]:
    """(folder, bytes, parsed JSON, mtime) of each <kind>/<name>/<filename> whose name is valid."""
    root = ws.root / kind
    for path in sorted(root.glob(f"*/{filename}")) if root.is_dir() else ():
        try:
            folder = ws.owned(kind, path.parent.name)
            if path.is_symlink() or not path.is_file() or path.stat().st_size > _RECORD_MAX_BYTES:
                continue
            raw = path.read_bytes()
            doc = json.loads(raw)
        except (WebdistillError, OSError, ValueError):
            continue  # a temporary folder, a stray file, an unreadable document: not a record
        if isinstance(doc, dict):
            yield folder, raw, doc, datetime.fromtimestamp(path.stat().st_mtime, UTC)


def _restore_records(ws: Workspace, con: duckdb.DuckDBPyConnection) -> None:
    """Rows of selections and students for folders the tables miss (or describe as they were before)."""
    known = dict(con.execute("SELECT name, manifest_sha256 FROM selections").fetchall())
    for folder, raw, manifest, mtime in _stored_documents(ws, "selections", "manifest.json"):
        digest = hashlib.sha256(raw).hexdigest()
        if known.get(folder.name) != digest:
            _try_upsert(con, "selections", _selection_row, manifest, folder, digest, mtime)
    students = {name for (name,) in con.execute("SELECT name FROM students").fetchall()}
    for folder, _, summary, mtime in _stored_documents(ws, "students", "summary.json"):
        if folder.name not in students:
            # recorded with the selection's name (the summary holds its manifest's path)
            name = summary.get("selection_name", summary.get("selection"))
            _try_upsert(con, "students", _student_row, summary | {"name": folder.name, "selection": name}, mtime)


def _try_upsert(con: duckdb.DuckDBPyConnection, table: str, make_row, *args) -> None:
    """Insert the row make_row(*args) makes from a stored document; one that does not fit the table
    is left out."""
    try:
        _upsert(con, table, make_row(*args))
    except (KeyError, TypeError, ValueError, duckdb.ConversionException, duckdb.InvalidInputException):
        pass


# The read-only SQL surface lives in user_sql; these names stay here for callers.
from .user_sql import USER_LIMITS, Limits, check_read_only, connect_readonly, query  # noqa: E402,F401
