"""Per-sample scores from a teacher (and a student): pure tensor functions, higher = more
in-distribution. The score stage (`curation/score.py`) runs them batch by batch.

References: MSP (Hendrycks & Gimpel 2017), max logit (Hendrycks et al. 2022), energy (Liu et al.
2020), GEN (Liu et al. CVPR 2023), ODIN (Liang et al. 2018), Mahalanobis (Lee et al. 2018) and
relative Mahalanobis (Ren et al. 2021), deep kNN (Sun et al. 2022), KD^3 (Tang et al. 2023).
"""
from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
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


def bn_modules(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The model's affine BatchNorm layers with running statistics (none for TorchScript)."""
    if isinstance(model, torch.jit.ScriptModule):
        return []
    return [m for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine and m.track_running_stats]


@contextmanager
def bn_score_tap(model: nn.Module):
    """While active, every forward adds to `tap.score` the BatchNorm-statistics score:
    `-sum over BN layers and channels of mean_hw(u)^2`, `u = (a - beta) / gamma` (the layer's
    input standardised by the running statistics the teacher learnt on its own data, which are
    zero-mean there). White-box and sample-free. `tap.score` is None when no BN layer exists."""

    class Tap:
        score: torch.Tensor | None = None
        active = True

    tap = Tap()

    def hook(mod, _inp, out):
        if not tap.active:
            return
        gamma = mod.weight.view(1, -1, *([1] * (out.dim() - 2)))
        beta = mod.bias.view_as(gamma)
        u = (out.detach() - beta) / gamma.where(gamma.abs() > 1e-12, torch.full_like(gamma, 1e-12))
        term = -u.flatten(2).mean(-1).pow(2).sum(-1) if out.dim() > 2 else -u.pow(2).sum(-1)
        tap.score = term if tap.score is None else tap.score + term

    handles = [m.register_forward_hook(hook) for m in bn_modules(model)]
    try:
        yield tap
    finally:
        for h in handles:
            h.remove()


def logits_and_features(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One forward pass giving the logits and the penultimate features: `embed` + `classifier`
    when the model has them (our CNNs, TorchScript exports of them), else the input of its last
    Linear layer, else no features."""
    if hasattr(model, "embed") and hasattr(model, "classifier"):
        feats = model.embed(x)
        return model.classifier(feats), feats
    scripted = isinstance(model, torch.jit.ScriptModule)
    linears = [] if scripted else [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        return model(x), None
    captured: dict[str, torch.Tensor] = {}
    handle = linears[-1].register_forward_hook(lambda mod, inp, out: captured.__setitem__("x", inp[0]))
    try:
        logits = model(x)
    finally:
        handle.remove()
    return logits, torch.flatten(captured["x"], 1)


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
