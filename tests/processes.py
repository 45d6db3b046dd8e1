"""Waiting on a process a test started, by what it reports rather than by elapsed time."""
from __future__ import annotations

import subprocess
import time
from pathlib import Path


def wait_for_pid_file(pid_file: Path, owner: subprocess.Popen, timeout: float = 120.0) -> int:
    """The pid a reward wrote to `pid_file` once it started hanging; fails if `owner` exits or time runs out first."""
    deadline = time.time() + timeout
    while not pid_file.exists() and owner.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert pid_file.exists(), "the reward never started hanging"
    return int(pid_file.read_text())
