"""The flow-family whole-step sweep (``benchmarks/bench_family_step.py --sweep``) on the tiny
SD3 and Flux configurations: every provider runs once, writes its CSV row with positive times
and the ratio to the flow_grpo-style step, and starts from the same loss as fastpref's step
(the same model, adapters and batch; flow_grpo's eager loss block over four sequential
forwards against the fused loss over two batched ones), so the sweep compares equal work."""

import csv
import importlib.util
import json
import math
from pathlib import Path

import diffusers  # noqa: F401  (the train extra: missing, these tests fail)
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("bench_family_step", ROOT / "benchmarks" / "bench_family_step.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)  # puts benchmarks/ on sys.path (flow_providers, speed_providers)

import flow_providers  # noqa: E402

# where the suite's kernels run: the CPU under the interpreter, or compiled on a GPU (tests/conftest.py)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# every provider once: all of them on SD3; the baselines and fastpref on Flux (its compiled
# providers would double the file's cost: each compile traces four block graphs)
RUNS = {"sd3": list(flow_providers.FLOW_SWEEP), "flux": ["flow_grpo", "flow_grpo-batched", "fastpref"]}


def _sweep(tmp_path, family):
    out = tmp_path / f"{family}.csv"
    argv = ["--sweep", "--tiny", "--device", DEVICE, "--families", family, "--steps", "1", "--warmup", "1"]
    argv += ["--compile-backend", "eager", "--lora-std", "0.1", "--providers", ",".join(RUNS[family])]
    rows = bench.main([*argv, "--out", str(out)])
    with open(out) as f:
        written = list(csv.DictReader(f))
    return rows, written, json.loads(out.with_name(out.name + ".meta.json").read_text())


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_flow_sweep_every_provider_runs_and_starts_from_flow_grpos_loss(tmp_path, monkeypatch, family):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    rows, written, meta = _sweep(tmp_path, family)
    assert meta["notes"] == []  # nothing skipped or failed
    assert [r["provider"] for r in written] == RUNS[family]
    assert all(r["family"] == family for r in written)
    by = {r["provider"]: r for r in rows}
    for provider, row in by.items():
        assert row["step_ms"] > 0 and row["steps_per_s"] > 0, provider
        assert row["pairs_per_s"] == pytest.approx(row["steps_per_s"])  # one pair
        assert row["ratio_vs_flow_grpo"] == pytest.approx(row["steps_per_s"] / by["flow_grpo"]["steps_per_s"], abs=1e-3)
        assert row["model_tflop_per_step"] == by["flow_grpo"]["model_tflop_per_step"] > 0
        assert (row["compile_s"] is not None) == (provider in ("+compile", "full-stack")), provider
        if row["compile_s"] is not None:
            assert row["compile_s"] >= 0
    if "full-stack" in by:
        flags = "use_fused_adam=True allow_tf32=True sdpa_backend=flash compile_denoiser=True"
        assert by["full-stack"]["flags"] == flags
    # the comparison is fair: the baseline's first loss is fastpref's (float32 rounding of the
    # errors amplified by β/2 = 50), and 30x the tolerance away from log 2, so the seeded
    # adapters made policy != reference and a swapped winner/loser would show
    loss = by["fastpref"]["first_loss"]
    assert abs(loss - math.log(2)) > 2e-3
    for provider, row in by.items():
        if DEVICE == "cuda" and "allow_tf32=True" in row["flags"]:
            continue  # TF32 matmuls round to 10 mantissa bits: not the float32 step
        assert row["first_loss"] == pytest.approx(loss, rel=1e-4, abs=1e-5), provider
    if DEVICE == "cuda":
        assert all(row["peak_memory_gib"] > 0 for row in rows)


def test_sweep_bad_input_names_the_flag():
    with pytest.raises(ValueError, match="--families"):
        bench.main(["--sweep", "--tiny", "--device", "cpu", "--families", "sdxl"])
    with pytest.raises(ValueError, match="--providers"):
        bench.main(["--sweep", "--tiny", "--device", "cpu", "--providers", "fastpref,nope"])
