"""The read-only SQL surface users query (`webdistill sql`, `select --sql`, `knn-score --sql`).

Three layers:
- `runnable` lets through only what DuckDB's own parser proves is one read: a SELECT whose syntax
  tree holds no data-modifying part and no table function outside a read-only list, or EXPLAIN
  [ANALYZE] of exactly such a SELECT. The text that runs is rebuilt from what was checked.
- `connect_readonly` opens the catalog read-only, inside the workspace (`allowed_directories`,
  no external access, no Python replacement scans), with memory and thread limits, then locks the
  configuration; the catalog's own views and macros must pass the `runnable` check too.
- `stream` bounds every query: a time limit (`con.interrupt()`), rows and Arrow bytes of output
  (read in batches, never materialised past the limit), and temp space: each query spills to a
  fresh folder in the system temp directory, removed after it whatever happens.

Writes nothing in the workspace. `catalog.refresh` repoints the views of a moved workspace first.
"""
from __future__ import annotations

import json
import tempfile
import threading
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path

import duckdb
import pyarrow as pa

from .errors import CatalogCorrupt, CatalogMissing, SQLError, SQLLimit, SQLRefused, first_line
from .workspace import Workspace, remove_tree

USER_THREADS = 2
BATCH_ROWS = 1024  # rows per Arrow batch: how far a result may overshoot a byte limit before it is seen

# Query nodes that only read; INSERT/UPDATE/DELETE/MERGE nodes (DuckDB allows them in CTEs) are refused.
_READ_NODES = {"SELECT_NODE", "SET_OPERATION_NODE", "RECURSIVE_CTE_NODE", "CTE_NODE"}
# Table functions that read files or metadata. Anything else (query/query_table, which run SQL this
# check never sees, checkpoint, logging and profiling switches, Python object scans) is refused.
_TABLE_FUNCTIONS = {"glob", "range", "generate_series", "unnest", "sniff_csv", "summary", "json_each", "json_tree",
                    "repeat", "repeat_row", "pg_timezone_names", "icu_calendar_names"}
_TABLE_FUNCTION_PREFIXES = ("read_", "parquet_", "duckdb_", "pragma_")
_FUNCTIONS_REFUSED = {"nextval", "setval", "write_log", "json_execute_serialized_sql", "query", "query_table"}
_EXPLAIN_MODES = {"ANALYZE", "ANALYSE"}


@dataclass(frozen=True)
class Limits:
    """Bounds on one query. None: no bound (stages that read whole views pass none)."""
    timeout_s: float | None = None
    max_rows: int | None = None
    max_bytes: int | None = None  # Arrow bytes of the result
    max_temp_bytes: int = 4 * 2**30  # DuckDB's spill files for this query
    max_memory_bytes: int = 4 * 2**30  # DuckDB's memory limit: past it, it spills

    def __post_init__(self) -> None:
        for name in ("timeout_s", "max_rows", "max_bytes", "max_temp_bytes", "max_memory_bytes"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise SQLError(f"{name.removesuffix('_s').replace('_', '-')} must be > 0, got {value!r}")


USER_LIMITS = Limits(timeout_s=60.0, max_rows=100_000, max_bytes=256 * 2**20)


def sql_literal(value: object) -> str:
    """`value` (a string or a path; None: NULL) as a SQL string literal. Only for the statements that
    cannot take parameters (view DDL, SET): everything else passes values as query parameters."""
    return "NULL" if value is None else "'" + str(value).replace("'", "''") + "'"


# ---------------------------------------------------------------------------------------------------
# What may run


def _one_statement(sql: str) -> tuple[str, duckdb.StatementType]:
    """The text and type of the one statement in `sql`."""
    try:
        statements = duckdb.extract_statements(sql)
        if len(statements) != 1:
            raise SQLRefused(f"give exactly one statement (got {len(statements)})")
        return statements[0].query, statements[0].type
    except duckdb.ParserException as exc:
        raise SQLError(first_line(exc)) from exc
    except (SQLRefused, SQLError):
        raise
    except Exception as exc:  # noqa: BLE001 - the parser knows statements the binding cannot name
        raise SQLRefused(f"read-only SQL: a statement that cannot be checked ({first_line(exc)})") from exc


_parser: duckdb.DuckDBPyConnection | None = None
_parser_lock = threading.Lock()


def _syntax_tree(sql: str) -> dict:
    global _parser
    with _parser_lock:  # one private in-memory parser: nothing of any workspace is reachable from it
        if _parser is None:
            _parser = duckdb.connect(config={"enable_external_access": False})
        tree = json.loads(_parser.execute("SELECT json_serialize_sql(?)", [sql]).fetchone()[0])
    if tree.get("error"):
        raise SQLRefused(f"read-only SQL: the statement cannot be checked ({tree.get('error_message')})")
    return tree


def _check_tree(node: object) -> None:
    """Refuse a syntax tree that holds anything but reads."""
    if isinstance(node, list):
        for item in node:
            _check_tree(item)
        return
    if not isinstance(node, dict):
        return
    kind = node.get("type")
    if isinstance(kind, str) and kind.endswith("_NODE") and kind not in _READ_NODES:
        raise SQLRefused(f"read-only SQL: {kind.removesuffix('_NODE').replace('_QUERY', '')} is not allowed, "
                         "not even inside a SELECT")
    if kind == "TABLE_FUNCTION":
        name = str((node.get("function") or {}).get("function_name", "")).lower()
        if name not in _TABLE_FUNCTIONS and not name.startswith(_TABLE_FUNCTION_PREFIXES):
            raise SQLRefused(f"read-only SQL: the table function {name}() is not allowed")
    if node.get("class") == "FUNCTION" and str(node.get("function_name", "")).lower() in _FUNCTIONS_REFUSED:
        raise SQLRefused(f"read-only SQL: {node['function_name']}() is not allowed")
    for value in node.values():
        _check_tree(value)


def _plain_select(sql: str) -> str:
    """`sql` itself, when it is exactly one SELECT that only reads."""
    _, kind = _one_statement(sql)
    if kind == duckdb.StatementType.MULTI:  # what DuckDB makes of a PIVOT that must find its columns first
        raise SQLRefused("read-only SQL: this PIVOT cannot be checked: name its columns, "
                         "e.g. PIVOT t ON col IN ('a', 'b') USING count(*)")
    if kind != duckdb.StatementType.SELECT:
        raise SQLRefused(f"read-only SQL: {kind.name} statements are not allowed, only SELECT "
                         "(and EXPLAIN of a SELECT)")
    tree = _syntax_tree(sql)
    if len(tree.get("statements", [])) != 1:
        raise SQLRefused("read-only SQL: give exactly one statement")
    _check_tree(tree)
    return sql


def _tokens(sql: str) -> list[tuple[int, str, object]]:
    """(offset, text, type) of every token but comments, by DuckDB's own tokenizer."""
    raw = duckdb.tokenize(sql)
    ends = [start for start, _ in raw[1:]] + [len(sql)]
    return [(start, sql[start:end].strip(), kind) for (start, kind), end in zip(raw, ends)
            if kind != duckdb.token_type.comment]


def _explain_options(tokens: list, opening: int) -> tuple[str, int] | None:
    """The text of a flat EXPLAIN option list `(NAME value, ...)` starting at tokens[opening], and the
    index after its `)`; None when the group is anything else."""
    plain = {duckdb.token_type.identifier, duckdb.token_type.keyword, duckdb.token_type.numeric_const,
             duckdb.token_type.string_const}
    words = []
    for i in range(opening + 1, len(tokens)):
        _, text, kind = tokens[i]
        if text == ")":
            return (" ".join(words), i + 1) if words else None
        if kind not in plain and text != ",":
            return None
        words.append(text)
    return None


def runnable(sql: str) -> str:
    """The text to run for user `sql`, or SQLRefused / SQLError (one line).

    A SELECT runs as written. EXPLAIN wraps any statement (EXPLAIN ANALYZE COPY ... runs the COPY),
    so its prefix is peeled off with DuckDB's tokenizer (comments and option lists included), the
    statement inside is checked as a SELECT, and the EXPLAIN that runs is rebuilt from the parts.
    """
    if not isinstance(sql, str) or not sql.strip():
        raise SQLError("the query is empty")
    text, kind = _one_statement(sql)
    text = text.strip().rstrip(";")
    tokens = _tokens(text)
    if kind != duckdb.StatementType.EXPLAIN or not tokens or tokens[0][1].upper() != "EXPLAIN":
        return _plain_select(text)
    i, prefix = 1, "EXPLAIN"
    if i < len(tokens) and tokens[i][1].upper() in _EXPLAIN_MODES:
        i, prefix = i + 1, "EXPLAIN ANALYZE"
    if i >= len(tokens):
        raise SQLRefused("read-only SQL: EXPLAIN of nothing")
    if tokens[i][1] == "(":
        try:  # EXPLAIN (SELECT ...): a parenthesised SELECT
            return f"{prefix} {_plain_select(text[tokens[i][0]:])}"
        except (SQLRefused, SQLError):
            options = _explain_options(tokens, i)
            if options is None or options[1] >= len(tokens):
                raise SQLRefused("read-only SQL: EXPLAIN options that cannot be checked") from None
            prefix, i = f"{prefix} ({options[0]})", options[1]
    rebuilt = f"{prefix} {_plain_select(text[tokens[i][0]:])}"
    if _one_statement(rebuilt)[1] != duckdb.StatementType.EXPLAIN:  # the parts must read back as one EXPLAIN
        raise SQLRefused("read-only SQL: EXPLAIN that cannot be checked")
    return rebuilt


def _view_body(create_view: str) -> str:
    """The query of a stored `CREATE VIEW name (cols) AS <query>;`."""
    depth = 0
    for start, text, kind in _tokens(create_view):
        depth += (text == "(") - (text == ")")
        if depth == 0 and kind == duckdb.token_type.keyword and text.upper() == "AS":
            return create_view[start + len(text):]
    raise SQLRefused("a view without a query")


def _check_catalog(con: duckdb.DuckDBPyConnection) -> None:
    """A catalog from elsewhere may hold its own views and macros, which run inside any query that
    names them: each must pass the check user SQL passes."""
    views = con.execute("SELECT view_name, sql FROM duckdb_views() WHERE NOT internal").fetchall()
    macros = con.execute("SELECT function_name, function_type, macro_definition FROM duckdb_functions() "
                         "WHERE NOT internal").fetchall()
    objects = [(f"view {name!r}", sql, True) for name, sql in views]
    objects += [(f"{kind} {name!r}", body if kind == "table_macro" else f"SELECT {body}", False)
                for name, kind, body in macros]
    for what, sql, is_view in objects:
        try:
            _plain_select(_view_body(sql) if is_view else sql)
        except (SQLRefused, SQLError) as exc:
            raise SQLRefused(f"catalog.duckdb's {what} does not only read ({exc}): "
                             "it is not a catalog webdistill wrote") from exc


def check_read_only(sql: str) -> None:
    """Refuse anything but one SELECT that only reads, or EXPLAIN of one, before it reaches the database."""
    runnable(sql)


# ---------------------------------------------------------------------------------------------------
# The connection


def _open_error(ws: Workspace, exc: Exception) -> Exception:
    message = first_line(exc)
    if "conflicting lock" in message.lower() or "could not set lock" in message.lower():
        return SQLError(f"the catalog is busy ({message}); try again in a moment")
    return CatalogCorrupt(f"{ws.catalog_path} is not a DuckDB database or is corrupt: {message}")


def _needs_refresh(ws: Workspace) -> bool:
    con = duckdb.connect(str(ws.catalog_path), read_only=True)
    try:
        rows = con.execute("SELECT value FROM catalog_info WHERE key = 'workspace'").fetchall()
        return not rows or rows[0][0] != str(ws.root)
    except duckdb.CatalogException:  # an old catalog without catalog_info
        return True
    finally:
        con.close()


def connect_readonly(ws: Workspace, temp_dir: Path | None = None,
                     limits: Limits = Limits()) -> duckdb.DuckDBPyConnection:
    """A connection that can read the workspace and nothing else, and can change nothing. With
    `temp_dir`, DuckDB spills there (at most `limits.max_temp_bytes`) instead of beside the catalog."""
    if not ws.catalog_path.exists():
        raise CatalogMissing(f"no catalog at {ws.catalog_path}; run `webdistill ingest` first")
    try:
        if _needs_refresh(ws):  # the workspace was moved: repoint the views
            from .catalog import refresh  # catalog re-exports this module's surface

            refresh(ws)
        con = duckdb.connect(str(ws.catalog_path), read_only=True)
    except duckdb.Error as exc:
        raise _open_error(ws, exc) from exc
    settings = []
    if temp_dir is not None:  # before external access goes off: DuckDB refuses to change it after
        settings += [f"SET temp_directory={sql_literal(temp_dir)}",
                     f"SET max_temp_directory_size='{int(limits.max_temp_bytes)}B'"]
    settings += [
        f"SET allowed_directories=[{sql_literal(str(ws.root) + '/')}]",
        "SET enable_external_access=false",
        "SET autoinstall_known_extensions=false",
        "SET autoload_known_extensions=false",
        "SET python_enable_replacements=false",  # no scans of this process's Python objects
        "SET enable_progress_bar=false",  # stderr carries one line per error, nothing else
        f"SET memory_limit='{int(limits.max_memory_bytes)}B'",
        f"SET threads={USER_THREADS}",
        "SET lock_configuration=true",  # last: nothing above can be undone from SQL
    ]
    try:
        for setting in settings:
            con.execute(setting)
        _check_catalog(con)
    except BaseException:
        con.close()
        raise
    return con


# ---------------------------------------------------------------------------------------------------
# Bounded execution


@contextmanager
def _session(ws: Workspace, limits: Limits) -> Iterator[duckdb.DuckDBPyConnection]:
    """A read-only connection with its own temp folder, both gone when the block ends."""
    tmp_root = Path(tempfile.gettempdir())
    temp_dir = Path(tempfile.mkdtemp(prefix="webdistill-sql-", dir=tmp_root))
    try:
        con = connect_readonly(ws, temp_dir, limits)
        try:
            yield con
        finally:
            con.close()
    finally:
        remove_tree(temp_dir, tmp_root)


class _Deadline:
    """Interrupts the connection's query when `timeout_s` has passed."""

    def __init__(self, con: duckdb.DuckDBPyConnection, timeout_s: float | None) -> None:
        self.expired = threading.Event()
        self._con = con
        self._timer = threading.Timer(timeout_s, self._fire) if timeout_s else None

    def _fire(self) -> None:
        self.expired.set()
        self._con.interrupt()

    def __enter__(self) -> _Deadline:
        if self._timer:
            self._timer.daemon = True
            self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._timer:
            self._timer.cancel()


def _failure(exc: BaseException, deadline: _Deadline, limits: Limits) -> Exception:
    """One typed error for whatever DuckDB (or Arrow, relaying it) raised while a query ran."""
    message = first_line(exc)
    if deadline.expired.is_set():
        return SQLLimit(f"the query ran past its time limit of {limits.timeout_s:g} s (--timeout) and was stopped")
    if "offload" in message or "temp_directory" in message or "max_temp_directory_size" in message:
        return SQLLimit(f"the query needs more temp space than {limits.max_temp_bytes} bytes (--max-temp-bytes): "
                        f"{message}")
    if "Corrupt database" in message:
        return CatalogCorrupt(f"catalog.duckdb is corrupt: {message}")
    if isinstance(exc, duckdb.PermissionException) or "read-only" in message or "locked" in message:
        return SQLRefused(message)
    return SQLError(message)


_JSON_TAG = {b"duckdb_type": b"JSON"}


def _tag_json_columns(schema: pa.Schema, types: list) -> pa.Schema:
    """The result's schema with DuckDB's JSON columns marked (Arrow carries them as plain strings), so
    that output writes their values as JSON, not as JSON text inside a string."""
    return pa.schema([field.with_metadata(_JSON_TAG) if str(kind) == "JSON" else field
                      for field, kind in zip(schema, types)], metadata=schema.metadata)


def empty_batch(schema: pa.Schema) -> pa.RecordBatch:
    """A batch of no rows with `schema` (from_pylist and pa.array import pandas: 0.3 s of `webdistill sql`)."""
    return pa.RecordBatch.from_arrays([pa.nulls(0, field.type) for field in schema], schema=schema)


def is_json_field(field: pa.Field) -> bool:
    """Whether a result column holds JSON text (DuckDB's JSON type)."""
    return (field.metadata or {}).get(b"duckdb_type") == b"JSON"


def stream(ws: Workspace, sql: str, limits: Limits = Limits(), params: dict | list | None = None
           ) -> Iterator[pa.RecordBatch]:
    """Run read-only user SQL; yield its result in Arrow batches, within `limits`. Close the generator
    (or read it out) to end the query: its connection and temp folder go with it. `params` fill the
    query's `$name` (a dict) or `?` (a list) placeholders: values from data (names, sample ids) go
    there, never into the SQL text."""
    text = runnable(sql)
    with _session(ws, limits) as con, _Deadline(con, limits.timeout_s) as deadline:
        rows = nbytes = 0
        try:
            relation = con.sql(text, params=params)
            reader = relation.to_arrow_reader(BATCH_ROWS)
        except (duckdb.Error, pa.ArrowException, OSError) as exc:
            raise _failure(exc, deadline, limits) from exc
        schema = _tag_json_columns(reader.schema, relation.types)
        batches, seen = iter(reader), False
        while True:
            try:
                batch = pa.RecordBatch.from_arrays(next(batches).columns, schema=schema)
            except StopIteration:
                if not seen:  # an empty result still tells its columns
                    yield empty_batch(schema)
                return
            except (duckdb.Error, pa.ArrowException, OSError) as exc:
                raise _failure(exc, deadline, limits) from exc
            rows, nbytes = rows + batch.num_rows, nbytes + batch.nbytes
            if limits.max_rows is not None and rows > limits.max_rows:
                raise SQLLimit(f"the result has more than {limits.max_rows} rows (--max-rows): "
                               "narrow the query or raise the limit")
            if limits.max_bytes is not None and nbytes > limits.max_bytes:
                raise SQLLimit(f"the result is larger than {limits.max_bytes} bytes (--max-bytes): "
                               "narrow the query or raise the limit")
            seen = True
            yield batch


def query(ws: Workspace, sql: str, limits: Limits = Limits(), params: dict | list | None = None) -> pa.Table:
    """Run read-only user SQL against the catalog and return an Arrow table (within `limits`); `params`
    as for `stream`."""
    with closing(stream(ws, sql, limits, params)) as results:
        return pa.Table.from_batches(list(results))


def head(ws: Workspace, sql: str, n: int, limits: Limits = Limits(),
         count_up_to: int | None = None) -> tuple[pa.Table, int, bool]:
    """The first `n` rows of a query's result, how many rows it has, and whether there are more than
    that count (counting stops past `count_up_to`). Only those `n` rows are kept (and bound by
    `limits.max_bytes`); the rest are counted as they stream past."""
    kept, total, nbytes = [], 0, 0
    counting = Limits(timeout_s=limits.timeout_s, max_temp_bytes=limits.max_temp_bytes,
                      max_memory_bytes=limits.max_memory_bytes)
    with closing(stream(ws, sql, counting)) as results:
        for batch in results:
            if total < n or not kept:  # the first batch at least: it carries the columns
                part = batch.slice(0, n - total)
                nbytes += part.nbytes
                if limits.max_bytes is not None and nbytes > limits.max_bytes:
                    raise SQLLimit(f"the rows shown are larger than {limits.max_bytes} bytes (--max-bytes)")
                kept.append(part)
            total += batch.num_rows
            if count_up_to is not None and total > count_up_to:
                return pa.Table.from_batches(kept), count_up_to, True  # closing ends the query
    return pa.Table.from_batches(kept), total, False
