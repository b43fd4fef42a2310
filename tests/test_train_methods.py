"""Every ``--loss_type`` end to end on the bundled tiny model, with what is particular to
each: MaPO and SFT make no reference forward, KTO's unpaired rows, SSPO's replay and resume."""

import csv
import math

import diffusers  # noqa: F401  (the train extra: `make test` installs it; missing, these tests fail)
import pytest
import torch
from diffusers import UNet2DConditionModel
from helpers import needs_kernels
from safetensors.torch import load_file
from train_helpers import FAST

from fastpref import train
from fastpref.training.args import DEFAULT_DATA, DEFAULT_MODEL
from fastpref.training.batches import Encoders, image_batch, paired_batch
from fastpref.training.data import PreferencePairs, parquet_files
from fastpref.training.family import load_family
from fastpref.training.losses import LOSS_TYPES

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")
SSPO_FAST = ["--sspo_sample_steps", "2", "--sspo_snapshot_steps", "1", "--sspo_num_snapshots", "2"]


def _rows(out):
    with open(out / "metrics.csv") as f:
        return [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)]


def _run(tmp_path, loss_type, steps=2, extra=()):
    out = tmp_path / loss_type
    train.main(
        [
            *FAST,
            "--train_batch_size",
            "2",
            "--output_dir",
            str(out),
            "--max_train_steps",
            str(steps),
            "--loss_type",
            loss_type,
            "--report_to",
            "csv",
            *SSPO_FAST,
            *extra,
        ]
    )
    return out


@needs_kernels
@pytest.mark.parametrize("loss_type", sorted(LOSS_TYPES))
def test_every_loss_type_trains_the_tiny_model(tmp_path, loss_type):
    out = _run(tmp_path, loss_type)
    rows = _rows(out)
    assert [r["step"] for r in rows] == [1, 2]
    assert all(math.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in rows)
    lora = load_file(out / "pytorch_lora_weights.safetensors")
    assert any(v.abs().sum() > 0 for k, v in lora.items() if "lora.up" in k or "lora_B" in k)  # B starts at 0
    if loss_type == "sspo":
        assert {"dpo_fraction", "replayed_step"} <= rows[0].keys()
        assert all(0 <= r["dpo_fraction"] <= 1 for r in rows)
    if loss_type == "kto":
        assert {"kl", "acc"} <= rows[0].keys()


class _ForwardCounter:
    def __init__(self, monkeypatch):
        self.calls = 0
        original = UNet2DConditionModel.forward

        def counted(module, *args, **kwargs):
            self.calls += 1
            return original(module, *args, **kwargs)

        monkeypatch.setattr(UNet2DConditionModel, "forward", counted)


@needs_kernels
@pytest.mark.parametrize("loss_type,per_step", [("mapo", 1), ("sft", 1), ("dpo", 2)])
@pytest.mark.parametrize("reference", ["lora", "copy"])
def test_reference_forward_only_where_the_loss_needs_it(tmp_path, monkeypatch, loss_type, per_step, reference):
    counter = _ForwardCounter(monkeypatch)
    _run(tmp_path, loss_type, steps=3, extra=["--reference", reference, "--gradient_accumulation_steps", "2"])
    assert counter.calls == 3 * 2 * per_step


def test_kto_rows_are_unpaired_labelled_images():
    family = load_family(DEFAULT_MODEL, torch.device("cpu"), torch.float32)
    enc = Encoders(family, 32, False, True, 0)
    pairs = PreferencePairs(parquet_files(DEFAULT_DATA))
    rows = image_batch(pairs, list(range(64)), enc)
    paired = paired_batch(pairs, list(range(4)), enc)
    assert rows.latents.shape == (64, 4, 8, 8) and rows.labels.shape == (64,)
    assert 0 < rows.labels.sum() < 64 and set(rows.labels.tolist()) == {0.0, 1.0}
    assert len({tuple(n.flatten()[:4].tolist()) for n in rows.noise}) == 64  # every row its own noise
    assert torch.equal(paired.noise[:4], paired.noise[4:]) and torch.equal(paired.timesteps[:4], paired.timesteps[4:])
    assert torch.equal(paired.labels, torch.tensor([1.0] * 4 + [0.0] * 4))
    again = image_batch(pairs, list(range(64)), enc)
    assert torch.equal(again.latents, rows.latents) and torch.equal(again.labels, rows.labels)


@needs_kernels
def test_sspo_resume_continues_replay_exactly(tmp_path):
    straight = _run(tmp_path / "a", "sspo", steps=4, extra=["--checkpointing_steps", "2"])
    _run(tmp_path / "b", "sspo", steps=2, extra=["--checkpointing_steps", "2"])
    resumed = _run(
        tmp_path / "b", "sspo", steps=4, extra=["--checkpointing_steps", "2", "--resume_from_checkpoint", "latest"]
    )
    assert [r["loss"] for r in _rows(resumed)] == [r["loss"] for r in _rows(straight)]
    assert [r["replayed_step"] for r in _rows(resumed)] == [r["replayed_step"] for r in _rows(straight)]
    a = load_file(straight / "checkpoint-4" / "trainable.safetensors")
    b = load_file(resumed / "checkpoint-4" / "trainable.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    pool_a = load_file(straight / "checkpoint-4" / "replay.safetensors")
    pool_b = load_file(resumed / "checkpoint-4" / "replay.safetensors")
    assert pool_a.keys() == pool_b.keys() and all(torch.equal(pool_a[k], pool_b[k]) for k in pool_a)
    assert {k.split("/")[0] for k in pool_a} == {"0", "1", "2"}  # initial + --sspo_num_snapshots 2


@needs_kernels
def test_sspo_refuses_to_resume_a_checkpoint_without_a_replay_pool(tmp_path):
    out = _run(tmp_path, "dpo", steps=1, extra=["--checkpointing_steps", "1"])
    with pytest.raises(ValueError, match="holds no SSPO replay pool"):
        train.main(
            [
                *FAST,
                "--train_batch_size",
                "2",
                "--output_dir",
                str(out),
                "--max_train_steps",
                "2",
                "--loss_type",
                "sspo",
                "--resume_from_checkpoint",
                "latest",
                *SSPO_FAST,
            ]
        )
