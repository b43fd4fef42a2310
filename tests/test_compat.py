"""fastpref.compat against eager re-implementations of the upstream loss blocks (docs/methods.md §5).

The eager functions below are this project's own code following each trainer's operation
sequence (same upcasts, same reductions, same log keys); they are not copies of upstream
code. Agreement: float32 rounding amplified by β (docs/methods.md §4). The official DiffusionDPO/DSPO
trainers compute the reference error in the reference network's dtype; with fp16 reference
and target, the difference is bounded by the measured fp16 rounding of those errors."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import OUT_RTOL, assert_close, assert_grad_close, compute_rtol, forward_backward, make_inputs

from fastpref import compat

F16, F32 = torch.float16, torch.float32
DPO_KEYS = {"step_loss", "model_mse_unaccumulated", "ref_mse_unaccumulated", "implicit_acc"}


def _row_mean(x):
    return x.mean(dim=list(range(1, x.dim())))


def eager_diffusers(model_pred, ref_pred, target, beta_dpo, loss_type="sigmoid", sdxl=False):
    """diffusers train_diffusion_dpo(.py|_sdxl.py): float upcast per-row MSE, chunked halves."""
    per_model = _row_mean(F.mse_loss(model_pred.float(), target.float(), reduction="none"))
    mw, ml = per_model.chunk(2)
    raw_model = 0.5 * (mw.mean() + ml.mean())
    with torch.no_grad():
        per_ref = _row_mean(F.mse_loss(ref_pred.float(), target.float(), reduction="none"))
        rw, rl = per_ref.chunk(2)
        raw_ref = per_ref.mean()
    if sdxl:
        margin = -0.5 * beta_dpo * ((mw - ml) - (rw - rl))
        loss = -F.logsigmoid(margin).mean()
    else:
        margin = (rw - rl) - (mw - ml)
        if loss_type == "sigmoid":
            loss = -F.logsigmoid(beta_dpo * margin).mean()
        elif loss_type == "hinge":
            loss = torch.relu(1 - beta_dpo * margin).mean()
        else:
            loss = ((margin - 1 / (2 * beta_dpo)) ** 2).mean()
    n = margin.shape[0]
    acc = (margin > 0).sum().float() / n + 0.5 * (margin == 0).sum().float() / n
    logs = {"loss": loss.detach(), "raw_model_loss": raw_model.detach(), "ref_loss": raw_ref, "implicit_acc": acc}
    return loss, logs, margin.detach()


def eager_official(model_pred, ref_pred, target, beta_dpo, method="dpo", sdxl=False):
    """DiffusionDPO / DSPO train.py: errors in the inputs' own (promoted) dtype, reference under
    no_grad; DSPO's objectives on the winner half."""
    mw = _row_mean((model_pred - target).chunk(2)[0].pow(2))
    ml = _row_mean((model_pred - target).chunk(2)[1].pow(2))
    raw_model = 0.5 * (mw.mean() + ml.mean())
    with torch.no_grad():
        per_ref = _row_mean((ref_pred - target).pow(2))
        rw, rl = per_ref.chunk(2)
        raw_ref = per_ref.mean()
    inside = -0.5 * beta_dpo * ((mw - ml) - (rw - rl))
    acc = (inside > 0).sum().float() / inside.shape[0]
    if method == "dpo":
        loss = -F.logsigmoid(inside).mean()
    else:
        shape = (-1,) + (1,) * (model_pred.dim() - 1)
        weight = (1 - torch.sigmoid(inside)).view(shape)
        d = (model_pred - ref_pred).chunk(2)[0]
        if sdxl:
            if _row_mean(d.pow(2)).mean() >= 0.1:
                loss = _row_mean((weight * d).pow(2)).mean()
            else:
                loss = _row_mean(weight.pow(2)).mean()
        else:
            e = (model_pred - target).chunk(2)[0]
            loss = _row_mean((e - beta_dpo * weight * d).pow(2)).mean()
    logs = {
        "step_loss": loss.detach(),
        "model_mse_unaccumulated": raw_model.detach(),
        "ref_mse_unaccumulated": raw_ref,
        "implicit_acc": acc,
    }
    return loss, logs, inside.detach()


def compare(ours, theirs, rtol, margin, acc_tol):
    """Loss, gradient and every log key; accuracies up to margins within acc_tol of 0."""
    (loss, logs), grad = ours
    (eloss, elogs, _), egrad = theirs
    assert set(logs) == set(elogs), f"log keys {sorted(logs)} != {sorted(elogs)}"
    assert_close("loss", loss, eloss, rtol, atol=rtol)
    assert_grad_close(grad, egrad.double(), egrad.dtype, rtol + OUT_RTOL[egrad.dtype])
    for key, value in logs.items():
        assert not value.requires_grad and value.shape == (), f"{key} must be a detached 0-dim tensor"
        if key == "implicit_acc":
            ambiguous = int((margin.abs() <= acc_tol).sum())
            assert abs(float(value) - float(elogs[key])) <= ambiguous / margin.numel() + 1e-6, key
        else:
            assert_close(key, value, elogs[key], rtol, atol=rtol)


DIFFUSERS = [
    ("sigmoid", False, 2500.0, 0.01),
    ("hinge", False, 2500.0, 0.01),
    ("ipo", False, 2500.0, 0.01),
    ("sigmoid", False, 25.0, 0.1),
    ("sigmoid", True, 5000.0, 0.01),
    ("sigmoid", True, 50.0, 0.1),
]


@pytest.mark.parametrize("dtypes", [F32, (torch.bfloat16, F16, F32)], ids=["fp32", "mixed"])
@pytest.mark.parametrize(
    "loss_type,sdxl,beta_dpo,scale", DIFFUSERS, ids=[f"{t}-{'sdxl' if x else 'sd15'}-{b:g}" for t, x, b, _ in DIFFUSERS]
)
def test_diffusers_block(loss_type, sdxl, beta_dpo, scale, dtypes, device):
    inputs = make_inputs((6, 4, 16, 16), dtypes, device, 0, scale)
    beta = beta_dpo if sdxl else 2 * beta_dpo
    ours = forward_backward(compat.diffusers_dpo_loss, *inputs, beta_dpo=beta_dpo, loss_type=loss_type, sdxl=sdxl)
    theirs = forward_backward(eager_diffusers, *inputs, beta_dpo, loss_type, sdxl)
    rtol = 2 * compute_rtol(inputs, beta)
    compare(ours, theirs, rtol, theirs[0][2] * (1.0 if sdxl else beta_dpo), rtol)  # in inside units


@pytest.mark.parametrize("sdxl", [False, True])
def test_diffusers_counts_ties_half_and_official_strict(sdxl, device):
    """model_pred == ref_pred: every margin is exactly 0."""
    _, ref_pred, target = make_inputs((4, 4, 8, 8), F32, device, 1)
    _, logs = compat.diffusers_dpo_loss(ref_pred.clone(), ref_pred, target, sdxl=sdxl)
    assert float(logs["implicit_acc"]) == 0.5
    assert_close("loss", logs["loss"], torch.tensor(math.log(2.0)), 1e-6)
    for fn, kw in [(compat.official_dpo_loss, {}), (compat.official_dspo_loss, dict(beta_dpo=5000.0, sdxl=sdxl))]:
        _, logs = fn(ref_pred.clone(), ref_pred, target, **kw)
        assert float(logs["implicit_acc"]) == 0.0


OFFICIAL = [
    ("dpo", False, 5000.0, 0.01),
    ("dpo", False, 50.0, 0.1),
    ("dspo", False, 0.001, 0.3),
    ("dspo", True, 5000.0, 0.01),
    ("dspo", True, 5000.0, 0.5),
]  # sdxl: branch 2, then branch 1


@pytest.mark.parametrize(
    "method,sdxl,beta_dpo,scale",
    OFFICIAL,
    ids=[f"{m}-{'sdxl' if x else 'sd15'}-{b:g}-{s:g}" for m, x, b, s in OFFICIAL],
)
def test_official_block_fp32(method, sdxl, beta_dpo, scale, device):
    inputs = make_inputs((6, 4, 16, 16), F32, device, 2, scale)
    if method == "dpo":
        ours = forward_backward(compat.official_dpo_loss, *inputs, beta_dpo=beta_dpo)
    else:
        ours = forward_backward(compat.official_dspo_loss, *inputs, beta_dpo=beta_dpo, sdxl=sdxl)
    theirs = forward_backward(eager_official, *inputs, beta_dpo, method, sdxl)
    rtol = 2 * compute_rtol(inputs, beta_dpo)
    if method == "dspo":
        rtol *= 1 + 2 * beta_dpo**2 * scale**2
    assert set(ours[0][1]) == DPO_KEYS
    compare(ours, theirs, rtol, theirs[0][2], rtol)


@pytest.mark.parametrize("method,beta_dpo", [("dpo", 5000.0), ("dpo", 50.0), ("dspo", 5000.0)])
def test_official_block_fp16_reference(method, beta_dpo, device):
    """The official trainers' default mixed precision: fp32 policy output, fp16 reference output
    and fp16 target (noise of fp16 latents); upstream's reference error is then fp16. fastpref
    upcasts, so it differs by that rounding: inside moves by at most 0.5 β (δr_w + δr_l) with δr
    the measured fp16 error of r, the loss by at most its mean, σ by a quarter of it."""
    model, ref_pred, target = make_inputs((6, 4, 16, 16), (F32, F16, F16), device, 3, 0.01)
    kw = dict(sdxl=True) if method == "dspo" else {}
    fn = compat.official_dpo_loss if method == "dpo" else compat.official_dspo_loss
    (loss, logs), grad = forward_backward(fn, model, ref_pred, target, beta_dpo=beta_dpo, **kw)
    (eloss, elogs, inside), egrad = forward_backward(eager_official, model, ref_pred, target, beta_dpo, method, True)
    r16 = _row_mean((ref_pred - target).pow(2)).double()
    r64 = _row_mean((ref_pred.double() - target.double()).pow(2))
    assert float((r16 - r64).abs().max()) > 0, "the construction must show the fp16 rounding"
    dr = (r16 - r64).abs()
    B = dr.shape[0] // 2
    d_inside = 0.5 * beta_dpo * (dr[:B] + dr[B:]) + 2 * compute_rtol((model, ref_pred, target), beta_dpo)
    assert abs(float(loss.detach()) - float(eloss.detach())) <= float(d_inside.mean()) + 1e-6
    ref_mse16 = float(elogs["ref_mse_unaccumulated"])  # itself rounded to fp16
    assert abs(float(logs["ref_mse_unaccumulated"]) - ref_mse16) <= float(dr.mean()) + abs(ref_mse16) * 2.0**-11
    assert_close("model_mse_unaccumulated", logs["model_mse_unaccumulated"], elogs["model_mse_unaccumulated"], 1e-5)
    flips = int((inside.abs() <= d_inside).sum())
    assert abs(float(logs["implicit_acc"]) - float(elogs["implicit_acc"])) <= flips / B + 1e-6
    if method == "dpo":
        # grad row i = G β σ(-inside_i) / (nB) (p - t), ± for winner/loser: σ moves by ≤ d_inside / 4.
        n = model[0].numel()
        coef = (0.75 * beta_dpo / (n * B) * 0.25 * torch.cat([d_inside, d_inside])).view(-1, 1, 1, 1)
        bound = coef * (model.double() - target.double()).abs() + 1e-6 * float(egrad.abs().max())
        assert bool(((grad.double() - egrad.double()).abs() <= bound).all()), "gradient beyond the fp16 bound"
    # And with the reference error upcast, the same block agrees to float32 rounding.
    upcast = forward_backward(eager_official, model, ref_pred.float(), target.float(), beta_dpo, method, True)
    rtol = 2 * compute_rtol((model, ref_pred, target), beta_dpo)
    compare(((loss, logs), grad), upcast, rtol, upcast[0][2], rtol)


@pytest.mark.parametrize("fn", [compat.official_dpo_loss, compat.official_dspo_loss], ids=["dpo", "dspo"])
@pytest.mark.parametrize("dtype", [F32, torch.bfloat16])
def test_official_sft(fn, dtype, device):
    """--sft: winners-only batch [N, ...], F.mse_loss on float upcasts; logs step_loss only."""
    model, _, target = make_inputs((3, 4, 16, 16), dtype, device, 4, 0.3)
    kw = dict(beta_dpo=0.001) if fn is compat.official_dspo_loss else {}
    (loss, logs), grad = forward_backward(fn, model, None, target, sft=True, **kw)
    eloss, egrad = forward_backward(lambda p, t: (F.mse_loss(p.float(), t.float()),), model, target)
    assert set(logs) == {"step_loss"}
    assert_close("loss", loss, eloss[0], 4e-6)
    assert_close("step_loss", logs["step_loss"], eloss[0], 4e-6)
    assert_grad_close(grad, egrad.double(), dtype, 4e-6)


def test_compat_rejects_bad_flags(device):
    p, r, t = make_inputs((4, 4, 8, 8), F32, device, 5)
    with pytest.raises(ValueError, match="loss_type"):
        compat.diffusers_dpo_loss(p, r, t, loss_type="cpo")
    with pytest.raises(ValueError, match="loss_type"):
        compat.diffusers_dpo_loss(p, r, t, loss_type="hinge", sdxl=True)
    with pytest.raises(ValueError, match="beta_dpo"):
        compat.official_dpo_loss(p, r, t, beta_dpo=float("nan"))
    with pytest.raises(TypeError):
        compat.official_dspo_loss(p, r, t)  # beta_dpo has no default
