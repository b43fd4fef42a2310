"""Benchmark fastpref's fused losses against the upstream eager blocks and torch.compile.

GPU (the lead's runs):
    python benchmarks/bench_losses.py                 # full sweep of the default methods
    python benchmarks/bench_losses.py --quick         # the headline points only
CPU (device-independent figures: memory, host syncs, op and launch counts; no timing):
    python benchmarks/bench_losses.py --cpu-quick

Rows go to a Liger-style CSV (see ``csv_io.COLUMNS``) written incrementally, with a JSON
sidecar holding the command, device, versions, measured bandwidth and skip notes. See
``benchmarks/README.md`` for the meaning of every metric.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch

if not torch.cuda.is_available():
    # fastpref runs its Triton kernels in the interpreter without CUDA; make sure it does
    os.environ.setdefault("TRITON_INTERPRET", "1")

import counters
import csv_io
import measure
import providers as prov
import registry
import shapes as shp

HERE = os.path.dirname(os.path.abspath(__file__))
METRICS = ["time", "memory", "launches", "syncs"]
# aten ops that launch no kernel (views, metadata, allocation without fill)
NO_KERNEL_OPS = {
    "aten.view",
    "aten._unsafe_view",
    "aten.expand",
    "aten.slice",
    "aten.select",
    "aten.split",
    "aten.split_with_sizes",
    "aten.chunk",
    "aten.t",
    "aten.transpose",
    "aten.permute",
    "aten.unsqueeze",
    "aten.squeeze",
    "aten.as_strided",
    "aten.alias",
    "aten.detach",
    "aten.empty",
    "aten.empty_like",
    "aten.empty_strided",
    "aten.new_empty",
    "aten.new_empty_strided",
    "aten.set_",
    "aten.lift_fresh",
    "aten.diagonal",
    "aten.unbind",
    "aten.reshape",
    "aten.view_as",
    "aten._reshape_alias",
    "aten.unfold",
}

PRESETS = {
    "quick": dict(shapes="sd15_512,sdxl_1024,video", batches="8", dtypes="fp32,bf16", modes="full"),
    "cpu_quick": dict(
        methods="all",
        shapes="tiny",
        batches="2",
        dtypes="fp32,bf16",
        modes="forward,full",
        providers="fastpref,eager-diffusers,eager-official,eager-spec",
        metrics="memory,launches,syncs",
        mode_batches="all",
        count_batches="all",
    ),
}


def parse_args(argv=None):
    """Command-line flags (see ``--help``)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--methods",
        help=f"comma list or 'all' (default: {','.join(registry.DEFAULT_METHODS)}); "
        f"known: {','.join(registry.METHODS)}",
    )
    p.add_argument(
        "--providers",
        help=f"comma list (default: {','.join(prov.DEFAULT_PROVIDERS)}); known: {','.join(prov.ALL_PROVIDERS)}",
    )
    p.add_argument("--shapes", help=f"comma list (default: {','.join(shp.GPU_SHAPES)}); known: {','.join(shp.SHAPES)}")
    p.add_argument("--batches", help=f"comma list of B (pairs; batch is 2B) (default: {shp.BATCHES})")
    p.add_argument("--dtypes", help="comma list of fp32,bf16,fp16 (default: fp32,bf16)")
    p.add_argument("--modes", help="comma list of forward,backward,full (default: all three)")
    p.add_argument("--metrics", help=f"comma list of {','.join(METRICS)} (default: all)")
    p.add_argument("--quick", action="store_true", help="headline subset: SD1.5-512/SDXL/video, B=8, fwd+bwd")
    p.add_argument(
        "--cpu-quick",
        action="store_true",
        help="CPU, tiny shapes, every method: memory, host syncs, op/launch counts (no timing)",
    )
    p.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda if available")
    p.add_argument("--out", help="CSV path (default: benchmarks/results/<run>.csv)")
    p.add_argument(
        "--mode-batches",
        help="B values at which forward-only and backward-only are run ('all' = every B); fwd+bwd runs at every B",
    )
    p.add_argument(
        "--count-batches",
        help="B values at which kernel launches and host syncs are counted ('all' = every B; "
        "counts do not depend on B, profiling is slow)",
    )
    p.add_argument("--rep-ms", type=int, default=25, help="measuring time per timed point (ms)")
    p.add_argument(
        "--budget-s",
        type=float,
        default=420.0,
        help="stop starting new points after this many seconds (rows so far are kept)",
    )
    args = p.parse_args(argv)
    preset = PRESETS["cpu_quick"] if args.cpu_quick else PRESETS["quick"] if args.quick else {}
    for k, v in preset.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.mode_batches = args.mode_batches or "8,32"
    args.count_batches = args.count_batches or "8"
    if args.cpu_quick:
        args.device = args.device or "cpu"
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.out is None:
        name = "cpu_quick" if args.cpu_quick else "losses_quick" if args.quick else "losses"
        if args.device == "cpu" and not args.cpu_quick:
            name += "_cpu"
        args.out = os.path.join(HERE, "results", f"{name}.csv")
    return args


class Run:
    """One benchmark run: selected grid, CSV writer, notes, time budget."""

    def __init__(self, args):
        self.a = args
        self.device = args.device
        self.methods = registry.select_methods(args.methods)
        self.providers = shp.parse_list(args.providers, prov.ALL_PROVIDERS, prov.DEFAULT_PROVIDERS)
        self.shapes = shp.parse_list(
            args.shapes, shp.SHAPES, shp.GPU_SHAPES if self.device == "cuda" else shp.CPU_SHAPES
        )
        self.batches = shp.parse_batches(args.batches, shp.BATCHES)
        self.dtypes = shp.parse_list(args.dtypes, shp.DTYPES, ["fp32", "bf16"])
        self.modes = shp.parse_list(args.modes, measure.MODES, measure.MODES)
        self.metrics = shp.parse_list(args.metrics, METRICS, METRICS)
        self.mode_batches = self._batches_or_all(args.mode_batches)
        self.count_batches = self._batches_or_all(args.count_batches)
        if self.device == "cpu" and "time" in self.metrics and args.cpu_quick:
            self.metrics.remove("time")
        self.notes: list[str] = []
        self.t0 = time.time()
        self.env = csv_io.environment(self.device)
        self.w = csv_io.CsvWriter(args.out, self.env)
        self.bandwidth = None
        self.stopped = False
        self.summary: list = []

    def note(self, msg: str) -> None:
        """Print a note and keep it for the sidecar."""
        print(msg, flush=True)
        self.notes.append(msg)

    def _batches_or_all(self, spec: str) -> list[int]:
        """``all`` -> every selected B; else the listed B (falling back to the largest selected
        B when none of them is selected, so every (shape, dtype) gets one)."""
        if spec == "all":
            return list(self.batches)
        want = [b for b in shp.parse_batches(spec, []) if b in self.batches]
        return want or [max(self.batches)]

    def note_once(self, msg: str) -> None:
        """``note`` unless the same message was noted already."""
        if msg not in self.notes:
            self.note(msg)

    def over_budget(self) -> bool:
        """True once the time budget is spent (noted once)."""
        if not self.stopped and time.time() - self.t0 > self.a.budget_s:
            self.stopped = True
            self.note(
                f"BUDGET: {self.a.budget_s:.0f} s spent; remaining points not run "
                f"(narrow the selection or raise --budget-s)"
            )
        return self.stopped

    def measure_bandwidth(self) -> None:
        """Measure the device copy bandwidth once and record it as a row."""
        if self.device != "cuda":
            return
        self.bandwidth = measure.device_copy_bandwidth_gbs()
        print(f"device copy bandwidth: {self.bandwidth:.0f} GB/s", flush=True)
        self.w.add(
            kernel="_device",
            provider="copy",
            mode="copy",
            metric="copy_bandwidth",
            unit="GB/s",
            x_name="bytes",
            x_value=1 << 30,
            y=self.bandwidth,
            dtype="fp32",
            shape_name="copy_1GiB",
            shape=(1 << 28,),
            extra={"note": "device-to-device copy, read+write bytes"},
        )

    def run(self) -> None:
        """Run the whole grid."""
        self.measure_bandwidth()
        points = []
        for method in self.methods:
            provs, skip = prov.providers_for(method, self.providers)
            for s in skip:
                self.note(s)
            if self.device == "cpu":
                dropped = [p for p in provs if p in prov.COMPILE_MODES]
                if dropped and self.a.cpu_quick:
                    provs = [p for p in provs if p not in dropped]
            if not provs:
                continue
            for dname in self.dtypes:
                for sname in self.shapes:
                    for B in self.batches:
                        points.append((method, provs, dname, sname, B))
        # headline batch size first, so a run cut short by the budget still has it everywhere
        first = 8 if 8 in self.batches else max(self.batches)
        points.sort(key=lambda pt: pt[4] != first)
        for i, pt in enumerate(points):
            if self.over_budget():
                self.note(f"BUDGET: {len(points) - i} of {len(points)} points not run")
                break
            self.point(*pt)
        if self.device == "cpu" and self.a.cpu_quick:
            self.note(
                "NOTE: compile providers are not part of --cpu-quick (op counts of "
                "compiled graphs are not comparable on CPU)"
            )

    def point(self, method, provs, dname, sname, B) -> None:
        """All providers and modes at one (method, dtype, shape, B)."""
        if method.name == "rpo_diagonal" and B < 2:
            self.note(f"SKIP {method.name} B={B}: needs B >= 2")
            return
        dtype = shp.DTYPES[dname]
        args, tkw = shp.make_inputs(method, sname, B, dtype, self.device)
        one = shp.input_bytes(sname, B, dtype)
        modes = [m for m in self.modes if m == "full" or B in self.mode_batches]
        for p in provs:
            for mode in modes:
                try:
                    self.one(method, p, mode, args, tkw, dname, sname, B, one)
                except Exception as e:  # keep the sweep going; record why
                    if self.device == "cuda" and isinstance(e, torch.cuda.OutOfMemoryError):
                        torch.cuda.empty_cache()
                    msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
                    self.note(f"ERROR {method.name}/{p}/{mode}/{sname}/B={B}/{dname}: {type(e).__name__}: {msg}")
                args[0].grad = None
            self.w.flush()
        del args, tkw
        if self.device == "cuda":
            torch.cuda.empty_cache()

    def one(self, method, p, mode, args, tkw, dname, sname, B, one) -> None:
        """Measure one (provider, mode) at one point and write its rows."""
        block = prov.build(method, p)
        if p in prov.GRAPHED:
            if self.device != "cuda" or mode == "backward":
                return  # CUDA only; a backward alone is not captured apart from its forward
            # A fresh leaf: the shared one may still have an AccumulateGrad node from calls on
            # the default stream, which a capture on the graph's stream cannot use.
            args = (args[0].detach().clone().requires_grad_(True),) + tuple(args[1:])
            call, reset = measure.graphed(*measure.make_call(block, args, tkw, mode))
        else:
            call, reset = measure.make_call(block, args, tkw, mode)
        measure.warm_up(call, reset, self.device, n=3 if self.device == "cuda" else 1)
        shape = shp.batch_shape(sname, B)
        row = dict(
            kernel=method.name,
            provider=p,
            mode=mode,
            x_name="B",
            x_value=B,
            dtype=dname,
            shape_name=sname,
            shape=shape,
            extra={
                "method_kwargs": dict(method.fastpref_kwargs),
                "input_bytes": one,
                "batch_rows": 2 * B,
            },
        )
        out = {}
        if "time" in self.metrics:
            q = measure.time_quantiles_ms(call, reset, self.device, rep_ms=self.a.rep_ms)
            self.w.add(metric="time", unit="ms", y=q, **row)
            out["ms"] = q[1]
            fb = shp.floor_bytes(method, sname, B, shp.DTYPES[dname], mode)
            if fb is not None and self.bandwidth and self.device == "cuda":
                floor_ms = fb / (self.bandwidth * 1e9) * 1e3
                self.w.add(metric="floor_ratio", unit="x", y=q[1] / floor_ms, **row)
                self.w.add(metric="floor_fraction", unit="fraction", y=floor_ms / q[1], **row)
                self.w.add(metric="achieved_bandwidth", unit="GB/s", y=fb / (q[1] * 1e-3) / 1e9, **row)
        if "memory" in self.metrics:
            if (p == "compile-reduce-overhead" or p in prov.GRAPHED) and self.device == "cuda":
                pass  # CUDA-graph pool is invisible to max_memory_allocated in replay
            else:
                peak = measure.peak_extra_bytes(call, reset, self.device)
                self.w.add(metric="peak_extra_memory", unit="MiB", y=peak / 2**20, **row)
                self.w.add(metric="peak_extra_over_input", unit="x", y=peak / one, **row)
                out["mem_x"] = peak / one
        cpu_compiled = self.device == "cpu" and p in prov.COMPILE_MODES
        if cpu_compiled:
            # dynamo does not trace under a TorchDispatchMode: counts would be eager's
            self.note_once(f"NOTE: no op/sync counts for {p} on CPU (dispatch-mode counting bypasses torch.compile)")
        counted = B in self.count_batches
        cpu_counted = None  # one counted call serves both ops/launches and syncs on CPU
        if "launches" in self.metrics and not cpu_compiled and counted:
            if self.device == "cuda":
                k, h = measure.cuda_kernels_per_call(call, reset)
                self.w.add(metric="kernel_launches", unit="count", y=k, **row)
                self.w.add(metric="host_launch_calls", unit="count", y=h, **row)
                out["kernels"], out["host_launches"] = k, h
                if p == "fastpref":  # cross-check: launches seen at the Triton entry points
                    reset()
                    with counters.triton_launches() as launches:
                        call()
                    self.w.add(metric="triton_launches", unit="count", y=launches.n, **row)
                    out["triton"] = launches.n
            else:
                ops, launches = cpu_counted = self.cpu_counts(call, reset)
                n_ops = ops.total
                kern = sum(v for k, v in ops.ops.items() if k not in NO_KERNEL_OPS)
                self.w.add(metric="aten_ops", unit="count", y=n_ops, **row)
                self.w.add(metric="triton_launches", unit="count", y=launches.n, **row)
                self.w.add(metric="kernel_launches_est", unit="count", y=kern + launches.n, **row)
                out["aten_ops"], out["triton"], out["launch_est"] = n_ops, launches.n, kern + launches.n
        if "syncs" in self.metrics and not cpu_compiled and counted:
            if self.device == "cuda":
                n = measure.cuda_host_syncs_per_call(call, reset)
            else:
                n = (cpu_counted or self.cpu_counts(call, reset))[0].syncs
            self.w.add(metric="host_syncs", unit="count", y=n, **row)
            out["syncs"] = n
        self.summary.append((method.name, p, mode, sname, B, dname, out))
        print(
            f"[{time.time() - self.t0:6.1f}s] {method.name:13s} {p:24s} {mode:8s} {sname:10s} B={B:<3d} {dname:5s} "
            + " ".join(f"{k}={v:.4g}" for k, v in out.items()),
            flush=True,
        )

    def cpu_counts(self, call, reset):
        """Aten ops (interpreter internals excluded), host syncs and Triton launches of one call."""
        reset()
        with counters.triton_launches() as launches, counters.OpCounter() as ops:
            call()
        return ops, launches

    def print_summary(self) -> None:
        """A compact table of the measured figures (one line per point and mode)."""
        keys = []
        for *_, out in self.summary:
            keys += [k for k in out if k not in keys]
        head = f"{'method':13s} {'provider':24s} {'mode':8s} {'shape':10s} {'B':>3s} {'dtype':5s} " + " ".join(
            f"{k:>9s}" for k in keys
        )
        print("\nSUMMARY\n" + head + "\n" + "-" * len(head))
        for m, p, mode, sname, B, dname, out in self.summary:
            print(
                f"{m:13s} {p:24s} {mode:8s} {sname:10s} {B:3d} {dname:5s} "
                + " ".join(f"{out[k]:9.4g}" if k in out else f"{'-':>9s}" for k in keys)
            )

    def finish(self) -> None:
        """Close the CSV and write the sidecar."""
        self.print_summary()
        self.w.close()
        meta = {
            "command": csv_io.command_line(),
            "env": self.env,
            "copy_bandwidth_GBps": self.bandwidth,
            "notes": self.notes,
            "elapsed_s": round(time.time() - self.t0, 1),
            "selection": {
                "methods": [m.name for m in self.methods],
                "providers": self.providers,
                "mode_batches": self.mode_batches,
                "count_batches": self.count_batches,
                "shapes": self.shapes,
                "batches": self.batches,
                "dtypes": self.dtypes,
                "modes": self.modes,
                "metrics": self.metrics,
            },
        }
        csv_io.write_meta(self.a.out, meta)
        print(f"wrote {self.w.n} rows to {self.a.out} in {meta['elapsed_s']} s", flush=True)


def main(argv=None) -> int:
    """Entry point."""
    args = parse_args(argv)
    run = Run(args)
    try:
        run.run()
    finally:
        run.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
