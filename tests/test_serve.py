"""`webdistill serve` against a real `prefect server start` on 127.0.0.1: the deployment is
registered with its cron schedule, `prefect deployment run` triggers it, and the run completes.
The processes are stopped by PID: the serve process before the server."""
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from curation import catalog
from curation.workspace import Workspace

from .conftest import ROOT
from .ports import free_port

pytestmark = pytest.mark.slow  # a Prefect server and a served deployment run to completion

PREFECT = str(Path(sys.executable).parent / "prefect")


def _wait(predicate, timeout: float, what: str, proc=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: the process exited with {proc.returncode}")
        try:
            value = predicate()
            if value:
                return value
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


@dataclass
class Served:
    api: str
    env: dict
    server: subprocess.Popen
    serve: subprocess.Popen
    deployment: dict


@contextmanager
def served(tmp_path: Path, config: dict, deployment: str):
    """A `prefect server start` on a free port and `webdistill serve` of `config` registered on it;
    both stopped by PID afterwards: the serve process first, then the server it talks to."""
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = dict(os.environ, PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_API_URL=api,
               PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1", PREFECT_UI_ENABLED="false",
               PYTHONPATH=str(ROOT))
    config_path = tmp_path / f"{config['name']}.yaml"
    config_path.write_text(yaml.safe_dump(config))
    server = subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env=env,
                              stdout=open(tmp_path / "server.log", "w"), stderr=subprocess.STDOUT,
                              start_new_session=True)
    serve = None
    try:
        _wait(lambda: httpx.get(f"{api}/health", timeout=5).status_code == 200, 180, "the Prefect server", server)
        serve = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", str(config_path)], env=env, cwd=ROOT,
                                 stdout=open(tmp_path / "serve.log", "w"), stderr=subprocess.STDOUT,
                                 start_new_session=True)

        def registered():
            r = httpx.get(f"{api}/deployments/name/{deployment}", timeout=5)
            return r.json() if r.status_code == 200 else None

        yield Served(api, env, server, serve, _wait(registered, 120, "the served deployment", serve))
    finally:
        for proc in (serve, server):
            if proc is not None:
                _stop(proc)
    assert serve.poll() is not None and server.poll() is not None


def test_serve_registers_a_cron_deployment_that_runs_to_completion(tmp_path, small_crawl, small_teacher):
    config = {"name": "nightly", "workspace": str(tmp_path / "ws"),
              "ingest": {"shards": [str(small_crawl / "crawl")]},
              "score": {"teacher": str(small_teacher), "options": {"batch_size": 128, "workers": 0}},
              "select": {"policy": "topk:k=50;by=msp"},
              "schedules": {"curation": "0 3 * * *"}}
    with served(tmp_path, config, "curation/nightly-curation") as s:
        crons = [sched["schedule"].get("cron") for sched in s.deployment["schedules"]]
        assert crons == ["0 3 * * *"]

        run = subprocess.run([PREFECT, "deployment", "run", "curation/nightly-curation"], env=s.env,
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stdout + run.stderr
        run_id = next(line.split()[-1] for line in run.stdout.splitlines() if "UUID" in line)

        def finished():
            state = httpx.get(f"{s.api}/flow_runs/{run_id}", timeout=5).json()["state"]["type"]
            return state if state in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") else None

        final = _wait(finished, 300, "the flow run", s.serve)
        assert final == "COMPLETED", (tmp_path / "serve.log").read_text()[-3000:]
        ws = Workspace(tmp_path / "ws")
        sizes = catalog.query(ws, "SELECT size FROM selections WHERE name = 'nightly-round1'").to_pylist()
        assert sizes == [{"size": 50}]


def test_serve_stops_promptly_on_sigterm_after_its_server_is_gone(tmp_path, small_crawl, small_teacher):
    """Issue 17: serve hung over 90 s on SIGTERM once its Prefect server had gone; it exits within
    SERVE_STOP_S (and a margin for a busy machine) now, with 128 + SIGTERM."""
    from flows.serve import SERVE_STOP_S

    config = {"name": "gone", "workspace": str(tmp_path / "ws"), "ingest": {"shards": [str(small_crawl / "crawl")]},
              "score": {"teacher": str(small_teacher)}, "select": {"policy": "topk:k=5;by=msp"},
              "schedules": {"curation": "0 3 * * *"}}
    with served(tmp_path, config, "curation/gone-curation") as s:
        os.killpg(s.server.pid, signal.SIGKILL)  # the server goes first
        s.server.wait(10)
        start = time.monotonic()
        os.kill(s.serve.pid, signal.SIGTERM)
        s.serve.wait(SERVE_STOP_S + 20)
        assert time.monotonic() - start < SERVE_STOP_S + 20
        assert s.serve.returncode == 128 + signal.SIGTERM  # stopped by the signal, not a clean exit
