"""Memory under attack: --web.max-concurrent-probes probes in flight at once, each held
by a server built to make it as expensive as it can (tests/support/memory_server.py),
must keep the exporter process below MEMORY_LIMIT_MIB of peak RSS (VmHWM).

The hostile server is a process of its own, so that its memory does not count. It
holds every connection once it has sent its worst; the test waits until the exporter
has read every byte of it (no unread data left in any of the exporter's sockets),
reads the peak, then releases the connections and reads the peak again, because the
500 results (debug reports among them) are built and sent after the hold.

The implicit-TLS scenario presents an 8 KiB chain with 300 names, large for a real
server. Much larger chains are not ours to bound: OpenSSL keeps the parsed chain of
every connection until it closes, about 3 times the chain's size, and about 100 bytes
per subjectAltName entry (up to 3.7 MiB for one connection at OpenSSL's own 100 KiB
limit); bench/tls_chain_memory.py measures it, docs/benchmarks.md has the figures.
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import aiohttp
import pytest

from pop3_exporter.errors import ProtocolError
from pop3_exporter.prober import MAX_TRANSCRIPT_BYTES, MAX_TRANSCRIPT_LINE_CHARS, _Recorder
from pop3_exporter.protocol import (
    MAX_LINE_BYTES,
    MAX_REPLY_BYTES,
    Pop3Connection,
    SocketStream,
    text_size,
)
from pop3_exporter.settings import Settings
from pop3_exporter.tlsinfo import Handshake
from tests.support.certs import TestPKI, client_ssl_context
from tests.support.exporter import REPO, ExporterProcess
from tests.support.fakepop3 import FakeConnection, FakePop3Server, server_ssl_context
from tests.support.memory_server import BulkyChain, capa_flood, make_bulky_chain
from tests.support.processes import terminate

IN_FLIGHT = Settings().max_concurrent_probes
MEMORY_LIMIT_MIB = 256
PROBE_TIMEOUT_SECONDS = 40
# Each phase gives up after this long, so that a broken exporter fails the test instead
# of hanging it.
HOLD_WAIT_SECONDS = 40.0
SERVER_LIFETIME_SECONDS = 180.0

CONFIG = """modules:
  hog_capa_tls:
    tls: implicit
    timeout: {timeout}s
    tls_config:
      ca_file: {ca_file}
  hog_top:
    tls: none
    timeout: {timeout}s
    auth:
      username: hog
      password_file: {password_file}
      allow_plaintext: true
    mailbox:
      oldest_message: true
"""


class MemoryServer:
    """tests.support.memory_server as a child process, driven over its stdin/stdout."""

    def __init__(self, chain: BulkyChain) -> None:
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.support.memory_server",
                "--cert",
                str(chain.cert_file),
                "--key",
                str(chain.key_file),
                "--lifetime",
                str(SERVER_LIFETIME_SECONDS),
            ],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            self.ports: dict[str, int] = self._reply()["ports"]
        except BaseException:
            self.stop()
            raise

    def _pipes(self) -> tuple[IO[str], IO[str]]:
        assert self.process.stdin is not None and self.process.stdout is not None
        return self.process.stdin, self.process.stdout

    def _reply(self) -> dict[str, dict[str, int]]:
        line = self._pipes()[1].readline()
        if not line:
            raise RuntimeError("memory server exited")
        reply: dict[str, dict[str, int]] = json.loads(line)
        return reply

    def ask(self, command: str) -> dict[str, int]:
        stdin, _ = self._pipes()
        stdin.write(command + "\n")
        stdin.flush()
        reply: dict[str, int] = json.loads(self._pipes()[1].readline())
        return reply

    def stop(self) -> None:
        terminate(self.process, 10.0)
        for pipe in (self.process.stdin, self.process.stdout):
            if pipe is not None:
                pipe.close()


# The presented chain of the implicit-TLS scenario, and its size in subjectAltName names.
CHAIN_BYTES = 8 * 1024
CHAIN_NAME_BYTES = 24


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> BulkyChain:
    return make_bulky_chain(
        tmp_path_factory.mktemp("hog-pki"), CHAIN_BYTES, name_length=CHAIN_NAME_BYTES
    )


@pytest.fixture(scope="module")
def server(chain: BulkyChain) -> Iterator[MemoryServer]:
    hog = MemoryServer(chain)
    try:
        yield hog
    finally:
        hog.stop()


@pytest.fixture
def exporter(tmp_path: Path, chain: BulkyChain) -> Iterator[ExporterProcess]:
    password = tmp_path / "password"
    password.write_text("hog\n")
    password.chmod(0o600)
    config = tmp_path / "pop3_exporter.yml"
    config.write_text(
        CONFIG.format(timeout=PROBE_TIMEOUT_SECONDS, ca_file=chain.ca_file, password_file=password)
    )
    process = ExporterProcess(
        tmp_path / "exporter.log", "--config.file", str(config), "--log.level", "warn"
    )
    with process:
        yield process


def status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {key} in /proc/{pid}/status")


def queued_bytes(port: int) -> int:
    """Bytes still in flight on the loopback connections of a server port: unread by
    the exporter (its sockets' receive queues) or unsent by the server."""
    total = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local_port = int(fields[1].rsplit(":", 1)[1], 16)
        remote_port = int(fields[2].rsplit(":", 1)[1], 16)
        tx_queue, rx_queue = (int(value, 16) for value in fields[4].split(":"))
        if remote_port == port:
            total += rx_queue
        elif local_port == port:
            total += tx_queue
    return total


@dataclass
class Measurement:
    idle_mib: float
    held_rss_mib: float
    held_peak_mib: float
    final_peak_mib: float
    held: int
    bodies: list[str]

    @property
    def per_probe_kib(self) -> float:
        return (self.final_peak_mib - self.idle_mib) * 1024 / IN_FLIGHT


async def _wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + HOLD_WAIT_SECONDS
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.2)


async def measure(
    exporter: ExporterProcess, server: MemoryServer, module: str, listener: str, *, debug: bool
) -> Measurement:
    idle = status_kib(exporter.pid, "VmRSS") / 1024
    params = {"target": f"127.0.0.1:{server.ports[listener]}", "module": module}
    if debug:
        params["debug"] = "true"
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=PROBE_TIMEOUT_SECONDS + 20)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def one() -> str:
            async with session.get(f"{exporter.url}/probe", params=params) as response:
                text = await response.text()
                assert response.status == 200, text[:300]
                return text

        tasks = [asyncio.create_task(one()) for _ in range(IN_FLIGHT)]
        try:
            await _wait_until(
                lambda: server.ask("count")["held"] >= IN_FLIGHT,
                f"{IN_FLIGHT} connections held by the server",
            )
            port = server.ports[listener]
            await _wait_until(lambda: queued_bytes(port) == 0, "the exporter to read everything")
            held = server.ask("count")["held"]
            held_rss = status_kib(exporter.pid, "VmRSS") / 1024
            held_peak = status_kib(exporter.pid, "VmHWM") / 1024
        finally:
            server.ask("release")
        bodies = await asyncio.gather(*tasks)
    final_peak = status_kib(exporter.pid, "VmHWM") / 1024
    return Measurement(idle, held_rss, held_peak, final_peak, held, bodies)


def report(name: str, result: Measurement) -> None:
    sys.stdout.write(
        f"\n[memory {name}] {IN_FLIGHT} probes held: idle {result.idle_mib:.1f} MiB,"
        f" RSS while held {result.held_rss_mib:.1f} MiB, peak while held"
        f" {result.held_peak_mib:.1f} MiB, peak after the results"
        f" {result.final_peak_mib:.1f} MiB ({result.per_probe_kib:.0f} KiB per probe)\n"
    )


SCENARIOS = {
    # scenario: (module, memory_server listener)
    "capa-tls": ("hog_capa_tls", "capa-tls"),
    "top": ("hog_top", "top"),
}


@pytest.mark.slow
@pytest.mark.parametrize("scenario", list(SCENARIOS))
async def test_peak_rss_with_every_probe_held(
    scenario: str,
    exporter: ExporterProcess,
    server: MemoryServer,
    capsys: pytest.CaptureFixture[str],
) -> None:
    module, listener = SCENARIOS[scenario]
    # debug=true: the transcript is kept too, the most a probe can hold.
    result = await measure(exporter, server, module, listener, debug=True)
    with capsys.disabled():
        report(scenario, result)
    assert result.held == IN_FLIGHT
    assert all("\nTranscript (seconds since start" in body for body in result.bodies)
    assert all("\nprobe_success 0" in body for body in result.bodies)
    assert result.final_peak_mib < MEMORY_LIMIT_MIB


# ------------------------------------------------------- the caps, one probe at a time


@asynccontextmanager
async def _connection() -> AsyncIterator[tuple[Pop3Connection, socket.socket]]:
    ours, theirs = socket.socketpair()
    theirs.setblocking(False)
    conn = Pop3Connection(SocketStream.wrap(ours))
    try:
        yield conn, theirs
    finally:
        conn.close()
        theirs.close()


async def _read_reply(payload: bytes) -> list[str]:
    async with _connection() as (conn, peer):
        await asyncio.get_running_loop().sock_sendall(peer, payload)
        async with asyncio.timeout(10):
            assert (await conn.read_response()).ok
            return await conn.read_multiline(10_000)


async def test_a_reply_of_wide_text_is_capped_by_what_it_takes_in_memory() -> None:
    """Lines whose text Python keeps 4 bytes per character: a quarter of the cap on the
    wire already fills it in memory, so the reply that fills the wire cap is refused."""
    with pytest.raises(ProtocolError, match=f"longer than {MAX_REPLY_BYTES} bytes"):
        await _read_reply(capa_flood("wide", partial=False) + b".\r\n")


async def test_what_a_kept_reply_holds_stays_within_the_cap() -> None:
    # The most a reply may hold: lines of MAX_LINE_BYTES, in the widest text the cap
    # still lets through, and ASCII lines up to the cap exactly.
    widest = await _read_reply(capa_flood("escaping", partial=False) + b".\r\n")
    assert sum(text_size(line) + 2 for line in widest) <= MAX_REPLY_BYTES
    assert sum(text_size(line) + 2 for line in widest) > MAX_REPLY_BYTES - MAX_LINE_BYTES * 4
    ascii_line = b"A" * (MAX_LINE_BYTES - 2)
    count = MAX_REPLY_BYTES // MAX_LINE_BYTES
    lines = await _read_reply(b"+OK\r\n" + (ascii_line + b"\r\n") * count + b".\r\n")
    assert len(lines) == count and sum(len(line) + 2 for line in lines) == MAX_REPLY_BYTES


@pytest.mark.parametrize(
    "text",
    [
        "\x01" * 5000,  # escaping quadruples it
        "\U0001f600" + "\U0010ffff" * 5000,  # escaped 8-fold, and every character 4 bytes
        "\u00e9" * 5000,
    ],
)
async def test_the_transcript_is_capped_by_what_it_takes_in_memory(text: str) -> None:
    recorder = _Recorder(asyncio.get_running_loop(), 10.0, record_transcript=True)
    for _ in range(200):
        recorder.note("S", text)
    assert recorder.transcript is not None
    kept = sum(text_size(line.text) for line in recorder.transcript)
    # The cap is checked before each line: it may be passed by one line at most.
    widest_line = text_size(recorder.transcript[0].text)
    assert widest_line >= MAX_TRANSCRIPT_LINE_CHARS
    assert kept <= MAX_TRANSCRIPT_BYTES + widest_line
    assert recorder.transcript[-1].text == "transcript truncated"


class _RecordingBIO:
    """Stands in for a connection's incoming memory BIO after the handshake: passes
    every write on to the real one and notes its size."""

    def __init__(self, bio: ssl.MemoryBIO) -> None:
        self.bio = bio
        self.writes: list[int] = []

    def write(self, data: bytes) -> int:
        self.writes.append(len(data))
        return self.bio.write(data)


async def _tls_flood(pki: TestPKI) -> tuple[Handshake, list[int], int]:
    flood = b"+OK flood\r\n" + (b"A" * 4000 + b"\r\n") * 40 + b".\r\n"

    async def script(conn: FakeConnection) -> None:
        await conn.send(flood)  # one write of 160 KiB, ten TLS records
        await conn.readline()

    certificate = pki.variants["good"]
    async with FakePop3Server(script, ssl_context=server_ssl_context(certificate)) as server:
        conn = await Pop3Connection.connect("127.0.0.1", server.port)
        async with conn:
            handshake = await conn.start_tls(client_ssl_context(pki.ca_file), "localhost")
            recording = _RecordingBIO(conn._incoming)
            conn._incoming = recording  # type: ignore[assignment]
            async with asyncio.timeout(10):
                assert (await conn.read_response()).ok
                lines = [line async for line in conn.multiline(100)]
    return handshake, recording.writes, len(lines)


async def test_tls_data_reaches_openssl_about_one_record_at_a_time(pki: TestPKI) -> None:
    """A memory BIO keeps the largest buffer it ever held, for the connection's life:
    a flood must not be handed over in 64 KiB pieces."""
    _, writes, lines = await _tls_flood(pki)
    assert lines == 40
    assert sum(writes) > 160_000
    assert max(writes) <= 17 * 1024


async def test_the_verified_chain_shares_the_presented_certificates(pki: TestPKI) -> None:
    handshake, _, _ = await _tls_flood(pki)
    assert handshake.verified and len(handshake.presented_der) == 2
    assert len(handshake.verified_der) == 3  # leaf, intermediate, root
    for presented, verified in zip(handshake.presented_der, handshake.verified_der, strict=False):
        assert verified is presented  # one copy, not two
