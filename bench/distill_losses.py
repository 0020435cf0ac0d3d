"""The student's accuracy with each distillation loss on the same curated selection, side by side
in one run. Prints JSON, then a markdown table.

    python bench/distill_losses.py [--workspace workspace] [--selection demo-round1]
        [--eval demo/eval/mnist-test.tar] [--losses kd kd3 sakd confidence_weighted] [--epochs 15] [--nproc 2]

Run `make demo` first: it writes the curated selection and the held-out MNIST test shard. Every loss
runs with the same student, selection, epochs, batch size and seed; kd3 and sakd need the live
teacher (feature losses), kd and confidence_weighted use the logits stored in the shards.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from curation.workspace import Workspace  # noqa: E402
from flows.stage_runner import run_distill  # noqa: E402

LIVE = {"kd3", "sakd"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workspace", default="workspace")
    ap.add_argument("--selection", default="demo-round1")
    ap.add_argument("--eval", default="demo/eval/mnist-test.tar")
    ap.add_argument("--losses", nargs="+", default=["kd", "confidence_weighted", "kd3", "sakd"])
    ap.add_argument("--student", default="tiny_cnn")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    ws = Workspace(args.workspace)
    manifest = json.loads((ws.root / "selections" / args.selection / "manifest.json").read_text())
    rows = []
    for loss in args.losses:
        options = {"student": args.student, "loss": {"method": loss}, "epochs": args.epochs, "nproc": args.nproc,
                   "batch_size": args.batch_size, "workers": 1, "eval": str(Path(args.eval).resolve()),
                   "teacher_mode": "live" if loss in LIVE else "stored", "teacher": manifest["teacher"]}
        start = time.perf_counter()
        summary = run_distill(str(ws.root), f"bench-{args.selection}-{loss}", args.selection, options)
        rows.append({"loss": loss, "teacher_mode": options["teacher_mode"], "eval_accuracy": summary["eval_accuracy"],
                     "samples_per_s": summary.get("samples_per_s"), "seconds": round(time.perf_counter() - start, 1)})
    result = {"selection": args.selection, "size": manifest["total"], "student": args.student, "epochs": args.epochs,
              "nproc": args.nproc, "results": rows}
    print(json.dumps(result, indent=2))
    print()
    print(f"Selection {args.selection} ({manifest['total']} samples), student {args.student}, {args.epochs} epochs, "
          f"{args.nproc} processes; accuracy on {args.eval}")
    print()
    print("| loss | teacher | eval accuracy | samples/s | seconds |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['loss']} | {r['teacher_mode']} | {r['eval_accuracy']:.4f} | {r['samples_per_s']} | "
              f"{r['seconds']} |")


if __name__ == "__main__":
    main()
