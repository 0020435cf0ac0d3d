"""What the report shows, read from the catalog's views (read-only, through `catalog.query`): the
pool's counts, the scored candidates of a scoring run, the selections with their members, the
students with their metrics, the largest near-duplicate clusters, and an optional ground truth.
Plain tables and dicts: plotting and HTML are report_plots' and report_html's jobs."""
from __future__ import annotations

import json
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd

from . import catalog
from .errors import WebdistillError
from .schemas import SCORE_COLUMNS
from .workspace import Workspace

# Score columns that are labels, thresholds or flags, not "higher = more in-distribution".
NOT_SCORES = {"teacher_label", "teacher_logits", "student_label", "kd3_label", "kd3_threshold", "decoded"}
TOP_SOURCES = 12  # sources shown by name; the rest are one bar
SIZE_BUCKETS = (32, 64, 128, 256, 512, 1024)  # longest side, in pixels


def _rows(ws: Workspace, sql: str, params: dict | None = None) -> list[dict]:
    return catalog.query(ws, sql, params=params).to_pylist()


def pool_counts(ws: Workspace, dups_embedder: str | None) -> dict:
    """Samples by source (URL host), format and size; rejects by reason; exact and near duplicates."""
    host = "coalesce(nullif(split_part(url, '/', 3), ''), '(no url)')"
    sources = _rows(ws, f"SELECT {host} AS source, count(*) AS n FROM samples GROUP BY 1 ORDER BY n DESC, 1")
    if len(sources) > TOP_SOURCES:
        rest = sum(r["n"] for r in sources[TOP_SOURCES:])
        sources = sources[:TOP_SOURCES] + [{"source": f"{len(sources) - TOP_SOURCES} other sources", "n": rest}]
    bucket = " ".join(f"WHEN greatest(width, height) < {b} THEN '{lo}-{b - 1} px'"
                      for lo, b in zip((0, *SIZE_BUCKETS), SIZE_BUCKETS))
    sizes = _rows(ws, f"SELECT CASE {bucket} ELSE '{SIZE_BUCKETS[-1]} px or more' END AS size, "
                      "min(greatest(width, height)) AS lo, count(*) AS n FROM samples GROUP BY 1 ORDER BY lo")
    totals = _rows(ws, "SELECT count(*) AS samples, count(DISTINCT sha256) AS distinct_images, "
                       "(SELECT count(*) FROM rejects) AS rejected, "
                       "(SELECT count(*) FROM (SELECT sha256 FROM samples GROUP BY 1 HAVING count(*) > 1)) "
                       "AS exact_groups FROM samples")[0]
    near = _rows(ws, "SELECT count(DISTINCT cluster_id) FILTER (WHERE cluster_size > 1) AS clusters, "
                     "count(*) FILTER (WHERE cluster_size > 1) AS in_clusters, "
                     "count(*) FILTER (WHERE NOT is_representative) AS dropped_by_dedup "
                     "FROM dups WHERE embedder = $e", {"e": dups_embedder})[0]
    return {
        **totals, "exact_duplicates": totals["samples"] - totals["distinct_images"], "near": near,
        "dups_embedder": dups_embedder,
        "sources": [(r["source"], r["n"]) for r in sources],
        "formats": [(r["format"] or "?", r["n"]) for r in _rows(
            ws, "SELECT format, count(*) AS n FROM samples GROUP BY 1 ORDER BY n DESC")],
        "sizes": [(r["size"], r["n"]) for r in sizes],
        "rejects": [(r["reason"], r["n"]) for r in _rows(
            ws, "SELECT reason, count(*) AS n FROM rejects GROUP BY 1 ORDER BY n DESC, 1")],
    }


def scored_pool(ws: Workspace, score_run: str | None) -> pd.DataFrame:
    """The candidates with the scores of `score_run` (None: the newest finished run), without the
    logits and the verbatim metadata."""
    sources = catalog.candidate_sources(ws, score_run=score_run)
    return catalog.query(ws, f"SELECT * EXCLUDE (meta, teacher_logits) FROM ({catalog.candidates_query(sources)})"
                         ).to_pandas()


def score_columns(frame: pd.DataFrame) -> list[str]:
    """The frame's score columns (documented scores and kNN similarities) that vary at all."""
    found = []
    for col in frame.columns:
        if not ((col in SCORE_COLUMNS and col not in NOT_SCORES) or col.startswith("knn_")):
            continue
        values = pd.to_numeric(frame[col], errors="coerce").to_numpy(dtype=float)
        if np.isfinite(values).any() and np.nanstd(values) > 0:
            found.append(col)
    return found


def selections(ws: Workspace, names: list[str] | None) -> list[dict]:
    """The recorded selections (or those named, in that order), oldest first, each with its manifest
    and its members (sample_id, weight) from the `selected` view."""
    rows = _rows(ws, "SELECT name, size, policy, query, score_run, path, created_at FROM selections "
                     "ORDER BY created_at, name")
    by_name = {r["name"]: r for r in rows}
    if names:
        missing = [n for n in names if n not in by_name]
        if missing:
            raise WebdistillError(f"no selection {', '.join(map(repr, missing))} in {ws.root / 'selections'}; "
                                  f"recorded: {', '.join(by_name) or 'none'}")
        rows = [by_name[n] for n in names]
    out = []
    for row in rows:
        try:
            folder = ws.owned("selections", row["name"])  # here, even when the catalog recorded another root
            manifest = json.loads((folder / "manifest.json").read_text())
            row["path"] = str(folder)
        except (OSError, ValueError, WebdistillError):
            manifest = {}
        members = catalog.query(ws, "SELECT sample_id, weight FROM selected WHERE selection = $s",
                                params={"s": row["name"]}).to_pandas()
        out.append(row | {"manifest": manifest, "members": members})
    return out


def students(ws: Workspace) -> list[dict]:
    """The recorded students, oldest first, each with its metrics.jsonl rows (loss and eval)."""
    out = []
    for row in _rows(ws, "SELECT name, selection, loss, teacher_mode, eval_accuracy, summary FROM students "
                         "ORDER BY created_at, name"):
        summary = json.loads(row.pop("summary") or "{}")
        metrics = []
        try:
            lines = (ws.owned("students", row["name"]) / "metrics.jsonl").read_text().splitlines()
        except (OSError, WebdistillError):
            lines = []
        for line in lines:
            try:
                entry = json.loads(line)
            except ValueError:
                continue  # a line cut short by a killed job
            if isinstance(entry, dict):
                metrics.append(entry)
        out.append(row | {"summary": summary, "metrics": metrics})
    return out


def dup_clusters(ws: Workspace, embedder: str | None, clusters: int, per_cluster: int) -> pd.DataFrame:
    """Members (at most `per_cluster`, representative first) of the `clusters` largest near-duplicate
    clusters, with what reading their bytes needs."""
    return catalog.query(ws, """
        WITH top AS (SELECT cluster_id, cluster_size FROM dups WHERE embedder = $e AND is_representative
                     AND cluster_size > 1 ORDER BY cluster_size DESC, cluster_id LIMIT $k),
        members AS (SELECT d.cluster_id, t.cluster_size, d.is_representative, s.sample_id, s.shard_url, s.key,
                           s.ext, s.sha256, row_number() OVER (PARTITION BY d.cluster_id
                                                               ORDER BY d.is_representative DESC, s.sample_id) AS i
                    FROM dups d JOIN top t USING (cluster_id) JOIN samples s USING (sample_id) WHERE d.embedder = $e)
        SELECT * EXCLUDE (i) FROM members WHERE i <= $n ORDER BY cluster_size DESC, cluster_id, i""",
                         params={"e": embedder, "k": clusters, "n": per_cluster}).to_pandas()


def read_truth(path: Path) -> pd.DataFrame:
    """A ground truth: one row per (shard, key) with a boolean in_domain (and, when given, domain)."""
    try:
        frame = duckdb.connect().execute("SELECT * FROM read_parquet($p)", {"p": str(path)}).df()
    except duckdb.Error as exc:
        raise WebdistillError(f"cannot read the ground truth {path}: {str(exc).splitlines()[0]}") from exc
    missing = {"shard", "key", "in_domain"} - set(frame.columns)
    if missing:
        raise WebdistillError(f"the ground truth {path} has no column {', '.join(sorted(missing))} "
                              "(it needs shard, key and in_domain)")
    keep = [c for c in ("shard", "key", "in_domain", "domain") if c in frame.columns]
    return frame[keep].assign(in_domain=frame["in_domain"].astype(bool))
