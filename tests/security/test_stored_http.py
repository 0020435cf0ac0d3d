"""Attack class: a stored http(s) shard URL that reaches what the user never named. A workspace from
elsewhere sets `samples.shard_url` to cloud metadata (169.254.169.254), loopback or an intranet
service; a later stage would send the request. Stored http(s) URLs may reach public addresses only
(the crawler's default), every connection is checked again (DNS rebinding) and redirects are not
followed. A shard the user typed on such an address is copied into sources/ at ingest, as a typed
`pipe:` is, so later stages read the copy.

A 127.0.0.1 server counts every request: a refused URL must cost none."""
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from curation.errors import UnsafeShardURL
from curation.shards import _guarded_http_open, open_stored_shard, stored_url_refusal
from curation.workspace import Workspace
from flows.cli import main

from ..conftest import run_cli, write_tar
from .test_stored_commands import copy_workspace, plant, shard_samples


@pytest.fixture
def server(tmp_path):
    """Serves tmp_path/shard.tar on 127.0.0.1 and records the path of every request."""
    write_tar(tmp_path / "shard.tar", shard_samples("h", 3, 40))
    body, requests = (tmp_path / "shard.tar").read_bytes(), []

    class Handler(BaseHTTPRequestHandler):
        def _answer(self, with_body: bool) -> None:
            requests.append(self.path)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if with_body:
                self.wfile.write(body)

        def do_GET(self):  # noqa: N802 (http.server's name)
            self._answer(True)

        def do_HEAD(self):  # noqa: N802
            self._answer(False)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd.server_address[1], requests
    httpd.shutdown()
    httpd.server_close()


def internal_urls(port: int) -> list[str]:
    """The same local server named in the forms an attacker may write, plus the metadata service."""
    return [f"http://127.0.0.1:{port}/shard.tar", f"https://127.0.0.1:{port}/shard.tar",
            f"http://localhost:{port}/shard.tar", f"HTTP://LOCALHOST:{port}/shard.tar",
            f"http://127.1:{port}/shard.tar", f"http://0x7f000001:{port}/shard.tar",
            f"http://2130706433:{port}/shard.tar", f"http://[::ffff:127.0.0.1]:{port}/shard.tar",
            f"http://[::1]:{port}/shard.tar", f"http://user:pw@127.0.0.1:{port}/shard.tar",
            "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
            "http://[fd00:ec2::254]/latest/meta-data/", "http://10.0.0.1/x.tar", "http://0.0.0.0/x.tar"]


def test_internal_stored_urls_are_refused_before_any_request(server):
    port, requests = server
    for url in internal_urls(port):
        assert stored_url_refusal(url), url
        with pytest.raises(UnsafeShardURL) as refused:
            open_stored_shard(url)
        assert "\n" not in str(refused.value) and "public addresses only" in str(refused.value), url
    assert requests == []


def test_every_connection_is_checked_again(server):
    """Past the first check (a name that resolved to a public address, then to 127.0.0.1: DNS
    rebinding), the connection's own resolver refuses it."""
    port, requests = server
    for url in (f"http://localhost:{port}/shard.tar", f"http://127.0.0.1:{port}/shard.tar",
                f"http://[::ffff:127.0.0.1]:{port}/shard.tar"):
        with pytest.raises(UnsafeShardURL, match="refused|is loopback"):
            _guarded_http_open(url)
    assert requests == []


def test_select_refuses_a_planted_internal_url(server, tmp_path, capsys):
    """Through the CLI as a user runs it on a workspace from elsewhere: one line, exit 2, no request."""
    port, requests = server
    root = tmp_path / "typed"
    write_tar(root / "b.tar", shard_samples("b", 3, 10))
    assert run_cli("ingest", "-w", str(root / "ws"), str(root / "b.tar"), "--workers", "1").returncode == 0
    ws = copy_workspace((root,), tmp_path / "ws")
    for url in internal_urls(port)[:4] + internal_urls(port)[-4:]:
        plant(ws, "b", url)
        rc = main(["select", "-w", str(ws.root), "--name", "evil", "--sql", "SELECT sample_id FROM candidates"])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and len(err.splitlines()) == 1 and "public addresses only" in err, (url, err)
    assert requests == [] and not (ws.root / "selections" / "evil").exists()


def test_a_typed_internal_url_is_copied_at_ingest_and_read_from_the_copy(server, tmp_path):
    """The user may ingest from their own intranet: ingest reads the typed URL once and keeps the
    bytes in sources/; select reads the copy, with the server gone quiet."""
    port, requests = server
    url = f"http://127.0.0.1:{port}/shard.tar"
    done = run_cli("ingest", "-w", str(tmp_path / "ws"), url, "--workers", "1")
    assert done.returncode == 0, done.stderr
    ws = Workspace(tmp_path / "ws")
    copy = ws.root / "sources" / "shard.tar"
    assert copy.is_file()
    stored = set(pq.read_table(ws.root / "samples" / "shard.parquet")["shard_url"].to_pylist())
    assert stored == {str(copy)}
    assert pq.read_table(ws.root / "shards" / "shard.parquet").to_pylist()[0]["shard_origin"] == url
    asked = len(requests)
    assert asked >= 1
    done = run_cli("select", "-w", str(ws.root), "--name", "all", "--sql", "SELECT sample_id FROM candidates")
    assert done.returncode == 0, done.stderr
    assert len(requests) == asked  # select read the copy
    assert Path(ws.root / "selections" / "all" / "manifest.json").is_file()
