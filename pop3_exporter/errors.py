"""Our exception types. Every failure the target can cause maps to one FailureReason.

I/O boundaries catch library exceptions (OSError, ssl.SSLError, socket.gaierror) and
re-raise one of these `from` the original, so the prober never guesses from strings.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from pop3_exporter.result import FailureReason

if TYPE_CHECKING:
    from pop3_exporter.tlsinfo import Handshake


class ProbeError(Exception):
    """Base class: something the target (or the network to it) did wrong."""

    reason: ClassVar[FailureReason] = FailureReason.PROTOCOL_ERROR
    # True when the server answered in step and only refused something: the session
    # is still usable, so the probe ends it with a polite QUIT.
    session_usable: ClassVar[bool] = False


class ResolveError(ProbeError):
    """The name does not resolve: NXDOMAIN, SERVFAIL, or no address of the wanted family."""

    reason = FailureReason.DNS_ERROR


class ResolveTimeoutError(ResolveError):
    """No answer from the resolver in time (kept apart from a definite DNS error)."""

    reason = FailureReason.DNS_TIMEOUT


class ConnectError(ProbeError, ConnectionError):
    reason = FailureReason.CONNECT_ERROR


class ConnectRefusedError(ConnectError):
    reason = FailureReason.CONNECT_REFUSED


class ConnectionClosedError(ProbeError, ConnectionError):
    """The server closed or reset the connection before the dialogue was complete."""

    reason = FailureReason.CONNECTION_CLOSED


class ProtocolError(ProbeError):
    """Malformed or over-long reply."""

    reason = FailureReason.PROTOCOL_ERROR


class LineTooLongError(ProtocolError):
    pass


class GreetingError(ProbeError):
    """The greeting was not +OK."""

    reason = FailureReason.GREETING_ERROR


class GreetingMismatchError(ProbeError):
    """The greeting was +OK but did not match expect_greeting."""

    reason = FailureReason.GREETING_MISMATCH
    session_usable = True


class StlsUnsupportedError(ProbeError):
    """STLS was required but not advertised, or the server refused it."""

    reason = FailureReason.STLS_UNSUPPORTED
    session_usable = True


class TLSHandshakeError(ProbeError):
    reason = FailureReason.TLS_HANDSHAKE_ERROR

    def __init__(self, message: str, handshake: Handshake | None = None) -> None:
        super().__init__(message)
        # What the server presented before the handshake failed, for reporting.
        self.handshake = handshake


class CertificateError(TLSHandshakeError):
    """OpenSSL rejected the presented chain; `handshake` still holds what was presented."""

    reason = FailureReason.TLS_CERT_UNTRUSTED


class CertificateExpiredError(CertificateError):
    reason = FailureReason.TLS_CERT_EXPIRED


class CertificateUntrustedError(CertificateError):
    reason = FailureReason.TLS_CERT_UNTRUSTED


class HostnameMismatchError(CertificateError):
    reason = FailureReason.TLS_HOSTNAME_MISMATCH


class DaneInsecureError(ProbeError):
    """dane: require, and no TLSA answer the resolver authenticated (unsigned zone,
    failed lookup, validation failure, or no name to look up)."""

    reason = FailureReason.DANE_INSECURE


class DaneMismatchError(ProbeError):
    """dane: require, and no authenticated TLSA record matches the presented chain
    (or there is none): a client that enforces DANE refuses the server."""

    reason = FailureReason.DANE_MISMATCH


class AuthFailedError(ProbeError):
    """The server refused the credentials (-ERR, [AUTH], or no response code).

    Login refusals leave the session in step: the probe ends it with QUIT."""

    reason = FailureReason.AUTH_FAILED
    session_usable = True


class AuthUnavailableError(AuthFailedError):
    """[SYS/TEMP]: a temporary failure on the server's side, e.g. its auth backend."""

    reason = FailureReason.AUTH_UNAVAILABLE


class AuthSystemError(AuthFailedError):
    """[SYS/PERM]: a permanent failure on the server's side."""

    reason = FailureReason.AUTH_SYSTEM_ERROR


class MailboxInUseError(AuthFailedError):
    """[IN-USE]: another session holds the mailbox lock."""

    reason = FailureReason.MAILBOX_IN_USE


class LoginDelayError(AuthFailedError):
    """[LOGIN-DELAY]: logged in again sooner than the server allows."""

    reason = FailureReason.LOGIN_DELAY


class AuthMechanismUnsupportedError(AuthFailedError):
    """The configured mechanism is not offered, or AUTH refused it before any
    credentials were sent."""

    reason = FailureReason.AUTH_MECHANISM_UNSUPPORTED


class MailboxError(ProbeError):
    """-ERR to STAT or TOP after a successful login."""

    reason = FailureReason.MAILBOX_ERROR
    session_usable = True


class SmtpError(ProbeError):
    """The submission server did not take the probe's message."""

    reason = FailureReason.SMTP_CONNECT_ERROR


class SmtpConnectError(SmtpError):
    """No connection, a closed one, or a greeting that is no SMTP."""


class SmtpTLSError(SmtpError):
    """STARTTLS refused, or the TLS handshake (or certificate check) failed."""

    reason = FailureReason.SMTP_TLS_ERROR


class SmtpAuthError(SmtpError):
    """The submission server refused the credentials (535, or no usable mechanism)."""

    reason = FailureReason.SMTP_AUTH_FAILED


class SmtpRejectedError(SmtpError):
    """A 5xx answer: the sender, the recipient or the message was refused."""

    reason = FailureReason.SMTP_REJECTED


class SmtpTemporaryError(SmtpError):
    """A 4xx answer: try again later (greylisting, a full queue, a backend down)."""

    reason = FailureReason.SMTP_TEMPORARY_FAILURE


class ConfigError(ValueError):
    """The configuration is invalid; the message names file, line and key."""


class TargetError(ValueError):
    """The target parameter cannot be probed as given."""
