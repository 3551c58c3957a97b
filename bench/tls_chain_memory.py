"""What one TLS connection costs in memory for a given certificate chain, in-process.

    .venv/bin/python bench/tls_chain_memory.py [--connections 100]

Starts tests/support/memory_server.py (its own process) with chains of several sizes
and kinds (tests/support/memory_server.make_bulky_chain), opens that many connections
with Pop3Connection.start_tls (the exporter's own TLS path, verifying the chain), keeps
them open, and prints the growth of this process's RSS per connection, and how much of
it is the DER the Handshake record keeps (the rest is OpenSSL's parsed chain, held for
as long as the connection lives). Loopback only; the server is stopped by its PID.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import ssl
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pop3_exporter.protocol import Pop3Connection  # noqa: E402
from tests.support.memory_server import OPENSSL_CHAIN_LIMIT, make_bulky_chain  # noqa: E402
from tests.support.processes import terminate  # noqa: E402

# (label, presented bytes, filler, bytes per subjectAltName entry)
CHAINS = (
    ("typical", 2 * 1024, "sans", 24),
    ("8 KiB, 300 names", 8 * 1024, "sans", 24),
    ("32 KiB, 1300 names", 32 * 1024, "sans", 24),
    ("96 KiB opaque", OPENSSL_CHAIN_LIMIT, "blob", 24),
    ("96 KiB, 4000 names", OPENSSL_CHAIN_LIMIT, "sans", 24),
    ("96 KiB, 32000 one-letter names", OPENSSL_CHAIN_LIMIT, "sans", 3),
)


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


async def hold_connections(port: int, ca_file: Path, count: int) -> tuple[float, int]:
    """KiB of RSS per connection kept open, and the DER bytes one Handshake keeps."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cafile=str(ca_file))
    # One connection first, so that the baseline includes what every one shares.
    first = await Pop3Connection.connect("127.0.0.1", port)
    await first.start_tls(context, "127.0.0.1")
    first.close()
    gc.collect()
    before = rss_kib()
    connections, records = [], []
    try:
        for _ in range(count):
            connection = await Pop3Connection.connect("127.0.0.1", port)
            connections.append(connection)
            records.append(await connection.start_tls(context, "127.0.0.1"))
        gc.collect()
        per_connection = (rss_kib() - before) / count
    finally:
        for connection in connections:
            connection.close()
    kept = {id(der): len(der) for der in records[0].presented_der + records[0].verified_der}
    return per_connection, sum(kept.values())


def measure(directory: Path, chain_bytes: int, filler: str, width: int, count: int) -> str:
    chain = make_bulky_chain(directory, chain_bytes, filler=filler, name_length=width)
    argv = [sys.executable, "-m", "tests.support.memory_server", "--cert", str(chain.cert_file)]
    argv += ["--key", str(chain.key_file), "--lifetime", "300"]
    server = subprocess.Popen(
        argv, cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert server.stdout is not None
        port = json.loads(server.stdout.readline())["ports"]["capa-tls"]
        per_connection, der = asyncio.run(hold_connections(port, chain.ca_file, count))
    finally:
        terminate(server, 10.0)
        for pipe in (server.stdin, server.stdout):
            if pipe is not None:
                pipe.close()
    return (
        f"{chain.presented_bytes / 1024:5.1f} KiB presented: {per_connection:6.0f} KiB per"
        f" connection, of which {der / 1024:5.1f} KiB DER kept by the Handshake record"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--connections", type=int, default=100)
    parser.add_argument("--chain", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.chain is None:
        # A fresh process per chain: memory freed by one measurement would otherwise
        # be reused by the next and hide its growth.
        for index in range(len(CHAINS)):
            argv = [sys.executable, __file__, "--chain", str(index)]
            subprocess.run([*argv, "--connections", str(args.connections)], check=True)
        return
    label, size, filler, width = CHAINS[args.chain]
    with tempfile.TemporaryDirectory(prefix="pop3-chain-memory-") as directory:
        line = measure(Path(directory), size, filler, width, args.connections)
    print(f"{label:<32} {line}", flush=True)


if __name__ == "__main__":
    main()
