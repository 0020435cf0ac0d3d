"""Attack class: user SQL that costs unbounded time, memory, output or disk, and the SQL surface's
inputs and outputs (a query from a file or stdin, CSV/JSON a program can read, a damaged catalog)."""
import csv
import io
import json
import math
import subprocess
import sys
import tempfile
import threading
import time

import duckdb
import pyarrow as pa
import pytest

from curation import catalog, schemas, user_sql
from curation.errors import CatalogCorrupt, SQLLimit
from curation.workspace import Workspace, write_parquet_atomic

from ..conftest import ROOT, run_cli

CROSS_JOIN = "SELECT count(*) AS n FROM range(100000000) a, range(100000000) b WHERE a.range + b.range = 7"
SPILLING_SORT = ("SELECT count(*) AS n FROM (SELECT * FROM (SELECT random() AS r, md5(i::VARCHAR) AS s "
                 "FROM range(3000000) t(i)) ORDER BY r OFFSET 1)")
NAN, INF = float("nan"), float("inf")


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Workspace:
    """A catalog over one scoring run whose rows hold list columns, NaN and infinity."""
    ws = Workspace(tmp_path_factory.mktemp("boundsws") / "ws")
    rows = [{"run": "r1", "sample_id": f"s{i}", "shard": "00000", "row": i, "decoded": True, "teacher_label": i,
             "msp": [0.5, NAN, INF][i], "energy": [-1.0, -2.0, -INF][i],
             "teacher_logits": [[0.1, 2.0], [NAN, 1.0], None][i]}
            for i in range(3)]
    write_parquet_atomic(pa.Table.from_pylist(rows, schema=schemas.SCORES), ws.owned("scores", "r1") / "00000.parquet")
    catalog.refresh(ws)
    return ws


def listing(folder) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def one_error(res: subprocess.CompletedProcess) -> str:
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and lines[0].startswith("webdistill: error:"), res.stderr
    return lines[0]


def test_timeout_stops_a_cross_join_and_leaves_no_temp_files(ws, tmp_path):
    before, tmp = listing(ws.root), tmp_path / "tmp"
    tmp.mkdir()
    started = time.monotonic()
    res = run_cli("sql", "-w", str(ws.root), CROSS_JOIN, "--timeout", "1", env={"TMPDIR": str(tmp)})
    assert "time limit of 1 s" in one_error(res) and res.stdout == ""
    assert time.monotonic() - started < 30  # the join itself would run for hours
    assert listing(ws.root) == before  # no catalog.duckdb.tmp spill beside the catalog
    assert listing(tmp) == []


def test_spills_go_to_a_bounded_folder_removed_after_each_query(ws, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the per-query folders are made
    before, seen, done = listing(ws.root), set(), threading.Event()

    def watch():
        while not done.is_set():
            seen.update(p.name for p in tmp_path.glob("webdistill-sql-*/*"))
            time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        small_memory = user_sql.Limits(max_memory_bytes=48 * 2**20)
        assert catalog.query(ws, SPILLING_SORT, small_memory).to_pylist() == [{"n": 2999999}]
        spilled = {name for name in seen if name.endswith(".tmp")}
        assert spilled, seen  # it did spill, into its own folder
        assert list(tmp_path.iterdir()) == []
        with pytest.raises(SQLLimit, match="temp space"):
            catalog.query(ws, SPILLING_SORT, user_sql.Limits(max_memory_bytes=48 * 2**20, max_temp_bytes=4 * 2**20))
        assert list(tmp_path.iterdir()) == []
        with pytest.raises(SQLLimit, match="time limit"):
            catalog.query(ws, SPILLING_SORT, user_sql.Limits(max_memory_bytes=48 * 2**20, timeout_s=0.3))
        assert list(tmp_path.iterdir()) == []
    finally:
        done.set()
        watcher.join()
    assert listing(ws.root) == before


def test_rows_are_bounded(ws):
    w = str(ws.root)
    res = run_cli("sql", "-w", w, "SELECT * FROM range(1000)", "--format", "csv", "--max-rows", "100")
    assert "more than 100 rows" in one_error(res) and res.stdout == ""  # refused, not cut short
    assert len(run_cli("sql", "-w", w, "SELECT * FROM range(1000)", "--format", "csv", "--max-rows", "1000")
               .stdout.splitlines()) == 1001
    res = run_cli("sql", "-w", w, "SELECT * FROM range(100001)", "--format", "json")
    assert "more than 100000 rows" in one_error(res)  # the default for csv/json
    table = run_cli("sql", "-w", w, "SELECT * FROM range(100000)")
    assert table.returncode == 0 and "100000 rows in all; the first 40 shown" in table.stdout
    assert "│    39 │" in table.stdout and "│    40 │" not in table.stdout
    endless = run_cli("sql", "-w", w, "SELECT * FROM range(1000000000000)", "--max-rows", "5", "--timeout", "30")
    assert endless.returncode == 0 and "more than 100000 rows; the first 5 shown" in endless.stdout, endless.stderr


# The process's own peak: VmHWM belongs to its address space, which exec made new. ru_maxrss would
# not do: Linux keeps it across exec, so it carries the forking pytest worker's size (2.5 GB once in CI).
RSS = """import re, sys
from flows.cli import main
rc = main(sys.argv[1:])
hwm = int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1))
print("peak_rss_mib", hwm // 1024, "rc", rc, file=sys.stderr)
"""


def test_a_large_result_streams_and_is_refused_past_max_bytes(ws):
    # 50,000 rows of 100 kB: 5 GB if it were materialised (the old surface held it all, and more)
    res = subprocess.run([sys.executable, "-c", RSS, "sql", "-w", str(ws.root), "--format", "csv", "--max-bytes",
                          str(16 * 2**20), "SELECT repeat('x', 100000) AS s FROM range(50000)"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    lines = res.stderr.strip().splitlines()
    assert "larger than 16777216 bytes" in lines[0] and res.stdout == "", res.stderr
    peak = int(lines[-1].split()[1])
    # DuckDB holds up to one 2,048-row vector (200 MB here) per thread outside its memory limit, plus the
    # interpreter and its imports: bounded, and far below the 5 GB the result would take whole
    assert peak < 2048, f"peak RSS {peak} MiB"
    ok = run_cli("sql", "-w", str(ws.root), "--format", "csv", "SELECT repeat('x', 100000) AS s FROM range(100)")
    assert ok.returncode == 0 and len(ok.stdout.splitlines()) == 101


def test_query_from_a_file_or_stdin_beyond_the_argv_limit(ws, tmp_path):
    query = f"SELECT length('{'x' * 200_000}') AS n -- more than the 128 KB one argument may carry"
    path = tmp_path / "q.sql"
    path.write_text(query)
    w = str(ws.root)
    for res in (run_cli("sql", "-w", w, "-f", str(path), "--format", "csv"),
                run_cli("sql", "-w", w, "-", "--format", "csv", input=query),
                run_cli("sql", "-w", w, "-f", "-", "--format", "csv", input=query)):
        assert res.returncode == 0 and res.stdout.splitlines() == ["\"n\"", "200000"], res.stderr
    assert "cannot read the query" in one_error(run_cli("sql", "-w", w, "-f", str(tmp_path / "missing.sql")))
    assert "give the query" in one_error(run_cli("sql", "-w", w, "SELECT 1", "-f", str(path)))
    assert "give the query" in one_error(run_cli("sql", "-w", w))


def test_csv_writes_lists_as_json_and_json_output_is_valid(ws):
    q = "SELECT sample_id, teacher_logits, msp, energy FROM scores ORDER BY sample_id"
    res = run_cli("sql", "-w", str(ws.root), q, "--format", "csv")
    assert res.returncode == 0, res.stderr
    rows = list(csv.DictReader(io.StringIO(res.stdout)))
    assert [r["sample_id"] for r in rows] == ["s0", "s1", "s2"]
    logits = [json.loads(r["teacher_logits"]) if r["teacher_logits"] else None for r in rows]
    assert logits[0] == pytest.approx([0.1, 2.0]) and logits[1][0] is None and logits[1][1] == 1.0 and logits[2] is None

    def no_constants(name):
        raise AssertionError(f"{name} is not JSON")

    res = run_cli("sql", "-w", str(ws.root), q, "--format", "json")
    data = json.loads(res.stdout, parse_constant=no_constants)  # NaN, Infinity would fail here
    assert [d["msp"] for d in data] == [0.5, None, None] and data[2]["energy"] is None
    assert data[1]["teacher_logits"] == [None, 1.0] and math.isclose(data[0]["teacher_logits"][1], 2.0)
    empty = run_cli("sql", "-w", str(ws.root), "SELECT * FROM scores WHERE false", "--format", "json")
    assert json.loads(empty.stdout) == []


@pytest.mark.parametrize("flag,value", [("--timeout", "0"), ("--max-rows", "-5"), ("--max-bytes", "0"),
                                        ("--max-temp-bytes", "-1")])
def test_bad_limits_are_one_line(ws, flag, value):
    assert "must be > 0" in one_error(run_cli("sql", "-w", str(ws.root), "SELECT 1", flag, value))


def test_a_corrupt_catalog_says_so_and_only_a_lock_is_busy(ws, tmp_path):
    good = ws.catalog_path.read_bytes()
    flipped = bytearray(good)
    flipped[8192 + 100:8192 + 2100] = b"\xff" * 2000
    variants = {"random": bytes(range(256)) * 400, "text": b"hello", "empty": b"", "truncated": good[:5000],
                "flipped_block": bytes(flipped)}
    for name, content in variants.items():
        broken = Workspace(tmp_path / name)
        broken.root.mkdir()
        broken.catalog_path.write_bytes(content)
        with pytest.raises(CatalogCorrupt, match="is not a DuckDB database or is corrupt") as caught:
            catalog.query(broken, "SELECT 1")
        assert "busy" not in str(caught.value) and "\n" not in str(caught.value), name
        if name in ("random", "flipped_block"):  # and as the user sees it
            line = one_error(run_cli("sql", "-w", str(broken.root), "SELECT 1"))
            assert "is not a DuckDB database or is corrupt" in line and "busy" not in line, (name, line)
        assert broken.catalog_path.read_bytes() == content
    writer = duckdb.connect(str(ws.catalog_path))  # another process holds the write lock
    try:
        line = one_error(run_cli("sql", "-w", str(ws.root), "SELECT 1"))
    finally:
        writer.close()
    assert "busy" in line and "corrupt" not in line
