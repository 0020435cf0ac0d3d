"""Attack class: user SQL that writes (or reaches outside the workspace), whatever wraps it.

Every variant goes through the real surface (catalog.query, and the CLI for several); after each,
the catalog's sha256, the workspace's listing and the outside folder are unchanged, and no marker
file exists anywhere.
"""
import hashlib

import pytest

from curation import catalog
from curation.errors import SQLError, SQLRefused

from ..conftest import run_cli


def writing_variants(ws, outside) -> dict[str, str]:
    root, samples_file = ws.root, ws.root / "samples" / "x.parquet"
    copy = f"COPY (SELECT 'x' AS shard_url) TO '{samples_file}' (FORMAT parquet)"
    return {
        # EXPLAIN runs what it wraps: every spelling of it
        "explain_analyze_copy": f"EXPLAIN ANALYZE {copy}",
        "explain_analyze_copy_catalog": f"EXPLAIN ANALYZE COPY (SELECT 1) TO '{root}/catalog.duckdb' (FORMAT parquet)",
        "explain_copy": f"EXPLAIN {copy}",
        "explain_comments": f"EXPLAIN /* a */ ANALYZE -- b\n {copy}",
        "explain_lowercase_analyse": f"explain analyse copy (select 1) to '{root}/marker.csv'",
        "explain_options": f"EXPLAIN (ANALYZE, FORMAT json) {copy}",
        "explain_options_with_comment": f"EXPLAIN (ANALYZE /* ) SELECT 1 */, FORMAT json) {copy}",
        "explain_paren_select_then_copy": f"EXPLAIN (SELECT 1) {copy}",
        "explain_insert": "EXPLAIN ANALYZE INSERT INTO runs (run_id) VALUES ('x')",
        "explain_create_temp": "EXPLAIN ANALYZE CREATE TEMP TABLE t AS SELECT 1",
        "explain_set": "EXPLAIN ANALYZE SET threads = 8",
        "explain_cte_insert": "EXPLAIN ANALYZE WITH x AS (INSERT INTO runs (run_id) VALUES ('x') RETURNING *) "
                              "SELECT * FROM x",
        "explain_in_from": f"SELECT * FROM (EXPLAIN ANALYZE {copy})",
        # SELECTs that write: data-modifying CTEs, anywhere in the tree
        "cte_insert": "WITH x AS (INSERT INTO runs (run_id) VALUES ('x') RETURNING *) SELECT * FROM x",
        "cte_delete": "WITH x AS (DELETE FROM runs RETURNING *) SELECT * FROM x",
        "scalar_subquery_cte_update":
            "SELECT (WITH x AS (UPDATE runs SET stage = 'x' RETURNING stage) SELECT stage FROM x)",
        "cte_copy": f"WITH x AS ({copy}) SELECT 1",
        # PIVOT: a statement of several parts
        "pivot": "PIVOT runs ON stage USING count(*)",
        "insert_pivot": "INSERT INTO runs PIVOT runs ON stage USING count(*)",
        "copy_pivot": f"COPY (PIVOT runs ON stage USING count(*)) TO '{root}/marker.csv'",
        "explain_pivot": "EXPLAIN ANALYZE PIVOT runs ON stage USING count(*)",
        # SQL run by a function the check cannot see into
        "query_copy": f"SELECT * FROM query('COPY (SELECT 1) TO ''{root}/marker.csv''')",
        "query_cte_delete": "SELECT * FROM query('WITH x AS (DELETE FROM runs RETURNING *) SELECT * FROM x')",
        "query_qualified": "SELECT * FROM system.main.query('SELECT 1')",
        "query_table": "FROM query_table('runs')",
        "json_execute_serialized_sql": "SELECT * FROM json_execute_serialized_sql(json_serialize_sql('SELECT 1'))",
        # statements and table functions that change state
        "set": "SET enable_external_access = true",
        "set_variable": "SET VARIABLE x = 1",
        "reset": "RESET memory_limit",
        "use": "USE memory",
        "call_checkpoint": "CALL checkpoint()",
        "checkpoint": "CHECKPOINT",
        "force_checkpoint": "FORCE CHECKPOINT",
        "checkpoint_function": "SELECT * FROM checkpoint()",
        "enable_logging_to_file": f"SELECT * FROM enable_logging(storage = 'file', storage_path = '{root}/logs')",
        "write_log": "SELECT write_log('x')",
        "nextval": "SELECT nextval('s')",
        "arrow_scan_pointer": "SELECT * FROM arrow_scan(1, 2, 3)",
        "pragma": "PRAGMA threads = 8",
        "pragma_read": "PRAGMA show_tables",
        "attach": f"ATTACH '{root}/other.duckdb' AS other",
        "detach": "DETACH catalog",
        "export": f"EXPORT DATABASE '{root}/export'",
        "import": f"IMPORT DATABASE '{root}/export'",
        "install": "INSTALL httpfs",
        "force_install": "FORCE INSTALL httpfs",
        "load": "LOAD httpfs",
        "update_extensions": "UPDATE EXTENSIONS",
        "vacuum": "VACUUM",
        "create_temp_table": "CREATE TEMP TABLE t AS SELECT 1",
        "create_macro": "CREATE TEMP MACRO m() AS 1",
        "prepare": "PREPARE p AS SELECT 1",
        "begin": "BEGIN TRANSACTION",
        "comment_on": "COMMENT ON TABLE runs IS 'x'",
        "merge": "MERGE INTO runs USING (SELECT 'x' AS run_id) s ON runs.run_id = s.run_id "
                 "WHEN NOT MATCHED THEN INSERT (run_id) VALUES (s.run_id)",
        "two_statements": f"SELECT 1; {copy}",
        "two_statements_comments": "SELECT 1 /* ; */; -- x\n DROP VIEW samples",
        # reads outside the workspace
        "read_text_outside": "SELECT * FROM read_text('/etc/hostname')",
        "read_blob_outside": f"SELECT * FROM read_blob('{outside}/secret.csv')",
        "read_csv_outside": f"SELECT * FROM read_csv('{outside}/secret.csv')",
        "read_csv_dotdot": f"SELECT * FROM read_csv('{root}/../../{outside.name}/secret.csv')",
        "glob_outside": f"SELECT * FROM glob('{outside}/*')",
        "file_as_table_outside": f"SELECT * FROM '{outside}/secret.parquet'",
        "python_variable": "SELECT * FROM writing_variants",
    }


def snapshot(ws, outside) -> dict:
    """Every file of the workspace and the outside folder, with its sha256."""
    files = {}
    for folder in (ws.root, outside):
        for path in sorted(folder.rglob("*")):
            files[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
    return files


def assert_untouched(ws, outside, before: dict, name: str) -> None:
    assert snapshot(ws, outside) == before, name
    for marker in (ws.root / "samples" / "x.parquet", ws.root / "marker.csv", ws.root / "export", ws.root / "logs",
                   ws.root / "other.duckdb", ws.root / "catalog.duckdb.tmp"):
        assert not marker.exists(), (name, marker)


def test_every_writing_wrapping_is_refused(ws, outside):
    before = snapshot(ws, outside)
    catalog_sha = hashlib.sha256(ws.catalog_path.read_bytes()).hexdigest()
    for name, sql in writing_variants(ws, outside).items():
        with pytest.raises((SQLRefused, SQLError)) as caught:
            catalog.query(ws, sql)
        assert "\n" not in str(caught.value), name
        assert_untouched(ws, outside, before, name)
    assert hashlib.sha256(ws.catalog_path.read_bytes()).hexdigest() == catalog_sha
    assert catalog.query(ws, "SELECT count(*) AS n FROM runs").to_pylist() == [{"n": 0}]


@pytest.mark.parametrize("name", ["explain_analyze_copy", "explain_analyze_copy_catalog",
                                  "explain_options_with_comment", "cte_insert", "query_copy", "copy_pivot",
                                  "two_statements_comments"])
def test_cli_refuses_in_one_line_and_writes_nothing(ws, outside, name):
    before = snapshot(ws, outside)
    res = run_cli("sql", "-w", str(ws.root), writing_variants(ws, outside)[name])
    assert res.returncode == 2 and res.stdout == ""
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("webdistill: error:"), res.stderr
    assert_untouched(ws, outside, before, name)


def test_stdin_carries_the_same_refusal(ws, outside):
    before = snapshot(ws, outside)
    copy = writing_variants(ws, outside)["explain_analyze_copy"]
    res = run_cli("sql", "-w", str(ws.root), "-", input=copy)
    assert res.returncode == 2 and "COPY" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert_untouched(ws, outside, before, "stdin")


READS = {
    "select": ("SELECT count(*) AS n FROM samples", lambda t: t.to_pylist()[0]["n"] > 300),
    "from_first": ("FROM samples SELECT sample_id LIMIT 3", lambda t: t.num_rows == 3),
    "from_only": ("FROM rejects", lambda t: t.num_rows > 0),
    "cte": ("WITH r AS (SELECT reason FROM rejects) SELECT count(DISTINCT reason) AS n FROM r",
            lambda t: t.to_pylist()[0]["n"] >= 4),
    "recursive_cte": ("WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 5) "
                      "SELECT max(n) AS m FROM r",
                      lambda t: t.to_pylist() == [{"m": 5}]),
    "summarize": ("SUMMARIZE samples", lambda t: "column_name" in t.column_names),
    "describe": ("DESCRIBE samples", lambda t: "sample_id" in t.column("column_name").to_pylist()),
    "show_tables": ("SHOW TABLES", lambda t: "runs" in t.column("name").to_pylist()),
    "summarize_in_from": ("FROM (SUMMARIZE samples) SELECT column_name", lambda t: t.num_rows > 5),
    "pivot_with_in": ("PIVOT (SELECT reason FROM rejects) ON reason IN ('bad_json', 'truncated_tar') USING count(*)",
                      lambda t: set(t.column_names) == {"bad_json", "truncated_tar"}),
    "unpivot": ("UNPIVOT (SELECT 1 AS a, 2 AS b) ON a, b INTO NAME k VALUE v", lambda t: t.num_rows == 2),
    "explain": ("EXPLAIN SELECT * FROM samples", lambda t: t.num_rows >= 1),
    "explain_analyze": ("EXPLAIN ANALYZE SELECT count(*) FROM samples",
                        lambda t: t.column("explain_key").to_pylist() == ["analyzed_plan"]),
    "explain_options": ("EXPLAIN (FORMAT json) SELECT 1", lambda t: t.num_rows == 1),
    "explain_paren_select": ("EXPLAIN (SELECT 1)", lambda t: t.num_rows == 1),
    "explain_comments": ("EXPLAIN /* c */ ANALYZE -- d\n SELECT 1",
                         lambda t: t.column("explain_key").to_pylist() == ["analyzed_plan"]),
    "subqueries": ("SELECT (SELECT count(*) FROM shards) AS s, [x FOR x IN range(3)] AS l", lambda t: t.num_rows == 1),
    "set_operation": ("(SELECT 1 AS x) UNION ALL (SELECT 2)", lambda t: t.num_rows == 2),
    "metadata_functions": ("SELECT * FROM pragma_table_info('samples')", lambda t: t.num_rows >= 10),
    "glob_inside": ("SELECT count(*) AS n FROM glob('{root}/samples/*.parquet')", lambda t: t.to_pylist()[0]["n"] >= 3),
    "trailing_semicolon_comment": ("SELECT 1 AS x; -- done", lambda t: t.to_pylist() == [{"x": 1}]),
}


def test_reads_keep_working(ws, outside):
    before = snapshot(ws, outside)
    for name, (sql, ok) in READS.items():
        table = catalog.query(ws, sql.replace("{root}", str(ws.root)))
        assert ok(table), (name, table.to_pylist()[:3])
    assert_untouched(ws, outside, before, "reads")


FOREIGN_OBJECTS = {
    "view_calling_query": "CREATE VIEW extra AS SELECT * FROM query('SELECT 1 AS x')",
    "samples_view_replaced": "CREATE OR REPLACE VIEW samples AS SELECT * FROM query_table('runs')",
    "table_macro": "CREATE MACRO rows_of(t) AS TABLE SELECT * FROM query_table(t)",
    "scalar_macro": "CREATE MACRO note(x) AS write_log(x::VARCHAR)",
}


@pytest.mark.parametrize("name", sorted(FOREIGN_OBJECTS))
def test_a_catalog_from_elsewhere_with_views_that_do_more_than_read(ws, tmp_path, name):
    import shutil

    import duckdb

    from curation.workspace import Workspace

    foreign = Workspace(tmp_path / "foreign")
    shutil.copytree(ws.root, foreign.root)
    catalog.refresh(foreign)  # as if it had always lived here
    con = duckdb.connect(str(foreign.catalog_path))
    con.execute(FOREIGN_OBJECTS[name])
    con.close()
    beside = tmp_path / "beside"
    beside.mkdir()
    before = snapshot(foreign, beside)
    res = run_cli("sql", "-w", str(foreign.root), "SELECT count(*) FROM shards")
    assert res.returncode == 2 and res.stdout == ""
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "not a catalog webdistill wrote" in lines[0], res.stderr
    assert snapshot(foreign, beside) == before
