"""End-to-end trainer runs on the bundled tiny model: both reference modes, exact resume
after a kill, 2-process torchrun (gloo) against 1 process, and loading the results."""

import csv
import os
import signal
import subprocess
import sys
import time

import diffusers  # noqa: F401  (the train extra: `make test` installs it; missing, these tests fail)
import proc_helpers
import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from helpers import needs_kernels
from safetensors.torch import load_file
from train_helpers import FAST, sigterm_after_logging

from fastpref import train
from fastpref.training.args import DEFAULT_MODEL

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def _rows(out):
    with open(out / "metrics.csv") as f:
        return list(csv.DictReader(f))


def _unet_output(pipe):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=g)
    emb = torch.randn(1, pipe.tokenizer.model_max_length, pipe.text_encoder.config.hidden_size, generator=g)
    with torch.no_grad():
        return pipe.unet(x, torch.tensor([500]), emb).sample


def test_bundled_pipeline_loads_and_samples():
    pipe = StableDiffusionPipeline.from_pretrained(DEFAULT_MODEL, safety_checker=None)
    assert pipe.unet.config.sample_size * 4 == pipe.vae.config.sample_size == 32
    image = pipe(
        "a red circle", num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0)
    ).images
    assert image.shape == (1, 32, 32, 3)
    size_mb = sum(f.stat().st_size for f in DEFAULT_MODEL.rglob("*") if f.is_file()) / 2**20
    assert size_mb < 8


@needs_kernels
def test_lora_run_writes_loadable_lora_and_logs(tmp_path):
    out = tmp_path / "lora"
    train.main(
        [
            *FAST,
            "--output_dir",
            str(out),
            "--max_train_steps",
            "2",
            "--checkpointing_steps",
            "2",
            "--report_to",
            "tensorboard",
        ]
    )
    rows = _rows(out)
    assert [r["step"] for r in rows] == ["1", "2"]
    for key in ("loss", "implicit_acc", "model_mse", "ref_mse", "lr"):
        assert key in rows[0]
    assert float(rows[0]["model_mse"]) == pytest.approx(float(rows[0]["ref_mse"]), rel=1e-5)  # adapters start at zero
    assert (out / "curves.png").stat().st_size > 0 and any((out / "logs").iterdir())
    assert (out / "checkpoint-2" / "trainable.safetensors").is_file()
    pipe = StableDiffusionPipeline.from_pretrained(DEFAULT_MODEL, safety_checker=None)
    before = _unet_output(pipe)
    pipe.load_lora_weights(out)
    after = _unet_output(pipe)
    assert not torch.equal(before, after)


@needs_kernels
def test_copy_run_writes_full_unet(tmp_path):
    out = tmp_path / "copy"
    train.main(
        [
            *FAST,
            "--output_dir",
            str(out),
            "--max_train_steps",
            "2",
            "--reference",
            "copy",
            "--loss_type",
            "dspo",
            "--learning_rate",
            "1e-4",
        ]
    )
    trained = UNet2DConditionModel.from_pretrained(out / "unet")
    base = UNet2DConditionModel.from_pretrained(DEFAULT_MODEL, subfolder="unet")
    changed = [n for n, p in trained.named_parameters() if not torch.equal(p, dict(base.named_parameters())[n])]
    assert changed
    assert len(_rows(out)) == 2


@needs_kernels
def test_resume_after_kill_is_bitwise_identical(tmp_path):
    killed = tmp_path / "killed"
    args = [*FAST, "--train_batch_size", "2", "--checkpointing_steps", "1", "--random_crop"]
    proc = proc_helpers.start(
        [sys.executable, "-m", "fastpref.train", *args, "--output_dir", str(killed), "--max_train_steps", "1000"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 120
        while not (killed / "checkpoint-1" / "state.json").exists():
            assert proc.poll() is None, "trainer exited before checkpoint-1"
            assert time.time() < deadline, "trainer wrote no checkpoint-1 within 120 s (killed)"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc_helpers.kill_tree(proc.pid)
    assert proc.returncode == -signal.SIGKILL
    resumed_from = max(int(p.name.split("-")[1]) for p in killed.glob("checkpoint-*"))
    total = resumed_from + 2
    train.main(
        [*args, "--output_dir", str(killed), "--max_train_steps", str(total), "--resume_from_checkpoint", "latest"]
    )
    straight = tmp_path / "straight"
    train.main([*args, "--output_dir", str(straight), "--max_train_steps", str(total)])
    a = load_file(killed / f"checkpoint-{total}" / "trainable.safetensors")
    b = load_file(straight / f"checkpoint-{total}" / "trainable.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (
        load_file(killed / "pytorch_lora_weights.safetensors").keys()
        == load_file(straight / "pytorch_lora_weights.safetensors").keys()
    )
    assert [r["loss"] for r in _rows(killed)] == [r["loss"] for r in _rows(straight)]


@needs_kernels
def test_torchrun_two_processes_match_one(tmp_path):
    """DPO through `torchrun -m fastpref.train` (the real entry point and clean-up): 2 processes of
    1 pair against 1 process of 2. (tests/test_train_fsdp.py runs KTO under DDP in its launch.)"""
    loss_type, keys = "dpo", ("loss", "model_mse", "ref_mse", "implicit_acc")
    common = [
        *FAST,
        "--max_train_steps",
        "2",
        "--checkpointing_steps",
        "2",
        "--loss_type",
        loss_type,
        "--gradient_accumulation_steps",
        "2",
        "--adam_epsilon",
        "1e-2",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if torch.cuda.device_count() < 2:  # one process per GPU: fewer than 2 GPUs -> both on the CPU (gloo)
        env.update(CUDA_VISIBLE_DEVICES="", TRITON_INTERPRET="1")  # the kernels on the CPU: interpreted
    two = tmp_path / "two"
    proc_helpers.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--standalone",
            "-m",
            "fastpref.train",
            *common,
            "--train_batch_size",
            "1",
            "--output_dir",
            str(two),
        ],
        timeout=300,
        what="torchrun --nproc_per_node 2",
        env=env,
    )
    one = tmp_path / "one"
    train.main([*common, "--train_batch_size", "2", "--output_dir", str(one)])
    for r1, r2 in zip(_rows(one), _rows(two), strict=True):
        for key in keys:
            assert float(r1[key]) == pytest.approx(float(r2[key]), rel=1e-4, abs=1e-6)
    a = load_file(one / "checkpoint-2" / "trainable.safetensors")
    b = load_file(two / "checkpoint-2" / "trainable.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-5)
    assert not any(p.name.startswith(".tmp") for p in two.iterdir())


@needs_kernels
def test_sigterm_finishes_the_step_writes_a_checkpoint_and_resume_continues(tmp_path, monkeypatch):
    from fastpref.training.logging import MetricsLogger

    args = [*FAST, "--train_batch_size", "2", "--checkpointing_steps", "100", "--random_crop"]
    original_log = sigterm_after_logging(monkeypatch, 2)
    stopped = tmp_path / "stopped"
    before = signal.getsignal(signal.SIGTERM)
    train.main([*args, "--output_dir", str(stopped), "--max_train_steps", "5"])
    assert signal.getsignal(signal.SIGTERM) is before  # the trainer's handler is removed again
    monkeypatch.setattr(MetricsLogger, "log", original_log)
    assert sorted(p.name for p in stopped.glob("checkpoint-*")) == ["checkpoint-2"]
    assert not (stopped / "pytorch_lora_weights.safetensors").exists()  # the run did not finish
    train.main([*args, "--output_dir", str(stopped), "--max_train_steps", "4", "--resume_from_checkpoint", "latest"])
    straight = tmp_path / "straight"
    train.main([*args, "--output_dir", str(straight), "--max_train_steps", "4"])
    assert [r["loss"] for r in _rows(stopped)] == [r["loss"] for r in _rows(straight)]
    a = load_file(stopped / "pytorch_lora_weights.safetensors")
    b = load_file(straight / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
