"""A stand-in for the prober, so HTTP-level tests touch no network at all."""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass

from pop3_exporter.config import Module
from pop3_exporter.prober import AddressCheck
from pop3_exporter.result import Phase, ProbeResult
from pop3_exporter.target import ProbeTarget


@dataclass(frozen=True)
class Call:
    target: ProbeTarget
    module: Module
    address_check: AddressCheck | None


def success_result(target: ProbeTarget, module: Module) -> ProbeResult:
    return ProbeResult(
        target=str(target),
        module_name=module.name,
        timeout_seconds=module.timeout,
        duration_seconds=0.01,
        success=True,
        failure_reason=None,
        failure_detail=None,
        failed_phase=None,
        phase_durations=((Phase.RESOLVE, 0.001), (Phase.CONNECT, 0.002)),
        dns_lookup_seconds=0.001,
        ip_protocol=4,
        address="192.0.2.1",
        greeting="+OK ready",
        greeting_seconds=0.003,
        greeting_match=True,
        capabilities=("TOP",),
        plaintext_auth_exposed=False,
        tls=None,
    )


class FakeProber:
    """Records every call; optionally sleeps (a slow target) or "resolves" names.

    ``addresses`` maps a host name to the address the fake resolver would return; when
    the exporter passes an ``address_check``, it is applied to that address exactly as
    the real prober does right before connecting.
    """

    def __init__(self, *, delay: float = 0.0, addresses: dict[str, str] | None = None) -> None:
        self.delay = delay
        self.addresses = addresses or {}
        self.calls: list[Call] = []
        self.running = 0
        self.max_running = 0
        self.started = asyncio.Event()
        self.release = asyncio.Event()  # set it to end every sleeping probe at once

    async def __call__(
        self,
        target: ProbeTarget,
        module: Module,
        deadline: float,
        *,
        ssl_context: ssl.SSLContext | None,
        record_transcript: bool,
        address_check: AddressCheck | None = None,
    ) -> ProbeResult:
        self.calls.append(Call(target, module, address_check))
        if address_check is not None:
            address = target.host if target.is_ip_literal else self.addresses[target.host]
            address_check(address, target.port)
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        self.started.set()
        try:
            if self.delay:
                # Bounded: a test that forgets to release still ends.
                await asyncio.wait_for(self.release.wait(), timeout=self.delay)
        except TimeoutError:
            pass
        finally:
            self.running -= 1
        return success_result(target, module)
