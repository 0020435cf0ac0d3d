"""Launching the distillation job under torchrun, on one node or several.

    torchrun_command("job.yaml", nproc=2)
        -> [python, -m, torch.distributed.run, --standalone, --nnodes, 1, --nproc-per-node, 2,
            -m, distill.train, job.yaml]
    torchrun_command("job.yaml", nproc=8, nnodes=4, rdzv_endpoint="head:29400")
        -> ... --nnodes 4 --node-rank R --rdzv-backend c10d --rdzv-endpoint head:29400 --rdzv-id <config hash> ...

Every node runs the same command (its own `node_rank`); the out folder must be shared between nodes
(rank 0 writes the checkpoint that every rank resumes from).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import TextIO

from .config import load_config
from .data import load_manifest

ERROR_LINE = re.compile(r"distill: (error|interrupted): .*")


class DistillJobError(RuntimeError):
    """The job exited with an error; the message is its one-line reason."""


def _rdzv_id(config_path: str | Path) -> str:
    """The same id on every node: a hash of the config's content (paths may differ between nodes)."""
    return "webdistill-" + hashlib.sha256(Path(config_path).read_bytes()).hexdigest()[:12]


def torchrun_command(config_path: str | Path, nproc: int, nnodes: int = 1, node_rank: int = 0,
                     rdzv_endpoint: str | None = None, rdzv_id: str | None = None) -> list[str]:
    """The torchrun command line for `python -m distill.train CONFIG` with `nproc` processes per node."""
    if nproc < 1 or nnodes < 1 or not 0 <= node_rank < nnodes:
        raise ValueError(f"need nproc >= 1, nnodes >= 1 and 0 <= node_rank < nnodes, "
                         f"got {nproc}, {nnodes}, {node_rank}")
    cmd = [sys.executable, "-m", "torch.distributed.run"]
    if nnodes == 1 and rdzv_endpoint is None:
        cmd += ["--standalone", "--nnodes", "1"]
    else:
        if rdzv_endpoint is None or not re.fullmatch(r"[^\s:]+:\d+", rdzv_endpoint):
            raise ValueError(f"several nodes need rdzv_endpoint HOST:PORT (the rendezvous host), got {rdzv_endpoint!r}")
        cmd += ["--nnodes", str(nnodes), "--node-rank", str(node_rank), "--rdzv-backend", "c10d",
                "--rdzv-endpoint", rdzv_endpoint, "--rdzv-id", rdzv_id or _rdzv_id(config_path)]
    return cmd + ["--nproc-per-node", str(nproc), "-m", "distill.train", str(config_path)]


def _job_env(extra: dict | None) -> dict:
    """The job imports `distill` from this checkout, wherever it is started from."""
    env = dict(os.environ, **(extra or {}))
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def launch(config_path: str | Path, nproc: int = 1, nnodes: int = 1, node_rank: int = 0,
           rdzv_endpoint: str | None = None, env: dict | None = None, stream: TextIO | None = sys.stderr) -> dict:
    """Run the job under torchrun, copying its output to `stream` as it comes, and return summary.json.

    The config and the selection are checked here first, so their errors come back at once as
    ConfigError / DataError; a job that fails later raises DistillJobError with its one-line reason."""
    cfg = load_config(config_path)
    load_manifest(cfg.selection)
    cmd = torchrun_command(Path(config_path).resolve(), nproc, nnodes, node_rank, rdzv_endpoint)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=_job_env(env))
    tail = bytearray()
    assert proc.stdout is not None
    while chunk := proc.stdout.read1(65536):  # chunks, not lines: tqdm redraws with \r
        if stream is not None:
            stream.write(chunk.decode(errors="replace"))
            stream.flush()
        tail = (tail + chunk)[-200_000:]
    code = proc.wait()
    if code != 0:
        text = tail.decode(errors="replace")
        match = ERROR_LINE.search(text)
        raise DistillJobError(match.group(0).removeprefix("distill: error: ") if match
                              else f"the distillation job failed (exit code {code}); see its output above")
    summary_path = cfg.out_dir / "summary.json"
    return json.loads(summary_path.read_text())
