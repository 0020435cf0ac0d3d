"""Curation quality: does a student distilled on the curated crawl beat one distilled on a random
slice, and come close to one distilled on the teacher's own kind of data (the oracle)?

    python bench/quality.py [--quick] [--out bench/results] [--data bench/.quality] [--seeds 3]

Two scenarios (bench/quality_scenarios.py): the demo (MNIST teacher) and a Fashion-MNIST teacher over
a crawl that is 12% in-domain, with shifted look-alikes and noise. Every arm goes through the product's
own stage runners (the functions the CLI and the flows call): ingest, embed (teacher features), index,
score, select, synthesize, distill (under torchrun). Per arm, budget k (a share of the pool) and seed:
the student's accuracy on the teacher's held-out test set, the selection's purity (share of in-domain
samples, from the ground truth) and class coverage (normalised entropy of the in-domain samples' true
classes: 1 = even). Every arm trains the same student for the same steps (samples_per_epoch = passes x k), so
every arm sees the same number of samples (epochs x passes x k); the full pool arm too.

Arms: oracle (in-domain samples only, from the ground truth), full pool, random-k, top-k by msp /
energy / mahalanobis / fused, the default policy (teacher alone; k a budget: it may take fewer), the
default made to fill k (`default:fill=true`, the default before k became a budget), default + CLIP prompts (demo),
related-first softmax, KD^3, two student-in-the-loop rounds, default with 10 / 100 reference images
(score --reference DIR), default plus synthetic samples, and the kd3 / sakd losses on the default
selection. Also: steps until the student reaches 95% of the oracle's accuracy, random vs default.
Prints progress, then JSON and markdown tables; writes quality.json and quality.md under --out.
Results of finished (scenario, arm, k, seed) are kept under --data and reused by a rerun.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import duckdb  # noqa: E402
import quality_scenarios  # noqa: E402

from curation.errors import WebdistillError  # noqa: E402
from curation.workspace import Workspace  # noqa: E402
from flows import stage_runner  # noqa: E402

TOPK_SCORES = ("msp", "energy", "mahalanobis", "fused")
ALL_ARMS = ("oracle", "full", "random", *[f"topk_{s}" for s in TOPK_SCORES], "default", "default_fill",
            "default_clip", "softmax", "kd3", "rounds2", "ref10", "ref100", "synthetic", "loss_kd3", "loss_sakd")
# Arms that run the product's default policy, and its version: results of an older default are not reused.
# 2: k is a budget, not a quota (the default stops at its in-distribution estimate); `default_fill` is version 1.
# 3: the estimate no longer depends on the candidates' row order (sorted, 10 starts).
DEFAULT_ARMS = ("default", "loss_kd3", "loss_sakd", "ref10", "ref100", "synthetic", "rounds2")
DEFAULT_POLICY_VERSION = 3
DEMO_PROMPTS = [f"handwritten digit {d}" for d in range(10)]


@dataclass
class Settings:
    sizes: dict[str, int]          # crawl size per scenario
    shards: int
    teacher_epochs: dict[str, int]
    ks: tuple[float, ...]
    plan: list[tuple[float, int, str]]  # (k, seed, arm), most telling first: a run cut short keeps those
    seeds: int
    epochs: int
    student: str
    big_student: str | None        # also run oracle / default with it
    scenarios: tuple[str, ...] = ("demo", "fashion")
    clip_steps: int = 100
    batch_size: int = 64
    passes: int = 4                # an epoch is this many passes over k samples: fewer evaluations per step
    extra: dict = field(default_factory=dict)  # more keyword arguments of a scenario's builder
    cached_only: bool = False      # report the arms finished before; run nothing new
    ingest_shards: int | None = None  # the pool: the crawl's first N shards (None: all)
    index: bool = True             # embed + index: near-duplicate clusters and the k-means caps of `default`


CORE = ("oracle", "random", "default", "default_fill")
FIRST = (*CORE, "topk_fused", "full")


def full_settings(args) -> Settings:
    """Every arm at every seed and both budgets, most telling
    first: the core arms, then one seed of the rest, then the remaining seeds, then the rest at 25%."""
    seeds = args.seeds or 3
    # big_*: the arm with the student as big as the teacher (is the oracle within 5 points of the teacher?)
    rest = ("ref100", "big_oracle", "kd3", "softmax", "big_default", "topk_msp", "topk_energy", "topk_mahalanobis",
            "ref10", "loss_kd3", "loss_sakd", "synthetic", "rounds2", "default_clip")
    plan = [(0.10, 0, a) for a in FIRST]
    plan += [(0.10, seed, a) for seed in range(1, seeds) for a in CORE]
    plan += [(0.25, 0, a) for a in CORE]
    plan += [(0.10, 0, a) for a in rest]
    plan += [(0.25, seed, a) for seed in range(1, seeds) for a in CORE]
    plan += [(0.10, seed, a) for seed in range(1, seeds) for a in (*FIRST[len(CORE):], *rest)]
    plan += [(0.25, seed, a) for seed in range(seeds) for a in (*FIRST[len(CORE):], *rest)]
    return Settings(sizes={"demo": 8000, "fashion": 8000}, shards=8, teacher_epochs={"demo": 8, "fashion": 6},
                    ks=(0.10, 0.25), plan=plan, seeds=seeds, epochs=args.epochs or 5,
                    student="tiny_cnn", big_student="small_cnn", ingest_shards=4, index=False)


def quick_settings(args) -> Settings:
    plan = [(0.25, 0, a) for a in ("oracle", "random", "topk_fused", "default")]
    return Settings(sizes={"demo": 600, "fashion": 600}, shards=2, teacher_epochs={"demo": 1, "fashion": 3},
                    ks=(0.25,), plan=plan, seeds=args.seeds or 1, epochs=args.epochs or 2,
                    student="tiny_cnn", big_student=None, scenarios=("fashion",), clip_steps=0,
                    extra={"fashion": {"teacher_train": 1000}}, index=False)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --- preparing a scenario: the product's stages up to scoring --------------------------------

def prepare(sc, ws: Workspace, s: Settings) -> None:
    """ingest, teacher embeddings, index (k-means clusters and near-duplicates), the teacher-alone scoring run."""
    shards = sorted(str(p) for p in sc.crawl.glob("*.tar"))[:s.ingest_shards]
    log(f"{sc.name}: ingest {len(shards)} shard(s)")
    stage_runner.run_ingest(ws, shards)
    if s.index:
        log(f"{sc.name}: embed (teacher features) and index")
        stage_runner.run_embed(ws, "teacher", teacher=str(sc.teacher), device="cpu", workers=1)
        stage_runner.run_index(ws, "teacher", {"kmeans_k": 32}, workers=1)
    score_run(sc, ws, "teacher", "agreement")


def score_run(sc, ws: Workspace, name: str, reference: str) -> dict:
    from curation.score import ScoreConfig

    log(f"{sc.name}: score run {name} (reference {Path(reference).name})")
    # ODIN off: a backward pass per batch, on two shared cores; the fused score leaves a null column out
    return stage_runner.run_score(ws, ScoreConfig(teacher=str(sc.teacher), name=name, odin=False,
                                                  reference=reference, workers=1))


def prepare_clip(sc, ws: Workspace, s: Settings) -> dict:
    """The demo's small CLIP, trained on the crawl's captions (flows.demo), and the prompt score."""
    from flows.demo.run import train_clip

    log(f"{sc.name}: demo CLIP and its prompt score")
    clip = train_clip(ws, sc.folder, s.clip_steps, 0, {"bench": "quality", "size": s.sizes[sc.name]}, {})
    stage_runner.run_embed(ws, clip["embedder"], pretrained=clip["path"], device="cpu", workers=1)
    stage_runner.run_knn_score(ws, "prompts", embedder=clip["embedder"], k=3, prompts=DEMO_PROMPTS)
    return clip


# --- ground truth ------------------------------------------------------------------------------

class Truth:
    """The crawl's ground truth joined to the ingested samples: in-domain ids and true classes."""

    def __init__(self, ws: Workspace, truth: Path, classes: list[str]):
        self.con = duckdb.connect()
        self.con.execute(f"""CREATE TABLE t AS SELECT s.sample_id, g.in_domain, g.label
            FROM read_parquet('{ws.root}/samples/*.parquet') s JOIN read_parquet('{truth}') g USING (shard, key)""")
        self.pool = self.con.execute("SELECT count(*) FROM t").fetchone()[0]
        rows = self.con.execute("SELECT sample_id FROM t WHERE in_domain ORDER BY 1").fetchall()
        self.in_domain = [r[0] for r in rows]
        self.classes = classes

    def selection_stats(self, ws: Workspace, selection: str) -> dict:
        """purity = in-domain share of the crawl samples chosen; coverage = normalised entropy of their
        true classes over the teacher's classes (synthetic members are not crawl samples: left out)."""
        members = ws.root / "selections" / selection / "members.parquet"
        rows = self.con.execute(f"""SELECT t.in_domain, t.label FROM read_parquet('{members}') m
                                    JOIN t USING (sample_id)""").fetchall()
        n = len(rows)
        inside = [label for ok, label in rows if ok]
        counts = [inside.count(c) for c in self.classes]
        total = sum(counts)
        entropy = -sum(c / total * math.log(c / total) for c in counts if c) if total else 0.0
        return {"size": n, "purity": len(inside) / n if n else float("nan"),
                "coverage": entropy / math.log(len(self.classes)), "classes_present": sum(1 for c in counts if c)}


# --- arms: each writes one selection (and maybe a run of its own), then distils ----------------

class Bench:
    def __init__(self, sc, ws: Workspace, s: Settings, truth: Truth):
        self.sc, self.ws, self.s, self.truth = sc, ws, s, truth
        self.runs: set[str] = {"teacher"}
        self.clip: dict | None = None

    def reference_run(self, name: str) -> bool:
        """The scoring run with n target images as the reference (score --reference DIR), made on first use."""
        if name not in self.runs:
            folder = self.sc.reference_dir(int(name.removeprefix("ref")))
            if not folder.is_dir():
                return False
            score_run(self.sc, self.ws, name, str(folder))
            self.runs.add(name)
        return True

    def has_clip(self) -> bool:
        if self.clip is None and self.sc.clip and self.s.clip_steps:
            self.clip = prepare_clip(self.sc, self.ws, self.s)
        return self.clip is not None

    def select(self, name: str, *, sql: str | None = None, policy: str | None = None, limit: int | None = None,
               seed: int = 0, score_run: str = "teacher", synthetic: tuple[str, ...] = ()) -> str:
        from curation.select import SelectConfig

        stage_runner.run_select(self.ws, SelectConfig(name=name, sql=sql, policy=policy, limit=limit, seed=seed,
                                                      score_run=score_run, synthetic=synthetic))
        return name

    def select_default(self, name: str, k: int, seed: int, score_run: str = "teacher",
                       synthetic: tuple[str, ...] = ()) -> str:
        """`select` without a policy: the default policy, sized by --limit."""
        return self.select(name, limit=k, seed=seed, score_run=score_run, synthetic=synthetic)

    def distill(self, name: str, selection: str, k: int, seed: int, *, epochs: int | None = None,
                loss: str = "kd", student: str | None = None, init_from: str | None = None) -> dict:
        loss_config = {"method": loss, **({"T": 4.0} if loss == "kd" else {})}
        options = {"student": student or self.s.student, "loss": loss_config,
                   "epochs": epochs or self.s.epochs, "samples_per_epoch": k * self.s.passes,
                   "batch_size": self.s.batch_size,
                   "lr": 0.05, "nproc": 1, "workers": 0, "seed": seed, "eval": str(self.sc.eval), "threads": 1,
                   "teacher_mode": "live" if loss in ("kd3", "sakd") else "stored", "teacher": str(self.sc.teacher),
                   "checkpoint_every": 10_000}
        summary = stage_runner.run_distill(str(self.ws.root), name, selection, options, init_from=init_from)
        curve = [(m["step"], m["eval_accuracy"]) for m in map(json.loads, open(self.ws.root / "students" / name /
                                                                               "metrics.jsonl"))
                 if "eval_accuracy" in m]
        return {"accuracy": summary["eval_accuracy"], "curve": curve, "checkpoint": summary.get("checkpoint")}

    def run_arm(self, arm: str, frac: float, seed: int, student: str | None = None) -> dict | None:
        k = max(1, round(frac * self.truth.pool))
        tag = (f"{arm}-{int(frac * 100)}-s{seed}" + (f"-{student}" if student else "")
               + (f"-v{DEFAULT_POLICY_VERSION}" if arm in DEFAULT_ARMS else ""))
        sel = f"q-{tag}"
        if arm == "oracle":
            ids = ", ".join(f"'{i}'" for i in self.truth.in_domain)
            self.select(sel, sql=f"SELECT sample_id FROM candidates WHERE sample_id IN ({ids}) "
                        f"ORDER BY hash(sample_id || '{seed}') LIMIT {k}")
        elif arm == "full":
            self.select(sel, sql="SELECT sample_id FROM candidates")
        elif arm == "random":
            self.select(sel, sql=f"SELECT sample_id FROM candidates ORDER BY hash(sample_id || '{seed}') LIMIT {k}")
        elif arm.startswith("topk_"):
            self.select(sel, policy=f"topk:k={k};by={arm.removeprefix('topk_')}")
        elif arm in ("default", "loss_kd3", "loss_sakd"):
            self.select_default(sel, k, seed)
        elif arm == "default_fill":  # the default before k became a budget: it fills k whatever the pool holds
            self.select(sel, policy=f"default:k={k};fill=true", seed=seed)
        elif arm in ("ref10", "ref100"):
            if not self.reference_run(arm):
                return None
            self.select_default(sel, k, seed, score_run=arm)
        elif arm == "default_clip":
            if not self.has_clip():
                return None
            self.select(sel, policy=f"dedup | topk:k={3 * k};by=knn_prompts | balance:k={k};by=fused", seed=seed)
        elif arm == "softmax":
            self.select(sel, policy=f"dedup | softmax:k={k};by=fused;tau=0.05", seed=seed)
        elif arm == "kd3":
            self.select(sel, policy=f"dedup | kd3 | balance:k={k};by=msp", seed=seed)
        elif arm == "synthetic":
            return self.synthetic_arm(sel, tag, k, seed)
        elif arm == "rounds2":
            return self.rounds_arm(sel, tag, k, seed)
        else:
            raise ValueError(f"unknown arm {arm}")
        loss = arm.removeprefix("loss_") if arm.startswith("loss_") else "kd"
        return self.distill(tag, sel, k, seed, loss=loss, student=student) | self.truth.selection_stats(self.ws, sel)

    def synthetic_arm(self, sel: str, tag: str, k: int, seed: int) -> dict:
        """The default selection with 10% of its budget given to synthetic images (webdistill synthesize)."""
        from curation.synthesize import SynthConfig

        per_class = max(1, k // 10 // len(self.sc.classes))
        name = f"syn{per_class}"  # one synthetic set per scenario and size, shared by the seeds
        stage_runner.run_synthesize(self.ws, SynthConfig(teacher=str(self.sc.teacher), name=name, score_run="teacher",
                                                         per_class=per_class, seed=0))
        self.select_default(sel, k - per_class * len(self.sc.classes), seed, synthetic=(name,))
        return self.distill(tag, sel, k, seed) | self.truth.selection_stats(self.ws, sel)

    def rounds_arm(self, sel: str, tag: str, k: int, seed: int) -> dict:
        """Two student-in-the-loop rounds in the same steps: the default selection for half the epochs,
        then re-score with that student and pick by KD^3's combined prediction for the other half."""
        from curation.score import ScoreConfig

        half = max(1, self.s.epochs // 2)
        first = self.distill(f"{tag}-r1", self.select_default(f"{sel}-r1", k, seed), k, seed, epochs=half)
        student_spec = str(self.ws.root / "students" / f"{tag}-r1" / "student.json")
        run = f"r2-s{seed}-{k}"
        stage_runner.run_score(self.ws, ScoreConfig(teacher=str(self.sc.teacher), student=student_spec, name=run,
                                                    odin=False, workers=1))
        self.select(sel, policy=f"dedup | kd3 | balance:k={k};label=kd3_label;by=fused", seed=seed, score_run=run)
        weights = str(self.ws.root / "students" / f"{tag}-r1" / "student.pt")
        second = self.distill(tag, sel, k, seed, epochs=self.s.epochs - half, init_from=weights)
        steps = first["curve"][-1][0] if first["curve"] else 0
        curve = first["curve"] + [(steps + st, a) for st, a in second["curve"]]
        return second | {"curve": curve} | self.truth.selection_stats(self.ws, sel)


# --- summarising -------------------------------------------------------------------------------

def _mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def steps_to(curve: list, target: float) -> int | None:
    return next((step for step, acc in curve if acc >= target), None)


def summarise(raw: dict, s: Settings) -> dict:
    """raw[arm][k][seed] -> per (arm, k): mean and std of accuracy, purity, coverage, ratio to the oracle."""
    table = {}
    for arm, by_k in raw.items():
        for k, by_seed in by_k.items():
            runs = [r for r in by_seed.values() if r]
            if not runs:
                continue
            acc_m, acc_s = _mean_std([r["accuracy"] for r in runs])
            table.setdefault(k, {})[arm] = {
                "accuracy": acc_m, "accuracy_std": acc_s, "accuracies": [r["accuracy"] for r in runs],
                "purity": statistics.fmean(r["purity"] for r in runs),
                "coverage": statistics.fmean(r["coverage"] for r in runs),
                "size": statistics.fmean(r["size"] for r in runs), "seeds": len(runs)}
    for arms in table.values():
        oracle = arms.get("oracle", {}).get("accuracy")
        for row in arms.values():
            row["ratio_to_oracle"] = row["accuracy"] / oracle if oracle else None
    return table


def steps_summary(raw: dict, table: dict) -> dict:
    """Steps until 95% of the oracle's mean final accuracy, per seed, random vs default (None: never)."""
    out = {}
    for k, arms in table.items():
        if "oracle" not in arms:
            continue
        target = 0.95 * arms["oracle"]["accuracy"]
        out[k] = {"target": target}
        for arm in ("random", "default"):
            if arm in raw and k in raw[arm]:
                out[k][arm] = [steps_to(r["curve"], target) for r in raw[arm][k].values() if r]
    return out


def targets(table: dict) -> dict:
    """The issue's targets at the smallest k: default >= 0.97 x oracle and >= random + 5 points."""
    if not table:  # a chunk of the larger student's arms alone: nothing at the main student to compare
        return {}
    k = min(table)
    arms = table[k]
    d, o, r = (arms.get(a, {}).get("accuracy") for a in ("default", "oracle", "random"))
    out = {"k": k}
    if None not in (d, o, r):
        out |= {"default_vs_oracle": d / o, "default_minus_random": d - r,
                "meets_097_oracle": d >= 0.97 * o, "meets_random_plus_5": d >= r + 0.05}
    if arms.get("ref100") and o:
        out["ref100_vs_oracle"] = arms["ref100"]["accuracy"] / o
    return out


def big_student_verdict(rows: dict, teacher_accuracy: float) -> str:
    """Does the larger student's oracle come within 5 points of the teacher (the table then measures
    curation, not the student's capacity)?"""
    if "oracle" not in rows:
        return ""
    gap = teacher_accuracy - rows["oracle"]["accuracy"]
    return (f"; its oracle is {100 * gap:.1f} points below the teacher "
            f"({'within' if gap <= 0.05 else 'NOT within'} 5)")


def markdown(result: dict) -> str:
    lines = []
    for name, sc in result["scenarios"].items():
        lines += [f"### {name}: teacher accuracy {sc['teacher_accuracy']:.3f}, pool {sc['pool']} samples, "
                  f"{sc['in_domain']} in-domain ({sc['in_domain'] / sc['pool']:.1%})", "",
                  f"Student {result['settings']['student']}, {result['settings']['epochs']} epochs of "
                  f"{result['settings']['passes']}k samples; accuracy on the teacher's held-out test set. Pool: "
                  + (f"the crawl's first {result['settings']['ingest_shards']} shards"
                     if result["settings"].get("ingest_shards") else "the whole crawl")
                  + ("" if result["settings"].get("index", True) else
                     "; no embed/index stage (dedup by sha256, no k-means caps)") + ".", "",
                  "| arm | k | accuracy (mean ± std) | seeds | ratio to oracle | purity | class coverage | size |",
                  "|---|---|---|---|---|---|---|---|"]
        if sc.get("load_1min"):
            load = sc["load_1min"]
            lines[-4] += (f" Machine load (1-minute load average as each arm finished): median {load['median']:.1f}, "
                          f"range {load['min']:.1f}-{load['max']:.1f}.")
        for k, arms in sorted(sc["table"].items(), key=lambda kv: float(kv[0])):
            for arm, row in arms.items():
                ratio = f"{row['ratio_to_oracle']:.3f}" if row.get("ratio_to_oracle") else "–"
                lines.append(f"| {arm} | {float(k):.0%} | {row['accuracy']:.4f} ± {row['accuracy_std']:.4f} "
                             f"| {row['seeds']} | {ratio} "
                             f"| {row['purity']:.3f} | {row['coverage']:.3f} | {row['size']:.0f} |")
        for k, st in sc["steps_to_95"].items():
            lines += ["", f"Steps to 95% of the oracle's accuracy ({st['target']:.4f}) at k={float(k):.0%}: "
                      + "; ".join(f"{arm} {st[arm]}" for arm in ("random", "default") if arm in st)
                      + " (per seed; None = never within the run)"]
        t = sc["targets"]
        if "default_vs_oracle" in t:
            lines += ["", f"Targets at k={float(t['k']):.0%}: default / oracle = {t['default_vs_oracle']:.3f} "
                      f"({'met' if t['meets_097_oracle'] else 'NOT met'}: ≥ 0.97); default − random = "
                      f"{100 * t['default_minus_random']:+.1f} points "
                      f"({'met' if t['meets_random_plus_5'] else 'NOT met'}: ≥ +5)"
                      + (f"; with 100 reference images / oracle = {t['ref100_vs_oracle']:.3f}"
                         if "ref100_vs_oracle" in t else "")]
        for big, by_k in sc.get("big_student", {}).items():
            for k, rows in sorted(by_k.items(), key=lambda kv: float(kv[0])):
                lines += ["", f"Student {big} at k={float(k):.0%}: "
                          + ", ".join(f"{arm} {r['accuracy']:.4f} ± {r['accuracy_std']:.4f} ({r['seeds']} seeds)"
                                      for arm, r in rows.items())
                          + big_student_verdict(rows, sc["teacher_accuracy"])]
        lines.append("")
    return "\n".join(lines)


# --- driver ------------------------------------------------------------------------------------

def build_scenario(name: str, data: Path, s: Settings):
    builder = getattr(quality_scenarios, name)
    return builder(data / name, s.sizes[name], s.shards, s.teacher_epochs[name], **s.extra.get(name, {}))


def run_scenario(name: str, data: Path, s: Settings) -> dict:
    log(f"{name}: building the scenario (crawl, teacher, test set, reference images)")
    sc = build_scenario(name, data, s)
    ws_name = (f"ws-{s.ingest_shards}shards" if s.ingest_shards else "ws") + ("" if s.index else "-noindex")
    ws = Workspace(data / name / ws_name)
    prepare(sc, ws, s)
    truth = Truth(ws, sc.truth, sc.classes)
    bench = Bench(sc, ws, s, truth)
    cache_path = ws.root / "arms.json"
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    params = {"epochs": s.epochs, "passes": s.passes, "student": s.student, "size": s.sizes[name],
              "batch_size": s.batch_size}

    def run(arm: str, frac: float, seed: int, student: str | None = None):
        key = json.dumps([arm, frac, seed, student, params]
                         + ([DEFAULT_POLICY_VERSION] if arm in DEFAULT_ARMS else []))
        if key not in cache and not s.cached_only:
            start = time.perf_counter()
            try:
                cache[key] = bench.run_arm(arm, frac, seed, student)
                if cache[key]:  # the machine's load while it ran: the cores are shared, timings vary with it
                    cache[key]["load_1min"] = os.getloadavg()[0]
            except WebdistillError as exc:  # one arm that cannot run (e.g. an empty selection) is reported
                log(f"{name}: {arm} k={frac:.0%} seed {seed}: failed: {exc}")
                cache[key] = {"error": str(exc)}
            cache_path.write_text(json.dumps(cache))
            r = cache[key]
            if r and "accuracy" in r:
                log(f"{name}: {arm:<13} k={frac:.0%} seed {seed}{' ' + student if student else ''}: accuracy "
                    f"{r['accuracy']:.4f}, purity {r['purity']:.3f}, coverage {r['coverage']:.3f}, size {r['size']} "
                    f"({time.perf_counter() - start:.0f}s)")
        r = cache.get(key)
        return r if r and "accuracy" in r else None

    raw: dict = {}
    big_raw: dict = {}
    for frac, seed, arm in s.plan:
        student = None
        if arm.startswith("big_"):
            if not s.big_student:
                continue
            arm, student = arm.removeprefix("big_"), s.big_student
        result = run(arm, frac, seed, student)
        if result is not None:
            (big_raw if student else raw).setdefault(arm, {}).setdefault(frac, {})[seed] = result
    loads = [r["load_1min"] for by_k in [*raw.values(), *big_raw.values()] for by_seed in by_k.values()
             for r in by_seed.values() if r and "load_1min" in r]
    table = summarise(raw, s)
    big = {s.big_student: {str(k): v for k, v in summarise(big_raw, s).items()}} if big_raw else {}
    return {"teacher_accuracy": sc.teacher_accuracy, "pool": truth.pool, "in_domain": len(truth.in_domain),
            "classes": sc.classes, "clip": bench.clip is not None,
            "table": {str(k): v for k, v in table.items()}, "steps_to_95": {str(k): v for k, v in
                                                                            steps_summary(raw, table).items()},
            "targets": targets(table), "big_student": big,
            "load_1min": {"min": min(loads), "median": statistics.median(loads), "max": max(loads)} if loads else None,
            "raw": {arm: {str(k): {str(sd): {kk: vv for kk, vv in r.items() if kk != "checkpoint"}
                                   for sd, r in by.items()} for k, by in v.items()} for arm, v in raw.items()}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, one seed, a few arms, one scenario (CI)")
    ap.add_argument("--out", default="bench/results", help="folder for quality.json and quality.md")
    ap.add_argument("--data", default="bench/.quality", help="scenarios, workspaces and cached arm results")
    ap.add_argument("--seeds", type=int, default=None)
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--scenarios", nargs="+", default=None, choices=["demo", "fashion"])
    ap.add_argument("--arms", nargs="+", default=None, choices=[*ALL_ARMS, "big_oracle", "big_default"],
                    help="run only these arms of the plan (a chunk: a rerun reuses the finished ones)")
    ap.add_argument("--ks", nargs="+", type=float, default=None, help="run only these budgets of the plan")
    ap.add_argument("--cached-only", action="store_true",
                    help="write the tables from the arms already finished under --data; train nothing new")
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    s = quick_settings(args) if args.quick else full_settings(args)
    if args.scenarios:
        s.scenarios = tuple(args.scenarios)
    s.cached_only = args.cached_only
    if args.arms or args.ks:
        s.plan = [(k, seed, arm) for k, seed, arm in s.plan
                  if (not args.arms or arm in args.arms) and (not args.ks or any(math.isclose(k, x) for x in args.ks))]
    data, out = Path(args.data).resolve(), Path(args.out)
    start = time.perf_counter()
    result = {"command": "python bench/quality.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "settings": {"ingest_shards": s.ingest_shards, "index": s.index, "student": s.student,
                           "big_student": s.big_student, "epochs": s.epochs, "passes": s.passes, "seeds": s.seeds,
                           "ks": list(s.ks), "sizes": s.sizes, "plan": s.plan},
              "scenarios": {}}
    for name in s.scenarios:
        result["scenarios"][name] = run_scenario(name, data, s)
    result["seconds"] = round(time.perf_counter() - start, 1)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.json").write_text(json.dumps(result, indent=2))
    md = markdown(result)
    (out / "quality.md").write_text(f"Command: `{result['command']}` ({result['seconds']:.0f}s)\n\n{md}")
    print(json.dumps({k: v for k, v in result.items() if k != "scenarios"}, indent=2))
    print()
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
