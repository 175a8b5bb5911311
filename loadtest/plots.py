"""Plots of load-generator reports (matplotlib, files only: the Agg backend, no display).

- `latency_cdfs(reports, out_dir)`: TTFT, inter-token and end-to-end latency CDFs, one line a
  report (from each report's raw samples).
- `throughput_vs(reports, key, out_dir)`: output tokens/s and TTFT p99 against a workload
  setting that differs between the reports: the number of adapters (`tenants`) or the request
  rate (`rate`), one point a report.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

AXES = {"tenants": "adapters (tenants)", "rate": "request rate (req/s)", "concurrency": "concurrent clients"}


def label(report: dict) -> str:
    return report.get("label") or Path(report.get("path", "run")).stem


def latency_cdfs(reports: list[dict], out_dir: Path) -> Path:
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, (key, title) in zip(axes, (("ttft_s", "time to first token"), ("itl_s", "inter-token latency"),
                                        ("latency_s", "end-to-end latency"))):
        for report in reports:
            values = sorted(report.get("samples", {}).get(key) or [])
            if values:
                ax.plot([v * 1e3 for v in values], [(i + 1) / len(values) for i in range(len(values))],
                        label=label(report))
        ax.set_xlabel("ms")
        ax.set_ylabel("fraction of samples")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    path = Path(out_dir) / "latency_cdf.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def throughput_vs(reports: list[dict], key: str, out_dir: Path) -> Path:
    if key not in AXES:
        raise ValueError(f"plot against one of {sorted(AXES)}, not {key!r}")
    points = sorted((report["workload"][key], report) for report in reports
                    if report.get("workload", {}).get(key) is not None)
    if not points:
        raise ValueError(f"no report has a workload {key!r} to plot against")
    xs = [x for x, _ in points]
    fig, left = plt.subplots(figsize=(7, 4))
    left.plot(xs, [r["summary"]["output_tokens_per_s"] for _, r in points], "o-", label="output tok/s")
    left.set_xlabel(AXES[key])
    left.set_ylabel("output tokens/s")
    if key == "tenants":
        left.set_xscale("log")
    right = left.twinx()
    right.plot(xs, [(r["summary"]["ttft_s"] or {}).get("p99", float("nan")) * 1e3 for _, r in points], "s--",
               color="tab:red", label="TTFT p99")
    right.set_ylabel("TTFT p99 (ms)")
    fig.legend(loc="upper left", fontsize=8)
    left.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(out_dir) / f"throughput_vs_{key}.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
