"""Files written whole, and telling a local path from a location that is not one. Standard library
only: distill's ranks import it without the curation stack.

Every artifact is written under a temporary name beside it and renamed into place (`atomic_path`),
so a crash leaves the old file or the new one, never half of one.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import re
import socket
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import WebdistillError, storage_error

_UMASK = os.umask(0)
os.umask(_UMASK)


def is_remote(location: object) -> bool:
    """True when `location` is not a local path: an fsspec URL (s3://, gs://, http(s)://, memory://,
    ...) or a `pipe:` command. A `pipe:` command is something the user typed to run, never a path, so
    it is never resolved, stat'ed or created as one. `file://` URLs, plain paths and Windows drive
    letters (`C:\\x`, `C:/x`) are local."""
    if not isinstance(location, str):
        return False
    return location.startswith("pipe:") or ("://" in location and not location.startswith("file://"))


# Temporaries are named `.<final name>.<host>-<pid>-<random>.tmp`: never matched by an artifact glob
# (`*.parquet`, `*.npy`), and a later writer can tell when the process that made one is gone.
_HOST = hashlib.blake2b(socket.gethostname().encode(), digest_size=3).hexdigest()
_TEMP_NAME = re.compile(r"\..+\.([0-9a-f]{6})-([0-9]+)-[A-Za-z0-9_]+\.tmp(\.wal)?")  # .wal: DuckDB's, beside one
_swept: set[Path] = set()


def _process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, but another user's
        return False
    return False


def sweep_stale_temporaries(folder: Path) -> list[Path]:
    """Remove the temporaries that killed writers left in `folder` (made on this host by a process
    that no longer runs); return them. A live writer's temporary is never touched."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        match = _TEMP_NAME.fullmatch(entry.name)
        if (match and match.group(1) == _HOST and _process_gone(int(match.group(2)))
                and entry.is_file(follow_symlinks=False)):
            try:
                os.unlink(entry.path)
                removed.append(Path(entry.path))
            except OSError:
                pass  # another writer swept it first, or the folder is read-only: not this write's problem
    return removed


def temporary_name(final: Path) -> Path:
    """A fresh temporary name beside `final` (nothing is created), in the form the sweep knows."""
    return final.parent / f".{final.name}.{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"


@contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary path beside `final`; rename it onto `final` only on success. A full disk or
    a folder that cannot be written raises StorageError naming `final`, and leaves no temporary."""
    with storage_errors(final):
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.parent not in _swept:  # once per folder and process: a listing per write would cost O(n^2)
            _swept.add(final.parent)
            sweep_stale_temporaries(final.parent)
        fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.{_HOST}-{os.getpid()}-", suffix=".tmp", dir=final.parent)
        os.close(fd)
    tmp_path = Path(tmp)
    try:
        with storage_errors(final):
            yield tmp_path
            os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes 0600; artifacts are ordinary files
            os.replace(tmp_path, final)
    finally:
        discard(tmp_path)


def discard(path: Path) -> None:
    """Remove a temporary file if it is there; a failure to (a read-only mount) hides no other error."""
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


@contextmanager
def storage_errors(path: Path) -> Iterator[None]:
    """Turn an error of a full disk or a folder that cannot be written (an OSError, or a library's
    error that wraps one, as faiss's do) into StorageError naming `path`; let every other error
    through as it is."""
    try:
        yield
    except Exception as exc:
        mapped = storage_error(exc, path, writing=True)
        if mapped is None:
            raise
        raise mapped from exc


_DIGESTS: dict[tuple, str] = {}  # (path, size, mtime) -> sha256: a file is hashed once per process


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes: the skip keys name model weights by content, not by where they are,
    so a workspace copied or moved elsewhere (with its teacher) redoes nothing."""
    st = os.stat(path)
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        with open(path, "rb") as fh:
            _DIGESTS[key] = hashlib.file_digest(fh, "sha256").hexdigest()
    return _DIGESTS[key]


@contextmanager
def name_lock(parent: Path, name: str, wait: bool = True) -> Iterator[bool]:
    """Hold `parent/.lock-<name>` (True), or, with wait=False, False when another process holds it.
    The kernel drops the lock when its holder dies, so a killed writer never blocks the next one."""
    path = parent / f".lock-{name}"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
    except OSError as exc:
        raise WebdistillError(f"cannot open the lock file {path}: {exc.strerror}") from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)
