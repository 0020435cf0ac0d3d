"""Measuring curation against a ground truth (the demo crawl's `ground_truth.parquet`):
how well each score tells the teacher's domain from the rest."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score, roc_curve

from . import report_data
from .workspace import Workspace


def labelled(frame: pd.DataFrame, truth: pd.DataFrame) -> pd.DataFrame:
    """The rows of `frame` (samples with shard and key) that the ground truth labels, with in_domain."""
    return frame.merge(truth[["shard", "key", "in_domain"]], on=["shard", "key"], how="inner")


def _ranked(frame: pd.DataFrame, col: str) -> np.ndarray:
    """A score column as floats, an unscored sample ranking last."""
    s = pd.to_numeric(frame[col], errors="coerce").to_numpy(dtype=float)
    s = np.where(np.isnan(s), -np.inf, s)
    return np.nan_to_num(s, neginf=np.nanmin(s[np.isfinite(s)]) - 1)


def quality_rows(frame: pd.DataFrame, ks: list[int]) -> list[dict]:
    """AUROC and precision@k of every score column of a labelled frame, best first."""
    y = frame["in_domain"].astype(bool).to_numpy()
    results = []
    for col in report_data.score_columns(frame):
        s = _ranked(frame, col)
        order = np.argsort(-s, kind="stable")
        row = {"score": col, "auroc": round(float(roc_auc_score(y, s)), 4)}
        row |= {f"precision@{k}": round(float(y[order[:k]].mean()), 4) for k in ks}
        results.append(row)
    results.sort(key=lambda r: -r["auroc"])
    return results


def roc_curves(frame: pd.DataFrame, columns: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(false positive rate, true positive rate) of each score column of a labelled frame."""
    y = frame["in_domain"].astype(bool).to_numpy()
    curves = {}
    for col in columns:
        fpr, tpr, _ = roc_curve(y, _ranked(frame, col))
        curves[col] = (fpr, tpr)
    return curves


def score_quality(ws: Workspace, truth: Path, ks: list[int], score_run: str | None = None) -> dict:
    """AUROC and precision@k of every score column of a scoring run (default: the latest) and of
    every kNN score, for the ground truth's in_domain."""
    frame = labelled(report_data.scored_pool(ws, score_run), report_data.read_truth(truth))
    y = frame["in_domain"].to_numpy()
    return {"samples": int(len(y)), "in_domain": int(y.sum()), "ks": ks, "scores": quality_rows(frame, ks)}
