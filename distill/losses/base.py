"""The `Distiller` base class (mdistiller style) and the config checks every method shares.

A method is one subclass with
- `Params`: a pydantic model of its config parameters (type, default, range of each);
- `TERMS`: its loss terms, `name -> default weight` (the config's `weights:` overrides them; each is
  a float >= 0, checked by the `Weights` model built from TERMS);
- `step(images, teacher_logits, sample_weights) -> StepOutput`.
`forward_train` returns `(student logits, {term: weighted scalar})`; a term whose weight is 0 is
neither computed nor returned.

A method reproducing a paper has the official code's behaviour by default and may keep other
variants as named presets: `VARIANTS = {"webdistill": {param: value, ..., "weights": {term: w}}}`,
chosen with the parameter `variant`. A preset only changes defaults: a parameter or weight the config
gives itself wins. Per-sample losses are reduced with the selection's sample weights
as `sum(w*l)/sum(w)` (`weighted_mean`).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, ClassVar, NamedTuple

import torch
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    NonNegativeFloat,
    ValidationError,
    ValidationInfo,
    create_model,
)
from torch import Tensor, nn

from curation.config_errors import validation_line
from curation.errors import WebdistillError


class LossConfigError(WebdistillError, ValueError):
    """A loss config names an unknown method, term or parameter, or a value that does not fit."""


class StepOutput(NamedTuple):
    logits: Tensor          # the deployable student's logits (B, C)
    teacher_logits: Tensor  # what the logit terms compared against (B, C), no grad
    terms: dict[str, Tensor]


class PoolPass(NamedTuple):
    """What a method that looks at the whole pool each epoch gets from the job (KD^3's thresholds):
    `batches()` yields this rank's share of the selection's images (B, 3, H, W) on the device, in a
    fixed order, without augmentation; `all_reduce` sums a tensor over ranks."""
    batches: Callable[[], Iterator[Tensor]]
    all_reduce: Callable[[Tensor], Tensor]


def weighted_mean(per_sample: Tensor, sample_weights: Tensor | None) -> Tensor:
    """mean(l) without weights, else sum(w*l)/sum(w); an all-zero batch gives 0, not NaN."""
    if sample_weights is None:
        return per_sample.mean()
    w = sample_weights.to(per_sample.dtype)
    return (w * per_sample).sum() / w.sum().clamp_min(torch.finfo(per_sample.dtype).tiny)


class LossParams(BaseModel):
    """A method's parameters. Strict: 1 is not a bool, "4" is not a number (an int is taken as a float)."""
    model_config = ConfigDict(extra="forbid", strict=True)


def _positive(value: float, info: ValidationInfo) -> float:
    if value <= 0:
        raise ValueError(f"{info.field_name} must be > 0, got {value}")
    return value


# `Annotated[float, Positive]`. Not pydantic's PositiveFloat: the losses word a range error
# "loss 'kd': T must be > 0, got 0", the validator's own sentence (see curation.config_errors).
Positive = AfterValidator(_positive)


def freeze(module: nn.Module) -> nn.Module:
    """Eval mode and no gradients: the teacher never trains, and its BN statistics never move."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def require_feature_api(model: nn.Module, role: str, method: str) -> None:
    """Feature methods need `forward_features`, `pool` and `classifier` (distill.models.SmallCNN)."""
    missing = [a for a in ("forward_features", "pool", "classifier") if not hasattr(model, a)]
    if missing:
        raise LossConfigError(f"loss {method!r} needs a {role} with forward_features/pool/classifier "
                              f"(missing: {', '.join(missing)})")


class Distiller(nn.Module):
    """A student (and, for live-teacher methods, a frozen teacher) plus what a method trains beside them."""

    needs_live_teacher: bool = False
    Params: type[LossParams] = LossParams
    TERMS: dict[str, float] = {}
    Weights: type[BaseModel]  # built from TERMS for each subclass
    method: str = ""
    # named presets of parameter and weight defaults ("weights": {...}), chosen by the parameter `variant`
    VARIANTS: ClassVar[dict[str, dict[str, Any]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.Weights = create_model(f"{cls.__name__}Weights", __config__=LossParams.model_config,
                                   **{term: (NonNegativeFloat, weight) for term, weight in cls.TERMS.items()})

    def __init__(self, student: nn.Module, teacher: nn.Module | None, num_classes: int,
                 params: dict[str, Any] | None = None, weights: dict[str, float] | None = None):
        super().__init__()
        self.student = student
        self.teacher = freeze(teacher) if teacher is not None else None
        self.num_classes = num_classes
        self.params = self.resolve_params(params or {})
        self.term_weights = self.resolve_weights(weights or {}, self.params)
        self._extras: list[tuple[float, LogitDistiller]] = []

    # -- config -------------------------------------------------------------------------------
    @classmethod
    def _preset(cls, variant: Any) -> dict[str, Any]:
        # an unknown name gets no preset here: the Params model words the error (a Literal of the names)
        return cls.VARIANTS.get(variant, {}) if isinstance(variant, str) else {}

    @classmethod
    def resolve_params(cls, given: dict[str, Any]) -> dict[str, Any]:
        """Every parameter of the method, typed and checked: the given ones, then the chosen
        variant's preset, then the defaults."""
        preset = {k: v for k, v in cls._preset(given.get("variant")).items() if k != "weights"}
        return cls._checked(cls.Params, {**preset, **given}, f"loss {cls.method!r}: ", "parameter")

    @classmethod
    def resolve_weights(cls, given: dict[str, float], params: dict[str, Any] | None = None) -> dict[str, float]:
        """Every term's weight: the given ones, then the variant's preset (`params["variant"]`), then TERMS."""
        preset = cls._preset((params or {}).get("variant")).get("weights", {})
        merged = {**preset, **given} if isinstance(given, dict) else given  # a non-mapping: the model refuses it
        return cls._checked(cls.Weights, merged, f"loss {cls.method!r}: weights: ", "term")

    @staticmethod
    def _checked(model: type[BaseModel], given: Any, where: str, noun: str) -> dict[str, Any]:
        try:
            return model.model_validate(given).model_dump()
        except ValidationError as exc:
            raise LossConfigError(validation_line(exc, model, where, noun)) from exc

    def active(self, term: str) -> bool:
        return self.term_weights[term] > 0

    def weighted_terms(self, raw: dict[str, Callable[[], Tensor]]) -> dict[str, Tensor]:
        """{term: weight * value} for the terms with a non-zero weight; values are computed lazily."""
        return {name: self.term_weights[name] * fn() for name, fn in raw.items() if self.active(name)}

    # -- teacher ------------------------------------------------------------------------------
    def teacher_logits(self, images: Tensor, stored: Tensor | None) -> Tensor:
        """The live teacher's logits when there is one (the images may be augmented), else the stored ones."""
        if self.teacher is not None:
            with torch.no_grad():
                return self.teacher(images).float()
        if stored is None:
            raise LossConfigError(f"loss {self.method!r} needs stored teacher logits or a live teacher")
        return stored.to(images.device).float()

    def train(self, mode: bool = True) -> Distiller:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # frozen: its BN running statistics must not move
        return self

    # -- the interface the training job calls ------------------------------------------------
    def step(self, images: Tensor, teacher_logits: Tensor | None,
             sample_weights: Tensor | None) -> StepOutput:
        raise NotImplementedError

    def forward_train(self, images: Tensor, teacher_logits: Tensor | None = None,
                      sample_weights: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        if sample_weights is not None and sample_weights.shape != (images.shape[0],):
            raise ValueError(f"sample_weights must have shape ({images.shape[0]},), "
                             f"got {tuple(sample_weights.shape)}")
        out = self.step(images, teacher_logits, sample_weights)
        terms = dict(out.terms)
        for weight, extra in self._extras:
            if weight == 0:
                continue
            for name, value in extra.logit_terms(out.logits, out.teacher_logits, sample_weights).items():
                terms[f"{extra.method}.{name}"] = weight * value
        return out.logits, terms

    def add_extra(self, weight: float, extra: LogitDistiller) -> None:
        """Combine a logit method into this one: its terms, times `weight`, on this method's logits."""
        if any(e.method == extra.method for _, e in self._extras):
            raise LossConfigError(f"loss {self.method!r}: extra {extra.method!r} given twice")
        self._extras.append((weight, extra))  # a plain list: the extra shares our student, no new state

    def forward(self, images: Tensor) -> Tensor:
        """Eval: the deployable student's logits."""
        return self.deployable()(images)

    def term_names(self) -> list[str]:
        """The names `forward_train` returns (terms of weight 0 are left out)."""
        names = [t for t in self.TERMS if self.active(t)]
        return names + [f"{e.method}.{t}" for w, e in self._extras if w > 0 for t in e.term_names()]

    def on_epoch_start(self, epoch: int, epochs: int, pool: PoolPass | None = None) -> None:
        """Per-epoch schedules (kd3's a(e)) and whole-pool statistics (kd3's thresholds, from `pool`)."""

    def on_epoch_end(self, all_reduce: Callable[[Tensor], Tensor]) -> None:
        """Cross-rank syncing of per-epoch statistics (kd3's per-class counts)."""

    def deployable(self) -> nn.Module:
        """What is evaluated and exported."""
        return self.student

    def optimizer_groups(self) -> list[dict[str, Any]]:
        """The optimizer's parameter groups: one by default. A group may carry `lr_scale` (its learning
        rate is the job's times that, schedule included) and its own `weight_decay`."""
        return [{"params": self.trainable_parameters()}]

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Everything that trains: never the teacher's parameters."""
        teacher_ids = {id(p) for p in self.teacher.parameters()} if self.teacher is not None else set()
        return [p for p in self.parameters() if p.requires_grad and id(p) not in teacher_ids]


class LogitDistiller(Distiller):
    """A method that only compares student and teacher logits, so it can also be an `extra` term."""

    def logit_terms(self, student_logits: Tensor, teacher_logits: Tensor,
                    sample_weights: Tensor | None) -> dict[str, Tensor]:
        raise NotImplementedError

    def step(self, images, teacher_logits, sample_weights) -> StepOutput:
        z_t = self.teacher_logits(images, teacher_logits)
        z_s = self.student(images)
        return StepOutput(z_s, z_t, self.logit_terms(z_s, z_t, sample_weights))
