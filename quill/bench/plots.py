"""PNG charts of a report: output throughput, and TTFT percentiles, against the swept level.
Every run of the report (the main server and those from --compare) is drawn on the same axes."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display, and no GUI toolkit needed
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

_PERCENTILE_STYLES = {"p50": "-", "p90": "--", "p99": ":"}


def _x_axis(runs: list[dict]) -> tuple[str, str]:
    """The level key and axis label: request rate when the runs swept rates, else concurrency."""
    if any(level["rate"] is not None for run in runs for level in run["levels"]):
        return "rate", "request rate (requests/s, Poisson arrivals)"
    return "concurrency", "concurrent requests"


def _axes(runs: list[dict], title: str, ylabel: str):
    key, xlabel = _x_axis(runs)
    figure, axes = plt.subplots(figsize=(7, 4.5), layout="constrained")
    levels = sorted({level[key] for run in runs for level in run["levels"]})
    if key == "concurrency" and len(levels) > 1:
        axes.set_xscale("log", base=2)  # 1, 4, 16, 32 spread evenly
    axes.set_xticks(levels, [f"{level:g}" for level in levels])
    axes.minorticks_off()
    axes.set(title=title, xlabel=xlabel, ylabel=ylabel)
    axes.grid(True, alpha=0.3)
    return figure, axes, key


def plot_throughput(runs: list[dict], path: Path) -> Path:
    figure, axes, key = _axes(runs, "Output throughput", "output tokens/s")
    for run in runs:
        levels = run["levels"]
        axes.plot([level[key] for level in levels], [level["output_tokens_per_s"] for level in levels],
                  marker="o", label=run["label"])
    axes.set_ylim(bottom=0)
    axes.legend()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def plot_ttft(runs: list[dict], path: Path) -> Path:
    slo_ms = runs[0]["slo"]["ttft_s"] * 1000
    figure, axes, key = _axes(runs, "Time to first token", "TTFT (ms)")
    for index, run in enumerate(runs):
        color = f"C{index}"
        levels = run["levels"]
        for point, style in _PERCENTILE_STYLES.items():
            values = [level["ttft_s"][point] for level in levels]
            axes.plot([level[key] for level, value in zip(levels, values) if value is not None],
                      [value * 1000 for value in values if value is not None],
                      linestyle=style, marker="o", color=color, label=f"{run['label']} {point}")
    axes.axhline(slo_ms, color="gray", linewidth=1, label=f"SLO {slo_ms:.0f} ms")
    axes.set_yscale("log")  # queueing makes TTFT span orders of magnitude
    axes.legend(fontsize="small")
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def plot_report(runs: list[dict], directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    return [plot_throughput(runs, directory / "throughput.png"), plot_ttft(runs, directory / "ttft.png")]
