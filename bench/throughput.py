"""Throughput, each stage beside its floor, in one run: ratios of medians, with the spread.

    python bench/throughput.py [--n 4000] [--repeats 3] [--index-n 100000] [--distill-samples 1024]
    python bench/throughput.py --quick      # small sizes, one distill repeat (CI)

On one crawl from bench/make_scale_crawl.py, ingested once:
- ingest (1 worker: read, fully decode, hash, parquet) against a bare decode loop (read every
  member, Image.open + load: the floor, since ingest must decode); and 2 workers against 1;
- embed (the real stage: streaming shards, decoding in a worker, batching, writing .npy) against
  the same embedder's bare forward on pre-decoded tensors;
- score pass 1 against the bare teacher forward on pre-decoded tensors, with ODIN (the stage and
  the floor both pay ODIN's backward and second forward) and without;
- index build and the all-pairs near-duplicate query on --index-n clustered vectors (IVF, as
  `webdistill index` above its threshold) against exact search of a subset, scaled;
- distillation with a stored teacher against a live one, and 2 processes against 1
  (bench/distill_throughput.py, run as it is, its JSON read back).
The cases of a group alternate --repeats times, so a load that drifts hits them alike. The
models are the scale bench's (bench/scale.py): a 28 px small CNN teacher and embedder, untrained.
Prints JSON, then a markdown table.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the CLI: idle threads sleep, leaving CPU to decoders

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.embed_throughput import predecoded  # noqa: E402
from bench.make_scale_crawl import make_crawl  # noqa: E402
from bench.output import emit  # noqa: E402
from bench.scale import write_specs  # noqa: E402
from curation import score_fns as sf  # noqa: E402
from curation.embed import embed  # noqa: E402
from curation.embedders import make_embedder  # noqa: E402
from curation.ingest import ingest  # noqa: E402
from curation.score import BatchScorer, ScoreConfig, _normalise, score_pass1  # noqa: E402
from curation.workspace import Workspace  # noqa: E402


def spread(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 1), "min": round(min(values), 1),
            "max": round(max(values), 1), "runs": len(values)}


def bare_decode(shards: list[Path]) -> tuple[int, float]:
    """Read every member and fully decode every image: what any ingest must at least do."""
    start, n = time.perf_counter(), 0
    for shard in shards:
        with tarfile.open(shard) as tar:
            for info in tar:
                if info.name.endswith((".jpg", ".png")):
                    Image.open(io.BytesIO(tar.extractfile(info).read())).load()
                    n += 1
    return n, time.perf_counter() - start


def timed_ingest(shards: list[Path], workers: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        s = ingest(Workspace(Path(tmp)), [str(p) for p in shards], workers=workers, progress=False)
        return sum(r.n_read for r in s.shards) / (time.perf_counter() - start)


def bare_rate(fn, x: torch.Tensor, batch: int) -> float:
    start = time.perf_counter()
    for i in range(0, len(x), batch):
        fn(x[i:i + batch])
    return len(x) / (time.perf_counter() - start)


def ingest_group(shards, repeats) -> dict:
    bare, one, two = [], [], []
    for _ in range(repeats):
        n, t = bare_decode(shards)
        bare.append(n / t)
        one.append(timed_ingest(shards, 1))
        two.append(timed_ingest(shards, 2))
    return {"bare decode loop": spread(bare), "ingest, 1 worker": spread(one), "ingest, 2 workers": spread(two)}


def embed_group(ws: Workspace, shards, embedder_spec: Path, repeats: int, batch: int, workers: int) -> dict:
    embedder = make_embedder("teacher", teacher=str(embedder_spec), device="cpu", trust_model_code=True)
    x = predecoded(shards, embedder.preprocess, 16 * batch)
    pipe, bare = [], []
    for _ in range(repeats):
        shutil.rmtree(ws.root / "embeddings", ignore_errors=True)
        s = embed(ws, embedder, batch_size=batch, workers=workers, progress=False)
        pipe.append(s.samples / s.seconds)
        bare.append(bare_rate(embedder.encode_images, x, batch))
    return {"embed stage": spread(pipe), "bare embedder forward": spread(bare)}


def score_group(ws: Workspace, shards, teacher: Path, repeats: int, batch: int, workers: int) -> dict:
    scorer = BatchScorer(ScoreConfig(teacher=str(teacher), odin=False))
    t = scorer.teacher
    x = predecoded(shards, scorer.preprocess, 16 * batch)

    def forward(xb):
        with torch.no_grad():
            return t.module(_normalise(xb, t.mean, t.std))

    def forward_odin(xb):
        forward(xb)
        return sf.odin(t.module, _normalise(xb, t.mean, t.std), t.std)

    out = {k: [] for k in ("score pass 1, ODIN", "bare forward + ODIN", "score pass 1, no ODIN", "bare forward")}
    for _ in range(repeats):
        for odin in (True, False):
            shutil.rmtree(ws.root / "scores", ignore_errors=True)
            config = ScoreConfig(teacher=str(teacher), odin=odin, batch_size=batch, workers=workers)
            s = score_pass1(ws, config, progress=False)
            out[f"score pass 1, {'ODIN' if odin else 'no ODIN'}"].append(s.samples / s.seconds)
            out["bare forward + ODIN" if odin else "bare forward"].append(
                bare_rate(forward_odin if odin else forward, x, batch))
    return {k: spread(v) for k, v in out.items()}


def index_group(n: int, repeats: int) -> dict:
    from bench.dedup_1m import make_vectors
    from curation.index import IndexConfig, make_index, similar_pairs

    x, _ = make_vectors(n, 64, n // 100, 0)
    config = IndexConfig(ivf_threshold=1)
    build, query, exact = [], [], []
    sub = x[:min(n, 5000)]
    import faiss
    for _ in range(repeats):
        start = time.perf_counter()
        index, _ = make_index(x, config)
        index.add(x)
        build.append(n / (time.perf_counter() - start))
        start = time.perf_counter()
        similar_pairs(index, x, config.dup_threshold, config.dup_max_neighbors)
        query.append(n / (time.perf_counter() - start))
        flat = faiss.IndexFlatIP(x.shape[1])
        flat.add(x)
        start = time.perf_counter()
        flat.range_search(sub, config.dup_threshold)  # exact: every query against all n vectors
        exact.append(len(sub) / (time.perf_counter() - start))
    return {f"IVF build ({n:,} vectors)": spread(build), f"IVF near-dup query ({n:,} queries)": spread(query),
            f"exact range search ({n:,} vectors, per query)": spread(exact)}


def distill_group(samples: int, repeats: int) -> dict:
    # batch 32: the job's steady figure needs more than 4 steps per epoch and process after the first window
    cmd = [sys.executable, str(ROOT / "bench" / "distill_throughput.py"), "--samples", str(samples),
           "--repeats", str(repeats), "--shards", "2", "--batch-size", "32"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=os.environ | {"PYTHONPATH": str(ROOT)})
    if done.returncode != 0:
        return {"distill error": {"error": done.stderr.strip().splitlines()[-1:] or ["failed"]}}
    result = json.loads(done.stdout.split("\n\n")[0])
    runs = result["steady_runs"]
    return {"distill, stored teacher, 1 process": spread(runs["stored_1proc"]),
            "distill, live teacher, 1 process": spread(runs["live_1proc"]),
            "distill, stored teacher, 2 processes": spread(runs["stored_2proc"])}


def logged(name: str, fn, *args) -> dict:
    """Run one group, saying on stderr how long it took (a slow shared machine shows where time goes)."""
    start = time.perf_counter()
    out = fn(*args)
    print(f"throughput: {name} group done in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return out


RATIOS = [  # (what, numerator, denominator, target)
    ("ingest / bare decode loop", "ingest, 1 worker", "bare decode loop", 0.8),
    ("ingest 2 workers / 1", "ingest, 2 workers", "ingest, 1 worker", None),
    ("embed / bare forward", "embed stage", "bare embedder forward", 0.9),
    ("score / bare forward, ODIN", "score pass 1, ODIN", "bare forward + ODIN", 0.9),
    ("score / bare forward, no ODIN", "score pass 1, no ODIN", "bare forward", 0.9),
    ("distill live / stored teacher", "distill, live teacher, 1 process", "distill, stored teacher, 1 process", None),
    ("distill 2 processes / 1", "distill, stored teacher, 2 processes", "distill, stored teacher, 1 process", None),
]


def ratios(rates: dict) -> list[dict]:
    out = []
    for what, num, den, target in RATIOS:
        if num in rates and den in rates:
            r = rates[num]["median"] / rates[den]["median"]
            out.append({"ratio": what, "value": round(r, 3), "target": target,
                        "meets_target": None if target is None else r >= target,
                        "numerator_per_s": rates[num], "denominator_per_s": rates[den]})
    return out


def markdown(result: dict) -> str:
    lines = ["| ratio | value | target | numerator /s: median (min-max) | denominator /s: median (min-max) |",
             "|---|---:|---:|---:|---:|"]
    for r in result["ratios"]:
        a, b = r["numerator_per_s"], r["denominator_per_s"]
        lines.append(f"| {r['ratio']} | {r['value']:.2f} | {'' if r['target'] is None else '>= ' + str(r['target'])} | "
                     f"{a['median']:,.0f} ({a['min']:,.0f}-{a['max']:,.0f}) | "
                     f"{b['median']:,.0f} ({b['min']:,.0f}-{b['max']:,.0f}) |")
    lines += ["", "| case | per second: median (min-max), runs |", "|---|---:|"]
    lines += [f"| {k} | {v['median']:,.0f} ({v['min']:,.0f}-{v['max']:,.0f}), {v['runs']} |"
              for k, v in result["rates"].items() if "median" in v]
    return "\n".join(lines)


GROUPS = ("ingest", "embed", "score", "index", "distill")


def measure_groups(args) -> dict:
    work = Path(tempfile.mkdtemp(prefix="webdistill-throughput-"))
    rates: dict = {}
    try:
        make_crawl(work / "crawl", args.n, shard_size=max(100, args.n // 2), workers=1)
        shards = sorted((work / "crawl").glob("*.tar"))
        teacher, embedder = write_specs(work / "models")
        ws = Workspace(work / "ws")
        if "ingest" in args.groups:
            rates |= logged("ingest", ingest_group, shards, args.repeats)
        if {"embed", "score"} & set(args.groups):
            ingest(ws, [str(s) for s in shards], workers=2, progress=False)
        if "embed" in args.groups:
            rates |= logged("embed", embed_group, ws, shards, embedder, args.repeats, args.batch_size,
                            args.decode_workers)
        if "score" in args.groups:
            rates |= logged("score", score_group, ws, shards, teacher, args.repeats, args.batch_size,
                            args.decode_workers)
        if "index" in args.groups:
            rates |= logged("index", index_group, args.index_n, args.repeats)
        if "distill" in args.groups:
            rates |= logged("distill", distill_group, args.distill_samples, args.distill_repeats)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rates


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=4000, help="crawl samples")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--index-n", type=int, default=100_000)
    ap.add_argument("--distill-samples", type=int, default=1024)
    ap.add_argument("--distill-repeats", type=int, default=3)
    ap.add_argument("--decode-workers", type=int, default=1,
                    help="embed and score decode workers; 0 decodes in the main process (the workers run at idle "
                         "priority, which a machine loaded past its cores starves)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--groups", nargs="+", default=list(GROUPS), choices=list(GROUPS))
    ap.add_argument("--join", nargs="+", default=None, metavar="JSON",
                    help="measure nothing: join the rates of these result files (groups run apart)")
    ap.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    args = ap.parse_args(argv)
    if args.quick:
        args.n, args.repeats, args.index_n, args.distill_samples, args.distill_repeats = 400, 2, 3000, 384, 1
        args.batch_size = 64
    torch.set_num_threads(1)  # one core per side, as the stages run on shared machines
    if args.join:
        parts = [json.loads(Path(f).read_text()) for f in args.join]
        rates = {k: v for p in parts for k, v in p["rates"].items() if "median" in v}
    else:
        rates = measure_groups(args)
    result = {"n": args.n, "repeats": args.repeats, "batch_size": args.batch_size, "torch_threads": 1,
              "decode_workers": args.decode_workers,
              "cpus": os.cpu_count(), "load_average_at_end": [round(v, 2) for v in os.getloadavg()],
              "ratios": ratios(rates), "rates": rates}
    emit(result, markdown(result), args.out)
    return result


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
