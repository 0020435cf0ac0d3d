"""The activation-shaping scores (SCALE, ASH, ReAct) and the fused score through the score stage,
on the small demo crawl: every decoded sample gets them, pass 2's ReAct and fusion follow their
definitions over the pool, and a teacher whose features cannot be reached gets nulls and a note."""
import json

import numpy as np
import pytest

from curation import catalog
from curation import score_fns as sf
from curation.ingest import ingest
from curation.schemas import SCORE_COLUMNS
from curation.score import FUSED_COLUMNS, NO_FEATURES, ScoreConfig, score
from curation.workspace import Workspace
from flows.stage_runner import run_score

NEW = ["scale", "ash", "react", "fused"]


@pytest.fixture(scope="module")
def workspace(small_crawl, tmp_path_factory):
    ws = Workspace(tmp_path_factory.mktemp("ws"))
    ingest(ws, [str(small_crawl / "crawl")], workers=1, progress=False)
    return ws


@pytest.fixture(scope="module")
def scored(workspace, small_teacher):
    # a teacher trained for 2 epochs is rarely 99% sure: a lower bar gives Mahalanobis its reference set
    summary = score(workspace, ScoreConfig(teacher=str(small_teacher), name="cnn", batch_size=128, workers=0,
                                           odin=False, reference_confidence=0.5), progress=False)
    catalog.refresh(workspace)
    frame = catalog.query(workspace, "SELECT * FROM scores WHERE run = 'cnn' ORDER BY shard, row").to_pandas()
    return workspace, summary, frame


def test_new_columns_fill_every_decoded_sample_and_are_documented(scored):
    ws, summary, frame = scored
    decoded = frame["decoded"].to_numpy(bool)
    for col in NEW:
        assert frame[col].notna().to_numpy().tolist() == decoded.tolist(), col
    documented = dict(catalog.query(ws, "SELECT name, description FROM score_columns").to_pandas().values)
    assert all(documented[c] == SCORE_COLUMNS[c] for c in NEW)
    assert summary.notes == [] and summary.react_clip > 0
    assert json.loads((ws.root / "scores" / "cnn" / "run.json").read_text())["summary"]["notes"] == []


def test_react_is_the_energy_of_features_clipped_at_the_pool_percentile(scored):
    ws, summary, frame = scored
    run = ws.root / "scores" / "cnn"
    head = np.load(run / "head.npz")
    w, b = head["weight"].astype(np.float64), head["bias"].astype(np.float64)
    feats = {s: np.load(run / "features" / f"{s}.npy").astype(np.float64) for s in frame["shard"].unique()}
    f = np.concatenate([feats[s] for s in sorted(feats)])  # the frame is ordered by shard, then row
    decoded = frame["decoded"].to_numpy(bool)
    clip = np.percentile(f[decoded], 90)  # every activation of every decoded sample of the pool
    assert summary.react_clip == pytest.approx(clip, rel=1e-9)
    z = np.minimum(f, clip) @ w.T + b
    m = z.max(1, keepdims=True)
    expected = (m + np.log(np.exp(z - m).sum(1, keepdims=True)))[:, 0]
    np.testing.assert_allclose(frame["react"][decoded], expected[decoded], rtol=1e-4)


def test_fused_is_the_rank_fusion_of_the_label_free_columns(scored):
    _, _, frame = scored
    fused = frame["fused"].to_numpy(float)
    decoded = frame["decoded"].to_numpy(bool)
    assert ((fused[decoded] >= 0) & (fused[decoded] <= 1)).all()
    present = [c for c in FUSED_COLUMNS if frame[c].notna().any()]
    assert {"msp", "energy", "gen", "scale", "ash", "react", "mahalanobis", "bn_score"} == set(present)
    expected = sf.rank_fusion([frame[c].to_numpy(float) for c in present])
    np.testing.assert_allclose(fused[decoded], expected[decoded], rtol=1e-5)


def test_a_teacher_without_reachable_features_gets_nulls_and_a_note(workspace):
    # through the stage runner, whose summary the CLI and the flows print and record
    summary = run_score(workspace, ScoreConfig(teacher="tests.models_for_tests:no_linear", name="opaque",
                                               batch_size=128, workers=0, odin=False, trust_model_code=True))
    assert summary["notes"] == [NO_FEATURES]
    assert json.loads((workspace.root / "scores" / "opaque" / "run.json").read_text())["summary"]["notes"] == [
        NO_FEATURES]
    catalog.refresh(workspace)
    counts = catalog.query(workspace, "SELECT count(scale) AS scale, count(ash) AS ash, count(react) AS react, "
                                      "count(fused) AS fused, count(*) FILTER (WHERE decoded) AS decoded "
                                      "FROM scores WHERE run = 'opaque'").to_pylist()[0]
    assert counts["scale"] == counts["ash"] == counts["react"] == 0
    assert counts["fused"] == counts["decoded"] > 0  # fused from the logit scores alone
    assert not (workspace.root / "scores" / "opaque" / "head.npz").exists()
