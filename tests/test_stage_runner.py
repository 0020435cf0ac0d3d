"""The stage runners: the CLI verbs and the Prefect flows reach the same runner, so they record the
same run parameters, and one failure rule decides for both."""
import json
from pathlib import Path

import pytest

from curation import catalog
from curation.workspace import Workspace
from flows.cli import main
from flows.stage_runner import StageFailed, check_failures

TEACHER = "tests.models_for_tests:thumbnail"  # the tests' own module: trusted
FLOWS = Path(__file__).resolve().parents[1] / "flows"


def _params(ws_root) -> dict:
    """stage -> the parameters of its (only) recorded run."""
    rows = catalog.query(Workspace(ws_root), "SELECT stage, params FROM runs ORDER BY started_at").to_pylist()
    out = {}
    for r in rows:
        assert r["stage"] not in out, f"{r['stage']} recorded twice"
        out[r["stage"]] = json.loads(r["params"])
    return out


def test_the_cli_and_the_flows_record_the_same_run_parameters(prefect_server, small_crawl, tmp_path, capsys):
    from flows.stages import embed_flow, index_flow, ingest_flow, score_flow, select_flow

    crawl = str(small_crawl / "crawl")
    cli_ws, flow_ws = str(tmp_path / "cli"), str(tmp_path / "flow")
    verbs = [["ingest", crawl, "--workers", "1"],
             ["embed", "--embedder", "teacher", "--teacher", TEACHER, "--workers", "0", "--batch-size", "128",
              "--device", "cpu", "--trust-model-code"],
             ["index", "--embedder", "teacher", "--kmeans-k", "4", "--dup-threshold", "0.97", "--workers", "1"],
             ["score", "--teacher", TEACHER, "--name", "r1", "--workers", "0", "--batch-size", "128", "--device", "cpu",
              "--trust-model-code"],
             ["select", "--name", "top", "--policy", "topk:k=20;by=msp", "--shard-size", "50"]]
    for verb in verbs:
        assert main([verb[0], "-w", cli_ws, *verb[1:]]) == 0, capsys.readouterr().err

    ingest_flow(flow_ws, [crawl])
    embed_flow(flow_ws, embedder="teacher", teacher=TEACHER, workers=0, batch_size=128, device="cpu",
               shards_per_task=1, trust_model_code=True)
    index_flow(flow_ws, "teacher", {"kmeans_k": 4, "dup_threshold": 0.97}, workers=1)
    score_flow(flow_ws, teacher=TEACHER, name="r1", options={"workers": 0, "batch_size": 128, "device": "cpu"},
               shards_per_task=2, trust_model_code=True)
    select_flow(flow_ws, name="top", policy="topk:k=20;by=msp", shard_size=50)

    by_cli, by_flow = _params(cli_ws), _params(flow_ws)
    assert list(by_cli) == ["ingest", "embed", "index", "score", "select"]
    for stage in by_cli:
        assert by_cli[stage] == by_flow[stage], stage
    assert by_cli["select"]["score_run"] == "r1"  # the run it read, named even when it was the default
    a = json.loads((Path(cli_ws) / "selections" / "top" / "manifest.json").read_text())
    b = json.loads((Path(flow_ws) / "selections" / "top" / "manifest.json").read_text())
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]


def test_the_failure_rule_is_a_fraction_of_the_shards():
    check_failures("ingest", {}, 4, 0.0)
    one_failed = r"ingest: 1 of 4 shard\(s\) failed \(allowed fraction 0.0\); first: b: why"
    with pytest.raises(StageFailed, match=one_failed) as err:
        check_failures("ingest", {"b": "why"}, 4, 0.0, {"accepted": 3})
    assert err.value.summary == {"accepted": 3}  # what did finish, for the caller to report
    check_failures("ingest", {"a": "x", "b": "y"}, 4, 0.5)
    with pytest.raises(StageFailed, match="3 of 4"):
        check_failures("ingest", {"a": "x", "b": "y", "c": "z"}, 4, 0.5)


def test_the_cli_and_the_flow_fail_a_stage_by_the_same_rule(prefect_server, small_crawl, tmp_path, capsys):
    """One bad shard of four: the CLI (default fraction 0: exit 1, after ingesting the rest) and the
    flow (fraction 0: it fails) refuse it; with fraction 0.5 both pass, and both report the shard."""
    from flows.stages import ingest_flow

    bad = "pipe:cat /nonexistent/99999.tar"
    shards = [str(small_crawl / "crawl"), bad]
    assert main(["ingest", "-w", str(tmp_path / "c0"), *shards, "--workers", "1"]) == 1
    out, err = capsys.readouterr()
    assert "3 shard(s) ingested" in out and f"shard {bad} failed" in err
    assert main(["ingest", "-w", str(tmp_path / "c5"), *shards, "--workers", "1", "--max-failure-fraction", "0.5"]) == 0
    assert f"shard {bad} failed" in capsys.readouterr().err
    with pytest.raises(StageFailed, match=r"1 of 4 shard\(s\) failed \(allowed fraction 0.0\)"):
        ingest_flow(str(tmp_path / "f0"), shards, max_failure_fraction=0.0)
    assert list(ingest_flow(str(tmp_path / "f5"), shards, max_failure_fraction=0.5)["failed"]) == [bad]
    # the failed runs were recorded too, with the shard that failed
    for ws in ("c0", "f0"):
        summary = json.loads(catalog.query(Workspace(tmp_path / ws), "SELECT summary FROM runs").column(0)[0].as_py())
        assert list(summary["failed"]) == [bad] and summary["accepted"] > 0


def test_the_failure_rule_is_written_once():
    """No other module of flows/ compares failed shards with the fraction."""
    for path in FLOWS.glob("*.py"):
        if path.name != "stage_runner.py":
            text = path.read_text()
            assert "max_failure_fraction *" not in text and "StageFailed(" not in text, path.name


def test_the_cli_verbs_that_run_no_flow_import_no_prefect():
    import subprocess
    import sys

    from .conftest import ROOT

    script = ("import sys; import flows.cli; from flows import stage_runner; "  # nor torch: --help stays fast
              "print(sorted(m for m in sys.modules if m.split('.')[0] in ('prefect', 'torch')))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr
    for name in ("cli.py", "stage_runner.py"):
        lines = (FLOWS / name).read_text().splitlines()
        top = [line for line in lines if line.startswith(("import prefect", "from prefect"))]
        assert not top, (name, top)


def _runner_calls(path: Path) -> dict[str, set[str]]:
    """{function name: the stage_runner.run_* names it calls} for the top-level functions of a module."""
    import ast

    calls = {}
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.FunctionDef):
            calls[node.name] = {n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute)
                                and isinstance(n.value, ast.Name) and n.value.id == "stage_runner"
                                and n.attr.startswith("run_")}
    return calls


@pytest.mark.parametrize("stage, verb, flow_module, flow", [
    ("crawl", "cmd_crawl", "crawl_flow.py", "crawl_flow"), ("ingest", "cmd_ingest", "stages.py", "ingest_flow"),
    ("embed", "cmd_embed", "stages.py", "embed_flow"), ("index", "cmd_index", "stages.py", "index_flow"),
    ("knn_score", "cmd_knn_score", "stages.py", "index_flow"), ("score", "cmd_score", "stages.py", "score_flow"),
    ("select", "cmd_select", "stages.py", "select_flow"),
    ("synthesize", "cmd_synthesize", "stages.py", "synthesize_flow"),
    ("report", "cmd_report", "stages.py", "report_flow"), ("distill", "cmd_distill", "pipeline.py", "distill_flow")])
def test_the_verb_and_the_flow_of_a_stage_call_its_one_runner(stage, verb, flow_module, flow):
    """Every stage is wired once: its CLI verb and its Prefect flow both call stage_runner.run_<stage>,
    and neither calls another stage's runner."""
    from flows import stage_runner

    assert callable(getattr(stage_runner, f"run_{stage}"))
    assert _runner_calls(FLOWS / "cli.py")[verb] == {f"run_{stage}"}
    assert f"run_{stage}" in _runner_calls(FLOWS / flow_module)[flow]
