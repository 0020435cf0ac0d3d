"""bench/distill_losses.py --results: a comparison run in chunks trains each (arm, seed) once and
reports every finished run of the setup; a run of another setup or loss config never mixes in."""
import json
from argparse import Namespace

import pytest

from bench.distill_losses import ARMS, load_runs, pending, setup_of, summarize, table

CONFIGS = [(arm, ARMS[arm]) for arm in ("kd3", "kd3:webdistill", "kd3+kd")]
ARGS = Namespace(selection="sel", eval="eval.tar", student="tiny_cnn", epochs=15, nproc=2, batch_size=64)


def run(arm: str, seed: int, acc: float, setup: dict, loss: dict | None = None) -> dict:
    return {"arm": arm, "loss": loss or ARMS[arm], "seed": seed, "setup": setup, "eval_accuracy": acc,
            "seconds": 10.0 + seed, "load_before": 2.0, "load_after": 3.0}


def test_results_file_resumes_and_merges_by_setup(tmp_path):
    setup = setup_of(ARGS, b'{"total": 3}')
    rebuilt = setup_of(ARGS, b'{"total": 4}')  # same selection name, other contents
    assert setup != rebuilt
    path = tmp_path / "runs.jsonl"
    lines = [run("kd3", 0, 0.5, setup), run("kd3:webdistill", 0, 0.25, setup), run("kd3", 1, 0.9, rebuilt),
             run("kd3+kd", 0, 0.7, setup, loss={"method": "kd3", "weights": {"kd": 2.0}})]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    done = load_runs(path, setup)
    assert len(done) == 3 and load_runs(tmp_path / "none.jsonl", setup) == []
    # seeds outermost; kd3+kd with another loss config is not the named arm's run
    assert [(seed, label) for seed, label, _ in pending(CONFIGS, [0, 1], done)] == [
        (0, "kd3+kd"), (1, "kd3"), (1, "kd3:webdistill"), (1, "kd3+kd")]
    done += [run("kd3", 1, 0.7, setup), run("kd3", 2, 0.6, setup), run("kd3:webdistill", 1, 0.35, setup)]
    rows = {r["arm"]: r for r in summarize(CONFIGS, [0, 1, 2], done)}
    assert set(rows) == {"kd3", "kd3:webdistill"}  # an arm with no run has no row
    assert rows["kd3"]["seeds"] == [0, 1, 2] and rows["kd3"]["median"] == 0.6
    assert (rows["kd3"]["min"], rows["kd3"]["max"]) == (0.5, 0.7)
    assert rows["kd3:webdistill"]["median"] == pytest.approx(0.3)
    assert rows["kd3"]["vs_webdistill"] == 2.0 and rows["kd3:webdistill"]["vs_webdistill"] == 1.0
    assert summarize(CONFIGS, [2], done)[0]["seeds"] == [2]  # only the requested seeds count
    result = {"selection": "sel", "size": 3, "student": "tiny_cnn", "epochs": 15, "nproc": 2, "seeds": [0, 1, 2],
              "missing": ["kd3+kd s0"], "results": list(rows.values())}
    text = table(result, "eval.tar")
    assert "Not run yet: kd3+kd s0" in text
    assert "| kd3 | live | 3 | 0.6000 | 0.5000 - 0.7000 | 2.000 | 0.500, 0.700, 0.600 | 11.0 |" in text
