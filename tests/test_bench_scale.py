"""bench/scale.py --quick: every stage runs through the CLI at two sizes, and what it reports holds."""
import json

import pyarrow.parquet as pq
import pytest

from bench.make_scale_crawl import make_crawl
from bench.scale import STAGES, STORED_STAGES, main, slope


def test_scale_crawl_is_img2dataset_layout_with_ground_truth(tmp_path):
    summary = make_crawl(tmp_path, 600, shard_size=250, in_domain=0.3, workers=1)
    assert summary["shards"] == 3 and sorted(p.name for p in tmp_path.glob("*.tar")) == \
        ["00000.tar", "00001.tar", "00002.tar"]
    truth = pq.read_table(tmp_path / "ground_truth.parquet").to_pandas()
    assert len(truth) == 600 and truth["key"].is_unique
    assert 0.2 < truth["in_domain"].mean() < 0.4  # the planted share, within sampling noise
    assert set(truth.loc[truth["in_domain"], "kind"]) == {"glyph"}
    assert pq.read_table(tmp_path / "00002.parquet").num_rows == 100
    assert json.loads((tmp_path / "00000_stats.json").read_text())["successes"] == 250
    again = make_crawl(tmp_path / "again", 600, shard_size=250, in_domain=0.3, workers=2)
    assert again["in_domain"] == summary["in_domain"]  # deterministic, whatever the worker count
    assert (tmp_path / "00001.tar").read_bytes() == (tmp_path / "again" / "00001.tar").read_bytes()


def test_slope_is_the_log_log_fit():
    assert slope([10, 100, 1000], [1, 10, 100]) == pytest.approx(1.0)
    assert slope([10, 100], [5, 20]) == pytest.approx(0.602, abs=1e-3)
    assert slope([10], [1]) is None


@pytest.mark.slow
def test_scale_quick_runs_every_stage(tmp_path):
    out = tmp_path / "scale"
    result = main(["--quick", "--out", str(out)])
    assert result["all_ok"], result
    images = [r for r in result["rows"] if r["kind"] == "images"]
    assert [r["n"] for r in images] == [500, 2000]
    assert all(list(r["stages"]) == list(STAGES) for r in images)
    stored = [r for r in result["rows"] if r["kind"] == "stored"]
    assert [r["n"] for r in stored] == [5000] and list(stored[0]["stages"]) == list(STORED_STAGES)
    assert stored[0]["score_pass1_skipped"]  # pass 2 alone was timed
    for r in result["rows"]:
        for m in r["stages"].values():
            # a stage imports torch/pyarrow: it cannot run in under 50 MiB, and the tree holds the largest process
            assert m["peak_rss_tree_mib"] > 50 and m["maxrss_one_process_mib"] > 50
            assert m["samples_per_s"] == pytest.approx(r["n"] / m["seconds"], rel=0.01)
    assert result["largest_n"] == 5000 and result["largest_n_all_stages"] == 2000
    assert json.loads(out.with_suffix(".json").read_text())["rows"] == result["rows"]
    assert "| 2,000 | images | select |" in out.with_suffix(".md").read_text()


@pytest.mark.slow
def test_scale_runner_quick_compares_dask_with_local_side_by_side(prefect_server, tmp_path):
    from prefect.client.orchestration import get_client

    out = tmp_path / "scale-dask"
    result = main(["--runner", "dask://local", "--quick", "--out", str(out)])
    # the bench's own server came and went; the test session's server still answers (it once stopped it)
    with get_client(sync_client=True) as client:
        assert client.api_healthcheck() is None
    assert result["all_ok"] and result["all_identical"], result
    (row,) = result["rows"]
    assert row["n"] == 500 and list(row["runs"]) == ["local", "dask"] and row["artifacts_compared"] > 30
    local, dask = row["runs"]["local"], row["runs"]["dask"]
    assert row["speedup"] == pytest.approx(local["seconds"] / dask["seconds"], abs=1e-3)
    for run in (local, dask):  # `webdistill run` printed each stage's time, and the bench read them
        assert list(run["stage_seconds"]) == ["ingest", "embed", "index", "score r1", "select r1"]
    assert result["command"].endswith("--runner dask://local --quick --out " + str(out))
    assert "| 500 | dask://local |" in out.with_suffix(".md").read_text()
