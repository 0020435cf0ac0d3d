"""Decoding untrusted images in a child process, under a CPU-time and memory budget.

PIL decodes in C, where no Python timeout reaches. The child sets RLIMIT_CPU to its CPU time so
far plus the budget before each image, so the kernel stops a decode that overruns (SIGXCPU), and
RLIMIT_AS bounds its memory. The parent also keeps a wall-clock deadline, in case the child is
starved or stopped. A child that dies costs one image (`decode_budget`, or `corrupt_image` for a
crashed decoder) and is replaced for the next. The child exits with its parent (PR_SET_PDEATHSIG,
and EOF on its input), writes no file (RLIMIT_FSIZE 0) and dumps no core.
"""
from __future__ import annotations

import atexit
import fcntl
import json
import os
import select
import signal
import struct
import subprocess
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TypeVar

from .parallel import die_with_parent
from .validate import ImageInfo, Rejected, ValidationConfig, validate_image

_ROOT = str(Path(__file__).resolve().parents[1])
_LEN = struct.Struct(">Q")
T = TypeVar("T")
WALL_FACTOR = 4  # the wall-clock deadline, as a multiple of the CPU budget (plus a start-up allowance)


class DecodeSandbox:
    """`validate_all` is `validate_image` over many images, run in a child process under budget.

    Up to `window` images (and `window_bytes`) are in flight, so the child decodes while the
    caller reads the tar, hashes and builds rows; results come back in order."""

    def __init__(self, config: ValidationConfig, window: int = 16, window_bytes: int = 64 * 1024 * 1024):
        self.config, self.window, self.window_bytes = config, window, window_bytes
        self._proc: subprocess.Popen | None = None
        self._dead = False  # a write failed: the next read finds out why
        self.restarts = 0

    def __enter__(self) -> DecodeSandbox:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def validate(self, data: bytes) -> ImageInfo:
        for _, result in self.validate_all([(None, data)]):
            if isinstance(result, Rejected):
                raise result
            return result
        raise AssertionError("unreachable")

    def validate_all(self, items: Iterable[tuple[T, bytes]]) -> Iterator[tuple[T, ImageInfo | Rejected]]:
        """(tag, ImageInfo or Rejected) for each (tag, image bytes), in order. An exception from
        `items` (a tar cut off) is raised after the results of everything read before it."""
        queue: deque[list] = deque()  # [tag, data, result or None], sent to the current child
        try:
            yield from self._results(queue, iter(items))
        finally:
            if any(entry[2] is None for entry in queue):  # abandoned mid-way: its replies would go astray
                self._kill()

    def _results(self, queue: deque, source) -> Iterator[tuple]:
        error = None
        while True:
            while source is not None and len(queue) < self.window and \
                    sum(len(e[1]) for e in queue) < self.window_bytes:
                try:
                    tag, data = next(source)
                except StopIteration:
                    source = None
                    break
                except Exception as exc:  # noqa: BLE001 - raised below, after the images in flight
                    source, error = None, exc
                    break
                if len(data) > self.config.max_image_bytes:  # cheap refusals need no child
                    too_large = Rejected("too_large", f"{len(data)} bytes > {self.config.max_image_bytes}")
                    queue.append([tag, b"", too_large])
                    continue
                queue.append([tag, data, None])
                self._send(data)
            if not queue:
                break
            tag, data, result = queue.popleft()
            yield tag, result if result is not None else self._receive(queue)
        if error is not None:
            raise error

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            proc.kill()
            proc.wait()
            proc.stdin.close()
            proc.stdout.close()

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            proc.stdin.close()  # EOF: the child's loop ends
            proc.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait()
        proc.stdout.close()

    def _send(self, data: bytes) -> None:
        if self._proc is None:
            code = f"import sys; sys.path.insert(0, {_ROOT!r}); from curation.decode_sandbox import serve; serve()"
            self._proc = subprocess.Popen([sys.executable, "-I", "-c", code, json.dumps(self.config.as_dict())],
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
            self._replies, self._dead = _Replies(self._proc.stdout.fileno()), False
            try:  # room for the images in flight, so the writer rarely waits on the decoder
                fcntl.fcntl(self._proc.stdin.fileno(), 1031, 1 << 20)  # F_SETPIPE_SZ
            except OSError:
                pass
        if self._dead:
            return
        try:
            self._proc.stdin.write(_LEN.pack(len(data)))
            self._proc.stdin.write(data)
            self._proc.stdin.flush()
        except OSError:  # the child died on an earlier image: reading its reply says which
            self._dead = True

    def _receive(self, queue: deque) -> ImageInfo | Rejected:
        deadline = time.monotonic() + WALL_FACTOR * self.config.decode_cpu_seconds + 5
        try:
            reply = json.loads(self._replies.next(deadline))
        except (OSError, EOFError, TimeoutError, ValueError) as exc:
            rejected = self._died(exc)
            for entry in queue:  # what the dead child had not answered goes to a fresh one
                if entry[2] is None:
                    self._send(entry[1])
            return rejected
        if "reason" in reply:
            return Rejected(str(reply["reason"]), str(reply.get("detail", "")))
        return ImageInfo(int(reply["width"]), int(reply["height"]), str(reply["format"]), str(reply["mode"]))

    def _died(self, exc: BaseException) -> Rejected:
        """The child died or overran on this image: kill it, say why; the next send starts afresh."""
        proc, self._proc = self._proc, None
        self.restarts += 1
        if proc.poll() is None:
            proc.kill()
        status = proc.wait()
        for pipe in (proc.stdin, proc.stdout):
            try:
                pipe.close()
            except OSError:
                pass
        budget = self.config.decode_cpu_seconds
        if isinstance(exc, TimeoutError):
            return Rejected("decode_budget", f"decoding took more than {WALL_FACTOR * budget + 5} s of wall time")
        if status == -signal.SIGXCPU:
            return Rejected("decode_budget", f"decoding took more than {budget} s of CPU time")
        if status == -signal.SIGKILL:  # the kernel's last word on RLIMIT_CPU, or an OOM kill
            return Rejected("decode_budget", "the decode process was killed (CPU or memory budget)")
        return Rejected("corrupt_image", f"the decoder crashed (exit status {status})")


_per_thread = threading.local()
_open: weakref.WeakSet[DecodeSandbox] = weakref.WeakSet()


def shared_sandbox(config: ValidationConfig) -> DecodeSandbox:
    """This thread's sandbox for `config`, kept from shard to shard: starting one (Python and PIL)
    costs as much as decoding a few hundred small images. Closed at exit."""
    box = getattr(_per_thread, "box", None)
    if box is None or box.config != config:
        if box is not None:
            box.close()
        box = _per_thread.box = DecodeSandbox(config)
        _open.add(box)
    return box


@atexit.register
def _close_all() -> None:
    for box in list(_open):
        box.close()


class _Replies:
    """Length-prefixed replies from the child; one read may bring several (they are pipelined)."""

    def __init__(self, fd: int):
        self.fd, self.buf = fd, bytearray()

    def next(self, deadline: float) -> bytes:
        """The next reply, or TimeoutError at the deadline, EOFError if the child died."""
        while True:
            if len(self.buf) >= 8:
                (n,) = _LEN.unpack_from(self.buf)
                if n > 1 << 20:
                    raise ValueError("reply too long")
                if len(self.buf) >= 8 + n:
                    body = bytes(self.buf[8 : 8 + n])
                    del self.buf[: 8 + n]
                    return body
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.fd], [], [], left)[0]:
                raise TimeoutError
            chunk = os.read(self.fd, 1 << 16)
            if not chunk:
                raise EOFError
            self.buf += chunk


# --- the child ----------------------------------------------------------------------------------

def serve() -> None:
    """The child's loop: read an image, validate it under budget, write the result as JSON."""
    import resource

    die_with_parent()
    fields = json.loads(sys.argv[1])
    config = ValidationConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
    resource.setrlimit(resource.RLIMIT_AS, (config.decode_memory_bytes, config.decode_memory_bytes))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))
    _, cpu_hard = resource.getrlimit(resource.RLIMIT_CPU)
    src = os.fdopen(os.dup(0), "rb")
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # nothing a library prints can corrupt the replies
    while True:
        head = src.read(8)
        if len(head) < 8:
            return
        data = src.read(_LEN.unpack(head)[0])
        usage = resource.getrusage(resource.RUSAGE_SELF)
        soft = int(usage.ru_utime + usage.ru_stime) + config.decode_cpu_seconds + 1
        if cpu_hard != resource.RLIM_INFINITY:
            soft = min(soft, cpu_hard)
        resource.setrlimit(resource.RLIMIT_CPU, (soft, cpu_hard))
        try:
            info = validate_image(data, config)
            reply = {"width": info.width, "height": info.height, "format": info.format, "mode": info.mode}
        except Rejected as rej:
            reply = {"reason": rej.reason, "detail": rej.detail}
        body = json.dumps(reply).encode()
        out.write(_LEN.pack(len(body)) + body)
        out.flush()
