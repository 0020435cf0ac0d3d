"""Index: FAISS over one embedder's vectors, and what the index answers.

    index/<embedder>/index.faiss   opens with plain faiss.read_index
    index/<embedder>/ids.parquet   row -> sample_id (the id map)
    index/<embedder>/meta.json     kind (flat | ivf | ivfpq), size, dim, the stamp of its inputs
    dups/<embedder>.parquet        near-duplicate clusters: one representative per cluster
    clusters/<embedder>.parquet    k-means cluster of every sample, for diversity-aware selection
    knn_scores/<name>.parquet      kNN similarity to a reference set (higher = closer)

Exact search (IndexFlatIP) below `ivf_threshold` vectors, IVF or IVF-PQ above it, trained on a
sample. On a machine with faiss-gpu and a GPU, training, adding and searching run on the GPU;
the files written are always CPU indexes.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from .errors import WebdistillError
from .workspace import Workspace, atomic_path, config_hash, read_parquet_metadata, write_parquet_atomic

INDEX_VERSION = 1


class IndexMissing(WebdistillError):
    """No embeddings to index, or no index to query."""


@dataclass(frozen=True)
class IndexConfig:
    ivf_threshold: int = 100_000  # exact search below this many vectors
    nlist: int | None = None  # IVF lists; default about 4 * sqrt(n)
    pq_m: int = 0  # > 0: IVF-PQ with this many sub-quantizers (memory / speed for recall)
    nprobe: int = 32
    train_size: int = 200_000
    dup_threshold: float = 0.95  # cosine similarity at or above which two samples are near-duplicates
    kmeans_k: int = 64
    seed: int = 0

    def index_part(self) -> dict:
        return {k: getattr(self, k) for k in ("ivf_threshold", "nlist", "pq_m", "train_size", "seed")}


def gpu_available() -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


@dataclass
class Vectors:
    x: np.ndarray  # (n, d) float32, L2-normalised
    sample_ids: np.ndarray  # (n,) object
    stamp: str  # changes whenever any shard's embeddings change


def load_vectors(ws: Workspace, embedder: str) -> Vectors:
    """Every shard's vectors for one embedder, in (shard, row) order."""
    folder = ws.root / "embeddings" / embedder
    id_maps = sorted(folder.glob("*.parquet")) if folder.is_dir() else []
    if not id_maps:
        raise IndexMissing(f"no embeddings for {embedder!r} in {ws.root}; run `webdistill embed` first")
    xs, ids, stamps = [], [], []
    for m in id_maps:
        xs.append(np.load(m.with_suffix(".npy")).astype(np.float32))
        ids.append(pq.read_table(m, columns=["sample_id"]).column("sample_id").to_numpy(zero_copy_only=False))
        stamps.append([m.stem, read_parquet_metadata(m).get("stamp")])
    return Vectors(np.ascontiguousarray(np.concatenate(xs)), np.concatenate(ids), config_hash({"shards": stamps}))


def _paths(ws: Workspace, embedder: str) -> dict[str, Path]:
    d = ws.root / "index" / embedder
    return {"index": d / "index.faiss", "ids": d / "ids.parquet", "meta": d / "meta.json"}


def _make_index(x: np.ndarray, config: IndexConfig) -> tuple[faiss.Index, str]:
    n, d = x.shape
    if n < config.ivf_threshold:
        return faiss.IndexFlatIP(d), "flat"
    nlist = config.nlist or int(max(16, min(65536, 4 * np.sqrt(n))))
    kind = f"IVF{nlist},PQ{config.pq_m}" if config.pq_m else f"IVF{nlist},Flat"
    index = faiss.index_factory(d, kind, faiss.METRIC_INNER_PRODUCT)
    rng = np.random.default_rng(config.seed)
    train = x[rng.choice(n, min(n, max(config.train_size, 40 * nlist)), replace=False)]
    if gpu_available():  # train on the GPU, keep a CPU index for the file
        gpu = faiss.index_cpu_to_all_gpus(index)
        gpu.train(train)
        index = faiss.index_gpu_to_cpu(gpu)
    else:
        index.train(train)
    return index, "ivfpq" if config.pq_m else "ivf"


def build_index(ws: Workspace, embedder: str, config: IndexConfig = IndexConfig()) -> dict:
    """Build (or keep, if its inputs and config are unchanged) the embedder's index."""
    vec = load_vectors(ws, embedder)
    paths = _paths(ws, embedder)
    stamp = config_hash({"vectors": vec.stamp, "config": config.index_part(), "version": INDEX_VERSION})
    if paths["meta"].exists() and paths["index"].exists():
        meta = json.loads(paths["meta"].read_text())
        if meta.get("stamp") == stamp:
            return meta | {"skipped": True}
    start = time.perf_counter()
    index, kind = _make_index(vec.x, config)
    index.add(vec.x)
    with atomic_path(paths["index"]) as tmp:
        faiss.write_index(index, str(tmp))
    write_parquet_atomic(pa.table({"row": np.arange(len(vec.sample_ids), dtype=np.int64), "sample_id": vec.sample_ids}),
                         paths["ids"], {"stamp": stamp})
    meta = {"embedder": embedder, "kind": kind, "size": int(index.ntotal), "dim": int(vec.x.shape[1]), "stamp": stamp,
            "vectors_stamp": vec.stamp, "config": asdict(config), "seconds": round(time.perf_counter() - start, 3),
            "gpu": gpu_available()}
    with atomic_path(paths["meta"]) as tmp:
        tmp.write_text(json.dumps(meta, indent=2))
    return meta | {"skipped": False}


def open_index(ws: Workspace, embedder: str, nprobe: int = 32) -> tuple[faiss.Index, np.ndarray, dict]:
    paths = _paths(ws, embedder)
    if not paths["index"].exists():
        raise IndexMissing(f"no index for {embedder!r}; run `webdistill index --embedder ...` first")
    index = faiss.read_index(str(paths["index"]))
    if hasattr(index, "nprobe") or isinstance(index, faiss.IndexIVF):
        faiss.extract_index_ivf(index).nprobe = nprobe
    ids = pq.read_table(paths["ids"]).column("sample_id").to_numpy(zero_copy_only=False)
    return index, ids, json.loads(paths["meta"].read_text())


def similar_pairs(index: faiss.Index, x: np.ndarray, threshold: float, chunk: int = 16_384) -> tuple[np.ndarray, np.ndarray]:
    """All pairs (i < j) with cosine similarity >= threshold. The index proposes candidates
    (approximately, for IVF/PQ); the exact dot product on the stored vectors decides."""
    rows, cols = [], []
    probe = threshold - 0.05 if not isinstance(index, faiss.IndexFlat) else threshold  # PQ distances are rough
    for start in range(0, len(x), chunk):
        q = x[start : start + chunk]
        lims, _, found = index.range_search(q, probe)
        qi = np.repeat(np.arange(start, start + len(q)), np.diff(lims).astype(np.int64))
        keep = found > qi
        qi, found = qi[keep], found[keep]
        exact = np.einsum("ij,ij->i", x[qi], x[found])
        ok = exact >= threshold
        rows.append(qi[ok])
        cols.append(found[ok])
    return np.concatenate(rows), np.concatenate(cols)


def _samples_table(ws: Workspace) -> pa.Table:
    files = sorted((ws.root / "samples").glob("*.parquet"))
    return pa.concat_tables([pq.read_table(f, columns=["sample_id", "sha256", "width", "height"]) for f in files])


def near_duplicates(ws: Workspace, embedder: str, config: IndexConfig = IndexConfig()) -> dict:
    """Connected components of the similarity graph (plus identical bytes): one row per sample."""
    index, ids, meta = open_index(ws, embedder, config.nprobe)
    out = ws.root / "dups" / f"{embedder}.parquet"
    stamp = config_hash({"index": meta["stamp"], "threshold": config.dup_threshold, "nprobe": config.nprobe})
    if read_parquet_metadata(out).get("stamp") == stamp:
        return {"skipped": True, **read_parquet_metadata(out).get("summary", {})}
    start = time.perf_counter()
    vec = load_vectors(ws, embedder)
    i, j = similar_pairs(index, vec.x, config.dup_threshold)
    # identical bytes are always one cluster, whatever the embedding says
    row_of = {sid: r for r, sid in enumerate(ids)}
    samples = _samples_table(ws).to_pylist()
    by_hash: dict[str, list[int]] = {}
    area: dict[str, int] = {}
    for s in samples:
        area[s["sample_id"]] = (s["width"] or 0) * (s["height"] or 0)
        if s["sample_id"] in row_of:
            by_hash.setdefault(s["sha256"], []).append(row_of[s["sample_id"]])
    same = [(g[0], other) for g in by_hash.values() if len(g) > 1 for other in g[1:]]
    if same:
        si, sj = np.array(same).T
        i, j = np.concatenate([i, si]), np.concatenate([j, sj])
    n = len(ids)
    graph = coo_matrix((np.ones(len(i), np.int8), (i, j)), shape=(n, n))
    n_comp, labels = connected_components(graph, directed=False)
    # representative: the largest image, then the smallest sample_id: deterministic across runs
    order = sorted(range(n), key=lambda r: (labels[r], -area.get(ids[r], 0), ids[r]))
    rep_of_label: dict[int, str] = {}
    for r in order:
        rep_of_label.setdefault(int(labels[r]), ids[r])
    sizes = np.bincount(labels)
    table = pa.table({
        "embedder": [embedder] * n,
        "sample_id": ids,
        "cluster_id": [rep_of_label[int(l)] for l in labels],
        "cluster_size": sizes[labels].astype(np.int32),
        "is_representative": [rep_of_label[int(labels[r])] == ids[r] for r in range(n)],
    })
    summary = {"samples": n, "clusters": int(n_comp), "duplicates": int(n - n_comp), "pairs": int(len(i)),
               "threshold": config.dup_threshold, "seconds": round(time.perf_counter() - start, 3)}
    write_parquet_atomic(table, out, {"stamp": stamp, "summary": summary})
    return {"skipped": False, **summary}


def kmeans_clusters(ws: Workspace, embedder: str, config: IndexConfig = IndexConfig()) -> dict:
    """Spherical k-means over the embedder's vectors; every sample gets its cluster."""
    vec = load_vectors(ws, embedder)
    out = ws.root / "clusters" / f"{embedder}.parquet"
    k = int(min(config.kmeans_k, max(1, len(vec.x) // 39)))  # faiss wants >= 39 points per centroid
    stamp = config_hash({"vectors": vec.stamp, "k": k, "seed": config.seed})
    if read_parquet_metadata(out).get("stamp") == stamp:
        return {"skipped": True, "k": k}
    km = faiss.Kmeans(vec.x.shape[1], k, niter=25, seed=config.seed, spherical=True, gpu=gpu_available(),
                      max_points_per_centroid=512)
    km.train(vec.x)
    sim, label = km.index.search(vec.x, 1)
    table = pa.table({"embedder": [embedder] * len(vec.x), "sample_id": vec.sample_ids,
                      "cluster": label[:, 0].astype(np.int32), "centroid_sim": sim[:, 0].astype(np.float32)})
    write_parquet_atomic(table, out, {"stamp": stamp, "k": k})
    with atomic_path(out.with_suffix(".centroids.npy")) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, km.centroids)
    return {"skipped": False, "k": k, "sizes": np.bincount(label[:, 0], minlength=k).tolist()}


def search(ws: Workspace, embedder: str, queries: np.ndarray, k: int = 10, nprobe: int = 32) -> list[list[tuple[str, float]]]:
    """The k nearest samples of each query vector: [(sample_id, cosine similarity), ...] per query."""
    index, ids, _ = open_index(ws, embedder, nprobe)
    sims, rows = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    return [[(ids[r], float(s)) for r, s in zip(rr, ss) if r >= 0] for rr, ss in zip(rows, sims)]


def vectors_of(ws: Workspace, embedder: str, sample_ids: list[str]) -> np.ndarray:
    """The stored vectors of the given samples (in the given order)."""
    vec = load_vectors(ws, embedder)
    row = {sid: r for r, sid in enumerate(vec.sample_ids)}
    missing = [s for s in sample_ids if s not in row]
    if missing:
        raise IndexMissing(f"{len(missing)} sample_id(s) have no {embedder} embedding, e.g. {missing[0]}")
    return vec.x[[row[s] for s in sample_ids]]


def knn_score(ws: Workspace, embedder: str, name: str, reference: np.ndarray, k: int = 5,
              description: str = "") -> dict:
    """Mean cosine similarity of every sample to its k nearest reference vectors (higher = closer)."""
    if len(reference) == 0:
        raise IndexMissing("the reference set is empty")
    vec = load_vectors(ws, embedder)
    ref = np.ascontiguousarray(reference, dtype=np.float32)
    ref /= np.linalg.norm(ref, axis=1, keepdims=True).clip(1e-12)
    index = faiss.IndexFlatIP(ref.shape[1])
    index.add(ref)
    kk = min(k, len(ref))
    sims, _ = index.search(vec.x, kk)
    score = sims.mean(axis=1).astype(np.float32)
    table = pa.table({"name": [name] * len(score), "embedder": [embedder] * len(score),
                      "sample_id": vec.sample_ids, "knn_sim": score})
    write_parquet_atomic(table, ws.root / "knn_scores" / f"{name}.parquet",
                         {"k": kk, "reference_size": int(len(ref)), "description": description})
    return {"name": name, "samples": int(len(score)), "reference": int(len(ref)), "k": kk,
            "mean": float(score.mean())}
