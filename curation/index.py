"""Index: FAISS over one embedder's vectors, and what the index answers.

    index/<embedder>/index.faiss   opens with plain faiss.read_index
    index/<embedder>/ids.parquet   row -> sample_id (the id map)
    index/<embedder>/meta.json     kind (flat | ivf | ivfpq), size, dim, the stamp of its inputs
    dups/<embedder>.parquet        near-duplicate clusters: one representative per cluster
                                   (candidate pairs from the embedding and from thumbnails,
                                   verified on the pixels: see curation/dup_verify.py), and
                                   `candidates_capped` where an image had more look-alikes than
                                   `dup_max_neighbors`
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
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import ValidationInfo, field_validator
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from . import dup_verify
from .errors import WebdistillError, would_overwrite
from .schemas import SAMPLES
from .stage_config import Real, stage_config
from .workspace import Workspace, atomic_path, check_name, config_hash, read_parquet_metadata, write_parquet_atomic

INDEX_VERSION = 1


DUPS_VERSION = 3
VERIFY_MODES = ("pixels", "none")


class IndexMissing(WebdistillError):
    """No embeddings to index, or no index to query."""


class BadIndexConfig(WebdistillError):
    """An index setting out of its range."""


@stage_config(BadIndexConfig)
class IndexConfig:
    ivf_threshold: int = 100_000  # exact search below this many vectors
    nlist: int | None = None  # IVF lists; default about 4 * sqrt(n)
    pq_m: int = 0  # > 0: IVF-PQ with this many sub-quantizers (memory / speed for recall)
    nprobe: int = 32
    train_size: int = 200_000
    dup_threshold: Real = 0.95  # cosine similarity at or above which two samples are near-duplicate candidates
    # per image, at most this many embedding neighbours at or above dup_threshold are candidates: a pool
    # of look-alikes then costs n * dup_max_neighbors pairs, not n^2 (images that hit the cap are counted)
    dup_max_neighbors: int = 32
    # "pixels": a candidate pair joins a cluster only if one image is a crop/resize/re-encode of the other
    # on the pixels (curation/dup_verify.py); "none": the embedding alone decides, as in DUPS_VERSION 1
    verify: str = "pixels"
    dup_neighbours: int = 4  # "pixels": per image, the k most similar candidates by embedding and k by thumbnail
    dup_max_residual: Real = dup_verify.MAX_RESIDUAL  # "pixels": aligned thumbnails' difference over their detail
    dup_max_crop: Real = dup_verify.MAX_CROP  # "pixels": share of each side a near-duplicate may have lost
    kmeans_k: int = 64
    seed: int = 0

    @field_validator("verify")
    @classmethod
    def _known_verify(cls, verify: str) -> str:
        if verify not in VERIFY_MODES:
            raise ValueError(f"verify must be one of {', '.join(VERIFY_MODES)}, not {verify!r}")
        return verify

    @field_validator("dup_max_neighbors", "dup_neighbours")
    @classmethod
    def _at_least_one(cls, value: int, info: ValidationInfo) -> int:
        if value < 1:
            raise ValueError(f"{info.field_name} must be at least 1, not {value}")
        return value

    @field_validator("dup_max_residual")
    @classmethod
    def _positive(cls, value: float) -> float:
        if not value > 0:
            raise ValueError(f"dup_max_residual must be positive, not {value}")
        return value

    @field_validator("dup_max_crop")
    @classmethod
    def _a_share_of_a_side(cls, value: float) -> float:
        if not 0 <= value < 0.25:
            raise ValueError(f"dup_max_crop is a share of each side in [0, 0.25), not {value}")
        return value

    def index_part(self) -> dict:
        return {k: getattr(self, k) for k in ("ivf_threshold", "nlist", "pq_m", "train_size", "seed")}

    def dups_part(self) -> dict:
        keys = ["dup_threshold", "dup_max_neighbors", "nprobe", "verify"]
        if self.verify == "pixels":
            keys += ["dup_neighbours", "dup_max_residual", "dup_max_crop",  # and the thumbnail index's settings:
                     "ivf_threshold", "nlist", "train_size", "seed"]
        return {k: getattr(self, k) for k in keys}


DEFAULT_CONFIG = IndexConfig()  # frozen: one shared default


def gpu_available() -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


@dataclass
class Vectors:
    x: np.ndarray  # (n, d) float32, L2-normalised
    sample_ids: np.ndarray  # (n,) object
    stamp: str  # changes whenever any shard's embeddings change


def load_vectors(ws: Workspace, embedder: str) -> Vectors:
    """Every shard's vectors for one embedder, in (shard, row) order."""
    folder = ws.owned("embeddings", embedder, what="embedder")
    id_maps = sorted(folder.glob("*.parquet")) if folder.is_dir() else []
    if not id_maps:
        raise IndexMissing(ws.no_embeddings(embedder))
    shapes, ids, stamps = [], [], []
    for m in id_maps:
        shapes.append(np.load(m.with_suffix(".npy"), mmap_mode="r").shape)  # reads the header only
        ids.append(pq.read_table(m, columns=["sample_id"]).column("sample_id").to_numpy(zero_copy_only=False))
        stamps.append([m.stem, read_parquet_metadata(m).get("stamp")])
    if len({s[1:] for s in shapes}) != 1 or len(shapes[0]) != 2:
        raise IndexMissing(f"the {embedder!r} embeddings of {ws.root} have mixed shapes; run `webdistill embed` again")
    # one float32 array filled a shard at a time: peak memory is the pool once plus one float16 shard
    x = np.empty((sum(s[0] for s in shapes), shapes[0][1]), np.float32)
    start = 0
    for m, (rows, _) in zip(id_maps, shapes):
        shard = np.load(m.with_suffix(".npy"))
        if shard.shape != (rows, x.shape[1]):
            raise IndexMissing(f"{m.with_suffix('.npy')} changed while it was read; run `webdistill index` again")
        x[start : start + rows] = shard
        start += rows
    return Vectors(x, np.concatenate(ids), config_hash({"shards": stamps}))


def _paths(ws: Workspace, embedder: str) -> dict[str, Path]:
    d = ws.owned("index", embedder, what="embedder")
    return {"index": d / "index.faiss", "ids": d / "ids.parquet", "meta": d / "meta.json"}


def make_index(x: np.ndarray, config: IndexConfig) -> tuple[faiss.Index, str]:
    """An empty index for vectors like x, trained if it is IVF: (index, kind)."""
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


def build_index(ws: Workspace, embedder: str, config: IndexConfig = DEFAULT_CONFIG) -> dict:
    """Build (or keep, if its inputs and config are unchanged) the embedder's index."""
    vec = load_vectors(ws, embedder)
    paths = _paths(ws, embedder)
    stamp = config_hash({"vectors": vec.stamp, "config": config.index_part(), "version": INDEX_VERSION})
    if paths["meta"].exists() and paths["index"].exists():
        meta = json.loads(paths["meta"].read_text())
        if meta.get("stamp") == stamp:
            return meta | {"skipped": True}
    start = time.perf_counter()
    index, kind = make_index(vec.x, config)
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


@dataclass
class NeighbourPairs:
    """Pairs (i < j, positions in the index) at or above a cosine threshold, each once."""
    i: np.ndarray
    j: np.ndarray
    sim: np.ndarray  # float32: the exact cosine of each pair
    capped: np.ndarray  # positions whose every one of their max_neighbors slots was above the threshold
    examined: int  # neighbour slots checked: at most (positions) * max_neighbors


def similar_pairs(index: faiss.Index, x: np.ndarray, threshold: float, max_neighbors: int = 32,
                  rows: np.ndarray | None = None, chunk: int = 4096) -> NeighbourPairs:
    """Each indexed vector's at most `max_neighbors` nearest others at cosine >= threshold.

    `rows`: the rows of x the index holds, in its order (None: all of x). The index proposes each
    vector's nearest (approximately, for IVF/PQ); the exact dot product on x decides. Memory grows
    with the index size times max_neighbors, never with the number of pairs above the threshold:
    a vector whose every slot was taken is in `capped`, as it may have more look-alikes."""
    rows = np.arange(len(x)) if rows is None else np.asarray(rows, np.int64)
    n, d = len(rows), x.shape[1]
    k = min(max_neighbors + 1, n)  # + 1: a vector finds itself
    block = max(1, (64 << 20) // (4 * k * d))  # rows whose k neighbour vectors are gathered at once: 64 MiB
    codes, sims, capped, examined = [np.zeros(0, np.int64)], [np.zeros(0, np.float32)], [np.zeros(0, np.int64)], 0
    for start in range(0, n, chunk):
        q = np.arange(start, min(start + chunk, n))
        _, found = index.search(x[rows[q]], k)
        valid = found >= 0
        exact = np.empty(found.shape, np.float32)
        for b in range(0, len(q), block):
            near = x[rows[np.where(valid[b : b + block], found[b : b + block], q[b : b + block, None])]]
            exact[b : b + block] = np.matmul(near, x[rows[q[b : b + block]], :, None])[..., 0]
        if k > max_neighbors:  # with fewer slots than the cap, every vector was seen: nothing was cut
            capped.append(q[(valid & (exact >= threshold)).all(axis=1)])
        other = valid & (found != q[:, None])
        other &= np.cumsum(other, axis=1) <= max_neighbors  # itself not among the k (ties): still at most the cap
        examined += int(other.sum())
        keep = other & (exact >= threshold)
        a, b = np.broadcast_to(q[:, None], found.shape)[keep], found[keep]
        codes.append(np.minimum(a, b) * n + np.maximum(a, b))
        sims.append(exact[keep])
    code, first = np.unique(np.concatenate(codes), return_index=True)
    return NeighbourPairs(code // n, code % n, np.concatenate(sims)[first], np.concatenate(capped), examined)


def _aligned_samples(ws: Workspace, ids: np.ndarray, columns: list[str]) -> pa.Table:
    """The samples table's columns for each index row, in index order (nulls where a sample is unknown);
    kept in Arrow, so a million rows cost tens of MB, not Python dicts."""
    files = sorted((ws.root / "samples").glob("*.parquet"))
    tables = [pq.read_table(f, columns=["sample_id", *columns]) for f in files]
    table = pa.concat_tables(tables) if tables else SAMPLES.empty_table().select(["sample_id", *columns])
    return table.take(pc.index_in(pa.array(ids, pa.string()), value_set=table["sample_id"]))


@dataclass
class _Images:
    """Index rows grouped by identical bytes (sha256): near-duplicate work is per image."""
    of_row: np.ndarray  # (rows,) the image of each row
    rep_row: np.ndarray  # (images,) each image's row with the smallest sample_id
    id_rank: np.ndarray  # (rows,) the rank of each row's sample_id


def _distinct_images(ids: np.ndarray, sha256: pa.ChunkedArray) -> _Images:
    id_rank = np.empty(len(ids), np.int64)
    id_rank[np.argsort(ids, kind="stable")] = np.arange(len(ids))
    codes = pc.fill_null(sha256.combine_chunks().dictionary_encode().indices, -1).to_numpy(zero_copy_only=False)
    codes = codes.astype(np.int64)
    unknown = codes < 0  # a row without a sample (or a sha256) is an image of its own
    codes[unknown] = codes.max(initial=-1) + 1 + np.arange(unknown.sum())
    order = np.lexsort((id_rank, codes))
    return _Images(codes, order[np.r_[True, np.diff(codes[order]) != 0]], id_rank)


def _image_pairs(index: faiss.Index, x: np.ndarray, images: _Images,
                 config: IndexConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """Embedding candidates between distinct images: (i < j, cosine, capped images, slots examined),
    at most `dup_max_neighbors` per image. Copies of one image would fill each other's neighbour
    slots, so where there are copies the index comes empty (see near_duplicates) and is filled with
    one vector per image."""
    n_images = len(images.rep_row)
    if index.ntotal == 0:
        for start in range(0, n_images, 65_536):
            index.add(x[images.rep_row[start : start + 65_536]])
        rows, image_of_slot = images.rep_row, np.arange(n_images)
    else:
        rows, image_of_slot = None, images.of_row
    found = similar_pairs(index, x, config.dup_threshold, config.dup_max_neighbors, rows=rows)
    a, b = image_of_slot[found.i], image_of_slot[found.j]
    capped = np.zeros(n_images, bool)
    capped[image_of_slot[found.capped]] = True
    return np.minimum(a, b), np.maximum(a, b), found.sim, capped, found.examined


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


def _thumbnail_pairs(thumbs: np.ndarray, rows: np.ndarray, config: IndexConfig, dims: int = 64,
                     chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Each of the images `thumbs[rows]` and its `dup_neighbours` nearest of them by blurred
    thumbnail, whole or centre (a crop's whole matches its original's centre), through the same FAISS
    path as the index; pairs of positions in `rows`. The thumbnails are read a chunk at a time where
    they lie: a copy of the selected ones would double the largest array of the pixel check."""
    n = len(rows)
    if n < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)

    def descriptors(positions: np.ndarray):
        """(offset, (whole, centre)) a chunk at a time: descriptors are float, only their projections
        stay; small chunks reuse the allocator's memory instead of faulting in fresh pages (slow here)."""
        for start in range(0, len(positions), chunk):
            yield start, dup_verify.descriptors(thumbs[rows[positions[start : start + chunk]]])

    # an uncentred SVD basis keeps inner products (so cosine search still means something) in fewer dims
    picked = np.random.default_rng(config.seed).choice(n, min(n, 20_000), replace=False)
    sample = np.concatenate([whole for _, (whole, _) in descriptors(picked)])
    # its right singular vectors, from the small Gram matrix: a full SVD also builds the sample's
    # (20,000 x 256) left vectors, 10x slower for nothing
    eigenvalues, eigenvectors = np.linalg.eigh(sample.T.astype(np.float64) @ sample)
    basis = np.ascontiguousarray(eigenvectors[:, np.argsort(eigenvalues)[::-1][:dims]], np.float32)
    whole, centre = (np.empty((n, basis.shape[1]), np.float32) for _ in range(2))
    for start, (w, c) in descriptors(np.arange(n)):
        whole[start : start + chunk], centre[start : start + chunk] = w @ basis, c @ basis
    faiss.normalize_L2(whole)
    faiss.normalize_L2(centre)
    index, _ = make_index(whole, replace(config, pq_m=0))  # 64 floats a row: no need to compress
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


def _pixel_labels(ei: np.ndarray, ej: np.ndarray, samples: pa.Table, images: _Images,
                  area: np.ndarray, config: IndexConfig, workers: int, progress: bool) -> tuple[np.ndarray, dict]:
    """The leader of every image, from candidate pairs verified on the pixels.

    Identical bytes are one image, so they always share a cluster, each image is decoded once, and
    no neighbour slot is spent on a copy. Candidates: the embedding pairs (ei, ej: each image's
    `dup_neighbours` most similar at cosine >= dup_threshold) and each image's nearest thumbnails.
    Clusters are stars around the largest image (see leader_clusters). Pairs are verified a chunk at a
    time (dup_verify)."""
    started = time.perf_counter()
    n_images, rep = len(images.rep_row), images.rep_row
    located = samples.select(["shard_url", "key", "ext"]).take(rep)  # columns as lists: no dict per image
    located = [(url, key, ext) if url else None
               for url, key, ext in zip(*(located[c].to_pylist() for c in ("shard_url", "key", "ext")))]
    thumbs, ok = dup_verify.load_thumbnails(located, workers=workers, progress=progress)
    del located
    read_done = time.perf_counter()
    readable = np.flatnonzero(ok)  # images that could not be read again are never verified
    ti, tj = _thumbnail_pairs(thumbs, readable, config)
    ci, cj = _unique_pairs(np.concatenate([ei, readable[ti]]), np.concatenate([ej, readable[tj]]), n_images)
    search_done = time.perf_counter()
    verified = dup_verify.verify_pairs(thumbs, ok, ci, cj, config.dup_max_residual, config.dup_max_crop,
                                       progress=progress)
    leader = leader_clusters(n_images, ci[verified], cj[verified], np.lexsort((images.id_rank[rep], -area[rep])))
    stats = {"pairs": int(verified.sum()), "candidates": int(len(ci)), "candidates_from_embedding": int(len(ei)),
             "unreadable": int((~ok).sum()), "read_seconds": round(read_done - started, 3),
             "thumbnail_search_seconds": round(search_done - read_done, 3),
             "verify_seconds": round(time.perf_counter() - search_done, 3)}
    return leader, stats


def near_duplicates(ws: Workspace, embedder: str, config: IndexConfig = DEFAULT_CONFIG, workers: int = 1,
                    progress: bool = False) -> dict:
    """Near-duplicate clusters, one row per sample; identical bytes always share a cluster.

    Candidates: each distinct image's at most `dup_max_neighbors` nearest images at cosine >=
    dup_threshold, so memory grows with the pool, never with the pairs above the threshold.
    verify="pixels": candidate pairs (embedding and thumbnails) confirmed on the pixels, clustered
    around the largest image; `workers` processes read the shards; `progress` shows bars for the
    reading and the pixel check (minutes on a large pool). verify="none": connected components of
    the embedding pairs."""
    index, ids, meta = open_index(ws, embedder, config.nprobe)
    out = ws.owned("dups", f"{embedder}.parquet", what="embedder")
    stamp = config_hash({"index": meta["stamp"], "dups": config.dups_part(), "version": DUPS_VERSION})
    if read_parquet_metadata(out).get("stamp") == stamp:
        return {"skipped": True, **read_parquet_metadata(out).get("summary", {})}
    start = time.perf_counter()
    columns = ["sha256", "width", "height"] + (["shard_url", "key", "ext"] if config.verify == "pixels" else [])
    samples = _aligned_samples(ws, ids, columns)
    images = _distinct_images(ids, samples["sha256"])
    stale = f"the {embedder!r} index is older than its embeddings; run `webdistill index` again"
    if index.ntotal != len(ids):
        raise IndexMissing(stale)
    if len(images.rep_row) < len(ids):  # copies: the search runs on one vector per image (_image_pairs);
        index.reset()  # emptied before the vectors are read, so the two are never in memory at once (the file stays)
    x = load_vectors(ws, embedder).x
    if len(x) != len(ids):
        raise IndexMissing(stale)
    ei, ej, sim, capped, examined = _image_pairs(index, x, images, config)
    embedding_pairs = len(ei)
    del index, x  # the pixel check below needs neither
    area = (pc.fill_null(samples["width"], 0).to_numpy().astype(np.int64)
            * pc.fill_null(samples["height"], 0).to_numpy().astype(np.int64))
    if config.verify == "pixels":
        keep = top_k_per_sample(ei, ej, sim, config.dup_neighbours)  # each image's best are verified,
        ei, ej, sim = ei[keep], ej[keep], None  # and the rest freed first (up to 32 an image: 640 MB at 10^6)
        image_label, stats = _pixel_labels(ei, ej, samples, images, area, config, workers, progress)
    else:
        graph = coo_matrix((np.ones(len(ei), np.int8), (ei, ej)), shape=(len(images.rep_row),) * 2)
        image_label, stats = connected_components(graph, directed=False)[1], {"pairs": int(len(ei))}
    labels = np.unique(image_label[images.of_row], return_inverse=True)[1]
    n, n_clusters = len(ids), int(labels.max(initial=-1)) + 1
    # representative: the largest image, then the smallest sample_id: deterministic across runs
    order = np.lexsort((images.id_rank, -area, labels))
    rep_of_row = order[np.r_[True, np.diff(labels[order]) != 0]][labels]
    table = pa.table({
        "embedder": pa.array([embedder] * n, pa.string()),
        "sample_id": pa.array(ids, pa.string()),
        "cluster_id": pa.array(ids[rep_of_row], pa.string()),
        "cluster_size": np.bincount(labels)[labels].astype(np.int32),
        "is_representative": rep_of_row == np.arange(n),
        "candidates_capped": capped[images.of_row],
    })
    summary = {"samples": n, "clusters": n_clusters, "duplicates": n - n_clusters, "threshold": config.dup_threshold,
               "verify": config.verify, "images": int(len(images.rep_row)), "embedding_pairs": int(embedding_pairs),
               "pairs_examined": examined, "max_neighbors": config.dup_max_neighbors,
               "capped_images": int(capped.sum()), **stats, "seconds": round(time.perf_counter() - start, 3)}
    write_parquet_atomic(table, out, {"stamp": stamp, "summary": summary})
    return {"skipped": False, **summary}


def kmeans_clusters(ws: Workspace, embedder: str, config: IndexConfig = DEFAULT_CONFIG) -> dict:
    """Spherical k-means over the embedder's vectors; every sample gets its cluster."""
    vec = load_vectors(ws, embedder)
    out = ws.owned("clusters", f"{embedder}.parquet", what="embedder")
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


def search(ws: Workspace, embedder: str, queries: np.ndarray, k: int = 10,
           nprobe: int = 32) -> list[list[tuple[str, float]]]:
    """The k nearest samples of each query vector: [(sample_id, cosine similarity), ...] per query."""
    index, ids, _ = open_index(ws, embedder, nprobe)
    k = max(1, min(k, index.ntotal))  # faiss allocates queries x k: never more than the index holds
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


def claim_knn_name(ws: Workspace, name: str, definition: dict, description: str, overwrite: bool = False) -> Path:
    """The score's file, once no kNN score of this name was made from another reference set, embedder
    or k (WouldOverwrite unless `overwrite`); the same definition is recomputed (a grown pool)."""
    out = ws.owned("knn_scores", check_name(name, "knn score name") + ".parquet", what="knn score name")
    stored = read_parquet_metadata(out)
    if not stored or overwrite:
        return out
    if "definition" in stored:
        old, new = stored["definition"], definition
    else:  # a score from before definitions were stored: its description says what the reference was
        old, new = {"reference": stored.get("description")}, {"reference": description}
    changed = [f"{k} {old.get(k)!r} -> {v!r}" for k, v in new.items() if old.get(k) != v]
    if changed:
        raise would_overwrite(f"kNN score {name!r} exists, made from another reference set ({', '.join(changed)}; "
                              f"it was {stored.get('description')})")
    return out


def knn_score(ws: Workspace, embedder: str, name: str, reference: np.ndarray, k: int = 5,
              description: str = "", definition: dict | None = None, overwrite: bool = False) -> dict:
    """Mean cosine similarity of every sample to its k nearest reference vectors (higher = closer).
    `definition`: what the reference set is, by content (default: `description`); a score of this name
    with another definition is refused (WouldOverwrite) unless `overwrite`."""
    definition = json.loads(json.dumps(definition or {"embedder": embedder, "k": k, "reference": description}))
    out = claim_knn_name(ws, name, definition, description, overwrite)
    if len(reference) == 0:
        raise IndexMissing("the reference set is empty")
    vec = load_vectors(ws, embedder)
    ref = np.array(reference, dtype=np.float32)  # a copy: the caller's array is not normalised in place
    ref /= np.linalg.norm(ref, axis=1, keepdims=True).clip(1e-12)
    index = faiss.IndexFlatIP(ref.shape[1])
    index.add(ref)
    kk = max(1, min(k, len(ref)))
    score = np.empty(len(vec.x), np.float32)
    chunk = max(1, (64 << 20) // (12 * kk))  # queries x kk distances and labels: 64 MiB at a time, whatever k
    for start in range(0, len(vec.x), chunk):
        sims, _ = index.search(vec.x[start : start + chunk], kk)
        score[start : start + chunk] = sims.mean(axis=1)
    table = pa.table({"name": [name] * len(score), "embedder": [embedder] * len(score),
                      "sample_id": vec.sample_ids, "knn_sim": score})
    write_parquet_atomic(table, out,
                         {"k": kk, "reference_size": int(len(ref)), "description": description,
                          "definition": definition})
    return {"name": name, "samples": int(len(score)), "reference": int(len(ref)), "k": kk,
            "mean": float(score.mean())}
