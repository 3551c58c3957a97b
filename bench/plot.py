"""The benchmark's PNG: CPU per probe by module, and greeting-latency error by load.

.venv/bin/pip install matplotlib      # for the bench only, not a runtime dependency
.venv/bin/python bench/plot.py RESULTS.json OUT.png   (run.py --plot does the same)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

COLORS = {
    "ours": "#1f77b4",
    "before": "#aec7e8",
    "ours-uvloop": "#17becf",
    "blackbox": "#ff7f0e",
    "bare": "#7f7f7f",
}
LABELS = {
    "ours": "pop3_exporter",
    "ours-uvloop": "pop3_exporter on uvloop",
    "blackbox": "blackbox_exporter",
    "bare": "bare asyncio client (no HTTP)",
}


def _color(exporter: str) -> str:
    if exporter.startswith("ours@"):
        return COLORS["before"]
    return COLORS.get(exporter, "#333333")


def _label(exporter: str) -> str:
    if exporter.startswith("ours@"):
        return f"pop3_exporter as of {exporter[5:]}"
    return LABELS.get(exporter, exporter)


def plot(results: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summaries = results["summaries"]
    modules = list(dict.fromkeys(s["module"] for s in summaries))
    exporters = list(dict.fromkeys(s["exporter"] for s in summaries))
    figure, (cpu_axes, error_axes) = plt.subplots(1, 2, figsize=(12, 4.8))

    width = 0.8 / max(1, len(exporters))
    for index, exporter in enumerate(exporters):
        xs, heights, low, high = [], [], [], []
        for position, module in enumerate(modules):
            found = [s for s in summaries if s["exporter"] == exporter and s["module"] == module]
            if not found:
                continue
            summary = found[0]
            rounds = summary["cpu_ms_per_probe_rounds"] or [summary["cpu_ms_per_probe"]]
            xs.append(position + (index - (len(exporters) - 1) / 2) * width)
            heights.append(summary["cpu_ms_per_probe"])
            low.append(summary["cpu_ms_per_probe"] - min(rounds))
            high.append(max(rounds) - summary["cpu_ms_per_probe"])
        cpu_axes.bar(
            xs,
            heights,
            width,
            yerr=[low, high],
            capsize=3,
            color=_color(exporter),
            label=_label(exporter),
        )
    cpu_axes.set_xticks(range(len(modules)), modules)
    cpu_axes.set_ylabel("CPU ms per probe (user + system)")
    cpu_axes.set_title("Exporter CPU per probe (bar: all rounds; whiskers: range of rounds)")
    cpu_axes.legend(fontsize="small")
    cpu_axes.grid(axis="y", alpha=0.3)

    accuracy = results["accuracy"]
    styles = {0: ":", 100: "-"}
    for exporter in dict.fromkeys(row["exporter"] for row in accuracy):
        for delay in sorted({row["delay_ms"] for row in accuracy}):
            rows = [r for r in accuracy if r["exporter"] == exporter and r["delay_ms"] == delay]
            rows.sort(key=lambda r: r["concurrency"])
            error_axes.plot(
                [r["concurrency"] for r in rows],
                [max(0.01, r["error_p99_ms"]) for r in rows],
                styles.get(delay, "--"),
                marker="o",
                color=_color(exporter),
                label=f"{_label(exporter)}, greeting after {delay} ms",
            )
    error_axes.axhline(5, color="red", linewidth=0.8, alpha=0.6)
    error_axes.text(1, 5.5, "5 ms", color="red", fontsize="small")
    error_axes.set_xscale("log")
    error_axes.set_yscale("log")
    error_axes.set_xlabel("probes in flight (loader concurrency)")
    error_axes.set_ylabel("p99 error of reported greeting time, ms")
    error_axes.set_title("Greeting latency error (ours: greeting_seconds; blackbox: duration)")
    error_axes.legend(fontsize="x-small")
    error_axes.grid(alpha=0.3, which="both")

    machine = results.get("machine", {})
    figure.suptitle(
        f"pop3_exporter {machine.get('pop3_exporter', '?')} vs"
        f" {machine.get('blackbox_exporter', 'blackbox_exporter')};"
        f" {machine.get('nproc', '?')} x {machine.get('cpu_model', '?')}",
        fontsize="small",
    )
    figure.tight_layout()
    figure.savefig(out, dpi=110)
    plt.close(figure)


def main() -> None:
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    plot(json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2]))


if __name__ == "__main__":
    main()
