"""KD^3 (Tang et al., ICCV 2023): distillation on webly collected data under distribution shift.

By default this is the official code's method (`tangjialiang97/KD3`, folder `KDDD/`: `train_student.py`,
`helper/loops.py: train_distill`, `dataset/I32.py: train_loader_select`, `models/util.py: KDDD`).
`variant: webdistill` restores this project's earlier choices; docs/methods.md lists every difference.

- Classifier sharing: the student's last feature map goes through a projector (1x1 conv -> BN ->
  ReLU -> 3x3 conv -> BN -> ReLU -> 1x1 conv -> BN -> ReLU, hidden width d_T/factor as in SimKD)
  to the teacher's channel count; it is pooled and the teacher's frozen classifier gives the
  student's logits z_S. `deployable()` is that whole path: student backbone + projector + the
  teacher's pooling and classifier, one scriptable module.
- "align", weighted feature alignment: mean_i(w_i * mean (F_S' - F_T)^2), w_i = sigmoid(||z_S - z_T||_2)
  detached. `align: spatial` (official): F are the projector's output map and the teacher's last
  feature map (B, C, H, W; the larger of the two is average-pooled to the smaller's size);
  `align: pooled` (webdistill): the pooled vectors (B, C).
- MixDistribution: MixStyle on the input images (per-sample, per-channel mean/std mixed with those of
  a permuted batch, lambda ~ Beta(0.1, 0.1)) gives a perturbed view x'.
- "ntxent": NT-Xent (temperature 0.3) between 128-d embeddings of x and x', once for the student and
  once for the teacher (only its head trains), weight 0.001. `head: backbone` (official `Embed`): one
  Linear to 128-d on each network's own pooled backbone features (the student's before the
  projector); `head: projected` (webdistill): Linear-ReLU-Linear on the projected features F_S'.
- "kd": Hinton KD on z_S vs z_T at temperature T. Not in the official loss: weight 0 by default
  (webdistill's variant: 1). "ce": CE on the teacher's pseudo-labels, weight 0.
- Dynamic selection (`select`): a sample contributes to the terms only if its combined prediction
  (`distill.kd3_rules.combined_prediction`, `mix: logits` = softmax(a*z_T + (1-a)*z_S), official)
  passes its class's threshold tau*s_c/(2-s_c), s_c = N_c / max N, a = a(e).
  `thresholds: pool` (official): at the start of each epoch the job makes a full pass over the
  selection with student and teacher in eval mode (`PoolPass`; ranks sum their counts); N_c counts
  every combined prediction of class c (`count: all`). Where the official code then trains on the
  subset that passed, here each training batch is masked by its own combined prediction against
  these thresholds: streamed shards carry no sample index, and every loss keeps the job's steps per epoch.
  `thresholds: train_batches` (webdistill): N_c comes from the previous epoch's training batches
  (`class_counts`, summed over ranks in `on_epoch_end`); the first epoch uses tau for every class.

Config: {"method": "kd3", "variant": "official", "epochs": 20, "tau": 0.95, "T": 4.0, "select": true,
         "count": "all", "mix": "logits", "align": "spatial", "head": "backbone", "thresholds": "pool",
         "weights": {"kd": 0.0, "align": 1.0, "ntxent": 0.001, "ce": 0.0}}
`epochs` sets the a(e) schedule's length (default: the job's epoch count).
"""
from __future__ import annotations

from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import field_validator
from torch import Tensor, nn

from ..kd3_rules import (
    DEFAULT_TAU,
    Count,
    Mix,
    combine_weight,
    combined_prediction,
    passes_threshold,
    thresholds_from_counts,
)
from .base import Distiller, LossParams, PoolPass, Positive, StepOutput, require_feature_api, weighted_mean
from .ce import pseudo_label_ce_per_sample
from .kd import kd_per_sample


def _conv_bn_relu(cin: int, cout: int, kernel: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False), nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True)]


def projector(student_channels: int, teacher_channels: int, factor: int = 2) -> nn.Sequential:
    """1x1 -> 3x3 -> 1x1 conv-BN-ReLU, from the student's channels to the teacher's."""
    hidden = max(1, teacher_channels // factor)
    return nn.Sequential(*_conv_bn_relu(student_channels, hidden, 1), *_conv_bn_relu(hidden, hidden, 3),
                         *_conv_bn_relu(hidden, teacher_channels, 1))


def embedding_head(in_dim: int, out_dim: int, kind: str = "backbone") -> nn.Module:
    """The contrastive term's head: one Linear (official `Embed`; NT-Xent normalises), or webdistill's
    earlier SimCLR-style Linear-ReLU-Linear."""
    if kind == "backbone":
        return nn.Linear(in_dim, out_dim)
    return nn.Sequential(nn.Linear(in_dim, in_dim), nn.ReLU(inplace=True), nn.Linear(in_dim, out_dim))


def same_size(f_s: Tensor, f_t: Tensor) -> tuple[Tensor, Tensor]:
    """The two maps at the smaller one's spatial size (the official KDDD module's spatial alignment)."""
    if f_s.shape[-2:] == f_t.shape[-2:]:
        return f_s, f_t
    if f_s.shape[-2] > f_t.shape[-2]:
        return F.adaptive_avg_pool2d(f_s, f_t.shape[-2:]), f_t
    return f_s, F.adaptive_avg_pool2d(f_t, f_s.shape[-2:])


def pooled(model: nn.Module, feature_map: Tensor) -> Tensor:
    return torch.flatten(model.pool(feature_map), 1)


class KD3Student(nn.Module):
    """The deployable KD^3 student: backbone features -> projector -> the teacher's pool and classifier."""

    def __init__(self, backbone: nn.Module, projector: nn.Module, pool: nn.Module, classifier: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.projector = projector
        self.pool = pool
        self.classifier = classifier

    def embed(self, x: Tensor) -> Tensor:
        """F_S': pooled projected features, in the teacher's feature space (B, d_T)."""
        return torch.flatten(self.pool(self.projector(self.backbone.forward_features(x))), 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.embed(x))


def mix_style(x: Tensor, lam: Tensor, perm: Tensor, eps: float = 1e-6) -> Tensor:
    """MixStyle on images: normalise each sample's channels, then give them the statistics
    lam*(mu, sigma) + (1-lam)*(mu, sigma)[perm]. Population std over H, W."""
    mu = x.mean(dim=(2, 3), keepdim=True)
    sigma = (x.var(dim=(2, 3), keepdim=True, correction=0) + eps).sqrt()
    lam = lam.view(-1, 1, 1, 1).to(x.dtype)
    mu_mix = lam * mu + (1 - lam) * mu[perm]
    sigma_mix = lam * sigma + (1 - lam) * sigma[perm]
    return (x - mu) / sigma * sigma_mix + mu_mix


def random_mix_style(x: Tensor, alpha: float) -> Tensor:
    """MixDistribution's perturbed view: lambda ~ Beta(alpha, alpha) per sample, a random permutation."""
    lam = torch.distributions.Beta(alpha, alpha).sample((x.shape[0],)).to(x.device)
    return mix_style(x, lam, torch.randperm(x.shape[0], device=x.device))


def nt_xent_per_sample(a: Tensor, b: Tensor, temperature: float, sample_weights: Tensor | None = None) -> Tensor:
    """NT-Xent (SimCLR) between views a[i] and b[i], one value per pair (B,): the mean of the losses
    with a[i] and with b[i] as anchor. Samples of weight 0 are not negatives either (they are not
    in the batch as far as the loss is concerned)."""
    n = a.shape[0]
    z = F.normalize(torch.cat([a, b]), dim=1)
    sim = z @ z.t() / temperature
    rows = torch.arange(2 * n, device=z.device)
    positive = (rows + n) % (2 * n)
    excluded = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    if sample_weights is not None:
        excluded = excluded | (torch.cat([sample_weights, sample_weights]) == 0).unsqueeze(0)
    excluded[rows, positive] = False  # an anchor always sees its own positive: no all -inf row
    sim = sim.masked_fill(excluded, float("-inf"))
    per_anchor = torch.logsumexp(sim, dim=1) - sim[rows, positive]
    return (per_anchor[:n] + per_anchor[n:]) / 2


def alignment_weights(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """w_i = sigmoid(||z_S - z_T||_2), detached (B,)."""
    return torch.sigmoid((student_logits - teacher_logits).norm(dim=1)).detach()


class KD3(Distiller):
    method = "kd3"
    needs_live_teacher = True
    TERMS = {"kd": 0.0, "align": 1.0, "ntxent": 0.001, "ce": 0.0}
    # this project's choices before they were checked against the official code (docs/methods.md)
    VARIANTS = {"official": {},
                "webdistill": {"count": "confident", "mix": "probabilities", "align": "pooled", "head": "projected",
                               "thresholds": "train_batches", "weights": {"kd": 1.0}}}

    class Params(LossParams):
        variant: Literal["official", "webdistill"] = "official"
        T: Annotated[float, Positive] = 4.0
        tau: float = DEFAULT_TAU
        epochs: Annotated[int, Positive] | None = None
        select: bool = True
        count: Count = "all"
        mix: Mix = "logits"
        align: Literal["spatial", "pooled"] = "spatial"
        head: Literal["backbone", "projected"] = "backbone"
        thresholds: Literal["pool", "train_batches"] = "pool"
        mix_alpha: Annotated[float, Positive] = 0.1
        ntxent_T: Annotated[float, Positive] = 0.3
        embed_dim: Annotated[int, Positive] = 128
        factor: Annotated[int, Positive] = 2

        @field_validator("tau")
        @classmethod
        def _a_probability(cls, tau: float) -> float:
            if not 0 < tau < 1:
                raise ValueError(f"tau must be in (0, 1), got {tau}")
            return tau

    def __init__(self, student, teacher, num_classes, params=None, weights=None):
        super().__init__(student, teacher, num_classes, params, weights)
        require_feature_api(student, "student", self.method)
        require_feature_api(teacher, "teacher", self.method)
        d_s, d_t = _out_channels(student), teacher.classifier.in_features
        self.projector = projector(d_s, d_t, self.params["factor"])
        # The student's own classifier is replaced by the teacher's: it must not train (nor sit
        # unused in DDP's gradient buckets).
        student.classifier.requires_grad_(False)
        if self.active("ntxent"):
            head = self.params["head"]
            self.head_student = embedding_head(d_s if head == "backbone" else d_t, self.params["embed_dim"], head)
            self.head_teacher = embedding_head(d_t, self.params["embed_dim"], head)
        epochs = self.params["epochs"]
        self.register_buffer("teacher_weight", torch.tensor(combine_weight(0, epochs) if epochs else 1.0))
        self.register_buffer("thresholds", torch.full((num_classes,), self.params["tau"]))
        self.register_buffer("class_counts", torch.zeros(num_classes, dtype=torch.int64))

    def deployable(self) -> KD3Student:
        return KD3Student(self.student, self.projector, self.teacher.pool, self.teacher.classifier)

    # -- dynamic selection ----------------------------------------------------------------------
    def on_epoch_start(self, epoch: int, epochs: int, pool: PoolPass | None = None) -> None:
        self.teacher_weight.fill_(combine_weight(epoch, self.params["epochs"] or epochs))
        self.class_counts.zero_()
        if self.params["select"] and self.params["thresholds"] == "pool" and pool is not None:
            self._set_thresholds(pool.all_reduce(self.pool_counts(pool)))

    def pool_counts(self, pool: PoolPass) -> Tensor:
        """N_c over this rank's share of the pool, both networks in eval mode (the official
        `train_loader_select`)."""
        training = self.training
        self.eval()
        counts = torch.zeros_like(self.class_counts)
        student = self.deployable()
        try:
            with torch.no_grad():
                for images in pool.batches():
                    label, conf = combined_prediction(self.teacher(images), student(images),
                                                      float(self.teacher_weight), self.params["mix"])
                    counts += self._count(label, conf)
        finally:
            self.train(training)
        return counts

    def _count(self, label: Tensor, conf: Tensor) -> Tensor:
        if self.params["count"] == "confident":
            label = label[conf > self.params["tau"]]
        return torch.bincount(label, minlength=self.num_classes)[: self.num_classes]

    def _set_thresholds(self, counts: Tensor) -> None:
        self.class_counts.copy_(counts)
        new = thresholds_from_counts(counts.cpu().numpy(), self.params["tau"])
        self.thresholds.copy_(torch.as_tensor(new, dtype=self.thresholds.dtype))

    def on_epoch_end(self, all_reduce) -> None:
        if self.params["thresholds"] == "train_batches":
            self._set_thresholds(all_reduce(self.class_counts.clone()))

    def selection_mask(self, teacher_logits: Tensor, student_logits: Tensor) -> Tensor:
        """Which samples of the batch pass their class's threshold (B,) bool; with
        `thresholds: train_batches`, also counts N_c in training."""
        label, conf = combined_prediction(teacher_logits, student_logits, float(self.teacher_weight),
                                          self.params["mix"])
        if self.training and self.params["thresholds"] == "train_batches":
            self.class_counts += self._count(label, conf)
        passes = passes_threshold(label.cpu().numpy(), conf.cpu().numpy(), self.thresholds.cpu().numpy())
        return torch.from_numpy(passes).to(teacher_logits.device)

    # -- the training step ----------------------------------------------------------------------
    def step(self, images, teacher_logits, sample_weights) -> StepOutput:
        with torch.no_grad():
            map_t = self.teacher.forward_features(images)
            f_t = pooled(self.teacher, map_t)
            z_t = self.teacher.classifier(f_t)
        backbone = self.student.forward_features(images)
        map_s = self.projector(backbone)
        f_s = pooled(self.teacher, map_s)  # the deployable's path: the teacher's pooling and classifier
        z_s = self.teacher.classifier(f_s)
        w = torch.ones(images.shape[0], device=images.device) if sample_weights is None else sample_weights
        if self.params["select"]:
            w = w * self.selection_mask(z_t, z_s).to(w.dtype)

        def align() -> Tensor:
            if self.params["align"] == "spatial":
                a, b = same_size(map_s, map_t)
                per_sample = (a - b).pow(2).flatten(1).mean(dim=1)
            else:
                per_sample = (f_s - f_t).pow(2).mean(dim=1)
            return weighted_mean(alignment_weights(z_s, z_t) * per_sample, w)

        def contrastive() -> Tensor:
            mixed = random_mix_style(images, self.params["mix_alpha"])
            t = self.params["ntxent_T"]
            with torch.no_grad():
                f_t_mixed = pooled(self.teacher, self.teacher.forward_features(mixed))
            if self.params["head"] == "backbone":
                v_s = pooled(self.student, backbone)
                v_s_mixed = pooled(self.student, self.student.forward_features(mixed))
            else:
                v_s, v_s_mixed = f_s, self.deployable().embed(mixed)
            per_sample = (nt_xent_per_sample(self.head_student(v_s), self.head_student(v_s_mixed), t, w)
                          + nt_xent_per_sample(self.head_teacher(f_t), self.head_teacher(f_t_mixed), t, w))
            return weighted_mean(per_sample, w)

        terms = self.weighted_terms({
            "kd": lambda: weighted_mean(kd_per_sample(z_s, z_t, self.params["T"]), w),
            "align": align,
            "ntxent": contrastive,
            "ce": lambda: weighted_mean(pseudo_label_ce_per_sample(z_s, z_t), w),
        })
        return StepOutput(z_s, z_t, terms)


def _out_channels(model: nn.Module) -> int:
    """Channels of `forward_features`' output: `feature_dim`, else the classifier's input size."""
    return int(getattr(model, "feature_dim", model.classifier.in_features))
