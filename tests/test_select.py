"""Score and select end to end on the small demo crawl: the scores land in DuckDB, the policies
hold their promises, and the curated shards read back with plain webdataset."""
import hashlib
import io
import json
import re
from collections import Counter

import numpy as np
import pytest
import torch
import webdataset as wds

from curation import catalog
from curation.embed import embed
from curation.embedders import make_embedder
from curation.errors import WouldOverwrite
from curation.index import IndexConfig, build_index, kmeans_clusters, near_duplicates
from curation.ingest import ingest
from curation.policies import apply_policies, parse_policy
from curation.schemas import SCORE_COLUMNS
from curation.score import BatchScorer, ScoreConfig, score
from curation.select import SelectConfig, select
from curation.workspace import Workspace
from distill.spec import load_model

from .conftest import run_cli

TEACHER = "tests.models_for_tests:thumbnail"  # the tests' own module: trusted
STUDENT = "distill.models:tiny_student"


@pytest.fixture(scope="module")
def scored(small_crawl, tmp_path_factory):
    ws = Workspace(tmp_path_factory.mktemp("ws"))
    ingest(ws, [str(small_crawl / "crawl")], workers=1, progress=False)
    embedder = make_embedder("teacher", teacher=TEACHER, trust_model_code=True)
    embed(ws, embedder, batch_size=128, workers=0, progress=False)
    config = IndexConfig(dup_threshold=0.97, kmeans_k=6)
    build_index(ws, "teacher", config)
    near_duplicates(ws, "teacher", config)
    kmeans_clusters(ws, "teacher", config)
    summary = score(ws, ScoreConfig(teacher=TEACHER, student=STUDENT, name="r1", batch_size=128, workers=0,
                                    trust_model_code=True, reference_confidence=0.2), progress=False)
    catalog.refresh(ws)
    return ws, summary


def test_scores_cover_every_sample_and_are_documented(scored):
    ws, summary = scored
    n = catalog.query(ws, "SELECT count(*) AS n FROM samples").column("n")[0].as_py()
    assert summary.samples == n and summary.finalized
    rows = catalog.query(ws, "SELECT count(*) AS n, count(DISTINCT sample_id) AS d, count(msp) AS msp, "
                             "count(mahalanobis) AS maha, count(agreement) AS agree FROM scores").to_pylist()[0]
    assert rows == {"n": n, "d": n, "msp": n, "maha": n, "agree": n}
    documented = set(catalog.query(ws, "SELECT name FROM score_columns").column("name").to_pylist())
    stored = set(catalog.query(ws, "SELECT * FROM scores LIMIT 0").column_names) - {"run", "sample_id", "shard", "row"}
    assert stored <= documented and documented == set(SCORE_COLUMNS)
    # the candidates view joins samples, clusters and the latest scores, one row per sample
    cand = catalog.query(ws, "SELECT count(*) AS n, count(cluster_id) AS dup, count(cluster) AS km, "
                             "count(teacher_label) AS lab FROM candidates").to_pylist()[0]
    assert cand == {"n": n, "dup": n, "km": n, "lab": n}


def test_score_rerun_skips_every_shard(scored):
    ws, _ = scored
    again = score(ws, ScoreConfig(teacher=TEACHER, student=STUDENT, name="r1", batch_size=128, workers=0,
                                  trust_model_code=True, reference_confidence=0.2), progress=False)
    assert again.scored == [] and len(again.skipped) == 3 and not again.finalized


def test_kd3_flag_matches_the_class_adaptive_formula(scored):
    ws, _ = scored
    t = catalog.query(ws, "SELECT kd3_label, kd3_conf, kd3_threshold, kd3_pass FROM scores WHERE decoded").to_pandas()
    counts = np.bincount(t.kd3_label, minlength=10).astype(float)  # every combined prediction (the official rule)
    s = counts / counts.max() if counts.max() else np.ones(10)
    expected = 0.95 * s / (2 - s) if counts.max() else np.full(10, 0.95)
    assert np.allclose(t.kd3_threshold, expected[t.kd3_label], atol=1e-6)
    assert (t.kd3_pass == (t.kd3_conf > t.kd3_threshold)).all()


def _read_selection(path):
    manifest = json.loads((path / "manifest.json").read_text())
    urls = [str(path / s["path"]) for s in manifest["shards"]]
    samples = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))
    return manifest, samples


def test_curated_shards_read_back_with_plain_webdataset(scored):
    ws, _ = scored
    result = select(ws, SelectConfig(name="bal", policy="dedup | balance:k=40;by=msp", shard_size=15))
    manifest, samples = _read_selection(result.path)
    assert manifest["total"] == len(samples) == 40 == sum(s["count"] for s in manifest["shards"])
    assert len(manifest["shards"]) == 3  # 15 + 15 + 10
    for shard in manifest["shards"]:
        assert hashlib.sha256((result.path / shard["path"]).read_bytes()).hexdigest() == shard["sha256"]

    truth = {r["sample_id"]: r for r in catalog.query(ws, "SELECT sample_id, sha256, cluster_id, teacher_label "
                                                            "FROM candidates").to_pylist()}
    teacher = load_model(TEACHER, trust_model_code=True)
    scorer = BatchScorer(ScoreConfig(teacher=TEACHER, odin=False, trust_model_code=True))
    from PIL import Image
    for s in samples:
        meta = json.loads(s["json"])
        ext = next(k for k in ("jpg", "png", "webp") if k in s)
        assert hashlib.sha256(s[ext]).hexdigest() == truth[s["__key__"]]["sha256"] == meta["sha256"]
        assert int(s["cls"]) == meta["teacher_label"] == truth[s["__key__"]]["teacher_label"]
        stored = np.load(io.BytesIO(s["logits.npy"]))
        x = scorer.preprocess(Image.open(io.BytesIO(s[ext]))).unsqueeze(0).float().div(255)
        x = (x - torch.tensor(teacher.mean).view(1, 3, 1, 1)) / torch.tensor(teacher.std).view(1, 3, 1, 1)
        with torch.no_grad():
            fresh = teacher.module(x)[0].numpy()
        assert stored.dtype == np.float16 and np.allclose(stored, fresh, atol=2e-3, rtol=2e-3)
    # one sample per near-duplicate cluster (the policies' own tests cover balance in detail)
    clusters = [truth[s["__key__"]]["cluster_id"] for s in samples]
    assert len(set(clusters)) == len(clusters)
    per_class = sorted(Counter(int(s["cls"]) for s in samples).items())
    assert manifest["counts_per_class"] == {str(k): v for k, v in per_class}


def test_selection_is_idempotent_and_recorded(scored):
    ws, _ = scored
    first = select(ws, SelectConfig(name="top", sql="SELECT sample_id FROM candidates WHERE msp >= 0",
                                    policy="topk:k=25;by=energy"))
    again = select(ws, SelectConfig(name="top", sql="SELECT sample_id FROM candidates WHERE msp >= 0",
                                    policy="topk:k=25;by=energy"))
    assert again.unchanged and again.manifest["selection_hash"] == first.manifest["selection_hash"]
    top = catalog.query(ws, "SELECT sample_id FROM candidates ORDER BY energy DESC, sample_id LIMIT 25")
    _, samples = _read_selection(first.path)
    assert {s["__key__"] for s in samples} == set(top.column("sample_id").to_pylist())
    changed = select(ws, SelectConfig(name="top", policy="topk:k=10;by=msp"), overwrite=True)
    assert changed.size == 10 and not changed.unchanged
    assert len(_read_selection(changed.path)[1]) == 10
    row = catalog.query(ws, "SELECT name, size, policy FROM selections WHERE name = 'top'").to_pylist()
    assert row == [{"name": "top", "size": 10, "policy": "topk:k=10;by=msp"}]


@pytest.mark.parametrize("change", [
    {"policy": "topk:k=12;by=msp"}, {"sql": "SELECT sample_id FROM candidates WHERE energy > -1e9"},
    {"limit": 5}, {"seed": 3},
])
def test_another_definition_under_a_taken_name_is_refused_and_replaced_only_with_overwrite(scored, change):
    """A selection students may have trained on is never replaced silently by another definition."""
    ws, _ = scored
    base = {"name": "kept", "policy": "topk:k=20;by=energy", "sql": None, "limit": None, "seed": 0}
    select(ws, SelectConfig(**base), overwrite=True)
    manifest = (ws.root / "selections" / "kept" / "manifest.json").read_bytes()
    with pytest.raises(WouldOverwrite, match="another definition.*--overwrite"):
        select(ws, SelectConfig(**base | change))
    assert (ws.root / "selections" / "kept" / "manifest.json").read_bytes() == manifest
    assert select(ws, SelectConfig(**base)).unchanged  # the same definition is the same selection
    replaced = select(ws, SelectConfig(**base | change), overwrite=True)
    wanted = base | change
    assert replaced.manifest["definition"] == {"query": wanted["sql"], "policy": wanted["policy"],
                                               "limit": wanted["limit"], "seed": wanted["seed"], "synthetic": []}


def test_select_refusal_on_the_command_line_is_one_line(scored):
    ws, _ = scored
    first = run_cli("select", "-w", str(ws.root), "--name", "cli-kept", "--policy", "topk:k=8;by=msp")
    assert first.returncode == 0, first.stderr
    again = run_cli("select", "-w", str(ws.root), "--name", "cli-kept", "--policy", "topk:k=9;by=msp")
    assert again.returncode == 2 and again.stderr.count("\n") == 1 and "--overwrite" in again.stderr
    forced = run_cli("select", "-w", str(ws.root), "--name", "cli-kept", "--policy", "topk:k=9;by=msp", "--overwrite")
    assert forced.returncode == 0 and "9 samples" in forced.stdout


def test_a_student_run_of_another_job_is_refused_before_any_work(scored):
    """distill under a taken run name with another config refuses, and deletes nothing of the old run."""
    from flows.stage_runner import run_distill

    ws, _ = scored
    select(ws, SelectConfig(name="for-students", policy="topk:k=16;by=msp"), overwrite=True)
    old = ws.root / "students" / "taken"
    old.mkdir(parents=True)
    (old / "job.json").write_text(json.dumps({"selection": "elsewhere", "epochs": 99}))
    (old / "student.pt").write_bytes(b"weights")
    with pytest.raises(WouldOverwrite, match="'taken'.*--overwrite"):
        run_distill(str(ws.root), "taken", "for-students", {"student": "tiny_cnn", "loss": {"method": "kd"}})
    assert (old / "student.pt").read_bytes() == b"weights"
    done = run_cli("distill", "-w", str(ws.root), "--selection", "for-students", "--student", "tiny_cnn",
                   "--name", "taken")
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "--overwrite" in done.stderr


@pytest.mark.parametrize("student, name", [
    ("tiny_cnn", "sel-tiny_cnn-kd"), ("torchvision:resnet18", "sel-torchvision-resnet18-kd"),
    ("torchvision:resnet18@/w/r18.pt", "sel-torchvision-resnet18-kd"), ("/specs/my student.json", "sel-my-student-kd"),
])
def test_the_default_student_run_name_holds_the_student(student, name):
    from flows.cli import default_student_name

    assert default_student_name("sel", student, "kd") == name


@pytest.mark.parametrize("args, message", [
    (["--sql", "SELECT 1 AS a"], "must return a sample_id column"),
    (["--sql", "SELECT sample_id FROM candidates WHERE msp > 2"], "empty selection"),
    (["--policy", "topk:k=3;by=no_such_column"], 'Referenced column "no_such_column" not found'),
    (["--policy", "nonsense:k=3"], "unknown policy"),
    (["--sql", "DELETE FROM selections"], "read-only SQL"),
])
def test_bad_selections_give_one_line_and_write_nothing(scored, args, message):
    ws, _ = scored
    proc = run_cli("select", "-w", str(ws.root), "--name", "bad", *args)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (ws.root / "selections" / "bad").exists()


def test_bad_teacher_spec_is_one_line(scored):
    ws, _ = scored
    proc = run_cli("score", "-w", str(ws.root), "--teacher", "no_such_module:factory", "--trust-model-code")
    assert proc.returncode == 2 and "cannot import" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------- parameters

def _no_selection_written(ws, name):
    selections = ws.root / "selections"
    return not (selections / name).exists() and not list(selections.glob(f".tmp-{name}-*"))


@pytest.mark.parametrize("args, message", [
    (["--policy", "topk:k=5;by=msp", "--limit", "-1"], "limit must be an integer >= 1, got -1"),
    (["--policy", "topk:k=5;by=msp", "--limit", "0"], "limit must be an integer >= 1, got 0"),
    (["--policy", "topk:k=5;by=msp", "--shard-size", "0"], "shard-size must be an integer >= 1, got 0"),
    (["--policy", "topk:k=5;by=msp", "--shard-size", "-3"], "shard-size must be an integer >= 1, got -3"),
    (["--policy", "topk:k=5;by=msp", "--seed", "-1"], "seed must be an integer >= 0, got -1"),
    (["--policy", "topk:k=-1;by=msp"], "must be a positive integer"),
    (["--policy", "softmax:k=5;by=msp;tau=0"], "must be a finite number > 0"),
    (["--policy", "softmax:k=5;by=msp;tau=nan"], "must be a number"),
    (["--policy", "softmax:k=5;by=msp;tau=inf"], "must be a finite number > 0"),
    (["--policy", "balance:per_class=0"], "must be a positive integer"),
    (["--policy", "diversity:max_per_cluster=-2"], "must be a positive integer"),
    (["--policy", "threshold:by=msp;min=nan"], "must be a number"),
    (["--policy", "kd3:tau=0"], "must be in (0, 1]"),
    (["--sql", "SELECT sample_id, 'NaN'::DOUBLE AS weight FROM candidates"], "not a finite number > 0"),
    (["--sql", "SELECT sample_id, -1e308::DOUBLE AS weight FROM candidates"], "not a finite number > 0"),
    (["--sql", "SELECT sample_id, 'inf'::DOUBLE AS weight FROM candidates"], "not a finite number > 0"),
    (["--sql", "SELECT sample_id, -1.0 AS weight FROM candidates", "--policy", "dedup"], "not a finite number > 0"),
    (["--sql", "SELECT sample_id, 1e308 AS weight FROM candidates"], "add up to more than a float holds"),
])
def test_bad_select_parameters_give_one_line_and_write_nothing(scored, capsys, args, message):
    from flows.cli import main

    ws, _ = scored
    assert main(["select", "-w", str(ws.root), "--name", "badparam", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert _no_selection_written(ws, "badparam")


def test_null_weights_count_as_one_and_the_manifest_is_strict_json(scored):
    ws, _ = scored
    result = select(ws, SelectConfig(name="nullw", sql="SELECT sample_id, NULL::DOUBLE AS weight FROM candidates",
                                     limit=7))

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    manifest = json.loads((result.path / "manifest.json").read_text(), parse_constant=refuse)
    assert manifest["total"] == 7 and manifest["weight_sum"] == 7.0
    for sample in _read_selection(result.path)[1]:
        assert json.loads(sample["json"], parse_constant=refuse)["weight"] == 1.0


# ---------------------------------------------------------------- the swap

def _selection_is_whole(folder) -> str | None:
    """None when `folder` holds a complete selection (manifest, every shard with its sha256), else why not."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        return f"no readable manifest: {exc}"
    for shard in manifest["shards"]:
        path = folder / shard["path"]
        if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != shard["sha256"]:
            return f"{shard['path']} missing or changed"
    return None if sum(s["count"] for s in manifest["shards"]) == manifest["total"] else "counts disagree"


KILLER = r"""
import json, os, random, signal, sys, time
from curation.errors import WouldOverwrite
from curation.select import SelectConfig, select
from curation.workspace import Workspace
from tests.test_select import _selection_is_whole

ws, rounds = Workspace(sys.argv[1]), int(sys.argv[2])
configs = [SelectConfig(name="killed", policy=f"topk:k={k};by=msp", shard_size=3) for k in (30, 21)]

def run(config):
    pid = os.fork()
    if pid == 0:
        select(ws, config, overwrite=True)
        os._exit(0)
    return pid

start = time.perf_counter()
os.waitpid(run(configs[0]), 0)  # a first selection, uninterrupted: what every kill must leave intact
took = time.perf_counter() - start
rng, report = random.Random(0), []
for i in range(rounds):
    pid = run(configs[(i + 1) % 2])
    time.sleep(rng.uniform(0.2, 1.1) * took)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    temps = sorted(p.name for p in (ws.root / "selections").glob(".*-killed-*"))
    report.append({"whole": _selection_is_whole(ws.root / "selections" / "killed"), "temps": temps})
print(json.dumps(report))
"""


def test_select_killed_at_random_times_leaves_a_whole_selection_and_the_next_run_cleans_up(scored):
    import subprocess
    import sys

    from .conftest import ROOT

    ws, _ = scored
    proc = subprocess.run([sys.executable, "-c", KILLER, str(ws.root), "8"], capture_output=True, text=True,
                          cwd=ROOT, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [r["whole"] for r in report] == [None] * len(report), report  # old or new, never none, never a mix
    result = select(ws, SelectConfig(name="killed", policy="topk:k=12;by=msp", shard_size=3), overwrite=True)
    assert result.size == 12 and _selection_is_whole(result.path) is None
    assert sorted(p.name for p in (ws.root / "selections").glob(".*-killed-*")) == []


def _version(folder, n: int) -> None:
    """A tiny whole 'selection': a tar and a manifest that names its sha256."""
    data = f"version {n}".encode() * 100
    (folder / "sel-000000.tar").write_bytes(data)
    (folder / "manifest.json").write_text(json.dumps(
        {"total": 1, "version": n, "shards": [{"path": "sel-000000.tar", "count": 1,
                                               "sha256": hashlib.sha256(data).hexdigest()}]}))


READER = r"""
import hashlib, json, os, sys
final, stop = sys.argv[1], sys.argv[2]
seen = {"looks": 0, "missing": 0, "mixed": 0, "deleted_while_read": 0}

def read(name, fd):
    f = os.open(name, os.O_RDONLY, dir_fd=fd)
    with os.fdopen(f, "rb") as fh:
        return fh.read()

print("ready", flush=True)
while not os.path.exists(stop):
    seen["looks"] += 1
    try:
        fd = os.open(final, os.O_RDONLY | os.O_DIRECTORY)  # one folder, read as it was when opened
    except FileNotFoundError:
        seen["missing"] += 1
        continue
    try:
        manifest = json.loads(read("manifest.json", fd))
        shard = manifest["shards"][0]
        seen["mixed"] += hashlib.sha256(read(shard["path"], fd)).hexdigest() != shard["sha256"]
    except FileNotFoundError:  # the replaced version was removed after we opened it: not a mix
        seen["deleted_while_read"] += 1
    finally:
        os.close(fd)
print(json.dumps(seen))
"""


def test_a_reader_never_finds_the_selection_missing_or_mixed_while_it_is_replaced(tmp_path):
    import subprocess
    import sys
    import time

    from curation.shard_writer import staging, swap_into_place

    from .conftest import ROOT

    final, stop = tmp_path / "selections" / "sel", tmp_path / "stop"
    with staging(final) as tmp:
        _version(tmp, 0)
        swap_into_place(tmp, final)
    reader = subprocess.Popen([sys.executable, "-c", READER, str(final), str(stop)], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    try:
        assert reader.stdout.readline().strip() == "ready"
        deadline, n = time.monotonic() + 3, 0
        while time.monotonic() < deadline:  # replace it over and over while the reader looks
            n += 1
            with staging(final) as tmp:
                _version(tmp, n)
                swap_into_place(tmp, final)
    finally:
        stop.touch()
        out, _ = reader.communicate(timeout=60)
    seen = json.loads(out)
    # two renames (the old swap) left it missing at times
    assert seen["looks"] > 100 and seen["missing"] == seen["mixed"] == 0, seen
    assert json.loads((final / "manifest.json").read_text())["version"] == n
    assert sorted(p.name for p in final.parent.iterdir()) == [".lock-sel", "sel"]


def test_without_the_atomic_exchange_a_crash_between_the_renames_is_undone(tmp_path, monkeypatch):
    from curation import shard_writer
    from curation.shard_writer import staging, swap_into_place

    monkeypatch.setattr(shard_writer, "_EXCHANGE", None)  # a system or filesystem without renameat2
    final = tmp_path / "selections" / "sel"
    for n in (1, 2):
        with staging(final) as tmp:
            _version(tmp, n)
            swap_into_place(tmp, final)
    assert json.loads((final / "manifest.json").read_text())["version"] == 2
    assert sorted(p.name for p in final.parent.iterdir()) == [".lock-sel", "sel"]
    # the state a kill between `final -> .old-*` and `.tmp-* -> final` leaves: no selection at `final`
    final.rename(final.parent / ".old-sel-0123abcd")
    (final.parent / ".tmp-sel-89abcdef").mkdir()
    _version(final.parent / ".tmp-sel-89abcdef", 3)
    with staging(final) as tmp:  # the next run puts the old one back first, and cleans up
        assert json.loads((final / "manifest.json").read_text())["version"] == 2
        assert sorted(p.name for p in final.parent.iterdir()) == [".lock-sel", tmp.name, "sel"]
    assert _selection_is_whole(final) is None


def test_stale_temporaries_of_dead_writers_go_and_a_live_writers_stay(tmp_path):
    from curation.shard_writer import name_lock, staging

    parent, outside = tmp_path / "selections", tmp_path / "outside"
    outside.mkdir()
    (outside / "marker").write_text("keep")
    for name in ("a", "b", "busy"):
        (parent / name).mkdir(parents=True)
        _version(parent / name, 0)
    for stale in (".tmp-a-12345678", ".old-b-deadbeef", ".tmp-a-b-0badc0de", ".tmp-busy-00000000"):
        (parent / stale).mkdir()
        (parent / stale / "half.tar").write_bytes(b"half")
    (parent / ".tmp-evil-87654321").symlink_to(outside, target_is_directory=True)  # planted
    with name_lock(parent, "busy"):  # another writer of `busy` is alive: its temporary is not stale
        with staging(parent / "new") as tmp:
            left = sorted(p.name for p in parent.iterdir() if p.name.startswith((".tmp", ".old")))
            assert left == [".tmp-busy-00000000", tmp.name]
    assert (outside / "marker").read_text() == "keep"
    assert all(_selection_is_whole(parent / name) is None for name in ("a", "b", "busy"))


def test_a_second_writer_of_a_name_waits_for_the_first(tmp_path):
    import threading

    from curation.shard_writer import staging

    final, order, inside = tmp_path / "selections" / "sel", [], threading.Event()

    def second():
        with staging(final):
            order.append("second in")
            inside.set()

    with staging(final):
        order.append("first in")
        t = threading.Thread(target=second)
        t.start()
        t.join(0.5)
        assert t.is_alive()  # blocked on the lock
        assert not inside.is_set()  # not let in while the first holds the name
        order.append("first out")
    t.join(10)
    assert inside.is_set() and not t.is_alive()  # let in once the first is done
    assert order == ["first in", "first out", "second in"]


# ---------------------------------------------------------------- the default policy and class coverage

def test_select_without_sql_or_policy_runs_the_default_policy_and_reports_coverage(scored):
    from curation.coverage import class_coverage

    ws, _ = scored
    result = select(ws, SelectConfig(name="dflt", limit=30))
    manifest, samples = _read_selection(result.path)
    # --limit is a budget: the default takes fewer where it finds fewer in the teacher's distribution, and says so
    took = int(re.fullmatch(r"balance:k=(\d+);label=kd3_label;by=fused", manifest["policy_steps"].split(" | ")[2])[1])
    assert manifest["policy"] == "default" and manifest["total"] == len(samples) == took <= 30
    assert (took < 30) == any(n.startswith(f"default: took at most {took} of k=30") for n in manifest["notes"])
    # the index made clusters and the scoring run a fused score: every step of the default ran
    assert manifest["policy_steps"].split(" | ")[0] == "dedup:by=fused"
    assert manifest["policy_steps"].split(" | ")[1].startswith("diversity:max_per_cluster=")
    expected = class_coverage(manifest["counts_per_class"], manifest["num_classes"])
    assert manifest["coverage"] == {k: v for k, v in expected.items() if k != "counts_per_class"}
    # the steps the manifest lists are what ran: applied to the candidates, they give the same samples
    candidates = catalog.query(ws, "SELECT * FROM candidates").to_pandas()
    steps = parse_policy(manifest["policy_steps"])
    assert {s["__key__"] for s in samples} == set(apply_policies(candidates, steps)["sample_id"])
    # the quotas: classes' counts differ by at most one unless a class ran short after dedup and the cap
    available = Counter(apply_policies(candidates, steps[:2])["kd3_label"].dropna().astype(int))
    per_class = Counter(candidates.set_index("sample_id").loc[[s["__key__"] for s in samples], "kd3_label"])
    fair = max(per_class.values())
    assert all(n >= fair - 1 or n == available[c] for c, n in per_class.items()), (per_class, available)
    assert len(per_class) == len(available)  # every class with a candidate left has samples
    clusters = candidates.set_index("sample_id").loc[[s["__key__"] for s in samples], "cluster_id"]
    assert clusters.is_unique  # one per near-duplicate cluster
    row = catalog.query(ws, "SELECT policy, class_entropy, min_class_share FROM selections "
                            "WHERE name = 'dflt'").to_pylist()
    assert row == [{"policy": "default", "class_entropy": expected["class_entropy"],
                    "min_class_share": expected["min_class_share"]}]


def test_select_cli_prints_the_coverage_beside_the_size_and_the_default_s_steps(scored):
    ws, _ = scored
    proc = run_cli("select", "-w", str(ws.root), "--name", "dflt-cli", "--limit", "20")
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((ws.root / "selections" / "dflt-cli" / "manifest.json").read_text())
    cov = manifest["coverage"]
    first, second = proc.stdout.strip().splitlines()[:2]
    assert 0 < manifest["total"] <= 20  # --limit is the default's budget
    assert first.startswith(f"select dflt-cli: {manifest['total']} samples "
                            f"(class coverage: entropy {cov['class_entropy']:.2f}, "
                            f"smallest class {100 * cov['min_class_share']:.1f}% ")
    assert second == f"select dflt-cli: policy default = {manifest['policy_steps']}"
    # a query alone still chooses alone: no default policy on top of it
    proc = run_cli("select", "-w", str(ws.root), "--name", "sql-only", "--sql",
                   "SELECT sample_id FROM candidates ORDER BY sample_id LIMIT 9")
    assert proc.returncode == 0 and "9 samples (class coverage: entropy" in proc.stdout
    manifest = json.loads((ws.root / "selections" / "sql-only" / "manifest.json").read_text())
    assert manifest["policy"] is None and manifest["policy_steps"] is None and "coverage" in manifest
