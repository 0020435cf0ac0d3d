"""A remote workspace's `_index.json` came from elsewhere: its keys become files in the local cache.
Pull must refuse every key that would land outside the cache folder (absolute, `..`, nested `..`,
backslashes, empty parts, a symlinked cache subfolder) and a malformed index, before writing
anything: nothing appears outside the cache, and the cache gets no file either."""
import hashlib
import json
import os

import fsspec
import pytest

from curation import remote
from flows.cli import main

PAYLOAD = b"planted by a hostile index"
GOOD = hashlib.sha256(PAYLOAD).hexdigest()


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setattr(remote, "CACHE", tmp_path / "cache")
    return tmp_path / "cache"


def _files(folder) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() or p.is_symlink())


def _publish(name: str, index) -> str:
    """A memory:// workspace whose index is `index`; every key's file holds PAYLOAD."""
    fs = fsspec.filesystem("memory")
    base = f"/webdistill-sec/{name}"
    if isinstance(index, dict):
        for key in index:
            if isinstance(key, str) and key and "\0" not in key:
                fs.pipe(f"{base}/samples/ok.parquet" if key.startswith("/") else f"{base}/{key}", PAYLOAD)
    fs.pipe(f"{base}/{remote.INDEX}", json.dumps(index).encode())
    return f"memory:/{base}"


def _hostile_keys(outside) -> dict[str, str]:
    return {
        "absolute": str(outside / "abs.parquet"),
        "dotdot": "../../pwned.parquet",
        "nested dotdot": "samples/../../../pwned.parquet",
        "deep dotdot": "a/b/../../../../" + str(outside.relative_to("/")) + "/deep.parquet",
        "backslash": "samples\\..\\..\\pwned.parquet",
        "empty part": "samples//x.parquet",
        "dot part": "./samples/x.parquet",
        "trailing slash": "samples/",
        "empty key": "",
        "nul": "samples/x\0.parquet",
    }


@pytest.mark.parametrize("variant", list(_hostile_keys(__import__("pathlib").Path("/x"))))
def test_a_hostile_index_key_is_refused_before_anything_is_written(cache, tmp_path, capsys, variant):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "marker").write_text("keep")
    key = _hostile_keys(outside)[variant]
    # a good entry first: it must not be written either, since the index is refused as a whole
    url = _publish(f"keys-{abs(hash(variant))}", {"samples/good.parquet": GOOD, key: GOOD})
    before = _files(tmp_path)

    assert main(["sql", "-w", url, "SELECT 1 AS one", "--format", "json"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "_index.json" in err[0] and "refusing entry" in err[0]
    assert _files(tmp_path) == before  # nothing written anywhere: not outside, not in the cache
    assert (outside / "marker").read_text() == "keep"
    assert not (tmp_path / "pwned.parquet").exists() and not (tmp_path.parent / "pwned.parquet").exists()


def test_a_symlinked_cache_subfolder_does_not_redirect_the_pull(cache, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    url = _publish("symlinked", {"samples/a.parquet": GOOD})
    mirror = remote.cache_dir(url)
    mirror.mkdir(parents=True)
    (mirror / "samples").symlink_to(outside, target_is_directory=True)  # planted in the cache
    (mirror / "deep").mkdir()
    (mirror / "deep" / "up").symlink_to(tmp_path, target_is_directory=True)

    with pytest.raises(remote.RemoteWorkspaceError, match="resolves outside the cache folder"):
        remote.pull(url, mirror)
    assert list(outside.iterdir()) == []

    url = _publish("symlinked2", {"deep/up/outside/x.parquet": GOOD})
    with pytest.raises(remote.RemoteWorkspaceError, match="resolves outside the cache folder"):
        remote.pull(url, mirror)
    assert list(outside.iterdir()) == []


@pytest.mark.parametrize("index", [
    ["samples/a.parquet"],                         # not a mapping
    "samples/a.parquet",
    {"samples/a.parquet": "0" * 63},               # not a sha256
    {"samples/a.parquet": "g" * 64},
    {"samples/a.parquet": None},
    {"samples/a.parquet": {"sha256": GOOD}},
    {"samples/a.parquet": "../" + GOOD},
])
def test_a_malformed_index_is_refused_with_one_line(cache, tmp_path, capsys, index):
    url = _publish(f"malformed-{abs(hash(json.dumps(index)))}", index)
    assert main(["sql", "-w", url, "SELECT 1 AS one"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "_index.json" in err[0]
    assert not any(p.is_file() for p in cache.rglob("*"))


def test_a_clean_index_still_pulls(cache, tmp_path):
    url = _publish("clean", {"samples/a.parquet": GOOD, "scores/run-1/x.parquet": GOOD})
    mirror = tmp_path / "mirror"
    assert remote.pull(url, mirror) == {"samples/a.parquet": GOOD, "scores/run-1/x.parquet": GOOD}
    assert (mirror / "samples" / "a.parquet").read_bytes() == PAYLOAD
    assert (mirror / "scores" / "run-1" / "x.parquet").read_bytes() == PAYLOAD


def test_push_does_not_upload_a_symlink_planted_in_the_mirror(cache, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the bucket")
    url = _publish("push-symlink", {})
    mirror = tmp_path / "m"
    (mirror / "samples").mkdir(parents=True)
    (mirror / "samples" / "a.parquet").write_bytes(PAYLOAD)
    os.symlink(secret, mirror / "samples" / "leak.parquet")
    assert remote.push(url, mirror, {}) == 1
    index = json.loads(fsspec.filesystem("memory").cat(f"/webdistill-sec/push-symlink/{remote.INDEX}"))
    assert set(index) == {"samples/a.parquet"}
