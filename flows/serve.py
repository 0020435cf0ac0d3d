"""`webdistill serve CONFIG.yaml`: the config's flows as deployments on cron schedules, served
from this process (Prefect's `serve`): they run when their schedule fires, or on demand with
`prefect deployment run 'FLOW/DEPLOYMENT'`."""
from __future__ import annotations

import asyncio
import os
import signal
import threading
from pathlib import Path

from .pipeline import PipelineConfigError, curation_flow, load_pipeline_config, pipeline_flow

# schedule key -> (flow, what it runs)
SCHEDULABLE = {"curation": curation_flow, "pipeline": pipeline_flow}


def build_deployments(config_path: str) -> list:
    """One deployment per schedule in the config (`crawl`, `curation`, `distill` or `pipeline`)."""
    cfg = load_pipeline_config(config_path)
    path = str(Path(config_path).resolve())
    known = dict(SCHEDULABLE)
    if "crawl" in cfg.sections:
        from .crawl_flow import crawl_config_flow

        known["crawl"] = crawl_config_flow
    known["distill"] = pipeline_flow  # distillation needs fresh scores and a selection: the whole loop
    if not cfg.schedules:
        raise PipelineConfigError(f"{config_path}: no 'schedules' section (e.g. schedules: {{curation: '0 3 * * *'}})")
    deployments = []
    for key, cron in cfg.schedules.items():
        if key not in known:
            raise PipelineConfigError(f"{config_path}: cannot schedule {key!r} (known: {', '.join(sorted(known))})")
        deployments.append(known[key].to_deployment(name=f"{cfg.name}-{key}", cron=cron,
                                                    parameters={"config_path": path},
                                                    description=f"{key} for {path}, on cron {cron!r}"))
    return deployments


SERVE_STOP_S = 10.0  # how long serve may take to stop after SIGTERM


def serve_deployments(deployments: list, stop_s: float = SERVE_STOP_S) -> int:
    """Serve `deployments` (build_deployments) until Ctrl-C or SIGTERM; the exit status (128 + the signal).

    Prefect's `serve`, with its runner's SIGTERM handler replaced: that one exits 0 from inside the
    event loop and, once the Prefect server is gone, its shutdown retries API calls for minutes (a
    service manager would SIGKILL it first). Here SIGTERM stops as Ctrl-C does (the runner cancels and
    deregisters) and the process exits within `stop_s` whatever happens."""
    from prefect.runner import Runner

    terminated = []

    class PromptlyStoppedRunner(Runner):
        def handle_sigterm(self, *args, **kwargs) -> None:
            terminated.append(True)
            timer = threading.Timer(stop_s, lambda: os._exit(128 + signal.SIGTERM))
            timer.daemon = True
            timer.start()
            raise KeyboardInterrupt

    runner = PromptlyStoppedRunner(pause_on_shutdown=True)  # prefect.serve's default
    # start() installs the same handler: this one covers the registration before it
    signal.signal(signal.SIGTERM, runner.handle_sigterm)
    try:
        for deployment in deployments:
            runner.add_deployment(deployment)
        asyncio.run(runner.start())
    except KeyboardInterrupt:
        return 128 + (signal.SIGTERM if terminated else signal.SIGINT)
    return 0
