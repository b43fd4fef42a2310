"""fastpref.compat.official_sdpo_loss against an eager re-implementation of the loss block of
AIDC-AI/Diffusion-SDPO `train.py` (docs/methods.md §2.9, §2.10, §5): loss, gradient and every log key, for
every base with the safeguard on and off, fp32 and mixed dtypes, and upstream's flag defaults.

The eager function is this project's own code following the trainer's operation sequence
(errors in the inputs' promoted dtype, λ from the output-space gradient proxies rounded to
model_pred's dtype, the loser-gradient edit, each base's objective); it is not a copy of
upstream code. Agreement: float32 rounding amplified by β (docs/methods.md §4)."""

import pytest
import torch
import torch.nn.functional as F
from helpers import OUT_RTOL, assert_close, assert_grad_close, compute_rtol, forward_backward

from fastpref import compat

F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32
SDPO_KEYS = {
    "step_loss",
    "model_mse_unaccumulated",
    "ref_mse_unaccumulated",
    "implicit_acc",
    "avg_win_diff_loss",
    "avg_lose_diff_loss",
    "avg_lose_l_scale",
}


def pair_inputs(shape, dtypes, seed, scale, corr=0.5):
    """(model_pred, ref_pred, target) as the trainer builds them: each pair shares its noise
    target, and the reference errors of a pair share a fraction `corr` of their variance
    (negative: opposite signs), which makes the winner/loser proxy product den nonzero; the
    policy is `scale` away from the reference."""
    if isinstance(dtypes, torch.dtype):
        dtypes = (dtypes,) * 3
    g = torch.Generator().manual_seed(seed)
    B = shape[0] // 2
    rep = (2,) + (1,) * (len(shape) - 1)
    target = torch.randn((B,) + shape[1:], generator=g, dtype=torch.float64).repeat(*rep)
    shared = torch.randn((B,) + shape[1:], generator=g, dtype=torch.float64).repeat(*rep)
    shared[B:] *= 1.0 if corr >= 0 else -1.0
    own = torch.randn(shape, generator=g, dtype=torch.float64)
    ref = target + 0.5 * (abs(corr) ** 0.5 * shared + (1 - abs(corr)) ** 0.5 * own)
    model = ref + scale * torch.randn(shape, generator=g, dtype=torch.float64)
    return tuple(x.to(dt) for x, dt in zip((model, ref, target), dtypes, strict=True))


def _row_mean(x):
    return x.mean(dim=list(range(1, x.dim())))


def eager_sdpo(model_pred, ref_pred, target, train_method, beta_dpo, sdxl, use_winner_preserving, mu, dmpo_alpha):
    """Diffusion-SDPO train.py's loss block, re-implemented; returns (loss, logs, inside)."""
    err = model_pred - target
    m_w, m_l = _row_mean(err.pow(2)).chunk(2)
    raw_model = 0.5 * (m_w.mean() + m_l.mean())
    if use_winner_preserving:
        # λ from the output-space gradients of the winner and loser half-means (2 e / K), each
        # in model_pred's dtype as autograd returns them, upstream's eps 1e-9 and cap 1.
        e_w, e_l = err.detach().chunk(2)
        K = e_w.numel()
        g_w, g_l = (2 * e_w / K).to(model_pred.dtype), (2 * e_l / K).to(model_pred.dtype)
        num, den = g_w.pow(2).sum(), (g_l * g_w).sum()
        lam = torch.where(den > 0, (1.0 - mu) * num / (den + 1e-9), torch.ones_like(num))
        lam = lam.clamp(0.0, 1.0).to(model_pred.dtype)
    else:
        lam = torch.tensor(1.0)
    m_l_edit = m_l.detach() + lam * (m_l - m_l.detach())  # value m_l, gradient λ·∂m_l
    with torch.no_grad():
        r_w, r_l = _row_mean((ref_pred - target).pow(2)).chunk(2)
        raw_ref = torch.cat([r_w, r_l]).mean()
    inside = -0.5 * beta_dpo * ((m_w - m_l_edit) - (r_w - r_l))
    acc = (inside > 0).sum().float() / inside.shape[0]
    if train_method == "diffusion-dpo":
        loss = -F.logsigmoid(inside).mean()
    elif train_method == "dspo":
        shape = (-1,) + (1,) * (model_pred.dim() - 1)
        weight = (1 - torch.sigmoid(inside)).view(shape)
        d_w = (model_pred - ref_pred).chunk(2)[0]
        if sdxl:
            loss = (
                _row_mean((weight * d_w).pow(2)).mean()
                if _row_mean(d_w.pow(2)).mean() >= 0.1
                else _row_mean(weight.pow(2).expand_as(d_w)).mean()
            )
        else:
            loss = _row_mean((err.chunk(2)[0] - beta_dpo * weight * d_w).pow(2)).mean()
    else:
        p = torch.sigmoid(inside)
        q = torch.tensor([1.0 - dmpo_alpha], dtype=p.dtype).clamp(1e-6, 1 - 1e-6)
        kl = p * (-F.softplus(-inside) - torch.log(q)) + (1 - p) * (-F.softplus(inside) - torch.log1p(-q))
        loss = kl.mean()
    logs = {
        "step_loss": loss.detach(),
        "model_mse_unaccumulated": raw_model.detach(),
        "ref_mse_unaccumulated": raw_ref,
        "implicit_acc": acc,
        "avg_win_diff_loss": (m_w - r_w).mean().detach(),
        "avg_lose_diff_loss": (m_l - r_l).mean().detach(),
        "avg_lose_l_scale": lam.float(),
    }
    return loss, logs, inside.detach()


def compare(ours, theirs, inputs, beta, lam_rtol=0.0, loss_rtol=None):
    """Loss, gradient and every log key against the eager twin."""
    (loss, logs), grad = ours
    (eloss, elogs, inside), egrad = theirs
    model, ref_pred, target = inputs
    assert set(logs) == SDPO_KEYS == set(elogs), f"log keys {sorted(logs)}"
    rtol = 2 * compute_rtol(inputs, beta)
    assert_close("loss", loss, eloss, loss_rtol or rtol)
    assert_grad_close(grad, egrad.double(), model.dtype, (loss_rtol or rtol) + lam_rtol)
    mse = float(
        _row_mean((model.double() - target.double()) ** 2).max()
        + _row_mean((ref_pred.double() - target.double()) ** 2).max()
    )
    for key, value in logs.items():
        assert not value.requires_grad and value.shape == (), f"{key} must be a detached 0-dim tensor"
        if key == "implicit_acc":
            ambiguous = int((inside.abs() <= rtol).sum())
            assert abs(float(value) - float(elogs[key])) <= ambiguous / inside.numel() + 1e-6, key
        elif key == "step_loss":
            assert_close(key, value, eloss, loss_rtol or rtol)
        elif key == "avg_lose_l_scale":
            assert_close(key, value, elogs[key], 2e-5 + lam_rtol)
        elif key.startswith("avg_"):  # differences of errors: fp32 rounding of m and r
            assert_close(key, value, elogs[key], 0.0, atol=1e-5 * mse)
        else:
            assert_close(key, value, elogs[key], 1e-5)


BASES = [
    ("diffusion-dpo", 5000.0, False, 0.9, 0.0, 0.005),
    ("dspo", 0.001, False, 0.2, 0.0, 0.3),
    ("dspo", 5000.0, True, 0.6, 0.0, 0.005),
    ("dspo", 50.0, True, 0.6, 0.0, 0.35),
    ("dmpo", 2000.0, False, 0.9, 0.01, 0.005),
]  # the launchers' β, μ, α; sdxl branch 2, then 1
BASE_IDS = ["dpo", "dspo-sd15", "dspo-sdxl-branch2", "dspo-sdxl-branch1", "dmpo"]


@pytest.mark.parametrize("safeguard", [True, False], ids=["safeguard", "plain"])
@pytest.mark.parametrize("method,beta,sdxl,mu,alpha,scale", BASES, ids=BASE_IDS)
def test_sdpo_block_fp32(method, beta, sdxl, mu, alpha, scale, safeguard):
    inputs = pair_inputs((4, 4, 16, 16), F32, 21, scale)
    flags = dict(
        train_method=method,
        beta_dpo=beta,
        sdxl=sdxl,
        use_winner_preserving=safeguard,
        winner_preserving_mu=mu,
        dmpo_alpha=alpha,
    )
    ours = forward_backward(compat.official_sdpo_loss, *inputs, **flags)
    theirs = forward_backward(eager_sdpo, *inputs, method, beta, sdxl, safeguard, mu, alpha)
    lam = float(theirs[0][1]["avg_lose_l_scale"])
    if safeguard and scale < 0.1:
        assert 0.05 < lam < 0.95, f"the construction must make the safeguard bind, λ = {lam}"
    if sdxl:
        q = float(((inputs[0] - inputs[1])[:2] ** 2).mean())
        assert (q >= 0.1) == (scale > 0.1), f"the construction must take the intended DSPO-SDXL branch, q = {q}"
    compare(
        ours,
        theirs,
        inputs,
        beta,
        loss_rtol=(
            2 * compute_rtol(inputs, beta) * (1 + 2 * beta**2 * scale**2) if method == "dspo" and not sdxl else None
        ),
    )


@pytest.mark.parametrize("method,beta,sdxl,mu,alpha,scale", BASES[:3] + BASES[4:], ids=BASE_IDS[:3] + BASE_IDS[4:])
def test_sdpo_block_mixed_dtypes(method, beta, sdxl, mu, alpha, scale):
    """bf16 policy output, fp16 reference, fp32 target: upstream's errors are then float32 (from
    upcast elements, as fastpref's); its λ is rounded to bfloat16 (fastpref keeps float32), so
    loser-row gradients and the logged λ may differ by that rounding."""
    inputs = pair_inputs((4, 4, 16, 16), (BF16, F16, F32), 22, scale)
    flags = dict(
        train_method=method,
        beta_dpo=beta,
        sdxl=sdxl,
        use_winner_preserving=True,
        winner_preserving_mu=mu,
        dmpo_alpha=alpha,
    )
    ours = forward_backward(compat.official_sdpo_loss, *inputs, **flags)
    theirs = forward_backward(eager_sdpo, *inputs, method, beta, sdxl, True, mu, alpha)
    assert ours[1].dtype == BF16
    compare(
        ours,
        theirs,
        inputs,
        beta,
        lam_rtol=2.0**-7,
        loss_rtol=(
            2 * compute_rtol(inputs, beta) * (1 + 2 * beta**2 * scale**2) if method == "dspo" and not sdxl else None
        ),
    )


@pytest.mark.parametrize("method", ["diffusion-dpo", "dspo", "dmpo"])
def test_sdpo_safeguard_leaves_winners_and_scales_losers(method):
    """With λ < 1 the winner-row gradient equals the plain base's and every loser row is λ
    times it (DSPO: the same holds for the loser rows, which enter only through inside)."""
    inputs = pair_inputs((4, 4, 16, 16), F32, 23, 0.005)
    beta = 0.001 if method == "dspo" else 5000.0
    kw = dict(train_method=method, beta_dpo=beta, winner_preserving_mu=0.9, dmpo_alpha=0.01)
    (loss_s, logs_s), g_s = forward_backward(compat.official_sdpo_loss, *inputs, use_winner_preserving=True, **kw)
    (loss_p, logs_p), g_p = forward_backward(compat.official_sdpo_loss, *inputs, use_winner_preserving=False, **kw)
    lam = float(logs_s["avg_lose_l_scale"])
    assert 0.05 < lam < 0.95 and float(logs_p["avg_lose_l_scale"]) == 1.0
    assert_close("loss", loss_s, loss_p, 1e-6)
    assert_close("winner grad", g_s[:2], g_p[:2], 1e-6)
    assert_close("loser grad", g_s[2:], lam * g_p[2:].double(), 1e-5)


def test_sdpo_safeguard_without_aligned_gradients_keeps_scale_one():
    """den <= 0 (winner and loser errors anti-correlated): λ = max_scale = 1, as upstream."""
    inputs = pair_inputs((4, 4, 16, 16), F32, 24, 0.005, corr=-0.5)
    e = (inputs[0] - inputs[2]).double()
    assert float((e[:2] * e[2:]).sum()) < 0, "the construction must give den < 0"
    ours = forward_backward(compat.official_sdpo_loss, *inputs, use_winner_preserving=True, winner_preserving_mu=0.9)
    theirs = forward_backward(eager_sdpo, *inputs, "diffusion-dpo", 5000.0, False, True, 0.9, 0.0)
    assert float(ours[0][1]["avg_lose_l_scale"]) == 1.0
    compare(ours, theirs, inputs, 5000.0)


def test_sdpo_defaults_are_upstreams_argparse_defaults():
    """train_method diffusion-dpo, beta_dpo 5000, winner_preserving_mu 0.0 and dmpo_alpha 0.0
    (fastpref.sdpo_loss's own defaults are mu 0.9 and dmpo_alpha 0.01: both must not leak in)."""
    inputs = pair_inputs((4, 4, 16, 16), F32, 25, 0.005)
    cases = [
        (dict(), ("diffusion-dpo", 5000.0, False, False, 0.0, 0.0)),
        (dict(use_winner_preserving=True), ("diffusion-dpo", 5000.0, False, True, 0.0, 0.0)),
        (dict(train_method="dmpo", beta_dpo=2000.0), ("dmpo", 2000.0, False, False, 0.0, 0.0)),
        (dict(train_method="dspo", beta_dpo=5000.0, sdxl=True), ("dspo", 5000.0, True, False, 0.0, 0.0)),
    ]
    for flags, eager_args in cases:
        ours = forward_backward(compat.official_sdpo_loss, *inputs, **flags)
        theirs = forward_backward(eager_sdpo, *inputs, *eager_args)
        compare(ours, theirs, inputs, eager_args[1])
    # mu 0: λ = min(1, num/den) is 1 on this construction, where mu 0.9 gives about 0.2
    (_, logs), _ = forward_backward(compat.official_sdpo_loss, *inputs, use_winner_preserving=True)
    assert float(logs["avg_lose_l_scale"]) == 1.0


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_sdpo_sft(dtype):
    """train_method sft: winners-only batch, F.mse_loss on float upcasts; logs step_loss only."""
    model, _, target = pair_inputs((2, 4, 16, 16), dtype, 26, 0.3)
    (loss, logs), grad = forward_backward(compat.official_sdpo_loss, model, None, target, train_method="sft")
    eloss, egrad = forward_backward(lambda p, t: (F.mse_loss(p.float(), t.float()),), model, target)
    assert set(logs) == {"step_loss"}
    assert_close("loss", loss, eloss[0], 4e-6)
    assert_close("step_loss", logs["step_loss"], eloss[0], 4e-6)
    assert_grad_close(grad, egrad.double(), dtype, 4e-6 + OUT_RTOL[dtype])


@pytest.mark.parametrize(
    "flags,name",
    [
        (dict(train_method="dpo"), "train_method"),
        (dict(beta_dpo=0.0), "beta_dpo"),
        (dict(winner_preserving_mu=1.5), "winner_preserving_mu"),
        (dict(winner_preserving_mu=-0.1), "winner_preserving_mu"),
        (dict(dmpo_alpha=float("nan")), "dmpo_alpha"),
        (dict(beta_dpo=float("inf")), "beta_dpo"),
    ],
)
def test_sdpo_block_rejects_bad_flags_before_any_launch(flags, name, no_launch):
    inputs = pair_inputs((4, 4, 8, 8), F32, 27, 0.01)
    with pytest.raises(ValueError, match=name):
        compat.official_sdpo_loss(*inputs, **flags)


@pytest.mark.parametrize(
    "fn,kw",
    [
        (compat.official_dpo_loss, {}),
        (compat.official_dspo_loss, dict(beta_dpo=5000.0, sdxl=True)),
        (compat.official_sdpo_loss, dict(use_winner_preserving=True, winner_preserving_mu=0.9)),
    ],
    ids=["DiffusionDPO", "DSPO-sdxl", "SDPO"],
)
def test_official_blocks_average_whole_rows_of_video_latents(fn, kw):
    """[2B, C, F, H, W]: the official blocks' mean(dim=[1,2,3]) would leave the W axis; the
    drop-ins average whole rows, i.e. give upstream's 4-D result on [2B, C*F, H, W]."""
    video = pair_inputs((4, 4, 3, 8, 8), F32, 28, 0.01)
    (loss5, logs5), grad5 = forward_backward(fn, *video, **kw)
    (loss4, logs4), grad4 = forward_backward(fn, *(x.flatten(1, 2) for x in video), **kw)
    theirs = forward_backward(
        eager_sdpo,
        *(x.flatten(1, 2) for x in video),
        "diffusion-dpo",
        5000.0,
        False,
        fn is compat.official_sdpo_loss,
        0.9,
        0.0,
    )
    assert_close("loss", loss5, loss4, 1e-6)
    assert_close("grad", grad5.flatten(1, 2), grad4, 1e-6)
    for key in logs4:
        assert_close(key, logs5[key], logs4[key], 1e-6)
    if fn is not compat.official_dspo_loss:  # the DPO-base blocks against the eager 4-D twin
        assert_close("loss", loss5, theirs[0][0], 2 * compute_rtol(video, 5000.0))
