"""Selection policies: pure functions that pick rows of the candidate frame.

A policy is a pipeline of steps, applied left to right, each to the rows the previous one kept:

    POLICY = STEP [ "|" STEP ]...
    STEP   = NAME [ ":" PARAM [ (";" | ",") PARAM ]... ]
    PARAM  = KEY "=" VALUE

e.g. `dedup | balance:k=500 | topk:k=200;by=msp` or `softmax:k=1000,by=greatest(msp, energy),tau=0.5`.
Separators only count outside parentheses, brackets and quotes, so a score expression may hold
commas (`greatest(a, b)`); wrap an expression that needs a bare `|`, `;` or `,` in parentheses.
A `by=` value is a DuckDB expression over the `candidates` view, higher = better: the select stage
evaluates each one (`expressions(steps)`) into the column `policy_expression_column(expr)`. A plain
column of the frame also serves as its own expression.

Steps (DESIGN.md, "Select"):
- `topk:k=N;by=EXPR`: the N best. `threshold:by=EXPR;min=X;max=Y` (either or both, inclusive).
  A null score never passes either.
- `dedup[:by=EXPR]`: one sample per near-duplicate cluster (`cluster_id`): the cluster's
  representative if it is still in the frame, else the best by `by`, else the first by sample_id.
  Without clusters (no `webdistill index` yet, or samples ingested after it), exact duplicates
  stand in: a row without a `cluster_id` joins the cluster of an indexed row with the same
  `sha256`, else one sample per `sha256` is kept; `apply_policies` notes it. Rows with neither
  are kept.
- `balance:k=N` (total, split evenly over the classes present; a class with fewer samples than its
  share gives the rest to the others, so quotas differ by at most one) or `balance:per_class=N`;
  classes from `teacher_label` (`label=kd3_label` for another column); within a class the best by
  `by` if given, else a seeded random choice. Rows with a null label are dropped.
- `diversity:max_per_cluster=N[;by=EXPR]`: at most N per k-means `cluster`, best-first by `by`
  if given, else seeded random. Rows with a null `cluster` are not capped.
- `softmax:k=N;by=EXPR[;tau=1.0][;replace=false]`: related-first sampling (Begon & Geurts),
  `p_i ∝ exp(s_i / tau)`. Without replacement, numpy `Generator.choice(replace=False, p=p)`; with
  replacement, a row drawn m times comes back once with its weight multiplied by m. Rows whose
  score is null or not finite are never drawn.
- `kd3[:tau=0.95][;count=all]`: KD^3 class-adaptive selection on (`kd3_label`, `kd3_conf`), thresholds
  from `distill.kd3_rules` computed over the frame the step receives. `count=all` (the official
  code) counts every prediction of a class in N_c; `count=confident` (webdistill's earlier rule) only
  those above tau, which admits a class that gets many predictions, none confident, wholesale.
- `default[:k=N][;fill=false]`: the policy that needs no tuning (`default_steps`), what `webdistill select` and
  the pipeline apply when given no policy. It expands, on the frame it receives, into
  `dedup:by=S | diversity:max_per_cluster=M;by=S | balance:k=N;label=L;by=S`: one sample per
  near-duplicate cluster (per sha256 without an index); at most M per k-means cluster, M = twice a
  fair share of N over the classes or the clusters, whichever are fewer (only with an index); then a
  quota per pseudo-class, best first by S. S is the fused rank score (`msp` for a scoring run
  without it); L is KD^3's combined prediction (`kd3_label`: the teacher's argmax in round 1, teacher
  and student mixed once a student re-scored the pool), else `teacher_label`. N defaults to a tenth
  of the rows the step receives. k is a budget, not a quota: where a mixture of two Gaussians over the
  log Mahalanobis distances (`in_distribution_count`, label-free) puts fewer than N candidates in the
  teacher's distribution, the quotas share that many and the manifest's notes say so; `fill=true`
  spends N whatever the pool holds. Why: on the demo's crawl (3% in-domain) filling k=10% took 70%
  look-alikes, and its student fell from above the oracle to 0.86x it (bench/results/quality.md).
  Why quotas: a top-k by any single score, however pure, let one or two
  pseudo-classes take the budget and gave a student below random (DESIGN.md, "What decides curation
  quality").

`apply_policies` sorts the frame by sample_id first, so the result depends only on the rows and
the seed, not on the order a SQL query returned them in; the kept rows come back in sample_id order
with a float `weight` column (1.0 unless a step or the input set it; multiplied through steps).
"""
from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
import pandas as pd
from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError, create_model

from distill.kd3_rules import COUNTS, DEFAULT_TAU, class_thresholds, passes_threshold

from .config_errors import validation_line
from .errors import WebdistillError

SYNTAX = ("syntax: STEP | STEP ..., STEP = NAME[:KEY=VALUE;KEY=VALUE...], "
          "e.g. 'dedup | balance:k=500 | topk:k=200;by=msp'")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_OPENERS, _CLOSERS = "([{", ")]}"


class PolicyError(WebdistillError):
    """A selection policy is malformed, or needs a column the candidates lack."""


@dataclass(frozen=True)
class PolicyStep:
    kind: str
    params: dict  # every parameter of the kind, typed; None where an optional one was not given


# ---------------------------------------------------------------- parsing

def _split_top_level(text: str, separators: str) -> list[str]:
    """Split at separators outside (), [], {} and quotes: expressions keep their commas."""
    parts, start, depth, quote = [], 0, 0, ""
    for i, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in _OPENERS:
            depth += 1
        elif ch in _CLOSERS:
            depth -= 1
            if depth < 0:
                raise PolicyError(f"bad policy {text!r}: unbalanced {ch!r}; {SYNTAX}")
        elif ch in separators and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth or quote:
        raise PolicyError(f"bad policy {text!r}: unbalanced parentheses or quotes; {SYNTAX}")
    parts.append(text[start:])
    return [p.strip() for p in parts]


def _positive_int(key: str, text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise PolicyError(f"policy parameter {key}={text!r} must be a positive integer")
    return value


def _float(key: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if math.isnan(value):  # NaN compares false with everything: a threshold of NaN would keep nothing
        raise PolicyError(f"policy parameter {key}={text!r} must be a number")
    return value


def _positive_float(key: str, text: str) -> float:
    value = _float(key, text)
    if not (0 < value < math.inf):
        raise PolicyError(f"policy parameter {key}={text!r} must be a finite number > 0")
    return value


def _fraction(key: str, text: str) -> float:
    value = _float(key, text)
    if not 0 < value <= 1:
        raise PolicyError(f"policy parameter {key}={text!r} must be in (0, 1]")
    return value


def _bool(key: str, text: str) -> bool:
    lowered = text.lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise PolicyError(f"policy parameter {key}={text!r} must be true or false")


def _count_rule(key: str, text: str) -> str:
    if text not in COUNTS:
        raise PolicyError(f"policy parameter {key}={text!r} must be one of {', '.join(COUNTS)}")
    return text


def _column_name(key: str, text: str) -> str:
    if not _IDENTIFIER.match(text):
        raise PolicyError(f"policy parameter {key}={text!r} must be a column name")
    return text


def _expression(key: str, text: str) -> str:
    return text  # DuckDB checks it when the select stage evaluates it


def _param(convert: Callable[[str, str], object], required: bool = False, default: object = None) -> tuple:
    """A parameter of a step: its text converted and checked by `convert(key, text)`, whose PolicyError
    (not a ValueError: pydantic lets it through) keeps the `key='text' must be ...` wording."""
    checked = Annotated[Any, BeforeValidator(lambda text, info: convert(info.field_name, text))]
    return checked, ... if required else default


def _params(kind: str, **params: tuple) -> type[BaseModel]:
    """A step's parameters as a model: unknown and missing keys, defaults."""
    return create_model(f"{kind}_params", __config__=ConfigDict(extra="forbid"), **params)


@dataclass(frozen=True)
class _Policy:
    params: type[BaseModel]
    apply: Callable | None  # (frame, params, rng) -> (kept positions, weight factors or None)
    check: Callable[[dict], str | None] = lambda params: None  # a problem across parameters
    note: Callable[[pd.DataFrame], str | None] = lambda frame: None  # what the user should know about a run
    expand: Callable | None = None  # (frame, params, notes) -> steps: a step made of other steps, run in its place


def _policy_error(kind: str, problem: str) -> PolicyError:
    return PolicyError(f"policy step {kind!r}: {problem}")


def _parse_step(text: str) -> PolicyStep:
    kind, _, rest = text.partition(":")
    kind = kind.strip()
    if not kind:
        raise PolicyError(f"bad policy step {text!r}: empty step; {SYNTAX}")
    policy = POLICIES.get(kind)
    if policy is None:
        raise PolicyError(f"unknown policy {kind!r} (known: {', '.join(sorted(POLICIES))})")
    given: dict[str, str] = {}
    for piece in (_split_top_level(rest, ";,") if rest.strip() else []):
        key, eq, value = (s.strip() for s in piece.partition("="))
        if not eq or not key or not value:
            raise PolicyError(f"bad parameter {piece!r} in policy step {kind!r}: want KEY=VALUE; {SYNTAX}")
        if key in given:
            raise _policy_error(kind, f"parameter {key!r} given twice")
        given[key] = value
    try:
        params = policy.params.model_validate(given).model_dump()
    except ValidationError as exc:
        raise PolicyError(validation_line(exc, policy.params, f"policy step {kind!r}: ", "parameter")) from exc
    problem = policy.check(params)
    if problem:
        raise _policy_error(kind, problem)
    return PolicyStep(kind, params)


def parse_policy(spec: str) -> list[PolicyStep]:
    """Parse `STEP | STEP ...` (see the module docstring) into typed, validated steps."""
    if not isinstance(spec, str) or not spec.strip():
        raise PolicyError(f"empty policy; {SYNTAX}")
    steps = _split_top_level(spec, "|")
    if any(not s for s in steps):
        raise PolicyError(f"bad policy {spec!r}: empty step; {SYNTAX}")
    return [_parse_step(s) for s in steps]


def expressions(steps: list[PolicyStep]) -> list[str]:
    """The distinct score expressions the steps rank by, in first-use order."""
    found = [s.params["by"] for s in steps if s.params.get("by") is not None]
    return list(dict.fromkeys(found))


def policy_expression_column(expr: str) -> str:
    """A stable, SQL-safe column name for a score expression (same text, same name)."""
    text = expr.strip() if isinstance(expr, str) else ""
    if not text:
        raise PolicyError("empty score expression")
    return "_expr_" + hashlib.sha256(text.encode()).hexdigest()[:12]


# ---------------------------------------------------------------- columns of the frame

def _require(frame: pd.DataFrame, column: str, kind: str, shown: str | None = None) -> pd.Series:
    """A column a step needs: present, and not null on every row (a stage that has not run).
    `shown`: what the user wrote (a score expression), named in the error instead of the column."""
    what = f"the score {shown!r}" if shown else f"the column {column!r}"
    if column not in frame.columns:
        raise PolicyError(f"policy {kind!r} needs {what}, which the candidates lack")
    values = frame[column]
    if len(values) and values.isna().all():
        raise PolicyError(f"policy {kind!r} needs {what}, which is null on every candidate")
    return values


def _as_float(values: pd.Series, what: str) -> np.ndarray:
    try:
        return values.astype("Float64").to_numpy(dtype=np.float64, na_value=np.nan)
    except (TypeError, ValueError):
        raise PolicyError(f"{what} is not numeric") from None


def _scores(frame: pd.DataFrame, expr: str, kind: str) -> np.ndarray:
    """The score expression's values, float with NaN for null."""
    column = policy_expression_column(expr)
    if column not in frame.columns:
        if expr.strip() not in frame.columns:
            raise PolicyError(f"policy {kind!r}: the score {expr!r} is not a column of the candidates")
        column = expr.strip()
    return _as_float(_require(frame, column, kind, shown=expr.strip()), f"score expression {expr!r}")


# ---------------------------------------------------------------- ordering helpers

def _best_first(scores: np.ndarray | None, n: int, rng: np.random.Generator | None,
                prefer: np.ndarray | None = None) -> np.ndarray:
    """Row positions best first: preferred rows, then by score (nulls last), then by position
    (= sample_id order); with no score and an rng, a seeded random order after the preferred."""
    position = np.arange(n)
    keys = []
    if scores is None and rng is not None:
        keys.append(rng.permutation(n))
    if scores is not None:
        keys += [np.where(np.isnan(scores), 0.0, -scores), np.isnan(scores)]
    if prefer is not None:
        keys.append(~prefer)
    return np.lexsort([position, *keys]) if keys else position


def _take_per_group(groups: np.ndarray, order: np.ndarray, quota: Callable[[object], int]) -> np.ndarray:
    """Positions of the first `quota(group)` rows of each group along `order`."""
    ordered = pd.Series(groups[order])
    rank = ordered.groupby(ordered, sort=False).cumcount().to_numpy()
    limits = ordered.map(quota).to_numpy()
    return order[rank < limits]


def _class_quotas(counts: dict, total: int) -> dict:
    """Split `total` evenly over classes; a class with fewer rows than its share gives the rest up.
    Quotas of classes that are not exhausted differ by at most one; ties go to the bigger classes."""
    quotas, left, remaining = {}, dict(counts), total
    while left:
        fair = remaining // len(left)
        short = [c for c, n in left.items() if n <= fair]
        if not short:
            break
        for c in short:
            quotas[c] = left.pop(c)
            remaining -= quotas[c]
    if left:
        base, extra = divmod(remaining, len(left))
        for i, c in enumerate(sorted(left, key=lambda c: (-left[c], c))):
            quotas[c] = base + (i < extra)
    return quotas


# ---------------------------------------------------------------- the steps
# Each takes (frame, params, rng) and returns (kept row positions, weight factors or None).

def _topk(frame, params, rng):
    scores = _scores(frame, params["by"], "topk")
    order = _best_first(scores, len(frame), None)
    order = order[~np.isnan(scores[order])]
    return order[:params["k"]], None


def _threshold(frame, params, rng):
    scores = _scores(frame, params["by"], "threshold")
    keep = ~np.isnan(scores)
    if params["min"] is not None:
        keep &= scores >= params["min"]
    if params["max"] is not None:
        keep &= scores <= params["max"]
    return np.flatnonzero(keep), None


def _dedup_groups(frame: pd.DataFrame) -> tuple[np.ndarray, str | None]:
    """Each row's dedup group (None: kept alone), and a note where identical bytes stood in for clusters."""
    has_clusters = "cluster_id" in frame.columns and (frame["cluster_id"].notna().any() or not len(frame))
    if "sha256" not in frame.columns:
        if not has_clusters:
            _require(frame, "cluster_id", "dedup")  # raises: no clusters, and no hashes to fall back on
        return frame["cluster_id"].to_numpy(dtype=object), None
    groups = (frame["cluster_id"] if has_clusters else pd.Series(None, index=frame.index)).astype(object)
    missing = groups.isna().to_numpy() & frame["sha256"].notna().to_numpy()
    if not missing.any():
        return groups.to_numpy(dtype=object), None
    # identical bytes always share a cluster: an unclustered row joins the cluster of an identical clustered one
    clustered = groups.notna().to_numpy()
    known = dict(zip(frame["sha256"].to_numpy()[clustered], groups.to_numpy()[clustered]))
    hashes = frame["sha256"].to_numpy(dtype=object)[missing]
    groups = np.array(groups, dtype=object)  # a copy: pandas may hand out a read-only view
    groups[missing] = [known.get(h, "sha256:" + h) for h in hashes]
    if not has_clusters:
        return groups, ("dedup: no near-duplicate clusters (run `webdistill index` to find them): "
                        "kept one sample per sha256, exact duplicates only")
    return groups, (f"dedup: {int(missing.sum())} candidate(s) have no near-duplicate cluster (ingested after "
                    "`webdistill index`?): for them, exact duplicates only (by sha256)")


def _dedup(frame, params, rng):
    clusters, _ = _dedup_groups(frame)
    prefer = None
    if "is_representative" in frame.columns:
        prefer = frame["is_representative"].astype("boolean").fillna(False).to_numpy(dtype=bool)
    scores = _scores(frame, params["by"], "dedup") if params["by"] is not None else None
    order = _best_first(scores, len(frame), None, prefer)
    alone = pd.isna(clusters)
    picked = _take_per_group(clusters, order[~alone[order]], lambda c: 1)
    return np.concatenate([np.flatnonzero(alone), picked]), None


def _balance(frame, params, rng):
    labels = _require(frame, params["label"], "balance")
    labelled = np.flatnonzero(labels.notna().to_numpy())
    classes = labels.to_numpy(dtype=object)
    counts = pd.Series(classes[labelled]).value_counts().to_dict()
    if params["per_class"] is not None:
        quotas = {c: min(n, params["per_class"]) for c, n in counts.items()}
    else:
        quotas = _class_quotas(counts, params["k"])
    scores = _scores(frame, params["by"], "balance") if params["by"] is not None else None
    order = _best_first(scores, len(frame), rng)
    order = order[np.isin(order, labelled)]
    return _take_per_group(classes, order, quotas.__getitem__), None


def _diversity(frame, params, rng):
    clusters = _require(frame, "cluster", "diversity").to_numpy(dtype=object)
    scores = _scores(frame, params["by"], "diversity") if params["by"] is not None else None
    order = _best_first(scores, len(frame), rng)
    alone = pd.isna(clusters)
    capped = _take_per_group(clusters, order[~alone[order]], lambda c: params["max_per_cluster"])
    return np.concatenate([np.flatnonzero(alone), capped]), None


def _softmax(frame, params, rng):
    scores = _scores(frame, params["by"], "softmax")
    eligible = np.flatnonzero(np.isfinite(scores))
    if not len(eligible):
        return eligible, None
    # shifted by the max before dividing: a tiny tau or huge scores give 0 or 1, never inf - inf
    with np.errstate(over="ignore"):
        p = np.exp((scores[eligible] - scores[eligible].max()) / params["tau"])
    p /= p.sum()
    if params["replace"]:
        draws = rng.choice(len(eligible), size=params["k"], replace=True, p=p)
        times = np.bincount(draws, minlength=len(eligible))
        drawn = np.flatnonzero(times)
        return eligible[drawn], times[drawn].astype(np.float64)
    # choice without replacement needs at least `size` rows of non-zero probability
    size = min(params["k"], int(np.count_nonzero(p)))
    return eligible[rng.choice(len(eligible), size=size, replace=False, p=p)], None


def _kd3(frame, params, rng):
    labels = _as_float(_require(frame, "kd3_label", "kd3"), "kd3_label")
    conf = _as_float(_require(frame, "kd3_conf", "kd3"), "kd3_conf")
    known = np.flatnonzero(~np.isnan(labels) & ~np.isnan(conf))
    if not len(known):
        return known, None
    labels, conf = labels[known].astype(np.int64), conf[known]
    if labels.min() < 0:
        raise PolicyError("policy 'kd3': kd3_label has negative classes")
    thresholds = class_thresholds(labels, conf, int(labels.max()) + 1, params["tau"], params["count"])
    return known[passes_threshold(labels, conf, thresholds)], None


DEFAULT_SHARE = 0.10  # the default policy's size without k: a tenth of the candidates it sees
_DIVERSITY_FAIR_SHARES = 2  # a k-means cluster holds at most twice its fair share of the default selection


def _has_values(frame: pd.DataFrame, column: str) -> bool:
    return column in frame.columns and bool(frame[column].notna().any())


_IN_DISTRIBUTION_MIN_ROWS = 50  # fewer distances than this: no mixture is fitted, k stays what it was
_IN_DISTRIBUTION_FIT_ROWS = 100_000
_IN_DISTRIBUTION_STARTS = 10


def in_distribution_count(frame: pd.DataFrame) -> int | None:
    """How many candidates sit in the teacher's own distribution, estimated without labels: a mixture
    of two Gaussians over the log Mahalanobis distances to the reference set's class Gaussians (the
    `mahalanobis` column, -d^2), kept only where BIC prefers two components to one and the near one
    is a minority; the estimate is the near component's posterior mass. None: no such split (too few
    distances, no `mahalanobis` column, one population), so k stays a quota. Why a mixture of
    log distances: in-domain samples lie a few typical distances from their class mean, everything
    else (look-alikes, other domains, noise) orders of magnitude farther, and the log makes the two
    roughly Gaussian; the teacher's confidence cannot tell them apart (an overconfident teacher)."""
    if "mahalanobis" not in frame.columns:
        return None
    d2 = -_as_float(frame["mahalanobis"], "mahalanobis")
    d2 = d2[np.isfinite(d2)]
    if len(d2) < _IN_DISTRIBUTION_MIN_ROWS:
        return None
    from sklearn.mixture import GaussianMixture  # only the default policy needs it: imported on use

    x = np.log(np.maximum(d2, 1e-12))[:, None]
    # a million-row pool is fitted on a fixed sample of it: seconds, not minutes; the estimate scales back
    fit = x if len(x) <= _IN_DISTRIBUTION_FIT_ROWS else np.random.default_rng(0).choice(x, _IN_DISTRIBUTION_FIT_ROWS)
    # sorted: the fit must not depend on the candidates' row order (k-means starts do); 10 starts: with
    # 3, a small near component (3% of the demo's pool) was found or missed by that order alone
    fit = np.sort(fit, axis=0)
    one, two = (GaussianMixture(n, random_state=0, n_init=_IN_DISTRIBUTION_STARTS).fit(fit) for n in (1, 2))
    near = int(np.argmin(two.means_.ravel()))
    if two.bic(fit) >= one.bic(fit) or two.weights_[near] >= 0.5:
        return None
    return max(1, round(float(two.predict_proba(x)[:, near].sum())))


def default_steps(frame: pd.DataFrame, k: int | None = None, fill: bool = False,
                  notes: list[str] | None = None) -> list[PolicyStep]:
    """The `default` step's expansion for this frame (see the module docstring): which steps run
    depends on what the candidates carry (clusters, hashes, the fused score, KD^3's labels, the
    Mahalanobis distances). Unless `fill`, k is a budget: where `in_distribution_count` finds fewer
    in-distribution candidates than k, the quotas share that many, and a line in `notes` says so."""
    if not len(frame):
        return []  # nothing to choose from: the caller says the selection is empty
    by = next((c for c in ("fused", "msp") if _has_values(frame, c)), None)
    if by is None:
        raise PolicyError("policy 'default' needs the scores of a scoring run (fused or msp), which the candidates "
                          "lack: run `webdistill score` first")
    label = "kd3_label" if _has_values(frame, "kd3_label") else "teacher_label"
    _require(frame, label, "default")
    k = k or max(1, round(DEFAULT_SHARE * len(frame)))
    found = None if fill else in_distribution_count(frame)
    if found is not None and found < k:
        if notes is not None:
            notes.append(f"default: took at most {found} of k={k}: a two-Gaussian mixture of the candidates' log "
                         f"Mahalanobis distances puts about {found} of {len(frame)} in the teacher's distribution; "
                         "k is a budget, not a quota, so the rest (look-alikes, other domains) is left out "
                         "(`default:fill=true` fills k)")
        k = found
    texts = []
    if _has_values(frame, "cluster_id") or _has_values(frame, "sha256"):
        texts.append(f"dedup:by={by}")
    if _has_values(frame, "cluster"):
        # a guard against one look-alike cluster filling a class, loose enough that a class whose
        # in-domain samples sit in one cluster still fills its quota from it
        groups = min(frame["cluster"].nunique(), frame[label].nunique())
        texts.append(f"diversity:max_per_cluster={math.ceil(_DIVERSITY_FAIR_SHARES * k / max(groups, 1))};by={by}")
    texts.append(f"balance:k={k};label={label};by={by}")
    return [_parse_step(text) for text in texts]


def step_text(step: PolicyStep) -> str:
    """The step as policy text that parses back to it, e.g. `balance:k=500;label=kd3_label;by=fused`."""
    def value(v: object) -> str:
        return str(v).lower() if isinstance(v, bool) else str(v)
    params = ";".join(f"{k}={value(v)}" for k, v in step.params.items() if v is not None)
    return step.kind + (":" + params if params else "")


def _one_of(keys: tuple[str, ...], exactly: bool) -> Callable[[dict], str | None]:
    def check(params: dict) -> str | None:
        given = [k for k in keys if params[k] is not None]
        if not given or (exactly and len(given) > 1):
            return ("give exactly one of " if exactly else "give at least one of ") + ", ".join(keys)
        return None
    return check


_BY = _param(_expression, required=True)
_OPTIONAL_BY = _param(_expression)
POLICIES: dict[str, _Policy] = {
    "topk": _Policy(_params("topk", k=_param(_positive_int, required=True), by=_BY), _topk),
    "threshold": _Policy(_params("threshold", by=_BY, min=_param(_float), max=_param(_float)), _threshold,
                         _one_of(("min", "max"), exactly=False)),
    "dedup": _Policy(_params("dedup", by=_OPTIONAL_BY), _dedup, note=lambda frame: _dedup_groups(frame)[1]),
    "balance": _Policy(_params("balance", k=_param(_positive_int), per_class=_param(_positive_int),
                               label=_param(_column_name, default="teacher_label"), by=_OPTIONAL_BY),
                       _balance, _one_of(("k", "per_class"), exactly=True)),
    "diversity": _Policy(_params("diversity", max_per_cluster=_param(_positive_int, required=True), by=_OPTIONAL_BY),
                         _diversity),
    "softmax": _Policy(_params("softmax", k=_param(_positive_int, required=True), by=_BY,
                               tau=_param(_positive_float, default=1.0), replace=_param(_bool, default=False)),
                       _softmax),
    "kd3": _Policy(_params("kd3", tau=_param(_fraction, default=DEFAULT_TAU), count=_param(_count_rule, default="all")),
                   _kd3),
    "default": _Policy(_params("default", k=_param(_positive_int), fill=_param(_bool, default=False)), None,
                       expand=lambda frame, params, notes: default_steps(frame, params["k"], params["fill"], notes)),
}



def synopsis() -> str:
    """Every step and its parameters, from the registry (for --help): required ones bare, optional
    ones with their default or in brackets, e.g. `topk:k;by`, `threshold:by;[min];[max]`."""
    def step(name: str, policy: _Policy) -> str:
        fields = policy.params.model_fields
        params = [k if f.is_required() else (f"[{k}]" if f.default is None else f"{k}={f.default}")
                  for k, f in fields.items()]
        return name + (":" + ";".join(params) if params else "")
    return ", ".join(step(name, policy) for name, policy in POLICIES.items())

# ---------------------------------------------------------------- applying

def _sorted_candidates(df: pd.DataFrame) -> pd.DataFrame:
    if "sample_id" not in df.columns:
        raise PolicyError("the candidates lack the column 'sample_id'")
    ids = df["sample_id"]
    repeated = ids[ids.duplicated()]
    if len(repeated):
        raise PolicyError(f"sample_id {repeated.iloc[0]!r} appears more than once: "
                          "the candidates need one row per sample")
    frame = df.sort_values("sample_id", kind="stable").reset_index(drop=True)
    weight = frame["weight"].astype("Float64").fillna(1.0) if "weight" in frame.columns else 1.0
    return frame.assign(weight=np.asarray(weight, dtype=np.float64))


def apply_policies(df: pd.DataFrame, steps: list[PolicyStep], seed: int = 0,
                   notes: list[str] | None = None, trace: list[str] | None = None) -> pd.DataFrame:
    """The rows the steps keep, in sample_id order, with a float `weight` column. A step that
    had to fall back on something (dedup without clusters) appends a line to `notes`; `trace`
    receives the text of every step that ran, `default` expanded into its steps."""
    return _run_steps(_sorted_candidates(df), steps, [seed], notes, trace)


def _run_steps(frame: pd.DataFrame, steps: list[PolicyStep], stream: list[int], notes: list[str] | None,
               trace: list[str] | None) -> pd.DataFrame:
    for index, step in enumerate(steps):
        policy = POLICIES.get(step.kind)
        if policy is None:
            raise PolicyError(f"unknown policy {step.kind!r} (known: {', '.join(sorted(POLICIES))})")
        if policy.expand is not None:  # its steps see the frame this step receives, each with its own stream
            frame = _run_steps(frame, policy.expand(frame, step.params, notes), [*stream, index], notes, trace)
            continue
        # one random stream per step: a step's draws do not shift when another step changes
        rng = np.random.default_rng([*stream, index])
        positions, factors = policy.apply(frame, step.params, rng)
        note = policy.note(frame) if notes is not None else None
        if note:
            notes.append(note)
        if trace is not None:
            trace.append(step_text(step))
        positions = np.asarray(positions, dtype=np.int64)
        weight = frame["weight"].to_numpy()[positions] * (1.0 if factors is None else factors)
        keep_order = np.argsort(positions, kind="stable")
        frame = frame.iloc[positions[keep_order]].assign(weight=weight[keep_order]).reset_index(drop=True)
    return frame
