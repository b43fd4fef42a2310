"""The whole-step benchmark runs end to end on the CPU with a miniature UNet (no timing
assertions): every provider writes its rows or says why it was skipped."""
import pytest

pytest.importorskip("diffusers", reason="the training tests need the train extra (diffusers), which `make test` installs where a package index is reachable")

import csv
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_tiny_train_step_benchmark_writes_rows(tmp_path):
    out = tmp_path / "train_step_tiny.csv"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_train_step.py"), "--tiny",
                           "--device", "cpu", "--steps", "2", "--warmup", "1", "--batches", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    with open(out) as f:
        rows = list(csv.DictReader(f))
    by_provider = {(r["kernel_provider"], r["metric_name"]): r for r in rows}
    for provider in ("eager-diffusers", "fastpref"):
        assert float(by_provider[(provider, "train_step_time")]["y_value_50"]) > 0
        assert float(by_provider[(provider, "unet_tflop_per_step")]["y_value_50"]) > 0
    assert not any(p == "fastpref-cudagraph" for p, _ in by_provider)
    meta = json.loads((tmp_path / "train_step_tiny.csv.meta.json").read_text())
    assert "SKIP fastpref-cudagraph: needs CUDA" in meta["notes"]
