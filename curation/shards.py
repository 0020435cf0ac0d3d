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
import hashlib
import ipaddress
import lzma
import os
import re
import socket
import stat
import sys
import tarfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlsplit

import braceexpand
import fsspec
from webdataset.gopen import gopen
from webdataset.tariterators import base_plus_ext

from .errors import ShardNotFound, ShardReadError, UnsafeShardURL, first_line
from .files import is_remote
from .validate import ValidationConfig
from .workspace import atomic_path, check_name

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
    """The file stem: `.../00012.tar?sig=x` -> `00012`; for `pipe:` commands, the last tar named in it.
    It names the shard's artifacts (`samples/<name>.parquet`), so it must pass `check_name`, as must
    `source`: `..`, `/abs`, `a/b` and the like are refused (UnsafeName), never turned into paths."""
    if url.startswith("pipe:"):
        tokens = url[len("pipe:"):].split()
        tars = [t for t in tokens if _TAR_SUFFIX.search(t.split("?")[0])]
        url = tars[-1] if tars else (tokens[-1] if tokens else "pipe")
    stem = _TAR_SUFFIX.sub("", url.split("?")[0].rstrip("/").split("/")[-1])
    if source is not None:
        check_name(source, "source")
    return check_name(f"{source}-{stem}" if source is not None else stem, "shard name")


def _is_url(spec: str) -> bool:
    """Not a bare path: a remote location or command, or a file:// URL (which fsspec reads, so that its
    fingerprint stays fsspec's)."""
    return is_remote(spec) or spec.startswith("file://")


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


def _not_a_regular_file(path: str) -> str | None:
    """What a local path is when it is not a regular file (None when it is, or is gone)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None  # reported as missing by the caller's own stat
    if stat.S_ISREG(mode):
        return None
    kinds = {stat.S_ISFIFO: "a FIFO", stat.S_ISCHR: "a character device", stat.S_ISBLK: "a block device",
             stat.S_ISSOCK: "a socket", stat.S_ISDIR: "a directory"}
    return next((name for test, name in kinds.items() if test(mode)), "not a file")


_URL_LIST_SUFFIX = re.compile(r"\.(parquet|csv|tsv|jsonl?|txt)$", re.IGNORECASE)


def _url_list_kind(path: str) -> str | None:
    """"a parquet file" (or csv, json, text) when `path` is a file of a URL list's kind rather than a
    tar: parquet by its magic, the text formats by their suffix when the tar magic is absent."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(512 + 8)
    except OSError:
        return None
    if head[:4] == b"PAR1":
        return "a parquet file"
    suffix = _URL_LIST_SUFFIX.search(path)
    if suffix and head[257:262] != b"ustar":
        return f"a {suffix.group(1).lower()} file"
    return None


def _unreadable(exc: OSError) -> str:
    """Why a shard could not be looked at: fsspec reports an unreachable host (no network, DNS) as
    FileNotFoundError, with the connection error as its cause; that cause is what the user needs."""
    cause = exc.__cause__ or exc.__context__
    while cause is not None:
        if isinstance(cause, OSError) and not isinstance(cause, FileNotFoundError):
            return f"cannot reach it: {first_line(cause)}"
        cause = cause.__cause__ or cause.__context__
    return exc.__class__.__name__


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
            elif os.path.isdir(one) and not _TAR_SUFFIX.search(one.rstrip("/")):  # `x.tar/` is no shard
                urls = sorted(str(p) for p in Path(one).iterdir() if _TAR_SUFFIX.search(p.name))
            elif glob.has_magic(one):
                urls = sorted(glob.glob(one))
            else:
                urls = [one] if os.path.exists(one) else []
            for url in urls:
                url = url if _is_url(url) else str(Path(url).resolve())
                odd = None if _is_url(url) else _not_a_regular_file(url)
                if odd:  # a FIFO would block the reader forever, a device never end: refused unopened
                    absent.append(f"{url} (not a regular file: {odd})")
                    continue
                listing = None if _is_url(url) else _url_list_kind(url)
                if listing:  # a common slip: the crawl's input given to ingest
                    absent.append(f"{url} ({listing}, not a tar shard: if it lists URLs, "
                                  f"`webdistill crawl {url}` downloads them into shards to ingest)")
                    continue
                try:
                    fp = _fingerprint(url)
                except OSError as exc:  # FileNotFoundError for URLs too
                    absent.append(f"{url} ({_unreadable(exc)})")
                    continue
                found[url] = ShardRef(url=url, name=shard_name(url, source), fingerprint=fp)
            if not urls:
                absent.append(one)
        if len(absent) == 1 and len(expanded) == 1:
            missing.append(absent[0])
        elif absent:  # one line per spec, however many names it expands to
            shown = ", ".join(absent[:5]) + (", ..." if len(absent) > 5 else "")
            of = f" of {len(expanded)}" if len(expanded) > 1 else ""
            missing.append(f"{spec} ({len(absent)}{of} names: {shown})")
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
    if any(ord(c) < 32 for c in url):
        return "control characters are not read from stored data"
    scheme = _SCHEME.match(url)
    if scheme and scheme.group(1).lower() in ("http", "https"):
        return _http_host_refusal(url)  # opened by HTTPFileSystem itself: '::' is an IPv6 host, no chain
    if "::" in url:
        return "a chained URL ('::') is not read from stored data"
    if scheme:
        protocol = scheme.group(1).lower()
        if protocol not in STORED_PROTOCOLS:
            return f"protocol {protocol!r} is not one a stored URL may use ({', '.join(sorted(STORED_PROTOCOLS))})"
        if protocol != "file":
            return None
        url = url[len("file://"):]
    if not os.path.isabs(url):
        return "it is neither an absolute local path nor a storage URL"
    # a FIFO, a device or /proc/self/fd/0 would block or never end: only a plain file is a shard
    # (a missing one is reported when it is opened, as for any vanished shard)
    odd = _not_a_regular_file(url)
    return f"it is {odd}, not a regular file" if odd else None


def open_stored_shard(url: object) -> BinaryIO:
    """Open a shard URL read back from an artifact (`samples.shard_url`, a workspace from elsewhere):
    data, never a command. Raises UnsafeShardURL (one line) for anything `stored_url_refusal` refuses."""
    why = stored_url_refusal(url)
    if why:
        shown = repr(url) if len(repr(url)) <= 200 else repr(url)[:200] + "..."
        raise UnsafeShardURL(f"refusing the stored shard URL {shown}: {why}")
    scheme = _SCHEME.match(url)
    try:
        if scheme and scheme.group(1).lower() in ("http", "https"):
            return _guarded_http_open(url)
        return fsspec.open(url, "rb").open()
    except (OSError, ValueError) as exc:
        raise ShardReadError(f"cannot open shard {url}: {exc}") from exc


def _http_host_refusal(url: str) -> str | None:
    """A stored http(s) URL may reach public addresses only, as the crawler's default: a workspace
    from elsewhere must not make webdistill request cloud metadata (169.254.169.254), loopback or
    intranet services. The host is resolved here so that ingest keeps a local copy of a shard the
    user typed on a private network; the connection itself is checked again (GuardedResolver)."""
    from .network_policy import AddressPolicy

    host = urlsplit(url).hostname
    if not host:
        return "it has no host"
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)}
    except (OSError, UnicodeError):
        return None  # unresolvable: opening it fails with its own error, and reaches nothing
    why = next(filter(None, map(AddressPolicy().refusal, sorted(addresses))), None)
    return f"a stored http(s) URL may reach public addresses only, and {why}" if why else None


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _guarded_http_open(url: str) -> BinaryIO:
    """Open a stored http(s) shard with every connection checked by the address policy (so DNS
    rebinding after `_http_host_refusal` cannot reach a refused address) and redirects not followed
    (aiohttp does not resolve an IP-literal redirect target, so the resolver would not see it)."""
    import aiohttp
    from fsspec.implementations.http import HTTPFileSystem

    from .network_policy import AddressPolicy, BlockedAddress, GuardedResolver

    async def guarded_client(**kwargs):
        return aiohttp.ClientSession(connector=aiohttp.TCPConnector(resolver=GuardedResolver(AddressPolicy())),
                                     **kwargs)

    host = (urlsplit(url).hostname or "").split("%")[0]
    literal = AddressPolicy().refusal(host) if _is_ip(host) else None  # aiohttp resolves no IP literal
    if literal:
        raise UnsafeShardURL(f"refusing the stored shard URL {url!r}: {literal}")
    fs = HTTPFileSystem(get_client=guarded_client, allow_redirects=False, skip_instance_cache=True)
    try:
        return fs.open(url, "rb")
    except Exception as exc:
        cause = exc  # fsspec reports a failed connection as FileNotFoundError; the refusal is its cause
        while cause is not None and not isinstance(cause, BlockedAddress):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        raise UnsafeShardURL(f"refusing the stored shard URL {url!r}: {cause}") from None


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


OnReject = Callable[[str, str, str], None]  # (key, reason, detail)
_HEADER_EXTENSION = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE,
                     tarfile.SOLARIS_XHDTYPE)
MAX_HEADER_EXTENSION = 1024 * 1024  # a long name or pax record block; tarfile reads one whole
_KINDS = {tarfile.DIRTYPE: "a directory", tarfile.SYMTYPE: "a symbolic link", tarfile.LNKTYPE: "a hard link",
          tarfile.CHRTYPE: "a character device", tarfile.BLKTYPE: "a block device", tarfile.FIFOTYPE: "a FIFO"}


class _BoundedTarInfo(tarfile.TarInfo):
    """tarfile reads a long-name or pax header whole, before any member is seen: bound it first."""

    def _proc_member(self, tarfile_):
        if self.type in _HEADER_EXTENSION and self.size > MAX_HEADER_EXTENSION:
            raise tarfile.HeaderError(f"a header extension of {self.size} bytes (more than {MAX_HEADER_EXTENSION})")
        return super()._proc_member(tarfile_)


def printable(name: str, limit: int = 300) -> str:
    """A member name as text that is safe to store and print: escapes for bytes that are not
    UTF-8 and for control characters, cut at `limit`."""
    text = name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text if len(text) <= limit else text[:limit] + "..."


def _key_problem(key: str | None, ext: str | None, config: ValidationConfig) -> str | None:
    if key is None:
        return "no key: the name has no extension, or starts with a dot"
    if not ext:
        return "an empty extension"
    if len(key) > config.max_key_length:
        return f"a key of {len(key)} characters (more than {config.max_key_length})"
    if os.path.basename(key).startswith("__"):
        return "a key starting with '__' (reserved by WebDataset)"
    if not (key + ext).isprintable():  # control characters, and bytes that were not UTF-8 (surrogates)
        return "a name that is not printable UTF-8"
    return None


@dataclass
class _Open:
    """The sample being read: its members so far, and why it is refused (None: not refused)."""

    key: str
    files: dict[str, bytes]
    exts: set[str]
    refusal: tuple[str, str] | None = None


def iter_samples(stream: BinaryIO, config: ValidationConfig | None = None,
                 on_reject: OnReject | None = None) -> Iterator[RawSample]:
    """Group tar members into samples by key (img2dataset / WebDataset convention).

    Every member ends in a yielded sample or in one `on_reject(key, reason, detail)` call:
    - a member that is not a regular file (`not_a_file`) or has no usable key (`bad_key`) is
      reported under its own name;
    - a sample with a member over its size limit (`too_large`, judged on the size the header
      declares: the bytes are skipped, never read) or too many members (`too_many_members`);
    - a key seen before in this shard (`duplicate_key`: the first sample wins). A member whose key
      and extension repeat those of the open sample starts such a second sample.
    Raises TruncatedShard after the last complete sample if the tar is cut off or corrupt. Memory
    is bounded by the config's member limits, whatever the members declare.
    """
    config = config or ValidationConfig()
    report = on_reject or (lambda key, reason, detail: None)
    seen: set[bytes] = set()  # digests of the keys so far: 8 bytes each, whatever a key's length
    cur: _Open | None = None

    def close(sample: _Open) -> RawSample | None:
        if sample.refusal is not None:
            report(sample.key, *sample.refusal)
            return None
        return RawSample(sample.key, sample.files)

    try:
        tar = tarfile.open(fileobj=stream, mode="r|*", tarinfo=_BoundedTarInfo)
        for n, info in enumerate(tar):
            tar.members = []  # stream mode keeps every header otherwise
            if n >= config.max_members_per_shard:
                if cur is not None and (done := close(cur)) is not None:
                    yield done
                report(printable(info.name), "too_many_members",
                       f"the shard has more than {config.max_members_per_shard} members; the rest is not read")
                return
            name = info.name if info.name.isprintable() and len(info.name) <= 300 else printable(info.name)
            if not info.isreg():
                report(name, "not_a_file", f"member {name} is {_KINDS.get(info.type, f'of type {info.type!r}')}")
                continue
            key, ext = base_plus_ext(info.name)
            problem = _key_problem(key, ext, config)
            if problem:
                report(name, "bad_key", f"member {name}: {problem}")
                continue
            ext = ext.lower()
            if cur is None or key != cur.key or ext in cur.exts:
                if cur is not None and (done := close(cur)) is not None:
                    yield done
                cur = _Open(key, {}, set())
                digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
                if digest in seen:
                    cur.refusal = ("duplicate_key", f"member {name}: the key appeared earlier in the shard; "
                                                    "the first sample with it is kept")
                seen.add(digest)
            cur.exts.add(ext)
            limit = config.member_limit(ext)
            if cur.refusal is None and len(cur.exts) > config.max_members_per_sample:
                cur.refusal = ("too_many_members", f"more than {config.max_members_per_sample} members")
            if cur.refusal is None and info.size > limit:
                cur.refusal = ("too_large",
                               f"member {name} declares {info.size} bytes (the limit for .{ext} is {limit})")
            if cur.refusal is None:
                data = tar.extractfile(info).read(info.size)  # at most `limit` bytes
                if len(data) != info.size:
                    raise tarfile.ReadError("unexpected end of data")
                cur.files[ext] = data
            else:
                cur.files.clear()  # a refused sample's bytes are never needed; tarfile skips the rest
        if cur is not None and (done := close(cur)) is not None:
            yield done
        cur = None  # the last sample is complete: what follows is not part of it
        _check_no_trailing_data(tar)
    except (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError, ValueError) as exc:
        refused = f" (the sample was refused already: {cur.refusal[0]})" if cur and cur.refusal else ""
        raise TruncatedShard(cur.key if cur else None, f"{exc.__class__.__name__}: {exc}{refused}") from exc


def _check_no_trailing_data(tar: tarfile.TarFile) -> None:
    """tarfile ends quietly at an invalid header past the first member: the end of an archive
    must be zeros, so anything else after it is a shard cut short by corruption."""
    while True:
        block = tar.fileobj.read(64 * 1024)
        if not block:
            return
        if block.count(0) != len(block):
            raise tarfile.ReadError(
                f"an invalid tar header at offset {tar.offset}: the rest of the shard is unreadable")
