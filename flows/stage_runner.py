"""One runner per stage, shared by the `webdistill` verbs and the Prefect flows.

A runner builds the stage's config, runs the stage, refreshes the catalog and records the run in
`runs` with the same parameters whoever calls it, and returns the summary (a JSON-able dict) that
the CLI prints and a flow returns. Nothing here imports Prefect: a flow adds only what Prefect is
for (tasks mapped over shards, retries, logging), by handing a shard-parallel runner its
`map_shards`:

    map_shards(fn, items, labels) -> (results of the items that finished, {label: one-line error})

The CLI passes `in_process` (one process, errors raise, as a stage function does) or
`process_pool(workers)` (ingest's processes); flows/stages.py passes one that maps Prefect tasks.
Whoever maps, `check_failures` is the one rule for how many failed shards fail the stage: the CLI
allows none (it exits 1 after doing all the work it could), a flow a fraction (0.1 by default).

The stage modules are imported inside the runners: they pull in torch, FAISS and webdataset, and
`webdistill --help` (which imports this module) should not wait for them.
"""
from __future__ import annotations

import functools
import hashlib
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from curation import catalog
from curation.errors import ShardReadError, WebdistillError, WorkerDied, WouldOverwrite, first_line, would_overwrite
from curation.files import file_digest
from curation.workspace import Workspace, check_name, remove_tree

MapShards = Callable[[Callable, Sequence, Sequence[str]], tuple[list, dict[str, str]]]


class StageFailed(WebdistillError):
    """More shards failed than the stage's failure fraction allows. `summary` is what the stage
    recorded for the shards that did finish."""

    def __init__(self, message: str, summary: dict | None = None):
        super().__init__(message)
        self.summary = summary or {}


# --- mapping shards, and the failure rule ---------------------------------------------------

def failure_reason(exc: BaseException) -> str:
    """One line for a failed shard: the message of our own shard errors, else `Type: first line`."""
    first = first_line(exc)
    if isinstance(exc, (ShardReadError, WorkerDied, WouldOverwrite)) or first == exc.__class__.__name__:
        return first
    return f"{exc.__class__.__name__}: {first}"


def check_failures(stage: str, failed: dict[str, str], total: int, max_failure_fraction: float,
                   summary: dict | None = None) -> None:
    """The failure rule, for the CLI and the flows alike: raise StageFailed when more than
    `max_failure_fraction` of the stage's `total` shards failed (0.0: any failed shard fails it)."""
    if len(failed) > max_failure_fraction * max(total, 1):
        label, why = next(iter(failed.items()))
        raise StageFailed(f"{stage}: {len(failed)} of {total} shard(s) failed (allowed fraction "
                          f"{max_failure_fraction}); first: {label}: {why}", summary)


def in_process(fn: Callable, items: Sequence, labels: Sequence[str]) -> tuple[list, dict[str, str]]:
    """Run each item here, in order; an error stops the stage (a user error is one line, exit 2)."""
    return [fn(item) for item in items], {}


def _call_with_label(fn: Callable, item_and_label: tuple) -> Any:
    return fn(item_and_label[0])


def process_pool(workers: int, progress: bool = True, desc: str = "shards") -> MapShards:
    """Items in `workers` processes (curation.parallel); a failed item is reported, not raised."""
    def map_shards(fn: Callable, items: Sequence, labels: Sequence[str]) -> tuple[list, dict[str, str]]:
        from curation.parallel import map_shards as parallel_map

        results, failed = [], {}
        paired = list(zip(items, labels))
        for (_, label), out in parallel_map(functools.partial(_call_with_label, fn), paired, workers=workers,
                                            desc=desc, progress=progress):
            if isinstance(out, BaseException):
                failed[label] = failure_reason(out)
            else:
                results.append(out)
        return results, failed

    return map_shards


def _chunks(items: Sequence, size: int | None) -> list[list]:
    """Groups of `size` items (None: one group of them all; none at all for no items)."""
    size = max(1, size or len(items) or 1)
    return [list(items[i:i + size]) for i in range(0, len(items), size)]


def _now() -> datetime:
    return datetime.now(UTC)


def _record(ws: Workspace, stage: str, started: datetime, params: dict, summary: dict) -> None:
    catalog.refresh(ws)
    catalog.record_run(ws, stage, started, params, summary)


# --- crawl ----------------------------------------------------------------------------------

def run_crawl(url_list: str, out: str, config=None, map_shards: MapShards | None = None, workers: int = 1,
              progress: bool = True, max_failure_fraction: float = 0.0, overwrite: bool = False) -> dict:
    """Crawl a URL list into img2dataset-style shards under `out`. There is no workspace yet, so no
    run is recorded. Without `map_shards` (the CLI) shards run `workers` at a time in threads, under one
    progress bar over URLs (curation.crawl.crawl); a flow passes its Prefect mapper, one task per shard.
    Shards of another URL list in `out` are refused (WouldOverwrite) unless `overwrite`."""
    from curation.crawl import (
        CrawlConfig,
        crawl,
        crawl_shard,
        is_finished,
        plan_shards,
        read_url_list,
        refuse_other_url_lists,
    )

    started = _now()
    config = config or CrawlConfig()
    if map_shards is None:
        done = crawl(url_list, out, config, workers=workers, progress=progress, overwrite=overwrite)
        results, failed = done.shards, done.failed
    else:
        plans = plan_shards(read_url_list(url_list), config.shard_size)
        if not overwrite:
            refuse_other_url_lists([p for p in plans if not is_finished(p, out, config)], out)
        results, failed = map_shards(functools.partial(crawl_shard, out_dir=out, config=config), plans,
                                     [p.name for p in plans])
    crawled = [r for r in results if not r.skipped]
    kinds: dict[str, int] = {}
    for r in crawled:
        for kind, n in r.error_kinds.items():
            kinds[kind] = kinds.get(kind, 0) + n
    summary = {"shards": len(results) + len(failed), "crawled": len(crawled), "skipped": len(results) - len(crawled),
               "successes": sum(r.n_success for r in crawled), "failures": sum(r.n_failed for r in crawled),
               "error_kinds": kinds, "failed": failed, "started_at": started.isoformat()}
    check_failures("crawl", failed, summary["shards"], max_failure_fraction, summary)
    return summary


# --- ingest ---------------------------------------------------------------------------------

def run_ingest(ws: Workspace, shards: list[str], config=None, source: str | None = None,
               map_shards: MapShards = in_process, max_failure_fraction: float = 0.0) -> dict:
    """Validate every shard the specs name into `samples` / `rejects` (config: a ValidationConfig)."""
    from curation.ingest import ingest_shard
    from curation.shards import expand_shards
    from curation.validate import ValidationConfig

    config = config or ValidationConfig()
    started = _now()
    refs, missing = expand_shards(shards, source)
    results, failed = map_shards(functools.partial(ingest_shard, str(ws.root), config=config), refs,
                                 [r.url for r in refs])
    done = [r for r in results if not r.skipped]
    reasons: dict[str, int] = {}
    for r in done:
        for k, v in r.reasons.items():
            reasons[k] = reasons.get(k, 0) + v
    summary = {"shards": len(refs), "ingested": len(done), "skipped": len(results) - len(done),
               "accepted": sum(r.n_accepted for r in done), "rejected": sum(r.n_rejected for r in done),
               "reasons": dict(sorted(reasons.items())), "failed": failed, "missing": missing}
    _record(ws, "ingest", started, {"shards": list(shards), "source": source} | asdict(config), summary)
    if not refs:
        raise StageFailed(f"ingest: no shard found in {shards}", summary)
    check_failures("ingest", failed, len(refs), max_failure_fraction, summary)
    return summary


# --- embed ----------------------------------------------------------------------------------

def embed_shards(ws_root: str, embedder_args: dict, shards: list[str], batch_size: int, workers: int,
                 trust_model_code: bool = False, progress: bool = False) -> dict:
    """Embed a group of shards with one model load (decode workers inside)."""
    from curation.embed import embed
    from curation.embedders import make_embedder

    embedder = make_embedder(**embedder_args, trust_model_code=trust_model_code)
    s = embed(Workspace(ws_root), embedder, batch_size=batch_size, workers=workers, progress=progress, only=shards)
    return {"embedded": s.embedded, "skipped": s.skipped, "samples": s.samples, "seconds": s.seconds,
            "failed_images": s.failed_images}


def run_embed(ws: Workspace, embedder: str = "open_clip:ViT-S-32", pretrained: str | None = None,
              teacher: str | None = None, device: str | None = None, precision: str = "fp32",
              batch_size: int = 256, workers: int = 2, trust_model_code: bool = False,
              map_shards: MapShards = in_process, shards_per_task: int | None = None,
              max_failure_fraction: float = 0.0, progress: bool = False,
              feature_layers: list[str] | str | None = None) -> dict:
    """Embed every ingested shard not yet embedded, in groups of `shards_per_task` (None: one group);
    `feature_layers`: the teacher embedder's layers (curation/feature_taps.py)."""
    from curation.embedders import make_embedder
    from curation.shard_reader import shard_jobs

    started = _now()
    args = {"name": embedder, "pretrained": pretrained, "teacher": teacher, "device": device, "precision": precision,
            "feature_layers": feature_layers}
    # built once here, before any shard: a bad spec is one clear error, and the name and dim are known
    model = make_embedder(**args, trust_model_code=trust_model_code)
    name, dim = model.name, model.dim
    del model  # the groups load their own (in other processes, or one at a time here)
    groups = _chunks([j.shard for j in shard_jobs(ws)], shards_per_task)
    work = functools.partial(embed_shards, str(ws.root), args, batch_size=batch_size, workers=workers,
                             trust_model_code=trust_model_code, progress=progress)
    results, failed = map_shards(work, groups, [",".join(g) for g in groups])
    summary = {"embedder": name, "dim": dim, "embedded": sum(len(r["embedded"]) for r in results),
               "skipped": sum(len(r["skipped"]) for r in results), "samples": sum(r["samples"] for r in results),
               "seconds": sum(r["seconds"] for r in results),
               "failed_images": sum(r["failed_images"] for r in results), "failed": failed}
    _record(ws, "embed", started, args | {"batch_size": batch_size, "workers": workers}, summary)
    check_failures("embed", failed, len(groups), max_failure_fraction, summary)
    return summary


# --- index, near-duplicates, k-means, kNN scores ---------------------------------------------

def run_index(ws: Workspace, embedder: str = "open_clip:ViT-S-32", config=None, workers: int = 2,
              say=None, progress: bool = False) -> dict:
    """The FAISS index, near-duplicate clusters and k-means clusters of one embedder's vectors
    (config: an IndexConfig, or a dict of its fields). `say` gets a line as each phase starts (the
    CLI prints them: on a large pool each phase takes minutes); `progress`: bars in the pixel check."""
    from curation.embedders import embedder_dir_name
    from curation.index import (
        IndexConfig,
        build_index,
        kmeans_clusters,
        near_duplicates,
    )

    name = embedder_dir_name(embedder)
    config = IndexConfig(**config) if isinstance(config, dict) else (config or IndexConfig())
    started = _now()
    say = say or (lambda line: None)
    say(f"index {name}: 1/3 the FAISS index")
    meta = build_index(ws, name, config)
    say(f"index {name}: 2/3 near-duplicate clusters (nearest look-alikes, then "
        + ("their pixels compared)" if config.verify == "pixels" else "no pixel check)"))
    dups = near_duplicates(ws, name, config, workers=workers, progress=progress)
    say(f"index {name}: 3/3 k-means clusters (k={config.kmeans_k})")
    clusters = kmeans_clusters(ws, name, config)
    summary = {"index": meta, "dups": dups, "kmeans_k": clusters["k"]}
    _record(ws, "index", started, {"embedder": name} | asdict(config), summary)
    return summary


def encode_image_files(embedder, paths, strict: bool):
    """Embed image files; an unreadable one is an error (strict) or skipped with one line."""
    import numpy as np
    import torch
    from PIL import Image

    tensors = []
    for path in paths:
        try:
            with Image.open(path) as im:
                tensors.append(embedder.preprocess(im))
        except (OSError, ValueError) as exc:
            if strict:
                raise WebdistillError(f"cannot read image {path}: {exc}") from exc
            print(f"skipping {path}: not a readable image", file=sys.stderr)
    if not tensors:
        raise WebdistillError("no readable images")
    return np.concatenate([embedder.encode_images(torch.stack(tensors[i:i + 256])).numpy()
                           for i in range(0, len(tensors), 256)])


def _refuse_column_collision(name: str) -> None:
    """A kNN score is the column knn_<name> of `candidates`: one a scoring run already has would be
    renamed by DuckDB behind the user's back (knn_teacher_1)."""
    from curation.schemas import SCORE_COLUMNS

    column = f"knn_{name}"
    if column in SCORE_COLUMNS:
        raise WebdistillError(f"knn score name {name!r} would make the column {column}, which every scoring run "
                              f"already has ({SCORE_COLUMNS[column]}); choose another name")


def _reference_definition(prompts: list[str] | None, sql: str | None, images: str | None,
                          files: list[Path]) -> dict:
    """A kNN score's reference set by what it is: the prompts, the query, or the images' names and
    bytes (a moved folder is the same set)."""
    if images is None:
        return {"prompts": list(prompts)} if prompts is not None else {"sql": sql}
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.relative_to(images)}\0{file_digest(path)}\n".encode())
    return {"images_sha256": digest.hexdigest()}


def run_knn_score(ws: Workspace, name: str, embedder: str = "open_clip:ViT-S-32", k: int = 5,
                  prompts: list[str] | None = None, sql: str | None = None, images: str | None = None,
                  trust_model_code: bool = False, overwrite: bool = False) -> dict:
    """Every sample's similarity to a reference set (exactly one of: class prompts, a query returning
    sample_ids, a folder of images), stored as knn_sim under `name`. A score of that name made from
    another reference set, embedder or k is refused (WouldOverwrite) unless `overwrite`."""
    from curation.embedders import embedder_dir_name, embedder_from_workspace
    from curation.index import claim_knn_name, knn_score, vectors_of

    if sum(x is not None for x in (prompts, sql, images)) != 1:
        raise WebdistillError("a kNN score needs exactly one reference set: prompts, sql or images")
    emb = embedder_dir_name(embedder)
    check_name(name, "knn score name")  # before the reference set is encoded
    _refuse_column_collision(name)
    files = sorted(p for p in Path(images).rglob("*") if p.is_file()) if images is not None else []
    what = (f"sql: {sql}" if sql is not None else f"prompts: {list(prompts)}" if prompts is not None
            else f"images: {images}")
    definition = {"embedder": emb, "k": k, "reference": _reference_definition(prompts, sql, images, files)}
    claim_knn_name(ws, name, definition, what, overwrite)  # before the reference set is encoded too
    started = _now()
    if sql is not None:
        table = catalog.query(ws, sql)
        if "sample_id" not in table.column_names:
            raise WebdistillError("--sql must return a sample_id column")
        ref = vectors_of(ws, emb, table.column("sample_id").to_pylist())
    else:
        model = embedder_from_workspace(ws.root, emb, trust_model_code=trust_model_code)
        ref = model.encode_text(list(prompts)).numpy() if prompts is not None else \
            encode_image_files(model, files, strict=False)
    result = knn_score(ws, emb, name, ref, k=k, description=what, definition=definition, overwrite=overwrite)
    _record(ws, "knn-score", started, {"name": name, "embedder": emb, "k": k, "prompts": prompts, "sql": sql,
                                       "images": images}, result)
    return result


# --- score ----------------------------------------------------------------------------------

def score_shards(ws_root: str, config, shards: list[str], progress: bool = False):
    """Pass 1 (per-shard scores) over a group of shards, with one model load."""
    from curation.score import score_pass1

    return score_pass1(Workspace(ws_root), config, progress=progress, only=shards)


def run_score(ws: Workspace, config, map_shards: MapShards = in_process, shards_per_task: int | None = None,
              max_failure_fraction: float = 0.0, progress: bool = False, overwrite: bool = False) -> dict:
    """Score every ingested sample with the teacher (and student): pass 1 per group of shards,
    then pass 2 over the pool (config: a ScoreConfig). A run of that name made with another teacher
    or settings is refused (WouldOverwrite) unless `overwrite`; the same config resumes."""
    from curation.score import ScoreSummary, claim_run, finish
    from curation.shard_reader import shard_jobs

    started = _now()
    claim_run(ws, config, overwrite)
    groups = _chunks([j.shard for j in shard_jobs(ws)], shards_per_task)
    work = functools.partial(score_shards, str(ws.root), config, progress=progress)
    results, failed = map_shards(work, groups, [",".join(g) for g in groups])
    merged = ScoreSummary(config.name, scored=[s for r in results for s in r.scored],
                          skipped=[s for r in results for s in r.skipped], samples=sum(r.samples for r in results),
                          seconds=sum(r.seconds for r in results),
                          teacher=next((r.teacher for r in results if r.teacher), None))
    done = finish(ws, config, merged, started)
    summary = {"name": config.name, "scored": len(done.scored), "skipped": len(done.skipped), "samples": done.samples,
               "reference_samples": done.reference_samples, "reference": done.reference,
               "seconds": done.seconds, "unscored": done.unscored,
               "notes": done.notes, "failed": failed}
    _record(ws, "score", started, asdict(config), summary)
    check_failures("score", failed, len(groups), max_failure_fraction, summary)
    return summary


# --- select, synthesize ---------------------------------------------------------------------

def run_select(ws: Workspace, config, overwrite: bool = False) -> dict:
    """Choose samples (config: a SelectConfig) and write the curated shards; the summary names the
    scoring run the candidates were read from. `overwrite`: replace a selection of that name made
    with another definition (refused otherwise)."""
    from curation.coverage import class_coverage
    from curation.select import select

    started = _now()
    result = select(ws, config, overwrite=overwrite)
    m = result.manifest
    summary = {"name": config.name, "size": result.size, "path": str(result.path), "unchanged": result.unchanged,
               "score_run": m.get("score_run"), "shards": len(m["shards"]),
               "counts_per_class": m["counts_per_class"], "lost": len(m.get("lost") or ()),
               "notes": list(m.get("notes") or ()), "policy": m.get("policy"), "policy_steps": m.get("policy_steps"),
               "coverage": m.get("coverage") or class_coverage(m["counts_per_class"], m.get("num_classes"))}
    _record(ws, "select", started, asdict(config) | {"score_run": m.get("score_run")}, summary)
    return summary


def run_report(ws: Workspace, out: str | None = None, selections: list[str] | None = None,
               truth: str | None = None) -> dict:
    """The HTML report of the workspace (curation.report_build): out defaults to <workspace>/report.html."""
    from curation.report_build import write_report

    started = _now()
    summary = write_report(ws, Path(out) if out else None, selections or None, Path(truth) if truth else None)
    catalog.record_run(ws, "report", started, {"out": out, "selections": selections, "truth": truth},
                       {k: summary[k] for k in ("path", "bytes", "seconds", "thumbnails")})
    return summary


def run_synthesize(ws: Workspace, config, progress: bool = False) -> dict:
    """Nguyen et al.: confident synthetic images per class, from a cVAE of the scored pool
    (config: a SynthConfig)."""
    import torch

    from curation.synthesize import synthesize

    started = _now()
    torch.set_num_threads(1)  # small models: one thread is faster than two fighting the decode worker
    result = synthesize(ws, config, progress=progress)
    m = result.manifest
    summary = {"name": config.name, "size": result.size, "path": str(result.path), "unchanged": result.unchanged,
               "pass_rate": m.get("pass_rate"), "counts_per_class": m["counts_per_class"]}
    _record(ws, "synthesize", started, asdict(config), summary)
    return summary


# --- distill --------------------------------------------------------------------------------

def _job_identity(job: dict) -> dict:
    """A distill job by what it trains on, not where: the selection is compared by its manifest's bytes
    (selection.sha256) and the run folder by its name, so both paths are left out; teacher, student,
    init_from and eval files count by their bytes. A workspace copied or moved elsewhere, with its
    files, is the same job."""
    from distill.spec import by_content

    same = {k: v for k, v in job.items() if k not in ("selection", "out")}
    for key in ("teacher", "student", "init_from", "eval"):
        value = same.get(key)
        if value:
            same[key] = [by_content(v) for v in value] if isinstance(value, list) else by_content(value)
    return json.loads(json.dumps(same))  # as it reads back from job.identity.json


def _stored_job_identity(config_path: Path, identity_path: Path) -> dict:
    """The identity recorded when the run last started (its files may have moved since); for a run from
    before identities were recorded, its job's, from the files its paths still name."""
    try:
        return json.loads(identity_path.read_text())
    except (OSError, json.JSONDecodeError):
        return _job_identity(json.loads(config_path.read_text()))


def distill_job(ws: Workspace, name: str, selection: str, options: dict, init_from: str | None = None
                ) -> tuple[dict, Path, Path]:
    """The job config run_distill writes for a student run (its options less `nproc`), the run's folder
    and its selection's manifest. Both names pass `Workspace.owned`. Nothing is read or written."""
    out = ws.owned("students", name, what="student run name")
    manifest = ws.owned("selections", selection, what="selection name") / "manifest.json"
    job = {"selection": str(manifest), "out": str(out), "name": name, "progress": False,
           **{k: v for k, v in options.items() if k != "nproc"}}
    if init_from:
        job["init_from"] = init_from
    return job, out, manifest


def distill_job_changed(job: dict, out: Path, manifest: Path) -> str | None:
    """Why `out` holds a run that run_distill would replace (with overwrite; it refuses without):
    "its config changed" or "its selection changed". None for no run or the same job."""
    config_path, stamp = out / "job.json", out / "selection.sha256"
    if not config_path.is_file():
        return None
    if _stored_job_identity(config_path, out / "job.identity.json") != _job_identity(job):
        return "its config changed"
    digest = hashlib.sha256(manifest.read_bytes()).hexdigest() if manifest.is_file() else None
    return None if stamp.is_file() and stamp.read_text() == digest else "its selection changed"


def student_weights(summary: dict) -> str:
    """The state_dict a student's summary names: the next round starts from it."""
    return summary.get("state_dict") or str(Path(summary["checkpoint"]).with_name("student.pt"))


def _finished_here(out: Path) -> dict | None:
    """The summary of a run that finished in `out`, if the student files it names are there: the job is
    then not launched again. (A resumed job would rewrite them, and torch.save's bytes differ from save
    to save, so every scoring run keyed on this student would redo its work.) A run moved from
    elsewhere names its old paths: it is launched, resumes at its end, and records the new ones."""
    try:
        summary = json.loads((out / "summary.json").read_text())
        files = [Path(summary["checkpoint"]), Path(student_weights(summary))]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return summary if all(f.parent == out and f.is_file() for f in files) else None


def run_distill(ws_root: str, name: str, selection: str, options: dict, init_from: str | None = None,
                stream=None, overwrite: bool = False) -> dict:
    """Write the job's config under students/<name>/, run it under torchrun, record the student.
    Both names pass `Workspace.owned`: the job writes, and a changed run deletes, only under students/.
    A run of that name with another config or another selection content is refused (WouldOverwrite)
    unless `overwrite`; the same job resumes, also from a workspace copied or moved elsewhere, and a
    finished one is not launched again."""
    from distill.config import config_from_dict
    from distill.launch import launch

    ws = Workspace(ws_root)
    job, out, manifest = distill_job(ws, name, selection, options, init_from)
    if not manifest.is_file():
        raise WebdistillError(f"no selection {selection!r} in {manifest.parent.parent} (see: webdistill sql "
                              "\"SELECT name, size FROM selections\")")
    nproc = int(options.get("nproc", 1))
    config_from_dict(job, out)  # a bad key, student or loss is one line here, not a failed torchrun job
    out.mkdir(parents=True, exist_ok=True)
    changed = distill_job_changed(job, out, manifest)
    if not changed and (finished := _finished_here(out)):
        catalog.record_student(ws, finished | {"selection": selection})
        return finished
    if changed:
        if not overwrite:
            raise would_overwrite(f"student run {name!r} exists, trained with another config or on other "
                                  f"contents of selection {selection!r}")
        # a new selection or config under this run name (a re-run round): train it from scratch
        remove_tree(out, ws.root / "students")
        out.mkdir(parents=True)
    config_path = out / "job.json"
    config_path.write_text(json.dumps(job, indent=2))  # this location's paths: what the job reads
    (out / "job.identity.json").write_text(json.dumps(_job_identity(job), indent=2))  # what it is, wherever
    (out / "selection.sha256").write_text(hashlib.sha256(manifest.read_bytes()).hexdigest())
    summary = launch(config_path, nproc=nproc, stream=stream)
    catalog.record_student(ws, summary | {"selection": selection})
    return summary
