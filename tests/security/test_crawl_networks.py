"""Attack class: the crawler reaching networks the user did not name. `--allow-private` (tests,
intranets) opens loopback and private ranges only; link-local (169.254.0.0/16, where clouds serve
instance credentials; fe80::/10), multicast, 0.0.0.0/8 and reserved ranges, in every spelling an
address may take, open only with `--allow-network CIDR`.

The decision function is tested directly for addresses other than 127.0.0.1 (a test never contacts
another address); the CLI runs end to end against a 127.0.0.1 server. The same function decides
every hop: IP-literal URLs, each redirect target and every DNS answer (curation/crawl.py)."""
import io
import json
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from curation.crawl import AddressPolicy, CrawlConfig, CrawlError
from flows.cli import main

# (address as it may arrive: URL host, DNS answer or redirect target; the network that names it;
#  a neighbour that naming it must not open)
SPECIAL = [
    ("169.254.169.254", "169.254.169.254/32", "169.254.169.253"),  # cloud instance metadata
    ("169.254.1.1", "169.254.0.0/16", "fe80::a9fe:101"),  # naming IPv4 link-local opens no IPv6 one
    ("fe80::1", "fe80::/64", "fe80:1::1"),
    ("fe80::1%eth0", "fe80::/64", "fe80:1::1%eth0"),
    ("::ffff:169.254.169.254", "169.254.169.254/32", "::ffff:169.254.169.253"),  # IPv4-mapped
    ("2002:a9fe:a9fe::1", "169.254.169.254/32", "2002:a9fe:101::1"),  # 6to4 around the metadata IP
    ("0.0.0.0", "0.0.0.0/32", "0.0.0.1"),
    ("0.1.2.3", "0.1.2.0/24", "0.2.0.1"),
    ("224.0.0.1", "224.0.0.1/32", "239.255.255.250"),
    ("ff02::1", "ff02::1/128", "ff02::2"),
    ("255.255.255.255", "255.255.255.255/32", "240.0.0.1"),
    ("fec0::1", "fec0::/64", "fec0:1::1"),
]


@pytest.mark.parametrize("address,network,neighbour", SPECIAL)
def test_allow_private_keeps_special_ranges_refused(address, network, neighbour):
    for policy in (AddressPolicy(), AddressPolicy.from_config(CrawlConfig(allow_private=True))):
        why = policy.refusal(address)
        assert why is not None and "\n" not in why and not why.endswith(("private", "loopback")), (address, why)


@pytest.mark.parametrize("address,network,neighbour", SPECIAL)
def test_a_named_network_opens_itself_and_nothing_more(address, network, neighbour):
    for private in (False, True):
        policy = AddressPolicy.from_config(CrawlConfig(allow_private=private, allowed_networks=(network,)))
        assert policy.refusal(address) is None
        assert policy.refusal(neighbour) is not None, neighbour


def test_private_and_global_addresses_keep_their_rules():
    """--allow-private still opens what tests and intranets need; global addresses stay reachable."""
    private = AddressPolicy.from_config(CrawlConfig(allow_private=True))
    for address in ("127.0.0.1", "::1", "10.1.2.3", "192.168.0.1", "fc00::1", "::ffff:10.0.0.1", "100.64.0.1"):
        assert AddressPolicy().refusal(address) is not None and private.refusal(address) is None, address
    for address in ("8.8.8.8", "2001:4860:4860::8888", "2002:808:808::1"):
        assert AddressPolicy().refusal(address) is None and private.refusal(address) is None, address


def test_networks_from_a_pipeline_yaml():
    """The crawl section of a pipeline YAML passes CrawlConfig fields: one CIDR or a list; bad ones are one line."""
    one = CrawlConfig(**{"allow_private": True, "allowed_networks": "169.254.169.254/32"})
    assert one.allowed_networks == ("169.254.169.254/32",)
    assert AddressPolicy.from_config(one).refusal("169.254.169.254") is None
    assert CrawlConfig(allowed_networks=["fe80::/10", "0.0.0.0/8"]).allowed_networks == ("fe80::/10", "0.0.0.0/8")
    for bad in ("10.0.0.0/33", "not-a-network", 5, ["fe80::/129"]):
        with pytest.raises(CrawlError) as refused:
            CrawlConfig(allowed_networks=bad)
        assert "allowed_networks" in str(refused.value) and "\n" not in str(refused.value)


@pytest.fixture(scope="module")
def server():
    """A 127.0.0.1 server: /a.png, and /hop redirecting to it; it counts hits per path."""
    buf = io.BytesIO()
    Image.fromarray(np.full((16, 16, 3), 200, np.uint8)).save(buf, "PNG")
    png, hits = buf.getvalue(), Counter()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            hits[self.path] += 1
            if self.path == "/hop":
                self.send_response(302)
                self.send_header("Location", "/a.png")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(200 if self.path == "/a.png" else 404)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(png)))
            self.end_headers()
            self.wfile.write(png)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_port}", hits
    httpd.shutdown()
    httpd.server_close()


def crawl_rows(tmp_path, name, base, *flags) -> tuple[int, list[dict]]:
    urls = tmp_path / "urls.jsonl"
    urls.write_text("".join(json.dumps({"url": base + p}) + "\n" for p in ("/a.png", "/hop")))
    rc = main(["crawl", str(urls), "--out", str(tmp_path / name), "--retries", "0", "--timeout", "5", *flags])
    return rc, pq.read_table(tmp_path / name / "00000.parquet").to_pylist()


def test_cli_allow_network_opens_the_named_network_and_its_redirects(server, tmp_path, capsys):
    base, hits = server
    rc, rows = crawl_rows(tmp_path, "default", base)
    assert rc == 2 and [r["error_kind"] for r in rows] == ["blocked_address"] * 2  # none downloaded: exit 2
    assert rows[0]["error_message"] == "127.0.0.1 is loopback" and sum(hits.values()) == 0

    rc, rows = crawl_rows(tmp_path, "named", base, "--allow-network", "127.0.0.1/32")
    assert rc == 0 and [r["status"] for r in rows] == ["success"] * 2  # /hop followed to /a.png
    assert (hits["/a.png"], hits["/hop"]) == (2, 1)

    rc, rows = crawl_rows(tmp_path, "neighbour", base,
                          "--allow-network", "127.0.0.2/32", "--allow-network", "fe80::/10")
    assert [r["error_kind"] for r in rows] == ["blocked_address"] * 2 and (hits["/a.png"], hits["/hop"]) == (2, 1)

    rc, rows = crawl_rows(tmp_path, "private", base, "--allow-private")
    assert [r["status"] for r in rows] == ["success"] * 2  # tests and intranets still work
    capsys.readouterr()

    urls = tmp_path / "urls.jsonl"
    assert main(["crawl", str(urls), "--out", str(tmp_path / "bad"), "--allow-network", "169.254.0.0/33"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "allowed_networks" in err and not (tmp_path / "bad").exists()
