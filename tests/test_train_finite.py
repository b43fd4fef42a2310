"""Non-finite numbers: every float flag checked before any write, and a run whose loss or
weights stop being finite exits non-zero without writing them (docs/training.md)."""

import sys

import diffusers  # noqa: F401  (the train extra: `make test` installs it; missing, these tests fail)
import pytest
from helpers import needs_kernels
from train_helpers import FAST

from fastpref import train
from fastpref.training.finite import EXIT_NON_FINITE


@pytest.mark.parametrize(
    "flag,value",
    [
        ("--learning_rate", "inf"),
        ("--learning_rate", "nan"),
        ("--learning_rate", "0"),
        ("--max_grad_norm", "nan"),
        ("--max_grad_norm", "0"),
        ("--beta", "inf"),
        ("--beta", "-1"),
        ("--adam_beta1", "1.0"),
        ("--adam_beta2", "nan"),
        ("--adam_epsilon", "inf"),
        ("--adam_weight_decay", "inf"),
        ("--rpo_tau", "nan"),
        ("--sspo_guidance_scale", "inf"),
        ("--lr_warmup_steps", "-1"),
        ("--train_batch_size", "0"),
    ],
)
def test_numeric_flag_out_of_range_refused_before_any_write(tmp_path, flag, value):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=f"{flag}: expected .*got {value}"):
        train.main([*FAST, "--output_dir", str(out), "--max_train_steps", "1", flag, value])
    assert not out.exists()


@needs_kernels
@pytest.mark.parametrize("logging_steps", ["1", "100"])
def test_diverging_run_stops_non_zero_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys, logging_steps):
    """LR 1e36: finite weights after step 1, overflow after step 2. Caught at the logging step
    (loss) or, logging rarely, at the checkpoint (weights): no checkpoint or final weights of them."""
    out = tmp_path / "out"
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "fastpref-train",
            *FAST,
            "--output_dir",
            str(out),
            "--max_train_steps",
            "4",
            "--checkpointing_steps",
            "1",
            "--learning_rate",
            "1e36",
            "--logging_steps",
            logging_steps,
        ],
    )
    with pytest.raises(SystemExit) as exit_info:
        train.cli()
    assert exit_info.value.code == EXIT_NON_FINITE
    assert "non-finite" in capsys.readouterr().err
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]
    assert not (out / "pytorch_lora_weights.safetensors").exists()


def test_learning_rate_default_per_reference_mode():
    from fastpref.training.args import parse_args

    assert parse_args([]).learning_rate == 5e-4
    assert parse_args(["--reference", "copy"]).learning_rate == 1e-6
    assert parse_args(["--reference", "copy", "--learning_rate", "1e-4"]).learning_rate == 1e-4


@needs_kernels
def test_sigterm_exits_75_after_writing_the_checkpoint(tmp_path, monkeypatch):
    import os
    import signal

    from fastpref.training.exits import EXIT_STOPPED
    from fastpref.training.logging import MetricsLogger

    original_log = MetricsLogger.log

    def log_then_signal(self, step, values):
        original_log(self, step, values)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(MetricsLogger, "log", log_then_signal)
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["fastpref-train", *FAST, "--output_dir", str(out), "--max_train_steps", "3"])
    with pytest.raises(SystemExit) as exit_info:
        train.cli()
    assert exit_info.value.code == EXIT_STOPPED == 75
    assert (out / "checkpoint-1" / "state.json").is_file()
