"""Crawl: a URL list becomes WebDataset shards in img2dataset's layout, politely and within bounds.

Per shard `NNNNN` of `out_dir` it writes, each atomically and in this order:
    NNNNN.tar          {key}.jpg|png|webp (the original bytes), {key}.json, {key}.txt; successes only
    NNNNN_stats.json   img2dataset's per-shard stats (count, successes, durations, status_dict) plus ours
    NNNNN.parquet      one row per URL, success or failure; the shard's commit record, written last
A shard whose parquet carries the same plan fingerprint (its keys, URLs, captions and the config
that decides what is accepted) is skipped, so a rerun resumes where a crash stopped.

Every URL is bounded: http(s) only; no private, loopback, link-local, multicast or reserved
address (every resolved IP is checked, on every redirect hop, and the IPv4 address an IPv6 one
embeds: mapped, 6to4, Teredo, NAT64) unless allowed. `allow_private` opens loopback and private
ranges only; link-local (169.254.0.0/16, where clouds serve instance credentials; fe80::/10),
multicast, 0.0.0.0/8 and reserved ranges open only for a network named in `allowed_networks`
(`--allow-network CIDR`). A connect timeout and a total timeout per attempt; a body cap enforced
while streaming; an image/* content type; a magic-byte signature; a full PIL decode behind the
decompression-bomb guard. Timeouts, 5xx and connection errors are retried with exponential
backoff; 4xx and refusals are not. At most `concurrency` requests of a shard are in flight. A
failure is a row, never an exception.

Status follows img2dataset: "success" or "failed_to_download", plus "failed_to_decode" for bytes
that arrived but are not a usable image. `error_kind` is one word from a fixed vocabulary
(ERROR_KINDS) and `error_message` a short human explanation.
"""
from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import json
import os
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Coroutine, Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

import aiohttp
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json
import pyarrow.parquet as pq
import webdataset as wds
from pydantic import ValidationInfo, field_validator
from tqdm import tqdm
from yarl import URL

from .errors import StorageError, WebdistillError, first_line, would_overwrite
from .network_policy import AddressPolicy, BlockedAddress, GuardedResolver
from .progress import bar_disabled
from .stage_config import Real, stage_config
from .validate import Rejected, ValidationConfig, validate_image
from .workspace import atomic_path, config_hash, read_parquet_metadata, storage_errors, write_parquet_atomic

STAGE = "crawl"
# Bump when what a crawl accepts or writes changes: committed shards are redone, not skipped.
CRAWL_VERSION = 1

SUCCESS, FAILED_TO_DOWNLOAD, FAILED_TO_DECODE = "success", "failed_to_download", "failed_to_decode"
# Kinds whose bytes arrived but are not a usable image; every other kind is a failed download.
DECODE_KINDS = frozenset({"bad_magic", "unsupported_format", "not_an_image", "decompression_bomb",
                          "too_small", "truncated_image", "corrupt_image"})
ERROR_KINDS = DECODE_KINDS | {"bad_url", "bad_scheme", "blocked_address", "dns_error", "connect_timeout",
                              "timeout", "connection_error", "http_error", "too_many_redirects",
                              "bad_content_type", "too_large"}
FORMAT_EXT = {"jpeg": "jpg", "png": "png", "webp": "webp", "gif": "gif"}
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_SNIFF_BYTES = 12  # enough for every signature below
_CHUNK = 64 * 1024

ROWS_SCHEMA = pa.schema([
    ("key", pa.string()), ("url", pa.string()), ("caption", pa.string()),
    ("status", pa.string()), ("error_kind", pa.string()), ("error_message", pa.string()),
    ("http_status", pa.int32()), ("attempts", pa.int32()), ("final_url", pa.string()),
    ("width", pa.int32()), ("height", pa.int32()), ("original_width", pa.int32()), ("original_height", pa.int32()),
    ("format", pa.string()), ("bytes", pa.int64()), ("sha256", pa.string()), ("seconds", pa.float64()),
])


class CrawlError(WebdistillError):
    """A URL list or crawl config that cannot be used (missing file, unknown format, no `url` column)."""


@stage_config(CrawlError, "crawl config: ")
class CrawlConfig:
    shard_size: int = 1000
    timeout_s: Real = 10.0  # one attempt in full: connect, redirects, headers and body
    connect_timeout_s: Real = 5.0  # the TCP (and TLS) connect of each hop
    max_bytes: int = 10 * 2**20  # a body past this is aborted while streaming
    concurrency: int = 16  # requests in flight per shard
    retries: int = 2  # extra attempts after a timeout, a 5xx or a connection error
    backoff_s: Real = 0.5  # wait backoff_s * 2**attempt before retrying
    max_redirects: int = 5
    allow_private: bool = False  # loopback and private ranges: a local test server, an intranet
    allowed_networks: tuple[str, ...] = ()  # CIDRs reachable although not global (--allow-network): the
    # only way to open link-local (169.254.0.0/16, cloud metadata), multicast, 0.0.0.0/8 or reserved ranges
    user_agent: str = "webdistill/0.1 (image crawler for dataset curation; set your contact URL here)"
    allowed_formats: tuple[str, ...] = ("jpeg", "png", "webp")
    max_pixels: int = 40_000_000  # width * height from the header, checked before decoding
    min_side: int = 8

    @field_validator("shard_size", "timeout_s", "connect_timeout_s", "max_bytes", "concurrency", "max_pixels")
    @classmethod
    def _positive(cls, value: float, info: ValidationInfo) -> float:
        if not value > 0:
            raise ValueError(f"{info.field_name} must be > 0, got {value!r}")
        return value

    @field_validator("retries", "backoff_s", "max_redirects", "min_side")
    @classmethod
    def _not_negative(cls, value: float, info: ValidationInfo) -> float:
        if value < 0:
            raise ValueError(f"{info.field_name} must be >= 0, got {value!r}")
        return value

    @field_validator("allowed_formats")
    @classmethod
    def _known_formats(cls, formats: tuple[str, ...]) -> tuple[str, ...]:
        if set(formats) - set(FORMAT_EXT) or not formats:
            raise ValueError(f"allowed_formats must be among {sorted(FORMAT_EXT)}, got {formats}")
        return formats

    @field_validator("allowed_networks", mode="before")
    @classmethod
    def _cidrs(cls, nets: object) -> tuple[str, ...]:
        nets = (nets,) if isinstance(nets, str) else nets  # `allowed_networks: 10.0.0.0/8` in a YAML
        if not isinstance(nets, (list, tuple)):
            raise ValueError(f"allowed_networks must be a list of CIDRs, got {nets!r}")
        try:  # fail now on a bad CIDR, not mid-crawl
            for n in nets:
                ipaddress.ip_network(str(n), strict=False)
        except ValueError as exc:
            raise ValueError(f"allowed_networks: {exc}") from None
        return tuple(str(n) for n in nets)

    def networks(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        try:
            return tuple(ipaddress.ip_network(n, strict=False) for n in self.allowed_networks)
        except ValueError as exc:
            raise CrawlError(f"crawl config: allowed_networks: {exc}") from None

    def acceptance(self) -> dict:
        """The fields that decide which URLs succeed: part of every shard's fingerprint.
        Timeouts, retries and concurrency are left out, so tuning them does not redo finished shards."""
        keys = ("max_bytes", "max_redirects", "allow_private", "allowed_networks", "allowed_formats",
                "max_pixels", "min_side")
        return {k: getattr(self, k) for k in keys}

    def validation(self) -> ValidationConfig:
        return ValidationConfig(max_image_bytes=self.max_bytes, max_pixels=self.max_pixels,
                                min_side=self.min_side, formats=self.allowed_formats)


# ---------------------------------------------------------------------------------------------
# Input and plan


@dataclass(frozen=True)
class UrlRow:
    url: str
    caption: str | None = None


@dataclass(frozen=True)
class ShardPlan:
    index: int
    name: str  # "00000": the stem of the shard's files
    keys: tuple[str, ...]
    rows: tuple[UrlRow, ...]


def _read_table(path: Path) -> pa.Table:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return pq.read_table(path)
    if suffix == ".csv":
        return pa_csv.read_csv(path)
    if suffix in (".jsonl", ".ndjson", ".json"):
        return pa_json.read_json(path)  # newline-delimited JSON objects
    raise CrawlError(f"URL list {path}: unknown format {suffix or '(no suffix)'!r}; use .parquet, .csv or .jsonl")


def read_url_list(path: str | os.PathLike, url_col: str = "url", caption_col: str = "caption") -> list[UrlRow]:
    """Read a URL list (parquet, csv or jsonl) with a `url` column and an optional `caption` column.

    Rows keep their order, and a null url stays a row (it fails as `bad_url`), so keys do not
    shift when a list has holes."""
    path = Path(path)
    if not path.is_file():
        raise CrawlError(f"URL list not found: {path}")
    try:
        table = _read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise CrawlError(f"cannot read URL list {path}: {first_line(exc)}") from None
    if url_col not in table.column_names:
        raise CrawlError(f"URL list {path} has no {url_col!r} column (columns: {', '.join(table.column_names)})")
    urls = table.column(url_col).to_pylist()
    captions = table.column(caption_col).to_pylist() if caption_col in table.column_names else [None] * len(urls)
    if not urls:
        raise CrawlError(f"URL list {path} has no rows")
    return [UrlRow("" if u is None else str(u).strip(), None if c is None else str(c)) for u, c in zip(urls, captions)]


def plan_shards(rows: Iterable[UrlRow], shard_size: int) -> list[ShardPlan]:
    """Deterministic: shard i holds rows[i*size:(i+1)*size], keys "{shard:05d}{idx:04d}"
    (both fields widen when the counts need more digits, as img2dataset's do)."""
    rows = list(rows)
    if shard_size <= 0:
        raise CrawlError(f"shard_size must be > 0, got {shard_size}")
    n_shards = -(-len(rows) // shard_size)
    shard_w = max(5, len(str(n_shards - 1)))
    idx_w = max(4, len(str(shard_size - 1)))
    plans = []
    for i in range(n_shards):
        chunk = tuple(rows[i * shard_size:(i + 1) * shard_size])
        keys = tuple(f"{i:0{shard_w}d}{j:0{idx_w}d}" for j in range(len(chunk)))
        plans.append(ShardPlan(index=i, name=f"{i:0{shard_w}d}", keys=keys, rows=chunk))
    return plans


def plan_fingerprint(plan: ShardPlan, config: CrawlConfig) -> str:
    h = hashlib.sha256(config_hash(config.acceptance() | {"version": CRAWL_VERSION}).encode())
    for key, row in zip(plan.keys, plan.rows):
        h.update(json.dumps([key, row.url, row.caption]).encode() + b"\n")
    return h.hexdigest()[:32]


# ---------------------------------------------------------------------------------------------
# Where a request may go


class _Failed(Exception):
    def __init__(self, kind: str, message: str, retryable: bool = False, http_status: int | None = None):
        super().__init__(message)
        self.kind, self.message, self.retryable, self.http_status = kind, message, retryable, http_status


def _check_url(url: str, policy: AddressPolicy) -> None:
    """Scheme and host checks before any request; an IP-literal host is checked here because
    aiohttp does not resolve it (hostnames are checked by the resolver)."""
    if not url:
        raise _Failed("bad_url", "empty URL")
    try:
        parsed = URL(url)
    except (ValueError, TypeError) as exc:
        raise _Failed("bad_url", f"unparsable URL: {exc}") from None
    if parsed.scheme not in ("http", "https"):
        raise _Failed("bad_scheme", f"scheme {parsed.scheme or '(none)'!r} refused: only http and https")
    if not parsed.host:
        raise _Failed("bad_url", "URL has no host")
    try:
        ipaddress.ip_address(parsed.host.split("%")[0])
    except ValueError:
        return  # a hostname
    why = policy.refusal(parsed.host)
    if why:
        raise _Failed("blocked_address", why)


# ---------------------------------------------------------------------------------------------
# Fetching one URL


def sniff_format(head: bytes) -> str | None:
    """The image format from its signature, or None: JPEG, PNG, GIF and WEBP are known."""
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    return None


def _check_magic(head: bytes, allowed: tuple[str, ...]) -> None:
    fmt = sniff_format(head)
    if fmt is None:
        raise _Failed("bad_magic", f"no JPEG/PNG/WEBP/GIF signature: starts with {head[:_SNIFF_BYTES]!r}")
    if fmt not in allowed:
        raise _Failed("unsupported_format", f"{fmt} not in allowed_formats {list(allowed)}")


async def _read_body(resp: aiohttp.ClientResponse, config: CrawlConfig) -> bytes:
    """The body, checked as it streams: the signature on the first bytes, the cap on every chunk."""
    declared = resp.content_length
    if declared is not None and declared > config.max_bytes:
        raise _Failed("too_large", f"Content-Length {declared} > max_bytes {config.max_bytes}")
    body = bytearray()
    sniffed = False
    async for chunk in resp.content.iter_chunked(_CHUNK):
        body += chunk
        if len(body) > config.max_bytes:
            raise _Failed("too_large", f"body passed max_bytes {config.max_bytes} while streaming")
        if not sniffed and len(body) >= _SNIFF_BYTES:
            _check_magic(bytes(body[:_SNIFF_BYTES]), config.allowed_formats)
            sniffed = True
    if not sniffed:
        _check_magic(bytes(body), config.allowed_formats)
    return bytes(body)


async def _attempt(session: aiohttp.ClientSession, url: str, config: CrawlConfig,
                   policy: AddressPolicy) -> tuple[bytes, int, str]:
    """One attempt, following redirects by hand so every hop is checked. Returns (body, status, final url)."""
    current = url
    for _ in range(config.max_redirects + 1):
        _check_url(current, policy)
        async with session.get(current, allow_redirects=False) as resp:
            try:
                if resp.status in _REDIRECTS:
                    location = resp.headers.get("Location")
                    if not location:
                        raise _Failed("http_error", f"HTTP {resp.status} without a Location", http_status=resp.status)
                    current = str(resp.url.join(URL(location)))
                    continue
                if not 200 <= resp.status < 300:
                    raise _Failed("http_error", f"HTTP {resp.status} {resp.reason or ''}".strip(),
                                  retryable=resp.status >= 500, http_status=resp.status)
                if "Content-Type" not in resp.headers:
                    raise _Failed("bad_content_type", "no Content-Type header", http_status=resp.status)
                if not resp.content_type.startswith("image/"):
                    raise _Failed("bad_content_type", f"Content-Type {resp.content_type!r} is not image/*",
                                  http_status=resp.status)
                return await _read_body(resp, config), resp.status, current
            except _Failed:
                resp.close()  # drop the connection instead of reading the rest of the body
                raise
    raise _Failed("too_many_redirects", f"more than {config.max_redirects} redirects")


@dataclass
class _Fetched:
    data: bytes | None = None
    http_status: int | None = None
    final_url: str | None = None
    attempts: int = 0
    failure: _Failed | None = None


def _classify(exc: BaseException, config: CrawlConfig) -> _Failed:
    """A transport exception as a failure; transient ones are retryable."""
    if isinstance(exc, _Failed):
        return exc
    if isinstance(exc, BlockedAddress):
        return _Failed("blocked_address", str(exc))
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return _Failed("connect_timeout", f"no connection within {config.connect_timeout_s} s", retryable=True)
    if isinstance(exc, TimeoutError):
        return _Failed("timeout", f"no complete response within {config.timeout_s} s", retryable=True)
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return _Failed("dns_error", f"cannot resolve: {exc.os_error}", retryable=True)
    if isinstance(exc, ValueError):  # aiohttp.InvalidURL, or a Location yarl cannot parse
        return _Failed("bad_url", f"invalid URL: {exc}"[:300])
    return _Failed("connection_error", f"{exc.__class__.__name__}: {exc}"[:300], retryable=True)


async def _fetch(session: aiohttp.ClientSession, url: str, config: CrawlConfig, policy: AddressPolicy,
                 slots: asyncio.Semaphore) -> _Fetched:
    """Fetch with retries; a slot is held per attempt, not during the backoff."""
    for attempt in range(config.retries + 1):
        try:
            async with slots, asyncio.timeout(config.timeout_s):
                data, status, final = await _attempt(session, url, config, policy)
            return _Fetched(data, status, final, attempt + 1)
        except (_Failed, BlockedAddress, TimeoutError, aiohttp.ClientError, OSError, ValueError) as exc:
            failure = _classify(exc, config)
        if not failure.retryable or attempt == config.retries:
            return _Fetched(http_status=failure.http_status, attempts=attempt + 1, failure=failure)
        await asyncio.sleep(config.backoff_s * 2**attempt)
    raise AssertionError("unreachable")


async def _crawl_one(session, key: str, row: UrlRow, config: CrawlConfig, policy: AddressPolicy,
                     slots: asyncio.Semaphore) -> tuple[dict, dict | None]:
    """(parquet row, tar sample or None) for one URL."""
    start = time.perf_counter()
    fetched = await _fetch(session, row.url, config, policy, slots)
    record = {"key": key, "url": row.url, "caption": row.caption, "http_status": fetched.http_status,
              "attempts": fetched.attempts, "final_url": fetched.final_url}
    failure = fetched.failure
    if failure is None:
        try:
            # Off the event loop: a full decode takes milliseconds and would stall every other download.
            info = await asyncio.get_running_loop().run_in_executor(None, validate_image, fetched.data,
                                                                    config.validation())
        except Rejected as rej:
            failure = _Failed(rej.reason, rej.detail[:300])
    record["seconds"] = time.perf_counter() - start
    if failure is not None:
        status = FAILED_TO_DECODE if failure.kind in DECODE_KINDS else FAILED_TO_DOWNLOAD
        record.update(status=status, error_kind=failure.kind, error_message=failure.message)
        return record, None
    record.update(status=SUCCESS, error_kind=None, error_message=None, width=info.width, height=info.height,
                  original_width=info.width, original_height=info.height, format=info.format,
                  bytes=len(fetched.data), sha256=hashlib.sha256(fetched.data).hexdigest())
    meta = {k: record[k] for k in ("url", "caption", "key", "status", "error_message", "width", "height",
                                   "original_width", "original_height", "sha256", "final_url")}
    sample = {"__key__": key, FORMAT_EXT[info.format]: fetched.data, "json": json.dumps(meta).encode()}
    if row.caption is not None:
        sample["txt"] = row.caption.encode()
    return record, sample


async def _crawl_rows(plan: ShardPlan, config: CrawlConfig,
                      emit: Callable[[dict, dict | None], None], on_url: Callable[[], None] | None) -> None:
    """Emit every URL's result in key order. Tasks are started at most a window ahead of the
    next one to emit, which bounds the bodies held in memory while keeping the tar's order."""
    policy = AddressPolicy.from_config(config)
    slots = asyncio.Semaphore(config.concurrency)
    window = 4 * config.concurrency
    connector = aiohttp.TCPConnector(limit=config.concurrency, resolver=GuardedResolver(policy))
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=config.connect_timeout_s)
    headers = {"User-Agent": config.user_agent, "Accept": "image/*"}
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, headers=headers, trust_env=False) as session:
        todo = iter(zip(plan.keys, plan.rows))
        tasks: deque[asyncio.Task] = deque()

        def start_next() -> None:
            nxt = next(todo, None)
            if nxt is not None:
                tasks.append(asyncio.create_task(_crawl_one(session, *nxt, config, policy, slots)))

        for _ in range(window):
            start_next()
        try:
            while tasks:
                record, sample = await tasks.popleft()
                start_next()
                emit(record, sample)
                if on_url is not None:
                    on_url()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


T = TypeVar("T")


def _run(coro: Coroutine[object, object, T]) -> T:
    """asyncio.run, also from a thread that already runs an event loop (a notebook, an async task)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


# ---------------------------------------------------------------------------------------------
# A shard, and the stage


@dataclass
class ShardResult:
    shard: str
    n_urls: int
    n_success: int = 0
    n_failed: int = 0
    retries: int = 0  # attempts beyond the first, over all URLs
    skipped: bool = False
    seconds: float = 0.0
    error_kinds: dict[str, int] = field(default_factory=dict)


@dataclass
class CrawlSummary:
    shards: list[ShardResult] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # shard name -> one-line reason it did not finish

    @property
    def successes(self) -> int:
        return sum(r.n_success for r in self.shards)

    @property
    def failures(self) -> int:
        return sum(r.n_failed for r in self.shards)

    @property
    def skipped(self) -> int:
        return sum(r.skipped for r in self.shards)


@dataclass(frozen=True)
class ShardPaths:
    tar: Path
    stats: Path
    parquet: Path

    @classmethod
    def of(cls, out_dir: str | os.PathLike, name: str) -> ShardPaths:
        out = Path(out_dir)
        return cls(out / f"{name}.tar", out / f"{name}_stats.json", out / f"{name}.parquet")

    def all(self) -> tuple[Path, Path, Path]:
        return self.parquet, self.stats, self.tar  # the commit record first, so removal uncommits at once


def is_finished(plan: ShardPlan, out_dir: str | os.PathLike, config: CrawlConfig) -> bool:
    """The shard was committed for this exact plan and config, and its tar is still there."""
    paths = ShardPaths.of(out_dir, plan.name)
    done = read_parquet_metadata(paths.parquet)
    return done.get("fingerprint") == plan_fingerprint(plan, config) and paths.tar.is_file()


def _committed_urls(paths: ShardPaths) -> list[tuple[str, str]] | None:
    """(key, url) of every row of a committed shard; None when there is none (or only a broken one,
    which a crawl redoes anyway)."""
    try:
        table = pq.read_table(paths.parquet, columns=["key", "url"])
    except (OSError, pa.ArrowException):
        return None
    return list(zip(table["key"].to_pylist(), table["url"].to_pylist()))


def _other_urls(plan: ShardPlan, out_dir: str | os.PathLike) -> str | None:
    """How the committed shard of this plan's name holds other URLs than the plan (None when it holds
    none, or the same ones: a config or caption change, or a partial last shard the list has grown)."""
    held = _committed_urls(ShardPaths.of(out_dir, plan.name))
    planned = [(key, row.url) for key, row in zip(plan.keys, plan.rows)]
    if held is None or held == planned[:len(held)]:
        return None
    for (key, url), (_, new_url) in zip(held, planned):
        if url != new_url:
            return f"key {key} is {url} there, {new_url} in this list"
    return f"it holds {len(held)} URLs, this list puts {len(planned)} there"


def refuse_other_url_lists(plans: Iterable[ShardPlan], out_dir: str | os.PathLike) -> None:
    """Shards about to be (re)crawled that hold another URL list's rows are refused: recrawling would
    delete them (WouldOverwrite; a rerun of the same list, or of it with more URLs, resumes)."""
    clashes = [(plan.name, why) for plan in plans if (why := _other_urls(plan, out_dir)) is not None]
    if clashes:
        name, why = clashes[0]
        more = f" (and {len(clashes) - 1} more shard(s))" if len(clashes) > 1 else ""
        raise would_overwrite(f"shard {name} in {out_dir} comes from another URL list or --shard-size ({why}){more}",
                              keep="choose another --out")


def _clear(paths: ShardPaths) -> None:
    """Remove a shard's old files, and temporaries a killed run left behind."""
    for path in paths.all():
        path.unlink(missing_ok=True)
        for stale in path.parent.glob(f".{path.name}.*.tmp"):  # atomic_path's temporary names
            stale.unlink(missing_ok=True)


def crawl_shard(plan: ShardPlan, out_dir: str | os.PathLike, config: CrawlConfig | None = None,
                on_url: Callable[[], None] | None = None) -> ShardResult:
    """Crawl one shard into `out_dir`, or skip it if it is finished. `on_url` is called once per URL
    done (a progress bar). A failed URL is a row; only a local error (disk, permissions) raises, and
    then the shard leaves no file behind."""
    config = config or CrawlConfig()
    with storage_errors(Path(out_dir)):
        Path(out_dir).mkdir(parents=True, exist_ok=True)
    paths = ShardPaths.of(out_dir, plan.name)
    if is_finished(plan, out_dir, config):
        return ShardResult(plan.name, len(plan.rows), skipped=True)
    with storage_errors(paths.tar):  # removing a file on a read-only mount fails too, even a missing one
        _clear(paths)
    started = datetime.now(UTC)
    t0 = time.perf_counter()
    records: list[dict] = []
    with atomic_path(paths.tar) as tmp_tar:
        with wds.TarWriter(str(tmp_tar), encoder=False) as sink:

            def emit(record: dict, sample: dict | None) -> None:
                records.append(record)
                if sample is not None:
                    sink.write(sample)

            _run(_crawl_rows(plan, config, emit, on_url))
    seconds = time.perf_counter() - t0
    fingerprint = plan_fingerprint(plan, config)
    status = Counter(r["status"] for r in records)
    kinds = Counter(r["error_kind"] for r in records if r["error_kind"])
    retries = sum(r["attempts"] - 1 for r in records)
    stats = {
        "shard": plan.name, "count": len(records), "successes": status[SUCCESS],
        "failed_to_download": status[FAILED_TO_DOWNLOAD], "failed_to_decode": status[FAILED_TO_DECODE],
        "duration": seconds, "start_time": started.isoformat(), "end_time": datetime.now(UTC).isoformat(),
        "status_dict": dict(Counter(r["error_message"] or SUCCESS for r in records)),
        "error_kinds": dict(kinds), "retries": retries,
        "bytes": sum(r.get("bytes") or 0 for r in records),
        "fingerprint": fingerprint, "config": asdict(config), "version": CRAWL_VERSION,
    }
    with atomic_path(paths.stats) as tmp:
        tmp.write_text(json.dumps(stats, indent=2))
    table = pa.Table.from_pylist(records, schema=ROWS_SCHEMA)
    write_parquet_atomic(table, paths.parquet, {"fingerprint": fingerprint, "stage": STAGE, "version": CRAWL_VERSION})
    return ShardResult(plan.name, len(records), status[SUCCESS], len(records) - status[SUCCESS], retries,
                       False, seconds, dict(kinds))


def crawl(url_list: str | os.PathLike | Iterable[UrlRow | str], out_dir: str | os.PathLike,
          config: CrawlConfig | None = None, workers: int = 1, progress: bool = True,
          overwrite: bool = False) -> CrawlSummary:
    """Crawl a URL list (a file or UrlRows) into shards under `out_dir`, `workers` shards at a
    time, skipping finished shards. A shard that raises is reported in `failed`; the others go on,
    unless the output cannot be written at all (StorageError: a full disk, no permission). Shards
    of another URL list in `out_dir` are refused (WouldOverwrite) unless `overwrite`.

    Shards run in threads, not processes: the work is network-bound, each thread runs its own
    event loop, and one progress bar over URLs can count them all."""
    config = config or CrawlConfig()
    if isinstance(url_list, (str, os.PathLike)):
        rows = read_url_list(url_list)
    else:  # UrlRows, or bare URL strings
        rows = [r if isinstance(r, UrlRow) else UrlRow(str(r)) for r in url_list]
    plans = plan_shards(rows, config.shard_size)
    summary = CrawlSummary()
    todo = []
    for plan in plans:
        if is_finished(plan, out_dir, config):
            summary.shards.append(ShardResult(plan.name, len(plan.rows), skipped=True))
        else:
            todo.append(plan)
    if not overwrite:
        refuse_other_url_lists(todo, out_dir)
    bar = tqdm(total=sum(len(p.rows) for p in todo), desc="crawl", unit="url", disable=bar_disabled(progress))
    lock = threading.Lock()

    def tick() -> None:
        with lock:
            bar.update()

    try:
        with ThreadPoolExecutor(max_workers=max(1, min(workers, len(todo) or 1))) as pool:
            futures = {pool.submit(crawl_shard, plan, out_dir, config, tick): plan for plan in todo}
            for fut in as_completed(futures):
                exc = fut.exception()
                if isinstance(exc, StorageError):  # the disk, not the shard: every other shard would fail alike
                    pool.shutdown(wait=False, cancel_futures=True)
                    raise exc
                if exc is not None:
                    summary.failed[futures[fut].name] = f"{exc.__class__.__name__}: {exc}"
                else:
                    summary.shards.append(fut.result())
    finally:
        bar.close()
    summary.shards.sort(key=lambda r: r.shard)
    return summary
