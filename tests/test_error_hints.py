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


def test_an_unreachable_shard_url_says_so(tmp_path, capsys):
    for url in ("http://127.0.0.1:1/x.tar", "https://127.0.0.1:1/{a,b}.tar"):
        err = one_error_line(capsys, ["ingest", "-w", str(tmp_path / "ws"), url])
        assert "cannot reach it" in err and "Cannot connect to host 127.0.0.1:1" in err, err


def test_a_url_list_given_to_ingest_points_to_crawl(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .conftest import write_tar
    lists = {"urls.parquet": None, "urls.csv": b"url\nhttp://x/a.jpg\n", "urls.jsonl": b'{"url": "http://x/a.jpg"}\n',
             "urls.json": b'[{"url": "http://x/a.jpg"}]', "urls.txt": b"http://x/a.jpg\n",
             "renamed-list.tar.parquet": None}
    for name, body in lists.items():
        if body is None:
            pq.write_table(pa.table({"url": ["http://x/a.jpg"]}), tmp_path / name)
        else:
            (tmp_path / name).write_bytes(body)
        err = one_error_line(capsys, ["ingest", "-w", str(tmp_path / "ws"), str(tmp_path / name)])
        assert "not a tar shard" in err and f"webdistill crawl {tmp_path / name}" in err, err
    assert not (tmp_path / "ws" / "samples").exists() or not any((tmp_path / "ws" / "samples").iterdir())
    # a real tar keeps working whatever its name says
    write_tar(tmp_path / "shard.txt", [{"__key__": "a", "txt": b"hello"}])
    assert main(["ingest", "-w", str(tmp_path / "ws2"), str(tmp_path / "shard.txt")]) in (0, 1)
    assert "not a tar shard" not in capsys.readouterr().err


@pytest.mark.parametrize("rows, hint", [
    (["http://127.0.0.1:9/a.jpg", "http://10.1.2.3/b.jpg"], "--allow-private"),
    (["ftp://x/y.jpg", "file:///etc/passwd"], "only http and https"),
])
def test_a_crawl_where_every_url_fails_exits_non_zero_with_a_hint(tmp_path, capsys, rows, hint):
    (tmp_path / "urls.csv").write_text("url\n" + "\n".join(rows) + "\n")
    argv = ["crawl", str(tmp_path / "urls.csv"), "--out", str(tmp_path / "out"), "--retries", "0"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("webdistill: error: not one of the 2 URLs was downloaded") and hint in err[-1], err


@pytest.mark.parametrize("loss, expected", [
    ("kdd", "unknown loss method 'kdd'"),
    ('{"method": "kd", "T": 0}', "T must be > 0"),
    ('{"method": "kd", "Tt": 2}', "did you mean 'T'"),
    ('{"method": "kd", "extra": [{"method": "kd3"}]}', "cannot be an extra"),
    ('{"method": "kd", "weights": {"kd": -1}}', "weights"),
])
def test_a_bad_loss_is_one_line_before_any_process_starts(ws, tmp_path, capsys, loss, expected):
    """No torchrun output, no job folder: the config is checked in the CLI's own process."""
    write_selection(ws)
    err = one_error_line(capsys, ["distill", "-w", str(ws.root), "--selection", "few", "--student", "tiny_cnn",
                                  "--loss", loss, "--name", "bad-loss"])
    assert expected in err and "torch.distributed" not in err, err
    assert not (ws.root / "students" / "bad-loss").exists()


def write_selection(ws: Workspace) -> None:
    if not (ws.root / "selections" / "few" / "manifest.json").exists():
        assert main(["select", "-w", str(ws.root), "--name", "few", "--sql",
                     "SELECT sample_id FROM candidates LIMIT 8"]) == 0


@pytest.mark.parametrize("device, expected", [("cuda", "no CUDA GPU"), ("cuda:7", "no CUDA GPU"),
                                              ("tpu", "unknown device"), ("gpu0", "unknown device")])
def test_a_device_this_machine_lacks_is_one_line(ws, small_teacher, capsys, device, expected):
    import torch
    if device.startswith("cuda") and torch.cuda.is_available():
        device = f"cuda:{torch.cuda.device_count()}"  # a GPU machine: one index past its last GPU
        expected = "CUDA GPU(s)"
    for verb in (["score", "--teacher", str(small_teacher), "--name", "dev"],
                 ["embed", "--embedder", "teacher", "--teacher", str(small_teacher)]):
        err = one_error_line(capsys, [verb[0], "-w", str(ws.root), *verb[1:], "--device", device])
        assert expected in err and "internal error" not in err, err
    assert not (ws.root / "scores" / "dev").exists()


@pytest.mark.parametrize("by", ["msp * NULL", "CASE WHEN msp > 2 THEN msp END"])
def test_a_score_null_in_the_run_is_named_as_written_with_the_run(ws, small_teacher, capsys, by):
    """A policy's score expression is named as the user wrote it, never by its internal column, and the
    error says which scoring run's candidates were used."""
    shown = repr(by)
    if not (ws.root / "scores" / "teacher-only").exists():
        assert main(["score", "-w", str(ws.root), "--teacher", str(small_teacher), "--name", "teacher-only"]) == 0
        capsys.readouterr()
    err = one_error_line(capsys, ["select", "-w", str(ws.root), "--name", "agree", "--policy", f"topk:k=5;by={by}"])
    assert f"needs the score {shown}, which is null on every candidate" in err, err
    assert "_expr_" not in err and "scoring run 'teacher-only'" in err, err
