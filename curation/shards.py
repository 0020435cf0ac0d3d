"""Finding shards (paths, brace patterns, globs, URLs, `pipe:`) and reading their samples.

A shard is read as a stream, so it may be a local file, any fsspec URL, or a shell
pipe. Reading never raises for bad content: a tar cut off mid-way ends the stream
with `TruncatedShard`, after every sample that could be read in full.

Two ways in, after who wrote the URL (DESIGN.md, Security model):
- `open_shard` opens a spec the user typed (CLI or pipeline YAML): a `pipe:` command runs here only.
- `open_stored_shard` opens a URL read back from an artifact (`samples.shard_url`, ...): that is data,
  so it opens only a regular local file or a storage URL (STORED_PROTOCOLS) through fsspec, never
  webdataset's gopen, and refuses anything else with `UnsafeShardURL`. Ingest keeps a copy of a shard
  it could not record that way (`SpooledShard`), and records the copy.
"""
from __future__ import annotations

import glob
import os
import re
import stat
import sys
import tarfile
import zlib
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

import braceexpand
import fsspec
from webdataset.gopen import gopen
from webdataset.tariterators import base_plus_ext

from .errors import ShardNotFound, ShardReadError, UnsafeShardURL
from .workspace import atomic_path

_TAR_SUFFIX = re.compile(r"\.(tar|tar\.gz|tgz)$")


@dataclass(frozen=True)
class ShardRef:
    url: str  # local absolute path, fsspec URL or `pipe:` command
    name: str  # the shard's stable name: file stem, optionally prefixed by a source
    fingerprint: str  # changes when the shard's content changes


@dataclass
class RawSample:
    key: str
    files: dict[str, bytes]  # extension -> bytes


class TruncatedShard(Exception):
    """The tar ended early or is corrupt after `partial_key` (None: before any sample)."""

    def __init__(self, partial_key: str | None, message: str):
        super().__init__(message)
        self.partial_key = partial_key


def shard_name(url: str, source: str | None = None) -> str:
    """The file stem: `.../00012.tar?sig=x` -> `00012`; for `pipe:` commands, the last tar named in it."""
    if url.startswith("pipe:"):
        tokens = url[len("pipe:"):].split()
        tars = [t for t in tokens if _TAR_SUFFIX.search(t.split("?")[0])]
        url = tars[-1] if tars else (tokens[-1] if tokens else "pipe")
    stem = _TAR_SUFFIX.sub("", url.split("?")[0].rstrip("/").split("/")[-1])
    return f"{source}-{stem}" if source else stem


def _is_url(spec: str) -> bool:
    return "://" in spec or spec.startswith("pipe:")


def _fingerprint(url: str) -> str:
    if url.startswith("pipe:"):
        return "pipe:" + url  # a command's output can't be stat'ed; its text stands for it
    if not _is_url(url):
        st = os.stat(url)
        return f"{st.st_size}:{st.st_mtime_ns}"
    fs, path = fsspec.core.url_to_fs(url)
    info = fs.info(path)
    stamp = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified") or info.get("created")
    return f"{info.get('size')}:{stamp}"


def expand_shards(specs: list[str], source: str | None = None) -> tuple[list[ShardRef], list[str]]:
    """Expand specs into shard references. Returns (shards, specs that matched nothing).

    Local specs accept brace patterns (`crawl/{00000..00019}.tar`), globs and directories
    (every tar inside). URLs accept brace patterns.
    """
    found: dict[str, ShardRef] = {}
    missing: list[str] = []
    for spec in specs:
        absent: list[str] = []
        expanded = list(braceexpand.braceexpand(spec))
        for one in expanded:
            urls: list[str]
            if _is_url(one):
                urls = [one]
            elif os.path.isdir(one):
                urls = sorted(str(p) for p in Path(one).iterdir() if _TAR_SUFFIX.search(p.name))
            elif glob.has_magic(one):
                urls = sorted(glob.glob(one))
            else:
                urls = [one] if os.path.isfile(one) else []
            for url in urls:
                url = url if _is_url(url) else str(Path(url).resolve())
                try:
                    fp = _fingerprint(url)
                except OSError as exc:  # FileNotFoundError for URLs too
                    absent.append(f"{url} ({exc.__class__.__name__})")
                    continue
                found[url] = ShardRef(url=url, name=shard_name(url, source), fingerprint=fp)
            if not urls:
                absent.append(one)
        if absent and len(expanded) == 1:
            missing.append(absent[0])
        elif absent:  # one line per spec, however many names it expands to
            shown = ", ".join(absent[:3]) + (", ..." if len(absent) > 3 else "")
            missing.append(f"{spec} ({len(absent)} of {len(expanded)} names: {shown})")
    names: dict[str, str] = {}
    for ref in found.values():
        if ref.name in names:
            raise ShardNotFound(
                f"two shards share the name {ref.name!r} ({names[ref.name]} and {ref.url}); "
                "ingest them separately with --source NAME to tell them apart"
            )
        names[ref.name] = ref.url
    return list(found.values()), missing


def open_shard(url: str) -> BinaryIO:
    """Open a shard spec the USER typed (CLI or pipeline YAML): a local path, an fsspec URL or a
    `pipe:` command. Never call it with a URL read from an artifact: see `open_stored_shard`."""
    try:
        if url.startswith("pipe:"):
            return gopen(url, "rb")
        return fsspec.open(url, "rb").open()
    except (OSError, ValueError) as exc:
        raise ShardReadError(f"cannot open shard {url}: {exc}") from exc


# The storage a URL read back from an artifact may name: object stores, http and local files, read by
# fsspec in-process. Anything else (pipe:, chained `a::b` caches, ssh, dask, git, ...) is refused.
STORED_PROTOCOLS = frozenset({"file", "memory", "s3", "s3a", "gs", "gcs", "az", "abfs", "http", "https", "hf"})
_COMMAND = re.compile(r"^\W*pipe\W*:", re.IGNORECASE)  # ` pipe:`, `PIPE:`, `"pipe:` ...: all read as commands
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def stored_url_refusal(url: object) -> str | None:
    """Why `url`, read back from an artifact, may not be opened (None: it may): it must be an absolute
    path to a regular local file, or a URL of STORED_PROTOCOLS."""
    if not isinstance(url, str) or not url:
        return "it is empty"
    if _COMMAND.match(url):
        return ("a pipe: command read back from stored data is never run; only a shard spec typed on the "
                "command line or in the pipeline YAML may be one")
    if any(ord(c) < 32 for c in url) or "::" in url:
        return "control characters or a chained URL ('::') are not read from stored data"
    scheme = _SCHEME.match(url)
    if scheme:
        protocol = scheme.group(1).lower()
        if protocol not in STORED_PROTOCOLS:
            return f"protocol {protocol!r} is not one a stored URL may use ({', '.join(sorted(STORED_PROTOCOLS))})"
        if protocol != "file":
            return None
        url = url[len("file://"):]
    if not os.path.isabs(url):
        return "it is neither an absolute local path nor a storage URL"
    try:
        mode = os.stat(url).st_mode
    except OSError:
        return None  # missing: opening it says so, as for any vanished shard
    # a FIFO, a device or /proc/self/fd/0 would block or never end: only a plain file is a shard
    return None if stat.S_ISREG(mode) else "it is not a regular file"


def open_stored_shard(url: object) -> BinaryIO:
    """Open a shard URL read back from an artifact (`samples.shard_url`, a workspace from elsewhere):
    data, never a command. Raises UnsafeShardURL (one line) for anything `stored_url_refusal` refuses."""
    why = stored_url_refusal(url)
    if why:
        shown = repr(url) if len(repr(url)) <= 200 else repr(url)[:200] + "..."
        raise UnsafeShardURL(f"refusing the stored shard URL {shown}: {why}")
    try:
        return fsspec.open(url, "rb").open()
    except (OSError, ValueError) as exc:
        raise ShardReadError(f"cannot open shard {url}: {exc}") from exc


class SpooledShard:
    """A shard stream that keeps a copy of every byte read in `path` (written atomically): ingest reads
    a `pipe:` shard once, and later stages read the copy with `open_stored_shard`. The copy is renamed
    into place when the stream closes cleanly; a stream that fails to close (a command's non-zero
    exit) leaves none."""

    def __init__(self, stream: BinaryIO, path: Path):
        self.path, self._stream, self._stack = Path(path), stream, ExitStack()
        self._sink = open(self._stack.enter_context(atomic_path(self.path)), "wb")

    def read(self, size: int = -1) -> bytes:
        data = self._stream.read(size)
        self._sink.write(data)
        return data

    def close(self) -> None:
        try:
            self._stream.close()
        except BaseException:
            self._sink.close()
            self._stack.__exit__(*sys.exc_info())  # atomic_path removes the partial copy
            raise
        self._sink.close()
        self._stack.close()  # atomic_path renames the copy into place


def iter_samples(stream: BinaryIO) -> Iterator[RawSample]:
    """Group tar members into samples by key (img2dataset / WebDataset convention).

    Raises TruncatedShard after the last complete sample if the tar is cut off or corrupt.
    """
    key: str | None = None
    files: dict[str, bytes] = {}
    try:
        tar = tarfile.open(fileobj=stream, mode="r|*")
        for info in tar:
            if not info.isreg():
                continue
            member_key, ext = base_plus_ext(info.name)
            if member_key is None or os.path.basename(member_key).startswith("__"):
                continue
            if member_key != key:
                if key is not None:
                    yield RawSample(key, files)
                key, files = member_key, {}
            files[ext.lower()] = tar.extractfile(info).read()
            tar.members = []  # stream mode keeps every header otherwise
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise TruncatedShard(key, f"{exc.__class__.__name__}: {exc}") from exc
    if key is not None:
        yield RawSample(key, files)
