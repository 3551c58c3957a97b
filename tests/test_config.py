"""Configuration parsing: every option of the reference, defaults, strict errors that
all come out in one run, exact durations, and writing a module back as YAML."""

from __future__ import annotations

import dataclasses
import re
import ssl
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from pop3_exporter.config import (
    AUTH_SECTION,
    DELIVERY_SECTION,
    MAILBOX_SECTION,
    MODULE_SECTION,
    SMTP_AUTH_SECTION,
    SMTP_SECTION,
    TLS_CONFIG_SECTION,
    TOP_LEVEL_KEYS,
    AuthConfig,
    Config,
    ConfigProblem,
    DeliveryConfig,
    InvalidConfigError,
    IPProtocol,
    MailboxConfig,
    Module,
    SmtpAuthConfig,
    SmtpConfig,
    TLSConfig,
    TLSMode,
    builtin_modules,
    default_config,
    format_duration,
    load_config,
    module_to_mapping,
    parse_config,
    parse_config_partial,
    parse_duration,
)
from pop3_exporter.errors import ConfigError
from pop3_exporter.runtime import build_runtime, load_runtime
from tests.support.certs import TestPKI, make_client_certificate

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
    [
        ("10s", 10.0),
        ("30s", 30.0),
        ("1m30s", 90.0),
        ("500ms", 0.5),
        ("100ms", 0.1),
        ("1h", 3600.0),
        ("1.5s", 1.5),
        ("1.1s", 1.1),
        ("2m0s100ms", 120.1),
        ("1d", 86400.0),
    ],
)
def test_durations_are_exact(text: str, duration: float) -> None:
    # Exactly equal, not approximately: a configured 10s must stay 10.0 all the way to
    # probe_timeout_seconds.
    assert parse_duration(text) == duration


def test_no_drift_from_adding_milliseconds() -> None:
    # 0.001 added 100 times is 0.10000000000000007; the sum must be exact instead.
    assert parse_duration("100ms") == 0.1
    assert parse_duration("1s1ms") == 1.001
    assert parse_config("modules:\n  a:\n    timeout: 10s\n").modules["a"].timeout == 10.0


@pytest.mark.parametrize("text", ["", "30", "s", "1x", "10s5", "-1s", "1s 2s"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (10.0, "10s"),
        (90.0, "1m30s"),
        (0.5, "500ms"),
        (0.1, "100ms"),
        (3600.0, "1h"),
        (86400.0 + 1.5, "1d1s500ms"),
        (0.0005, "0.0005s"),
        (1e-07, "0.0000001s"),
    ],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
    assert parse_duration(text) == seconds


@given(st.floats(min_value=0, max_value=1e9, allow_nan=False, allow_infinity=False))
def test_format_duration_reads_back_exactly(seconds: float) -> None:
    assert parse_duration(format_duration(seconds)) == seconds


# Each invalid file gives exactly this one line: FILE:LINE: KEY.PATH: message.
INVALID = [
    (
        "modules:\n  a:\n    tsl: none\n",
        f"bad.yml:3: modules.a.tsl: unknown key (known: {', '.join(sorted(MODULE_SECTION.keys))})",
    ),
    ("module:\n  a: {}\n", "bad.yml:1: module: unknown key (known: modules, policy)"),
    (
        "modules:\n  a:\n    tls: maybe\n",
        "bad.yml:3: modules.a.tls: must be one of none, starttls, implicit, got 'maybe'",
    ),
    (
        "modules:\n  a:\n    port: 70000\n",
        "bad.yml:3: modules.a.port: must be a port 1-65535, got 70000",
    ),
    (
        "modules:\n  a:\n    port: true\n",
        "bad.yml:3: modules.a.port: must be a port 1-65535, got True",
    ),
    (
        "modules:\n  a:\n    timeout: 10\n",
        "bad.yml:3: modules.a.timeout: not a duration: '10' (use e.g. 10s, 1m30s, 500ms)",
    ),
    ("modules:\n  a:\n    timeout: 0s\n", "bad.yml:3: modules.a.timeout: must be above zero"),
    (
        "modules:\n  a:\n    expect_greeting: '+OK('\n",
        "bad.yml:3: modules.a.expect_greeting: bad regex: nothing to repeat at position 0",
    ),
    (
        "modules:\n  a:\n    query_capabilities: yes please\n",
        "bad.yml:3: modules.a.query_capabilities: must be true or false, got 'yes please'",
    ),
    (
        "modules:\n  a:\n    preferred_ip_protocol: ip5\n",
        "bad.yml:3: modules.a.preferred_ip_protocol: must be one of ip4, ip6, got 'ip5'",
    ),
    (
        "modules:\n  a:\n    ip_protocol_fallback: 1\n",
        "bad.yml:3: modules.a.ip_protocol_fallback: must be true or false, got 1",
    ),
    (
        "modules:\n  a:\n    source_ip_address: localhost\n",
        "bad.yml:3: modules.a.source_ip_address: must be an IP address, got 'localhost'",
    ),
    (
        "modules:\n  a:\n    tls_config:\n      ca: x\n",
        "bad.yml:4: modules.a.tls_config.ca: unknown key (known: ca_file, cert_file,"
        " check_legacy_versions, insecure_skip_verify, key_file, max_version, min_version,"
        " server_name)",
    ),
    (
        "modules:\n  a:\n    tls_config:\n      min_version: TLS14\n",
        "bad.yml:4: modules.a.tls_config.min_version: must be one of TLS10, TLS11, TLS12,"
        " TLS13, got 'TLS14'",
    ),
    (
        "modules:\n  a:\n    tls_config:\n      min_version: TLS13\n      max_version: TLS12\n",
        "bad.yml:5: modules.a.tls_config.max_version: TLS12 is below min_version TLS13",
    ),
    (
        "modules:\n  a:\n    tls_config:\n      cert_file: /x.pem\n",
        "bad.yml:4: modules.a.tls_config.cert_file: needs key_file too",
    ),
    (
        "modules:\n  a:\n    tls_config:\n      key_file: /x.key\n",
        "bad.yml:4: modules.a.tls_config.key_file: needs cert_file too",
    ),
    (
        "modules:\n  a:\n    tls_config:\n      insecure_skip_verify: sometimes\n",
        "bad.yml:4: modules.a.tls_config.insecure_skip_verify: must be true or false,"
        " got 'sometimes'",
    ),
    (
        "modules:\n  a:\n    tls_config:\n      server_name: ''\n",
        "bad.yml:4: modules.a.tls_config.server_name: must not be empty",
    ),
    (
        "modules:\n  a:\n    tls_config: [x]\n",
        "bad.yml:3: modules.a.tls_config: must be a mapping",
    ),
    ("modules:\n  a: {}\n  a: {}\n", "bad.yml:3: modules.a: duplicate key"),
    (
        "modules:\n  'bad name': {}\n",
        "bad.yml:2: modules.bad name: module name must match ^[A-Za-z0-9_.-]{1,64}$",
    ),
    ("modules: [a, b]\n", "bad.yml:1: modules: must be a mapping"),
    ("modules:\n  a: 3\n", "bad.yml:2: modules.a: must be a mapping"),
    ("modules:\n  a:\n    [x]: 1\n", "bad.yml:3: modules.a: keys must be strings"),
    ("modules:\n  a:\n    port: [1]\n", "bad.yml:3: modules.a.port: must be a single value"),
    ("[1, 2]\n", "bad.yml:1: the top level must be a mapping"),
    (
        "modules:\n  a: {\n",
        "bad.yml:3: invalid YAML: expected the node content, but found '<stream end>'"
        " (while parsing a flow node), column 1",
    ),
    (
        "policy:\n  default: maybe\n",
        "bad.yml:2: policy.default: must be allow or deny, got 'maybe'",
    ),
]


@pytest.mark.parametrize(("text", "message"), INVALID)
def test_invalid_config_names_file_line_and_key(text: str, message: str) -> None:
    with pytest.raises(InvalidConfigError) as caught:
        parse_config(text, "bad.yml")
    assert str(caught.value) == message
    assert [str(problem) for problem in caught.value.problems] == [message]


def test_every_problem_is_reported_in_one_run() -> None:
    text = (
        "modules:\n"  # 1
        "  a:\n"  # 2
        "    tls: maybe\n"  # 3
        "    port: 0\n"  # 4
        "    retries: 3\n"  # 5
        "    tls_config:\n"  # 6
        "      min_version: TLS9\n"  # 7
        "  good:\n"  # 8
        "    timeout: 5s\n"  # 9
        "  b:\n"  # 10
        "    timeout: soon\n"  # 11
        "  'c d': {}\n"  # 12
        "policy:\n"  # 13
        "  default: maybe\n"  # 14
        "extra: 1\n"  # 15
    )
    with pytest.raises(InvalidConfigError) as caught:
        parse_config(text, "many.yml")
    problems = caught.value.problems
    assert [(p.line, p.key) for p in problems] == [
        (3, "modules.a.tls"),
        (4, "modules.a.port"),
        (5, "modules.a.retries"),
        (7, "modules.a.tls_config.min_version"),
        (11, "modules.b.timeout"),
        (12, "modules.c d"),
        (14, "policy.default"),
        (15, "extra"),
    ]
    assert all(p.file == "many.yml" for p in problems)
    assert str(caught.value).count("\n") == len(problems) - 1


def test_problem_format() -> None:
    assert str(ConfigProblem("p.yml", 7, "modules.a.port", "bad")) == "p.yml:7: modules.a.port: bad"
    assert str(ConfigProblem("p.yml", None, "", "cannot read")) == "p.yml: cannot read"
    assert str(ConfigProblem("p.yml", 1, "", "a\nb")) == "p.yml:1: a b"


def test_load_config_reads_a_file(tmp_path: Path) -> None:
    path = tmp_path / "pop3.yml"
    path.write_text("modules:\n  slow:\n    timeout: 1m\n")
    assert load_config(path).modules["slow"].timeout == 60.0
    assert load_config(path).source == str(path)


def test_load_config_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.yml"
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value) == (
        f"{path}: cannot read: [Errno 2] No such file or directory: '{path}'"
    )


# --- the tables -------------------------------------------------------------------------


def _field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def test_every_field_has_a_key_and_every_key_a_field() -> None:
    """A field without a table entry would be silently unsettable; an entry without a
    field would crash. Both sides, for every section."""
    assert set(MODULE_SECTION.keys) == _field_names(Module) - MODULE_SECTION.given
    assert MODULE_SECTION.given == {"name"}
    assert set(TLS_CONFIG_SECTION.keys) == _field_names(TLSConfig)
    assert set(AUTH_SECTION.keys) == _field_names(AuthConfig) - AUTH_SECTION.given
    assert AUTH_SECTION.given == {"password"}  # read from the file or variable named
    assert set(MAILBOX_SECTION.keys) == _field_names(MailboxConfig)
    assert DELIVERY_SECTION.fields() == _field_names(DeliveryConfig)
    assert "from" in DELIVERY_SECTION.keys  # the YAML key for the field from_address
    assert SMTP_SECTION.fields() == _field_names(SmtpConfig)
    assert SMTP_AUTH_SECTION.fields() == _field_names(SmtpAuthConfig) - SMTP_AUTH_SECTION.given
    assert set(TOP_LEVEL_KEYS) == _field_names(Config) - {"source", "lines", "warnings"}


def test_a_field_without_a_key_is_caught() -> None:
    """The check above fails for a dataclass that grew a field the table lacks."""

    @dataclasses.dataclass(frozen=True)
    class Grown(TLSConfig):
        check_unlisted: bool = False

    assert set(TLS_CONFIG_SECTION.keys) != _field_names(Grown)


def test_config_file_modules_are_the_ones_written() -> None:
    # The same module written every way the table allows gives equal objects.
    assert (
        parse_config("modules:\n  p:\n    tls: implicit\n").modules["p"]
        == parse_config("modules:\n  p: {tls: implicit, port: 995}\n").modules["p"]
    )


EVERY_KEY = r"""
modules:
  everything:
    tls: starttls
    port: 1110
    timeout: 1m30s
    expect_greeting: '^\+OK (Dovecot|Courier) \[ready\]\s*$'
    query_capabilities: false
    preferred_ip_protocol: ip4
    ip_protocol_fallback: false
    source_ip_address: '::1'
    tls_config:
      ca_file: /etc/ssl/internal ca.pem
      cert_file: /etc/ssl/client.pem
      key_file: /etc/ssl/client.key
      server_name: pop.example.com
      insecure_skip_verify: true
      min_version: TLS11
      max_version: TLS13
    auth:
      mechanism: plain
      username: monitor@example.com
      password_env: POP3_EXPORTER_TEST_PASSWORD
      allow_plaintext: false
      allow_unadvertised: true
    mailbox:
      stat: true
      oldest_message: true
    ip_protocol: all
    dane: require
"""


def _round_trip(module: Module) -> Module:
    text = yaml.safe_dump({"modules": {module.name: module_to_mapping(module)}})
    return parse_config(text, "dumped.yml").modules[module.name]


@pytest.mark.parametrize("name", sorted(builtin_modules()))
def test_builtin_modules_round_trip(name: str) -> None:
    module = builtin_modules()[name]
    assert _round_trip(module) == module


def test_module_with_every_key_round_trips(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POP3_EXPORTER_TEST_PASSWORD", "not in any output")
    module = parse_config(EVERY_KEY, "every.yml").modules["everything"]
    mapping = module_to_mapping(module)
    # Every key of the table is written when set, and the nested sections too (delivery,
    # which excludes mailbox, in the test below).
    assert set(mapping) == set(MODULE_SECTION.keys) - {"delivery"}
    assert isinstance(mapping["tls_config"], dict)
    assert set(mapping["tls_config"]) == set(TLS_CONFIG_SECTION.keys)
    assert isinstance(mapping["auth"], dict)
    assert set(mapping["auth"]) == set(AUTH_SECTION.keys) - {"password_file", "token_file"}
    assert "not in any output" not in repr(mapping)
    assert mapping["timeout"] == "1m30s"
    assert mapping["expect_greeting"] == r"^\+OK (Dovecot|Courier) \[ready\]\s*$"
    assert _round_trip(module) == module
    # The pattern is the one written, backslashes and all (not a repr of it).
    assert _round_trip(module).expect_greeting.search("+OK Dovecot [ready]  ")


@given(
    timeout=st.floats(min_value=0.001, max_value=1e6, allow_nan=False, allow_infinity=False),
    port=st.integers(min_value=1, max_value=65535),
    pattern=st.sampled_from([r"^\+OK", r"\\", r"'\"", "é", r"^\+OK\s+\x1b", "a: b # c"]),
)
def test_round_trip_holds_for_other_values(timeout: float, port: int, pattern: str) -> None:
    module = Module(name="m", timeout=timeout, port=port, expect_greeting=re.compile(pattern))
    assert _round_trip(module) == module


# --- certificates: checked at load, reported at their key ---------------------------------


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


def test_missing_ca_file_names_file_line_and_key(tmp_path: Path) -> None:
    missing = tmp_path / "x.pem"
    path = tmp_path / "pop3.yml"
    path.write_text(
        "modules:\n"
        "  pop3s_internal:\n"
        "    tls: implicit\n"
        "    tls_config:\n"
        f"      ca_file: {missing}\n"
    )
    with pytest.raises(InvalidConfigError) as caught:
        load_runtime(str(path))
    assert str(caught.value) == (
        f"{path}:5: modules.pop3s_internal.tls_config.ca_file: cannot load certificates:"
        f" [Errno 2] No such file or directory: '{missing}'"
    )


def test_each_bad_certificate_file_is_named(tmp_path: Path, pki: TestPKI) -> None:
    client = make_client_certificate(tmp_path / "client")
    other = make_client_certificate(tmp_path / "other")
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello\n")
    path = tmp_path / "pop3.yml"
    path.write_text(
        "modules:\n"  # 1
        "  ca_not_pem:\n"  # 2
        f"    {{tls: implicit, tls_config: {{ca_file: '{not_pem}'}}}}\n"  # 3
        "  cert_is_a_key:\n"  # 4
        "    tls: implicit\n"  # 5
        "    tls_config:\n"  # 6
        f"      cert_file: {client.key_path}\n"  # 7
        f"      key_file: {client.key_path}\n"  # 8
        "  key_of_another_cert:\n"  # 9
        "    tls: starttls\n"  # 10
        "    tls_config:\n"  # 11
        f"      cert_file: {client.cert_path}\n"  # 12
        f"      key_file: {other.key_path}\n"  # 13
        "  same_bad_ca:\n"  # 14
        f"    {{tls: starttls, tls_config: {{ca_file: '{not_pem}'}}}}\n"  # 15
        "  fine:\n"  # 16
        f"    {{tls: implicit, tls_config: {{ca_file: '{pki.ca_file}'}}}}\n"  # 17
    )
    with pytest.raises(InvalidConfigError) as caught:
        load_runtime(str(path))
    problems = caught.value.problems
    assert [(p.line, p.key) for p in problems] == [
        (3, "modules.ca_not_pem.tls_config.ca_file"),
        (7, "modules.cert_is_a_key.tls_config.cert_file"),
        (13, "modules.key_of_another_cert.tls_config.key_file"),
        (15, "modules.same_bad_ca.tls_config.ca_file"),
    ]
    assert problems[0].message.startswith("cannot load certificates: [X509")
    assert f"'{not_pem}'" in problems[0].message
    assert "does not match cert_file" in problems[2].message


def test_parse_and_certificate_problems_come_out_together(tmp_path: Path) -> None:
    path = tmp_path / "pop3.yml"
    path.write_text(
        "modules:\n"
        "  broken:\n"
        "    port: -1\n"
        "  good_syntax:\n"
        "    tls: implicit\n"
        f"    tls_config: {{ca_file: {tmp_path}/none.pem}}\n"
    )
    with pytest.raises(InvalidConfigError) as caught:
        load_runtime(str(path))
    assert [(p.line, p.key) for p in caught.value.problems] == [
        (3, "modules.broken.port"),
        (6, "modules.good_syntax.tls_config.ca_file"),
    ]


def test_runtime_loads_client_certificate(pki: TestPKI) -> None:
    good = pki.variants["good"]
    text = (
        "modules:\n  mtls:\n    tls: implicit\n    tls_config:\n"
        f"      cert_file: '{good.cert_path}'\n      key_file: '{good.key_path}'\n"
    )
    runtime = build_runtime(parse_config(text, "mtls.yml"))
    assert "mtls" in runtime.ssl_contexts


DELIVERY_EVERY_KEY = r"""
modules:
  loop:
    tls: implicit
    timeout: 1m
    auth: {username: loop@example.com, password_env: POP3_EXPORTER_TEST_PASSWORD}
    delivery:
      smtp:
        address: smtp.example.com:587
        tls: starttls
        tls_config: {server_name: smtp.example.com, min_version: TLS12}
        auth:
          username: loop@example.com
          password_env: POP3_EXPORTER_TEST_PASSWORD
          allow_plaintext: false
        helo_name: probe.example.com
      from: loop@example.com
      to: loop@example.com
      poll_interval: 1500ms
      secret_file: /var/lib/pop3_exporter/delivery.key
"""


def test_delivery_module_with_every_key_round_trips(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POP3_EXPORTER_TEST_PASSWORD", "never shown")
    module = parse_config(DELIVERY_EVERY_KEY, "loop.yml").modules["loop"]
    assert module.delivery is not None
    assert module.delivery.from_address == "loop@example.com"
    assert module.delivery.smtp.endpoint() == ("smtp.example.com", 587, False)
    mapping = module_to_mapping(module)
    delivery = mapping["delivery"]
    assert isinstance(delivery, dict)
    assert set(delivery) == set(DELIVERY_SECTION.keys)
    assert set(delivery["smtp"]) == set(SMTP_SECTION.keys)
    assert "never shown" not in repr(mapping)
    assert _round_trip(module) == module


@pytest.mark.parametrize(
    ("delivery", "expected"),
    [
        (
            "{smtp: {address: smtp.example.com}, from: a@example.com, to: a@example.com}",
            "modules.loop.delivery.smtp.address: must be HOST:PORT, got 'smtp.example.com'",
        ),
        (
            "{smtp: {address: 'smtp.example.com:25'}, from: nobody, to: a@example.com}",
            "modules.loop.delivery.from: must be an address like user@example.com",
        ),
        (
            "{smtp: {address: 'smtp.example.com:25'}, to: a@example.com}",
            "modules.loop.delivery.from: needs from",
        ),
        (
            "{smtp: {address: 'smtp.example.com:25', tls: none, auth: {username: u,"
            " password_env: POP3_EXPORTER_TEST_PASSWORD}}, from: a@example.com, to: a@example.com}",
            "modules.loop.delivery.smtp.auth: would send credentials without TLS",
        ),
    ],
)
def test_delivery_problems_name_their_key(
    delivery: str, expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("POP3_EXPORTER_TEST_PASSWORD", "never shown")
    text = (
        "modules:\n  loop:\n    tls: implicit\n"
        "    auth: {username: u, password_env: POP3_EXPORTER_TEST_PASSWORD}\n"
        f"    delivery: {delivery}\n"
    )
    _, problems = parse_config_partial(text, "loop.yml")
    assert len(problems) == 1 and expected in str(problems[0]), problems


def test_a_delivery_smtp_server_the_policy_refuses_is_a_problem(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("POP3_EXPORTER_TEST_PASSWORD", "never shown")
    text = (
        "policy: {deny: [{host: 'smtp.internal.example'}]}\n"
        "modules:\n  loop:\n    tls: implicit\n"
        "    auth: {username: u, password_env: POP3_EXPORTER_TEST_PASSWORD}\n"
        "    delivery:\n"
        "      smtp: {address: 'smtp.internal.example:587'}\n"
        "      from: a@example.com\n      to: a@example.com\n"
    )
    _, problems = parse_config_partial(text, "loop.yml")
    (problem,) = problems
    assert str(problem).startswith("loop.yml:7: modules.loop.delivery.smtp.address: refused by")


def test_a_smtp_ca_file_that_does_not_load_is_named_at_its_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("POP3_EXPORTER_TEST_PASSWORD", "never shown")
    missing = tmp_path / "no-such-ca.pem"
    path = tmp_path / "loop.yml"
    path.write_text(
        "modules:\n  loop:\n    tls: implicit\n"
        "    auth: {username: u, password_env: POP3_EXPORTER_TEST_PASSWORD}\n"
        "    delivery:\n"
        "      smtp:\n"
        "        address: 'smtp.example.com:587'\n"
        f"        tls_config: {{ca_file: '{missing}'}}\n"
        "      from: a@example.com\n      to: a@example.com\n"
        f"      secret_file: {tmp_path / 'delivery.key'}\n"
    )
    with pytest.raises(InvalidConfigError) as raised:
        load_runtime(str(path), tmp_path, create_keys=False)
    (problem,) = raised.value.problems
    assert str(problem).startswith(
        f"{path}:8: modules.loop.delivery.smtp.tls_config.ca_file: cannot load certificates:"
    )
    assert str(missing) in str(problem)
