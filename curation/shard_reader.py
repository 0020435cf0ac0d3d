"""The shard reader that embed, score, synthesize and the demo CLIP share: one job per ingested
shard (its accepted samples, in shard order, with the ingest stamp), and the decoded images of
those jobs, streamed in batches. Select and the report read original bytes through
`stored_originals`.

Images are decoded in DataLoader workers straight from the shards (each worker streams whole
shards); the caller's model runs batched in the main process. A sample that no longer decodes
(the shard changed or went away since ingest) keeps its row and is flagged, never dropped.
"""
from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Collection, Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm import tqdm

from .errors import ShardReadError
from .progress import bar_disabled
from .shards import TruncatedShard, iter_samples, open_stored_shard
from .workspace import Workspace, read_parquet_metadata


@dataclass
class ShardJob:
    shard: str
    shard_url: str
    keys: list[str]  # accepted keys in shard order
    ext: list[str]
    sample_ids: list[str]
    stamp: dict


class ShardImages(IterableDataset):
    """Yields batches (job index, rows, images, ok) of the accepted samples of each job's shard. A
    batch never spans two shards, so a shard's outputs depend on its own samples alone: a rerun that
    skips finished shards computes the rest bit for bit as an uninterrupted run (the model's kernels
    differ in their last bits with a batch's size and mix)."""

    def __init__(self, jobs: list[ShardJob], preprocess, blank: torch.Tensor, batch_size: int):
        self.jobs, self.preprocess, self.blank, self.batch_size = jobs, preprocess, blank, batch_size

    def __iter__(self):
        info = get_worker_info()
        mine = range(len(self.jobs)) if info is None else range(info.id, len(self.jobs), info.num_workers)
        for j in mine:
            batch = []
            for row, image, ok in self._samples(j):
                batch.append((row, image, ok))
                if len(batch) == self.batch_size:
                    yield _collate(j, batch)
                    batch = []
            if batch:
                yield _collate(j, batch)

    def _samples(self, j: int):
        job = self.jobs[j]
        rows = {k: i for i, k in enumerate(job.keys)}
        seen = set()
        try:
            stream = open_stored_shard(job.shard_url)  # a URL from `samples`: data, never a command
        except ShardReadError:  # refused or gone: an empty stream, so every row is flagged below
            stream = io.BytesIO()
        try:
            for raw in iter_samples(stream):
                row = rows.get(raw.key)
                if row is None:
                    continue
                seen.add(row)
                try:
                    yield row, self.preprocess(Image.open(io.BytesIO(raw.files[job.ext[row]]))), True
                except Exception:  # noqa: BLE001 - the shard changed since ingest: keep the row, flag it
                    yield row, self.blank, False
        except TruncatedShard:
            pass  # ingest kept only samples before the cut; anything missing is flagged below
        finally:
            stream.close()
        for row in sorted(set(range(len(job.keys))) - seen):
            yield row, self.blank, False


def _collate(j: int, batch: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    rows, images, oks = zip(*batch)
    return (torch.full((len(rows),), j, dtype=torch.long), torch.tensor(rows), torch.stack(images),
            torch.tensor(oks))


def stored_originals(rows: pd.DataFrame) -> Iterator[tuple[pd.Series, bytes | None]]:
    """(row, original bytes) for each row of `samples` (shard_url, key, ext, sha256), each source
    shard read once, in shard order, and left as soon as its wanted keys are found. The bytes are
    None when they are gone or changed since ingest: never other bytes than those ingested. A shard
    that cannot be opened raises (ShardReadError, UnsafeShardURL)."""
    for shard_url, group in rows.groupby("shard_url", sort=True):
        wanted = {r["key"]: r for _, r in group.iterrows()}
        stream = open_stored_shard(shard_url)  # a URL from the catalog: data, never a command
        try:
            for raw in iter_samples(stream):
                row = wanted.pop(raw.key, None)
                if row is None:
                    continue
                data = raw.files.get(row["ext"])
                intact = data is not None and hashlib.sha256(data).hexdigest() == row["sha256"]
                yield row, data if intact else None
                if not wanted:
                    break
        except TruncatedShard:
            pass
        finally:
            stream.close()
        for row in wanted.values():
            yield row, None


def _low_priority_worker(_: int) -> None:
    """Decode workers yield the cores to the model's threads and fill the gaps between its ops:
    preempting one OpenMP thread stalls them all, so a decode that barges in costs far more than
    its own CPU time."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):  # not Linux: a lower priority is the next best thing
        os.nice(10)


def shard_jobs(ws: Workspace, stamp_extra: dict | None = None, only: Collection[str] | None = None) -> list[ShardJob]:
    """One job per ingested shard with accepted samples, rows in shard order."""
    jobs = []
    for samples_file in sorted((ws.root / "samples").glob("*.parquet")):
        if only is not None and samples_file.stem not in only:
            continue
        meta = read_parquet_metadata(samples_file)
        t = pq.read_table(samples_file, columns=["key", "ext", "sample_id", "shard_url", "idx"]).sort_by("idx")
        if t.num_rows == 0:
            continue
        stamp = {"ingest": [meta.get("fingerprint"), meta.get("config_hash")]} | (stamp_extra or {})
        jobs.append(ShardJob(samples_file.stem, t["shard_url"][0].as_py(), t["key"].to_pylist(), t["ext"].to_pylist(),
                             t["sample_id"].to_pylist(), stamp))
    return jobs


def load_images(jobs: list[ShardJob], preprocess, batch_size: int = 512, workers: int = 1,
                progress: bool = True, desc: str = "decode"):
    """Yield (job index, rows, uint8 image batch, ok) over the jobs' accepted samples."""
    blank = preprocess(Image.new("RGB", (8, 8)))
    workers = max(0, min(workers, len(jobs)))
    loader = DataLoader(ShardImages(jobs, preprocess, blank, batch_size), batch_size=None, num_workers=workers,
                        prefetch_factor=4 if workers else None, pin_memory=torch.cuda.is_available(),
                        worker_init_fn=_low_priority_worker if workers else None,
                        # forkserver: workers start from a clean process, not a fork of one that
                        # runs Prefect's or Dask's threads (a fork of those can die at start)
                        multiprocessing_context="forkserver" if workers else None)
    with tqdm(total=sum(len(j.keys) for j in jobs), desc=desc, unit="img", disable=bar_disabled(progress)) as bar:
        for batch in loader:
            yield batch
            bar.update(len(batch[2]))


def per_shard_outputs(jobs: list[ShardJob], preprocess, compute, batch_size: int = 256, workers: int = 1,
                      progress: bool = True, desc: str = "shards"):
    """Run `compute(uint8 batch) -> {name: (B, ...) array}` over the jobs' accepted samples and
    yield (job index, {name: (n, ...) array in row order}, ok (n,)) as soon as a shard is complete.
    Buffers exist only for shards in flight: allocated on a shard's first batch, freed once yielded."""
    buffers: dict[int, dict[str, np.ndarray]] = {}
    oks: dict[int, np.ndarray] = {}
    remaining = {j: len(job.keys) for j, job in enumerate(jobs)}
    for job_idx, rows, x, ok in load_images(jobs, preprocess, batch_size, workers, progress, desc=desc):
        out = compute(x)
        for j in torch.unique(job_idx).tolist():
            sel = (job_idx == j).numpy()
            r = rows.numpy()[sel]
            if j not in buffers:
                n = len(jobs[j].keys)
                buffers[j] = {k: np.zeros((n, *v.shape[1:]), v.dtype) for k, v in out.items()}
                oks[j] = np.zeros(n, bool)
            for k, v in out.items():
                buffers[j][k][r] = v[sel]
            oks[j][r] = ok.numpy()[sel]
            remaining[j] -= int(sel.sum())
            if remaining[j] == 0:
                yield j, buffers.pop(j), oks.pop(j)
