"""The Wan GPU job's script (``benchmarks/bench_wan_step.py``, ``run_gpu.sh wan``) runs end to end
on the CPU with the tiny transformer config: one row with a finite loss and a positive step rate
(no timing assertion)."""

import csv
import importlib.util
import math
from pathlib import Path

import diffusers  # noqa: F401  (the train extra: `make test` installs it; missing, these tests fail)
from helpers import needs_kernels

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_wan_step.py"


@needs_kernels
def test_wan_step_benchmark_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_wan_step", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "wan_step.csv"
    bench.main(["--tiny", "--device", "cpu", "--steps", "1", "--warmup", "1", "--frames", "9", "--out", str(out)])
    with open(out) as f:
        (row,) = list(csv.DictReader(f))
    assert row["config"] == "tiny" and row["latents"] == "2x16x3x8x8" and row["lora_rank"] == "8"
    assert math.isfinite(float(row["loss"])) and float(row["steps_per_s"]) > 0
