"""Host cost of one eager forward+backward of a loss call, kernels stubbed out (CPU).

    python benchmarks/bench_host.py                 # diffusion_dpo_loss vs the diffusers block
    python benchmarks/bench_host.py --json out.json

What is measured, per call of ``loss, metrics = f(x, r, t); loss.backward()`` on the same tiny
tensors ([4, 4, 8, 8], B = 2; bfloat16, or float32 with --dtype fp32) in one process, for

* ``fastpref``: ``fastpref.diffusion_dpo_loss`` (β = 5000), with every Triton launch stubbed
  out (``JITFunction.run`` / ``InterpretedFunction.run`` replaced by a no-op that counts it):
  what is left is fastpref's own host work (validation, two allocations, launch arguments,
  autograd) plus PyTorch's; Triton's launcher, the same for any Triton kernel, is not part of
  it. The metrics are not read: their views are made on first access (fastpref/loss_metrics.py);
* ``fastpref-metrics-read``: the same call, then every metric read (``dict(metrics)``: the ten
  views made), what a trainer that logs every metric every step pays;
* ``eager-diffusers``: ``reference_blocks.diffusers_dpo`` (β_dpo = 2500, the same loss), the
  diffusers script's loss block, run for real (its ops on tiny CPU tensors cost about their
  host overhead);
* ``autograd-floor``: a do-nothing ``torch.autograd.Function`` of the same call shape (forward
  returns an empty 0-dim loss, backward an empty gradient): what any autograd Function pays
  per forward+backward on this host, the floor under ``fastpref``'s figure:

``host_us``: CPU time of this thread per call (``time.thread_time_ns``, not wall time, so that
other processes on a shared machine count less), the minimum over ``--rounds`` interleaved
batches of ``--calls`` calls (median beside it), the garbage collector off inside a batch; the
ratio is given from the minima and as the median of each round's ratio (adjacent batches, so a
busy moment on a shared machine slows both);
``aten_ops``: aten ops dispatched per call (``counters.OpCounter``); ``launches``: Triton
launches per call. The ratio fastpref / eager-diffusers is the figure issue 15 targets
(<= 0.25x).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TRITON_INTERPRET", "1")

import counters
import reference_blocks
import torch


@contextlib.contextmanager
def stubbed_launches():
    """Every Triton launch is a no-op that counts (`.n`); nothing else changes."""
    classes = []
    from triton.runtime.jit import JITFunction

    classes.append(JITFunction)
    try:
        from triton.runtime.interpreter import InterpretedFunction

        classes.append(InterpretedFunction)
    except ImportError:
        pass
    state = type("Launches", (), {"n": 0})()
    originals = {cls: cls.run for cls in classes}

    def run(self, *args, grid, warmup, **kwargs):
        state.n += 1

    for cls in classes:
        cls.run = run
    try:
        yield state
    finally:
        for cls, original in originals.items():
            cls.run = original


class _Floor(torch.autograd.Function):
    """No work: an empty 0-dim loss forward, an empty gradient backward."""

    @staticmethod
    def forward(ctx, model_pred, ref_pred, target):
        ctx.like = model_pred
        return model_pred.new_empty((), dtype=torch.float32)

    @staticmethod
    def backward(ctx, grad_loss):
        return torch.empty_like(ctx.like), None, None


def providers():
    import fastpref

    def metrics_read(x, r, t):
        loss, metrics = fastpref.diffusion_dpo_loss(x, r, t, beta=5000.0)
        return loss, dict(metrics)  # every metric's view made, as a trainer logging each step does

    return {
        "fastpref": lambda x, r, t: fastpref.diffusion_dpo_loss(x, r, t, beta=5000.0),
        "fastpref-metrics-read": metrics_read,
        "eager-diffusers": lambda x, r, t: reference_blocks.diffusers_dpo(x, r, t, beta_dpo=2500.0),
        "autograd-floor": lambda x, r, t: (_Floor.apply(x, r, t), {}),
    }


def _batch(call, calls):
    gc.disable()
    try:
        start = time.thread_time_ns()
        for _ in range(calls):
            call()
        return (time.thread_time_ns() - start) / calls / 1e3
    finally:
        gc.enable()


def measure(shape=(4, 4, 8, 8), dtype=torch.bfloat16, rounds=40, calls=200):
    g = torch.Generator().manual_seed(0)
    target = torch.randn(shape, generator=g).to(dtype)
    ref = (target.float() + 0.5 * torch.randn(shape, generator=g)).to(dtype)
    model = (ref.float() + 0.05 * torch.randn(shape, generator=g)).to(dtype).requires_grad_(True)
    out = {}
    with stubbed_launches() as launches:
        steps = {}
        for name, fn in providers().items():

            def step(fn=fn):
                loss, _ = fn(model, ref, target)
                loss.backward()
                model.grad = None

            steps[name] = step
            for _ in range(100):  # warm-up: caches, lazy initialisation
                step()
            with counters.OpCounter() as ops:
                before = launches.n
                step()
            out[name] = {"aten_ops": ops.total, "launches": launches.n - before, "samples": []}
        for _ in range(rounds):  # interleaved, so a busy moment hits every provider alike
            for name, step in steps.items():
                out[name]["samples"].append(_batch(step, calls))
    ratios = [a / b for a, b in zip(out["fastpref"]["samples"], out["eager-diffusers"]["samples"], strict=True)]
    for row in out.values():
        samples = row.pop("samples")
        row["host_us"] = min(samples)
        row["host_us_median"] = statistics.median(samples)
    return out, statistics.median(ratios)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.calls < 1:
        parser.error(f"--rounds and --calls must be >= 1, got {args.rounds} and {args.calls}")
    import triton

    import fastpref

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    out, paired = measure(dtype=dtype, rounds=args.rounds, calls=args.calls)
    ratio = out["fastpref"]["host_us"] / out["eager-diffusers"]["host_us"]
    floor = out["autograd-floor"]["host_us"] / out["eager-diffusers"]["host_us"]
    meta = {
        "command": "python benchmarks/bench_host.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "fastpref": fastpref.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
    }
    print(f"{'provider':<22} {'host us/call (min)':>19} {'median':>8} {'aten ops':>9} {'launches':>9}")
    for name, row in out.items():
        print(
            f"{name:<22} {row['host_us']:>19.1f} {row['host_us_median']:>8.1f} "
            f"{row['aten_ops']:>9} {row['launches']:>9}"
        )
    print(
        f"fastpref / eager-diffusers host time: {ratio:.3f}x (minima), {paired:.3f}x (median of the rounds' "
        f"ratios)   ({meta['command']}; torch {meta['torch']})"
    )
    print(f"autograd-floor / eager-diffusers: {floor:.3f}x (the least any autograd Function costs here)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"meta": meta, "rows": out, "ratio": ratio, "ratio_median_of_rounds": paired, "floor_ratio": floor},
                f,
                indent=1,
            )
    return out, ratio, floor


if __name__ == "__main__":
    main()
