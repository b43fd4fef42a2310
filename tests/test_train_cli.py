"""The command line: a fast ``--help`` that shows every default and the exit statuses, and a stop
by SIGTERM that exits with EXIT_STOPPED (75) after writing its checkpoint, in a real process."""

import os
import signal
import subprocess
import sys
import time

import pytest
from proc_helpers import kill_tree, run, start
from train_helpers import FAST

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


def test_sigterm_exits_75_after_writing_a_checkpoint(tmp_path):
    out = tmp_path / "out"
    log = open(tmp_path / "log.txt", "w+")
    proc = start(
        [
            sys.executable,
            "-m",
            "fastpref.train",
            *FAST,
            "--output_dir",
            str(out),
            "--max_train_steps",
            "100000",
            "--checkpointing_steps",
            "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 150
        while not (out / "checkpoint-1").is_dir():  # the loop runs: the stop handler is installed
            if proc.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                pytest.fail(f"the trainer wrote no checkpoint-1 (exit {proc.poll()}):\n{log.read()[-3000:]}")
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGTERM)
        rc = proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("the trainer did not exit within 120 s of SIGTERM")
    finally:
        if proc.poll() is None:
            kill_tree(proc.pid)
    log.seek(0)
    text = log.read()
    assert rc == EXIT_STOPPED, f"exit status {rc}, expected {EXIT_STOPPED}:\n{text[-3000:]}"
    assert "stopped by a signal" in text
    assert not (out / "pytorch_lora_weights.safetensors").exists()  # not a finished run
    assert list(out.glob("checkpoint-*"))
