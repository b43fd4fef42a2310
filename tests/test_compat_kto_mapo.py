"""fastpref.compat's Diffusion-KTO and MaPO blocks against eager re-implementations of the
upstream loss blocks (spec §5): loss, gradient and every log key.

The eager functions are this project's own code following each trainer's operation sequence
(float upcast per-row MSE, the same reductions and log keys); they are not copies of upstream
code. Agreement: float32 rounding amplified by the method's scale (spec §4)."""
import pytest
import torch
import torch.nn.functional as F

from fastpref import compat
from helpers import assert_close, assert_grad_close, compute_rtol, forward_backward, make_inputs

F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32
KTO_KEYS = {"loss", "raw_model_loss", "kl", "acc"}
MAPO_KEYS = {"total loss", "Win Score", "Lose Score", "OR loss", "model_losses_w", "model_losses_l"}


def _row_mse(x, target):
    per = F.mse_loss(x.float(), target.float(), reduction="none")
    return per.mean(dim=list(range(1, per.dim())))


def eager_kto(model_pred, ref_pred, target, labels, beta_dpo, lambda_d, lambda_u, kl_reduce=None):
    """diffusion-kto train_kto_sd_v1.5.py, --loss kto --halo sigmoid --bce_offset none."""
    m = _row_mse(model_pred, target)
    with torch.no_grad():
        r = _row_mse(ref_pred, target)
    g = -m - (-r)                               # policy minus reference log-likelihood proxies
    kl = g.mean().detach()
    kl = (kl_reduce(kl) if kl_reduce is not None else kl).clamp(min=0).detach()
    g = g - kl
    desirable = labels == 1
    x = (2 * labels - 1) * beta_dpo * g
    weight = lambda_d * desirable + lambda_u * ~desirable
    loss = (weight * (1 - torch.sigmoid(x))).mean()
    acc = (x > 0).sum().detach() / len(x)
    return loss, {"loss": loss.detach(), "raw_model_loss": m.mean().detach(), "kl": kl, "acc": acc}, x.detach()


def eager_mapo(model_pred, target, beta_mapo, snr_value, num_train_timesteps):
    """mapo utils.compute_loss and the log dict of its train.py."""
    mw, ml = _row_mse(model_pred, target).chunk(2)

    def score(v):
        return (snr_value * v) / (torch.exp(snr_value * v) - 1)

    ratio_losses = beta_mapo * F.logsigmoid((score(mw) - score(ml)) * num_train_timesteps)
    loss = mw.mean() - ratio_losses.mean()
    logs = {"total loss": loss.detach(), "Win Score": score(mw).mean().detach(),
            "Lose Score": score(ml).mean().detach(), "OR loss": -ratio_losses.mean().detach(),
            "model_losses_w": mw.mean().detach(), "model_losses_l": ml.mean().detach()}
    return loss, logs, None


def compare(ours, theirs, keys, rtol, decision=None):
    (loss, logs), grad = ours
    (eloss, elogs, _), egrad = theirs
    assert set(logs) == keys == set(elogs), f"log keys {sorted(logs)}"
    assert_close("loss", loss, eloss, rtol, atol=rtol)
    assert_grad_close(grad, egrad.double(), grad.dtype, rtol)
    for key, value in logs.items():
        assert not value.requires_grad and value.shape == (), f"{key} must be a detached 0-dim tensor"
        if key == "acc":  # up to rows whose decision is within rounding of 0
            ambiguous = int((decision.abs() <= rtol * decision.abs().max()).sum())
            assert abs(float(value) - float(elogs[key])) <= ambiguous / decision.numel() + 1e-6, key
        else:
            assert_close(key, value, elogs[key], rtol, atol=rtol)


KTO_CASES = [(1000.0, 0.02, 1.0, 1.0), (1000.0, 0.02, 1.5, 0.5), (10.0, 0.3, 1.0, 1.0)]


@pytest.mark.parametrize("dtypes", [F32, (BF16, F16, F32)], ids=["fp32", "mixed"])
@pytest.mark.parametrize("beta_dpo,scale,lambda_d,lambda_u", KTO_CASES, ids=["default", "lambdas", "beta10"])
def test_kto_block_on_one_process(beta_dpo, scale, lambda_d, lambda_u, dtypes, device):
    inputs = make_inputs((6, 4, 16, 16), dtypes, device, 11, scale)
    labels = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0], device=device)   # upstream's float labels
    ours = forward_backward(compat.official_kto_loss, *inputs, labels, beta_dpo=beta_dpo,
                            lambda_d_kto=lambda_d, lambda_u_kto=lambda_u)
    theirs = forward_backward(eager_kto, *inputs, labels, beta_dpo, lambda_d, lambda_u)
    rtol = 2 * compute_rtol(inputs, beta_dpo)
    compare(ours, theirs, KTO_KEYS, rtol, theirs[0][2])


@pytest.mark.parametrize("other_rank_gap", [3e-3, -1.0], ids=["positive-baseline", "clamped"])
def test_kto_block_with_the_cross_process_baseline(other_rank_gap, device):
    """kl_reduce stands in for accelerator.reduce(mean) over this rank and one other whose local
    mean gap is `other_rank_gap`; the baseline is clamped after the reduction, as upstream."""
    inputs = make_inputs((6, 4, 16, 16), F32, device, 12, 0.02)
    labels = torch.tensor([1, 0, 1, 1, 0, 0], device=device)

    def kl_reduce(local):
        return (local + other_rank_gap) / 2

    ours = forward_backward(compat.official_kto_loss, *inputs, labels, kl_reduce=kl_reduce)
    theirs = forward_backward(eager_kto, *inputs, labels, 1000.0, 1.0, 1.0, kl_reduce)
    compare(ours, theirs, KTO_KEYS, 2 * compute_rtol(inputs, 1000.0), theirs[0][2])
    if other_rank_gap > 0:
        assert float(ours[0][1]["kl"]) > 0, "the construction must give a positive baseline"
    else:
        assert float(ours[0][1]["kl"]) == 0.0


MAPO_CASES = [(0.1, 0.5, 0.05), (0.5, 1.0, 0.1)]


@pytest.mark.parametrize("dtypes", [F32, (BF16, F16, F32)], ids=["fp32", "mixed"])
@pytest.mark.parametrize("beta_mapo,snr_value,scale", MAPO_CASES, ids=["defaults", "beta0.5-snr1"])
def test_mapo_block(beta_mapo, snr_value, scale, dtypes, device):
    model, _, target = make_inputs((6, 4, 16, 16), dtypes, device, 13, scale)
    ours = forward_backward(compat.mapo_compute_loss, model, target, beta_mapo=beta_mapo, snr_value=snr_value,
                            num_train_timesteps=1000)
    theirs = forward_backward(eager_mapo, model, target, beta_mapo, snr_value, 1000)
    m_max = float(_row_mse(model, target).max())
    rtol = 8e-6 * (1 + 1000 * snr_value * m_max)  # u = T (f(m_w) - f(m_l)), |f'| <= snr_value / 2
    compare(ours, theirs, MAPO_KEYS, rtol)


def test_kto_and_mapo_blocks_reject_bad_flags(device):
    p, r, t = make_inputs((4, 4, 8, 8), F32, device, 14)
    labels = torch.tensor([1, 0, 1, 0], device=device)
    with pytest.raises(ValueError, match="beta_dpo"):
        compat.official_kto_loss(p, r, t, labels, beta_dpo=0.0)
    with pytest.raises(ValueError, match="lambda_u_kto"):
        compat.official_kto_loss(p, r, t, labels, lambda_u_kto=-1.0)
    with pytest.raises(TypeError, match="kl_reduce"):
        compat.official_kto_loss(p, r, t, labels, kl_reduce="mean")
    with pytest.raises(ValueError, match="labels"):
        compat.official_kto_loss(p, r, t, labels[:3])
    with pytest.raises(ValueError, match="beta_mapo"):
        compat.mapo_compute_loss(p, t, beta_mapo=float("inf"))
    with pytest.raises(ValueError, match="snr_value"):
        compat.mapo_compute_loss(p, t, snr_value=0.0)
    with pytest.raises(ValueError, match="model_pred"):
        compat.mapo_compute_loss(p[:3], t[:3])      # an odd batch cannot be pairs
