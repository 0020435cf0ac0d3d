"""`webdistill report`: one self-contained HTML page of what a curation kept and why.

    <out> (default <workspace>/report.html)   written atomically

Sections: the pool (sources, formats, sizes, rejects, duplicates); score histograms with each
selection's cut; with a ground truth, ROC curves and selection precision (without one, a note says
why they are absent); montages of kept against dropped images per pseudo-class (the worst-scored
kept and the best-scored dropped, which a user checks first); near-duplicate clusters; each
selection's coverage and manifest; per round, size, precision and student accuracy; the students'
loss and accuracy curves. Thumbnails are sampled (a few per class and cluster), so the page stays
small and quick to build on a large pool. Reads the catalog; writes only the page.
"""
from __future__ import annotations

import re
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd

from . import catalog, report_data, report_plots
from . import report_html as H
from .coverage import class_coverage, coverage_text
from .report import labelled, quality_rows, roc_curves
from .report_thumbs import thumbnails
from .selection_members import backfill
from .workspace import Workspace, atomic_path

MONTAGE_CLASSES = 12  # pseudo-classes shown per selection (the most frequent in the pool)
MONTAGE_TILES = 8  # kept and dropped tiles per class
DUP_CLUSTERS, DUP_TILES = 6, 10
PRECISION_KS = [100, 1000]
NO_TRUTH = ("No ground truth was given (--truth PARQUET, with columns shard, key and in_domain), so the ROC "
            "curves of the scores and the precision of the selections are left out. A real crawl has none: "
            "every other section is computed from the workspace alone.")


def ranked_by(selection: dict, columns: list[str]) -> list[str]:
    """The score columns a selection ranked by: each policy step's `by=` that names a column (in
    order), else the columns its SQL names."""
    policy = selection.get("policy") or ""
    found = [c for c in re.findall(r"by=\s*([A-Za-z_][A-Za-z0-9_]*)\s*(?=;|\||$)", policy) if c in columns]
    if not found and selection.get("query"):
        found = [c for c in columns if re.search(rf"\b{re.escape(c)}\b", selection["query"])]
    return list(dict.fromkeys(found))


def _kept_mask(pool: pd.DataFrame, selection: dict) -> np.ndarray:
    return pool["sample_id"].isin(set(selection["members"]["sample_id"])).to_numpy()


def _values(frame: pd.DataFrame, col: str) -> np.ndarray:
    return pd.to_numeric(frame[col], errors="coerce").to_numpy(dtype=float)


# --- sections -------------------------------------------------------------------------------

def pool_section(counts: dict) -> H.Section:
    near = counts["near"]
    facts = H.table(["", "count"], [
        ["accepted samples", counts["samples"]], ["rejected", counts["rejected"]],
        ["distinct images (sha256)", counts["distinct_images"]],
        ["exact duplicates (beyond the first copy)", counts["exact_duplicates"]],
        ["images with an exact copy: groups", counts["exact_groups"]],
        [f"near-duplicate clusters ({counts['dups_embedder'] or 'no index yet'})", near["clusters"] or 0],
        ["samples in near-duplicate clusters", near["in_clusters"] or 0],
        ["left out by one-per-cluster dedup", near["dropped_by_dedup"] or 0]])
    charts = [H.image(report_plots.bars(counts["sources"], "samples by source (URL host)"), "samples by source"),
              H.image(report_plots.bars(counts["formats"], "samples by format"), "samples by format"),
              H.image(report_plots.bars(counts["sizes"], "samples by longest side"), "samples by size")]
    if counts["rejects"]:
        chart = report_plots.bars(counts["rejects"], "rejects by reason", "rejects")
        charts.append(H.image(chart, "rejects by reason"))
    else:
        charts.append(H.note("No sample was rejected."))
    return H.Section("pool", "The pool", facts + H.plots(charts))


def scores_section(pools: dict[str | None, pd.DataFrame], selections: list[dict]) -> H.Section:
    parts = []
    for sel in selections or [None]:
        run = sel["score_run"] if sel else next(iter(pools))
        pool = pools[run]
        columns = report_data.score_columns(pool)
        if not columns:
            parts.append(H.note(f"The scoring run {run!r} has no score columns yet (run `webdistill score`)."))
            continue
        kept = _kept_mask(pool, sel) if sel else np.zeros(len(pool), bool)
        by = ranked_by(sel, columns) if sel else []
        cuts = {c: float(np.nanmin(_values(pool[kept], c))) for c in by if kept.any()}
        title = (f"selection {sel['name']} (scoring run {run}): kept in blue, pool in grey, log scale"
                 if sel else f"scoring run {run}: the pool, log scale")
        img = report_plots.score_histograms({c: _values(pool, c) for c in columns},
                                            {c: _values(pool[kept], c) for c in columns} if sel else {}, cuts, title)
        explain = (f"Dashed red: the lowest kept value of {', '.join(by)}, the score(s) the selection ranks by."
                   if cuts else "The selection names no score column to rank by: no cut is marked.") if sel else ""
        parts.append(H.heading(sel["name"] if sel else f"scoring run {run}") + (H.para(explain) if explain else "")
                     + H.image(img, f"score histograms {run}", wide=True))
    return H.Section("scores", "Score distributions", "".join(parts))


def truth_section(pools: dict, selections: list[dict], truth: pd.DataFrame | None) -> tuple[H.Section, dict]:
    """ROC curves per scoring run and the selections' precision; the AUROC table for the artifacts."""
    if truth is None:
        return H.Section("truth", "Against the ground truth", H.note(NO_TRUTH)), {}
    parts, aurocs = [], {}
    for run, pool in pools.items():
        frame = labelled(pool, truth)
        if frame.empty or frame["in_domain"].nunique() < 2:
            parts.append(H.note(f"The ground truth labels no sample of scoring run {run!r} with both classes: "
                                "no ROC curve."))
            continue
        rows = quality_rows(frame, PRECISION_KS)
        aurocs[run] = rows
        auc = {r["score"]: r["auroc"] for r in rows}
        img = report_plots.roc(roc_curves(frame, list(auc)), auc, f"ROC, scoring run {run} "
                               f"({int(frame['in_domain'].sum())} in-domain of {len(frame)})")
        parts.append(H.heading(f"scoring run {run}") + H.plots([H.image(img, f"ROC curves {run}"), H.table(
            ["score", "AUROC", *[f"precision@{k}" for k in PRECISION_KS]],
            [[r["score"], r["auroc"], *[r[f"precision@{k}"] for k in PRECISION_KS]] for r in rows])]))
    if selections:
        rows = [[s["name"], s["size"], p["labelled"], p["precision"], p["domains"]]
                for s in selections for p in [selection_precision(s, pools[s["score_run"]], truth)]]
        parts.append(H.heading("selection precision (share of the teacher's domain)")
                     + H.table(["selection", "size", "labelled", "precision", "domains kept"], rows))
    return H.Section("truth", "Against the ground truth", "".join(parts)), aurocs


def selection_precision(selection: dict, pool: pd.DataFrame, truth: pd.DataFrame | None) -> dict:
    if truth is None:
        return {"labelled": 0, "precision": None, "domains": ""}
    kept = labelled(pool[_kept_mask(pool, selection)], truth)
    domains = ""
    if "domain" in truth.columns and len(kept):
        by = kept.merge(truth[["shard", "key", "domain"]], on=["shard", "key"])["domain"].value_counts()
        domains = ", ".join(f"{d} {n}" for d, n in by.items())
    return {"labelled": len(kept), "precision": float(kept["in_domain"].mean()) if len(kept) else None,
            "domains": domains}


def montage_picks(pool: pd.DataFrame, selection: dict, rank: str) -> list[tuple[object, pd.DataFrame, pd.DataFrame]]:
    """Per pseudo-class (the most frequent first): the worst-scored kept and the best-scored dropped."""
    kept = _kept_mask(pool, selection)
    frame = pool.assign(is_kept=kept, rank_value=_values(pool, rank)).dropna(subset=["teacher_label"])
    classes = frame["teacher_label"].value_counts().index[:MONTAGE_CLASSES]
    picks = []
    for label in sorted(classes):
        rows = frame[frame["teacher_label"] == label]
        kept_rows, dropped_rows = rows[rows["is_kept"]], rows[~rows["is_kept"]]
        # ties broken by sample_id: the same workspace gives the same page
        worst_kept = kept_rows.sort_values(["rank_value", "sample_id"], na_position="first").head(MONTAGE_TILES)
        best_dropped = dropped_rows.sort_values(["rank_value", "sample_id"], ascending=[False, True],
                                                na_position="last").head(MONTAGE_TILES)
        picks.append((label, worst_kept, best_dropped))
    return picks


def _scored_tiles(frame: pd.DataFrame, rank: str, thumbs: dict[str, str], kind: str) -> str:
    """Thumbnails with their score under them (and sample_id and score on hover)."""
    if not len(frame):
        return H.para("none")
    return H.tiles([H.tile(thumbs.get(r.sample_id), f"{r.rank_value:.3g}", f"{r.sample_id} {rank}={r.rank_value:.4g}")
                    for r in frame.itertuples()], kind)


def montages_section(pools: dict, selections: list[dict], thumbs: dict[str, str],
                     picks: dict[str, tuple[str, list]]) -> H.Section:
    if not selections:
        return H.Section("montages", "Kept and dropped, per pseudo-class", H.note("No selection yet."))
    parts = []
    for sel in selections:
        rank, rows = picks[sel["name"]]
        if not rows:
            parts.append(H.heading(sel["name"]) + H.note("No pseudo-labels in its scoring run: no montage."))
            continue
        classes = sel["manifest"].get("classes") or []
        pool = pools[sel["score_run"]]
        counts = pool["teacher_label"].value_counts()

        grid = []
        for label, worst_kept, best_dropped in rows:
            name = classes[int(label)] if int(label) < len(classes) else str(int(label))
            n_kept = int(_kept_mask(pool[pool["teacher_label"] == label], sel).sum())
            grid.append((f"<b>{H.esc(name)}</b><br>{int(counts.get(label, 0)):,} in pool<br>{n_kept:,} kept",
                         _scored_tiles(worst_kept, rank, thumbs, "kept"),
                         _scored_tiles(best_dropped, rank, thumbs, "dropped")))
        parts.append(H.heading(f"{sel['name']}: ranked by {rank}")
                     + H.montage(("pseudo-class", f"kept, lowest {rank} first", f"dropped, highest {rank} first"),
                                 grid))
    return H.Section("montages", "Kept and dropped, per pseudo-class",
                     H.para("Each row is one teacher pseudo-class; the number under a tile is its score. The "
                            "worst-scored kept and the best-scored dropped are where a selection goes wrong first.")
                     + "".join(parts))


def dups_section(clusters: pd.DataFrame, thumbs: dict[str, str]) -> H.Section:
    if clusters.empty:
        return H.Section("duplicates", "Near-duplicate clusters",
                         H.note("No near-duplicate cluster (or no index yet)."))
    rows = []
    for cluster_id, members in clusters.groupby("cluster_id", sort=False):
        size = int(members["cluster_size"].iloc[0])
        rows.append((f"<b>{size}</b> images<br>{H.code(cluster_id[:12])}",
                     H.tiles([H.tile(thumbs.get(r.sample_id), "kept" if r.is_representative else "",
                                     r.sample_id) for r in members.itertuples()], "cluster")))
    return H.Section("duplicates", "Near-duplicate clusters",
                     H.para(f"The {len(rows)} largest clusters; the first tile is the one dedup keeps.")
                     + H.montage(("cluster", "members"), rows))


def _coverage_line(manifest: dict) -> str:
    """The selection's class coverage, from its counts (a manifest from elsewhere may hold anything)."""
    counts = manifest.get("counts_per_class")
    try:
        return coverage_text(class_coverage(counts if isinstance(counts, dict) else {}, manifest.get("num_classes")))
    except (TypeError, ValueError):
        return ""


def selections_section(selections: list[dict]) -> H.Section:
    if not selections:
        return H.Section("selections", "Selections", H.note("No selection yet (run `webdistill select`)."))
    parts = []
    for sel in selections:
        m = sel["manifest"]
        facts = H.table(["", ""], [
            ["size", sel["size"]], ["class coverage", _coverage_line(m)], ["policy", sel["policy"] or ""],
            ["policy steps", m.get("policy_steps") or ""], ["query", sel["query"] or ""],
            ["score run", sel["score_run"] or ""], ["teacher", m.get("teacher") or ""],
            ["curated shards", len(m.get("shards") or [])], ["weight sum", m.get("weight_sum")],
            ["lost (bytes changed since ingest)", len(m.get("lost") or [])],
            ["synthetic", ", ".join(f"{k} {v}" for k, v in (m.get("synthetic") or {}).items())],
            ["notes", "; ".join(m.get("notes") or [])], ["created", str(sel["created_at"])[:19]],
            ["manifest", str(Path(sel["path"]) / "manifest.json")]])
        counts = m.get("counts_per_class") or {}
        alt = f"samples per pseudo-class of {sel['name']}: " + ", ".join(f"{k}: {v}" for k, v in counts.items())
        chart = (H.image(report_plots.coverage(counts, m.get("classes"), f"{sel['name']}: samples per pseudo-class"),
                         alt) if counts else H.note("The manifest has no counts per class."))
        parts.append(H.heading(sel["name"]) + H.plots([chart, facts]))
    return H.Section("selections", "Selections: coverage and manifest", "".join(parts))


def _eval_curve(metrics: list[dict]) -> tuple[list[float], list[float]]:
    evals = [m for m in metrics if "eval_accuracy" in m]
    return [m.get("epoch", i) + 1 for i, m in enumerate(evals)], [m["eval_accuracy"] for m in evals]


def rounds_section(selections: list[dict], students: list[dict], precision: dict[str, dict]) -> H.Section:
    if not selections:
        return H.Section("rounds", "Rounds", H.note("No selection yet."))
    rows = []
    for sel in selections:
        trained = [s for s in students if s["selection"] == sel["name"]] or [None]
        for st in trained:
            p = precision[sel["name"]]["precision"]
            rows.append([sel["name"], sel["size"], sel["score_run"], p if p is not None else "no truth",
                         st["name"] if st else "no student", st["eval_accuracy"] if st else None])
    curves = {s["name"]: _eval_curve(s["metrics"]) for s in students if _eval_curve(s["metrics"])[0]}
    chart = (H.image(report_plots.lines(curves, "epoch", "eval accuracy", "student accuracy per round", (0, 1)),
                     "student accuracy per round") if curves else
             H.note("No student has eval accuracy yet (distill with --eval)."))
    return H.Section("rounds", "Rounds", H.plots([H.table(
        ["selection", "size", "score run", "precision", "student", "eval accuracy"], rows), chart]))


def students_section(students: list[dict]) -> H.Section:
    if not students:
        return H.Section("students", "Students", H.note("No student yet (run `webdistill distill`)."))
    rows = [[s["name"], s["selection"], s["loss"], s["teacher_mode"], s["summary"].get("student"),
             s["summary"].get("epochs"), s["summary"].get("steps"), s["summary"].get("seconds"), s["eval_accuracy"]]
            for s in students]
    losses = {s["name"]: ([m["step"] for m in s["metrics"] if "loss" in m and "step" in m],
                          [m["loss"] for m in s["metrics"] if "loss" in m and "step" in m]) for s in students}
    losses = {k: v for k, v in losses.items() if v[0]}
    charts = [H.image(report_plots.lines(losses, "step", "training loss", "training loss"), "training loss")
              if losses else H.note("No loss was logged."),
              H.para("Their eval accuracy per epoch is under Rounds.")]
    return H.Section("students", "Students", H.table(
        ["student", "selection", "loss", "teacher", "architecture", "epochs", "steps", "seconds", "eval accuracy"],
        rows) + H.plots(charts))


# --- the page -------------------------------------------------------------------------------

def write_report(ws: Workspace, out: Path | None = None, selection_names: list[str] | None = None,
                 truth: Path | None = None) -> dict:
    """Build the page and write it atomically; returns a summary (path, seconds, what it holds)."""
    started = time.perf_counter()
    out = Path(out) if out is not None else ws.root / "report.html"
    truth_frame = report_data.read_truth(Path(truth)) if truth is not None else None
    if backfill(ws):  # selections from before members.parquet existed: the `selected` view needs them
        catalog.refresh(ws)
    sources = catalog.candidate_sources(ws)
    selections = report_data.selections(ws, selection_names)
    runs = list(dict.fromkeys(s["score_run"] for s in selections)) or [sources["score_run"]]
    pools = {run: report_data.scored_pool(ws, run) for run in runs}
    students = report_data.students(ws)
    counts = report_data.pool_counts(ws, sources["dups_embedder"])
    clusters = report_data.dup_clusters(ws, sources["dups_embedder"], DUP_CLUSTERS, DUP_TILES)

    picks, wanted = {}, [clusters]
    for sel in selections:
        pool = pools[sel["score_run"]]
        columns = report_data.score_columns(pool)
        by = ranked_by(sel, columns)
        rank = by[-1] if by else ("msp" if "msp" in columns else (columns[0] if columns else None))
        rows = montage_picks(pool, sel, rank) if rank and pool["teacher_label"].notna().any() else []
        picks[sel["name"]] = (rank, rows)
        wanted += [frame for _, kept, dropped in rows for frame in (kept, dropped)]
    need = ["sample_id", "shard_url", "key", "ext", "sha256"]
    thumbs = thumbnails(pd.concat([w[need] for w in wanted if len(w)], ignore_index=True)
                        if any(len(w) for w in wanted) else pd.DataFrame(columns=need))

    truth_part, aurocs = truth_section(pools, selections, truth_frame)
    precision = {s["name"]: selection_precision(s, pools[s["score_run"]], truth_frame) for s in selections}
    sections = [pool_section(counts), scores_section(pools, selections), truth_part,
                montages_section(pools, selections, thumbs, picks), dups_section(clusters, thumbs),
                selections_section(selections), rounds_section(selections, students, precision),
                students_section(students)]
    subtitle = (f"workspace {ws.root} · {counts['samples']:,} samples · {len(selections)} selection(s) · "
                f"{len(students)} student(s) · ground truth: {truth if truth is not None else 'none'} · "
                f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC")
    text = H.page("webdistill report", subtitle, sections)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")
    return {"path": str(out.resolve()), "bytes": len(text.encode()), "seconds": round(time.perf_counter() - started, 2),
            "sections": [s.id for s in sections], "thumbnails": len(thumbs), "samples": counts["samples"],
            "rejected": counts["rejected"], "truth": str(truth) if truth is not None else None,
            "selections": [{"name": s["name"], "size": s["size"], "score_run": s["score_run"],
                            "precision": precision[s["name"]]["precision"],
                            "counts_per_class": s["manifest"].get("counts_per_class") or {}} for s in selections],
            "students": [{"name": s["name"], "selection": s["selection"], "eval_accuracy": s["eval_accuracy"]}
                         for s in students],
            "auroc": {run: [{"score": r["score"], "auroc": r["auroc"]} for r in rows] for run, rows in aurocs.items()}}
