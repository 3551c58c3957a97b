"""How the HTTP side serves probes: settings from the command line, in a module of
their own so that the command line can read their defaults without importing the
web server (the `probe` command starts faster without it)."""

from __future__ import annotations

from dataclasses import dataclass

from pop3_exporter.history import DEFAULT_HISTORY_LIMIT, DEFAULT_MAX_BYTES, DEFAULT_MAX_ENTRY_BYTES


@dataclass(frozen=True, slots=True)
class Settings:
    timeout_offset: float = 0.5
    # Probes allowed in flight at once (0: no limit). Each probe holds two file
    # descriptors (the request's connection and the POP3 socket), so 500 stays well
    # under the usual soft limit of 1024 descriptors, yet allows 50 new probes per
    # second against targets that all run into a 10 s timeout.
    max_concurrent_probes: int = 500
    # The landing page's probe history (history.py): how many probes, and how many
    # bytes all of them and each one may take. 0 probes: no history.
    history_limit: int = DEFAULT_HISTORY_LIMIT
    history_max_bytes: int = DEFAULT_MAX_BYTES
    history_max_entry_bytes: int = DEFAULT_MAX_ENTRY_BYTES
