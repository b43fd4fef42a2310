"""Diffusion-DPO, SFT and DSPO against the float64 reference (docs/methods.md): loss, gradient, metrics;
every variant, β from small to 5000, fp32/fp16/bf16/mixed/fp64, 4-D and 5-D, B = 1, rows
not a multiple of the block and split across programs. Outputs are poisoned (conftest)."""

import pytest
import reference
import torch
from helpers import (
    assert_close,
    assert_grad_close,
    case_id,
    check_accuracy,
    compute_rtol,
    make_inputs,
    run,
    run_reference,
)

import fastpref

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
# (shape, dtypes): every dtype mix on a 4-D batch whose rows span several programs and end in
# a partial block (n = 3 * 25 * 41 = 3075); the others on B = 1 and on 5-D video latents.
CASES = [
    ((6, 3, 25, 41), F32),
    ((6, 3, 25, 41), F16),
    ((6, 3, 25, 41), BF16),
    ((6, 3, 25, 41), F64),
    ((6, 3, 25, 41), (F32, F16, F16)),  # the official trainer: fp32 policy, fp16 reference/target
    ((6, 3, 25, 41), (BF16, F32, F16)),
    ((2, 4, 8, 8), F32),
    ((2, 4, 8, 8), BF16),
    ((4, 2, 3, 5, 7), F32),
    ((4, 2, 3, 5, 7), (F16, BF16, F32)),
]
CASE_IDS = [case_id(s, d) for s, d in CASES]
# β and a policy offset that keeps inside = O(1) at that β.
BETAS = [(0.5, 0.5), (50.0, 0.1), (5000.0, 0.01)]


def check_metrics(metrics, expected, rtol, skip=()):
    assert set(metrics) == set(expected), f"metric keys {sorted(metrics)} != {sorted(expected)}"
    for name, value in metrics.items():
        assert not value.requires_grad, f"metric {name} must be detached"
        if name in skip:
            continue
        if value.dtype.is_floating_point:
            assert_close(name, value, expected[name], rtol, atol=rtol)
        else:
            assert int(value) == int(expected[name]), f"{name}: {int(value)} != {int(expected[name])}"


LOSS_TYPES = ["sigmoid", "hinge", "ipo"]


@pytest.mark.parametrize("beta,scale", BETAS, ids=[f"beta{b:g}" for b, _ in BETAS])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("shape,dtypes", CASES, ids=CASE_IDS)
def test_dpo_matches_spec(shape, dtypes, loss_type, beta, scale, device):
    seed = LOSS_TYPES.index(loss_type) + 3 * BETAS.index((beta, scale))  # other inputs for every setting
    inputs = make_inputs(shape, dtypes, device, seed, scale)
    loss, metrics, grad, G = run(fastpref.diffusion_dpo_loss, *inputs, beta=beta, loss_type=loss_type)
    ref_loss, ref_metrics, ref_grad = run_reference(reference.dpo, *inputs, G=G, beta=beta, loss_type=loss_type)
    rtol = compute_rtol(inputs, beta)
    compute = F64 if F64 in (x.dtype for x in inputs) else F32
    assert loss.dtype == compute and loss.shape == ()
    assert_close("loss", loss, ref_loss, rtol, atol=rtol)
    assert_grad_close(grad, ref_grad, inputs[0].dtype, rtol)
    check_metrics(metrics, ref_metrics, rtol, skip=("implicit_acc", "implicit_acc_ties_half"))
    inside_tol = rtol * (1 + float(ref_metrics["inside_term"].abs().max()))
    check_accuracy("implicit_acc", metrics["implicit_acc"], ref_metrics["inside_term"], inside_tol)
    assert metrics["inside_term"].shape == (shape[0] // 2,)


@pytest.mark.parametrize("winners_only", [False, True])
@pytest.mark.parametrize("shape,dtypes", CASES, ids=CASE_IDS)
def test_sft_matches_spec(shape, dtypes, winners_only, device):
    seed = int(winners_only)
    model, _, target = make_inputs(shape, dtypes, device, seed, 0.3)
    loss, metrics, grad, G = run(fastpref.sft_loss, model, target, winners_only=winners_only)
    ref_loss, ref_metrics, ref_grad = run_reference(reference.sft, model, target, G=G, winners_only=winners_only)
    rtol = 1e-12 if F64 in (model.dtype, target.dtype) else 4e-6
    assert_close("loss", loss, ref_loss, rtol)
    assert_grad_close(grad, ref_grad, model.dtype, rtol)
    check_metrics(metrics, ref_metrics, rtol)
    if winners_only:
        assert (grad[shape[0] // 2 :] == 0).all(), "loser rows must get exactly zero gradient"


def test_sft_accepts_unpaired_odd_batch(device):
    model, _, target = make_inputs((3, 4, 5), F32, device, 7, 0.3)
    loss, _, grad, G = run(fastpref.sft_loss, model, target)
    ref_loss, _, ref_grad = run_reference(reference.sft, model, target, G=G)
    assert_close("loss", loss, ref_loss, 4e-6)
    assert_grad_close(grad, ref_grad, F32, 4e-6)


DSPO_SETTINGS = [
    ("sd15", 0.001, 0.3),
    ("sd15", 1.0, 0.3),
    ("sd15", 50.0, 0.05),
    ("sdxl", 0.001, 0.3),
    ("sdxl", 5000.0, 0.01),
]


# sdxl: seed 0 puts the threshold under q (branch 1), seed 1 over it (branch 2); sd15 has no branch
DSPO_RUNS = [(v, b, s, seed) for v, b, s in DSPO_SETTINGS for seed in ((0, 1) if v == "sdxl" else (0,))]


@pytest.mark.parametrize(
    "variant,beta,scale,seed", DSPO_RUNS, ids=[f"{v}-beta{b:g}-seed{seed}" for v, b, _, seed in DSPO_RUNS]
)
@pytest.mark.parametrize("shape,dtypes", CASES, ids=CASE_IDS)
def test_dspo_matches_spec(shape, dtypes, variant, beta, scale, seed, device):
    inputs = make_inputs(shape, dtypes, device, seed, scale)
    # A threshold well clear of q on either side exercises both sdxl branches across seeds.
    q = float(((inputs[0].double() - inputs[1].double())[: shape[0] // 2] ** 2).mean())
    threshold = q * (0.5 if seed == 0 else 2.0)
    kw = dict(beta=beta, variant=variant, sdxl_threshold=threshold)
    loss, metrics, grad, G = run(fastpref.dspo_loss, *inputs, **kw)
    ref_loss, ref_metrics, ref_grad = run_reference(reference.dspo, *inputs, G=G, **kw)
    rtol = compute_rtol(inputs, beta) * (1 + 2 * beta * beta * scale * scale)  # the β² g² S_pr term
    assert_close("loss", loss, ref_loss, rtol, atol=rtol)
    assert_grad_close(grad, ref_grad, inputs[0].dtype, rtol)
    check_metrics(metrics, ref_metrics, rtol, skip=("implicit_acc",))
    expected_branch = 0 if variant == "sd15" else (1 if seed == 0 else 2)
    assert int(metrics["sdxl_branch"]) == expected_branch
    assert metrics["sdxl_branch"].dtype == torch.int64 and metrics["sdxl_branch"].shape == ()
