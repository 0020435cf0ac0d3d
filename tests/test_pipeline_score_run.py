"""The pipeline names each round's scoring run to select: a newer run of another model, scored
between two pipeline runs, does not leak into the round's selection."""
import json

import pytest

from curation.score import ScoreConfig, score
from curation.workspace import Workspace
from flows.pipeline import curation_flow

from .test_flows import write_config

OTHER = "distill.models:tiny_student"


def test_each_round_selects_on_its_own_scoring_run(prefect_server, small_crawl, small_teacher, tmp_path):
    path = write_config(tmp_path, small_crawl, small_teacher)
    ws = Workspace(tmp_path / "ws")
    first = curation_flow(path)
    assert first["rounds"][0]["selection"]["score_run"] == "t-round1"
    # a newer finished run: the newest on disk, which `candidates` (and an unnamed select) would read
    score(ws, ScoreConfig(teacher=OTHER, name="other", batch_size=128, workers=0, odin=False), progress=False)
    again = curation_flow(path)  # round 1's scores are unchanged, so its run.json is now the older one
    chosen = again["rounds"][0]["selection"]
    assert chosen["score_run"] == "t-round1" and chosen["unchanged"]
    manifest = json.loads((ws.root / "selections" / "t-round1" / "manifest.json").read_text())
    assert manifest["score_run"] == "t-round1" and manifest["candidates"]["score_run"] == "t-round1"


@pytest.mark.slow  # a whole curation flow (embed, index, score, select) on the small crawl
def test_a_pipeline_without_a_select_policy_applies_the_default(prefect_server, small_crawl, small_teacher, tmp_path):
    path = write_config(tmp_path, small_crawl, small_teacher, select={"limit": 40, "shard_size": 50})
    chosen = curation_flow(path)["rounds"][0]["selection"]
    manifest = json.loads((tmp_path / "ws" / "selections" / "t-round1" / "manifest.json").read_text())
    # the limit is a budget: the default stops at its in-distribution estimate, and its notes say so
    assert chosen["size"] == manifest["total"] <= 40 and chosen["policy"] == manifest["policy"] == "default"
    assert (manifest["total"] < 40) == any(n.startswith("default: took at most") for n in manifest["notes"])
    assert [step.split(":")[0] for step in manifest["policy_steps"].split(" | ")] == ["dedup", "diversity", "balance"]
    assert chosen["coverage"] == manifest["coverage"] and manifest["coverage"]["class_entropy"] > 0
