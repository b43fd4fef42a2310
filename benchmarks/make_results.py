"""Generate ``benchmarks/RESULTS.md`` (and its plots) from benchmark CSVs.

    python benchmarks/make_results.py                       # every CSV in benchmarks/results/
    python benchmarks/make_results.py a.csv b.csv --out benchmarks/RESULTS.md

Only measured figures are written: a table cell with no measurement says so, and when no
GPU CSV is present the document states that no GPU figure has been measured. Nothing is
extrapolated. Targets from the benchmark issue are reported (met / NOT met), never asserted.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import glob
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import csv_io
import plot

HERE = os.path.dirname(os.path.abspath(__file__))
NA = "n/m"  # not measured
SPEED_POINT = ("sd15_512", 8)
BW_SHAPES = ["sdxl_1024", "video"]
TARGETS = {"speedup_eager": 10.0, "speedup_compile": 3.0, "floor": 1.4, "memory": 1.05, "syncs": 0}
PRIMARY_EAGER = ["eager-diffusers", "eager-official", "eager-spec"]
COMPILES = ["compile", "compile-reduce-overhead", "compile-max-autotune"]


class Table:
    """Index of one CSV's rows by (kernel, provider, mode, metric, dtype, shape, B)."""

    def __init__(self, path: str):
        self.path = path
        self.rows = csv_io.read_rows(path)
        self.meta = csv_io.read_meta(path)
        self.idx = {}
        for r in self.rows:
            key = (
                r["kernel_name"],
                r["kernel_provider"],
                r["kernel_operation_mode"],
                r["metric_name"],
                r["dtype"],
                r["shape_name"],
                int(r["x_value"]),
            )
            self.idx[key] = r
        self.device = self.rows[0]["device"] if self.rows else "?"
        self.is_gpu = bool(self.rows) and not self.device.startswith("cpu")

    def get(self, kernel, provider, mode, metric, dtype, shape, B, q="y_value_50"):
        """The value, or ``None`` if not measured."""
        r = self.idx.get((kernel, provider, mode, metric, dtype, shape, B))
        return None if r is None else r[q]

    def values(self, field: str, **where) -> list:
        """Sorted distinct values of ``field`` among rows matching ``where``."""
        out = {r[field] for r in self.rows if all(r[k] == v for k, v in where.items())}
        return sorted(out, key=lambda v: (isinstance(v, str), v))


MEM_MIN_INPUT = 2**20  # the memory target is judged where O(B) buffers are negligible


def _input_bytes(r) -> int:
    import json

    try:
        return int(json.loads(r["extra_benchmark_config_str"]).get("input_bytes", 0))
    except (ValueError, TypeError):
        return 0


def _f(v, fmt="{:.3g}", none=NA):
    return none if v is None else fmt.format(v)


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(out)


def _status(ok):
    return "not measured" if ok is None else ("met" if ok else "**NOT met**")


def _kernels(t: Table) -> list[str]:
    """Methods in the CSV, in registry order (then any others alphabetically)."""
    import registry

    order = list(registry.METHODS)
    ks = [k for k in t.values("kernel_name") if not k.startswith("_")]
    return sorted(ks, key=lambda k: (order.index(k) if k in order else len(order), k))


def runs_section(tables: list[Table]) -> str:
    """Who/what/when of every CSV."""
    rows = []
    for t in tables:
        e = t.meta.get("env", {})
        bw = t.meta.get("copy_bandwidth_GBps")
        rows.append(
            [
                f"`{os.path.relpath(t.path, HERE)}`",
                t.device,
                e.get("torch_version", "?"),
                e.get("triton_version", "?"),
                e.get("cuda_version", "?"),
                e.get("fastpref_version", "?"),
                e.get("timestamp", "?"),
                _f(bw, "{:.0f} GB/s", "-"),
                _f(t.meta.get("elapsed_s"), "{:.0f} s", "?"),
            ]
        )
    s = _md_table(
        ["CSV", "device", "torch", "triton", "CUDA", "fastpref", "date (UTC)", "copy bandwidth", "run time"], rows
    )
    cmds = "\n".join(f"- `{os.path.relpath(t.path, HERE)}`: `{t.meta.get('command', '(unknown)')}`" for t in tables)
    return s + "\n\nExact commands (run from the repository root):\n\n" + cmds


def targets_section(t: Table) -> str:
    """The issue's targets at the points they are defined for."""
    rows = []
    shape, B = SPEED_POINT
    for k in _kernels(t):
        for d in t.values("dtype", kernel_name=k):
            fp = t.get(k, "fastpref", "full", "time", d, shape, B)
            eager = next((p for p in PRIMARY_EAGER if t.get(k, p, "full", "time", d, shape, B)), None)
            if fp is not None and eager:
                sp = t.get(k, eager, "full", "time", d, shape, B) / fp
                rows.append(
                    [
                        k,
                        d,
                        f"fwd+bwd {shape} B={B}: speed-up vs {eager}",
                        f">= {TARGETS['speedup_eager']:g}x",
                        f"{sp:.2f}x",
                        _status(sp >= TARGETS["speedup_eager"]),
                    ]
                )
            for c in COMPILES:
                ct = t.get(k, c, "full", "time", d, shape, B)
                if fp is not None and ct is not None:
                    sp = ct / fp
                    rows.append(
                        [
                            k,
                            d,
                            f"fwd+bwd {shape} B={B}: speed-up vs {c}",
                            f">= {TARGETS['speedup_compile']:g}x",
                            f"{sp:.2f}x",
                            _status(sp >= TARGETS["speedup_compile"]),
                        ]
                    )
            fg = t.get(k, "fastpref-cudagraph", "full", "time", d, shape, B)
            for other, target in (
                ("eager-diffusers-cudagraph", "speedup_eager"),
                ("compile-reduce-overhead", "speedup_compile"),
            ):
                ot = t.get(k, other, "full", "time", d, shape, B)
                if fg is not None and ot is not None:
                    sp = ot / fg
                    how = (
                        "both captured in CUDA graphs and replayed"
                        if other.endswith("-cudagraph")
                        else "fastpref captured in a CUDA graph vs torch.compile's CUDA-graph trees "
                        "as a loop calls them"
                    )
                    rows.append(
                        [
                            k,
                            d,
                            f"fwd+bwd {shape} B={B}, {how}: fastpref-cudagraph vs {other}",
                            f">= {TARGETS[target]:g}x",
                            f"{sp:.2f}x",
                            _status(sp >= TARGETS[target]),
                        ]
                    )
            for fused in ("fastpref", "fastpref-cudagraph"):
                for s in BW_SHAPES:
                    vals = [
                        (b, t.get(k, fused, "full", "floor_ratio", d, s, b))
                        for b in t.values("x_value", kernel_name=k, shape_name=s, dtype=d)
                    ]
                    vals = [(int(b), v) for b, v in vals if v is not None]
                    if vals:
                        worst = max(vals, key=lambda bv: bv[1])
                        rows.append(
                            [
                                k,
                                d,
                                f"{fused} fwd+bwd {s}: time / bandwidth floor (worst B={worst[0]}; "
                                f"all B: {', '.join(f'{v:.2f}' for _, v in vals)})",
                                f"<= {TARGETS['floor']:g}x",
                                f"{worst[1]:.2f}x",
                                _status(worst[1] <= TARGETS["floor"]),
                            ]
                        )
            mems = [
                (r["y_value_50"], r["shape_name"], int(r["x_value"]))
                for r in t.rows
                if r["kernel_name"] == k
                and r["dtype"] == d
                and r["kernel_provider"] == "fastpref"
                and r["kernel_operation_mode"] == "full"
                and r["metric_name"] == "peak_extra_over_input"
                and _input_bytes(r) >= MEM_MIN_INPUT
            ]
            if mems:
                worst = max(mems)
                rows.append(
                    [
                        k,
                        d,
                        f"fwd+bwd peak extra memory / one input (worst point with input "
                        f">= 1 MiB: {worst[1]} B={worst[2]})",
                        f"<= {TARGETS['memory']:g}x",
                        f"{worst[0]:.3f}x",
                        _status(worst[0] <= TARGETS["memory"]),
                    ]
                )
            syncs = [
                r["y_value_50"]
                for r in t.rows
                if r["kernel_name"] == k
                and r["dtype"] == d
                and r["kernel_provider"] == "fastpref"
                and r["metric_name"] == "host_syncs"
            ]
            if syncs:
                rows.append(
                    [
                        k,
                        d,
                        "host syncs per call (worst point, any mode)",
                        "0",
                        f"{max(syncs):g}",
                        _status(max(syncs) == 0),
                    ]
                )
    if not rows:
        return "_No target point was measured in this CSV (no fastpref rows at the target points)._"
    return _md_table(["method", "dtype", "figure", "target", "measured", "status"], rows)


def speedup_section(t: Table, mode: str) -> str:
    """fastpref time and every other provider's time relative to it, per point."""
    out = []
    for k in _kernels(t):
        provs = [p for p in t.values("kernel_provider", kernel_name=k, metric_name="time") if p != "fastpref"]
        if not provs:
            continue
        rows = []
        for d in t.values("dtype", kernel_name=k):
            for s in t.values("shape_name", kernel_name=k, dtype=d):
                for B in t.values("x_value", kernel_name=k, dtype=d, shape_name=s):
                    B = int(B)
                    fp = t.get(k, "fastpref", mode, "time", d, s, B)
                    cells = []
                    for p in provs:
                        v = t.get(k, p, mode, "time", d, s, B)
                        cells.append(NA if v is None else (f"{v:.4g} ms" + (f" ({v / fp:.1f}x)" if fp else "")))
                    if fp is None and all(c == NA for c in cells):
                        continue
                    rows.append([d, s, B, _f(fp, "{:.4g} ms")] + cells)
        if rows:
            out.append(
                f"**{k}** ({mode}; median time, in brackets: that provider's time / fastpref's, "
                f"i.e. fastpref's speed-up)\n\n" + _md_table(["dtype", "shape", "B", "fastpref"] + provs, rows)
            )
    return "\n\n".join(out) if out else f"_No {mode} timings in this CSV._"


def per_provider_section(t: Table, metric: str, mode: str, fmt: str) -> str:
    """One metric for every provider at every point."""
    out = []
    for k in _kernels(t):
        provs = t.values("kernel_provider", kernel_name=k, metric_name=metric, kernel_operation_mode=mode)
        if not provs:
            continue
        provs = sorted(provs, key=lambda p: (p != "fastpref", p))
        rows = []
        for d in t.values("dtype", kernel_name=k):
            for s in t.values("shape_name", kernel_name=k, dtype=d):
                for B in t.values("x_value", kernel_name=k, dtype=d, shape_name=s):
                    cells = [_f(t.get(k, p, mode, metric, d, s, int(B)), fmt) for p in provs]
                    if any(c != NA for c in cells):
                        rows.append([d, s, int(B)] + cells)
        out.append(f"**{k}** ({mode})\n\n" + _md_table(["dtype", "shape", "B"] + provs, rows))
    return "\n\n".join(out) if out else f"_No {metric} rows for {mode}._"


def cpu_section(t: Table, shape: str = "tiny") -> str:
    """Device-independent figures from a CPU run at ``shape``, one row per (method,
    provider, mode, dtype)."""
    metrics = ["peak_extra_over_input", "host_syncs", "triton_launches", "aten_ops", "kernel_launches_est"]
    rows = []
    for k in _kernels(t):
        for p in sorted(t.values("kernel_provider", kernel_name=k), key=lambda p: (p != "fastpref", p)):
            for mode in t.values("kernel_operation_mode", kernel_name=k, kernel_provider=p):
                for d in t.values("dtype", kernel_name=k):
                    for s in [x for x in t.values("shape_name", kernel_name=k, dtype=d) if x == shape]:
                        for B in t.values("x_value", kernel_name=k, shape_name=s):
                            vals = [t.get(k, p, mode, m, d, s, int(B)) for m in metrics]
                            if all(v is None for v in vals):
                                continue
                            rows.append([k, p, mode, d, s, int(B)] + [_f(v, "{:.3g}") for v in vals])
    return _md_table(
        [
            "method",
            "provider",
            "mode",
            "dtype",
            "shape",
            "B",
            "peak extra / input",
            "host syncs",
            "Triton launches",
            "aten ops",
            "launches (est.)",
        ],
        rows,
    )


def train_section(t: Table) -> str:
    """Whole-training-step figures."""
    metrics = [
        ("train_step_time", "ms"),
        ("steps_per_s", "1/s"),
        ("peak_memory", "GiB"),
        ("peak_reserved_memory", "GiB"),
        ("graph_pool_memory", "GiB"),
        ("mfu", "%"),
        ("unet_tflop_per_step", "TFLOP"),
    ]
    rows = []
    for k in _kernels(t):
        for p in t.values("kernel_provider", kernel_name=k):
            for d in t.values("dtype", kernel_name=k):
                for B in t.values("x_value", kernel_name=k):
                    s = t.values("shape_name", kernel_name=k)[0]
                    vals = [t.get(k, p, "full", m, d, s, int(B)) for m, _ in metrics]
                    if any(v is not None for v in vals):
                        rows.append([k, p, d, int(B)] + [_f(v, "{:.4g}") for v in vals])
    return _md_table(["step", "loss", "dtype", "B"] + [f"{m} ({u})" for m, u in metrics], rows)


def notes_section(t: Table) -> str:
    """Skips, errors and budget stops recorded by the run."""
    notes = t.meta.get("notes", [])
    return "\n".join(f"- {n}" for n in notes) if notes else "- none"


def plots_section(t: Table, out_md: str) -> str:
    """Render the plots of ``t`` and link them."""
    stem = os.path.splitext(os.path.basename(t.path))[0]
    out_dir = os.path.join(os.path.dirname(os.path.abspath(t.path)), "plots", stem)
    paths = plot.plot_csv(t.rows, out_dir, t.device)
    rel = [os.path.relpath(p, os.path.dirname(os.path.abspath(out_md))) for p in paths]
    key = lambda p: (0 if "_time_" in p else 1, p)  # noqa: E731
    return "\n".join(f"- [{os.path.basename(p)}]({p})" for p in sorted(rel, key=key)) + (
        "\n\n"
        + "\n\n".join(f"![{os.path.basename(p)}]({p})" for p in sorted(rel, key=key) if "_time_" in p or "step" in p)
        if rel
        else ""
    )


def build(paths: list[str], out_md: str) -> str:
    """Assemble RESULTS.md text from the CSVs."""
    tables = [Table(p) for p in paths]
    gpu = [t for t in tables if t.is_gpu]
    parts = [
        "# fastpref benchmark results",
        "",
        f"_Generated by `python benchmarks/make_results.py` on "
        f"{_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC from the CSVs listed below. "
        f"Every figure is a measurement from those CSVs; `{NA}` = not measured. "
        f"Nothing is extrapolated. See `benchmarks/README.md` for what each figure means._",
        "",
    ]
    if not gpu:
        parts += [
            "> **No GPU figure has been measured yet.** The tables below come from CPU runs "
            "only (device-independent figures: memory, host syncs, op and launch counts; "
            "no timing, no bandwidth, no speed-up). Speed-up, bandwidth-floor and GPU memory "
            "targets are *not measured*.",
            "",
        ]
    summary = os.path.join(HERE, "results", "summary.md")
    if gpu and os.path.exists(summary):  # hand-written reading of these CSVs, kept verbatim
        parts += [open(summary).read().strip(), ""]
    parts += ["## Runs", "", runs_section(tables) if tables else "_No CSV found._", ""]
    for t in tables:
        name = os.path.relpath(t.path, HERE)
        kernels = _kernels(t)
        if any(k.startswith("train_step") for k in kernels):
            parts += [
                f"## Training step: `{name}` ({t.device})",
                "",
                train_section(t),
                "",
                "Notes:",
                "",
                notes_section(t),
                "",
            ]
            continue
        if t.is_gpu:
            parts += [
                f"## GPU loss benchmark: `{name}` ({t.device})",
                "",
                "### Targets (reported, not asserted)",
                "",
                targets_section(t),
                "",
                "### Forward + backward time and speed-ups",
                "",
                speedup_section(t, "full"),
                "",
                "### Time over the bandwidth floor (fastpref and others, fwd+bwd; 1.0 = floor)",
                "",
                per_provider_section(t, "floor_ratio", "full", "{:.2f}x"),
                "",
                "### Peak memory above the inputs / one input tensor (fwd+bwd)",
                "",
                per_provider_section(t, "peak_extra_over_input", "full", "{:.2f}x"),
                "",
                "### GPU kernels per call (fwd+bwd; kernels + memsets + memcpys as run on the GPU)",
                "",
                per_provider_section(t, "kernel_launches", "full", "{:.0f}"),
                "",
                "### Host launch calls per call (fwd+bwd; one per CUDA graph replay)",
                "",
                per_provider_section(t, "host_launch_calls", "full", "{:.0f}"),
                "",
                "### Host syncs per call (fwd+bwd)",
                "",
                per_provider_section(t, "host_syncs", "full", "{:.0f}"),
                "",
                "<details><summary>Forward-only and backward-only times</summary>",
                "",
                speedup_section(t, "forward"),
                "",
                speedup_section(t, "backward"),
                "",
                "</details>",
                "",
                "### Notes from the run",
                "",
                notes_section(t),
                "",
                "### Plots",
                "",
                plots_section(t, out_md),
                "",
            ]
        else:
            parts += [
                f"## CPU device-independent figures: `{name}` ({t.device})",
                "",
                "Counts per call; memory is live host bytes above the inputs (profiler "
                "allocation events) over one input tensor. fastpref's Triton kernels run under "
                "the interpreter here, so no timing is reported. Shape `tiny` "
                "([2B, 4, 8, 8]); add `--shapes tiny,tiny_video` for the 5-D layout.",
                "",
                cpu_section(t),
                "",
                "Notes:",
                "",
                notes_section(t),
                "",
            ]
    return "\n".join(parts) + "\n"


def main(argv=None) -> int:
    """Write RESULTS.md."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("csv", nargs="*", help="default: benchmarks/results/*.csv")
    p.add_argument("--out", default=os.path.join(HERE, "RESULTS.md"))
    a = p.parse_args(argv)
    paths = a.csv or sorted(glob.glob(os.path.join(HERE, "results", "*.csv")))
    text = build(paths, a.out)
    with open(a.out, "w") as f:
        f.write(text)
    print(f"wrote {a.out} from {len(paths)} CSV(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
