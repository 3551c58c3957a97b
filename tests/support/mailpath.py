"""A real mail path on loopback: Postfix submission -> LMTP -> Dovecot -> POP3.

:class:`MailPath` runs two real servers from Debian packages, each with its own
configuration and state under ``workdir``, started in the foreground by the
tests and stopped by PID:

* Dovecot (``dovecot -F``, :class:`MailDovecot`): POP3 on ``pop3_port``
  (plain, STLS offered) and ``pop3s_port`` (implicit TLS); LMTP on a unix
  socket; an auth socket that Postfix uses for SASL; a passwd-file with
  ``loop@example.test`` and ``other@example.test`` plus fresh users for
  :meth:`MailPath.new_user`; Maildirs owned by uid 65534.
* Postfix (its ``master`` daemon as our child, ``master -c DIR -s``), with
  three smtpd services on ephemeral loopback ports:

  ========================== =================================================
  ``submission_port``        STARTTLS required, AUTH required (port 587 style)
  ``smtps_port``             implicit TLS, AUTH required (port 465 style)
  ``smtp_port``              no TLS required, AUTH also in clear, mail for
                             the test domain accepted without AUTH (port 25)
  ========================== =================================================

  Mail for ``example.test`` goes over LMTP to Dovecot; nothing else is ever
  relayed: every other domain is rejected at RCPT (``default_transport`` and
  ``relay_transport`` are ``error:``), no ``smtp`` client service exists, DNS
  is off and nothing resolves the machine's own name.

Conditions a test can make (all real Postfix behaviour):

* Unknown recipient (``nobody@example.test``): ``550 5.1.1`` at RCPT.
* ``<user>+tempfail@example.test``: ``450 4.2.0`` at RCPT (an access map).
* ``<user>+hold@example.test``: accepted, then the whole message is kept in
  the hold queue until :meth:`MailPath.release` (``postsuper -H ALL`` +
  ``postqueue -f``); delivered, it lands in ``<user>``'s INBOX.
* :meth:`MailPath.stop_delivery`: the LMTP socket Postfix delivers to goes
  away (a symlink is removed), so every accepted message stays deferred until
  :meth:`MailPath.resume_delivery`, which also releases held mail.
* Wrong SASL password: ``535 5.7.8`` (Dovecot answers after about 0.5 s per
  mechanism tried; smtplib tries PLAIN and LOGIN, so about 1 s).
* :attr:`MailPath.closed_port`: a loopback port that refuses connections (a
  socket bound but never listening is kept for the lifetime of the path).

Postfix facts relied on (3.7, Debian 12):

* Its commands print errors only when stderr is a terminal, and log to syslog
  (absent here) before ``maillog_file`` is usable; :func:`run_postfix_command`
  gives them a pseudo-terminal so failures come with their message.
* ``maillog_file`` must start with one of ``maillog_file_prefixes``.
* ``postfix check`` creates the queue subdirectories and ``data_directory``,
  but the ``queue_directory`` itself must exist (root-owned) first.
* ``postfix start-fg`` keeps only a shell in the foreground (master runs as its
  child in a new session), so the master is started directly instead.
* Postfix re-reads a configuration file modified within the last couple of
  seconds every 300 ms until it looks stable (about 2 s per command): the
  generated files are back-dated.
* SIGTERM to the master ends it and its children at once.

Dovecot re-reads a changed passwd-file, but looks at most once per second, so
a user added in the second of an earlier lookup stays unknown until the next
second: :meth:`MailPath.new_user` hands out users made in advance.
"""

from __future__ import annotations

import contextlib
import json
import os
import poplib
import pty
import secrets
import select
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from email.message import EmailMessage
from email.policy import SMTP as SMTP_POLICY
from pathlib import Path
from types import TracebackType

from tests.support.certs import CertFiles, client_ssl_context
from tests.support.dovecot import (
    MAIL_GID,
    MAIL_UID,
    DovecotError,
    DovecotServer,
    _check_traversable,
    _pick_ports,
    dovecot_binary,
    make_maildir,
)
from tests.support.processes import reap, signal_child

DOMAIN = "example.test"
HOSTNAME = "mail.example.test"
# The fixed accounts; fresh ones come from MailPath.new_user().
FIXED_USERS: dict[str, str] = {
    f"loop@{DOMAIN}": "loop-secret",
    f"other@{DOMAIN}": "other-secret",
}
FRESH_PREFIX = "user-"
# Recipients Postfix accepts: the fixed users and any fresh-user name, each
# with an optional +extension. A fresh name Dovecot does not know yet would be
# accepted and then bounced by LMTP: use another name for "unknown recipient".
_RECIPIENTS_REGEXP = (
    r"/^(loop|other|" + FRESH_PREFIX + r"[0-9a-f]+)(\+[^@]*)?@example\.test$/ OK" + "\n"
)
_RECIPIENT_ACCESS = """\
/^[^@+]+\\+hold@example\\.test$/ HOLD held by the test
/^[^@+]+\\+tempfail@example\\.test$/ 450 4.2.0 temporary failure made by the test
"""

POSTFIX_COMMAND_TIMEOUT = 30.0
START_ATTEMPTS = 3  # only "address already in use" is retried
LOG_TAIL_LINES = 40
SMTP_TIMEOUT = 10.0
FRESH_BATCH = 32  # fresh users made at a time


def postfix_binary() -> str | None:
    """Path of the ``postfix`` command, or None when the package is missing."""
    found = shutil.which("postfix")
    if found:
        return found
    fallback = "/usr/sbin/postfix"  # /usr/sbin is often missing from PATH
    return fallback if os.access(fallback, os.X_OK) else None


def _sbin(name: str) -> str:
    found = shutil.which(name)
    return found if found else f"/usr/sbin/{name}"


def missing_mailpath_parts() -> list[str]:
    """What this machine lacks to run a MailPath (empty when all is there)."""
    missing = []
    if dovecot_binary() is None:
        missing.append("dovecot (Debian package dovecot-pop3d)")
    if not os.access("/usr/lib/dovecot/lmtp", os.X_OK):
        missing.append("Dovecot's lmtp (Debian package dovecot-lmtpd)")
    if postfix_binary() is None:
        missing.append("postfix (Debian package postfix)")
    if os.geteuid() != 0:
        missing.append("root (Postfix's master and Dovecot run as root)")
    return missing


@dataclass(frozen=True)
class CommandResult:
    returncode: int
    stdout: str
    stderr: str  # what the command wrote to its terminal


class PostfixError(RuntimeError):
    """A Postfix command failed or the master did not start; the message has its output."""


def run_postfix_command(
    args: Sequence[str], timeout: float = POSTFIX_COMMAND_TIMEOUT, *, check: bool = True
) -> CommandResult:
    """Run a Postfix command with stderr on a pseudo-terminal.

    Postfix commands write their error messages to stderr only when it is a
    terminal; otherwise they go to syslog, which these machines lack, and a
    failure would be silent. Bounded by ``timeout``; the child is killed by PID.
    """
    controller, terminal = pty.openpty()
    with tempfile.TemporaryFile() as out:
        try:
            proc = subprocess.Popen(
                list(args), stdin=subprocess.DEVNULL, stdout=out, stderr=terminal
            )
        finally:
            os.close(terminal)
        chunks: list[bytes] = []
        deadline = time.monotonic() + timeout
        try:
            # Drain the terminal while the command runs: a full pty buffer would block it.
            while True:
                if time.monotonic() >= deadline:
                    signal_child(proc, signal.SIGKILL)
                    proc.wait()
                    raise PostfixError(f"{' '.join(args)} did not finish within {timeout:.0f}s")
                ready, _, _ = select.select([controller], [], [], 0.05)
                if ready:
                    try:
                        data = os.read(controller, 4096)
                    except OSError:  # EIO: every writer has closed the terminal
                        data = b""
                    if data:
                        chunks.append(data)
                        continue
                    if proc.poll() is not None:
                        break
                elif proc.poll() is not None:
                    break
            proc.wait()
        finally:
            os.close(controller)
        out.seek(0)
        result = CommandResult(
            proc.returncode,
            out.read().decode(errors="replace"),
            b"".join(chunks).decode(errors="replace").replace("\r\n", "\n"),
        )
    if check and result.returncode != 0:
        raise PostfixError(
            f"{' '.join(args)} exited with {result.returncode}: {result.stderr.strip()}"
        )
    return result


def _tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return f"--- {path.name}: not written ---"
    return f"--- {path.name} ---\n" + "\n".join(text.splitlines()[-lines:])


def _smtp_greets(port: int, *, tls: bool, timeout: float = 1.0) -> bool:
    """True once an smtpd answers with a 220 banner (after a TLS handshake if ``tls``).

    A mere TCP accept is not enough: the master listens before any smtpd runs.
    """
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw:
            if not tls:
                return raw.recv(64).startswith(b"220")
            # Only proves that smtpd loaded its certificate; verifying it is the tests' job.
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            with ctx.wrap_socket(raw, server_hostname=None) as tls_sock:
                return tls_sock.recv(64).startswith(b"220")
    except OSError:  # refused, reset, timeouts and ssl.SSLError
        return False


def child_pids(pid: int) -> set[int]:
    """Direct children of ``pid`` (from /proc), to check a stop left nothing behind."""
    children = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name (field 2) is in parentheses and may contain spaces.
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[1]) == pid:
            children.add(int(entry.name))
    return children


def pid_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


@dataclass(frozen=True)
class MailUser:
    """One mailbox: its address is both the SMTP/POP3 login and the recipient."""

    address: str
    password: str
    home: Path

    @property
    def maildir(self) -> Path:
        return self.home / "Maildir"

    def with_extension(self, extension: str) -> str:
        """``local+extension@domain``: same mailbox, another Postfix rule."""
        local, domain = self.address.split("@", 1)
        return f"{local}+{extension}@{domain}"


@dataclass(frozen=True)
class QueuedMessage:
    queue_name: str  # "hold", "deferred", "active", "incoming", "maildrop"
    queue_id: str
    recipients: tuple[str, ...]
    delay_reasons: tuple[str, ...]  # why delivery was deferred, per recipient that has one


class MailDovecot(DovecotServer):
    """Dovecot with POP3, LMTP on a unix socket and an auth socket for Postfix's SASL.

    Only the configuration and the files differ from :class:`DovecotServer`;
    starting, readiness and stopping are inherited.
    """

    def __init__(self, workdir: Path, cert: CertFiles) -> None:
        super().__init__(workdir, cert, listen=("127.0.0.1",))
        self.users_path = workdir / "mailusers"
        self.mail_root = workdir / "mail"
        self.lmtp_socket = workdir / "lmtp"
        self.auth_socket = workdir / "auth-postfix"

    def _config_text(self) -> str:
        d = self.workdir
        return f"""\
# Generated by tests/support/mailpath.py; private to one test mail path.
instance_name = {self.instance_name}
base_dir = {self.base_dir}
state_dir = {self.state_dir}
log_path = {self.log_path}
info_log_path = {self.log_path}
debug_log_path = {self.log_path}
# Named, so that nothing resolves the machine's own name (DNS is off-limits).
hostname = {HOSTNAME}

protocols = pop3 lmtp
listen = {", ".join(self.listen)}

ssl = yes
ssl_cert = <{d / "server.crt"}
ssl_key = <{d / "server.key"}
ssl_min_protocol = TLSv1.2

auth_mechanisms = plain login
disable_plaintext_auth = yes
auth_failure_delay = 0
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {self.users_path}
}}
userdb {{
  driver = passwd-file
  args = username_format=%u {self.users_path}
}}
mail_location = maildir:~/Maildir
# loop+hold@example.test is loop's INBOX.
recipient_delimiter = +
lmtp_save_to_detail_mailbox = no

service pop3-login {{
  inet_listener pop3 {{
    port = {self.pop3_port}
  }}
  inet_listener pop3s {{
    port = {self.pop3s_port}
    ssl = yes
  }}
  service_count = 0
  process_min_avail = 1
}}
service lmtp {{
  unix_listener {self.lmtp_socket} {{
    mode = 0600
    user = postfix
    group = postfix
  }}
}}
service auth {{
  unix_listener {self.auth_socket} {{
    mode = 0600
    user = postfix
    group = postfix
  }}
}}
# A failed login would otherwise slow every later login from 127.0.0.1
# (2, 4, 8 ... s); 2.3 has no setting for it, a listener nobody may open works.
service anvil {{
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
protocol lmtp {{
  postmaster_address = postmaster@{DOMAIN}
}}
"""

    def _prepare(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.workdir.chmod(0o755)
        _check_traversable(self.workdir)
        for name, source in (
            ("server.crt", self.cert.cert_path),
            ("server.key", self.cert.key_path),
        ):
            shutil.copyfile(source, self.workdir / name)
            # Postfix's smtpd reads the same files (as root, before dropping privileges).
            (self.workdir / name).chmod(0o644)
        self._prepare_users()

    def _prepare_users(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.workdir.chmod(0o755)
        self.mail_root.mkdir(exist_ok=True)
        self.mail_root.chmod(0o755)
        if not self.users_path.exists():
            self.users_path.write_text("")
            self.users_path.chmod(0o644)

    def add_users(self, accounts: dict[str, str]) -> list[MailUser]:
        """Create the Maildirs and add the passwd-file lines for ``{address: password}``.

        Dovecot re-reads a changed passwd-file, but checks at most once per
        second: a user added in the second of an earlier lookup stays unknown
        until the next second. :meth:`MailPath.new_user` hands out users made
        in advance for that reason.
        """
        self._prepare_users()
        users = []
        lines = []
        for address, password in accounts.items():
            local = address.split("@", 1)[0]
            user = MailUser(address, password, self.mail_root / local)
            make_maildir(user.home)
            lines.append(f"{address}:{{PLAIN}}{password}:{MAIL_UID}:{MAIL_GID}::{user.home}::\n")
            users.append(user)
        # A whole new file renamed into place: a lookup never sees half a line.
        tmp = self.users_path.with_suffix(".tmp")
        tmp.write_text(self.users_path.read_text() + "".join(lines))
        tmp.chmod(0o644)
        tmp.replace(self.users_path)
        return users


class MailPath:
    """Postfix and Dovecot wired together on loopback, private to one test session."""

    def __init__(self, workdir: Path, cert: CertFiles, ca_file: Path) -> None:
        self.workdir = workdir
        self.ca_file = ca_file
        self.dovecot = MailDovecot(workdir / "dovecot", cert)
        self.postfix_dir = workdir / "postfix"
        self.config_dir = self.postfix_dir / "etc"
        self.queue_dir = self.postfix_dir / "queue"
        self.data_dir = self.postfix_dir / "data"
        self.maillog = self.postfix_dir / "maillog"
        self.master_stdout = self.postfix_dir / "master.stdout"
        # Postfix delivers through this symlink to Dovecot's LMTP socket;
        # removing it is a real outage of the delivery agent.
        self.lmtp_gate = self.postfix_dir / "lmtp-gate"
        self.submission_port = 0
        self.smtps_port = 0
        self.smtp_port = 0
        self.users: dict[str, MailUser] = {}
        self._fresh: list[MailUser] = []  # made in advance, see MailDovecot.add_users
        self.start_seconds: float | None = None
        self.stop_seconds: float | None = None
        self._master: subprocess.Popen[bytes] | None = None
        self._closed_socket: socket.socket | None = None

    # ---- properties ----

    @property
    def pop3_port(self) -> int:
        return self.dovecot.pop3_port

    @property
    def pop3s_port(self) -> int:
        return self.dovecot.pop3s_port

    @property
    def closed_port(self) -> int:
        """A loopback port where every connection is refused while the path runs."""
        if self._closed_socket is None:
            raise RuntimeError("the mail path is not running")
        port: int = self._closed_socket.getsockname()[1]
        return port

    @property
    def master_pid(self) -> int | None:
        return self._master.pid if self._master is not None else None

    @property
    def running(self) -> bool:
        return self._master is not None and self._master.poll() is None and self.dovecot.running

    @property
    def loop(self) -> MailUser:
        return self.users[f"loop@{DOMAIN}"]

    @property
    def other(self) -> MailUser:
        return self.users[f"other@{DOMAIN}"]

    def ssl_context(self) -> ssl.SSLContext:
        """A client context that verifies the servers against the test root."""
        return client_ssl_context(self.ca_file)

    # ---- Postfix files ----

    def _main_cf(self) -> str:
        cert_dir = self.dovecot.workdir
        return f"""\
# Generated by tests/support/mailpath.py; private to one test mail path.
compatibility_level = 3.6
queue_directory = {self.queue_dir}
data_directory = {self.data_dir}
# No syslog here: without a log file, failures are silent.
maillog_file = {self.maillog}
maillog_file_prefixes = {self.postfix_dir}

myhostname = {HOSTNAME}
mydomain = {DOMAIN}
myorigin = $mydomain
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8

# Loopback only: no DNS, no name lookups of clients, no relay host, and no
# transport that could leave the machine (mail for other domains is refused).
smtp_dns_support_level = disabled
smtp_host_lookup = native
lmtp_host_lookup = native
smtpd_peername_lookup = no
relayhost =
relay_domains =
default_transport = error:5.7.1 mail leaving the test domain is disabled
relay_transport = error:5.7.1 mail leaving the test domain is disabled
local_transport = error:5.7.1 no local delivery in tests
alias_maps =
alias_database =
local_recipient_maps =

virtual_mailbox_domains = {DOMAIN}
virtual_mailbox_maps = regexp:{self.config_dir / "recipients"}
virtual_transport = lmtp:unix:{self.lmtp_gate}
# A cached LMTP session would outlive stop_delivery().
lmtp_connection_cache_on_demand = no
recipient_delimiter = +
# Bursts of test mail must not be slowed down.
in_flow_delay = 0s

smtpd_tls_chain_files = {cert_dir / "server.key"}, {cert_dir / "server.crt"}
smtpd_tls_security_level = encrypt
smtpd_tls_auth_only = yes
smtpd_sasl_auth_enable = yes
smtpd_sasl_type = dovecot
smtpd_sasl_path = {self.dovecot.auth_socket}
smtpd_sasl_security_options = noanonymous
smtpd_sasl_tls_security_options = noanonymous
smtpd_client_restrictions = permit_sasl_authenticated, reject
smtpd_relay_restrictions = permit_sasl_authenticated, reject_unauth_destination
smtpd_recipient_restrictions = check_recipient_access regexp:{self.config_dir / "recipient_access"}
disable_vrfy_command = yes
smtp_tls_security_level = none
lmtp_tls_security_level = none
biff = no
"""

    def _master_cf(self) -> str:
        # chroot "n" everywhere: the sockets and maps live outside the queue directory.
        return f"""\
# Generated by tests/support/mailpath.py; private to one test mail path.
127.0.0.1:{self.submission_port} inet n - n - - smtpd
  -o syslog_name=postfix/submission
127.0.0.1:{self.smtps_port} inet n - n - - smtpd
  -o syslog_name=postfix/smtps
  -o smtpd_tls_wrappermode=yes
127.0.0.1:{self.smtp_port} inet n - n - - smtpd
  -o syslog_name=postfix/smtp
  -o smtpd_tls_security_level=may
  -o smtpd_tls_auth_only=no
  -o smtpd_client_restrictions=
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""

    def _write_postfix_files(self) -> None:
        for directory in (self.postfix_dir, self.config_dir, self.queue_dir):
            directory.mkdir(parents=True, exist_ok=True)
            # Postfix refuses group- or world-writable, non-root directories here.
            directory.chmod(0o755)
        files = {
            "main.cf": self._main_cf(),
            "master.cf": self._master_cf(),
            "recipients": _RECIPIENTS_REGEXP,
            "recipient_access": _RECIPIENT_ACCESS,
        }
        # Postfix reads a file modified within the last couple of seconds again
        # and again (300 ms apart) until it looks stable: about 2 s per start.
        settled = time.time() - 10
        for name, text in files.items():
            path = self.config_dir / name
            path.write_text(text)
            path.chmod(0o644)
            os.utime(path, (settled, settled))

    def postfix(self, *args: str, check: bool = True) -> CommandResult:
        """``postfix -c DIR args...``"""
        return run_postfix_command(
            [_sbin("postfix"), "-c", str(self.config_dir), *args], check=check
        )

    def postsuper(self, *args: str) -> CommandResult:
        return run_postfix_command([_sbin("postsuper"), "-c", str(self.config_dir), *args])

    def postqueue(self, *args: str) -> CommandResult:
        return run_postfix_command([_sbin("postqueue"), "-c", str(self.config_dir), *args])

    def postfix_settings(self, *names: str) -> dict[str, str]:
        """The values Postfix uses for ``names`` (``postconf -c DIR names...``)."""
        output = run_postfix_command([_sbin("postconf"), "-c", str(self.config_dir), *names])
        settings = {}
        for line in output.stdout.splitlines():
            name, _, value = line.partition("=")
            settings[name.strip()] = value.strip()
        return settings

    # ---- lifecycle ----

    def start(self, timeout: float = 30.0) -> None:
        """Start Dovecot, then Postfix; return once every port greets."""
        if self._master is not None or self.dovecot.running:
            raise RuntimeError("the mail path is already running")
        began = time.monotonic()
        try:
            if not self.users:
                # Before Dovecot starts: it must never have read the file without them.
                fixed = self.dovecot.add_users(FIXED_USERS)
                self.users.update((user.address, user) for user in fixed)
                self._add_fresh_users()
            self.dovecot.start(timeout)
            self._restore_gate()
            self._start_postfix(began + timeout)
            closed = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            closed.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
            self._closed_socket = closed
        except BaseException:
            self.stop()  # never leave half a mail path behind
            raise
        self.start_seconds = time.monotonic() - began

    def _start_postfix(self, deadline: float) -> None:
        master = os.path.join(self._daemon_directory(), "master")
        for attempt in range(1, START_ATTEMPTS + 1):
            self.submission_port, self.smtps_port, self.smtp_port = _pick_ports(
                ["127.0.0.1"], count=3
            )
            self._write_postfix_files()
            # Creates the queue subdirectories and data_directory with Postfix's owners.
            self.postfix("check")
            log_offset = self.maillog.stat().st_size if self.maillog.exists() else 0
            with self.master_stdout.open("ab") as out:
                # Our own child (no "postfix start", whose master detaches), so the
                # test owns its PID; -s keeps stdout for messages before logging starts.
                self._master = subprocess.Popen(
                    [master, "-c", str(self.config_dir), "-s"],
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            if self._wait_postfix_ready(deadline):
                return
            returncode = self._master.poll()
            self._stop_master(5.0)
            with self.maillog.open("rb") as log:
                log.seek(log_offset)
                in_use = b"Address already in use" in log.read()
            if returncode is not None and in_use and attempt < START_ATTEMPTS:
                continue  # lost a race for a port: new ports
            raise PostfixError(
                f"Postfix master did not start (status {returncode})\n{self.log_tail()}"
            )
        raise PostfixError(f"Postfix could not bind its ports\n{self.log_tail()}")

    def _daemon_directory(self) -> str:
        result = run_postfix_command([_sbin("postconf"), "-d", "-h", "daemon_directory"])
        return result.stdout.strip()

    def _wait_postfix_ready(self, deadline: float) -> bool:
        assert self._master is not None
        pending = {self.submission_port, self.smtps_port, self.smtp_port}
        for _ in range(10_000):  # bounded by count and by the deadline
            if self._master.poll() is not None:
                return False
            pending = {
                port for port in pending if not _smtp_greets(port, tls=port == self.smtps_port)
            }
            if not pending:
                return self._master.poll() is None
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
        return False

    def _stop_master(self, timeout: float) -> None:
        proc = self._master
        if proc is None:
            return
        signal_child(proc, signal.SIGTERM)
        reap(proc, timeout)
        self._master = None

    def stop(self, timeout: float = 10.0) -> None:
        """Stop Postfix's master and Dovecot by PID, in parallel; bounded. Idempotent."""
        began = time.monotonic()
        if self._master is not None:
            signal_child(self._master, signal.SIGTERM)
        self.dovecot._send_signal(signal.SIGTERM)
        self._stop_master(timeout)
        self.dovecot.stop(max(0.1, timeout - (time.monotonic() - began)))
        if self._closed_socket is not None:
            self._closed_socket.close()
            self._closed_socket = None
        self.stop_seconds = time.monotonic() - began

    def check_running(self) -> None:
        """Raise with the logs if either server has died."""
        if self._master is None or self._master.poll() is not None:
            raise PostfixError(f"Postfix master is not running\n{self.log_tail()}")
        if not self.dovecot.running:
            raise DovecotError(f"Dovecot is not running\n{self.dovecot.log_tail()}")

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        return "\n".join(
            (
                _tail(self.maillog, lines),
                _tail(self.master_stdout, lines),
                self.dovecot.log_tail(lines),
            )
        )

    def wait_maillog(self, needle: str, timeout: float = 5.0) -> str:
        """Poll Postfix's log until it contains ``needle``; return the whole log.

        Dovecot can show a message before Postfix has logged its delivery:
        postlogd writes what the daemons send it a moment later.
        """
        deadline = time.monotonic() + timeout
        for _ in range(10_000):  # bounded by count and by the deadline
            log = self.maillog.read_text(errors="replace")
            if needle in log:
                return log
            if time.monotonic() >= deadline:
                break
            time.sleep(0.02)
        raise TimeoutError(f"{needle!r} not in the maillog after {timeout:.1f}s\n{self.log_tail()}")

    def __enter__(self) -> MailPath:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ---- users and mailboxes ----

    def _add_fresh_users(self) -> None:
        accounts = {
            f"{FRESH_PREFIX}{secrets.token_hex(6)}@{DOMAIN}": secrets.token_hex(12)
            for _ in range(FRESH_BATCH)
        }
        added = self.dovecot.add_users(accounts)
        self.users.update((user.address, user) for user in added)
        self._fresh.extend(added)

    def new_user(self) -> MailUser:
        """A fresh, empty mailbox with a random name and password, never handed out before."""
        if not self._fresh:
            self._add_fresh_users()
            if self.dovecot.running:
                # Dovecot may have looked at the passwd-file in this very second.
                time.sleep(1.05 - time.time() % 1.0)
        return self._fresh.pop(0)

    @staticmethod
    def maildir_count(user: MailUser) -> int:
        """Messages in the Maildir (new and cur), read from disk, not over POP3."""
        return sum(
            1
            for sub in ("new", "cur")
            for entry in (user.maildir / sub).iterdir()
            if not entry.name.startswith(".")
        )

    @staticmethod
    def empty_maildir(user: MailUser) -> None:
        """Delete every message file; Dovecot's index and UID list stay (UIDs keep growing)."""
        for sub in ("new", "cur", "tmp"):
            for entry in (user.maildir / sub).iterdir():
                entry.unlink()

    @contextlib.contextmanager
    def pop3(
        self, user: MailUser, *, implicit_tls: bool = False, timeout: float = SMTP_TIMEOUT
    ) -> Iterator[poplib.POP3]:
        """A logged-in POP3 session (STLS on ``pop3_port``, or ``pop3s_port``); QUIT at the end."""
        client: poplib.POP3
        if implicit_tls:
            client = poplib.POP3_SSL(
                "127.0.0.1", self.pop3s_port, timeout=timeout, context=self.ssl_context()
            )
        else:
            client = poplib.POP3("127.0.0.1", self.pop3_port, timeout=timeout)
        try:
            if not implicit_tls:
                client.stls(self.ssl_context())
            client.user(user.address)
            client.pass_(user.password)
            yield client
            client.quit()
        finally:
            client.close()

    def pop3_count(self, user: MailUser) -> int:
        """STAT over POP3 with STLS: what a POP3 client sees right now."""
        with self.pop3(user) as client:
            count, _size = client.stat()
        return count

    def pop3_messages(self, user: MailUser) -> list[bytes]:
        """Every message in the mailbox over POP3 (RETR), left in place."""
        with self.pop3(user) as client:
            count, _size = client.stat()
            return [b"\r\n".join(client.retr(n)[1]) for n in range(1, count + 1)]

    def wait_pop3_count(self, user: MailUser, count: int, timeout: float = 10.0) -> float:
        """Poll POP3 until STAT shows ``count``; return the seconds it took."""
        began = time.monotonic()
        deadline = began + timeout
        seen = -1
        for _ in range(100_000):  # bounded by count and by the deadline
            seen = self.pop3_count(user)
            if seen == count:
                return time.monotonic() - began
            if time.monotonic() >= deadline:
                break
            time.sleep(0.002)
        raise TimeoutError(
            f"{user.address}: POP3 STAT shows {seen}, not {count}, after {timeout:.1f}s\n"
            f"{self.log_tail()}"
        )

    # ---- SMTP ----

    def smtp_client(self, port: int | None = None) -> smtplib.SMTP:
        """A client on the submission port (by default), after EHLO and STARTTLS."""
        client = smtplib.SMTP("127.0.0.1", port or self.submission_port, timeout=SMTP_TIMEOUT)
        try:
            client.starttls(context=self.ssl_context())
            client.ehlo()  # smtplib forgets the extensions at STARTTLS
        except BaseException:
            client.close()
            raise
        return client

    def submit(
        self,
        user: MailUser,
        recipients: Sequence[str] | None = None,
        message: EmailMessage | None = None,
    ) -> str:
        """Submit over STARTTLS + AUTH as ``user`` (to itself by default); return the queue ID."""
        rcpts = list(recipients) if recipients is not None else [user.address]
        msg = message if message is not None else make_message(user.address, rcpts)
        with self.smtp_client() as client:
            client.login(user.address, user.password)
            code, reply = client.mail(user.address)
            if code != 250:
                raise smtplib.SMTPSenderRefused(code, reply, user.address)
            for rcpt in rcpts:
                code, reply = client.rcpt(rcpt)
                if code != 250:
                    raise smtplib.SMTPRecipientsRefused({rcpt: (code, reply)})
            code, reply = client.data(msg.as_bytes(policy=SMTP_POLICY))
            if code != 250:
                raise smtplib.SMTPDataError(code, reply)
        # "2.0.0 Ok: queued as 3F2A821A245"
        return reply.decode().rsplit(" ", 1)[-1]

    # ---- queue ----

    def queue(self) -> list[QueuedMessage]:
        """The messages Postfix holds, from ``postqueue -j``."""
        result = self.postqueue("-j")
        messages = []
        for line in result.stdout.splitlines():
            if not line.strip():
                continue
            entry = json.loads(line)
            messages.append(
                QueuedMessage(
                    queue_name=str(entry["queue_name"]),
                    queue_id=str(entry["queue_id"]),
                    recipients=tuple(str(r["address"]) for r in entry["recipients"]),
                    delay_reasons=tuple(
                        str(r["delay_reason"]) for r in entry["recipients"] if "delay_reason" in r
                    ),
                )
            )
        return messages

    def wait_queue(
        self, count: int, queue_name: str | None = None, timeout: float = 10.0
    ) -> list[QueuedMessage]:
        """Poll until the queue holds ``count`` messages, all in ``queue_name`` if given.

        A message being delivered shows as "active" for a moment before it is
        "deferred": wait for the queue the test means, not just the number.
        """
        deadline = time.monotonic() + timeout
        found: list[QueuedMessage] = []
        for _ in range(10_000):  # bounded by count and by the deadline
            found = self.queue()
            if len(found) == count and all(
                queue_name is None or m.queue_name == queue_name for m in found
            ):
                return found
            if time.monotonic() >= deadline:
                break
            time.sleep(0.02)
        wanted = f"{count} messages" + (f" in {queue_name}" if queue_name else "")
        raise TimeoutError(f"the queue does not hold {wanted}: {found}\n{self.log_tail()}")

    def hold_all(self) -> None:
        """``postsuper -h ALL``: put every message now queued on hold."""
        self.postsuper("-h", "ALL")

    def release(self) -> None:
        """Release held mail, deliver all that is queued (``postsuper -H``, ``postqueue -f``)."""
        self.postsuper("-H", "ALL")
        # Needs the pickup and qmgr services; also forgets that LMTP was "dead".
        self.postqueue("-f")

    def stop_delivery(self) -> None:
        """From now on Postfix accepts mail but cannot deliver it: it stays deferred."""
        with contextlib.suppress(FileNotFoundError):
            self.lmtp_gate.unlink()

    def resume_delivery(self) -> None:
        """Restore the LMTP socket, release held mail and flush the queue."""
        self._restore_gate()
        self.release()

    @contextlib.contextmanager
    def delivery_stopped(self) -> Iterator[None]:
        """Accepted mail stays queued inside the block and is delivered when it ends."""
        self.stop_delivery()
        try:
            yield
        finally:
            self.resume_delivery()

    def _restore_gate(self) -> None:
        tmp = self.lmtp_gate.with_name(self.lmtp_gate.name + ".tmp")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        self.postfix_dir.mkdir(parents=True, exist_ok=True)
        os.symlink(self.dovecot.lmtp_socket, tmp)
        tmp.replace(self.lmtp_gate)  # atomic: a delivery never sees the gate half-made

    def reset(self) -> None:
        """Between tests: deliver normally again, drop queued mail, empty the fixed mailboxes."""
        self._restore_gate()
        self.postsuper("-d", "ALL")
        for address in FIXED_USERS:
            self.empty_maildir(self.users[address])


def make_message(
    sender: str, recipients: Sequence[str], subject: str | None = None
) -> EmailMessage:
    """A small text message with a unique subject."""
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = ", ".join(recipients)
    msg["Subject"] = subject or f"mailpath test {secrets.token_hex(4)}"
    msg.set_content("A test message on loopback.\n")
    return msg
