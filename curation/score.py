"""Score: run the teacher (and optionally a student) over every ingested sample and store
per-sample columns where higher = more in-distribution (`schemas.SCORE_COLUMNS` documents each).

    scores/<run>/pass1/<shard>.parquet    per-sample scores of one shard (its commit record)
    scores/<run>/features/<shard>.npy     the teacher's penultimate features, float16
    scores/<run>/layers/<i>/<shard>.npy   the pooled features of the i-th of --feature-layers (the
                                          penultimate one is read from features/), float16
    scores/<run>/head.npz                 W and b of the teacher's last Linear (ReAct's logits in pass 2)
    scores/<run>/<shard>.parquet          the final rows (view `scores`): pass 1 + the pool-wide scores
    scores/<run>/run.json                 the run's config and summary
    scores/<run>/owner.json               the config that owns the name (written once its models load)

Pass 1 works shard by shard and is skipped for shards already scored with the same inputs and
config; SCALE and ASH need one sample's features only, so they are pass 1's. Pass 2 needs the
whole pool: class Gaussians and the kNN reference come from the reference set (curation/reference.py:
the pool's samples several scores agree on, refined in rounds, or the user's target images),
KD^3's class-adaptive thresholds from every sample's combined prediction, ReAct's clip from the
pool's activations (an exact percentile from float16 histograms summed over shards: memory does
not grow with the pool), and the fused score from the pool's ranks (a few float columns of the pool
are held, never its features). Both passes write atomically, so a crash and a rerun lose and repeat
nothing.
"""
from __future__ import annotations

import json
import time
from collections.abc import Collection
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from pydantic import AfterValidator, BeforeValidator, Field, NonNegativeInt, PositiveInt

from distill.kd3_rules import class_thresholds, passes_threshold
from distill.spec import LoadedModel, ModelSpecError, load_model

from . import score_fns as sf
from .embedders import Geometry, SquareResize, spec_fingerprint
from .errors import WebdistillError, would_overwrite
from .feature_taps import PENULTIMATE, LayerNotFound, check_layer_names, feature_taps
from .reference import build_reference, check_reference, read_summary, reference_stamp
from .shard_reader import ShardJob, per_shard_outputs, shard_jobs
from .stage_config import Device, Real, stage_config
from .workspace import Workspace, atomic_path, config_hash, read_parquet_metadata, write_parquet_atomic

# the options' ranges (a float given as an int stays an int: see stage_config.Real)
Positive = Annotated[Real, Field(gt=0)]
NonNegative = Annotated[Real, Field(ge=0)]
Share = Annotated[Real, Field(ge=0, le=1)]
Percentile = Annotated[Real, Field(ge=0, le=100)]

SCORE_VERSION = 3  # 2: SCALE, ASH (pass 1), ReAct and the fused score (pass 2); 3: feature layers of any
# model file (TorchScript and .pt2 teachers get features, BN and activation-shaping scores), mahalanobis_layers

# The fused score's columns: those that need neither labels, nor a student, nor a reference the user
# brings (kNN to prompts or images). A column that is null over the whole pool (no BatchNorm layer,
# no reachable features, ODIN switched off) is left out of the fusion; see SCORE_COLUMNS["fused"].
FUSED_COLUMNS = ("msp", "energy", "gen", "scale", "ash", "react", "mahalanobis", "bn_score")
SHAPED = ("scale", "ash")  # pass-1 activation-shaping scores: null, not NaN, where they cannot be had

# Why the activation-shaping columns are null (the run records it in run.json's notes).
NO_FEATURES = ("scale, ash, react, mahalanobis, knn_teacher: null: the teacher has no Linear classifier, so no "
               "penultimate features (mahalanobis_layers still uses the layers --feature-layers names)")
NO_HEAD = ("scale, ash, react: null: the layer the features feed has no 2-D weight to recompute the logits "
           "from shaped features")
NOT_AFFINE = ("scale, ash, react: null: the teacher's logits are not W f + b of its penultimate features "
              "(something follows its last Linear)")


class ScoreError(WebdistillError):
    """A model spec that cannot be loaded, a bad run name, or nothing to score."""


@stage_config(ScoreError, "score config: ")
class ScoreConfig:
    teacher: str
    student: str | None = None
    name: str = "default"
    batch_size: PositiveInt = 256
    workers: NonNegativeInt = 1
    odin: bool = True  # ODIN costs a backward pass and a second forward pass per batch
    odin_temperature: Positive = 1000.0
    odin_epsilon: NonNegative = 0.0014
    energy_temperature: Positive = 1.0
    scale_percentile: Percentile = 85.0  # SCALE's p (Xu et al. 2024; OpenOOD v1.5's default)
    ash_percentile: Percentile = 90.0  # ASH-S's p (Djurisic et al. 2023; OpenOOD v1.5's default)
    react_percentile: Percentile = 90.0  # ReAct's clip: this percentile of the pool's activations (Sun et al. 2021)
    kd3_alpha: Share = 0.5  # teacher weight in the combined prediction (1.0 without a student)
    kd3_tau: Real = 0.95
    reference_confidence: Share = 0.99  # reference "confidence": samples this confident form the reference set
    reference_max: PositiveInt = 50_000  # at most this many reference samples
    # the reference set (curation/reference.py, docs/reference.md): agreement | confidence | a folder of images
    reference: Annotated[str, AfterValidator(check_reference)] = "agreement"
    reference_rounds: NonNegativeInt = 2  # agreement: refinement rounds (fit Gaussians, re-score, re-pick)
    reference_top: Annotated[Real, Field(gt=0, le=1)] = 0.01  # agreement: the set's size, a share of the pool
    reference_min_per_class: NonNegativeInt = 3  # agreement: a class with fewer members gets no Gaussian
    reference_max_images: PositiveInt = 10_000  # a reference folder with more images is refused
    knn_k: PositiveInt = 10
    # the layers of mahalanobis_layers (curation/feature_taps.py): None = the classifier's input and the last
    # two stages; NAME, NAME:input or penultimate, as a list or "a,b,c"
    feature_layers: Annotated[tuple[str, ...] | None, BeforeValidator(lambda v: v if v is None else
                                                                       check_layer_names(v))] = None
    device: Device = "cpu"
    trust_model_code: bool = False  # TorchScript / factories outside the allowlist may run (not part of any hash)

    def pass1_part(self) -> dict:
        keys = ("odin", "odin_temperature", "odin_epsilon", "energy_temperature", "kd3_alpha", "scale_percentile",
                "ash_percentile", "feature_layers")
        return {k: getattr(self, k) for k in keys} | {
            "teacher": spec_fingerprint(self.teacher),
            "student": spec_fingerprint(self.student) if self.student else None, "version": SCORE_VERSION}

    def pass2_part(self) -> dict:
        keys = ("kd3_tau", "reference_confidence", "reference_max", "knn_k", "react_percentile", "reference",
                "reference_rounds", "reference_top", "reference_min_per_class", "reference_max_images")
        return {k: getattr(self, k) for k in keys} | {"fused": FUSED_COLUMNS}


@dataclass
class ScoreSummary:
    name: str
    scored: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    samples: int = 0
    reference_samples: int = 0
    reference: dict | None = None  # kind, size, per_class, rounds (curation/reference.py)
    seconds: float = 0.0
    finalized: bool = False
    teacher: dict | None = None
    unscored: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # why some columns are null
    react_clip: float | None = None  # ReAct's clip c, taken from the pool


def _load(spec: str, role: str, device: str, trust_model_code: bool) -> LoadedModel:
    try:
        loaded = load_model(spec, trust_model_code)
    except ModelSpecError as exc:
        raise ScoreError(f"{role}: {exc}") from exc
    loaded.module.to(device).eval()
    for p in loaded.module.parameters():
        p.requires_grad_(False)  # ODIN needs the input's gradient only
    return loaded


def _normalise(x_uint8: torch.Tensor, mean, std, size: int | None = None) -> torch.Tensor:
    x = x_uint8.float().div_(255.0)
    if size is not None and x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    return (x - m) / s


class BatchScorer:
    """Pass-1 columns for one uint8 batch decoded at the teacher's geometry."""

    def __init__(self, config: ScoreConfig):
        self.config = config
        self.teacher = _load(config.teacher, "teacher", config.device, config.trust_model_code)
        self.student = (_load(config.student, "student", config.device, config.trust_model_code)
                        if config.student else None)
        self.device = torch.device(config.device)
        self.preprocess = Geometry(self.teacher.input_size, SquareResize(self.teacher.input_size))
        self.taps = feature_taps(self.teacher.module, self.teacher.input_size)
        try:
            self.layers = self.taps.resolve(config.feature_layers)  # the layers of mahalanobis_layers
        except LayerNotFound as exc:
            raise ScoreError(f"feature layers: {exc}") from None
        self.bn = self.taps.bn_layers()
        self.has_bn = bool(self.bn)
        head = self.taps.linear_head()
        self.head = None if head is None else tuple(t.to(self.device).float() for t in head)
        self.feature_note: str | None = None  # why SCALE / ASH are null, once a batch showed it

    def _head_note(self, logits: torch.Tensor, feats: torch.Tensor | None) -> str | None:
        if feats is None:
            return NO_FEATURES
        if self.head is None:
            return NO_HEAD
        weight, bias = self.head
        if feats.dim() != 2 or feats.shape[1] != weight.shape[1]:
            return NOT_AFFINE
        recomputed = feats.float() @ weight.T + bias
        if not torch.allclose(recomputed, logits, rtol=1e-3, atol=1e-3 * (1 + float(logits.abs().max()))):
            return NOT_AFFINE
        return None

    def _shaped(self, logits: torch.Tensor, feats: torch.Tensor | None) -> dict[str, np.ndarray]:
        """SCALE and ASH-S: the energy of the logits of the shaped penultimate features."""
        note = self._head_note(logits, feats)
        if note is not None:
            self.feature_note = note
            return {name: np.full(len(logits), np.nan, np.float32) for name in SHAPED}
        f, (weight, bias) = feats.float(), self.head
        return {"scale": sf.head_energy(sf.scale_features(f, self.config.scale_percentile), weight, bias),
                "ash": sf.head_energy(sf.ash_s_features(f, self.config.ash_percentile), weight, bias)}

    def __call__(self, x_uint8: torch.Tensor) -> dict[str, np.ndarray]:
        cfg, t = self.config, self.teacher
        x = _normalise(x_uint8, t.mean, t.std).to(self.device)
        penultimate = [PENULTIMATE] if self.taps.classifier is not None else []
        with torch.no_grad():
            logits, pooled = self.taps(x, list(dict.fromkeys(penultimate + self.layers + list(self.bn))),
                                       channels_first=self.bn)
        logits, feats = logits.float(), pooled.get(PENULTIMATE)
        bn_score = sf.bn_score(pooled, self.bn)
        out = {
            "teacher_logits": logits.half().cpu().numpy(),
            "teacher_label": logits.argmax(-1).int().cpu().numpy(),
            "teacher_conf": sf.msp(logits).cpu().numpy(),
            "msp": sf.msp(logits).cpu().numpy(),
            "max_logit": sf.max_logit(logits).cpu().numpy(),
            "energy": sf.energy(logits, cfg.energy_temperature).cpu().numpy(),
            "neg_entropy": sf.neg_entropy(logits).cpu().numpy(),
            "gen": sf.gen(logits).cpu().numpy(),
            "bn_score": (bn_score.cpu().numpy() if bn_score is not None else np.full(len(x), np.nan)),
            "features": (feats.float().half().cpu().numpy() if feats is not None
                         else np.zeros((len(x), 0), np.float16)),
        }
        out |= {layer_key(i): pooled[n].float().half().cpu().numpy() for i, n in enumerate(self.layers)
                if n != PENULTIMATE}
        out |= {k: torch.as_tensor(v).cpu().numpy() for k, v in self._shaped(logits, feats).items()}
        out["odin"] = (sf.odin(t.module, x, t.std, cfg.odin_temperature, cfg.odin_epsilon).cpu().numpy()
                       if cfg.odin else np.full(len(x), np.nan))
        student_logits = None
        if self.student is not None:
            s = self.student
            xs = _normalise(x_uint8, s.mean, s.std, s.input_size).to(self.device)
            with torch.no_grad():
                student_logits = s.module(xs).float()
            if student_logits.shape[-1] != logits.shape[-1]:
                raise ScoreError(f"the student has {student_logits.shape[-1]} classes, the teacher {logits.shape[-1]}")
            out |= {
                "student_label": student_logits.argmax(-1).int().cpu().numpy(),
                "student_conf": sf.msp(student_logits).cpu().numpy(),
                "agreement": (student_logits.argmax(-1) == logits.argmax(-1)).float().cpu().numpy(),
                "neg_kl": (-sf.kl_div(logits, student_logits)).cpu().numpy(),
                "neg_js": (-sf.js_div(logits, student_logits)).cpu().numpy(),
            }
        alpha = cfg.kd3_alpha if student_logits is not None else 1.0
        label, conf = sf.combined_prediction(logits, student_logits, alpha)
        out |= {"kd3_label": label.int().cpu().numpy(), "kd3_conf": conf.cpu().numpy()}
        return {k: (v.astype(np.float32) if v.dtype == np.float64 else v) for k, v in out.items()}


def layer_key(i: int) -> str:
    return f"layer_{i}"


def layer_sources(layers: list[str]) -> list[tuple[str, str]]:
    """(folder under the run, key of BatchScorer's output) of each feature layer: the penultimate
    features are stored once, in features/."""
    return [("features", "features") if n == PENULTIMATE else (f"layers/{i}", layer_key(i))
            for i, n in enumerate(layers)]


def _run_dir(ws: Workspace, name: str) -> Path:
    return ws.owned("scores", name, what="scoring run name")


def _pass1_table(job: ShardJob, out: dict[str, np.ndarray], ok: np.ndarray) -> pa.Table:
    cols: dict[str, pa.Array] = {"sample_id": pa.array(job.sample_ids), "shard": pa.array([job.shard] * len(ok)),
                                 "row": pa.array(np.arange(len(ok), dtype=np.int32)), "decoded": pa.array(ok)}
    for k, v in out.items():
        if k in ("features", "teacher_logits") or k.startswith("layer_"):
            continue
        arr = v.astype(np.float32) if v.dtype.kind == "f" else v
        mask = ~ok | np.isnan(arr) if k in SHAPED else ~ok
        cols[k] = pa.array(arr, mask=mask)
    logits = out["teacher_logits"]
    cols["teacher_logits"] = pa.FixedSizeListArray.from_arrays(pa.array(logits.ravel()), logits.shape[1])
    return pa.table(cols)


def teacher_info(scorer: BatchScorer) -> dict:
    """What the curated shards' manifest tells the distillation job about the teacher."""
    loaded, size = scorer.teacher, scorer.teacher.input_size
    num_classes = scorer(torch.zeros(1, 3, size, size, dtype=torch.uint8))["teacher_logits"].shape[1]
    spec = str(Path(loaded.spec).resolve()) if Path(loaded.spec).is_file() else loaded.spec  # usable from anywhere
    return {"spec": spec, "input_size": loaded.input_size, "mean": list(loaded.mean), "std": list(loaded.std),
            "num_classes": num_classes, "classes": loaded.classes or [str(c) for c in range(num_classes)]}


def score_pass1(ws: Workspace, config: ScoreConfig, progress: bool = True,
                only: Collection[str] | None = None) -> ScoreSummary:
    """Per-shard scores of every ingested shard (or those named in `only`) not yet scored."""
    run = _run_dir(ws, config.name)
    summary = ScoreSummary(config.name)
    stamp_extra = {"config_hash": config_hash(config.pass1_part())}
    todo = []
    for job in shard_jobs(ws, stamp_extra, only):
        if read_parquet_metadata(run / "pass1" / f"{job.shard}.parquet").get("stamp") == job.stamp:
            summary.skipped.append(job.shard)
        else:
            todo.append(job)
    if not todo:
        return summary
    scorer = BatchScorer(config)
    record_owner(ws, config)
    summary.teacher = teacher_info(scorer)
    scorer.feature_note = None  # what the probe batch showed, the first real batch shows again
    _write_head(run, scorer.head)
    start = time.perf_counter()
    outputs = per_shard_outputs(todo, scorer.preprocess, scorer, config.batch_size, config.workers, progress,
                                desc=f"score {config.name}")
    for j, out, ok in outputs:
        job = todo[j]
        for folder, key in [("features", "features"), *layer_sources(scorer.layers)]:
            with atomic_path(run / folder / f"{job.shard}.npy") as tmp:
                with open(tmp, "wb") as fh:
                    np.save(fh, out[key])
        # the pass-1 parquet is the shard's commit record: written last
        write_parquet_atomic(_pass1_table(job, out, ok), run / "pass1" / f"{job.shard}.parquet",
                             {"stamp": job.stamp, "config": asdict(config), "feature_note": scorer.feature_note,
                              "feature_layers": scorer.layers})
        summary.scored.append(job.shard)
        summary.samples += len(ok)
    summary.seconds = time.perf_counter() - start
    return summary


def _write_head(run: Path, head: tuple[torch.Tensor, torch.Tensor] | None) -> None:
    """The teacher's last Linear, for ReAct in pass 2 (which loads no model). Every pass-1 process
    of a run writes the same bytes; a teacher without one leaves no stale file behind."""
    path = run / "head.npz"
    if head is None:
        path.unlink(missing_ok=True)
        return
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, weight=head[0].cpu().numpy(), bias=head[1].cpu().numpy())


def _read_head(run: Path) -> tuple[torch.Tensor, torch.Tensor] | None:
    try:
        with np.load(run / "head.npz") as z:
            return torch.from_numpy(z["weight"]).float(), torch.from_numpy(z["bias"]).float()
    except FileNotFoundError:
        return None


def _pass1_files(run: Path, shards: list[str]) -> list[Path]:
    return [run / "pass1" / f"{s}.parquet" for s in shards]


def score_pass2(ws: Workspace, config: ScoreConfig, summary: ScoreSummary) -> None:
    """Pool-wide scores: Mahalanobis, relative Mahalanobis, multi-layer Mahalanobis (each feature layer's
    class Gaussians from the same members) and kNN against the reference set
    (curation/reference.py), ReAct with its clip taken from the pool, the fused rank score, and KD^3's
    class-adaptive threshold flag. Rewritten only when pass 1 changed."""
    run = _run_dir(ws, config.name)
    # a shard whose pass 1 failed is left out (and reported by `finish`); the rest go on
    shards = [job.shard for job in shard_jobs(ws) if (run / "pass1" / f"{job.shard}.parquet").exists()]
    files = _pass1_files(run, shards)
    metas = [read_parquet_metadata(f) for f in files]
    summary.notes = sorted({m["feature_note"] for m in metas if m.get("feature_note")})
    stamp = config_hash({"pass1": [m.get("stamp") for m in metas], **config.pass2_part(), **reference_stamp(config)})
    if all(read_parquet_metadata(run / f"{s}.parquet").get("stamp") == stamp for s in shards):
        summary.reference = read_summary(run)
        summary.reference_samples = (summary.reference or {}).get("size", 0)
        return
    pass1_fused = [c for c in FUSED_COLUMNS if c in pq.read_schema(files[0]).names]
    light_columns = ["teacher_label", "teacher_conf", "kd3_label", "kd3_conf", "decoded", *pass1_fused]
    light = [pq.read_table(f, columns=light_columns) for f in files]
    n_classes = pq.read_schema(files[0]).field("teacher_logits").type.list_size
    all_light = pa.concat_tables(light)
    decoded = all_light["decoded"].to_numpy(zero_copy_only=False)
    kd3_label = all_light["kd3_label"].to_numpy(zero_copy_only=False)
    kd3_conf = all_light["kd3_conf"].to_numpy(zero_copy_only=False)
    thresholds = class_thresholds(kd3_label[decoded], kd3_conf[decoded], n_classes, config.kd3_tau)

    # every shard's pass 1 ran with the same config, so with the same layers
    sources = layer_sources(metas[0].get("feature_layers") or []) if metas else []
    ref, ref_notes = build_reference(run, shards, config, n_classes,
                                     lambda: BatchScorer(replace(config, student=None, odin=False)), sources)
    ref_feats, ref_labels = ref.features, ref.labels
    summary.reference, summary.reference_samples = ref.summary, len(ref_labels)
    summary.notes += ref_notes
    gauss = ref.gaussians(n_classes)
    layer_gauss = [ref.gaussians(n_classes, f) for f in ref.layers]
    knn = None
    if len(ref_labels) > 0 and ref_feats.shape[1] > 0:
        knn = faiss.IndexFlatIP(ref_feats.shape[1])
        knn.add(_unit(ref_feats))
    k = min(config.knn_k, len(ref_labels))
    head = _read_head(run)
    shaped = [head is not None and not m.get("feature_note") for m in metas]  # shards ReAct can score
    clip = _react_clip(run, shards, light, shaped, config.react_percentile)
    summary.react_clip = None if np.isnan(clip) else clip
    # first the pool-wide columns of every shard (small: a few floats per sample), then the fusion
    extras: list[dict[str, np.ndarray]] = []
    for shard, t, can_shape in zip(shards, light, shaped):
        feats = np.load(run / "features" / f"{shard}.npy").astype(np.float32)
        n = t.num_rows
        maha = rel = knn_sim = react = np.full(n, np.nan, np.float32)
        if gauss is not None and feats.shape[1] > 0:
            maha, rel = (a.astype(np.float32) for a in sf.mahalanobis_scores(feats, *gauss))
        maha_layers = _mahalanobis_layers(run, shard, sources, layer_gauss, n)
        if knn is not None and k > 0:
            sims, _ = knn.search(_unit(feats), k)
            knn_sim = sims[:, -1].astype(np.float32)  # similarity to the k-th nearest reference sample
        if can_shape and not np.isnan(clip):
            react = sf.head_energy(sf.react_features(torch.from_numpy(feats), clip), *head).numpy()
        ok = t["decoded"].to_numpy(zero_copy_only=False)
        extras.append({name: np.where(ok, v, np.nan).astype(np.float32) for name, v in
                       {"mahalanobis": maha, "rel_mahalanobis": rel, "mahalanobis_layers": maha_layers,
                        "knn_teacher": knn_sim, "react": react}.items()})
    fused = _fused(light, extras, pass1_fused)
    offset = 0
    for shard, f, t, extra in zip(shards, files, light, extras):
        table = pq.read_table(f)
        ok = t["decoded"].to_numpy(zero_copy_only=False)
        n = table.num_rows
        extra["fused"], offset = fused[offset:offset + n], offset + n
        labels = t["kd3_label"].to_numpy(zero_copy_only=False)
        passes = passes_threshold(np.nan_to_num(labels).astype(np.int64), t["kd3_conf"].to_numpy(zero_copy_only=False),
                                  thresholds) & ok
        for name, values in extra.items():
            table = table.append_column(name, pa.array(values, mask=~ok | ~np.isfinite(values)))
        per_sample = thresholds[np.nan_to_num(labels).astype(np.int64)].astype(np.float32)
        table = table.append_column("kd3_threshold", pa.array(per_sample, mask=~ok))
        table = table.append_column("kd3_pass", pa.array(passes))
        table = table.add_column(0, "run", pa.array([config.name] * n))
        write_parquet_atomic(table, run / f"{shard}.parquet", {"stamp": stamp})
    # a shard that vanished from the pool must not keep stale rows in the view
    for stale in set(p.stem for p in run.glob("*.parquet")) - set(shards):
        (run / f"{stale}.parquet").unlink()
    summary.finalized = True


def _mahalanobis_layers(run: Path, shard: str, sources: list[tuple[str, str]], gaussians: list, n: int) -> np.ndarray:
    """The mean over the feature layers of minus each layer's Mahalanobis distance divided by its
    dimension d (the distance of an in-distribution sample is about d: the division puts a 16-channel
    stage and a 2048-d embedding on one scale). NaN where no layer has class Gaussians."""
    per_layer = []
    for (folder, _), gauss in zip(sources, gaussians):
        if gauss is None:
            continue
        feats = np.load(run / folder / f"{shard}.npy").astype(np.float32)
        per_layer.append(sf.mahalanobis_scores(feats, *gauss)[0] / feats.shape[1])
    return np.mean(per_layer, 0).astype(np.float32) if per_layer else np.full(n, np.nan, np.float32)


def _react_clip(run: Path, shards: list[str], light: list[pa.Table], shaped: list[bool], percentile: float) -> float:
    """ReAct's clip c: the percentile of every activation of the pool's decoded samples (of the
    shards whose features the teacher's head maps to its logits); NaN when there are none. Exact on
    the stored float16 features, from one 65,536-bin histogram summed over shards."""
    counts = np.zeros(1 << 16, np.int64)
    for shard, t, can_shape in zip(shards, light, shaped):
        if can_shape:
            ok = t["decoded"].to_numpy(zero_copy_only=False)
            counts += sf.float16_histogram(np.load(run / "features" / f"{shard}.npy")[ok])
    return sf.histogram_percentile(counts, percentile)


def _fused(light: list[pa.Table], extras: list[dict[str, np.ndarray]], pass1_columns: list[str]) -> np.ndarray:
    """The fused score over the pool: rank fusion of FUSED_COLUMNS (those not null everywhere)."""
    pool = {c: np.concatenate([t[c].to_numpy(zero_copy_only=False).astype(np.float64) for t in light])
            for c in pass1_columns}
    pool |= {c: np.concatenate([e[c] for e in extras]).astype(np.float64) for c in FUSED_COLUMNS if c in extras[0]}
    columns = [pool[c] for c in FUSED_COLUMNS if c in pool and np.isfinite(pool[c]).any()]
    n = sum(t.num_rows for t in light)
    return (sf.rank_fusion([np.where(np.isfinite(c), c, np.nan) for c in columns]).astype(np.float32) if columns
            else np.full(n, np.nan, np.float32))


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def score(ws: Workspace, config: ScoreConfig, progress: bool = True, overwrite: bool = False) -> ScoreSummary:
    """Score every ingested sample (pass 1 per shard, then pass 2 over the pool). A run of that name
    made with another teacher or settings is refused (WouldOverwrite) unless `overwrite`."""
    started = datetime.now(UTC)
    claim_run(ws, config, overwrite)
    summary = score_pass1(ws, config, progress)
    return finish(ws, config, summary, started)


def finish(ws: Workspace, config: ScoreConfig, summary: ScoreSummary, started: datetime) -> ScoreSummary:
    """Pass 2 and the run's record, once every shard's pass 1 is done."""
    if not shard_jobs(ws):
        raise ScoreError("nothing to score: no ingested samples in this workspace (run `webdistill ingest` first)")
    summary.unscored = [j.shard for j in shard_jobs(ws)
                        if not (_run_dir(ws, config.name) / "pass1" / f"{j.shard}.parquet").exists()]
    if len(summary.unscored) == len(shard_jobs(ws)):
        raise ScoreError("no shard could be scored")
    record_owner(ws, config)  # also when pass 1 had nothing left to do (a pass-2 change, models moved)
    score_pass2(ws, config, summary)
    run = _run_dir(ws, config.name)
    previous, identity = read_run(ws, config.name), run_identity(config)
    if not summary.scored and not summary.finalized and (previous.get("identity") == identity or previous.get(
            "config") == _as_stored(config)):
        return summary  # nothing changed: keep the run's record (and its finished_at) as it is
    if summary.teacher is None:  # every shard was already scored: keep what the last run recorded
        summary.teacher = read_run(ws, config.name).get("teacher") or _describe_teacher(config)
    with atomic_path(run / "run.json") as tmp:
        tmp.write_text(json.dumps({"name": config.name, "config": asdict(config), "identity": identity,
                                   "teacher": summary.teacher,
                                   "started_at": started.isoformat(),
                                   "finished_at": datetime.now(UTC).isoformat(),
                                   "summary": asdict(summary)}, indent=2, default=str))
    return summary


_HOW_IT_RUNS = ("trust_model_code", "device", "batch_size", "workers")  # the same run on another machine


def _settings(config: dict) -> dict:
    """A stored or new config's fields that make the run (models aside: run_identity hashes their files)."""
    return {k: v for k, v in config.items() if k not in ("teacher", "student", *_HOW_IT_RUNS)
            and not (k == "feature_layers" and v is None)}  # the default: runs from before the option


def _run_owner(run: Path) -> dict:
    """The identity and config of whoever holds the run name: the last run started under it (owner.json),
    else a finished run from before owner.json ({} for a new name)."""
    for record in (run / "owner.json", run / "run.json"):
        try:
            stored = json.loads(record.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        return {"identity": stored.get("identity"), "config": stored.get("config") or {}}
    return {}


def _same_run(owner: dict, identity: str, config: dict) -> bool:
    """Whether the name's holder is this run (a run.json without an identity: the same config, paths too)."""
    if owner["identity"] is not None:
        return owner["identity"] == identity
    old = owner["config"]
    return _settings(old) == _settings(config) and (old.get("teacher"), old.get("student")) == (
        config["teacher"], config["student"])


def claim_run(ws: Workspace, config: ScoreConfig, overwrite: bool = False) -> None:
    """Check the run name for this config before any work: a name another teacher or settings hold is
    refused (WouldOverwrite) unless `overwrite` (selections read it by name). The same config (a rerun,
    one after a crash, or the same models moved) keeps the name and resumes. Nothing is written here:
    pass 1 records the owner once its models have loaded (record_owner)."""
    run, identity = _run_dir(ws, config.name), run_identity(config)
    new = _as_stored(config)
    owner = _run_owner(run)
    if owner and not overwrite and _holds_scores(run) and not _same_run(owner, identity, new):
        old = owner["config"]
        changed = [f"{k} {old.get(k)!r} -> {v!r}" for k, v in new.items()
                   if k not in _HOW_IT_RUNS and old.get(k) != v] or ["the teacher's or student's files"]
        raise would_overwrite(f"scoring run {config.name!r} exists, made with another teacher or settings "
                              f"({', '.join(changed)}); selections read its scores by name")


def record_owner(ws: Workspace, config: ScoreConfig) -> None:
    """The config that now holds the run name (scores/<run>/owner.json), written once the run's models
    have loaded: a run refused for its model files leaves no trace."""
    with atomic_path(_run_dir(ws, config.name) / "owner.json") as tmp:
        tmp.write_text(json.dumps({"identity": run_identity(config), "config": _as_stored(config)}, indent=2))


def _as_stored(config: ScoreConfig) -> dict:
    """The config as run.json and owner.json read back (paths as strings): what stored ones compare to."""
    return json.loads(json.dumps(asdict(config), default=str))


def _holds_scores(run: Path) -> bool:
    """Whether a run under this name scored anything: a run that failed before its first shard (a bad
    teacher file, an empty pool) holds the name for no one."""
    return (run / "run.json").is_file() or any((run / "pass1").glob("*.parquet"))


def run_identity(config: ScoreConfig) -> str:
    """What makes a scoring run the same run: its settings and its models by content, not by path
    (a workspace moved with its teacher keeps its runs, and the selections made from them)."""
    models = {"teacher": spec_fingerprint(config.teacher),
              "student": spec_fingerprint(config.student) if config.student else None}
    return config_hash(_settings(asdict(config)) | models)


def _describe_teacher(config: ScoreConfig) -> dict:
    return teacher_info(BatchScorer(replace(config, student=None)))


def read_run(ws: Workspace, name: str) -> dict:
    """A finished scoring run's run.json ({} if there is none)."""
    try:
        return json.loads((_run_dir(ws, name) / "run.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}
