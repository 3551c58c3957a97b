"""An OAuth 2.0 token-introspection endpoint (RFC 7662) for Dovecot's ``oauth2`` passdb.

aiohttp on loopback in a thread of its own, so that blocking tests (poplib, raw
sockets) and asynchronous tests alike can use it: it answers Dovecot whether
or not the test's event loop is running.

Dovecot 2.3.19 with ``introspection_mode = post`` sends
``POST /introspect`` with ``Content-Type: application/x-www-form-urlencoded``
and the body ``token=<token>``, once per XOAUTH2 or OAUTHBEARER login (no
caching: ``auth_cache_size`` is 0). The endpoint answers:

* a token from :meth:`IntrospectionServer.issue`:
  ``200 {"active": true, "username": "<user>"}``; Dovecot then requires
  ``<user>`` to equal the user name the client sent (``user=`` in XOAUTH2,
  ``a=`` in OAUTHBEARER), else the login fails like a bad token;
* a revoked or unknown token: ``200 {"active": false}`` (RFC 7662 section 2.2);
  Dovecot refuses the login (``-ERR [AUTH]`` after a SASL error continuation);
* a token from :meth:`IntrospectionServer.issue_failing`: that HTTP status
  with a JSON error body; Dovecot reports a temporary failure (``[SYS/TEMP]``).

The passdb's args file must say ``username_attribute = username``,
``active_attribute = active`` and ``active_value = true``.
"""

from __future__ import annotations

import asyncio
import secrets
import socket
import threading
from dataclasses import dataclass
from types import TracebackType

from aiohttp import web

PATH = "/introspect"
START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0


@dataclass(frozen=True)
class IntrospectionRequest:
    """What one request carried (the token too: tests assert what Dovecot sent)."""

    method: str
    content_type: str
    token: str | None


class IntrospectionServer:
    """Token introspection at :attr:`url`, served from a background thread."""

    def __init__(self) -> None:
        self.port = 0
        self._active: dict[str, str] = {}  # token -> user name
        self._failing: dict[str, int] = {}  # token -> HTTP status of the answer
        self._requests: list[IntrospectionRequest] = []
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{PATH}"

    # ---- tokens ----

    def issue(self, username: str) -> str:
        """A new random token that the endpoint reports active for ``username``."""
        token = secrets.token_urlsafe(24)
        with self._lock:
            self._active[token] = username
        return token

    def issue_failing(self, status: int = 503) -> str:
        """A token for which the endpoint itself fails with HTTP ``status``."""
        token = secrets.token_urlsafe(24)
        with self._lock:
            self._failing[token] = status
        return token

    def revoke(self, token: str) -> None:
        """From now on the endpoint reports ``token`` inactive."""
        with self._lock:
            self._active.pop(token, None)

    def requests(self) -> list[IntrospectionRequest]:
        """Every request received so far, oldest first."""
        with self._lock:
            return list(self._requests)

    # ---- HTTP ----

    async def _introspect(self, request: web.Request) -> web.Response:
        form = await request.post()
        value = form.get("token")
        token = value if isinstance(value, str) else None
        with self._lock:
            self._requests.append(IntrospectionRequest(request.method, request.content_type, token))
            username = self._active.get(token) if token is not None else None
            failing = self._failing.get(token) if token is not None else None
        if failing is not None:
            return web.json_response({"error": "temporarily_unavailable"}, status=failing)
        if username is None:
            return web.json_response({"active": False})
        return web.json_response({"active": True, "username": username})

    # ---- lifecycle ----

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("introspection server already started")
        self._thread = threading.Thread(target=asyncio.run, args=(self._serve(),), daemon=True)
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT):
            raise RuntimeError("introspection server did not start in time")
        if self._error is not None:
            self._thread.join(STOP_TIMEOUT)
            self._thread = None
            raise RuntimeError("introspection server failed to start") from self._error

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        app = web.Application()
        app.router.add_post(PATH, self._introspect)
        runner = web.AppRunner(app, access_log=None)
        try:
            await runner.setup()
            # Our own socket: the kernel picks a free port and we can read it back.
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                sock.bind(("127.0.0.1", 0))
                self.port = sock.getsockname()[1]
                await web.SockSite(runner, sock).start()
            except BaseException:
                sock.close()
                raise
        except Exception as exc:
            self._error = exc
            await runner.cleanup()
            self._ready.set()
            return
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            await runner.cleanup()

    def stop(self) -> None:
        """Stop serving and join the thread. Idempotent."""
        thread = self._thread
        if thread is None:
            return
        if self._loop is not None and self._stop is not None and thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        thread.join(STOP_TIMEOUT)
        if thread.is_alive():
            raise RuntimeError("introspection server did not stop")
        self._thread = None

    def __enter__(self) -> IntrospectionServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
