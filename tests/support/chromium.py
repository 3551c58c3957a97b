"""Debian's headless Chromium, driven over the DevTools protocol (JSON over a websocket,
aiohttp's client), for tests of what a real browser makes of the exporter's pages.

The browser runs in its own process group with a new empty profile, may resolve no
name but 127.0.0.1 (``--host-resolver-rules``), has every background service that
would call home switched off, and is stopped by its process group (its PID, never a
name) whatever happens in the test. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import itertools
import json
import os
import shutil
import signal
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp

CHROMIUM = "/usr/bin/chromium"
START_TIMEOUT = 15.0
STOP_TIMEOUT = 5.0
CALL_TIMEOUT = 10.0
# Headless, no sandbox (the tests run as root), nothing in the background that goes
# to outside hosts (component updates, sync, first-run pages, QUIC probes, field
# trials, crash reports), and no name resolves but the loopback address.
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-extensions",
    "--disable-breakpad",
    "--disable-domain-reliability",
    "--disable-client-side-phishing-detection",
    "--disable-field-trial-config",
    "--no-proxy-server",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
    "--remote-debugging-address=127.0.0.1",
    "--remote-debugging-port=0",
)

Message = dict[str, Any]
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _proc_address(text: str) -> IPAddress:
    """An address as /proc/net/tcp writes it: hex, in 32-bit words of host byte order."""
    raw = bytes.fromhex(text)
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return ipaddress.ip_address(words)


def chromium_binary() -> str | None:
    return CHROMIUM if os.access(CHROMIUM, os.X_OK) else shutil.which("chromium")


class DevToolsError(RuntimeError):
    pass


class Page:
    """One page target: commands with their answers, and every event it sent."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self._ws = ws
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Message]] = {}
        self.events: list[Message] = []
        self._new_event = asyncio.Event()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for message in self._ws:
                if message.type is not aiohttp.WSMsgType.TEXT:
                    break
                data: Message = json.loads(message.data)
                if "id" in data:
                    future = self._pending.pop(data["id"], None)
                    if future is not None and not future.done():
                        future.set_result(data)
                else:
                    self.events.append(data)
                    self._new_event.set()
        finally:
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(DevToolsError("DevTools connection closed"))

    async def call(self, method: str, **params: Any) -> Message:
        """Run one command; its result, or DevToolsError with the protocol's error."""
        call_id = next(self._ids)
        future: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._pending[call_id] = future
        await self._ws.send_str(json.dumps({"id": call_id, "method": method, "params": params}))
        async with asyncio.timeout(CALL_TIMEOUT):
            answer = await future
        if "error" in answer:
            raise DevToolsError(f"{method}: {answer['error']}")
        result: Message = answer.get("result", {})
        return result

    async def wait_event(self, method: str, after: int, timeout: float = CALL_TIMEOUT) -> Message:  # noqa: ASYNC109
        """The first ``method`` event at index ``after`` or later of ``events``."""
        async with asyncio.timeout(timeout):
            while True:
                for event in self.events[after:]:
                    if event.get("method") == method:
                        return event
                self._new_event.clear()
                await self._new_event.wait()

    async def evaluate(self, expression: str) -> Any:
        """The JSON value of a JavaScript expression in the page."""
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise DevToolsError(f"{expression!r} threw: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def navigate(self, url: str) -> None:
        """Load ``url`` and wait for its load event."""
        mark = len(self.events)
        answer = await self.call("Page.navigate", url=url)
        if answer.get("errorText"):
            raise DevToolsError(f"navigating to {url}: {answer['errorText']}")
        await self.wait_event("Page.loadEventFired", mark)

    async def click(self, selector: str) -> None:
        """Click the first element matching ``selector`` and wait for the page it loads."""
        mark = len(self.events)
        clicked = await self.evaluate(
            f"(() => {{ const e = document.querySelector({json.dumps(selector)});"
            " if (!e) return false; e.click(); return true; })()"
        )
        if not clicked:
            raise DevToolsError(f"nothing matches {selector!r}")
        await self.wait_event("Page.loadEventFired", mark)

    def problems(self) -> list[str]:
        """Console errors and warnings, uncaught exceptions and browser log entries of
        level error or warning (CSP violations, failed loads) seen so far."""
        found = []
        for event in self.events:
            params = event.get("params", {})
            method = event.get("method")
            if method == "Runtime.exceptionThrown":
                found.append(f"exception: {params['exceptionDetails']}")
            elif method == "Runtime.consoleAPICalled" and params.get("type") in (
                "error",
                "warning",
                "assert",
            ):
                found.append(f"console.{params['type']}: {params.get('args')}")
            elif method == "Log.entryAdded" and params["entry"]["level"] in ("error", "warning"):
                entry = params["entry"]
                found.append(f"log {entry['level']}: {entry.get('text')} ({entry.get('url')})")
        return found

    async def close(self) -> None:
        await self._ws.close()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader


class Chromium:
    """``async with Chromium(profile_dir, log_path) as browser: page = await
    browser.page()``; the profile directory must be new and empty."""

    def __init__(self, profile_dir: Path, log_path: Path) -> None:
        binary = chromium_binary()
        if binary is None:
            raise FileNotFoundError("chromium not found (Debian package chromium)")
        self.binary = binary
        self.profile_dir = profile_dir
        self.log_path = log_path
        self.process: asyncio.subprocess.Process | None = None
        self.port = 0
        self._session: aiohttp.ClientSession | None = None
        self._pages: list[Page] = []

    async def __aenter__(self) -> Chromium:
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def _start(self) -> None:
        self.profile_dir.mkdir(exist_ok=False)
        with self.log_path.open("wb") as log:
            self.process = await asyncio.create_subprocess_exec(
                self.binary,
                *FLAGS,
                f"--user-data-dir={self.profile_dir}",
                "about:blank",
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                # Its own process group: stop() ends the renderers and helpers too.
                start_new_session=True,
            )
        # Chromium writes the port it listens on (chosen by the kernel) into the profile.
        port_file = self.profile_dir / "DevToolsActivePort"
        async with asyncio.timeout(START_TIMEOUT):
            while not port_file.exists() or not port_file.read_text().strip():
                if self.process.returncode is not None:
                    raise RuntimeError(f"chromium exited at start:\n{self.log()}")
                await asyncio.sleep(0.05)
        self.port = int(port_file.read_text().splitlines()[0])
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=CALL_TIMEOUT))

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else ""

    async def page(self) -> Page:
        """The blank page Chromium started with, with Page, Runtime and Log events on."""
        assert self._session is not None
        async with self._session.get(f"http://127.0.0.1:{self.port}/json/list") as response:
            targets = await response.json()
        url = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
        if not url.startswith(f"ws://127.0.0.1:{self.port}/"):
            raise DevToolsError(f"unexpected DevTools address {url}")
        page = Page(await self._session.ws_connect(url, max_msg_size=64 * 2**20))
        self._pages.append(page)
        for domain in ("Page", "Runtime", "Log"):
            await page.call(f"{domain}.enable")
        return page

    def group_pids(self) -> list[int]:
        """The browser and its helpers: every process in its process group."""
        assert self.process is not None
        pids = []
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                stat = Path(f"/proc/{name}/stat").read_text()
            except OSError:
                continue
            # Fields after the command (which may hold spaces): state, ppid, pgrp.
            if int(stat.rpartition(")")[2].split()[2]) == self.process.pid:
                pids.append(int(name))
        return pids

    def remote_addresses(self) -> set[IPAddress]:
        """The peer addresses of every TCP and UDP socket the browser's processes hold
        now (listening and unconnected sockets have none)."""
        inodes = set()
        for pid in self.group_pids():
            with contextlib.suppress(OSError):
                for fd in os.listdir(f"/proc/{pid}/fd"):
                    with contextlib.suppress(OSError):
                        link = os.readlink(f"/proc/{pid}/fd/{fd}")
                        if link.startswith("socket:["):
                            inodes.add(link[8:-1])
        peers: set[IPAddress] = set()
        for table in ("tcp", "tcp6", "udp", "udp6"):
            lines = Path(f"/proc/net/{table}").read_text().splitlines()[1:]
            for line in lines:
                fields = line.split()
                if fields[9] in inodes:
                    peer = _proc_address(fields[2].partition(":")[0])
                    if not peer.is_unspecified:
                        peers.add(peer)
        return peers

    async def stop(self) -> None:
        for page in self._pages:
            with contextlib.suppress(Exception):
                await page.close()
        if self._session is not None:
            await self._session.close()
        process = self.process
        if process is None:
            return
        # The group is ours (start_new_session): its id is the browser's PID.
        for signum in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signum)
            try:
                async with asyncio.timeout(STOP_TIMEOUT):
                    await process.wait()
            except TimeoutError:
                continue
            break
        # Helpers that outlive the browser process are in the group still.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
