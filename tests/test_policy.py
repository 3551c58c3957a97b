"""The target allow/deny policy: config parsing, decisions, and /probe answering 403."""

from __future__ import annotations

import re
import textwrap
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from pop3_exporter.config import parse_config
from pop3_exporter.errors import ConfigError
from pop3_exporter.http import Prober, create_app
from pop3_exporter.metrics import ExporterMetrics
from pop3_exporter.policy import Policy, RefusalReason, TargetRefusedError
from pop3_exporter.prober import Pop3Prober
from pop3_exporter.resolver import StaticResolver
from pop3_exporter.runtime import ConfigHolder
from tests.support.exposition import parse_samples, value
from tests.support.fakepop3 import FakePop3Server, dialogue
from tests.support.fakeprober import FakeProber

SECURITY_DOC = Path(__file__).resolve().parent.parent / "docs" / "security.md"

Client = TestClient[web.Request, web.Application]
ClientFactory = Callable[..., Awaitable[Client]]


def policy_of(yaml_text: str) -> Policy:
    return parse_config(textwrap.dedent(yaml_text), "policy.yml").policy


# Addresses outside loopback in this file are only data for policy decisions: nothing
# here connects anywhere (policy checks are pure, and the prober is a fake).

# --- Configuration -------------------------------------------------------------------


def test_no_policy_allows_everything() -> None:
    policy = parse_config("modules: {}\n").policy
    assert policy == Policy()
    policy.check_target("10.0.0.1", 110, is_ip_literal=True)
    policy.check_address("anything.example", "127.0.0.1", 995)
    assert not policy.uses_addresses


def test_deny_by_default_is_one_line() -> None:
    policy = policy_of("policy: {default: deny}\n")
    with pytest.raises(TargetRefusedError, match="matches no allow rule") as caught:
        policy.check_target("pop.example.com", 995, is_ip_literal=False)
    assert caught.value.reason is RefusalReason.DEFAULT_DENY


def test_full_policy_parses() -> None:
    policy = policy_of(
        """
        policy:
          default: deny
          allow:
            - host: "*.example.com"
              ports: [110, 995]
            - cidr: [192.0.2.0/24, "2001:db8::/32"]
              ports: ["100-200", 995]
            - host_regex: 'pop[0-9]+\\.example\\.net'
          deny:
            - cidr: 192.0.2.128/25
            - host: secret.example.com
        """
    )
    assert not policy.default_allow
    assert len(policy.allow) == 3 and len(policy.deny) == 2
    assert policy.uses_addresses
    assert policy.allow[0].where == "policy.allow[0]"


@pytest.mark.parametrize(
    ("body", "line", "message"),
    [
        ("policy:\n  defaults: deny\n", 2, "policy.defaults: unknown key (known: allow,"),
        ("policy:\n  default: maybe\n", 2, "policy.default: must be allow or deny"),
        (
            "policy:\n  allow:\n    - cidr: 10.0.0.0/8\n",
            2,
            "policy.allow: has no effect unless policy.default is deny",
        ),
        ("policy:\n  deny: 10.0.0.0/8\n", 2, "policy.deny: must be a list of rules"),
        ("policy:\n  deny:\n    - {}\n", 3, "policy.deny[0]: needs at least one of cidr"),
        ("policy:\n  deny:\n    - cidr: 10.0.0.1/8\n", 3, "has host bits set"),
        ("policy:\n  deny:\n    - cidr: 10.0.0.0/33\n", 3, "policy.deny[0].cidr: "),
        ("policy:\n  deny:\n    - cidr: 8\n", 3, "must be a CIDR range"),
        ("policy:\n  deny:\n    - cidr: []\n", 3, "must not be an empty list"),
        (
            "policy:\n  deny:\n    - cidr: '::ffff:0:0/96'\n",
            3,
            "write IPv4-mapped ranges in IPv4 form",
        ),
        ("policy:\n  deny:\n    - host: 127.0.0.1\n", 3, "is an address; use cidr"),
        ("policy:\n  deny:\n    - host: 'a[b]c'\n", 3, "use host_regex for more"),
        ("policy:\n  deny:\n    - host_regex: '('\n", 3, "bad regex"),
        ("policy:\n  deny:\n    - ports: [0]\n", 3, "must be ports 1-65535 or ranges"),
        ("policy:\n  deny:\n    - ports: [70000]\n", 3, "must be ports 1-65535"),
        ("policy:\n  deny:\n    - ports: ['200-100']\n", 3, "must be ports 1-65535"),
        ("policy:\n  deny:\n    - ports: [true]\n", 3, "must be ports 1-65535"),
        ("policy:\n  deny:\n    - ports: [1, 'x']\n", 3, "must be ports 1-65535"),
        ("policy:\n  deny:\n    - port: 110\n", 3, "policy.deny[0].port: unknown key"),
        ("policy:\n  deny:\n    - ports: {a: 1}\n", 3, "must be a single value"),
        ("policy: [deny]\n", 1, "policy: must be a mapping"),
    ],
)
def test_bad_policy_names_file_line_and_key(body: str, line: int, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(body, "policy.yml")
    text = str(caught.value)
    assert text.startswith(f"policy.yml:{line}: "), text
    assert message in text


# --- Decisions -----------------------------------------------------------------------

POLICY = """
policy:
  default: deny
  allow:
    - host: "*.example.com"
      ports: [110, 995]
    - cidr: 192.0.2.0/24
    - host: "pop.partner.test"
      cidr: 198.51.100.0/24
  deny:
    - cidr: [127.0.0.0/8, "::1/128", 169.254.0.0/16, "fe80::/10"]
    - host: "secret.example.com"
    - cidr: 192.0.2.128/25
      ports: ["1-109"]
"""


@pytest.mark.parametrize(
    ("host", "literal", "address", "port", "expected"),
    [
        # Allowed by name; the address is then checked against the deny rules.
        ("mail.example.com", False, "203.0.113.7", 995, None),
        ("MAIL.Example.COM.", False, "203.0.113.7", 110, None),
        ("a.b.example.com", False, "203.0.113.7", 110, None),
        ("mail.example.com", False, "127.0.0.1", 995, RefusalReason.DENY_RULE),
        ("mail.example.com", False, "::1", 995, RefusalReason.DENY_RULE),
        ("mail.example.com", False, "::ffff:127.0.0.1", 995, RefusalReason.DENY_RULE),
        ("mail.example.com", False, "fe80::1%eth0", 995, RefusalReason.DENY_RULE),
        ("mail.example.com", False, "169.254.169.254", 995, RefusalReason.DENY_RULE),
        ("mail.example.com", False, "203.0.113.7", 25, RefusalReason.DEFAULT_DENY),
        ("example.com", False, "203.0.113.7", 110, RefusalReason.DEFAULT_DENY),
        ("example.com.evil.test", False, "203.0.113.7", 110, RefusalReason.DEFAULT_DENY),
        ("secret.example.com", False, "203.0.113.7", 995, RefusalReason.DENY_RULE),
        # Allowed by address range, whatever the name.
        ("anything.test", False, "192.0.2.10", 2000, None),
        ("192.0.2.10", True, "192.0.2.10", 2000, None),
        ("192.0.2.200", True, "192.0.2.200", 110, None),
        ("192.0.2.200", True, "192.0.2.200", 25, RefusalReason.DENY_RULE),
        ("10.0.0.1", True, "10.0.0.1", 110, RefusalReason.DEFAULT_DENY),
        ("127.0.0.1", True, "127.0.0.1", 110, RefusalReason.DENY_RULE),
        ("::ffff:127.0.0.1", True, "::ffff:127.0.0.1", 110, RefusalReason.DENY_RULE),
        # "127.1" is a name to the target parser, but resolves to loopback.
        ("127.1", False, "127.0.0.1", 110, RefusalReason.DENY_RULE),
        # Name and range together: both must match.
        ("pop.partner.test", False, "198.51.100.9", 110, None),
        ("pop.partner.test", False, "203.0.113.9", 110, RefusalReason.DEFAULT_DENY),
        ("other.partner.test", False, "198.51.100.9", 110, RefusalReason.DEFAULT_DENY),
    ],
)
def test_decisions(
    host: str, literal: bool, address: str, port: int, expected: RefusalReason | None
) -> None:
    policy = policy_of(POLICY)

    def decide() -> None:
        policy.check_target(host, port, is_ip_literal=literal)
        policy.check_address(None if literal else host, address, port)

    if expected is None:
        decide()
    else:
        with pytest.raises(TargetRefusedError) as caught:
            decide()
        assert caught.value.reason is expected
        # The resolved address is never disclosed for a name.
        if not literal:
            assert address not in str(caught.value)


@pytest.mark.parametrize(
    ("host", "port", "refused"),
    [
        # Decided before resolution: no DNS lookup for names no rule could allow.
        ("mail.example.com", 25, False),  # an address rule (192.0.2.0/24) might allow it
        ("secret.example.com", 995, True),  # denied by name
        ("mail.example.com", 995, False),
    ],
)
def test_check_before_resolution(host: str, port: int, refused: bool) -> None:
    policy = policy_of(POLICY)
    if refused:
        with pytest.raises(TargetRefusedError):
            policy.check_target(host, port, is_ip_literal=False)
    else:
        policy.check_target(host, port, is_ip_literal=False)


def test_names_only_policy_refuses_before_resolution() -> None:
    policy = policy_of(
        """
        policy:
          default: deny
          allow:
            - host_regex: 'pop\\d+\\.example\\.org'
        """
    )
    assert not policy.uses_addresses
    policy.check_target("pop12.example.org", 110, is_ip_literal=False)
    policy.check_target("POP12.example.org", 110, is_ip_literal=False)
    for host in ("pop.example.org", "pop12.example.org.evil.test", "xpop1.example.org"):
        with pytest.raises(TargetRefusedError):
            policy.check_target(host, 110, is_ip_literal=False)
    # Name rules never match IP literals.
    with pytest.raises(TargetRefusedError):
        policy.check_target("192.0.2.1", 110, is_ip_literal=True)


# --- /probe --------------------------------------------------------------------------


async def make_client(
    aiohttp_client: ClientFactory, prober: Prober, config: Path
) -> tuple[Client, ConfigHolder]:
    holder = ConfigHolder(str(config), ExporterMetrics())
    return await aiohttp_client(create_app(holder, prober=prober)), holder


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pop3_exporter.yml"
    path.write_text(textwrap.dedent(text))
    return path


async def refused_counts(client: Client) -> dict[str, float | None]:
    samples = parse_samples(await (await client.get("/metrics")).text())
    return {
        reason.value: value(samples, "pop3_exporter_probes_refused_total", reason=reason.value)
        for reason in RefusalReason
    }


async def test_probe_refused_before_resolution_is_403_and_counted(
    aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    prober = FakeProber()
    client, _ = await make_client(aiohttp_client, prober, write_config(tmp_path, POLICY))
    assert await refused_counts(client) == {"deny_rule": 0, "default_deny": 0}

    response = await client.get("/probe", params={"target": "10.1.2.3", "module": "pop3"})
    assert response.status == 403
    assert await response.text() == (
        "target refused by policy: target 10.1.2.3 port 110 matches no allow rule"
        " (policy default: deny)\n"
    )
    response = await client.get("/probe", params={"target": "secret.example.com:995"})
    assert response.status == 400  # no module, no scheme: validation comes first
    response = await client.get("/probe", params={"target": "pop3s://secret.example.com"})
    assert response.status == 403
    assert "denied by policy.deny[1]" in await response.text()
    assert prober.calls == []
    assert await refused_counts(client) == {"deny_rule": 1, "default_deny": 1}


async def test_name_resolving_to_denied_address_is_403(
    aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    prober = FakeProber(
        addresses={"mail.example.com": "127.0.0.1", "ok.example.com": "203.0.113.5"}
    )
    client, _ = await make_client(aiohttp_client, prober, write_config(tmp_path, POLICY))
    response = await client.get("/probe", params={"target": "pop3s://mail.example.com"})
    text = await response.text()
    assert response.status == 403
    assert text == (
        "target refused by policy: target mail.example.com port 995 is denied by policy.deny[0]\n"
    )
    assert "127.0.0.1" not in text
    response = await client.get("/probe", params={"target": "pop3s://ok.example.com"})
    assert response.status == 200
    assert all(call.address_check is not None for call in prober.calls)
    assert await refused_counts(client) == {"deny_rule": 1, "default_deny": 0}
    samples = parse_samples(await (await client.get("/metrics")).text())
    # A refused probe is not a probe: only the allowed one is counted as run.
    assert value(samples, "pop3_exporter_probes_total", module="pop3s", result="success") == 1
    assert value(samples, "pop3_exporter_probes_total", module="pop3s", result="failure") is None
    assert value(samples, "pop3_exporter_probes_in_flight") == 0


async def test_real_prober_never_connects_to_a_denied_address(
    aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    """End to end with the real prober: the name resolves (statically) to the loopback
    address of a live fake server, and the policy keeps the prober from connecting."""
    async with FakePop3Server(dialogue()) as server:
        config = write_config(
            tmp_path,
            f"""
            policy:
              deny:
                - cidr: 127.0.0.0/8
                  ports: [{server.port}]
            """,
        )
        resolver = StaticResolver(
            {"evil.test": ["127.0.0.1"], "127.1": ["127.0.0.1"], "fine.test": ["127.0.0.2"]}
        )
        client, _ = await make_client(aiohttp_client, Pop3Prober(resolver=resolver), config)
        for target in (f"evil.test:{server.port}", f"127.1:{server.port}"):
            response = await client.get("/probe", params={"target": target, "module": "pop3"})
            assert response.status == 403, await response.text()
        for target in (f"127.0.0.1:{server.port}", f"[::ffff:127.0.0.1]:{server.port}"):
            response = await client.get("/probe", params={"target": target, "module": "pop3"})
            assert response.status == 403, await response.text()
        assert server.connections == 0

        # The same server on a port the rule does not cover is probed normally.
        (tmp_path / "pop3_exporter.yml").write_text(
            "policy:\n  deny:\n    - cidr: 127.0.0.0/8\n      ports: [1]\n"
        )
        assert (await client.post("/-/reload")).status == 200
        response = await client.get(
            "/probe", params={"target": f"evil.test:{server.port}", "module": "pop3"}
        )
        samples = parse_samples(await response.text())
        assert response.status == 200
        assert value(samples, "probe_success") == 1
        assert server.connections == 1
        assert await refused_counts(client) == {"deny_rule": 4, "default_deny": 0}


async def test_reload_applies_a_new_policy(aiohttp_client: ClientFactory, tmp_path: Path) -> None:
    config = write_config(tmp_path, "modules: {}\n")
    prober = FakeProber()
    client, _ = await make_client(aiohttp_client, prober, config)
    params = {"target": "pop3s://pop.example.com"}
    assert (await client.get("/probe", params=params)).status == 200
    config.write_text("policy: {default: deny}\n")
    assert (await client.post("/-/reload")).status == 200
    assert (await client.get("/probe", params=params)).status == 403
    # A broken policy is refused on reload and the previous one stays in force.
    config.write_text("policy: {default: deny, allow: [{cidr: nonsense}]}\n")
    reload = await client.post("/-/reload")
    assert reload.status == 500
    assert "pop3_exporter.yml:1: policy.allow[0].cidr: " in await reload.text()
    assert (await client.get("/probe", params=params)).status == 403
    assert len(prober.calls) == 1


def yaml_examples(path: Path) -> list[str]:
    text = path.read_text()
    return re.findall(r"```yaml\n(.*?)```", text, flags=re.DOTALL)


def test_every_policy_example_in_the_docs_is_valid() -> None:
    examples = [block for block in yaml_examples(SECURITY_DOC) if block.startswith("policy:")]
    assert len(examples) >= 4
    for block in examples:
        policy = parse_config(block, "docs/security.md").policy
        assert policy != Policy()
