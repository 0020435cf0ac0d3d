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
