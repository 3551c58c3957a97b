"""The floor: a bare asyncio POP3 client doing the same protocol work as one probe.

greeting, CAPA (to the "." line), [STLS, TLS handshake, CAPA again,] QUIT; or for
implicit TLS the handshake first (and with tls-nocapa, greeting and QUIT only). It
verifies the certificate against the bench CA like the exporters do, but keeps no
facts, renders no metrics and serves no HTTP.
Run as its own process; prints one JSON line with its CPU seconds spent probing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import time

MAX_LINES = 64
PROBE_TIMEOUT = 10.0


async def _expect_ok(reader: asyncio.StreamReader) -> None:
    line = await reader.readline()
    if not line.startswith(b"+OK"):
        raise RuntimeError(f"unexpected reply {line!r}")


async def _capa(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"CAPA\r\n")
    await _expect_ok(reader)
    for _ in range(MAX_LINES):
        if (await reader.readline()).rstrip(b"\r\n") == b".":
            return
    raise RuntimeError("CAPA reply too long")


async def probe(host: str, port: int, mode: str, context: ssl.SSLContext) -> bool:
    reader, writer = await asyncio.open_connection(
        host, port, ssl=context if mode in ("tls", "tls-nocapa") else None
    )
    try:
        await _expect_ok(reader)
        if mode != "tls-nocapa":
            await _capa(reader, writer)
        if mode == "stls":
            writer.write(b"STLS\r\n")
            await _expect_ok(reader)
            await writer.start_tls(context)
            await _capa(reader, writer)
        writer.write(b"QUIT\r\n")
        await _expect_ok(reader)
        return True
    finally:
        writer.close()


async def run(args: argparse.Namespace) -> dict[str, float]:
    context = ssl.create_default_context(cafile=args.ca_file)
    remaining = args.requests
    failures = 0

    async def worker() -> None:
        nonlocal remaining, failures
        while remaining > 0:
            remaining -= 1
            try:
                async with asyncio.timeout(PROBE_TIMEOUT):
                    await probe(args.host, args.port, args.mode, context)
            except (OSError, RuntimeError, TimeoutError, ssl.SSLError):
                failures += 1

    # Warm up (imports, first handshake) outside the measured window.
    await asyncio.gather(*(probe(args.host, args.port, args.mode, context) for _ in range(4)))
    cpu0, wall0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    cpu1, wall1 = time.process_time(), time.perf_counter()
    return {
        "probes": args.requests,
        "failures": failures,
        "cpu_seconds": cpu1 - cpu0,
        "wall_seconds": wall1 - wall0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--mode", choices=["plain", "stls", "tls", "tls-nocapa"], required=True)
    parser.add_argument("--ca-file", required=True)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    if not args.host.startswith("127.") and args.host != "::1":
        raise SystemExit("bare_client only talks to loopback")
    print(json.dumps(asyncio.run(run(args))), flush=True)


if __name__ == "__main__":
    main()
