"""Process faults around per-shard work: a worker killed, a shard that kills every worker it
gets, the parent killed under its workers."""
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from curation.errors import WorkerDied
from curation.ingest import ingest
from curation.parallel import map_shards
from curation.workspace import Workspace

from .conftest import ROOT, encode, noise_image, write_tar
from .worker_faults import square_unless_poisoned


def test_a_killed_worker_costs_no_shard(tmp_path):
    results = dict(map_shards(square_unless_poisoned, [(i, str(tmp_path), "once") for i in range(8)],
                              workers=2, progress=False))
    assert {item[0]: r for item, r in results.items()} == {i: i * i for i in range(8)}
    assert (tmp_path / "tries").read_text() == "xx"  # killed once, then done in a fresh pool


def test_a_shard_that_kills_every_worker_is_reported_and_the_rest_goes_on(tmp_path):
    results = {item[0]: r for item, r in map_shards(
        square_unless_poisoned, [(i, str(tmp_path), "always") for i in range(8)], workers=2, progress=False)}
    assert isinstance(results.pop(3), WorkerDied)
    assert results == {i: i * i for i in range(8) if i != 3}
    assert (tmp_path / "tries").read_text() == "xxx"  # one try and two retries, no more


def _slow_shards(tmp_path: Path, n: int, delay: float) -> list[str]:
    specs = []
    for i in range(n):
        shard = write_tar(tmp_path / "parts" / f"p{i}.tar",
                          [{"__key__": f"{k:03d}", "jpg": encode(noise_image(10 * i + k), "JPEG")} for k in range(3)])
        specs.append(f"pipe:sleep {delay} && cat {shard}")
    return specs


def _spawned_workers(pid: int) -> list[psutil.Process]:
    out = []
    for p in psutil.Process(pid).children(recursive=True):
        try:
            if "spawn_main" in " ".join(p.cmdline()):
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


@pytest.mark.slow  # a real ingest whose worker is killed
def test_ingest_survives_a_worker_killed_from_outside(tmp_path):
    specs = _slow_shards(tmp_path, 4, 0.5)
    killed = []

    def kill_one_worker():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not killed:
            workers = _spawned_workers(os.getpid())
            if workers and list((tmp_path / "ws" / "shards").glob("*.parquet")):
                workers[0].kill()  # mid-run: a shard is committed, others are in flight
                killed.append(workers[0].pid)
            time.sleep(0.05)

    watcher = threading.Thread(target=kill_one_worker)
    watcher.start()
    summary = ingest(Workspace(tmp_path / "ws"), specs, workers=2, progress=False)
    watcher.join()
    assert killed, "the watcher never saw a worker to kill"
    assert not summary.failed and len(summary.shards) == 4
    assert summary.accepted == 12 and summary.rejected == 0


@pytest.mark.slow  # a parent process killed under its workers
def test_workers_die_with_their_parent_and_commit_nothing_after(tmp_path):
    specs = _slow_shards(tmp_path, 10, 1.0)
    ws = tmp_path / "ws"
    commits = lambda: len(list((ws / "shards").glob("*.parquet")))  # noqa: E731
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "ingest", "-w", str(ws), "--workers", "2", *specs],
                            env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and commits() == 0:
        time.sleep(0.05)
    family = psutil.Process(proc.pid).children(recursive=True)
    assert any("spawn_main" in " ".join(p.cmdline()) for p in family)
    proc.send_signal(signal.SIGKILL)
    at_kill = commits()
    proc.wait()
    gone_by = time.monotonic() + 15  # `sleep 1` in a pipe: command may outlive its reader by a second
    while time.monotonic() < gone_by and any(_alive(p) for p in family):
        time.sleep(0.1)
    survivors = [" ".join(p.cmdline())[:80] for p in family if _alive(p)]
    assert not survivors  # workers, their decode processes and the resource tracker
    after = commits()
    time.sleep(2)
    assert commits() == after <= at_kill + 2  # at most the commits already being renamed at the kill
    assert after < 10


def _alive(p: psutil.Process) -> bool:
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
