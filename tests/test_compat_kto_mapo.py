"""fastpref.compat's Diffusion-KTO and MaPO blocks against eager re-implementations of the
upstream loss blocks (docs/methods.md §5): loss, gradient and every log key.

The eager functions are this project's own code following each trainer's operation sequence
(float upcast per-row MSE, the same reductions and log keys); they are not copies of upstream
code. Agreement: float32 rounding amplified by the method's scale (docs/methods.md §4)."""

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, assert_grad_close, compute_rtol, forward_backward, make_inputs

from fastpref import compat

F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32
KTO_KEYS = {"loss", "raw_model_loss", "kl", "acc"}
MAPO_KEYS = {"total loss", "Win Score", "Lose Score", "OR loss", "model_losses_w", "model_losses_l"}


def _row_mse(x, target):
    per = F.mse_loss(x.float(), target.float(), reduction="none")
    return per.mean(dim=list(range(1, per.dim())))


def eager_kto(
    model_pred,
    ref_pred,
    target,
    labels,
    beta_dpo,
    lambda_d,
    lambda_u,
    kl_reduce=None,
    loss="kto",
    bce_offset="none",
    rolls=None,
):
    """diffusion-kto train_kto_sd_v1.5.py, --halo sigmoid, --loss kto or cft, each --bce_offset
    (rolls: the policy and reference outputs for the rolled prompts, for "original")."""
    reduce = kl_reduce if kl_reduce is not None else (lambda t: t)
    m = _row_mse(model_pred, target)
    with torch.no_grad():
        r = _row_mse(ref_pred, target)
    g = -m - (-r)  # policy minus reference log-likelihood proxies
    desirable = labels == 1
    if bce_offset == "none":
        kl = reduce(g.mean().detach()).clamp(min=0).detach()
    elif bce_offset == "sigmoid":  # class means, each over its count + 1e-6, unclamped
        kl_d = (desirable * g).sum().detach() / (desirable.sum() + 1e-6)
        kl_u = ((~desirable) * g).sum().detach() / ((~desirable).sum() + 1e-6)
        kl = (reduce(kl_d) + reduce(kl_u)) / 2
    else:  # "original": the rolled prompts' gap, unclamped
        with torch.no_grad():
            kl = reduce((_row_mse(rolls[1], target) - _row_mse(rolls[0], target)).mean())
    g = g - kl
    x = (2 * labels - 1) * beta_dpo * g
    weight = lambda_d * desirable + lambda_u * ~desirable
    value = (weight * (1 - torch.sigmoid(x))).mean() if loss == "kto" else m.mean()
    acc = (x > 0).sum().detach() / len(x)
    return value, {"loss": value.detach(), "raw_model_loss": m.mean().detach(), "kl": kl, "acc": acc}, x.detach()


def eager_mapo(model_pred, target, beta_mapo, snr_value, num_train_timesteps):
    """mapo utils.compute_loss and the log dict of its train.py."""
    mw, ml = _row_mse(model_pred, target).chunk(2)

    def score(v):
        return (snr_value * v) / (torch.exp(snr_value * v) - 1)

    ratio_losses = beta_mapo * F.logsigmoid((score(mw) - score(ml)) * num_train_timesteps)
    loss = mw.mean() - ratio_losses.mean()
    logs = {
        "total loss": loss.detach(),
        "Win Score": score(mw).mean().detach(),
        "Lose Score": score(ml).mean().detach(),
        "OR loss": -ratio_losses.mean().detach(),
        "model_losses_w": mw.mean().detach(),
        "model_losses_l": ml.mean().detach(),
    }
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
    labels = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0], device=device)  # upstream's float labels
    ours = forward_backward(
        compat.official_kto_loss, *inputs, labels, beta_dpo=beta_dpo, lambda_d_kto=lambda_d, lambda_u_kto=lambda_u
    )
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


KTO_MODES = [("kto", "sigmoid"), ("kto", "original"), ("cft", "none"), ("cft", "sigmoid"), ("cft", "original")]


def _rolled_outputs(inputs, device):
    """Stand-ins for upstream's policy and reference outputs on the rolled prompts: the policy a
    little further from the target (a small negative baseline, which this offset does not clamp)."""
    model, ref_pred, target = inputs
    g = torch.Generator().manual_seed(17)
    ref_roll = target.double().cpu() + 0.5 * torch.randn(target.shape, generator=g, dtype=torch.float64)
    model_roll = ref_roll + 0.03 * torch.randn(target.shape, generator=g, dtype=torch.float64)
    return model_roll.to(model.dtype).to(device), ref_roll.to(ref_pred.dtype).to(device)


@pytest.mark.parametrize("dtypes", [F32, (BF16, F16, F32)], ids=["fp32", "mixed"])
@pytest.mark.parametrize("loss,bce_offset", KTO_MODES, ids=[f"{l}-{b}" for l, b in KTO_MODES])
def test_kto_block_other_modes(loss, bce_offset, dtypes, device):
    """--loss cft (plain MSE, kl and acc still logged) and --bce_offset sigmoid/original
    (baselines without the clamp), on one process and through kl_reduce."""
    inputs = make_inputs((6, 4, 16, 16), dtypes, device, 15, 0.02)
    labels = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 0.0], device=device)  # unbalanced: class means != mean
    rolls = _rolled_outputs(inputs, device) if bce_offset == "original" else None
    roll_kw = dict(model_pred_roll=rolls[0], ref_pred_roll=rolls[1]) if rolls else {}
    for kl_reduce in (None, lambda t: (t + 2e-3) / 2):
        ours = forward_backward(
            compat.official_kto_loss, *inputs, labels, loss=loss, bce_offset=bce_offset, kl_reduce=kl_reduce, **roll_kw
        )
        theirs = forward_backward(eager_kto, *inputs, labels, 1000.0, 1.0, 1.0, kl_reduce, loss, bce_offset, rolls)
        compare(ours, theirs, KTO_KEYS, 2 * compute_rtol(inputs, 1000.0), theirs[0][2])
        if bce_offset != "none" and kl_reduce is None:
            assert float(ours[0][1]["kl"]) < 0, "the construction must give a negative (unclamped) baseline"


def test_kto_block_cft_accepts_any_upstream_utility(device):
    """cft's loss ignores --halo (upstream still evaluates the utility, so a known name is needed)."""
    inputs = make_inputs((4, 4, 8, 8), F32, device, 18, 0.02)
    labels = torch.tensor([1, 0, 1, 0], device=device)
    base = forward_backward(compat.official_kto_loss, *inputs, labels, loss="cft")
    for halo in ("loss_averse", "risk_seeking_1", "risk_seeking_2", "risk_seeking_3"):
        other = forward_backward(compat.official_kto_loss, *inputs, labels, loss="cft", halo=halo)
        assert_close("loss", other[0][0], base[0][0], 0.0)
        assert_close("grad", other[1], base[1], 0.0)


KTO_REFUSED = [
    (dict(loss="sft"), "loss='sft'"),
    (dict(loss="kto_gp"), "loss='kto_gp'"),
    (dict(loss="dpo"), "loss='dpo'"),
    (dict(loss="ipo"), "loss must be one of"),
    (dict(halo="loss_averse"), "halo='loss_averse'"),
    (dict(halo="risk_seeking_1"), "halo='risk_seeking_1'"),
    (dict(halo="risk_seeking_2"), "halo='risk_seeking_2'"),
    (dict(halo="risk_seeking_3"), "halo='risk_seeking_3'"),
    (dict(halo="tanh"), "halo must be one of 'sigmoid'"),
    (dict(loss="cft", halo="tanh"), "halo must be one of"),
    (dict(bce_offset="mean"), "bce_offset must be one of"),
    (dict(bce_offset="original"), "model_pred_roll is required"),
    (dict(roll=True), "used only with"),
    (dict(roll=True, bce_offset="original", short=True), "ref_pred_roll must have the shape"),
]


@pytest.mark.parametrize("flags,message", KTO_REFUSED, ids=[f"{i}" for i in range(len(KTO_REFUSED))])
def test_kto_block_refuses_other_modes_by_name(flags, message, device, no_launch):
    """Modes that are no fastpref loss stop with a ValueError naming the value, before any launch."""
    p, r, t = make_inputs((4, 4, 8, 8), F32, device, 19)
    labels = torch.tensor([1, 0, 1, 0], device=device)
    flags = dict(flags)
    if flags.pop("roll", False):
        flags.update(model_pred_roll=p.clone(), ref_pred_roll=r[:2] if flags.pop("short", False) else r.clone())
    with pytest.raises(ValueError, match=message):
        compat.official_kto_loss(p, r, t, labels, **flags)


MAPO_CASES = [(0.1, 0.5, 0.05), (0.5, 1.0, 0.1)]


@pytest.mark.parametrize("dtypes", [F32, (BF16, F16, F32)], ids=["fp32", "mixed"])
@pytest.mark.parametrize("beta_mapo,snr_value,scale", MAPO_CASES, ids=["defaults", "beta0.5-snr1"])
def test_mapo_block(beta_mapo, snr_value, scale, dtypes, device):
    model, _, target = make_inputs((6, 4, 16, 16), dtypes, device, 13, scale)
    ours = forward_backward(
        compat.mapo_compute_loss, model, target, beta_mapo=beta_mapo, snr_value=snr_value, num_train_timesteps=1000
    )
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
        compat.mapo_compute_loss(p[:3], t[:3])  # an odd batch cannot be pairs
