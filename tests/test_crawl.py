"""The crawler against a real HTTP server on 127.0.0.1: what it keeps, what it refuses and why,
how often it asks, and that its shards resume and ingest."""
import hashlib
import json
import socket
import threading
import time
from collections import Counter, defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from curation.crawl import (
    AddressPolicy,
    CrawlConfig,
    CrawlError,
    UrlRow,
    crawl,
    crawl_shard,
    plan_shards,
    read_url_list,
)
from curation.errors import WouldOverwrite
from curation.ingest import ingest
from curation.workspace import Workspace
from flows import stage_runner
from flows.demo.crawl import decompression_bomb_png

from .conftest import encode, noise_image, run_cli

JPEG = encode(noise_image(1, (40, 30)), "JPEG", quality=90)
PNG = encode(noise_image(2, (33, 21)), "PNG")
WEBP = encode(noise_image(3, (24, 18)), "WEBP")
GIF = encode(noise_image(4, (20, 20)), "GIF")
SIZES = {"/a.jpg": (40, 30), "/b.png": (33, 21), "/c.webp": (24, 18)}
IMAGES = {"/a.jpg": (JPEG, "image/jpeg"), "/b.png": (PNG, "image/png"), "/c.webp": (WEBP, "image/webp"),
          "/anim.gif": (GIF, "image/gif"), "/bomb.png": (decompression_bomb_png(), "image/png"),
          "/truncated.jpg": (JPEG[: len(JPEG) // 2], "image/jpeg")}
HTML = b"<!DOCTYPE html><html><head><title>Not an image</title></head><body>hello</body></html>"
MAX_BYTES = 100_000  # above the bomb PNG (48 KB), so the bomb is caught by the decoder, not by size
STREAM_TOTAL, STREAM_CHUNK = 16 * 2**20, 64 * 1024  # 256 chunks, 10 ms apart: 2.6 s if read in full


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # the default 5 drops SYNs when 16 requests start at once: spurious connect timeouts


class ImageServer:
    """A real HTTP/1.0 server in a thread, counting hits per path (with query) and their times."""

    def __init__(self, host: str = "127.0.0.1"):
        self.hits: Counter = Counter()
        self.times: dict[str, list[float]] = defaultdict(list)
        self.lock = threading.Lock()
        self.sleepy_now = self.sleepy_max = 0
        self.stream_sent = 0
        self.stream_done = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                path = urlsplit(self.path).path
                with server.lock:
                    server.hits[self.path] += 1
                    server.times[self.path].append(time.monotonic())
                    n = server.hits[self.path]
                route = getattr(server, "route_" + path.strip("/").replace("-", "_").replace(".", "_"), None)
                if path in IMAGES:
                    self.reply(200, *IMAGES[path])
                elif route is not None:
                    route(self, n)
                else:
                    self.reply(404, HTML, "text/html")

            def reply(self, code, body=b"", ctype=None, headers=()):
                self.send_response(code)
                if ctype:
                    self.send_header("Content-Type", ctype)
                for k, v in headers:
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = _Server((host, 0), Handler)
        self.httpd.handle_error = lambda request, address: None  # clients hang up on purpose here
        self.base = f"http://{host}:{self.httpd.server_port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return self.base + path

    def total_hits(self) -> int:
        with self.lock:
            return sum(self.hits.values())

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()

    # Routes: route_<path with - and . as _>(handler, nth hit of this path).
    def route_html_as_jpeg(self, h, n):
        h.reply(200, HTML, "image/jpeg")

    def route_png_as_html(self, h, n):
        h.reply(200, PNG, "text/html; charset=utf-8")

    def route_flaky(self, h, n):
        h.reply(500, b"busy", "text/plain") if n <= 2 else h.reply(200, PNG, "image/png")

    def route_unavailable(self, h, n):
        h.reply(503, b"down", "text/plain")

    def route_slow(self, h, n):
        time.sleep(2.0)
        h.reply(200, JPEG, "image/jpeg")

    def route_redirect(self, h, n):
        h.reply(302, headers=[("Location", "/b.png")])

    def route_redirect_loop(self, h, n):
        h.reply(302, headers=[("Location", "/redirect-loop")])

    def route_redirect_ftp(self, h, n):
        h.reply(302, headers=[("Location", "ftp://127.0.0.1/a.jpg")])

    def route_redirect_to(self, h, n):
        h.reply(302, headers=[("Location", parse_qs(urlsplit(h.path).query)["u"][0])])

    def route_big_declared(self, h, n):
        h.reply(200, JPEG[:4] + bytes(10 * MAX_BYTES), "image/jpeg")

    def route_big_stream(self, h, n):
        """An endless-looking JPEG with no Content-Length, trickled out slowly."""
        h.send_response(200)
        h.send_header("Content-Type", "image/jpeg")
        h.end_headers()
        try:
            for i in range(STREAM_TOTAL // STREAM_CHUNK):
                h.wfile.write((JPEG[:4] if i == 0 else b"") + bytes(STREAM_CHUNK))
                h.wfile.flush()
                self.stream_sent += STREAM_CHUNK
                time.sleep(0.01)
        except OSError:
            pass  # the client hung up, as it should
        finally:
            self.stream_done.set()

    def route_sleepy(self, h, n):
        with self.lock:
            self.sleepy_now += 1
            self.sleepy_max = max(self.sleepy_max, self.sleepy_now)
        time.sleep(0.2)
        with self.lock:
            self.sleepy_now -= 1
        h.reply(200, JPEG, "image/jpeg")


@pytest.fixture(scope="module")
def server():
    srv = ImageServer()
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def unanswered_port():
    """A port whose accept queue is full: new connections hang in SYN, so connecting times out."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(3):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        fillers.append(s)
    time.sleep(0.1)
    yield port
    for s in fillers + [listener]:
        s.close()


def fast_config(**kw) -> CrawlConfig:
    base = dict(timeout_s=0.5, connect_timeout_s=0.2, max_bytes=MAX_BYTES, retries=2, backoff_s=0.05,
                concurrency=8, allow_private=True)
    return CrawlConfig(**(base | kw))


# path -> (status, error_kind, attempts), worked out from the routes above
EXPECTED = {
    "/a.jpg": ("success", None, 1),
    "/b.png": ("success", None, 1),
    "/c.webp": ("success", None, 1),
    "/redirect": ("success", None, 1),
    "/flaky": ("success", None, 3),  # 500, 500, then the image
    "/missing": ("failed_to_download", "http_error", 1),  # 4xx: never retried
    "/unavailable": ("failed_to_download", "http_error", 3),
    "/html-as-jpeg": ("failed_to_decode", "bad_magic", 1),
    "/png-as-html": ("failed_to_download", "bad_content_type", 1),
    "/big-declared": ("failed_to_download", "too_large", 1),
    "/big-stream": ("failed_to_download", "too_large", 1),
    "/slow": ("failed_to_download", "timeout", 3),
    "/redirect-loop": ("failed_to_download", "too_many_redirects", 1),
    "/redirect-ftp": ("failed_to_download", "bad_scheme", 1),
    "/anim.gif": ("failed_to_decode", "unsupported_format", 1),
    "/bomb.png": ("failed_to_decode", "decompression_bomb", 1),
    "/truncated.jpg": ("failed_to_decode", "truncated_image", 1),
    "unanswered": ("failed_to_download", "connect_timeout", 3),
}
SERVED = {"/a.jpg": (JPEG, "jpg"), "/b.png": (PNG, "png"), "/c.webp": (WEBP, "webp"),
          "/redirect": (PNG, "png"), "/flaky": (PNG, "png")}


@pytest.fixture(scope="module")
def crawled(server, unanswered_port, tmp_path_factory):
    """One crawl over every case, from a jsonl URL list: 18 URLs in shards of 8, two shards at a time."""
    root = tmp_path_factory.mktemp("crawl")
    urls = {p: server.url(p) for p in EXPECTED if p != "unanswered"}
    urls["unanswered"] = f"http://127.0.0.1:{unanswered_port}/a.jpg"
    lines = [{"url": u, "caption": None if p == "/c.webp" else f"caption of {p}"} for p, u in urls.items()]
    url_list = root / "urls.jsonl"
    url_list.write_text("".join(json.dumps(line) + "\n" for line in lines))
    start = time.perf_counter()
    summary = crawl(url_list, root / "out", fast_config(shard_size=8), workers=2, progress=False)
    seconds = time.perf_counter() - start
    rows = pq.read_table(sorted((root / "out").glob("*.parquet"))).to_pylist()
    return {"out": root / "out", "urls": urls, "summary": summary, "seconds": seconds,
            "rows": {r["url"]: r for r in rows}, "row_list": rows}


def test_every_url_gets_its_status_kind_and_attempts(crawled):
    rows = crawled["rows"]
    assert len(crawled["row_list"]) == len(EXPECTED)
    got = {p: (rows[u]["status"], rows[u]["error_kind"], rows[u]["attempts"]) for p, u in crawled["urls"].items()}
    assert got == EXPECTED
    for url in crawled["urls"].values():
        row = rows[url]
        assert (row["error_message"] is None) == (row["status"] == "success")
        assert row["error_message"] is None or "\n" not in row["error_message"]
    u = crawled["urls"]
    assert rows[u["/missing"]]["http_status"] == 404 and "404" in rows[u["/missing"]]["error_message"]
    assert rows[u["/unavailable"]]["http_status"] == 503
    assert "Content-Length" in rows[u["/big-declared"]]["error_message"]
    assert "streaming" in rows[u["/big-stream"]]["error_message"]
    assert "text/html" in rows[u["/png-as-html"]]["error_message"]
    assert "<!DOCTYPE" in rows[u["/html-as-jpeg"]]["error_message"]
    assert rows[u["/redirect"]]["final_url"] == u["/b.png"]
    s = crawled["summary"]
    assert (s.successes, s.failures, s.skipped, s.failed) == (5, 13, 0, {})
    assert [r.shard for r in s.shards] == ["00000", "00001", "00002"]
    # 2 extra attempts each for /flaky, /unavailable, /slow and the unanswered port
    assert sum(r.retries for r in s.shards) == 8
    assert crawled["seconds"] < 10


def test_keys_follow_the_list_order(crawled):
    keys = [r["key"] for r in crawled["row_list"]]
    expected = [f"{i // 8:05d}{i % 8:04d}" for i in range(len(EXPECTED))]
    assert keys == expected
    assert [r["url"] for r in crawled["row_list"]] == list(crawled["urls"].values())


def test_server_hits_show_retries_only_where_due(server, crawled):
    hits = server.hits
    assert hits["/flaky"] == 3 and hits["/unavailable"] == 3 and hits["/slow"] == 3
    assert hits["/missing"] == 1 and hits["/html-as-jpeg"] == 1 and hits["/big-stream"] == 1
    assert hits["/redirect"] == 1 and hits["/b.png"] == 2  # once directly, once through the redirect
    assert hits["/redirect-loop"] == 6  # the first request plus max_redirects=5 hops, then it gives up
    t = server.times["/unavailable"]
    # exponential backoff: 0.05 s then 0.1 s (a constant backoff would give 0.05 twice)
    assert t[1] - t[0] >= 0.05 and t[2] - t[1] >= 0.1


def test_oversized_stream_is_aborted_not_read(server, crawled):
    assert server.stream_done.wait(2.0), "the server still streams: the crawler kept reading"
    assert server.stream_sent < STREAM_TOTAL // 2
    row = crawled["rows"][crawled["urls"]["/big-stream"]]
    assert row["seconds"] < 0.5  # refused well before the 0.5 s timeout


def test_tar_members_read_with_plain_webdataset(crawled):
    samples = []
    for tar in sorted(crawled["out"].glob("*.tar")):
        samples += list(wds.WebDataset(str(tar), shardshuffle=False, empty_check=False))
    by_url = {json.loads(s["json"])["url"]: s for s in samples}
    urls = crawled["urls"]
    assert set(by_url) == {urls[p] for p in SERVED}
    for path, (data, ext) in SERVED.items():
        sample = by_url[urls[path]]
        assert sample[ext] == data  # the original bytes, not re-encoded
        captioned = {"txt"} if path != "/c.webp" else set()
        assert set(sample) - {"__key__", "__url__", "__local_path__"} == {ext, "json"} | captioned
        meta = json.loads(sample["json"])
        w, h = SIZES.get(path, SIZES["/b.png"])
        assert (meta["width"], meta["height"], meta["original_width"], meta["original_height"]) == (w, h, w, h)
        assert meta["sha256"] == hashlib.sha256(data).hexdigest()
        assert meta["status"] == "success" and meta["error_message"] is None
        assert meta["key"] == sample["__key__"] == crawled["rows"][urls[path]]["key"]
        if path == "/c.webp":
            assert meta["caption"] is None
        else:
            assert sample["txt"].decode() == meta["caption"] == f"caption of {path}"


def test_stats_files_match_the_rows(crawled):
    for name in ("00000", "00001", "00002"):
        stats = json.loads((crawled["out"] / f"{name}_stats.json").read_text())
        rows = [r for r in crawled["row_list"] if r["key"].startswith(name)]
        assert stats["count"] == len(rows)
        assert stats["successes"] == sum(r["status"] == "success" for r in rows)
        assert stats["failed_to_download"] + stats["failed_to_decode"] + stats["successes"] == len(rows)
    assert sum(json.loads(p.read_text())["successes"] for p in crawled["out"].glob("*_stats.json")) == 5


def test_shards_ingest(crawled, tmp_path):
    summary = ingest(Workspace(tmp_path / "ws"), [str(crawled["out"])], workers=1, progress=False)
    assert (summary.accepted, summary.rejected, summary.failed) == (5, 0, {})
    samples = pq.read_table(tmp_path / "ws" / "samples").to_pylist()
    assert sorted(s["sha256"] for s in samples) == sorted(hashlib.sha256(d).hexdigest() for d, _ in SERVED.values())
    assert {s["url"] for s in samples} == {crawled["urls"][p] for p in SERVED}


def test_concurrency_is_bounded(server, tmp_path):
    urls = [server.url(f"/sleepy?n={i}") for i in range(9)]
    start = time.perf_counter()
    summary = crawl(urls, tmp_path / "out", fast_config(concurrency=3, shard_size=9), progress=False)
    assert summary.successes == 9
    assert server.sleepy_max == 3  # never more than 3 at once, and the 3 were used
    assert time.perf_counter() - start >= 3 * 0.2  # 9 requests of 0.2 s, 3 at a time


def test_private_addresses_refused_before_any_request(server, tmp_path):
    port = server.httpd.server_port
    before = server.total_hits()
    urls = [f"http://127.0.0.1:{port}/a.jpg", f"http://localhost:{port}/b.png", f"http://[::1]:{port}/a.jpg",
            f"http://[::ffff:127.0.0.1]:{port}/a.jpg", f"ftp://127.0.0.1:{port}/a.jpg", "file:///etc/passwd", ""]
    crawl(urls, tmp_path / "out", fast_config(allow_private=False), progress=False)
    rows = pq.read_table(tmp_path / "out" / "00000.parquet").to_pylist()
    assert [(r["status"], r["error_kind"]) for r in rows] == (
        [("failed_to_download", "blocked_address")] * 4 + [("failed_to_download", "bad_scheme")] * 2
        + [("failed_to_download", "bad_url")])
    assert [r["error_message"] for r in rows[:4]] == [
        "127.0.0.1 is loopback", "localhost resolves to an address refused: 127.0.0.1 is loopback",
        "::1 is loopback", "127.0.0.1 is loopback"]
    assert all(r["attempts"] == 1 for r in rows)
    assert server.total_hits() == before  # no request reached the server


def test_redirect_to_a_private_address_refused(server, tmp_path):
    other = ImageServer("127.0.0.2")  # loopback too, but not in allowed_networks
    try:
        target = other.url("/a.jpg")
        urls = [server.url("/a.jpg?direct"), server.url(f"/redirect-to?u={target}")]
        config = fast_config(allow_private=False, allowed_networks=("127.0.0.1/32",))
        crawl(urls, tmp_path / "out", config, progress=False)
        rows = pq.read_table(tmp_path / "out" / "00000.parquet").to_pylist()
        assert rows[0]["status"] == "success"  # the allowed network is reachable
        assert (rows[1]["error_kind"], rows[1]["error_message"]) == ("blocked_address", "127.0.0.2 is loopback")
        assert server.hits[f"/redirect-to?u={target}"] == 1 and other.total_hits() == 0
    finally:
        other.close()


@pytest.mark.parametrize("address,reason", [
    ("8.8.8.8", None), ("2001:4860:4860::8888", None),
    ("127.0.0.1", "127.0.0.1 is loopback"), ("10.1.2.3", "10.1.2.3 is private"),
    ("192.168.0.1", "192.168.0.1 is private"), ("169.254.169.254", "169.254.169.254 is link-local"),
    ("fe80::1%eth0", "fe80::1 is link-local"), ("224.0.0.1", "224.0.0.1 is multicast"),
    ("0.0.0.0", "0.0.0.0 is unspecified"), ("::ffff:10.0.0.1", "10.0.0.1 is private"),
    ("100.64.0.1", "100.64.0.1 is not a global address"),
])
def test_address_policy(address, reason):
    assert AddressPolicy().refusal(address) == reason
    # --allow-private opens loopback and private ranges, never link-local, multicast or 0.0.0.0
    # (tests/security/test_crawl_networks.py covers those)
    special = ("link-local", "multicast", "unspecified")
    still_refused = reason if reason and reason.endswith(special) else None
    assert AddressPolicy(allow_private=True).refusal(address) == still_refused


def write_list(path: Path, urls: list[str], captions: list[str]) -> Path:
    pq.write_table(pa.table({"url": urls, "caption": captions}), path)
    return path


def test_resume_skips_finished_shards_and_redoes_changed_or_missing_ones(server, tmp_path):
    urls = [server.url(f"/a.jpg?resume={i}") for i in range(6)]
    captions = [f"c{i}" for i in range(6)]
    out = tmp_path / "out"
    url_list = write_list(tmp_path / "urls.parquet", urls, captions)
    config = fast_config(shard_size=2)
    first = crawl(url_list, out, config, progress=False)
    assert (first.successes, first.skipped) == (6, 0)
    hits = lambda: [server.hits[f"/a.jpg?resume={i}"] for i in range(6)]  # noqa: E731
    assert hits() == [1] * 6

    again = crawl(url_list, out, config, progress=False)
    assert (again.skipped, hits()) == (3, [1] * 6)
    # tuning timeouts or concurrency does not redo finished work
    assert crawl(url_list, out, fast_config(shard_size=2, timeout_s=2, concurrency=2), progress=False).skipped == 3

    for name in ("00001.tar", "00001.parquet", "00001_stats.json"):
        (out / name).unlink()
    redo = crawl(url_list, out, config, progress=False)
    assert [r.skipped for r in redo.shards] == [True, False, True]
    assert hits() == [1, 1, 2, 2, 1, 1]

    captions[5] = "a new caption"
    redo = crawl(write_list(url_list, urls, captions), out, config, progress=False)
    assert [r.skipped for r in redo.shards] == [True, True, False]
    assert hits() == [1, 1, 2, 2, 2, 2]
    last = list(wds.WebDataset(str(out / "00002.tar"), shardshuffle=False))
    assert last[1]["txt"] == b"a new caption"


def _shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def _first_list(server, tmp_path: Path, tag: str) -> tuple[list[str], Path, Path]:
    """Five URLs crawled in shards of 2 (the last shard holds one): the folder a second list meets."""
    urls = [server.url(f"/a.jpg?{tag}={i}") for i in range(5)]
    out = tmp_path / "out"
    url_list = write_list(tmp_path / "first.parquet", urls, [f"c{i}" for i in range(5)])
    assert crawl(url_list, out, fast_config(shard_size=2), progress=False).successes == 5
    return urls, url_list, out


# (the second list from the first one's URLs, its shard size): each one would delete a committed shard
OTHER_LISTS = {
    "other URLs": (lambda urls: [u.replace("/a.jpg", "/b.png") for u in urls], 2, "00000"),
    "one URL changed": (lambda urls: urls[:3] + [urls[3].replace("/a.jpg", "/missing")] + urls[4:], 2, "00001"),
    "a URL inserted": (lambda urls: urls[:1] + [urls[0].replace("/a.jpg", "/missing")] + urls[1:], 2, "00000"),
    "URLs cut from the end": (lambda urls: urls[:3], 2, "00001"),
    # shard 00000 of 3 starts with the old 00000's two URLs (as a grown last shard would), 00001 does not
    "another shard size": (lambda urls: urls, 3, "00001"),
}


@pytest.mark.parametrize("case", OTHER_LISTS)
def test_a_crawl_of_another_list_into_a_used_folder_is_refused_unless_overwrite(server, tmp_path, case):
    make, shard_size, clash = OTHER_LISTS[case]
    urls, _, out = _first_list(server, tmp_path, f"other{list(OTHER_LISTS).index(case)}")
    before, hits = _shard_bytes(out), server.total_hits()
    other = write_list(tmp_path / "second.parquet", make(urls), [None] * len(make(urls)))
    with pytest.raises(WouldOverwrite, match=rf"shard {clash} in .*another URL list.*--out.*--overwrite"):
        crawl(other, out, fast_config(shard_size=shard_size), progress=False)
    with pytest.raises(WouldOverwrite):  # a flow's mapper plans the shards itself: refused alike, before any task
        stage_runner.run_crawl(str(other), str(out), fast_config(shard_size=shard_size),
                               map_shards=stage_runner.in_process, progress=False)
    assert (_shard_bytes(out), server.total_hits()) == (before, hits)  # nothing deleted, nothing asked
    replaced = crawl(other, out, fast_config(shard_size=shard_size), progress=False, overwrite=True)
    assert replaced.shards and not all(r.skipped for r in replaced.shards)
    rows = pq.read_table(sorted(out.glob("*.parquet")), columns=["url"])["url"].to_pylist()
    assert rows[:len(make(urls))] == make(urls)


def test_the_same_list_resumes_and_a_grown_list_extends_without_overwrite(server, tmp_path):
    urls, url_list, out = _first_list(server, tmp_path, "grown")
    (out / "00001.parquet").unlink()  # a shard a killed run did not commit is redone, not refused
    assert [r.skipped for r in crawl(url_list, out, fast_config(shard_size=2), progress=False).shards] == \
        [True, False, True]
    # new captions and acceptance limits: the same URLs, so the shards are redone, not refused
    captions, config = [f"new {i}" for i in range(5)], fast_config(shard_size=2, max_bytes=MAX_BYTES - 1)
    assert not any(r.skipped for r in crawl(write_list(url_list, urls, captions), out, config, progress=False).shards)
    grown = urls + [server.url(f"/a.jpg?grown={i}") for i in (5, 6)]
    done = crawl(write_list(tmp_path / "grown.parquet", grown, captions + [None, None]), out, config, progress=False)
    assert [r.skipped for r in done.shards] == [True, True, False, False]  # the partial last shard grew
    assert pq.read_table(out / "00002.parquet")["url"].to_pylist() == grown[4:6]


def test_the_cli_refuses_another_list_in_one_line_and_overwrite_replaces(server, tmp_path):
    urls, _, out = _first_list(server, tmp_path, "cli")
    other = write_list(tmp_path / "other.parquet", [u.replace("/a.jpg", "/c.webp") for u in urls], [None] * 5)
    args = ("crawl", str(other), "--out", str(out), "--shard-size", "2", "--allow-private", "--retries", "0")
    refused = run_cli(*args)
    assert refused.returncode == 2 and refused.stdout == ""
    assert refused.stderr.count("\n") == 1 and "--overwrite" in refused.stderr and "00000" in refused.stderr
    replaced = run_cli(*args, "--overwrite")
    assert replaced.returncode == 0, replaced.stderr
    assert "3 shard(s) crawled" in replaced.stdout
    assert "--overwrite" in run_cli("crawl", "--help").stdout


def test_a_crash_mid_shard_leaves_no_files(server, tmp_path):
    plan = plan_shards([UrlRow(server.url(f"/a.jpg?crash={i}")) for i in range(5)], 5)[0]
    out = tmp_path / "out"
    done = []

    def crash_after_two():
        done.append(1)
        if len(done) == 2:
            raise KeyboardInterrupt("stopped mid-shard")

    with pytest.raises(KeyboardInterrupt):
        crawl_shard(plan, out, fast_config(), on_url=crash_after_two)
    assert sorted(p.name for p in out.iterdir()) == []  # not even a temporary
    # A killed process cannot clean up: its temporaries are removed by the next run of that shard.
    (out / ".00000.tar.x1y2.tmp").write_bytes(b"half a tar")
    result = crawl_shard(plan, out, fast_config())
    assert (result.n_success, result.skipped) == (5, False)
    assert sorted(p.name for p in out.iterdir()) == ["00000.parquet", "00000.tar", "00000_stats.json"]


def test_url_list_formats_read_alike(tmp_path):
    table = pa.table({"url": ["http://a.example/1.jpg", "http://b.example/2.png", None],
                      "caption": ["one", None, "three"], "other": [1, 2, 3]})
    pq.write_table(table, tmp_path / "l.parquet")
    pa_csv.write_csv(table, tmp_path / "l.csv")
    (tmp_path / "l.jsonl").write_text("".join(json.dumps(r) + "\n" for r in table.to_pylist()))
    expected = [UrlRow("http://a.example/1.jpg", "one"), UrlRow("http://b.example/2.png", None), UrlRow("", "three")]
    for name in ("l.parquet", "l.jsonl"):
        assert read_url_list(tmp_path / name) == expected
    # CSV cannot tell an empty caption from a missing one
    assert [r.url for r in read_url_list(tmp_path / "l.csv")] == [r.url for r in expected]
    (tmp_path / "urls_only.csv").write_text("url\nhttp://a.example/x.jpg\n")
    assert read_url_list(tmp_path / "urls_only.csv") == [UrlRow("http://a.example/x.jpg", None)]


@pytest.mark.parametrize("content,name,message", [
    ("link,caption\nhttp://a/x.jpg,x\n", "l.csv", "has no 'url' column (columns: link, caption)"),
    ("url\n", "l.csv", "has no rows"),
    ("http://a/x.jpg\n", "l.txt", "unknown format '.txt'"),
    ('{"url": "http://a/x.jpg"\n', "l.jsonl", "cannot read URL list"),
    (None, "absent.parquet", "URL list not found"),
])
def test_bad_url_lists_are_one_line_errors(tmp_path, content, name, message):
    if content is not None:
        (tmp_path / name).write_text(content)
    with pytest.raises(CrawlError) as err:
        read_url_list(tmp_path / name)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_bad_config_is_a_one_line_error():
    for kw, message in [({"concurrency": 0}, "concurrency must be > 0"),
                        ({"allowed_formats": ("bmp",)}, "allowed_formats"),
                        ({"allowed_networks": ("10.0.0.0/33",)}, "allowed_networks")]:
        with pytest.raises(CrawlError, match=message):
            CrawlConfig(**kw)


def test_plan_is_deterministic():
    rows = [UrlRow(f"http://x.example/{i}.jpg") for i in range(7)]
    plans = plan_shards(rows, 3)
    assert [p.name for p in plans] == ["00000", "00001", "00002"]
    assert [p.keys for p in plans] == [("000000000", "000000001", "000000002"),
                                       ("000010000", "000010001", "000010002"), ("000020000",)]
    assert plans[2].rows == (rows[6],)
    wide = plan_shards(rows, 20_000)  # a shard of 20,000 needs five digits for the index
    assert wide[0].keys[:2] == ("0000000000", "0000000001")
