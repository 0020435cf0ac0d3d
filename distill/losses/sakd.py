"""Spot-adaptive distillation, SAKD (Song et al., TIP 2022), wrapping FitNet, AT and logit KD.

Spots: the output of every student/teacher stage but the last (feature spots, `stages()` of
distill.models), plus the output logits. Per sample and per spot, a policy network decides whether
to distil there:
- `policy = Linear(d_T + d_S -> 2 * n_spots)` on the pooled last features of teacher and student
  (detached), a hard Gumbel-softmax (temperature 5, straight-through) over each spot's two choices;
  choice 0 = distil.
- The multi-path (graft) forward: two streams run stage by stage, starting from the image. After
  stage k, with the decision a_k of that spot,
      teacher stream <- (1 - a_k) * hint_k(student features) + a_k * teacher features
      student stream <- (1 - a_k) * student features + a_k * anti_hint_k(teacher features)
  (hint/anti_hint: 1x1 conv -> BN -> ReLU adapters), and the output is
  (1 - a_out) * student-head logits + a_out * teacher-head logits. As in the reference code the
  student runs in eval mode there (no BN statistics update).
- "policy": CE of the grafted output against the teacher's pseudo-labels (we have no ground
  truth), times gamma if it is worse than the student's own CE and divided by gamma if better,
  plus batch_size * relu(1/2 - fraction of the batch distilled at the output) (the reference's
  `max(0, B/2 - sum(a_out))`, with sample weights in the fraction).
- "fitnet" (MSE through a 1x1 regressor), "at" (attention transfer) at each chosen feature spot and
  "kd" at the output, only for the samples whose decision chose that spot.
Gradients: the policy and the adapters train from "policy" only (its decisions enter the
distillation terms as detached masks); the student gets nothing from "policy" (the graft uses
detached copies of its parameters), as in the reference, where the agent's backward is cleared
from the student before the student's own step.

Config: {"method": "sakd", "wraps": ["fitnet", "at", "kd"], "T": 4.0, "gamma": 2.0,
         "weights": {"fitnet": 1.0, "at": 1000.0, "kd": 1.0, "policy": 1.0, "ce": 0.0}}
(AT's 1000 and gamma = 2 are the reference code's CIFAR settings.)
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import field_validator
from torch import Tensor, nn
from torch.func import functional_call

from .base import Distiller, LossConfigError, LossParams, Positive, StepOutput, require_feature_api, weighted_mean
from .ce import pseudo_label_ce_per_sample
from .kd import kd_per_sample

WRAPPABLE = ("fitnet", "at", "kd")
FEATURE_TERMS = ("fitnet", "at")


def adapter(cin: int, cout: int) -> nn.Sequential:
    """1x1 conv -> BN -> ReLU between two networks' feature maps (FitNet regressor, graft adapters)."""
    return nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def match_size(f: Tensor, like: Tensor) -> Tensor:
    """f pooled to like's spatial size where the two networks' stages differ."""
    return f if f.shape[-2:] == like.shape[-2:] else F.adaptive_avg_pool2d(f, like.shape[-2:])


def attention_map(f: Tensor) -> Tensor:
    """Zagoruyko & Komodakis' attention: the L2-normalised channel mean of f^2, flattened (B, H*W)."""
    return F.normalize(f.pow(2).mean(dim=1).flatten(1), dim=1)


def at_per_sample(f_s: Tensor, f_t: Tensor) -> Tensor:
    """Attention transfer: mean over positions of (at(f_S) - at(f_T))^2, one value per sample (B,)."""
    return (attention_map(match_size(f_s, f_t)) - attention_map(f_t)).pow(2).mean(dim=1)


def fitnet_per_sample(regressed: Tensor, f_t: Tensor) -> Tensor:
    """FitNet hint: mean squared error of the regressed student features, one value per sample (B,)."""
    return (match_size(regressed, f_t) - f_t).pow(2).flatten(1).mean(dim=1)


def call_detached(module: nn.Module, x: Tensor) -> Tensor:
    """module(x) with its parameters detached: gradients reach x, never the module."""
    return functional_call(module, {n: p.detach() for n, p in module.named_parameters()}, (x,))


@contextmanager
def eval_mode(modules: list[nn.Module]) -> Iterator[None]:
    """Every submodule in eval mode for the block, then its own mode back."""
    saved = [(m, m.training) for module in modules for m in module.modules()]
    for m, _ in saved:
        m.training = False
    try:
        yield
    finally:
        for m, mode in saved:
            m.training = mode


def require_stage_api(model: nn.Module, role: str) -> None:
    missing = [a for a in ("stages", "stage_channels", "head") if not hasattr(model, a)]
    if missing:
        raise LossConfigError(f"loss 'sakd' needs a {role} with the stage API of distill.models "
                              f"(missing: {', '.join(missing)})")


def pooled(model: nn.Module, feature_map: Tensor) -> Tensor:
    return torch.flatten(model.pool(feature_map), 1)


class SAKD(Distiller):
    method = "sakd"
    needs_live_teacher = True
    TERMS = {"fitnet": 1.0, "at": 1000.0, "kd": 1.0, "policy": 1.0, "ce": 0.0}

    class Params(LossParams):
        wraps: list[str] = list(WRAPPABLE)
        T: Annotated[float, Positive] = 4.0
        gamma: Annotated[float, Positive] = 2.0
        gumbel_T: Annotated[float, Positive] = 5.0

        @field_validator("wraps")
        @classmethod
        def _distinct_wrappable(cls, wraps: list[str]) -> list[str]:
            if not wraps or len(set(wraps)) != len(wraps) or any(w not in WRAPPABLE for w in wraps):
                raise ValueError(f"wraps must list distinct methods among {', '.join(WRAPPABLE)}, got {wraps}")
            return wraps

    def __init__(self, student, teacher, num_classes, params=None, weights=None):
        super().__init__(student, teacher, num_classes, params, weights)
        wraps = self.params["wraps"]
        for term in set(weights or {}) & (set(WRAPPABLE) - set(wraps)):
            raise LossConfigError(f"loss 'sakd': weights.{term} is set but {term!r} is not in wraps")
        for model, role in ((student, "student"), (teacher, "teacher")):
            require_feature_api(model, role, self.method)
            require_stage_api(model, role)
        s_ch, t_ch = list(student.stage_channels), list(teacher.stage_channels)
        if len(s_ch) != len(t_ch):
            raise LossConfigError(f"loss 'sakd': student and teacher need as many stages ({len(s_ch)} vs {len(t_ch)})")
        if len(s_ch) < 2 and any(t in wraps for t in FEATURE_TERMS):
            raise LossConfigError("loss 'sakd': feature spots need models of at least 2 stages")
        self.n_spots = len(s_ch)  # the outputs of stages 0 .. n-2, then the logits
        self.policy = nn.Linear(teacher.classifier.in_features + student.classifier.in_features, 2 * self.n_spots)
        feature_spots = list(zip(s_ch[:-1], t_ch[:-1]))
        if self.active("policy"):
            self.hints = nn.ModuleList(adapter(s, t) for s, t in feature_spots)
            self.anti_hints = nn.ModuleList(adapter(t, s) for s, t in feature_spots)
        else:
            self.policy.requires_grad_(False)  # decides, but never learns: keep it out of the optimizer
        if self.active("fitnet"):
            self.regressors = nn.ModuleList(adapter(s, t) for s, t in feature_spots)

    def active(self, term: str) -> bool:
        """A wrappable method's term is computed only when it is wrapped."""
        return super().active(term) and (term not in WRAPPABLE or term in self.params["wraps"])

    # -- pieces ---------------------------------------------------------------------------------
    def decide(self, teacher_pooled: Tensor, student_pooled: Tensor) -> Tensor:
        """Hard one-hot decisions (B, n_spots, 2) with straight-through gradients to the policy;
        [..., 0] == 1 means distil at that spot."""
        logits = self.policy(torch.cat([teacher_pooled.detach(), student_pooled.detach()], dim=1))
        return F.gumbel_softmax(logits.view(-1, self.n_spots, 2), tau=self.params["gumbel_T"], hard=True, dim=-1)

    def graft_logits(self, images: Tensor, distil: Tensor) -> Tensor:
        """The multi-path forward's output for decisions `distil` (B, n_spots) in {0, 1}."""
        s_stages, t_stages = self.student.stages(), self.teacher.stages()
        s_head = self.student.head()
        s_in = t_in = images
        with eval_mode([self.student]):
            for k, (s_stage, t_stage) in enumerate(zip(s_stages, t_stages)):
                f_s, f_t = call_detached(s_stage, s_in), t_stage(t_in)
                if k < self.n_spots - 1:
                    a = distil[:, k].view(-1, 1, 1, 1)
                    t_in = (1 - a) * match_size(self.hints[k](f_s), f_t) + a * f_t
                    s_in = (1 - a) * f_s + a * match_size(self.anti_hints[k](f_t), f_s)
            z_s_path = call_detached(s_head, f_s)
        a_out = distil[:, -1:]
        return (1 - a_out) * z_s_path + a_out * self.teacher.head()(f_t)

    def policy_loss(self, images: Tensor, distil: Tensor, z_s: Tensor, z_t: Tensor, w: Tensor) -> Tensor:
        labels = z_t.argmax(dim=1)
        ce_graft = weighted_mean(F.cross_entropy(self.graft_logits(images, distil), labels, reduction="none"), w)
        ce_student = weighted_mean(F.cross_entropy(z_s.detach(), labels, reduction="none"), w)
        gamma = self.params["gamma"]
        scale = torch.where(ce_graft > ce_student, gamma, torch.where(ce_graft < ce_student, 1 / gamma, 1.0))
        keep_half = images.shape[0] * F.relu(0.5 - weighted_mean(distil[:, -1], w))
        return scale.detach() * ce_graft + keep_half

    # -- the training step ----------------------------------------------------------------------
    def step(self, images, teacher_logits, sample_weights) -> StepOutput:
        feats_s, x = [], images
        for stage in self.student.stages():
            x = stage(x)
            feats_s.append(x)
        z_s = self.student.head()(feats_s[-1])
        with torch.no_grad():
            feats_t, x = [], images
            for stage in self.teacher.stages():
                x = stage(x)
                feats_t.append(x)
            z_t = self.teacher.head()(feats_t[-1]).float()
        distil = self.decide(pooled(self.teacher, feats_t[-1]), pooled(self.student, feats_s[-1]))[..., 0]
        chosen = distil.detach()  # the distillation terms never reach the policy
        w = torch.ones(images.shape[0], device=images.device) if sample_weights is None else sample_weights

        def over_feature_spots(per_sample: Callable[[int], Tensor]) -> Tensor:
            return sum(weighted_mean(chosen[:, k] * per_sample(k), w) for k in range(self.n_spots - 1))

        terms = self.weighted_terms({
            "fitnet": lambda: over_feature_spots(
                lambda k: fitnet_per_sample(self.regressors[k](feats_s[k]), feats_t[k])),
            "at": lambda: over_feature_spots(lambda k: at_per_sample(feats_s[k], feats_t[k])),
            "kd": lambda: weighted_mean(chosen[:, -1] * kd_per_sample(z_s, z_t, self.params["T"]), w),
            "policy": lambda: self.policy_loss(images, distil, z_s, z_t, w),
            "ce": lambda: weighted_mean(pseudo_label_ce_per_sample(z_s, z_t), w),
        })
        return StepOutput(z_s, z_t, terms)
