"""The `candidates` view's compacted copy (curation/catalog_compact.py): the same rows as the join
it stands for, rebuilt exactly when its inputs change, and whole again after a kill at any moment
of a refresh followed by a rerun."""
import os
import shutil
import signal
import subprocess
import sys
import time

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from bench.catalog_scale import make_workspace
from curation import catalog, catalog_compact
from curation.files import temporary_name
from curation.workspace import Workspace, write_parquet_atomic

from .faultkit import catalog_digest, cli_cmd, cli_env, leftovers, run_and_kill


def _view(ws: Workspace):
    return catalog.query(ws, "SELECT * FROM candidates ORDER BY sample_id")


def _join(ws: Workspace):
    """What the view stood for before it was compacted: the join over the per-shard views."""
    return catalog.query(ws, f"SELECT * FROM ({catalog.candidates_query(catalog.candidate_sources(ws))}) "
                             "ORDER BY sample_id")


def _reads_copy(ws: Workspace) -> bool:
    sql = catalog.query(ws, "SELECT sql FROM duckdb_views() WHERE view_name = 'candidates'").to_pylist()[0]["sql"]
    return str(catalog_compact.path(ws, "candidates")) in sql


@pytest.fixture
def ws(tmp_path) -> Workspace:
    return make_workspace(tmp_path / "ws", rows=3000, shards=3)


def test_the_copy_answers_as_the_join_and_follows_its_inputs(ws):
    catalog.refresh(ws)
    copy = catalog_compact.path(ws, "candidates")
    assert _reads_copy(ws)
    first = _view(ws)
    assert first.num_rows == 3000 and first.equals(_join(ws))  # same rows, same column names and types

    made = copy.stat().st_mtime_ns
    catalog.refresh(ws)  # nothing changed: the copy is kept
    assert copy.stat().st_mtime_ns == made

    rescored = ws.root / "scores" / "default" / "00001.parquet"  # a rerun of score rewrote one shard
    table = pq.read_table(rescored)
    write_parquet_atomic(table.set_column(table.schema.get_field_index("fused"), "fused",
                                          pc.negate(table["fused"])), rescored)
    assert _view(ws).equals(first)  # until refresh, the view answers from its copy
    catalog.refresh(ws)
    assert copy.stat().st_mtime_ns != made
    second = _view(ws)
    assert second.equals(_join(ws)) and not second.equals(first)

    made = copy.stat().st_mtime_ns
    catalog.rebuild(ws)  # from the artifacts: the copy too
    assert copy.stat().st_mtime_ns != made and _view(ws).equals(second) and _reads_copy(ws)


def test_a_killed_compactions_temporary_is_swept_and_never_read(ws):
    catalog.refresh(ws)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    final = catalog_compact.path(ws, "candidates")
    planted = final.with_name(temporary_name(final).name.replace(f"-{os.getpid()}-", f"-{dead.pid}-"))
    planted.write_bytes(final.read_bytes()[: final.stat().st_size // 2])  # half a file, as a kill leaves it
    shutil.rmtree(ws.root / "clusters")  # an input changed: the next refresh compacts again
    catalog.refresh(ws)
    assert not planted.exists() and _view(ws).equals(_join(ws))
    assert _view(ws).column("cluster").null_count == 3000


def _kill_while_compacting(ws: Workspace) -> bool:
    """Start `webdistill refresh`; SIGKILL its process group once the copy's temporary is being
    written. False: the refresh ended before that was seen."""
    folder = ws.root / catalog_compact.FOLDER
    proc = subprocess.Popen(cli_cmd(["refresh", "-w", str(ws.root)]), env=cli_env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if folder.is_dir() and any(p.name.endswith(".tmp") for p in folder.iterdir()):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.002)
    proc.wait()
    return False


def test_a_kill_mid_compaction_or_at_any_moment_then_a_rerun_gives_the_same_catalog(tmp_path):
    """SIGKILL of `webdistill refresh` while it writes the copy, and at other moments, then a rerun:
    the catalog reads as after one uninterrupted refresh, and no temporary is left."""
    base = make_workspace(tmp_path / "base", rows=4_000, shards=4)
    reference = Workspace(shutil.copytree(base.root, tmp_path / "reference"))
    start = time.perf_counter()
    subprocess.run(cli_cmd(["refresh", "-w", str(reference.root)]), env=cli_env(), check=True, capture_output=True)
    took = time.perf_counter() - start
    expected = catalog_digest(reference.root)
    for moment in ("compacting", 0.5, 0.9):
        ws = Workspace(shutil.copytree(base.root, tmp_path / f"killed-{moment}"))
        if moment == "compacting":
            assert _kill_while_compacting(ws)
            assert any(p.name.endswith(".tmp") for p in (ws.root / catalog_compact.FOLDER).iterdir())
        else:
            run_and_kill(["refresh", "-w", str(ws.root)], None, took * moment)
        rerun = subprocess.run(cli_cmd(["refresh", "-w", str(ws.root)]), env=cli_env(), capture_output=True,
                               text=True)
        assert rerun.returncode == 0, rerun.stderr
        assert catalog_digest(ws.root) == expected, moment
        assert leftovers(ws.root) == [], moment
