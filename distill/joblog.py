"""A distillation job's output, kept in its run folder: `<out>/job.log` (and `job.log.1`, the one before).

Every attempt of the job appends its whole output (every rank's stdout and stderr and torchrun's own
lines) under a header line `==== <UTC time> attempt <n>: <command>`. The file stays bounded: an attempt
keeps its first `cap` bytes and its last `tail_bytes`, with a line saying how much was left out between
them, and an attempt that finds the file over `cap` first moves it to `job.log.1` (replacing the older
one). So the two files hold at most about 4 x `cap`, however long or chatty the job.
"""
from __future__ import annotations

import os
import re
import shlex
from datetime import UTC, datetime
from pathlib import Path

JOB_LOG = "job.log"
HEADER = re.compile(rb"^==== \S+ attempt (\d+): ", re.MULTILINE)


def last_lines(text: str, n: int) -> list[str]:
    """The last `n` non-empty lines; a tqdm bar redrawn with \\r counts as one line per redraw."""
    lines = [line.rstrip() for line in text.replace("\r", "\n").split("\n")]
    return [line for line in lines if line.strip()][-n:]


class JobLog:
    """Appends one attempt's output to `<folder>/job.log`; `tail` keeps its last bytes for the error."""

    def __init__(self, folder: Path, command: list[str], cap: int = 1 << 20, tail_bytes: int = 64 << 10):
        self.path = Path(folder) / JOB_LOG
        self.cap, self.tail_bytes = cap, tail_bytes
        self.written = self.left_out = 0
        self.tail = bytearray()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        attempt = self._last_attempt() + 1
        if self.path.is_symlink():  # the run folder is the job's own: a link here would write elsewhere
            self.path.unlink()
        elif self.path.is_file() and self.path.stat().st_size > cap:
            self.path.replace(self.path.with_name(JOB_LOG + ".1"))
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
        self._fh = os.fdopen(os.open(self.path, flags, 0o644), "ab")
        stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        self._fh.write(f"==== {stamp} attempt {attempt}: {shlex.join(map(str, command))}\n".encode())
        self._fh.flush()
        self.attempt = attempt

    def _last_attempt(self) -> int:
        """The number of the last attempt logged here (the rotated file counts when this one is gone)."""
        for path in (self.path, self.path.with_name(JOB_LOG + ".1")):
            if path.is_file() and not path.is_symlink():
                with open(path, "rb") as fh:  # headers are near the start of each attempt: bounded by 2 x cap
                    found = HEADER.findall(fh.read(4 * self.cap))
                if found:
                    return int(found[-1])
        return 0

    def write(self, chunk: bytes) -> None:
        room = max(self.cap - self.written, 0)
        if room:
            self._fh.write(chunk[:room])
            self._fh.flush()
            self.written += min(room, len(chunk))
        self.left_out += max(len(chunk) - room, 0)
        self.tail = (self.tail + chunk)[-self.tail_bytes:]

    def close(self, exit_code: int | None) -> None:
        """Write the end of an output longer than `cap`, and the exit code."""
        if self.left_out:
            kept = self.tail[-min(self.left_out, self.tail_bytes):]
            if self.left_out > len(kept):
                self._fh.write(f"\n[... {self.left_out - len(kept)} bytes left out ...]\n".encode())
            self._fh.write(bytes(kept))
        ending = f"exit code {exit_code}" if exit_code is not None else "stopped before the job ended"
        self._fh.write(f"\n==== {ending}\n".encode())
        self._fh.close()

    def text(self) -> str:
        return self.tail.decode(errors="replace")
