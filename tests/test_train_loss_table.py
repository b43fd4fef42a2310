"""Every ``--loss_type`` table entry calls its fastpref loss on a paired batch."""
import pytest

pytest.importorskip("diffusers", reason="the training tests need the train extra (diffusers), which `make test` installs where a package index is reachable")

import pytest
import torch

from fastpref.training.losses import LOSS_TYPES, get_loss_type


@pytest.mark.parametrize("name", sorted(LOSS_TYPES))
def test_entry_returns_finite_loss_and_gradient(name):
    g = torch.Generator().manual_seed(0)
    target = torch.randn(4, 4, 8, 8, generator=g)
    ref = target + 0.3 * torch.randn(4, 4, 8, 8, generator=g)
    model = (ref + 0.01 * torch.randn(4, 4, 8, 8, generator=g)).requires_grad_()
    entry = get_loss_type(name)
    loss, metrics = entry(model, ref if entry.needs_reference else None, target, None,
                          torch.tensor([100, 900]))
    loss.backward()
    assert loss.ndim == 0 and torch.isfinite(loss) and "loss" in metrics
    assert torch.isfinite(model.grad).all() and model.grad.abs().sum() > 0
    if entry.default_beta is not None:  # --beta reaches the loss
        other, _ = entry(model.detach(), ref if entry.needs_reference else None, target,
                         entry.default_beta * 1e6, torch.tensor([100, 900]))
        assert not torch.equal(other, loss.detach())
