"""Starting, measuring and stopping the benchmark's processes (by PID, nothing else)."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
STOP_GRACE_SECONDS = 10.0


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process, from /proc/PID/stat (clock-tick resolution)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()
    # fields[0] is the state (field 3 of stat(5)); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def status_kib(pid: int, key: str) -> int:
    """A "kB" line of /proc/PID/status, e.g. VmRSS or VmHWM."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Proc:
    """One child process we started; stop() ends it by its PID only."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        stdout_pipe: bool = False,
        log: Path | None = None,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self._log = open(log, "wb") if log is not None else subprocess.DEVNULL  # noqa: SIM115
        self.popen = subprocess.Popen(
            self.argv,
            stdout=subprocess.PIPE if stdout_pipe else self._log,
            stderr=self._log,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=cwd,
        )
        self.pid = self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def status(self, key: str) -> int:
        return status_kib(self.pid, key)

    def read_line(self, timeout: float) -> str:
        """One line of the child's stdout (needs stdout_pipe), waiting at most `timeout`."""
        stream = self.popen.stdout
        assert stream is not None
        ready, _, _ = select.select([stream], [], [], timeout)
        if not ready:
            raise TimeoutError(f"{self.name} printed nothing within {timeout}s")
        line = stream.readline().decode()
        if not line:
            raise RuntimeError(f"{self.name} exited (status {self.popen.poll()})")
        return line

    def signal(self, signum: int) -> None:
        if self.alive():
            os.kill(self.pid, signum)

    def stop(self) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(STOP_GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
                self.popen.wait(STOP_GRACE_SECONDS)
        if self.popen.stdout is not None:
            self.popen.stdout.close()
        if not isinstance(self._log, int):
            self._log.close()


def wait_for_port(port: int, proc: Proc, timeout: float = 20.0) -> None:
    """Until something accepts on 127.0.0.1:port (bounded), or the process died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited with status {proc.popen.poll()}")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(0.5)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"{proc.name} did not listen on 127.0.0.1:{port} within {timeout}s")
