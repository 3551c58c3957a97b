"""Hypothesis strategies for arbitrary (hostile) probe results, and the Accept headers
that Prometheus and people send; shared by tests/test_render.py and bench/check_render.py."""

from __future__ import annotations

from hypothesis import strategies as st

from pop3_exporter.result import (
    REGISTERED_CAPABILITIES,
    AddressesProbed,
    AddressOutcome,
    Capabilities,
    CertFacts,
    DaneFacts,
    DeliveryFacts,
    FailureReason,
    MailboxFacts,
    Phase,
    ProbeResult,
    TLSFacts,
)

ACCEPT_HEADERS = (
    "",
    "*/*",
    "text/plain",
    "text/plain;version=0.0.4",
    "text/plain;version=1.0.0;escaping=allow-utf-8",
    "text/plain;version=1.0.0;escaping=underscores",
    "text/plain;version=1.0.0;escaping=dots",
    "text/plain;version=1.0.0;escaping=values",
    "application/openmetrics-text",
    "application/openmetrics-text;version=1.0.0",
    "application/openmetrics-text;version=0.0.1",
    "application/openmetrics-text;version=2.0.0",
    "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8",
    "application/openmetrics-text;version=1.0.0;escaping=dots",
    "application/openmetrics-text;version=1.0.0;escaping=values",
    # Prometheus 2.x and 3.x defaults.
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;"
    "q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
    "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.6,"
    "application/openmetrics-text;version=0.0.1;q=0.5,text/plain;version=1.0.0;"
    "escaping=allow-utf-8;q=0.4,text/plain;version=0.0.4;q=0.3,*/*;q=0.2",
)

_text = st.text(
    alphabet=st.one_of(
        st.sampled_from('\\"\n\r\t {}=,#äé€\x00\x7f\u2028'),
        st.characters(codec="utf-8", exclude_categories=["Cs"]),
    ),
    max_size=300,
)
_floats = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=0, max_value=1e10),
    st.sampled_from([0.0, 1.0, 1e6, 1234567.0, 1.7999e9, 0.0001, 1e-7]),
)
_cert = st.builds(
    CertFacts,
    subject=_text,
    issuer=_text,
    serial_number=st.text("0123456789abcdef", min_size=1, max_size=40),
    fingerprint_sha256=st.text("0123456789abcdef", min_size=64, max_size=64),
    subject_alternative_names=st.lists(_text, max_size=4).map(tuple),
    not_before=_floats,
    not_after=_floats,
    key_algorithm=st.sampled_from(["rsa", "ec", "ed25519", "ed448", "dsa", "unknown"]) | _text,
    key_bits=st.none() | st.integers(0, 2**20),
    signature_algorithm=st.sampled_from(["sha256WithRSAEncryption", "ED25519"]) | _text,
)
_short_chain = st.lists(_cert, max_size=3)
tls_facts = st.builds(
    TLSFacts,
    verification_enabled=st.booleans(),
    verified=st.booleans(),
    verify_error=st.none() | _text,
    version=st.none() | st.sampled_from(["TLS 1.2", "TLS 1.3"]) | _text,
    cipher=st.none() | _text,
    # One chain in eight is longer than the cap of per-certificate series
    # (metrics.MAX_CHAIN_CERTS); more would make every example slow to build.
    presented_chain=st.integers(0, 7)
    .flatmap(lambda n: st.lists(_cert, min_size=11, max_size=11) if n == 0 else _short_chain)
    .map(tuple),
    verified_chain=st.lists(_cert, max_size=3).map(tuple),
)
probe_results = st.builds(
    ProbeResult,
    target=_text,
    module_name=_text,
    timeout_seconds=_floats,
    duration_seconds=_floats,
    success=st.booleans(),
    failure_reason=st.none() | st.sampled_from(FailureReason),
    failure_detail=st.none() | _text,
    failed_phase=st.none() | st.sampled_from(Phase),
    phase_durations=st.lists(st.tuples(st.sampled_from(Phase), _floats), max_size=8).map(tuple),
    dns_lookup_seconds=st.none() | _floats,
    ip_protocol=st.sampled_from([None, 4, 6]),
    address=st.none() | _text,
    greeting=st.none() | _text,
    greeting_seconds=st.none() | _floats,
    greeting_match=st.booleans(),
    capabilities=st.none()
    | st.builds(
        Capabilities,
        names=st.lists(st.sampled_from(REGISTERED_CAPABILITIES), unique=True).map(tuple),
        unregistered=st.integers(0, 300),
        sasl_mechanisms=st.lists(_text, max_size=4).map(tuple),
        login_delay_seconds=st.none() | st.integers(0, 10**9),
    ),
    plaintext_auth_exposed=st.none() | st.booleans(),
    login_success=st.none() | st.booleans(),
    mailbox=st.none()
    | st.builds(
        MailboxFacts,
        messages=st.integers(0, 10**15),
        size_bytes=st.integers(0, 10**15),
        oldest_message_timestamp=st.none() | _floats,
    ),
    delivery=st.none()
    | st.builds(
        DeliveryFacts,
        success=st.booleans(),
        seconds=st.none() | _floats,
        late_messages=st.integers(0, 10**6),
        cleanup_failures=st.integers(0, 10**6),
    ),
    tls=st.none() | tls_facts,
    legacy_tls_versions=st.lists(
        st.tuples(st.sampled_from(["TLS 1.0", "TLS 1.1"]) | _text, st.booleans()), max_size=2
    ).map(tuple),
    dane=st.none()
    | st.builds(
        DaneFacts,
        name=_text,
        records=st.integers(0, 1000),
        secure=st.booleans(),
        match=st.none() | st.booleans(),
        matched=st.none() | _text,
        problem=st.none() | _text,
    ),
    addresses=st.none()
    | st.builds(
        AddressesProbed,
        # Addresses are unique per result (the prober dedups them); the text is hostile
        # anyway, as the renderer must not trust it.
        outcomes=st.lists(
            st.builds(
                AddressOutcome,
                address=_text,
                ip_protocol=st.sampled_from([4, 6]),
                success=st.booleans(),
                failure_reason=st.none() | st.sampled_from(FailureReason),
                duration_seconds=_floats,
            ),
            max_size=4,
            unique_by=lambda outcome: outcome.address,
        ).map(tuple),
        resolved=st.integers(0, 64),
    ),
)
