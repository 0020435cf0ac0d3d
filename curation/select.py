"""Select: pick samples from the candidates, by SQL, by named policies, or both, and write them as
curated WebDataset shards any reader opens. The candidates are the `candidates` view's rows with the
scores of one scoring run: `SelectConfig.score_run`, or the newest finished run when it is None; the
manifest and the `selections` row name the run that was read.

    selections/<name>/<name>-000000.tar ...   per sample: the original image bytes under their own
                                              extension, `json` (ids, caption, scores, weight),
                                              `logits.npy` (the teacher's float16 logits), `cls`
    selections/<name>/manifest.json           name, total, shards (path, count, sha256), counts per
                                              class and their `coverage` (curation/coverage.py),
                                              the query / policy and the steps that ran
                                              (`policy_steps`; `notes`: what they fell back on),
                                              teacher and sources
    selections/.tmp-<name>-*, .lock-<name>    the selection while it is written, and its writer's lock

With neither --sql nor --policy, the `default` policy runs (curation/policies.py: dedup, a quota
per pseudo-class best-first by the fused score, a cap per k-means cluster), --limit samples or a
tenth of the candidates; the manifest names it `default` and lists the steps it expanded into.

The selection is written into a hidden folder beside it (`selections/.tmp-<name>-*`) and swapped into
place in one atomic step (`shard_writer.swap_into_place`), so a reader or a crash at any instant finds
the old selection or the new one, never neither and never a mix; the next select removes temporaries
a killed one left. A rerun that picks the same samples rewrites nothing.

Parameters are checked before anything is read: --limit and --shard-size are integers >= 1, the seed
>= 0. A `weight` column from --sql must be a finite number > 0 on every chosen sample (null means
1.0): NaN, infinities and negative weights are refused with one line, not dropped, because the weight
is the user's own expression and a silently smaller selection would hide the mistake.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import ValidationInfo, field_validator

from . import catalog, policies
from .coverage import class_coverage
from .errors import SQLError, WebdistillError, would_overwrite
from .score import read_run
from .selection_members import tar_members, write_members
from .shard_reader import stored_originals
from .shard_writer import ShardSink, logits_npy, read_manifest, staging, swap_into_place
from .stage_config import stage_config
from .workspace import Workspace, check_name, config_hash, storage_errors

SCORE_FIELDS = ("msp", "max_logit", "energy", "neg_entropy", "gen", "odin", "bn_score", "mahalanobis",
                "rel_mahalanobis", "mahalanobis_layers", "knn_teacher", "agreement", "neg_kl", "neg_js", "kd3_conf")


class SelectError(WebdistillError):
    """A bad selection name or query, or a selection that would be empty."""


@stage_config(SelectError)
class SelectConfig:
    name: str
    sql: str | None = None
    policy: str | None = None
    limit: int | None = None
    shard_size: int = 1000  # samples per curated shard
    seed: int = 0
    synthetic: tuple[str, ...] = ()  # synthetic sets (synthetic/<name>/) mixed into the selection
    score_run: str | None = None  # the scoring run the candidates carry (None: the newest finished one)

    @field_validator("name")
    @classmethod
    def _safe_name(cls, name: str) -> str:
        return check_name(name, "selection name")

    @field_validator("synthetic")
    @classmethod
    def _safe_synthetic(cls, names: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(check_name(name, "synthetic set name") for name in names)

    @field_validator("score_run")
    @classmethod
    def _safe_run(cls, score_run: str | None) -> str | None:
        return score_run if score_run is None else check_name(score_run, "scoring run name")

    @field_validator("limit", "shard_size", "seed", mode="before")
    @classmethod
    def _counts(cls, value: object, info: ValidationInfo) -> object:
        """The CLI's words (--shard-size), and no bool or float for a count."""
        low = 0 if info.field_name == "seed" else 1
        if value is None and info.field_name == "limit":
            return value
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{info.field_name.replace('_', '-')} must be an integer >= {low}, got {value!r}")
        return value


@dataclass
class SelectResult:
    name: str
    size: int
    path: Path
    manifest: dict
    unchanged: bool = False


def _on_candidates(sources: dict, sql: str) -> str:
    """`sql` with `candidates` meaning the candidates of these sources (the named scoring run), not
    the view (the newest run): the same SELECT, as a common table expression that shadows the view."""
    return f"WITH candidates AS ({catalog.candidates_query(sources)}) {sql}"


def _user_ids_sql(ws: Workspace, sql: str, sources: dict) -> str:
    """Check the user's query returns a sample_id column; give the SQL of its distinct ids (and weight)."""
    sql = sql.strip().rstrip(";")
    catalog.check_read_only(sql)
    cols = catalog.query(ws, _on_candidates(sources, f"SELECT * FROM ({sql}) AS picked LIMIT 0")).column_names
    if "sample_id" not in cols:
        raise SelectError(f"the query must return a sample_id column (it returns: {', '.join(cols) or 'nothing'})")
    # null means 1.0, said here: pandas could not tell a null from a NaN, which is refused in choose()
    weight = "coalesce(max(weight)::DOUBLE, 1.0)" if "weight" in cols else "1.0::DOUBLE"
    return f"SELECT sample_id, {weight} AS user_weight FROM ({sql}) AS picked GROUP BY sample_id"


def candidate_frame(ws: Workspace, config: SelectConfig, steps: list[policies.PolicyStep],
                    sources: dict | None = None) -> pd.DataFrame:
    """The candidate rows the policies see: the candidates of `sources` (default: those of the
    config's scoring run), restricted to the user query's samples, with one column per score
    expression the policies name (evaluated by DuckDB, read-only)."""
    sources = sources or catalog.candidate_sources(ws, score_run=config.score_run)
    exprs = "".join(f", ({e}) AS {policies.policy_expression_column(e)}" for e in policies.expressions(steps))
    if config.sql:
        source = f"candidates c JOIN ({_user_ids_sql(ws, config.sql, sources)}) u USING (sample_id)"
        weight = ", u.user_weight AS weight"
    else:
        source, weight = "candidates c", ""
    try:
        return catalog.query(ws, _on_candidates(sources, f"SELECT c.*{weight}{exprs} FROM {source}")).to_pandas()
    except SQLError as exc:
        raise SelectError(f"cannot evaluate the selection: {exc}") from exc


DEFAULT_POLICY = "default"


def effective_policy(config: SelectConfig) -> str | None:
    """The policy a selection runs: the config's, else `default` unless a --sql query alone chooses."""
    return config.policy if config.policy or config.sql else DEFAULT_POLICY


def _policy_steps(config: SelectConfig) -> list[policies.PolicyStep]:
    """The parsed policy; a `default` step without k takes --limit as its size (not a cut afterwards,
    which would drop samples in sample_id order and undo the quotas)."""
    policy = effective_policy(config)
    steps = policies.parse_policy(policy) if policy else []
    return [policies.PolicyStep(s.kind, s.params | {"k": config.limit})
            if s.kind == "default" and s.params["k"] is None and config.limit else s for s in steps]


def choose(ws: Workspace, config: SelectConfig, notes: list[str] | None = None,
           sources: dict | None = None, trace: list[str] | None = None) -> pd.DataFrame:
    """The selected rows (with a `weight` column), without writing anything. What a policy had to
    fall back on (dedup without clusters) is appended to `notes`, the text of each step that ran to
    `trace`. `sources`: what the candidates join (default: `catalog.candidate_sources` of the
    config's scoring run)."""
    steps = _policy_steps(config)
    sources = sources or catalog.candidate_sources(ws, score_run=config.score_run)
    frame = candidate_frame(ws, config, steps, sources)
    if "weight" in frame:
        _check_weights(frame, "the query returned")
    else:
        frame["weight"] = 1.0
    if steps:
        try:
            chosen = policies.apply_policies(frame, steps, seed=config.seed, notes=notes, trace=trace)
        except policies.PolicyError as exc:  # which scores it saw: a column null here may be filled in another run
            raise policies.PolicyError(f"{exc} (candidates of scoring run {sources['score_run']!r})") from None
    else:
        chosen = frame.sort_values("sample_id")
    if config.limit is not None:
        chosen = chosen.head(config.limit)
    if chosen.empty:
        raise SelectError(f"empty selection {config.name!r}: the query and policy kept no sample; nothing written")
    _check_weights(chosen, "the chosen samples have", total=True)
    return chosen.reset_index(drop=True)


def _check_weights(frame: pd.DataFrame, whose: str, total: bool = False) -> None:
    """Every weight finite and > 0 (and, with `total`, their sum finite): the manifest and the loss
    stay numbers."""
    weight = frame["weight"].to_numpy(dtype=float)
    bad = ~(np.isfinite(weight) & (weight > 0))
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise SelectError(f"{whose} {int(bad.sum())} weight(s) that are not a finite number > 0, e.g. "
                          f"{frame['sample_id'].iloc[first]} with {weight[first]!r}: fix the query's weight "
                          "column (e.g. greatest(coalesce(x, 0), 1e-6)); nothing written")
    if total and not math.isfinite(float(weight.sum())):
        raise SelectError("the chosen samples' weights add up to more than a float holds: scale the query's "
                          "weight column down; nothing written")


def _sample_json(row) -> bytes:
    scores = {k: float(row[k]) for k in SCORE_FIELDS if k in row and pd.notna(row[k]) and math.isfinite(row[k])}
    label = row.get("teacher_label")
    return json.dumps({
        "sample_id": row["sample_id"], "source_shard": row["shard"], "key": row["key"], "url": row["url"],
        "caption": row["caption"], "sha256": row["sha256"], "weight": float(row["weight"]),
        "teacher_label": int(label) if pd.notna(label) else None,
        "teacher_conf": float(row["teacher_conf"]) if pd.notna(row.get("teacher_conf")) else None,
        "scores": scores}).encode()


def write_shards(chosen: pd.DataFrame, folder: Path, name: str, shard_size: int) -> tuple[ShardSink, list[str]]:
    """Copy the chosen samples' original bytes out of their source shards (each read once, in
    order); returns the closed sink (its shards and members) and the ids whose bytes are gone or
    changed."""
    sink = ShardSink(folder, name, shard_size)
    lost: list[str] = []
    for row, data in stored_originals(chosen):
        if data is None:
            lost.append(row["sample_id"])  # the source changed since ingest: never ship other bytes
            continue
        sample = {"__key__": row["sample_id"], row["ext"]: data, "json": _sample_json(row)}
        if pd.notna(row.get("teacher_label")):
            sample["cls"] = str(int(row["teacher_label"])).encode()
        logits = logits_npy(row.get("teacher_logits"))
        if logits is not None:
            sample["logits.npy"] = logits
        sink.write(sample)
    sink.close()
    return sink, lost


def _selection_hash(ws: Workspace, chosen: pd.DataFrame, config: SelectConfig, score_run: dict) -> str:
    ids = hashlib.sha256("\n".join(f"{s}:{w:.9g}" for s, w in zip(chosen["sample_id"], chosen["weight"])).encode())
    synthetic = {}
    for name in config.synthetic:  # a regenerated synthetic set changes the selection too
        manifest = ws.owned("synthetic", name, "manifest.json")
        synthetic[name] = hashlib.sha256(manifest.read_bytes()).hexdigest() if manifest.exists() else None
    settings = {k: v for k, v in asdict(config).items() if k != "score_run"}  # the run itself is hashed below
    # "manifest": 2 since manifests carry the class coverage and the steps that ran: older ones are rewritten
    return config_hash({"ids": ids.hexdigest(), "config": settings, "synthetic": synthetic, "manifest": 2,
                        "score_run": [score_run.get("name"), score_run.get("finished_at")]})


def definition(config: SelectConfig) -> dict:
    """What the user asked a selection to be (not what the data made of it): another definition under
    a taken name would silently replace a different selection."""
    return {"query": config.sql, "policy": effective_policy(config), "limit": config.limit, "seed": config.seed,
            "synthetic": sorted(config.synthetic)}


def _stored_definition(manifest: dict) -> dict:
    """A manifest's definition (manifests from before it was recorded: rebuilt from their fields)."""
    if isinstance(manifest.get("definition"), dict):
        return manifest["definition"]
    return {"query": manifest.get("query"), "policy": manifest.get("policy"), "limit": manifest.get("limit"),
            "seed": manifest.get("seed"), "synthetic": sorted(manifest.get("synthetic") or {})}


def definition_changed(previous: dict, wanted: dict) -> bool:
    """True when a selection's manifest (empty: none yet) was made with another definition than
    `wanted`: `select` refuses to replace it without overwrite (the pipeline replaces it)."""
    return bool(previous) and _stored_definition(previous) != wanted


def _refuse_replacing(name: str, previous: dict, wanted: dict) -> None:
    if definition_changed(previous, wanted):
        old = _stored_definition(previous)
        changed = ", ".join(f"{k} {old.get(k)!r} -> {wanted[k]!r}" for k in wanted if old.get(k) != wanted[k])
        raise would_overwrite(f"selection {name!r} exists with another definition ({changed}); students trained "
                              "on it would lose their data")


def select(ws: Workspace, config: SelectConfig, overwrite: bool = False) -> SelectResult:
    """Choose, write the curated shards and manifest atomically, record the selection. A selection of
    the same name with another definition is refused (WouldOverwrite) unless `overwrite`; the same
    definition on new scores is the same selection brought up to date."""
    final = ws.owned("selections", config.name)  # names and planted symlinks refused before any work
    previous = read_manifest(final)
    if previous and not overwrite:
        _refuse_replacing(config.name, previous, definition(config))
    for name in config.synthetic:
        ws.owned("synthetic", name)
    notes: list[str] = []
    trace: list[str] = []
    sources = catalog.candidate_sources(ws, score_run=config.score_run)  # an unknown run: one line, nothing read
    chosen = choose(ws, config, notes, sources, trace)
    run = read_run(ws, sources["score_run"]) if sources["score_run"] else {}
    digest = _selection_hash(ws, chosen, config, run)
    if previous.get("selection_hash") == digest:
        return SelectResult(config.name, previous["total"], final, previous, unchanged=True)

    with storage_errors(final), staging(final) as tmp:  # a full disk names the selection
        sink, lost = write_shards(chosen, tmp, config.name, config.shard_size)
        synthetic = [_mix_synthetic(ws, name, tmp) for name in config.synthetic]
        shards = sink.shards + [s for mixed in synthetic for s in mixed["shards"]]
        members = sink.members + [member for mixed in synthetic for shard in mixed["shards"]
                                  for member in tar_members(tmp / shard["path"])]
        write_members(tmp, config.name, members)
        total = sum(s["count"] for s in shards)
        if total == 0:
            raise SelectError(f"empty selection {config.name!r}: none of the chosen images could be read back")
        kept = chosen[~chosen["sample_id"].isin(set(lost))]
        teacher = run.get("teacher") or {}
        labels = kept["teacher_label"].dropna().astype(int)
        counts = labels.value_counts()
        for mixed in synthetic:
            counts = counts.add(pd.Series({int(k): v for k, v in mixed["counts_per_class"].items()}), fill_value=0)
        coverage = class_coverage(counts.sort_index().to_dict(), teacher.get("num_classes"))
        manifest = {
            "name": config.name, "total": total, "shards": shards,
            "query": config.sql, "policy": effective_policy(config), "policy_steps": " | ".join(trace) or None,
            "limit": config.limit, "seed": config.seed,
            "score_run": sources["score_run"], "teacher": teacher.get("spec"),
            "num_classes": teacher.get("num_classes"), "classes": teacher.get("classes"),
            "input_size": teacher.get("input_size"), "mean": teacher.get("mean"), "std": teacher.get("std"),
            "has_logits": bool(kept["teacher_logits"].notna().all()) if "teacher_logits" in kept else False,
            "counts_per_class": {str(k): int(v) for k, v in counts.sort_index().items()},
            "coverage": {k: v for k, v in coverage.items() if k != "counts_per_class"},
            "weight_sum": float(kept["weight"].sum()) + sum(m["weight_sum"] for m in synthetic), "lost": lost,
            "synthetic": {m["name"]: m["total"] for m in synthetic}, "notes": notes,
            "sources": _source_fingerprints(ws, sorted(kept["shard"].unique())),
            "candidates": sources, "selection_hash": digest, "definition": definition(config),
            "created_at": datetime.now(UTC).isoformat(),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, allow_nan=False))
        swap_into_place(tmp, final)
    catalog.record_selection(ws, manifest, final)
    return SelectResult(config.name, total, final, manifest)


def _mix_synthetic(ws: Workspace, name: str, folder: Path) -> dict:
    """Link (or copy) a synthetic set's verified tars into the selection's folder, so the selection
    stays self-contained; returns the set's manifest with the shards' new paths."""
    src = ws.owned("synthetic", name)
    try:
        manifest = json.loads((src / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SelectError(f"no synthetic set {name!r} in {src.parent} "
                          f"(run `webdistill synthesize --name {name}`)") from exc
    try:
        total, weight_sum = int(manifest["total"]), float(manifest.get("weight_sum", manifest["total"]))
        counts = {int(k): int(v) for k, v in manifest["counts_per_class"].items()}
        listed = [(s, s["path"], s["sha256"]) for s in manifest["shards"]]
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise SelectError(f"synthetic set {name!r}: malformed manifest ({exc.__class__.__name__}: {exc})") from exc
    if not (math.isfinite(weight_sum) and weight_sum >= 0):
        raise SelectError(f"synthetic set {name!r}: weight_sum {weight_sum!r} is not a finite number >= 0")
    shards = []
    for shard, path, sha256 in listed:
        source = ws.owned("synthetic", name, path, what="synthetic shard")  # a file name inside the set
        target = folder / f"synthetic-{name}-{path}"
        try:
            os.link(source, target)
        except OSError:
            shutil.copyfile(source, target)
        if hashlib.sha256(target.read_bytes()).hexdigest() != sha256:
            raise SelectError(f"synthetic set {name!r}: {path} does not match its manifest's sha256")
        shards.append(shard | {"path": target.name})
    return manifest | {"name": name, "total": total, "counts_per_class": counts, "shards": shards,
                       "weight_sum": weight_sum}


def _source_fingerprints(ws: Workspace, shards: list[str]) -> dict[str, str]:
    rows = catalog.query(ws, "SELECT shard, fingerprint FROM shards").to_pylist()
    fp = {r["shard"]: r["fingerprint"] for r in rows}
    return {s: fp.get(s) for s in shards}
