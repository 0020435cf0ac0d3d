"""The `crawl` flow: one task per planned shard (with retries) over `curation.crawl`, which knows
nothing of Prefect. Finished shards are skipped, so a rerun resumes."""
from __future__ import annotations

import functools
from datetime import UTC, datetime

from prefect import flow

from .pipeline_config import load_pipeline_config
from .stage_runner import check_failures
from .stages import prefect_map


@flow(name="crawl")
def crawl_flow(url_list: str, out: str, options: dict | None = None, max_failure_fraction: float = 0.1) -> dict:
    """Crawl a URL list (parquet/csv/jsonl with `url`, optional `caption`) into img2dataset-style shards.
    `options` are CrawlConfig fields: timeout_s, max_bytes, concurrency, retries, allow_private,
    allowed_networks (CIDRs; the only way to open link-local and other special ranges), ..."""
    from curation.crawl import CrawlConfig, crawl_shard, plan_shards, read_url_list

    started = datetime.now(UTC)
    config = CrawlConfig(**(options or {}))
    plans = plan_shards(read_url_list(url_list), config.shard_size)
    results, failed = prefect_map("crawl-shard")(functools.partial(crawl_shard, out_dir=out, config=config), plans,
                                                 [p.name for p in plans])
    summary = {"shards": len(plans), "skipped": sum(r.skipped for r in results),
               "successes": sum(r.n_success for r in results if not r.skipped),
               "failures": sum(r.n_failed for r in results if not r.skipped), "failed": failed,
               "started_at": started.isoformat()}
    check_failures("crawl", failed, len(plans), max_failure_fraction, summary)
    return summary


@flow(name="crawl-config")
def crawl_config_flow(config_path: str) -> dict:
    """The crawl section of a pipeline YAML (what `webdistill serve` schedules)."""
    cfg = load_pipeline_config(config_path)
    c = cfg.abs_paths(dict(cfg.sections["crawl"]), ("url_list", "out"))
    return crawl_flow(url_list=c.pop("url_list"), out=c.pop("out"), options=c,
                      max_failure_fraction=cfg.max_failure_fraction)
