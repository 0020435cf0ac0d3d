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


class DemoDataError(WebdistillError):
    """A data source the demo needs is unavailable."""


class UnsafeName(WebdistillError):
    """A name (selection, run, source, embedder, ...) or a stored path that would leave its folder."""
