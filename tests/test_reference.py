"""The reference set of score pass 2 (curation/reference.py): agreement with a per-class quota keeps
an overconfident sink class out where the confidence rule lets it in, refinement rounds swap out
look-alikes the scores agreed on, a folder of target images is decoded safely (a hostile file is
skipped with a note), and the score stage records the set."""
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from curation import catalog
from curation.errors import WouldOverwrite
from curation.ingest import ingest
from curation.reference import MEMBERS, ReferenceError, build_reference, pick
from curation.score import BatchScorer, ScoreConfig, ScoreError
from curation.workspace import Workspace, config_hash
from flows.stage_runner import run_score

from .hostile_inputs import png_short_stream

D, CLASSES = 16, 4


def _write_run(run: Path, shards: dict[str, dict]) -> None:
    """A scoring run's pass-1 tables and features, hand-built: {shard: {column: values, features: (n, d)}}."""
    for shard, cols in shards.items():
        (run / "pass1").mkdir(parents=True, exist_ok=True)
        (run / "features").mkdir(parents=True, exist_ok=True)
        n = len(cols["teacher_label"])
        table = {"sample_id": [f"{shard}-{i}" for i in range(n)], "decoded": np.ones(n, bool)}
        table |= {k: v for k, v in cols.items() if k not in ("features", "in_domain")}
        pq.write_table(pa.table(table), run / "pass1" / f"{shard}.parquet")
        np.save(run / "features" / f"{shard}.npy", cols["features"].astype(np.float16))


def _pool(rng, n_in=160, n_sink=120, n_lookalike=0, n_far=200):
    """In-domain samples near CLASSES class means; a sink class (label 0) the teacher is sure about
    though its features are elsewhere and its logits small; look-alikes every score likes but whose
    features are scattered; and far samples every score dislikes."""
    means = 6 * np.eye(CLASSES, D)
    y_in = np.arange(n_in) % CLASSES
    f_in = means[y_in] + rng.normal(size=(n_in, D))
    parts = {
        "in": (f_in, y_in, rng.uniform(0.90, 0.99, n_in), rng.normal(5, 1, n_in)),
        "sink": (rng.normal(size=(n_sink, D)) * 3 + 15, np.zeros(n_sink, int), np.full(n_sink, 0.999),
                 rng.normal(0, 1, n_sink)),
        "lookalike": (rng.normal(size=(n_lookalike, D)) * 6 - 20, np.arange(n_lookalike) % CLASSES,
                      rng.uniform(0.97, 0.99, n_lookalike), rng.normal(9, 0.5, n_lookalike)),
        "far": (rng.normal(size=(n_far, D)) * 4, rng.integers(0, CLASSES, n_far), rng.uniform(0.3, 0.6, n_far),
                rng.normal(-2, 1, n_far)),
    }
    feats, labels, conf, logit = (np.concatenate([p[i] for p in parts.values()]) for i in range(4))
    domain = np.concatenate([np.full(len(p[1]), name == "in") for name, p in parts.items()])
    cols = {"features": feats, "teacher_label": labels.astype(np.int32),
            "teacher_conf": conf.astype(np.float32), "msp": conf.astype(np.float32),
            "energy": logit.astype(np.float32), "gen": (logit + rng.normal(0, 0.3, len(conf))).astype(np.float32),
            "bn_score": (logit + rng.normal(0, 0.3, len(conf))).astype(np.float32)}
    return cols, domain


def _split(cols: dict, parts: int) -> tuple[dict[str, dict], np.ndarray]:
    order = np.random.default_rng(1).permutation(len(cols["teacher_label"]))  # shards mix the kinds of samples
    shards = {f"{i:05d}": {k: v[idx] for k, v in cols.items()} for i, idx in enumerate(np.array_split(order, parts))}
    return shards, order


def _reference(run, shards, **config):
    cfg = ScoreConfig(teacher="t", **config)
    return build_reference(run, sorted(shards), cfg, CLASSES, scorer_factory=None)


def _purity(ref, run, domain, order):
    ids = pq.read_table(run / "reference" / MEMBERS)["sample_id"].to_pylist()
    shard_of = {}
    sizes = [len(a) for a in np.array_split(order, 3)]
    starts = np.concatenate([[0], np.cumsum(sizes)])
    for i in range(3):
        for j in range(sizes[i]):
            shard_of[f"{i:05d}-{j}"] = order[starts[i] + j]
    return float(np.mean([domain[shard_of[s]] for s in ids])) if ids else 0.0


def test_a_sink_class_fills_the_confidence_rule_and_agreement_with_a_quota_keeps_it_out(tmp_path):
    cols, domain = _pool(np.random.default_rng(0))
    shards, order = _split(cols, 3)
    _write_run(tmp_path, shards)
    conf, _ = _reference(tmp_path, shards, reference="confidence")
    conf_purity = _purity(conf, tmp_path, domain, order)
    agree, notes = _reference(tmp_path, shards, reference="agreement", reference_top=0.2, reference_rounds=0)
    agree_purity = _purity(agree, tmp_path, domain, order)
    assert conf.summary["per_class"]["0"] == 120 and conf_purity < 0.1  # every member is the sink
    assert agree_purity == 1.0 and notes == []
    quota = int(np.ceil(0.2 * len(domain) / CLASSES))
    assert max(agree.summary["per_class"].values()) <= quota
    assert agree.summary["columns"] == ["msp", "energy", "gen", "bn_score"]  # those the pool has
    assert agree.features.shape == (agree.summary["size"], D)
    members = pq.read_table(tmp_path / "reference" / MEMBERS)
    assert members.column_names == ["sample_id", "file", "label", "round"]
    assert members["label"].to_pylist() == agree.labels.tolist()


def test_refinement_rounds_replace_look_alikes_the_scores_agreed_on(tmp_path):
    cols, domain = _pool(np.random.default_rng(2), n_lookalike=40)
    shards, order = _split(cols, 3)
    _write_run(tmp_path, shards)
    start, _ = _reference(tmp_path, shards, reference_top=0.2, reference_rounds=0)
    start_ids = set(pq.read_table(tmp_path / "reference" / MEMBERS)["sample_id"].to_pylist())
    start_purity = _purity(start, tmp_path, domain, order)
    refined, _ = _reference(tmp_path, shards, reference_top=0.2, reference_rounds=5)
    members = pq.read_table(tmp_path / "reference" / MEMBERS).to_pydict()
    refined_purity = _purity(refined, tmp_path, domain, order)
    assert start_purity < 0.8 < refined_purity == 1.0  # the look-alikes were in, and are out
    s = refined.summary
    assert 1 <= s["rounds"] <= 5 and s["changed_per_round"][0] > 0
    assert s["rounds"] == 5 or s["changed_per_round"][-1] == 0  # stopped early only at a fixed point
    # a member's round is the round since which it is in the set: those of round 0 were in the starting
    # set, and samples the rounds brought in have a later one
    entered_late = {i for i, r in zip(members["sample_id"], members["round"]) if r > 0}
    assert entered_late - start_ids and set(members["sample_id"]) - start_ids <= entered_late
    assert {i for i, r in zip(members["sample_id"], members["round"]) if r == 0} <= start_ids


def test_pick_caps_each_label_at_its_share_of_the_size():
    score = np.arange(20, dtype=float)[::-1]  # row 0 best
    label = np.array([0] * 15 + [1, 2, 1, 2, 1])
    rows = pick(score, label, np.ones(20, bool), size=10, n_classes=2)
    assert rows.tolist() == [0, 1, 2, 3, 4]  # the top 10 hold 10 of label 0: only 5 (= 10 / 2) kept
    assert pick(score, label, np.arange(20) >= 15, size=4, n_classes=3).tolist() == [15, 16, 17, 18]


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory, small_crawl):
    """A few eval digits under class folders named as the teacher's classes, one under an unknown
    folder, one flat, and two hostile files: text named .png, and a PNG header of 100000 x 100000."""
    import webdataset as wds

    root = tmp_path_factory.mktemp("targets")
    samples = list(wds.WebDataset(str(small_crawl / "eval" / "mnist-test.tar"), shardshuffle=False).decode("pil"))
    for i, s in enumerate(samples[:6]):
        folder = root / ("unknown" if i == 4 else str(int(s["cls"])) if i < 4 else ".")
        folder.mkdir(exist_ok=True)
        s["png"].save(folder / f"digit{i}.png")
    (root / "3").mkdir(exist_ok=True)
    (root / "3" / "notes.png").write_text("not an image at all")
    (root / "3" / "huge.png").write_bytes(png_short_stream(100_000, 100_000, rows=1))
    return root, [int(s["cls"]) for s in samples[:4]]


def test_a_folder_reference_labels_by_folder_and_skips_hostile_files_with_a_note(tmp_path, target_dir,
                                                                                 small_teacher):
    root, first_labels = target_dir
    config = ScoreConfig(teacher=str(small_teacher), reference=str(root), odin=False)
    ref, notes = build_reference(tmp_path, [], config, 10, lambda: BatchScorer(config))
    assert ref.summary["kind"] == "folder" and ref.summary["size"] == 6 and ref.summary["skipped"] == 2
    assert ref.summary["labelled_by_folder"] == 4
    assert len(notes) == 1 and "notes.png: not_an_image" in notes[0] and "huge.png: decompression_bomb" in notes[0]
    members = pq.read_table(tmp_path / "reference" / MEMBERS).to_pydict()
    by_file = dict(zip(members["file"], members["label"]))
    assert [by_file[f"{c}/digit{i}.png"] for i, c in enumerate(first_labels)] == first_labels
    assert ref.features.shape[0] == 6 and ref.features.shape[1] > 0 and np.isfinite(ref.features).all()
    assert ref.gaussians(10) is not None  # 6 images in up to 6 classes: shrinkage keeps it invertible


def test_a_folder_without_a_usable_image_or_too_many_is_a_typed_error(tmp_path, small_teacher):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.png").write_bytes(png_short_stream(100_000, 100_000, rows=1))
    (bad / "b.jpg").write_bytes(b"\xff\xd8 truncated")
    config = ScoreConfig(teacher=str(small_teacher), reference=str(bad))
    with pytest.raises(ReferenceError, match="no usable image among 2 file"):
        build_reference(tmp_path, [], config, 10, lambda: BatchScorer(config))
    Image.new("RGB", (16, 16)).save(bad / "c.png")
    with pytest.raises(ReferenceError, match="more than 2 images"):
        build_reference(tmp_path, [], ScoreConfig(teacher="t", reference=str(bad), reference_max_images=2), 10, None)
    with pytest.raises(ScoreError, match="^score config: .*'/nowhere' is no folder"):
        ScoreConfig(teacher="t", reference="/nowhere")


def test_the_reference_fields_enter_the_pass2_hash():
    base = config_hash(ScoreConfig(teacher="t").pass2_part())
    changed = [dict(reference="confidence"), dict(reference_rounds=1), dict(reference_top=0.05),
               dict(reference_min_per_class=1), dict(reference_max_images=10)]
    hashes = {config_hash(ScoreConfig(teacher="t", **c).pass2_part()) for c in changed}
    assert base not in hashes and len(hashes) == len(changed)


@pytest.mark.slow
def test_the_score_stage_records_its_reference_set(small_crawl, small_teacher, target_dir, tmp_path):
    ws = Workspace(tmp_path / "ws")
    ingest(ws, [str(small_crawl / "crawl")], workers=1, progress=False)
    config = ScoreConfig(teacher=str(small_teacher), name="cnn", batch_size=128, workers=0, odin=False,
                         reference_top=0.1)
    summary = run_score(ws, config)
    ref = summary["reference"]
    assert ref["kind"] == "agreement" and ref["size"] == summary["reference_samples"] > 0
    assert sum(ref["per_class"].values()) == ref["size"] and ref["rounds"] >= 1
    run = ws.root / "scores" / "cnn"
    assert json.loads((run / "run.json").read_text())["summary"]["reference"] == ref
    members = pq.read_table(run / "reference" / MEMBERS)
    catalog.refresh(ws)
    scored = catalog.query(ws, "SELECT sample_id, teacher_label, mahalanobis FROM scores WHERE run = 'cnn' "
                                "ORDER BY sample_id")
    label_of = dict(zip(scored["sample_id"].to_pylist(), scored["teacher_label"].to_pylist()))
    assert all(label_of[s] == y for s, y in zip(members["sample_id"].to_pylist(), members["label"].to_pylist()))
    logged = catalog.query(ws, "SELECT summary FROM runs WHERE stage = 'score'")["summary"].to_pylist()
    assert json.loads(logged[-1])["reference"] == ref
    # nothing changed: pass 2 is skipped and the summary still tells the set
    assert run_score(ws, config)["reference"] == ref
    # the user's target images: another run under this name, so only with overwrite; its Mahalanobis column changes
    targets = ScoreConfig(teacher=str(small_teacher), name="cnn", batch_size=128, workers=0, odin=False,
                          reference=str(target_dir[0]))
    with pytest.raises(WouldOverwrite, match="'cnn' exists.*reference 'agreement' -> "):
        run_score(ws, targets)
    folder = run_score(ws, targets, overwrite=True)
    assert folder["reference"]["kind"] == "folder" and folder["reference"]["size"] == 6
    assert any("huge.png" in n for n in folder["notes"])
    catalog.refresh(ws)
    again = catalog.query(ws, "SELECT mahalanobis FROM scores WHERE run = 'cnn' ORDER BY sample_id")["mahalanobis"]
    again = again.to_numpy()
    assert not np.allclose(np.nan_to_num(again), np.nan_to_num(scored["mahalanobis"].to_numpy()))
