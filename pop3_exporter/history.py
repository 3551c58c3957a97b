"""The probe history of the landing page: the last probes, each with what its debug
report is rendered from, in memory bounded by count and by bytes.

An entry keeps the probe's immutable ProbeResult (with the transcript the prober
recorded) and the Module it ran with, not the rendered report: rendering a report
costs more CPU than a whole plain probe, and most reports are never opened. The report
is rendered when it is viewed, with the probe's own end time, so it is the text that
``/probe?debug=true`` returned (or would have returned) for that probe.
"""

from __future__ import annotations

import dataclasses
import itertools
import sys
from collections import deque
from dataclasses import dataclass

from pop3_exporter.config import Module
from pop3_exporter.result import (
    AddressesProbed,
    AddressOutcome,
    CertFacts,
    DaneFacts,
    FailureReason,
    ProbeResult,
    TranscriptLine,
)

DEFAULT_HISTORY_LIMIT = 100
# One entry may take this much memory; a longer transcript is cut to fit. Against a
# real Dovecot a plain probe's entry counts about 7 KiB, a TLS probe's 11-13 KiB,
# while the prober's own caps (1000 lines, 64 Ki characters) let one transcript reach
# about 200 KiB.
DEFAULT_MAX_ENTRY_BYTES = 64 * 1024
# All entries together; with the default limit of 100 this only binds when many
# transcripts are long. The oldest entries go first.
DEFAULT_MAX_BYTES = 4 * 1024 * 1024

# An upper bound on a ProbeResult's fixed-size parts: the object, its floats and small
# tuples (phase durations), capabilities, mailbox and delivery facts. Strings and
# transcript lines, which vary, are counted one by one (result_bytes).
_RESULT_FIXED_BYTES = 4096
# A HistoryEntry and its place in the deque and the id index.
_ENTRY_FIXED_BYTES = 512
# A str of n characters takes _ASCII_STR_BYTES + n when all are ASCII, at most
# _WIDE_STR_BYTES + 4n otherwise. (len() and isascii() cost next to nothing; calling
# sys.getsizeof for every line would cost more than recording the transcript.)
_ASCII_STR_BYTES = sys.getsizeof("")
_WIDE_STR_BYTES = sys.getsizeof("\U0001f600") - 4
# The table shows this much of a failure detail (details quote servers only in part,
# and nothing else caps them).
MAX_ROW_DETAIL_CHARS = 1024
# What a row's own strings may take besides the result: its target (ASCII, at most
# 300 characters plus brackets and port) and a cut detail.
_MAX_ROW_BYTES = _ASCII_STR_BYTES + 320 + _WIDE_STR_BYTES + 4 * (MAX_ROW_DETAIL_CHARS + 3)
# The smallest per-entry bound: room for a row whose result is not kept.
MIN_ENTRY_BYTES = _ENTRY_FIXED_BYTES + _MAX_ROW_BYTES
# A TranscriptLine besides its text: the object, its float offset, the tuple's slot.
_LINE_FIXED_BYTES = sys.getsizeof(TranscriptLine(0.0, "C", "")) + sys.getsizeof(0.5) + 8
# A CertFacts besides its strings: the object, two floats, an int, the chain's slot.
_CERT_FIXED_BYTES = (
    sys.getsizeof(
        CertFacts(
            subject="",
            issuer="",
            serial_number="",
            fingerprint_sha256="",
            subject_alternative_names=(),
            not_before=0.0,
            not_after=0.0,
            key_algorithm="",
            key_bits=None,
            signature_algorithm="",
        )
    )
    + 2 * sys.getsizeof(0.5)
    + sys.getsizeof(2**20)
    + 8
)


# The DANE verdict besides its strings: the object and its int.
_DANE_FIXED_BYTES = sys.getsizeof(DaneFacts("", 0, False, None)) + sys.getsizeof(2**20)
# ip_protocol: all: the outcomes' container, and each outcome besides its address: the
# object, its float, the tuple's slot.
_ADDRESSES_FIXED_BYTES = sys.getsizeof(AddressesProbed((), 0)) + sys.getsizeof(2**20)
_OUTCOME_FIXED_BYTES = (
    sys.getsizeof(AddressOutcome("", 4, True, None, 0.0)) + sys.getsizeof(0.5) + 8
)


def _text_bytes(text: str | None) -> int:
    if text is None:
        return 0
    if text.isascii():
        return _ASCII_STR_BYTES + len(text)
    return _WIDE_STR_BYTES + 4 * len(text)


def _cert_bytes(cert: CertFacts) -> int:
    names = cert.subject_alternative_names
    return (
        _CERT_FIXED_BYTES
        + _text_bytes(cert.subject)
        + _text_bytes(cert.issuer)
        + _text_bytes(cert.serial_number)
        + _text_bytes(cert.fingerprint_sha256)
        + _text_bytes(cert.key_algorithm)
        + _text_bytes(cert.signature_algorithm)
        + sys.getsizeof(names)
        + sum(_text_bytes(name) for name in names)
    )


def _line_bytes(line: TranscriptLine) -> int:
    return _LINE_FIXED_BYTES + _text_bytes(line.text)


def transcript_bytes(transcript: tuple[TranscriptLine, ...]) -> int:
    # The tuple's slots are in _LINE_FIXED_BYTES.
    return sys.getsizeof(()) + sum(_line_bytes(line) for line in transcript)


def result_bytes(result: ProbeResult) -> int:
    """An upper bound on the memory ``result`` holds (tests compare it with the real
    size). Certificate facts are shared between probes of one chain, yet counted for
    each: an upper bound needs no bookkeeping."""
    size = _RESULT_FIXED_BYTES + transcript_bytes(result.transcript)
    for text in (result.target, result.failure_detail, result.address, result.greeting):
        size += _text_bytes(text)
    if result.capabilities is not None:
        size += sum(_text_bytes(name) for name in result.capabilities.sasl_mechanisms)
    tls = result.tls
    if tls is not None:
        size += _text_bytes(tls.verify_error) + _text_bytes(tls.version) + _text_bytes(tls.cipher)
        size += sum(_cert_bytes(cert) for cert in tls.presented_chain + tls.verified_chain)
    dane = result.dane
    if dane is not None:
        size += _DANE_FIXED_BYTES + sum(
            _text_bytes(text) for text in (dane.name, dane.matched, dane.problem)
        )
    if result.addresses is not None:
        outcomes = result.addresses.outcomes
        size += _ADDRESSES_FIXED_BYTES + sys.getsizeof(outcomes)
        size += sum(_OUTCOME_FIXED_BYTES + _text_bytes(o.address) for o in outcomes)
    return size


def _cut_note(kept: int, total: int) -> str:
    return f"transcript cut to {kept} of {total} lines for the probe history"


def _fit(result: ProbeResult, max_bytes: int) -> tuple[ProbeResult | None, int]:
    """``result`` and its size, or a copy with the transcript cut (its first lines and
    a note) to fit ``max_bytes``; (None, 0) when even the rest of the result is over."""
    size = result_bytes(result)
    if size <= max_bytes:
        return result, size
    lines = result.transcript
    rest = size - transcript_bytes(lines)
    note_bytes = _LINE_FIXED_BYTES + sys.getsizeof(_cut_note(len(lines), len(lines)))
    budget = max_bytes - rest - sys.getsizeof(()) - note_bytes
    if budget < 0:
        return None, 0
    kept = 0
    for line in lines:
        budget -= _line_bytes(line)
        if budget < 0:
            break
        kept += 1
    note = TranscriptLine(lines[-1].offset_seconds, "!", _cut_note(kept, len(lines)))
    cut = dataclasses.replace(result, transcript=(*lines[:kept], note))
    return cut, result_bytes(cut)


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    """One probe of the history: its table row, and what its report is rendered from."""

    id: int
    finished: float  # unix seconds
    target: str
    module_name: str
    success: bool
    failure_reason: FailureReason | None
    failure_detail: str | None
    duration_seconds: float
    # None when the result alone was over the per-entry byte bound; the row stays.
    result: ProbeResult | None
    # The module as it was when the probe ran: a reload later does not change it.
    module: Module
    size_bytes: int

    @property
    def started(self) -> float:
        return self.finished - self.duration_seconds


class ProbeHistory:
    """The last ``limit`` probes (0: none, and no transcript recorded for it), at most
    ``max_bytes`` together and ``max_entry_bytes`` each; oldest dropped first.

    One per application (created by http.create_app); entries are immutable, ids count
    up from 1 and are never reused.
    """

    def __init__(
        self,
        limit: int = DEFAULT_HISTORY_LIMIT,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_entry_bytes: int = DEFAULT_MAX_ENTRY_BYTES,
    ) -> None:
        if limit < 0:
            raise ValueError(f"history limit must be >= 0, not {limit}")
        if not MIN_ENTRY_BYTES <= max_entry_bytes <= max_bytes:
            raise ValueError(
                f"need {MIN_ENTRY_BYTES} <= max_entry_bytes ({max_entry_bytes})"
                f" <= max_bytes ({max_bytes})"
            )
        self.limit = limit
        self.max_bytes = max_bytes
        self.max_entry_bytes = max_entry_bytes
        self.size_bytes = 0
        self._entries: deque[HistoryEntry] = deque()
        self._by_id: dict[int, HistoryEntry] = {}
        self._ids = itertools.count(1)

    @property
    def enabled(self) -> bool:
        return self.limit > 0

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, result: ProbeResult, module: Module, finished: float) -> HistoryEntry | None:
        """Keep this probe (None when the history is off); ``finished`` is the wall
        clock time the probe ended."""
        if not self.enabled:
            return None
        kept, size = _fit(result, self.max_entry_bytes - _ENTRY_FIXED_BYTES - _MAX_ROW_BYTES)
        detail = result.failure_detail
        if detail is not None and len(detail) > MAX_ROW_DETAIL_CHARS:
            detail = detail[:MAX_ROW_DETAIL_CHARS] + "..."
        size += _ENTRY_FIXED_BYTES
        if kept is None:
            # Then the row's strings are all that the entry holds.
            size += _text_bytes(result.target) + _text_bytes(detail)
        elif detail is not result.failure_detail:
            size += _text_bytes(detail)
        entry = HistoryEntry(
            id=next(self._ids),
            finished=finished,
            target=result.target,
            module_name=result.module_name,
            success=result.success,
            failure_reason=result.failure_reason,
            failure_detail=detail,
            duration_seconds=result.duration_seconds,
            result=kept,
            module=module,
            size_bytes=size,
        )
        self._entries.append(entry)
        self._by_id[entry.id] = entry
        self.size_bytes += entry.size_bytes
        # The new entry always stays: it is within max_entry_bytes <= max_bytes.
        while len(self._entries) > self.limit or self.size_bytes > self.max_bytes:
            old = self._entries.popleft()
            del self._by_id[old.id]
            self.size_bytes -= old.size_bytes
        return entry

    def get(self, entry_id: int) -> HistoryEntry | None:
        return self._by_id.get(entry_id)

    def newest_first(self) -> list[HistoryEntry]:
        return list(reversed(self._entries))
