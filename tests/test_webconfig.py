"""--web.config.file: TLS on the exporter's own listener and basic auth on every route."""

from __future__ import annotations

import base64
import contextlib
import re
import signal
import ssl
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import bcrypt
import pytest
from aiohttp import web

from pop3_exporter.errors import ConfigError
from pop3_exporter.http import create_app
from pop3_exporter.metrics import ExporterMetrics
from pop3_exporter.runtime import ConfigHolder
from pop3_exporter.webconfig import (
    AuthOutcome,
    BasicAuth,
    TLSServerConfig,
    build_server_ssl_context,
    load_web_config,
    parse_basic_authorization,
    parse_web_config,
)
from tests.support.certs import TestPKI, client_ssl_context, make_client_certificate
from tests.support.exporter import ExporterProcess
from tests.support.fakeprober import FakeProber

PASSWORD = "correct horse"
# Cost 4, the minimum: the tests are about the logic, not about bcrypt being slow.
HASH = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()
# htpasswd writes $2y$ hashes; they must work as well.
HASH_2Y = "$2y$" + bcrypt.hashpw(b"other", bcrypt.gensalt(rounds=4)).decode()[4:]


def basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


# --- Parsing -------------------------------------------------------------------------


def test_full_file_parses_and_paths_are_relative_to_it(tmp_path: Path) -> None:
    path = tmp_path / "web.yml"
    path.write_text(
        textwrap.dedent(
            f"""\
            tls_server_config:
              cert_file: certs/server.crt
              key_file: /abs/server.key
              client_auth_type: RequireAndVerifyClientCert
              client_ca_file: clients.crt
              min_version: TLS13
            basic_auth_users:
              prometheus: '{HASH}'
              alice: '{HASH_2Y}'
            """
        )
    )
    config = load_web_config(path)
    tls = config.tls_server_config
    assert tls == TLSServerConfig(
        cert_file=str(tmp_path / "certs/server.crt"),
        key_file="/abs/server.key",
        client_auth_type="RequireAndVerifyClientCert",
        client_ca_file=str(tmp_path / "clients.crt"),
        min_version="TLS13",
    )
    assert dict(config.basic_auth_users) == {
        "prometheus": HASH.encode(),
        "alice": HASH_2Y.encode(),
    }


def test_empty_file_means_plain_http_without_auth() -> None:
    config = parse_web_config("", "web.yml")
    assert config.tls_server_config is None and not config.basic_auth_users


@pytest.mark.parametrize(
    ("body", "line", "message"),
    [
        ("basic_auth: {}\n", 1, "basic_auth: unknown key (known: basic_auth_users,"),
        (
            "http_server_config: {http2: false}\n",
            1,
            "http_server_config: is an exporter-toolkit setting that pop3_exporter does not",
        ),
        (
            "tls_server_config:\n  cert_file: a\n  key_file: b\n  cipher_suites: [x]\n",
            4,
            "tls_server_config.cipher_suites: is an exporter-toolkit setting",
        ),
        ("tls_server_config:\n  cert_file: a\n", 2, "key_file is required"),
        ("tls_server_config:\n  key_file: a\n", 2, "cert_file is required"),
        ("tls_server_config:\n  cert_file: ''\n  key_file: b\n", 2, "must not be empty"),
        (
            "tls_server_config:\n  cert_file: a\n  key_file: b\n  min_version: TLS1.2\n",
            4,
            "tls_server_config.min_version: must be one of TLS10, TLS11, TLS12, TLS13",
        ),
        (
            "tls_server_config:\n  cert_file: a\n  key_file: b\n"
            "  min_version: TLS13\n  max_version: TLS12\n",
            5,
            "tls_server_config.max_version: is below min_version",
        ),
        (
            "tls_server_config:\n  cert_file: a\n  key_file: b\n"
            "  client_auth_type: RequireAnyClientCert\n",
            4,
            "RequireAnyClientCert (accepting unverified client certificates) is not supported",
        ),
        (
            "tls_server_config:\n  cert_file: a\n  key_file: b\n  client_auth_type: Always\n",
            4,
            "must be one of NoClientCert, VerifyClientCertIfGiven, RequireAndVerifyClientCert",
        ),
        (
            "tls_server_config:\n  cert_file: a\n  key_file: b\n"
            "  client_auth_type: RequireAndVerifyClientCert\n",
            2,
            "RequireAndVerifyClientCert needs client_ca_file",
        ),
        (
            "tls_server_config:\n  cert_file: a\n  key_file: b\n  client_ca_file: c\n",
            4,
            "tls_server_config.client_ca_file: is set but client_auth_type is NoClientCert",
        ),
        ("basic_auth_users:\n  bob: secret\n", 2, "basic_auth_users.bob: must be a bcrypt"),
        ("basic_auth_users:\n  bob: '$2b$10$short'\n", 2, "must be a bcrypt hash"),
        (f"basic_auth_users:\n  'a:b': '{HASH}'\n", 2, "bad user name 'a:b'"),
        (
            f"basic_auth_users:\n  bob: '{HASH}'\n  bob: '{HASH}'\n",
            3,
            "basic_auth_users.bob: duplicate key",
        ),
        ("basic_auth_users: [bob]\n", 1, "basic_auth_users: must be a mapping"),
    ],
)
def test_bad_web_config_names_file_line_and_key(body: str, line: int, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_web_config(body, "web.yml")
    text = str(caught.value)
    assert text.startswith(f"web.yml:{line}: "), text
    assert message in text


def test_unreadable_certificate_is_a_config_error(tmp_path: Path) -> None:
    tls = TLSServerConfig(cert_file=str(tmp_path / "no.crt"), key_file=str(tmp_path / "no.key"))
    with pytest.raises(ConfigError, match=r"web\.yml: tls_server_config\.cert_file: cannot load"):
        build_server_ssl_context(tls, "web.yml")
    lines = {"tls_server_config.cert_file": 3}
    with pytest.raises(ConfigError, match=r"^web\.yml:3: tls_server_config\.cert_file: cannot"):
        build_server_ssl_context(tls, "web.yml", lines)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("Basic " + base64.b64encode(b"u:p:w").decode(), ("u", b"p:w")),
        ("basic " + base64.b64encode(b"u:").decode(), ("u", b"")),
        (None, None),
        ("Bearer abc", None),
        ("Basic", None),
        ("Basic !!!", None),
        ("Basic " + base64.b64encode(b"no colon").decode(), None),
        ("Basic " + base64.b64encode(b"\xff:p").decode(), None),
    ],
)
def test_parse_basic_authorization(header: str | None, expected: tuple[str, bytes] | None) -> None:
    assert parse_basic_authorization(header) == expected


# --- Basic auth ----------------------------------------------------------------------


async def test_successes_are_cached_failures_are_not() -> None:
    auth = BasicAuth({"prometheus": HASH.encode()})
    try:
        good = basic("prometheus", PASSWORD)["Authorization"]
        bad = basic("prometheus", "wrong")["Authorization"]
        assert await auth.check(good) is AuthOutcome.OK
        assert auth.bcrypt_checks == 1
        for _ in range(20):
            assert await auth.check(good) is AuthOutcome.OK
        assert auth.bcrypt_checks == 1, "a cached success must not run bcrypt again"
        for _ in range(3):
            assert await auth.check(bad) is AuthOutcome.DENIED
        assert auth.bcrypt_checks == 4, "every failure pays for bcrypt"
        # Unknown users cost a bcrypt check too (no timing oracle for user names).
        assert await auth.check(basic("mallory", PASSWORD)["Authorization"]) is (AuthOutcome.DENIED)
        assert auth.bcrypt_checks == 5
        # Over-long passwords (bcrypt only reads 72 bytes) are refused, not truncated.
        long_password = PASSWORD + "x" * 80
        assert await auth.check(basic("prometheus", long_password)["Authorization"]) is (
            AuthOutcome.DENIED
        )
    finally:
        auth.close()


async def test_cache_is_bounded() -> None:
    users = {f"user{i}": HASH.encode() for i in range(5)}
    auth = BasicAuth(users, cache_size=2)
    try:
        for i in range(5):
            assert await auth.check(basic(f"user{i}", PASSWORD)["Authorization"]) is (
                AuthOutcome.OK
            )
        assert auth.bcrypt_checks == 5
        # user0 was evicted (LRU of 2): checking it again runs bcrypt again.
        assert await auth.check(basic("user0", PASSWORD)["Authorization"]) is AuthOutcome.OK
        assert auth.bcrypt_checks == 6
        assert await auth.check(basic("user0", PASSWORD)["Authorization"]) is AuthOutcome.OK
        assert auth.bcrypt_checks == 6
    finally:
        auth.close()


async def test_too_many_pending_checks_is_busy() -> None:
    auth = BasicAuth({"prometheus": HASH.encode()}, max_pending=0)
    try:
        outcome = await auth.check(basic("prometheus", PASSWORD)["Authorization"])
        assert outcome is AuthOutcome.BUSY
        assert auth.bcrypt_checks == 0
    finally:
        auth.close()


# --- A real TLS listener -------------------------------------------------------------


def make_client_pki(directory: Path) -> tuple[Path, Path, Path]:
    """A client CA and one client certificate it issued: (ca, cert, key) files."""
    files = make_client_certificate(directory)
    return files.ca_path, files.cert_path, files.key_path


@contextlib.asynccontextmanager
async def serve(app: web.Application, ssl_context: ssl.SSLContext) -> AsyncIterator[int]:
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context)
    await site.start()
    try:
        address = runner.addresses[0]
        yield int(address[1])
    finally:
        await runner.cleanup()


@pytest.fixture
async def https_port(pki: TestPKI, tmp_path: Path) -> AsyncIterator[int]:
    """The exporter app behind TLS (the "good" test certificate) and basic auth."""
    path = tmp_path / "web.yml"
    good = pki.variants["good"]
    path.write_text(
        f"tls_server_config:\n  cert_file: {good.cert_path}\n  key_file: {good.key_path}\n"
        f"basic_auth_users:\n  prometheus: '{HASH}'\n"
    )
    config = load_web_config(path)
    assert config.tls_server_config is not None
    context = build_server_ssl_context(config.tls_server_config)
    app = create_app(
        ConfigHolder(None, ExporterMetrics()),
        prober=FakeProber(),
        auth=BasicAuth(config.basic_auth_users),
    )
    async with serve(app, context) as port:
        yield port


ROUTES = [
    ("GET", "/"),
    ("GET", "/metrics"),
    ("GET", "/-/healthy"),
    ("GET", "/probe?target=pop3s://h"),
    ("POST", "/-/reload"),
    ("GET", "/no-such-page"),
]


async def test_every_route_needs_credentials_over_tls(https_port: int, pki: TestPKI) -> None:
    base = f"https://localhost:{https_port}"
    client_ctx = client_ssl_context(pki.ca_file)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_ctx)) as session:
        wrong = [
            {},
            basic("prometheus", "wrong"),
            basic("Prometheus", PASSWORD),
            basic("mallory", PASSWORD),
            {"Authorization": "Bearer " + PASSWORD},
            {"Authorization": "Basic not-base64!"},
        ]
        for method, route in ROUTES:
            for headers in wrong:
                async with session.request(method, base + route, headers=headers) as response:
                    assert response.status == 401, (method, route, headers)
                    assert response.headers["WWW-Authenticate"].startswith("Basic realm=")
                    assert await response.text() == "Unauthorized\n"
        expected = {"/no-such-page": 404}
        for method, route in ROUTES:
            headers = basic("prometheus", PASSWORD)
            async with session.request(method, base + route, headers=headers) as response:
                assert response.status == expected.get(route, 200), (method, route)


async def test_plain_http_to_the_tls_port_gets_nothing(https_port: int) -> None:
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientError):
            async with session.get(
                f"http://127.0.0.1:{https_port}/-/healthy",
                headers=basic("prometheus", PASSWORD),
                timeout=aiohttp.ClientTimeout(total=5),
            ) as response:
                await response.read()


async def test_untrusted_listener_certificate_is_refused_by_clients(https_port: int) -> None:
    """Control for the TLS test: a client that trusts nothing special must fail, so the
    listener really presents the test certificate rather than being plain HTTP."""
    strict = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # no CAs loaded at all
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=strict)) as session:
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await session.get(f"https://localhost:{https_port}/-/healthy")


async def test_client_certificates_required(pki: TestPKI, tmp_path: Path) -> None:
    ca, cert, key = make_client_pki(tmp_path)
    good = pki.variants["good"]
    path = tmp_path / "web.yml"
    path.write_text(
        f"tls_server_config:\n  cert_file: {good.cert_path}\n  key_file: {good.key_path}\n"
        f"  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: {ca.name}\n"
    )
    config = load_web_config(path)
    assert config.tls_server_config is not None
    context = build_server_ssl_context(config.tls_server_config)
    app = create_app(ConfigHolder(None, ExporterMetrics()), prober=FakeProber())
    async with serve(app, context) as port:
        url = f"https://localhost:{port}/-/healthy"
        without = client_ssl_context(pki.ca_file)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=without)) as session:
            with pytest.raises(aiohttp.ClientError):
                async with session.get(url) as response:
                    await response.read()
        with_cert = client_ssl_context(pki.ca_file)
        with_cert.load_cert_chain(cert, key)
        async with (
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=with_cert)) as session,
            session.get(url) as response,
        ):
            assert response.status == 200


# --- The command line ----------------------------------------------------------------


def test_cli_serves_tls_with_basic_auth(pki: TestPKI, tmp_path: Path) -> None:
    good = pki.variants["good"]
    path = tmp_path / "web.yml"
    path.write_text(
        f"tls_server_config:\n  cert_file: {good.cert_path}\n  key_file: {good.key_path}\n"
        f"basic_auth_users:\n  prometheus: '{HASH}'\n"
    )
    context = client_ssl_context(pki.ca_file)
    with ExporterProcess(tmp_path / "exporter.log", "--web.config.file", str(path)) as exporter:
        url = f"https://localhost:{exporter.port}/-/healthy"
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(url, context=context, timeout=10)
        assert caught.value.code == 401
        caught.value.close()
        request = urllib.request.Request(url, headers=basic("prometheus", PASSWORD))
        with urllib.request.urlopen(request, context=context, timeout=10) as response:
            assert response.status == 200
            assert response.read() == b"Healthy\n"
        exporter.signal(signal.SIGTERM)
        assert exporter.wait() == 0
    assert "msg=listening" in exporter.log() and " scheme=https " in exporter.log()


def test_cli_refuses_a_bad_web_config(tmp_path: Path) -> None:
    path = tmp_path / "web.yml"
    path.write_text("basic_auth_users:\n  bob: plaintext\n")
    for extra in (["--config.check"], ["--web.listen-address", "127.0.0.1:0"]):
        completed = subprocess.run(
            [sys.executable, "-m", "pop3_exporter", "--web.config.file", str(path), *extra],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert completed.returncode == 1
        assert f"{path}:2: basic_auth_users.bob: must be a bcrypt hash" in completed.stderr


def test_the_web_config_example_in_the_docs_is_valid() -> None:
    docs = Path(__file__).resolve().parent.parent / "docs" / "security.md"
    blocks = re.findall(r"```yaml\n(.*?)```", docs.read_text(), flags=re.DOTALL)
    [example] = [block for block in blocks if block.startswith("tls_server_config:")]
    config = parse_web_config(example, "/etc/pop3_exporter/web.yml")
    assert config.tls_server_config is not None
    assert config.tls_server_config.cert_file == "/etc/pop3_exporter/server.crt"
    assert list(config.basic_auth_users) == ["prometheus"]
