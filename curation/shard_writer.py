"""Writing curated WebDataset shards: rolling tar files with their counts and sha256, float16
logits as `.npy` members, and an atomic swap of a finished folder into place. Used by `select` and
`synthesize`."""
from __future__ import annotations

import hashlib
import io
import json
import shutil
import uuid
from pathlib import Path

import numpy as np
import webdataset as wds


def logits_npy(logits) -> bytes | None:
    if logits is None or (not isinstance(logits, (list, np.ndarray))) or len(logits) == 0:
        return None
    buf = io.BytesIO()
    np.save(buf, np.asarray(logits, dtype=np.float16))
    return buf.getvalue()


class ShardSink:
    """Rolls curated tar files every `shard_size` samples and records their counts and sha256."""

    def __init__(self, folder: Path, name: str, shard_size: int):
        self.folder, self.name, self.shard_size = folder, name, shard_size
        self.shards: list[dict] = []
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


def swap_into_place(tmp: Path, final: Path) -> None:
    old = final.parent / f".old-{final.name}-{uuid.uuid4().hex[:8]}"
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def read_manifest(folder: Path) -> dict:
    """A finished folder's manifest.json ({} when there is none yet, or it is unreadable)."""
    try:
        return json.loads((folder / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}
