"""Stopping the child processes the tests start: always our own child, by its PID."""

from __future__ import annotations

import contextlib
import signal
import subprocess
from typing import Any

KILL_WAIT_SECONDS = 5.0


def signal_child(proc: subprocess.Popen[Any], signum: int) -> None:
    """Send a signal to our child if it still runs (never to anything by name)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signum)


def reap(proc: subprocess.Popen[Any], timeout: float) -> None:
    """Wait for an already signalled child; SIGKILL it after ``timeout``."""
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        signal_child(proc, signal.SIGKILL)
        proc.wait(KILL_WAIT_SECONDS)


def terminate(proc: subprocess.Popen[Any], timeout: float) -> None:
    """SIGTERM, wait up to ``timeout``, then SIGKILL."""
    signal_child(proc, signal.SIGTERM)
    reap(proc, timeout)
