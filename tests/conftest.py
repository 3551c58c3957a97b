"""Shared fixtures: a generated PKI, real Dovecot servers (one per cert variant), a
Dovecot for login tests with its token-introspection endpoint, and a real
Postfix -> LMTP -> Dovecot mail path for the delivery tests."""

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
from tests.support.dovecot_auth import AuthDovecotServer, MailAccount
from tests.support.introspection import IntrospectionServer
from tests.support.mailpath import MailPath, MailUser, missing_mailpath_parts

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


@pytest.fixture(scope="session")
def introspection() -> Iterator[IntrospectionServer]:
    """The OAuth 2.0 token-introspection endpoint that ``dovecot_auth`` asks."""
    with IntrospectionServer() as server:
        yield server


@pytest.fixture(scope="session")
def dovecot_auth(
    pki: TestPKI, dovecot_workroot: Path, introspection: IntrospectionServer
) -> Iterator[AuthDovecotServer]:
    """One Dovecot for every login test of the session (``good`` certificate).

    Accounts are per test (``mail_account`` or ``dovecot_auth.add_user()``), never
    shared, so tests cannot see each other's mail or locks.
    """
    require_dovecot()
    server = AuthDovecotServer(
        dovecot_workroot / "auth", pki.variants["good"], introspection_url=introspection.url
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def mail_account(dovecot_auth: AuthDovecotServer) -> MailAccount:
    """A fresh account with an empty Maildir on ``dovecot_auth``, for this test only."""
    if not dovecot_auth.running:
        # A server that died mid-session must fail loudly, not hang clients.
        raise DovecotError(f"the login-test Dovecot died\n{dovecot_auth.log_tail()}")
    return dovecot_auth.add_user()


def require_mailpath() -> None:
    """Skip without Postfix, Dovecot's LMTP or root, but fail in CI where they must exist."""
    missing = missing_mailpath_parts()
    if missing:
        message = "the mail path needs: " + "; ".join(missing)
        if os.environ.get("CI") == "true":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)


@pytest.fixture(scope="session")
def mailpath_session(pki: TestPKI, dovecot_workroot: Path) -> Iterator[MailPath]:
    """One Postfix + Dovecot mail path for the whole session (use ``mailpath`` in tests)."""
    require_mailpath()
    path = MailPath(dovecot_workroot / "mailpath", pki.variants["good"], pki.ca_file)
    path.start()
    try:
        yield path
    finally:
        path.stop()


@pytest.fixture
def mailpath(mailpath_session: MailPath) -> Iterator[MailPath]:
    """The session's mail path; afterwards delivery works again, the queue is empty and
    the fixed mailboxes (loop@, other@) are empty."""
    mailpath_session.check_running()
    yield mailpath_session
    mailpath_session.reset()


@pytest.fixture
def mail_user(mailpath: MailPath) -> MailUser:
    """A fresh, empty mailbox of its own (random name and password) for one test."""
    return mailpath.new_user()
