"""The demo entry point: trains, samples both models from the same seeds, reports figures."""

import diffusers  # noqa: F401  (the train extra: `make test` installs it; missing, these tests fail)
import pytest
from helpers import needs_kernels
from PIL import Image

from fastpref import demo


@needs_kernels
@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_demo_reports_figures_and_writes_grid(tmp_path, capsys):
    out = tmp_path / "demo"
    figures = demo.main(
        ["--output_dir", str(out), "--max_train_steps", "2", "--num_samples", "4", "--train_batch_size", "2"]
    )
    assert figures["num_samples"] == 4 and 0.0 <= figures["win_rate"] <= 1.0
    assert 0.0 < figures["reward_reference"] < 1.0 and 0.0 < figures["reward_trained"] < 1.0
    assert Image.open(out / "demo_grid.png").size[0] > 0
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    printed = capsys.readouterr().out
    assert "win-rate of trained over reference" in printed and "over 4 same-seed pairs" in printed


def test_win_rate_counts_ties_half():
    import numpy as np

    assert demo.win_rate(np.array([1.0, 0.0, 0.5, 0.2]), np.array([0.0, 1.0, 0.5, 0.1])) == 0.625
