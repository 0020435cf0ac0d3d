"""`webdistill delete` (issue 17, item 5): a selection, student, kNN score, scoring run or synthetic
set goes with its catalog row and its `candidates` columns; nothing outside its folder is touched;
a kNN score whose column a scoring run already has is refused by name, not renamed by DuckDB."""
import os

import pytest

from curation import catalog
from curation.delete import NothingToDelete, delete
from curation.errors import UnsafeName
from curation.select import SelectConfig, select
from flows.stage_runner import run_knn_score

from .conftest import run_cli
from .test_select import scored  # noqa: F401 - the scored workspace fixture


def _columns(ws) -> list[str]:
    return catalog.query(ws, "SELECT * FROM candidates LIMIT 0").column_names


def test_a_deleted_knn_score_leaves_the_candidates_view(scored):  # noqa: F811
    ws, _ = scored
    run_knn_score(ws, "confident", "teacher", k=3, sql="SELECT sample_id FROM candidates ORDER BY msp DESC LIMIT 5")
    catalog.refresh(ws)
    assert "knn_confident" in _columns(ws)
    done = run_cli("delete", "-w", str(ws.root), "knn-score", "confident")
    assert done.returncode == 0, done.stderr
    assert "knn_confident" not in _columns(ws) and not (ws.root / "knn_scores" / "confident.parquet").exists()


def test_a_deleted_selection_leaves_its_row_and_folder(scored):  # noqa: F811
    ws, _ = scored
    select(ws, SelectConfig(name="gone", policy="topk:k=5;by=msp"), overwrite=True)
    select(ws, SelectConfig(name="stays", policy="topk:k=6;by=msp"), overwrite=True)
    delete(ws, "selection", "gone")
    names = catalog.query(ws, "SELECT name FROM selections").column("name").to_pylist()
    assert "gone" not in names and "stays" in names
    assert not (ws.root / "selections" / "gone").exists() and (ws.root / "selections" / "stays").is_dir()
    assert catalog.query(ws, "SELECT count(*) AS n FROM selected WHERE selection = 'gone'").column("n")[0].as_py() == 0


@pytest.mark.parametrize("kind, name, error", [
    ("selection", "no-such", NothingToDelete), ("knn-score", "no-such", NothingToDelete),
    ("student", "no-such", NothingToDelete), ("selection", "../scores", UnsafeName),
    ("score-run", "../../etc", UnsafeName), ("synthetic", ".hidden", UnsafeName),
])
def test_what_is_not_there_or_not_a_name_is_refused(scored, kind, name, error):  # noqa: F811
    ws, _ = scored
    with pytest.raises(error):
        delete(ws, kind, name)
    assert (ws.root / "scores").is_dir() and (ws.root / "samples").is_dir()


def test_a_planted_symlink_is_not_followed(scored, tmp_path):  # noqa: F811
    ws, _ = scored
    outside = tmp_path / "precious"
    outside.mkdir()
    (outside / "keep.txt").write_text("x")
    os.symlink(outside, ws.root / "selections" / "planted")
    with pytest.raises((NothingToDelete, UnsafeName)):
        delete(ws, "selection", "planted")
    assert (outside / "keep.txt").read_text() == "x"


def test_the_command_line_says_what_exists(scored):  # noqa: F811
    ws, _ = scored
    done = run_cli("delete", "-w", str(ws.root), "selection", "nope")
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "there:" in done.stderr


@pytest.mark.parametrize("name", ["teacher"])
def test_a_knn_score_named_like_a_score_column_is_refused(scored, name):  # noqa: F811
    ws, _ = scored
    done = run_cli("knn-score", "-w", str(ws.root), "--name", name, "--embedder", "teacher", "--sql",
                   "SELECT sample_id FROM candidates LIMIT 3")
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and f"knn_{name}" in done.stderr
    assert not (ws.root / "knn_scores" / f"{name}.parquet").exists()


@pytest.mark.parametrize("name", ["bad name; drop", "../x", "a/b", ""])
def test_a_knn_score_name_that_is_no_plain_name_is_refused(scored, name):  # noqa: F811
    ws, _ = scored
    with pytest.raises(UnsafeName):
        run_knn_score(ws, name, "teacher", k=3, sql="SELECT sample_id FROM candidates LIMIT 3")
