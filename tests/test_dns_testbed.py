"""The DNS test infrastructure itself (tests/support/dns.py): NSD serves the zones, the
signed one really is signed, Unbound validates it with the test's trust anchor and not
the others, and never sends a query off loopback."""

from __future__ import annotations

import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype

from tests.support.dns import BOGUS_ZONE, SIGNED_ZONE, UNSIGNED_ZONE, Testbed, query


def _addresses(response: dns.message.Message) -> list[str]:
    return [
        rdata.to_text()
        for rrset in response.answer
        if rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA)
        for rdata in rrset
    ]


def test_nsd_serves_the_signed_zone_with_signatures(dns_testbed: Testbed) -> None:
    dns_testbed.add_records(SIGNED_ZONE, ["infra-nsd IN A 127.0.0.7"])
    request = dns.message.make_query(f"infra-nsd.{SIGNED_ZONE}", "A", want_dnssec=True)
    response = dns.query.udp(request, "127.0.0.1", port=dns_testbed.nsd_port, timeout=2)
    assert response.flags & dns.flags.AA
    types = {rrset.rdtype for rrset in response.answer}
    assert types == {dns.rdatatype.A, dns.rdatatype.RRSIG}
    assert _addresses(response) == ["127.0.0.7"]


def test_unbound_validates_signed_and_not_unsigned(dns_testbed: Testbed) -> None:
    dns_testbed.add_records(SIGNED_ZONE, ["infra-ad IN A 127.0.0.8"])
    dns_testbed.add_records(UNSIGNED_ZONE, ["infra-ad IN A 127.0.0.8"])
    signed = query(dns_testbed.unbound_address, f"infra-ad.{SIGNED_ZONE}")
    unsigned = query(dns_testbed.unbound_address, f"infra-ad.{UNSIGNED_ZONE}")
    assert signed.rcode() == unsigned.rcode() == dns.rcode.NOERROR
    assert _addresses(signed) == _addresses(unsigned) == ["127.0.0.8"]
    assert signed.flags & dns.flags.AD, "signed zone answer not authenticated"
    assert not unsigned.flags & dns.flags.AD, "unsigned zone answer claims authentication"
    # Authenticated denial of existence, too.
    missing = query(dns_testbed.unbound_address, f"infra-missing.{SIGNED_ZONE}")
    assert missing.rcode() == dns.rcode.NXDOMAIN and missing.flags & dns.flags.AD


def test_unbound_rejects_a_zone_signed_with_another_key(dns_testbed: Testbed) -> None:
    dns_testbed.add_records(BOGUS_ZONE, ["infra-bogus IN A 127.0.0.9"])
    direct = query(dns_testbed.nsd_address, f"infra-bogus.{BOGUS_ZONE}", ad=False)
    assert _addresses(direct) == ["127.0.0.9"]
    through_unbound = query(dns_testbed.unbound_address, f"infra-bogus.{BOGUS_ZONE}")
    assert through_unbound.rcode() == dns.rcode.SERVFAIL
    assert "validation failure" in dns_testbed.unbound_log()


def test_added_names_are_seen_despite_cached_denial(dns_testbed: Testbed) -> None:
    name = f"infra-late.{SIGNED_ZONE}"
    assert query(dns_testbed.unbound_address, name).rcode() == dns.rcode.NXDOMAIN
    dns_testbed.add_records(SIGNED_ZONE, ["infra-late IN AAAA ::1"])
    response = query(dns_testbed.unbound_address, name, "AAAA")
    assert response.rcode() == dns.rcode.NOERROR and _addresses(response) == ["::1"]
    assert response.flags & dns.flags.AD


def test_unbound_refuses_outside_names_and_queries_only_loopback(dns_testbed: Testbed) -> None:
    for name in ("example.com.", "mail.example.net.", "org."):
        response = query(dns_testbed.unbound_address, name)
        assert response.rcode() == dns.rcode.REFUSED, name
    # Make sure Unbound has talked to something upstream at all before judging.
    dns_testbed.add_records(UNSIGNED_ZONE, ["infra-up IN A 127.0.0.10"])
    assert _addresses(query(dns_testbed.unbound_address, f"infra-up.{UNSIGNED_ZONE}"))
    targets = dns_testbed.outgoing_targets()
    assert targets, "no upstream query logged: the loopback check would prove nothing"
    nsd = f"127.0.0.1#{dns_testbed.nsd_port}"
    assert set(targets) == {nsd}, f"Unbound queried {set(targets) - {nsd}}"
    log = dns_testbed.unbound_log()
    assert "priming . IN NS" not in log
    assert "root hints" not in log.lower()
