"""Class coverage of a selection (curation/coverage.py), by hand, and its columns in the catalog's
`selections` table, also in a catalog made before they existed."""
import json
import math

import duckdb
import pytest

from curation import catalog
from curation.coverage import class_coverage, coverage_text
from curation.workspace import Workspace


def test_an_even_selection_has_entropy_one_and_the_fair_smallest_share():
    cov = class_coverage({"0": 50, "1": 50, "2": 50, "3": 50})
    assert cov["class_entropy"] == pytest.approx(1.0) and cov["min_class_share"] == pytest.approx(0.25)
    assert cov["classes_covered"] == cov["num_classes"] == 4


def test_a_skewed_selection_by_hand_and_a_missing_class_counts():
    cov = class_coverage({"1": 10, "0": 90}, num_classes=3)
    expected = -(0.9 * math.log(0.9) + 0.1 * math.log(0.1)) / math.log(3)
    assert cov["class_entropy"] == pytest.approx(expected, abs=1e-6)
    assert cov["min_class_share"] == 0.0  # class 2 has no sample
    assert (cov["classes_covered"], cov["num_classes"]) == (2, 3)
    assert list(cov["counts_per_class"]) == ["0", "1"]
    # the same counts over the classes present only
    assert class_coverage({"1": 10, "0": 90})["min_class_share"] == pytest.approx(0.1)


def test_edge_cases_one_class_nothing_and_zero_counts():
    assert class_coverage({"7": 5}, num_classes=1)["class_entropy"] == 1.0
    assert class_coverage({"7": 5}, num_classes=10)["class_entropy"] == 0.0
    empty = class_coverage({}, num_classes=10)
    assert empty["class_entropy"] is None and empty["min_class_share"] is None
    assert coverage_text(empty) == "class coverage: no pseudo-labels"
    assert class_coverage({"0": 4, "1": 0}) == class_coverage({"0": 4})  # a zero count is no class
    assert class_coverage({10: 1, 2: 1})["counts_per_class"] == {"2": 1, "10": 1}  # numeric order


def test_the_text_gives_entropy_and_smallest_share():
    text = coverage_text(class_coverage({"0": 3, "1": 1}, num_classes=2))
    assert text == "class coverage: entropy 0.81, smallest class 25.0% (2/2 classes)"


def _manifest(folder, counts, **extra):
    folder.mkdir(parents=True)
    manifest = {"name": folder.name, "total": sum(counts.values()), "shards": [], "policy": "default",
                "score_run": "r1", "num_classes": 4, "counts_per_class": counts} | extra
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return manifest


def test_an_older_catalog_gains_the_coverage_columns_and_rows_are_filled_from_the_manifests(tmp_path):
    ws = Workspace(tmp_path / "ws")
    ws.root.mkdir()
    old = duckdb.connect(str(ws.catalog_path))  # the selections table as catalogs were made before
    old.execute("""CREATE TABLE selections (name VARCHAR PRIMARY KEY, size BIGINT, query VARCHAR, policy VARCHAR,
                   score_run VARCHAR, path VARCHAR, manifest_sha256 VARCHAR, created_at TIMESTAMPTZ, config JSON)""")
    old.execute("INSERT INTO selections VALUES ('before', 1, NULL, 'dedup', 'r1', '/x', 'abc', now(), '{}')")
    old.close()
    # a manifest from before coverage was recorded: the row's coverage comes from its counts
    _manifest(ws.root / "selections" / "older", {"0": 30, "1": 10})
    recorded = _manifest(ws.root / "selections" / "newer", {"0": 5, "1": 5, "2": 5, "3": 5})
    catalog.refresh(ws)
    catalog.record_selection(ws, recorded | {"coverage": {"class_entropy": 1.0, "min_class_share": 0.25}},
                             ws.root / "selections" / "newer")
    rows = {r["name"]: r for r in catalog.query(ws, "SELECT name, policy, class_entropy, min_class_share "
                                                    "FROM selections").to_pylist()}
    assert rows["before"]["class_entropy"] is None and rows["before"]["policy"] == "dedup"
    older = class_coverage({"0": 30, "1": 10}, num_classes=4)
    assert rows["older"]["class_entropy"] == pytest.approx(older["class_entropy"])
    assert rows["older"]["min_class_share"] == 0.0  # two of the teacher's four classes are missing
    assert rows["newer"]["class_entropy"] == 1.0 and rows["newer"]["min_class_share"] == 0.25


def test_a_manifest_with_malformed_counts_still_gets_its_row_or_none(tmp_path):
    ws = Workspace(tmp_path / "ws")
    _manifest(ws.root / "selections" / "odd", {"0": 1}, counts_per_class=["not", "a", "mapping"])
    _manifest(ws.root / "selections" / "bad", {"0": 1}, counts_per_class={"0": "many"})
    catalog.refresh(ws)  # neither stops the refresh
    rows = {r["name"]: r for r in catalog.query(ws, "SELECT name, class_entropy FROM selections").to_pylist()}
    assert rows == {"odd": {"name": "odd", "class_entropy": None}}
