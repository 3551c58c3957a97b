"""Reading exposition text in tests, and checking it with the real promtool."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse_samples(text: str) -> Samples:
    """Every sample as {(name, sorted labels): value}."""
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            samples[key] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def names(samples: Samples) -> set[str]:
    return {name for name, _ in samples}


def labelled(samples: Samples, name: str, label: str) -> dict[str, float]:
    """{label value: sample value} for one labelled metric."""
    return {dict(labels)[label]: v for (n, labels), v in samples.items() if n == name}


def promtool_binary() -> str:
    binary = shutil.which("promtool")
    if binary is None:
        message = "promtool not found (Debian package prometheus)"
        if os.environ.get("CI") == "true":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return binary


# promtool's naming lints that a metric name fixed by an issue breaks on purpose:
# key sizes are counted in bits (a P-521 key is no whole number of bytes).
ACCEPTED_LINTS = frozenset({'probe_tls_cert_key_bits use base unit "bytes" instead of "bits"'})


def promtool_check_metrics(text: str) -> None:
    """Fail the test unless `promtool check metrics` accepts the exposition (apart
    from ACCEPTED_LINTS)."""
    completed = subprocess.run(
        [promtool_binary(), "check", "metrics"],
        input=text.encode(),
        capture_output=True,
        timeout=30,
        check=False,
    )
    output = (completed.stdout + completed.stderr).decode(errors="replace")
    problems = set(output.strip().splitlines()) - ACCEPTED_LINTS
    assert completed.returncode == 0 or not problems, (
        f"promtool check metrics rejected:\n{output}\n{text}"
    )
