"""The FSDP memory benchmark (benchmarks/bench_fsdp_memory.py) and the computed memory table
(benchmarks/memory_table.py) on the CPU: the sharded and offloaded steps run, and the table's
arithmetic is the trainer's layout."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from helpers import needs_kernels

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # bench_fsdp_memory imports bench_family_step


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@needs_kernels
@pytest.mark.parametrize("mode", ["plain", "fsdp_offload"])
def test_tiny_step_runs_unsharded_and_sharded_with_offload(mode):
    row = _load("bench_fsdp_memory").measure("sdxl", mode, pairs=1, tiny=True, device=torch.device("cpu"))
    assert row["loss_finite"] and row["processes"] == 1 and row["denoiser_params_m"] > 0


def test_memory_table_bytes_follow_the_trainer_layout():
    table = _load("memory_table")
    parts = table.per_gpu(params=8 * 2**30, largest_block=2**30, gpus=8)  # 8 Gi parameters, a 1 Gi block
    assert parts["DDP"] == {
        "params fp32": 32.0,
        "grads fp32": 32.0,
        "AdamW fp32": 64.0,
        "reference bf16": 16.0,
        "total": 144.0,
    }
    assert parts["FSDP2"]["total"] == pytest.approx(144.0 / 8 + 4.0)  # + two gathered bf16 blocks
