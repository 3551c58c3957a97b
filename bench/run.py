"""Benchmark pop3_exporter against blackbox_exporter on loopback; one command.

    .venv/bin/python bench/run.py [--quick] [--compare-with REV] [--uvloop]
        [--json FILE] [--plot FILE] [--markdown FILE] [--skip accuracy,memory,throughput]

It starts a cheap POP3 target (bench/pop3_target.py, its own process), our exporter,
blackbox_exporter with equivalent tcp-prober modules and, for the floor, a bare asyncio
client (bench/bare_client.py). Everything listens on 127.0.0.1 and every process is
stopped by its PID at the end. See docs/benchmarks.md for the method.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from certs import BenchCerts, make_certs  # noqa: E402
from loadgen import LoadResult, drive, percentile  # noqa: E402
from procs import Proc, free_port, wait_for_port  # noqa: E402

BLACKBOX = "/usr/bin/prometheus-blackbox-exporter"
BLACKBOX_PACKAGE = "prometheus-blackbox-exporter"
PYTHON = sys.executable
HAVE_UVLOOP = importlib.util.find_spec("uvloop") is not None

# module -> (our module, blackbox module, bare client mode, target listener)
MODULES: dict[str, tuple[str, str, str, str]] = {
    "plain": ("bench_plain", "pop3_plain", "plain", "plain"),
    "starttls": ("bench_starttls", "pop3_starttls", "stls", "plain"),
    "pop3s": ("bench_pop3s", "pop3s", "tls", "tls"),
    # Implicit TLS, greeting and QUIT only: the handshake and little else.
    "pop3s-nocapa": ("bench_pop3s_nocapa", "pop3s_nocapa", "tls-nocapa", "tls"),
}
# The long-delay listener keeps probes in flight for the memory test.
HOLD_SECONDS = 4.0
ACCURACY_DELAYS_MS = (0, 100)
ACCURACY_CONCURRENCY = (1, 100, 500)
MEMORY_IN_FLIGHT = 1000
SCALE_INTERVAL_SECONDS = 30.0
SCALE_CORE_FRACTION = 0.5
ROUND_TIME_LIMIT = 120.0


@dataclass
class Sample:
    """One measured round of one exporter on one module."""

    exporter: str
    module: str
    round: int
    probes: int
    failures: int
    wall_seconds: float
    cpu_seconds: float
    target_cpu_seconds: float
    p50_ms: float
    p99_ms: float
    first_failure: str = ""


@dataclass
class Summary:
    exporter: str
    module: str
    probes: int
    failures: int
    probes_per_second: float
    cpu_ms_per_probe: float
    cpu_ms_per_probe_rounds: list[float]
    p50_ms: float
    p99_ms: float
    peak_rss_mib: float
    target_cpu_ms_per_probe: float


@dataclass
class Results:
    machine: dict[str, str] = field(default_factory=dict)
    settings: dict[str, object] = field(default_factory=dict)
    samples: list[Sample] = field(default_factory=list)
    summaries: list[Summary] = field(default_factory=list)
    accuracy: list[dict[str, object]] = field(default_factory=list)
    memory: list[dict[str, object]] = field(default_factory=list)
    scale: list[dict[str, object]] = field(default_factory=list)
    elapsed_seconds: float = 0.0
    load_average_after: str = ""


# --- setup ---------------------------------------------------------------------------


def ensure_blackbox() -> None:
    if os.access(BLACKBOX, os.X_OK):
        return
    print("blackbox_exporter is missing; installing prometheus-blackbox-exporter with apt")
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run([*sudo, "apt-get", "update", "-q"], check=True, env=env)
    subprocess.run(
        [*sudo, "apt-get", "install", "-y", "-q", "--no-install-recommends", BLACKBOX_PACKAGE],
        check=True,
        env=env,
    )
    # Debian may start the packaged service; it must not probe anything here.
    if shutil.which("systemctl"):
        subprocess.run(
            [*sudo, "systemctl", "stop", "prometheus-blackbox-exporter"],
            check=False,
            capture_output=True,
        )


def machine_facts() -> dict[str, str]:
    model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    blackbox = subprocess.run([BLACKBOX, "--version"], capture_output=True, text=True, check=False)
    version_text = (blackbox.stdout + blackbox.stderr).splitlines()
    import aiohttp
    import prometheus_client  # noqa: F401

    from pop3_exporter import __version__

    facts = {
        "nproc": str(os.cpu_count()),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "openssl": __import__("ssl").OPENSSL_VERSION,
        "pop3_exporter": __version__,
        "blackbox_exporter": version_text[0] if version_text else "unknown",
        "load_average": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
    }
    if HAVE_UVLOOP:
        import uvloop

        facts["uvloop"] = str(getattr(uvloop, "__version__", "?"))
    return facts


def write_configs(directory: Path, certs: BenchCerts) -> tuple[Path, Path]:
    ca = str(certs.ca_file)
    ours = directory / "pop3_exporter.yml"
    ours.write_text(
        f"""modules:
  bench_plain:
    tls: none
    timeout: 10s
  bench_starttls:
    tls: starttls
    timeout: 10s
    tls_config:
      ca_file: {ca}
  bench_pop3s:
    tls: implicit
    timeout: 10s
    tls_config:
      ca_file: {ca}
  bench_pop3s_nocapa:
    tls: implicit
    timeout: 10s
    query_capabilities: false
    tls_config:
      ca_file: {ca}
"""
    )
    # The same protocol work with blackbox's tcp prober. Its "expect" reads lines until
    # one matches, so "^\\.$" consumes a CAPA reply up to its terminating dot line.
    dialogue = """        - expect: "^\\\\+OK"
        - send: "CAPA\\r"
        - expect: "^\\\\.$"
"""
    quit_ = """        - send: "QUIT\\r"
        - expect: "^\\\\+OK"
"""
    blackbox = directory / "blackbox.yml"
    blackbox.write_text(
        f"""modules:
  pop3_plain:
    prober: tcp
    timeout: 10s
    tcp:
      preferred_ip_protocol: ip4
      query_response:
{dialogue}{quit_}
  pop3_starttls:
    prober: tcp
    timeout: 10s
    tcp:
      preferred_ip_protocol: ip4
      tls_config:
        ca_file: {ca}
      query_response:
{dialogue}        - send: "STLS\\r"
        - expect: "^\\\\+OK"
        - starttls: true
        - send: "CAPA\\r"
        - expect: "^\\\\.$"
{quit_}
  pop3s:
    prober: tcp
    timeout: 10s
    tcp:
      preferred_ip_protocol: ip4
      tls: true
      tls_config:
        ca_file: {ca}
      query_response:
{dialogue}{quit_}
  pop3s_nocapa:
    prober: tcp
    timeout: 10s
    tcp:
      preferred_ip_protocol: ip4
      tls: true
      tls_config:
        ca_file: {ca}
      query_response:
        - expect: "^\\\\+OK"
{quit_}
  greeting_only:
    prober: tcp
    timeout: 10s
    tcp:
      preferred_ip_protocol: ip4
      query_response:
        - expect: "^\\\\+OK"
"""
    )
    return ours, blackbox


# "ours@REV" -> the directory holding that commit's pop3_exporter package.
REVISIONS: dict[str, Path] = {}


def extract_revision(revision: str, workdir: Path) -> str:
    """Unpack pop3_exporter/ as of `revision` (git archive; the work tree is untouched)."""
    directory = workdir / f"rev-{revision}"
    directory.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", revision, "pop3_exporter"],
        capture_output=True,
        check=True,
    )
    subprocess.run(["tar", "-x", "-C", str(directory)], input=archive.stdout, check=True)
    kind = f"ours@{revision}"
    REVISIONS[kind] = directory
    return kind


class Exporter:
    """One running exporter (ours, ours on uvloop, or blackbox) and how to probe through it."""

    def __init__(self, kind: str, proc: Proc, port: int) -> None:
        self.kind = kind
        self.proc = proc
        self.port = port
        self.url = f"http://127.0.0.1:{port}/probe"

    def module_name(self, module: str) -> str:
        ours, blackbox, _, _ = MODULES[module]
        return blackbox if self.kind == "blackbox" else ours


def start_exporter(
    kind: str, config: Path, logs: Path, extra_flags: tuple[str, ...] = ()
) -> Exporter:
    port = free_port()
    listen = f"127.0.0.1:{port}"
    if kind == "blackbox":
        argv = [
            BLACKBOX,
            f"--config.file={config}",
            f"--web.listen-address={listen}",
            "--log.level=warn",
        ]
    elif kind == "ours":
        argv = [PYTHON, "-m", "pop3_exporter"]
        argv += ["--web.listen-address", listen, "--config.file", str(config)]
        argv += ["--log.level", "warn"]
    elif kind == "ours-uvloop":
        argv = [PYTHON, str(HERE / "uvloop_exporter.py")]
        argv += ["--web.listen-address", listen, "--config.file", str(config)]
        argv += ["--log.level", "warn"]
    elif kind.startswith("ours@"):  # an earlier commit, from extract_revision()
        argv = [PYTHON, "-m", "pop3_exporter"]
        argv += ["--web.listen-address", listen, "--config.file", str(config)]
        argv += ["--log.level", "warn"]
    else:
        raise ValueError(kind)
    if kind in ("ours", "ours-uvloop"):
        argv += list(extra_flags)
    source = REVISIONS.get(kind, REPO)
    env = dict(os.environ, PYTHONPATH=str(source))
    # "python -m" puts the working directory first on sys.path: run each from its source.
    proc = Proc(kind, argv, log=logs / f"{kind}-{port}.log", env=env, cwd=source)
    wait_for_port(port, proc)
    return Exporter(kind, proc, port)


@contextmanager
def running(
    kinds: list[str],
    configs: dict[str, Path],
    logs: Path,
    extra_flags: tuple[str, ...] = (),
) -> Iterator[list[Exporter]]:
    """Start the exporters (ours get `extra_flags`); stop them all by PID afterwards."""
    exporters: list[Exporter] = []
    try:
        for kind in kinds:
            config = configs["blackbox" if kind == "blackbox" else "ours"]
            exporters.append(start_exporter(kind, config, logs, extra_flags))
        yield exporters
    finally:
        for exporter in exporters:
            exporter.proc.stop()


# --- measurements --------------------------------------------------------------------


def target_stats(target: Proc) -> dict[str, dict[str, float]]:
    """Ask the target for (and reset) its per-listener statistics."""
    target.signal(signal.SIGUSR1)
    for _ in range(10):
        message = json.loads(target.read_line(5.0))
        if "stats" in message:
            stats: dict[str, dict[str, float]] = message["stats"]
            return stats
    raise RuntimeError("the target sent no statistics")


def measure_exporter(
    exporter: Exporter,
    module: str,
    round_: int,
    target: Proc,
    ports: dict[str, int],
    requests: int,
    concurrency: int,
) -> Sample:
    listener = MODULES[module][3]
    params = {"target": f"127.0.0.1:{ports[listener]}", "module": exporter.module_name(module)}
    cpu0, tcpu0 = exporter.proc.cpu(), target.cpu()
    load = asyncio.run(
        drive(exporter.url, params, requests, concurrency, time_limit=ROUND_TIME_LIMIT)
    )
    cpu1, tcpu1 = exporter.proc.cpu(), target.cpu()
    return _sample(exporter.kind, module, round_, load, cpu1 - cpu0, tcpu1 - tcpu0)


def _sample(
    kind: str, module: str, round_: int, load: LoadResult, cpu: float, target_cpu: float
) -> Sample:
    return Sample(
        exporter=kind,
        module=module,
        round=round_,
        probes=load.requests,
        failures=load.failures,
        wall_seconds=load.wall_seconds,
        cpu_seconds=cpu,
        target_cpu_seconds=target_cpu,
        p50_ms=percentile(load.latencies, 0.5) * 1000,
        p99_ms=percentile(load.latencies, 0.99) * 1000,
        first_failure=load.first_failure[:500],
    )


def measure_bare(
    module: str, round_: int, target: Proc, ports: dict[str, int], certs: BenchCerts, args: Args
) -> Sample:
    _, _, mode, listener = MODULES[module]
    argv = [PYTHON, str(HERE / "bare_client.py"), "--port", str(ports[listener])]
    argv += ["--mode", mode, "--ca-file", str(certs.ca_file)]
    argv += ["--requests", str(args.requests[module]), "--concurrency", str(args.concurrency)]
    tcpu0 = target.cpu()
    done = subprocess.run(
        argv, capture_output=True, text=True, check=True, timeout=ROUND_TIME_LIMIT
    )
    tcpu1 = target.cpu()
    report = json.loads(done.stdout)
    return Sample(
        exporter="bare",
        module=module,
        round=round_,
        probes=int(report["probes"]),
        failures=int(report["failures"]),
        wall_seconds=float(report["wall_seconds"]),
        cpu_seconds=float(report["cpu_seconds"]),
        target_cpu_seconds=tcpu1 - tcpu0,
        p50_ms=float("nan"),
        p99_ms=float("nan"),
    )


def summarize(samples: list[Sample], peak_rss: dict[str, float]) -> list[Summary]:
    summaries = []
    keys = dict.fromkeys((s.exporter, s.module) for s in samples)
    for exporter, module in keys:
        mine = [s for s in samples if s.exporter == exporter and s.module == module]
        probes = sum(s.probes for s in mine)
        summaries.append(
            Summary(
                exporter=exporter,
                module=module,
                probes=probes,
                failures=sum(s.failures for s in mine),
                probes_per_second=probes / sum(s.wall_seconds for s in mine),
                cpu_ms_per_probe=1000 * sum(s.cpu_seconds for s in mine) / probes,
                cpu_ms_per_probe_rounds=[1000 * s.cpu_seconds / s.probes for s in mine],
                # Medians of the per-round percentiles keep one noisy round from dominating.
                p50_ms=percentile([s.p50_ms for s in mine], 0.5),
                p99_ms=percentile([s.p99_ms for s in mine], 0.5),
                peak_rss_mib=peak_rss.get(exporter, float("nan")),
                target_cpu_ms_per_probe=1000 * sum(s.target_cpu_seconds for s in mine) / probes,
            )
        )
    return summaries


def throughput(
    results: Results,
    args: Args,
    target: Proc,
    ports: dict[str, int],
    certs: BenchCerts,
    configs: dict[str, Path],
    logs: Path,
) -> None:
    for module in args.modules:
        requests = args.requests[module]
        print(f"\n== {module}: {args.rounds} rounds x {requests} requests, c={args.concurrency}")
        samples: list[Sample] = []
        with running(args.exporters, configs, logs) as exporters:
            for exporter in exporters:  # warm-up: imports, first handshakes, JIT-less caches
                measure_exporter(exporter, module, 0, target, ports, requests // 10, 4)
            if args.bare:
                measure_bare(module, 0, target, ports, certs, args)
            target_stats(target)
            for round_ in range(1, args.rounds + 1):
                # A B (C) A B (C): alternating, so that drift on the machine cancels out.
                order = list(exporters) if round_ % 2 else list(reversed(exporters))
                for exporter in order:
                    sample = measure_exporter(
                        exporter, module, round_, target, ports, requests, args.concurrency
                    )
                    samples.append(sample)
                    _progress(sample)
                if args.bare:
                    sample = measure_bare(module, round_, target, ports, certs, args)
                    samples.append(sample)
                    _progress(sample)
            peak = {e.kind: e.proc.status("VmHWM") / 1024 for e in exporters}
        results.samples.extend(samples)
        results.summaries.extend(summarize(samples, peak))


def _progress(sample: Sample) -> None:
    print(
        f"  round {sample.round} {sample.exporter:<12} {sample.probes / sample.wall_seconds:7.0f}"
        f" probes/s  {1000 * sample.cpu_seconds / sample.probes:6.3f} ms CPU/probe"
        f"  failures {sample.failures}",
        flush=True,
    )
    if sample.failures:
        print(f"    first failure: {sample.first_failure[:300]!r}")


def accuracy(
    results: Results, args: Args, target: Proc, ports: dict[str, int], configs: dict[str, Path]
) -> None:
    print("\n== greeting latency accuracy")
    kinds = [k for k in args.exporters if k != "bare"]
    with running(kinds, configs, args.logs) as exporters:
        for exporter in exporters:
            module = "bench_plain" if exporter.kind != "blackbox" else "greeting_only"
            params = {"target": f"127.0.0.1:{ports['plain']}", "module": module}
            asyncio.run(drive(exporter.url, params, 200, 4))
        for delay_ms in ACCURACY_DELAYS_MS:
            listener = "plain" if delay_ms == 0 else f"d{delay_ms}"
            for concurrency in ACCURACY_CONCURRENCY:
                requests = args.accuracy_requests(concurrency, delay_ms)
                for exporter in exporters:
                    ours = exporter.kind != "blackbox"
                    params = {
                        "target": f"127.0.0.1:{ports[listener]}",
                        "module": "bench_plain" if ours else "greeting_only",
                    }
                    metric = "probe_pop3_greeting_seconds" if ours else "probe_duration_seconds"
                    target_stats(target)
                    load = asyncio.run(
                        drive(
                            exporter.url,
                            params,
                            requests,
                            concurrency,
                            metric=metric,
                            time_limit=ROUND_TIME_LIMIT,
                        )
                    )
                    lateness = target_stats(target)[listener]
                    errors = [1000 * v - delay_ms for v in load.values]
                    row: dict[str, object] = {
                        "exporter": exporter.kind,
                        "metric": metric,
                        "delay_ms": delay_ms,
                        "concurrency": concurrency,
                        "probes": len(load.values),
                        "failures": load.failures,
                        "error_p50_ms": percentile(errors, 0.5),
                        "error_p99_ms": percentile(errors, 0.99),
                        "error_max_ms": max(errors, default=float("nan")),
                        "target_late_p99_ms": lateness["p99_ms"],
                        "target_peak_open": lateness["peak_open"],
                    }
                    results.accuracy.append(row)
                    print(
                        f"  delay {delay_ms:>3} ms  c={concurrency:<4} {exporter.kind:<12}"
                        f" error p50 {row['error_p50_ms']:7.2f} ms  p99 {row['error_p99_ms']:7.2f}"
                        f" ms  (target late p99 {lateness['p99_ms']:.2f} ms,"
                        f" failures {load.failures})",
                        flush=True,
                    )


def memory(
    results: Results, args: Args, target: Proc, ports: dict[str, int], configs: dict[str, Path]
) -> None:
    print(f"\n== memory with {MEMORY_IN_FLIGHT} probes in flight (greeting held {HOLD_SECONDS}s)")
    kinds = [k for k in args.exporters if k in ("ours", "ours-uvloop", "blackbox")]
    # Our default cap of probes in flight is below this test's 1,000.
    flags = our_flag("--web.max-concurrent-probes", str(2 * MEMORY_IN_FLIGHT))
    for kind in kinds:
        with running([kind], configs, args.logs, flags) as (exporter,):
            params = {
                "target": f"127.0.0.1:{ports['hold']}",
                "module": exporter.module_name("plain"),
            }
            # Warm up with a few ordinary probes so the baseline is a running exporter.
            plain = dict(params, target=f"127.0.0.1:{ports['plain']}")
            asyncio.run(drive(exporter.url, plain, 100, 4))
            idle_rss = exporter.proc.status("VmRSS") / 1024
            target_stats(target)
            peak_rss = asyncio.run(_drive_sampling_rss(exporter, params))
            hold = target_stats(target)["hold"]
            row: dict[str, object] = {
                "exporter": kind,
                "idle_rss_mib": idle_rss,
                "peak_rss_mib": peak_rss,
                "vm_hwm_mib": exporter.proc.status("VmHWM") / 1024,
                "peak_open_at_target": hold["peak_open"],
            }
            results.memory.append(row)
            print(
                f"  {kind:<12} idle RSS {idle_rss:6.1f} MiB, with"
                f" {hold['peak_open']:.0f} probes open at the target {peak_rss:6.1f} MiB",
                flush=True,
            )


def our_flag(flag: str, value: str) -> tuple[str, ...]:
    """(flag, value) if our exporter has that flag, else nothing."""
    done = subprocess.run(
        [PYTHON, "-m", "pop3_exporter", "--help"],
        capture_output=True,
        text=True,
        check=False,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    return (flag, value) if flag in done.stdout else ()


async def _drive_sampling_rss(exporter: Exporter, params: dict[str, str]) -> float:
    peak = 0.0
    task = asyncio.create_task(
        drive(exporter.url, params, MEMORY_IN_FLIGHT, MEMORY_IN_FLIGHT, time_limit=60.0)
    )
    while not task.done():
        peak = max(peak, exporter.proc.status("VmRSS") / 1024)
        await asyncio.sleep(0.05)
    load = await task
    if load.failures:
        print(f"    {load.failures} failures; first: {load.first_failure[:200]!r}")
    return peak


def scale(results: Results) -> None:
    for summary in results.summaries:
        if summary.exporter == "bare":
            continue
        probes_per_second = SCALE_CORE_FRACTION / (summary.cpu_ms_per_probe / 1000)
        results.scale.append(
            {
                "exporter": summary.exporter,
                "module": summary.module,
                "targets_at_30s": int(probes_per_second * SCALE_INTERVAL_SECONDS),
            }
        )


# --- output --------------------------------------------------------------------------


def render(results: Results) -> str:
    lines: list[str] = []
    by_key = {(s.exporter, s.module): s for s in results.summaries}
    modules = list(dict.fromkeys(s.module for s in results.summaries))
    for module in modules:
        lines.append(f"\n### {module}\n")
        lines.append(
            "| exporter | probes/s | CPU s / 1000 probes (per round) | p50 ms | p99 ms"
            " | peak RSS MiB | target CPU s / 1000 | failures |"
        )
        lines.append("|---|---:|---:|---:|---:|---:|---:|---:|")
        for summary in results.summaries:
            if summary.module != module:
                continue
            rounds = "/".join(f"{v:.2f}" for v in summary.cpu_ms_per_probe_rounds)
            lines.append(
                f"| {summary.exporter} | {summary.probes_per_second:.0f}"
                f" | {summary.cpu_ms_per_probe:.3f} ({rounds}) | {_num(summary.p50_ms)}"
                f" | {_num(summary.p99_ms)} | {_num(summary.peak_rss_mib, 1)}"
                f" | {summary.target_cpu_ms_per_probe:.3f} | {summary.failures} |"
            )
        ratios = []
        blackbox = by_key.get(("blackbox", module))
        bare = by_key.get(("bare", module))
        for kind in dict.fromkeys(s.exporter for s in results.summaries):
            if not kind.startswith("ours"):
                continue
            ours = by_key.get((kind, module))
            if ours is None:
                continue
            if blackbox is not None:
                cpu_ratio = ours.cpu_ms_per_probe / blackbox.cpu_ms_per_probe
                ratios.append(
                    f"{kind}/blackbox: CPU per probe {cpu_ratio:.2f}x,"
                    f" probes/s {ours.probes_per_second / blackbox.probes_per_second:.2f}x,"
                    f" p99 {ours.p99_ms / blackbox.p99_ms:.2f}x,"
                    f" peak RSS {ours.peak_rss_mib / blackbox.peak_rss_mib:.2f}x"
                )
            if bare is not None:
                ratios.append(
                    f"{kind}/bare client: CPU per probe"
                    f" {ours.cpu_ms_per_probe / bare.cpu_ms_per_probe:.2f}x"
                )
        lines.append("")
        lines.extend(f"- {r}" for r in ratios)
    if results.accuracy:
        lines.append("\n### Greeting latency error (reported minus the target's delay)\n")
        lines.append(
            "| delay ms | concurrency | exporter | metric | error p50 ms | error p99 ms"
            " | target's own lateness p99 ms | failures |"
        )
        lines.append("|---:|---:|---|---|---:|---:|---:|---:|")
        for row in results.accuracy:
            lines.append(
                f"| {row['delay_ms']} | {row['concurrency']} | {row['exporter']}"
                f" | `{row['metric']}` | {_num(row['error_p50_ms'])}"
                f" | {_num(row['error_p99_ms'])} | {_num(row['target_late_p99_ms'])}"
                f" | {row['failures']} |"
            )
    if results.memory:
        lines.append(f"\n### Memory with {MEMORY_IN_FLIGHT} probes in flight\n")
        lines.append("| exporter | idle RSS MiB | peak RSS MiB | probes open at target |")
        lines.append("|---|---:|---:|---:|")
        for row in results.memory:
            lines.append(
                f"| {row['exporter']} | {_num(row['idle_rss_mib'], 1)}"
                f" | {_num(row['peak_rss_mib'], 1)} | {row['peak_open_at_target']} |"
            )
    if results.scale:
        lines.append(
            f"\n### Targets per exporter at a {SCALE_INTERVAL_SECONDS:.0f} s interval"
            f" within {SCALE_CORE_FRACTION:.0%} of one core (from CPU per probe)\n"
        )
        lines.append("| exporter | " + " | ".join(modules) + " |")
        lines.append("|---|" + "---:|" * len(modules))
        kinds = list(dict.fromkeys(str(r["exporter"]) for r in results.scale))
        for kind in kinds:
            cells = []
            for module in modules:
                found = [
                    r for r in results.scale if r["exporter"] == kind and r["module"] == module
                ]
                cells.append(f"{found[0]['targets_at_30s']:,}" if found else "")
            lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _num(value: object, digits: int = 2) -> str:
    if not isinstance(value, int | float) or value != value:
        return "-"
    return f"{value:.{digits}f}"


# --- main ----------------------------------------------------------------------------


@dataclass
class Args:
    quick: bool
    rounds: int
    concurrency: int
    modules: list[str]
    exporters: list[str]
    bare: bool
    requests: dict[str, int]
    logs: Path
    scale_factor: float

    def accuracy_requests(self, concurrency: int, delay_ms: int) -> int:
        if concurrency == 1:
            count = 40 if delay_ms else 200
        else:
            count = 4 * concurrency if delay_ms else 10 * concurrency
        return max(concurrency, int(count * self.scale_factor))


def parse_args() -> tuple[argparse.Namespace, Args, Path]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests (about a minute)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per exporter (>= 2)")
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--modules", default="plain,starttls,pop3s,pop3s-nocapa")
    parser.add_argument("--uvloop", action="store_true", help="also measure our exporter on uvloop")
    parser.add_argument(
        "--compare-with",
        metavar="REV",
        help="also measure our exporter as of this git commit (before/after in one run)",
    )
    parser.add_argument("--no-bare", action="store_true", help="skip the bare asyncio client")
    parser.add_argument("--skip", default="", help="comma list of: accuracy,memory,throughput")
    parser.add_argument("--json", type=Path, help="write all results here")
    parser.add_argument("--plot", type=Path, help="write a PNG plot here (needs matplotlib)")
    parser.add_argument("--markdown", type=Path, help="write the tables here")
    parser.add_argument("--keep-logs", action="store_true")
    ns = parser.parse_args()
    if ns.rounds < 2:
        parser.error("--rounds must be at least 2 (A B A B)")
    factor = 0.25 if ns.quick else 1.0
    base = {"plain": 4000, "starttls": 2000, "pop3s": 2000, "pop3s-nocapa": 2000}
    exporters = ["ours"]
    if ns.uvloop:
        if not HAVE_UVLOOP:
            parser.error("--uvloop needs uvloop in this venv (pip install uvloop)")
        exporters.append("ours-uvloop")
    workdir = Path(tempfile.mkdtemp(prefix="pop3-bench-"))
    if ns.compare_with:
        exporters.append(extract_revision(ns.compare_with, workdir))
    exporters.append("blackbox")
    args = Args(
        quick=ns.quick,
        rounds=ns.rounds,
        concurrency=ns.concurrency,
        modules=[m for m in ns.modules.split(",") if m],
        exporters=exporters,
        bare=not ns.no_bare,
        requests={m: max(100, int(n * factor)) for m, n in base.items()},
        logs=workdir / "logs",
        scale_factor=0.5 if ns.quick else 1.0,
    )
    for module in args.modules:
        if module not in MODULES:
            parser.error(f"unknown module {module}")
    return ns, args, workdir


def main() -> int:
    ns, args, workdir = parse_args()
    skip = set(filter(None, ns.skip.split(",")))
    began = time.monotonic()
    ensure_blackbox()
    args.logs.mkdir(parents=True)
    certs = make_certs(workdir / "certs")
    ours_config, blackbox_config = write_configs(workdir, certs)
    configs = {"ours": ours_config, "blackbox": blackbox_config}
    results = Results(machine=machine_facts())
    results.settings = {
        "rounds": args.rounds,
        "concurrency": args.concurrency,
        "requests_per_round": args.requests,
        "exporters": args.exporters,
    }
    print("machine:", json.dumps(results.machine))
    target_argv = [PYTHON, str(HERE / "pop3_target.py")]
    target_argv += ["--cert", str(certs.cert_file), "--key", str(certs.key_file)]
    target_argv += ["--listen", "plain=plain:0", "--listen", "tls=tls:0"]
    target_argv += [f"--listen=d{d}=plain:{d}" for d in ACCURACY_DELAYS_MS if d]
    target_argv += [f"--listen=hold=plain:{HOLD_SECONDS * 1000:.0f}"]
    if HAVE_UVLOOP:
        target_argv.append("--uvloop")  # the target's own CPU is not what we compare
    with ExitStack() as stack:
        target = Proc("pop3_target", target_argv, stdout_pipe=True, log=args.logs / "target.log")
        stack.callback(target.stop)
        ports: dict[str, int] = json.loads(target.read_line(20.0))["ports"]
        if "throughput" not in skip:
            throughput(results, args, target, ports, certs, configs, args.logs)
            scale(results)
        if "accuracy" not in skip:
            # Its own target: plain asyncio, greetings written by a timing thread.
            precise_argv = [PYTHON, str(HERE / "pop3_target.py"), "--precise"]
            precise_argv += ["--cert", str(certs.cert_file), "--key", str(certs.key_file)]
            precise_argv += ["--listen", "plain=plain:0"]
            precise_argv += [f"--listen=d{d}=plain:{d}" for d in ACCURACY_DELAYS_MS if d]
            precise = Proc(
                "pop3_target_precise", precise_argv, stdout_pipe=True, log=args.logs / "precise.log"
            )
            stack.callback(precise.stop)
            precise_ports: dict[str, int] = json.loads(precise.read_line(20.0))["ports"]
            accuracy(results, args, precise, precise_ports, configs)
        if "memory" not in skip:
            memory(results, args, target, ports, configs)
    results.elapsed_seconds = time.monotonic() - began
    results.load_average_after = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    tables = render(results)
    print(tables)
    print(
        f"\nfinished in {results.elapsed_seconds:.0f} s; load average before"
        f" {results.machine['load_average']}, after {results.load_average_after}"
        + (f"; logs in {args.logs}" if ns.keep_logs else "")
    )
    if ns.json:
        ns.json.write_text(json.dumps(asdict(results), indent=1, default=str))
    if ns.markdown:
        ns.markdown.write_text(tables + "\n")
    if ns.plot:
        from plot import plot

        plot(asdict(results), ns.plot)
    if not ns.keep_logs:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
