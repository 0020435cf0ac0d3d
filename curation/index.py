"""Index: FAISS over one embedder's vectors, and what the index answers.

    index/<embedder>/index.faiss   opens with plain faiss.read_index
    index/<embedder>/ids.parquet   row -> sample_id (the id map)
    index/<embedder>/meta.json     kind (flat | ivf | ivfpq), size, dim, the stamp of its inputs
    dups/<embedder>.parquet        near-duplicate clusters: one representative per cluster
                                   (candidate pairs from the embedding and from thumbnails,
                                   verified on the pixels: see curation/dup_verify.py)
    clusters/<embedder>.parquet    k-means cluster of every sample, for diversity-aware selection
    knn_scores/<name>.parquet      kNN similarity to a reference set (higher = closer)

Exact search (IndexFlatIP) below `ivf_threshold` vectors, IVF or IVF-PQ above it, trained on a
sample. On a machine with faiss-gpu and a GPU, training, adding and searching run on the GPU;
the files written are always CPU indexes.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from . import dup_verify
from .errors import WebdistillError
from .workspace import Workspace, atomic_path, config_hash, read_parquet_metadata, write_parquet_atomic

INDEX_VERSION = 1


DUPS_VERSION = 2
VERIFY_MODES = ("pixels", "none")


class IndexMissing(WebdistillError):
    """No embeddings to index, or no index to query."""


class BadIndexConfig(WebdistillError):
    """An index setting out of its range."""


@dataclass(frozen=True)
class IndexConfig:
    ivf_threshold: int = 100_000  # exact search below this many vectors
    nlist: int | None = None  # IVF lists; default about 4 * sqrt(n)
    pq_m: int = 0  # > 0: IVF-PQ with this many sub-quantizers (memory / speed for recall)
    nprobe: int = 32
    train_size: int = 200_000
    dup_threshold: float = 0.95  # cosine similarity at or above which two samples are near-duplicate candidates
    # "pixels": a candidate pair joins a cluster only if one image is a crop/resize/re-encode of the other
    # on the pixels (curation/dup_verify.py); "none": the embedding alone decides, as in DUPS_VERSION 1
    verify: str = "pixels"
    dup_neighbours: int = 4  # "pixels": per image, the k most similar candidates by embedding and k by thumbnail
    dup_max_residual: float = dup_verify.MAX_RESIDUAL  # "pixels": aligned thumbnails' difference over their detail
    dup_max_crop: float = dup_verify.MAX_CROP  # "pixels": share of each side a near-duplicate may have lost
    kmeans_k: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        if self.verify not in VERIFY_MODES:
            raise BadIndexConfig(f"verify must be one of {', '.join(VERIFY_MODES)}, not {self.verify!r}")
        if self.dup_neighbours < 1:
            raise BadIndexConfig(f"dup_neighbours must be at least 1, not {self.dup_neighbours}")
        if not self.dup_max_residual > 0:
            raise BadIndexConfig(f"dup_max_residual must be positive, not {self.dup_max_residual}")
        if not 0 <= self.dup_max_crop < 0.25:
            raise BadIndexConfig(f"dup_max_crop is a share of each side in [0, 0.25), not {self.dup_max_crop}")

    def index_part(self) -> dict:
        return {k: getattr(self, k) for k in ("ivf_threshold", "nlist", "pq_m", "train_size", "seed")}

    def dups_part(self) -> dict:
        keys = ["dup_threshold", "nprobe", "verify"]
        if self.verify == "pixels":
            keys += ["dup_neighbours", "dup_max_residual", "dup_max_crop",  # and the thumbnail index's settings:
                     "ivf_threshold", "nlist", "train_size", "seed"]
        return {k: getattr(self, k) for k in keys}


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
    columns = ["sample_id", "sha256", "width", "height", "shard_url", "key", "ext"]
    return pa.concat_tables([pq.read_table(f, columns=columns) for f in files])


def _unique_pairs(i: np.ndarray, j: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Pairs as (smaller, larger), each once, self-pairs dropped."""
    a, b = np.minimum(i, j).astype(np.int64), np.maximum(i, j).astype(np.int64)
    codes = np.unique(a[a != b] * n + b[a != b])
    return codes // n, codes % n


def top_k_per_sample(i: np.ndarray, j: np.ndarray, score: np.ndarray, k: int) -> np.ndarray:
    """Mask of the pairs that are among the k highest-scoring pairs of either of their samples."""
    ends = np.concatenate([i, j])
    order = np.lexsort((-np.concatenate([score, score]), ends))
    first = np.searchsorted(ends[order], ends[order], side="left")
    rank = np.empty(len(ends), np.int64)
    rank[order] = np.arange(len(ends)) - first
    return (rank[: len(i)] < k) | (rank[len(i) :] < k)


def _thumbnail_pairs(thumbs: np.ndarray, config: IndexConfig, dims: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Each image and its `dup_neighbours` nearest images by blurred thumbnail, whole or centre
    (a crop's whole matches its original's centre), through the same FAISS path as the index."""
    whole, centre = dup_verify.descriptors(thumbs)
    n = len(whole)
    if n < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    # an uncentred SVD basis keeps inner products (so cosine search still means something) in fewer dims
    sample = whole[np.random.default_rng(config.seed).choice(n, min(n, 20_000), replace=False)]
    basis = np.linalg.svd(sample, full_matrices=False)[2][:dims].T
    whole, centre = (np.ascontiguousarray(v @ basis, dtype=np.float32) for v in (whole, centre))
    faiss.normalize_L2(whole)
    faiss.normalize_L2(centre)
    index, _ = _make_index(whole, replace(config, pq_m=0))  # 64 floats a row: no need to compress
    index.add(whole)
    if isinstance(index, faiss.IndexIVF):
        index.nprobe = config.nprobe
    k = min(config.dup_neighbours + 1, n)
    rows, cols = [], []
    for queries in (whole, centre):
        _, found = index.search(queries, k)
        rows.append(np.repeat(np.arange(n), k))
        cols.append(found.ravel())
    i, j = np.concatenate(rows), np.concatenate(cols)
    return _unique_pairs(i[j >= 0], j[j >= 0], n)


def leader_clusters(n: int, i: np.ndarray, j: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Star clustering of n nodes: in `order`, each node not yet taken leads a cluster of itself and
    its neighbours not yet taken. Returns each node's leader. Unlike connected components, every
    member is a neighbour of its leader, so a chain of overlapping crops A~B~C~... stays apart."""
    adj = coo_matrix((np.ones(2 * len(i), np.int8), (np.concatenate([i, j]), np.concatenate([j, i]))),
                     shape=(n, n)).tocsr()
    leader = np.full(n, -1, np.int64)
    for v in order:
        if leader[v] < 0:
            leader[v] = v
            around = adj.indices[adj.indptr[v] : adj.indptr[v + 1]]
            leader[around[leader[around] < 0]] = v
    return leader


def _pixel_labels(x: np.ndarray, samples: dict[str, dict], ids: np.ndarray, i: np.ndarray, j: np.ndarray,
                  config: IndexConfig, workers: int) -> tuple[np.ndarray, dict]:
    """Cluster label of every index row, from candidate pairs verified on the pixels.

    Work is per distinct image (sha256): identical bytes are one node, so they always share a
    cluster, each image is decoded once, and no neighbour slot is spent on a copy. Candidates: each
    image's `dup_neighbours` most similar embedding pairs (cosine >= dup_threshold) and nearest
    thumbnails. Clusters are stars around the largest image (see leader_clusters)."""
    started = time.perf_counter()
    digest = np.array([samples.get(sid, {}).get("sha256") or sid for sid in ids], dtype=object)
    image_of = np.unique(digest, return_inverse=True)[1]
    by_id = np.argsort(ids)
    rep_row = by_id[np.unique(image_of[by_id], return_index=True)[1]]  # each image's smallest sample_id
    n_images = len(rep_row)
    keep = top_k_per_sample(i, j, np.einsum("ij,ij->i", x[i], x[j]), config.dup_neighbours)
    ei, ej = _unique_pairs(image_of[i[keep]], image_of[j[keep]], n_images)
    located = [samples.get(ids[r]) for r in rep_row]
    thumbs, ok = dup_verify.load_thumbnails([(s["shard_url"], s["key"], s["ext"]) if s else None for s in located],
                                            workers=workers)
    read_done = time.perf_counter()
    readable = np.flatnonzero(ok)  # images that could not be read again are never verified
    ti, tj = _thumbnail_pairs(thumbs[readable], config)
    ci, cj = _unique_pairs(np.concatenate([ei, readable[ti]]), np.concatenate([ej, readable[tj]]), n_images)
    search_done = time.perf_counter()
    verified = dup_verify.verify_pairs(thumbs, ok, ci, cj, config.dup_max_residual, config.dup_max_crop)
    area = np.array([(s["width"] or 0) * (s["height"] or 0) if s else 0 for s in located])
    leader = leader_clusters(n_images, ci[verified], cj[verified], np.lexsort((ids[rep_row], -area)))
    stats = {"pairs": int(verified.sum()), "candidates": int(len(ci)), "candidates_from_embedding": int(len(ei)),
             "unreadable": int((~ok).sum()), "read_seconds": round(read_done - started, 3),
             "thumbnail_search_seconds": round(search_done - read_done, 3),
             "verify_seconds": round(time.perf_counter() - search_done, 3)}
    return leader[image_of], stats


def _component_labels(samples: dict[str, dict], ids: np.ndarray, i: np.ndarray,
                      j: np.ndarray) -> tuple[np.ndarray, dict]:
    """Connected components of the embedding pairs plus identical bytes (verify="none")."""
    by_hash: dict[str, list[int]] = {}
    for r, sid in enumerate(ids):
        if sid in samples:
            by_hash.setdefault(samples[sid]["sha256"], []).append(r)
    same = [(g[0], other) for g in by_hash.values() if len(g) > 1 for other in g[1:]]
    if same:
        si, sj = np.array(same).T
        i, j = np.concatenate([i, si]), np.concatenate([j, sj])
    graph = coo_matrix((np.ones(len(i), np.int8), (i, j)), shape=(len(ids), len(ids)))
    return connected_components(graph, directed=False)[1], {"pairs": int(len(i))}


def near_duplicates(ws: Workspace, embedder: str, config: IndexConfig = IndexConfig(), workers: int = 1) -> dict:
    """Near-duplicate clusters, one row per sample; identical bytes always share a cluster.

    verify="pixels": candidate pairs (embedding and thumbnails) confirmed on the pixels, clustered
    around the largest image; `workers` processes read the shards. verify="none": connected
    components of the embedding pairs at cosine >= dup_threshold."""
    index, ids, meta = open_index(ws, embedder, config.nprobe)
    out = ws.root / "dups" / f"{embedder}.parquet"
    stamp = config_hash({"index": meta["stamp"], "dups": config.dups_part(), "version": DUPS_VERSION})
    if read_parquet_metadata(out).get("stamp") == stamp:
        return {"skipped": True, **read_parquet_metadata(out).get("summary", {})}
    start = time.perf_counter()
    vec = load_vectors(ws, embedder)
    samples = {s["sample_id"]: s for s in _samples_table(ws).to_pylist()}
    i, j = similar_pairs(index, vec.x, config.dup_threshold)
    if config.verify == "pixels":
        raw_labels, stats = _pixel_labels(vec.x, samples, ids, i, j, config, workers)
    else:
        raw_labels, stats = _component_labels(samples, ids, i, j)
    labels = np.unique(raw_labels, return_inverse=True)[1]
    n, n_clusters = len(ids), len(np.unique(labels))
    # representative: the largest image, then the smallest sample_id: deterministic across runs
    area = {sid: (s["width"] or 0) * (s["height"] or 0) for sid, s in samples.items()}
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
    summary = {"samples": n, "clusters": n_clusters, "duplicates": n - n_clusters, "threshold": config.dup_threshold,
               "verify": config.verify, "embedding_pairs": int(len(i)), **stats,
               "seconds": round(time.perf_counter() - start, 3)}
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
