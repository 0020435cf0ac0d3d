"""Where per-shard tasks run: threads in this process (the default), or a Dask / Ray cluster."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from curation.errors import WebdistillError


class RunnerError(WebdistillError):
    """An unknown --runner, or a runner whose package is not installed."""


def task_runner(spec: str | None, max_workers: int = 2):
    """`local` (or None): a thread pool; `dask://HOST:PORT`: an existing Dask scheduler
    (prefect-dask); `dask://local`: a temporary local Dask cluster; `ray://HOST:PORT`: prefect-ray."""
    if not spec or spec == "local":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=max_workers)
    if spec.startswith("dask://"):
        try:
            from prefect_dask import DaskTaskRunner
        except ImportError as exc:
            raise RunnerError("dask:// runners need prefect-dask (pip install prefect-dask)") from exc
        target = spec[len("dask://"):]
        if target == "local":
            return DaskTaskRunner(cluster_kwargs={"n_workers": max_workers, "threads_per_worker": 1})
        return DaskTaskRunner(address=f"tcp://{target}")
    if spec.startswith("ray://"):
        try:
            from prefect_ray import RayTaskRunner
        except ImportError as exc:
            raise RunnerError("ray:// runners need prefect-ray (pip install 'webdistill[ray]')") from exc
        return RayTaskRunner(address=spec)
    raise RunnerError(f"unknown runner {spec!r}: use local, dask://HOST:PORT, dask://local or ray://HOST:PORT")


@contextmanager
def shared_task_runner(spec: str | None, max_workers: int = 2) -> Iterator:
    """The task runner that every stage of one pipeline run shares. `dask://local` starts its cluster
    here, once: a DaskTaskRunner with cluster_kwargs starts and stops a cluster in each stage's flow,
    and each start costs seconds of worker start-up and imports (torch) per stage, which made a
    10^4-sample run on 2 workers slower than the thread pool."""
    if spec != "dask://local":
        yield task_runner(spec, max_workers)
        return
    from distributed import LocalCluster

    with LocalCluster(n_workers=max_workers, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        yield task_runner("dask://" + cluster.scheduler_address.removeprefix("tcp://"), max_workers)
