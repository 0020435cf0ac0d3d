"""Typed errors, and the one line a user reads for any error. The CLI turns each into one line on
stderr and a non-zero exit. Standard library only: distill's errors derive from these too."""
import errno
import os
import re


class WebdistillError(Exception):
    """Base class for every error a user can cause and fix (curation's and distill's alike)."""


def first_line(exc: BaseException, limit: int | None = None) -> str:
    """The line a user reads for an error: its message's first line (its class name when it has no
    message), cut to `limit` characters. A DataLoader worker's error arrives wrapped in the worker's
    traceback ("Original Traceback"), whose last line holds the real message: that line it is."""
    text = str(exc).strip()
    if "Original Traceback" in text:
        last = text.splitlines()[-1]
        line = last.split(": ", 1)[1] if ": " in last else last
    else:
        lines = text.splitlines()
        line = lines[0] if text else exc.__class__.__name__
        hints = [h.strip() for h in lines[1:] if _HINT.match(h.strip())]
        line = " ".join([line, *hints])  # DuckDB's "Candidate bindings" / "Did you mean": the fix itself
    return line if limit is None else line[:limit]


# Lines after the first that tell the user what to do; kept on the one line.
_HINT = re.compile(r"^(Candidate bindings:|Did you mean\b|HINT:|Hint:)")


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
    """catalog.duckdb is not a DuckDB database, or is damaged. The message always says how to
    rebuild it, whoever raises it."""

    REBUILD = ("`webdistill refresh --rebuild` moves it aside and rebuilds it from the workspace's artifacts "
               "(views, selections, students; the log of past runs is lost)")

    def __str__(self) -> str:
        return f"{super().__str__()}; {self.REBUILD}"


class CatalogBusy(WebdistillError):
    """Another process held the catalog's write lock for longer than a stage waits."""


class WorkerDied(WebdistillError):
    """A worker process died (killed, out of memory, crashed) on every try of one item."""


class StorageError(WebdistillError):
    """The disk is full, or a file or folder cannot be written (permissions, a read-only mount)."""


# errno -> what the user reads; the errno names are what C libraries and DuckDB print.
_STORAGE_ERRNOS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
                   errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
                   errno.EPERM: "operation not permitted", errno.EFBIG: "file too large (ulimit -f)"}
_STORAGE_TEXTS = {os.strerror(code).lower(): what for code, what in _STORAGE_ERRNOS.items()}
_SHORT_WRITE = re.compile(r"\d+ requested and \d+ written")  # numpy's words for a write the disk cut short


def storage_error(exc: BaseException, path: object = None, writing: bool = False) -> StorageError | None:
    """The StorageError an OSError (or a DuckDB/Arrow error that wraps one) stands for, naming `path`
    (or the file the error names); None for any other error. `writing`: the caller knows it was a
    write (a denied permission may otherwise be a read). The one place such errors are mapped: the
    atomic writer and the CLI call it."""
    if isinstance(exc, StorageError):
        return exc
    text = str(exc)
    what = _STORAGE_ERRNOS.get(getattr(exc, "errno", None))
    if what is None:
        what = next((w for t, w in _STORAGE_TEXTS.items() if t in text.lower()), None)
    note = ""
    if what is None and isinstance(exc, OSError) and _SHORT_WRITE.search(text):
        what, note = "no space left on device", " (a short write)"
    if what is None:
        return None
    target = path or getattr(exc, "filename", None)
    if target is None:
        quoted = re.search(r'"([^"]+)"', text)  # DuckDB: Could not write file "/path": ...
        target = quoted.group(1) if quoted else None
    if target is None:
        return StorageError(f"{what} ({first_line(exc)})")
    ambiguous = what in ("permission denied", "operation not permitted") and not writing
    return StorageError((f"{what}: {target}" if ambiguous else f"{what} writing {target}") + note)


# Storage packages the project declares as extras (pyproject.toml); others are named by package.
_STORAGE_EXTRAS = {"s3fs": "webdistill[s3]"}


def missing_storage_package(exc: BaseException) -> str | None:
    """The line for a storage URL whose fsspec backend is not installed (`-w s3://...` without
    s3fs): fsspec raises ImportError with its registry's words; say what to install. None for any
    other error."""
    while exc is not None and not isinstance(exc, ImportError):
        exc = exc.__cause__ or exc.__context__
    if exc is None:
        return None
    from fsspec.registry import known_implementations  # only on this failure path: errors stays light

    matched = next((e for e in known_implementations.values() if e.get("err") and e["err"] in str(exc)), None)
    if matched is None:
        return None
    protocols = ", ".join(f"{p}://" for p, e in known_implementations.items() if e.get("err") == matched["err"])
    package = matched["class"].split(".", 1)[0]
    return f"{protocols} URLs need the {package} package: pip install '{_STORAGE_EXTRAS.get(package, package)}'"


class DemoDataError(WebdistillError):
    """A data source the demo needs is unavailable."""


class WouldOverwrite(WebdistillError):
    """A stage would replace a different thing of the same name (another crawl's shard, a selection
    made by another policy, another student's run): refused, with the way to keep both or replace it."""


def would_overwrite(conflict: str, keep: str = "choose a new --name") -> WouldOverwrite:
    """Every stage's refusal to replace a different thing of the same name, in one wording: what is
    there and how it differs, then how to keep both (`keep`) or replace it (the stages' --overwrite)."""
    return WouldOverwrite(f"{conflict}: {keep}, or pass --overwrite to replace it")


class UnsafeName(WebdistillError):
    """A name (selection, run, source, embedder, ...) or a stored path that would leave its folder."""


class UnsafeShardURL(ShardReadError):
    """A shard URL read back from an artifact names a command (`pipe:`) or a source that only a
    user-typed spec may name: stored data is never run."""
