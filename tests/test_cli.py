"""The command line: --config.check, serving, SIGHUP reload and SIGTERM, as a real process."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from pop3_exporter.cli import DEFAULT_LISTEN_ADDRESS, parse_listen_address
from tests.support.exposition import parse_samples, value


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pop3_exporter", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_config_check_valid(tmp_path: Path) -> None:
    path = tmp_path / "ok.yml"
    path.write_text("modules:\n  extra:\n    timeout: 5s\n")
    completed = run_cli("--config.file", str(path), "--config.check")
    assert completed.returncode == 0, completed.stderr
    assert "valid" in completed.stdout and "extra" in completed.stdout


def test_config_check_invalid_names_file_line_key(tmp_path: Path) -> None:
    path = tmp_path / "bad.yml"
    path.write_text("modules:\n  extra:\n    timeout: 5s\n    retries: 3\n")
    completed = run_cli("--config.file", str(path), "--config.check")
    assert completed.returncode == 1
    assert f"{path}:4: modules.extra: unknown key 'retries'" in completed.stderr


def test_config_check_missing_ca_file(tmp_path: Path) -> None:
    path = tmp_path / "ca.yml"
    path.write_text(
        f"modules:\n  s:\n    tls: implicit\n    tls_config:\n      ca_file: {tmp_path}/no.pem\n"
    )
    completed = run_cli("--config.file", str(path), "--config.check")
    assert completed.returncode == 1
    assert "module s: tls_config: cannot load certificates" in completed.stderr


def test_bad_config_at_start_exits_1(tmp_path: Path) -> None:
    path = tmp_path / "bad.yml"
    path.write_text("modules: 3\n")
    completed = run_cli("--config.file", str(path), "--web.listen-address", "127.0.0.1:0")
    assert completed.returncode == 1
    assert "modules must be a mapping" in completed.stderr


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (":10110", (None, 10110)),
        ("127.0.0.1:9999", ("127.0.0.1", 9999)),
        ("[::1]:10110", ("::1", 10110)),
        ("localhost:1", ("localhost", 1)),
    ],
)
def test_listen_address(text: str, expected: tuple[str | None, int]) -> None:
    assert parse_listen_address(text) == expected


@pytest.mark.parametrize("text", ["10110", "host:", "host:port", "h:70000"])
def test_bad_listen_address(text: str) -> None:
    with pytest.raises(ValueError, match="not HOST:PORT"):
        parse_listen_address(text)


def test_default_port_is_documented() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert DEFAULT_LISTEN_ADDRESS == ":10110"
    assert "10110" in readme


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        body: bytes = response.read()
        return body.decode()


class Exporter:
    def __init__(self, process: subprocess.Popen[str], port: int) -> None:
        self.process = process
        self.url = f"http://127.0.0.1:{port}"


@pytest.fixture
def exporter(tmp_path: Path) -> Iterator[Exporter]:
    config = tmp_path / "pop3_exporter.yml"
    config.write_text("modules:\n  first: {}\n")
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pop3_exporter",
            "--config.file",
            str(config),
            "--web.listen-address",
            f"127.0.0.1:{port}",
            "--log.format",
            "json",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    exporter = Exporter(process, port)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            get(exporter.url + "/-/healthy")
            break
        except OSError:
            if process.poll() is not None:
                pytest.fail(f"exporter exited: {process.stderr.read() if process.stderr else ''}")
            time.sleep(0.05)
    else:
        process.kill()
        pytest.fail("exporter did not become healthy")
    yield exporter
    if process.poll() is None:
        process.kill()
    process.wait(timeout=10)
    if process.stderr is not None:
        process.stderr.close()


def test_sighup_reloads_and_sigterm_exits_cleanly(exporter: Exporter, tmp_path: Path) -> None:
    assert ">first<" in get(exporter.url + "/")
    (tmp_path / "pop3_exporter.yml").write_text("modules:\n  second: {}\n")
    os.kill(exporter.process.pid, signal.SIGHUP)
    deadline = time.monotonic() + 10
    while ">second<" not in get(exporter.url + "/") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ">second<" in get(exporter.url + "/")
    (tmp_path / "pop3_exporter.yml").write_text("modules:\n  third: [\n")
    os.kill(exporter.process.pid, signal.SIGHUP)
    deadline = time.monotonic() + 10
    samples = parse_samples(get(exporter.url + "/metrics"))
    while value(samples, "pop3_exporter_config_last_reload_successful") != 0:
        assert time.monotonic() < deadline, "failed reload never reported"
        time.sleep(0.05)
        samples = parse_samples(get(exporter.url + "/metrics"))
    assert ">second<" in get(exporter.url + "/")
    exporter.process.send_signal(signal.SIGTERM)
    assert exporter.process.wait(timeout=20) == 0
    stderr = exporter.process.stderr.read() if exporter.process.stderr else ""
    assert '"msg": "config reload failed, keeping the old config:' in stderr
    assert '"level": "error"' in stderr


def test_console_script_and_version() -> None:
    completed = run_cli("--version")
    assert completed.returncode == 0
    assert completed.stdout.startswith("pop3_exporter ")


def test_log_level_debug_and_timeout_offset(tmp_path: Path) -> None:
    """--log.level debug logs each probe; --timeout-offset shortens the deadline."""
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pop3_exporter",
            "--web.listen-address",
            f"127.0.0.1:{port}",
            "--log.level",
            "debug",
            "--timeout-offset",
            "1.5",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while True:
            try:
                get(url + "/-/healthy")
                break
            except OSError:
                assert time.monotonic() < deadline, "exporter did not start"
                time.sleep(0.05)
        closed = free_port()  # nothing listens there: refused at once
        request = urllib.request.Request(
            f"{url}/probe?target=127.0.0.1:{closed}&module=pop3",
            headers={"X-Prometheus-Scrape-Timeout-Seconds": "4"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            samples = parse_samples(response.read().decode())
        assert value(samples, "probe_timeout_seconds") == pytest.approx(2.5, abs=0.05)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
        stderr = process.stderr.read() if process.stderr else ""
        assert "level=debug" in stderr
        assert f"probe done target=127.0.0.1:{closed} module=pop3 success=False" in stderr
        assert "reason=connect_refused" in stderr
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)
        if process.stderr is not None:
            process.stderr.close()
