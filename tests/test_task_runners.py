"""Where a pipeline's per-shard tasks run: `dask://local` starts one cluster for the whole run."""
import pytest
from distributed import Client
from prefect.task_runners import ThreadPoolTaskRunner
from prefect_dask import DaskTaskRunner

from flows.task_runners import RunnerError, shared_task_runner, task_runner


def test_dask_local_is_one_cluster_for_every_stage_of_a_run():
    with shared_task_runner("dask://local", 2) as runner:
        # every stage's flow gets this runner: an address, so none of them starts a cluster of its own
        assert isinstance(runner, DaskTaskRunner) and runner.address.startswith("tcp://127.0.0.1:")
        assert not runner.cluster_kwargs
        with Client(runner.address, timeout=30) as client:
            workers = client.scheduler_info()["workers"].values()
            assert len(workers) == 2 and all(w["nthreads"] == 1 for w in workers)
    with pytest.raises(OSError):  # the run's cluster is gone with it
        Client(runner.address, timeout=2)


def test_other_runners_pass_through():
    with shared_task_runner(None, 3) as runner:
        assert isinstance(runner, ThreadPoolTaskRunner)
    with shared_task_runner("dask://10.0.0.5:8786") as runner:
        assert runner.address == "tcp://10.0.0.5:8786"
    with pytest.raises(RunnerError, match="unknown runner"):
        task_runner("spark://x")
