"""A scriptable DNS server for the one fault real servers do not produce on demand: a name
whose queries are never answered. Run as a process of its own:

    python -m tests.support.fakedns --answer good.test=127.0.0.1 --drop dead.test

It listens on 127.0.0.1 (UDP and TCP, one ephemeral port), prints the port on stdout and
exits after ``--lifetime`` seconds at the latest (tests stop it earlier, by PID).
``--answer NAME=ADDRESS`` answers A or AAAA queries for NAME (by the address family;
the other family gets an empty NOERROR answer), ``--drop NAME`` never answers NAME over
UDP or TCP, and any other name is NXDOMAIN. A TXT query for ``NAME._count.`` answers
how many queries for NAME have arrived, so a test can see its dropped queries in flight.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import socket
import subprocess
import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import cast

import dns.exception
import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import dns.rrset

from tests.support.exporter import REPO
from tests.support.processes import terminate

COUNT_SUFFIX = "._count"
TTL = 60
STOP_TIMEOUT = 10.0
UDP_BUFFER_BYTES = 4 << 20


class Behaviour:
    def __init__(self, answers: Mapping[str, Sequence[str]], drop: set[str]) -> None:
        self.answers = {_key(name): list(addresses) for name, addresses in answers.items()}
        self.drop = {_key(name) for name in drop}
        self.queries: Counter[str] = Counter()

    def respond(self, wire: bytes) -> bytes | None:
        """The reply to one query, or None to stay silent."""
        try:
            request = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return None
        if not request.question:
            return None
        question = request.question[0]
        name = _key(question.name.to_text())
        response = dns.message.make_response(request)
        response.flags |= dns.flags.AA
        if name.endswith(COUNT_SUFFIX) and question.rdtype == dns.rdatatype.TXT:
            count = self.queries[name.removesuffix(COUNT_SUFFIX)]
            response.answer.append(dns.rrset.from_text(question.name, 0, "IN", "TXT", f'"{count}"'))
            return response.to_wire()
        self.queries[name] += 1
        if name in self.drop:
            return None
        if name not in self.answers:
            response.set_rcode(dns.rcode.NXDOMAIN)
            return response.to_wire()
        wanted = {dns.rdatatype.A: 4, dns.rdatatype.AAAA: 6}.get(question.rdtype)
        addresses = [
            address
            for address in self.answers[name]
            if ipaddress.ip_address(address).version == wanted
        ]
        if addresses:
            rdtype = dns.rdatatype.to_text(question.rdtype)
            response.answer.append(
                dns.rrset.from_text_list(question.name, TTL, "IN", rdtype, addresses)
            )
        return response.to_wire()


def _key(name: str) -> str:
    return name.lower().rstrip(".")


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, behaviour: Behaviour) -> None:
        self.behaviour = behaviour
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Not a DatagramTransport subclass on every Python, but has its sendto().
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        reply = self.behaviour.respond(data)
        if reply is not None and self.transport is not None:
            self.transport.sendto(reply, addr)


async def _tcp(
    behaviour: Behaviour, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    try:
        while True:
            length = int.from_bytes(await reader.readexactly(2), "big")
            reply = behaviour.respond(await reader.readexactly(length))
            if reply is None:
                # Hold the connection open without a word, as a dead server would.
                await reader.read()
                break
            writer.write(len(reply).to_bytes(2, "big") + reply)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await writer.wait_closed()


async def serve(behaviour: Behaviour, address: str, port: int, lifetime: float) -> None:
    if not ipaddress.ip_address(address).is_loopback:
        raise SystemExit(f"{address} is not a loopback address")
    loop = asyncio.get_running_loop()
    for _ in range(50):
        udp_socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        # Hundreds of probes query at once: a default-sized buffer drops some of the
        # burst, and the resolver's retry after 2 s would pass for a slow server.
        udp_socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_BUFFER_BYTES)
        try:
            udp_socket.bind((address, port))
            bound = udp_socket.getsockname()[1]
            server = await asyncio.start_server(
                lambda r, w: _tcp(behaviour, r, w), address, bound, backlog=1024
            )
        except OSError as exc:
            udp_socket.close()
            if port:
                raise SystemExit(f"cannot listen on {address}:{port}: {exc}") from None
            continue
        break
    else:
        raise SystemExit("no port free for both UDP and TCP")
    transport, _ = await loop.create_datagram_endpoint(lambda: _Udp(behaviour), sock=udp_socket)
    print(bound, flush=True)
    try:
        async with server:
            await asyncio.sleep(lifetime)
    finally:
        transport.close()


def _answer_arg(text: str) -> tuple[str, str]:
    name, sep, address = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=ADDRESS")
    ipaddress.ip_address(address)
    return name, address


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--answer", type=_answer_arg, action="append", default=[])
    parser.add_argument("--drop", action="append", default=[])
    parser.add_argument("--lifetime", type=float, default=600.0)
    parser.add_argument("--address", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    answers: dict[str, list[str]] = {}
    for name, address in args.answer:
        answers.setdefault(name, []).append(address)
    asyncio.run(serve(Behaviour(answers, set(args.drop)), args.address, args.port, args.lifetime))


class FakeDnsError(RuntimeError):
    pass


class FakeDnsServer:
    """The server above as a child process on 127.0.0.1, stopped by its PID."""

    def __init__(
        self,
        answers: Mapping[str, Sequence[str]],
        drop: Sequence[str] = (),
        lifetime: float = 600.0,
        address: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.host = address
        self.args = [
            sys.executable,
            "-m",
            "tests.support.fakedns",
            "--lifetime",
            str(lifetime),
            "--address",
            address,
            "--port",
            str(port),
        ]
        for name, addresses in answers.items():
            self.args += [arg for address in addresses for arg in ("--answer", f"{name}={address}")]
        for name in drop:
            self.args += ["--drop", name]
        self.port = 0
        self.process: subprocess.Popen[str] | None = None

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    @property
    def flag(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> None:
        self.process = subprocess.Popen(
            self.args, cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line.strip().isdigit():
            self.stop()
            raise FakeDnsError(f"fake DNS server did not start: {line!r}")
        self.port = int(line)

    def count(self, name: str) -> int:
        """How many queries for ``name`` the server has received."""
        request = dns.message.make_query(name.rstrip(".") + COUNT_SUFFIX + ".", "TXT")
        response = dns.query.udp(request, self.host, port=self.port, timeout=2.0)
        return int(response.answer[0][0].to_text().strip('"'))

    def stop(self) -> None:
        if self.process is not None:
            terminate(self.process, STOP_TIMEOUT)
            if self.process.stdout is not None:
                self.process.stdout.close()

    def __enter__(self) -> FakeDnsServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


if __name__ == "__main__":
    main()
