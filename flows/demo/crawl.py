"""The demo crawl: real offline images in img2dataset's WebDataset layout, with the
defects real crawls have planted in it, and the ground truth kept beside the shards.

    <out>/crawl/{00000..N}.tar        {key}.jpg|png, {key}.json, {key}.txt (img2dataset layout)
    <out>/crawl/{00000..N}.parquet    img2dataset's per-shard table of what was written
    <out>/crawl/ground_truth.parquet  shard, key, domain, label, in_domain, defect, duplicate_of, ...
    <out>/eval/mnist-test.tar         held-out labelled MNIST (png + cls), never in the crawl
    <out>/teacher/train.npz           the MNIST split kept aside to train the demo teacher

MNIST is the teacher's domain. Its 5,000 digits are split three ways: teacher training,
held-out test, and a part mixed unlabeled into the crawl. Rendering is deterministic:
each planned sample carries its own seed, so a duplicate is rendered again from its
original's plan, in whichever shard it lands.
"""
from __future__ import annotations

import functools
import io
import json
import os
import struct
import tarfile
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds
from PIL import Image

from curation.parallel import map_shards
from curation.workspace import atomic_path, write_parquet_atomic

from . import sources as src

DEFAULT_SIZE = 52_000
DEFAULT_SHARDS = 24
MNIST_SPLIT = {"teacher_train": 2500, "test": 1000, "crawl": 1500}
# Share of the clean pool per domain; `natural` takes what is left. Capped by what each source has.
DOMAIN_SHARE = {"mnist": 0.03, "digits8": 0.034, "animals": 0.19, "fashion": 0.50, "letters": 0.12}
DEFECTS = ("truncated_image", "corrupt_image", "not_an_image", "missing_image", "bad_json", "decompression_bomb")

CAPTIONS = {
    "mnist": ["handwritten digit {l}", "scan of a handwritten number {l}", "digit {l} written by hand",
              "handwriting sample", "zip code digit", "IMG_{n}.jpg", "", "number {l} from a form"],
    "digits8": ["pixel art number {l}", "low resolution digit {l} icon", "8-bit style {l}", "retro digit", "favicon"],
    "fashion": ["{l} - buy online | free shipping", "women's {l} product photo", "men's {l} sale", "{l}",
                "new arrivals: {l}", "catalog_{n}.png"],
    "animals": ["animal silhouette clipart", "black silhouette of an animal", "wildlife icon vector",
                "animal shape stencil", "pet silhouette"],
    "letters": ["letter {l} monogram", "alphabet letter {l}", "font preview {l}", "initial {l} logo", "typography"],
    "natural": ["stock photo", "wallpaper HD", "DSC_{n}.JPG", "close-up texture", "photo of the day",
                "background image"],
}
HOSTS = {
    "mnist": ["scans.archive-forms.example", "ocr-data.example"],
    "digits8": ["icons.pixelart.example"],
    "fashion": ["shop.fashion-outlet.example", "cdn.clothes-store.example"],
    "animals": ["clipart.example", "vectors.free-icons.example"],
    "letters": ["fonts.type-foundry.example", "logos.example"],
    "natural": ["photos.stock-images.example", "wallpapers.example"],
    "*": ["i.img-host.example", "media.social.example", "cdn.blog-platform.example"],
}


@dataclass(frozen=True)
class Plan:
    """One sample of the crawl, enough to render it again anywhere."""

    shard: int
    key: str
    domain: str
    index: int  # row in the source (fixed sources) or a seed (generated sources)
    seed: int
    fmt: str  # jpeg | png
    defect: str | None = None
    dup_kind: str | None = None  # exact | near
    origin: Plan | None = None  # the plan this one duplicates


def _quota(size: int, fashion_ok: bool) -> dict[str, int]:
    caps = {"mnist": MNIST_SPLIT["crawl"], "digits8": 1797, "animals": 10_000, "fashion": 70_000 if fashion_ok else 0}
    shares = dict(DOMAIN_SHARE)
    if not fashion_ok:  # generated domains absorb the missing share, so the pool keeps its size
        shares["letters"] += shares.pop("fashion") / 2
    counts = {d: min(caps.get(d, size), int(round(size * s))) for d, s in shares.items()}
    counts["natural"] = size - sum(counts.values())
    return counts


def plan_crawl(size: int, n_shards: int, seed: int, fashion_ok: bool) -> list[Plan]:
    rng = np.random.default_rng(seed)
    n_exact, n_near = max(1, size // 50), max(1, size // 100)
    n_defect = {d: max(1, size // 2000) for d in DEFECTS}
    n_defect["decompression_bomb"] = max(1, size // 25_000)
    clean = size - n_exact - n_near - sum(n_defect.values())
    if clean < 2 * len(DOMAIN_SHARE):
        raise ValueError(f"pool size {size} is too small; use at least 200")
    mnist_crawl = _mnist_splits(seed)["crawl"]
    sources_len = {"digits8": 1797, "animals": 10_000, "fashion": 70_000}
    base: list[Plan] = []
    for domain, count in _quota(clean, fashion_ok).items():
        if domain == "mnist":
            idx = rng.choice(mnist_crawl, count, replace=False)
        elif domain in sources_len:
            idx = rng.choice(sources_len[domain], count, replace=False)
        else:
            idx = rng.integers(0, 2**31, count)
        fmts = rng.choice(["jpeg", "png"], count, p=[0.75, 0.25])
        base += [Plan(-1, "", domain, int(i), int(rng.integers(2**31)), str(f)) for i, f in zip(idx, fmts)]
    extra: list[Plan] = []
    for kind, count in (("exact", n_exact), ("near", n_near)):
        for j in rng.choice(len(base), count, replace=False):
            o = base[j]
            extra.append(replace(o, seed=int(rng.integers(2**31)), dup_kind=kind, origin=o,
                                 fmt="jpeg" if kind == "near" else o.fmt))
    for kind, count in n_defect.items():
        for j in rng.choice(len(base), count, replace=False):
            o = base[j]
            fmt = "png" if kind in ("corrupt_image", "decompression_bomb") else o.fmt
            extra.append(replace(o, seed=int(rng.integers(2**31)), defect=kind, fmt=fmt))
    plans = base + extra
    order = rng.permutation(len(plans))
    per_shard = -(-len(plans) // n_shards)
    out, originals = [], {}
    for pos, j in enumerate(order):
        shard, i = divmod(pos, per_shard)
        p = replace(plans[j], shard=shard, key=f"{shard:05d}{i:04d}")
        out.append(p)
        originals[id(plans[j])] = p
    # duplicates point at their original's final plan (its shard and key)
    return [replace(p, origin=originals[id(p.origin)]) if p.origin is not None else p
            for p in (out[k] for k in range(len(out)))]


@functools.lru_cache(maxsize=1)
def _mnist_splits(seed: int) -> dict[str, np.ndarray]:
    n = len(src.mnist()[1])
    perm = np.random.default_rng(seed + 1).permutation(n)
    a, b = MNIST_SPLIT["teacher_train"], MNIST_SPLIT["teacher_train"] + MNIST_SPLIT["test"]
    return {"teacher_train": perm[:a], "test": perm[a:b], "crawl": perm[b:]}


def _source_image(p: Plan) -> tuple[np.ndarray, str]:
    if p.domain == "mnist":
        x, y = src.mnist()
        return x[p.index], str(int(y[p.index]))
    if p.domain in ("digits8", "fashion", "animals"):
        s = getattr(src, p.domain)()
        return s.images[p.index], s.labels[p.index]
    gen = src.render_letter if p.domain == "letters" else src.natural_crop
    return gen(np.random.default_rng(p.index))


def _render_image(p: Plan) -> tuple[Image.Image, str]:
    """The clean image as a crawler would find it: RGB, upscaled to a realistic size."""
    arr, label = _source_image(p)
    rng = np.random.default_rng(p.index * 7919 + 17)  # depends on the source only, so dups match
    im = Image.fromarray(arr).convert("RGB")
    long_side = int(rng.integers(160, 400))
    scale = long_side / max(im.size)
    im = im.resize((max(8, round(im.width * scale)), max(8, round(im.height * scale))), Image.BICUBIC)
    return im, label


def encode_image(im: Image.Image, fmt: str, quality: int, png_level: int = 3) -> bytes:
    """JPEG (fmt "jpeg" or "jpg") at `quality`, else PNG at zlib level `png_level`."""
    buf = io.BytesIO()
    if fmt in ("jpeg", "jpg"):
        im.save(buf, "JPEG", quality=quality)
    else:
        im.save(buf, "PNG", compress_level=png_level)
    return buf.getvalue()


def _clean_bytes(p: Plan) -> tuple[bytes, str, tuple[int, int]]:
    im, label = _render_image(p)
    quality = int(np.random.default_rng(p.index).integers(72, 96))
    return encode_image(im, p.fmt, quality), label, im.size


def _near_duplicate(p: Plan) -> tuple[bytes, str, tuple[int, int]]:
    """Re-encoded, resized and slightly cropped copy of the original."""
    im, label = _render_image(p.origin)
    rng = np.random.default_rng(p.seed)
    w, h = im.size
    dx, dy = int(w * rng.uniform(0, 0.06)), int(h * rng.uniform(0, 0.06))
    im = im.crop((dx, dy, w - int(w * rng.uniform(0, 0.06)), h - int(h * rng.uniform(0, 0.06))))
    s = rng.uniform(0.7, 1.3)
    im = im.resize((max(8, int(im.width * s)), max(8, int(im.height * s))), Image.BILINEAR)
    return encode_image(im, "jpeg", int(rng.integers(55, 85))), label, im.size


def decompression_bomb_png(side: int = 20_000) -> bytes:
    """A valid 1-bit PNG of side x side pixels that is only a few tens of KB on disk."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" * (1 + side // 8)
    comp = zlib.compressobj(9)
    body = b"".join(comp.compress(row * 1000) for _ in range(side // 1000)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def _caption(p: Plan, label: str, rng: np.random.Generator) -> str:
    pool = CAPTIONS[p.domain]
    return pool[rng.integers(len(pool))].format(l=label, n=int(rng.integers(1000, 9999)))


def _sample(p: Plan) -> tuple[dict, dict]:
    """(tar sample, ground-truth row) for one plan."""
    rng = np.random.default_rng(p.seed)
    if p.dup_kind == "exact":
        data, label, size = _clean_bytes(p.origin)
    elif p.dup_kind == "near":
        data, label, size = _near_duplicate(p)
    else:
        data, label, size = _clean_bytes(p)
    if p.defect == "truncated_image":
        data = data[: int(len(data) * rng.uniform(0.4, 0.8))]
    elif p.defect == "corrupt_image":
        cut = len(data) // 2  # garble the compressed pixel data, keep the header intact
        data = data[:cut] + rng.integers(0, 256, 256, dtype=np.uint8).tobytes() + data[cut + 256 :]
    elif p.defect == "not_an_image":
        data = b"<!DOCTYPE html><html><head><title>404 Not Found</title></head><body>gone</body></html>"
    elif p.defect == "decompression_bomb":
        data, size = decompression_bomb_png(), (20_000, 20_000)
    ext = "jpg" if p.fmt == "jpeg" else "png"
    hosts = HOSTS[p.domain] if rng.random() < 0.7 else HOSTS["*"]
    url = f"https://{hosts[rng.integers(len(hosts))]}/media/{rng.integers(10**8):08d}.{ext}"
    caption = _caption(p, label, rng)
    meta = {"url": url, "caption": caption, "key": p.key, "status": "success", "error_message": None,
            "width": size[0], "height": size[1], "original_width": size[0], "original_height": size[1],
            "exif": "{}"}
    sample = {"__key__": p.key, "txt": caption}
    if p.defect == "bad_json":
        sample["json"] = ('{"url": "' + url + '", "caption": ').encode()
    else:
        sample["json"] = json.dumps(meta).encode()
    if p.defect != "missing_image":
        sample[ext] = data
    truth = {"shard": f"{p.shard:05d}", "key": p.key, "domain": p.domain, "label": label,
             "in_domain": p.domain == "mnist", "defect": p.defect, "dup_kind": p.dup_kind,
             "duplicate_of": p.origin.key if p.origin is not None else None, "format": p.fmt, "url": url}
    return sample, truth


def _cut_tar(path: Path, key: str) -> None:
    """Cut the tar in the middle of the first member of sample `key`, as an interrupted copy would."""
    with tarfile.open(path) as tar:
        member = next(m for m in tar.getmembers() if m.name.startswith(key + "."))
    with open(path, "r+b") as fh:
        fh.truncate(member.offset_data + max(1, member.size // 2))


def write_shard(out_dir: str, shard: int, plans: list[Plan], truncate_at: str | None) -> list[dict]:
    path = Path(out_dir) / f"{shard:05d}.tar"
    truths, rows = [], []
    with atomic_path(path) as tmp:
        with wds.TarWriter(str(tmp)) as sink:
            for p in plans:
                sample, truth = _sample(p)
                sink.write(sample)
                truths.append(truth)
                meta = json.loads(sample["json"]) if p.defect != "bad_json" else {}
                rows.append({"key": p.key, "url": truth["url"], "caption": sample["txt"], "status": "success",
                             "width": meta.get("width"), "height": meta.get("height")})
        if truncate_at is not None:
            _cut_tar(tmp, truncate_at)
            lost = False
            for t in truths:
                lost = lost or t["key"] == truncate_at
                if lost:
                    t["defect"] = "truncated_tar"
    write_parquet_atomic(pa.Table.from_pylist(rows), Path(out_dir) / f"{shard:05d}.parquet")
    return truths


def _write_eval(out: Path, seed: int) -> int:
    x, y = src.mnist()
    test = _mnist_splits(seed)["test"]
    path = out / "eval" / "mnist-test.tar"
    with atomic_path(path) as tmp, wds.TarWriter(str(tmp)) as sink:
        for i in test:
            sink.write({"__key__": f"test{i:05d}", "png": src.png_bytes(x[i]), "cls": str(int(y[i]))})
    return len(test)


def _write_teacher_split(out: Path, seed: int) -> int:
    x, y = src.mnist()
    idx = _mnist_splits(seed)["teacher_train"]
    path = out / "teacher" / "train.npz"
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, images=x[idx], labels=y[idx])
    return len(idx)


def build_demo_crawl(out: str | os.PathLike, size: int = DEFAULT_SIZE, n_shards: int = DEFAULT_SHARDS,
                     seed: int = 0, workers: int = 2, progress: bool = True) -> dict:
    """Build the demo crawl, the held-out eval set and the teacher's split. Returns a summary."""
    out = Path(out)
    crawl = out / "crawl"
    crawl.mkdir(parents=True, exist_ok=True)
    fashion_ok = src.fashion_available()
    plans = plan_crawl(size, n_shards, seed, fashion_ok)
    by_shard: dict[int, list[Plan]] = {}
    for p in plans:
        by_shard.setdefault(p.shard, []).append(p)
    last = max(by_shard)
    cut_key = by_shard[last][int(len(by_shard[last]) * 0.6)].key
    jobs = [(s, ps, cut_key if s == last else None) for s, ps in sorted(by_shard.items())]
    truths: list[dict] = []
    for _job, result in map_shards(functools.partial(_write_job, str(crawl)), jobs, workers, "demo crawl", progress):
        if isinstance(result, BaseException):
            raise result
        truths += result
    truth = pa.Table.from_pylist(sorted(truths, key=lambda t: t["key"]))
    write_parquet_atomic(truth, crawl / "ground_truth.parquet")
    n_test = _write_eval(out, seed)
    n_train = _write_teacher_split(out, seed)
    domains = pq.read_table(crawl / "ground_truth.parquet").column("domain").value_counts().to_pylist()
    return {"samples": len(plans), "shards": len(by_shard), "fashion": fashion_ok, "truncated_shard": f"{last:05d}",
            "domains": {d["values"]: d["counts"] for d in domains}, "mnist_test": n_test,
            "mnist_teacher_train": n_train}


def _write_job(out_dir: str, job: tuple) -> list[dict]:
    shard, plans, cut = job
    return write_shard(out_dir, shard, plans, cut)
