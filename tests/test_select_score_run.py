"""`select --score-run`: the candidates carry the named scoring run's scores (in --sql too), the
default is the newest finished run and the output names it, and an unknown run is one line."""
import json
import tarfile

import pytest

from curation import catalog
from curation.ingest import ingest
from curation.score import ScoreConfig, score
from curation.select import SelectConfig, select
from curation.workspace import Workspace
from flows.cli import main

TEACHER = "tests.models_for_tests:thumbnail"  # the tests' own module: trusted
OTHER = "distill.models:tiny_student"  # another model: other scores, so other top samples


@pytest.fixture(scope="module")
def two_runs(small_crawl, tmp_path_factory):
    """A workspace scored twice: `first` by the test teacher, then `second` (the newest) by another model."""
    ws = Workspace(tmp_path_factory.mktemp("ws"))
    ingest(ws, [str(small_crawl / "crawl")], workers=1, progress=False)
    for name, teacher in (("first", TEACHER), ("second", OTHER)):
        score(ws, ScoreConfig(teacher=teacher, name=name, batch_size=128, workers=0, odin=False,
                              trust_model_code=True), progress=False)
    catalog.refresh(ws)
    return ws


def _ids(ws: Workspace, name: str) -> tuple[str, set[str]]:
    """The selection's scoring run (its manifest's, checked against its catalog row) and sample ids."""
    manifest = json.loads((ws.root / "selections" / name / "manifest.json").read_text())
    rows = catalog.query(ws, f"SELECT score_run FROM selections WHERE name = '{name}'").to_pylist()
    assert rows == [{"score_run": manifest["score_run"]}]  # the catalog row records the run
    ids = []
    for shard in manifest["shards"]:
        with tarfile.open(ws.root / "selections" / manifest["name"] / shard["path"]) as tar:
            ids += [m.name.split(".", 1)[0] for m in tar.getmembers() if m.name.endswith(".json")]
    return manifest["score_run"], set(ids)


def _top(ws: Workspace, run: str, k: int = 20) -> set[str]:
    rows = catalog.query(ws, f"SELECT sample_id FROM scores WHERE run = '{run}' AND msp IS NOT NULL "
                             f"ORDER BY msp DESC, sample_id LIMIT {k}").column("sample_id").to_pylist()
    return set(rows)


def test_the_named_run_decides_the_selection(two_runs, capsys):
    ws = two_runs
    policy = "topk:k=20;by=msp"
    for run in ("first", "second"):
        assert main(["select", "-w", str(ws.root), "--name", f"by-{run}", "--policy", policy, "--score-run", run]) == 0
        assert f"scores from run {run}" in capsys.readouterr().out
    first, second = _ids(ws, "by-first"), _ids(ws, "by-second")
    assert first[0] == "first" and second[0] == "second"
    assert first[1] == _top(ws, "first") and second[1] == _top(ws, "second") and first[1] != second[1]
    # --sql reads `candidates` of the named run too
    sql = "SELECT sample_id FROM candidates WHERE msp IS NOT NULL ORDER BY msp DESC, sample_id LIMIT 20"
    assert main(["select", "-w", str(ws.root), "--name", "sql-first", "--sql", sql, "--score-run", "first"]) == 0
    assert _ids(ws, "sql-first") == first


def test_the_default_is_the_newest_run_and_the_output_names_it(two_runs, capsys):
    ws = two_runs
    assert catalog.scoring_runs(ws) == ["second", "first"]
    assert main(["select", "-w", str(ws.root), "--name", "default", "--policy", "topk:k=20;by=msp"]) == 0
    assert "scores from run second" in capsys.readouterr().out
    assert _ids(ws, "default") == ("second", _top(ws, "second"))
    params = json.loads(catalog.query(ws, "SELECT params FROM runs WHERE stage = 'select' ORDER BY finished_at DESC "
                                          "LIMIT 1").column(0)[0].as_py())
    assert params["score_run"] == "second"
    # naming the default run explicitly is the same selection: nothing is rewritten
    again = select(ws, SelectConfig(name="default", policy="topk:k=20;by=msp", score_run="second"))
    assert again.unchanged


def test_an_unknown_run_is_one_line_listing_the_runs(two_runs, capsys):
    ws = two_runs
    assert main(["select", "-w", str(ws.root), "--name", "nope", "--policy", "dedup", "--score-run", "third"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'third'" in err[0] and "finished runs: second, first" in err[0], err
    assert not (ws.root / "selections" / "nope").exists()
    with pytest.raises(catalog.UnknownScoreRun):
        catalog.candidate_sources(ws, score_run="third")
    assert catalog.candidate_sources(ws, score_run="first")["score_run"] == "first"
    assert catalog.candidate_sources(ws)["score_run"] == "second"
