"""The `crawl` flow: one task per planned shard (with retries) over `curation.crawl`, which knows
nothing of Prefect. Finished shards are skipped, so a rerun resumes."""
from __future__ import annotations

from prefect import flow

from . import stage_runner
from .pipeline_config import load_pipeline_config
from .stages import prefect_map


@flow(name="crawl")
def crawl_flow(url_list: str, out: str, options: dict | None = None, max_failure_fraction: float = 0.1) -> dict:
    """Crawl a URL list (parquet/csv/jsonl with `url`, optional `caption`) into img2dataset-style shards.
    `options` are CrawlConfig fields: timeout_s, max_bytes, concurrency, retries, allow_private,
    allowed_networks (CIDRs; the only way to open link-local and other special ranges), ..."""
    from curation.crawl import CrawlConfig

    # a pipeline's YAML is the crawl's definition: a changed URL list replaces the shards it planned
    return stage_runner.run_crawl(url_list, out, CrawlConfig(**(options or {})), map_shards=prefect_map("crawl-shard"),
                                  max_failure_fraction=max_failure_fraction, overwrite=True)


@flow(name="crawl-config")
def crawl_config_flow(config_path: str) -> dict:
    """The crawl section of a pipeline YAML (what `webdistill serve` schedules)."""
    cfg = load_pipeline_config(config_path)
    c = cfg.abs_paths(dict(cfg.sections["crawl"]), ("url_list", "out"))
    return crawl_flow(url_list=c.pop("url_list"), out=c.pop("out"), options=c,
                      max_failure_fraction=cfg.max_failure_fraction)
