"""The student's accuracy with each distillation loss on the same curated selection, side by side
in one run, over several seeds. Prints JSON, then a markdown table.

    python bench/distill_losses.py [--workspace workspace] [--selection demo-round1]
        [--eval demo/eval/mnist-test.tar] [--losses kd confidence_weighted kd3 sakd] [--variants]
        [--seeds 0 1 2] [--epochs 15] [--nproc 2] [--results runs.jsonl [--report-only]] [--out OUT]

Run `make demo` first: it writes the curated selection and the held-out MNIST test shard. Every arm
runs with the same student, selection, epochs, batch size and seeds; kd3 and sakd need the live
teacher (feature losses), kd and confidence_weighted use the logits stored in the shards.

An arm is a name from ARMS or a JSON loss config. `--variants` adds, beside each kd3/sakd arm, the
earlier webdistill variant and the official method with the one switch that helps most on web data
(docs/methods.md). Per arm: the median accuracy over the seeds, its spread (min-max), and the ratio
of the median to the method's `webdistill` variant (the earlier default) where both ran.

`--results FILE` makes a long comparison resumable in chunks (one seed per invocation, say, so a
shared machine gets turns between them): each finished run is appended to FILE as one JSON line, a
run already there with the same arm, seed and setup is not trained again, and the table covers every
run of the requested arms and seeds found in FILE. `--report-only` prints that table without
training. Each run records the machine's load average before and after it. A run whose job fails
(a hung rank, say) is reported, the other arms go on, and it stays out of FILE: a rerun retries it.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.output import emit  # noqa: E402
from curation.workspace import Workspace  # noqa: E402
from distill.launch import DistillJobError  # noqa: E402
from flows.stage_runner import run_distill  # noqa: E402

LIVE = {"kd3", "sakd"}
# named arms: the defaults are the official methods (docs/methods.md)
ARMS: dict[str, dict] = {
    "kd": {"method": "kd"},
    "confidence_weighted": {"method": "confidence_weighted"},
    "kd3": {"method": "kd3"},
    "kd3:webdistill": {"method": "kd3", "variant": "webdistill"},
    "kd3+kd": {"method": "kd3", "weights": {"kd": 1.0}},
    "sakd": {"method": "sakd"},
    "sakd:webdistill": {"method": "sakd", "variant": "webdistill"},
    "sakd[kd]": {"method": "sakd", "wraps": ["kd"]},
}
VARIANTS = {"kd3": ["kd3:webdistill", "kd3+kd"], "sakd": ["sakd:webdistill", "sakd[kd]"]}


def arm_config(arm: str) -> tuple[str, dict]:
    """(label, loss config) of a named arm or a JSON config."""
    if arm in ARMS:
        return arm, ARMS[arm]
    try:
        config = json.loads(arm)
    except json.JSONDecodeError:
        raise SystemExit(f"unknown arm {arm!r}: a name among {', '.join(ARMS)} or a JSON loss config") from None
    return json.dumps(config, separators=(",", ":")), config


def run_name(selection: str, label: str, seed: int) -> str:
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", label).strip("-")[:60]
    return f"bench-{selection}-{slug}-s{seed}"


def setup_of(args: argparse.Namespace, manifest: bytes) -> dict:
    """What must match for two runs to sit in one table: everything but the arm and the seed (the
    selection by its manifest's digest, so a rebuilt selection of the same name starts afresh)."""
    return {"selection": args.selection, "selection_sha256": hashlib.sha256(manifest).hexdigest(),
            "eval": str(Path(args.eval).resolve()), "student": args.student, "epochs": args.epochs,
            "nproc": args.nproc, "batch_size": args.batch_size}


def load_runs(path: Path | None, setup: dict) -> list[dict]:
    """Runs recorded in a --results file with this setup (a missing file has none)."""
    if path is None or not path.exists():
        return []
    runs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in runs if r["setup"] == setup]


def pending(configs: list[tuple[str, dict]], seeds: list[int], done: list[dict]) -> list[tuple[int, str, dict]]:
    """(seed, label, loss) still to train, seeds outermost: a run cut short has every arm at the first seeds."""
    finished = {(r["arm"], json.dumps(r["loss"], sort_keys=True), r["seed"]) for r in done}
    return [(seed, label, loss) for seed in seeds for label, loss in configs
            if (label, json.dumps(loss, sort_keys=True), seed) not in finished]


def summarize(configs: list[tuple[str, dict]], seeds: list[int], runs: list[dict]) -> list[dict]:
    """Per arm: median, min and max over its finished seeds, and the ratio to its webdistill variant."""
    rows = []
    for label, loss in configs:
        mine = sorted((r for r in runs if r["arm"] == label and r["loss"] == loss and r["seed"] in seeds),
                      key=lambda r: r["seed"])
        if not mine:
            continue
        accs = [r["eval_accuracy"] for r in mine]
        rows.append({"arm": label, "loss": loss, "teacher_mode": "live" if loss["method"] in LIVE else "stored",
                     "seeds": [r["seed"] for r in mine], "median": statistics.median(accs), "min": min(accs),
                     "max": max(accs), "runs": mine, "seconds_median": statistics.median(r["seconds"] for r in mine)})
    medians = {r["arm"]: r["median"] for r in rows}
    for r in rows:
        earlier = f"{r['loss']['method']}:webdistill"
        r["vs_webdistill"] = round(r["median"] / medians[earlier], 3) if earlier in medians else None
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workspace", default="workspace")
    ap.add_argument("--selection", default="demo-round1")
    ap.add_argument("--eval", default="demo/eval/mnist-test.tar")
    ap.add_argument("--losses", nargs="+", default=["kd", "confidence_weighted", "kd3", "sakd"],
                    help=f"arms: names ({', '.join(ARMS)}) or JSON loss configs")
    ap.add_argument("--variants", action="store_true", help="add the earlier and the one-switch variants of kd3/sakd")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--student", default="tiny_cnn")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--results", type=Path, help="JSON-lines file of finished runs: skip them, append new ones")
    ap.add_argument("--out", help="also write OUT.json and OUT.md")
    ap.add_argument("--report-only", action="store_true", help="print the table of the --results file, train nothing")
    args = ap.parse_args()
    if args.report_only and args.results is None:
        ap.error("--report-only needs --results")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    arms = list(args.losses)
    if args.variants:
        arms = [a for arm in args.losses for a in [arm, *VARIANTS.get(arm, [])]]
    ws = Workspace(args.workspace)
    manifest_bytes = (ws.root / "selections" / args.selection / "manifest.json").read_bytes()
    manifest = json.loads(manifest_bytes)
    configs = [arm_config(arm) for arm in arms]
    setup = setup_of(args, manifest_bytes)
    runs = load_runs(args.results, setup)
    todo = [] if args.report_only else pending(configs, args.seeds, runs)
    failed: list[dict] = []  # not recorded in --results: a rerun retries them (resuming from their checkpoint)
    for seed, label, loss in todo:
        mode = "live" if loss["method"] in LIVE else "stored"
        options = {"student": args.student, "loss": loss, "epochs": args.epochs, "nproc": args.nproc,
                   "batch_size": args.batch_size, "workers": 1, "eval": setup["eval"],
                   "teacher_mode": mode, "teacher": manifest["teacher"], "seed": seed}
        load_before = os.getloadavg()[0]
        start = time.perf_counter()
        try:
            summary = run_distill(str(ws.root), run_name(args.selection, label, seed), args.selection, options)
        except DistillJobError as e:  # a failed job (a hung rank, say) must not cost the chunk's other arms
            failed.append({"arm": label, "seed": seed, "error": str(e).splitlines()[0]})
            print(f"{label} seed {seed}: FAILED: {failed[-1]['error']}", file=sys.stderr, flush=True)
            continue
        run = {"arm": label, "loss": loss, "seed": seed, "setup": setup, "eval_accuracy": summary["eval_accuracy"],
               "samples_per_s": summary.get("samples_per_s"), "seconds": round(time.perf_counter() - start, 1),
               "load_before": round(load_before, 2), "load_after": round(os.getloadavg()[0], 2),
               "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        runs.append(run)
        if args.results is not None:
            with args.results.open("a") as f:
                f.write(json.dumps(run) + "\n")
        print(f"{label} seed {seed}: {summary['eval_accuracy']:.4f}", file=sys.stderr, flush=True)
    rows = summarize(configs, args.seeds, runs)
    missing = [f"{label} s{seed}" for seed, label, _ in pending(configs, args.seeds, runs)]
    loads = [r[k] for row in rows for r in row["runs"] for k in ("load_before", "load_after") if k in r]
    result = {"selection": args.selection, "size": manifest["total"], "student": args.student, "epochs": args.epochs,
              "nproc": args.nproc, "batch_size": args.batch_size, "seeds": args.seeds, "missing": missing,
              "failed": failed,
              "command": " ".join(["python", *sys.argv]),
              "load_1min": ({"min": min(loads), "median": statistics.median(loads), "max": max(loads)}
                            if loads else None),
              "results": rows}
    emit(result, table(result, args.eval), args.out)


def table(result: dict, eval_path: str) -> str:
    """The markdown summary: the setup, the runs not done yet, one row per arm."""
    lines = [f"Selection {result['selection']} ({result['size']} samples), student {result['student']}, "
             f"{result['epochs']} epochs, {result['nproc']} processes, seeds "
             f"{', '.join(map(str, result['seeds']))}; accuracy on {eval_path}", ""]
    if result["missing"]:
        lines += [f"Not run yet: {', '.join(result['missing'])}", ""]
    for f in result.get("failed", []):
        lines += [f"Failed in this invocation: {f['arm']} s{f['seed']}: {f['error']}", ""]
    lines += ["| arm | teacher | seeds | median accuracy | min - max | vs webdistill variant | accuracy per seed | "
              "seconds (median) |", "|---|---|---:|---:|---:|---:|---|---:|"]
    for r in result["results"]:
        ratio = "" if r["vs_webdistill"] is None else f"{r['vs_webdistill']:.3f}"
        per_seed = ", ".join(f"{x['eval_accuracy']:.3f}" for x in r["runs"])
        lines.append(f"| {r['arm']} | {r['teacher_mode']} | {len(r['runs'])} | {r['median']:.4f} | "
                     f"{r['min']:.4f} - {r['max']:.4f} | {ratio} | {per_seed} | {r['seconds_median']} |")
    return "\n".join(lines)

if __name__ == "__main__":
    main()
