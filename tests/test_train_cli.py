"""The command line: a fast ``--help`` that shows every default and the exit statuses, and a stop
by SIGTERM that exits with EXIT_STOPPED (75) after writing its checkpoint."""

import signal
import sys

import pytest
from proc_helpers import run
from train_helpers import FAST, sigterm_after_logging

from fastpref.training.args import build_parser
from fastpref.training.exits import EXIT_STATUSES, EXIT_STOPPED

HEAVY = ("diffusers", "transformers", "peft", "tensorboard", "matplotlib")


def test_importing_the_trainer_imports_no_heavy_module():
    code = f"import sys, fastpref.train; print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = run([sys.executable, "-c", code], timeout=120, what="import fastpref.train").stdout.strip()
    assert out.splitlines()[-1:] in ([], [""]), f"heavy modules imported with the trainer: {out}"


def test_help_shows_defaults_exit_statuses_and_no_spec():
    out = " ".join(run([sys.executable, "-m", "fastpref.train", "--help"], timeout=120, what="--help").stdout.split())
    assert "spec §" not in out
    assert "(default: 4)" in out and "(default: lora)" in out
    assert "5e-04 with --reference lora" in out or "0.0005 with --reference lora" in out
    for code in EXIT_STATUSES:
        assert f"{code} " in out
    assert "75 stopped by SIGTERM/SIGINT" in out


def test_every_flag_has_help():
    for action in build_parser()._actions:
        assert action.help, f"{action.option_strings} has no help"


def test_sigterm_exits_75_after_writing_a_checkpoint(tmp_path, monkeypatch, capsys):
    """The console entry point (`fastpref.train.cli`, what ``python -m fastpref.train`` runs) in
    this process, a SIGTERM delivered while step 2 runs (tests/test_train_e2e.py starts a real
    trainer process and kills it; a start-up costs ~10 s, so this one stays in-process)."""
    from fastpref import train
    from fastpref.training.logging import MetricsLogger

    out = tmp_path / "out"
    sigterm_after_logging(monkeypatch, 2)
    monkeypatch.setattr(MetricsLogger, "plot", lambda self, keys: None)
    argv = ["fastpref-train", *FAST, "--output_dir", str(out), "--max_train_steps", "100000"]
    monkeypatch.setattr(sys, "argv", [*argv, "--checkpointing_steps", "1000"])
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as stop:
        train.cli()
    assert stop.value.code == EXIT_STOPPED, f"exit status {stop.value.code}, expected {EXIT_STOPPED}"
    assert signal.getsignal(signal.SIGTERM) is before  # the trainer's handler is removed again
    assert "stopped by a signal after step 2" in capsys.readouterr().err
    assert not (out / "pytorch_lora_weights.safetensors").exists()  # not a finished run
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]  # written by the stop
