"""Faults injected into every stage and survived, hostile inputs per kind, samples lost or doubled.

    python bench/faults.py [--kills 5] [--size 800 --shards 4] [--quick] [--work DIR]

Every fault runs the CLI as a user does (tests/faultkit.py holds the machinery, shared with
tests/test_faults.py):
- SIGKILL of a stage's process group at a seeded random point, then a rerun; survived = the rerun
  succeeds and the workspace equals the uninterrupted run's by content digest, with nothing left
  that a later run reads as output;
- two writers at once (selects, ingests, score while sql queries run); survived = each succeeds or
  fails with one line, and every view and table of the catalog reads;
- a damaged catalog; survived = every verb says "corrupt" and how to rebuild, and the rebuild
  restores every view and the selections;
- a full disk, a read-only filesystem, folders without permission (tmpfs as root; RLIMIT_FSIZE and
  chmod otherwise); survived = one line that names the cause, no partial artifact, and a rerun with
  room gives the uninterrupted result.
Hostile inputs (bench/hostile_ingest.py's, measured its way: a process each, for wall time and peak
RSS; and tests/test_ingest_fuzz.py's mutated tars) go through ingest; every member must end in
`samples` or `rejects`, and no sample_id may repeat. Distillation ranks killed mid-run are
tests/test_distill_faults.py's. `--quick` is the CI size. Prints JSON, then markdown tables.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/hostile_ingest.py: the hostile inputs
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

# Heavy imports (torch, DuckDB, pyarrow) stay inside the functions that need them: the hostile
# inputs are measured from a lean process (`--hostile-only`), because a child's peak RSS on Linux
# starts from its parent's at exec.
if TYPE_CHECKING:
    from tests import faultkit as fk


def build_inputs(work: Path, size: int, shards: int) -> fk.Inputs:
    """The demo crawl (every planted defect, the last shard cut off) and a demo teacher on its split."""
    from flows.demo.crawl import build_demo_crawl
    from flows.demo.teacher import train_demo_teacher
    from tests import faultkit as fk

    out = work / "demo"
    if not (out / "crawl").exists():
        build_demo_crawl(out, size=size, n_shards=shards, seed=0, workers=1, progress=False)
    spec = work / "teacher" / "teacher" / "teacher.json"
    if not spec.exists():
        (work / "teacher" / "teacher").mkdir(parents=True, exist_ok=True)
        shutil.copy(out / "teacher" / "train.npz", work / "teacher" / "teacher" / "train.npz")
        if not (work / "teacher" / "eval").exists():
            (work / "teacher" / "eval").symlink_to(out / "eval")
        train_demo_teacher(work / "teacher", epochs=2, log=lambda *_: None)
    return fk.Inputs(out / "crawl", spec)


class Tally:
    """Faults per (stage, kind): injected, survived, and the first few failures' details."""

    def __init__(self) -> None:
        self.rows: dict[tuple[str, str], dict] = defaultdict(lambda: {"injected": 0, "survived": 0, "failures": []})

    def add(self, stage: str, kind: str, survived: bool, detail: object = None, injected: bool = True) -> None:
        row = self.rows[(stage, kind)]
        row["injected"] += injected
        row["survived"] += bool(survived and injected)
        if injected and not survived and len(row["failures"]) < 3:
            row["failures"].append(detail)
        print(f"  {stage:10s} {kind:28s} {'survived' if survived else 'FAILED'} {'' if survived else detail}",
              file=sys.stderr, flush=True)


def accounting(ws: Path, shards: list[Path]) -> tuple[int, int]:
    """(members in neither samples nor rejects, sample_ids that repeat) over these shards."""
    import pyarrow.parquet as pq
    from webdataset.tariterators import base_plus_ext

    from curation.shards import printable
    from tests.test_ingest_fuzz import members_per_tarfile

    samples = pq.read_table(ws / "samples").to_pylist() if any((ws / "samples").glob("*.parquet")) else []
    rejects = pq.read_table(ws / "rejects").to_pylist() if any((ws / "rejects").glob("*.parquet")) else []
    keys = {(r["shard"], r["key"]) for r in samples + rejects}
    lost = 0
    for shard in shards:
        if shard.is_file() and not shard.is_symlink():
            names = members_per_tarfile(shard)
            lost += sum((shard.stem, base_plus_ext(n)[0]) not in keys and (shard.stem, printable(n)) not in keys
                        for n in names)
    ids = [r["sample_id"] for r in samples]
    return lost, len(ids) - len(set(ids))


def run_hostile(work: Path, fuzz_examples: int) -> tuple[list[dict], dict]:
    """bench/hostile_ingest.py's inputs, measured its way (a process each) from this lean process
    (`--hostile-only`: building them costs memory a child would inherit as its starting peak), then
    accounted for here; then the mutated tars."""
    import hostile_ingest

    rows, totals = [], {"lost": 0, "duplicated": 0}
    inputs = json.loads((work / "hostile" / "inputs.json").read_text())  # built by `--hostile-build`
    measured = {}
    for i, (kind, shard) in enumerate(inputs.items()):  # all measured before this process imports more
        try:
            measured[kind] = hostile_ingest.measure(Path(shard), work / "hostile-ws" / f"ws{i}")
        except (ValueError, IndexError):  # the measuring process died without its JSON line
            measured[kind] = {"failed": ["the ingest process died"], "seconds": None, "peak_mib": None,
                              "grew_mib": None}
    for i, (kind, shard) in enumerate(inputs.items()):
        r, ws = measured[kind], work / "hostile-ws" / f"ws{i}"
        lost, dup = accounting(ws, [Path(shard)]) if (ws / "samples").exists() else (0, 0)
        totals["lost"] += lost
        totals["duplicated"] += dup
        print(f"  hostile    {kind}: {r['seconds']} s, lost {lost}, duplicated {dup}", file=sys.stderr, flush=True)
        rows.append({"kind": kind, "inputs": 1, "handled": int(not r["failed"] and not lost and not dup),
                     "seconds": r["seconds"] and round(r["seconds"], 2),
                     "peak_rss_mib": r["peak_mib"] and round(r["peak_mib"]),
                     "rss_growth_mib": r["grew_mib"] and round(r["grew_mib"])})
    rows.append(fuzz_tars(fuzz_examples, totals))
    return rows, totals


def fuzz_tars(examples: int, totals: dict) -> dict:
    """tests/test_ingest_fuzz.py's mutated tars through ingest_shard, in this process."""
    import resource

    from hypothesis import HealthCheck, given, settings

    from curation.ingest import ingest_shard
    from curation.shards import ShardRef
    from curation.validate import ValidationConfig
    from tests.test_ingest_fuzz import hostile_tar

    seen = {"n": 0, "ok": 0, "worst": 0.0}
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    @settings(max_examples=examples, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(tar=hostile_tar())
    def one(tar: bytes) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "fuzz.tar"
            path.write_bytes(tar)
            start = time.perf_counter()
            try:
                ingest_shard(str(Path(tmp) / "ws"), ShardRef(str(path), "fuzz", "1"), ValidationConfig())
                lost, dup = accounting(Path(tmp) / "ws", [path])
                ok = True
            except Exception:  # noqa: BLE001 - an exception is a failure to count, not to stop on
                lost, dup, ok = 0, 0, False
            seen["worst"] = max(seen["worst"], time.perf_counter() - start)
            seen["n"] += 1
            seen["ok"] += ok and not lost and not dup
            totals["lost"] += lost
            totals["duplicated"] += dup

    one()
    grew = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    return {"kind": "mutated tars (tests/test_ingest_fuzz.py's strategy)", "inputs": seen["n"], "handled": seen["ok"],
            "seconds": round(seen["worst"], 2), "peak_rss_mib": None, "rss_growth_mib": round(grew)}


def run_faults(args: argparse.Namespace, work: Path, inputs: fk.Inputs, tally: Tally) -> dict:
    from tests import faultkit as fk

    base = fk.Baseline(inputs, work / "baseline").build()
    stages = json.dumps({k: round(v, 1) for k, v in base.seconds.items()})
    print(f"baseline: startup {base.startup:.1f}s, stages {stages}",
          file=sys.stderr, flush=True)
    rng = random.Random(args.seed)
    extra = {"kills_landed_before_any_write": 0, "ingest_lost": 0, "ingest_duplicated": 0}
    for stage in fk.STAGES:
        for k in range(args.kills):
            result = fk.kill_stage(base, stage, work / "kill" / f"{stage}-{k}", rng)
            tally.add(stage, "SIGKILL + rerun", result.survived and not result.leftovers, result.__dict__,
                      injected=result.killed)
            extra["kills_landed_before_any_write"] += result.killed and result.written_before_kill == 0
            if stage == "ingest":
                lost, dup = accounting(work / "kill" / f"{stage}-{k}", sorted(inputs.crawl.glob("*.tar")))
                extra["ingest_lost"] += lost
                extra["ingest_duplicated"] += dup
    server = fk.ImageServer(delay_s=0.2)
    try:
        crawled = fk.CrawlBaseline.build(server, work / "crawl", n=40)
        for k in range(args.kills):
            result = fk.kill_crawl(crawled, base.startup, work / "kill" / f"crawl-{k}", rng)
            tally.add("crawl", "SIGKILL + rerun", result.survived and not result.leftovers, result.__dict__,
                      injected=result.killed)
        for fault in fk.STORAGE_FAULTS if not args.quick else ("disk full",):
            result = fk.crawl_storage_fault(crawled, fault, work / "storage" / f"crawl-{fault.replace(' ', '-')}")
            tally.add("crawl", fault, result.survived, result.__dict__)
    finally:
        server.close()

    for same in (False, True):
        r = fk.two_selects(base, work / "conc" / f"select-{same}", same)
        tally.add("select", "two at once", r.survived, r.__dict__)
        extra.setdefault("select_one_failed_cleanly", 0)
        extra["select_one_failed_cleanly"] += r.survived and r.returncodes.count(0) == 1
        r = fk.two_ingests(base, work / "conc" / f"ingest-{same}", same)
        tally.add("ingest", "two at once", r.survived, r.__dict__)
        lost, dup = accounting(work / "conc" / f"ingest-{same}", sorted(inputs.crawl.glob("*.tar")))
        extra["ingest_lost"] += lost
        extra["ingest_duplicated"] += dup
    r = fk.score_while_querying(base, work / "conc" / "score")
    tally.add("score", "while sql queries run", r.survived, r.__dict__)
    extra["sql_queries_beside_score"] = len(r.returncodes) - 2  # less the score run and the final check

    kinds = list(fk.CORRUPTIONS) if not args.quick else ["garbage header", "garbage blocks"]
    for kind in kinds:
        r = fk.corrupt_catalog(base, work / "corrupt" / kind.replace(" ", "-"), kind)
        tally.add("catalog", "corrupt: " + kind, r.survived, r.__dict__)

    stages = fk.STAGES if not args.quick else ("embed", "select")
    for stage in stages:
        for fault in fk.STORAGE_FAULTS:
            r = fk.storage_fault(base, stage, fault, work / "storage" / f"{stage}-{fault.replace(' ', '-')}")
            tally.add(stage, fault, r.survived, r.__dict__)
            extra.setdefault("storage_mechanisms", set()).add(r.how)
    extra["storage_mechanisms"] = sorted(extra.get("storage_mechanisms", ()))
    return extra


def markdown(report: dict) -> str:
    columns = {"SIGKILL + rerun": "SIGKILL, rerun", "two at once": "two at once",
               "while sql queries run": "two at once", "disk full": "disk full",
               "read-only filesystem": "read-only fs", "no permission": "no permission", "corrupt": "corrupt catalog"}
    cells: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
    for row in report["faults"]:
        column = columns[row["fault"].split(":")[0]]
        cells[(row["stage"], column)][0] += row["survived"]
        cells[(row["stage"], column)][1] += row["injected"]
    stages = list(dict.fromkeys(row["stage"] for row in report["faults"]))
    heads = list(dict.fromkeys(columns.values()))
    lines = ["faults survived / injected:", "", "| stage | " + " | ".join(heads) + " |",
             "|---|" + "---:|" * len(heads)]
    for stage in stages:
        row = [f"{cells[(stage, h)][0]}/{cells[(stage, h)][1]}" if (stage, h) in cells else "" for h in heads]
        lines.append(f"| {stage} | " + " | ".join(row) + " |")
    lines += ["", "| hostile input | inputs | handled | wall s (worst) | ingest peak RSS MiB (growth past imports) |",
              "|---|---:|---:|---:|---:|"]
    for row in report["hostile"]:
        rss = f"{row['peak_rss_mib']} ({row['rss_growth_mib']})" if row["peak_rss_mib"] is not None else \
            f"in-process: +{row['rss_growth_mib']} in all"
        lines.append(f"| {row['kind']} | {row['inputs']} | {row['handled']} | {row['seconds']} | {rss} |")
    s, w = report["summary"], report["summary"]["worst_hostile"]
    lines += ["", f"Faults survived: {s['survived']} of {s['injected']}. Samples lost: {s['samples_lost']}, "
              f"duplicated: {s['samples_duplicated']}. Slowest hostile input: {w['kind']} ({w['seconds']} s, peak "
              f"RSS {w['peak_rss_mib']} MiB, {w['rss_growth_mib']} MiB past the imports)."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=5, help="SIGKILLs per stage (default: %(default)s)")
    parser.add_argument("--size", type=int, default=800, help="samples in the demo crawl (default: %(default)s)")
    parser.add_argument("--shards", type=int, default=4, help="shards in the demo crawl (default: %(default)s)")
    parser.add_argument("--fuzz", type=int, default=100, help="mutated tars (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true",
                        help="CI size: 1 kill per stage, 400 samples in 3 shards, fewer corruptions and storage faults")
    parser.add_argument("--work", default=None, help="working folder (default: a temporary one, removed after)")
    parser.add_argument("--hostile-build", action="store_true", help=argparse.SUPPRESS)  # child processes
    parser.add_argument("--hostile-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.hostile_build:
        import hostile_ingest

        built = hostile_ingest.build(Path(args.work) / "hostile")
        (Path(args.work) / "hostile" / "inputs.json").write_text(json.dumps({k: str(v) for k, v in built.items()}))
        return
    if args.hostile_only:
        print(json.dumps(run_hostile(Path(args.work), args.fuzz)))
        return
    if args.quick:
        args.kills, args.size, args.shards, args.fuzz = 1, 400, 3, 20
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="webdistill-faults-"))
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    try:
        tally = Tally()
        inputs = build_inputs(work, args.size, args.shards)
        extra = run_faults(args, work, inputs, tally)
        subprocess.run([sys.executable, __file__, "--hostile-build", "--work", str(work)], check=True)
        child = subprocess.run([sys.executable, __file__, "--hostile-only", "--work", str(work), "--fuzz",
                                str(args.fuzz)], stdout=subprocess.PIPE, text=True, check=True)
        hostile, totals = json.loads(child.stdout.strip().splitlines()[-1])
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    faults = [{"stage": stage, "fault": kind, **row} for (stage, kind), row in tally.rows.items()]
    worst = max((row for row in hostile if row["peak_rss_mib"] is not None), key=lambda row: row["seconds"] or 0)
    report = {
        "config": {"kills_per_stage": args.kills, "crawl": [args.size, args.shards], "fuzz_tars": args.fuzz,
                   "quick": args.quick},
        "faults": faults, "hostile": hostile,
        "summary": {
            "injected": sum(r["injected"] for r in faults), "survived": sum(r["survived"] for r in faults),
            "samples_lost": totals["lost"] + extra["ingest_lost"],
            "samples_duplicated": totals["duplicated"] + extra["ingest_duplicated"],
            "worst_hostile": {k: worst[k] for k in ("kind", "seconds", "peak_rss_mib", "rss_growth_mib")},
            "seconds": round(time.perf_counter() - start), **{k: v for k, v in extra.items()
                                                             if not k.startswith("ingest_")},
        },
    }
    print(json.dumps(report, indent=2, default=str))
    print()
    print(markdown(report))


if __name__ == "__main__":
    main()
