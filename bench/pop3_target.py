"""A minimal, cheap POP3 server for the benchmark, run as its own process.

Each listener is ``NAME=KIND:DELAY_MS`` where KIND is ``plain`` (greeting, CAPA with
STLS, STLS, QUIT) or ``tls`` (implicit TLS, then the same dialogue). DELAY_MS holds the
greeting back that long after the connection is accepted (the "truth" for the
greeting-latency test; a long delay keeps probes in flight for the memory test).

It listens on 127.0.0.1 only, on ports the kernel picks, and prints one JSON line
``{"ports": {NAME: PORT}}`` when ready. On SIGUSR1 it prints one JSON line with how
late its delayed greetings went out (its own scheduling error, to set beside the
exporters' error) and starts counting afresh. SIGTERM or --max-seconds ends it.

With --precise, each plaintext listener is served by a thread that accepts and writes
each greeting when it is due (an event loop accepts in batches and runs timers up to a
millisecond late; the thread, at real-time priority, is typically within a few tens of
microseconds), so that the greeting-latency test measures the exporters, not this
server. The rest of each conversation runs on the event loop as usual.
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import json
import os
import select
import signal
import socket
import ssl
import sys
import threading
import time
from typing import Any

GREETING = b"+OK POP3 bench target ready\r\n"
CAPA_PLAIN = b"+OK Capability list follows\r\nUSER\r\nUIDL\r\nTOP\r\nSTLS\r\n.\r\n"
CAPA_TLS = b"+OK Capability list follows\r\nUSER\r\nUIDL\r\nTOP\r\n.\r\n"
IDLE_SECONDS = 30.0
MAX_LINE = 1024
BACKLOG = 4096


class Listener:
    def __init__(self, name: str, kind: str, delay: float) -> None:
        self.name = name
        self.kind = kind
        self.delay = delay
        self.lateness: list[float] = []
        self.connections = 0
        self.open = 0
        self.peak_open = 0


class PreciseListener(threading.Thread):
    """Accepts on one plaintext listener and writes each greeting when it is due, from
    its own thread; the rest of each conversation is handed to the event loop.

    The delay counts from accept() in this thread: an event loop accepts in batches
    and runs timers up to a millisecond late, which would blur the known truth.
    """

    def __init__(
        self,
        listener: Listener,
        sock: socket.socket,
        loop: asyncio.AbstractEventLoop,
        context: ssl.SSLContext,
    ) -> None:
        super().__init__(name=f"precise-{listener.name}", daemon=True)
        self.listener = listener
        self.sock = sock
        self.loop = loop
        self.context = context
        # Guards Pop3Session.closed: the loop closes a session's socket only after
        # connection_lost() marked it closed under this lock, so a greeting is never
        # written to a descriptor number that a newer connection has reused.
        self.lock = threading.Lock()
        self.due: list[tuple[float, int, Pop3Session]] = []
        self.count = 0
        self.stopping = False

    def run(self) -> None:
        self.sock.setblocking(False)
        while not self.stopping:
            wait = 0.5
            if self.due:
                wait = max(0.0, self.due[0][0] - time.monotonic())
            readable, _, _ = select.select([self.sock], [], [], wait)
            if readable:
                self._accept()
            now = time.monotonic()
            while self.due and self.due[0][0] <= now:
                when, _, session = heapq.heappop(self.due)
                self._greet(session, now - when)

    def _accept(self) -> None:
        for _ in range(64):
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            accepted = time.monotonic()
            session = Pop3Session(self.listener, self.context, self, self.loop)
            session.fd = conn.fileno()
            if self.listener.delay <= 0:
                self._greet(session, 0.0)
            else:
                self.count += 1
                heapq.heappush(self.due, (accepted + self.listener.delay, self.count, session))
            self.loop.call_soon_threadsafe(_adopt, self.loop, conn, session)

    def _greet(self, session: Pop3Session, late: float) -> None:
        with self.lock:
            if session.closed:
                return
            try:
                os.write(session.fd, GREETING)
            except OSError:
                return
        self.listener.lateness.append(late)


def _adopt(loop: asyncio.AbstractEventLoop, conn: socket.socket, session: Pop3Session) -> None:
    task = loop.create_task(loop.connect_accepted_socket(lambda: session, conn))
    task.add_done_callback(_ignore)


class Pop3Session(asyncio.Protocol):
    def __init__(
        self,
        listener: Listener,
        context: ssl.SSLContext,
        precise: PreciseListener | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.listener = listener
        self.context = context
        self.precise = precise  # greets for us, from its thread
        self.closed = False
        self.fd = -1
        self.loop = loop or asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.tls = listener.kind == "tls"
        self.upgrading = False
        self.idle: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        listener = self.listener
        listener.connections += 1
        listener.open += 1
        listener.peak_open = max(listener.peak_open, listener.open)
        self.idle = self.loop.call_later(IDLE_SECONDS + self.listener.delay, self.abort)
        if self.precise is not None:
            pass
        elif self.listener.delay > 0:
            when = self.loop.time() + self.listener.delay
            self.loop.call_at(when, self.greet, when)
        elif self.transport is not None:
            self.transport.write(GREETING)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def greet(self, when: float) -> None:
        self.listener.lateness.append(self.loop.time() - when)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(GREETING)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.upgrading:
            return  # the plaintext transport was handed over to TLS
        if self.precise is not None:
            with self.precise.lock:
                self.closed = True
        if self.idle is not None:
            self.idle.cancel()
        if self.transport is not None:
            self.listener.open -= 1
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self.process()

    def process(self) -> None:
        # While STLS upgrades the connection, commands wait: start_tls() delivers the
        # first protected command before it hands us the new transport, and a reply
        # written then would go out in plaintext.
        while not self.upgrading:
            end = self.buffer.find(b"\n")
            if end < 0:
                if len(self.buffer) > MAX_LINE and self.transport is not None:
                    self.transport.abort()
                return
            line = self.buffer[:end].strip().upper()
            self.buffer = self.buffer[end + 1 :]
            self.command(line)

    def command(self, line: bytes) -> None:
        transport = self.transport
        if transport is None:
            return
        if line == b"CAPA":
            transport.write(CAPA_TLS if self.tls else CAPA_PLAIN)
        elif line == b"QUIT":
            transport.write(b"+OK bye\r\n")
            transport.close()
        elif line == b"STLS" and not self.tls:
            transport.write(b"+OK begin TLS\r\n")
            # The ClientHello may arrive before the upgrade task runs: keep it in the
            # kernel until start_tls() has the TLS protocol in place to read it.
            transport.pause_reading()
            self.tls = True
            self.upgrading = True
            self.buffer = b""
            task = self.loop.create_task(self.upgrade(transport))
            task.add_done_callback(_ignore)
        elif line == b"NOOP":
            transport.write(b"+OK\r\n")
        else:
            transport.write(b"-ERR unknown command\r\n")

    async def upgrade(self, transport: asyncio.Transport) -> None:
        try:
            new = await self.loop.start_tls(transport, self, self.context, server_side=True)
        except (OSError, ssl.SSLError, ConnectionError):
            transport.abort()
            return
        finally:
            self.upgrading = False
        if new is None:
            transport.abort()
            return
        self.transport = new
        self.process()


def _ignore(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()


def _percentile(values: list[float], fraction: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def _report(listeners: list[Listener]) -> None:
    stats = {}
    for listener in listeners:
        values = listener.lateness
        stats[listener.name] = {
            "connections": listener.connections,
            "delayed": len(values),
            "p50_ms": _percentile(values, 0.5) * 1000,
            "p99_ms": _percentile(values, 0.99) * 1000,
            "max_ms": max(values, default=0.0) * 1000,
            "peak_open": listener.peak_open,
        }
        listener.lateness = []
        listener.connections = 0
        listener.peak_open = listener.open
    print(json.dumps({"stats": stats}), flush=True)


async def serve(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(args.cert, args.key)
    listeners: list[Listener] = []
    servers: list[asyncio.Server] = []
    ports: dict[str, int] = {}
    threads: list[PreciseListener] = []
    if args.precise:
        # The greeting threads need the GIL, and a CPU, within microseconds of waking
        # up: on a small machine that the exporters keep busy, that takes real-time
        # priority (this server does little work; Linux keeps 5% of each second for
        # everything else in any case).
        sys.setswitchinterval(0.0002)
        try:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
        except OSError as exc:
            print(f"pop3_target: no real-time priority ({exc}); timing may suffer", file=sys.stderr)
    for spec in args.listen:
        name, _, rest = spec.partition("=")
        kind, _, delay_ms = rest.partition(":")
        if kind not in ("plain", "tls"):
            raise SystemExit(f"bad listener {spec!r}")
        listener = Listener(name, kind, float(delay_ms or 0) / 1000)
        listeners.append(listener)
        if args.precise and kind == "plain":
            sock = socket.create_server(("127.0.0.1", 0), backlog=BACKLOG)
            thread = PreciseListener(listener, sock, loop, context)
            threads.append(thread)
            thread.start()
            ports[name] = sock.getsockname()[1]
            continue

        def factory(listener: Listener = listener) -> Pop3Session:
            return Pop3Session(listener, context)

        server = await loop.create_server(
            factory,
            "127.0.0.1",
            0,
            ssl=context if kind == "tls" else None,
            backlog=BACKLOG,
            reuse_address=True,
        )
        servers.append(server)
        ports[name] = server.sockets[0].getsockname()[1]
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, _report, listeners)
    print(json.dumps({"ports": ports}), flush=True)
    try:
        await asyncio.wait_for(stop.wait(), timeout=args.max_seconds)
    except TimeoutError:
        print("pop3_target: --max-seconds reached, exiting", file=sys.stderr)
    for server in servers:
        server.close()
    for thread in threads:
        thread.stopping = True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--listen", action="append", required=True, help="NAME=KIND:DELAY_MS")
    parser.add_argument("--max-seconds", type=float, default=1200.0)
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop (cheaper)")
    parser.add_argument("--precise", action="store_true", help="greet from a timing thread")
    args = parser.parse_args()
    if args.uvloop:
        import uvloop

        uvloop.run(serve(args))
    else:
        asyncio.run(serve(args))


if __name__ == "__main__":
    main()
