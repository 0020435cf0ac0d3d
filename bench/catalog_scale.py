"""The catalog at scale: candidate queries over 10^7 score rows, refresh over 10^4 shards, and
the `candidates` view read from its compacted copy (curation/catalog_compact.py) against the join
it stands for.

    python bench/catalog_scale.py [--rows 10000000] [--many-shards 10000] [--many-rows 1000000] [--repeats 3]
    python bench/catalog_scale.py --quick       # 200,000 rows; 500 shards of 40,000 rows (CI)

Two generated workspaces, written by DuckDB in the stages' schemas (curation/schemas.py) and
layout (one parquet per shard for samples and scores, one per embedder for dups and clusters):
  big:  --rows rows in shards of 10,000 (img2dataset's shard size);
  many: --many-rows rows in --many-shards shards.
Measured on each, through the product's own paths:
  - `catalog.refresh` (what every stage runs at its end): the first one, which writes the
    compacted copy of `candidates`, then refreshes with nothing changed (the copy is kept);
  - `user_sql.query` (read-only, 2 threads, as `webdistill sql` runs it) on a filter + order +
    limit over `scores`, and on a filter + order + limit and a per-class count over `candidates`,
    side by side with the same queries over the join itself (`WITH candidates AS (<the join>)`:
    the view as it was before it was compacted);
  - `webdistill sql` processes end to end (start-up included): the candidates query, and
    `SELECT 1` (the start-up alone).
Medians of --repeats runs with their min-max spread. Prints JSON, then a markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import duckdb
import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.output import emit  # noqa: E402
from curation import catalog, catalog_compact, schemas, user_sql  # noqa: E402
from curation.workspace import Workspace  # noqa: E402

RUN, EMBEDDER = "default", "bench"
QUERIES = {
    "scores: filter + order + limit":
        "SELECT sample_id, fused FROM scores WHERE msp > 0.9 AND kd3_pass ORDER BY fused DESC LIMIT 100",
    "candidates: filter + order + limit":
        "SELECT sample_id, fused, cluster FROM candidates WHERE msp > 0.9 AND is_representative "
        "ORDER BY fused DESC LIMIT 100",
    "candidates: per-class count":
        "SELECT teacher_label, count(*) FROM candidates WHERE fused > 0.5 GROUP BY ALL ORDER BY ALL",
}
OVERRIDES = {  # columns whose values the views' joins and filters depend on
    "sample_id": "substr(md5(i::VARCHAR), 1, 24)",
    "shard": "lpad(({shard})::VARCHAR, 5, '0')",
    "run": f"'{RUN}'",
    "embedder": f"'{EMBEDDER}'",
    "cluster_id": "substr(md5((i - i % 3)::VARCHAR), 1, 24)",  # a near-duplicate cluster per 3 samples
    "is_representative": "i % 3 = 0",
    "cluster_size": "3",
    "cluster": "(hash(i) % 64)::INTEGER",
    "teacher_label": "(hash(i) % 10)::INTEGER",
    "kd3_label": "(hash(i) % 10)::INTEGER",
    "decoded": "true",
    "idx": "i - {lo}",
    "row": "i - {lo}",
    "teacher_logits": "[" + ", ".join(["random()"] * 10) + "]",
    "sha256": "md5(i::VARCHAR) || md5(i::VARCHAR)",
    "key": "lpad(i::VARCHAR, 9, '0')",
    "shard_url": "'/crawl/' || lpad(({shard})::VARCHAR, 5, '0') || '.tar'",
}


def _expr(name: str, duck_type: str, shard: int, lo: int) -> str:
    if name in OVERRIDES:
        expr = OVERRIDES[name].format(shard=shard, lo=lo)
    elif duck_type == "VARCHAR":
        expr = "'x' || (i % 1000)::VARCHAR"
    elif duck_type == "BOOLEAN":
        expr = "random() < 0.5"
    elif duck_type in ("FLOAT", "DOUBLE"):
        expr = "random()"
    else:
        expr = "(i % 1000)"
    return f'CAST({expr} AS {duck_type}) AS "{name}"'


def _copy(con: duckdb.DuckDBPyConnection, schema: pa.Schema, path: Path, lo: int, hi: int, shard: int) -> None:
    cols = ", ".join(_expr(n, t, shard, lo) for n, t in catalog._duckdb_types(schema))
    con.execute(f"COPY (SELECT {cols} FROM range({lo}, {hi}) t(i)) TO '{path}' (FORMAT parquet)")


def make_workspace(root: Path, rows: int, shards: int) -> Workspace:
    """samples and scores: one file per shard; dups and clusters: one file (per embedder), as index writes."""
    for sub in ("samples", f"scores/{RUN}", "dups", "clusters"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    con = duckdb.connect()
    per = -(-rows // shards)
    for s in range(shards):
        lo, hi = s * per, min(rows, (s + 1) * per)
        if lo >= hi:
            break
        _copy(con, schemas.SAMPLES, root / "samples" / f"{s:05d}.parquet", lo, hi, s)
        _copy(con, schemas.SCORES, root / "scores" / RUN / f"{s:05d}.parquet", lo, hi, s)
    _copy(con, schemas.DUPS, root / "dups" / f"{EMBEDDER}.parquet", 0, rows, 0)
    _copy(con, schemas.CLUSTERS, root / "clusters" / f"{EMBEDDER}.parquet", 0, rows, 0)
    con.close()
    (root / "scores" / RUN / "run.json").write_text(json.dumps({"name": RUN}))  # a finished run: candidates joins it
    return Workspace(root)


def timed(fn, repeats: int) -> dict:
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - start)
    return {"median_s": round(statistics.median(runs), 3), "min_s": round(min(runs), 3), "max_s": round(max(runs), 3)}


def _cli_seconds(ws: Workspace, sql: str) -> dict:
    """One `webdistill sql` process, as a user starts it."""
    cli = [sys.executable, "-m", "flows.cli", "sql", "-w", str(ws.root), "--format", "csv", sql]
    start = time.perf_counter()
    done = subprocess.run(cli, cwd=ROOT, capture_output=True, text=True, env={"PYTHONPATH": str(ROOT)} | _env())
    if done.returncode != 0:
        raise SystemExit(f"webdistill sql failed: {done.stderr.strip()}")
    return {"seconds": time.perf_counter() - start, "lines": done.stdout.count("\n")}


def measure(ws: Workspace, repeats: int, save=lambda part: None) -> dict:
    """Each operation `repeats` times (the first also warms the page cache: min-max shows it).
    An operation's entry: {"compacted": timing} and, for candidates queries, {"join": timing}."""
    start = time.perf_counter()
    catalog.refresh(ws)  # the first: writes the compacted copy unless one matches the inputs
    out = {"refresh (writes the compacted copy)": {"compacted": {"seconds": round(time.perf_counter() - start, 2)}}}
    out["refresh, nothing changed"] = {"compacted": timed(lambda: catalog.refresh(ws), repeats)}
    save(out)
    limits = user_sql.Limits(timeout_s=1200)
    join = catalog.candidates_query(catalog.candidate_sources(ws))
    for name, sql in QUERIES.items():
        entry, seen = {}, {}
        def run(sql=sql, seen=seen):
            seen.update(rows=user_sql.query(ws, sql, limits).num_rows)
        entry["compacted"] = timed(run, repeats) | seen
        if "candidates" in name:
            joined = f"WITH candidates AS ({join}) {sql}"
            entry["join"] = timed(lambda joined=joined: user_sql.query(ws, joined, limits), repeats)
        out[name] = entry
        save(out)
    for name, sql in (("webdistill sql process: candidates filter + order + limit",
                       QUERIES["candidates: filter + order + limit"]),
                      ("webdistill sql process: SELECT 1 (start-up)", "SELECT 1 AS x")):
        runs = [_cli_seconds(ws, sql) for _ in range(repeats)]
        seconds = [r["seconds"] for r in runs]
        out[name] = {"compacted": {"median_s": round(statistics.median(seconds), 3), "min_s": round(min(seconds), 3),
                                   "max_s": round(max(seconds), 3), "lines": runs[0]["lines"]}}
        save(out)
    return out


def _env() -> dict:
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def bench(root: Path, rows: int, shards: int, repeats: int, partial: Path | None = None) -> dict:
    """Generate (unless `root` holds a workspace already), then measure."""
    start = time.perf_counter()
    ws = Workspace(root) if (root / "samples").is_dir() else make_workspace(root, rows, shards)
    result = {"rows": rows, "shards": shards, "generate_s": round(time.perf_counter() - start, 1),
              "command": " ".join(["python", *sys.argv]), "load_avg_1m_before": round(os.getloadavg()[0], 2)}

    def save(part):
        result["operations"] = part
        if partial is not None:
            partial.write_text(json.dumps([result], indent=2))
    measure(ws, repeats, save)
    copy = catalog_compact.path(ws, "candidates")
    result["compacted_copy_bytes"] = copy.stat().st_size if copy.exists() else None
    result["load_avg_1m_after"] = round(os.getloadavg()[0], 2)
    return result


def _cell(m: dict | None) -> str:
    if not m:
        return ""
    if "median_s" in m:
        return f"{m['median_s']} ({m['min_s']}-{m['max_s']})"
    return str(m["seconds"])


def _seconds(m: dict | None) -> float:
    return (m or {}).get("median_s", (m or {}).get("seconds", float("nan")))


def markdown(results: list[dict]) -> str:
    lines = ["| workspace | operation | the join (the view before): median s (min-max) | "
             "compacted copy: median s (min-max) | speed-up |", "|---|---|---:|---:|---:|"]
    for r in results:
        label = f"{r['rows']:,} rows, {r['shards']:,} shards"
        for op, m in r.get("operations", {}).items():
            a, b = _seconds(m.get("join")), _seconds(m.get("compacted"))
            ratio = f"{a / max(b, 1e-3):.1f}x" if a == a and b == b else ""
            lines.append(f"| {label} | {op} | {_cell(m.get('join'))} | {_cell(m.get('compacted'))} | {ratio} |")
    for r in results:
        lines.append(f"\n{r['rows']:,} rows, {r['shards']:,} shards: `{r.get('command')}`, load average (1 min) "
                     f"{r.get('load_avg_1m_before')} before, {r.get('load_avg_1m_after')} after, on "
                     f"{os.cpu_count()} cores; compacted copy {(r.get('compacted_copy_bytes') or 0) / 2**20:,.0f} MiB")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--many-shards", type=int, default=10_000)
    ap.add_argument("--many-rows", type=int, default=1_000_000)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--case", choices=["big", "many", "both"], default="both")
    ap.add_argument("--work", default=None, help="keep the workspaces here (one found there is measured as it is)")
    ap.add_argument("--out", default=None, help="write OUT.json and OUT.md (and OUT.partial.json as it goes)")
    args = ap.parse_args(argv)
    if args.quick:
        args.rows, args.many_shards, args.many_rows, args.repeats = 200_000, 500, 40_000, 2
    partial = Path(args.out + ".partial.json") if args.out else None
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="webdistill-catalog-"))
    cases = {"big": (args.rows, -(-args.rows // 10_000)), "many": (args.many_rows, args.many_shards)}
    try:
        results = [bench(work / case, *cases[case], args.repeats, partial)
                   for case in cases if args.case in (case, "both")]
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    emit(results, markdown(results), args.out)
    return results


if __name__ == "__main__":
    main()
