"""Exact constructions of docs/methods.md's tie rules (§4), input layouts, and where gradients go."""

import pytest
import reference
import torch
from helpers import assert_close, assert_grad_close, make_inputs, run, run_reference

import fastpref


def test_identical_policy_and_reference_is_an_exact_tie(device):
    """model_pred == ref_pred: inside == 0 exactly, so strict accuracy 0, ties-half 0.5, and
    DSPO's q == 0 puts sdxl in branch 2 (docs/methods.md §2.3: SDXL training starts in branch 2)."""
    _, ref, target = make_inputs((8, 4, 9, 9), torch.float32, device, 3)
    _, m = fastpref.diffusion_dpo_loss(ref.clone(), ref, target)
    assert float(m["implicit_acc"]) == 0.0 and float(m["implicit_acc_ties_half"]) == 0.5
    assert (m["inside_term"] == 0).all()
    assert_close("loss", m["loss"], torch.log(torch.tensor(2.0)), 1e-6)
    _, m = fastpref.dspo_loss(ref.clone(), ref, target, beta=5000.0, variant="sdxl")
    assert int(m["sdxl_branch"]) == 2
    assert float(m["weight_mean"]) == 0.5


@pytest.mark.parametrize("bump,branch", [(0.0, 1), (1.0, 2)])
def test_dspo_sdxl_threshold_tie_goes_to_branch_one(bump, branch, device):
    """q is exactly 0.25 (every |p - r| = 0.5): threshold 0.25 takes branch 1, the next float up
    branch 2."""
    g = torch.Generator().manual_seed(5)
    target = torch.randn(6, 3, 8, 8, generator=g)
    ref = torch.round(64 * (target + 0.5 * torch.randn(6, 3, 8, 8, generator=g))) / 64  # a 1/64 grid
    sign = torch.where(torch.rand(6, 3, 8, 8, generator=g) > 0.5, 0.5, -0.5)
    model = ref + sign  # exact in fp32 on that grid
    assert ((model - ref).abs() == 0.5).all()
    # The comparison runs in the compute dtype (float32 here): the next float32 above 0.25.
    threshold = 0.25 if bump == 0.0 else float(torch.nextafter(torch.tensor(0.25), torch.tensor(1.0)))
    args = [x.to(device) for x in (model, ref, target)]
    loss, metrics, grad, G = run(fastpref.dspo_loss, *args, beta=5000.0, variant="sdxl", sdxl_threshold=threshold)
    assert int(metrics["sdxl_branch"]) == branch
    ref_loss, _, ref_grad = run_reference(
        reference.dspo, *args, G=G, beta=5000.0, variant="sdxl", sdxl_threshold=threshold
    )
    assert_close("loss", loss, ref_loss, 1e-5, atol=1e-6)


def test_hinge_has_zero_derivative_at_the_kink(device):
    """inside == 1 exactly (β = 2, winner fits perfectly, loser error 1): zero gradient."""
    target = torch.zeros(2, 1)
    ref = torch.zeros(2, 1)
    model = torch.tensor([[0.0], [1.0]])
    args = [x.to(device) for x in (model, ref, target)]
    loss, metrics, grad, _ = run(fastpref.diffusion_dpo_loss, *args, beta=2.0, loss_type="hinge")
    assert float(metrics["inside_term"][0]) == 1.0
    assert float(loss) == 0.0
    assert (grad == 0).all()
    # Just inside the margin the derivative is back.
    args[0] = torch.tensor([[0.0], [0.999]]).to(device)
    _, _, grad, _ = run(fastpref.diffusion_dpo_loss, *args, beta=2.0, loss_type="hinge")
    assert (grad[1] != 0).all()


@pytest.mark.parametrize("layout", ["channel-slice", "permuted", "batch-strided", "expanded-target"])
def test_non_contiguous_inputs(layout, device):
    model, ref, target = make_inputs((4, 6, 10, 12), torch.float32, device, 11, 0.1)
    if layout == "channel-slice":
        model, ref, target = (x[:, ::2] for x in (model, ref, target))
    elif layout == "permuted":
        model, ref, target = (x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2) for x in (model, ref, target))
        model = model.transpose(2, 3).contiguous().transpose(2, 3)
    elif layout == "batch-strided":
        model, ref, target = (torch.cat([x, x]).view(2, 4, 6, 10, 12)[:, :].select(0, 1) for x in (model, ref, target))
        big = torch.cat([model, model], dim=1)
        model = big[:, :6]
    else:
        target = target[:1].expand(4, 6, 10, 12)
    assert not all(x.is_contiguous() for x in (model, ref, target))
    for fn, kw in [(fastpref.diffusion_dpo_loss, dict(beta=50.0)), (fastpref.dspo_loss, dict(beta=1.0))]:
        loss, _, grad, G = run(fn, model, ref, target, **kw)
        ref_fn = reference.dpo if fn is fastpref.diffusion_dpo_loss else reference.dspo
        ref_loss, _, ref_grad = run_reference(ref_fn, model, ref, target, G=G, **kw)
        assert_close("loss", loss, ref_loss, 1e-5, atol=1e-6)
        assert_grad_close(grad, ref_grad, torch.float32, 1e-5)
        assert grad.shape == model.shape


def test_gradient_flows_only_into_model_pred(device):
    """ref_pred and target are constants: they must not require grad (refused otherwise, see
    test_validation.py), and backward reaches model_pred only, through a non-leaf too."""
    model, ref, target = make_inputs((4, 3, 5, 5), torch.float32, device, 2, 0.1)
    model.requires_grad_(True)
    loss, _ = fastpref.dspo_loss(model, ref, target, beta=1.0)
    loss.backward()
    assert model.grad is not None and ref.grad is None and target.grad is None
    leaf = model.detach().clone().requires_grad_(True)
    loss, _ = fastpref.dspo_loss(leaf * 1.0, ref.detach(), target.detach(), beta=1.0)
    loss.backward()
    assert torch.equal(leaf.grad, model.grad)


def test_no_grad_needed_for_model_pred(device):
    model, ref, target = make_inputs((4, 3, 5, 5), torch.float32, device, 2, 0.1)
    loss, m = fastpref.diffusion_dpo_loss(model, ref, target)
    assert not loss.requires_grad and torch.isfinite(loss)


def test_results_are_deterministic(device):
    """Fixed split order, no atomics: two calls agree bit for bit."""
    inputs = make_inputs((6, 3, 25, 41), torch.bfloat16, device, 4, 0.01)
    a = run(fastpref.dspo_loss, *inputs, beta=5000.0, variant="sdxl", sdxl_threshold=0.0)
    b = run(fastpref.dspo_loss, *inputs, beta=5000.0, variant="sdxl", sdxl_threshold=0.0)
    assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])


def test_incoming_gradient_scales_the_gradient(device):
    """G is read on the device: 2G gives exactly twice the gradient (fp32 scaling by 2 is exact)."""
    inputs = make_inputs((4, 3, 7, 7), torch.float32, device, 9, 0.1)
    _, _, g1, _ = run(fastpref.diffusion_dpo_loss, *inputs, beta=50.0, grad_scale=0.75)
    _, _, g2, _ = run(fastpref.diffusion_dpo_loss, *inputs, beta=50.0, grad_scale=1.5)
    assert torch.equal(2 * g1, g2)
