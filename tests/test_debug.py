"""The debug=true report: its module section is a configuration file that gives the
same module back, and its counts read as English."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestClient

from pop3_exporter.config import (
    AUTH_SECTION,
    MODULE_SECTION,
    TLS_CONFIG_SECTION,
    Module,
    parse_config,
)
from pop3_exporter.http import create_app
from pop3_exporter.metrics import ExporterMetrics
from pop3_exporter.prober import Pop3Prober
from pop3_exporter.resolver import StaticResolver
from pop3_exporter.runtime import ConfigHolder
from tests.conftest import DovecotFactory
from tests.support.certs import TestPKI, make_client_certificate
from tests.support.fakeprober import FakeProber

Client = TestClient[web.Request, web.Application]
ClientFactory = Callable[..., Awaitable[Client]]

METRICS_HEADING = "Metrics that would have been returned:"


def module_section(report: str, name: str) -> str:
    """The YAML between the module heading and the metrics heading."""
    heading = f"Module {name}, as a configuration file:\n"
    assert heading in report, report
    return report.split(heading, 1)[1].split(METRICS_HEADING, 1)[0]


async def debug_probe(client: Client, module: str) -> str:
    response = await client.get(
        "/probe", params={"target": "127.0.0.1", "module": module, "debug": "true"}
    )
    text = await response.text()
    assert response.status == 200, text
    return text


SECRET = "debug-report-secret"


def password_file(directory: Path) -> Path:
    path = directory / "monitor.password"
    path.write_text(SECRET + "\n")
    path.chmod(0o600)
    return path


def every_key_config(pki: TestPKI, tmp_path: Path) -> str:
    client = make_client_certificate(tmp_path / "client")
    return f"""\
modules:
  everything:
    tls: starttls
    port: 1110
    timeout: 1m30s
    expect_greeting: '^\\+OK (Dovecot|Courier) \\[ready\\]\\s*$'
    query_capabilities: false
    preferred_ip_protocol: ip4
    ip_protocol_fallback: false
    source_ip_address: 127.0.0.1
    tls_config:
      ca_file: '{pki.ca_file}'
      cert_file: '{client.cert_path}'
      key_file: '{client.key_path}'
      server_name: pop.example.com
      insecure_skip_verify: true
      min_version: TLS12
      max_version: TLS13
    auth:
      mechanism: login
      username: monitor@example.com
      password_file: '{password_file(tmp_path)}'
      allow_plaintext: false
      allow_unadvertised: true
    mailbox:
      stat: true
      oldest_message: true
    ip_protocol: all
    dane: check
  odd_values:
    timeout: 1500ms
    expect_greeting: "^\\\\+OK \\"quoted\\" 'single' # not a comment: é"
"""


async def test_module_section_loads_back_to_the_same_module(
    aiohttp_client: ClientFactory, pki: TestPKI, tmp_path: Path
) -> None:
    path = tmp_path / "pop3_exporter.yml"
    path.write_text(every_key_config(pki, tmp_path))
    holder = ConfigHolder(str(path), ExporterMetrics())
    client = await aiohttp_client(create_app(holder, prober=FakeProber()))
    modules = holder.runtime.config.modules
    everything = modules["everything"]
    # The fixture really sets every key, so the round trip covers every parser.
    mapping = yaml.safe_load(module_section(await debug_probe(client, "everything"), "everything"))
    # Every key but delivery, which excludes mailbox (test_config covers delivery).
    assert set(mapping["modules"]["everything"]) == set(MODULE_SECTION.keys) - {"delivery"}
    assert set(mapping["modules"]["everything"]["tls_config"]) == set(TLS_CONFIG_SECTION.keys)
    # The section names the password's file, never the password.
    assert set(mapping["modules"]["everything"]["auth"]) == set(AUTH_SECTION.keys) - {
        "password_env",
        "token_file",
    }
    assert SECRET not in await debug_probe(client, "everything")
    assert everything.expect_greeting.pattern == r"^\+OK (Dovecot|Courier) \[ready\]\s*$"
    for name in ("everything", "odd_values", "pop3", "pop3_starttls", "pop3s"):
        section = module_section(await debug_probe(client, name), name)
        reloaded: Module = parse_config(section, "from-debug.yml").modules[name]
        assert reloaded == modules[name], section
    assert modules["odd_values"].timeout == 1.5
    assert "timeout: 1s500ms" in module_section(
        await debug_probe(client, "odd_values"), "odd_values"
    )


async def test_unset_trust_settings_are_explained(aiohttp_client: ClientFactory) -> None:
    client = await aiohttp_client(
        create_app(ConfigHolder(None, ExporterMetrics()), prober=FakeProber())
    )
    section = module_section(await debug_probe(client, "pop3s"), "pop3s")
    assert "# tls_config.ca_file unset: the system trust store verifies the server" in section
    assert "ca_file:" not in section.replace("# tls_config.ca_file", "")
    assert "# tls_config" not in module_section(await debug_probe(client, "pop3"), "pop3")


@pytest.mark.dovecot
async def test_one_certificate_is_singular(
    aiohttp_client: ClientFactory, dovecot_variant: DovecotFactory, tmp_path: Path
) -> None:
    server = dovecot_variant("self_signed")  # presents its leaf alone
    path = tmp_path / "pop3_exporter.yml"
    path.write_text(
        "modules:\n  skip:\n    tls: implicit\n    tls_config:\n      insecure_skip_verify: true\n"
    )
    holder = ConfigHolder(str(path), ExporterMetrics())
    prober = Pop3Prober(StaticResolver({}))
    client = await aiohttp_client(create_app(holder, prober=prober))
    response = await client.get(
        "/probe",
        params={"target": f"127.0.0.1:{server.pop3s_port}", "module": "skip", "debug": "true"},
    )
    report = await response.text()
    assert "  presented chain (1 certificate):" in report, report
    assert "certificates)" not in report
