"""The offered load: an aiohttp client with fixed concurrency and a fixed request count."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import aiohttp

REQUEST_TIMEOUT = 30.0


@dataclass
class LoadResult:
    requests: int
    wall_seconds: float
    latencies: list[float] = field(default_factory=list)
    failures: int = 0  # HTTP errors, or probe_success not 1
    # The value of the metric asked for, per successful scrape.
    values: list[float] = field(default_factory=list)
    first_failure: str = ""


def metric_value(body: str, name: str) -> float | None:
    prefix = name + " "
    for line in body.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix) :])
    return None


async def drive(
    url: str,
    params: dict[str, str],
    requests: int,
    concurrency: int,
    *,
    metric: str | None = None,
    time_limit: float = 300.0,
) -> LoadResult:
    """Send `requests` GETs with `concurrency` in flight; bounded by `time_limit`."""
    result = LoadResult(requests=requests, wall_seconds=0.0)
    remaining = requests
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                start = time.perf_counter()
                try:
                    async with session.get(url, params=params) as response:
                        body = await response.text()
                        status = response.status
                except (aiohttp.ClientError, TimeoutError) as exc:
                    result.failures += 1
                    result.first_failure = result.first_failure or repr(exc)
                    continue
                result.latencies.append(time.perf_counter() - start)
                if status != 200 or metric_value(body, "probe_success") != 1.0:
                    result.failures += 1
                    result.first_failure = result.first_failure or body[:2000]
                    continue
                if metric is not None:
                    value = metric_value(body, metric)
                    if value is not None:
                        result.values.append(value)

        began = time.perf_counter()
        async with asyncio.timeout(time_limit):
            await asyncio.gather(*(worker() for _ in range(concurrency)))
        result.wall_seconds = time.perf_counter() - began
    return result


def percentile(values: list[float], fraction: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]
