"""PNG plot of a workload for `splitbench traces show --plot`: arrivals per second and the two length histograms.

Drawing only: the per-second counts come from workload.transforms.arrivals_per_s.
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
