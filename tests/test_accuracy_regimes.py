"""The fused losses are at least as accurate as the eager fp32 block an upstream trainer writes
(fp32 upcasts, per-row mean of squared errors, then the loss), in every regime: the policy
within 1e-4 or 1e-2 of the reference (where S_pt - S_rt cancels and β amplifies it) and O(1)
away from it (where the former (2 S_ptr - S_pr)/n adds terms up to 4x those of S_pt - S_rt).
Errors are against the float64 references (docs/methods.md) on the same (rounded) inputs.

`python tests/test_accuracy_regimes.py` prints the figures quoted in the README (SD1.5-size
latents, β = 5000)."""

import pytest
import reference
import reference_extended
import torch
import torch.nn.functional as F
from helpers import run, run_reference

import fastpref

F32, BF16, F64 = torch.float32, torch.bfloat16, torch.float64
G = 0.75
DELTA = 3e-3


def regime_inputs(B, row, scale, seed, dtype, paired=True):
    """target ~ N(0, 1), ref_pred = target + N(0, 0.5²), model_pred = ref_pred + N(0, scale²).
    Paired: a pair shares its target and the loser rows copy the winners' ref_pred and
    model_pred up to a relative DELTA, so that ℓ = Δref - Δθ is small against m + r as in a
    large latent (ℓ ~ 1/sqrt(n)): β = 2/std(ℓ) then amplifies the rounding of the per-row
    errors as at SD1.5/SDXL sizes, at a test size. Unpaired (KTO): every row copies one."""
    g = torch.Generator().manual_seed(seed)
    base = (B if paired else 1,) + tuple(row)

    def randn(shape=base):
        return torch.randn(shape, generator=g, dtype=F64)

    target = randn()
    ref = target + 0.5 * randn()
    model = ref + scale * randn()
    if paired:
        ref2 = ref + 0.5 * DELTA * randn()
        model2 = ref2 + (model - ref) + scale * DELTA * randn()
        target, ref, model = torch.cat([target, target]), torch.cat([ref, ref2]), torch.cat([model, model2])
    else:
        full = (B,) + tuple(row)
        target = target.expand(full)
        ref = ref + 0.5 * DELTA * randn(full)
        model = model + 0.5 * DELTA * randn(full)
    return tuple(x.to(dtype).contiguous() for x in (model, ref, target))


def row_errors64(model, ref, target):
    m = ((model.double() - target.double()) ** 2).flatten(1).mean(1)
    r = ((ref.double() - target.double()) ** 2).flatten(1).mean(1)
    return m, r


# ---------------------------------------------------------------- the eager fp32 blocks


def eager_errors(model, ref, target):
    """Per-row mean squared errors after an fp32 upcast, as the upstream trainers compute them."""
    model_losses = (model.float() - target.float()).pow(2).flatten(1).mean(1)
    ref_losses = (ref.float() - target.float()).pow(2).flatten(1).mean(1)
    return model_losses, ref_losses


def eager_inside(model, ref, target, beta):
    model_losses, ref_losses = eager_errors(model, ref, target)
    model_w, model_l = model_losses.chunk(2)
    ref_w, ref_l = ref_losses.chunk(2)
    return -0.5 * beta * ((model_w - model_l) - (ref_w - ref_l))


def eager_dpo(model, ref, target, beta):
    return -F.logsigmoid(eager_inside(model, ref, target, beta)).mean()


def eager_dspo(model, ref, target, beta, variant, sdxl_threshold):
    g = 1 - torch.sigmoid(eager_inside(model, ref, target, beta))
    B = g.shape[0]
    shape = (B,) + (1,) * (model.dim() - 1)
    e = model[:B].float() - target[:B].float()
    d = model[:B].float() - ref[:B].float()
    if variant == "sd15":
        return (e - beta * g.view(shape) * d).pow(2).flatten(1).mean(1).mean()
    if (d**2).mean() >= sdxl_threshold:
        return (g.view(shape) * d).pow(2).flatten(1).mean(1).mean()
    return (g**2).mean()


def eager_kto(model, ref, target, labels, beta, kl_baseline):
    model_losses, ref_losses = eager_errors(model, ref, target)
    sign = torch.where(labels != 0, 1.0, -1.0)
    x = sign * beta * ((ref_losses - model_losses) - kl_baseline)
    return (1 - torch.sigmoid(x)).mean()


# ---------------------------------------------------------------- one comparison

METHODS = ("dpo", "dspo-sd15", "dspo-sdxl", "kto")


def errors(method, inputs, beta=None):
    """(fused loss, eager loss, fused grad, eager grad) relative errors against float64."""
    model, ref, target = inputs
    m, r = row_errors64(model, ref, target)
    if method == "kto":
        labels = torch.arange(model.shape[0], device=model.device) % 3 != 0
        gap = r - m
        z = float(gap.mean())  # a baseline used as given: x = s β (g - z) stays O(1)
        beta = beta or 2.0 / float(gap.std())
        fused = lambda p: fastpref.kto_loss(p, ref, target, labels, beta=beta, kl_baseline=z)  # noqa: E731
        exact = lambda p, rr, t: reference_extended.kto(p, rr, t, labels, beta=beta, kl_baseline=z)  # noqa: E731
        eager = lambda p: eager_kto(p, ref, target, labels, beta, z)  # noqa: E731
    else:
        B = m.shape[0] // 2
        ell = (r[:B] - r[B:]) - (m[:B] - m[B:])
        beta = beta or 2.0 / float(ell.std())
        if method == "dpo":
            fused = lambda p: fastpref.diffusion_dpo_loss(p, ref, target, beta=beta)  # noqa: E731
            exact = lambda p, rr, t: reference.dpo(p, rr, t, beta=beta)  # noqa: E731
            eager = lambda p: eager_dpo(p, ref, target, beta)  # noqa: E731
        else:
            variant = method.split("-")[1]
            q = float(((model.double() - ref.double())[:B] ** 2).mean())
            kw = dict(beta=beta, variant=variant, sdxl_threshold=q / 2)  # branch 1, clear of q
            fused = lambda p: fastpref.dspo_loss(p, ref, target, **kw)  # noqa: E731
            exact = lambda p, rr, t: reference.dspo(p, rr, t, **kw)  # noqa: E731
            eager = lambda p: eager_dspo(p, ref, target, beta, variant, q / 2)  # noqa: E731
    loss, _, grad, g_out = run(fused, model, grad_scale=G)
    loss64, _, grad64 = run_reference(exact, model, ref, target, G=g_out)
    leaf = model.detach().clone().requires_grad_(True)
    eager_loss = eager(leaf)
    eager_loss.backward(torch.tensor(G, dtype=eager_loss.dtype, device=eager_loss.device))
    assert grad.dtype == leaf.grad.dtype == model.dtype

    def rel(a, b):
        a, b = a.detach().double().cpu(), b.detach().double().cpu()
        return float((a - b).norm() / b.norm())

    return rel(loss, loss64), rel(eager_loss, loss64), rel(grad, grad64), rel(leaf.grad, grad64)


# bf16 gradients: both are rounded to the nearest bf16 (2^-9 relative), far more than either
# computation errs, so both land on the same bf16 values but where a value sits within that
# compute error of a rounding boundary: a difference of a fraction of a percent of the
# rounding error itself, in either direction.
BF16_GRAD_SLACK = 1.01


def assert_no_worse(label, fused, eager, slack=1.0):
    assert fused <= slack * eager, f"{label}: fused error {fused:.3e} > eager fp32 error {eager:.3e}"


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("scale", [1e-4, 1e-2], ids=["near1e-4", "near1e-2"])
@pytest.mark.parametrize("method", METHODS)
def test_near_the_reference_every_call_is_more_accurate(method, scale, dtype, device):
    """p ≈ r: the eager block's S_pt - S_rt cancels, the fused S_mr does not: every seed."""
    for seed in range(3):
        inputs = regime_inputs(8, (4, 8, 8), scale, seed, dtype, paired=method != "kto")
        lf, le, gf, ge = errors(method, tuple(x.to(device) for x in inputs))
        assert_no_worse(f"{method} seed {seed} loss", lf, le)
        assert_no_worse(f"{method} seed {seed} gradient", gf, ge, BF16_GRAD_SLACK if dtype == BF16 else 1.0)


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("method", METHODS)
def test_far_from_the_reference_no_less_accurate(method, dtype, device):
    """Policy and reference errors O(1) apart: the eager block's S_pt - S_rt no longer cancels;
    S_mr's terms |e² - f²| are still smaller than its e² + f². Both errors are then the same
    kind of rounding of a sum, so one call can go either way: compared as the root mean square
    over 12 seeds. (The former (2 S_ptr - S_pr)/n was 1.6-1.8x the eager error here in fp32.)"""
    runs = torch.tensor(
        [
            errors(
                method,
                tuple(x.to(device) for x in regime_inputs(8, (4, 8, 8), 1.0, seed, dtype, paired=method != "kto")),
            )
            for seed in range(12)
        ],
        dtype=F64,
    )
    lf, le, gf, ge = runs.pow(2).mean(0).sqrt().tolist()
    assert_no_worse(f"{method} loss (rms)", lf, le)
    assert_no_worse(f"{method} gradient (rms)", gf, ge, BF16_GRAD_SLACK if dtype == BF16 else 1.0)


def _figures(seeds=16):
    """Loss and gradient relative errors against float64, far from the reference (model_pred =
    ref_pred + N(0, 1)) and near it (+ N(0, 1e-2²)): SD1.5-size latents [16, 4, 64, 64] of
    `helpers.make_inputs`, β = 5000 (DSPO-SDXL in its branch 1), root mean square over seeds
    (one call's error is a single draw of a rounding error: either can be the smaller)."""
    from helpers import make_inputs

    print(f"rms over {seeds} seeds\nregime  method     dtype     loss: fused  eager   | gradient: fused  eager")
    for scale, label in ((1.0, "far"), (0.01, "near")):
        for method in ("dpo", "dspo-sdxl"):
            for dtype in (F32, BF16):
                rows = [
                    errors(method, make_inputs((16, 4, 64, 64), dtype, "cpu", seed, scale), 5000.0)
                    for seed in range(seeds)
                ]
                lf, le, gf, ge = torch.tensor(rows, dtype=F64).pow(2).mean(0).sqrt().tolist()
                print(
                    f"{label:6s}  {method:9s}  {str(dtype)[6:]:8s}  {lf:.1e}  {le:.1e}  |  {gf:.1e}  {ge:.1e}",
                    flush=True,
                )


if __name__ == "__main__":
    _figures()
