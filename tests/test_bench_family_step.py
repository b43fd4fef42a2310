"""The real-size family-step benchmark (benchmarks/bench_family_step.py) on its scaled-down
configurations: every family's step runs, trains its LoRA and writes its CSV row."""

import csv
import importlib.util
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("bench_family_step", ROOT / "benchmarks" / "bench_family_step.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def test_every_family_step_runs_tiny(tmp_path):
    out = tmp_path / "family.csv"
    rows = bench.main(["--tiny", "--device", "cpu", "--steps", "1", "--warmup", "0", "--out", str(out)])
    assert [r["family"] for r in rows] == ["sdxl", "sd3", "flux"]
    assert all(r["loss_finite"] and r["step_ms"] > 0 for r in rows)
    with open(out) as f:
        assert [r["family"] for r in csv.DictReader(f)] == ["sdxl", "sd3", "flux"]


@pytest.mark.parametrize("family", ["sdxl", "sd3", "flux"])
def test_prediction_shape_matches_target_and_adapters_matter(family):
    cls, *_ = bench.FAMILIES[family]
    torch.manual_seed(0)
    model = cls(**bench.TINY[family])
    params = bench.add_lora(model, 4, torch.float32, bench.LORA_TARGETS)
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.5)  # nonzero B matrices: the adapters change the output
    batch = bench.inputs(family, 2, True, torch.device("cpu"), torch.float32, torch.Generator().manual_seed(3))
    noisy, target = bench.noised(family, batch)
    with torch.no_grad():
        pred = bench.forward(family, model, noisy, batch, torch.float32)
        model.disable_adapters()
        base = bench.forward(family, model, noisy, batch, torch.float32)
        model.enable_adapters()
    assert pred.shape == target.shape == batch["latents"].shape
    assert (pred - base).abs().max() > 1e-4


def test_real_size_needs_cuda():
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    with pytest.raises(ValueError, match="--device"):
        bench.main(["--device", "cpu", "--families", "sdxl"])
