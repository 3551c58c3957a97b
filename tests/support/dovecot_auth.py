"""A real Dovecot for login tests: every POP3 login mechanism, and failures Dovecot really makes.

:class:`AuthDovecotServer` is a :class:`~tests.support.dovecot.DovecotServer`
(same ports, certificates, start and stop) with
``auth_mechanisms = plain login apop xoauth2 oauthbearer`` and three passdbs,
tried in this order:

1. ``checkpassword`` for user names matching ``tempfail*`` only: a script that
   exits 111 ("temporarily unavailable"), so Dovecot answers
   ``-ERR [SYS/TEMP] Temporary authentication failure. [<host>:<date>]``;
2. ``oauth2`` for the XOAUTH2 and OAUTHBEARER mechanisms only, asking an
   :class:`~tests.support.introspection.IntrospectionServer` on loopback
   (``introspection_mode = post``);
3. ``passwd-file`` with ``{PLAIN}`` passwords (so APOP works) for USER/PASS
   (mechanism PLAIN inside Dovecot), AUTH PLAIN, AUTH LOGIN and APOP.

The auth penalty (2, 4, 8... s delays for every login from an IP after a failed
one) is off, so failure tests do not slow down the tests after them; failures
still take about 0.5 s (Dovecot flushes failure replies on a 500 ms timer even
with ``auth_failure_delay = 0``).

Accounts come from :meth:`AuthDovecotServer.add_user`, also while Dovecot runs,
each with its own empty Maildir: a fresh account per test is the cheap way to a
known mailbox. The Maildir helpers put messages with known ``Date`` headers and
exact sizes straight into a Maildir, empty it and count it.

What Dovecot 2.3.19 (Debian 12) answers to each case is asserted, line by
line, in tests/test_dovecot_auth_infra.py.
"""

from __future__ import annotations

import email.utils
import itertools
import os
import re
import secrets
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from tests.support.certs import CertFiles
from tests.support.dovecot import MAIL_GID, MAIL_UID, DovecotServer, make_maildir

AUTH_MECHANISMS: tuple[str, ...] = ("plain", "login", "apop", "xoauth2", "oauthbearer")
TEMPFAIL_PREFIX = "tempfail"  # user names the failing checkpassword passdb answers for
CHECKPASSWORD_TEMPFAIL = 111  # checkpassword's exit status for "temporary problem"
INTROSPECTION_TIMEOUT_MSECS = 5000
# Safe as a file name and inside a passwd-file line.
_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_LINE = 78  # a padding line: 76 'x' and CRLF


@dataclass(frozen=True)
class MailAccount:
    """A Dovecot account whose password the test knows."""

    name: str
    password: str
    home: Path

    @property
    def maildir(self) -> Path:
        return self.home / "Maildir"


# ---------------------------------------------------------------- Maildir


@dataclass(frozen=True)
class Delivered:
    """One message written into a Maildir."""

    path: Path  # where it was written (Dovecot moves it from new/ to cur/ later)
    date: datetime
    octets: int  # its size as POP3 STAT and LIST count it


def make_message(
    date: datetime,
    *,
    subject: str = "test message",
    size: int | None = None,
) -> bytes:
    """An RFC 5322 message with CRLF line ends and the given ``Date``.

    POP3 sizes count CRLF line ends; written with CRLF, a message is exactly
    ``len()`` octets in STAT and LIST. ``size`` pads the body to that many bytes.
    """
    if date.tzinfo is None:
        raise ValueError("date must be timezone-aware")
    head = (
        f"Date: {email.utils.format_datetime(date)}\r\n"
        "From: sender@example.com\r\n"
        "To: probe@example.com\r\n"
        f"Subject: {subject}\r\n"
        f"Message-ID: <{secrets.token_hex(8)}@pop3test.invalid>\r\n"
        "\r\n"
    ).encode("ascii")
    body = b"Written straight into the Maildir by a test.\r\n"
    if size is not None:
        pad = size - len(head) - len(body)
        if pad < 0:
            raise ValueError(f"size {size} is below this message's minimum {len(head) + len(body)}")
        # One byte cannot be a CRLF-ended line of its own: lengthen the text line instead.
        body = body[:-2] + b"!\r\n" if pad == 1 else body + _padding(pad)
    return head + body


def _padding(octets: int) -> bytes:
    """Exactly ``octets`` (not 1) bytes of CRLF-ended lines of 'x'."""
    full, rest = divmod(octets, _LINE)
    line = b"x" * (_LINE - 2) + b"\r\n"
    if rest == 1:  # fold it into the last full line
        return line * (full - 1) + b"x" * (_LINE - 1) + b"\r\n"
    return line * full + (b"x" * (rest - 2) + b"\r\n" if rest else b"")


class _Stamps:
    """Strictly increasing Maildir time stamps, even for deliveries in one microsecond."""

    def __init__(self) -> None:
        self._last = 0
        self._count = itertools.count(1)
        self._lock = threading.Lock()

    def name(self) -> str:
        # "<secs>.M<usecs>P<pid>Q<n>.<host>": Dovecot gives new files their UIDs in
        # the order of this time stamp, so POP3 numbers them in delivery order.
        with self._lock:
            self._last = max(time.time_ns() // 1000, self._last + 1)
            secs, usecs = divmod(self._last, 1_000_000)
            return f"{secs}.M{usecs}P{os.getpid()}Q{next(self._count)}.pop3test"


_stamps = _Stamps()


def deliver(maildir: Path, message: bytes, *, date: datetime, readable: bool = True) -> Delivered:
    """Write ``message`` into ``maildir/new`` the way an MDA does (tmp/, then rename).

    Messages Dovecot has not seen yet get POP3 numbers in delivery order.
    ``readable=False`` leaves a file the mail process (uid 65534) cannot open;
    its size is in the file name (``S=``, ``W=``), so STAT still counts it, and
    TOP or RETR of it gets ``-ERR Message <n> expunged.``
    """
    name = _stamps.name()
    if not readable:
        name += f",S={len(message)},W={len(message)}"
    tmp = maildir / "tmp" / name
    tmp.write_bytes(message)
    if readable:
        os.chown(tmp, MAIL_UID, MAIL_GID)
        tmp.chmod(0o600)
    else:
        tmp.chmod(0o000)  # and owned by root
    final = maildir / "new" / name
    os.replace(tmp, final)
    return Delivered(path=final, date=date, octets=len(message))


def deliver_messages(
    maildir: Path, dates: Sequence[datetime], *, size: int | None = None
) -> list[Delivered]:
    """Deliver one message per date, in order: POP3 message 1 has ``dates[0]``."""
    return [
        deliver(maildir, make_message(date, subject=f"message {i}", size=size), date=date)
        for i, date in enumerate(dates, 1)
    ]


def empty_maildir(maildir: Path) -> int:
    """Remove every message (new/ and cur/); return how many there were."""
    removed = 0
    for sub in ("new", "cur"):
        for path in (maildir / sub).iterdir():
            if path.is_file():
                path.unlink()
                removed += 1
    return removed


def message_count(maildir: Path) -> int:
    """Messages in the Maildir now (new/ and cur/), counted from the files."""
    return sum(1 for sub in ("new", "cur") for p in (maildir / sub).iterdir() if p.is_file())


# ---------------------------------------------------------------- the server


class AuthDovecotServer(DovecotServer):
    """A Dovecot with every login mechanism, a failing passdb and an oauth2 passdb."""

    def __init__(
        self,
        workdir: Path,
        cert: CertFiles,
        *,
        introspection_url: str,
        listen: Sequence[str] = ("127.0.0.1", "::1"),
    ) -> None:
        super().__init__(workdir, cert, listen=listen)
        self.introspection_url = introspection_url
        # One passwd-file per account: Dovecot looks at a passwd-file for changes at
        # most once a second, so an account added to a shared file can stay unknown
        # for up to a second; a file it has never read is read at the first lookup.
        self.accounts_dir = workdir / "accounts"
        self.oauth2_path = workdir / "oauth2.conf"
        self.checkpassword_path = workdir / "checkpassword-tempfail"
        self.mail_root = workdir / "mail"
        self._names: set[str] = set()
        self._names_lock = threading.Lock()
        self._user_counter = itertools.count(1)

    def _auth_config(self) -> str:
        accounts = self.accounts_dir / "%n"
        return f"""\
auth_mechanisms = {" ".join(AUTH_MECHANISMS)}
disable_plaintext_auth = yes
auth_failure_delay = 0
passdb {{
  driver = checkpassword
  args = {self.checkpassword_path}
  username_filter = {TEMPFAIL_PREFIX}*
}}
passdb {{
  driver = oauth2
  mechanisms = xoauth2 oauthbearer
  args = {self.oauth2_path}
}}
passdb {{
  driver = passwd-file
  mechanisms = plain login apop
  args = scheme=PLAIN username_format=%n {accounts}
}}
userdb {{
  driver = passwd-file
  args = username_format=%n {accounts}
}}
mail_location = maildir:~/Maildir
"""

    def _extra_config(self) -> str:
        # 2.3 has no setting for the auth penalty; with nobody allowed to connect to
        # its socket, the auth process never learns of a penalty to apply.
        return """\
service anvil {
  unix_listener anvil-auth-penalty {
    mode = 0
  }
}
"""

    def _prepare_extra(self) -> None:
        # The auth process runs as "dovecot": everything it reads is world-readable.
        self.oauth2_path.write_text(
            f"introspection_url = {self.introspection_url}\n"
            "introspection_mode = post\n"
            "force_introspection = yes\n"
            "username_attribute = username\n"
            "active_attribute = active\n"
            "active_value = true\n"
            f"timeout_msecs = {INTROSPECTION_TIMEOUT_MSECS}\n"
        )
        self.oauth2_path.chmod(0o644)
        self.checkpassword_path.write_text(
            "#!/bin/sh\n# The password backend is down: checkpassword's temporary failure.\n"
            f"exit {CHECKPASSWORD_TEMPFAIL}\n"
        )
        self.checkpassword_path.chmod(0o755)
        self.accounts_dir.mkdir(exist_ok=True)
        self.accounts_dir.chmod(0o755)

    def add_user(
        self,
        name: str | None = None,
        password: str | None = None,
        *,
        lock_session: bool = False,
        mailbox: bool = True,
    ) -> MailAccount:
        """A new account with an empty Maildir, usable at once (also while Dovecot runs).

        ``lock_session`` sets ``pop3_lock_session=yes`` for this user: while one
        session is logged in, another one's login waits 11-12 s, then gets
        ``-ERR [IN-USE] ...``. ``mailbox=False`` gives a home that the mail
        process cannot enter: the login succeeds, then the mailbox fails to open.
        """
        with self._names_lock:
            if name is None:
                name = f"user{next(self._user_counter)}"
            if not _NAME.fullmatch(name) or name.startswith(TEMPFAIL_PREFIX):
                raise ValueError(f"unusable user name {name!r}")
            if name in self._names:
                raise ValueError(f"user {name!r} exists already")
            self._names.add(name)
        if password is None:
            password = secrets.token_urlsafe(12)
        if not password or any(c in password for c in ":\r\n\0"):
            raise ValueError("the password does not fit a passwd-file line")
        home = self.mail_root / name
        self.mail_root.mkdir(parents=True, exist_ok=True)
        if mailbox:
            make_maildir(home)
        else:
            home.mkdir(exist_ok=True)
            home.chmod(0o700)  # owned by root: uid 65534 cannot enter it
        # The passwd-file userdb takes only extra fields named "userdb_<setting>".
        extra = "userdb_pop3_lock_session=yes" if lock_session else ""
        line = f"{name}:{{PLAIN}}{password}:{MAIL_UID}:{MAIL_GID}::{home}::{extra}\n"
        self.accounts_dir.mkdir(parents=True, exist_ok=True)
        path = self.accounts_dir / name
        tmp = path.with_name(f".{name}.tmp")
        tmp.write_text(line)
        tmp.chmod(0o644)
        os.replace(tmp, path)  # Dovecot never reads a half-written file
        return MailAccount(name=name, password=password, home=home)
