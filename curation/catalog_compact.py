"""Compacted copies of catalog views: `compacted/<view>.parquet`, written by `catalog.refresh`.

Why: a view over per-shard parquet re-reads every shard's footer and redoes its joins on every
query. The `candidates` view joins samples, near-duplicates, k-means clusters and scores: over 10^7
rows that is seconds per query (bench/results/catalog.md). `refresh` writes the join's result once
into one parquet of 122,880-row groups, and the view reads that file: a filter + order + limit
then reads a few columns of one file.

What keeps it right:
- **Never stale.** The file's key/value metadata holds the stamp of what it was made from: the
  SELECT, and the path, size and mtime of every input file, taken *before* they are read. A refresh
  whose stamp differs rebuilds it; one whose stamp matches keeps it (refresh after a stage that did
  not touch those inputs costs a listing and a footer read).
- **Whole or absent.** It is written under a temporary name (swept once its writer is gone) and
  renamed into place by the caller while it holds the catalog's write lock, so no reader of the
  catalog sees it change under a query. One process compacts a view at a time (a lock file); a
  crash leaves the previous copy, which the next refresh finds stale and rebuilds.
- **Only a cache.** The per-shard files stay the artifacts: stages' skip checks and `rebuild` read
  them, and `compacted/` can be deleted at any time (`refresh` writes it again).
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from .files import discard, name_lock, storage_errors, sweep_stale_temporaries, temporary_name
from .user_sql import sql_literal
from .workspace import Workspace, remove_tree

FOLDER = "compacted"
ROW_GROUP = 122_880  # DuckDB's own row-group size: zone maps and parallelism per group
_STAMP_KEY = b"webdistill.compacted_from"


def path(ws: Workspace, view: str) -> Path:
    # owned: a `compacted` symlink planted in a workspace from elsewhere never redirects the copy's writes
    return ws.owned(FOLDER) / f"{view}.parquet"


def stamp(ws: Workspace, select_sql: str, patterns: list[str]) -> str:
    """What a copy of `select_sql` over the files matching `patterns` depends on, as one hash:
    relative paths (so a moved workspace keeps its copies), sizes and mtimes of those files."""
    files = sorted({(p.relative_to(ws.root).as_posix(), st.st_size, st.st_mtime_ns)
                    for pattern in patterns for p in ws.root.glob(pattern)
                    if p.is_file() and (st := p.stat())})
    return hashlib.sha256(json.dumps([select_sql, files]).encode()).hexdigest()


def stamp_of(copy: Path) -> str | None:
    """The stamp a compacted file was made from (None: no file, or not one this module wrote whole)."""
    try:
        return ((pq.read_schema(copy).metadata or {}).get(_STAMP_KEY) or b"").decode() or None
    except (OSError, pa.ArrowException):
        return None


@contextmanager
def compacting(ws: Workspace, view: str) -> Iterator[None]:
    """Hold the view's compaction lock: one process builds a view's copy at a time."""
    folder = ws.owned(FOLDER)
    with storage_errors(folder):
        folder.mkdir(parents=True, exist_ok=True)
    with name_lock(folder, view):
        yield


def build(ws: Workspace, view: str, view_sqls: list[str], select_sql: str, made_from: str) -> Path:
    """Write `select_sql` (over the views `view_sqls` create) to a temporary file beside the view's
    copy, stamped `made_from`; return it. The caller renames it into place (`install`) or discards it."""
    final = path(ws, view)
    sweep_stale_temporaries(final.parent)  # what a killed compaction left
    tmp, spill = temporary_name(final), Path(tempfile.mkdtemp(prefix="webdistill-compact-"))
    try:
        with storage_errors(final):
            # in memory, apart from the catalog: its write lock (which blocks readers) is not held meanwhile
            con = duckdb.connect(config={"temp_directory": str(spill), "preserve_insertion_order": False})
            try:
                for sql in view_sqls:
                    con.execute(sql)
                con.execute(f"COPY ({select_sql}) TO {sql_literal(tmp)} (FORMAT parquet, COMPRESSION zstd, "
                            f"ROW_GROUP_SIZE {ROW_GROUP}, KV_METADATA {{'{_STAMP_KEY.decode()}': "
                            f"{sql_literal(made_from)}}})")
            finally:
                con.close()
    except BaseException:
        discard(tmp)
        raise
    finally:
        remove_tree(spill, spill.parent)
    return tmp


def install(tmp: Path, view: str, ws: Workspace) -> None:
    """Rename a built copy into place (call with the catalog's write lock held)."""
    final = path(ws, view)
    with storage_errors(final):
        os.chmod(tmp, 0o644)
        os.replace(tmp, final)
