"""Per-item functions for the process-pool fault tests. A module of its own, importing nothing
heavy: spawned workers import it by name, once per pool."""
import os
import signal
import time
from pathlib import Path


def square_unless_poisoned(item: tuple[int, str, str]) -> int:
    """Item 3 kills its own process: on its first try only ('once') or on every try ('always')."""
    n, folder, mode = item
    if n == 3:
        tries = Path(folder) / "tries"
        with open(tries, "a") as fh:
            fh.write("x")
        if mode == "always" or tries.stat().st_size == 1:
            os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(0.05)
    return n * n
