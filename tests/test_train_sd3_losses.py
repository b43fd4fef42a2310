"""Every --loss_type on the SD3 family (flow matching): one optimizer step of the trainer's own
step on a micro-batch of the bundled tiny SD3 pipeline's data, with a finite loss and a gradient."""

import math

import diffusers  # noqa: F401  (the train extra: `make test` installs it; missing, these tests fail)
import pytest
import torch
from helpers import needs_kernels

from fastpref import train
from fastpref.training.args import ASSETS
from fastpref.training.config import parse_config
from fastpref.training.losses import LOSS_TYPES

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


@needs_kernels
@pytest.mark.parametrize("loss_type", sorted(LOSS_TYPES))
def test_every_loss_type_steps_on_sd3(tmp_path, loss_type):
    run = train.build(
        parse_config(
            pretrained_model_name_or_path=str(ASSETS / "tiny-sd3"),
            loss_type=loss_type,
            train_batch_size=2,
            sspo_sample_steps=2,
            report_to="none",
            output_dir=str(tmp_path / "out"),
        )
    )
    batch = run.batch(0)
    assert batch.timesteps.dtype == torch.float32 and (batch.timesteps > 0).all() and (batch.timesteps <= 1000).all()
    before = [p.detach().clone() for p in run.params]
    metrics = run.step([batch])
    loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])  # host-ok: test
    assert math.isfinite(loss) and math.isfinite(grad_norm) and grad_norm > 0, (loss, grad_norm)
    assert any(not torch.equal(a, p) for a, p in zip(before, run.params, strict=True))
    assert not (tmp_path / "out").exists()  # build and the step write nothing
