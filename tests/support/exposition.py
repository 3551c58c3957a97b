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


def promtool_check_metrics(text: str) -> None:
    """Fail the test unless `promtool check metrics` accepts the exposition."""
    completed = subprocess.run(
        [promtool_binary(), "check", "metrics"],
        input=text.encode(),
        capture_output=True,
        timeout=30,
        check=False,
    )
    output = (completed.stdout + completed.stderr).decode(errors="replace")
    assert completed.returncode == 0, f"promtool check metrics rejected:\n{output}\n{text}"
