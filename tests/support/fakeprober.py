"""A stand-in for the prober, so HTTP-level tests touch no network at all."""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass

from pop3_exporter.config import Module
from pop3_exporter.delivery import DeliveryRuntime
from pop3_exporter.prober import AddressCheck
from pop3_exporter.result import Capabilities, FailureReason, Phase, ProbeResult
from pop3_exporter.target import ProbeTarget


@dataclass(frozen=True)
class Call:
    target: ProbeTarget
    module: Module
    address_check: AddressCheck | None
    timeout: float  # the probe's timeout in seconds, as the exporter gave it


def canned_result(target: ProbeTarget, module: Module, *, success: bool = True) -> ProbeResult:
    """A plausible result: a plain probe that succeeded, or was refused at connect."""
    return ProbeResult(
        target=str(target),
        module_name=module.name,
        timeout_seconds=module.timeout,
        duration_seconds=0.01,
        success=success,
        failure_reason=None if success else FailureReason.CONNECT_REFUSED,
        failure_detail=None if success else "connection refused",
        failed_phase=None if success else Phase.CONNECT,
        phase_durations=((Phase.RESOLVE, 0.001), (Phase.CONNECT, 0.002)),
        dns_lookup_seconds=0.001,
        ip_protocol=4,
        address="127.0.0.1",
        greeting="+OK ready" if success else None,
        greeting_seconds=0.003 if success else None,
        greeting_match=success,
        capabilities=Capabilities(names=("TOP",), unregistered=0) if success else None,
        plaintext_auth_exposed=False if success else None,
        tls=None,
    )


class FakeProber:
    """Records every call; optionally sleeps (a slow target) or "resolves" names.

    ``addresses`` maps a host name to the address the fake resolver would return; when
    the exporter passes an ``address_check``, it is applied to that address exactly as
    the real prober does right before connecting.
    """

    def __init__(
        self,
        *,
        delay: float = 0.0,
        addresses: dict[str, str] | None = None,
        success: bool = True,
    ) -> None:
        self.delay = delay
        self.success = success
        self.addresses = addresses or {}
        self.calls: list[Call] = []
        self.running = 0
        self.max_running = 0
        self.started = asyncio.Event()
        self.release = asyncio.Event()  # set it to end every sleeping probe at once
        self.cancelled = asyncio.Event()  # set when a probe was cancelled (client gone)

    async def __call__(
        self,
        target: ProbeTarget,
        module: Module,
        timeout_seconds: float,
        *,
        ssl_context: ssl.SSLContext | None,
        record_transcript: bool,
        address_check: AddressCheck | None = None,
        delivery: DeliveryRuntime | None = None,
    ) -> ProbeResult:
        self.calls.append(Call(target, module, address_check, timeout_seconds))
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
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        finally:
            self.running -= 1
        return canned_result(target, module, success=self.success)
