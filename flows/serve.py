"""`webdistill serve CONFIG.yaml`: the config's flows as deployments on cron schedules, served
from this process (Prefect's `serve`): they run when their schedule fires, or on demand with
`prefect deployment run 'FLOW/DEPLOYMENT'`."""
from __future__ import annotations

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


def serve_config(config_path: str) -> None:
    from prefect import serve

    serve(*build_deployments(config_path))
