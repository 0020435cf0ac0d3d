"""How the command line writes a result: a table that fits the terminal, CSV, JSON or Parquet.

JSON columns (DuckDB's JSON type, tagged by curation.user_sql) are written as JSON values, not as
JSON text inside a string. A table too wide for the terminal hides the columns a reader needs least
(JSON and nested values, then long text) and says which, instead of DuckDB's cut of the middle
columns, which lost `similarity` in knn and `eval_accuracy` in students.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import shutil
import sys
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from curation.user_sql import empty_batch, is_json_field

FORMATS = ("table", "csv", "json", "parquet")
_LONG_TEXT = 40  # characters past which a text column is among the first hidden in a narrow table


def json_safe(value):
    """`value` as standard JSON can hold it: NaN and +/-Infinity become null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def json_text(value) -> str:
    return json.dumps(json_safe(value), default=str, allow_nan=False)


def _json_columns(schema: pa.Schema) -> set[str]:
    return {f.name for f in schema if is_json_field(f)}


def _decoded(row: dict, json_columns: set[str]) -> dict:
    """A row whose JSON columns hold their values (a JSON text that does not parse stays text)."""
    for name in json_columns & row.keys():
        if isinstance(row[name], str):
            with contextlib.suppress(ValueError):
                row[name] = json.loads(row[name])
    return row


def _csv_ready(batch: pa.RecordBatch) -> pa.RecordBatch:
    """A batch CSV can hold: list, struct and map columns (teacher_logits) as JSON text."""
    columns = [pa.array([None if v is None else json_text(v) for v in col.to_pylist()], pa.string())
               if pa.types.is_nested(col.type) else col for col in batch.columns]
    return pa.RecordBatch.from_arrays(columns, names=batch.schema.names)


def _write_csv(table: pa.Table, out) -> None:
    schema = _csv_ready(empty_batch(table.schema)).schema
    with pacsv.CSVWriter(out, schema) as writer:
        for batch in table.to_batches():
            writer.write_batch(_csv_ready(batch))


def _write_json(table: pa.Table, out) -> None:
    json_columns = _json_columns(table.schema)
    out.write("[")
    sep = ""
    for batch in table.to_batches():
        for row in batch.to_pylist():
            out.write(sep + json_text(_decoded(row, json_columns)))
            sep = ", "
    out.write("]\n")


def _render(table: pa.Table, width: int, max_rows: int) -> str:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        duckdb.from_arrow(table).show(max_rows=max_rows, max_width=width)
    return buf.getvalue()


def _does_not_fit(text: str, width: int) -> bool:
    """Whether DuckDB's rendering left columns out ("12 columns (7 shown)") or ran past `width`."""
    cut = re.search(r"\d+ columns \(\d+ shown\)", text) is not None
    return cut or max(map(len, text.splitlines()), default=0) > width


def _hiding_order(table: pa.Table, keep: tuple[str, ...]) -> list[str]:
    """Columns in the order a narrow table hides them: JSON and nested first, then long text (longest
    first), then the rest from the right; never those in `keep`, nor the first column (a row's name)."""
    json_columns = _json_columns(table.schema)
    first, ranked = table.schema.names[0], []
    for position, name in enumerate(table.schema.names):
        if name in keep or name == first:
            continue
        col = table.column(name)
        if name in json_columns or pa.types.is_nested(col.type):
            ranked.append((0, 0, name))
        elif pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
            longest = max((len(v) for v in col.to_pylist() if v), default=0)
            ranked.append((1, -longest, name) if longest > _LONG_TEXT else (2, -position, name))
        else:
            ranked.append((2, -position, name))  # the rest from the right
    return [name for *_, name in sorted(ranked)]


def table_text(table: pa.Table, width: int | None = None, max_rows: int = 40, keep: tuple[str, ...] = ()) -> str:
    """`table` drawn as a box table `width` wide, hiding the least needed columns (and naming them)
    when all would not fit."""
    width = width or shutil.get_terminal_size((120, 24)).columns
    text, hidden = _render(table, width, max_rows), []
    for name in _hiding_order(table, keep):
        if not _does_not_fit(text, width):
            break
        hidden.append(name)
        text = _render(table.drop_columns(hidden), width, max_rows)
    if hidden:
        text = text.rstrip("\n") + (f"\n  not shown to fit {width} columns: {', '.join(hidden)} "
                 "(SELECT fewer columns, --max-width, or --format csv/json)\n")
    return text


def write_result(table: pa.Table, fmt: str, out: str | None = None, max_rows: int = 40, max_width: int | None = None,
                 keep: tuple[str, ...] = ()) -> None:
    """Write a result as a table, CSV, JSON (valid JSON: NaN is null) or Parquet; to `out` when given
    (written whole to a temporary name first, so a failed write leaves no half file), else stdout."""
    if fmt == "parquet" and not out:
        raise ValueError("--format parquet needs --out FILE")
    if out:
        path = Path(out)
        partial = path.with_name(f".{path.name}.partial")
        if fmt == "parquet":
            pq.write_table(table, partial)
        else:
            with open(partial, "w", encoding="utf-8", newline="") as f:
                _write_text(table, fmt, f, max_rows, max_width, keep)
        os.replace(partial, path)
        return
    _write_text(table, fmt, sys.stdout, max_rows, max_width, keep)


def _write_text(table: pa.Table, fmt: str, out, max_rows: int, max_width: int | None, keep: tuple[str, ...]) -> None:
    if fmt == "csv":
        out.flush()
        binary = getattr(out, "buffer", None)
        if binary is not None:
            _write_csv(table, binary)
            binary.flush()
        else:
            sink = pa.BufferOutputStream()
            _write_csv(table, sink)
            out.write(sink.getvalue().to_pybytes().decode("utf-8"))
    elif fmt == "json":
        _write_json(table, out)
    else:
        out.write(table_text(table, max_width, max_rows, keep))
