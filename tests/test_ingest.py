import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest

from curation import catalog
from curation.errors import ShardNotFound
from curation.ingest import ingest, make_sample_id
from curation.workspace import Workspace
from flows.demo.crawl import decompression_bomb_png

from .conftest import ROOT, encode, meta, noise_image, write_tar


def handmade_shard(path: Path) -> Path:
    """One sample of every kind, with known outcomes."""
    good = encode(noise_image(1), "JPEG")
    png = encode(noise_image(2), "PNG")
    return write_tar(path, [
        {"__key__": "000", "jpg": good, "json": meta("000"), "txt": "a"},
        {"__key__": "001", "png": png, "json": meta("001")},
        {"__key__": "002", "webp": encode(noise_image(3), "WEBP"), "txt": "only a txt caption"},
        {"__key__": "003", "jpg": good, "json": meta("003")},  # exact duplicate of 000
        {"__key__": "004", "jpg": good[: len(good) // 2], "json": meta("004")},
        {"__key__": "005", "png": png[:300] + bytes(300) + png[600:], "json": meta("005")},
        {"__key__": "006", "jpg": b"<!DOCTYPE html><html>not found</html>", "json": meta("006")},
        {"__key__": "007", "json": meta("007"), "txt": "no image"},
        {"__key__": "008", "png": decompression_bomb_png(), "json": meta("008")},
        {"__key__": "009", "jpg": good, "json": b'{"url": "https://x.example/9.jpg", "caption": '},
        {"__key__": "010", "png": encode(noise_image(4, (4, 4)), "PNG"), "json": meta("010")},
    ])


EXPECTED_REJECTS = {
    "004": "truncated_image", "005": "corrupt_image", "006": "not_an_image", "007": "missing_image",
    "008": "decompression_bomb", "009": "bad_json", "010": "too_small",
}


def test_handmade_shard_exact_counts_and_reasons(tmp_path):
    shard = handmade_shard(tmp_path / "crawl" / "part-0.tar")
    ws = Workspace(tmp_path / "ws")
    summary = ingest(ws, [str(shard)], workers=1, progress=False)
    assert (summary.accepted, summary.rejected) == (4, 7)
    catalog.refresh(ws)
    rejects = {r["key"]: r["reason"] for r in catalog.query(ws, "SELECT key, reason FROM rejects").to_pylist()}
    assert rejects == EXPECTED_REJECTS
    rows = {r["key"]: r for r in catalog.query(ws, "SELECT * FROM samples").to_pylist()}
    assert sorted(rows) == ["000", "001", "002", "003"]
    assert rows["000"]["sha256"] == rows["003"]["sha256"] != rows["001"]["sha256"]
    assert (rows["001"]["format"], rows["002"]["format"], rows["000"]["width"]) == ("png", "webp", 64)
    assert rows["000"]["url"] == "https://img.example/000.jpg" and rows["000"]["caption"] == "caption 000"
    assert rows["002"]["caption"] == "only a txt caption"
    assert rows["000"]["sample_id"] == make_sample_id("part-0", "000")
    dups = catalog.query(ws, "SELECT count(*) AS n FROM samples GROUP BY sha256 HAVING n > 1").to_pylist()
    assert dups == [{"n": 2}]


def test_truncated_tar_keeps_readable_samples(tmp_path):
    samples = [{"__key__": f"{i:03d}", "jpg": encode(noise_image(i, (96, 96)), "JPEG", quality=95),
                "json": meta(f"{i:03d}")}
               for i in range(10)]
    path = write_tar(tmp_path / "cut.tar", samples)
    with tarfile.open(path) as tar:
        member = next(m for m in tar.getmembers() if m.name == "006.jpg")
    with open(path, "r+b") as fh:
        fh.truncate(member.offset_data + member.size // 2)
    ws = Workspace(tmp_path / "ws")
    summary = ingest(ws, [str(path)], workers=1, progress=False)
    assert summary.accepted == 6 and not summary.failed
    catalog.refresh(ws)
    rejects = catalog.query(ws, "SELECT key, reason FROM rejects").to_pylist()
    assert rejects == [{"key": "006", "reason": "truncated_tar"}]


def test_garbage_file_named_tar_is_one_reject_not_a_crash(tmp_path):
    bad = tmp_path / "garbage.tar"
    bad.write_bytes(os.urandom(5000))
    good = handmade_shard(tmp_path / "good.tar")
    ws = Workspace(tmp_path / "ws")
    summary = ingest(ws, [str(bad), str(good)], workers=2, progress=False)
    assert summary.accepted == 4 and not summary.failed
    catalog.refresh(ws)
    rejects = catalog.query(ws, "SELECT reason FROM rejects WHERE shard = 'garbage'").to_pylist()
    assert rejects == [{"reason": "truncated_tar"}]


def test_demo_crawl_matches_ground_truth(small_crawl, tmp_path):
    ws = Workspace(tmp_path / "ws")
    summary = ingest(ws, [str(small_crawl / "crawl" / "{00000..00002}.tar")], workers=2, progress=False)
    assert len(summary.shards) == 3 and not summary.failed and not summary.missing
    catalog.refresh(ws)
    con = duckdb.connect()
    con.execute(f"CREATE VIEW truth AS SELECT * FROM '{small_crawl}/crawl/ground_truth.parquet'")
    con.execute(f"CREATE VIEW samples AS SELECT * FROM '{ws.root}/samples/*.parquet'")
    con.execute(f"CREATE VIEW rejects AS SELECT * FROM '{ws.root}/rejects/*.parquet'")
    accepted = set(con.sql("SELECT shard, key FROM samples").fetchall())
    clean = set(con.sql("SELECT shard, key FROM truth WHERE defect IS NULL").fetchall())
    assert accepted == clean
    got = dict(((s, k), r) for s, k, r in con.sql("SELECT shard, key, reason FROM rejects").fetchall())
    planted = dict(((s, k), d) for s, k, d in con.sql(
        "SELECT shard, key, defect FROM truth WHERE defect IS NOT NULL AND defect <> 'truncated_tar'").fetchall())
    first_lost = con.sql("SELECT shard, min(key) FROM truth WHERE defect = 'truncated_tar' GROUP BY shard").fetchall()
    assert len(first_lost) == 1
    planted[first_lost[0]] = "truncated_tar"  # the cut sample stands for everything after it
    assert got == planted
    # every planted exact duplicate whose original was accepted shares its sha256
    pairs = con.sql("""SELECT a.sha256 = b.sha256 FROM truth t
        JOIN samples a ON a.key = t.key JOIN samples b ON b.key = t.duplicate_of
        WHERE t.dup_kind = 'exact'""").fetchall()
    assert pairs and all(p for (p,) in pairs)
    near = con.sql("""SELECT a.sha256 <> b.sha256 FROM truth t
        JOIN samples a ON a.key = t.key JOIN samples b ON b.key = t.duplicate_of
        WHERE t.dup_kind = 'near'""").fetchall()
    assert near and all(p for (p,) in near)


def _snapshot(ws: Workspace) -> dict:
    return {p.relative_to(ws.root): p.stat().st_mtime_ns for p in ws.root.rglob("*.parquet")}


def test_rerun_is_idempotent_and_new_shards_are_incremental(small_crawl, tmp_path):
    ws = Workspace(tmp_path / "ws")
    crawl = small_crawl / "crawl"
    first = ingest(ws, [str(crawl / "00000.tar")], workers=1, progress=False)
    assert first.skipped == 0 and first.accepted > 0
    before = _snapshot(ws)
    again = ingest(ws, [str(crawl / "00000.tar")], workers=1, progress=False)
    assert again.skipped == 1 and _snapshot(ws) == before  # nothing rewritten
    more = ingest(ws, [str(crawl)], workers=2, progress=False)
    assert [r.skipped for r in more.shards] == [True, False, False]
    catalog.refresh(ws)
    n, distinct = catalog.query(ws, "SELECT count(*), count(DISTINCT sample_id) FROM samples").to_pylist()[0].values()
    assert n == distinct == first.accepted + sum(r.n_accepted for r in more.shards if not r.skipped)
    # other limits make a different artifact: that shard is redone, not duplicated
    from curation.validate import ValidationConfig
    redo = ingest(ws, [str(crawl / "00000.tar")], ValidationConfig(min_side=200), workers=1, progress=False)
    assert redo.skipped == 0
    unique = catalog.query(ws, "SELECT count(*) = count(DISTINCT sample_id) AS ok FROM samples").to_pylist()
    assert unique == [{"ok": True}]


def test_sample_ids_are_stable_across_locations(small_crawl, tmp_path):
    copy = tmp_path / "elsewhere"
    shutil.copytree(small_crawl / "crawl", copy)
    ids = []
    for src, name in ((small_crawl / "crawl", "a"), (copy, "b")):
        ws = Workspace(tmp_path / name)
        ingest(ws, [str(src / "00001.tar")], workers=1, progress=False)
        ids.append(pq.read_table(ws.root / "samples" / "00001.parquet").column("sample_id").to_pylist())
    assert ids[0] == ids[1] and len(set(ids[0])) == len(ids[0])


def test_shards_over_http_and_brace_patterns(small_crawl, tmp_path):
    import functools
    import http.server
    import threading

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(small_crawl / "crawl"))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        ws_http, ws_local = Workspace(tmp_path / "h"), Workspace(tmp_path / "l")
        s1 = ingest(ws_http, [f"http://127.0.0.1:{port}/{{00000..00001}}.tar"], workers=1, progress=False)
        s2 = ingest(ws_local, [str(small_crawl / "crawl" / "0000[01].tar")], workers=1, progress=False)
        assert not s1.failed and len(s1.shards) == 2 and len(s2.shards) == 2
        ids = lambda ws: sorted(pq.read_table(ws.root / "samples").column("sample_id").to_pylist())  # noqa: E731
        assert ids(ws_http) == ids(ws_local)
    finally:
        server.shutdown()


def test_missing_and_colliding_shards(small_crawl, tmp_path):
    ws = Workspace(tmp_path / "ws")
    summary = ingest(ws, [str(tmp_path / "nope.tar"), str(small_crawl / "crawl" / "00000.tar")],
                     workers=1, progress=False)
    assert summary.missing == [str(tmp_path / "nope.tar")] and len(summary.shards) == 1
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(small_crawl / "crawl" / "00000.tar", other / "00000.tar")
    with pytest.raises(ShardNotFound, match="--source"):
        ingest(ws, [str(small_crawl / "crawl" / "00000.tar"), str(other / "00000.tar")], progress=False)
    s = ingest(ws, [str(other / "00000.tar")], source="other", progress=False)
    assert [r.shard for r in s.shards] == ["other-00000"]


@pytest.mark.slow  # an ingest killed midway, then rerun
def test_sigkill_midway_then_rerun_loses_and_duplicates_nothing(small_crawl, tmp_path):
    # `pipe:` shards that wait before streaming: slow enough to be killed between shards
    parts = tmp_path / "parts"
    parts.mkdir()
    specs = []
    for i in range(8):
        dst = parts / f"p{i}.tar"
        shutil.copy(small_crawl / "crawl" / f"{i % 2:05d}.tar", dst)
        specs.append(f"pipe:sleep 0.4 && cat {dst}")
    killed = Workspace(tmp_path / "killed")
    cmd = [sys.executable, "-m", "flows.cli", "ingest", "-w", str(killed.root), "--workers", "1", *specs]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list((killed.root / "shards").glob("*.parquet")):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    committed = len(list((killed.root / "shards").glob("*.parquet")))
    assert 1 <= committed < 8, "the kill should land mid-way"
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{8 - committed} shard(s) ingested, {committed} unchanged" in rerun.stdout

    clean = Workspace(tmp_path / "clean")
    ingest(clean, specs, workers=2, progress=False)
    rows = lambda ws: sorted(pq.read_table(ws.root / "samples").select(["sample_id", "sha256"]).to_pylist(),  # noqa: E731
                             key=lambda r: r["sample_id"])
    got, want = rows(killed), rows(clean)
    assert got == want
    assert len({r["sample_id"] for r in got}) == len(got)
    rej = lambda ws: sorted(map(str, pq.read_table(ws.root / "rejects").select(["shard", "key", "reason"]).to_pylist()))  # noqa: E731
    assert rej(killed) == rej(clean)


def test_demo_crawl_without_fashion_keeps_its_size(tmp_path, monkeypatch):
    from flows.demo import sources as demo_sources
    from flows.demo.crawl import build_demo_crawl

    monkeypatch.setattr(demo_sources, "FASHION_DIR", tmp_path / "no-fashion-here")
    summary = build_demo_crawl(tmp_path / "demo", size=300, n_shards=2, workers=1, progress=False)
    assert summary["fashion"] is False and "fashion" not in summary["domains"]
    assert summary["samples"] == 300 and sum(summary["domains"].values()) == 300


@pytest.mark.parametrize("url, name", [
    ("/data/crawl/00012.tar", "00012"),
    ("https://host.example/crawl/00012.tar?sig=abc", "00012"),
    ("pipe:aws s3 cp s3://bucket/crawl/00007.tar -", "00007"),
    ("pipe:sleep 1 && cat /x/part-3.tar.gz", "part-3"),
])
def test_shard_names(url, name):
    from curation.shards import shard_name

    assert shard_name(url) == name
    assert shard_name(url, source="web") == f"web-{name}"
