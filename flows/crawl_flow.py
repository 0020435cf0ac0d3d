"""The `crawl` flow: one task per planned shard (with retries) over `curation.crawl`, which knows
nothing of Prefect. Finished shards are skipped, so a rerun resumes."""
from __future__ import annotations

from datetime import datetime, timezone

from prefect import flow, task

from .stages import RETRIES, RETRY_DELAY_S, gather


@task(name="crawl-shard", retries=RETRIES, retry_delay_seconds=RETRY_DELAY_S)
def crawl_shard_task(plan, out: str, config):
    from curation.crawl import crawl_shard

    return crawl_shard(plan, out, config)


@flow(name="crawl")
def crawl_flow(url_list: str, out: str, options: dict | None = None, max_failure_fraction: float = 0.1) -> dict:
    """Crawl a URL list (parquet/csv/jsonl with `url`, optional `caption`) into img2dataset-style shards.
    `options` are CrawlConfig fields: timeout_s, max_bytes, concurrency, retries, allow_private,
    allowed_networks (CIDRs; the only way to open link-local and other special ranges), ..."""
    from curation.crawl import CrawlConfig, plan_shards, read_url_list

    started = datetime.now(timezone.utc)
    config = CrawlConfig(**(options or {}))
    plans = plan_shards(read_url_list(url_list), config.shard_size)
    futures = crawl_shard_task.map(plans, out, config)
    results, failed = gather(futures, [p.name for p in plans], "crawl", max_failure_fraction)
    return {"shards": len(plans), "skipped": sum(r.skipped for r in results),
            "successes": sum(r.n_success for r in results if not r.skipped),
            "failures": sum(r.n_failed for r in results if not r.skipped), "failed": failed,
            "started_at": started.isoformat()}


@flow(name="crawl-config")
def crawl_config_flow(config_path: str) -> dict:
    """The crawl section of a pipeline YAML (what `webdistill serve` schedules)."""
    from .pipeline import _abs_paths, load_pipeline_config

    cfg = load_pipeline_config(config_path)
    c = _abs_paths(cfg, dict(cfg.sections["crawl"]), ("url_list", "out"))
    return crawl_flow(url_list=c.pop("url_list"), out=c.pop("out"), options=c,
                      max_failure_fraction=cfg.max_failure_fraction)
