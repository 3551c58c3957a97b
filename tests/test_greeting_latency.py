"""probe_pop3_greeting_seconds is when the greeting arrived, not when a busy event loop
got round to reading it."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from pop3_exporter.config import Module
from pop3_exporter.prober import probe_pop3
from pop3_exporter.protocol import KERNEL_TIMESTAMPS
from pop3_exporter.target import ProbeTarget

GREETING_DELAY = 0.05
LOOP_BLOCKED_FOR = 0.4


@pytest.fixture
def delayed_greeter() -> Iterator[int]:
    """A POP3 server in its own thread (so a blocked test loop cannot delay it) that
    greets GREETING_DELAY after accepting, then answers CAPA and QUIT."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)
    port = listener.getsockname()[1]

    def serve() -> None:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(10)
            time.sleep(GREETING_DELAY)
            conn.sendall(b"+OK ready\r\n")
            reader = conn.makefile("rb")
            for _ in range(10):
                line = reader.readline()
                if not line:
                    break
                if line.startswith(b"CAPA"):
                    conn.sendall(b"+OK\r\nTOP\r\n.\r\n")
                elif line.startswith(b"QUIT"):
                    conn.sendall(b"+OK bye\r\n")
                    break
            reader.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield port
    listener.close()
    thread.join(timeout=10)


@pytest.mark.skipif(not KERNEL_TIMESTAMPS, reason="needs Linux SO_TIMESTAMPNS")
async def test_greeting_time_survives_a_blocked_event_loop(delayed_greeter: int) -> None:
    loop = asyncio.get_running_loop()
    target = ProbeTarget("127.0.0.1", delayed_greeter, True)
    probe = asyncio.create_task(probe_pop3(target, Module(name="pop3"), loop.time() + 10))
    await asyncio.sleep(0.01)  # let the probe connect
    # Deliberately block the whole loop while the greeting arrives.
    time.sleep(LOOP_BLOCKED_FOR)  # noqa: ASYNC251
    result = await probe
    assert result.success, result.failure_detail
    assert result.greeting_seconds is not None
    # The server's delay, not the time the loop was blocked.
    assert GREETING_DELAY - 0.01 <= result.greeting_seconds < LOOP_BLOCKED_FOR - 0.1
