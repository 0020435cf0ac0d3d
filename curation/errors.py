"""Typed errors. The CLI turns each into one line on stderr and a non-zero exit."""


class WebdistillError(Exception):
    """Base class for every error a user can cause and fix."""


class ShardNotFound(WebdistillError):
    """A shard path, pattern or URL matched nothing."""


class ShardReadError(WebdistillError):
    """A shard could not be opened or read at all."""


class CatalogMissing(WebdistillError):
    """The workspace has no catalog yet."""


class SQLRefused(WebdistillError):
    """User SQL tried to write, reach outside the workspace, or change settings."""


class SQLError(WebdistillError):
    """User SQL is invalid (syntax, unknown column, ...)."""


class SQLLimit(SQLError):
    """User SQL ran past a bound: time, rows or bytes of output, temp space."""


class CatalogCorrupt(WebdistillError):
    """catalog.duckdb is not a DuckDB database, or is damaged."""


class WorkerDied(WebdistillError):
    """A worker process died (killed, out of memory, crashed) on every try of one item."""


class DemoDataError(WebdistillError):
    """A data source the demo needs is unavailable."""


class UnsafeName(WebdistillError):
    """A name (selection, run, source, embedder, ...) or a stored path that would leave its folder."""


class UnsafeShardURL(ShardReadError):
    """A shard URL read back from an artifact names a command (`pipe:`) or a source that only a
    user-typed spec may name: stored data is never run."""
