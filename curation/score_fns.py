"""Per-sample scores from a teacher (and a student): pure tensor functions, higher = more
in-distribution. The score stage (`curation/score.py`) runs them batch by batch.

References: MSP (Hendrycks & Gimpel 2017), max logit (Hendrycks et al. 2022), energy (Liu et al.
2020), GEN (Liu et al. CVPR 2023), ODIN (Liang et al. 2018), Mahalanobis (Lee et al. 2018) and
relative Mahalanobis (Ren et al. 2021), deep kNN (Sun et al. 2022), KD^3 (Tang et al. 2023),
activation shaping: ReAct (Sun et al. 2021), ASH (Djurisic et al. 2023), SCALE (Xu et al. 2024).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import rankdata
from torch import nn

from distill.kd3_rules import combined_prediction  # noqa: F401 - KD^3's combined prediction, one copy


def msp(logits: torch.Tensor) -> torch.Tensor:
    return logits.softmax(-1).max(-1).values


def max_logit(logits: torch.Tensor) -> torch.Tensor:
    return logits.max(-1).values


def energy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """The negative free energy `T * logsumexp(z / T)`."""
    return temperature * torch.logsumexp(logits / temperature, dim=-1)


def neg_entropy(logits: torch.Tensor) -> torch.Tensor:
    logp = logits.log_softmax(-1)
    p = logp.exp()
    return torch.where(p == 0, 0.0, p * logp).sum(-1)  # 0 log 0 = 0 (a logit of -inf), not NaN


def gen(logits: torch.Tensor, gamma: float = 0.1, top_m: int = 100) -> torch.Tensor:
    """GEN: minus the generalised entropy `sum_j p_j^g (1 - p_j)^g` over the top-M probabilities."""
    p = logits.softmax(-1)
    p = p.topk(min(top_m, p.shape[-1]), dim=-1).values
    return -(p.pow(gamma) * (1 - p).pow(gamma)).sum(-1)


def kl_div(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per sample, from logits."""
    logp, logq = p_logits.log_softmax(-1), q_logits.log_softmax(-1)
    p = logp.exp()
    return torch.where(p == 0, 0.0, p * (logp - logq)).sum(-1)  # classes p rules out add nothing


def js_div(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence per sample (natural log; at most ln 2)."""
    p, q = p_logits.softmax(-1), q_logits.softmax(-1)
    m = (0.5 * (p + q)).clamp_min(1e-12).log()
    return 0.5 * (F.kl_div(m, p, reduction="none").sum(-1) + F.kl_div(m, q, reduction="none").sum(-1))


def odin(model: nn.Module, x: torch.Tensor, std: tuple[float, ...], temperature: float = 1000.0,
         epsilon: float = 0.0014) -> torch.Tensor:
    """ODIN: move the input by `epsilon` (in [0, 1] pixel units, hence the division by the
    normalisation's std) in the direction that raises the softmax score of the predicted class at
    temperature T, then return that class's softmax score at T."""
    with torch.enable_grad():
        x = x.detach().clone().requires_grad_(True)
        logits = model(x) / temperature
        loss = F.cross_entropy(logits, logits.argmax(-1), reduction="sum")
        (grad,) = torch.autograd.grad(loss, x)
    step = epsilon / torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    with torch.no_grad():
        return (model(x.detach() - step * grad.sign()) / temperature).softmax(-1).max(-1).values


def bn_term(pooled: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """One BatchNorm layer's part of the BN-statistics score: `-sum over channels of mean_hw(u)^2`,
    `u = (a - beta) / gamma`, from `pooled` = mean_hw(a) (B, C) of the layer's output a: the layer's
    input standardised by the running statistics the teacher learnt on its own data, which are
    zero-mean there. White-box and sample-free."""
    gamma = gamma.to(pooled.dtype)
    safe = gamma.where(gamma.abs() > 1e-12, torch.full_like(gamma, 1e-12))
    return -((pooled - beta.to(pooled.dtype)) / safe).pow(2).sum(-1)


def bn_score(pooled: dict[str, torch.Tensor],
             bn_layers: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor | None:
    """The BN-statistics score: the sum of `bn_term` over the BatchNorm layers (name -> (gamma, beta),
    `FeatureTaps.bn_layers`) whose pooled outputs `pooled` holds; None without such a layer."""
    terms = [bn_term(pooled[n], gamma, beta) for n, (gamma, beta) in bn_layers.items()]
    return torch.stack(terms).sum(0) if terms else None


# --- activation shaping: the penultimate features are reshaped, the logits recomputed by the
# teacher's last Linear (W, b), and the score is the energy logsumexp(W f' + b) (T = 1, as the
# papers and OpenOOD v1.5 use). The papers' features are post-ReLU (>= 0); signed features are
# shaped by the same formulas. Checked against OpenOOD's networks/{scale,ash,react}_net.py.

def kept_count(d: int, percentile: float) -> int:
    """How many of d activations survive pruning at the p-th percentile: the top d - round(d*p/100)
    (OpenOOD's and the ASH authors' count, numpy's round-half-to-even), at least one."""
    if not 0.0 <= percentile <= 100.0:
        raise ValueError(f"percentile must be in [0, 100], got {percentile}")
    return max(1, d - int(np.round(d * percentile / 100.0)))


def _sharpening(total: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """exp(s1 / s2), s1 the sum of all activations, s2 the sum of the kept ones. s2 = 0 only when
    the kept (largest) activations are all zero, i.e. for non-negative features an all-zero vector,
    which no factor changes: 1 then, instead of 0/0."""
    return torch.where(top == 0, 1.0, (total / top.where(top != 0, torch.ones_like(top))).exp())


def scale_features(f: torch.Tensor, percentile: float = 85.0) -> torch.Tensor:
    """SCALE (Xu et al. 2024): no pruning; the whole vector times exp(s1 / s2), s2 the sum of the
    top (100-p)% activations."""
    top = f.topk(kept_count(f.shape[-1], percentile), dim=-1).values.sum(-1)
    return f * _sharpening(f.sum(-1), top).unsqueeze(-1)


def ash_s_features(f: torch.Tensor, percentile: float = 90.0) -> torch.Tensor:
    """ASH-S (Djurisic et al. 2023): keep the top (100-p)% activations of each sample, zero the
    rest, and scale the survivors by exp(s1 / s2), s1 the sum before pruning, s2 after."""
    values, index = f.topk(kept_count(f.shape[-1], percentile), dim=-1)
    pruned = torch.zeros_like(f).scatter_(-1, index, values)
    return pruned * _sharpening(f.sum(-1), values.sum(-1)).unsqueeze(-1)


def react_features(f: torch.Tensor, clip: float) -> torch.Tensor:
    """ReAct (Sun et al. 2021): every activation clipped from above at c (the c-th percentile of
    the in-distribution activations; here of the pool's)."""
    return f.clamp(max=clip)


def head_energy(shaped: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The energy logsumexp(W f' + b) of the logits the teacher's last Linear gives shaped features."""
    return energy(shaped @ weight.to(shaped.dtype).T + bias.to(shaped.dtype))


def float16_histogram(x: np.ndarray) -> np.ndarray:
    """Counts of each of the 65,536 float16 bit patterns in x (features are stored as float16, so
    this is exact, and a pool's histogram is the sum of its shards': bounded memory)."""
    return np.bincount(np.ascontiguousarray(x, dtype=np.float16).view(np.uint16).ravel(),
                       minlength=1 << 16).astype(np.int64)


def histogram_percentile(counts: np.ndarray, q: float) -> float:
    """np.percentile (linear interpolation) of the finite values a float16 histogram counts; NaN
    when it counts none."""
    values = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float64)
    finite = np.isfinite(values) & (counts > 0)
    values, counts = values[finite], counts[finite]
    if counts.sum() == 0:
        return float("nan")
    order = np.argsort(values, kind="stable")
    values, cum = values[order], np.cumsum(counts[order])
    h = (cum[-1] - 1) * q / 100.0  # the 0-based fractional rank numpy interpolates at
    lo, hi = (values[np.searchsorted(cum, r, side="right")] for r in (np.floor(h), np.ceil(h)))
    return float(lo + (h - np.floor(h)) * (hi - lo))


def rank_fusion(columns: list[np.ndarray]) -> np.ndarray:
    """Mean over columns of each sample's percentile rank in its column, (rank - 1) / (n - 1) with
    ties averaged and NaN left out (0.5 when a column has a single value); NaN where every column is
    NaN. In [0, 1]; higher = higher in the columns on average."""
    ranks = []
    for c in columns:
        c = np.asarray(c, dtype=np.float64)
        r = np.full(len(c), np.nan)
        ok = ~np.isnan(c)
        n = int(ok.sum())
        if n:
            r[ok] = (rankdata(c[ok]) - 1) / (n - 1) if n > 1 else 0.5
        ranks.append(r)
    stacked = np.stack(ranks)
    counted = (~np.isnan(stacked)).sum(0)
    return np.where(counted > 0, np.nansum(stacked, 0) / np.maximum(counted, 1), np.nan)


# --- reference-based scores over the whole pool (numpy, float64) ---

def class_gaussians(features: np.ndarray, labels: np.ndarray, n_classes: int,
                    ridge: float = 1e-6) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Class means with a shared (tied) covariance, and the background Gaussian of all
    reference features (relative Mahalanobis): (means (C, d), precision (d, d), mean0 (d,),
    precision0 (d, d)). Classes without reference samples get a NaN mean and are skipped."""
    f = features.astype(np.float64)
    d = f.shape[1]
    means = np.full((n_classes, d), np.nan)
    centred = np.zeros_like(f)
    for c in range(n_classes):
        sel = labels == c
        if sel.any():
            means[c] = f[sel].mean(0)
            centred[sel] = f[sel] - means[c]
    cov = centred.T @ centred / max(len(f), 1)
    mean0 = f.mean(0)
    cov0 = np.cov(f, rowvar=False, bias=True) if len(f) > 1 else np.zeros((d, d))
    eye = np.eye(d) * ridge * max(np.trace(cov0) / d, 1e-12)
    return means, np.linalg.pinv(cov + eye), mean0, np.linalg.pinv(cov0 + eye)


def mahalanobis_scores(features: np.ndarray, means: np.ndarray, precision: np.ndarray, mean0: np.ndarray,
                       precision0: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(-min_c MD_c(x), -min_c (MD_c(x) - MD_0(x))): Mahalanobis and relative Mahalanobis, negated
    so that higher = closer to the reference classes."""
    f = features.astype(np.float64)
    mu = means[~np.isnan(means).any(1)]
    # MD_c = (f - mu_c)' P (f - mu_c), expanded so memory is (n, C), not (n, C, d)
    fp = f @ precision
    md = (fp * f).sum(1)[:, None] - 2 * fp @ mu.T + ((mu @ precision) * mu).sum(1)[None, :]
    d0 = f - mean0
    md0 = ((d0 @ precision0) * d0).sum(1)
    best = md.min(1)
    return -best, -(best - md0)
