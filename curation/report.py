"""Measuring curation against a ground truth (the demo crawl's `ground_truth.parquet`):
how well each score tells the teacher's domain from the rest."""
from __future__ import annotations

from pathlib import Path

import duckdb
import numpy as np
from sklearn.metrics import roc_auc_score

from . import catalog
from .schemas import SCORE_COLUMNS
from .workspace import Workspace

NOT_SCORES = {"teacher_label", "teacher_logits", "student_label", "kd3_label", "kd3_threshold", "decoded"}


def score_quality(ws: Workspace, truth: Path, ks: list[int], score_run: str | None = None) -> dict:
    """AUROC and precision@k of every score column of a scoring run (default: the latest) and of
    every kNN score, for the ground truth's in_domain."""
    run = score_run or catalog.candidate_sources(ws)["score_run"]
    frame = catalog.query(ws, "SELECT sample_id, shard, key, COLUMNS('^knn_') FROM candidates").to_pandas()
    scores = catalog.query(ws, "SELECT * EXCLUDE (teacher_logits, shard) FROM scores WHERE run = $run",
                           params={"run": run}).to_pandas()
    frame = frame.drop(columns=[c for c in frame.columns if c in scores.columns and c != "sample_id"])
    frame = frame.merge(scores, on="sample_id", how="left")
    labels = duckdb.connect().execute("SELECT shard, key, in_domain FROM read_parquet($truth)",
                                      {"truth": str(truth)}).df()
    frame = frame.merge(labels, on=["shard", "key"], how="inner")
    y = frame["in_domain"].astype(bool).to_numpy()
    columns = [c for c in frame.columns if (c in SCORE_COLUMNS and c not in NOT_SCORES) or c.startswith("knn_")]
    results = []
    for col in columns:
        s = frame[col].astype(float).to_numpy()
        if np.isnan(s).all() or np.nanstd(s) == 0:
            continue
        s = np.where(np.isnan(s), -np.inf, s)  # an unscored sample ranks last
        order = np.argsort(-s, kind="stable")
        finite = np.nan_to_num(s, neginf=np.nanmin(s[np.isfinite(s)]) - 1)
        row = {"score": col, "auroc": round(float(roc_auc_score(y, finite)), 4)}
        row |= {f"precision@{k}": round(float(y[order[:k]].mean()), 4) for k in ks}
        results.append(row)
    results.sort(key=lambda r: -r["auroc"])
    return {"samples": int(len(y)), "in_domain": int(y.sum()), "ks": ks, "scores": results}
