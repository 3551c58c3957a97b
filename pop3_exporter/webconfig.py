"""Protecting the exporter's own HTTP endpoints: TLS and basic auth.

The file format is the one of prometheus/exporter-toolkit (``--web.config.file``), so a
file written for node_exporter or blackbox_exporter works here unchanged, as long as it
uses the settings listed below. Settings the toolkit knows but this exporter cannot
honour are refused by name rather than ignored: a silently ignored security setting is
worse than an error at start-up.

    tls_server_config:
      cert_file: server.crt         # relative paths are relative to this file
      key_file: server.key
      client_auth_type: RequireAndVerifyClientCert   # optional
      client_ca_file: clients-ca.crt                 # with the two Verify* types
      min_version: TLS12                             # TLS10 TLS11 TLS12 TLS13
      max_version: TLS13
    basic_auth_users:
      prometheus: $2b$12$...        # bcrypt hash (htpasswd -nBC 12 "" | tr -d ':')
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import enum
import hashlib
import hmac
import os
import re
import ssl
from collections import OrderedDict
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

import bcrypt
import yaml
from aiohttp import hdrs, web
from aiohttp.typedefs import Handler, Middleware

from pop3_exporter.config import TLS_VERSIONS, _Source
from pop3_exporter.errors import ConfigError

# exporter-toolkit's names -> what Python's ssl module can do. The toolkit's
# RequestClientCert and RequireAnyClientCert accept unverified client certificates,
# which OpenSSL through Python cannot express (CERT_OPTIONAL always verifies).
CLIENT_AUTH_TYPES: Mapping[str, ssl.VerifyMode] = MappingProxyType(
    {
        "NoClientCert": ssl.CERT_NONE,
        "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
        "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
    }
)
_UNSUPPORTED_CLIENT_AUTH_TYPES = frozenset({"RequestClientCert", "RequireAnyClientCert"})
_TLS_KEYS = frozenset(
    {"cert_file", "key_file", "client_auth_type", "client_ca_file", "min_version", "max_version"}
)
# exporter-toolkit settings we recognise but do not implement.
_UNSUPPORTED_TLS_KEYS = frozenset(
    {
        "cert",
        "key",
        "client_ca",
        "cipher_suites",
        "curve_preferences",
        "prefer_server_cipher_suites",
        "client_allowed_sans",
    }
)
_TOP_KEYS = frozenset({"tls_server_config", "basic_auth_users"})
_UNSUPPORTED_TOP_KEYS = frozenset({"http_server_config", "rate_limit"})
_BCRYPT_HASH = re.compile(r"^\$2[aby]\$(0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}$")
# bcrypt looks at no more than 72 bytes; longer passwords are refused outright instead
# of being truncated (bcrypt 5 raises for them anyway).
BCRYPT_MAX_PASSWORD_BYTES = 72
REALM = "pop3_exporter"


@dataclass(frozen=True, slots=True)
class TLSServerConfig:
    cert_file: str
    key_file: str
    client_auth_type: str = "NoClientCert"
    client_ca_file: str | None = None
    min_version: str = "TLS12"
    max_version: str | None = None


@dataclass(frozen=True, slots=True)
class WebConfig:
    """The parsed web config file; the default (no file) is plain HTTP without auth."""

    tls_server_config: TLSServerConfig | None = None
    # user -> bcrypt hash
    basic_auth_users: Mapping[str, bytes] = field(default_factory=lambda: MappingProxyType({}))
    source: str = "<none>"
    # Key path -> line, for errors found after parsing (files that do not load).
    lines: Mapping[str, int] = field(
        default_factory=lambda: MappingProxyType({}), compare=False, repr=False
    )


def parse_web_config(text: str, filename: str = "<string>") -> WebConfig:
    source = _Source(filename)
    root = source.compose(text)
    if root is None:
        return WebConfig(source=filename)
    top = source.mapping(root, "", set(_TOP_KEYS | _UNSUPPORTED_TOP_KEYS))
    _refuse_unsupported(source, top, _UNSUPPORTED_TOP_KEYS, "")
    tls = None
    if "tls_server_config" in top:
        tls = _parse_tls(source, top["tls_server_config"][1], Path(filename).parent)
    users: dict[str, bytes] = {}
    if "basic_auth_users" in top:
        entries = source.mapping(top["basic_auth_users"][1], "basic_auth_users", set())
        for user, (key_node, value_node) in entries.items():
            if not user or ":" in user:
                # Basic auth splits "user:password" at the first colon.
                raise source.error(
                    key_node, f"bad user name {user!r}", key=f"basic_auth_users.{user}"
                )
            hashed = source.string(value_node, f"basic_auth_users.{user}")
            if not _BCRYPT_HASH.match(hashed):
                raise source.error(
                    value_node,
                    "must be a bcrypt hash ($2y$10$...)",
                    key=f"basic_auth_users.{user}",
                )
            users[user] = hashed.encode("ascii")
    return WebConfig(
        tls_server_config=tls,
        basic_auth_users=MappingProxyType(users),
        source=filename,
        lines=MappingProxyType(source.lines),
    )


def load_web_config(path: str | Path) -> WebConfig:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from exc
    return parse_web_config(text, str(path))


def _refuse_unsupported(
    source: _Source,
    entries: Mapping[str, tuple[yaml.Node, yaml.Node]],
    unsupported: frozenset[str],
    prefix: str,
) -> None:
    for key in sorted(unsupported.intersection(entries)):
        raise source.error(
            entries[key][0],
            "is an exporter-toolkit setting that pop3_exporter does not support",
            key=f"{prefix}{key}",
        )


def _parse_tls(source: _Source, node: yaml.Node, base: Path) -> TLSServerConfig:
    where = "tls_server_config"
    entries = source.mapping(node, where, set(_TLS_KEYS | _UNSUPPORTED_TLS_KEYS))
    _refuse_unsupported(source, entries, _UNSUPPORTED_TLS_KEYS, f"{where}.")
    values: dict[str, str] = {}
    for key, (_, value_node) in entries.items():
        key_where = f"{where}.{key}"
        text = source.string(value_node, key_where)
        if not text:
            raise source.error(value_node, "must not be empty", key=key_where)
        if key.endswith("_file"):
            # As exporter-toolkit does: relative to the web config file, not the cwd.
            text = str(base / text) if not Path(text).is_absolute() else text
        elif key in ("min_version", "max_version") and text not in TLS_VERSIONS:
            names = ", ".join(TLS_VERSIONS)
            raise source.error(value_node, f"must be one of {names}", key=key_where)
        elif key == "client_auth_type" and text not in CLIENT_AUTH_TYPES:
            if text in _UNSUPPORTED_CLIENT_AUTH_TYPES:
                message = (
                    f"{text} (accepting unverified client certificates)"
                    " is not supported; use VerifyClientCertIfGiven or"
                    " RequireAndVerifyClientCert with client_ca_file"
                )
            else:
                message = f"must be one of {', '.join(CLIENT_AUTH_TYPES)}"
            raise source.error(value_node, message, key=key_where)
        values[key] = text
    for required in ("cert_file", "key_file"):
        if required not in values:
            raise source.error(node, f"{required} is required", key=where)
    tls = TLSServerConfig(**values)
    verifies = CLIENT_AUTH_TYPES[tls.client_auth_type] is not ssl.CERT_NONE
    if verifies and tls.client_ca_file is None:
        raise source.error(
            node, f"{tls.client_auth_type} needs client_ca_file", key=f"{where}.client_auth_type"
        )
    if not verifies and tls.client_ca_file is not None:
        # Same rule as exporter-toolkit: a CA file that would be silently unused is
        # almost certainly a forgotten client_auth_type.
        raise source.error(
            entries["client_ca_file"][1],
            "is set but client_auth_type is NoClientCert",
            key=f"{where}.client_ca_file",
        )
    if tls.max_version is not None and (
        TLS_VERSIONS[tls.max_version] < TLS_VERSIONS[tls.min_version]
    ):
        raise source.error(
            entries["max_version"][1], "is below min_version", key=f"{where}.max_version"
        )
    return tls


def build_server_ssl_context(
    tls: TLSServerConfig, source: str = "<web config>", lines: Mapping[str, int] | None = None
) -> ssl.SSLContext:
    """The listener's context; file problems become ConfigError at start-up, naming the
    line of the key (from WebConfig.lines) when known."""

    def where(key: str) -> str:
        path = f"tls_server_config.{key}"
        line = (lines or {}).get(path)
        return f"{source}:{line}: {path}" if line is not None else f"{source}: {path}"

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = TLS_VERSIONS[tls.min_version]
    if tls.max_version is not None:
        context.maximum_version = TLS_VERSIONS[tls.max_version]
    try:
        context.load_cert_chain(tls.cert_file, tls.key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"{where('cert_file')}: cannot load cert_file/key_file: {exc}") from exc
    context.verify_mode = CLIENT_AUTH_TYPES[tls.client_auth_type]
    if tls.client_ca_file is not None:
        try:
            context.load_verify_locations(cafile=tls.client_ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"{where('client_ca_file')}: cannot load: {exc}") from exc
    return context


class AuthOutcome(enum.Enum):
    OK = "ok"
    DENIED = "denied"
    BUSY = "busy"  # too many password checks queued already


class BasicAuth:
    """Checks ``Authorization: Basic`` against bcrypt hashes.

    bcrypt is slow on purpose (tens of milliseconds per check), so:
    - checks run in a small thread pool of their own, never on the event loop and
      never in the default executor that name resolution shares;
    - successful checks are remembered in an LRU keyed by an HMAC (with a per-process
      random key) of user, hash and password, so Prometheus pays bcrypt once, not on
      every scrape; failures are not cached, so guessing stays slow;
    - at most ``max_pending`` checks wait for the pool; beyond that requests get 503
      at once, so a flood of bad passwords cannot queue without bound;
    - an unknown user costs a bcrypt check too (against a configured hash), so
      response times do not tell which user names exist.
    """

    def __init__(
        self,
        users: Mapping[str, bytes],
        *,
        cache_size: int = 1024,
        max_pending: int = 64,
        workers: int = 2,
    ) -> None:
        if not users:
            raise ValueError("BasicAuth needs at least one user")
        self._users = dict(users)
        self._decoy_hash = next(iter(self._users.values()))
        self._cache: OrderedDict[bytes, None] = OrderedDict()
        self._cache_size = cache_size
        self._cache_secret = os.urandom(32)
        self._max_pending = max_pending
        self._pending = 0
        self._executor = ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix="pop3_exporter-bcrypt"
        )
        # For tests and debugging: how many checks bcrypt actually ran.
        self.bcrypt_checks = 0

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def check(self, header: str | None) -> AuthOutcome:
        credentials = parse_basic_authorization(header)
        if credentials is None:
            return AuthOutcome.DENIED
        user, password = credentials
        stored = self._users.get(user)
        key = self._cache_key(user, stored or b"", password)
        if stored is not None and key in self._cache:
            self._cache.move_to_end(key)
            return AuthOutcome.OK
        if self._pending >= self._max_pending:
            return AuthOutcome.BUSY
        self._pending += 1
        try:
            loop = asyncio.get_running_loop()
            matched = await loop.run_in_executor(
                self._executor, self._bcrypt_check, password, stored or self._decoy_hash
            )
        finally:
            self._pending -= 1
        if stored is None or not matched:
            return AuthOutcome.DENIED
        self._cache[key] = None
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return AuthOutcome.OK

    def _bcrypt_check(self, password: bytes, hashed: bytes) -> bool:
        self.bcrypt_checks += 1
        if len(password) > BCRYPT_MAX_PASSWORD_BYTES:
            return False
        try:
            return bcrypt.checkpw(password, hashed)
        except ValueError:
            return False

    def _cache_key(self, user: str, hashed: bytes, password: bytes) -> bytes:
        # Length-prefixed parts: no two different triples give the same message.
        parts = (user.encode("utf-8"), hashed, password)
        message = b"".join(len(part).to_bytes(4, "big") + part for part in parts)
        return hmac.new(self._cache_secret, message, hashlib.sha256).digest()

    def middleware(self) -> Middleware:
        """An aiohttp middleware that guards every route (and unknown paths) alike."""

        @web.middleware
        async def basic_auth(request: web.Request, handler: Handler) -> web.StreamResponse:
            outcome = await self.check(request.headers.get(hdrs.AUTHORIZATION))
            if outcome is AuthOutcome.OK:
                return await handler(request)
            if outcome is AuthOutcome.BUSY:
                return web.Response(
                    status=503,
                    text="too many authentication attempts in progress\n",
                    headers={hdrs.RETRY_AFTER: "1"},
                )
            return web.Response(
                status=401,
                text="Unauthorized\n",
                headers={hdrs.WWW_AUTHENTICATE: f'Basic realm="{REALM}", charset="UTF-8"'},
            )

        return basic_auth


def parse_basic_authorization(header: str | None) -> tuple[str, bytes] | None:
    """``Basic base64(user:password)`` -> (user, password); None if malformed."""
    if header is None:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        raw = base64.b64decode(token.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    user_bytes, colon, password = raw.partition(b":")
    if not colon:
        return None
    try:
        user = user_bytes.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return user, password
