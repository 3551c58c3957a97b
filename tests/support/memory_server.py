"""A POP3 server built to cost a prober as much memory as it can, run as its own process.

    python -m tests.support.memory_server --cert FILE --key FILE [--lifetime SECONDS]

Every connection gets the most expensive reply this project's limits still accept,
then silence, so that the prober holds all of it while it waits; nothing is answered
until the controller says "release" (or --lifetime ends the process):

``capa-tls``    implicit TLS with the certificate chain given, greeting; CAPA gets a
                reply as large as protocol.MAX_REPLY_BYTES lets through, of lines just
                under MAX_LINE_BYTES whose text the debug transcript inflates most
                (capa_flood("escaping")), then a line cut short
``top``         plaintext greeting, CAPA with USER, USER and PASS accepted, STAT of one
                message; TOP 1 0 floods header lines just under MAX_LINE_BYTES (one
                Date among them) up to TOP_FLOOD_BYTES, as fast as they are read

It listens on 127.0.0.1 only, on ports the kernel picks, and prints one JSON line
``{"ports": {NAME: PORT}}`` when ready. Commands on stdin, one per line, each answered
with one JSON line: ``count`` -> ``{"held": N, "connections": M}`` (N connections have
been sent everything and are being held); ``release`` closes every connection.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import ssl
import sys
import threading
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from pop3_exporter.protocol import MAX_LINE_BYTES, MAX_REPLY_BYTES

GREETING = b"+OK memory hog ready\r\n"
MAX_COMMANDS = 20
# TOP sends at most this much per connection: four times the reply cap (TOP is not
# capped as a whole, only the Date header is kept), yet 500 connections stay quick.
TOP_FLOOD_BYTES = 256 * 1024
WIDE = "\U0001f600".encode()  # printable, and makes Python keep every character in 4 bytes
# Not printable: the debug transcript shows it as "\x10ffff", 8 characters of 4 bytes
# each when the line also holds a WIDE one.
UNPRINTABLE = "\U0010ffff".encode()


def _wide_line(length: int) -> bytes:
    """`length` bytes that decode to nearly as many characters, all kept 4 bytes wide."""
    return WIDE + b"\x01" * (length - len(WIDE))


def _escaping_line(length: int) -> bytes:
    """`length` bytes whose text grows most when the transcript escapes it."""
    return WIDE + UNPRINTABLE * ((length - len(WIDE)) // len(UNPRINTABLE))


def _size_in_memory(line: bytes) -> int:
    return sys.getsizeof(line.decode("utf-8", errors="replace")) - sys.getsizeof("")


def capa_flood(kind: str, *, partial: bool = True) -> bytes:
    """A CAPA reply as large as protocol.MAX_REPLY_BYTES lets through, unterminated, then
    (with `partial`) a line cut short just before MAX_LINE_BYTES.

    "wide" fills the cap counted in bytes on the wire with text four times larger in
    memory; "escaping" fills it counted in memory (the larger of the two) with the text
    that the debug transcript inflates most."""
    make = _wide_line if kind == "wide" else _escaping_line
    line = make(MAX_LINE_BYTES - 4)
    cost = len(line) + 2 if kind == "wide" else max(len(line), _size_in_memory(line)) + 2
    count = MAX_REPLY_BYTES // cost
    body = b"".join(line + b"\r\n" for _ in range(count))
    return (
        b"+OK capability list follows\r\n" + body + (make(MAX_LINE_BYTES - 8) if partial else b"")
    )


def top_line(index: int) -> bytes:
    if index == 0:
        return b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\n"
    return b"X-Filler: " + _escaping_line(MAX_LINE_BYTES - 12) + b"\r\n"


@dataclass(frozen=True)
class BulkyChain:
    ca_file: Path  # the root, for the prober's tls_config.ca_file
    cert_file: Path  # leaf and intermediate, as the server presents them
    key_file: Path
    presented_bytes: int  # DER bytes of the presented chain


# OpenSSL clients refuse a Certificate message over 100 KiB (SSL_MAX_CERT_LIST_DEFAULT);
# this stays just below it with the handshake's framing.
OPENSSL_CHAIN_LIMIT = 96 * 1024


def make_bulky_chain(
    directory: Path, chain_bytes: int, *, filler: str = "sans", name_length: int = 24
) -> BulkyChain:
    """A chain that verifies (root in ca_file -> intermediate -> leaf for 127.0.0.1)
    and weighs about `chain_bytes` as presented: each of the two certificates carries
    half of it as `filler`, "sans" (subjectAltName DNS entries of `name_length` bytes
    each as encoded, every one parsed into objects of its own by the client) or "blob"
    (one opaque extension)."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID, ObjectIdentifier

    now = datetime.now(UTC).replace(microsecond=0)
    # Each certificate's own fields (names, key, signature) take about this much.
    overhead = 400

    def name(common_name: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])

    def bulk(size: int) -> x509.ExtensionType:
        if filler == "blob":
            return x509.UnrecognizedExtension(ObjectIdentifier("1.3.6.1.4.1.32473.1"), b"x" * size)
        # A DNS entry is encoded as a tag byte, a length byte and the name.
        width = name_length - 2
        names = [
            f"{index:x}.hog".rjust(width, "a")[-width:] for index in range(size // name_length)
        ]
        return x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.IPv4Address("127.0.0.1"))] + [x509.DNSName(n) for n in names]
        )

    def cert(
        subject: str,
        issuer: str,
        public: ec.EllipticCurvePublicKey,
        signer: ec.EllipticCurvePrivateKey,
        ca: bool,
        extension: x509.ExtensionType | None,
    ) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(subject))
            .issuer_name(name(issuer))
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(hours=1))
            .not_valid_after(now + timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if extension is not None:
            builder = builder.add_extension(extension, critical=False)
        if not ca and filler == "blob":
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.IPv4Address("127.0.0.1"))]),
                critical=False,
            )
        return builder.sign(signer, hashes.SHA256())

    root_key, middle_key, leaf_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    half = max(chain_bytes // 2 - overhead, name_length)
    root = cert("hog root", "hog root", root_key.public_key(), root_key, True, None)
    middle = cert(
        "hog intermediate", "hog root", middle_key.public_key(), root_key, True, bulk(half)
    )
    leaf = cert(
        "hog leaf", "hog intermediate", leaf_key.public_key(), middle_key, False, bulk(half)
    )
    directory.mkdir(parents=True, exist_ok=True)
    chain = BulkyChain(
        ca_file=directory / "hog-root.pem",
        cert_file=directory / "hog-chain.pem",
        key_file=directory / "hog.key",
        presented_bytes=sum(
            len(c.public_bytes(serialization.Encoding.DER)) for c in (leaf, middle)
        ),
    )
    chain.ca_file.write_bytes(root.public_bytes(serialization.Encoding.PEM))
    chain.cert_file.write_bytes(
        b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (leaf, middle))
    )
    chain.key_file.write_bytes(
        leaf_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return chain


class Server:
    def __init__(self) -> None:
        self.held = 0
        self.connections = 0
        self.release = asyncio.Event()
        self.writers: set[asyncio.StreamWriter] = set()

    async def session(
        self, kind: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.connections += 1
        self.writers.add(writer)
        release = self.release
        try:
            writer.write(GREETING)
            for _ in range(MAX_COMMANDS):
                line = await reader.readline()
                if not line:
                    return
                command = line.strip().split(b" ", 1)[0].upper()
                if command == b"CAPA" and kind == "capa-tls":
                    writer.write(capa_flood("escaping"))
                    await writer.drain()
                    await self.hold(release)
                    return
                if command == b"CAPA":
                    writer.write(b"+OK\r\nUSER\r\nTOP\r\n.\r\n")
                elif command in (b"USER", b"PASS"):
                    writer.write(b"+OK\r\n")
                elif command == b"STAT":
                    writer.write(b"+OK 1 100\r\n")
                elif command == b"TOP":
                    writer.write(b"+OK headers follow\r\n")
                    sent = 0
                    while sent < TOP_FLOOD_BYTES and not release.is_set():
                        chunk = top_line(sent)
                        writer.write(chunk)
                        sent += len(chunk)
                        await writer.drain()
                    await self.hold(release)
                    return
                else:
                    writer.write(b"-ERR no\r\n")
                await writer.drain()
        except (ConnectionError, ssl.SSLError, ValueError):
            pass
        finally:
            self.writers.discard(writer)
            writer.transport.abort()

    async def hold(self, release: asyncio.Event) -> None:
        self.held += 1
        try:
            await release.wait()
        finally:
            self.held -= 1

    def command(self, line: str) -> None:
        word = line.strip()
        reply: dict[str, object]
        if word == "count":
            reply = {"held": self.held, "connections": self.connections}
        elif word == "release":
            # Connections made from now on are held again, until the next release.
            self.release.set()
            self.release = asyncio.Event()
            for writer in list(self.writers):
                writer.transport.abort()
            reply = {"released": True}
        else:
            reply = {"error": f"unknown command {word!r}"}
        print(json.dumps(reply), flush=True)


def _read_commands(loop: asyncio.AbstractEventLoop, server: Server, done: asyncio.Event) -> None:
    for line in sys.stdin:
        loop.call_soon_threadsafe(server.command, line)
    loop.call_soon_threadsafe(done.set)  # the controller went away: stop


async def main(args: argparse.Namespace) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(args.cert, args.key)
    server = Server()
    ports: dict[str, int] = {}
    servers: list[asyncio.Server] = []
    for kind in ("capa-tls", "top"):

        async def handle(
            reader: asyncio.StreamReader, writer: asyncio.StreamWriter, kind: str = kind
        ) -> None:
            await server.session(kind, reader, writer)

        if kind == "capa-tls":
            listening = await asyncio.start_server(
                handle, "127.0.0.1", 0, backlog=4096, ssl=context, ssl_handshake_timeout=30.0
            )
        else:
            listening = await asyncio.start_server(handle, "127.0.0.1", 0, backlog=4096)
        servers.append(listening)
        ports[kind] = listening.sockets[0].getsockname()[1]
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    threading.Thread(target=_read_commands, args=(loop, server, done), daemon=True).start()
    print(json.dumps({"ports": ports}), flush=True)
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(args.lifetime):
            await done.wait()
    server.release.set()
    for listening in servers:
        listening.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--lifetime", type=float, default=120.0)
    asyncio.run(main(parser.parse_args()))
