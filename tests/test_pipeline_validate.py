"""`webdistill validate` / `run --dry-run` / `run` check the whole pipeline YAML before any work
(issue 17, item 1): a bad key, policy, model spec or input is one line naming the key, before
Prefect starts and before a workspace exists; a good config prints the plan with what is done."""
from __future__ import annotations

import shutil

import pytest
import yaml

from .conftest import run_cli


@pytest.fixture(scope="module")
def config(tmp_path_factory, small_crawl, small_teacher):
    """A pipeline YAML over the small crawl and teacher, relative paths as a user writes them."""
    root = tmp_path_factory.mktemp("validate")
    shutil.copytree(small_crawl / "crawl", root / "crawl")
    shutil.copytree(small_teacher.parent, root / "teacher")
    raw = {"name": "check", "workspace": "ws", "ingest": {"shards": "crawl"},
           "score": {"teacher": "teacher/teacher.json", "options": {"batch_size": 64}},
           "select": {"policy": "topk:k=20;by=msp"},
           "distill": {"student": "tiny_cnn", "epochs": 1}, "rounds": 2}
    return root, raw


def write(root, raw, name="p.yaml"):
    path = root / name
    path.write_text(yaml.safe_dump(raw))
    return path


EDITS = {
    "distill.epoch": lambda r: r["distill"].update(epoch=3),
    "index.dup_treshold": lambda r: r.update(index={"dup_treshold": 0.9}),
    "select.policy": lambda r: r["select"].update(policy="topk:k=3;by=msp | nonsense"),
    "score.teacher": lambda r: r["score"].update(teacher="teacher/techer.json"),
    "score.options: device": lambda r: r["score"]["options"].update(device="cuda:7"),
    "ingest.shards": lambda r: r["ingest"].update(shards="nowhere/*.tar"),
    "embed.embedder": lambda r: r.update(embed={"embedder": "open_clip:No-Such-Model"}),
}


@pytest.mark.parametrize("key, verb", [(key, ["validate"]) for key in EDITS] + [
    ("distill.epoch", ["run"]), ("score.teacher", ["run"]), ("select.policy", ["run", "--dry-run"])])
def test_a_bad_config_is_one_line_naming_the_key_before_any_work(config, key, verb):
    root, good = config
    raw = yaml.safe_load(yaml.safe_dump(good))
    EDITS[key](raw)
    path = write(root, raw, "bad.yaml")
    done = run_cli(*verb, str(path))
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.count("\n") == 1 and key in done.stderr, done.stderr
    assert "prefect" not in (done.stdout + done.stderr).lower()  # no flow started
    assert not (root / "ws").exists()  # nothing written


def test_the_plan_says_what_is_done_and_runs_nothing(config):
    root, raw = config
    path = write(root, raw)
    fresh = run_cli("validate", str(path))
    assert fresh.returncode == 0, fresh.stderr
    assert "the config is valid" in fresh.stdout and "3 shard(s): 0 unchanged (skipped), 3 to ingest" in fresh.stdout
    assert "round 2" in fresh.stdout and "with round 1's student" in fresh.stdout
    assert not (root / "ws").exists()
    ingested = run_cli("ingest", "-w", str(root / "ws"), str(root / "crawl"), "--workers", "1")
    assert ingested.returncode == 0, ingested.stderr
    again = run_cli("run", "--dry-run", str(path))
    assert "3 shard(s): 3 unchanged (skipped), 0 to ingest" in again.stdout
    assert not (root / "ws" / "scores").exists()


def test_run_help_documents_every_section_and_key():
    out = run_cli("run", "--help").stdout
    for text in ("--dry-run", "ingest: shards (required)", "dup_threshold=0.95", "kd3_tau=0.95",
                 "select (optional): sql, policy", "distill (optional): student (required)", "knn_scores (a list)"):
        assert text in out, text
    assert "flows/pipeline.py" not in out
