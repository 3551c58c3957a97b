"""How many probes one Prometheus carries, for docs/sharding.md.

    .venv/bin/python bench/prometheus_capacity.py [--sizes 400,2000] [--interval 5]
        [--samples 12,36]

Two measurements, everything on 127.0.0.1:

1. Series per probe of each module: the real exporter probes a real Dovecot
   (tests/support/dovecot.py; capabilities as Debian's Dovecot announces them)
   with pop3, pop3_starttls and pop3s, and a closed port for a failed probe.
   Prometheus adds 5 series per scrape (up, scrape_duration_seconds, ...).
2. Memory per series: real Prometheus processes, one per size, scrape SIZE
   simulated pop3s probes each (a stub serves the real exporter's pop3s body,
   with the duration values varied per scrape so that they compress as real
   ones do) through the relabelling of deploy/prometheus/sharding, and run the
   shards' rule files. The slope between the sizes, of RSS and of the Go heap,
   is the cost of one more series without the process's baseline; it is read
   twice, after the first and second --samples count of scrapes, to see how
   much the growing head chunks add (a head chunk holds up to 120 samples
   before it is written out).

Every process is started here and stopped by its PID; the run is bounded by
--samples x --interval plus start-up.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import yaml
from aiohttp import ClientSession, ClientTimeout, web

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.support import prom  # noqa: E402
from tests.support.certs import make_pki  # noqa: E402
from tests.support.dovecot import DovecotServer, stop_servers  # noqa: E402

SYNTHETIC_SERIES = 5  # up, scrape_duration_seconds, scrape_samples_*, scrape_series_added
SHARDING = REPO / "deploy" / "prometheus" / "sharding"
RULE_FILES = (
    REPO / "deploy" / "prometheus" / "rules" / "pop3_recording.yml",
    REPO / "deploy" / "prometheus" / "rules" / "pop3_thresholds.yml",
    SHARDING / "rules" / "pop3_shard.yml",
)
VARIANTS = 64  # pre-rendered bodies with different durations
READINGS = 5


def series_lines(body: str) -> list[str]:
    return [line for line in body.splitlines() if line and not line.startswith("#")]


def measure_series_per_probe(workdir: Path) -> tuple[dict[str, int], str]:
    """{module: series of one probe, Prometheus' own included}, and a pop3s body."""
    pki = make_pki(workdir / "pki")
    dovecot_root = Path(tempfile.mkdtemp(prefix="pop3exp-capacity-"))
    dovecot_root.chmod(0o755)
    dovecot = DovecotServer(dovecot_root / "dovecot", pki.variants["good"], listen=("127.0.0.1",))
    config = workdir / "exporter.yml"
    config.write_text(
        "modules:\n"
        f"  pop3s: {{tls: implicit, tls_config: {{ca_file: '{pki.ca_file}'}}}}\n"
        f"  pop3_starttls: {{tls: starttls, tls_config: {{ca_file: '{pki.ca_file}'}}}}\n"
    )
    exporter = prom.ExporterProcess(workdir / "exporter", config)
    try:
        dovecot.start()
        exporter.start()
        closed = prom.free_port()
        probes = {
            "pop3": ("pop3", dovecot.pop3_port),
            "pop3_starttls": ("pop3_starttls", dovecot.pop3_port),
            "pop3s": ("pop3s", dovecot.pop3s_port),
            "failed (connection refused)": ("pop3", closed),
        }
        counts: dict[str, int] = {}
        bodies: dict[str, str] = {}
        for name, (module, port) in probes.items():
            url = f"{exporter.url}/probe?target=127.0.0.1:{port}&module={module}"
            with urllib.request.urlopen(url, timeout=30) as response:
                bodies[name] = response.read().decode()
            counts[name] = len(series_lines(bodies[name])) + SYNTHETIC_SERIES
        assert "probe_success 1" in bodies["pop3s"], bodies["pop3s"]
        return counts, bodies["pop3s"]
    finally:
        exporter.stop()
        stop_servers([dovecot])
        shutil.rmtree(dovecot_root, ignore_errors=True)


def vary(body: str, rng: random.Random) -> str:
    """The body with its durations (not timestamps or expiries) drawn afresh."""
    lines = []
    for line in body.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if not line.startswith("#") and name.endswith("_seconds") and "expiry" not in name:
            head, _ = line.rsplit(" ", 1)
            line = f"{head} {rng.uniform(0.0005, 0.05):.6f}"
        lines.append(line)
    return "\n".join(lines) + "\n"


async def serve_stub(bodies: list[str]) -> tuple[web.AppRunner, int]:
    async def probe(request: web.Request) -> web.Response:
        return web.Response(
            text=random.choice(bodies),
            content_type="text/plain",
            charset="utf-8",
        )

    app = web.Application()
    app.router.add_get("/probe", probe)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = prom.free_port()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=4096).start()
    return runner, port


def prometheus_config(directory: Path, size: int, stub: str, interval: int) -> Path:
    """A shard-like Prometheus: SIZE pop3s targets through the sharding relabelling."""
    (directory / "rules").mkdir(parents=True)
    for rule_file in RULE_FILES:
        shutil.copyfile(rule_file, directory / "rules" / rule_file.name)
    targets = [f"pop-{i:05d}.example.invalid:995" for i in range(size)]
    (directory / "targets.yml").write_text(
        yaml.safe_dump([{"targets": targets, "labels": {"module": "pop3s"}}])
    )
    config = {
        "global": {
            "scrape_interval": f"{interval}s",
            "scrape_timeout": f"{interval}s",
            "evaluation_interval": f"{interval}s",
            "external_labels": {"shard": "0"},
        },
        "rule_files": [f"rules/{p.name}" for p in RULE_FILES],
        "scrape_configs": [
            {
                "job_name": "pop3-eu-west",
                "metrics_path": "/probe",
                "file_sd_configs": [{"files": ["targets.yml"]}],
                "relabel_configs": [
                    {"source_labels": ["__address__"], "target_label": "__param_target"},
                    {"source_labels": ["module"], "target_label": "__param_module"},
                    {"source_labels": ["__param_target"], "target_label": "instance"},
                    {"target_label": "location", "replacement": "eu-west"},
                    {"target_label": "__address__", "replacement": stub},
                ],
            }
        ],
    }
    path = directory / "prometheus.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


async def self_metrics(session: ClientSession, url: str) -> dict[str, float]:
    wanted = (
        "prometheus_tsdb_head_series",
        "process_resident_memory_bytes",
        "go_memstats_heap_inuse_bytes",
    )
    async with session.get(url + "/metrics") as response:
        text = await response.text()
    values = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in wanted:
            values[name] = float(value)
    return values


@dataclass
class Reading:
    size: int
    samples: int
    series: float
    rss: float
    heap: float


async def measure_memory(
    workdir: Path, body: str, sizes: list[int], interval: int, samples: list[int]
) -> list[Reading]:
    rng = random.Random(1)
    runner, port = await serve_stub([vary(body, rng) for _ in range(VARIANTS)])
    servers = [
        prom.PrometheusServer(
            workdir / f"prom-{size}",
            prometheus_config(workdir / f"prom-{size}", size, f"127.0.0.1:{port}", interval),
        )
        for size in sizes
    ]
    readings = []
    try:
        await asyncio.gather(*(asyncio.to_thread(s.start, 60.0) for s in servers))
        started = time.monotonic()
        async with ClientSession(timeout=ClientTimeout(total=30)) as session:
            for count in samples:
                # Target discovery applies after up to 5 s; then `count` scrapes each.
                await asyncio.sleep(max(0.0, started + 5 + count * interval - time.monotonic()))
                for size, server in zip(sizes, servers, strict=True):
                    taken = []
                    for _ in range(READINGS):
                        taken.append(await self_metrics(session, server.url))
                        await asyncio.sleep(1)
                    readings.append(
                        Reading(
                            size=size,
                            samples=count,
                            series=statistics.median(
                                t["prometheus_tsdb_head_series"] for t in taken
                            ),
                            rss=statistics.median(
                                t["process_resident_memory_bytes"] for t in taken
                            ),
                            heap=statistics.median(
                                t["go_memstats_heap_inuse_bytes"] for t in taken
                            ),
                        )
                    )
    finally:
        await asyncio.to_thread(prom.stop_all, servers)
        await runner.cleanup()
    return readings


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="400,2000", help="simulated probes per Prometheus")
    parser.add_argument("--interval", type=int, default=5, help="scrape interval, seconds")
    parser.add_argument("--samples", default="12,36", help="scrapes per target at each reading")
    args = parser.parse_args()
    sizes = sorted(int(s) for s in args.sizes.split(","))
    samples = sorted(int(s) for s in args.samples.split(","))
    if len(sizes) != 2 or len(samples) < 1:
        parser.error("--sizes takes two numbers, --samples at least one")

    with tempfile.TemporaryDirectory(prefix="pop3exp-capacity-") as tmp:
        workdir = Path(tmp)
        counts, body = measure_series_per_probe(workdir)
        print(f"{prom.binary_version(prom.prometheus_binary())}\n")
        print("| probe | series per probe, Prometheus' 5 included |\n|---|---:|")
        for name, count in counts.items():
            print(f"| {name} | {count} |")
        readings = asyncio.run(measure_memory(workdir, body, sizes, args.interval, samples))

    print(
        "\n| probes | samples per series | head series | series per probe | RSS MiB"
        " | Go heap MiB |\n|---:|---:|---:|---:|---:|---:|"
    )
    for r in readings:
        print(
            f"| {r.size} | {r.samples} | {r.series:.0f} | {r.series / r.size:.1f}"
            f" | {r.rss / 2**20:.0f} | {r.heap / 2**20:.0f} |"
        )
    print("\n| samples per series | RSS bytes per series | Go heap bytes per series |")
    print("|---:|---:|---:|")
    for count in samples:
        small, big = (
            next(r for r in readings if r.size == s and r.samples == count) for s in sizes
        )
        added = big.series - small.series
        rss, heap = (big.rss - small.rss) / added, (big.heap - small.heap) / added
        print(f"| {count} | {rss:.0f} | {heap:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
