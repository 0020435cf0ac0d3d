import json
import subprocess
import sys
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation import catalog
from curation.errors import CatalogMissing, SQLError, SQLRefused
from curation.ingest import ingest
from curation.workspace import Workspace

from .conftest import run_cli


@pytest.fixture(scope="module")
def ws(small_crawl, tmp_path_factory) -> Workspace:
    ws = Workspace(tmp_path_factory.mktemp("sqlws") / "ws")
    ingest(ws, [str(small_crawl / "crawl")], workers=2, progress=False)
    catalog.refresh(ws)
    return ws


@pytest.fixture(scope="module")
def outside(tmp_path_factory):
    d = tmp_path_factory.mktemp("outside")
    pq.write_table(pa.table({"secret": [42]}), d / "secret.parquet")
    (d / "secret.csv").write_text("secret\n42\n")
    return d


def refused_statements(ws: Workspace, outside) -> dict[str, str]:
    inside = ws.root
    return {
        "create": "CREATE TABLE t AS SELECT 1",
        "create_temp": "CREATE TEMP TABLE t AS SELECT 1",
        "insert": "INSERT INTO runs (run_id) VALUES ('x')",
        "update": "UPDATE runs SET stage = 'x'",
        "delete": "DELETE FROM runs",
        "drop": "DROP VIEW samples",
        "alter": "ALTER VIEW samples RENAME TO s2",
        "copy_inside_workspace": f"COPY (SELECT 1) TO '{inside}/out.csv'",
        "copy_outside": f"COPY (SELECT 1) TO '{outside}/out.csv'",
        "export": f"EXPORT DATABASE '{inside}/export'",
        "attach": f"ATTACH '{outside}/other.duckdb' AS other",
        "install": "INSTALL httpfs",
        "load": "LOAD httpfs",
        "set": "SET enable_external_access = true",
        "pragma": "PRAGMA threads=8",
        "two_statements": "SELECT 1; DROP VIEW samples",
        "read_csv_etc_passwd": "SELECT * FROM read_csv('/etc/passwd')",
        "read_parquet_outside": f"SELECT * FROM read_parquet('{outside}/secret.parquet')",
        "read_csv_dotdot": f"SELECT * FROM read_csv('{inside}/../../outside0/secret.csv')",
        "glob_outside": "SELECT * FROM glob('/etc/*')",
        "read_text": "SELECT * FROM read_text('/etc/hostname')",
        "http": "SELECT * FROM read_parquet('http://127.0.0.1:9/x.parquet')",
    }


def test_every_writing_or_escaping_statement_is_refused(ws, outside):
    for name, sql in refused_statements(ws, outside).items():
        with pytest.raises(SQLRefused):
            catalog.query(ws, sql)
        assert not (ws.root / "out.csv").exists() and not (ws.root / "export").exists(), name
    assert not (outside / "out.csv").exists()
    # and nothing changed
    assert catalog.query(ws, "SELECT count(*) AS n FROM runs").to_pylist() == [{"n": 0}]


def test_reads_work(ws):
    rows = catalog.query(ws, "SELECT reason, count(*) AS n FROM rejects GROUP BY ALL ORDER BY reason").to_pylist()
    assert {r["reason"] for r in rows} >= {"bad_json", "corrupt_image", "decompression_bomb", "truncated_tar"}
    plan = catalog.query(ws, "EXPLAIN SELECT * FROM samples")
    assert plan.num_rows >= 1
    n = catalog.query(ws, f"SELECT count(*) AS n FROM read_parquet('{ws.root}/samples/*.parquet')").to_pylist()
    assert n[0]["n"] > 300  # the workspace's own files stay readable


def test_bad_sql_is_a_typed_error(ws):
    with pytest.raises(SQLError):
        catalog.query(ws, "SELEC 1")
    with pytest.raises(SQLError, match="no_such_column"):
        catalog.query(ws, "SELECT no_such_column FROM samples")


def test_no_catalog_yet(tmp_path):
    with pytest.raises(CatalogMissing):
        catalog.query(Workspace(tmp_path / "empty"), "SELECT 1")


def test_plain_duckdb_opens_the_catalog(ws):
    con = duckdb.connect(str(ws.catalog_path), read_only=True)
    assert con.execute("SELECT count(*) FROM samples").fetchall()[0][0] > 300
    assert {r[0] for r in con.sql("SELECT table_name FROM information_schema.tables").fetchall()} >= {
        "samples", "rejects", "shards", "runs"}
    con.close()


def test_empty_views_are_typed_before_any_artifact(tmp_path):
    ws = Workspace(tmp_path / "ws")
    catalog.refresh(ws)
    assert catalog.query(ws, "SELECT count(*) AS n FROM samples WHERE width > 10").to_pylist() == [{"n": 0}]


def test_moved_workspace_still_answers(ws, tmp_path):
    import shutil

    moved = Workspace(tmp_path / "moved")
    shutil.copytree(ws.root, moved.root)
    count = "SELECT count(*) AS n FROM samples"
    assert catalog.query(moved, count).to_pylist() == catalog.query(ws, count).to_pylist()
    view = catalog.query(moved, "SELECT sql FROM duckdb_views() WHERE view_name = 'samples'").to_pylist()[0]["sql"]
    assert str(moved.root) in view and str(ws.root) + "/" not in view  # reads its own files, not the original's


@pytest.mark.parametrize("name", ["insert", "copy_inside_workspace", "attach", "install", "read_csv_etc_passwd"])
def test_cli_refusals_are_one_line(ws, outside, name):
    res = run_cli("sql", "-w", str(ws.root), refused_statements(ws, outside)[name])
    assert res.returncode == 2
    assert res.stdout == ""
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("webdistill: error:"), res.stderr


def test_cli_formats(ws):
    q = "SELECT reason, count(*) AS n FROM rejects GROUP BY ALL ORDER BY reason"
    as_json = json.loads(run_cli("sql", "-w", str(ws.root), q, "--format", "json").stdout)
    csv_lines = run_cli("sql", "-w", str(ws.root), q, "--format", "csv").stdout.strip().splitlines()
    table = run_cli("sql", "-w", str(ws.root), q).stdout
    assert csv_lines[0] == '"reason","n"' and len(csv_lines) == len(as_json) + 1
    assert all(r["reason"] in table for r in as_json)


def test_sql_starts_without_the_heavy_imports(ws):
    """`webdistill sql` imports neither pandas (policies, pyarrow's from_pylist) nor torch (webdataset,
    through the stages): they would cost it more start-up than a query over 10^7 rows takes."""
    script = ("import sys; from flows import cli; rc = cli.main(['sql', '-w', sys.argv[1], '--format', 'csv', "
              "'SELECT sample_id, width FROM samples WHERE false']); "
              "print(rc, sorted(m for m in ('pandas', 'torch', 'PIL', 'fsspec') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", script, str(ws.root)], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "0 []", out.stdout + out.stderr
