"""The index stage on a pool of look-alikes: peak RSS and wall time at 10^4, 10^5 and 10^6 vectors.

    python bench/dedup_blowup.py [--sizes 10000 100000 1000000] [--dim 512] [--share 0.9] [--repeats 3 3 1]
    python bench/dedup_blowup.py --verify pixels --sizes 10000 100000 --repeats 1
    python bench/dedup_blowup.py --repro           # the shape of issue 11: 31,200 vectors of dim 1,152
    python bench/dedup_blowup.py --code DIR ...    # the same runs against another checkout's curation/

The pool: `share` of the vectors in one tight cluster (every pair at cosine ~0.98, above the 0.95
threshold: the embedder sees them all alike), the rest spread out (bench/dedup_1m.py's Gaussian
mixture), and `copies` of the rows exact copies of others (same sha256, same vector, as a web
crawl's placeholder images are). It is written in the real workspace layout (samples/*.parquet,
embeddings/<embedder>/<shard>.npy and id maps), then each run is a fresh subprocess doing what
`webdistill index` does (build_index, near_duplicates, kmeans_clusters) and reporting its peak RSS
(VmHWM) and each step's wall time.

verify="none" (the default) needs no images, so it reaches 10^6. verify="pixels" needs images:
the pool then also gets image shards, one distinct JPEG per vector (copies share the bytes), so the
pixel check reads, compares and rejects the look-alike candidates as it would on a real crawl.
Prints JSON, then a markdown table (medians, and min-max where there are several repeats).
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
EMBEDDER = "bench"
TIGHT = 0.15  # noise of the tight cluster around its centre: pairwise cosine ~ 1 / (1 + 0.15^2) = 0.978


def tight_pool(n: int, dim: int, share: float, copies: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(vectors (n, dim) float32 unit rows, source row of each row: itself, or the row it is a copy of)."""
    sys.path.insert(0, str(ROOT))
    from bench.dedup_1m import make_vectors

    x, _ = make_vectors(n, dim, 0, seed)
    rng = np.random.default_rng(seed + 1)
    m = int(share * n)
    centre = rng.standard_normal(dim).astype(np.float32)
    centre /= np.linalg.norm(centre)
    for start in range(0, m, 65_536):  # in blocks: the generator's temporaries stay small at 10^6
        stop = min(start + 65_536, m)
        x[start:stop] = centre + TIGHT * rng.standard_normal((stop - start, dim)).astype(np.float32) / np.sqrt(dim)
        x[start:stop] /= np.linalg.norm(x[start:stop], axis=1, keepdims=True)
    source = np.arange(n)
    n_copies = int(copies * n)
    copy_rows = rng.choice(n, n_copies, replace=False)
    originals = np.setdiff1d(np.arange(n), copy_rows)
    source[copy_rows] = rng.choice(originals, n_copies)
    x[copy_rows] = x[source[copy_rows]]
    return x, source


def _image(seed: int, width: int, height: int) -> bytes:
    """A distinct smooth image per seed (a 6x6 random field, upsampled): what one crawled photo is to another."""
    from PIL import Image

    field = np.random.default_rng(seed).integers(0, 256, (6, 6, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(field).resize((int(width), int(height)), Image.BICUBIC).save(buf, "JPEG", quality=85)
    return buf.getvalue()


def write_workspace(root: Path, x: np.ndarray, source: np.ndarray, shard_size: int = 100_000,
                    seed: int = 0, images: bool = False) -> Path:
    """samples/*.parquet and embeddings/<EMBEDDER>/* as ingest and embed write them; with `images`,
    the shards too (shards/*.tar: one distinct JPEG per source row, copies share the bytes), so that
    the pixel check has something to read. The vectors do not come from the images: the point is a
    pool that an embedder sees as alike while the pixels differ."""
    sys.path.insert(0, str(ROOT))
    import pyarrow as pa

    from curation.schemas import EMBEDDINGS, SAMPLES
    from curation.workspace import write_parquet_atomic

    rng = np.random.default_rng(seed + 2)
    sides = rng.integers(*((32, 96) if images else (64, 1024)), (len(x), 2)).astype(np.int32)
    sides[source != np.arange(len(x))] = sides[source[source != np.arange(len(x))]]  # copies: same image
    for s, start in enumerate(range(0, len(x), shard_size)):
        rows = np.arange(start, min(start + shard_size, len(x)))
        shard, n = f"{s:05d}", len(rows)
        ids = [hashlib.sha1(f"{shard}/{r}".encode()).hexdigest()[:24] for r in rows]
        keys = [f"{r:09d}" for r in rows]
        tar = root / "shards" / f"{shard}.tar"
        if images:
            import webdataset as wds

            tar.parent.mkdir(parents=True, exist_ok=True)
            made: dict[int, bytes] = {}
            sha = []
            with wds.TarWriter(str(tar)) as sink:
                for key, r in zip(keys, rows):
                    if source[r] not in made:
                        made[source[r]] = _image(seed + int(source[r]), *sides[r])
                    data = made[source[r]]
                    sink.write({"__key__": key, "jpg": data})
                    sha.append(hashlib.sha256(data).hexdigest())
        else:
            sha = [hashlib.sha256(str(source[r]).encode()).hexdigest() for r in rows]
        table = pa.table({
            "sample_id": ids, "shard": [shard] * n, "key": keys,
            "idx": np.arange(n, dtype=np.int32), "shard_url": [str(tar)] * n, "url": [None] * n,
            "caption": [None] * n, "sha256": sha, "width": sides[rows, 0], "height": sides[rows, 1],
            "format": ["jpeg"] * n, "ext": ["jpg"] * n, "mode": ["RGB"] * n,
            "bytes": np.full(n, 10_000, np.int64), "meta": [None] * n}, schema=SAMPLES)
        stamp = {"fingerprint": f"bench-{shard}", "config_hash": "bench"}
        write_parquet_atomic(table, root / "samples" / f"{shard}.parquet", stamp)
        folder = root / "embeddings" / EMBEDDER
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / f"{shard}.npy", x[rows].astype(np.float16))
        ids_table = pa.table({"embedder": [EMBEDDER] * n, "shard": [shard] * n, "row": np.arange(n, dtype=np.int32),
                              "sample_id": ids, "ok": np.ones(n, bool)}, schema=EMBEDDINGS)
        write_parquet_atomic(ids_table, folder / f"{shard}.parquet", {"stamp": stamp, "dim": x.shape[1]})
    return root


def peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(workspace: str, code: str | None, max_neighbors: int, verify: str) -> None:
    """One measured run of the index stage (in its own process)."""
    sys.path.insert(0, code or str(ROOT))
    from dataclasses import fields

    from curation.index import IndexConfig, build_index, kmeans_clusters, near_duplicates
    from curation.workspace import Workspace

    ws = Workspace(Path(workspace))
    known = {f.name for f in fields(IndexConfig)}  # an older checkout may lack the cap
    cap = {"dup_max_neighbors": max_neighbors} if "dup_max_neighbors" in known else {}
    config = IndexConfig(verify=verify, **cap)
    out: dict = {"rss_mib_at_start": round(peak_rss_mib())}
    try:
        t = time.perf_counter()
        meta = build_index(ws, EMBEDDER, config)
        out |= {"index": meta["kind"], "build_s": round(time.perf_counter() - t, 2),
                "rss_mib_after_build": round(peak_rss_mib())}
        t = time.perf_counter()
        dups = near_duplicates(ws, EMBEDDER, config, workers=2)
        out |= {"dups_s": round(time.perf_counter() - t, 2), "rss_mib_after_dups": round(peak_rss_mib())}
        out |= {k: dups.get(k) for k in ("images", "clusters", "embedding_pairs", "pairs_examined", "capped_images",
                                         "candidates", "pairs", "unreadable", "read_seconds", "verify_seconds")}
        t = time.perf_counter()
        kmeans_clusters(ws, EMBEDDER, config)
        out |= {"kmeans_s": round(time.perf_counter() - t, 2)}
    except MemoryError as exc:
        out["error"] = f"MemoryError: {exc}"
    used = resource.getrusage(resource.RUSAGE_SELF)
    out |= {"peak_rss_mib": round(peak_rss_mib()), "cpu_s": round(used.ru_utime + used.ru_stime, 1)}
    print(json.dumps(out))


def measure(workspace: Path, code: str | None, max_neighbors: int, verify: str, max_memory_gib: float) -> dict:
    """A fresh process per run; its address space is capped so that a blow-up fails instead of
    pushing a shared machine into the OOM killer."""
    limit = int(max_memory_gib * 2**30)

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    cmd = [sys.executable, __file__, "--child", str(workspace), "--max-neighbors", str(max_neighbors),
           "--verify", verify]
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", HF_HUB_OFFLINE="1")  # as the `webdistill` CLI runs
    started = time.perf_counter()
    res = subprocess.run(cmd + (["--code", code] if code else []), capture_output=True, text=True, preexec_fn=cap,
                         env=env)
    wall = round(time.perf_counter() - started, 2)
    if res.returncode != 0 or not res.stdout.strip():
        return {"error": (res.stderr.strip().splitlines() or [f"exit {res.returncode}"])[-1], "wall_s": wall}
    return json.loads(res.stdout.strip().splitlines()[-1]) | {"wall_s": wall}


def spread(values: list[float]) -> str:
    med = statistics.median(values)
    return f"{med:,.1f}" if len(values) == 1 else f"{med:,.1f} ({min(values):,.1f}-{max(values):,.1f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--repeats", type=int, nargs="+", default=[3, 3, 1], help="per size (the last repeats)")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--share", type=float, default=0.9, help="share of the pool in the tight cluster")
    ap.add_argument("--copies", type=float, default=0.05, help="share of the pool that are exact copies")
    ap.add_argument("--max-neighbors", type=int, default=32)
    ap.add_argument("--verify", choices=["none", "pixels"], default="none",
                    help="pixels: also write image shards (one distinct JPEG per vector) and check candidates on them")
    ap.add_argument("--max-memory-gib", type=float, default=12.0, help="address-space cap of each run")
    ap.add_argument("--repro", action="store_true",
                    help="issue 11's shape: 31,200 x 1,152, 5,100 of them alike (~13M pairs above the threshold)")
    ap.add_argument("--code", help="a checkout whose curation/ to measure instead of this one's")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.code, args.max_neighbors, args.verify)
    if args.repro:
        args.sizes, args.dim, args.share, args.repeats = [31_200], 1152, 5_100 / 31_200, [1]

    results = []
    for s, n in enumerate(args.sizes):
        repeats = args.repeats[min(s, len(args.repeats) - 1)]
        with tempfile.TemporaryDirectory(prefix="dedup-blowup-") as tmp:
            t = time.perf_counter()
            x, source = tight_pool(n, args.dim, args.share, args.copies, args.seed)
            write_workspace(Path(tmp), x, source, seed=args.seed, images=args.verify == "pixels")
            del x
            made_s = round(time.perf_counter() - t, 1)
            runs = []
            for _ in range(repeats):
                runs.append(measure(Path(tmp), args.code, args.max_neighbors, args.verify, args.max_memory_gib))
                for p in Path(tmp).glob("*"):  # keep the pool, drop what the run wrote: the next starts cold
                    if p.name not in ("samples", "embeddings", "shards"):
                        shutil.rmtree(p) if p.is_dir() else p.unlink()
        alike = int(args.share * n)
        results.append({"n": n, "dim": args.dim, "alike": alike,
                        "pairs_above_threshold_at_least": alike * (alike - 1) // 2,
                        "copies": int(args.copies * n), "pool_seconds": made_s, "runs": runs})
        print(json.dumps(results[-1]), file=sys.stderr, flush=True)

    print(json.dumps({"code": args.code or str(ROOT), "max_neighbors": args.max_neighbors, "share": args.share,
                      "verify": args.verify,
                      "results": results}, indent=2))
    print()
    print(f"verify={args.verify}, at most {args.max_neighbors} candidates per image\n")
    print("| vectors | alike pairs (>= 0.95) | index | pairs kept | images capped | index s | near-dup s | "
          "k-means s | wall s | CPU s | RSS after imports MiB | peak RSS MiB |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        ok = [run for run in r["runs"] if "error" not in run]
        head = f"| {r['n']:,} x {r['dim']} | {r['pairs_above_threshold_at_least']:,} |"
        if not ok:
            print(f"{head} failed: {r['runs'][0]['error'][:120]} | | | | | | | | | |")
            continue
        first = ok[0]
        count = lambda v: f"{v:,}" if isinstance(v, int) else "-"  # noqa: E731 (an older checkout lacks some)
        print(f"{head} {first['index']} | {count(first['embedding_pairs'])} | {count(first.get('capped_images'))} | "
              + " | ".join(spread([run[k] for run in ok]) for k in ("build_s", "dups_s", "kmeans_s", "wall_s", "cpu_s",
                                                                    "rss_mib_at_start", "peak_rss_mib"))
              + " |")


if __name__ == "__main__":
    main()
