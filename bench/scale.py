"""Scale: ingest -> embed -> index -> score -> select at several N, each stage a `webdistill` process.

    python bench/scale.py [--sizes 10000 100000] [--stored-sizes 1000000] [--out bench/results/scale]
    python bench/scale.py --quick          # N = 500, 2000; stored 5000 (what CI runs)
    python bench/scale.py --sizes 1000000 --stored-sizes --work W --keep --stages ingest embed --out A
    python bench/scale.py --sizes 1000000 --stored-sizes --work W --keep --stages index score select --out B
    python bench/scale.py --join A.json B.json --out C   # one N measured in two parts, one row

Per N, a crawl from bench/make_scale_crawl.py (10% planted in-domain glyphs), then every stage
through the CLI in a child process, as a user runs it: its wall time, its peak RSS (the sum over
the stage's process tree, sampled every 0.2 s, since the decode workers run beside the main
process; and the largest single process's high-water mark from wait4, which sampling cannot
miss), samples/s, and per stage the slope of log(time) against log(N) (1.0 = linear).

Models: the embedder is `tests.models_for_tests:thumbnail` (12x12 thumbnail features: cheap,
and near-duplicates are near, so the index's pixel check sees a realistic candidate load); the
teacher is the demo teacher's architecture (`distill.models:mnist_teacher`, 28 px) with
untrained weights: the compute of a small teacher, not its judgement. Score runs without ODIN
(bench/throughput.py measures ODIN's cost). Select keeps the top 10% by the fused score after dedup.

"Stored" sizes skip the image stages: bench/dedup_blowup.write_workspace writes the samples
and embeddings tables of N vectors, pass-1 score files (random columns, float16 features) are
written as pass 1 would, stamped so that `webdistill score` skips pass 1; then `index`
(IVF above --ivf-threshold, no pixel check: there are no images) and `score` (pass 2 alone:
reference set, Mahalanobis, kNN, ReAct, fusion over the pool) run through the CLI. That is how
10^6 is reached on two shared cores. Prints JSON, then a markdown table; writes both to --out.

    python bench/scale.py --runner dask://local --sizes 10000 [--out bench/results/scale-dask]

`--runner` compares runners instead: per N, the same stages (ingest, embed, index, score, select)
run as one Prefect flow (`webdistill run`) twice, side by side on the same crawl: with the local
runner (a 2-thread pool) and with RUNNER (`dask://local`: a temporary 2-worker LocalCluster, one
thread each; or `dask://HOST:PORT` of a started cluster). It reports each run's wall time and RSS,
the speed-up (local / RUNNER), and whether the two workspaces are identical artifact by artifact
(tests/faultkit.workspace_digest: parquet rows, json without timing keys, npy/faiss bytes, every
catalog table). Decode runs in the task's process (`workers: 0`: a Dask worker is a daemon and
may not start decode processes) and each embed/score task takes one shard, so 2 workers have work.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.make_scale_crawl import make_crawl  # noqa: E402
from bench.output import emit  # noqa: E402

STAGES = ("ingest", "embed", "index", "score", "select")
STORED_STAGES = ("index", "score")
EMBEDDER = "tests.models_for_tests:thumbnail"
TEACHER = {"factory": "distill.models:mnist_teacher", "input_size": 28, "mean": [0.1307] * 3, "std": [0.3081] * 3,
           "classes": [str(i) for i in range(10)]}


def measure(argv: list[str], env: dict, log: Path) -> dict:
    """Run one command; its wall time, exit status and peak RSS (process-tree sum, sampled; and the
    largest single process's high-water mark from wait4)."""
    start = time.perf_counter()
    with open(log, "ab") as out:
        out.write(("$ " + " ".join(argv) + "\n").encode())
        out.flush()
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        parent, tree_peak = psutil.Process(proc.pid), 0
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            try:
                tree = [parent, *parent.children(recursive=True)]
                tree_peak = max(tree_peak, sum(_rss(p) for p in tree))
            except psutil.NoSuchProcess:
                pass
            time.sleep(0.2)
        proc.returncode = os.waitstatus_to_exitcode(status)
    return {"seconds": round(time.perf_counter() - start, 2), "rc": proc.returncode,
            "peak_rss_tree_mib": round(tree_peak / 2**20, 1),
            "maxrss_one_process_mib": round(usage.ru_maxrss / 1024, 1)}


def _rss(p: psutil.Process) -> int:
    try:
        return p.memory_info().rss
    except psutil.Error:
        return 0


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "flows.cli", *args]


def pipeline(ws: Path, crawl: Path, teacher: Path, embedder: Path, n: int, decode_workers: int = 1
             ) -> dict[str, list[str]]:
    w, dw = ["-w", str(ws)], str(decode_workers)
    keep = max(1, n // 10)
    return {
        "ingest": cli("ingest", *w, str(crawl), "--workers", "2"),
        "embed": cli("embed", *w, "--embedder", "teacher", "--teacher", str(embedder), "--trust-model-code",
                     "--workers", dw, "--device", "cpu"),
        "index": cli("index", *w, "--embedder", "teacher", "--workers", "1"),
        "score": cli("score", *w, "--teacher", str(teacher), "--no-odin", "--workers", dw, "--device", "cpu"),
        "select": cli("select", *w, "--name", "top", "--policy", f"dedup | topk:k={keep};by=fused"),
    }


def write_specs(folder: Path) -> tuple[Path, Path]:
    """The teacher's spec with untrained weights drawn once from a fixed seed: every load, in any
    process, is the same model (a factory without weights would draw new ones at each load, so two
    runs, or two workers, would score with different teachers)."""
    import torch

    from distill.models import mnist_teacher

    folder.mkdir(parents=True, exist_ok=True)
    teacher, embedder = folder / "teacher.json", folder / "embedder.json"
    torch.manual_seed(0)
    torch.save(mnist_teacher().state_dict(), folder / "teacher.pt")
    teacher.write_text(json.dumps({**TEACHER, "weights": "teacher.pt"}))
    embedder.write_text(json.dumps({**TEACHER, "factory": EMBEDDER}))  # thumbnail features: no weights
    return teacher, embedder


def stored_workspace(ws: Path, n: int, teacher: Path, dim: int = 64, shard_size: int = 10_000, seed: int = 0) -> None:
    """Samples, embeddings and pass-1 scores of n samples, as ingest, embed and score's pass 1 write
    them, without images: for the stages that read only those (index without the pixel check, pass 2)."""
    from bench.dedup_1m import make_vectors
    from bench.dedup_blowup import write_workspace
    from curation.score import SHAPED, ScoreConfig, _pass1_table, _write_head
    from curation.shard_reader import shard_jobs
    from curation.workspace import Workspace, atomic_path, config_hash, write_parquet_atomic

    x, _ = make_vectors(n, dim, n // 100, seed)
    write_workspace(ws, x, np.arange(n), shard_size=shard_size, seed=seed)
    del x
    config = ScoreConfig(teacher=str(teacher), odin=False)
    workspace, rng = Workspace(ws), np.random.default_rng(seed)
    run = ws / "scores" / config.name
    import torch
    head = (torch.from_numpy(rng.standard_normal((10, dim)).astype(np.float32) / 8), torch.zeros(10))
    _write_head(run, head)
    for job in shard_jobs(workspace, {"config_hash": config_hash(config.pass1_part())}):
        m = len(job.sample_ids)
        feats = np.abs(rng.standard_normal((m, dim))).astype(np.float32)  # post-ReLU features
        logits = feats @ head[0].numpy().T
        conf = np.exp(logits.max(1)) / np.exp(logits).sum(1)
        label = logits.argmax(1).astype(np.int32)
        out = {"teacher_label": label, "teacher_conf": conf, "msp": conf, "max_logit": logits.max(1),
               "energy": np.log(np.exp(logits).sum(1)), "neg_entropy": rng.standard_normal(m),
               "gen": rng.standard_normal(m), "bn_score": np.full(m, np.nan), "odin": np.full(m, np.nan),
               "kd3_label": label, "kd3_conf": conf, "teacher_logits": logits.astype(np.float16),
               **{k: rng.standard_normal(m) for k in SHAPED}}
        with atomic_path(run / "features" / f"{job.shard}.npy") as tmp, open(tmp, "wb") as fh:
            np.save(fh, feats.astype(np.float16))
        out = {k: (v.astype(np.float32) if v.dtype == np.float64 else v) for k, v in out.items()}
        write_parquet_atomic(_pass1_table(job, out, np.ones(m, bool)), run / "pass1" / f"{job.shard}.parquet",
                             {"stamp": job.stamp, "config": {}, "feature_note": None})


def flow_config(folder: Path, crawl: Path, teacher: Path, embedder: Path, n: int, runner: str) -> Path:
    """The pipeline YAML of the stages above, as one Prefect flow on `runner`."""
    import yaml

    config = {"name": "scale", "workspace": str(folder / "ws"), "runner": runner, "workers": 2,
              "trust_model_code": True,  # the embedder is a module:factory spec (tests.models_for_tests)
              "ingest": {"shards": [str(crawl)]},
              "embed": {"embedder": "teacher", "teacher": str(embedder), "workers": 0, "shards_per_task": 1,
                        "device": "cpu"},
              "score": {"teacher": str(teacher), "options": {"odin": False, "workers": 0, "device": "cpu"},
                        "shards_per_task": 1},
              "select": {"policy": f"dedup | topk:k={max(1, n // 10)};by=fused"}}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


GROUPS = ("embeddings/", "scores/", "selections/", "samples/", "index/", "catalog:")


def compare_runners(sizes: list[int], runner: str, work: Path, keep: bool, partial: Path | None = None) -> dict:
    """Per N: the flow on the local runner, then on `runner`; times, RSS, speed-up, identical artifacts."""
    env = os.environ | {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                        "DO_NOT_TRACK": "1"}
    teacher, embedder = write_specs(work / "models")
    log = work / "commands.log"
    rows: list[dict] = []
    # one Prefect server for both runs, as a cluster has: without one, each run and each Dask worker
    # would start a temporary server of its own (seconds each, on the cores the stages need)
    from prefect.server.api.server import SubprocessASGIServer

    from tests.ports import free_port

    # its own port: SubprocessASGIServer() without one is Prefect's shared default, which a test
    # harness may own, and stopping it would stop theirs
    server = SubprocessASGIServer(port=free_port())
    server.start(timeout=120)
    env = env | {"PREFECT_API_URL": server.api_url}
    try:
        for n in sizes:
            _compare_at(n, runner, work, keep, env, teacher, embedder, log, rows, partial)
    finally:
        server.stop()
    return runner_summary(rows, log)


def _compare_at(n: int, runner: str, work: Path, keep: bool, env: dict, teacher: Path, embedder: Path, log: Path,
                rows: list[dict], partial: Path | None) -> None:
    """One N: the crawl, the flow on each runner, and the comparison, appended to `rows`."""
    from tests.faultkit import differences, workspace_digest

    crawl = work / f"crawl-{n}"
    made = make_crawl(crawl, n, shard_size=min(10_000, max(250, n // 4)))
    row = {"n": n, "kind": "runners", "shards": made["shards"], "runs": {}}
    rows.append(row)
    digests = {}
    for label, spec in (("local", "local"), (runner_label(runner), runner)):
        folder = work / f"flow-{label}-{n}"
        shutil.rmtree(folder, ignore_errors=True)
        config = flow_config(folder, crawl, teacher, embedder, n, spec)
        row["runs"][label] = m = measure(cli("run", str(config)), env, log)
        m["runner"], m["samples_per_s"] = spec, round(n / m["seconds"], 1)
        m["stage_seconds"] = stage_seconds(log)
        digests[label] = workspace_digest(folder / "ws") if m["rc"] == 0 else {}
        if partial is not None:
            partial.write_text(json.dumps(runner_summary(rows, log), indent=2))
    local, other = digests.values()
    differ = differences(local, other)
    row["artifacts_compared"] = len(local)
    row["differing"] = differ
    row["identical"] = bool(local) and not differ
    row["identical_by_group"] = {g: bool(local) and not any(k.startswith(g) for k in differ) for g in GROUPS}
    a, b = (r["seconds"] for r in row["runs"].values())
    row["speedup"] = round(a / b, 3)
    if not keep:
        shutil.rmtree(crawl, ignore_errors=True)
        for label in row["runs"]:
            shutil.rmtree(work / f"flow-{label}-{n}", ignore_errors=True)


def stage_seconds(log: Path) -> dict[str, float]:
    """The per-stage times `webdistill run` printed last in the log ("stage seconds: ingest 4.0, ...")."""
    lines = [line for line in log.read_text().splitlines() if line.startswith("stage seconds: ")]
    if not lines:
        return {}
    pairs = (item.rsplit(" ", 1) for item in lines[-1].removeprefix("stage seconds: ").split(", "))
    return {stage: float(sec) for stage, sec in pairs}


def runner_label(spec: str) -> str:
    return spec.split("://")[0] if "://" in spec else spec


def runner_summary(rows: list[dict], log: Path) -> dict:
    return {"rows": rows, "all_ok": all(m["rc"] == 0 for r in rows for m in r["runs"].values()),
            "all_identical": all(r.get("identical") for r in rows), "cpus": os.cpu_count(),
            "load_average_at_end": [round(v, 2) for v in os.getloadavg()], "commands_log": str(log)}


def runner_markdown(result: dict) -> str:
    lines = ["| N | runner | wall s | stages (s) | samples/s | peak RSS, process tree (MiB) | rc | speed-up vs local | "
             "artifacts identical |", "|---:|---|---:|---|---:|---:|---:|---:|---|"]
    for r in result["rows"]:
        for label, m in r["runs"].items():
            same = "" if label == "local" else \
                (f"yes ({r['artifacts_compared']} of {r['artifacts_compared']})" if r.get("identical")
                 else f"no: {', '.join(r.get('differing', [])[:5]) or 'a run failed'}")
            speed = "1" if label == "local" else r.get("speedup", "")
            stages = ", ".join(f"{k} {v:g}" for k, v in m.get("stage_seconds", {}).items())
            lines.append(f"| {r['n']:,} | {m['runner']} | {m['seconds']} | {stages} | {m['samples_per_s']:,.0f} | "
                         f"{m['peak_rss_tree_mib']:,.0f} | {m['rc']} | {speed} | {same} |")
    return "\n".join(lines)


def stored_commands(ws: Path, teacher: Path) -> dict[str, list[str]]:
    w = ["-w", str(ws)]
    return {"index": cli("index", *w, "--embedder", "bench", "--verify", "none", "--ivf-threshold", "50000"),
            "score": cli("score", *w, "--teacher", str(teacher), "--no-odin")}


def slope(ns: list[int], seconds: list[float]) -> float | None:
    """Least-squares slope of log(seconds) against log(N); None below two sizes."""
    pts = [(math.log(n), math.log(max(s, 1e-3))) for n, s in zip(ns, seconds)]
    if len(pts) < 2:
        return None
    return round(float(np.polyfit(*zip(*pts), 1)[0]), 3)


def run_sizes(sizes: list[int], stored: list[int], work: Path, keep: bool, partial: Path | None = None,
              decode_workers: int = 1, stages: tuple[str, ...] = STAGES) -> dict:
    env = os.environ | {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                        "DO_NOT_TRACK": "1"}
    teacher, embedder = write_specs(work / "models")
    log = work / "commands.log"
    rows: list[dict] = []

    def save() -> None:  # after every stage: a run stopped at its deadline still leaves what it measured
        if partial is not None:
            partial.write_text(json.dumps(summarize(rows, log), indent=2))

    for n in sizes:
        crawl, ws = work / f"crawl-{n}", work / f"ws-{n}"
        if "ingest" in stages:
            shutil.rmtree(ws, ignore_errors=True)
        elif not ws.is_dir():
            raise SystemExit(f"--stages {' '.join(stages)} continues the workspace {ws}, which does not exist: "
                             "run the earlier stages with the same --work and --keep first")
        # a later stage alone reuses the kept crawl (the same seed writes the same crawl anyway)
        made = make_crawl(crawl, n, shard_size=min(10_000, max(250, n // 4))) \
            if "ingest" in stages or not (crawl / "ground_truth.parquet").exists() else {"seconds": None}
        row = {"n": n, "kind": "images", "crawl_seconds": made["seconds"], "stages": {}}
        rows.append(row)
        commands = pipeline(ws, crawl, teacher, embedder, n, decode_workers)
        for stage, argv in ((s, commands[s]) for s in stages):
            row["stages"][stage] = m = measure(argv, env, log)
            m["samples_per_s"] = round(n / m["seconds"], 1)
            save()
            if m["rc"] != 0:
                break
        if not keep:
            shutil.rmtree(crawl, ignore_errors=True)
            shutil.rmtree(ws, ignore_errors=True)
    for n in stored:
        ws = work / f"stored-{n}"
        shutil.rmtree(ws, ignore_errors=True)
        started = time.perf_counter()
        stored_workspace(ws, n, teacher)
        row = {"n": n, "kind": "stored", "write_seconds": round(time.perf_counter() - started, 1), "stages": {},
               "score_pass1_skipped": False}
        rows.append(row)
        for stage, argv in stored_commands(ws, teacher).items():
            row["stages"][stage] = m = measure(argv, env, log)
            m["samples_per_s"] = round(n / m["seconds"], 1)
            save()
        record = json.loads((ws / "scores" / "default" / "run.json").read_text()).get("summary", {}) \
            if (ws / "scores" / "default" / "run.json").exists() else {}
        # the score timing is pass 2's only if pass 1 was skipped everywhere
        row["score_pass1_skipped"] = bool(record.get("finalized")) and not record.get("scored")
        save()
        if not keep:
            shutil.rmtree(ws, ignore_errors=True)
    return summarize(rows, log)


def _merged(rows: list[dict]) -> list[dict]:
    """Rows of one N and kind measured in parts (`--stages`, then `--join`) as one row, stages in order."""
    merged: dict[tuple, dict] = {}
    for r in rows:
        into = merged.setdefault((r["n"], r["kind"]), {**r, "stages": {}})
        into["stages"].update(r["stages"])
        if into.get("crawl_seconds") is None:
            into["crawl_seconds"] = r.get("crawl_seconds")
    order = {s: i for i, s in enumerate(STAGES)}
    for r in merged.values():
        r["stages"] = dict(sorted(r["stages"].items(), key=lambda kv: order.get(kv[0], len(order))))
    return list(merged.values())


def summarize(rows: list[dict], log: Path | str) -> dict:
    """Slopes, totals and the largest N of the rows measured so far (several runs' rows may be joined)."""
    rows = _merged(rows)
    slopes: dict[str, dict] = {"images": {}, "stored": {}}  # stored score is pass 2 alone: its own fit
    for kind, stages in (("images", STAGES), ("stored", STORED_STAGES)):
        for stage in stages:
            pts = sorted((r["n"], r["stages"][stage]["seconds"]) for r in rows if r["kind"] == kind
                         and stage in r["stages"] and r["stages"][stage]["rc"] == 0)
            slopes[kind][stage] = slope([p[0] for p in pts], [p[1] for p in pts])
    ok = all(m["rc"] == 0 for r in rows for m in r["stages"].values()) and all(
        r["score_pass1_skipped"] for r in rows if r["kind"] == "stored")
    largest = max((r["n"] for r in rows), default=0)
    return {"rows": rows, "slopes": slopes, "all_ok": ok, "largest_n": largest,
            "largest_n_all_stages": max((r["n"] for r in rows if r["kind"] == "images"
                                         and all(s in r["stages"] and r["stages"][s]["rc"] == 0 for s in STAGES)),
                                        default=0),
            "cpus": os.cpu_count(), "load_average_at_end": [round(v, 2) for v in os.getloadavg()],
            "commands_log": str(log)}


def markdown(result: dict) -> str:
    lines = ["| N | data | stage | wall s | samples/s | peak RSS, process tree (MiB) | largest process (MiB) | rc |",
             "|---:|---|---|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        for stage, m in r["stages"].items():
            lines.append(f"| {r['n']:,} | {r['kind']} | {stage} | {m['seconds']} | {m['samples_per_s']:,.0f} | "
                         f"{m['peak_rss_tree_mib']:,.0f} | {m['maxrss_one_process_mib']:,.0f} | {m['rc']} |")
    lines += ["", "| data | stage | slope of log time vs log N |", "|---|---|---:|"]
    lines += [f"| {kind} | {s} | {v if v is not None else 'n/a (one size)'} |"
              for kind, per in result["slopes"].items() for s, v in per.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="*", default=[10_000, 100_000], help="N run through every stage")
    ap.add_argument("--stored-sizes", type=int, nargs="*", default=[1_000_000],
                    help="N for index and score pass 2 on stored vectors and features (no images)")
    ap.add_argument("--quick", action="store_true", help="N = 500, 2000; stored 5000 (CI)")
    ap.add_argument("--work", default=None, help="scratch folder (default: a temporary one, removed)")
    ap.add_argument("--keep", action="store_true", help="keep the crawls and workspaces")
    ap.add_argument("--decode-workers", type=int, default=1,
                    help="embed and score --workers; 0 decodes in the main process (the workers run at idle "
                         "priority, which a machine loaded past its cores starves)")
    ap.add_argument("--out", default=None, help="write OUT.json and OUT.md (and OUT.partial.json as it goes)")
    ap.add_argument("--runner", default=None, metavar="SPEC",
                    help="compare runners: the stages as one Prefect flow on the local runner and on SPEC "
                         "(dask://local, dask://HOST:PORT), same crawl, artifacts and speed-up side by side")
    ap.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES),
                    help="run only these stages on images (a later one continues the workspace kept by an earlier "
                         "run with the same --work and --keep); join the parts' results with --join")
    ap.add_argument("--join", nargs="+", default=None, metavar="JSON",
                    help="measure nothing: join the rows of these result files (e.g. runs made in parallel)")
    args = ap.parse_args(argv)
    sizes, stored = ([500, 2000], [5000]) if args.quick else (args.sizes, args.stored_sizes)
    import tempfile

    if args.runner:
        work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="webdistill-scale-"))
        partial = Path(args.out + ".partial.json") if args.out else None
        started = {"command": " ".join(["python", "bench/scale.py", *(sys.argv[1:] if argv is None else argv)]),
                   "load_average_at_start": [round(v, 2) for v in os.getloadavg()]}
        try:
            result = compare_runners(args.sizes if not args.quick else [500], args.runner, work, args.keep, partial)
        finally:
            if not args.work and not args.keep:
                shutil.rmtree(work, ignore_errors=True)
        result = started | result
        emit(result, f"`{result['command']}`\n\n" + runner_markdown(result), args.out)
        return result
    if args.join:
        parts = [json.loads(Path(f).read_text()) for f in args.join]
        result = summarize([r for p in parts for r in p["rows"]], "; ".join(p["commands_log"] for p in parts))
    else:
        work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="webdistill-scale-"))
        partial = Path(args.out + ".partial.json") if args.out else None
        try:
            result = run_sizes(sizes, stored, work, args.keep, partial, args.decode_workers,
                               tuple(s for s in STAGES if s in args.stages))
        finally:
            if not args.work and not args.keep:
                shutil.rmtree(work, ignore_errors=True)
    emit(result, markdown(result), args.out)
    return result


if __name__ == "__main__":
    main()
