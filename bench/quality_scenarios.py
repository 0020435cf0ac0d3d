"""The two scenarios of bench/quality.py: a crawl in img2dataset's layout with its ground truth, a
teacher saved as a user's would be, a held-out labelled test set, and target images a user could
bring (for `score --reference DIR`).

    demo      the demo crawl and MNIST teacher (flows/demo, built and cached by its own builders)
    fashion   a Fashion-MNIST teacher (another domain: clothing, not digits) over a crawl where 12% is
              held-out Fashion-MNIST, 38% shifted look-alikes of it (inverted, rotated, blurred clothing;
              animal silhouettes), and 50% other things and noise (digits, letters, photo crops, noise)

Each scenario folder holds:
    crawl/{00000..}.tar, crawl/ground_truth.parquet (shard, key, domain, label, in_domain)
    teacher/teacher.json (+ weights, .pt2)     eval/*.tar (image + cls)
    reference/<n>/<class name>/*.png          n target images, the same number per class
"""
from __future__ import annotations

import functools
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import webdataset as wds
from PIL import Image, ImageFilter

from curation.parallel import map_shards
from curation.workspace import atomic_path, write_parquet_atomic
from flows.demo import sources
from flows.demo.teacher import train_demo_teacher

FASHION_TEACHER_TRAIN, FASHION_TEST = 5000, 1000
# Share of the fashion crawl per domain (sums to 1). in_domain is Fashion-MNIST as the teacher saw it.
FASHION_MIX = {"fashion": 0.12, "fashion_inverted": 0.10, "fashion_rotated": 0.08, "fashion_blurred": 0.05,
               "animals": 0.15, "mnist": 0.10, "letters": 0.10, "natural": 0.20, "noise": 0.10}


@dataclass
class Scenario:
    name: str
    folder: Path
    crawl: Path            # the shards' folder (what `webdistill ingest` reads)
    truth: Path            # ground_truth.parquet: shard, key, domain, label, in_domain
    teacher: Path          # teacher.json
    eval: Path             # labelled held-out test shard of the teacher's domain
    teacher_accuracy: float
    classes: list[str]
    clip: bool = False     # the scenario has a CLIP of its own (the demo's), so a prompt score

    def reference_dir(self, n: int) -> Path:
        return self.folder / "reference" / str(n)


def _write_reference(folder: Path, images: np.ndarray, labels: np.ndarray, classes: list[str], n: int,
                     seed: int) -> Path:
    """n target images (n / classes per class) from the teacher's own domain, as class_name/*.png."""
    out = folder / "reference" / str(n)
    if out.is_dir():
        return out
    rng = np.random.default_rng(seed)
    per_class = max(1, n // len(classes))
    tmp = out.with_name(out.name + ".tmp")
    for c, name in enumerate(classes):
        idx = rng.choice(np.flatnonzero(labels == c), per_class, replace=False)
        (tmp / name).mkdir(parents=True, exist_ok=True)
        for i in idx:
            (tmp / name / f"{i}.png").write_bytes(sources.png_bytes(images[i]))
    tmp.rename(out)
    return out


# --- the demo ---------------------------------------------------------------------------------

def demo(folder: Path, size: int, n_shards: int, teacher_epochs: int, seed: int = 0,
         references: tuple[int, ...] = (10, 100)) -> Scenario:
    """The demo crawl and teacher (flows.demo's builders, cached by them); references from the
    MNIST digits kept aside for the teacher (the user's own labelled examples)."""
    from flows.demo.run import build_inputs

    _crawl, teacher = build_inputs(folder, size, n_shards, teacher_epochs, workers=2, seed=seed, timings={})
    split = np.load(folder / "teacher" / "train.npz", allow_pickle=False)
    classes = [str(i) for i in range(10)]
    for n in references:
        _write_reference(folder, split["images"], split["labels"], classes, n, seed)
    return Scenario("demo", folder, folder / "crawl", folder / "crawl" / "ground_truth.parquet",
                    folder / "teacher" / "teacher.json", folder / "eval" / "mnist-test.tar",
                    teacher["test_accuracy"], classes, clip=True)


# --- fashion: a teacher from another domain ---------------------------------------------------

def _fashion_splits(seed: int, teacher_train: int = FASHION_TEACHER_TRAIN) -> dict[str, np.ndarray]:
    n = len(sources.fashion().labels)
    perm = np.random.default_rng(seed + 11).permutation(n)
    if not 0 < teacher_train <= FASHION_TEACHER_TRAIN:
        raise ValueError(f"teacher_train must be in 1..{FASHION_TEACHER_TRAIN}")
    a, b = FASHION_TEACHER_TRAIN, FASHION_TEACHER_TRAIN + FASHION_TEST  # test and crawl do not move with it
    return {"teacher_train": perm[:teacher_train], "test": perm[a:b], "crawl": perm[b:]}


@functools.cache
def _fashion_arrays() -> tuple[np.ndarray, np.ndarray]:
    f = sources.fashion()
    index = {c: i for i, c in enumerate(sources.FASHION_CLASSES)}
    return f.images, np.array([index[name] for name in f.labels], np.int64)


def _noise(rng: np.random.Generator) -> np.ndarray:
    """Smooth random blobs or plain pixel noise: images of nothing."""
    side = int(rng.integers(24, 64))
    if rng.random() < 0.5:
        return rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
    small = rng.integers(0, 256, (4, 4), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((side, side), Image.BICUBIC))


def _fashion_item(domain: str, index: int, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """(image, label) of one crawl item; the look-alikes are Fashion-MNIST images the teacher never saw,
    shifted: dark on light, turned, or blurred."""
    if domain.startswith("fashion"):
        images, labels = _fashion_arrays()
        img, label = images[index], sources.FASHION_CLASSES[labels[index]]
        if domain == "fashion_inverted":
            img = 255 - img
        elif domain == "fashion_rotated":
            img = np.rot90(img, int(rng.integers(1, 4))).copy()
        elif domain == "fashion_blurred":
            img = np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(float(rng.uniform(1.5, 2.5)))))
        return img, label
    if domain == "animals":
        a = sources.animals()
        return a.images[index], a.labels[index]
    if domain == "mnist":
        x, y = sources.mnist()
        return x[index], str(int(y[index]))
    if domain == "letters":
        return sources.render_letter(rng)
    if domain == "natural":
        return sources.natural_crop(rng)
    return _noise(rng), "noise"


def _encode(img: np.ndarray, rng: np.random.Generator) -> tuple[bytes, str]:
    """Upscaled (a crawler finds bigger images than 28 px) and saved as JPEG or PNG."""
    im = Image.fromarray(img).convert("RGB")
    scale = float(rng.uniform(56, 96)) / max(im.size)
    im = im.resize((max(8, round(im.width * scale)), max(8, round(im.height * scale))), Image.BICUBIC)
    buf = io.BytesIO()
    if rng.random() < 0.7:
        im.save(buf, "JPEG", quality=int(rng.integers(80, 95)))
        return buf.getvalue(), "jpg"
    im.save(buf, "PNG")
    return buf.getvalue(), "png"


def _fashion_plan(size: int, seed: int) -> list[tuple[str, int]]:
    """(domain, source index or seed) per crawl item, shuffled."""
    rng = np.random.default_rng(seed)
    crawl_idx = _fashion_splits(seed)["crawl"]
    counts = {d: int(round(size * s)) for d, s in FASHION_MIX.items()}
    counts["noise"] += size - sum(counts.values())
    fashion_like = [d for d in counts if d.startswith("fashion")]
    # the in-domain part and its shifted look-alikes are distinct images of the crawl split
    pool = iter(rng.choice(crawl_idx, sum(counts[d] for d in fashion_like), replace=False))
    plan: list[tuple[str, int]] = []
    for d, n in counts.items():
        if d in fashion_like:
            plan += [(d, int(next(pool))) for _ in range(n)]
        elif d == "animals":
            plan += [(d, int(i)) for i in rng.choice(len(sources.animals().labels), n, replace=False)]
        elif d == "mnist":
            plan += [(d, int(i)) for i in rng.choice(len(sources.mnist()[1]), n, replace=False)]
        else:
            plan += [(d, int(s)) for s in rng.integers(0, 2**31, n)]
    return [plan[i] for i in rng.permutation(len(plan))]


def _write_fashion_shard(crawl: str, job: tuple[int, list[tuple[str, int]]]) -> list[dict]:
    shard, items = job
    truths = []
    with atomic_path(Path(crawl) / f"{shard:05d}.tar") as tmp, wds.TarWriter(str(tmp)) as sink:
        for i, (domain, index) in enumerate(items):
            key = f"{shard:05d}{i:04d}"
            rng = np.random.default_rng([index, i, shard])
            img, label = _fashion_item(domain, index, rng)
            data, ext = _encode(img, rng)
            sink.write({"__key__": key, ext: data, "txt": "",
                        "json": json.dumps({"key": key, "status": "success", "url": f"https://x.example/{key}"})})
            truths.append({"shard": f"{shard:05d}", "key": key, "domain": domain, "label": label,
                           "in_domain": domain == "fashion"})
    return truths


def fashion(folder: Path, size: int, n_shards: int, teacher_epochs: int, seed: int = 0,
            references: tuple[int, ...] = (10, 100), teacher_train: int = FASHION_TEACHER_TRAIN) -> Scenario:
    """Build (once per parameters) the fashion crawl, its test shard, and its teacher."""
    if not sources.fashion_available():
        raise SystemExit(f"Fashion-MNIST not found in {sources.FASHION_DIR} (Debian package dataset-fashion-mnist)")
    params = {"size": size, "shards": n_shards, "seed": seed, "teacher_epochs": teacher_epochs, "mix": FASHION_MIX}
    if teacher_train != FASHION_TEACHER_TRAIN:
        params["teacher_train"] = teacher_train
    marker = folder / "build.json"
    images, labels = _fashion_arrays()
    split = _fashion_splits(seed, teacher_train)
    classes = list(sources.FASHION_CLASSES)
    if not (marker.exists() and json.loads(marker.read_text()).get("params") == params):
        crawl = folder / "crawl"
        crawl.mkdir(parents=True, exist_ok=True)
        plan = _fashion_plan(size, seed)
        per = -(-len(plan) // n_shards)
        jobs = [(s, plan[s * per:(s + 1) * per]) for s in range(n_shards)]
        truths: list[dict] = []
        for _job, result in map_shards(functools.partial(_write_fashion_shard, str(crawl)), jobs, 2,
                                       "fashion crawl", True):
            if isinstance(result, BaseException):
                raise result
            truths += result
        write_parquet_atomic(pa.Table.from_pylist(sorted(truths, key=lambda t: t["key"])),
                             crawl / "ground_truth.parquet")
        with atomic_path(folder / "eval" / "fashion-test.tar") as tmp, wds.TarWriter(str(tmp)) as sink:
            for i in split["test"]:
                sink.write({"__key__": f"test{i:05d}", "png": sources.png_bytes(images[i]), "cls": str(int(labels[i]))})
        (folder / "teacher").mkdir(parents=True, exist_ok=True)
        idx = split["teacher_train"]
        with atomic_path(folder / "teacher" / "train.npz") as tmp, open(tmp, "wb") as fh:
            np.savez_compressed(fh, images=images[idx], labels=labels[idx])
        train_demo_teacher(folder, epochs=teacher_epochs, seed=seed, test_set="eval/fashion-test.tar",
                           classes=classes, log=lambda line: None)
        marker.write_text(json.dumps({"params": params}))
    teacher = json.loads((folder / "teacher" / "teacher.json").read_text())
    for n in references:
        idx = split["teacher_train"]
        _write_reference(folder, images[idx], labels[idx], classes, n, seed)
    return Scenario("fashion", folder, folder / "crawl", folder / "crawl" / "ground_truth.parquet",
                    folder / "teacher" / "teacher.json", folder / "eval" / "fashion-test.tar",
                    teacher["test_accuracy"], classes)
