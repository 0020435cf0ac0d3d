"""A new user's path (issue 17, items 1-3): the pipeline YAML checked whole before any work, with a
plan to read first; nothing different silently replaced; a workspace that can be moved."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from curation import catalog
from curation.errors import WouldOverwrite
from curation.validate import ValidationConfig
from curation.workspace import Workspace
from flows import stage_runner
from tests.conftest import encode, meta, noise_image, run_cli, write_tar


def crawl_shard(path: Path, seed: int, n: int = 4) -> Path:
    return write_tar(path, [{"__key__": f"{seed:03d}{i:04d}", "jpg": encode(noise_image(seed * 100 + i), "JPEG"),
                             "json": meta(f"{seed}-{i}")} for i in range(n)])


def ingest(ws: Workspace, *specs: str, source: str | None = None) -> dict:
    try:
        return stage_runner.run_ingest(ws, list(specs), ValidationConfig(), source)
    except stage_runner.StageFailed as exc:
        return exc.summary


def shard_urls(ws: Workspace) -> set[str]:
    return set(catalog.query(ws, "SELECT DISTINCT shard_url FROM samples").column("shard_url").to_pylist())


# --- item 2: a second crawl's shards never replace the first's samples ---------------------------

def test_a_second_crawl_with_the_same_shard_names_is_refused_not_swapped_in(tmp_path):
    ws = Workspace(tmp_path / "ws")
    crawl_shard(tmp_path / "a" / "00000.tar", seed=1)
    crawl_shard(tmp_path / "b" / "00000.tar", seed=2)
    assert ingest(ws, str(tmp_path / "a"))["accepted"] == 4
    before = catalog.query(ws, "SELECT sample_id, sha256 FROM samples ORDER BY 1").to_pylist()
    with pytest.raises(WouldOverwrite) as err:
        ingest(ws, str(tmp_path / "b"))
    assert "already ingested from" in str(err.value) and "--source" in str(err.value)
    assert catalog.query(ws, "SELECT sample_id, sha256 FROM samples ORDER BY 1").to_pylist() == before


def test_a_second_crawl_with_its_own_source_is_added_beside_the_first(tmp_path):
    ws = Workspace(tmp_path / "ws")
    crawl_shard(tmp_path / "a" / "00000.tar", seed=1)
    crawl_shard(tmp_path / "b" / "00000.tar", seed=2)
    ingest(ws, str(tmp_path / "a"))
    assert ingest(ws, str(tmp_path / "b"), source="second")["accepted"] == 4
    shards = catalog.query(ws, "SELECT shard, count(*) AS n FROM samples GROUP BY 1 ORDER BY 1").to_pylist()
    assert shards == [{"shard": "00000", "n": 4}, {"shard": "second-00000", "n": 4}]


def test_the_cli_names_the_refused_shard_and_exits_non_zero(tmp_path):
    crawl_shard(tmp_path / "a" / "00000.tar", seed=1)
    crawl_shard(tmp_path / "b" / "00000.tar", seed=2)
    ws = str(tmp_path / "ws")
    assert run_cli("ingest", "-w", ws, str(tmp_path / "a")).returncode == 0
    out = run_cli("ingest", "-w", ws, str(tmp_path / "b"))
    assert out.returncode == 2, out.stderr
    assert "--source" in out.stderr and "Traceback" not in out.stderr


def test_a_shard_rewritten_in_place_is_ingested_again(tmp_path):
    """The same file with new bytes is the same shard, updated (a re-crawl into its folder)."""
    ws = Workspace(tmp_path / "ws")
    path = crawl_shard(tmp_path / "a" / "00000.tar", seed=1)
    ingest(ws, str(path))
    crawl_shard(path, seed=3, n=2)
    again = ingest(ws, str(path))
    assert (again["ingested"], again["accepted"]) == (1, 2)


# --- item 3: a moved crawl updates its URLs; a moved workspace redoes nothing --------------------

@pytest.mark.parametrize("how", ["move", "copy"])
def test_a_crawl_found_at_a_new_place_points_the_samples_there(tmp_path, how):
    ws = Workspace(tmp_path / "ws")
    old = tmp_path / "old"
    for i in range(2):
        crawl_shard(old / f"{i:05d}.tar", seed=i)
    ingest(ws, str(old))
    stamps = {p.name: pq.read_schema(p).metadata for p in (ws.root / "samples").glob("*.parquet")}
    new = tmp_path / "new"
    (shutil.move if how == "move" else shutil.copytree)(old, new)  # copytree: new mtimes, same bytes
    again = ingest(ws, str(new))
    assert (again["ingested"], again["skipped"]) == (0, 2)
    assert shard_urls(ws) == {str(new / "00000.tar"), str(new / "00001.tar")}
    origins = catalog.query(ws, "SELECT shard_origin FROM shards").column("shard_origin").to_pylist()
    assert sorted(origins) == [str(new / "00000.tar"), str(new / "00001.tar")]
    for p in (ws.root / "samples").glob("*.parquet"):  # later stages' skip keys are unchanged
        assert json.loads(pq.read_schema(p).metadata[b"fingerprint"]) == json.loads(stamps[p.name][b"fingerprint"])
    assert ingest(ws, str(new))["skipped"] == 2  # and the next rerun is a plain skip


def test_a_shard_fingerprint_is_its_content_not_its_place(tmp_path):
    ws = Workspace(tmp_path / "ws")
    path = crawl_shard(tmp_path / "a" / "00000.tar", seed=1)
    ingest(ws, str(path))
    import hashlib

    fp = json.loads(pq.read_schema(ws.root / "samples" / "00000.parquet").metadata[b"fingerprint"])
    assert fp == "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_a_workspace_copied_elsewhere_with_its_teacher_redoes_nothing(small_crawl, small_teacher, tmp_path):
    """embed (the teacher's features) and score on a workspace, copy workspace and teacher to another
    folder (new paths, new mtimes), rerun both there: every shard skipped, the scoring run's record
    kept (the selections made from it stay valid)."""
    from curation.score import ScoreConfig

    first, teacher = tmp_path / "a", tmp_path / "a" / "teacher"
    shutil.copytree(small_teacher.parent, teacher)
    ws = Workspace(first / "ws")
    ingest(ws, str(small_crawl / "crawl"))

    def embed_and_score(ws: Workspace, teacher: Path) -> tuple[dict, dict]:
        spec = str(teacher / "teacher.json")
        embedded = stage_runner.run_embed(ws, embedder="teacher", teacher=spec, device="cpu", batch_size=128,
                                          workers=0)
        scored = stage_runner.run_score(ws, ScoreConfig(teacher=spec, name="r1", device="cpu", workers=0,
                                                        odin=False))
        return embedded, scored

    embedded, scored = embed_and_score(ws, teacher)
    shards = embedded["embedded"]
    assert shards >= 2 and scored["scored"] == shards
    run_json = (ws.root / "scores" / "r1" / "run.json").read_text()

    shutil.copytree(first, tmp_path / "b")  # copytree: new mtimes, same bytes, another absolute path
    moved = Workspace(tmp_path / "b" / "ws")
    embedded, scored = embed_and_score(moved, tmp_path / "b" / "teacher")
    assert (embedded["embedded"], embedded["skipped"]) == (0, shards)
    assert (scored["scored"], scored["skipped"]) == (0, shards)
    assert (moved.root / "scores" / "r1" / "run.json").read_text() == run_json


# --- a workspace moved or copied elsewhere keeps its students -------------------------------------

STUDENT_OPTIONS = {"student": "tiny_cnn", "loss": {"method": "kd"}, "teacher_mode": "stored", "epochs": 1,
                   "batch_size": 16, "lr": 0.05, "nproc": 1, "workers": 0}  # what the CLI line below builds
STUDENT_ARGS = ["--selection", "few", "--student", "tiny_cnn", "--batch-size", "16", "--loader-workers", "0",
                "--name", "s1"]


@pytest.mark.slow
@pytest.mark.parametrize("how", ["copied", "moved"])
def test_a_workspace_copied_or_moved_elsewhere_keeps_its_finished_student(small_crawl, tmp_path, how):
    """A finished student (tiny_cnn, 1 epoch, 32 samples, an eval set beside the workspace), then the
    folder copied or moved: `distill` there sees the same job (no WouldOverwrite), and so does the
    pipeline's overwrite=True: neither retrains. Another config there is still refused."""
    from curation.ingest import ingest as ingest_shards
    from curation.score import ScoreConfig, score
    from curation.select import SelectConfig, select

    first = tmp_path / "a"
    shutil.copytree(small_crawl / "eval", first / "eval")
    ws = Workspace(first / "ws")
    ingest_shards(ws, [str(small_crawl / "crawl")], workers=1, progress=False)
    score(ws, ScoreConfig(teacher="tests.models_for_tests:thumbnail", name="r1", batch_size=128, workers=0,
                          odin=False, trust_model_code=True), progress=False)
    catalog.refresh(ws)
    select(ws, SelectConfig(name="few", sql="SELECT sample_id FROM candidates ORDER BY sample_id LIMIT 32"))
    eval_set = "eval/mnist-test.tar"
    trained = stage_runner.run_distill(str(ws.root), "s1", "few", STUDENT_OPTIONS | {"eval": str(first / eval_set)})
    assert trained["steps"] >= 1 and not trained.get("resumed_from_step")
    metrics = (ws.root / "students" / "s1" / "metrics.jsonl").read_bytes()
    files = {f: (ws.root / "students" / "s1" / f).read_bytes() for f in ("student.pt", "student.pt2", "job.log")}
    same = stage_runner.run_distill(str(ws.root), "s1", "few", STUDENT_OPTIONS | {"eval": str(first / eval_set)})
    # finished: not launched again (no second attempt in job.log), so the student keeps its bytes and
    # a scoring run keyed on them (the next round's) is not redone
    assert same == trained
    assert all((ws.root / "students" / "s1" / f).read_bytes() == b for f, b in files.items())

    second = tmp_path / "b"
    (shutil.copytree if how == "copied" else shutil.move)(first, second)
    there = second / "ws"
    again = run_cli("distill", "-w", str(there), *STUDENT_ARGS, "--epochs", "1", "--eval", str(second / eval_set))
    assert again.returncode == 0, again.stderr
    summary = json.loads((there / "students" / "s1" / "summary.json").read_text())
    assert summary["resumed_from_step"] == trained["steps"] == summary["steps"]  # resumed at its end: no training
    assert summary["selection_sha256"] == trained["selection_sha256"]
    # the pipeline's distill (overwrite=True) keeps it too: it deleted and retrained every student before
    kept = stage_runner.run_distill(str(there), "s1", "few", STUDENT_OPTIONS | {"eval": str(second / eval_set)},
                                    overwrite=True)
    assert kept["resumed_from_step"] == trained["steps"]
    assert (there / "students" / "s1" / "metrics.jsonl").read_bytes() == metrics
    refused = run_cli("distill", "-w", str(there), *STUDENT_ARGS, "--epochs", "2", "--eval", str(second / eval_set))
    assert refused.returncode == 2 and "'s1' exists" in refused.stderr and "--overwrite" in refused.stderr


@pytest.mark.parametrize("summary", [
    {"checkpoint": "/etc/passwd"},                                  # a file outside the run folder
    {"checkpoint": "{out}/../other/student.json"},                  # a neighbour's run, by ..
    {"checkpoint": "{out}/student.json", "state_dict": "/etc/hostname"},
    {"checkpoint": "{out}/missing.json"},                           # named, not there
    {"checkpoint": 7},
    [],
    "not json",
])
def test_a_summary_from_elsewhere_never_stands_for_a_finished_run(tmp_path, summary):
    """A workspace from elsewhere may hold any summary.json: only one whose student files lie in the
    run's own folder skips the job; anything else launches it (which checks and rewrites it)."""
    out = tmp_path / "students" / "s1"
    (tmp_path / "students" / "other").mkdir(parents=True)
    out.mkdir()
    for f in ("student.json", "student.pt"):
        (out / f).write_text("{}")
        (tmp_path / "students" / "other" / f).write_text("{}")
    text = summary if isinstance(summary, str) else json.dumps(summary).replace("{out}", str(out))
    (out / "summary.json").write_text(text)
    assert stage_runner._finished_here(out) is None
    (out / "summary.json").write_text(json.dumps({"checkpoint": str(out / "student.json")}))
    assert stage_runner._finished_here(out) == {"checkpoint": str(out / "student.json")}
