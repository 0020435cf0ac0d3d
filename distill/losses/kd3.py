"""KD^3 (Tang et al., ICCV 2023): distillation on webly collected data under distribution shift.

- Classifier sharing: the student's last feature map goes through a projector (1x1 conv -> BN ->
  ReLU -> 3x3 conv -> BN -> ReLU -> 1x1 conv -> BN -> ReLU, hidden width d_T/factor as in SimKD)
  to the teacher's channel count, is pooled (F_S'), and the teacher's frozen classifier gives the
  student's logits z_S. `deployable()` is that whole path: student backbone + projector + the
  teacher's pooling and classifier, one scriptable module.
- Weighted feature alignment ("align"): mean_i(w_i * mean_d (F_S' - F_T)^2), with
  w_i = sigmoid(||z_S - z_T||_2) detached; F are pooled features, z logits.
- MixDistribution: MixStyle on the input images (per-sample, per-channel mean/std mixed with those of
  a permuted batch, lambda ~ Beta(0.1, 0.1)) gives a perturbed view x'.
- "ntxent": NT-Xent (temperature 0.3) between 128-d embeddings of x and x' from small heads, once for
  the student (on F_S') and once for the teacher (on F_T; only its head trains), weight 0.001.
- "kd": Hinton KD on z_S vs z_T at temperature T.
- Dynamic selection: a sample contributes to the terms only if the combined prediction
  p = a(e) * softmax(z_T) + (1 - a(e)) * softmax(z_S) passes its class-adaptive threshold
  (`distill.kd3_rules`). We combine probabilities, as the scoring stage's `kd3_conf` does, so the
  confidence lies in [0, 1] and compares with tau.

Where the thresholds come from (our choice, FlexMatch style): the per-class counts N_c (combined
prediction is c with confidence > tau) are accumulated in the `class_counts` buffer over an epoch
of training batches, summed over ranks in `on_epoch_end`, and turned into the thresholds used
during the next epoch (`thresholds` buffer, so a resumed run keeps them). The first epoch uses tau
for every class (`class_thresholds`' rule when no count exists yet).

Config: {"method": "kd3", "epochs": 20, "tau": 0.95, "T": 4.0, "select": true,
         "weights": {"kd": 1.0, "align": 1.0, "ntxent": 0.001, "ce": 0.0}}
`epochs` sets the a(e) schedule's length (default: the job's epoch count).
"""
from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import field_validator
from torch import Tensor, nn

from ..kd3_rules import DEFAULT_TAU, combine_weight, combined_prediction, passes_threshold, thresholds_from_counts
from .base import Distiller, LossParams, Positive, StepOutput, require_feature_api, weighted_mean
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


def embedding_head(in_dim: int, out_dim: int) -> nn.Sequential:
    """A small SimCLR-style head for the contrastive term."""
    return nn.Sequential(nn.Linear(in_dim, in_dim), nn.ReLU(inplace=True), nn.Linear(in_dim, out_dim))


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
    TERMS = {"kd": 1.0, "align": 1.0, "ntxent": 0.001, "ce": 0.0}

    class Params(LossParams):
        T: Annotated[float, Positive] = 4.0
        tau: float = DEFAULT_TAU
        epochs: Annotated[int, Positive] | None = None
        select: bool = True
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
            self.head_student = embedding_head(d_t, self.params["embed_dim"])
            self.head_teacher = embedding_head(d_t, self.params["embed_dim"])
        epochs = self.params["epochs"]
        self.register_buffer("teacher_weight", torch.tensor(combine_weight(0, epochs) if epochs else 1.0))
        self.register_buffer("thresholds", torch.full((num_classes,), self.params["tau"]))
        self.register_buffer("class_counts", torch.zeros(num_classes, dtype=torch.int64))

    def deployable(self) -> KD3Student:
        return KD3Student(self.student, self.projector, self.teacher.pool, self.teacher.classifier)

    # -- dynamic selection ----------------------------------------------------------------------
    def on_epoch_start(self, epoch: int, epochs: int) -> None:
        self.teacher_weight.fill_(combine_weight(epoch, self.params["epochs"] or epochs))
        self.class_counts.zero_()

    def on_epoch_end(self, all_reduce) -> None:
        counts = all_reduce(self.class_counts.clone())
        self.class_counts.copy_(counts)
        new = thresholds_from_counts(counts.cpu().numpy(), self.params["tau"])
        self.thresholds.copy_(torch.as_tensor(new, dtype=self.thresholds.dtype))

    def selection_mask(self, teacher_logits: Tensor, student_logits: Tensor) -> Tensor:
        """Which samples of the batch pass their class's threshold (B,) bool; counts N_c in training."""
        label, conf = combined_prediction(teacher_logits, student_logits, float(self.teacher_weight))
        if self.training:
            confident = label[conf > self.params["tau"]]
            self.class_counts += torch.bincount(confident, minlength=self.num_classes)[: self.num_classes]
        passes = passes_threshold(label.cpu().numpy(), conf.cpu().numpy(), self.thresholds.cpu().numpy())
        return torch.from_numpy(passes).to(teacher_logits.device)

    # -- the training step ----------------------------------------------------------------------
    def _teacher_features(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            return torch.flatten(self.teacher.pool(self.teacher.forward_features(x)), 1)

    def step(self, images, teacher_logits, sample_weights) -> StepOutput:
        student = self.deployable()
        f_t = self._teacher_features(images)
        z_t = self.teacher.classifier(f_t)
        f_s = student.embed(images)
        z_s = student.classifier(f_s)
        w = torch.ones(images.shape[0], device=images.device) if sample_weights is None else sample_weights
        if self.params["select"]:
            w = w * self.selection_mask(z_t, z_s).to(w.dtype)

        def contrastive() -> Tensor:
            mixed = random_mix_style(images, self.params["mix_alpha"])
            t = self.params["ntxent_T"]
            per_sample = (nt_xent_per_sample(self.head_student(f_s), self.head_student(student.embed(mixed)), t, w)
                          + nt_xent_per_sample(self.head_teacher(f_t), self.head_teacher(self._teacher_features(mixed)),
                                               t, w))
            return weighted_mean(per_sample, w)

        terms = self.weighted_terms({
            "kd": lambda: weighted_mean(kd_per_sample(z_s, z_t, self.params["T"]), w),
            "align": lambda: weighted_mean(alignment_weights(z_s, z_t) * (f_s - f_t).pow(2).mean(dim=1), w),
            "ntxent": contrastive,
            "ce": lambda: weighted_mean(pseudo_label_ce_per_sample(z_s, z_t), w),
        })
        return StepOutput(z_s, z_t, terms)


def _out_channels(model: nn.Module) -> int:
    """Channels of `forward_features`' output: `feature_dim`, else the classifier's input size."""
    return int(getattr(model, "feature_dim", model.classifier.in_features))
