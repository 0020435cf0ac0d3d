"""Hostile shards: members that declare gigabytes, odd member types and names, repeated keys,
non-files named `.tar`. Every member must end in `samples` or `rejects`, memory must stay far
below what the shard declares, and nothing but the workspace's own artifacts may be written.
"""
import json
import os
import socket
import subprocess
import sys
import tarfile
import textwrap

import pyarrow.parquet as pq
import pytest

from curation.ingest import ingest
from curation.shards import expand_shards, printable
from curation.validate import ValidationConfig
from curation.workspace import Workspace

from ..conftest import ROOT, encode, meta, noise_image, run_cli, write_tar
from ..hostile_inputs import huge_member_tar, member, raw_tar

GOOD = encode(noise_image(1), "JPEG")
GiB = 1 << 30


def rows(ws: Workspace, shard: str) -> tuple[dict, dict]:
    """(accepted key -> sample row, rejected key -> reason) of one shard."""
    samples = {r["key"]: r for r in pq.read_table(ws.root / "samples" / f"{shard}.parquet").to_pylist()}
    rejects = {r["key"]: r["reason"] for r in pq.read_table(ws.root / "rejects" / f"{shard}.parquet").to_pylist()}
    return samples, rejects


@pytest.mark.slow  # six GiB-sized shards, and an ingest process of its own
def test_gigabyte_members_are_refused_from_their_header_without_reading_them(tmp_path):
    crawl = tmp_path / "crawl"
    good_after = [("001.jpg", GOOD), ("001.json", meta("001"))]
    huge_member_tar(crawl / "jpg.tar", GiB, after=good_after)  # a sparse file: 1 GiB of real zeros
    huge_member_tar(crawl / "json.tar", GiB // 4, after=good_after, name="000.json")
    huge_member_tar(crawl / "npy.tar", GiB // 4, after=good_after, name="000.logits.npy")
    huge_member_tar(crawl / "lie.tar", GiB, after=good_after, sparse=False)  # declares more than the file holds
    # tarfile reads long names and pax records whole: those are bounded before they are read
    huge_member_tar(crawl / "longname.tar", GiB, after=good_after, name="././@LongLink", kind=tarfile.GNUTYPE_LONGNAME)
    huge_member_tar(crawl / "pax.tar", GiB, after=good_after, name="././@PaxHeader", kind=tarfile.XHDTYPE)
    listing = sorted(p.name for p in crawl.iterdir())
    # peak RSS of the ingest itself, in a process of its own, above what its imports cost
    script = textwrap.dedent("""
        import json, resource, sys
        from curation.ingest import ingest
        from curation.workspace import Workspace
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        s = ingest(Workspace(sys.argv[1]), [sys.argv[2]], workers=1, progress=False)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps({"grew_kib": peak - base, "failed": s.failed, "accepted": s.accepted}))
    """)
    ws = Workspace(tmp_path / "ws")
    out = subprocess.run([sys.executable, "-c", script, str(ws.root), str(crawl)], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["grew_kib"] < 96 * 1024  # vs 1,048,576 KiB declared (the decode process has its own cap)
    assert not report["failed"]
    got = {shard: rows(ws, shard) for shard in ("jpg", "json", "npy", "lie", "longname", "pax")}
    for shard in ("jpg", "json", "npy"):  # refused unread, and the sample after it is ingested
        samples, rejects = got[shard]
        assert (sorted(samples), rejects) == (["001"], {"000": "too_large"})
    assert got["lie"] == ({}, {"000": "truncated_tar"})  # the skip ran into the end of the file
    assert got["longname"] == got["pax"] == ({}, {None: "truncated_tar"})
    assert sorted(p.name for p in ws.root.iterdir()) == ["rejects", "samples", "shards"]  # nothing else written
    assert sorted(p.name for p in crawl.iterdir()) == listing


def test_each_extension_has_its_own_cap(tmp_path):
    config = ValidationConfig(max_image_bytes=len(GOOD), max_json_bytes=100, max_txt_bytes=50, max_other_bytes=20,
                              max_members_per_sample=3)
    shard = write_tar(tmp_path / "caps.tar", [
        {"__key__": "ok", "jpg": GOOD, "json": b'{"a": "' + b"x" * 91 + b'"}', "txt": b"t" * 50},  # all at the cap
        {"__key__": "big_jpg", "jpg": GOOD + b"\0"},
        {"__key__": "big_json", "jpg": GOOD, "json": b'{"a": "' + b"x" * 92 + b'"}'},
        {"__key__": "big_txt", "jpg": GOOD, "txt": b"t" * 51},
        {"__key__": "big_cls", "jpg": GOOD, "cls": b"1" * 21},
        {"__key__": "many", "jpg": GOOD, "a": b"", "b": b"", "c": b""},
        {"__key__": "after", "jpg": GOOD},
    ])
    ws = Workspace(tmp_path / "ws")
    ingest(ws, [str(shard)], config, workers=1, progress=False)
    samples, rejects = rows(ws, "caps")
    assert sorted(samples) == ["after", "ok"]
    assert rejects == {"big_jpg": "too_large", "big_json": "too_large", "big_txt": "too_large",
                       "big_cls": "too_large", "many": "too_many_members"}


def test_every_odd_member_gets_a_reject_row(tmp_path):
    odd = [
        member("dir/", kind=tarfile.DIRTYPE),
        member("000.txt", kind=tarfile.SYMTYPE, linkname="/etc/passwd"),
        member("000.json", kind=tarfile.LNKTYPE, linkname="000.jpg"),
        member("dev.jpg", kind=tarfile.CHRTYPE),
        member("disk.jpg", kind=tarfile.BLKTYPE),
        member("fifo.jpg", kind=tarfile.FIFOTYPE),
        member("noextension", GOOD),
        member(".hidden", GOOD),
        member("empty-extension.", GOOD),
        member("__key__.jpg", GOOD),
        member("new\nline.jpg", GOOD),
        member("caf\udce9.jpg", GOOD),  # a name that is not UTF-8 (byte 0xe9)
        member("k" * 600 + ".jpg", GOOD),
    ]
    shard = raw_tar(tmp_path / "odd.tar", [member("000.jpg", GOOD), *odd, member("001.jpg", GOOD)])
    with tarfile.open(shard) as tar:  # what is in the tar, counted by tarfile itself
        names = [m.name for m in tar.getmembers()]
    assert len(names) == 15
    ws = Workspace(tmp_path / "ws")
    summary = ingest(ws, [str(shard)], workers=1, progress=False)
    samples, rejects = rows(ws, "odd")
    assert sorted(samples) == ["000", "001"]  # the links named 000.* did not join sample 000
    assert rejects == {printable(name): ("not_a_file" if i < 6 else "bad_key") for i, name in enumerate(names[1:-1])}
    assert summary.shards[0].n_read == len(samples) + len(rejects) == 15
    assert all("\n" not in key and printable(key) == key for key in rejects)


def test_a_repeated_key_is_a_duplicate_and_the_first_sample_wins(tmp_path):
    other = encode(noise_image(2), "JPEG")
    shard = raw_tar(tmp_path / "dups.tar", [
        member("a.jpg", GOOD), member("a.json", meta("a")),
        member("b.jpg", GOOD),
        member("a.jpg", other), member("a.json", meta("a-again")),  # not adjacent
        member("c.jpg", GOOD), member("c.jpg", other),  # same key and extension, adjacent
        member("d.jpg", GOOD), member("d.json", meta("d")), member("d.json", meta("d2")),
        member("e.jpg", GOOD),
    ])
    ws = Workspace(tmp_path / "ws")
    ingest(ws, [str(shard)], workers=1, progress=False)
    table = pq.read_table(ws.root / "samples" / "dups.parquet").to_pylist()
    ids = [r["sample_id"] for r in table]
    assert len(ids) == len(set(ids)) == 5
    samples, rejects = rows(ws, "dups")
    assert rejects == {"a": "duplicate_key", "c": "duplicate_key", "d": "duplicate_key"}
    assert samples["a"]["url"] == "https://img.example/a.jpg"  # the first one
    assert samples["d"]["url"] == "https://img.example/d.jpg"
    assert {samples[k]["sha256"] for k in "ace"} == {samples["b"]["sha256"]}  # GOOD, not `other`


def test_a_corrupt_header_midway_is_not_a_quiet_end(tmp_path):
    samples = [{"__key__": f"{i:03d}", "jpg": encode(noise_image(i), "JPEG")} for i in range(6)]
    shard = write_tar(tmp_path / "bad.tar", samples)
    with tarfile.open(shard) as tar:
        offset = next(m.offset for m in tar.getmembers() if m.name == "004.jpg")
    with open(shard, "r+b") as fh:  # a flipped byte in the name: the header checksum no longer matches
        fh.seek(offset)
        fh.write(b"X")
    ws = Workspace(tmp_path / "ws")
    ingest(ws, [str(shard)], workers=1, progress=False)
    got, rejects = rows(ws, "bad")
    assert sorted(got) == ["000", "001", "002", "003"]  # every sample before the bad header, complete
    assert rejects == {None: "truncated_tar"}  # the cut falls between samples


def test_too_many_members_in_a_shard_stop_the_read_with_one_row(tmp_path):
    shard = write_tar(tmp_path / "many.tar", [{"__key__": f"{i:03d}", "jpg": GOOD} for i in range(10)])
    ws = Workspace(tmp_path / "ws")
    ingest(ws, [str(shard)], ValidationConfig(max_members_per_shard=4), workers=1, progress=False)
    samples, rejects = rows(ws, "many")
    assert sorted(samples) == ["000", "001", "002", "003"]
    assert rejects == {"004.jpg": "too_many_members"}


@pytest.mark.slow  # two CLI ingests
def test_non_files_named_tar_are_refused_without_being_opened(tmp_path):
    crawl = tmp_path / "crawl"
    write_tar(crawl / "good.tar", [{"__key__": "000", "jpg": GOOD}])
    os.mkfifo(crawl / "fifo.tar")  # opening it for reading would block forever
    (crawl / "dir.tar").mkdir()
    (crawl / "dev.tar").symlink_to("/dev/zero")  # would never end
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(crawl / "sock.tar"))
    kinds = ["a FIFO", "a directory", "a character device", "a socket"]
    try:
        before = sorted(p.name for p in crawl.iterdir())
        for spec in (crawl / "*.tar", crawl / "{good,fifo,dir,dev,sock}.tar"):  # globs and braces
            refs, missing = expand_shards([str(spec)])
            assert [r.name for r in refs] == ["good"] and len(missing) == 1
            assert all(kind in missing[0] for kind in kinds)
        # as a user would: a directory of shards, then the FIFO alone
        out = run_cli("ingest", "-w", str(tmp_path / "ws"), "--workers", "1", str(crawl))
        errors = out.stderr.strip().splitlines()
        assert out.returncode == 1 and len(errors) == 1, out.stderr
        assert all(kind in errors[0] for kind in kinds)
        assert "1 shard(s) ingested" in out.stdout
        assert [p.name for p in (tmp_path / "ws" / "samples").iterdir()] == ["good.parquet"]
        out = run_cli("ingest", "-w", str(tmp_path / "ws2"), str(crawl / "fifo.tar"))
        assert out.returncode == 2 and out.stderr.strip().count("\n") == 0
        assert "not a regular file: a FIFO" in out.stderr
        assert not (tmp_path / "ws2" / "samples").exists() or not any((tmp_path / "ws2" / "samples").iterdir())
        assert sorted(p.name for p in crawl.iterdir()) == before
    finally:
        sock.close()
