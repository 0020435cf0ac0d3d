"""`webdistill demo`: build the demo crawl and teacher, run the pipeline on them, and
print what was found against the ground truth. Each step is skipped when its output
exists for the same parameters, so a second `make demo` is quick."""
from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from pathlib import Path

import duckdb

from curation import catalog
from curation.workspace import Workspace


def _cached(marker: Path, params: dict) -> bool:
    try:
        return json.loads(marker.read_text()).get("params") == params
    except (OSError, json.JSONDecodeError):
        return False


@contextmanager
def _step(name: str, timings: dict):
    """Announce a step and record how long it took."""
    print(f"== {name}", flush=True)
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = time.perf_counter() - start


def build_inputs(out: Path, size: int, n_shards: int, teacher_epochs: int, workers: int, seed: int,
                 timings: dict) -> tuple[dict, dict]:
    """The demo crawl and the demo teacher (reused when built before with the same parameters)."""
    from . import sources
    from .crawl import build_demo_crawl
    from .teacher import train_demo_teacher

    crawl_params = {"size": size, "shards": n_shards, "seed": seed, "fashion": sources.fashion_available()}
    marker = out / "crawl" / "build.json"
    with _step("demo crawl", timings):
        if not crawl_params["fashion"]:
            print(f"Fashion-MNIST not found in {sources.FASHION_DIR} (Debian package dataset-fashion-mnist): "
                  "the demo goes on without that domain")
        if _cached(marker, crawl_params):
            crawl = json.loads(marker.read_text())["summary"]
            print(f"reusing the crawl in {out / 'crawl'}")
        else:
            crawl = build_demo_crawl(out, size, n_shards, seed=seed, workers=workers)
            marker.write_text(json.dumps({"params": crawl_params, "summary": crawl}, indent=2))
    teacher_params = {"epochs": teacher_epochs, "seed": seed, "crawl": crawl_params}
    tmarker = out / "teacher" / "build.json"
    with _step("demo teacher", timings):
        if _cached(tmarker, teacher_params) and (out / "teacher" / "teacher.json").exists():
            teacher = json.loads((out / "teacher" / "teacher.json").read_text())
            print(f"reusing the teacher in {out / 'teacher'}")
        else:
            teacher = train_demo_teacher(out, epochs=teacher_epochs, seed=seed)
            tmarker.write_text(json.dumps({"params": teacher_params}, indent=2))
    return crawl, teacher


def ingest_report(ws: Workspace, truth_path: Path) -> list[tuple]:
    """Per defect kind: planted in the crawl vs rejected by ingest with that reason."""
    con = duckdb.connect()
    con.execute(f"CREATE VIEW truth AS SELECT * FROM read_parquet('{truth_path}')")
    con.execute(f"CREATE VIEW rejects AS SELECT * FROM read_parquet('{ws.root}/rejects/*.parquet')")
    return con.execute(
        """
        WITH planted AS (
            SELECT defect, count(*) AS n FROM truth
            WHERE defect IS NOT NULL AND defect <> 'truncated_tar' GROUP BY defect
            UNION ALL SELECT 'truncated_tar', count(DISTINCT shard) FROM truth WHERE defect = 'truncated_tar'),
        found AS (
            SELECT r.reason, count(*) AS n,
                   count(*) FILTER (WHERE t.defect = r.reason) AS correct
            FROM rejects r LEFT JOIN truth t USING (shard, key) GROUP BY r.reason)
        SELECT coalesce(p.defect, f.reason) AS kind, coalesce(p.n, 0) AS planted, coalesce(f.n, 0) AS rejected,
               coalesce(f.correct, 0) AS matching_ground_truth
        FROM planted p FULL JOIN found f ON p.defect = f.reason ORDER BY kind
        """
    ).fetchall()


def dup_report(ws: Workspace, embedder: str, truth_path: Path) -> dict:
    """Near-duplicate clusters against the planted duplicates: pairwise precision and recall
    (a pair = two samples in one cluster; true when one duplicates the other or both duplicate
    the same original), and the share of planted exact / near duplicates found with their original."""
    con = duckdb.connect()
    con.execute(f"CREATE VIEW truth AS SELECT * FROM read_parquet('{truth_path}')")
    con.execute(f"CREATE VIEW samples AS SELECT * FROM read_parquet('{ws.root}/samples/*.parquet')")
    con.execute(f"CREATE VIEW dups AS SELECT * FROM read_parquet('{ws.root}/dups/{embedder}.parquet')")
    con.execute("""CREATE VIEW labelled AS SELECT d.cluster_id, t.key, coalesce(t.duplicate_of, t.key) AS family,
                   t.dup_kind FROM dups d JOIN samples s USING (sample_id) JOIN truth t USING (shard, key)""")
    predicted, correct, true = con.execute("""
        SELECT (SELECT sum(n * (n - 1) / 2) FROM (SELECT count(*) AS n FROM labelled GROUP BY cluster_id)),
               (SELECT sum(n * (n - 1) / 2) FROM (SELECT count(*) AS n FROM labelled GROUP BY cluster_id, family)),
               (SELECT sum(n * (n - 1) / 2) FROM (SELECT count(*) AS n FROM labelled GROUP BY family))""").fetchall()[0]
    found = dict((kind, (hit, total)) for kind, hit, total in con.execute("""
        SELECT a.dup_kind, count(*) FILTER (WHERE a.cluster_id = b.cluster_id), count(*)
        FROM labelled a JOIN labelled b ON b.key = a.family WHERE a.dup_kind IS NOT NULL GROUP BY ALL""").fetchall())
    return {"pair_precision": correct / predicted if predicted else float("nan"),
            "pair_recall": correct / true if true else float("nan"), "found": found}


# The demo selects with the default policy (no `policy` key): what a user gets without tuning.
# Its size, 1,500 samples, is what the demo's student trains on in each round.
DEMO_SELECTION = {"limit": 1500}
DEMO_DUP_THRESHOLD = 0.97
DIGIT_PROMPTS = [f"handwritten digit {d}" for d in range(10)]


def selection_report(ws: Workspace, name: str, truth_path: Path) -> dict:
    """Size and precision (share of the teacher's domain) of a curated selection, per source domain."""
    manifest = json.loads((ws.root / "selections" / name / "manifest.json").read_text())
    con = duckdb.connect()
    rows = con.execute(f"""
        SELECT t.domain, count(*) AS n, sum(t.in_domain::INT) AS hits
        FROM read_parquet('{ws.root}/samples/*.parquet') s JOIN read_parquet('{truth_path}') t USING (shard, key)
        WHERE s.sample_id IN (SELECT unnest(?::VARCHAR[])) GROUP BY ALL ORDER BY n DESC""",
                       [_selection_ids(ws, name)]).fetchall()
    total = sum(n for _, n, _ in rows)
    return {"size": manifest["total"], "precision": sum(h for *_, h in rows) / total if total else float("nan"),
            "domains": {d: n for d, n, _ in rows}, "policy": manifest.get("policy"),
            "policy_steps": manifest.get("policy_steps"), "coverage": manifest.get("coverage") or {}}


def _selection_ids(ws: Workspace, name: str) -> list[str]:
    import webdataset as wds

    from distill.data import load_manifest  # the one reader of a manifest's shard paths (files in its folder)

    urls = [s.url for s in load_manifest(ws.root / "selections" / name / "manifest.json").shards]
    return [s["__key__"] for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode()]


def relevance_auroc(ws: Workspace, name: str, truth_path: Path) -> float:
    """AUROC of a knn score for telling the teacher's domain (MNIST in the crawl) from the rest."""
    from sklearn.metrics import roc_auc_score

    rows = duckdb.connect().execute(f"""
        SELECT t.in_domain, k.knn_sim FROM read_parquet('{ws.root}/knn_scores/{name}.parquet') k
        JOIN read_parquet('{ws.root}/samples/*.parquet') s USING (sample_id)
        JOIN read_parquet('{truth_path}') t USING (shard, key)""").fetchall()
    labels, scores = zip(*rows)
    return float(roc_auc_score(labels, scores))


def train_clip(workspace: Workspace, out_dir: Path, clip_steps: int, seed: int, crawl_params: dict,
               timings: dict) -> dict:
    """The demo's small CLIP, trained on the ingested image-caption pairs: a user's checkpoint."""
    from .clip import MODEL, train_demo_clip

    clip_dir = out_dir / "clip"
    clip_dir.mkdir(parents=True, exist_ok=True)
    params = {"steps": clip_steps, "seed": seed, "crawl": crawl_params}
    with _step("demo CLIP", timings):
        if _cached(clip_dir / "build.json", params) and (clip_dir / f"{MODEL}.pt").exists():
            clip = json.loads((clip_dir / "clip.json").read_text())
            print(f"reusing the CLIP checkpoint in {clip_dir}")
        else:
            clip = train_demo_clip(workspace, clip_dir, steps=clip_steps, seed=seed)
            (clip_dir / "build.json").write_text(json.dumps({"params": params}))
    return clip | {"path": str(clip_dir / f"{MODEL}.pt"), "embedder": f"open_clip:{MODEL}"}


def pipeline_config(workspace: Workspace, out_dir: Path, clip: dict, rounds: int, workers: int,
                    distill_epochs: int) -> Path:
    """The demo's pipeline YAML: what a user would write for their own crawl and teacher."""
    import yaml

    def rel(p) -> str:  # relative to the YAML's folder, as a user writes it: the demo folder can move
        return os.path.relpath(Path(p).resolve(), out_dir.resolve())

    config = {
        "name": "demo",
        "workspace": rel(workspace.root),
        "workers": workers,
        "ingest": {"shards": [rel(out_dir / "crawl")]},
        "embed": {"embedder": clip["embedder"], "pretrained": rel(clip["path"]), "batch_size": 512, "workers": 2,
                  "shards_per_task": 100},
        # 6%: the demo plants near-duplicates cropped by up to 6% per side
        "index": {"dup_threshold": DEMO_DUP_THRESHOLD, "dup_max_crop": 0.06},
        "knn_scores": [{"name": "digit_prompts", "prompts": DIGIT_PROMPTS, "k": 3}],
        "score": {"teacher": rel(out_dir / "teacher" / "teacher.json"), "options": {"batch_size": 512}},
        "select": dict(DEMO_SELECTION),
        "distill": {"student": "tiny_cnn", "loss": {"method": "kd", "T": 4.0}, "epochs": distill_epochs,
                    "nproc": 2, "workers": 1, "batch_size": 64, "lr": 0.05,
                    "eval": rel(out_dir / "eval" / "mnist-test.tar")},
        "rounds": rounds,
        "report": {"truth": rel(out_dir / "crawl" / "ground_truth.parquet")},  # -> <workspace>/report.html
        "schedules": {"curation": "0 3 * * *", "pipeline": "0 4 * * 0"},
    }
    path = out_dir / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run_demo(workspace: Workspace, out: str, size: int, n_shards: int, teacher_epochs: int, workers: int,
             seed: int, clip_steps: int = 100, rounds: int = 2, distill_epochs: int = 15) -> int:
    from flows.pipeline import pipeline_flow
    from flows.stages import ingest_flow

    from . import sources

    out_dir = Path(out).resolve()
    timings: dict[str, float] = {}
    crawl, teacher = build_inputs(out_dir, size, n_shards, teacher_epochs, workers, seed, timings)
    with _step("ingest", timings):
        ingested = ingest_flow(str(workspace.root), [str(out_dir / "crawl")])
    crawl_params = {"size": size, "shards": n_shards, "seed": seed, "fashion": sources.fashion_available()}
    clip = train_clip(workspace, out_dir, clip_steps, seed, crawl_params, timings)
    config_path = pipeline_config(workspace, out_dir, clip, rounds, workers, distill_epochs)
    print(f"== pipeline: {config_path} ({rounds} rounds), as `webdistill run {config_path}` would run it", flush=True)
    result = pipeline_flow(str(config_path))
    timings.update({f"pipeline {k}": v for k, v in result["timings"].items()})
    print_results(workspace, out_dir, crawl, teacher, clip, ingested, result, timings)
    return 0


def print_results(workspace: Workspace, out_dir: Path, crawl: dict, teacher: dict, clip: dict, ingested: dict,
                  result: dict, timings: dict) -> None:
    from curation.report import score_quality

    truth = out_dir / "crawl" / "ground_truth.parquet"
    stats = catalog.query(workspace, "SELECT count(*) AS n, count(DISTINCT sha256) AS distinct_images, "
                          "(SELECT count(*) FROM rejects) AS rejected FROM samples").to_pylist()[0]
    embedder = result["index"]["index"]["embedder"]
    dups, report = result["index"]["dups"], dup_report(workspace, embedder, truth)
    chance = crawl["domains"].get("mnist", 0) / crawl["samples"]
    print()
    print("webdistill demo: results")
    print(f"  crawl           {crawl['samples']} samples in {crawl['shards']} shards ({out_dir / 'crawl'})")
    print("  domains         " + ", ".join(f"{k} {v}" for k, v in sorted(crawl["domains"].items())))
    print(f"  teacher         {teacher['factory']} on {teacher['train_samples']} MNIST digits: "
          f"test accuracy {teacher['test_accuracy']:.4f} on {crawl['mnist_test']} held-out digits")
    print(f"  ingest          {stats['n']} accepted, {stats['rejected']} rejected, "
          f"{stats['n'] - stats['distinct_images']} exact duplicates by sha256")
    print()
    print(f"  {'defect':<20}{'planted':>9}{'rejected':>10}{'matching truth':>16}")
    for kind, planted, rejected, correct in ingest_report(workspace, truth):
        print(f"  {kind:<20}{planted:>9}{rejected:>10}{correct:>16}")
    print()
    print(f"  CLIP            {clip['model']} trained {clip['seconds']:.0f}s on {clip['pairs_seen']} "
          f"image-caption pairs, loaded with --pretrained {clip['checkpoint']}")
    faiss_index = result["index"]["index"]
    print(f"  index           {faiss_index['kind']} FAISS index of {faiss_index['size']} vectors; "
          f"{result['index']['kmeans_k']} k-means clusters")
    print(f"  near-dups       cosine >= {dups['threshold']}: {dups['clusters']} clusters; pairwise "
          f"precision {report['pair_precision']:.3f}, recall {report['pair_recall']:.3f} against the ground truth")
    for kind, (hit, total) in sorted(report["found"].items()):
        print(f"                  planted {kind} duplicates found with their original: {hit}/{total}")
    print(f"  zero-shot       AUROC of similarity to 'handwritten digit N' prompts for the teacher's domain: "
          f"{relevance_auroc(workspace, 'digit_prompts', truth):.3f}")
    print()
    print(f"  {'score (round 1)':<20}{'AUROC':>7}{'precision@1000':>16}   (telling the teacher's domain from the rest)")
    for r in score_quality(workspace, truth, [1000], score_run=result["rounds"][0]["score"]["name"])["scores"]:
        print(f"  {r['score']:<20}{r['auroc']:>7.3f}{r['precision@1000']:>16.3f}")
    print()
    selections = [selection_report(workspace, r["selection"]["name"], truth) for r in result["rounds"]]
    print(f"  policy          {selections[0]['policy']!r} = {selections[0]['policy_steps']!r} (round 1); "
          f"chance precision {chance:.3f}")
    print(f"  {'round':<8}{'selection':>10}{'precision':>11}{'class entropy':>15}{'smallest class':>16}"
          f"{'student accuracy':>18}   domains selected")
    for r, sel in zip(result["rounds"], selections):
        acc = (r.get("student") or {}).get("eval_accuracy")
        shown_acc = acc if acc is not None else float("nan")
        entropy, smallest = (sel["coverage"].get(k) for k in ("class_entropy", "min_class_share"))
        print(f"  {r['round']:<8}{sel['size']:>10}{sel['precision']:>11.3f}"
              f"{entropy if entropy is not None else float('nan'):>15.3f}"
              f"{smallest if smallest is not None else float('nan'):>16.3f}{shown_acc:>18.4f}   "
              + ", ".join(f"{d} {n}" for d, n in sel["domains"].items()))
    print(f"  (teacher accuracy on the same held-out digits: {teacher['test_accuracy']:.4f})")
    print()
    print("  stage times     " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))
    print(f"  workspace       {workspace.root} (try: webdistill sql \"SELECT * FROM students\")")
    print(f"  report          {result['report']['path']} (open it in a browser; rebuild it with "
          f"webdistill report -w {workspace.root} --truth {truth})")
