import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cwd=None, env=None, input: str | None = None) -> subprocess.CompletedProcess:
    """Run `webdistill` as a user would, in a subprocess (with `input` on its stdin)."""
    full_env = dict(os.environ, **(env or {}))
    full_env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True,
                          cwd=cwd or ROOT, env=full_env, timeout=600, input=input)


def encode(arr: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt, **kw)
    return buf.getvalue()


def noise_image(seed: int, size=(64, 48)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)


def write_tar(path: Path, samples: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path)) as sink:
        for s in samples:
            sink.write(s)
    return path


def meta(key: str, **extra) -> bytes:
    return json.dumps({"url": f"https://img.example/{key}.jpg", "caption": f"caption {key}", **extra}).encode()


@pytest.fixture(scope="session")
def small_crawl(tmp_path_factory) -> Path:
    """The demo crawl at a small size: every planted defect, 3 shards, the last one cut off."""
    from flows.demo.crawl import build_demo_crawl

    out = tmp_path_factory.mktemp("demo")
    build_demo_crawl(out, size=400, n_shards=3, seed=0, workers=1, progress=False)
    return out


@pytest.fixture(scope="session")
def small_teacher(small_crawl, tmp_path_factory) -> Path:
    """A demo teacher trained 2 epochs on the small crawl's teacher split: its teacher.json spec."""
    import shutil

    from flows.demo.teacher import train_demo_teacher

    root = tmp_path_factory.mktemp("teacher")
    (root / "teacher").mkdir()
    shutil.copy(small_crawl / "teacher" / "train.npz", root / "teacher" / "train.npz")
    (root / "eval").symlink_to(small_crawl / "eval")
    train_demo_teacher(root, epochs=2, log=lambda *_: None)
    return root / "teacher" / "teacher.json"


@pytest.fixture(scope="session")
def prefect_server():
    """A temporary Prefect server (SQLite) for the flows of this test session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
