"""Property-based fuzzing of ingest (hypothesis): mutated tars and mutated images.

Properties: ingest never raises; every member tarfile finds ends in `samples` or `rejects`;
sample ids are unique; each example stays within a deadline and memory stays flat. The runs are
derandomized (no example database), so CI sees the same examples every time.
"""
import gzip
import json
import resource
import tarfile
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from webdataset.tariterators import base_plus_ext

from curation.decode_sandbox import DecodeSandbox
from curation.ingest import ingest_shard
from curation.shards import ShardRef, _BoundedTarInfo, printable
from curation.validate import ImageInfo, Rejected, ValidationConfig

from .hostile_inputs import member, raw_tar, valid_images

IMAGES = valid_images()
FUZZ = settings(derandomize=True, database=None, deadline=30_000, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@st.composite
def mutated(draw, data: bytes) -> bytes:
    """Random damage: byte flips, a cut, inserted bytes (markers among them), zeroed runs."""
    out = bytearray(data)
    for _ in range(draw(st.integers(0, 4))):
        if not out:
            break
        pos = draw(st.integers(0, len(out) - 1))
        op = draw(st.sampled_from(["flip", "cut", "insert", "zero"]))
        if op == "flip":
            out[pos] ^= draw(st.integers(1, 255))
        elif op == "cut":
            del out[pos:]
        elif op == "insert":
            out[pos:pos] = draw(st.sampled_from([b"\xff\xd9", b"\xff\xda\x00\x08\x01\x01\x00\x00\x3f\x00", b"IEND",
                                                 b"\x00" * 7, b"\xff" * 3]) | st.binary(min_size=1, max_size=16))
        else:
            n = draw(st.integers(1, 64))
            out[pos : pos + n] = bytes(len(out[pos : pos + n]))
    return bytes(out)


def image_bytes() -> st.SearchStrategy[bytes]:
    return st.sampled_from(sorted(IMAGES)).flatmap(lambda name: mutated(IMAGES[name]))


JSONS = st.sampled_from([
    b'{"url": "https://x.example/a.jpg", "caption": "a"}', b"{", b"[]", b'"text"', b'{"caption": "\\ud800"}',
    b"\xff\xfe{\x00}\x00", b"[" * 50_000 + b"]" * 50_000, b'{"n": ' + b"9" * 5000 + b"}", b'{"url": 7}',
])
NAMES = st.sampled_from(["a", "b", "c", "dir/d", "e"]).flatmap(
    lambda key: st.sampled_from(["jpg", "png", "webp", "gif", "json", "txt", "cls", "JPG", "seg.png"]).map(
        lambda ext: f"{key}.{ext}"))
ODD_NAMES = st.sampled_from(["noext", ".hidden", "x.", "__k__.jpg", "bad\nname.jpg", "caf\udce9.png", "dir/"])
KINDS = st.sampled_from([tarfile.REGTYPE] * 8 + [tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE,
                                                 tarfile.FIFOTYPE, tarfile.CHRTYPE])


@st.composite
def tar_member(draw) -> tuple:
    name = draw(st.one_of(NAMES, NAMES, NAMES, ODD_NAMES))
    ext = name.rsplit(".", 1)[-1].lower() if "." in name else ""
    if ext == "json":
        data = draw(JSONS)
    elif ext in ("jpg", "png", "webp", "gif"):
        data = draw(image_bytes())
    else:
        data = draw(st.binary(max_size=64))
    kind = draw(KINDS)
    return member(name, data, kind, linkname="a.jpg" if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE) else "")


@st.composite
def hostile_tar(draw) -> bytes:
    members = draw(st.lists(tar_member(), max_size=10))
    with tempfile.TemporaryDirectory() as tmp:
        data = raw_tar(Path(tmp) / "x.tar", members).read_bytes()
    if draw(st.booleans()):
        data = gzip.compress(data, mtime=0)
    return draw(mutated(data)) if draw(st.booleans()) else data


def members_per_tarfile(path: Path) -> list[str]:
    """The member names tarfile itself yields, read independently of ingest (up to any error)."""
    names = []
    try:
        with open(path, "rb") as fh, tarfile.open(fileobj=fh, mode="r|*", tarinfo=_BoundedTarInfo) as tar:
            for info in tar:
                names.append(info.name)
                tar.members = []
    except Exception:  # noqa: BLE001 - a damaged tar ends the count wherever tarfile stops
        pass
    return names


@pytest.fixture(scope="module")
def peak_rss():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    yield
    grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grew < 300 * 1024, f"fuzzing grew the peak RSS by {grew} KiB"


@pytest.mark.slow  # fuzzing
@settings(FUZZ, max_examples=40)
@given(tar=hostile_tar())
def test_every_member_of_a_mutated_tar_is_accounted_for(tar, peak_rss):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fuzz.tar"
        path.write_bytes(tar)
        result = ingest_shard(str(Path(tmp) / "ws"), ShardRef(str(path), "fuzz", "1"), ValidationConfig())
        samples = pq.read_table(Path(tmp) / "ws" / "samples" / "fuzz.parquet").to_pylist()
        rejects = pq.read_table(Path(tmp) / "ws" / "rejects" / "fuzz.parquet").to_pylist()
        names = members_per_tarfile(path)
    assert result.n_accepted == len(samples) and result.n_rejected == len(rejects)
    ids = [s["sample_id"] for s in samples]
    assert len(ids) == len(set(ids)) and len({s["key"] for s in samples}) == len(samples)
    keys = {s["key"] for s in samples} | {r["key"] for r in rejects}
    lost = [n for n in names if base_plus_ext(n)[0] not in keys and printable(n) not in keys]
    assert not lost, f"members in neither samples nor rejects: {lost}"
    assert len(samples) + len(rejects) <= len(names) + 1  # one row per sample or member, + one for a cut
    for s in samples:  # what was accepted really is an image of the size recorded
        assert s["width"] >= 8 and s["height"] >= 8 and s["sha256"]
        if s["meta"] is not None:
            assert isinstance(json.loads(s["meta"]), dict)


@pytest.fixture(scope="module")
def sandbox():
    with DecodeSandbox(ValidationConfig(decode_cpu_seconds=5)) as box:
        yield box


@pytest.mark.slow  # fuzzing
@settings(FUZZ, max_examples=120)
@given(data=image_bytes())
def test_a_mutated_image_is_decoded_or_refused_with_a_reason(data, sandbox, peak_rss):
    result = sandbox.validate_all([(0, data)])
    (_, outcome), = list(result)
    if isinstance(outcome, Rejected):
        assert outcome.reason in {"not_an_image", "unsupported_format", "decompression_bomb", "too_small",
                                  "decode_budget", "truncated_image", "corrupt_image", "too_large"}
    else:
        assert isinstance(outcome, ImageInfo) and outcome.width >= 8 and outcome.height >= 8
        assert outcome.width * outcome.height <= 40_000_000
    assert sandbox.restarts == 0  # no mutation crashed the decoder or ran out its budget


def test_the_fuzz_corpus_holds_what_it_claims():
    # the images the fuzzer starts from are valid, so what it finds is the mutation's doing
    with DecodeSandbox(ValidationConfig()) as box:
        assert [box.validate(v).width for v in IMAGES.values()] == [40] * len(IMAGES)
