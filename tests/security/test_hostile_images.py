"""Hostile images: headers that lie about the data, decodes that cost minutes or gigabytes.

Each must be refused with its reason, quickly, and must cost nothing to the images after it;
images that merely look like an attack (grey or black borders, flat colour) must still pass.
"""
import os
import signal
import threading
import time

import numpy as np
import pytest

from curation.decode_sandbox import DecodeSandbox
from curation.validate import Rejected, ValidationConfig, validate_image

from ..conftest import encode, noise_image
from ..hostile_inputs import gif_header_lie, jpeg_cut_with_eoi, jpeg_header_lie, jpeg_many_scans, png_short_stream

CFG = ValidationConfig()
PHOTO = noise_image(5, (64, 64))
PROGRESSIVE = encode(PHOTO, "JPEG", progressive=True)  # its first scan codes every DC in 50 bytes


def outcome(data: bytes, config: ValidationConfig = CFG) -> tuple[str, float]:
    start = time.process_time()
    try:
        info = validate_image(data, config)
        result = f"accepted {info.width}x{info.height}"
    except Rejected as rej:
        result = rej.reason
    return result, time.process_time() - start


LIES = {
    "jpeg 643 bytes claiming 6000x6000": jpeg_header_lie(6000, 6000),
    "jpeg claiming 3000x200": jpeg_header_lie(3000, 200),
    "baseline jpeg cut at 30% + EOI": jpeg_cut_with_eoi(encode(PHOTO, "JPEG"), 0.3),
    "baseline jpeg cut at 60% + EOI": jpeg_cut_with_eoi(encode(PHOTO, "JPEG"), 0.6),
    "baseline jpeg cut at 90% + EOI": jpeg_cut_with_eoi(encode(PHOTO, "JPEG"), 0.9),
    "progressive jpeg cut in its DC scan + EOI": jpeg_cut_with_eoi(PROGRESSIVE, at=PROGRESSIVE.index(b"\xff\xda") + 40),
    "png whose complete zlib stream holds half the rows": png_short_stream(64, 64, 32),
    "png 254 bytes claiming 6000x6000": png_short_stream(6000, 6000, 1),
    "gif claiming 3000x3000": gif_header_lie(3000, 3000),
    "webp cut in half": encode(PHOTO, "WEBP")[:800],
    "gif cut in half": encode(PHOTO[:, :, 0], "GIF")[:2000],
    "png cut in half": encode(PHOTO, "PNG")[:6000],
}


@pytest.mark.parametrize("name", LIES)
def test_a_header_that_promises_more_than_the_data_is_a_truncated_image(name):
    result, cpu = outcome(LIES[name])
    assert result == "truncated_image", name
    assert cpu < 2.0  # refused from the structure, or from one small decode


def test_look_alikes_of_padding_are_accepted():
    grey_bottom = PHOTO.copy()
    grey_bottom[24:] = 128  # what libjpeg's padding looks like, but coded for real
    black_bottom = PHOTO.copy()
    black_bottom[-3:] = 0  # what zlib's early end looks like
    cases = {
        "jpeg, grey bottom": (encode(grey_bottom, "JPEG"), "accepted 64x64"),
        "progressive jpeg, grey bottom": (encode(grey_bottom, "JPEG", progressive=True), "accepted 64x64"),
        "jpeg, all grey 2000x1500": (encode(np.full((1500, 2000), 128, np.uint8), "JPEG"), "accepted 2000x1500"),
        "png, black bottom rows": (encode(black_bottom, "PNG"), "accepted 64x64"),
        "png, all black 1500x1500": (encode(np.zeros((1500, 1500, 3), np.uint8), "PNG"), "accepted 1500x1500"),
        "gif, flat 2000x2000 (LZW at its best)": (encode(np.zeros((2000, 2000), np.uint8), "GIF"),
                                                  "accepted 2000x2000"),
        "jpeg, 10 progressive scans": (encode(PHOTO, "JPEG", progressive=True), "accepted 64x64"),
    }
    assert {k: outcome(data)[0] for k, (data, _) in cases.items()} == {k: want for k, (_, want) in cases.items()}


@pytest.mark.parametrize("side, extra", [(1024, 20_000), (2048, 100), (64, 5_000), (4000, 64)])
def test_scans_are_counted_before_decoding(side, extra):
    bomb = jpeg_many_scans(side, extra)
    assert len(bomb) < 400_000
    result, cpu = outcome(bomb)
    assert result == "decode_budget" and cpu < 0.5
    # the same picture with its ordinary scans decodes
    assert outcome(jpeg_many_scans(side, 0))[0] == f"accepted {side}x{side}"


def test_scans_times_pixels_is_bounded_too():
    # 16 MP: 62 scans are 0.99e9 scan-pixels and decode; 63 are over the default 1e9
    assert outcome(jpeg_many_scans(4000, 62 - 6))[0] == "accepted 4000x4000"
    assert outcome(jpeg_many_scans(4000, 63 - 6))[0] == "decode_budget"
    assert outcome(jpeg_many_scans(4000, 63 - 6), ValidationConfig(max_jpeg_scan_pixels=2 * 10**9))[0] == \
        "accepted 4000x4000"


def test_the_cpu_budget_stops_a_decode_running_in_c():
    # scans counted generously, so only the kernel's CPU limit can stop this decode (~4 s of CPU)
    config = ValidationConfig(max_jpeg_scans=10**6, max_jpeg_scan_pixels=10**15, decode_cpu_seconds=1)
    slow = jpeg_many_scans(2048, 3_000)
    good = encode(PHOTO, "JPEG")
    start = time.monotonic()
    with DecodeSandbox(config) as sandbox:
        results = list(sandbox.validate_all([("a", good), ("slow", slow), ("b", good)]))
        assert sandbox.restarts == 1
    wall = time.monotonic() - start
    got = {tag: r.reason if isinstance(r, Rejected) else r.width for tag, r in results}
    assert got == {"a": 64, "slow": "decode_budget", "b": 64}
    assert "CPU time" in results[1][1].detail
    assert wall < 4 * 1 + 5 + 5  # the wall-clock backstop never had to fire, even on a busy machine


def test_the_memory_budget_refuses_an_image_that_needs_more():
    big = encode(np.zeros((5000, 5000, 3), np.uint8), "PNG")  # 75 KB; 100 MB once decoded
    with DecodeSandbox(ValidationConfig(decode_memory_bytes=96 * 2**20)) as sandbox:
        results = [r for _, r in sandbox.validate_all([(1, big), (2, encode(PHOTO, "PNG"))])]
    assert isinstance(results[0], Rejected) and results[0].reason == "decode_budget"
    assert results[1].width == 64
    with DecodeSandbox(CFG) as sandbox:  # the default budget decodes it
        assert sandbox.validate(big).width == 5000


def test_a_crashed_decoder_costs_one_image():
    slow = jpeg_many_scans(2048, 3_000)
    config = ValidationConfig(max_jpeg_scans=10**6, max_jpeg_scan_pixels=10**15)
    with DecodeSandbox(config) as sandbox:
        sandbox.validate(encode(PHOTO, "PNG"))  # the child is up
        pid = sandbox._proc.pid
        threading.Timer(0.5, os.kill, (pid, signal.SIGSEGV)).start()  # as a decoder bug would
        results = [r for _, r in sandbox.validate_all([(1, slow), (2, encode(PHOTO, "JPEG"))])]
        assert sandbox._proc.pid != pid
    assert (results[0].reason, results[1].width) == ("corrupt_image", 64)
    assert "crashed" in results[0].detail
