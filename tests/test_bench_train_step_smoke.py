"""The whole-step benchmark runs end to end on the CPU with a miniature UNet (no timing
assertions): every provider writes its rows or says why it was skipped. On a CUDA machine the
same miniature run reports the memory figures of every provider, the captured one's graph
pool included."""

import csv
import json
import os
import subprocess
import sys

import diffusers  # noqa: F401  (the train extra: `make test` installs it; missing, these tests fail)
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench(out, device, *extra, env):
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "benchmarks", "bench_train_step.py"),
            "--tiny",
            "--device",
            device,
            "--steps",
            "2",
            "--warmup",
            "1",
            "--batches",
            "1",
            "--out",
            str(out),
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    with open(out) as f:
        return {(r["kernel_provider"], r["metric_name"]): r for r in csv.DictReader(f)}


def test_tiny_train_step_benchmark_writes_rows(tmp_path):
    out = tmp_path / "train_step_tiny.csv"
    # the CPU run needs the interpreter, also where the suite runs compiled on a GPU
    by_provider = _bench(out, "cpu", env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "TRITON_INTERPRET": "1"})
    for provider in ("eager-diffusers", "fastpref"):
        assert float(by_provider[(provider, "train_step_time")]["y_value_50"]) > 0
        assert float(by_provider[(provider, "unet_tflop_per_step")]["y_value_50"]) > 0
    assert not any(p == "fastpref-cudagraph" for p, _ in by_provider)
    assert not any(m in ("peak_memory", "peak_reserved_memory") for _, m in by_provider)  # CUDA figures
    meta = json.loads((tmp_path / "train_step_tiny.csv.meta.json").read_text())
    assert "SKIP fastpref-cudagraph: needs CUDA" in meta["notes"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_captured_step_memory_counts_the_graph_pool(tmp_path):
    """max_memory_allocated misses a CUDA graph's private pool: every provider also reports
    its peak reserved memory, and the captured one the pool its capture reserved."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "train_step_tiny_cuda.csv"
    by_provider = _bench(out, "cuda", "--providers", "eager-diffusers,fastpref,fastpref-cudagraph", env=env)
    notes = json.loads((tmp_path / "train_step_tiny_cuda.csv.meta.json").read_text())["notes"]
    assert not notes, notes  # no provider skipped or failed
    value = {key: float(row["y_value_50"]) for key, row in by_provider.items()}
    for provider in ("eager-diffusers", "fastpref", "fastpref-cudagraph"):
        assert value[(provider, "peak_reserved_memory")] >= value[(provider, "peak_memory")] > 0, provider
    pool = value[("fastpref-cudagraph", "graph_pool_memory")]
    assert 0 < pool <= value[("fastpref-cudagraph", "peak_reserved_memory")]
    assert not any(m == "graph_pool_memory" for p, m in by_provider if p != "fastpref-cudagraph")


def test_speed_sweep_runs_every_provider_or_says_why(tmp_path):
    """``--sweep``: the script's step and fastpref's with speed options and the full stack;
    every provider writes its figures or a SKIP note naming the trainer's refusal. The options
    left out here (+channels_last, +fused_adam, +tf32, +sdpa_flash) run the same code path as
    +compile with other flags (full-stack has them all); tests/test_train_speed.py checks their numbers."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import speed_providers

    out = tmp_path / "sweep_tiny.csv"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    providers = ["script", "fastpref", "+cache_latents", "+compile", "+cudagraph", "+fp8", "full-stack"]
    sweep = ["--sweep", "--compile-backend", "eager", "--steps", "1", "--providers", ",".join(providers)]
    rows = _bench(out, "cpu", *sweep, env=env)
    notes = json.loads((tmp_path / "sweep_tiny.csv.meta.json").read_text())["notes"]
    assert not any(n.startswith("ERROR") for n in notes), notes
    value = {key: float(row["y_value_50"]) for key, row in rows.items()}
    assert set(providers) <= set(speed_providers.SWEEP)
    for provider in providers:
        skipped = [n for n in notes if n.startswith(f"SKIP {provider}:")]
        if provider in ("+cudagraph", "+fp8"):  # CUDA only (and torchao): the trainer's refusal
            assert skipped and ("--cuda_graph" in skipped[0] or "--fp8" in skipped[0]), notes
            continue
        assert not skipped, skipped
        steps = value[(provider, "steps_per_s")]
        assert steps > 0 and value[(provider, "pairs_per_s")] == pytest.approx(steps)  # B = 1
        assert value[(provider, "model_tflop_per_step")] == value[("script", "model_tflop_per_step")] > 0
        assert ((provider, "compile_time") in value) == (provider in ("+compile", "full-stack")), provider
