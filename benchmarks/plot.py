"""PNG plots of benchmark CSVs: one line per provider against B.

    python benchmarks/plot.py benchmarks/results/losses.csv [more.csv ...] [--out DIR]

One figure per (method, metric, dtype): a grid of subplots, rows = modes, columns = shapes,
x = B (pairs; log2 axis), y = the metric (log axis for time and memory). Time lines are the
median with a p20-p80 band. Returns the written paths (also printed).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import csv_io

HERE = os.path.dirname(os.path.abspath(__file__))
PLOTTED = {  # metric -> (axis label, log y)
    "time": ("time per call (ms)", True),
    "peak_extra_memory": ("peak memory above inputs (MiB)", True),
    "peak_extra_over_input": ("peak extra memory / one input", False),
    "floor_ratio": ("time / bandwidth floor (x, 1 = floor)", True),
    "train_step_time": ("time per step (ms)", True),
}
MODE_ORDER = ["forward", "backward", "full"]
SHAPE_ORDER = ["sd15_256", "sd15_512", "sdxl_1024", "video", "tiny", "tiny_video"]
STYLE = {
    "fastpref": dict(color="black", lw=2.4, marker="o"),
    "eager-diffusers": dict(color="C0", marker="s"),
    "eager-official": dict(color="C1", marker="^"),
    "eager-spec": dict(color="C2", marker="v"),
    "eager-flow-grpo": dict(color="C7", marker="<"),
    "eager-simpletuner": dict(color="C8", marker=">"),
    "compile": dict(color="C4", marker="D"),
    "compile-reduce-overhead": dict(color="C5", marker="P"),
    "compile-max-autotune": dict(color="C6", marker="X"),
}


def _ordered(values, order):
    return sorted(values, key=lambda v: (order.index(v) if v in order else len(order), v))


def plot_csv(rows: list[dict], out_dir: str, device: str = "") -> list[str]:
    """Write one PNG per (kernel, metric, dtype) found in ``rows``; return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = defaultdict(list)
    for r in rows:
        if r["metric_name"] in PLOTTED and not r["kernel_name"].startswith("_"):
            groups[(r["kernel_name"], r["metric_name"], r["dtype"])].append(r)
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for (kernel, metric, dtype), rs in sorted(groups.items()):
        modes = _ordered({r["kernel_operation_mode"] for r in rs}, MODE_ORDER)
        shapes = _ordered({r["shape_name"] for r in rs}, SHAPE_ORDER)
        fig, axes = plt.subplots(
            len(modes), len(shapes), squeeze=False, figsize=(max(3.6 * len(shapes) + 0.6, 6.5), 2.9 * len(modes) + 1.4)
        )
        label, logy = PLOTTED[metric]
        for i, mode in enumerate(modes):
            for j, shape in enumerate(shapes):
                ax = axes[i][j]
                sel = [r for r in rs if r["kernel_operation_mode"] == mode and r["shape_name"] == shape]
                for p in sorted({r["kernel_provider"] for r in sel}, key=lambda p: (p != "fastpref", p)):
                    pts = sorted(
                        (r["x_value"], r["y_value_20"], r["y_value_50"], r["y_value_80"])
                        for r in sel
                        if r["kernel_provider"] == p
                    )
                    xs = [q[0] for q in pts]
                    ax.plot(xs, [q[2] for q in pts], label=p, **STYLE.get(p, dict(marker=".")))
                    if metric in ("time", "train_step_time"):
                        ax.fill_between(
                            xs, [q[1] for q in pts], [q[3] for q in pts], alpha=0.2, color=STYLE.get(p, {}).get("color")
                        )
                ax.set_xscale("log", base=2)
                if logy:
                    ax.set_yscale("log")
                ax.set_title(f"{shape}, {mode}", fontsize=9)
                ax.grid(True, which="both", alpha=0.3)
                if i == len(modes) - 1:
                    ax.set_xlabel("B (pairs; batch = 2B)")
                if j == 0:
                    ax.set_ylabel(label, fontsize=8)
        handles, labels = axes[0][0].get_legend_handles_labels()
        for row in axes:
            for ax in row:
                h, lab = ax.get_legend_handles_labels()
                for hh, ll in zip(h, lab, strict=True):
                    if ll not in labels:
                        handles.append(hh)
                        labels.append(ll)
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), fontsize=8)
        fig.suptitle(f"{kernel}: {label}, {dtype}" + (f"\n{device}" if device else ""), fontsize=10)
        fig.tight_layout(rect=(0, 0.07, 1, 0.95))
        path = os.path.join(out_dir, f"{kernel}_{metric}_{dtype}.png")
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths


def main(argv=None) -> int:
    """Plot every CSV given into ``--out`` (default ``benchmarks/results/plots/<csv name>``)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("csv", nargs="+")
    p.add_argument("--out", help="output folder")
    a = p.parse_args(argv)
    for path in a.csv:
        rows = csv_io.read_rows(path)
        stem = os.path.splitext(os.path.basename(path))[0]
        out = a.out or os.path.join(HERE, "results", "plots", stem)
        device = rows[0]["device"] if rows else ""
        for q in plot_csv(rows, out, device):
            print(q)
    return 0


if __name__ == "__main__":
    sys.exit(main())
