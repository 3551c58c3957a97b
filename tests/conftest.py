"""Shared fixtures: a generated PKI and real Dovecot servers (one per cert variant)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.certs import TestPKI, make_pki
from tests.support.dns import dns_testbed  # noqa: F401 (the session fixture, for every test)
from tests.support.dovecot import DovecotError, DovecotServer, dovecot_binary, stop_servers

# Keep Dovecot's work directories after the run (for reading dovecot.log).
KEEP_ENV = "POP3_EXPORTER_KEEP_DOVECOT"


def require_dovecot() -> str:
    """The dovecot binary; skip without it, but fail in CI where it must exist."""
    binary = dovecot_binary()
    if binary is None:
        message = "dovecot binary not found (Debian package dovecot-pop3d)"
        if os.environ.get("CI") == "true":
            # A missing server in CI would silently turn real-server tests into skips.
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return binary


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def dovecot_workroot() -> Iterator[Path]:
    """A short, world-traversable directory for Dovecot work dirs.

    Not under pytest's tmp_path: that is mode 0700, which Dovecot's
    unprivileged processes cannot enter, and its long paths could overflow
    the unix socket path limit.
    """
    root = Path(tempfile.mkdtemp(prefix="pop3exp-dovecot-"))
    root.chmod(0o755)
    yield root
    if os.environ.get(KEEP_ENV) != "1":
        shutil.rmtree(root, ignore_errors=True)


DovecotFactory = Callable[[str], DovecotServer]


@pytest.fixture(scope="session")
def dovecot_variant(pki: TestPKI, dovecot_workroot: Path) -> Iterator[DovecotFactory]:
    """``dovecot_variant("expired")``: a running Dovecot presenting that cert variant.

    Started on first use and cached for the session; all are stopped at the end.
    """
    servers: dict[str, DovecotServer] = {}

    def get(variant: str) -> DovecotServer:
        require_dovecot()
        server = servers.get(variant)
        if server is None:
            server = DovecotServer(dovecot_workroot / variant, pki.variants[variant])
            server.start()
            servers[variant] = server
        elif not server.running:
            # A server that died mid-session must fail loudly, not hang clients.
            raise DovecotError(f"Dovecot for {variant!r} died\n{server.log_tail()}")
        return server

    try:
        yield get
    finally:
        stop_servers(servers.values())


@pytest.fixture(scope="session")
def dovecot(dovecot_variant: DovecotFactory) -> DovecotServer:
    """The Dovecot presenting the ``good`` certificate (shared with dovecot_variant)."""
    return dovecot_variant("good")
