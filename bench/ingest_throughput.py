"""Ingest throughput vs a bare loop that only reads the tar members, in one run.

    python bench/ingest_throughput.py [--crawl demo/crawl] [--repeats 3]

Both loops run in this process, one after the other, alternating `--repeats` times; the
medians are compared as a ratio, because these machines are shared and noisy. The
2-worker run shows how ingest scales over shards. Prints JSON, then a markdown table.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from curation.ingest import ingest  # noqa: E402
from curation.workspace import Workspace  # noqa: E402


def bare_read(shards: list[Path]) -> tuple[int, float]:
    """Read every member's bytes, nothing else: the floor any ingest pays."""
    start = time.perf_counter()
    keys = set()
    for shard in shards:
        try:
            with tarfile.open(shard, mode="r|*") as tar:
                for info in tar:
                    if info.isreg():
                        tar.extractfile(info).read()
                        keys.add((shard.name, info.name.split(".", 1)[0]))
        except tarfile.TarError:
            pass  # the demo's cut-off shard: read what is there, like ingest does
    return len(keys), time.perf_counter() - start


def timed_ingest(shards: list[Path], workers: int) -> tuple[int, float]:
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        summary = ingest(Workspace(Path(tmp)), [str(s) for s in shards], workers=workers, progress=False)
        seconds = time.perf_counter() - start
    return sum(r.n_read for r in summary.shards), seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--crawl", default="demo/crawl", help="a directory of shards (default: the demo crawl)")
    ap.add_argument("--size", type=int, default=6000, help="crawl size to build when --crawl does not exist")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--shards", type=int, default=None, help="use only the first N shards")
    args = ap.parse_args()

    crawl = Path(args.crawl)
    if not crawl.is_dir():
        from flows.demo.crawl import build_demo_crawl

        out = Path(tempfile.mkdtemp())
        build_demo_crawl(out, size=args.size, n_shards=8, progress=False)
        crawl = out / "crawl"
    shards = sorted(crawl.glob("*.tar"))[: args.shards]

    bare, single, double = [], [], []
    n = 0
    for _ in range(args.repeats):
        n, t = bare_read(shards)
        bare.append(n / t)
        m, t = timed_ingest(shards, workers=1)
        single.append(m / t)
    m2, t2 = timed_ingest(shards, workers=2)
    double.append(m2 / t2)

    result = {
        "crawl": str(crawl),
        "shards": len(shards),
        "samples": n,
        "bare_read_samples_per_s": round(statistics.median(bare), 1),
        "ingest_1_worker_samples_per_s": round(statistics.median(single), 1),
        "ingest_2_workers_samples_per_s": round(statistics.median(double), 1),
        "ratio_ingest_over_bare": round(statistics.median(single) / statistics.median(bare), 4),
        "speedup_2_workers": round(statistics.median(double) / statistics.median(single), 2),
        "repeats": args.repeats,
    }
    print(json.dumps(result, indent=2))
    print()
    print("| loop | samples/s |")
    print("|---|---:|")
    print(f"| bare tar read (1 process) | {result['bare_read_samples_per_s']:.0f} |")
    print(f"| ingest, full decode + hash + parquet (1 worker) | {result['ingest_1_worker_samples_per_s']:.0f} |")
    print(f"| ingest (2 workers) | {result['ingest_2_workers_samples_per_s']:.0f} |")
    print(f"| ratio ingest / bare | {result['ratio_ingest_over_bare']} |")


if __name__ == "__main__":
    main()
