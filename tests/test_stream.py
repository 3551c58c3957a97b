"""SocketStream, the one stream under every Pop3Connection, over real socketpair()s:
backpressure both ways, EOF, reset and close while a read waits."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import AsyncIterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pop3_exporter.errors import ConnectionClosedError
from pop3_exporter.protocol import Pop3Connection, SocketStream

HANG_SECONDS = 5.0
# The stream reads at most this much ahead of its reader (protocol._READ_CHUNK).
READ_AHEAD = 65536


@contextlib.asynccontextmanager
async def _pair(*, tcp: bool = False) -> AsyncIterator[tuple[SocketStream, socket.socket]]:
    """Our stream and its peer: a socketpair(), or a loopback TCP connection (resets
    exist only in TCP)."""
    if tcp:
        with socket.create_server(("127.0.0.1", 0)) as listener:
            ours = socket.create_connection(listener.getsockname())
            theirs, _ = listener.accept()
    else:
        ours, theirs = socket.socketpair()
    theirs.setblocking(False)
    stream = SocketStream.wrap(ours)
    try:
        yield stream, theirs
    finally:
        stream.close()
        theirs.close()


def _reset(sock: socket.socket) -> None:
    """Close with SO_LINGER 0: the peer sees a reset (ECONNRESET), not a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


# No per-example deadline: on a loaded machine a 1 MB example can take seconds; the
# HANG_SECONDS timeout inside still bounds each one.
@settings(max_examples=40, deadline=None)
@given(
    writes=st.lists(st.integers(1, 200_000), min_size=1, max_size=6),
    reads=st.lists(st.integers(1, 100_000), min_size=1, max_size=8),
)
def test_reads_return_every_byte_in_order_and_never_buffer_more_than_one_chunk(
    writes: list[int], reads: list[int]
) -> None:
    """The writer outruns the reader (up to 1.2 MB); what comes out is exactly what went
    in, and the stream itself never holds more than one chunk unread."""
    # Tiny reads of a megabyte would take a million loop turns: the payload is cut to
    # what about 20,000 reads of the smallest size take (reading still outruns nothing).
    total = min(sum(writes), 20_000 * min(reads))
    payload = bytes(i % 251 for i in range(total))

    async def run() -> tuple[bytes, int]:
        loop = asyncio.get_running_loop()
        async with _pair() as (stream, peer):

            async def write() -> None:
                position = 0
                for size in writes:
                    if position >= len(payload):
                        break
                    await loop.sock_sendall(peer, payload[position : position + size])
                    position += size
                peer.shutdown(socket.SHUT_WR)

            writer = asyncio.create_task(write())
            received = bytearray()
            largest_buffer = 0
            async with asyncio.timeout(HANG_SECONDS):
                for turn in range(len(payload) + 2):
                    await asyncio.sleep(0)  # let the reader callback run ahead
                    largest_buffer = max(largest_buffer, len(stream._buffer))
                    chunk = await stream.read(reads[turn % len(reads)])
                    if not chunk:
                        break
                    received += chunk
                await writer
            return bytes(received), largest_buffer

    received, largest_buffer = asyncio.run(run())
    assert received == payload
    assert largest_buffer <= READ_AHEAD


async def test_eof_after_the_data_and_then_again() -> None:
    async with _pair() as (stream, peer):
        peer.sendall(b"+OK bye\r\n")
        peer.shutdown(socket.SHUT_WR)
        async with asyncio.timeout(HANG_SECONDS):
            assert await stream.read(100) == b"+OK bye\r\n"
            assert await stream.read(100) == b""
            assert await stream.read(100) == b""


async def test_a_reset_while_reading_is_connection_closed() -> None:
    async with _pair(tcp=True) as (stream, peer):
        conn = Pop3Connection(stream)
        reading = asyncio.create_task(conn.read_line())
        await asyncio.sleep(0.01)
        peer.sendall(b"+OK partial")
        _reset(peer)
        with pytest.raises(ConnectionClosedError, match="connection lost"):
            async with asyncio.timeout(HANG_SECONDS):
                await reading


async def test_close_while_a_read_waits_ends_the_read() -> None:
    async with _pair() as (stream, _peer):
        reading = asyncio.create_task(stream.read(10))
        await asyncio.sleep(0.01)
        assert not reading.done()
        stream.close()
        with pytest.raises(ConnectionAbortedError):
            async with asyncio.timeout(HANG_SECONDS):
                await reading
        # Closing twice is harmless, and reading after close says closed.
        stream.close()
        with pytest.raises(ConnectionAbortedError):
            await stream.read(10)


async def test_write_waits_for_a_slow_reader_and_delivers_everything() -> None:
    """More than the kernel buffers take: write() waits until the peer reads."""
    payload = bytes(range(256)) * 8192  # 2 MiB
    loop = asyncio.get_running_loop()
    async with _pair() as (stream, peer):
        writing = asyncio.create_task(stream.write(payload))
        await asyncio.sleep(0.05)
        assert not writing.done()  # the socket buffers are full
        received = bytearray()
        async with asyncio.timeout(HANG_SECONDS):
            while len(received) < len(payload):
                received += await loop.sock_recv(peer, 262144)
            await writing
        assert bytes(received) == payload


async def _send_until_refused(conn: Pop3Connection) -> None:
    # The first send may still be accepted; the kernel reports the peer gone by the
    # second at the latest.
    async with asyncio.timeout(HANG_SECONDS):
        for _ in range(3):
            await conn.send_command("NOOP")
            await asyncio.sleep(0.01)


async def test_write_to_a_reset_peer_is_connection_closed() -> None:
    async with _pair(tcp=True) as (stream, peer):
        _reset(peer)
        conn = Pop3Connection(stream)
        with pytest.raises(ConnectionClosedError, match="while sending"):
            await _send_until_refused(conn)


async def test_write_after_close_is_refused() -> None:
    async with _pair() as (stream, _peer):
        stream.close()
        with pytest.raises(ConnectionAbortedError):
            await stream.write(b"QUIT\r\n")


async def test_a_command_with_a_line_break_is_never_sent() -> None:
    async with _pair() as (stream, peer):
        conn = Pop3Connection(stream)
        with pytest.raises(ValueError, match="one line"):
            await conn.send_command("USER a\r\nDELE 1")
        peer.setblocking(True)
        peer.settimeout(0.05)
        with pytest.raises(TimeoutError):
            peer.recv(100)  # nothing reached the server
