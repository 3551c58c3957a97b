"""The landing page's probe history in a real headless browser (Debian's chromium).

Real probes of a real Dovecot (plain and implicit TLS) and of two hostile fake servers
whose greetings carry HTML and JavaScript, then the landing page and a report as
Chromium loads them: no console error, the probes in the table, the report behind a
link, and nothing of the hostile greetings run or turned into elements.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from pop3_exporter.http import create_app
from pop3_exporter.metrics import ExporterMetrics
from pop3_exporter.prober import Pop3Prober
from pop3_exporter.resolver import StaticResolver
from pop3_exporter.runtime import ConfigHolder
from tests.support.certs import TestPKI
from tests.support.chromium import Chromium, chromium_binary
from tests.support.dovecot import DovecotServer
from tests.support.fakepop3 import FakePop3Server, dialogue

pytestmark = [pytest.mark.browser, pytest.mark.dovecot]

HOSTILE_MARKUP = '<script>window.__pwned=1</script><img src=x onerror="window.__pwned=2">'
HOSTILE_OK = f"+OK {HOSTILE_MARKUP}\r\n".encode()
# A greeting that is not +OK fails the probe, and its text goes into the failure
# detail: the table cell, not just the report, then holds the server's markup.
HOSTILE_ERR = f"-ERR {HOSTILE_MARKUP}\r\n".encode()

TABLE_ROWS = """Array.from(document.querySelectorAll('#history tr')).slice(1).map(
    row => Array.from(row.cells).map(cell => cell.textContent))"""
# What the hostile greetings would leave behind if their markup were parsed as HTML.
INJECTED = """({pwned: typeof window.__pwned,
    scripts: document.querySelectorAll('script').length,
    images: document.querySelectorAll('img').length,
    handlers: document.querySelectorAll('[onerror]').length})"""
CLEAN = {"pwned": "undefined", "scripts": 0, "images": 0, "handlers": 0}


def require_chromium() -> None:
    if chromium_binary() is None:
        message = "chromium not found (Debian package chromium)"
        if os.environ.get("CI") == "true":
            # A missing browser in CI would silently turn this test into a skip.
            pytest.fail(message, pytrace=False)
        pytest.skip(message)


@pytest.fixture
async def exporter(pki: TestPKI, tmp_path: Path) -> AsyncIterator[str]:
    """The exporter app on 127.0.0.1 and a free port, in this test's event loop."""
    config = tmp_path / "pop3_exporter.yml"
    ca_file = pki.ca_file
    config.write_text(
        f"modules:\n  dovecot_tls:\n    tls: implicit\n    tls_config: {{ca_file: '{ca_file}'}}\n"
    )
    holder = ConfigHolder(str(config), ExporterMetrics())
    app = create_app(holder, prober=Pop3Prober(StaticResolver({})))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        await runner.cleanup()


async def probe(session: aiohttp.ClientSession, base: str, target: str, module: str) -> None:
    async with session.get(f"{base}probe", params={"target": target, "module": module}) as answer:
        assert answer.status == 200, await answer.text()


async def test_history_in_headless_chromium(
    exporter: str, dovecot: DovecotServer, tmp_path: Path
) -> None:
    require_chromium()
    probes = [
        (f"127.0.0.1:{dovecot.pop3_port}", "pop3"),
        (f"127.0.0.1:{dovecot.pop3s_port}", "dovecot_tls"),
    ]
    async with (
        FakePop3Server(dialogue(greeting=HOSTILE_OK)) as hostile_ok,
        FakePop3Server(dialogue(greeting=HOSTILE_ERR)) as hostile_err,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session,
    ):
        probes += [
            (f"127.0.0.1:{hostile_ok.port}", "pop3"),
            (f"127.0.0.1:{hostile_err.port}", "pop3"),
        ]
        for target, module in probes:
            await probe(session, exporter, target, module)

    async with Chromium(tmp_path / "profile", tmp_path / "chromium.log") as browser:
        page = await browser.page()
        await page.navigate(exporter)
        assert await page.evaluate(INJECTED) == CLEAN
        assert page.problems() == []
        rows = await page.evaluate(TABLE_ROWS)
        # Newest first: started, target, module, result, reason, detail, duration, debug.
        assert [(row[1], row[2]) for row in rows] == probes[::-1]
        assert [row[3] for row in rows] == ["failure", "success", "success", "success"]
        assert rows[0][4] == "greeting_error"
        # The server's markup is in the cell as text, not as elements.
        assert HOSTILE_MARKUP in rows[0][5]
        assert [row[4] for row in rows[1:]] == ["", "", ""]
        assert all(row[6].endswith(" ms") and float(row[6][:-3]) > 0 for row in rows)
        # The module table and the form are still there.
        assert await page.evaluate("document.querySelector('form select').value") == "pop3s"
        assert "dovecot_tls" in await page.evaluate("document.body.innerText")

        # The hostile +OK probe (second row) opens its report, a plain-text page.
        await page.click("#history tr:nth-child(3) a")
        url = await page.evaluate("location.href")
        assert url.startswith(f"{exporter}probe/history/")
        report = await page.evaluate("document.body.innerText")
        assert f"Probe of {probes[2][0]} with module pop3" in report
        assert f"S: +OK {HOSTILE_MARKUP}" in report
        assert "Result: success" in report
        assert await page.evaluate("document.contentType") == "text/plain"
        assert await page.evaluate(INJECTED) == CLEAN

        # Back on the landing page, the TLS probe's report has the certificates.
        await page.navigate(exporter)
        await page.click("#history tr:nth-child(4) a")
        report = await page.evaluate("document.body.innerText")
        assert f"Probe of {probes[1][0]} with module dovecot_tls" in report
        assert "verified: yes" in report and "certificate 0: subject=" in report

        assert page.problems() == []
        # At least the DevTools connection is there; nothing is connected elsewhere.
        peers = browser.remote_addresses()
        assert peers and all(peer.is_loopback for peer in peers), peers
