"""Every ``--loss_type`` table entry calls its fastpref loss on a batch of its layout."""

import diffusers  # noqa: F401  (the train extra: `make test` installs it; missing, these tests fail)
import pytest
import torch

from fastpref.training.batches import Batch
from fastpref.training.losses import LOSS_TYPES, get_loss_type


def _batch(rows: int, g: torch.Generator, device) -> Batch:
    half = rows // 2
    batch = Batch(
        latents=torch.randn(rows, 4, 8, 8, generator=g),
        embeddings=torch.randn(rows, 3, 8, generator=g),
        pooled=torch.randn(half, 8, generator=g).repeat(2, 1),
        noise=torch.randn(rows, 4, 8, 8, generator=g),
        timesteps=torch.tensor([100, 900]).repeat(2),
        labels=torch.tensor([1.0, 0.0, 0.0, 1.0]),
    )
    return Batch(*(t.to(device) if torch.is_tensor(t) else t for t in batch))


@pytest.mark.parametrize("name", sorted(LOSS_TYPES))
def test_entry_returns_finite_loss_and_gradient(name, device):
    g = torch.Generator().manual_seed(0)
    target = torch.randn(4, 4, 8, 8, generator=g)
    ref = target + 0.3 * torch.randn(4, 4, 8, 8, generator=g)
    model = (ref + 0.01 * torch.randn(4, 4, 8, 8, generator=g)).to(device).requires_grad_()
    target, ref = target.to(device), ref.to(device)
    entry, batch = get_loss_type(name), _batch(4, g, device)
    loss, metrics = entry(model, ref if entry.needs_reference else None, target, batch)
    loss.backward()
    assert loss.ndim == 0 and torch.isfinite(loss) and "loss" in metrics
    assert torch.isfinite(model.grad).all() and model.grad.abs().sum() > 0
    if entry.default_beta is not None:  # --beta reaches the loss
        other, _ = entry(
            model.detach(), ref if entry.needs_reference else None, target, batch, beta=entry.default_beta * 1e6
        )
        assert not torch.equal(other, loss.detach())


def test_rpo_weights_come_from_pooled_prompts_and_tau(device):
    g = torch.Generator().manual_seed(1)
    target = torch.randn(4, 4, 8, 8, generator=g)
    ref, model = target + 0.3 * torch.randn_like(target), target + 0.3 * torch.randn_like(target)
    target, ref, model = target.to(device), ref.to(device), model.to(device)
    batch = _batch(4, g, device)
    _, sharp = LOSS_TYPES["rpo"](model, ref, target, batch, rpo_tau=0.01)
    _, soft = LOSS_TYPES["rpo"](model, ref, target, batch, rpo_tau=100.0)
    _, uniform = LOSS_TYPES["rpo_uniform"](model, ref, target, batch)
    emb = torch.nn.functional.normalize(batch.pooled[:2].double(), dim=-1)
    expected = torch.softmax(emb @ emb.T / 0.01, dim=-1)
    torch.testing.assert_close(sharp["weights"].double(), expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(
        soft["weights"].double(), torch.full((2, 2), 0.5, dtype=torch.float64, device=device), atol=1e-2, rtol=0
    )
    assert torch.equal(uniform["weights"], torch.ones(2, 2, device=device))


def test_kto_gets_the_row_labels_and_a_given_baseline(device):
    g = torch.Generator().manual_seed(2)
    target = torch.randn(4, 4, 8, 8, generator=g)
    ref, model = target + 0.3 * torch.randn_like(target), target + 0.3 * torch.randn_like(target)
    target, ref, model = target.to(device), ref.to(device), model.to(device)
    batch = _batch(4, g, device)
    _, own = LOSS_TYPES["kto"](model, ref, target, batch)
    baseline = torch.tensor(0.25, device=device)
    loss, given = LOSS_TYPES["kto"](model, ref, target, batch, beta=1.0, kl_baseline=baseline)
    assert given["kl"] == 0.25 and own["kl"] != 0.25
    flipped = batch._replace(labels=1 - batch.labels)
    other, _ = LOSS_TYPES["kto"](model, ref, target, flipped, beta=1.0, kl_baseline=baseline)
    assert not torch.equal(loss, other)


def test_kto_baseline_of_several_processes_is_the_clamped_global_mean(monkeypatch, device):
    """z = max(0, mean over every process's rows of r_k - m_k): here rank 0's rows, plus another
    rank whose all-reduce contribution is simulated."""
    import torch.distributed as dist

    from fastpref.training.distributed import DistState, kto_global_baseline

    g = torch.Generator().manual_seed(4)
    target = torch.randn(4, 4, 8, 8, generator=g)
    ref, model = target + 0.3 * torch.randn_like(target), target + 0.2 * torch.randn_like(target)
    target, ref, model = target.to(device), ref.to(device), model.to(device)
    state = DistState(rank=0, world_size=2, local_rank=0, device=device)
    assert kto_global_baseline(DistState(0, 1, 0, device)) is None
    baseline = kto_global_baseline(state)
    own = (
        ((ref - target).double() ** 2).mean(dim=(1, 2, 3)) - ((model - target).double() ** 2).mean(dim=(1, 2, 3))
    ).mean()
    for other in (0.05, -10.0):  # the other rank's mean gap; the clamp at 0 applies to the global mean
        monkeypatch.setattr(dist, "all_reduce", lambda t, other=other: t.add_(other))
        z = baseline(model, ref, target)
        assert z.ndim == 0 and float(z) == pytest.approx(max(0.0, float(own + other) / 2), rel=1e-5, abs=1e-7)
