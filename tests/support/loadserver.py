"""A minimal, fast POP3 server for load tests, run as a process of its own.

    python -m tests.support.loadserver [--lifetime SECONDS]

Listens on 127.0.0.1, an ephemeral port, prints the port on stdout, answers every
connection with a greeting, CAPA and QUIT, and exits after ``--lifetime`` seconds at the
latest (the tests stop it earlier, by PID).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib

GREETING = b"+OK load server ready\r\n"
CAPA = b"+OK Capability list follows\r\nTOP\r\nUIDL\r\nSTLS\r\n.\r\n"
MAX_COMMANDS = 20


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        writer.write(GREETING)
        for _ in range(MAX_COMMANDS):
            line = await asyncio.wait_for(reader.readline(), timeout=30)
            if not line:
                break
            command = line.strip().upper()
            if command == b"CAPA":
                writer.write(CAPA)
            elif command == b"QUIT":
                writer.write(b"+OK bye\r\n")
                await writer.drain()
                break
            else:
                writer.write(b"-ERR unknown command\r\n")
            await writer.drain()
    except (ConnectionError, TimeoutError, ValueError):
        pass
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await writer.wait_closed()


async def main(lifetime: float) -> None:
    server = await asyncio.start_server(handle, "127.0.0.1", 0, backlog=4096)
    print(server.sockets[0].getsockname()[1], flush=True)
    async with server:
        await asyncio.sleep(lifetime)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--lifetime", type=float, default=600.0)
    asyncio.run(main(parser.parse_args().lifetime))
