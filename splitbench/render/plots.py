"""PNG plot of a workload for `splitbench traces show --plot`: arrivals per second and the two length histograms;
the HTML report's TTFT vs uncached prompt tokens axes (draw_ttft_uncached).

Drawing only: the per-second counts come from workload.transforms.arrivals_per_s, the bins and fit from summaries.
"""
from __future__ import annotations

import io

import numpy as np

from splitbench.schema.files import atomic_write_bytes
from splitbench.workload.transforms import arrivals_per_s
from splitbench.workload.types import Workload


def plot_workload(w: Workload, path: str) -> None:
    """PNG: arrivals per second over time, and input/output length histograms; written atomically."""
    # matplotlib is the plotting backend only: imported here, it costs ~0.6 s that no other command should pay
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_s = arrivals_per_s(w)
    fig, axes = plt.subplots(3, 1, figsize=(9, 9))
    axes[0].plot(np.arange(len(per_s)), per_s, lw=0.7)
    axes[0].set(xlabel="time since first request (s)", ylabel="requests / s", title=f"{w.name}: arrivals")
    for ax, arr, label in ((axes[1], w.input_tokens, "input tokens"), (axes[2], w.output_tokens, "output tokens")):
        ax.hist(arr, bins=80, color="tab:orange" if "output" in label else "tab:blue")
        ax.set(xlabel=label, ylabel="requests")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def draw_ttft_uncached(ax, runs: list[dict], colors) -> bool:
    """On `ax`: each run's TTFT p50 per bin of uncached prompt tokens (summary cache.ttft_vs_uncached) at the bin's
    middle, and its fitted line TTFT = a + b x uncached; False when no run has bins."""
    drawn = False
    for i, run in enumerate(runs):
        tv = (((run.get("summary") or {}).get("cache") or {}).get("ttft_vs_uncached")) or {}
        pts = [((b["lo_tokens"] + b["hi_tokens"]) / 2, b["ttft_s"]["p50"] * 1e3) for b in tv.get("bins") or []
               if b["ttft_s"]["p50"] is not None]
        if not pts:
            continue
        drawn = True
        xs, ys = zip(*pts)
        ax.plot(xs, ys, "o", color=colors[i % len(colors)], label=f"{run['label']} p50 per bin")
        fit = tv.get("fit")
        if fit:
            line_x = [0.0, max(b["hi_tokens"] for b in tv["bins"])]
            ax.plot(line_x, [(fit["intercept_s"] + fit["per_token_s"] * x) * 1e3 for x in line_x], "-",
                    color=colors[i % len(colors)], lw=1.2, label=f"{run['label']} fit")
    if drawn:
        ax.set_xlabel("uncached prompt tokens (prompt - cached)")
        ax.set_ylabel("TTFT (ms)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    return drawn
