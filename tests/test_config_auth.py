"""The auth and mailbox sections of a module: secrets from files or the environment,
never from the config file, and the rules that keep credentials off plaintext."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pop3_exporter.config import (
    InvalidConfigError,
    MailboxConfig,
    module_to_mapping,
    parse_config,
    parse_config_partial,
)
from pop3_exporter.credentials import Mechanism, Secret

PASSWORD = "s3cret pass phrase"


@pytest.fixture
def password_file(tmp_path: Path) -> Path:
    path = tmp_path / "monitor.password"
    path.write_text(PASSWORD + "\n")
    path.chmod(0o600)
    return path


def _module_yaml(body: str, tls: str = "implicit") -> str:
    indented = "".join(f"      {line}\n" for line in body.strip().splitlines())
    return f"modules:\n  m:\n    tls: {tls}\n    auth:\n{indented}"


def _problems(text: str) -> list[str]:
    _, problems = parse_config_partial(text, "pop3.yml")
    return [str(problem) for problem in problems]


def test_the_issue_example_loads_with_the_password_from_its_file(password_file: Path) -> None:
    text = f"""
modules:
  pop3s_login:
    port: 995
    tls: implicit
    auth:
      mechanism: user
      username: monitor@example.com
      password_file: {password_file}
      allow_plaintext: false
    mailbox:
      stat: true
      oldest_message: false
"""
    module = parse_config(text).modules["pop3s_login"]
    assert module.auth is not None
    assert module.auth.mechanism is Mechanism.USER
    assert module.auth.password == Secret(PASSWORD)  # first line, newline stripped
    assert module.mailbox == MailboxConfig(stat=True, oldest_message=False)
    # The mapping written back names the file, never the secret, and reads back equal.
    mapping = module_to_mapping(module)
    assert PASSWORD not in repr(mapping)
    assert mapping["auth"] == {
        "mechanism": "user",
        "username": "monitor@example.com",
        "password_file": str(password_file),
        "allow_plaintext": False,
        "allow_unadvertised": False,
    }


def test_password_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POP3_MONITOR_PASSWORD", PASSWORD)
    text = _module_yaml("username: u\npassword_env: POP3_MONITOR_PASSWORD")
    module = parse_config(text).modules["m"]
    assert module.auth is not None and module.auth.password == Secret(PASSWORD)


def test_token_mechanisms_need_a_token_file_that_is_read_per_probe(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("tok-1\n")
    token.chmod(0o600)
    for mechanism in ("xoauth2", "oauthbearer"):
        text = _module_yaml(f"mechanism: {mechanism}\nusername: u\ntoken_file: {token}")
        auth = parse_config(text).modules["m"].auth
        assert auth is not None and auth.password is None
        assert auth.secret() == Secret("tok-1")
        token.write_text("tok-2\n")
        assert auth.secret() == Secret("tok-2")  # rotated tokens are picked up
        token.write_text("tok-1\n")


@pytest.mark.parametrize(
    ("body", "tls", "expected"),
    [
        (
            "username: u\npassword_file: {pw}",
            "none",
            "pop3.yml:4: modules.m.auth: would send credentials without TLS",
        ),
        ("password_file: {pw}", "implicit", "modules.m.auth.username: needs username"),
        (
            "username: u\npassword_file: {pw}\npassword_env: HOME",
            "implicit",
            "modules.m.auth: mechanism user needs one of password_file or password_env, alone",
        ),
        (
            "username: u\nmechanism: xoauth2\npassword_file: {pw}",
            "implicit",
            "modules.m.auth: mechanism xoauth2 needs one of token_file, alone",
        ),
        (
            "username: u\nmechanism: cram-md5\npassword_file: {pw}",
            "implicit",
            "modules.m.auth.mechanism: must be one of user, apop, plain, login, xoauth2,"
            " oauthbearer, got 'cram-md5'",
        ),
        (
            "username: two words\npassword_file: {pw}",
            "implicit",
            "modules.m.auth.username: must be 1-255 characters without spaces",
        ),
        (
            "username: u\npassword_file: /nonexistent/pw",
            "implicit",
            "pop3.yml:6: modules.m.auth.password_file: cannot read /nonexistent/pw:"
            " No such file or directory",
        ),
        (
            "username: u\npassword_env: POP3_EXPORTER_SURELY_UNSET",
            "implicit",
            "modules.m.auth.password_env: environment variable POP3_EXPORTER_SURELY_UNSET"
            " is not set",
        ),
        ("username: u\npassword_file: {pw}\nretries: 3", "implicit", "modules.m.auth.retries"),
    ],
)
def test_auth_problems_name_line_and_key(
    body: str, tls: str, expected: str, password_file: Path
) -> None:
    problems = _problems(_module_yaml(body.format(pw=password_file), tls))
    assert len(problems) == 1, problems
    assert expected in problems[0]


def test_plaintext_is_allowed_only_when_asked(password_file: Path) -> None:
    text = _module_yaml(
        f"username: u\npassword_file: {password_file}\nallow_plaintext: true", "none"
    )
    auth = parse_config(text).modules["m"].auth
    assert auth is not None and auth.allow_plaintext


def test_a_login_without_capa_needs_allow_unadvertised(password_file: Path) -> None:
    text = _module_yaml(f"username: u\npassword_file: {password_file}") + (
        "    query_capabilities: false\n"
    )
    (problem,) = _problems(text)
    assert "modules.m.auth: a login needs CAPA" in problem


def test_mailbox_without_auth_and_top_without_stat_are_refused(password_file: Path) -> None:
    (problem,) = _problems("modules:\n  m:\n    mailbox: {stat: true}\n")
    assert problem == "pop3.yml:3: modules.m.mailbox: needs auth (a login)"
    text = _module_yaml(f"username: u\npassword_file: {password_file}") + (
        "    mailbox: {stat: false, oldest_message: true}\n"
    )
    (problem,) = _problems(text)
    assert "modules.m.mailbox.oldest_message: oldest_message needs stat" in problem


def test_a_password_file_others_can_read_is_a_warning(password_file: Path) -> None:
    password_file.chmod(0o644)
    config = parse_config(_module_yaml(f"username: u\npassword_file: {password_file}"))
    (warning,) = config.warnings
    assert str(warning).endswith(
        "modules.m.auth.password_file: the file is readable by other users"
    )
    password_file.chmod(0o600)
    assert parse_config(_module_yaml(f"username: u\npassword_file: {password_file}")).warnings == ()


def test_insecure_skip_verify_with_auth_is_a_warning(password_file: Path) -> None:
    text = _module_yaml(f"username: u\npassword_file: {password_file}") + (
        "    tls_config: {insecure_skip_verify: true}\n"
    )
    (warning,) = parse_config(text).warnings
    assert "credentials are sent to a server whose certificate is not verified" in str(warning)


def test_secrets_never_appear_in_problems_or_reprs(tmp_path: Path) -> None:
    # A password file whose first line is fine but whose second is not is still read;
    # every message about secrets names the file only.
    bad = tmp_path / "bad.password"
    bad.write_bytes(PASSWORD.encode() + b"\x00\n")
    problems = _problems(_module_yaml(f"username: u\npassword_file: {bad}"))
    assert problems and all(PASSWORD not in problem for problem in problems)
    good = tmp_path / "good.password"
    good.write_text(PASSWORD)
    good.chmod(0o600)
    config = parse_config(_module_yaml(f"username: u\npassword_file: {good}"))
    assert PASSWORD not in repr(config)
    assert PASSWORD not in str(config.modules["m"])


def test_config_check_prints_warnings_and_passes(password_file: Path, tmp_path: Path) -> None:
    password_file.chmod(0o644)
    config = tmp_path / "pop3.yml"
    config.write_text(_module_yaml(f"username: u\npassword_file: {password_file}"))
    checked = subprocess.run(
        [sys.executable, "-m", "pop3_exporter", "--config.file", str(config), "--config.check"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])},
    )
    assert checked.returncode == 0, checked.stderr
    assert "warning: " in checked.stderr and "readable by other users" in checked.stderr
    assert PASSWORD not in checked.stdout + checked.stderr
    password_file.chmod(0o600)


def test_a_reload_rereads_the_password_file(password_file: Path) -> None:
    text = _module_yaml(f"username: u\npassword_file: {password_file}")
    first = parse_config(text).modules["m"].auth
    password_file.write_text("rotated\n")
    second = parse_config(text).modules["m"].auth
    assert first is not None and second is not None
    assert (first.password, second.password) == (Secret(PASSWORD), Secret("rotated"))


def test_invalid_config_error_lists_every_auth_problem(password_file: Path) -> None:
    text = (
        "modules:\n"
        "  a:\n    auth: {username: u, password_file: /nope}\n    tls: implicit\n"
        "  b:\n    auth: {username: u, password_file: " + str(password_file) + "}\n"
    )
    with pytest.raises(InvalidConfigError) as raised:
        parse_config(text, "pop3.yml")
    keys = [problem.key for problem in raised.value.problems]
    assert keys == ["modules.a.auth.password_file", "modules.b.auth"]
