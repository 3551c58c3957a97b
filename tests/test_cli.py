"""The command line: --config.check, serving, SIGHUP reload and SIGTERM, as a real process."""

from __future__ import annotations

import itertools
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from pop3_exporter.cli import DEFAULT_LISTEN_ADDRESS, parse_listen_address
from pop3_exporter.config import MODULE_SECTION
from tests.support.certs import make_client_certificate
from tests.support.exposition import parse_samples, value
from tests.support.logs import find, parse_json_lines, parse_logfmt

MODULE_KEYS = ", ".join(sorted(MODULE_SECTION.keys))


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
    assert completed.stdout == f"{path}: valid; modules: extra, pop3, pop3_starttls, pop3s\n"
    assert completed.stderr == ""


def test_config_check_without_a_file_says_so_on_stdout() -> None:
    completed = run_cli("--config.check")
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.startswith("no --config.file given: the built-in modules are valid")
    assert completed.stderr == ""


def test_config_check_reports_every_problem_one_per_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yml"
    missing = tmp_path / "x.pem"
    path.write_text(
        "modules:\n"  # 1
        "  extra:\n"  # 2
        "    timeout: 5\n"  # 3
        "    retries: 3\n"  # 4
        "  pop3s_internal:\n"  # 5
        "    tls: implicit\n"  # 6
        "    tls_config:\n"  # 7
        f"      ca_file: {missing}\n"  # 8
        "policy:\n"  # 9
        "  default: maybe\n"  # 10
    )
    completed = run_cli("--config.file", str(path), "--config.check")
    assert completed.returncode == 1
    assert completed.stdout == ""
    assert completed.stderr.splitlines() == [
        f"{path}:3: modules.extra.timeout: not a duration: '5' (use e.g. 10s, 1m30s, 500ms)",
        f"{path}:4: modules.extra.retries: unknown key (known: {MODULE_KEYS})",
        f"{path}:8: modules.pop3s_internal.tls_config.ca_file: cannot load certificates:"
        f" [Errno 2] No such file or directory: '{missing}'",
        f"{path}:10: policy.default: must be allow or deny, got 'maybe'",
    ]


def test_config_check_names_the_bad_client_key(tmp_path: Path) -> None:
    client = make_client_certificate(tmp_path / "client")
    other = make_client_certificate(tmp_path / "other")
    path = tmp_path / "mtls.yml"
    path.write_text(
        "modules:\n  m:\n    tls: implicit\n    tls_config:\n"
        f"      cert_file: {client.cert_path}\n      key_file: {other.key_path}\n"
    )
    completed = run_cli("--config.file", str(path), "--config.check")
    assert completed.returncode == 1
    [line] = completed.stderr.splitlines()
    assert line.startswith(
        f"{path}:6: modules.m.tls_config.key_file: cannot load the key, or it does not match"
    )


def test_config_check_reports_config_and_web_config_together(tmp_path: Path) -> None:
    config = tmp_path / "pop3.yml"
    config.write_text("modules:\n  a:\n    port: 0\n")
    web = tmp_path / "web.yml"
    web.write_text("basic_auth_users:\n  bob: plaintext\n")
    completed = run_cli(
        "--config.file", str(config), "--web.config.file", str(web), "--config.check"
    )
    assert completed.returncode == 1
    assert completed.stderr.splitlines() == [
        f"{config}:3: modules.a.port: must be a port 1-65535, got 0",
        f"{web}:2: basic_auth_users.bob: must be a bcrypt hash ($2y$10$...)",
    ]
    # Each file that is valid says so on stdout, whatever the other one holds.
    config.write_text("modules: {}\n")
    completed = run_cli(
        "--config.file", str(config), "--web.config.file", str(web), "--config.check"
    )
    assert completed.returncode == 1
    assert completed.stdout.startswith(f"{config}: valid; modules: ")
    assert completed.stderr.startswith(f"{web}:2: ")
    web.write_text("tls_server_config:\n  cert_file: nothing.crt\n  key_file: nothing.key\n")
    completed = run_cli(
        "--config.file", str(config), "--web.config.file", str(web), "--config.check"
    )
    assert completed.returncode == 1
    assert completed.stderr.startswith(f"{web}:2: tls_server_config.cert_file: cannot load")
    web.write_text("")
    completed = run_cli(
        "--config.file", str(config), "--web.config.file", str(web), "--config.check"
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.splitlines()[1] == f"{web}: valid web configuration"


def test_bad_config_at_start_exits_1(tmp_path: Path) -> None:
    path = tmp_path / "bad.yml"
    path.write_text("modules: 3\npolicy: 4\n")
    completed = run_cli("--config.file", str(path), "--web.listen-address", "127.0.0.1:0")
    assert completed.returncode == 1
    records = parse_logfmt(completed.stderr)
    first = find(records, "invalid configuration", line=1)
    assert (first["level"], first["file"], first["key"]) == ("error", str(path), "modules")
    assert first["err"] == "must be a mapping"
    assert find(records, "invalid configuration", line=2)["key"] == "policy"
    assert find(records, "cannot load configuration")["errors"] == "2"


def test_help_describes_every_flag() -> None:
    completed = run_cli("--help")
    assert completed.returncode == 0
    text = " ".join(completed.stdout.split())
    assert "--log.level {debug,info,warn,error} Only log messages at this level or above" in text
    assert "--log.format {logfmt,json} Log lines as logfmt key=value fields" in text
    assert "get the probe deadline (default 0.5)" in text
    assert "--config.check Check --config.file (and the files it names) and --web.config.file" in (
        text
    )
    assert "GET /probe?target=HOST[:PORT]&module=MODULE" in text
    assert "docs/" in text
    # Every flag has a description: no option line is followed directly by another one.
    options = [line.strip() for line in completed.stdout.split("options:")[1].splitlines()]
    for current, following in itertools.pairwise(options):
        if current.startswith("--") and "  " not in current:
            assert not following.startswith("--"), f"{current} has no description"


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


@pytest.mark.parametrize("text", ["10110", "host:", "host:port", "h:\u0663"])
def test_bad_listen_address(text: str) -> None:
    with pytest.raises(ValueError, match="is not HOST:PORT"):
        parse_listen_address(text)


@pytest.mark.parametrize("text", ["localhost:99999", "h:70000", "[::1]:65536"])
def test_listen_address_port_out_of_range(text: str) -> None:
    port = text.rpartition(":")[2]
    message = f"listen address {text!r}: port {port} is out of range 0-65535 (0: any free port)"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        parse_listen_address(text)


def test_out_of_range_listen_port_at_start(tmp_path: Path) -> None:
    completed = run_cli("--web.listen-address", "localhost:99999")
    assert completed.returncode == 2
    record = find(parse_logfmt(completed.stderr), "invalid --web.listen-address")
    assert record["err"] == (
        "listen address 'localhost:99999': port 99999 is out of range 0-65535 (0: any free port)"
    )


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
        self.address = f"127.0.0.1:{port}"
        self.url = f"http://{self.address}"


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
    records = parse_json_lines(stderr)
    config = str(tmp_path / "pop3_exporter.yml")
    started = find(records, "starting pop3_exporter", config_file=config)
    assert started["modules"] == "first,pop3,pop3_starttls,pop3s"
    reloaded = find(records, "config reloaded", file=config)
    assert reloaded["modules"] == "pop3,pop3_starttls,pop3s,second"
    failed = find(records, "config reload failed, keeping the old config", file=config)
    assert failed["level"] == "error" and failed["errors"] == 1
    problem = find(records, "invalid configuration", file=config)
    assert problem["line"] == 3 and problem["err"].startswith("invalid YAML: ")
    find(records, "listening", address=exporter.address, scheme="http")
    find(records, "shutting down", probes_in_flight=0)
    find(records, "shut down")


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
        # A parameter name full of logfmt syntax, escapes and control characters: the
        # debug line about it must still parse, to exactly the text of the 400 answer.
        hostile = "%22%20msg%3Dforged%20%5C%0A%0D%00%1B%C3%A9%E2%80%A8"
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(f"{url}/probe?target=h&module=pop3&{hostile}=1", timeout=10)
        assert caught.value.code == 400
        answer = caught.value.read().decode()
        caught.value.close()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
        stderr = process.stderr.read() if process.stderr else ""
        records = parse_logfmt(stderr)
        invalid = find(records, "probe request invalid", reason="unknown_parameter")
        assert invalid["err"] + "\n" == answer
        assert invalid["err"].startswith("unknown parameter '\" msg=forged \\\\")
        done = find(records, "probe done", target=f"127.0.0.1:{closed}", module="pop3")
        assert (done["level"], done["success"], done["reason"]) == (
            "debug",
            "false",
            "connect_refused",
        )
        assert 0 <= float(done["duration_seconds"]) < 2.5
        started = find(records, "starting pop3_exporter")
        assert (started["config_file"], started["modules"]) == (
            "<built-in>",
            "pop3,pop3_starttls,pop3s",
        )
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)
        if process.stderr is not None:
            process.stderr.close()
