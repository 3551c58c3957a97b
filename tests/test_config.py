"""Configuration parsing: every option of the reference, defaults, and strict errors."""

from __future__ import annotations

import re
import ssl
from pathlib import Path

import pytest

from pop3_exporter.config import (
    IPProtocol,
    Module,
    TLSMode,
    builtin_modules,
    default_config,
    load_config,
    parse_config,
    parse_duration,
)
from pop3_exporter.errors import ConfigError
from pop3_exporter.http import build_runtime
from tests.support.certs import TestPKI

FULL_MODULE = """\
modules:
  pop3s_internal:
    port: 1995
    tls: implicit
    timeout: 30s
    expect_greeting: '^\\+OK Dovecot'
    query_capabilities: false
    preferred_ip_protocol: ip4
    ip_protocol_fallback: false
    source_ip_address: 127.0.0.2
    tls_config:
      ca_file: /etc/ssl/internal-ca.pem
      cert_file: /etc/ssl/client.pem
      key_file: /etc/ssl/client.key
      server_name: pop.example.com
      insecure_skip_verify: true
      min_version: TLS13
      max_version: TLS13
"""


def test_builtin_modules_are_the_documented_three() -> None:
    modules = default_config().modules
    assert set(modules) == {"pop3", "pop3_starttls", "pop3s"}
    assert (modules["pop3"].tls, modules["pop3"].port) == (TLSMode.NONE, 110)
    assert (modules["pop3_starttls"].tls, modules["pop3_starttls"].port) == (TLSMode.STARTTLS, 110)
    assert (modules["pop3s"].tls, modules["pop3s"].port) == (TLSMode.IMPLICIT, 995)
    for module in modules.values():
        assert module.expect_greeting.pattern == r"^\+OK"
        assert module.query_capabilities is True
        assert module.tls_config.insecure_skip_verify is False
        assert module.timeout == 10.0


def test_every_option_is_parsed() -> None:
    module = parse_config(FULL_MODULE, "full.yml").modules["pop3s_internal"]
    assert module.port == 1995
    assert module.tls is TLSMode.IMPLICIT
    assert module.timeout == 30.0
    assert module.expect_greeting.search("+OK Dovecot ready.")
    assert not module.expect_greeting.search("+OK Courier")
    assert module.query_capabilities is False
    assert module.preferred_ip_protocol is IPProtocol.IP4
    assert module.ip_protocol_fallback is False
    assert module.source_ip_address == "127.0.0.2"
    tls = module.tls_config
    assert tls.ca_file == "/etc/ssl/internal-ca.pem"
    assert tls.cert_file == "/etc/ssl/client.pem"
    assert tls.key_file == "/etc/ssl/client.key"
    assert tls.server_name == "pop.example.com"
    assert tls.insecure_skip_verify is True
    assert tls.min_version == "TLS13"
    assert tls.max_version == "TLS13"


def test_file_modules_add_to_builtin_ones_and_can_replace_them() -> None:
    config = parse_config("modules:\n  pop3:\n    timeout: 2s\n  extra: {}\n", "x.yml")
    assert set(config.modules) == set(builtin_modules()) | {"extra"}
    assert config.modules["pop3"].timeout == 2.0
    assert config.modules["extra"] == Module(name="extra")


def test_implicit_tls_module_defaults_to_port_995() -> None:
    config = parse_config("modules:\n  s:\n    tls: implicit\n", "x.yml")
    assert config.modules["s"].port == 995


def test_empty_file_gives_builtin_modules() -> None:
    assert set(parse_config("", "empty.yml").modules) == set(builtin_modules())


@pytest.mark.parametrize(
    ("text", "duration"),
    [("30s", 30.0), ("1m30s", 90.0), ("500ms", 0.5), ("1h", 3600.0), ("1.5s", 1.5)],
)
def test_durations(text: str, duration: float) -> None:
    assert parse_duration(text) == pytest.approx(duration)


@pytest.mark.parametrize("text", ["", "30", "s", "1x", "10s5", "-1s", "1s 2s"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)


# Each invalid file names the file, the line and the key (or value) at fault.
INVALID = [
    ("modules:\n  a:\n    tsl: none\n", r"bad\.yml:3: modules\.a: unknown key 'tsl'"),
    ("module:\n  a: {}\n", r"bad\.yml:1: top level: unknown key 'module'"),
    ("modules:\n  a:\n    tls: maybe\n", r"bad\.yml:3: 'modules\.a\.tls' must be one of"),
    ("modules:\n  a:\n    port: 70000\n", r"bad\.yml:3: 'modules\.a\.port' must be a port"),
    ("modules:\n  a:\n    port: true\n", r"bad\.yml:3: 'modules\.a\.port' must be a port"),
    ("modules:\n  a:\n    timeout: 10\n", r"bad\.yml:3: 'modules\.a\.timeout': not a duration"),
    ("modules:\n  a:\n    timeout: 0s\n", r"bad\.yml:3: 'modules\.a\.timeout' must be above zero"),
    (
        "modules:\n  a:\n    expect_greeting: '+OK('\n",
        r"bad\.yml:3: 'modules\.a\.expect_greeting': bad regex",
    ),
    (
        "modules:\n  a:\n    query_capabilities: yes please\n",
        r"bad\.yml:3: 'modules\.a\.query_capabilities' must be true or false",
    ),
    (
        "modules:\n  a:\n    preferred_ip_protocol: ip5\n",
        r"bad\.yml:3: 'modules\.a\.preferred_ip_protocol' must be one of ip4, ip6",
    ),
    (
        "modules:\n  a:\n    ip_protocol_fallback: 1\n",
        r"bad\.yml:3: 'modules\.a\.ip_protocol_fallback' must be true or false",
    ),
    (
        "modules:\n  a:\n    source_ip_address: localhost\n",
        r"bad\.yml:3: 'modules\.a\.source_ip_address' must be an IP address",
    ),
    (
        "modules:\n  a:\n    tls_config:\n      ca: x\n",
        r"bad\.yml:4: modules\.a\.tls_config: unknown key 'ca'",
    ),
    (
        "modules:\n  a:\n    tls_config:\n      min_version: TLS14\n",
        r"bad\.yml:4: 'modules\.a\.tls_config\.min_version' must be one of",
    ),
    (
        "modules:\n  a:\n    tls_config:\n      min_version: TLS13\n      max_version: TLS12\n",
        r"bad\.yml:4: 'modules\.a\.tls_config': max_version is below min_version",
    ),
    (
        "modules:\n  a:\n    tls_config:\n      cert_file: /x.pem\n",
        r"bad\.yml:4: 'modules\.a\.tls_config': cert_file and key_file go together",
    ),
    (
        "modules:\n  a:\n    tls_config:\n      insecure_skip_verify: sometimes\n",
        r"bad\.yml:4: 'modules\.a\.tls_config\.insecure_skip_verify' must be true or false",
    ),
    (
        "modules:\n  a:\n    tls_config:\n      server_name: ''\n",
        r"bad\.yml:4: 'modules\.a\.tls_config\.server_name' must not be empty",
    ),
    ("modules:\n  a: {}\n  a: {}\n", r"bad\.yml:3: modules: duplicate key 'a'"),
    ("modules:\n  'bad name': {}\n", r"bad\.yml:2: module name 'bad name' must match"),
    ("modules: [a, b]\n", r"bad\.yml:1: modules must be a mapping"),
    ("modules:\n  a:\n    port: [1]\n", r"bad\.yml:3: 'modules\.a\.port' must be a single value"),
    ("modules:\n  a: {\n", r"bad\.yml:3: invalid YAML"),
]


@pytest.mark.parametrize(("text", "message"), INVALID)
def test_invalid_config_names_file_line_and_key(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(text, "bad.yml")


def test_load_config_reads_a_file(tmp_path: Path) -> None:
    path = tmp_path / "pop3.yml"
    path.write_text("modules:\n  slow:\n    timeout: 1m\n")
    assert load_config(path).modules["slow"].timeout == 60.0
    assert load_config(path).source == str(path)


def test_load_config_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.yml")


def test_runtime_builds_one_context_per_tls_config(pki: TestPKI) -> None:
    text = (
        "modules:\n"
        f"  a: {{tls: implicit, tls_config: {{ca_file: '{pki.ca_file}'}}}}\n"
        f"  b: {{tls: starttls, tls_config: {{ca_file: '{pki.ca_file}'}}}}\n"
        "  c: {tls: implicit, tls_config: {min_version: TLS13, insecure_skip_verify: true}}\n"
    )
    runtime = build_runtime(parse_config(text, "ctx.yml"))
    contexts = runtime.ssl_contexts
    assert contexts["a"] is contexts["b"]
    assert contexts["c"] is not contexts["a"]
    assert contexts["c"].minimum_version is ssl.TLSVersion.TLSv1_3
    assert contexts["c"].verify_mode is ssl.CERT_NONE
    assert contexts["a"].verify_mode is ssl.CERT_REQUIRED and contexts["a"].check_hostname
    assert "pop3" not in contexts  # no TLS, no context


def test_runtime_rejects_missing_ca_file(tmp_path: Path) -> None:
    text = f"modules:\n  a: {{tls: implicit, tls_config: {{ca_file: '{tmp_path}/none.pem'}}}}\n"
    with pytest.raises(ConfigError, match=re.escape("ctx.yml: module a: tls_config: cannot load")):
        build_runtime(parse_config(text, "ctx.yml"))


def test_runtime_loads_client_certificate(pki: TestPKI) -> None:
    good = pki.variants["good"]
    text = (
        "modules:\n  mtls:\n    tls: implicit\n    tls_config:\n"
        f"      cert_file: '{good.cert_path}'\n      key_file: '{good.key_path}'\n"
    )
    runtime = build_runtime(parse_config(text, "mtls.yml"))
    assert "mtls" in runtime.ssl_contexts
