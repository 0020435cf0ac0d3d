"""A workspace at an fsspec URL (s3://, gs://, memory://, ...): mirrored to a local cache folder,
where the stages and DuckDB work as usual, and synced back afterwards.

    remote/<files...>          the workspace's artifacts, each uploaded whole
    remote/_index.json         path -> sha256 of every artifact: written last, it is the commit

A reader trusts only `_index.json`, so an interrupted push leaves the previous state readable. Pull
fetches the files whose sha256 differs from the local copy; push uploads the local files whose sha256
differs from the remote index, then the new index. The index came from elsewhere: pull checks all of it
(relative keys that stay inside the cache folder, symlinks resolved; 64-hex sha256 values) before it
writes anything. Per-shard artifacts never collide between
writers; `catalog.duckdb` is last-writer-wins (its views are rebuilt from the artifacts anyway).

Two writers commit at once: each merges its changes into the index it reads last. On S3 (and
S3-compatible stores) the index is written only if it is still the one read (a conditional PUT,
If-Match on its ETag, If-None-Match for the first), else read, merged and written again, so a
writer that committed in between is never overwritten. Other fsspec stores have no such write: the
read-merge-write there leaves a window of milliseconds in which a concurrent commit can be lost.
An S3-compatible server other than AWS is named by AWS_ENDPOINT_URL (botocore reads it; or
FSSPEC_S3_ENDPOINT_URL, fsspec's own setting for s3fs).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import fsspec

from .errors import WebdistillError
from .files import atomic_path, is_remote  # noqa: F401 - is_remote: callers ask this module what is remote
from .workspace import inside

INDEX = "_index.json"
CACHE = Path(os.environ.get("WEBDISTILL_CACHE", Path.home() / ".cache" / "webdistill"))


class RemoteWorkspaceError(WebdistillError):
    """The remote workspace cannot be read or written."""


def cache_dir(url: str) -> Path:
    """The local mirror of a remote workspace: one folder per URL."""
    return CACHE / "workspaces" / hashlib.sha256(url.encode()).hexdigest()[:16]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _local_files(root: Path) -> dict[str, Path]:
    """Artifacts under the mirror, without temporaries, hidden files, DuckDB's WAL and symlinks (whose
    target may lie outside the mirror)."""
    out = {}
    for p in root.rglob("*"):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and not p.is_symlink() and not any(part.startswith(".") for part in p.relative_to(root).parts) \
                and not rel.endswith((".tmp", ".wal")):
            out[rel] = p
    return out


def _remote_index(fs, base: str) -> dict[str, str]:
    try:
        with fs.open(f"{base}/{INDEX}", "rb") as fh:
            return json.load(fh)
    except FileNotFoundError:
        return {}
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RemoteWorkspaceError(f"cannot read {base}/{INDEX}: {exc}") from exc


# Stores whose fsspec filesystem takes a conditional PUT (s3fs passes IfMatch/IfNoneMatch to put_object).
CONDITIONAL = ("s3", "s3a")
COMMIT_ATTEMPTS = 20


def _precondition_failed(exc: OSError) -> bool:
    """Whether the conditional PUT was refused because another writer committed first (HTTP 412)."""
    if isinstance(exc, FileExistsError):  # If-None-Match: the first index appeared meanwhile
        return True
    response = getattr(exc.__cause__, "response", None) or {}
    return response.get("Error", {}).get("Code") in ("PreconditionFailed", "412", "ConditionalRequestConflict")


def _commit(fs, base: str, changed: dict[str, str], removed: set[str]) -> dict[str, str]:
    """Write the index: the latest committed one, plus `changed`, less `removed`. Where the store
    has conditional writes, compare-and-swap on the index's ETag, retried with jitter."""
    path = f"{base}/{INDEX}"
    conditional = any(p in CONDITIONAL for p in ((fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol))
    for _attempt in range(COMMIT_ATTEMPTS):
        fs.invalidate_cache(path)  # s3fs caches listings and info: the ETag must be the store's now
        try:
            etag = fs.info(path).get("ETag") if conditional else None
        except FileNotFoundError:
            etag = None
        latest = _remote_index(fs, base)  # read after the ETag: if newer, the PUT below fails and retries
        merged = {**latest, **changed}
        for rel in removed:
            merged.pop(rel, None)
        data = json.dumps(merged, indent=0, sort_keys=True).encode()
        if not conditional:
            fs.pipe_file(path, data)
            return merged
        try:
            fs.pipe_file(path, data, **({"IfMatch": etag} if etag else {"mode": "create"}))
            return merged
        except OSError as exc:
            if not _precondition_failed(exc):
                raise
        time.sleep(random.uniform(0.05, 0.3))  # another writer committed first: merge into theirs
    raise RemoteWorkspaceError(f"{base}/{INDEX}: could not commit in {COMMIT_ATTEMPTS} attempts "
                               "(other writers kept committing first)")


_SHA256 = re.compile(r"[0-9a-f]{64}")


def _unsafe_key(rel: object, root: Path) -> str | None:
    """Why an index key may not become a file under `root` (None when it may)."""
    if not isinstance(rel, str) or not rel:
        return "not a non-empty string"
    if "\\" in rel or "\0" in rel or rel.startswith("/"):
        return "absolute, or holds a backslash or NUL"
    if any(part in ("", ".", "..") for part in rel.split("/")):
        return "has an empty, '.' or '..' part"
    if not inside(root / rel, root):
        return "resolves outside the cache folder"
    return None


def check_index(index: object, root: Path, where: str) -> dict[str, str]:
    """The remote index if every entry is `relative/path -> sha256` that stays under `root` (symlinks
    resolved), else RemoteWorkspaceError naming the first bad entry: checked before any write."""
    if not isinstance(index, dict):
        raise RemoteWorkspaceError(f"{where}/{INDEX} is not a mapping of paths to sha256")
    for rel, digest in index.items():
        why = _unsafe_key(rel, root)
        if why:
            raise RemoteWorkspaceError(f"{where}/{INDEX}: refusing entry {rel!r}: {why}")
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            raise RemoteWorkspaceError(f"{where}/{INDEX}: entry {rel!r} has no sha256 (got {digest!r:.80})")
    return index


def pull(url: str, root: Path) -> dict[str, str]:
    """Bring the mirror up to the remote index; returns that index."""
    fs, base = fsspec.core.url_to_fs(url)
    index = check_index(_remote_index(fs, base), root, url)
    for rel, digest in index.items():
        local = root / rel
        if local.is_file() and _sha256(local) == digest:
            continue
        with atomic_path(local) as tmp:
            fs.get_file(f"{base}/{rel}", str(tmp))
            if _sha256(tmp) != digest:
                raise RemoteWorkspaceError(f"{url}/{rel} does not match its index entry (a push in progress?)")
    return index


def push(url: str, root: Path, pulled: dict[str, str]) -> int:
    """Upload what changed in the mirror since `pulled` (the index it was pulled at), then the new
    index, merged with what other writers committed meanwhile; returns the number of files sent."""
    fs, base = fsspec.core.url_to_fs(url)
    local = {rel: _sha256(path) for rel, path in _local_files(root).items()}
    sent = 0
    for rel, digest in sorted(local.items()):
        if pulled.get(rel) != digest:
            fs.makedirs(f"{base}/{Path(rel).parent.as_posix()}", exist_ok=True)
            fs.put_file(str(root / rel), f"{base}/{rel}")
            sent += 1
    # written last: the commit, merged with what other writers committed since our pull; removed
    # here since the pull (e.g. a replaced selection) leaves the index
    _commit(fs, base, {rel: d for rel, d in local.items() if pulled.get(rel) != d}, set(pulled) - set(local))
    return sent


@contextmanager
def synced(url: str) -> Iterator[Path]:
    """Pull the remote workspace into its mirror, yield the mirror's path, push what changed."""
    if url.startswith("pipe:"):  # remote, but a command: never a place to keep a workspace
        raise RemoteWorkspaceError(f"the workspace {url!r} is a pipe: command: give a folder or an fsspec URL")
    root = cache_dir(url)
    root.mkdir(parents=True, exist_ok=True)
    try:
        pulled = pull(url, root)
    except (OSError, ValueError) as exc:
        raise RemoteWorkspaceError(f"cannot read the workspace {url}: {exc}") from exc
    yield root
    push(url, root, pulled)
