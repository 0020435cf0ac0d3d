"""The reference set of score pass 2: the samples whose teacher features define "in-domain" for the
class Gaussians (Mahalanobis, relative Mahalanobis) and the kNN score. docs/reference.md explains
the algorithm and its parameters.

    agreement   (default) the pool's samples that several label-free pass-1 scores agree on (mean
                percentile rank), at most a quota per teacher pseudo-label, then refined in rounds:
                fit class Gaussians (Ledoit-Wolf shared covariance), re-score the pool by
                Mahalanobis, re-pick with the quota;
    confidence  the pool's samples with teacher_conf >= reference_confidence (the rule before
                agreement; an overconfident teacher fills it with whatever it is sure about);
    a folder    the user's target images (class_name/*.png or flat), decoded through the decode
                sandbox, run through the teacher; labels from the folder names where they name a
                teacher class, else the teacher's pseudo-label.

The pool kinds read the pass-1 tables and the stored features shard by shard: memory is a few
floats per pool sample plus the set's features (at most reference_max rows).

    scores/<run>/reference/members.parquet   sample_id, file, label, round; its metadata holds the summary
"""
from __future__ import annotations

import hashlib
import io
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image
from sklearn.covariance import ledoit_wolf

from . import score_fns as sf
from .decode_sandbox import shared_sandbox
from .errors import WebdistillError
from .validate import IMAGE_EXTS, Rejected, ValidationConfig
from .workspace import read_parquet_metadata, write_parquet_atomic

POOL_KINDS = ("agreement", "confidence")
# label-free pass-1 scores whose ranks are averaged: each fails differently (softmax saturation,
# logit scale, feature norms, BatchNorm statistics), so a sample they all rank high is in-domain
# more surely than one a single score likes. Columns null over the whole pool are left out.
AGREEMENT_COLUMNS = ("msp", "energy", "gen", "scale", "ash", "bn_score", "odin")
MEMBERS = "members.parquet"


class ReferenceError(WebdistillError):
    """A reference folder that is missing, too big, or holds no usable image."""


def check_reference(value: str) -> str:
    """`agreement`, `confidence`, or an existing folder (ValueError in one line otherwise)."""
    if value in POOL_KINDS:
        return value
    if not value or not Path(value).is_dir():
        raise ValueError(f"reference must be agreement, confidence or a folder of images; {value!r} is no folder")
    return value


@dataclass
class ReferenceSet:
    features: np.ndarray  # (n, d) float32
    labels: np.ndarray  # (n,) int64 teacher classes
    shrink: bool  # Ledoit-Wolf covariances (agreement, folder) or the confidence rule's ridge
    summary: dict
    members: pa.Table = field(repr=False)
    layers: list[np.ndarray] = field(default_factory=list)  # the same members' features of each feature layer

    def gaussians(self, n_classes: int, features: np.ndarray | None = None):
        """(means, precision, mean0, precision0) for sf.mahalanobis_scores, of the members' `features`
        (default: the penultimate ones); None without two members."""
        features = self.features if features is None else features
        if len(self.labels) < 2 or features.ndim != 2 or features.shape[1] == 0:
            return None
        if not self.shrink:
            return sf.class_gaussians(features, self.labels, n_classes)
        return shrunk_gaussians(features, self.labels, n_classes)


def shrunk_gaussians(features: np.ndarray, labels: np.ndarray, n_classes: int):
    """Class means and one shared covariance (Lee et al. 2018), and the background Gaussian of all
    members (Ren et al. 2021), each covariance shrunk by Ledoit-Wolf: with few members per feature
    dimension (10 target images per class) the empirical covariance is singular and its inverse
    amplifies noise directions; the shrinkage is chosen from the data, no knob."""
    f = features.astype(np.float64)
    means = np.full((n_classes, f.shape[1]), np.nan)
    centred = np.empty_like(f)
    for c in np.unique(labels):
        sel = labels == c
        means[c] = f[sel].mean(0)
        centred[sel] = f[sel] - means[c]
    cov, _ = ledoit_wolf(centred, assume_centered=True)
    cov0, _ = ledoit_wolf(f)
    return means, _inverse(cov), f.mean(0), _inverse(cov0)


def _inverse(cov: np.ndarray) -> np.ndarray:
    ridge = np.eye(len(cov)) * 1e-9 * max(np.trace(cov) / max(len(cov), 1), 1e-12)  # all-equal features
    return np.linalg.pinv(cov + ridge)


# --- the pool ------------------------------------------------------------------------------------

@dataclass
class _Pool:
    run: Path
    shards: list[str]
    offsets: np.ndarray  # shard i holds rows offsets[i]:offsets[i+1] of the pool arrays
    ok: np.ndarray  # decoded
    label: np.ndarray  # teacher pseudo-label
    columns: dict[str, np.ndarray]

    def features(self, i: int, folder: str = "features") -> np.ndarray:
        return np.load(self.run / folder / f"{self.shards[i]}.npy").astype(np.float32)

    def gather(self, rows: np.ndarray, folder: str = "features") -> np.ndarray:
        """The stored features (of `folder`) of the given pool rows (sorted), one shard file at a time."""
        parts = []
        for i in range(len(self.shards)):
            lo, hi = self.offsets[i], self.offsets[i + 1]
            mine = rows[(rows >= lo) & (rows < hi)] - lo
            if len(mine):
                parts.append(self.features(i, folder)[mine])
        return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)

    def sample_ids(self, rows: np.ndarray) -> list[str]:
        out = []
        for i, shard in enumerate(self.shards):
            lo, hi = self.offsets[i], self.offsets[i + 1]
            mine = rows[(rows >= lo) & (rows < hi)] - lo
            if len(mine):
                ids = pq.read_table(self.run / "pass1" / f"{shard}.parquet", columns=["sample_id"])["sample_id"]
                out += ids.take(pa.array(mine)).to_pylist()
        return out


def _read_pool(run: Path, shards: list[str], wanted: tuple[str, ...]) -> _Pool:
    files = [run / "pass1" / f"{s}.parquet" for s in shards]
    present = [c for c in wanted if c in pq.read_schema(files[0]).names]
    tables = [pq.read_table(f, columns=["decoded", "teacher_label", *present]) for f in files]
    offsets = np.concatenate([[0], np.cumsum([t.num_rows for t in tables])])

    def column(name, dtype):
        return np.concatenate([t[name].to_numpy(zero_copy_only=False).astype(dtype) for t in tables])

    ok = column("decoded", bool)
    label = np.nan_to_num(column("teacher_label", np.float64)).astype(np.int64)
    return _Pool(run, shards, offsets, ok, label, {c: column(c, np.float64) for c in present})


def pick(score: np.ndarray, label: np.ndarray, eligible: np.ndarray, size: int, n_classes: int) -> np.ndarray:
    """Rows (sorted) among the `size` best-scoring eligible ones, at most ceil(size / n_classes) per
    label: a class the teacher sinks many samples into cannot fill the set."""
    s = np.where(eligible & np.isfinite(score), score, -np.inf)
    top = np.argsort(-s, kind="stable")[:size]
    top = top[np.isfinite(s[top])]
    quota = math.ceil(size / max(n_classes, 1))
    by_label = np.argsort(label[top], kind="stable")  # stable: best first within each label
    sorted_label = label[top][by_label]
    rank_in_label = np.arange(len(top)) - np.searchsorted(sorted_label, sorted_label, side="left")
    return np.sort(top[by_label[rank_in_label < quota]])


def _drop_small_classes(rows: np.ndarray, label: np.ndarray, minimum: int) -> tuple[np.ndarray, list[int]]:
    """A class with fewer than `minimum` members gets no mean: a mean of one or two samples is their
    noise, and a class that few trusted samples reach is one the pool likely lacks."""
    classes, counts = np.unique(label[rows], return_counts=True)
    small = classes[counts < minimum]
    return rows[~np.isin(label[rows], small)], [int(c) for c in small]


def _pool_reference(run: Path, shards: list[str], config, n_classes: int,
                    layer_folders: list[str]) -> tuple[ReferenceSet, list[str]]:
    kind = config.reference
    wanted = ("teacher_conf",) if kind == "confidence" else AGREEMENT_COLUMNS
    pool = _read_pool(run, shards, wanted)
    notes: list[str] = []
    if kind == "confidence":
        conf = pool.columns["teacher_conf"]
        eligible = pool.ok & (conf >= config.reference_confidence)
        rows = np.sort(np.argsort(-np.where(eligible, conf, -np.inf), kind="stable")[:config.reference_max])
        rows = rows[eligible[rows]]
        used, rounds, changes, entered = ["teacher_conf"], 0, [], np.zeros(len(rows), np.int32)
    else:
        used = [c for c in AGREEMENT_COLUMNS if c in pool.columns and np.isfinite(pool.columns[c][pool.ok]).any()]
        agreement = (sf.rank_fusion([np.where(pool.ok, pool.columns[c], np.nan) for c in used]) if used
                     else np.full(len(pool.ok), np.nan))
        # room for min_per_class in every class, even in a small pool
        size = min(config.reference_max, max(round(config.reference_top * int(pool.ok.sum())),
                                             config.reference_min_per_class * n_classes, 1))
        rows = pick(agreement, pool.label, pool.ok, size, n_classes)
        rows, _ = _drop_small_classes(rows, pool.label, config.reference_min_per_class)
        first = {int(r): 0 for r in rows}  # the round each member entered the set
        rounds, changes = 0, []
        for r in range(1, config.reference_rounds + 1):
            feats = pool.gather(rows)
            if len(rows) < 2 or feats.shape[1] == 0:
                break  # nothing to fit (no reachable features: run.json's notes say so already)
            gauss = shrunk_gaussians(feats, pool.label[rows], n_classes)
            maha = np.concatenate([sf.mahalanobis_scores(pool.features(i), *gauss)[0] for i in range(len(shards))])
            new = pick(maha, pool.label, pool.ok, size, n_classes)
            new, _ = _drop_small_classes(new, pool.label, config.reference_min_per_class)
            rounds, changes = r, [*changes, int(len(np.setdiff1d(new, rows)))]
            first = {int(x): first.get(int(x), r) for x in new}
            if np.array_equal(new, rows):
                break  # a fixed point: more rounds would pick the same set
            rows = new
        entered = np.array([first[int(x)] for x in rows], np.int32)
    labels = pool.label[rows]
    members = pa.table({"sample_id": pa.array(pool.sample_ids(rows), pa.string()),
                        "file": pa.array([None] * len(rows), pa.string()),
                        "label": pa.array(labels.astype(np.int32)), "round": pa.array(entered)})
    summary = {"kind": kind, "size": int(len(rows)), "per_class": _per_class(labels), "rounds": rounds,
               "changed_per_round": changes, "columns": used}
    if kind == "agreement":
        summary |= {"top": config.reference_top, "min_per_class": config.reference_min_per_class}
    feats = pool.gather(rows) if len(rows) else np.zeros((0, 0), np.float32)
    layers = [pool.gather(rows, f) if len(rows) else np.zeros((0, 0), np.float32) for f in layer_folders]
    return ReferenceSet(feats, labels.astype(np.int64), kind == "agreement", summary, members, layers), notes


def _per_class(labels: np.ndarray) -> dict[str, int]:
    classes, counts = np.unique(labels, return_counts=True)
    return {str(int(c)): int(n) for c, n in zip(classes, counts)}


# --- a folder of target images ------------------------------------------------------------------

def image_files(root: Path, limit: int) -> list[Path]:
    """The image files under `root` (by extension, sorted), not following links: a link could point
    anywhere on the machine. More than `limit` is an error, not a silent cut (a cut would drop the
    last classes of a sorted listing)."""
    found = []
    for folder, dirs, files in os.walk(root, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            path = Path(folder) / name
            if name.startswith(".") or path.is_symlink() or name.rsplit(".", 1)[-1].lower() not in IMAGE_EXTS:
                continue
            found.append(path)
            if len(found) > limit:
                raise ReferenceError(f"reference folder {root}: more than {limit} images "
                                     "(raise reference_max_images to use them all)")
    return found


def folder_fingerprint(root: str, limit: int) -> str:
    """Names, sizes and modification times of the folder's images: pass 2 reruns when they change."""
    h = hashlib.sha256()
    for p in image_files(Path(root), limit):
        st = p.stat()
        h.update(f"{p.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _class_of(path: Path, root: Path, classes: list[str]) -> int | None:
    """The teacher class the image's top folder names (exactly, else ignoring case); None if flat or no match."""
    parts = path.relative_to(root).parts
    if len(parts) < 2:
        return None
    name = parts[0]
    exact = {c: i for i, c in enumerate(classes)}
    folded = {c.casefold(): i for i, c in enumerate(classes)}
    return exact.get(name, folded.get(name.casefold()))


def _decoded_images(files: list[Path], root: Path, preprocess, limits: ValidationConfig):
    """(file, uint8 tensor) for each file that passes ingest's checks in the decode sandbox, and a
    note for each one skipped. Sizes are checked before a byte is read."""
    notes: list[str] = []

    def candidates():
        for f in files:
            size = f.stat().st_size
            if size > limits.max_image_bytes:
                notes.append(f"{f.relative_to(root)}: too_large ({size} bytes > {limits.max_image_bytes})")
                continue
            with open(f, "rb") as fh:
                yield f, fh.read(limits.max_image_bytes + 1)

    images = []
    for (f, data), result in shared_sandbox(limits).validate_all((pair, pair[1]) for pair in candidates()):
        if isinstance(result, Rejected):
            notes.append(f"{f.relative_to(root)}: {result.reason}" + (f" ({result.detail})" if result.detail else ""))
            continue
        with Image.open(io.BytesIO(data)) as im:  # checked in the sandbox: bounded pixels, decodes
            images.append((f, preprocess(im)))
    return images, notes


def _folder_reference(config, scorer_factory: Callable, layer_keys: list[str]) -> tuple[ReferenceSet, list[str]]:
    root = Path(config.reference)
    if not root.is_dir():
        raise ReferenceError(f"reference folder {root} does not exist")
    files = image_files(root, config.reference_max_images)
    scorer = scorer_factory()
    classes = list(scorer.teacher.classes or [])
    images, notes = _decoded_images(files, root, scorer.preprocess, ValidationConfig())
    if not images:
        raise ReferenceError(f"reference folder {root}: no usable image among {len(files)} file(s)"
                             + (f"; first: {notes[0]}" if notes else ""))
    feats, pseudo, layers = [], [], [[] for _ in layer_keys]
    for start in range(0, len(images), config.batch_size):
        out = scorer(torch.stack([x for _, x in images[start:start + config.batch_size]]))
        feats.append(out["features"].astype(np.float32))
        pseudo.append(out["teacher_label"].astype(np.int64))
        for part, key in zip(layers, layer_keys):
            part.append(out[key].astype(np.float32))
    pseudo_labels = np.concatenate(pseudo)
    named = [_class_of(f, root, classes) for f, _ in images]
    labels = np.array([p if n is None else n for n, p in zip(named, pseudo_labels)], np.int64)
    members = pa.table({"sample_id": pa.array([None] * len(images), pa.string()),
                        "file": pa.array([str(f.relative_to(root)) for f, _ in images]),
                        "label": pa.array(labels.astype(np.int32)), "round": pa.array(np.zeros(len(images), np.int32))})
    summary = {"kind": "folder", "source": str(root.resolve()), "size": len(images), "per_class": _per_class(labels),
               "rounds": 0, "labelled_by_folder": sum(n is not None for n in named), "skipped": len(notes)}
    if notes:
        notes = [f"reference: skipped {len(notes)} file(s) of {root}: " + "; ".join(notes[:5])
                 + ("; ..." if len(notes) > 5 else "")]
    return ReferenceSet(np.concatenate(feats), labels, True, summary, members,
                        [np.concatenate(part) for part in layers]), notes


# --- the stage's entry points -------------------------------------------------------------------

def reference_stamp(config) -> dict:
    """What pass 2's skip key adds for the reference: a folder's listing (its config fields are in pass2_part)."""
    if config.reference in POOL_KINDS:
        return {}
    return {"reference_files": folder_fingerprint(config.reference, config.reference_max_images)}


def build_reference(run: Path, shards: list[str], config, n_classes: int, scorer_factory: Callable,
                    layer_sources: list[tuple[str, str]] = ()) -> tuple[ReferenceSet, list[str]]:
    """The run's reference set (config: a ScoreConfig) and notes on what was skipped; writes its
    members. `scorer_factory()` gives the teacher's BatchScorer (a folder reference runs the teacher).
    `layer_sources`: (folder under the run, key of the scorer's output) of each feature layer, whose
    features of the same members `ReferenceSet.layers` holds."""
    if config.reference in POOL_KINDS:
        ref, notes = _pool_reference(run, shards, config, n_classes, [f for f, _ in layer_sources])
    else:
        ref, notes = _folder_reference(config, scorer_factory, [k for _, k in layer_sources])
    write_parquet_atomic(ref.members, run / "reference" / MEMBERS, {"summary": ref.summary})
    return ref, notes


def read_summary(run: Path) -> dict | None:
    """The summary the run's last reference set recorded (None if there is none)."""
    return read_parquet_metadata(run / "reference" / MEMBERS).get("summary")
