"""Ingest: validate every sample of every shard and record it in `samples` or `rejects`.

Per shard it writes three artifacts, each atomically:
    samples/<shard>.parquet   accepted samples and their metadata
    rejects/<shard>.parquet   every sample (or part of the shard) that was refused, with a reason
    shards/<shard>.parquet    one row of bookkeeping, written last: the shard's commit record
    sources/<shard>.tar       only for a shard later stages may not re-open from its spec (a `pipe:`
                              command, an unusual protocol): a copy of the bytes ingest read, in the
                              same pass; `shard_url` records the copy, `shard_origin` the spec typed
A shard whose commit record carries the same input fingerprint and config hash is skipped,
so a rerun after a crash redoes only the shards that were not committed. The fingerprint of a local
shard is the sha256 of its bytes (later stages' skip keys carry it): the same shard found at a new
place (a moved or copied crawl) only has its records pointed there, and nothing downstream is redone.
A shard whose name is taken by another file with other bytes (a second crawl's `00000.tar`) is
refused, not replaced: `--source` gives the second crawl names of its own.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from . import schemas
from .decode_sandbox import shared_sandbox
from .errors import ShardReadError, WorkerDied, WouldOverwrite
from .files import file_digest, is_remote
from .parallel import map_shards
from .shards import ShardRef, SpooledShard, TruncatedShard, expand_shards, iter_samples, open_shard, stored_url_refusal
from .validate import IMAGE_EXTS, Rejected, ValidationConfig
from .workspace import Workspace, config_hash, read_parquet_metadata, write_parquet_atomic

STAGE = "ingest"
# Bump when validation or the artifacts change: committed shards are redone, not skipped.
# 3: every tar member ends in samples or rejects; bounded members; decode budget; padded images refused.
INGEST_VERSION = 3


def make_sample_id(shard: str, key: str) -> str:
    """Stable across reruns and machines: depends only on the shard's name and the key."""
    return hashlib.blake2b(f"{shard}/{key}".encode(), digest_size=8).hexdigest()


@dataclass
class ShardResult:
    shard: str
    n_read: int = 0
    n_accepted: int = 0
    n_rejected: int = 0
    skipped: bool = False
    seconds: float = 0.0
    reasons: dict[str, int] = field(default_factory=dict)


@dataclass
class IngestSummary:
    shards: list[ShardResult] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # shard url -> one-line reason
    missing: list[str] = field(default_factory=list)

    @property
    def accepted(self) -> int:
        return sum(r.n_accepted for r in self.shards)

    @property
    def rejected(self) -> int:
        return sum(r.n_rejected for r in self.shards)

    @property
    def skipped(self) -> int:
        return sum(r.skipped for r in self.shards)


def _paths(ws: Workspace, shard: str) -> dict[str, Path]:
    # `shard` passed check_name in shard_name; owned() also keeps a symlinked folder from redirecting writes
    return {kind: ws.owned(kind, f"{shard}.parquet", what="shard name") for kind in ("samples", "rejects", "shards")}


def _decode_meta(files: dict[str, bytes]) -> dict:
    raw = files.get("json")
    if raw is None:
        return {}
    try:
        meta = json.loads(raw.decode("utf-8"))  # UTF-8 only: the text is stored as it is
    except (ValueError, RecursionError) as exc:  # also bad UTF-8, 5,000-digit numbers, deep nesting
        raise Rejected("bad_json", f"{exc.__class__.__name__}: {str(exc)[:200]}") from None
    if not isinstance(meta, dict):
        raise Rejected("bad_json", f"expected an object, got {type(meta).__name__}")
    return meta


def _text(value) -> str | None:
    """A string from the crawl's json, storable as UTF-8 (a lone surrogate escape becomes '?')."""
    if not isinstance(value, str):
        return None
    return value.encode("utf-8", "replace").decode("utf-8")


def _caption(meta: dict, files: dict[str, bytes]) -> str | None:
    if isinstance(meta.get("caption"), str):
        return _text(meta["caption"])
    if "txt" in files:
        return files["txt"].decode("utf-8", errors="replace")
    return None


def content_fingerprint(ref: ShardRef) -> str:
    """A shard's identity by content: the sha256 of a local file's bytes, which a moved or copied
    crawl keeps; a URL's or a command's own fingerprint otherwise (not downloaded twice)."""
    local = not is_remote(ref.url) and not ref.url.startswith("file://") and os.path.isfile(ref.url)
    return "sha256:" + file_digest(ref.url) if local else ref.fingerprint


def _record_of(path: Path) -> dict:
    rows = pq.read_table(path).to_pylist() if path.is_file() else []
    return rows[0] if rows else {}


def _relocate(paths: dict[str, Path], ref: ShardRef, done: dict) -> None:
    """Point a committed shard's records at the place its same bytes are now (shard_url, origin and
    the stat that spares the next rerun a hash); its samples and every later stage's stamp stay."""
    stamp = {k: done[k] for k in ("fingerprint", "config_hash", "stage") if k in done}
    stamp |= {"stat": ref.fingerprint, "origin": ref.url}
    for kind, columns in (("samples", ("shard_url",)), ("rejects", ()), ("shards", ("shard_url", "shard_origin"))):
        table = pq.read_table(paths[kind])
        for column in columns:
            table = table.set_column(table.schema.get_field_index(column), column,
                                     pa.array([ref.url] * table.num_rows, pa.string()))
        write_parquet_atomic(table, paths[kind], stamp)  # the commit record last, as ingest writes them


def _commit_state(ws: Workspace, ref: ShardRef, config: ValidationConfig) -> tuple[dict, bool, str | None]:
    """A shard's committed record (empty if none), whether it was ingested with this config (and its
    copy is there, for a command), and where it was read from."""
    paths = _paths(ws, ref.name)
    chash = config_hash(config.as_dict() | {"version": INGEST_VERSION})
    spool = ws.owned("sources", f"{ref.name}.tar") if stored_url_refusal(ref.url) else None
    done = read_parquet_metadata(paths["shards"])
    same_config = done.get("config_hash") == chash and (spool is None or spool.is_file())
    origin = (done.get("origin") or _record_of(paths["shards"]).get("shard_origin")) if done else None
    return done, same_config, origin


def committed_unchanged(ws: Workspace, ref: ShardRef, config: ValidationConfig) -> bool:
    """Whether ingest would skip this shard without reading it: committed from this place, with this
    config, and its stat unchanged."""
    done, same_config, origin = _commit_state(ws, ref, config)
    stat = done.get("stat", done.get("fingerprint"))  # records before content fingerprints: the stat
    return same_config and stat == ref.fingerprint and origin == ref.url


def ingest_shard(ws_root: str, ref: ShardRef, config: ValidationConfig) -> ShardResult:
    """Ingest one shard; skip it if it was committed with the same content and config (pointing the
    records at its new place if it moved); refuse it if its name is another file's with other bytes."""
    ws = Workspace(Path(ws_root))
    paths = _paths(ws, ref.name)
    chash = config_hash(config.as_dict() | {"version": INGEST_VERSION})
    # later stages re-open stored URLs as data only, never as commands: they read ingest's copy
    spool = ws.owned("sources", f"{ref.name}.tar") if stored_url_refusal(ref.url) else None
    if committed_unchanged(ws, ref, config):
        return ShardResult(shard=ref.name, skipped=True)
    done, same_config, origin = _commit_state(ws, ref, config)
    content = content_fingerprint(ref) if done else None
    if same_config and done.get("fingerprint") in (content, ref.fingerprint):
        if spool is None:  # the same bytes somewhere else: no sample changes, no later stage redoes a thing
            _relocate(paths, ref, done)
        return ShardResult(shard=ref.name, skipped=True)
    if done and origin not in (None, ref.url) and done.get("fingerprint") != content:
        raise WouldOverwrite(f"shard name {ref.name!r} is already ingested from {origin}, with other bytes than "
                             f"{ref.url}: ingest this crawl with --source NAME (its shards become NAME-{ref.name})")
    content = content or content_fingerprint(ref)

    start = time.perf_counter()
    rows: list[dict] = []
    rejects: list[dict] = []
    n_read = 0

    def reject(key, reason, detail="", url=None):
        nonlocal n_read
        n_read += reason != "truncated_tar"  # that row stands for the unread rest, not for one sample
        rejects.append({"shard": ref.name, "key": key, "reason": reason, "detail": detail[:500], "url": url})

    def candidates(stream):
        """(sample facts, image bytes) for the sandbox; what fails before decoding is rejected here."""
        for idx, raw in enumerate(iter_samples(stream, config, on_reject=reject)):
            url = None
            try:
                meta = _decode_meta(raw.files)
                url = _text(meta.get("url"))
                ext = next((e for e in IMAGE_EXTS if e in raw.files), None)
                if ext is None:
                    raise Rejected("missing_image", "members: " + ",".join(sorted(raw.files)))
            except Rejected as rej:
                reject(raw.key, rej.reason, rej.detail, url)
                continue
            yield (idx, raw, meta, url, ext), raw.files[ext]

    stream = open_shard(ref.url)  # a spec the user typed: the one place a pipe: command runs
    if spool is not None:
        stream = SpooledShard(stream, spool)
    shard_url = str(spool or ref.url)
    try:
        sandbox = shared_sandbox(config)  # each decode bounded in CPU time and memory
        for (idx, raw, meta, url, ext), info in sandbox.validate_all(candidates(stream)):
            if isinstance(info, Rejected):
                reject(raw.key, info.reason, info.detail, url)
                continue
            n_read += 1
            data = raw.files[ext]
            rows.append(
                {
                    "sample_id": make_sample_id(ref.name, raw.key),
                    "shard": ref.name,
                    "key": raw.key,
                    "idx": idx,
                    "shard_url": shard_url,
                    "url": url,
                    "caption": _caption(meta, raw.files),
                    "sha256": hashlib.sha256(data).hexdigest(),
                    "width": info.width,
                    "height": info.height,
                    "format": info.format,
                    "ext": ext,
                    "mode": info.mode,
                    "bytes": len(data),
                    "meta": raw.files["json"].decode("utf-8") if "json" in raw.files else None,
                }
            )
    except TruncatedShard as cut:
        reject(cut.partial_key, "truncated_tar", f"shard ends early after {n_read} samples: {cut}")
    finally:
        stream.close()

    seconds = time.perf_counter() - start
    stamp = {"fingerprint": content, "config_hash": chash, "stage": STAGE, "stat": ref.fingerprint, "origin": ref.url}
    write_parquet_atomic(pa.Table.from_pylist(rows, schema=schemas.SAMPLES), paths["samples"], stamp)
    write_parquet_atomic(pa.Table.from_pylist(rejects, schema=schemas.REJECTS), paths["rejects"], stamp)
    record = {
        "shard": ref.name,
        "shard_url": shard_url,
        "shard_origin": ref.url,
        "fingerprint": content,
        "config_hash": chash,
        "n_read": n_read,
        "n_accepted": len(rows),
        "n_rejected": len(rejects),
        "seconds": seconds,
        "ingested_at": datetime.now(UTC),
    }
    write_parquet_atomic(pa.Table.from_pylist([record], schema=schemas.SHARDS), paths["shards"], stamp)
    reasons: dict[str, int] = {}
    for r in rejects:
        reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
    return ShardResult(ref.name, n_read, len(rows), len(rejects), False, seconds, reasons)


def ingest(
    ws: Workspace,
    specs: list[str],
    config: ValidationConfig | None = None,
    workers: int = 2,
    source: str | None = None,
    progress: bool = True,
) -> IngestSummary:
    """Ingest every shard the specs name, in parallel. Bad shards are reported, not raised."""
    config = config or ValidationConfig()
    refs, missing = expand_shards(specs, source)
    summary = IngestSummary(missing=missing)
    work = functools.partial(ingest_shard, str(ws.root), config=config)
    for ref, result in map_shards(work, refs, workers=workers, desc="ingest", progress=progress):
        if isinstance(result, BaseException):
            known = isinstance(result, (ShardReadError, WorkerDied))
            msg = str(result) if known else f"{result.__class__.__name__}: {result}"
            summary.failed[ref.url] = msg
        else:
            summary.shards.append(result)
    summary.shards.sort(key=lambda r: r.shard)
    return summary
