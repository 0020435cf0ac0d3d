"""Near-duplicate detection over 1,000,000 vectors: build and query seconds, and recall vs exact search.

    python bench/dedup_1m.py [--n 1000000] [--dim 64] [--dups 10000] [--threshold 0.95]

The vectors are clustered (a mixture of 2,000 Gaussians on the sphere, so the IVF lists are
realistic), plus planted near-duplicates: a copy of a random vector with small noise. The
index path is the one `webdistill index` takes above its threshold (IVF, exact re-check of
candidates); recall is measured against the planted pairs, and against exact search
(IndexFlatIP) on a random subset of queries. Prints JSON, then a markdown table.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from curation.index import IndexConfig, make_index, similar_pairs  # noqa: E402


def make_vectors(n: int, dim: int, n_dups: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((2000, dim)).astype(np.float32)
    noise = 0.6 * rng.standard_normal((n - n_dups, dim)).astype(np.float32)
    base = centers[rng.integers(0, len(centers), n - n_dups)] + noise
    originals = rng.choice(n - n_dups, n_dups, replace=False)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    copies = base[originals] + 0.02 * rng.standard_normal((n_dups, dim)).astype(np.float32)
    copies /= np.linalg.norm(copies, axis=1, keepdims=True)
    x = np.ascontiguousarray(np.concatenate([base, copies]))
    planted = np.stack([originals, np.arange(n - n_dups, n)], axis=1)
    return x, planted


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--dups", type=int, default=10_000)
    ap.add_argument("--threshold", type=float, default=0.95)
    ap.add_argument("--nprobe", type=int, default=16)
    ap.add_argument("--exact-queries", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    x, planted = make_vectors(args.n, args.dim, args.dups, args.seed)
    config = IndexConfig(ivf_threshold=1, dup_threshold=args.threshold, nprobe=args.nprobe, seed=args.seed)
    start = time.perf_counter()
    index, kind = make_index(x, config)
    index.add(x)
    build_s = time.perf_counter() - start
    faiss.extract_index_ivf(index).nprobe = args.nprobe
    start = time.perf_counter()
    pairs = similar_pairs(index, x, args.threshold, config.dup_max_neighbors)
    query_s = time.perf_counter() - start

    found = set(zip(pairs.i.tolist(), pairs.j.tolist()))
    planted_found = sum((min(a, b), max(a, b)) in found for a, b in planted)
    # exact search on a subset of queries: every pair above the threshold it finds, did IVF find it?
    rng = np.random.default_rng(args.seed + 1)
    queries = rng.choice(args.n, args.exact_queries, replace=False)
    flat = faiss.IndexFlatIP(args.dim)
    flat.add(x)
    lims, sims, rows = flat.range_search(x[queries], args.threshold)
    exact_pairs = {(min(q, int(r)), max(q, int(r))) for k, q in enumerate(queries)
                   for r in rows[lims[k]:lims[k + 1]] if int(r) != q}
    result = {
        "n": args.n, "dim": args.dim, "index": kind, "nlist": faiss.extract_index_ivf(index).nlist,
        "nprobe": args.nprobe, "threshold": args.threshold, "threads": faiss.omp_get_max_threads(),
        "build_seconds": round(build_s, 2), "query_seconds": round(query_s, 2),
        "pairs_found": len(found), "planted_pairs": len(planted), "capped_vectors": len(pairs.capped),
        "recall_planted": round(planted_found / len(planted), 4),
        "exact_pairs_in_subset": len(exact_pairs),
        "recall_vs_exact_subset": round(sum(p in found for p in exact_pairs) / max(len(exact_pairs), 1), 4),
    }
    print(json.dumps(result, indent=2))
    print()
    print("| vectors | index | build s | all-pairs query s | recall (planted) | recall vs exact (subset) |")
    print("|---:|---|---:|---:|---:|---:|")
    print(f"| {args.n:,} x {args.dim} | {kind} nlist={result['nlist']} nprobe={args.nprobe} | "
          f"{result['build_seconds']} | {result['query_seconds']} | {result['recall_planted']} | "
          f"{result['recall_vs_exact_subset']} |")


if __name__ == "__main__":
    main()
