"""Finding shards (paths, brace patterns, globs, URLs, `pipe:`) and reading their samples.

A shard is read as a stream, so it may be a local file, any fsspec URL, or a shell
pipe. Reading never raises for bad content: a tar cut off mid-way ends the stream
with `TruncatedShard`, after every sample that could be read in full.
"""
from __future__ import annotations

import glob
import os
import re
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

import braceexpand
import fsspec
from webdataset.gopen import gopen
from webdataset.tariterators import base_plus_ext

from .errors import ShardNotFound, ShardReadError

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
    try:
        if url.startswith("pipe:"):
            return gopen(url, "rb")
        return fsspec.open(url, "rb").open()
    except (OSError, ValueError) as exc:
        raise ShardReadError(f"cannot open shard {url}: {exc}") from exc


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
