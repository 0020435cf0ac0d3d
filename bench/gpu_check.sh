#!/usr/bin/env bash
# The GPU paths in one short run (< 8 min on one H100-class GPU), printing one JSON object:
#   faiss-gpu: IVF index build + near-duplicate query, and k-means, on 10^6 x 64 vectors;
#   embed: open_clip ViT-B-32 fp16 (random weights: the compute is the same), bare forward img/s
#          at batch 256 (target >= 3,000 img/s) and the real `embed` stage on a generated crawl;
#   score: pass 1 on CUDA (the demo teacher's architecture, with ODIN) against the same on the CPU;
#   DDP:   the distillation job under torchrun with nccl, 1 process, then 2 processes on one GPU
#          (train.py puts rank r on cuda:r, so 2 ranks need 2 GPUs unless CUDA_VISIBLE_DEVICES
#          tricks are used: what happens is recorded, not assumed).
# Without a GPU it prints {"gpu": false, ...} and exits 0.
#
#   bash bench/gpu_check.sh [OUT.json]
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export PYTHONPATH=$PWD HF_HUB_OFFLINE=1 PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1
OUT=${1:-}
timeout 470 "$PY" - "$OUT" <<'EOF'
import json, os, sys, tempfile, time, traceback
from pathlib import Path

result = {"gpu": False}
out_path = sys.argv[1] if len(sys.argv) > 1 else ""


def emit():
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if out_path:
        Path(out_path).write_text(text + "\n")


def step(name, fn):
    start = time.perf_counter()
    try:
        result[name] = fn()
    except Exception as exc:  # noqa: BLE001 - a failed check is a finding, the others still run
        result[name] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}",
                        "where": traceback.format_exc().strip().splitlines()[-3:]}
    result.setdefault("seconds", {})[name] = round(time.perf_counter() - start, 1)


try:
    import torch
except ImportError as exc:
    result["reason"] = f"torch cannot be imported ({exc}); run `make setup` or set PYTHON"
    emit()
    sys.exit(0)

if not torch.cuda.is_available():
    result["reason"] = "no CUDA device visible to torch (torch.cuda.is_available() is False); nothing was checked"
    emit()
    sys.exit(0)

result |= {"gpu": True, "device": torch.cuda.get_device_name(0), "torch": torch.__version__,
           "cuda": torch.version.cuda, "gpus": torch.cuda.device_count()}
work = Path(tempfile.mkdtemp(prefix="gpu-check-"))


def faiss_gpu():
    import faiss
    if not hasattr(faiss, "StandardGpuResources"):
        return {"available": False, "note": f"faiss {faiss.__version__} has no GPU support (faiss-cpu installed)"}
    from bench.dedup_1m import make_vectors
    from curation.index import IndexConfig, make_index, similar_pairs
    x, _ = make_vectors(1_000_000, 64, 10_000, 0)
    res = faiss.StandardGpuResources()
    config = IndexConfig(ivf_threshold=1)
    t = time.perf_counter()
    cpu_index, kind = make_index(x, config)  # trained on the CPU, as `webdistill index` does
    gpu_index = faiss.index_cpu_to_gpu(res, 0, cpu_index)
    gpu_index.add(x)
    build = time.perf_counter() - t
    t = time.perf_counter()
    pairs = similar_pairs(gpu_index, x, config.dup_threshold, config.dup_max_neighbors)
    query = time.perf_counter() - t
    t = time.perf_counter()
    km = faiss.Kmeans(64, 1024, niter=20, gpu=True, seed=0)
    km.train(x)
    kmeans = time.perf_counter() - t
    return {"available": True, "vectors": len(x), "index": kind, "build_s": round(build, 2),
            "near_dup_query_s": round(query, 2), "pairs": int(len(pairs.i)), "kmeans_1024_s": round(kmeans, 2)}


def crawl(n=20_000):
    from bench.make_scale_crawl import make_crawl
    from curation.ingest import ingest
    from curation.workspace import Workspace
    made = make_crawl(work / "crawl", n, shard_size=5000, workers=min(8, os.cpu_count() or 1))
    ws = Workspace(work / "ws")
    ingest(ws, [str(p) for p in sorted((work / "crawl").glob("*.tar"))], workers=min(8, os.cpu_count() or 1),
           progress=False)
    return ws, made


def embed_cuda():
    from curation.embed import embed
    from curation.embedders import make_embedder
    e = make_embedder("open_clip:ViT-B-32", None, device="cuda", precision="fp16")
    x = torch.randint(0, 256, (256, 3, 224, 224), dtype=torch.uint8)
    for _ in range(3):
        e.encode_images(x)  # warm-up: cuDNN autotune, allocator
    torch.cuda.synchronize()
    t, reps = time.perf_counter(), 20
    for _ in range(reps):
        e.encode_images(x)
    torch.cuda.synchronize()
    bare = reps * len(x) / (time.perf_counter() - t)
    ws, made = crawl()
    s = embed(ws, e, batch_size=256, workers=min(8, os.cpu_count() or 1), progress=False)
    return {"model": "ViT-B-32 fp16, random weights", "bare_forward_img_per_s": round(bare, 1),
            "target_img_per_s": 3000, "meets_target": bare >= 3000,
            "embed_stage_img_per_s": round(s.samples / s.seconds, 1), "stage_images": s.samples,
            "stage_over_bare": round(s.samples / s.seconds / bare, 3),
            "note": "the stage decodes 20-48 px JPEGs on the CPU and resizes them to 224: its rate is the decode's"}


def score_cuda():
    from bench.scale import write_specs
    from curation.score import ScoreConfig, score_pass1
    from curation.workspace import Workspace
    teacher, _ = write_specs(work / "models")
    ws = Workspace(work / "ws")
    rates = {}
    for device in ("cuda", "cpu"):
        cfg = ScoreConfig(teacher=str(teacher), name=f"check-{device}", device=device, batch_size=512,
                          workers=min(8, os.cpu_count() or 1))
        s = score_pass1(ws, cfg, progress=False)
        rates[device] = round(s.samples / s.seconds, 1)
    return {"samples": s.samples, "img_per_s": rates, "cuda_over_cpu": round(rates["cuda"] / rates["cpu"], 2),
            "odin": True}


def ddp():
    from distill.launch import launch
    from bench.distill_throughput import build_selection
    from distill.config import write_config
    manifest, _ = build_selection(work / "sel", 4096, 4)
    out = {}
    for nproc in (1, 2):
        cfg = write_config({"selection": str(manifest), "student": "tiny_cnn", "teacher_mode": "stored",
                            "loss": {"method": "kd"}, "epochs": 1, "batch_size": 256,
                            "samples_per_epoch": 4096 // nproc, "workers": 2, "checkpoint_every": 10**6,
                            "log_every": 4, "progress": False, "out": str(work / f"ddp{nproc}")},
                           work / f"ddp{nproc}.json")
        try:
            s = launch(cfg, nproc=nproc, stream=None)
            out[f"nproc_{nproc}"] = {"ok": True, "samples_per_s": s.get("samples_per_s"),
                                     "backend": "nccl"}
        except Exception as exc:  # noqa: BLE001
            out[f"nproc_{nproc}"] = {"ok": False, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    return out


step("faiss_gpu", faiss_gpu)
step("embed", embed_cuda)
step("score", score_cuda)
step("ddp_nccl", ddp)
emit()
EOF
rc=$?
if [ $rc -eq 124 ]; then echo '{"gpu": true, "error": "gpu_check ran past its 470 s limit"}'; fi
exit 0
