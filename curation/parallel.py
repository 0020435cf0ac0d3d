"""Running a per-shard function over many shards, in processes, with a progress bar.

One failing shard never stops the others: its exception comes back as its result. A worker
process that dies (SIGKILL, out of memory, a crashed library) breaks its pool; the shards that
were running then are retried in fresh pools, alone, so a shard that kills its worker every time
is reported (`WorkerDied`) and the rest goes on. Workers die with the process that started them.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import TypeVar

from .errors import WorkerDied
from .progress import bar_disabled

T = TypeVar("T")
R = TypeVar("R")


def die_with_parent(parent: int | None = None) -> None:
    """Linux: SIGKILL this process when its parent dies, so no orphan goes on committing work.
    Elsewhere a no-op (a child still ends when its pipes close)."""
    parent = os.getppid() if parent is None else parent
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def map_shards(
    fn: Callable[[T], R],
    items: Iterable[T],
    workers: int = 1,
    desc: str = "shards",
    progress: bool = True,
    retries: int = 2,
) -> Iterator[tuple[T, R | BaseException]]:
    """Yield (item, result or exception) as each item finishes. An item whose worker died runs
    again, alone in a fresh pool, until its worker has died `retries` + 1 times."""
    from tqdm import tqdm  # here: the decode sandbox imports this module and needs no progress bar

    items = list(items)
    bar = tqdm(total=len(items), desc=desc, unit="shard", disable=bar_disabled(progress))
    try:
        if workers <= 1 or len(items) <= 1:
            for item in items:
                try:
                    result: R | BaseException = fn(item)
                except Exception as exc:  # noqa: BLE001 - reported per shard, never swallowed
                    result = exc
                bar.update()
                yield item, result
            return
        queue, suspects, deaths = deque(range(len(items))), deque(), [0] * len(items)
        while queue or suspects:
            alone = bool(suspects)  # then a death is the suspect's own
            batch = deque([suspects.popleft()]) if alone else queue
            died = yield from _run_pool(fn, items, batch, 1 if alone else workers, bar)
            for idx in died:
                deaths[idx] += 1
                if deaths[idx] <= retries:
                    suspects.append(idx)
                    continue
                bar.update()
                yield items[idx], WorkerDied(f"its worker process died on each of {deaths[idx]} tries "
                                             "(killed, out of memory or crashed)")
    finally:
        bar.close()


def _run_pool(fn, items: list, queue: deque, workers: int, bar) -> Generator[tuple, None, list[int]]:
    """Run queued items in one fresh pool, at most `workers` at a time (so a dead worker's
    companions are known), until the queue is empty or the pool breaks; returns the items that
    were running when it broke. Items never started stay queued."""
    # spawn: forking a process that holds DuckDB or torch threads can deadlock.
    with ProcessPoolExecutor(max_workers=min(workers, len(queue)), mp_context=mp.get_context("spawn"),
                             initializer=die_with_parent, initargs=(os.getpid(),)) as pool:
        running: dict = {}
        while queue or running:
            while queue and len(running) < workers:
                idx = queue.popleft()
                running[pool.submit(fn, items[idx])] = idx
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            if any(isinstance(f.exception(), BrokenProcessPool) for f in done):
                wait(running)  # a broken pool fails every future it holds
                died = []
                for fut, idx in running.items():
                    if isinstance(fut.exception(), BrokenProcessPool):
                        died.append(idx)
                    else:
                        bar.update()
                        yield items[idx], fut.exception() or fut.result()
                return died
            for fut in done:
                idx = running.pop(fut)
                bar.update()
                yield items[idx], fut.exception() or fut.result()
    return []
