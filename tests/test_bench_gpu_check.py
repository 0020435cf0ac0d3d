"""bench/gpu_check.sh without a GPU: one JSON object saying so, exit status 0 (CI machines have none)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the script would run the checks")
def test_gpu_check_says_there_is_no_gpu(tmp_path):
    out = tmp_path / "gpu.json"
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), str(out)], capture_output=True, text=True,
                          env=os.environ | {"PYTHON": sys.executable}, timeout=120)
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)
    assert printed == json.loads(out.read_text())
    assert printed["gpu"] is False and "CUDA" in printed["reason"]
