"""Every address behind a name (module key ``ip_protocol: all``): which addresses are
probed, running their probes side by side, and one result made of theirs.

The prober resolves the name once and runs its ordinary single-address probe for each
address chosen here, as an IP-literal target; ``single_address_module`` keeps the name
for TLS (SNI and certificate verification) and for the login, as if the name had
resolved to that address alone. ``merge`` then makes the one immutable ProbeResult:
``success`` only when every address succeeded, the per-address outcomes, and otherwise
the facts of the worst address.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace

from pop3_exporter.config import AddressSelection, Module
from pop3_exporter.resolver import Address
from pop3_exporter.result import (
    AddressesProbed,
    AddressOutcome,
    DaneFacts,
    Phase,
    ProbeResult,
    TranscriptLine,
)

# Names with more addresses are probed on this many (taken from both families in
# turn) and the rest only counted (probe_pop3_addresses_skipped): the per-address
# series, connections and file descriptors of one probe stay bounded whatever a DNS
# zone holds. Real mail hosts have one or two of each family.
MAX_ADDRESSES = 16

_PHASE_ORDER = {phase: index for index, phase in enumerate(Phase)}


def choose(answers: Sequence[Address], cap: int = MAX_ADDRESSES) -> tuple[list[Address], int]:
    """The addresses to probe, in the resolver's order, without duplicates, and how
    many distinct addresses there were; past the cap the families take turns, so that
    neither crowds the other out."""
    unique: list[Address] = []
    for family, address in answers:
        pair = (family, _canonical(address))
        if pair not in unique:
            unique.append(pair)
    if len(unique) <= cap:
        return unique, len(unique)
    by_family = [[a for a in unique if a[0] == f] for f in (socket.AF_INET6, socket.AF_INET)]
    taken: set[Address] = set()
    turn = 0
    while len(taken) < cap:
        queue = by_family[turn % 2]
        if queue:
            taken.add(queue.pop(0))
        elif not by_family[(turn + 1) % 2]:
            break
        turn += 1
    return [pair for pair in unique if pair in taken], len(unique)


def _canonical(address: str) -> str:
    # One spelling per address (::0:1 and ::1 are the same series).
    try:
        return ipaddress.ip_address(address).compressed
    except ValueError:
        return address


def single_address_module(module: Module, host: str) -> Module:
    """The module each address is probed with: one address, the name for TLS."""
    return replace(
        module,
        ip_protocol=AddressSelection.PREFERRED,
        tls_config=replace(module.tls_config, server_name=module.tls_config.server_name or host),
    )


async def run_all(
    addresses: Sequence[str], probe: Callable[[str], Awaitable[ProbeResult]]
) -> list[ProbeResult]:
    """Every address's probe at once. A probe raises only for what is no failure of the
    target (the policy, a credential file gone, a bug): that exception is raised as it
    is, not in a group, and the other probes are cancelled."""
    tasks = [asyncio.ensure_future(probe(address)) for address in addresses]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def worst(results: Sequence[ProbeResult]) -> int:
    """Index of the result the shared metrics describe: a failed address before any
    that succeeded; among failed ones, the one that got least far (the earliest
    phase); among successful ones, the slowest; then the resolver's order."""

    def badness(index: int) -> tuple[int, int, float, int]:
        result = results[index]
        if not result.success:
            phase = -1 if result.failed_phase is None else _PHASE_ORDER[result.failed_phase]
            return (0, phase, 0.0, index)
        return (1, 0, -result.duration_seconds, index)

    return min(range(len(results)), key=badness)


def merge_dane(facts: Sequence[DaneFacts | None]) -> DaneFacts | None:
    """One verdict for the name: the shared lookup's answer, and a match only when every
    address that presented a certificate matched."""
    known = [fact for fact in facts if fact is not None]
    if not known:
        return None
    compared = [fact for fact in known if fact.match is not None]
    if not compared:
        return known[0]
    failed = [fact for fact in compared if not fact.match]
    return failed[0] if failed else compared[0]


def merge_legacy(results: Sequence[ProbeResult]) -> tuple[tuple[str, bool], ...]:
    """A legacy TLS version is accepted by the name when any address accepted it, and
    known when any address answered."""
    accepted: dict[str, bool] = {}
    for result in results:
        for version, ok in result.legacy_tls_versions:
            accepted[version] = accepted.get(version, False) or ok
    return tuple(accepted.items())


def merge(
    base: ProbeResult,
    chosen: Sequence[Address],
    results: Sequence[ProbeResult],
    resolved: int,
    launched: float,
    duration: float,
) -> ProbeResult:
    """One result from the resolution (``base``: the name's lookup, its time and
    transcript) and each address's probe, launched ``launched`` seconds after the start."""
    outcomes = tuple(
        AddressOutcome(
            address=address,
            ip_protocol=6 if family == socket.AF_INET6 else 4,
            success=result.success,
            failure_reason=result.failure_reason,
            duration_seconds=result.duration_seconds,
        )
        for (family, address), result in zip(chosen, results, strict=True)
    )
    index = worst(results)
    picked = results[index]
    transcript = list(base.transcript)
    if base.transcript or any(result.transcript for result in results):
        for (_, address), result in zip(chosen, results, strict=True):
            transcript.append(TranscriptLine(launched, "*", f"--- address {address} ---"))
            transcript.extend(
                replace(line, offset_seconds=line.offset_seconds + launched)
                for line in result.transcript
            )
    resolve = tuple((phase, s) for phase, s in base.phase_durations if phase is Phase.RESOLVE)
    phases = resolve + tuple(
        (phase, s) for phase, s in picked.phase_durations if phase is not Phase.RESOLVE
    )
    detail = picked.failure_detail
    return replace(
        picked,
        target=base.target,
        module_name=base.module_name,
        timeout_seconds=base.timeout_seconds,
        duration_seconds=duration,
        failure_detail=f"{chosen[index][1]}: {detail}" if detail is not None else None,
        phase_durations=phases,
        dns_lookup_seconds=base.dns_lookup_seconds,
        transcript=tuple(transcript),
        legacy_tls_versions=merge_legacy(results),
        dane=merge_dane([result.dane for result in results]),
        addresses=AddressesProbed(outcomes, resolved),
    )
