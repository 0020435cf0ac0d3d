"""Reading a curated selection for training: the manifest, and a WebDataset pipeline per rank and epoch.

Every rank runs exactly `steps` batches per epoch, whatever the number and sizes of the shards
(fewer shards than ranks x workers included), so ranks stay in step and no rank waits on an
empty split. How:

- Each epoch has an endless shard stream Q = perm_0 + perm_1 + ..., where perm_c is a permutation of
  the manifest's shards seeded by (seed, epoch, c). Like `wds.split_by_node` + `wds.split_by_worker`
  (an islice of the stream), DataLoader worker w of rank r reads Q[s], Q[s + S], Q[s + 2S], ... with
  slot s = r * W + w of S = world * W slots. The stream never runs dry, so the slicing works with one
  shard as well as with thousands; with fewer shards than slots, slots read the same shard in
  differently shuffled orders, and in the long run every sample is drawn equally often.
- Each slot shuffles its samples in a buffer seeded by (seed, epoch, slot), decodes them and batches
  them in the worker; the DataLoader takes the workers' batches round-robin, and the epoch stops
  after `steps` batches. The data order is thus a function of (seed, epoch, rank) and the config.
- Resuming after k batches skips them before decoding: the worker that must deliver batch k comes
  first (physical worker w plays slot role (w + k) % W) and each role drops the raw samples of its
  batches below k. The resumed epoch yields batches k, k+1, ... exactly as the uninterrupted one.

The pipeline is the same for a laptop and a cluster. A manifest is data (a selection from elsewhere
included): its shards are files in its own folder, so the pipeline only ever opens local files and never
runs a command read from a file. `--eval` shards, typed by the user, may be paths, fsspec URLs or pipe:.
"""
from __future__ import annotations

import functools
import io
import json
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from curation.errors import WebdistillError

from .preprocess import image_to_tensor

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
LOGIT_KEYS = ("logits.npy", "teacher.npy")


class DataError(WebdistillError, ValueError):
    """A selection's manifest or shards cannot be trained on (missing, malformed, lacking logits)."""


@dataclass(frozen=True)
class ShardEntry:
    url: str
    count: int


@dataclass(frozen=True)
class Manifest:
    path: str
    name: str
    total: int
    num_classes: int
    classes: list[str]
    shards: list[ShardEntry]
    teacher: str | None = None
    input_size: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None


@dataclass(frozen=True)
class Preprocess:
    """What `image_to_tensor` needs: the teacher's input size and normalisation."""
    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __call__(self, im: Image.Image) -> torch.Tensor:
        return image_to_tensor(im, self.size, self.mean, self.std)


def load_manifest(path: str | Path) -> Manifest:
    """A selection's manifest.json, with shard paths made absolute (they are files in its folder)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no selection manifest at {path}")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is not valid JSON: {exc}") from exc
    for key in ("total", "num_classes", "shards"):
        if key not in raw:
            raise DataError(f"manifest {path} has no {key!r}")
    shards = []
    for entry in raw["shards"]:
        if not isinstance(entry, dict) or "path" not in entry:
            raise DataError(f"manifest {path}: each shard needs a 'path', got {entry!r}")
        url = manifest_shard(path, entry["path"])
        if int(entry.get("count", 1)) > 0:  # an empty shard would only slow the endless stream down
            shards.append(ShardEntry(url, int(entry.get("count", 1))))
    if not shards or int(raw["total"]) <= 0:
        raise DataError(f"selection {path} is empty: no samples to train on")
    num_classes = int(raw["num_classes"])
    classes = [str(c) for c in raw.get("classes") or range(num_classes)]
    size = raw.get("input_size")
    return Manifest(str(path), str(raw.get("name") or path.parent.name), int(raw["total"]), num_classes, classes,
                    shards, raw.get("teacher"), int(size) if size else None,
                    tuple(raw["mean"]) if raw.get("mean") else None, tuple(raw["std"]) if raw.get("std") else None)


def manifest_shard(manifest: Path, listed: object) -> str:
    """The absolute path of a shard a manifest lists: a file in the manifest's folder (select writes
    plain file names). A command (`pipe:...`), a URL, an absolute path or a path that leaves the folder
    (`../`, a symlink) is refused with one line: WebDataset's opener would run or fetch it."""
    folder = manifest.parent.resolve()
    if not isinstance(listed, str) or not listed or ":" in listed or "\0" in listed or Path(listed).is_absolute():
        raise DataError(f"manifest {manifest}: shard path {str(listed)[:200]!r} refused: a selection lists files in "
                        "its own folder, never a command, a URL or an absolute path")
    target = (folder / listed).resolve()
    if not target.is_relative_to(folder):
        raise DataError(f"manifest {manifest}: shard path {listed[:200]!r} leaves the selection's folder {folder}")
    return str(target)


def decode_sample(sample: dict, prep: Preprocess, num_classes: int,
                  need_logits: bool) -> tuple[torch.Tensor, torch.Tensor, float, int]:
    """A curated sample -> (image, teacher logits float32 (C,) or (0,), weight, pseudo-label or -1)."""
    where = f"{sample.get('__url__', '?')}: sample {sample.get('__key__', '?')}"
    image_key = next((k for k in IMAGE_KEYS if k in sample), None)
    if image_key is None:
        raise DataError(f"{where} has no image ({', '.join(IMAGE_KEYS)})")
    try:
        image = prep(Image.open(io.BytesIO(sample[image_key])))
    except (OSError, ValueError, Image.DecompressionBombError) as exc:  # PIL's errors for bytes it cannot read
        why = "not an image format PIL reads" if isinstance(exc, UnidentifiedImageError) else str(exc)
        raise DataError(f"{where}: cannot decode its {image_key}: {why}") from exc
    logits = torch.empty(0)
    if need_logits:
        logit_key = next((k for k in LOGIT_KEYS if k in sample), None)
        if logit_key is None:
            raise DataError(f"{where} has no logits.npy: a stored-teacher run needs the teacher's logits in the "
                            "shards (select with logits, or use teacher_mode: live)")
        logits = torch.from_numpy(np.load(io.BytesIO(sample[logit_key]), allow_pickle=False).astype(np.float32))
        if logits.shape != (num_classes,):
            raise DataError(f"{where}: logits.npy has shape {tuple(logits.shape)}, the manifest says "
                            f"{num_classes} classes")
    weight = float(json.loads(sample["json"]).get("weight", 1.0)) if "json" in sample else 1.0
    label = int(sample["cls"]) if "cls" in sample else -1
    return image, logits, weight, label


def collate(samples: list[tuple]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    images, logits, weights, labels = zip(*samples)
    return (torch.stack(images), torch.stack(logits), torch.tensor(weights, dtype=torch.float32),
            torch.tensor(labels, dtype=torch.int64))


def check_shards(manifest: Manifest, prep: Preprocess, need_logits: bool) -> None:
    """Fail early, with one line, on a shard that is missing or whose first sample cannot be trained on
    (a manifest's shards are local files: `manifest_shard`)."""
    for shard in manifest.shards:
        if not Path(shard.url).is_file():
            raise DataError(f"shard listed in {manifest.path} not found: {shard.url}")
        try:
            first = next(wds.tarfile_to_samples()(iter([{"url": shard.url}])), None)
        except Exception as exc:  # noqa: BLE001 - tar/IO errors of every kind become one line
            raise DataError(f"cannot read shard {shard.url}: {exc}") from exc
        if first is None:
            raise DataError(f"shard {shard.url} is empty, but the manifest counts {shard.count} samples")
        decode_sample(first, prep, manifest.num_classes, need_logits)


def derive_seed(*parts: int) -> int:
    """A well-mixed 32-bit seed from a tuple such as (seed, epoch, slot)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def slot_shards(urls: list[str], seed: int, epoch: int, slot: int, slots: int) -> Iterator[dict]:
    """Shards of one slot: every `slots`-th entry, from `slot` on, of the epoch's endless shard stream."""
    n, pos, perm, perm_cycle = len(urls), slot, None, -1
    while True:
        cycle, i = divmod(pos, n)
        if cycle != perm_cycle:
            perm, perm_cycle = np.random.default_rng([seed, epoch, cycle]).permutation(n), cycle
        yield {"url": urls[perm[i]]}
        pos += slots


@dataclass(frozen=True)
class EpochPlan:
    """Who reads what in one epoch: a pure function of these fields."""
    seed: int
    epoch: int
    rank: int
    world: int
    steps: int
    batch_size: int
    shuffle_buffer: int = 1000


class EpochStream(IterableDataset):
    """One rank's endless stream of batches for one epoch (cut to `plan.steps` by `epoch_batches`)."""

    def __init__(self, urls: list[str], plan: EpochPlan, prep: Preprocess, num_classes: int,
                 need_logits: bool, skip_batches: int = 0):
        super().__init__()
        self.urls, self.plan, self.skip_batches = list(urls), plan, skip_batches
        self.decode = functools.partial(decode_sample, prep=prep, num_classes=num_classes, need_logits=need_logits)

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        p, k = self.plan, self.skip_batches
        role = (worker + k) % workers  # the role whose next batch is number k goes first (worker 0)
        skip_samples = (k - role + workers - 1) // workers * p.batch_size  # its batches numbered below k
        slot, slots = p.rank * workers + role, p.world * workers
        pipeline = wds.DataPipeline(
            functools.partial(slot_shards, self.urls, p.seed, p.epoch, slot, slots),
            wds.tarfile_to_samples(),
            wds.shuffle(p.shuffle_buffer, p.shuffle_buffer, rng=random.Random(derive_seed(p.seed, p.epoch, slot))),
            lambda src: islice(src, skip_samples, None),  # fast-forward on raw bytes: nothing decoded
            wds.map(self.decode),
            wds.batched(p.batch_size, collation_fn=collate, partial=False),
        )
        return iter(pipeline)


def start_worker_server() -> None:
    """Start the forkserver that DataLoader workers are forked from, once per rank, with SIGTERM ignored.

    Why a forkserver: a worker forked from the rank itself, which runs gloo's and OpenMP's threads
    and our launcher watch, can inherit a lock that one of them held at the fork and hang at its
    first step (seen: a worker in futex_wait right after fork(), the rank waiting on it forever).
    Why SIGTERM ignored (an ignored signal stays ignored across exec, so the server inherits it):
    torchrun stops a rank by signalling its process group, which holds the server; a server gone
    makes its workers stop (their ManagerWatchdog follows their parent), under a rank that is
    still checkpointing. The server exits by itself when the rank does (its pipe closes)."""
    import multiprocessing.forkserver
    import signal

    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        multiprocessing.forkserver.ensure_running()
    finally:
        signal.signal(signal.SIGTERM, previous)


def exit_with(pid: int) -> None:
    """End this process the moment process `pid` ends (a pidfd where Linux has one, else a 0.5 s poll)."""
    import select
    import threading
    import time

    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        os._exit(1)
    except (AttributeError, OSError):  # no pidfd (not Linux, or older than 5.3)
        fd = None

    def watch() -> None:
        if fd is not None:
            select.select([fd], [], [])
        else:
            while _alive(pid):
                time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name=f"exit-with-{pid}", daemon=True).start()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def start_worker(rank_pid: int, worker_id: int) -> None:
    """A DataLoader worker (from the forkserver) as if forked from its rank: SIGTERM back to its default,
    its own process group, and gone when its rank is. torchrun stops a rank by signalling its whole
    group (SIGTERM, then SIGKILL), and a worker killed under its rank makes the rank fail ("DataLoader
    worker ... is killed by signal") instead of checkpointing and stopping; the rank stops its
    workers itself. A worker's parent is the forkserver, so it follows the rank's pid instead."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.setpgid(0, 0)
    exit_with(rank_pid)


def epoch_batches(stream: EpochStream, workers: int, pin_memory: bool = False) -> Iterator[tuple]:
    """The epoch's remaining batches (steps - skipped), decoded by `workers` DataLoader processes,
    started from the forkserver (start_worker_server)."""
    loader = DataLoader(stream, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                        worker_init_fn=functools.partial(start_worker, os.getpid()) if workers else None,
                        multiprocessing_context="forkserver" if workers else None,
                        # its own generator: creating the loader must not draw from the global RNG
                        generator=torch.Generator().manual_seed(stream.plan.seed))
    it = iter(loader)
    try:
        for _ in range(stream.plan.steps - stream.skip_batches):
            yield next(it)
    finally:
        del it  # stops the workers, which would otherwise keep decoding the endless stream


def pool_batches(urls: list[str], prep: Preprocess, batch_size: int,
                 part: tuple[int, int] = (0, 1)) -> Iterator[torch.Tensor]:
    """The selection's images (B, 3, H, W), each sample once, in manifest order, no augmentation; with
    `part=(rank, world)` every world-th sample from the rank-th on (skipped before decoding). For
    methods that look at the whole pool each epoch (KD^3's thresholds)."""
    rank, world = part

    def image(sample: dict) -> torch.Tensor:
        return decode_sample(sample, prep, num_classes=0, need_logits=False)[0]

    return iter(wds.DataPipeline(
        wds.SimpleShardList(list(urls)),
        wds.tarfile_to_samples(),
        lambda src: islice(src, rank, None, world),
        wds.map(image),
        wds.batched(batch_size, collation_fn=torch.stack, partial=True),
    ))


def eval_batches(shards: str | list[str], prep: Preprocess, batch_size: int,
                 part: tuple[int, int] = (0, 1)) -> Iterator[tuple]:
    """(images, true labels) from a labelled WebDataset: an image (png/jpg/webp) + `cls` per sample.
    `part=(rank, world)`: every world-th sample from the rank-th on, skipped before decoding, so the
    ranks share the set whatever its number of shards."""
    rank, world = part
    return iter(
        # every rank reads the whole stream in order (no node splitting: WebDataset's default refuses
        # multi-node) and keeps its own samples
        wds.WebDataset(shards, shardshuffle=False, empty_check=False, nodesplitter=lambda src: src)
        .slice(rank, None, world)
        .decode("pil")
        .to_tuple("png;jpg;jpeg;webp", "cls")
        .map_tuple(prep, int)
        .batched(batch_size, collation_fn=lambda b: (torch.stack([x for x, _ in b]),
                                                     torch.tensor([y for _, y in b], dtype=torch.int64)))
    )
