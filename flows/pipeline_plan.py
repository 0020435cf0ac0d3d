"""What `webdistill run CONFIG` would do, without doing it: `webdistill validate` and `run --dry-run`.

The config is checked whole first (flows/pipeline_check.py), then each stage is listed with what
the workspace already holds for it: shards ingested unchanged (skipped), shards embedded, scoring
runs, selections and students of each round, and which of those `run` replaces because the YAML
changed them (the comparisons select and run_distill make). Nothing is loaded, run or written.
"""
from __future__ import annotations

import json
from pathlib import Path

from curation.files import is_remote
from curation.ingest import committed_unchanged
from curation.validate import ValidationConfig
from curation.workspace import Workspace

from .pipeline_config import PipelineConfig


def _ingest_line(cfg: PipelineConfig, ws: Workspace) -> str:
    from curation.shards import expand_shards

    ingest = cfg.sections["ingest"]
    specs = [cfg.path(s) for s in ([ingest["shards"]] if isinstance(ingest["shards"], str) else ingest["shards"])]
    if "crawl" in cfg.sections:
        return f"{len(specs)} spec(s), written by the crawl first"
    if any(is_remote(s) or s.startswith("pipe:") for s in specs):
        return f"{len(specs)} spec(s) (remote or commands: checked when the stage runs)"
    refs, _ = expand_shards(specs, ingest.get("source"))
    config = ValidationConfig(**{k: v for k, v in ingest.items() if k in ValidationConfig.__dataclass_fields__})
    unchanged = sum(committed_unchanged(ws, ref, config) for ref in refs)
    return f"{len(refs)} shard(s): {unchanged} unchanged (skipped), {len(refs) - unchanged} to ingest"


def _embed_line(cfg: PipelineConfig, ws: Workspace) -> str:
    from curation.embedders import embedder_dir_name

    name = (cfg.sections["embed"] or {}).get("embedder", "open_clip:ViT-S-32")
    ingested = {p.stem for p in (ws.root / "samples").glob("*.parquet")}
    embedded = {p.stem for p in (ws.root / "embeddings" / embedder_dir_name(name)).glob("*.npy")}
    return f"{name}: {len(ingested & embedded)} of {len(ingested)} ingested shard(s) embedded before"


def _index_line(cfg: PipelineConfig, ws: Workspace) -> str:
    from curation.embedders import embedder_dir_name

    name = (cfg.sections["embed"] or {}).get("embedder", "open_clip:ViT-S-32")
    built = (ws.root / "index" / embedder_dir_name(name) / "index.faiss").is_file()
    knn = [k["name"] for k in cfg.sections.get("knn_scores") or []]
    return ("index present (kept if the embeddings are unchanged)" if built else "index to build") + (
        f"; knn scores: {', '.join(knn)}" if knn else "")


def _select_part(cfg: PipelineConfig, ws: Workspace, name: str) -> tuple[str, bool]:
    """The round's select line, and whether `run` replaces the selection it finds (its definition changed)."""
    from curation.select import SelectConfig, definition, definition_changed
    from curation.shard_writer import read_manifest

    options = cfg.select_options(name)
    wanted = definition(SelectConfig(name=name, **{k: (tuple(v) if k == "synthetic" else v) for k, v in
                                                   options.items() if k in SelectConfig.__dataclass_fields__}))
    previous = read_manifest(ws.root / "selections" / name)
    replaced = definition_changed(previous, wanted)
    policy = wanted["policy"] or ("SQL" if wanted["query"] else "default policy")
    state = ("" if not previous else ": will be replaced (its definition changed)" if replaced
             else ": present, definition unchanged")
    return f"select {name} ({policy}{', limit ' + str(wanted['limit']) if wanted['limit'] else ''}){state}", replaced


def _distill_state(cfg: PipelineConfig, ws: Workspace, r: int, selection_replaced: bool, earlier_replaced: bool
                   ) -> str:
    """What `run` does with round r's student: the comparison run_distill makes before it replaces one."""
    from .stage_runner import distill_job, distill_job_changed, student_weights

    name, init_from = f"{cfg.name}-round{r}", None
    if r > 1:  # the job starts from the previous round's student (its path, trained before or not)
        before = ws.root / "students" / f"{cfg.name}-round{r - 1}"
        summary = before / "summary.json"
        init_from = student_weights(json.loads(summary.read_text())) if summary.is_file() else str(
            before / "student.pt")
    job, out, manifest = distill_job(ws, name, name, cfg.distill_options(), init_from)
    summary = out / "summary.json"
    changed = distill_job_changed(job, out, manifest)
    if changed:
        return f": will be replaced ({changed})"
    if selection_replaced and (out / "job.json").is_file():
        return ": will be replaced (its selection changed)"
    if earlier_replaced and (out / "job.json").is_file():  # re-scored with a new student: a new selection
        return f": will likely be replaced (round {r - 1}'s student is replaced)"
    if summary.is_file():
        return f": trained before, unchanged (eval accuracy {json.loads(summary.read_text()).get('eval_accuracy')})"
    return ": resumes its checkpoint" if (out / "checkpoint.pt").is_file() else ""


def _round_parts(cfg: PipelineConfig, ws: Workspace, r: int, with_distill: bool, earlier_replaced: bool = False
                 ) -> list[str]:
    name, s = f"{cfg.name}-round{r}", cfg.sections
    scored = (ws.root / "scores" / name / "run.json").is_file()
    parts = [f"score {name}" + (f" with round {r - 1}'s student" if r > 1 else "")
             + (": finished before (unchanged shards skipped)" if scored else "")]
    select_line, selection_replaced = _select_part(cfg, ws, name)
    parts.append(select_line)
    distill = s.get("distill") if with_distill else None
    if distill:
        parts.append(f"distill {name} ({distill.get('student', 'tiny_cnn')}, "
                     f"{(distill.get('loss') or {}).get('method', 'kd')}, {distill.get('epochs', '?')} epochs)"
                     + _distill_state(cfg, ws, r, selection_replaced, earlier_replaced))
    return parts


def plan_lines(cfg: PipelineConfig, with_distill: bool = True) -> list[tuple[str, str]]:
    """(stage, what it would do) for each stage of the config, in the order `run` runs them."""
    ws, s = Workspace(Path(cfg.workspace)), cfg.sections
    lines = []
    if "crawl" in s:
        lines.append(("crawl", f"{cfg.path(s['crawl']['url_list'])} -> {cfg.path(s['crawl']['out'])}"))
    lines.append(("ingest", _ingest_line(cfg, ws)))
    if "embed" in s:
        lines += [("embed", _embed_line(cfg, ws)), ("index", _index_line(cfg, ws))]
    replaced = False  # a round's student replaced: the next rounds re-score with a new one
    for r in range(1, (cfg.rounds if with_distill else 1) + 1):
        parts = _round_parts(cfg, ws, r, with_distill, replaced)
        replaced = replaced or "replaced" in parts[-1]
        lines += [(f"round {r}" if i == 0 else "", part) for i, part in enumerate(parts)]
    if "report" in s:
        lines.append(("report", str(ws.root / "report.html") if not (s["report"] or {}).get("out")
                      else cfg.path(s["report"]["out"])))
    return lines


def plan_text(cfg: PipelineConfig, source: str) -> str:
    head = (f"{source}: the config is valid. Pipeline {cfg.name!r}, workspace {cfg.workspace}, {cfg.rounds} "
            f"round(s), runner {cfg.runner or 'local'} ({cfg.workers} workers)")
    if is_remote(cfg.workspace):
        return head + "\n  (a remote workspace: what it holds is read when the run mirrors it)"
    lines = plan_lines(cfg)
    width = max(len(stage) for stage, _ in lines) + 2
    return "\n".join([head] + [f"  {stage:<{width}}{what}" for stage, what in lines])
