"""A real Dovecot (2.3) POP3 server in the foreground, private to one test run.

Every server gets its own ``instance_name``, ``base_dir``, ``state_dir``,
log file, users file and maildir under ``workdir``, and two free ephemeral
ports: ``pop3_port`` (plain, STLS offered) and ``pop3s_port`` (implicit TLS).
The only account is ``probe`` / ``secret`` (passwd-file, ``{PLAIN}``), mail
owned by uid/gid 65534.

Facts about Dovecot that tests rely on:

* Greeting: ``+OK Dovecot (Debian) ready.``; CAPA before STLS lists
  ``TOP UIDL RESP-CODES PIPELINING AUTH-RESP-CODE STLS USER SASL PLAIN LOGIN``.
* ``disable_plaintext_auth = yes`` still lets a client whose address equals
  the server's address count as "secured": from 127.0.0.1 to 127.0.0.1 the
  CAPA before STLS shows ``USER`` and ``SASL PLAIN LOGIN``. Connect from
  another loopback address (bind the client to 127.0.0.2) to see what an
  outside client sees: no ``USER`` and ``SASL`` without mechanisms.
* ``service_count = 0`` (long-lived login processes) lifts the stock limit of
  about 90 connections/s; ``auth_failure_delay = 0`` keeps failed logins fast.
* Stopping (SIGTERM to the master) also ends open POP3 sessions, and takes
  about a second; :func:`stop_servers` stops several in parallel.

The processes run as root (the master), ``dovecot``, ``dovenull`` and 65534,
so ``workdir`` and all its ancestors must be traversable by everyone: a pytest
``tmp_path`` (mode 0700) is not; use a directory made under ``/tmp``.
"""

from __future__ import annotations

import ipaddress
import itertools
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import TracebackType

from tests.support.certs import CertFiles
from tests.support.processes import reap, signal_child

USER = "probe"
PASSWORD = "secret"
MAIL_UID = 65534
MAIL_GID = 65534

START_ATTEMPTS = 3  # only "address already in use" is retried
LOG_TAIL_LINES = 40
# sun_path holds 108 bytes; Dovecot's longest socket name under base_dir is
# about 25 characters ("token-login/tokenlogin"), so keep base_dir short.
MAX_BASE_DIR_LEN = 80

_counter = itertools.count(1)


def dovecot_binary() -> str | None:
    """Path of the dovecot binary, or None when it is not installed."""
    found = shutil.which("dovecot")
    if found:
        return found
    # /usr/sbin is often missing from PATH for non-root users.
    fallback = "/usr/sbin/dovecot"
    return fallback if os.access(fallback, os.X_OK) else None


def _port_is_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _pick_ports(listen: Sequence[str], count: int = 2, tries: int = 50) -> list[int]:
    """``count`` distinct ports that are free on every address in ``listen``.

    Binding port 0 lets the kernel choose; the sockets stay open until all
    ports are chosen so that they differ. Another process may still grab a
    port before Dovecot binds it: :meth:`DovecotServer.start` retries.
    """
    held: list[socket.socket] = []
    ports: list[int] = []
    try:
        for _ in range(tries):
            if len(ports) == count:
                break
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            held.append(sock)
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
            if all(_port_is_free(host, port) for host in listen if host != "127.0.0.1"):
                ports.append(port)
    finally:
        for sock in held:
            sock.close()
    if len(ports) != count:
        raise RuntimeError(f"could not find {count} free ports on {list(listen)}")
    return ports


def _greets(host: str, port: int, tls: bool, timeout: float = 1.0) -> bool:
    """True once a login process answers with "+OK" (after a TLS handshake if ``tls``).

    A mere TCP accept is not enough: the master listens before its login
    processes exist, and a SIGTERM during that start-up makes Dovecot take
    about 6 s instead of 1 s to exit.
    """
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw:
            if not tls:
                return raw.recv(64).startswith(b"+OK")
            # Only proves the certificate and key load; verification is the tests' job.
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            with ctx.wrap_socket(raw, server_hostname=None) as tls_sock:
                return tls_sock.recv(64).startswith(b"+OK")
    except OSError:  # includes refused, reset, timeouts and ssl.SSLError
        return False


def _check_traversable(path: Path) -> None:
    """Dovecot's unprivileged processes must be able to reach ``path``."""
    for directory in (path, *path.parents):
        if not directory.stat().st_mode & 0o001:
            raise RuntimeError(
                f"{directory} is not traversable by other users (mode "
                f"{directory.stat().st_mode & 0o777:o}); Dovecot's processes running as "
                f"uid {MAIL_UID} and 'dovecot' need it. Use a workdir under /tmp."
            )


def make_maildir(home: Path) -> Path:
    """Create ``home/Maildir`` with cur/new/tmp, owned by the mail uid; return the Maildir."""
    maildir = home / "Maildir"
    for sub in ("cur", "new", "tmp"):
        (maildir / sub).mkdir(parents=True, exist_ok=True)
    for path in (home, maildir, *(maildir / s for s in ("cur", "new", "tmp"))):
        path.chmod(0o700)
        os.chown(path, MAIL_UID, MAIL_GID)
    return maildir


class DovecotError(RuntimeError):
    """Dovecot exited or did not become ready; the message ends with its log."""


class DovecotServer:
    """One Dovecot master running ``dovecot -F`` for the lifetime of this object."""

    def __init__(
        self,
        workdir: Path,
        cert: CertFiles,
        *,
        listen: Sequence[str] = ("127.0.0.1", "::1"),
        ssl_min_protocol: str = "TLSv1.2",
        ssl_cipher_list: str | None = None,
    ) -> None:
        for host in listen:
            # Test servers must never be reachable from outside this machine.
            if not ipaddress.ip_address(host).is_loopback:
                raise ValueError(f"listen address must be loopback, not {host!r}")
        self.workdir = workdir
        self.cert = cert
        self.listen = tuple(listen)
        # TLSv1 with ssl_cipher_list "ALL:@SECLEVEL=0" makes a server of legacy TLS.
        self.ssl_min_protocol = ssl_min_protocol
        self.ssl_cipher_list = ssl_cipher_list
        self.pop3_port = 0
        self.pop3s_port = 0
        # Unique per server: Dovecot keys its instance registry and log prefix on it.
        self.instance_name = f"pop3test-{os.getpid()}-{next(_counter)}-{uuid.uuid4().hex[:6]}"
        self.config_path = workdir / "dovecot.conf"
        self.log_path = workdir / "dovecot.log"
        self.stdout_path = workdir / "dovecot.stdout"
        self.users_path = workdir / "users"
        self.maildir = workdir / "mail" / USER / "Maildir"
        self.base_dir = workdir / "run"
        self.state_dir = workdir / "state"
        self.start_seconds: float | None = None  # how long the last start() took
        self.stop_seconds: float | None = None  # how long the last stop() took
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    # ---- files ----

    def _config_text(self) -> str:
        d = self.workdir
        cipher_list = f"\nssl_cipher_list = {self.ssl_cipher_list}" if self.ssl_cipher_list else ""
        return f"""\
# Generated by tests/support/dovecot.py; private to one test server.
instance_name = {self.instance_name}
base_dir = {self.base_dir}
state_dir = {self.state_dir}
log_path = {self.log_path}
info_log_path = {self.log_path}
debug_log_path = {self.log_path}

protocols = pop3
listen = {", ".join(self.listen)}

ssl = yes
ssl_cert = <{d / "server.crt"}
ssl_key = <{d / "server.key"}
ssl_min_protocol = {self.ssl_min_protocol}{cipher_list}

{self._auth_config()}
service pop3-login {{
  inet_listener pop3 {{
    port = {self.pop3_port}
  }}
  inet_listener pop3s {{
    port = {self.pop3s_port}
    ssl = yes
  }}
  # Long-lived login processes: fork-per-connection caps it near 90 conn/s.
  service_count = 0
  process_min_avail = 2
  process_limit = 100
  client_limit = 5000
  vsz_limit = 1G
}}
service pop3 {{
  process_limit = 2000
}}
protocol pop3 {{
  mail_max_userip_connections = 1000
  pop3_uidl_format = %08Xu%08Xv
}}
default_process_limit = 2000
default_client_limit = 10000
service anvil {{
  client_limit = 12000
}}
service auth {{
  client_limit = 12000
}}
{self._extra_config()}"""

    def _auth_config(self) -> str:
        """Authentication and mail location; subclasses replace it (see dovecot_auth.py)."""
        return f"""\
auth_mechanisms = plain login
disable_plaintext_auth = yes
auth_failure_delay = 0
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%n {self.users_path}
}}
userdb {{
  driver = passwd-file
  args = username_format=%n {self.users_path}
}}
mail_location = maildir:{self.workdir}/mail/%n/Maildir
"""

    def _extra_config(self) -> str:
        """Appended to the config; empty here, a hook for subclasses."""
        return ""

    def _prepare(self) -> None:
        """Write everything except the config (which needs the ports)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.workdir.chmod(0o755)
        _check_traversable(self.workdir)
        if len(str(self.base_dir)) > MAX_BASE_DIR_LEN:
            raise ValueError(f"workdir path too long for Dovecot's unix sockets: {self.workdir}")
        shutil.copyfile(self.cert.cert_path, self.workdir / "server.crt")
        shutil.copyfile(self.cert.key_path, self.workdir / "server.key")
        # Only the root-run config process reads these, but keep them readable
        # so a failing test can be debugged as any user.
        (self.workdir / "server.crt").chmod(0o644)
        (self.workdir / "server.key").chmod(0o644)
        self.users_path.write_text(
            f"{USER}:{{PLAIN}}{PASSWORD}:{MAIL_UID}:{MAIL_GID}::{self.workdir}/mail/{USER}::\n"
        )
        self.users_path.chmod(0o644)
        mail_root = self.workdir / "mail"
        mail_root.mkdir(exist_ok=True)
        mail_root.chmod(0o755)
        make_maildir(mail_root / USER)
        self._prepare_extra()

    def _prepare_extra(self) -> None:
        """More files before the first start; a hook for subclasses."""

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The last ``lines`` lines of dovecot.log and of its stdout/stderr."""
        parts = []
        for path in (self.log_path, self.stdout_path):
            try:
                text = path.read_text(errors="replace")
            except FileNotFoundError:
                continue
            tail = "\n".join(text.splitlines()[-lines:])
            parts.append(f"--- {path.name} ---\n{tail}")
        return "\n".join(parts) or "(no log written)"

    def _log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def _log_since(self, offset: int) -> str:
        try:
            with self.log_path.open("rb") as f:
                f.seek(offset)
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    # ---- lifecycle ----

    def start(self, timeout: float = 15.0, *, reuse_ports: bool = False) -> None:
        """Start Dovecot; return once both ports greet ``+OK`` on every listen address.

        Raises :class:`DovecotError` (with the log tail) if Dovecot exits or is
        not ready within ``timeout``; a port lost to another process between
        choosing and binding it is retried with new ports. With ``reuse_ports``
        a restarted server listens where it did before (clients keep their target).
        """
        if self.running:
            raise RuntimeError("Dovecot is already running")
        binary = dovecot_binary()
        if binary is None:
            raise FileNotFoundError("dovecot binary not found")
        began = time.monotonic()
        deadline = began + timeout
        self._prepare()
        for attempt in range(1, START_ATTEMPTS + 1):
            if not (reuse_ports and self.pop3_port and attempt == 1):
                self.pop3_port, self.pop3s_port = _pick_ports(self.listen)
            self.config_path.write_text(self._config_text())
            self.config_path.chmod(0o644)
            log_offset = self._log_size()
            try:
                with self.stdout_path.open("ab") as out:
                    self._proc = subprocess.Popen(
                        [binary, "-F", "-c", str(self.config_path)],
                        stdin=subprocess.DEVNULL,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                    )
                ready = self._wait_ready(deadline)
            except BaseException:
                self.stop()  # never leave a half-started server behind (e.g. Ctrl-C)
                raise
            if ready:
                self.start_seconds = time.monotonic() - began
                return
            returncode = self._proc.poll()
            self.stop()
            in_use = "Address already in use" in self._log_since(log_offset)
            if returncode is not None and in_use and attempt < START_ATTEMPTS:
                continue  # lost a race for a port: pick new ones
            reason = (
                f"exited with status {returncode}"
                if returncode is not None
                else f"was not ready within {timeout:.1f}s"
            )
            raise DovecotError(f"Dovecot {reason} (attempt {attempt})\n{self.log_tail()}")
        raise DovecotError(f"Dovecot could not bind its ports\n{self.log_tail()}")

    def _wait_ready(self, deadline: float) -> bool:
        """Poll until both ports greet on every address; False if Dovecot exits or time runs out."""
        assert self._proc is not None
        pending = {
            (host, port, port == self.pop3s_port)
            for host in self.listen
            for port in (self.pop3_port, self.pop3s_port)
        }
        # Bounded twice: by the deadline and by the number of polls.
        for _ in range(10_000):
            if self._proc.poll() is not None:
                return False
            pending = {check for check in pending if not _greets(*check)}
            if not pending:
                # Still ours: a greeting could also come from a stranger on a lost port.
                return self._proc.poll() is None
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
        return False

    def _send_signal(self, signum: int) -> None:
        if self._proc is not None:
            signal_child(self._proc, signum)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the master and wait; SIGKILL after ``timeout``. Idempotent."""
        proc = self._proc
        if proc is None:
            return
        began = time.monotonic()
        self._send_signal(signal.SIGTERM)
        self._reap(timeout)
        self.stop_seconds = time.monotonic() - began

    def _reap(self, timeout: float) -> None:
        proc = self._proc
        if proc is None:
            return
        reap(proc, timeout)
        self._proc = None

    def __enter__(self) -> DovecotServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return (
            f"DovecotServer(pid={self.pid}, pop3_port={self.pop3_port}, "
            f"pop3s_port={self.pop3s_port}, cert={self.cert.name!r}, workdir={self.workdir})"
        )


def stop_servers(servers: Iterable[DovecotServer], timeout: float = 10.0) -> None:
    """Stop several servers in parallel: signal all first, then wait for each."""
    servers = list(servers)
    began = time.monotonic()
    for server in servers:
        server._send_signal(signal.SIGTERM)
    for server in servers:
        if server._proc is not None:
            remaining = max(0.1, timeout - (time.monotonic() - began))
            server._reap(remaining)
            server.stop_seconds = time.monotonic() - began
