"""Faults in every stage, injected into the CLI as a user runs it (tests/faultkit.py does the work;
bench/faults.py runs more of each and counts them):
- SIGKILL of a stage's whole process group at a random point, then a rerun: the workspace equals an
  uninterrupted run's, by content digest, and no temporary is left or read as output;
- two writers on one workspace at once; a corrupt catalog; a full disk, a read-only filesystem and
  folders without write permission."""
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from curation import catalog
from curation.workspace import Workspace, atomic_path, temporary_name

from .faultkit import (
    CORRUPTIONS,
    STAGES,
    STORAGE_FAULTS,
    Baseline,
    CrawlBaseline,
    ImageServer,
    Inputs,
    corrupt_catalog,
    crawl_storage_fault,
    kill_crawl,
    kill_stage,
    leftovers,
    records_match_files,
    run_cli,
    score_while_querying,
    stage_args,
    storage_fault,
    two_ingests,
    two_selects,
    workspace_digest,
)

pytestmark = pytest.mark.slow  # every test kills or starves a real pipeline run (minutes)


@pytest.fixture(scope="module")
def baseline(small_crawl, small_teacher, tmp_path_factory) -> Baseline:
    """ingest, embed, index, score, synthesize and select, each once without faults, by the CLI."""
    return Baseline(Inputs(small_crawl / "crawl", small_teacher), tmp_path_factory.mktemp("faults")).build()


def test_the_digest_equals_for_a_copy_and_sees_one_changed_value(baseline, tmp_path):
    """The comparison the other tests rely on: equal for a copy elsewhere (paths and catalog repointed),
    different once one caption changes."""
    ws = baseline.fresh("select", tmp_path / "copy")
    assert workspace_digest(ws) == baseline.expected["synthesize"]
    table = pq.read_table(ws / "samples" / "00001.parquet")
    pq.write_table(table.set_column(table.schema.get_field_index("caption"), "caption",
                                    [["changed"] + table["caption"].to_pylist()[1:]]), ws / "samples" / "00001.parquet")
    catalog.refresh(Workspace(ws))  # as a stage does after writing: `candidates` reads a copy made at refresh
    assert {"samples/00001.parquet", "catalog:samples", "catalog:candidates"} <= set(
        k for k, v in workspace_digest(ws).items() if baseline.expected["synthesize"].get(k) != v)


@pytest.mark.parametrize("stage", STAGES)
def test_sigkill_mid_stage_then_rerun_equals_an_uninterrupted_run(baseline, stage, tmp_path):
    result = kill_stage(baseline, stage, tmp_path / "ws", random.Random(f"kill {stage}"))
    assert result.killed, f"{stage} finished before the kill, {result.delay}s after its first write"
    assert result.rerun_rc == 0, result.rerun_error
    assert result.diff == [], f"{stage} killed at {result.delay}s, then rerun: these differ: {result.diff}"
    assert result.leftovers == [], "the rerun left the killed run's temporaries"


@pytest.fixture(scope="module")
def image_server():
    server = ImageServer(delay_s=0.2)
    yield server
    server.close()


@pytest.fixture(scope="module")
def crawled(image_server, tmp_path_factory) -> CrawlBaseline:
    return CrawlBaseline.build(image_server, tmp_path_factory.mktemp("crawl"), n=24)


def test_sigkill_mid_crawl_then_rerun_equals_an_uninterrupted_crawl(crawled, tmp_path):
    result = kill_crawl(crawled, tmp_path / "killed", random.Random("kill crawl"))
    assert result.killed and result.rerun_rc == 0, result
    assert result.diff == [] and result.leftovers == []


def test_a_crawl_that_cannot_write_stops_with_one_line(crawled, tmp_path):
    result = crawl_storage_fault(crawled, "read-only filesystem", tmp_path / "out")
    assert result.returncode == 2 and result.problems == [], result  # not one failure line per shard
    assert result.rerun_diff == []


def _temporary_of_a_dead_writer(final) -> str:
    """The temporary name a writer process gives `final`, from a process that has exited since."""
    code = "import sys; from pathlib import Path; from curation.workspace import temporary_name; " \
           "print(temporary_name(Path(sys.argv[1])))"
    done = subprocess.run([sys.executable, "-c", code, str(final)], capture_output=True, text=True, check=True,
                          cwd=Path(__file__).resolve().parents[1])
    return done.stdout.strip()


def test_temporaries_of_killed_writers_are_never_read_as_output(baseline, tmp_path):
    """What writers leave when killed (a `.NAME.<host>-<pid>-x.tmp` file, a `.tmp-NAME-x` folder),
    planted with real content: the views and a select rerun ignore them, and the next write into a
    folder removes the files whose writer is gone, never a live writer's."""
    ws = baseline.fresh("select", tmp_path / "ws")
    planted = []
    for real in (ws / "samples" / "00000.parquet", ws / "scores" / "r1" / "00000.parquet",
                 ws / "embeddings" / "teacher" / "00000.npy"):
        planted.append(Path(_temporary_of_a_dead_writer(real)))
        shutil.copy(real, planted[-1])
    live = temporary_name(ws / "samples" / "00001.parquet")  # this process's: alive
    shutil.copy(ws / "samples" / "00001.parquet", live)
    shutil.copytree(baseline.base / "baseline" / "selections" / "sel", ws / "selections" / ".tmp-sel-deadbeef")
    assert len(leftovers(ws)) == 5

    done = run_cli(["refresh", "-w", str(ws)])
    assert done.returncode == 0, done.stderr
    assert workspace_digest(ws) == baseline.expected["synthesize"]  # temporaries are not in any view
    done = run_cli(stage_args("select", baseline.inputs, ws))
    assert done.returncode == 0, done.stderr
    assert workspace_digest(ws) == baseline.expected["select"]
    assert records_match_files(ws) == []

    with atomic_path(ws / "samples" / "extra.parquet") as tmp:
        tmp.write_bytes(b"x")
    assert not planted[0].exists(), "the next write into samples/ removes a dead writer's temporary"
    assert live.exists(), "a live writer's temporary is never touched"


@pytest.mark.parametrize("same_name", [False, True], ids=["two names", "one name"])
def test_two_selects_at_once(baseline, tmp_path, same_name):
    result = two_selects(baseline, tmp_path / "ws", same_name)
    assert result.catalog_ok and result.problems == [], result
    assert result.survived, result  # both succeed, or one fails with one line and leaves nothing


@pytest.mark.parametrize("same_shards", [False, True], ids=["different shards", "same shards"])
def test_two_ingests_at_once(baseline, tmp_path, same_shards):
    result = two_ingests(baseline, tmp_path / "ws", same_shards)
    assert result.returncodes == [0, 0], result.errors
    assert result.survived, result


def test_score_while_sql_queries_run(baseline, tmp_path):
    result = score_while_querying(baseline, tmp_path / "ws")
    assert result.returncodes[0] == 0, result.errors[0]
    assert result.survived, result


@pytest.mark.parametrize("kind", ["garbage header", "garbage blocks"])
def test_a_corrupt_catalog_says_so_and_rebuilds(baseline, tmp_path, kind):
    assert kind in CORRUPTIONS
    result = corrupt_catalog(baseline, tmp_path / "ws", kind)
    assert result.problems == [], result.lines
    assert result.rebuilt


@pytest.mark.parametrize("fault, stage", [("disk full", "embed"), ("read-only filesystem", "select"),
                                          ("no permission", "score"), ("disk full", "select")])
def test_a_write_that_fails_is_one_line_and_leaves_no_partial_artifact(baseline, tmp_path, fault, stage):
    assert fault in STORAGE_FAULTS
    result = storage_fault(baseline, stage, fault, tmp_path / "ws")
    assert result.returncode == 2 and len(result.lines) == 1, result
    assert str(tmp_path / "ws") in result.lines[0], f"the line names no file of the workspace: {result.lines[0]}"
    assert result.problems == [], result
    assert result.rerun_diff == [], f"after {fault} ({result.how}), the rerun differs: {result.rerun_diff}"


def test_selections_table_is_restored_from_the_manifests(baseline, tmp_path):
    """A select killed between its swap and its catalog row, or a lost row: refresh brings it back."""
    ws = baseline.fresh("select", tmp_path / "ws")
    shutil.copytree(baseline.base / "baseline" / "selections" / "sel", ws / "selections" / "sel")
    assert records_match_files(ws) == ["selection sel: no catalog row describes the manifest on disk"]
    from curation import catalog

    catalog.refresh(Workspace(ws))
    assert records_match_files(ws) == []
