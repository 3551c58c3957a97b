"""Instructions per probe, counted by valgrind: a CPU measure that load on the machine
does not disturb, to compare versions of the probe path (not exporters).

    .venv/bin/python bench/instructions.py [--module pop3s-nocapa] [--probes 100]
        [--source DIR ...]

For each --source (a directory holding a pop3_exporter package; default this
checkout; `git archive REV pop3_exporter | tar -x -C DIR` makes one), it runs
probe_pop3 in-process against bench/pop3_target.py (its own process, on loopback),
one probe at a time, under `valgrind --tool=cachegrind` twice (with 0 and with
--probes probes after the same warm-up) and prints the difference per probe. No HTTP,
no metrics: only resolution-free probing, TLS and the POP3 dialogue. Repeated counts
of the same source agree within about 0.2 %.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
MODULES = {
    "plain": ("tls: none", "plain"),
    "starttls": ("tls: starttls", "plain"),
    "pop3s": ("tls: implicit", "tls"),
    "pop3s-nocapa": ("tls: implicit\n    query_capabilities: false", "tls"),
}
WARM_UP = 20


def run_probes(module_name: str, probes: int, workdir: Path) -> None:
    """The measured program (under valgrind): warm-up, then `probes` probes."""
    sys.path.insert(0, str(HERE))
    from certs import make_certs
    from procs import Proc

    from pop3_exporter.config import load_config
    from pop3_exporter.prober import Pop3Prober
    from pop3_exporter.target import ProbeTarget
    from pop3_exporter.tlsinfo import build_ssl_context

    certs = make_certs(workdir / "certs")
    settings, listener = MODULES[module_name]
    config = workdir / "pop3_exporter.yml"
    config.write_text(
        f"modules:\n  m:\n    {settings}\n    timeout: 10s\n"
        f"    tls_config:\n      ca_file: {certs.ca_file}\n"
    )
    module = load_config(config).modules["m"]
    context = build_ssl_context(module.tls_config) if module.uses_tls else None
    argv = [sys.executable, str(HERE / "pop3_target.py"), "--cert", str(certs.cert_file)]
    argv += ["--key", str(certs.key_file), "--listen", f"{listener}={listener}:0"]
    target = Proc("pop3_target", argv, stdout_pipe=True)
    try:
        port = json.loads(target.read_line(20.0))["ports"][listener]
        probe_target = ProbeTarget(host="127.0.0.1", port=port, is_ip_literal=True)
        prober = Pop3Prober()

        async def probe_all(count: int) -> None:
            for _ in range(count):
                result = await prober(
                    probe_target, module, 10.0, ssl_context=context, record_transcript=False
                )
                if not result.success:
                    raise SystemExit(f"probe failed: {result.failure_detail}")

        asyncio.run(probe_all(WARM_UP))
        asyncio.run(probe_all(probes))
    finally:
        target.stop()


def count(source: Path, module: str, probes: int) -> int:
    """Instructions the whole program ran (valgrind's "I refs")."""
    with tempfile.TemporaryDirectory(prefix="pop3-instructions-") as workdir:
        argv = ["valgrind", "--tool=cachegrind", "--cache-sim=no"]
        argv += ["--cachegrind-out-file=/dev/null", sys.executable, __file__, "--run"]
        argv += ["--module", module, "--probes", str(probes), "--workdir", workdir]
        env = dict(os.environ, PYTHONPATH=str(source))
        done = subprocess.run(argv, capture_output=True, text=True, env=env, check=True)
    found = re.search(r"I\s+refs:\s+([\d,]+)", done.stderr)
    if found is None:
        raise RuntimeError(f"no instruction count from valgrind:\n{done.stderr[-2000:]}")
    return int(found.group(1).replace(",", ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--module", default="pop3s-nocapa", choices=sorted(MODULES))
    parser.add_argument("--probes", type=int, default=100)
    parser.add_argument("--source", type=Path, action="append", help="default: this checkout")
    parser.add_argument("--run", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        run_probes(args.module, args.probes, args.workdir)
        return
    if shutil.which("valgrind") is None:
        raise SystemExit("needs valgrind (apt-get install valgrind)")
    for source in args.source or [REPO]:
        baseline = count(source, args.module, 0)
        total = count(source, args.module, args.probes)
        per_probe = (total - baseline) / args.probes
        print(
            f"{source}: {args.module}: {per_probe / 1e6:.3f} M instructions per probe", flush=True
        )


if __name__ == "__main__":
    main()
