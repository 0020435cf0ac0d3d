"""Embed pipeline images/s vs the same model's bare forward pass on pre-decoded tensors.

    python bench/embed_throughput.py [--model ViT-S-32] [--batch-size 64] [--shards 2] [--workers 1]

Same model, batch size and threads, in one process, alternating `--repeats` times; the medians
are compared as a ratio. The pipeline is the real `embed` stage: streaming the tar shards,
decoding in DataLoader workers, batching, inference, and writing .npy + id maps.
Weights are random (no hub here): the compute is the same as with pretrained weights.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

# As the CLI does: OpenMP threads sleep instead of spinning, leaving CPU to the decode workers.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from curation.embed import embed  # noqa: E402
from curation.embedders import make_embedder  # noqa: E402
from curation.ingest import ingest  # noqa: E402
from curation.shards import iter_samples, open_stored_shard  # noqa: E402
from curation.workspace import Workspace  # noqa: E402


def predecoded(shards: list[Path], preprocess, n: int) -> torch.Tensor:
    from PIL import Image

    out = []
    for shard in shards:
        with open_stored_shard(str(shard.resolve())) as stream:
            try:
                for raw in iter_samples(stream):
                    data = raw.files.get("jpg") or raw.files.get("png")
                    try:
                        out.append(preprocess(Image.open(io.BytesIO(data))))
                    except Exception:  # noqa: BLE001 - the demo's planted defects
                        continue
                    if len(out) == n:
                        return torch.stack(out)
            except Exception:  # noqa: BLE001
                continue
    return torch.stack(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--crawl", default="demo/crawl")
    ap.add_argument("--model", default="ViT-S-32", help="open_clip model name")
    ap.add_argument("--pretrained", default=None)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--shards", type=int, default=1, help="shards embedded per pipeline run")
    ap.add_argument("--workers", type=int, default=1, help="DataLoader decode workers")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    shards = sorted(Path(args.crawl).glob("*.tar"))[: args.shards]
    embedder = make_embedder(f"open_clip:{args.model}", args.pretrained, precision=args.precision)
    tmp = Path(tempfile.mkdtemp())
    ws = Workspace(tmp / "ws")
    ingest(ws, [str(s) for s in shards], workers=2, progress=False)
    bare_x = predecoded(shards, embedder.preprocess, 8 * args.batch_size)

    pipe, bare = [], []
    n = 0
    for _ in range(args.repeats):
        shutil.rmtree(ws.root / "embeddings", ignore_errors=True)
        s = embed(ws, embedder, batch_size=args.batch_size, workers=args.workers, progress=False)
        n = s.samples
        pipe.append(s.samples / s.seconds)
        start = time.perf_counter()
        for i in range(0, len(bare_x), args.batch_size):
            embedder.encode_images(bare_x[i : i + args.batch_size])
        bare.append(len(bare_x) / (time.perf_counter() - start))
    shutil.rmtree(tmp)

    result = {
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "model": args.model, "batch_size": args.batch_size, "precision": args.precision,
        "image_size": bare_x.shape[-1], "decode_workers": args.workers, "torch_threads": torch.get_num_threads(),
        "pipeline_images": n, "bare_images": len(bare_x),
        "pipeline_images_per_s": round(statistics.median(pipe), 1),
        "bare_forward_images_per_s": round(statistics.median(bare), 1),
        "ratio_pipeline_over_bare": round(statistics.median(pipe) / statistics.median(bare), 3),
    }
    print(json.dumps(result, indent=2))
    print()
    print("| model | batch | pipeline img/s | bare forward img/s | ratio |")
    print("|---|---:|---:|---:|---:|")
    print(f"| {args.model} @ {result['image_size']} px | {args.batch_size} | {result['pipeline_images_per_s']} | "
          f"{result['bare_forward_images_per_s']} | {result['ratio_pipeline_over_bare']} |")


if __name__ == "__main__":
    main()
