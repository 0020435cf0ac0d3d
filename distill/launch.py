"""Launching the distillation job under torchrun, on one node or several.

    torchrun_command("job.yaml", nproc=2)
        -> [python, -m, torch.distributed.run, --standalone, --nnodes, 1, --nproc-per-node, 2,
            -m, distill.train, job.yaml]
    torchrun_command("job.yaml", nproc=8, nnodes=4, rdzv_endpoint="head:29400")
        -> ... --nnodes 4 --node-rank R --rdzv-backend c10d --rdzv-endpoint head:29400 --rdzv-id <config hash> ...

Every node runs the same command (its own `node_rank`); the out folder must be shared between nodes
(rank 0 writes the checkpoint that every rank resumes from).

Writes `<out>/job.log` (distill.joblog): the whole output of every attempt, streamed or not. A failed
job raises DistillJobError: its first line is the reason (the job's own `distill: error:` line, or the
rank that torchrun saw die first and how) and the log's path, then the output's last lines.
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

from curation.errors import WebdistillError

from .config import load_config
from .data import load_manifest
from .joblog import JobLog, last_lines

# up to the next rank's line, should two ranks' lines still run together
ERROR_LINE = re.compile(r"distill: (error|interrupted): "
                        r"(?:(?!distill: (?:error|interrupted): |\s*\[rank\d+\]: )[^\r\n])*")
# torchrun's summary of a failed job names the rank that failed first, and how
ROOT_CAUSE = re.compile(r"Root Cause \(first observed failure\):.*?rank\s*: (\d+).*?exitcode\s*: (-?\d+)[^\n]*", re.S)
SIGNAL_NAME = re.compile(r"\((SIG[A-Z0-9]+)\)")
EXCEPTION_LINE = re.compile(r"^(?:\[rank\d+\]: )?([A-Za-z_.]*(?:Error|Exception)): (.+)$", re.M)
TAIL_LINES = 20


class DistillJobError(WebdistillError, RuntimeError):
    """The job failed. The first line of the message is the reason and where the whole output is
    (job.log: what a CLI prints); the next ones are the output's last lines, which `tail` holds too."""

    def __init__(self, message: str, log: Path | None = None, tail: list[str] | None = None):
        super().__init__(message)
        self.log, self.tail = log, tail or []

    @classmethod
    def from_output(cls, code: int, text: str, log: Path) -> DistillJobError:
        tail = last_lines(text, TAIL_LINES)
        lines = [f"{failure_reason(code, text)} (the job's output: {log})", "its last lines:",
                 *(f"  | {line}" for line in tail)]
        return cls("\n".join(lines), log, tail)


def failure_reason(code: int, text: str) -> str:
    """One line: a rank that was killed (torchrun's root cause), else the job's own error line, else
    the first rank that failed and the last exception it printed."""
    root = ROOT_CAUSE.search(text)
    if root and int(root.group(2)) < 0:
        sig = SIGNAL_NAME.search(root.group(0))
        return (f"the distillation job failed: rank {root.group(1)} was killed by "
                f"{sig.group(1) if sig else f'signal {-int(root.group(2))}'}")
    if match := ERROR_LINE.search(text):
        return match.group(0).removeprefix("distill: error: ")
    exceptions = EXCEPTION_LINE.findall(text)
    what = f": {exceptions[-1][0]}: {exceptions[-1][1]}" if exceptions else ""
    if root:
        return f"the distillation job failed: rank {root.group(1)} exited with code {root.group(2)}{what}"
    return f"the distillation job failed (exit code {code}){what}"


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
    """Run the job under torchrun, copying its output to `stream` as it comes (None: not shown) and
    always to `<out>/job.log`, and return summary.json.

    The config and the selection are checked here first, so their errors come back at once as
    ConfigError / DataError; a job that fails later raises DistillJobError (reason, log, last lines)."""
    cfg = load_config(config_path)
    load_manifest(cfg.selection)
    cmd = torchrun_command(Path(config_path).resolve(), nproc, nnodes, node_rank, rdzv_endpoint)
    log = JobLog(cfg.out_dir, cmd)
    code = None
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=_job_env(env))
        assert proc.stdout is not None
        while chunk := proc.stdout.read1(65536):  # chunks, not lines: tqdm redraws with \r
            if stream is not None:
                stream.write(chunk.decode(errors="replace"))
                stream.flush()
            log.write(chunk)
        code = proc.wait()
    finally:
        log.close(code)
    if code != 0:
        raise DistillJobError.from_output(code, log.text(), log.path)
    summary_path = cfg.out_dir / "summary.json"
    return json.loads(summary_path.read_text())
