"""`webdistill demo`: build the demo crawl and teacher, run the pipeline on them, and
print what was found against the ground truth. Each step is skipped when its output
exists for the same parameters, so a second `make demo` is quick."""
from __future__ import annotations

import json
import time
from contextlib import contextmanager
from datetime import datetime, timezone
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
    from curation import demo_sources
    from curation.demo_crawl import build_demo_crawl
    from distill.demo_teacher import train_demo_teacher

    crawl_params = {"size": size, "shards": n_shards, "seed": seed, "fashion": demo_sources.fashion_available()}
    marker = out / "crawl" / "build.json"
    with _step("demo crawl", timings):
        if not crawl_params["fashion"]:
            print(f"Fashion-MNIST not found in {demo_sources.FASHION_DIR} (Debian package dataset-fashion-mnist): "
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


def relevance_auroc(ws: Workspace, name: str, truth_path: Path) -> float:
    """AUROC of a knn score for telling the teacher's domain (MNIST in the crawl) from the rest."""
    from sklearn.metrics import roc_auc_score

    rows = duckdb.connect().execute(f"""
        SELECT t.in_domain, k.knn_sim FROM read_parquet('{ws.root}/knn_scores/{name}.parquet') k
        JOIN read_parquet('{ws.root}/samples/*.parquet') s USING (sample_id)
        JOIN read_parquet('{truth_path}') t USING (shard, key)""").fetchall()
    labels, scores = zip(*rows)
    return float(roc_auc_score(labels, scores))


def embed_and_index(workspace: Workspace, out_dir: Path, clip_steps: int, workers: int, seed: int,
                    crawl_params: dict, timings: dict) -> dict:
    """Train the demo CLIP (as a user's checkpoint), embed with it, index, cluster and score."""
    from curation.demo_clip import MODEL, train_demo_clip
    from curation.embed import embed
    from curation.embedders import make_embedder
    from curation.index import IndexConfig, build_index, kmeans_clusters, knn_score, near_duplicates

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
    started = datetime.now(timezone.utc)
    with _step("embed", timings):
        embedder = make_embedder(f"open_clip:{MODEL}", pretrained=str(clip_dir / f"{MODEL}.pt"))
        summary = embed(workspace, embedder, batch_size=512, workers=2)
        catalog.record_run(workspace, "embed", started, embedder.args, {"samples": summary.samples})
    config = IndexConfig(dup_threshold=0.97)
    with _step("index", timings):
        meta = build_index(workspace, embedder.name, config)
        dups = near_duplicates(workspace, embedder.name, config)
        kmeans = kmeans_clusters(workspace, embedder.name, config)
        prompts = [f"handwritten digit {d}" for d in range(10)]
        knn_score(workspace, embedder.name, "digit_prompts", embedder.encode_text(prompts).numpy(), k=3,
                  description=f"prompts: {prompts}")
        catalog.refresh(workspace)
    return {"clip": clip, "embedder": embedder.name, "index": meta, "dups": dups, "kmeans_k": kmeans["k"],
            "embed_rate": summary.samples / summary.seconds if summary.seconds else None}


# Related-first (Begon & Geurts): the samples closest to the teacher's domain by the CLIP's
# zero-shot similarity, one per near-duplicate cluster, then KD^3's class-adaptive filter on the
# teacher's own predictions, balanced over its pseudo-labels.
DEMO_POLICY = "dedup | topk:k=3000;by=knn_digit_prompts | kd3 | balance:k=1500;by=msp"


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
            "domains": {d: n for d, n, _ in rows}}


def _selection_ids(ws: Workspace, name: str) -> list[str]:
    import webdataset as wds

    manifest = json.loads((ws.root / "selections" / name / "manifest.json").read_text())
    urls = [str(ws.root / "selections" / name / s["path"]) for s in manifest["shards"]]
    return [s["__key__"] for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode()]


def score_and_select(workspace: Workspace, teacher_spec: str, workers: int, timings: dict, name: str = "round1",
                     policy: str = DEMO_POLICY, student: str | None = None) -> dict:
    """Score the pool with the teacher (and a student), then write the curated selection."""
    from curation.score import ScoreConfig, score
    from curation.select import SelectConfig, select

    with _step(f"score ({name})", timings):
        started = datetime.now(timezone.utc)
        config = ScoreConfig(teacher=teacher_spec, student=student, name=name, batch_size=512, workers=1)
        summary = score(workspace, config)
        catalog.refresh(workspace)
        catalog.record_run(workspace, "score", started, vars(config), {"samples": summary.samples})
    with _step(f"select ({name})", timings):
        started = datetime.now(timezone.utc)
        result = select(workspace, SelectConfig(name=name, policy=policy))
        catalog.record_run(workspace, "select", started, {"name": name, "policy": policy}, {"size": result.size})
    return {"score": summary, "selection": result}


def run_demo(workspace: Workspace, out: str, size: int, n_shards: int, teacher_epochs: int, workers: int,
             seed: int, clip_steps: int = 100) -> int:
    from curation import demo_sources
    from curation.ingest import ingest

    out_dir = Path(out).resolve()
    timings: dict[str, float] = {}
    crawl, teacher = build_inputs(out_dir, size, n_shards, teacher_epochs, workers, seed, timings)

    started = datetime.now(timezone.utc)
    with _step("ingest", timings):
        summary = ingest(workspace, [str(out_dir / "crawl")], workers=workers)
        catalog.refresh(workspace)
        catalog.record_run(workspace, "ingest", started, {"shards": str(out_dir / "crawl"), "demo": True},
                           {"accepted": summary.accepted, "rejected": summary.rejected, "failed": summary.failed})
    if summary.failed:
        for url, why in summary.failed.items():
            print(f"shard {url} failed: {why}")
        return 1

    stats = catalog.query(workspace, "SELECT count(*) AS n, count(DISTINCT sha256) AS distinct_images, "
                          "(SELECT count(*) FROM rejects) AS rejected FROM samples").to_pylist()[0]
    ingest_seconds = sum(r.seconds for r in summary.shards if not r.skipped)
    fresh = [r for r in summary.shards if not r.skipped]
    rate = sum(r.n_read for r in fresh) / ingest_seconds if ingest_seconds else float("nan")

    crawl_params = {"size": size, "shards": n_shards, "seed": seed, "fashion": demo_sources.fashion_available()}
    emb = embed_and_index(workspace, out_dir, clip_steps, workers, seed, crawl_params, timings)
    truth = out_dir / "crawl" / "ground_truth.parquet"
    report = dup_report(workspace, emb["embedder"], truth)
    curated = score_and_select(workspace, str(out_dir / "teacher" / "teacher.json"), workers, timings)
    chosen = selection_report(workspace, "round1", truth)
    from curation.report import score_quality

    aurocs = score_quality(workspace, truth, [1000])["scores"]
    clip = emb["clip"]

    print()
    print("webdistill demo: results")
    print(f"  crawl           {crawl['samples']} samples in {crawl['shards']} shards ({out_dir / 'crawl'})")
    print("  domains         " + ", ".join(f"{k} {v}" for k, v in sorted(crawl["domains"].items())))
    print(f"  teacher         {teacher['factory']} on {teacher['train_samples']} MNIST digits: "
          f"test accuracy {teacher['test_accuracy']:.4f} on {crawl['mnist_test']} held-out digits")
    print(f"  ingest          {stats['n']} accepted, {stats['rejected']} rejected, "
          f"{stats['n'] - stats['distinct_images']} exact duplicates by sha256"
          + (f"; {rate:.0f} samples/s per worker" if fresh else " (all shards unchanged: skipped)"))
    print()
    print(f"  {'defect':<20}{'planted':>9}{'rejected':>10}{'matching truth':>16}")
    for kind, planted, rejected, correct in ingest_report(workspace, truth):
        print(f"  {kind:<20}{planted:>9}{rejected:>10}{correct:>16}")
    print()
    print(f"  CLIP            {clip['model']} trained {clip['seconds']:.0f}s on {clip['pairs_seen']} image-caption pairs, "
          f"loaded with --pretrained {clip['checkpoint']}")
    if emb["embed_rate"]:
        print(f"  embed           {emb['embed_rate']:.0f} images/s")
    print(f"  index           {emb['index']['kind']} FAISS index of {emb['index']['size']} vectors; "
          f"{emb['kmeans_k']} k-means clusters")
    print(f"  near-dups       cosine >= {emb['dups']['threshold']}: {emb['dups']['clusters']} clusters; pairwise "
          f"precision {report['pair_precision']:.3f}, recall {report['pair_recall']:.3f} against the ground truth")
    for kind, (hit, total) in sorted(report["found"].items()):
        print(f"                  planted {kind} duplicates found with their original: {hit}/{total}")
    print(f"  zero-shot       AUROC of similarity to 'handwritten digit N' prompts for the teacher's domain: "
          f"{relevance_auroc(workspace, 'digit_prompts', truth):.3f}")
    print()
    print(f"  {'score':<20}{'AUROC':>7}{'precision@1000':>16}   (telling the teacher's domain from the rest)")
    for r in aurocs:
        print(f"  {r['score']:<20}{r['auroc']:>7.3f}{r['precision@1000']:>16.3f}")
    print(f"  selection       round1 = {DEMO_POLICY!r}: {chosen['size']} samples, precision "
          f"{chosen['precision']:.3f} (chance {crawl['domains'].get('mnist', 0) / crawl['samples']:.3f}); "
          + ", ".join(f"{d} {n}" for d, n in chosen["domains"].items()))
    print()
    print("  stage times     " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))
    print(f"  workspace       {workspace.root} (try: webdistill sql \"SELECT reason, count(*) FROM rejects GROUP BY ALL\")")
    return 0
