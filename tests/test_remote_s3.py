"""A workspace on object storage, against a real S3-compatible HTTP server on 127.0.0.1 (moto's
server mode, one per test session): the stages write through `-w s3://...`, the commit index is the
last object written and lists what was synced, two writers committing at once lose nothing, and a
reader sees only committed files. s3fs finds the server by AWS_ENDPOINT_URL, as it would any
S3-compatible store."""
import hashlib
import io
import json
import re
import socket
import subprocess
import sys
import time
from contextlib import redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import fsspec
import pytest

from curation import remote
from curation.remote import cache_dir
from flows.cli import main
from tests.faultkit import cli_cmd, cli_env
from tests.ports import free_port

BUCKET = "webdistill-test"


@dataclass
class S3Server:
    endpoint: str
    log: Path  # moto's request log: one line per HTTP request, in the order it served them

    def requests(self, method: str, prefix: str) -> list[tuple[str, int]]:
        """(key, status) of every `method` request under `prefix`, in order."""
        pattern = re.compile(rf'"{method} /{re.escape(prefix)}(\S*) HTTP/[\d.]+" (\d+)')
        return [(m[1], int(m[2])) for m in pattern.finditer(self.log.read_text())]


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """moto's S3 server on a free port, the bucket made, and the environment that points s3fs at it
    (in this process and in the CLI processes the tests start); stopped at the end of the session."""
    port, log = free_port(), tmp_path_factory.mktemp("moto") / "requests.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.1)
        with pytest.MonkeyPatch.context() as mp:
            for key, value in {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
                               "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
                mp.setenv(key, value)
            fsspec.filesystem("s3").mkdir(BUCKET)
            yield S3Server(f"http://127.0.0.1:{port}", log)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setattr(remote, "CACHE", tmp_path / "cache")
    return tmp_path / "cache"


def _fs():
    fs = fsspec.filesystem("s3")
    fs.invalidate_cache()
    return fs


def _sql(url: str, query: str) -> list[dict]:
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["sql", "-w", url, query, "--format", "json"]) == 0
    return json.loads(out.getvalue())


def _cli(args: list[str], cache: Path) -> subprocess.Popen:
    """`webdistill ARGS` as another machine runs it: its own process and its own cache."""
    return subprocess.Popen(cli_cmd(args), env=cli_env(WEBDISTILL_CACHE=str(cache)), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _index(prefix: str) -> dict[str, str]:
    return json.loads(_fs().cat(f"{prefix}/_index.json"))


def _objects(prefix: str) -> dict[str, bytes]:
    fs = _fs()
    return {p.removeprefix(prefix + "/"): fs.cat(p) for p in fs.find(prefix)}


def test_stages_write_through_s3_and_the_index_is_written_last(s3, cache, small_crawl, tmp_path):
    prefix = f"{BUCKET}/stages"
    url = f"s3://{prefix}"
    ingest = _cli(["ingest", "-w", url, str(small_crawl / "crawl"), "--workers", "1"], tmp_path / "machine-a")
    assert ingest.wait(timeout=120) == 0, ingest.stdout.read()

    puts = [(key, status) for key, status in s3.requests("PUT", prefix + "/")]
    assert puts and all(status == 200 for _, status in puts), puts
    assert puts[-1][0] == "_index.json" and [k for k, _ in puts].count("_index.json") == 1  # the commit, last
    index, objects = _index(prefix), _objects(prefix)
    assert set(index) == set(objects) - {"_index.json"}  # it lists every file synced, nothing more
    assert all(hashlib.sha256(objects[k]).hexdigest() == digest for k, digest in index.items())
    assert {k for k in index if k.startswith("samples/")} == {f"samples/0000{i}.parquet" for i in range(3)}

    # another machine (this process, an empty cache) queries it, then selects through it
    n = _sql(url, "SELECT count(*) AS n FROM samples")[0]["n"]
    assert n > 300
    assert main(["select", "-w", url, "--name", "first50", "--sql",
                 "SELECT sample_id FROM samples ORDER BY sample_id LIMIT 50", "--shard-size", "20"]) == 0
    index = _index(prefix)
    manifest = json.loads(_fs().cat(f"{prefix}/selections/first50/manifest.json"))
    assert sum(s["count"] for s in manifest["shards"]) == 50
    assert {f"selections/first50/{s['path']}" for s in manifest["shards"]} < set(index)
    assert s3.requests("PUT", prefix + "/")[-1][0] == "_index.json"


def test_two_writers_at_once_lose_nothing_and_a_reader_sees_only_commits(s3, cache, small_crawl, tmp_path):
    prefix = f"{BUCKET}/two-writers"
    url = f"s3://{prefix}"
    crawl = small_crawl / "crawl"
    writers = [_cli(["ingest", "-w", url, str(crawl / f"0000{i}.tar"), "--workers", "1"], tmp_path / f"machine-{i}")
               for i in (0, 1)]  # started together: their pushes overlap or nearly
    for w in writers:
        assert w.wait(timeout=120) == 0, w.stdout.read()
    index = _index(prefix)
    for i in (0, 1):  # each writer's artifacts are committed, whoever committed last
        for folder in ("samples", "shards", "rejects"):
            assert f"{folder}/0000{i}.parquet" in index, (folder, i, sorted(index))
    # the index was written with a conditional PUT: a refused one (412) means a writer re-merged
    statuses = [status for key, status in s3.requests("PUT", prefix + "/") if key == "_index.json"]
    assert statuses.count(200) == 2 and set(statuses) <= {200, 412}

    # a push in progress: a file uploaded but not committed, and a committed file being replaced
    fs = _fs()
    fs.pipe_file(f"{prefix}/samples/00002.parquet", fs.cat(f"{prefix}/samples/00000.parquet"))
    shards = {r["shard"] for r in _sql(url, "SELECT DISTINCT shard FROM samples")}
    assert shards == {"00000", "00001"}  # both writers' samples, and not the uncommitted file
    assert not (cache_dir(url) / "samples" / "00002.parquet").exists()
    fs.pipe_file(f"{prefix}/shards/00000.parquet", b"half a new version")
    with pytest.raises(remote.RemoteWorkspaceError, match="does not match its index"):
        remote.pull(url, tmp_path / "another-reader")


def test_a_commit_between_anothers_read_and_write_is_merged_not_overwritten(s3, tmp_path, monkeypatch):
    """The race the conditional PUT closes, made certain: B commits after A read the index and
    before A writes it. A's write is refused (412), A merges into B's index and commits again."""
    url = f"s3://{BUCKET}/race"
    mirrors = {name: tmp_path / name for name in "ab"}
    pulled = {name: remote.pull(url, root) for name, root in mirrors.items()}
    for name, root in mirrors.items():
        (root / "samples").mkdir(parents=True)
        (root / "samples" / f"{name}.parquet").write_bytes(name.encode() * 100)

    read_index, reads = remote._remote_index, []

    def read_then_let_b_commit(fs, base):
        out = read_index(fs, base)
        reads.append(out)
        if len(reads) == 1:  # A's first read: B commits before A writes
            monkeypatch.setattr(remote, "_remote_index", read_index)
            remote.push(url, mirrors["b"], pulled["b"])
        return out

    monkeypatch.setattr(remote, "_remote_index", read_then_let_b_commit)
    remote.push(url, mirrors["a"], pulled["a"])
    assert reads == [{}]  # A read the index once before B's commit (the rest went through the original)
    index = _index(f"{BUCKET}/race")
    assert set(index) == {"samples/a.parquet", "samples/b.parquet"}
    statuses = [s for key, s in s3.requests("PUT", f"{BUCKET}/race/") if key == "_index.json"]
    assert statuses == [200, 412, 200]  # B's commit, A's refused one, A's merged one
