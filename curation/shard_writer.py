"""Writing curated WebDataset shards: rolling tar files with their counts and sha256, float16
logits as `.npy` members, and an atomic swap of a finished folder into place. Used by `select` and
`synthesize`.

Beside a stage's finished folders `<stage>/<name>/` it keeps, per name:
    .lock-<name>             a lock file (flock): one writer of a name at a time
    .tmp-<name>-<8 hex>      the new version while it is written; after the swap, the old one
    .old-<name>-<8 hex>      the old version mid-swap, only where the atomic exchange is unavailable
A writer that was killed leaves temporaries behind; the next writer of that stage removes those of
every name whose lock is free (and puts an interrupted fallback swap's old version back first).
"""
from __future__ import annotations

import ctypes
import errno
import hashlib
import io
import json
import os
import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import webdataset as wds

from .files import name_lock  # in files since the catalog takes it too (without webdataset)
from .workspace import remove_tree


def logits_npy(logits) -> bytes | None:
    if logits is None or (not isinstance(logits, (list, np.ndarray))) or len(logits) == 0:
        return None
    buf = io.BytesIO()
    np.save(buf, np.asarray(logits, dtype=np.float16))
    return buf.getvalue()


class ShardSink:
    """Rolls curated tar files every `shard_size` samples and records their counts and sha256, and
    where each sample went (`members`: sample_id, weight from its json, shard, position)."""

    def __init__(self, folder: Path, name: str, shard_size: int):
        self.folder, self.name, self.shard_size = folder, name, shard_size
        self.shards: list[dict] = []
        self.members: list[dict] = []
        self.writer = None
        self.count = 0

    def write(self, sample: dict) -> None:
        if self.writer is None or self.count == self.shard_size:
            self._close()
            path = self.folder / f"{self.name}-{len(self.shards):06d}.tar"
            self.writer = wds.TarWriter(str(path), mtime=0)  # fixed: the same selection gives byte-identical tars
            self.shards.append({"path": path.name, "count": 0})
            self.count = 0
        self.writer.write(sample)
        self.members.append({"sample_id": sample["__key__"], "weight": sample_weight(sample.get("json")),
                             "shard": self.shards[-1]["path"], "position": self.count})
        self.count += 1
        self.shards[-1]["count"] = self.count

    def _close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
            entry = self.shards[-1]
            entry["sha256"] = hashlib.sha256((self.folder / entry["path"]).read_bytes()).hexdigest()

    def close(self) -> list[dict]:
        self._close()
        return self.shards


def sample_weight(meta: bytes | None) -> float:
    """The training weight a curated sample's json records (1.0 when it records none)."""
    try:
        weight = json.loads(meta).get("weight") if meta else None
    except (ValueError, AttributeError):
        weight = None
    return float(weight) if isinstance(weight, (int, float)) and not isinstance(weight, bool) else 1.0


_TEMPORARY = re.compile(r"\.(tmp|old)-(.+)-[0-9a-f]{8}")
_RENAME_EXCHANGE, _AT_FDCWD = 2, -100


def _renameat2():
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # not Linux, or a libc without it
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn


_EXCHANGE = _renameat2()


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step; False where the system or filesystem cannot."""
    if _EXCHANGE is None:
        return False
    if _EXCHANGE(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EPERM):  # e.g. a network filesystem
        return False
    raise OSError(err, os.strerror(err), str(b))


def swap_into_place(tmp: Path, final: Path) -> None:
    """Publish the finished folder `tmp` at `final`: whatever instant a reader looks or a crash
    comes, `final` is the old version or the new one, never neither and never a mix. A first version
    is one rename; a replacement is one atomic exchange (Linux renameat2), after which `tmp` holds
    the old version for the caller to remove. Where the exchange is unsupported it is two renames,
    and `staging` puts the old version back at the next run if a crash fell between them."""
    if not final.exists() and not final.is_symlink():
        os.rename(tmp, final)
        return
    if _exchange(tmp, final):
        return
    old = final.parent / f".old-{final.name}-{uuid.uuid4().hex[:8]}"
    os.rename(final, old)
    os.rename(tmp, final)
    os.rename(old, tmp)  # the caller removes it, as after an exchange


def _recover(parent: Path, name: str) -> None:
    """Undo what a killed writer of `name` left: its old version goes back where a fallback swap
    had taken it away, and every other temporary of that name is removed."""
    temps = sorted(p for p in parent.iterdir() if (m := _TEMPORARY.fullmatch(p.name)) and m.group(2) == name)
    final = parent / name
    olds = [p for p in temps if p.name.startswith(".old-")]
    if olds and not final.exists() and not final.is_symlink():
        os.rename(olds[0], final)
        temps.remove(olds[0])
    for p in temps:
        if p.is_symlink():  # planted: remove the link itself, never what it points to
            p.unlink()
        else:
            remove_tree(p, parent)


def clean_stale(parent: Path, mine: str | None = None) -> list[str]:
    """Recover every name under `parent` that has temporaries and no live writer (`mine`: a name
    whose lock this process already holds); returns those names."""
    names = sorted({m.group(2) for p in parent.iterdir() if (m := _TEMPORARY.fullmatch(p.name))})
    cleaned = []
    for name in names:
        if name == mine:
            _recover(parent, name)
            cleaned.append(name)
            continue
        with name_lock(parent, name, wait=False) as free:
            if free:
                _recover(parent, name)
                cleaned.append(name)
    return cleaned


@contextmanager
def staging(final: Path) -> Iterator[Path]:
    """A fresh temporary folder beside `final` to write a new version into, then `swap_into_place`.
    Holds `final`'s lock meanwhile (a second writer of the name waits), cleans the stage's stale
    temporaries first, and removes the temporary folder (after a swap: the old version) at the end."""
    parent = final.parent
    parent.mkdir(parents=True, exist_ok=True)
    with name_lock(parent, final.name):
        clean_stale(parent, mine=final.name)
        tmp = parent / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            yield tmp
        finally:
            remove_tree(tmp, parent)


def read_manifest(folder: Path) -> dict:
    """A finished folder's manifest.json ({} when there is none yet, or it is unreadable)."""
    try:
        return json.loads((folder / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}
