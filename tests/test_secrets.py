"""No password or token in any output: /probe bodies (debug or not), /metrics, the
landing page, error answers, reload answers, --config.check, and the log at debug
level. The exporter runs as a real process against the fake mail server."""

from __future__ import annotations

import asyncio
import base64
import sys
from pathlib import Path

import aiohttp

from tests.support.exporter import REPO, ExporterProcess
from tests.support.fakemail import FakeMailServer
from tests.support.fakepop3 import FakePop3Server

USER = "monitor@example.test"
PASSWORD = "correct horse battery"
WRONG_PASSWORD = "wrong staple 42"
TOKEN = "tok-good-7f3a9"
REVOKED_TOKEN = "tok-revoked-11c2"


def _secret_forms() -> list[str]:
    """Each secret, and the encodings a SASL exchange would carry it in."""
    forms = [PASSWORD, WRONG_PASSWORD, TOKEN, REVOKED_TOKEN]
    for password in (PASSWORD, WRONG_PASSWORD):
        forms.append(base64.b64encode(f"\0{USER}\0{password}".encode()).decode())
        forms.append(base64.b64encode(password.encode()).decode())
    for token in (TOKEN, REVOKED_TOKEN):
        forms.append(
            base64.b64encode(f"user={USER}\x01auth=Bearer {token}\x01\x01".encode()).decode()
        )
    return forms


def _secret_file(directory: Path, name: str, value: str) -> Path:
    path = directory / name
    path.write_text(value + "\n")
    path.chmod(0o600)
    return path


def _config(directory: Path, port: int) -> str:
    good = _secret_file(directory, "good.password", PASSWORD)
    wrong = _secret_file(directory, "wrong.password", WRONG_PASSWORD)
    token = _secret_file(directory, "token", TOKEN)
    revoked = _secret_file(directory, "revoked.token", REVOKED_TOKEN)
    modules = {
        "user_good": ("user", f"password_file: {good}"),
        "user_wrong": ("user", f"password_file: {wrong}"),
        "plain_wrong": ("plain", f"password_file: {wrong}"),
        "login_good": ("login", f"password_file: {good}"),
        "apop_wrong": ("apop", f"password_file: {wrong}"),
        "xoauth2_good": ("xoauth2", f"token_file: {token}"),
        "oauthbearer_revoked": ("oauthbearer", f"token_file: {revoked}"),
    }
    lines = ["modules:"]
    for name, (mechanism, secret) in modules.items():
        lines += [
            f"  {name}:",
            f"    port: {port}",
            "    auth:",
            f"      mechanism: {mechanism}",
            f"      username: {USER}",
            f"      {secret}",
            "      allow_plaintext: true",
            "    mailbox: {oldest_message: true}",
        ]
    return "\n".join(lines) + "\n"


async def test_no_secret_in_any_output(tmp_path: Path) -> None:
    server = FakeMailServer(
        user=USER, password=PASSWORD, token=TOKEN, messages=[b"Date: nonsense\r\n\r\nx\r\n"]
    )
    collected: list[str] = []
    async with FakePop3Server(server) as fake:
        config = tmp_path / "pop3.yml"
        config.write_text(_config(tmp_path, fake.port))
        check = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "pop3_exporter", "--config.file", str(config)),
            "--config.check",
            cwd=REPO,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        async with asyncio.timeout(60):
            stdout, stderr = await check.communicate()
        assert check.returncode == 0, stderr
        collected += [stdout.decode(), stderr.decode()]
        exporter = ExporterProcess(
            tmp_path / "exporter.log", "--config.file", str(config), "--log.level", "debug"
        )
        with exporter:
            async with aiohttp.ClientSession() as session:

                async def get(path: str, expect: int = 200) -> str:
                    async with session.get(exporter.url + path) as response:
                        text = await response.text()
                        assert response.status == expect, (path, text)
                        collected.append(text)
                        return text

                outcomes = {}
                for module in (
                    "user_good",
                    "user_wrong",
                    "plain_wrong",
                    "login_good",
                    "apop_wrong",
                    "xoauth2_good",
                    "oauthbearer_revoked",
                ):
                    target = f"127.0.0.1:{fake.port}"
                    body = await get(f"/probe?target={target}&module={module}")
                    outcomes[module] = "probe_success 1.0" in body
                    report = await get(f"/probe?target={target}&module={module}&debug=true")
                    assert "********" in report
                # The probes really logged in or were really refused.
                assert outcomes == {
                    "user_good": True,
                    "user_wrong": False,
                    "plain_wrong": False,
                    "login_good": True,
                    "apop_wrong": False,
                    "xoauth2_good": True,
                    "oauthbearer_revoked": False,
                }
                await get("/metrics")
                await get("/")
                await get("/probe?target=127.0.0.1&module=nope", expect=400)
                # A reload that fails (a password file gone) names the file, not the secret.
                (tmp_path / "wrong.password").rename(tmp_path / "moved.password")
                async with session.post(exporter.url + "/-/reload") as response:
                    collected.append(await response.text())
                    assert response.status == 500
                    assert "wrong.password" in collected[-1]
                # A token file that vanished makes the probe's scrape fail, by name.
                (tmp_path / "token").unlink()
                text = await get(f"/probe?target=127.0.0.1:{fake.port}&module=xoauth2_good", 500)
                assert "cannot read" in text and "token" in text
        collected.append(exporter.log())
    assert "probe done" in collected[-1]  # the debug log was really written
    everything = "\n".join(collected)
    for secret in _secret_forms():
        assert secret not in everything, f"a secret ({secret[:3]}...) leaked"
