"""Distillation throughput: stored vs live teacher, and 1 vs 2 processes, in one run.

    python bench/distill_throughput.py [--samples 2048] [--epochs 1] [--batch-size 64] [--repeats 3]

Builds synthetic curated shards (32x32 png + float16 logits.npy, as `webdistill select` writes
them), then runs the real job under torchrun (`distill.launch.launch`) with the demo's models:
student `tiny_cnn`, teacher `distill.models:mnist_teacher` (`small_cnn`), loss `kd`:
- stored teacher, 1 process    (logits read from the shards: no teacher forward pass)
- live teacher,   1 process    (the teacher runs on every batch)
- stored teacher, 2 processes  (DDP over gloo)
Each process has `--threads` torch threads (1) and `--workers` DataLoader workers (1).
Two samples/s figures: "steady", the median over the job's metrics windows (4 steps) after each
epoch's first, and "whole loop", the job's summary.json figure (samples over its training loop's
seconds, data loader start-up included; process start-up and evaluation excluded). The ratios use
the steady figures. These machines are shared: the cases run interleaved `--repeats` times and
the medians are reported. Prints JSON, then a markdown table.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distill.config import write_config  # noqa: E402
from distill.launch import launch  # noqa: E402
from distill.models import mnist_teacher  # noqa: E402

CLASSES = 10
LOG_EVERY = 4  # steps per metrics window


def build_selection(folder: Path, samples: int, shards: int, seed: int = 0) -> tuple[Path, str]:
    """Synthetic curated shards + manifest.json, and the teacher spec whose logits they store."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    teacher = mnist_teacher().eval()  # untrained: throughput does not depend on what it knows
    torch.save(teacher.state_dict(), folder / "teacher.pt")
    spec = f"distill.models:mnist_teacher@{folder / 'teacher.pt'}"
    rng = np.random.default_rng(seed)
    entries, per_shard = [], -(-samples // shards)
    for s in range(shards):
        n = min(per_shard, samples - s * per_shard)
        images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        with torch.no_grad():
            x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5
            logits = teacher(x).numpy().astype(np.float16)
        path = folder / f"{s:05d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for i in range(n):
                png, npy = io.BytesIO(), io.BytesIO()
                Image.fromarray(images[i]).save(png, "PNG")
                np.save(npy, logits[i])
                sink.write({"__key__": f"b{s:03d}_{i:05d}", "png": png.getvalue(), "logits.npy": npy.getvalue(),
                            "json": json.dumps({"weight": 1.0}), "cls": str(int(logits[i].argmax()))})
        entries.append({"path": path.name, "count": n})
    manifest = {"name": "bench", "total": samples, "num_classes": CLASSES, "classes": [str(c) for c in range(CLASSES)],
                "teacher": spec, "input_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3, "shards": entries}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder / "manifest.json", spec


def run_job(root: Path, name: str, manifest: Path, args, teacher_mode: str, nproc: int) -> dict:
    out = root / "runs" / name
    config = write_config({
        "selection": str(manifest), "student": "tiny_cnn", "teacher_mode": teacher_mode, "loss": {"method": "kd"},
        "epochs": args.epochs, "batch_size": args.batch_size, "samples_per_epoch": args.samples // nproc,
        "workers": args.workers, "threads": args.threads, "checkpoint_every": 10**6,
        "log_every": LOG_EVERY, "progress": False, "out": str(out)}, root / f"{name}.json")
    start = time.perf_counter()
    summary = launch(config, nproc=nproc, stream=None)
    summary["wall_seconds"] = time.perf_counter() - start
    windows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # steady state: the metrics windows after each epoch's first (worker start-up, shuffle buffer fill)
    summary["steady_samples_per_s"] = statistics.median(
        w["samples_per_s"] for w in windows
        if "samples_per_s" in w and (w["step"] - 1) % summary["steps_per_epoch"] >= LOG_EVERY)
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=2048, help="samples per epoch, all ranks together")
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=64, help="per process")
    ap.add_argument("--workers", type=int, default=1, help="DataLoader workers per process")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads per process (default 1: on shared cores, more threads contend)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # sleeping, not spinning, threads leave CPU to decoding

    cases = [("stored_1proc", "stored", 1), ("live_1proc", "live", 1), ("stored_2proc", "stored", 2)]
    rates: dict[str, list[float]] = {name: [] for name, _, _ in cases}
    steady: dict[str, list[float]] = {name: [] for name, _, _ in cases}
    walls: dict[str, list[float]] = {name: [] for name, _, _ in cases}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        manifest, _ = build_selection(root / "selection", args.samples, args.shards)
        for r in range(args.repeats):
            for name, mode, nproc in cases:  # interleaved: drifting load hits every case alike
                summary = run_job(root, f"{name}-{r}", manifest, args, mode, nproc)
                rates[name].append(summary["samples_per_s"])
                steady[name].append(summary["steady_samples_per_s"])
                walls[name].append(summary["wall_seconds"])
    med = {name: statistics.median(v) for name, v in rates.items()}
    med_steady = {name: statistics.median(v) for name, v in steady.items()}
    result = {
        "samples_per_epoch": args.samples, "epochs": args.epochs, "batch_size": args.batch_size,
        "workers": args.workers, "threads": args.threads, "repeats": args.repeats, "cpu_count": os.cpu_count(),
        "student": "tiny_cnn", "teacher": "small_cnn (distill.models:mnist_teacher)", "loss": "kd",
        "samples_per_s": med, "steady_samples_per_s": med_steady, "runs": rates, "steady_runs": steady,
        "wall_seconds": {name: round(statistics.median(v), 1) for name, v in walls.items()},
        "live_over_stored": round(med_steady["live_1proc"] / med_steady["stored_1proc"], 3),
        "two_over_one_process": round(med_steady["stored_2proc"] / med_steady["stored_1proc"], 3),
    }
    print(json.dumps(result, indent=2))
    print()
    print("| case | processes | teacher | samples/s (steady) | samples/s (whole loop) | job wall s |")
    print("|---|---|---|---|---|---|")
    for name, mode, nproc in cases:
        wall = result["wall_seconds"][name]
        print(f"| {name} | {nproc} | {mode} | {med_steady[name]:.0f} | {med[name]:.0f} | {wall} |")
    print(f"\nlive / stored (1 process, steady): {result['live_over_stored']:.2f}x; "
          f"2 processes / 1 process (stored, steady): {result['two_over_one_process']:.2f}x")


if __name__ == "__main__":
    main()
