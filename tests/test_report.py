"""`webdistill report` on a tiny workspace (the small demo crawl, ingested, embedded, indexed,
scored and selected), with and without a ground truth; the `selected` view; the flows' Prefect
artifacts; and, where Chromium is installed, the page rendered headless."""
import json
import re
import tarfile
from html.parser import HTMLParser

import pandas as pd
import pytest

from curation import catalog
from curation.report_build import NO_TRUTH, write_report
from curation.select import SelectConfig
from curation.selection_members import MEMBERS_FILE
from curation.workspace import Workspace
from flows import stage_runner
from flows.cli import main

TEACHER = "tests.models_for_tests:thumbnail"  # the tests' own module: trusted
SECTIONS = ["pool", "scores", "truth", "montages", "duplicates", "selections", "rounds", "students"]


@pytest.fixture(scope="module")
def tiny_ws(small_crawl, tmp_path_factory):
    """The small crawl ingested, embedded (teacher features), indexed, scored, and two selections;
    a student's summary and metrics as distill writes them."""
    from curation.score import ScoreConfig

    ws = Workspace(tmp_path_factory.mktemp("ws"))
    stage_runner.run_ingest(ws, [str(small_crawl / "crawl")], max_failure_fraction=1.0)
    stage_runner.run_embed(ws, "teacher", teacher=TEACHER, workers=0, trust_model_code=True)
    stage_runner.run_index(ws, "teacher", {"kmeans_k": 4, "dup_threshold": 0.97})
    stage_runner.run_score(ws, ScoreConfig(teacher=TEACHER, name="r1", batch_size=128, workers=0, odin=False,
                                           trust_model_code=True))
    stage_runner.run_select(ws, SelectConfig(name="top", policy="topk:k=60;by=msp", shard_size=25))
    stage_runner.run_select(ws, SelectConfig(name="balanced", policy="dedup | balance:k=40;by=msp"))
    student = ws.root / "students" / "top-kd"
    student.mkdir(parents=True)
    (student / "summary.json").write_text(json.dumps({
        "name": "top-kd", "selection_name": "top", "selection": str(ws.root / "selections/top/manifest.json"),
        "student": "tiny_cnn", "loss": "kd", "teacher_mode": "stored", "eval_accuracy": 0.5, "epochs": 2,
        "steps": 4, "seconds": 1.0}))
    (student / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in [
        {"step": 1, "epoch": 0, "loss": 2.0}, {"step": 2, "epoch": 0, "loss": 1.5},
        {"step": 2, "epoch": 0, "eval_accuracy": 0.3}, {"step": 4, "epoch": 1, "loss": 1.0},
        {"step": 4, "epoch": 1, "eval_accuracy": 0.5}]))
    catalog.refresh(ws)
    return ws


def _tar_members(ws: Workspace, name: str) -> list[tuple[str, str, int]]:
    """(sample_id, tar, position) of every sample in a selection's tars, read with tarfile."""
    manifest = json.loads((ws.root / "selections" / name / "manifest.json").read_text())
    out = []
    for shard in manifest["shards"]:
        with tarfile.open(ws.root / "selections" / name / shard["path"]) as tar:
            keys = [m.name.split(".", 1)[0] for m in tar.getmembers() if m.name.endswith(".json")]
        out += [(key, shard["path"], i) for i, key in enumerate(keys)]
    return out


# --- the selected view ----------------------------------------------------------------------

def test_selected_joins_samples_to_exactly_the_selections_members(tiny_ws):
    rows = catalog.query(tiny_ws, "SELECT sample_id, s.shard AS source, sel.shard, position, weight FROM selected sel "
                                  "JOIN samples s USING (sample_id) WHERE selection = 'top' "
                                  "ORDER BY sel.shard, position").to_pylist()
    assert [(r["sample_id"], r["shard"], r["position"]) for r in rows] == _tar_members(tiny_ws, "top")
    assert len(rows) == 60 and {r["weight"] for r in rows} == {1.0} and all(r["source"] for r in rows)
    counts = {r["selection"]: r["n"] for r in catalog.query(
        tiny_ws, "SELECT selection, count(*) AS n FROM selected GROUP BY 1").to_pylist()}
    assert counts == {"top": 60, "balanced": 40}


def test_a_selection_written_before_members_parquet_gets_it_from_its_tars(tiny_ws):
    folder = tiny_ws.root / "selections" / "top"
    expected = (folder / MEMBERS_FILE).read_bytes()
    (folder / MEMBERS_FILE).unlink()
    catalog.refresh(tiny_ws)
    assert (folder / MEMBERS_FILE).exists()
    ids = catalog.query(tiny_ws, "SELECT sample_id FROM selected WHERE selection = 'top' ORDER BY shard, position"
                        ).column("sample_id").to_pylist()
    assert ids == [m[0] for m in _tar_members(tiny_ws, "top")]
    assert len(expected) > 0


def test_a_writers_temporary_folder_is_not_in_the_view(tiny_ws):
    import shutil

    hidden = tiny_ws.root / "selections" / ".tmp-top-0123abcd"
    shutil.copytree(tiny_ws.root / "selections" / "top", hidden)
    try:
        catalog.refresh(tiny_ws)
        n = catalog.query(tiny_ws, "SELECT count(*) AS n FROM selected WHERE selection = 'top'").column("n")[0]
        assert n.as_py() == 60
    finally:
        shutil.rmtree(hidden)


# --- the page -------------------------------------------------------------------------------

class Page(HTMLParser):
    """Sections in order, with per section: images, tiles by kind, and every src/href."""

    def __init__(self, text: str):
        super().__init__()
        self.sections: dict[str, dict] = {}
        self.links: list[str] = []
        self.current: dict | None = None
        self.kinds: list[str | None] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "section":
            self.current = self.sections.setdefault(a["id"], {"images": [], "tiles": {}, "text": ""})
        for key in ("src", "href"):
            if a.get(key):
                self.links.append(a[key])
        if tag == "div":
            classes = (a.get("class") or "").split()
            self.kinds.append(classes[1] if classes[:1] == ["tiles"] and len(classes) > 1 else None)
        if tag == "img" and self.current is not None and a.get("src"):
            self.current["images"].append(a)
            kind = next((k for k in reversed(self.kinds) if k), None)
            if kind:
                self.current["tiles"].setdefault(kind, []).append(a["alt"].split()[0])

    def handle_endtag(self, tag):
        if tag == "div" and self.kinds:
            self.kinds.pop()
        if tag == "section":
            self.current = None

    def handle_data(self, data):
        if self.current is not None:
            self.current["text"] += data


def _members(ws: Workspace, name: str) -> set[str]:
    return set(catalog.query(ws, "SELECT sample_id FROM selected WHERE selection = $s", params={"s": name})
               .column("sample_id").to_pylist())


def test_the_report_without_a_truth_has_every_section_and_says_why_the_truth_is_absent(tiny_ws, tmp_path):
    summary = write_report(tiny_ws, tmp_path / "report.html")
    text = (tmp_path / "report.html").read_text()
    page = Page(text)
    assert list(page.sections) == SECTIONS == summary["sections"]
    # nothing from outside the page: no script, no stylesheet or font to fetch, every link inside it
    assert all(link.startswith(("data:image/", "#")) for link in page.links)
    assert not re.search(r"<script|<link|@import|url\(|<iframe", text, re.IGNORECASE)
    s = page.sections
    assert len(s["pool"]["images"]) == 4  # sources, formats, sizes, rejects (the crawl plants bad samples)
    assert len(s["scores"]["images"]) == 2  # one grid of histograms per selection
    assert NO_TRUTH in s["truth"]["text"] and not s["truth"]["images"]
    assert "no truth" in s["rounds"]["text"]
    assert len(s["selections"]["images"]) == 2 and len(s["rounds"]["images"]) == 1
    assert len(s["students"]["images"]) == 1  # the loss curve
    # the montages: kept tiles are members of their selection, dropped ones are not (two selections in turn)
    kept, dropped = s["montages"]["tiles"]["kept"], s["montages"]["tiles"]["dropped"]
    members = _members(tiny_ws, "top") | _members(tiny_ws, "balanced")
    assert kept and dropped and set(kept) <= members
    assert summary["thumbnails"] > 0
    assert all(img["src"].startswith("data:image/jpeg") for img in s["montages"]["images"])
    assert s["duplicates"]["tiles"].get("cluster") or "No near-duplicate cluster" in s["duplicates"]["text"]


def test_coverage_bars_are_the_selections_counts_per_class(tiny_ws, tmp_path):
    write_report(tiny_ws, tmp_path / "report.html", selection_names=["balanced"])
    page = Page((tmp_path / "report.html").read_text())
    (alt,) = [img["alt"] for img in page.sections["selections"]["images"]]
    drawn = dict(pair.split(": ") for pair in alt.split("balanced: ", 1)[1].split(", "))
    counted = {str(r["teacher_label"]): r["n"] for r in catalog.query(tiny_ws, """
        SELECT sc.teacher_label, count(*) AS n FROM selected sel JOIN scores sc USING (sample_id)
        WHERE sel.selection = 'balanced' AND sc.run = 'r1' GROUP BY 1""").to_pylist()}
    assert {k: int(v) for k, v in drawn.items()} == counted
    # the coverage figures beside the bars, as select prints them
    from curation.coverage import class_coverage, coverage_text

    manifest = json.loads((tiny_ws.root / "selections" / "balanced" / "manifest.json").read_text())
    shown = coverage_text(class_coverage(counted, manifest["num_classes"]))
    assert shown.startswith("class coverage: entropy") and shown in page.sections["selections"]["text"]
    # only the named selection is reported; its montage's kept tiles are members, its dropped ones not
    assert len(page.sections["scores"]["images"]) == 1
    tiles, members = page.sections["montages"]["tiles"], _members(tiny_ws, "balanced")
    assert tiles["kept"] and tiles["dropped"]
    assert set(tiles["kept"]) <= members and not set(tiles["dropped"]) & members


def test_the_report_with_a_truth_draws_roc_curves_and_the_selections_precision(tiny_ws, small_crawl, tmp_path):
    truth = small_crawl / "crawl" / "ground_truth.parquet"
    summary = write_report(tiny_ws, tmp_path / "report.html", truth=truth)
    page = Page((tmp_path / "report.html").read_text())
    assert list(page.sections) == SECTIONS
    assert len(page.sections["truth"]["images"]) == 1 and NO_TRUTH not in page.sections["truth"]["text"]
    assert summary["auroc"]["r1"] and all(0 <= r["auroc"] <= 1 for r in summary["auroc"]["r1"])
    kept = catalog.query(tiny_ws, "SELECT samples.shard, key FROM selected JOIN samples USING (sample_id) "
                                  "WHERE selection = 'top'").to_pandas()
    expected = kept.merge(pd.read_parquet(truth), on=["shard", "key"])["in_domain"].mean()
    (top,) = [s for s in summary["selections"] if s["name"] == "top"]
    assert top["precision"] == pytest.approx(expected)
    assert f"{expected:.4g}" in page.sections["truth"]["text"]


def test_the_report_verb_prints_where_the_page_is(tiny_ws, tmp_path, capsys):
    out = tmp_path / "r.html"
    assert main(["report", "-w", str(tiny_ws.root), "--out", str(out), "--selection", "top"]) == 0
    assert f"report: {out}" in capsys.readouterr().out and out.stat().st_size > 10_000
    assert main(["report", "-w", str(tiny_ws.root), "--selection", "nope"]) == 2
    assert "no selection 'nope'" in capsys.readouterr().err


def test_an_empty_workspace_still_gets_a_page(tmp_path):
    ws = Workspace(tmp_path / "empty")
    catalog.refresh(ws)
    summary = write_report(ws, tmp_path / "report.html")
    page = Page((tmp_path / "report.html").read_text())
    assert list(page.sections) == SECTIONS and summary["samples"] == 0
    assert "No selection yet" in page.sections["selections"]["text"]


@pytest.mark.skipif(not __import__("shutil").which("chromium"), reason="no Chromium (apt-get install chromium)")
def test_chromium_renders_the_page(tiny_ws, tmp_path):
    import numpy as np
    from PIL import Image

    from bench.report_screenshot import main as screenshot

    write_report(tiny_ws, tmp_path / "report.html")
    assert screenshot([str(tmp_path / "report.html"), "--out", str(tmp_path / "shots")]) == 0
    full = np.asarray(Image.open(tmp_path / "shots" / "full.png").convert("L"))
    assert full.shape[1] == 1280 and full.shape[0] > 2000 and full.std() > 10


# --- Prefect artifacts ----------------------------------------------------------------------

def _artifacts(state) -> dict[str, object]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
    return {a.key: a for a in found}


@pytest.mark.slow  # a Prefect server
def test_the_flows_publish_their_summaries_as_artifacts(prefect_server, tiny_ws, small_crawl, tmp_path):
    from flows.stages import report_flow, select_flow

    state = select_flow(str(tiny_ws.root), name="flowsel", policy="topk:k=30;by=msp", return_state=True)
    found = _artifacts(state)
    assert {"select-summary", "selection-coverage"} <= set(found)
    coverage = json.loads(found["selection-coverage"].data)
    manifest = json.loads((tiny_ws.root / "selections" / "flowsel" / "manifest.json").read_text())
    assert {r["class"]: r["samples"] for r in coverage} == manifest["counts_per_class"]
    assert f"entropy {manifest['coverage']['class_entropy']:.2f}" in found["selection-coverage"].description

    state = report_flow(str(tiny_ws.root), out=str(tmp_path / "report.html"),
                        truth=str(small_crawl / "crawl" / "ground_truth.parquet"), return_state=True)
    found = _artifacts(state)
    assert str(tmp_path / "report.html") in found["report"].data
    auroc = json.loads(found["report-auroc"].data)
    assert {r["score_run"] for r in auroc} == {"r1"} and any(r["score"] == "msp" for r in auroc)
