"""Profile our exporter's hot path with py-spy while the benchmark load runs.

    .venv/bin/pip install py-spy      # a bench tool only, not a runtime dependency
    .venv/bin/python bench/profile.py [--module plain] [--requests 6000] [--uvloop]

Prints the functions with the most samples, by own time and by time including
callees, and leaves py-spy's collapsed stacks (flame-graph input) in the temp dir.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from certs import make_certs  # noqa: E402
from loadgen import drive  # noqa: E402
from procs import Proc  # noqa: E402
from run import HAVE_UVLOOP, MODULES, PYTHON, running, write_configs  # noqa: E402


def summarize(collapsed: Path, top: int) -> None:
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        count = int(count_text)
        frames = stack.split(";")
        samples += count
        own[frames[-1]] += count
        for frame in set(frames):
            total[frame] += count
    print(f"\n{samples} samples; top by own time:")
    for frame, count in own.most_common(top):
        print(f"  {100 * count / samples:5.1f}%  {frame}")
    print("\ntop by total time:")
    for frame, count in total.most_common(top):
        print(f"  {100 * count / samples:5.1f}%  {frame}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--module", default="plain", choices=sorted(MODULES))
    parser.add_argument("--requests", type=int, default=6000)
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--uvloop", action="store_true")
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--native", action="store_true", help="py-spy --native")
    args = parser.parse_args()
    py_spy = shutil.which("py-spy") or str(Path(PYTHON).parent / "py-spy")
    workdir = Path(tempfile.mkdtemp(prefix="pop3-profile-"))
    certs = make_certs(workdir / "certs")
    ours_config, blackbox_config = write_configs(workdir, certs)
    target_argv = [PYTHON, str(HERE / "pop3_target.py"), "--cert", str(certs.cert_file)]
    target_argv += ["--key", str(certs.key_file), "--listen", "plain=plain:0"]
    target_argv += ["--listen", "tls=tls:0"]
    if HAVE_UVLOOP:
        target_argv.append("--uvloop")  # the target's own CPU is not what we profile
    target = Proc("target", target_argv, stdout_pipe=True)
    try:
        ports = json.loads(target.read_line(20.0))["ports"]
        kind = "ours-uvloop" if args.uvloop else "ours"
        configs = {"ours": ours_config, "blackbox": blackbox_config}
        with running([kind], configs, workdir) as (exporter,):
            ours_module, _, _, listener = MODULES[args.module]
            params = {"target": f"127.0.0.1:{ports[listener]}", "module": ours_module}
            asyncio.run(drive(exporter.url, params, 300, 4))
            collapsed = workdir / "profile.txt"
            argv = [py_spy, "record", "--format", "raw", "-o", str(collapsed), "--rate", "500"]
            argv += ["--pid", str(exporter.proc.pid)] + (["--native"] if args.native else [])
            spy = Proc("py-spy", argv, log=workdir / "py-spy.log")
            try:
                asyncio.run(drive(exporter.url, params, args.requests, args.concurrency))
            finally:
                spy.signal(2)  # SIGINT: py-spy writes its output and exits
                spy.popen.wait(30)
                spy.stop()
        summarize(collapsed, args.top)
        print(f"\ncollapsed stacks: {collapsed}")
    finally:
        target.stop()
        subprocess.run(["true"], check=False)


if __name__ == "__main__":
    main()
