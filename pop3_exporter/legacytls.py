"""Does the server still accept TLS 1.0 or TLS 1.1? (tls_config.check_legacy_versions)

After the probe's own dialogue, one extra connection per legacy version goes to the
address the probe used, says what the module says before TLS (the greeting and STLS
for STARTTLS modules, nothing for implicit TLS), and offers a handshake limited to
that one version. Both run at once, under the probe's deadline; they never fail the
probe. The answer per version is:

* True: the handshake completed, so the server accepts the version;
* False: the handshake failed (an alert such as protocol_version, or the server
  closed the connection during it);
* unknown (no entry): the deadline came first, or the connection, greeting or STLS
  failed before the handshake could ask the question.

Certificates are not verified: only the version is in question, and the probe's own
handshake reports on the chain.
"""

from __future__ import annotations

import asyncio
import functools
import os
import ssl
import warnings
from collections.abc import Callable

from pop3_exporter.config import Module, TLSConfig, TLSMode
from pop3_exporter.errors import ProbeError
from pop3_exporter.protocol import Pop3Connection, decode_line
from pop3_exporter.target import ProbeTarget

# The versions asked about, with the label values of probe_tls_legacy_version_accepted.
LEGACY_VERSIONS: tuple[tuple[str, ssl.TLSVersion], ...] = (
    ("TLS 1.0", ssl.TLSVersion.TLSv1),
    ("TLS 1.1", ssl.TLSVersion.TLSv1_1),
)
# OpenSSL 3 refuses TLS 1.0/1.1 (and their SHA-1 signatures) at its default security
# level 1 and above; level 0 lets the client offer them. Every cipher suite with
# authentication is offered, so that a refusal is about the version, not the ciphers.
LEGACY_CIPHERS = "ALL:!aNULL:!eNULL:@SECLEVEL=0"
# Client contexts kept: two versions, times the client certificates in use.
_CONTEXT_CACHE_SIZE = 32

# (direction, text) for the debug transcript, like Pop3Connection's sink.
Note = Callable[[str, str], None]
# (cert_file, key_file, cert mtime_ns, key mtime_ns): a rotated certificate is loaded
# again without a reload of the configuration.
_ClientCert = tuple[str, str, int, int]


class LegacyContexts:
    """Client contexts that speak one legacy version each, without verification; one
    per prober, shared by its probes.

    Kept because making an SSLContext costs OpenSSL 3 about a millisecond of CPU, and
    these depend on nothing but the version and the client certificate (a context is
    never changed once made, and may be shared).
    """

    def __init__(self, size: int = _CONTEXT_CACHE_SIZE) -> None:
        self.get = functools.lru_cache(maxsize=size)(_legacy_context)


async def check_legacy_versions(
    target: ProbeTarget,
    module: Module,
    address: str,
    deadline: float,
    contexts: LegacyContexts,
    *,
    note: Note | None = None,
) -> tuple[tuple[str, bool], ...]:
    """(version label, accepted) for each legacy version answered before `deadline`
    (the loop's clock); () when the module does not ask, or leaves no time."""
    tls_config = module.tls_config
    if not module.uses_tls or not tls_config.check_legacy_versions:
        return ()
    if deadline <= asyncio.get_running_loop().time():
        return ()
    server_name = tls_config.server_name or target.host
    answers = await asyncio.gather(
        *(
            _accepts(
                label, version, contexts, address, target.port, module, server_name, deadline, note
            )
            for label, version in LEGACY_VERSIONS
        )
    )
    return tuple(
        (label, accepted)
        for (label, _), accepted in zip(LEGACY_VERSIONS, answers, strict=True)
        if accepted is not None
    )


async def _accepts(
    label: str,
    version: ssl.TLSVersion,
    contexts: LegacyContexts,
    address: str,
    port: int,
    module: Module,
    server_name: str,
    deadline: float,
    note: Note | None,
) -> bool | None:
    """Whether a handshake limited to `version` succeeds; None when it cannot be told."""

    def noted(answer: bool | None, detail: str) -> bool | None:
        if note is not None:
            shown = {True: "accepted", False: "refused", None: "unknown"}[answer]
            note("*", f"legacy {label} handshake: {shown} ({detail})")
        return answer

    try:
        context = contexts.get(version, _client_cert(module.tls_config))
    except (OSError, ssl.SSLError) as exc:
        return noted(None, f"cannot load the client certificate: {exc}")
    connection: Pop3Connection | None = None
    try:
        async with asyncio.timeout_at(deadline):
            try:
                connection = await Pop3Connection.connect(
                    address, port, source_address=module.source_ip_address
                )
                if module.tls is TLSMode.STARTTLS:
                    greeting = decode_line(await connection.read_line())
                    if not greeting.startswith("+OK"):
                        return noted(None, "no +OK greeting")
                    if not (await connection.command("STLS")).ok:
                        return noted(None, "STLS refused")
            except ProbeError as exc:
                return noted(None, str(exc))
            try:
                handshake = await connection.start_tls(context, server_name)
            except ProbeError as exc:
                return noted(False, str(exc))
            return noted(True, f"{handshake.version} {handshake.cipher}")
    except TimeoutError:
        return noted(None, "deadline reached")
    finally:
        if connection is not None:
            connection.close()


def _client_cert(tls_config: TLSConfig) -> _ClientCert | None:
    """The module's client certificate, so that a server requiring one answers the
    version question instead of refusing the handshake for the missing certificate."""
    if tls_config.cert_file is None or tls_config.key_file is None:
        return None
    return (
        tls_config.cert_file,
        tls_config.key_file,
        os.stat(tls_config.cert_file).st_mtime_ns,
        os.stat(tls_config.key_file).st_mtime_ns,
    )


def _legacy_context(version: ssl.TLSVersion, client_cert: _ClientCert | None) -> ssl.SSLContext:
    """A client context that speaks `version` only, without verification."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_ciphers(LEGACY_CIPHERS)
    # Python deprecates these versions (DeprecationWarning); asking about them is the
    # point here. Built on the event loop's thread, so the filter change is not raced.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = version
        context.maximum_version = version
    if client_cert is not None:
        context.load_cert_chain(client_cert[0], client_cert[1])
    return context
