"""Running a per-shard function over many shards, in processes, with a progress bar.

One failing shard never stops the others: its exception comes back as its result.
"""
from __future__ import annotations

import multiprocessing as mp
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Callable, Iterable, Iterator, TypeVar

from tqdm import tqdm

T = TypeVar("T")
R = TypeVar("R")


def map_shards(
    fn: Callable[[T], R],
    items: Iterable[T],
    workers: int = 1,
    desc: str = "shards",
    progress: bool = True,
) -> Iterator[tuple[T, R | BaseException]]:
    """Yield (item, result or exception) as each item finishes."""
    items = list(items)
    bar = tqdm(total=len(items), desc=desc, unit="shard", disable=not progress or None)
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
        # spawn: forking a process that holds DuckDB or torch threads can deadlock.
        with ProcessPoolExecutor(max_workers=min(workers, len(items)), mp_context=mp.get_context("spawn")) as pool:
            futures = {pool.submit(fn, item): item for item in items}
            for fut in as_completed(futures):
                exc = fut.exception()
                bar.update()
                yield futures[fut], (exc if exc is not None else fut.result())
    finally:
        bar.close()
