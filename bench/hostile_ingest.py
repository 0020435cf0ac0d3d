"""Hostile shards through ingest: the outcome, wall time and peak memory of each, one process each.

    python bench/hostile_ingest.py

Each input is a one-shard crawl ingested by a fresh process (workers=1). Memory: the ingest
process's peak RSS above what its imports cost (exact, getrusage), and the decode sandbox's peak
RSS (sampled every 20 ms) and CPU time. Prints JSON, then a markdown table; the slowest row is
marked. Wall times on a shared machine vary; the CPU time of the decode process is the steadier figure.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.conftest import encode, meta, noise_image, write_tar  # noqa: E402
from tests.hostile_inputs import (  # noqa: E402
    gif_header_lie,
    huge_member_tar,
    jpeg_header_lie,
    jpeg_many_scans,
    member,
    png_short_stream,
    raw_tar,
)

GiB = 1 << 30
GOOD = encode(noise_image(1), "JPEG")

_RUN = """
import json, resource, sys, time
from curation.ingest import ingest
from curation.workspace import Workspace
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
s = ingest(Workspace(sys.argv[1]), [sys.argv[2]], workers=1, progress=False)
from curation.decode_sandbox import _close_all
_close_all()  # reap the decode process, so its CPU time is counted
kids = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"seconds": time.perf_counter() - start, "reasons": s.shards[0].reasons if s.shards else {},
                  "decode_cpu_s": kids.ru_utime + kids.ru_stime,
                  "accepted": s.accepted, "failed": list(s.failed.values()),
                  "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "grew_mib": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024}))
"""


def build(folder: Path) -> dict[str, Path]:
    grey = encode(np.full((6000, 6000), 128, np.uint8), "JPEG", progressive=True)
    last, eoi = grey.rindex(b"\xff\xda"), grey.rindex(b"\xff\xd9")

    def with_scans(n: int) -> bytes:  # the grey JPEG with its last scan repeated: n scans in all
        return grey[:last] + grey[last:eoi] * (n - grey.count(b"\xff\xda") + 1) + grey[eoi:]

    one = lambda name, data: write_tar(folder / f"{name}.tar", [{"__key__": "000", name.split("-")[0]: data,  # noqa: E731
                                                                "json": meta("000")}])
    return {
        "1 GiB member (sparse file)": huge_member_tar(folder / "huge.tar", GiB, after=[("001.jpg", GOOD)]),
        "1 GiB pax header": huge_member_tar(folder / "pax.tar", GiB, name="././@PaxHeader", kind=tarfile.XHDTYPE),
        "JPEG, 20,000 empty scans": one("jpg-scans", jpeg_many_scans(1024, 20_000)),
        "JPEG 6000x6000 grey, 100 scans": one("jpg-scans100", with_scans(100)),
        "JPEG 6000x6000 grey, 27 scans (at the limits)": one("jpg-scans27", with_scans(27)),
        "JPEG, 643 bytes claiming 6000x6000": one("jpg-lie", jpeg_header_lie()),
        "PNG, 254 bytes claiming 6000x6000": one("png-lie", png_short_stream(6000, 6000, 1)),
        "GIF claiming 3000x3000": one("gif-lie", gif_header_lie(3000, 3000)),
        "10,000 symlinks and FIFOs": raw_tar(folder / "odd.tar", [
            member(f"{i}.jpg", kind=tarfile.SYMTYPE if i % 2 else tarfile.FIFOTYPE, linkname="/etc/passwd")
            for i in range(10_000)]),
        "5,000 samples under one key": raw_tar(folder / "dups.tar", [
            member("k.jpg", GOOD) if i % 2 == 0 else member("k.json", meta("k")) for i in range(10_000)]),
    }


def measure(shard: Path, ws: Path) -> dict:
    proc = subprocess.Popen([sys.executable, "-c", _RUN, str(ws), str(shard)], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    peak, seen = [0], set()

    def sample():
        parent = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                for child in parent.children(recursive=True):
                    if "decode_sandbox" not in " ".join(child.cmdline()):
                        continue
                    rss = child.memory_info().rss
                    if child.pid in seen:  # a first reading may still be the forked parent's pages
                        peak[0] = max(peak[0], rss)
                    seen.add(child.pid)
            except psutil.Error:
                pass
            time.sleep(0.02)

    watcher = threading.Thread(target=sample)
    watcher.start()
    out, _ = proc.communicate()
    watcher.join()
    result = json.loads(out.strip().splitlines()[-1])
    result["sandbox_mib"] = peak[0] / 2**20
    return result


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        inputs = build(Path(tmp) / "crawl")
        rows = {}
        for i, (name, shard) in enumerate(inputs.items()):
            rows[name] = measure(shard, Path(tmp) / f"ws{i}")
    worst = max(rows, key=lambda k: rows[k]["seconds"])
    print(json.dumps(rows, indent=2))
    print()
    print("| hostile input | outcome | wall s | decode CPU s | ingest peak RSS MiB (growth past imports) "
          "| decode process peak MiB |")
    print("|---|---|---:|---:|---:|---:|")
    for name, r in rows.items():
        outcome = ", ".join(f"{k}: {v}" for k, v in sorted(r["reasons"].items())) or "-"
        if r["accepted"]:
            outcome += f"; {r['accepted']} accepted"
        mark = " (worst)" if name == worst else ""
        print(f"| {name}{mark} | {outcome} | {r['seconds']:.2f} | {r['decode_cpu_s']:.2f} | {r['peak_mib']:.0f} "
              f"({r['grew_mib']:.0f}) | {r['sandbox_mib']:.0f} |")


if __name__ == "__main__":
    main()
