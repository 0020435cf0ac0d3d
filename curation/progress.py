"""Whether a progress bar shows: the caller's word, and the user's (`webdistill -q` sets
WEBDISTILL_PROGRESS=0, which reaches worker processes too)."""
from __future__ import annotations

import os


def bar_disabled(progress: bool) -> bool | None:
    """tqdm's `disable`: True when the caller or the user turned bars off; None otherwise (tqdm then
    hides it when the output is not a terminal)."""
    return True if not progress or os.environ.get("WEBDISTILL_PROGRESS") == "0" else None
