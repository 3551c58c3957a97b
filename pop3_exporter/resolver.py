"""Name resolution behind a small interface, so tests inject their own answers."""

from __future__ import annotations

import asyncio
import socket
from typing import Protocol

from pop3_exporter.errors import ResolveError


class Resolver(Protocol):
    async def resolve(self, host: str) -> list[tuple[socket.AddressFamily, str]]:
        """Return (family, address) pairs in the resolver's order; raise ResolveError."""
        ...


class SystemResolver:
    """The operating system's resolver via getaddrinfo (run in the loop's executor)."""

    async def resolve(self, host: str) -> list[tuple[socket.AddressFamily, str]]:
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(host, None, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as exc:
            raise ResolveError(f"resolving {host!r}: {exc}") from exc
        answers: list[tuple[socket.AddressFamily, str]] = []
        for family, _, _, _, sockaddr in infos:
            if family in (socket.AF_INET, socket.AF_INET6):
                pair = (family, str(sockaddr[0]))
                if pair not in answers:
                    answers.append(pair)
        return answers


class StaticResolver:
    """Answers from a fixed table; names not in it fail as NXDOMAIN would."""

    def __init__(self, table: dict[str, list[str]]) -> None:
        self._table = table

    async def resolve(self, host: str) -> list[tuple[socket.AddressFamily, str]]:
        addresses = self._table.get(host.lower().rstrip("."))
        if not addresses:
            raise ResolveError(f"resolving {host!r}: no such host")
        return [
            (socket.AF_INET6 if ":" in address else socket.AF_INET, address)
            for address in addresses
        ]
