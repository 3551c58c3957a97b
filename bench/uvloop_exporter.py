"""Run pop3_exporter's unchanged main() on uvloop, to measure what uvloop would buy."""

from __future__ import annotations

import asyncio
import sys

import uvloop

from pop3_exporter.cli import main

if __name__ == "__main__":
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    sys.exit(main())
