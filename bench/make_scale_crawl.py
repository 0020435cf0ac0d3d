"""A crawl of N small real-looking images, fast to make, in img2dataset's layout, with a ground truth.

    python bench/make_scale_crawl.py OUT --n 100000 [--shard-size 10000] [--in-domain 0.1] [--workers 2]

    OUT/{00000..}.tar            {key}.jpg|png, {key}.json, {key}.txt (img2dataset's WebDataset layout)
    OUT/{00000..}.parquet        img2dataset's per-shard table: key, url, caption, status, width, height
    OUT/{00000..}_stats.json     img2dataset's per-shard counts
    OUT/ground_truth.parquet     key, shard, in_domain, kind, width, height

The demo crawl (flows/demo/crawl.py) renders real datasets and plants defects: faithful, but
minutes per 10^5. This one draws with numpy and encodes with Pillow, so a 10^6 crawl takes
minutes on two cores, for scale runs where the image content matters less than its cost:
every image is a real JPEG or PNG of 20-48 px that a stage must decode. The planted in-domain
share ("glyph": a light stroke figure on a dark ground, like the demo teacher's MNIST digits)
differs from the rest ("photo": smooth colour gradients with texture noise, "clutter": random
rectangles) in ways a teacher's confidence or an embedding can tell apart. Deterministic: a
sample's pixels depend on (seed, index) only. Prints a JSON summary.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from curation.workspace import atomic_path, write_parquet_atomic  # noqa: E402
from flows.demo.crawl import encode_image  # noqa: E402

KINDS = ("glyph", "photo", "clutter")  # glyph is the in-domain kind


# Per-process caches: coordinate grids per side and one block of texture noise whose random
# windows every sample reuses (drawing fresh Gaussian noise per image was most of the cost).
_NOISE = np.random.default_rng(12345).normal(0, 1, (256, 256, 3)).astype(np.float32)
_GRIDS: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def _grid(side: int) -> tuple[np.ndarray, np.ndarray]:
    if side not in _GRIDS:
        yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) / side
        _GRIDS[side] = (xx[:, :, None], yy[:, :, None])
    return _GRIDS[side]


def _noise(rng: np.random.Generator, side: int) -> np.ndarray:
    y, x = rng.integers(0, 256 - side, 2)
    return _NOISE[y:y + side, x:x + side]


def _glyph(rng: np.random.Generator, side: int) -> Image.Image:
    """A few thick light strokes and a ring on a dark ground: digit-like."""
    im = Image.new("L", (side, side), int(rng.integers(0, 30)))
    draw = ImageDraw.Draw(im)
    ink, width = int(rng.integers(200, 256)), max(2, side // 9)
    for _ in range(int(rng.integers(1, 4))):
        draw.line([tuple(p) for p in (rng.uniform(0.15, 0.85, (2, 2)) * side)], fill=ink, width=width)
    if rng.random() < 0.5:
        cx, cy, r = rng.uniform(0.35, 0.65) * side, rng.uniform(0.35, 0.65) * side, rng.uniform(0.12, 0.3) * side
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=ink, width=width)
    return im.convert("RGB")


def _photo(rng: np.random.Generator, side: int) -> Image.Image:
    """A smooth two-colour gradient with texture noise: a blurry photo's statistics."""
    xx, yy = _grid(side)
    angle = rng.uniform(0, np.pi)
    t = np.cos(angle) * xx + np.sin(angle) * yy
    a, b = rng.uniform(0, 255, (2, 3)).astype(np.float32)
    img = a + (b - a) * t + rng.uniform(4, 25) * _noise(rng, side)
    return Image.fromarray(img.clip(0, 255).astype(np.uint8))


def _clutter(rng: np.random.Generator, side: int) -> Image.Image:
    """Random coloured rectangles on a coloured ground: screenshots, banners, icons."""
    im = Image.new("RGB", (side, side), tuple(int(c) for c in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(2, 7))):
        x0, y0 = (int(v) for v in rng.integers(0, side - 2, 2))
        w, h = (int(v) for v in rng.integers(2, side // 2 + 2, 2))
        draw.rectangle((x0, y0, x0 + w, y0 + h), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    return im


DRAW = {"glyph": _glyph, "photo": _photo, "clutter": _clutter}
CAPTIONS = {"glyph": "handwritten digit scan", "photo": "stock photo", "clutter": "banner image"}


def _member(name: str, data: bytes) -> bytes:
    """One ustar member (header + data + padding); tarfile's addfile costs more than the JPEG encode."""
    header = bytearray(512)
    header[0:len(name)] = name.encode()
    header[100:108] = b"0000644\0"
    header[108:116] = header[116:124] = b"0000000\0"
    header[124:136] = b"%011o\0" % len(data)
    header[136:148] = b"00000000000\0"
    header[148:156] = b" " * 8
    header[156:157] = b"0"
    header[257:265] = b"ustar\x0000"
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header) + data + b"\0" * (-len(data) % 512)


def write_shard(out: Path, shard: int, start: int, count: int, in_domain: float, seed: int) -> list[dict]:
    """Write shard `shard` (samples start..start+count) and its img2dataset side files; return its truth rows."""
    truth, rows = [], []
    with atomic_path(out / f"{shard:05d}.tar") as tmp, open(tmp, "wb") as tar:
        rng = np.random.default_rng([seed, shard])  # one generator per shard: a per-sample one costs 20 us
        for i in range(start, start + count):
            kind = "glyph" if rng.random() < in_domain else KINDS[1 + int(rng.integers(2))]
            side = int(rng.integers(20, 49))
            fmt = "png" if rng.random() < 0.1 else "jpg"
            data = encode_image(DRAW[kind](rng, side), fmt, int(rng.integers(70, 95)), png_level=1)
            key = f"{shard:05d}{i - start:04d}" if count <= 10_000 else f"{shard:05d}{i - start:06d}"
            url = f"https://cdn{int(rng.integers(20))}.example/{kind}/{i:09d}.{fmt}"
            meta = {"url": url, "caption": CAPTIONS[kind], "key": key, "status": "success", "error_message": None,
                    "width": side, "height": side, "original_width": side, "original_height": side}
            tar.write(_member(f"{key}.{fmt}", data) + _member(f"{key}.json", json.dumps(meta).encode())
                      + _member(f"{key}.txt", CAPTIONS[kind].encode()))
            rows.append({"key": key, "url": url, "caption": CAPTIONS[kind], "status": "success",
                         "width": side, "height": side})
            truth.append({"key": key, "shard": f"{shard:05d}", "in_domain": kind == "glyph", "kind": kind,
                          "width": side, "height": side})
        tar.write(b"\0" * 1024)  # the end-of-archive marker
    write_parquet_atomic(pa.Table.from_pylist(rows), out / f"{shard:05d}.parquet")
    (out / f"{shard:05d}_stats.json").write_text(json.dumps(
        {"count": count, "successes": count, "failed_to_download": 0, "failed_to_resize": 0}))
    return truth


def _job(args: tuple) -> list[dict]:
    return write_shard(*args)


def make_crawl(out: str | Path, n: int, shard_size: int = 10_000, in_domain: float = 0.1, seed: int = 0,
               workers: int = 2) -> dict:
    """Write the crawl; returns its summary (samples, shards, seconds, in-domain count)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(out, s, start, min(shard_size, n - start), in_domain, seed)
            for s, start in enumerate(range(0, n, shard_size))]
    started = time.perf_counter()
    if workers <= 1:
        truths = [_job(j) for j in jobs]
    else:
        with ProcessPoolExecutor(workers) as pool:
            truths = list(pool.map(_job, jobs))
    truth = pa.Table.from_pylist([row for part in truths for row in part])
    write_parquet_atomic(truth, out / "ground_truth.parquet")
    seconds = time.perf_counter() - started
    planted = int(pq.read_table(out / "ground_truth.parquet", columns=["in_domain"])["in_domain"].to_numpy().sum())
    return {"out": str(out), "samples": n, "shards": len(jobs), "in_domain": planted, "seconds": round(seconds, 2),
            "samples_per_s": round(n / seconds, 1),
            "bytes": sum(p.stat().st_size for p in out.glob("*.tar"))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out")
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--shard-size", type=int, default=10_000, help="samples per shard (img2dataset's default)")
    ap.add_argument("--in-domain", type=float, default=0.1, help="planted in-domain share")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    print(json.dumps(make_crawl(args.out, args.n, args.shard_size, args.in_domain, args.seed, args.workers), indent=2))


if __name__ == "__main__":
    main()
