"""Query output as a user reads it (issue 17, item 5): JSON columns are JSON values in --format json,
a narrow table hides the least needed columns and names them, and --format parquet --out writes a
file that plain tools open."""
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flows.cli_output import table_text

from .conftest import run_cli


@pytest.fixture(scope="module")
def ingested(tmp_path_factory, small_crawl):
    ws = tmp_path_factory.mktemp("out") / "ws"
    done = run_cli("ingest", "-w", str(ws), str(small_crawl / "crawl"), "--workers", "1")
    assert done.returncode == 0, done.stderr
    return ws


def test_json_columns_are_values_not_text(ingested):
    out = run_cli("sql", "-w", str(ingested), "SELECT stage, params, summary, params->'$' AS again, "
                  "'not json' AS plain FROM runs", "--format", "json")
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert rows and all(isinstance(r["summary"], dict) and isinstance(r["params"], dict) for r in rows)
    assert all(r["again"] == r["params"] for r in rows)  # a JSON expression is a JSON value too
    assert {r["plain"] for r in rows} == {"not json"}  # text stays text


@pytest.mark.parametrize("fmt, read", [
    ("parquet", lambda p: pq.read_table(p).to_pylist()),
    ("json", lambda p: json.loads(p.read_text())),
    ("csv", lambda p: p.read_text().splitlines()[1:]),
])
def test_out_writes_the_whole_result_to_a_file(ingested, tmp_path, fmt, read):
    out_file = tmp_path / f"r.{fmt}"
    done = run_cli("sql", "-w", str(ingested), "SELECT shard, count(*) AS n FROM samples GROUP BY shard ORDER BY shard",
                   "--format", fmt, "--out", str(out_file))
    assert done.returncode == 0, done.stderr
    assert done.stdout == "" and f"3 rows written to {out_file}" in done.stderr
    assert len(read(out_file)) == 3
    assert not list(tmp_path.glob(".*partial"))


def test_parquet_without_out_is_one_line(ingested):
    done = run_cli("sql", "-w", str(ingested), "SELECT 1", "--format", "parquet")
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "--out FILE" in done.stderr


def test_out_to_a_missing_folder_is_one_line(ingested, tmp_path):
    done = run_cli("sql", "-w", str(ingested), "SELECT 1", "--format", "csv", "--out", str(tmp_path / "no" / "x.csv"))
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "cannot write" in done.stderr


def _wide_table() -> pa.Table:
    return pa.table({"name": ["run-1", "run-2"], "selection": ["sel-a", "sel-b"],
                     "summary": pa.array(['{"a": 1}', '{"b": 2}'], pa.string()),
                     "eval_accuracy": [0.91, 0.42], "checkpoint": ["/very/long/path/" * 5 + "a.pt"] * 2,
                     "note": ["x", "y"], "extra": [1, 2]})


@pytest.mark.parametrize("width", [50, 70, 90])
def test_a_narrow_table_hides_wide_columns_first_and_names_them(width):
    text = table_text(_wide_table(), width=width, keep=("eval_accuracy",))
    assert "eval_accuracy" in text and "0.91" in text and "name" in text
    assert "not shown to fit" in text and "checkpoint" in text.splitlines()[-1]
    assert all(len(line) <= width for line in text.splitlines()[:-1])


def test_a_wide_terminal_shows_every_column():
    text = table_text(_wide_table(), width=400)
    assert "not shown" not in text and all(c in text for c in _wide_table().column_names)


def test_version_is_one_line_with_the_parts_versions():
    from importlib.metadata import version

    out = run_cli("--version")
    assert out.returncode == 0 and out.stdout.count("\n") == 1, out.stderr
    line = out.stdout.strip()
    assert line.startswith(f"webdistill {version('webdistill')} (")
    for package in ("torch", "duckdb", "prefect", "faiss-cpu"):
        assert f"{package} {version(package)}" in line


@pytest.mark.parametrize(("flags", "env"), [
    ([], {"PREFECT_LOGGING_LOGGERS_PREFECT_TASK_RUNS_LEVEL": "WARNING"}),  # a flow's lines, no per-task INFO
    (["-v"], {}),  # Prefect's own defaults: every task's INFO line
    (["-vv"], {"PREFECT_LOGGING_LEVEL": "DEBUG"}),
    (["-q"], {"PREFECT_LOGGING_LEVEL": "ERROR", "WEBDISTILL_PROGRESS": "0"}),
])
def test_verbosity_flags_set_the_log_levels_before_prefect_loads(monkeypatch, flags, env):
    from flows.cli import _set_verbosity, build_parser

    keys = ("PREFECT_LOGGING_LEVEL", "WEBDISTILL_PROGRESS", "PREFECT_LOGGING_LOGGERS_PREFECT_TASK_RUNS_LEVEL")
    for key in keys:
        monkeypatch.delenv(key, raising=False)
    _set_verbosity(build_parser().parse_args([*flags, "sql", "SELECT 1"]))
    assert {k: v for k in keys if (v := os.environ.get(k)) is not None} == env
