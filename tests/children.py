"""The command processes tests start (``popen``), so that none outlives its test: the
autouse fixture in conftest kills whatever a test left running, e.g. the second of two
long runs when an assertion about the first one failed."""

from __future__ import annotations

import subprocess
from typing import Any

STARTED: list[subprocess.Popen] = []


def popen(*args: Any, **kwargs: Any) -> subprocess.Popen:
    proc = subprocess.Popen(*args, **kwargs)
    STARTED.append(proc)
    return proc


def kill_leftovers() -> list[subprocess.Popen]:
    """Kill and reap every started process still running; return them."""
    left = [p for p in STARTED if p.poll() is None]
    for proc in left:
        proc.kill()
        proc.communicate()
    STARTED.clear()
    return left
