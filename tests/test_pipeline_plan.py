"""`webdistill validate` / `run --dry-run` on configs the audit found gaps in: optional sections
absent (the plan still prints), a student, eval shard or ground truth that cannot work (one line
naming the key, before any work), and a round's selection and student that `run` would replace
(the plan says so, by the same comparison the runner makes)."""
from __future__ import annotations

import copy
import hashlib
import json

import pytest
import yaml

from curation.errors import WouldOverwrite
from curation.select import DEFAULT_POLICY, SelectConfig, definition
from curation.workspace import Workspace
from flows import stage_runner
from flows.pipeline_check import validate_pipeline
from flows.pipeline_config import PipelineConfigError
from flows.pipeline_plan import plan_text

from .conftest import run_cli

OPTIONAL = ("crawl", "embed", "index", "knn_scores", "select", "synthesize", "distill", "report")


@pytest.fixture
def full(tmp_path):
    """A config with every section, over files that are there (nothing is loaded to check it)."""
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "a.tar").write_bytes(b"")
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "0.tar").write_bytes(b"")
    (tmp_path / "truth.parquet").write_bytes(b"")
    (tmp_path / "teacher.json").write_text(json.dumps({"factory": "distill.models:mnist_teacher"}))
    raw = {"name": "plan", "workspace": "ws", "rounds": 1,
           "crawl": {"url_list": "urls.parquet", "out": "shards"},
           "ingest": {"shards": "shards"},
           "embed": {"embedder": "teacher", "teacher": "teacher.json"},
           "index": {"dup_threshold": 0.9}, "knn_scores": [{"name": "digits", "sql": "SELECT 1"}],
           "score": {"teacher": "teacher.json"},
           "synthesize": {"per_class": 2},
           "select": {"policy": "topk:k=20;by=msp", "limit": 10},
           "distill": {"student": "tiny_cnn", "epochs": 1, "eval": "eval/0.tar"},
           "report": {"truth": "truth.parquet"}}
    return tmp_path, raw


def write(root, raw, name="p.yaml"):
    path = root / name
    path.write_text(yaml.safe_dump(raw))
    return path


def plan_of(root, raw, trust=False):
    path = write(root, raw)
    return plan_text(validate_pipeline(path, trust_model_code=trust), str(path))


# --- G1: every optional section may be absent -------------------------------------------------

@pytest.mark.parametrize("absent", [(s,) for s in OPTIONAL] + [OPTIONAL])
def test_the_plan_prints_without_any_optional_section(full, absent):
    root, raw = full
    for section in absent:
        raw.pop(section)
    text = plan_of(root, raw)
    assert "the config is valid" in text and "select plan-round1 (" in text
    for section in ("crawl", "distill", "report"):
        assert (f"  {section}" in text or f"{section} plan-round1" in text) == (section not in absent), text


@pytest.mark.parametrize("empty", ["select", "embed", "report", "synthesize", "index"])
def test_the_plan_prints_with_an_empty_optional_section(full, empty):
    root, raw = full
    raw[empty] = None
    assert "the config is valid" in plan_of(root, raw)


def test_validate_without_select_prints_the_plan_with_the_default_policy(full):
    root, raw = full
    del raw["select"]
    done = run_cli("validate", str(write(root, raw)))
    assert done.returncode == 0, done.stderr
    assert f"select plan-round1 ({DEFAULT_POLICY})" in done.stdout, done.stdout  # the policy run would use
    assert "internal error" not in done.stdout + done.stderr


# --- G2: student, eval shards and ground truth checked before any work ------------------------

BAD = [
    ("distill.student", "torchvision:resnet99", "unknown torchvision architecture"),
    ("distill.student", "tiny_cnm", "unknown student"),
    ("distill.student", "torchvision:", "unknown student"),
    ("distill.student", "mymodule:build", "trust_model_code"),
    ("distill.eval", "eval/missing.tar", "shard not found"),
    ("distill.eval", ["eval/0.tar", "eval/missing.tar"], "missing.tar"),
    ("distill.eval", "eval/{0..1}.tar", "1.tar"),
    ("distill.eval", "file://ROOT/eval/missing.tar", "shard not found"),
    ("report.truth", "nothere.parquet", "file not found"),
]


def set_key(root, raw, key, value):
    section, name = key.split(".")
    raw[section][name] = value.replace("ROOT", str(root)) if isinstance(value, str) else value


@pytest.mark.parametrize("key, value, why", BAD)
def test_a_student_or_input_that_cannot_work_is_one_line_naming_the_key(full, key, value, why):
    root, raw = full
    set_key(root, raw, key, value)
    with pytest.raises(PipelineConfigError) as err:
        validate_pipeline(write(root, raw))
    line, (section, name) = str(err.value), key.split(".")
    named = key in line or f"{section}: config key '{name}'" in line  # the stage config's own wording
    assert "\n" not in line and named and why in line, line


@pytest.mark.parametrize("key, value, trust", [
    ("distill.student", "tiny_cnn", False), ("distill.student", "small_cnn", False),
    ("distill.student", "torchvision:resnet18", False), ("distill.student", "distill.models:tiny_student", False),
    ("distill.student", "mymodule:build", True),  # trusted code is named, never imported to check it
    ("distill.eval", "https://example.com/eval-{0..3}.tar", False), ("distill.eval", "s3://bucket/eval.tar", False),
    ("distill.eval", ["eval/0.tar", "pipe:cat eval/0.tar"], False), ("distill.eval", "eval/{0..0}.tar", False),
    ("report.truth", "s3://bucket/truth.parquet", False), ("report.truth", "truth.parquet", False)])
def test_a_student_or_input_that_can_work_passes(full, key, value, trust):
    root, raw = full
    set_key(root, raw, key, value)
    assert validate_pipeline(write(root, raw), trust_model_code=trust)


@pytest.mark.parametrize("key, value, verb", [
    ("distill.student", "torchvision:resnet99", ["validate"]), ("distill.eval", "eval/missing.tar", ["validate"]),
    ("report.truth", "nothere.parquet", ["validate"]), ("distill.student", "torchvision:resnet99", ["run"]),
    ("report.truth", "nothere.parquet", ["run", "--dry-run"])])
def test_validate_and_run_refuse_them_before_any_work(full, key, value, verb):
    root, raw = full
    set_key(root, raw, key, value)
    done = run_cli(*verb, str(write(root, raw)))
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.count("\n") == 1 and key in done.stderr, done.stderr
    assert not (root / "ws").exists()


# --- G7: the plan says what `run` replaces ----------------------------------------------------

NAME = "plan-round1"


def past_run(root, raw, trust=False):
    """The workspace as `run` left it for `raw`: each round's selection and its trained student, each
    round after the first started from the previous round's student.pt."""
    path = write(root, raw, "before.yaml")
    cfg = validate_pipeline(path, trust_model_code=trust)
    ws, init_from = Workspace(cfg.workspace), None
    for r in range(1, cfg.rounds + 1):
        name = f"plan-round{r}"
        options = cfg.select_options(name)
        chosen = SelectConfig(name=name, **{k: tuple(v) if k == "synthetic" else v for k, v in options.items()})
        (ws.root / "selections" / name).mkdir(parents=True)
        manifest = ws.root / "selections" / name / "manifest.json"
        manifest.write_text(json.dumps({"name": name, "total": r, "definition": definition(chosen)}))
        job, out, _ = stage_runner.distill_job(ws, name, name, cfg.distill_options(), init_from)
        out.mkdir(parents=True)
        (out / "job.json").write_text(json.dumps(job))
        (out / "selection.sha256").write_text(hashlib.sha256(manifest.read_bytes()).hexdigest())
        (out / "summary.json").write_text(json.dumps({"eval_accuracy": 0.5, "state_dict": str(out / "student.pt")}))
        init_from = str(out / "student.pt")
    return ws, ws.root / "students" / NAME


def line(text, start):
    return next(row for row in text.splitlines() if row.split("  ")[-1].strip().startswith(start))


DISTILL_EDITS = {
    "epochs": lambda r: r["distill"].update(epochs=2),
    "loss": lambda r: r["distill"].update(loss={"method": "kd", "T": 2.0}),
    "student": lambda r: r["distill"].update(student="small_cnn"),
    "eval dropped": lambda r: r["distill"].pop("eval"),
}
SELECT_EDITS = {
    "policy": lambda r: r["select"].update(policy="topk:k=5;by=msp"),
    "limit": lambda r: r["select"].update(limit=11),
    "seed": lambda r: r["select"].update(seed=3),
    "no synthesize": lambda r: r.pop("synthesize"),
    "no select section": lambda r: r.pop("select"),
}


def test_an_unchanged_round_is_kept(full):
    root, raw = full
    past_run(root, raw)
    text = plan_of(root, raw)
    assert "present, definition unchanged" in line(text, "select")
    assert "trained before, unchanged (eval accuracy 0.5)" in line(text, "distill")
    assert "replaced" not in text


@pytest.mark.parametrize("edit", DISTILL_EDITS)
def test_a_changed_distill_section_replaces_the_student(full, edit):
    root, raw = full
    past_run(root, raw)
    changed = copy.deepcopy(raw)
    DISTILL_EDITS[edit](changed)
    text = plan_of(root, changed)
    assert "will be replaced (its config changed)" in line(text, "distill")
    assert "definition unchanged" in line(text, "select")


@pytest.mark.parametrize("edit", SELECT_EDITS)
def test_a_changed_select_section_replaces_the_selection_and_its_student(full, edit):
    root, raw = full
    past_run(root, raw)
    changed = copy.deepcopy(raw)
    SELECT_EDITS[edit](changed)
    text = plan_of(root, changed)
    assert "will be replaced (its definition changed)" in line(text, "select")
    assert "will be replaced (its selection changed)" in line(text, "distill")


def test_trust_given_on_the_command_line_changes_the_job(full):
    root, raw = full
    past_run(root, raw)
    assert "will be replaced (its config changed)" in line(plan_of(root, raw, trust=True), "distill")


@pytest.mark.parametrize("edit", [*DISTILL_EDITS, "manifest"])
def test_the_runner_refuses_what_the_plan_says_it_replaces(full, edit):
    """run_distill refuses (without overwrite), before launching anything, the runs the plan says it replaces."""
    root, raw = full
    ws, out = past_run(root, raw)
    changed = copy.deepcopy(raw)
    if edit == "manifest":  # the selection re-made with other contents
        manifest = ws.root / "selections" / NAME / "manifest.json"
        manifest.write_text(json.dumps(json.loads(manifest.read_text()) | {"total": 2}))
        changed = raw
    else:
        DISTILL_EDITS[edit](changed)
    assert "will be replaced" in line(plan_of(root, changed), "distill")
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(WouldOverwrite):
        stage_runner.run_distill(str(ws.root), NAME, NAME, validate_pipeline(root / "p.yaml").distill_options())
    assert sorted(p.name for p in out.iterdir()) == before  # nothing started, nothing removed


def test_a_later_round_follows_the_round_before(full):
    root, raw = full
    raw["rounds"] = 2
    past_run(root, raw)
    kept = plan_of(root, raw).splitlines()
    assert sum("trained before, unchanged" in row for row in kept) == 2, kept  # round 2 starts from round 1's
    changed = copy.deepcopy(raw)
    DISTILL_EDITS["epochs"](changed)
    rows = [row for row in plan_of(root, changed).splitlines() if "distill plan-round" in row]
    assert "will be replaced (its config changed)" in rows[0] and "will be replaced" in rows[1], rows
    manifest = root / "ws" / "selections" / NAME / "manifest.json"  # round 1 re-selected: other contents
    manifest.write_text(json.dumps(json.loads(manifest.read_text()) | {"total": 7}))
    rows = [row for row in plan_of(root, raw).splitlines() if "distill plan-round" in row]
    assert "will be replaced (its selection changed)" in rows[0], rows
    assert "will likely be replaced (round 1's student is replaced)" in rows[1], rows
