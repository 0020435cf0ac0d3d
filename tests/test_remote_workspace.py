"""A workspace at an fsspec URL (here fsspec's memory filesystem): the CLI mirrors it locally, runs
the stage, and commits it back with the index written last; another machine (an empty cache) reads it."""
import io
import json
import shutil
from contextlib import redirect_stdout

import fsspec
import pytest

from curation import remote
from curation.remote import cache_dir, pull
from flows.cli import main


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setattr(remote, "CACHE", tmp_path / "cache")
    return tmp_path / "cache"


def _sql(url: str, query: str) -> list[dict]:
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["sql", "-w", url, query, "--format", "json"]) == 0
    return json.loads(out.getvalue())


def test_cli_stages_on_a_memory_workspace_are_seen_from_an_empty_cache(cache, small_crawl):
    url = "memory://webdistill-test/ws"
    assert main(["ingest", "-w", url, str(small_crawl / "crawl"), "--workers", "1"]) == 0
    fs = fsspec.filesystem("memory")
    index = json.loads(fs.cat("/webdistill-test/ws/_index.json"))
    shards = sorted(p for p in index if p.startswith("samples/"))
    assert len(shards) == 3 and "catalog.duckdb" in index
    local_count = _sql(url, "SELECT count(*) AS n FROM samples")[0]["n"]
    assert local_count > 300

    shutil.rmtree(cache_dir(url))  # another machine: nothing cached
    assert _sql(url, "SELECT count(*) AS n FROM samples")[0]["n"] == local_count
    assert _sql(url, "SELECT count(*) AS n FROM rejects")[0]["n"] > 0


def test_only_indexed_files_are_pulled_and_a_push_keeps_other_writers_commits(cache, tmp_path):
    url = "memory://webdistill-test/ws2"
    fs = fsspec.filesystem("memory")
    fs.pipe("/webdistill-test/ws2/samples/a.parquet", b"committed")
    fs.pipe("/webdistill-test/ws2/samples/half.parquet", b"uploaded, never committed")
    fs.pipe("/webdistill-test/ws2/_index.json", json.dumps(
        {"samples/a.parquet": remote.hashlib.sha256(b"committed").hexdigest()}).encode())
    root = tmp_path / "mirror"
    pulled = pull(url, root)
    assert (root / "samples" / "a.parquet").read_bytes() == b"committed"
    assert not (root / "samples" / "half.parquet").exists()

    # another writer commits b.parquet after our pull; our push must keep it
    fs.pipe("/webdistill-test/ws2/samples/b.parquet", b"theirs")
    theirs = json.loads(fs.cat("/webdistill-test/ws2/_index.json"))
    theirs["samples/b.parquet"] = remote.hashlib.sha256(b"theirs").hexdigest()
    fs.pipe("/webdistill-test/ws2/_index.json", json.dumps(theirs).encode())
    (root / "samples" / "c.parquet").write_bytes(b"ours")
    assert remote.push(url, root, pulled) == 1
    index = json.loads(fs.cat("/webdistill-test/ws2/_index.json"))
    assert set(index) == {"samples/a.parquet", "samples/b.parquet", "samples/c.parquet"}
    assert fs.cat("/webdistill-test/ws2/samples/c.parquet") == b"ours"


def test_a_corrupted_remote_file_is_refused(cache, tmp_path):
    url = "memory://webdistill-test/ws3"
    fs = fsspec.filesystem("memory")
    fs.pipe("/webdistill-test/ws3/samples/a.parquet", b"changed after commit")
    fs.pipe("/webdistill-test/ws3/_index.json", json.dumps({"samples/a.parquet": "0" * 64}).encode())
    with pytest.raises(remote.RemoteWorkspaceError, match="does not match its index"):
        pull(url, tmp_path / "m")
    assert not (tmp_path / "m" / "samples" / "a.parquet").exists()  # nothing half-written stays
