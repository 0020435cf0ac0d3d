"""The Prefect flows: the whole pipeline with two student-in-the-loop rounds, per-shard failures
against the failure fraction, and the Dask runner giving the local runner's results."""
import json
import re

import pyarrow.parquet as pq
import pytest
import yaml

from curation import catalog, user_sql
from curation.workspace import Workspace
from flows.pipeline import PipelineConfigError, curation_flow, load_pipeline_config, pipeline_flow
from flows.stages import StageFailed, ingest_flow

from .readme import sql_statements

pytestmark = pytest.mark.slow  # Prefect flows end to end, on a trained teacher

TEACHER_EMBEDDER = "tests.models_for_tests:thumbnail"


def write_config(tmp_path, small_crawl, teacher, **overrides) -> str:
    config = {
        "name": "t",
        "workspace": str(tmp_path / "ws"),
        "trust_model_code": True,  # the embedder is the tests' own module:factory
        "ingest": {"shards": [str(small_crawl / "crawl")]},
        "embed": {"embedder": "teacher", "teacher": TEACHER_EMBEDDER, "workers": 0, "shards_per_task": 1},
        "index": {"kmeans_k": 4, "dup_threshold": 0.97},
        "score": {"teacher": str(teacher), "options": {"batch_size": 128, "workers": 0}},
        "select": {"policy": "dedup | topk:k=120;by=msp", "shard_size": 50},
    } | overrides
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_pipeline_runs_two_rounds_and_records_them(prefect_server, small_crawl, small_teacher, tmp_path):
    # named as the demo, with its kNN score's name: the README's SQL examples run on this workspace below
    path = write_config(tmp_path, small_crawl, small_teacher, rounds=2, name="demo",
                        knn_scores=[{"name": "digit_prompts", "k": 3,
                                     "sql": "SELECT sample_id FROM samples ORDER BY sample_id LIMIT 10"}],
                        synthesize={"per_class": 2, "vae_epochs": 1, "vae_samples": 200, "search_steps": 5,
                                    "conf_threshold": 0.5},
                        distill={
        "student": "tiny_cnn", "loss": {"method": "kd"}, "epochs": 2, "nproc": 2, "workers": 0, "batch_size": 32,
        "eval": str(small_crawl / "eval" / "mnist-test.tar")})
    result = pipeline_flow(path)
    ws = Workspace(tmp_path / "ws")
    assert [r["round"] for r in result["rounds"]] == [1, 2]
    for r in result["rounds"]:  # 120 crawled samples plus the round's synthetic set
        assert r["synthetic"]["size"] > 0 and r["selection"]["size"] == 120 + r["synthetic"]["size"]
    students = catalog.query(ws, "SELECT name, selection, loss, eval_accuracy, checkpoint FROM students "
                                 "ORDER BY name").to_pylist()
    assert [s["name"] for s in students] == ["demo-round1", "demo-round2"]
    assert all(s["loss"] == "kd" and 0 <= s["eval_accuracy"] <= 1 for s in students)
    # lineage by content: each student names the exact manifest it trained on, its own round's
    lineage = catalog.query(ws, "SELECT st.name, se.name AS selection FROM students st JOIN selections se "
                                "ON st.selection_sha256 = se.manifest_sha256 ORDER BY 1").to_pylist()
    assert lineage == [{"name": f"demo-round{r}", "selection": f"demo-round{r}"} for r in (1, 2)]
    # round 2 re-scored the pool with round 1's student: agreement and KD^3 columns exist
    agree = catalog.query(ws, "SELECT count(agreement) AS a, count(*) AS n FROM scores "
                              "WHERE run = 'demo-round2'").to_pylist()[0]
    assert agree["a"] == agree["n"] > 0
    assert catalog.query(ws, "SELECT count(*) AS n FROM scores WHERE run = 'demo-round1' AND agreement IS NOT NULL"
                         ).column("n")[0].as_py() == 0
    # round 2 started from round 1's weights
    job = json.loads((ws.root / "students" / "demo-round2" / "job.json").read_text())
    assert job["init_from"].endswith("demo-round1/student.pt")
    stages = set(catalog.query(ws, "SELECT DISTINCT stage FROM runs").column("stage").to_pylist())
    assert {"ingest", "embed", "index", "score", "select"} <= stages
    assert set(catalog.query(ws, "SELECT name FROM selections").column("name").to_pylist()) == {"demo-round1",
                                                                                                "demo-round2"}
    # every SQL example in the README runs, through the sandbox the `sql` verb uses, and finds rows
    statements = sql_statements("Example SQL against the catalog")
    assert len(statements) >= 12
    empty = [sql for sql in statements if user_sql.query(ws, sql).num_rows == 0]
    assert len(empty) <= 3, empty  # some look for what a small crawl may lack (truncated shards, disagreement)


def test_a_failed_shard_is_reported_and_the_fraction_decides(prefect_server, small_crawl, tmp_path):
    shards = [str(small_crawl / "crawl"), "pipe:cat /nonexistent/99999.tar"]
    summary = ingest_flow(str(tmp_path / "ws"), shards, max_failure_fraction=0.5)
    assert list(summary["failed"]) == ["pipe:cat /nonexistent/99999.tar"] and summary["accepted"] > 0
    with pytest.raises(StageFailed, match="1 of 4 shard"):
        ingest_flow(str(tmp_path / "ws2"), shards, max_failure_fraction=0.0)


def _scores(ws_root) -> dict:
    tables = sorted((ws_root / "scores").glob("*/0*.parquet"))
    rows = {}
    for t in tables:
        for r in pq.read_table(t).to_pylist():
            rows[r["sample_id"]] = r
    return rows


def test_dask_runner_gives_the_local_runners_results(prefect_server, small_crawl, small_teacher, tmp_path):
    from distributed import LocalCluster

    (tmp_path / "a").mkdir()
    curation_flow(write_config(tmp_path / "a", small_crawl, small_teacher))
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        (tmp_path / "b").mkdir()
        on_dask = write_config(tmp_path / "b", small_crawl, small_teacher, runner="dask://" + cluster.scheduler_address.removeprefix("tcp://"))
        result = curation_flow(on_dask)
    a, b = _scores(tmp_path / "a" / "ws"), _scores(tmp_path / "b" / "ws")
    assert a.keys() == b.keys() and len(a) > 300
    for sid, row in a.items():
        for col in ("msp", "energy", "odin", "bn_score", "mahalanobis", "knn_teacher"):
            if row[col] is None:
                assert b[sid][col] is None, (sid, col)
            else:
                assert row[col] == pytest.approx(b[sid][col], rel=1e-5, abs=1e-6), (sid, col)
    assert sum(r["msp"] is not None for r in a.values()) > 300
    ma = json.loads((tmp_path / "a" / "ws" / "selections" / "t-round1" / "manifest.json").read_text())
    mb = json.loads((tmp_path / "b" / "ws" / "selections" / "t-round1" / "manifest.json").read_text())
    assert [s["sha256"] for s in ma["shards"]] == [s["sha256"] for s in mb["shards"]]
    assert result["rounds"][0]["selection"]["size"] == 120
    # not only close: every artifact the same, as bench/scale.py --runner checks at scale
    from tests.faultkit import differences, workspace_digest

    assert differences(workspace_digest(tmp_path / "a" / "ws"), workspace_digest(tmp_path / "b" / "ws")) == []


def test_bad_pipeline_configs_are_one_clear_line(tmp_path, small_crawl, small_teacher):
    path = write_config(tmp_path, small_crawl, small_teacher, nonsense=1)
    with pytest.raises(PipelineConfigError, match="unknown key"):
        load_pipeline_config(path)
    path = write_config(tmp_path, small_crawl, small_teacher, rounds=2)
    with pytest.raises(PipelineConfigError, match="need a 'distill' section"):
        load_pipeline_config(path)
    (tmp_path / "bad.yaml").write_text("ingest: [unclosed")
    with pytest.raises(PipelineConfigError, match="not valid YAML"):
        load_pipeline_config(tmp_path / "bad.yaml")


def test_crawl_flow_then_ingest_flow_from_a_local_server(prefect_server, tmp_path, small_crawl):
    import functools
    import io
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    from PIL import Image

    from flows.crawl_flow import crawl_flow

    site = tmp_path / "site"
    site.mkdir()
    for i in range(5):
        buf = io.BytesIO()
        Image.new("RGB", (40 + i, 30), (i * 40, 0, 0)).save(buf, "PNG")
        (site / f"{i}.png").write_bytes(buf.getvalue())
    (site / "page.png").write_text("<html>not an image</html>")
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(site))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        urls = tmp_path / "urls.csv"
        names = ["0.png", "1.png", "2.png", "3.png", "4.png", "page.png", "missing.png"]
        urls.write_text("url,caption\n" + "".join(f"{base}/{n},image {n}\n" for n in names))
        out = tmp_path / "crawl"
        result = crawl_flow(str(urls), str(out), {"shard_size": 4, "allow_private": True, "timeout_s": 5})
        assert result["shards"] == 2 and result["successes"] == 5 and result["failures"] == 2
        again = crawl_flow(str(urls), str(out), {"shard_size": 4, "allow_private": True, "timeout_s": 5})
        assert again["skipped"] == 2
        refused = crawl_flow(str(urls), str(tmp_path / "refused"), {"shard_size": 4})
        assert refused["successes"] == 0 and refused["failures"] == 7  # loopback refused by default
    finally:
        server.shutdown()
    ingested = ingest_flow(str(tmp_path / "ws"), [str(out)])
    assert ingested["accepted"] == 5 and ingested["rejected"] == 0


def test_curation_flow_on_a_workspace_at_an_fsspec_url(prefect_server, small_crawl, small_teacher, tmp_path):
    """In its own process, as `webdistill run` would be: fsspec's memory filesystem lives as long as it."""
    import os
    import subprocess
    import sys

    from prefect.settings import PREFECT_API_URL

    from .conftest import ROOT

    path = write_config(tmp_path, small_crawl, small_teacher, workspace="memory://webdistill-flows/ws")
    script = (
        "import json, fsspec\n"
        "from flows.pipeline import curation_flow\n"
        f"result = curation_flow({path!r})\n"
        "index = json.loads(fsspec.filesystem('memory').cat('/webdistill-flows/ws/_index.json'))\n"
        "print(json.dumps({'size': result['rounds'][0]['selection']['size'], 'index': sorted(index)}))\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT), WEBDISTILL_CACHE=str(tmp_path / "cache"),
               PREFECT_API_URL=PREFECT_API_URL.value())
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["size"] == 120
    # the index's phases reach the flow's log (a long index used to be silent inside `run`)
    logged = proc.stdout + proc.stderr
    assert all(re.search(rf"index \S+: {phase}/3 ", logged) for phase in (1, 2, 3))
    assert any(p.startswith("scores/t-round1/") for p in out["index"])
    assert "selections/t-round1/manifest.json" in out["index"] and "catalog.duckdb" in out["index"]
    assert (tmp_path / "cache" / "workspaces").is_dir()  # the local mirror the stages ran in
