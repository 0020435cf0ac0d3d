"""Errors keep the hint that says what to do, on their one line: DuckDB's candidate bindings and
"did you mean", the embedders a workspace does hold, and the package a storage URL needs."""
import importlib.util

import pytest
from fsspec.registry import known_implementations

from curation import catalog
from curation.errors import first_line, missing_storage_package
from curation.ingest import ingest
from curation.workspace import Workspace
from flows.cli import main


@pytest.fixture(scope="module")
def ws(small_crawl, tmp_path_factory) -> Workspace:
    ws = Workspace(tmp_path_factory.mktemp("hints") / "ws")
    ingest(ws, [str(small_crawl / "crawl")], workers=1, progress=False)
    catalog.refresh(ws)
    return ws


def one_error_line(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("query, hint", [
    ("SELECT widht FROM samples", 'Candidate bindings: "width"'),
    ("SELECT * FROM sample", 'Did you mean "samples'),
    ("SELECT lenght(caption) FROM samples", 'Did you mean "length"'),
])
def test_sql_errors_keep_duckdbs_hint(ws, capsys, query, hint):
    err = one_error_line(capsys, ["sql", "-w", str(ws.root), query])
    assert hint in err and "LINE 1" not in err, err


def test_a_selection_by_a_misspelt_column_names_the_candidates(ws, capsys):
    err = one_error_line(capsys, ["select", "-w", str(ws.root), "--name", "s",
                                 "--sql", "SELECT sample_id FROM candidates ORDER BY widht LIMIT 5"])
    assert 'Candidate bindings: "width"' in err, err
    assert not (ws.root / "selections" / "s").exists()


def test_first_line_keeps_hints_but_no_source_excerpt():
    exc = RuntimeError('Binder Error: column "msq" not found\nCandidate bindings: "msp"\n\nLINE 1: x\n  ^^^')
    assert first_line(exc) == 'Binder Error: column "msq" not found Candidate bindings: "msp"'
    assert first_line(RuntimeError("one\ntwo")) == "one"


@pytest.mark.parametrize("verb", [["index"], ["knn", "--text", "a digit"]])
def test_a_missing_embedder_names_those_the_workspace_has(ws, tmp_path, capsys, verb):
    err = one_error_line(capsys, [*verb, "-w", str(ws.root), "--embedder", "open_clip:ViT-S-32"])
    assert "no embeddings for 'open_clip-ViT-S-32'" in err and "(it has: none)" in err, err
    (ws.root / "embeddings" / "teacher").mkdir(parents=True)  # an embedder with vectors, another without
    (ws.root / "embeddings" / "teacher" / "00000.parquet").write_bytes(b"")
    (ws.root / "embeddings" / "empty").mkdir()
    try:
        err = one_error_line(capsys, [*verb, "-w", str(ws.root), "--embedder", "open_clip:ViT-S-32"])
        assert "(it has: teacher)" in err, err
    finally:
        import shutil
        shutil.rmtree(ws.root / "embeddings")


def uninstalled_protocols() -> list[str]:
    """Storage protocols whose fsspec backend is not installed here (s3 unless s3fs is)."""
    wanted = ("s3", "gs", "abfs", "oss", "webhdfs")
    return [p for p in wanted if importlib.util.find_spec(known_implementations[p]["class"].split(".")[0]) is None]


def test_a_storage_url_without_its_package_says_what_to_install(tmp_path, capsys):
    protocols = uninstalled_protocols()
    assert protocols, "every storage backend is installed: nothing to test"
    for protocol in protocols:
        url = f"{protocol}://bucket/ws"
        for argv in (["sql", "-w", url, "SELECT 1"], ["ingest", "-w", str(tmp_path / "ws"), f"{url}/x.tar"]):
            err = one_error_line(capsys, argv)
            assert f"{protocol}://" in err and "pip install '" in err and "internal error" not in err, err
    if "s3" in protocols:
        assert "webdistill[s3]" in missing_storage_package(ImportError(known_implementations["s3"]["err"]))
    assert missing_storage_package(ImportError("No module named 'foo'")) is None
    assert missing_storage_package(ValueError("x")) is None
