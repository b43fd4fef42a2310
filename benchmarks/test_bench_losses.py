"""pytest-benchmark view of the loss block: fastpref vs eager vs torch.compile.

    pytest benchmarks/test_bench_losses.py --benchmark-only                   # GPU or CPU
    pytest benchmarks/test_bench_losses.py --benchmark-only --benchmark-json=out.json

Forward+backward of Diffusion-DPO (sigmoid) and DSPO (sd15) at SD1.5-512 and SDXL-1024, B=8,
bf16 on CUDA; tiny shapes on CPU (where fastpref runs in the Triton interpreter, so CPU
numbers only show that the file works). Wall-clock per round with a device synchronize;
the untimed set-up drops the gradient. Warm-up rounds absorb compile time. Nothing is
asserted about speed.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import measure
import providers as prov
import registry
import shapes as shp

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
POINTS = [("sd15_512", 8), ("sdxl_1024", 8)] if CUDA else [("tiny", 2)]
DTYPE = torch.bfloat16 if CUDA else torch.float32
PROVIDERS = ["fastpref", "eager-diffusers", "eager-official", "compile"]
METHODS = ["dpo_sigmoid", "dspo_sd15"]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("point", POINTS, ids=lambda p: f"{p[0]}-B{p[1]}")
@pytest.mark.parametrize("method_name", METHODS)
def test_loss_fwd_bwd(benchmark, method_name, point, provider):
    """Forward+backward of one loss block."""
    method = registry.METHODS[method_name]
    ok, notes = prov.providers_for(method, [provider])
    if not ok:
        pytest.skip(notes[0] if notes else f"{method_name} has no {provider} block")
    if provider.startswith("compile") and not CUDA:
        pytest.skip("torch.compile timings on CPU are not part of this benchmark")
    shape_name, B = point
    args, tkw = shp.make_inputs(method, shape_name, B, DTYPE, DEVICE)
    call, reset = measure.make_call(prov.build(method, provider), args, tkw, "full")
    measure.warm_up(call, reset, DEVICE, n=3)

    def target():
        call()
        measure.sync(DEVICE)

    benchmark.extra_info.update(
        method=method_name, provider=provider, shape=shape_name, B=B, dtype=str(DTYPE), device=DEVICE
    )
    benchmark.pedantic(target, setup=reset, rounds=50 if CUDA else 3, iterations=1, warmup_rounds=2)
