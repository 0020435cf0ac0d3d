"""Spot-adaptive distillation, SAKD (Song et al., TIP 2022), wrapping FitNet, AT and logit KD.

By default this is the official code's method (`zju-vipa/spot-adaptive-pytorch`, `train.py` and the
CIFAR-100 configs); `variant: webdistill` restores this project's earlier choices (docs/methods.md).

Spots: feature spots (stage outputs, `stages()` of distill.models) plus the output logits. With AT
wrapped, every stage's output is a spot, the last included (official `feat[1:-1]`; `last_stage: false`
leaves the last out, as webdistill did); with FitNet alone, the one hint layer, the second stage's
output (official `feat[2]`); with KD alone, only the output. Per sample and per spot, a policy
network decides whether to distil there:
- `policy = Linear(d_T + d_S -> 2 * n_spots)` on the pooled last features of teacher and student
  (detached), a hard Gumbel-softmax (temperature 5, straight-through) over each spot's two choices;
  choice 0 = distil. For a same-family pair (`same_family`; by default: student and teacher are
  the same model class) the "distil" logits start at +10 (official `homo: True`,
  `LinearClassifier.set_n_to_True`), so training starts distilling nearly everywhere.
- The multi-path (graft) forward: two streams run stage by stage, starting from the image. After
  the stage of spot k, with the decision a_k,
      teacher stream <- (1 - a_k) * hint_k(student features) + a_k * teacher features
      student stream <- (1 - a_k) * student features + a_k * anti_hint_k(teacher features)
  (hint/anti_hint: 1x1 conv -> BN -> ReLU adapters), and the output is
  (1 - a_out) * student head(student stream) + a_out * teacher head(teacher stream). As in the
  official code the student runs in eval mode there (no BN statistics update).
- "policy": CE of the grafted output against the teacher's pseudo-labels, times gamma if it is worse
  than the student's own CE and divided by gamma if better, plus batch_size * relu(1/2 - fraction of
  the batch distilled at the output) (the official `max(0, B/2 - sum(a_out))`, with sample weights in
  the fraction). gamma is the official configs' `classify_weight`: 2 with AT, 1 with FitNet.
- "fitnet" (MSE through a 1x1 regressor), "at" (attention transfer, weight 1000) at each chosen
  feature spot and "kd" at the output, only for the samples whose decision chose that spot.
- "ce": the student's CE, weight 1 as in the official configs. The official code has ground-truth
  labels; a curated web selection has none, so here the labels are the teacher's pseudo-labels
  (argmax z_T), which makes this term a hard-label KD term.
Gradients: the policy and the adapters train from "policy" only (its decisions enter the
distillation terms as detached masks); the student gets nothing from "policy" (the graft uses
detached copies of its parameters), as in the official code, where the agent's backward is cleared
from the student before the student's own step. The policy and adapters have their own optimizer
settings, as the official `agent_optimizer`: the job's learning rate times `policy_lr_scale` (0.5)
and weight decay `policy_weight_decay` (1e-3); the job's optimizer kind and schedule.

The official code runs one feature method plus KD per config; `wraps` may list both (webdistill's
earlier default ran FitNet, AT and KD together with gamma 2).

Config: {"method": "sakd", "variant": "official", "wraps": ["at", "kd"], "T": 4.0, "gamma": null,
         "same_family": null, "last_stage": true, "policy_lr_scale": 0.5, "policy_weight_decay": 0.001,
         "weights": {"fitnet": 1.0, "at": 1000.0, "kd": 1.0, "policy": 1.0, "ce": 1.0}}
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from pydantic import NonNegativeFloat, field_validator
from torch import Tensor, nn
from torch.func import functional_call

from .base import Distiller, LossConfigError, LossParams, Positive, StepOutput, require_feature_api, weighted_mean
from .ce import pseudo_label_ce_per_sample
from .kd import kd_per_sample

WRAPPABLE = ("fitnet", "at", "kd")
FEATURE_TERMS = ("fitnet", "at")
SAME_FAMILY_BIAS = 10.0  # official `set_n_to_True`: +10 on each spot's "distil" logit
HINT_STAGE = 1  # FitNet's hint layer: the second stage's output (official `feat[2]`, after the stem)


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


def feature_spots(wraps: list[str], n_stages: int, last_stage: bool) -> list[int]:
    """The stages after which the policy decides and the graft mixes the streams."""
    if "at" in wraps:
        return list(range(n_stages if last_stage else n_stages - 1))
    if "fitnet" in wraps:
        return [HINT_STAGE]
    return []


class SAKD(Distiller):
    method = "sakd"
    needs_live_teacher = True
    TERMS = {"fitnet": 1.0, "at": 1000.0, "kd": 1.0, "policy": 1.0, "ce": 1.0}
    # this project's choices before they were checked against the official code (docs/methods.md)
    VARIANTS = {"official": {},
                "webdistill": {"wraps": list(WRAPPABLE), "gamma": 2.0, "same_family": False, "last_stage": False,
                               "policy_lr_scale": 1.0, "policy_weight_decay": None, "weights": {"ce": 0.0}}}

    class Params(LossParams):
        variant: Literal["official", "webdistill"] = "official"
        wraps: list[str] = ["at", "kd"]
        T: Annotated[float, Positive] = 4.0
        gamma: Annotated[float, Positive] | None = None  # None: 2 with AT, else 1 (the official configs)
        gumbel_T: Annotated[float, Positive] = 5.0
        same_family: bool | None = None  # None: student and teacher of the same model class
        last_stage: bool = True
        policy_lr_scale: Annotated[float, Positive] = 0.5
        policy_weight_decay: NonNegativeFloat | None = 1e-3  # None: the job's weight decay

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
        self.gamma = self.params["gamma"] or (2.0 if "at" in wraps else 1.0)
        self.spots = feature_spots(wraps, len(s_ch), self.params["last_stage"])
        self.n_spots = len(self.spots) + 1  # the feature spots, then the logits
        self.policy = nn.Linear(teacher.classifier.in_features + student.classifier.in_features, 2 * self.n_spots)
        same_family = self.params["same_family"]
        if same_family if same_family is not None else type(student) is type(teacher):
            with torch.no_grad():
                self.policy.bias[0::2] += SAME_FAMILY_BIAS
        spot_channels = [(s_ch[k], t_ch[k]) for k in self.spots]
        if self.active("policy"):
            self.hints = nn.ModuleList(adapter(s, t) for s, t in spot_channels)
            self.anti_hints = nn.ModuleList(adapter(t, s) for s, t in spot_channels)
        else:
            self.policy.requires_grad_(False)  # decides, but never learns: keep it out of the optimizer
        if self.active("fitnet"):
            self.regressors = nn.ModuleList(adapter(s, t) for s, t in spot_channels)

    def active(self, term: str) -> bool:
        """A wrappable method's term is computed only when it is wrapped."""
        return super().active(term) and (term not in WRAPPABLE or term in self.params["wraps"])

    def optimizer_groups(self) -> list[dict[str, Any]]:
        """The student (and FitNet's regressors), then the policy and graft adapters with the official
        agent optimizer's settings (learning rate times policy_lr_scale, their own weight decay)."""
        agent = [p for name in ("policy", "hints", "anti_hints") if hasattr(self, name)
                 for p in getattr(self, name).parameters() if p.requires_grad]
        agent_ids = {id(p) for p in agent}
        groups = [{"params": [p for p in self.trainable_parameters() if id(p) not in agent_ids]}]
        if agent:
            group = {"params": agent, "lr_scale": self.params["policy_lr_scale"]}
            if self.params["policy_weight_decay"] is not None:
                group["weight_decay"] = self.params["policy_weight_decay"]
            groups.append(group)
        return groups

    # -- pieces ---------------------------------------------------------------------------------
    def decide(self, teacher_pooled: Tensor, student_pooled: Tensor) -> Tensor:
        """Hard one-hot decisions (B, n_spots, 2) with straight-through gradients to the policy;
        [..., 0] == 1 means distil at that spot."""
        logits = self.policy(torch.cat([teacher_pooled.detach(), student_pooled.detach()], dim=1))
        return F.gumbel_softmax(logits.view(-1, self.n_spots, 2), tau=self.params["gumbel_T"], hard=True, dim=-1)

    def graft_logits(self, images: Tensor, distil: Tensor) -> Tensor:
        """The multi-path forward's output for decisions `distil` (B, n_spots) in {0, 1}."""
        s_stages, t_stages = self.student.stages(), self.teacher.stages()
        spot_of = {k: j for j, k in enumerate(self.spots)}
        s_in = t_in = images
        with eval_mode([self.student]):
            for k, (s_stage, t_stage) in enumerate(zip(s_stages, t_stages)):
                f_s, f_t = call_detached(s_stage, s_in), t_stage(t_in)
                s_in, t_in = f_s, f_t
                if k in spot_of:
                    j = spot_of[k]
                    a = distil[:, j].view(-1, 1, 1, 1)
                    t_in = (1 - a) * match_size(self.hints[j](f_s), f_t) + a * f_t
                    s_in = (1 - a) * f_s + a * match_size(self.anti_hints[j](f_t), f_s)
            z_s_path = call_detached(self.student.head(), s_in)
        a_out = distil[:, -1:]
        return (1 - a_out) * z_s_path + a_out * self.teacher.head()(t_in)

    def policy_loss(self, images: Tensor, distil: Tensor, z_s: Tensor, z_t: Tensor, w: Tensor) -> Tensor:
        labels = z_t.argmax(dim=1)
        ce_graft = weighted_mean(F.cross_entropy(self.graft_logits(images, distil), labels, reduction="none"), w)
        ce_student = weighted_mean(F.cross_entropy(z_s.detach(), labels, reduction="none"), w)
        gamma = self.gamma
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

        def over_feature_spots(per_sample: Callable[[int, int], Tensor]) -> Tensor:
            return sum(weighted_mean(chosen[:, j] * per_sample(j, k), w) for j, k in enumerate(self.spots))

        terms = self.weighted_terms({
            "fitnet": lambda: over_feature_spots(
                lambda j, k: fitnet_per_sample(self.regressors[j](feats_s[k]), feats_t[k])),
            "at": lambda: over_feature_spots(lambda j, k: at_per_sample(feats_s[k], feats_t[k])),
            "kd": lambda: weighted_mean(chosen[:, -1] * kd_per_sample(z_s, z_t, self.params["T"]), w),
            "policy": lambda: self.policy_loss(images, distil, z_s, z_t, w),
            "ce": lambda: weighted_mean(pseudo_label_ce_per_sample(z_s, z_t), w),
        })
        return StepOutput(z_s, z_t, terms)
