"""docs/methods.md's special cases and exact constructions for the extended losses (§2.4-2.10):
reductions to Diffusion-DPO, the dense k(t) table, SSPO anchors and ties, MaPO near m = 0,
KTO one-class batches, SDPO's gradient edit, DMPO as SDPO. Kernel against kernel where the
document states an identity, kernel against the float64 reference otherwise."""

import math

import pytest
import reference_extended as ref
import torch
from helpers import assert_close, assert_grad_close, compute_rtol, make_inputs, run
from helpers_extended import F32, F64, check_against_reference, correlated_inputs, mapo_rtol, random_embeddings

import fastpref

G_SCALE = 0.75


def run_both(fn_a, fn_b, args_a, args_b, kw_a, kw_b):
    """(loss, metrics, grad) of two kernel calls on the same model_pred and incoming gradient."""
    a = run(fn_a, *args_a, grad_scale=G_SCALE, **kw_a)
    b = run(fn_b, *args_b, grad_scale=G_SCALE, **kw_b)
    return a[:3], b[:3]


# ---------------------------------------------------------------- RPO


@pytest.mark.parametrize("with_emb", [False, True])
def test_rpo_with_one_pair_is_dpo(with_emb, device):
    """B = 1: W = [[1]] (a softmax over one loser), so RPO is Diffusion-DPO."""
    inputs = make_inputs((2, 4, 9, 9), F32, device, 1, 0.01)
    kw = dict(emb_w=random_embeddings(1, 8, 3, F32, device)) if with_emb else {}
    (loss, m, grad), (dloss, dm, dgrad) = run_both(
        fastpref.rpo_loss, fastpref.diffusion_dpo_loss, inputs, inputs, dict(beta=5000.0, **kw), dict(beta=5000.0)
    )
    rtol = compute_rtol(inputs, 5000.0)
    assert_close("loss", loss, dloss, rtol)
    assert_grad_close(grad, dgrad.double(), F32, rtol)
    assert float(m["weights"].reshape(())) == 1.0 and float(m["diag_weight_mean"]) == 1.0
    assert float(m["implicit_acc"]) == float(dm["implicit_acc"])


def test_rpo_without_embeddings_has_unit_weights_and_dpo_diagonal(device):
    """emb_w=None: W = 1 everywhere (not the identity). Then (a) RPO is DPO over all B² (winner
    i, loser j) pairs, (b) its diagonal is DPO's inside: rpo_diagonal with weight 1 is DPO, and
    (c) rpo_diagonal with weight 1/B weighs all pairs alike, as RPO does."""
    model, refp, target = make_inputs((8, 3, 11, 7), F32, device, 2, 0.01)
    B, beta = 4, 5000.0
    rtol = compute_rtol((model, refp, target), beta)
    loss, m, grad, _ = run(fastpref.rpo_loss, model, refp, target, beta=beta, grad_scale=G_SCALE)
    assert torch.equal(m["weights"].cpu(), torch.ones(B, B, dtype=m["weights"].dtype))
    assert float(m["diag_weight_mean"]) == 1.0

    # (a) every (i, j) as its own DPO pair: winners repeat_interleave, losers tile.
    wi, lj = torch.arange(B).repeat_interleave(B), B + torch.arange(B).repeat(B)
    expand = lambda x: torch.cat([x[wi], x[lj]])  # noqa: E731
    all_pairs = [expand(x) for x in (model, refp, target)]
    dloss, dm, dgrad, _ = run(fastpref.diffusion_dpo_loss, *all_pairs, beta=beta, grad_scale=G_SCALE)
    assert_close("loss vs DPO on all pairs", loss, dloss, rtol)
    folded = torch.zeros_like(model, dtype=F64).index_add_(0, torch.cat([wi, lj]).to(device), dgrad.double())
    assert_grad_close(grad, folded, F32, rtol)
    assert abs(float(m["pair_acc_all"]) - float(dm["implicit_acc"])) < 1e-6

    # (b) the diagonal alone is DPO.
    pd_loss, pd_m, pd_grad, _ = run(
        fastpref.rpo_diagonal_loss, model, refp, target, beta=beta, diagonal_weight=1.0, grad_scale=G_SCALE
    )
    d1loss, d1m, d1grad, _ = run(fastpref.diffusion_dpo_loss, model, refp, target, beta=beta, grad_scale=G_SCALE)
    assert_close("rpo_diagonal(1.0) vs DPO", pd_loss, d1loss, rtol)
    assert_grad_close(pd_grad, d1grad.double(), F32, rtol)
    assert float(pd_m["implicit_acc"]) == float(d1m["implicit_acc"]) == float(m["implicit_acc"])

    # (c) uniform pair weights.
    u_loss, _, u_grad, _ = run(
        fastpref.rpo_diagonal_loss, model, refp, target, beta=beta, diagonal_weight=1.0 / B, grad_scale=G_SCALE
    )
    assert_close("rpo_diagonal(1/B) vs rpo", u_loss, loss, rtol)
    assert_grad_close(u_grad, grad.double(), F32, rtol)


def test_rpo_identical_embeddings_give_uniform_weights(device):
    inputs = make_inputs((6, 2, 8, 8), F32, device, 4, 0.01)
    emb = random_embeddings(1, 8, 5, F32, device).expand(3, 8) * torch.tensor([[1.0], [2.0], [0.5]], device=device)
    _, m = fastpref.rpo_loss(*inputs, emb_w=emb)
    assert_close("weights", m["weights"], torch.full((3, 3), 1 / 3, dtype=F64), 1e-6)
    check_against_reference(fastpref.rpo_loss, ref.rpo, inputs, rtol=compute_rtol(inputs, 5000.0), emb_w=emb)


# ---------------------------------------------------------------- dense-reward DPO


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("form", ["B", "2B"])
def test_dense_with_gamma_one_is_dpo_exactly(normalize, form, device):
    """γ = 1: w ≡ 1 (normalised: K * 1 / K), so dense DPO is diffusion_dpo_loss bit for bit."""
    inputs = make_inputs((6, 3, 25, 41), F32, device, 5, 0.01)
    ts = torch.tensor([999, 500, 3], device=device)
    ts = torch.cat([ts, ts]) if form == "2B" else ts
    (loss, m, grad), (dloss, dm, dgrad) = run_both(
        fastpref.dense_dpo_loss,
        fastpref.diffusion_dpo_loss,
        inputs + (ts,),
        inputs,
        dict(gamma=1.0, normalize=normalize),
        {},
    )
    assert torch.equal(loss, dloss), f"{float(loss)!r} != {float(dloss)!r}"
    assert torch.equal(grad, dgrad), f"gradient differs by up to {float((grad - dgrad).abs().max()):.3e}"
    assert float(m["step_weight_mean"]) == 1.0
    for key in ("implicit_acc", "model_mse", "ref_mse"):
        assert torch.equal(m[key], dm[key]), f"{key}: {m[key]} != {dm[key]}"


# t -> k(t) for T = 1000, K = 50 (docs/methods.md §2.6), plus interior points.
K_TABLE = {999: 0, 981: 0, 980: 0, 979: 1, 960: 1, 959: 2, 500: 24, 19: 49, 1: 49, 0: 49}


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.float32])
def test_dense_step_index_table(dtype, device):
    """With γ = 1/2 and normalize=False, step_weight_mean of a one-pair batch is 2^-k(t)
    exactly; the table comes from docs/methods.md, not from the formula under test."""
    inputs = make_inputs((2, 3, 4), F32, device, 6, 0.05)
    for t, k in K_TABLE.items():
        assert float(ref.dense_step_index(torch.tensor([t]))) == k  # the reference agrees
        ts = torch.tensor([t], dtype=dtype, device=device)
        _, m = fastpref.dense_dpo_loss(*inputs, ts, gamma=0.5, normalize=False)
        got = float(m["step_weight_mean"])
        assert got == 2.0**-k, f"t={t}: weight {got!r}, expected 2^-{k} (k = {-math.log2(got) if got > 0 else 'inf'})"


@pytest.mark.parametrize("T,K,gamma", [(40, 8, 0.7), (100, 50, 0.9)])
def test_dense_normalised_weights_average_one(T, K, gamma, device):
    """Normalised weights average 1 over t = 0 .. T-1 when K divides T (one pair per t)."""
    inputs = make_inputs((2 * T, 3), F32, device, 7, 0.05)
    ts = torch.arange(T, device=device)
    _, m = fastpref.dense_dpo_loss(*inputs, ts, gamma=gamma, num_inference_steps=K, num_train_timesteps=T)
    assert abs(float(m["step_weight_mean"]) - 1.0) <= 1e-6
    _, m2 = fastpref.dense_dpo_loss(
        *inputs, ts, gamma=gamma, num_inference_steps=K, num_train_timesteps=T, normalize=False
    )
    expected = sum(gamma**j for j in range(K)) / K
    assert abs(float(m2["step_weight_mean"]) - expected) <= 1e-6 * expected


# ---------------------------------------------------------------- SSPO


def sspo_inputs(device, anchor, seed=8):
    """Winner rows moved so that every anchor a_i = r_w - m_w has a set sign: the policy winner
    halfway to the target (a > 0), twice as far (a < 0), or equal to the reference (a = 0)."""
    model, refp, target = (x.double() for x in make_inputs((6, 3, 9, 10), F64, "cpu", seed, 0.01))
    if anchor == "zero":
        model[:3] = refp[:3]
    else:
        model[:3] = target[:3] + (0.5 if anchor == "positive" else 2.0) * (refp[:3] - target[:3])
    return tuple(x.to(F32).to(device) for x in (model, refp, target))


@pytest.mark.parametrize("criterion", ["indicator", "sign"])
def test_sspo_with_all_anchors_positive_is_dpo(criterion, device):
    """c ≡ 1 gives diffusion_dpo_loss on (x^w, x^s)."""
    inputs = sspo_inputs(device, "positive")
    (loss, m, grad), (dloss, dm, dgrad) = run_both(
        fastpref.sspo_loss, fastpref.diffusion_dpo_loss, inputs, inputs, dict(criterion=criterion), {}
    )
    rtol = compute_rtol(inputs, 5000.0)
    assert torch.equal(m["criterion"].cpu(), torch.ones(3, dtype=m["criterion"].dtype))
    assert float(m["dpo_fraction"]) == 1.0
    assert_close("loss", loss, dloss, rtol)
    assert_grad_close(grad, dgrad.double(), F32, rtol)
    assert float(m["implicit_acc"]) == float(dm["implicit_acc"])


@pytest.mark.parametrize("criterion", ["indicator", "sign"])
def test_sspo_anchor_ties_give_zero(criterion, device):
    """model_pred == ref_pred on the winner rows: a = 0 exactly, so c = 0 under both criteria,
    inside = 0, loss = log 2 and the self-sample rows get exactly zero gradient."""
    inputs = sspo_inputs(device, "zero")
    loss, m, grad, _ = run(fastpref.sspo_loss, *inputs, criterion=criterion)
    assert torch.equal(m["criterion"].cpu(), torch.zeros(3, dtype=m["criterion"].dtype))
    assert float(m["dpo_fraction"]) == 0.0 and float(m["implicit_acc"]) == 0.0
    assert_close("loss", loss, torch.tensor(math.log(2.0)), 1e-6)
    assert (grad[3:] == 0).all(), "self-sample rows must get zero gradient when c = 0"
    assert (grad[:3] != 0).any()


@pytest.mark.parametrize("criterion,c", [("indicator", 0.0), ("sign", -1.0)])
def test_sspo_with_all_anchors_negative(criterion, c, device):
    """a < 0: indicator drops x^s (reference-anchored SFT), sign makes x^s a second positive."""
    inputs = sspo_inputs(device, "negative")
    metrics, _, grad, _ = check_against_reference(
        fastpref.sspo_loss, ref.sspo, inputs, rtol=compute_rtol(inputs, 5000.0), criterion=criterion
    )
    assert torch.equal(metrics["criterion"].cpu(), torch.full((3,), c, dtype=metrics["criterion"].dtype))
    if c == 0.0:
        assert (grad[3:] == 0).all()


# ---------------------------------------------------------------- MaPO near m = 0


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("offset", [1e-4, 1e-3, 3e-2])
def test_mapo_small_errors(offset, dtype, device):
    """m ~ 0.3 offset² (s m from 3e-9 to 1e-4): h = x / expm1(x) needs its series (a naive
    fp32 x / (exp(x) - 1) is 0/0 or off by 1e-3 here); compared with the float64 reference."""
    g = torch.Generator().manual_seed(9)
    target = torch.randn(6, 3, 25, 41, generator=g, dtype=F64)
    model = target + offset * torch.randn(6, 3, 25, 41, generator=g, dtype=F64)
    args = (model.to(dtype).to(device), target.to(dtype).to(device))
    check_against_reference(fastpref.mapo_loss, ref.mapo, args, rtol=mapo_rtol(*args, 0.1, 0.5, 1000))


@pytest.mark.parametrize("dtype", [F32, F64])
def test_mapo_large_errors(dtype, device):
    """s m from about 20 to 80: h = x e^-x (1e-9 .. 1e-33) must keep its relative accuracy, not
    flush to 0 early or overflow e^x; scores are compared relative to their own size."""
    g = torch.Generator().manual_seed(19)
    target = torch.randn(6, 3, 9, 10, generator=g, dtype=F64)
    spread = torch.tensor([0.45, 0.6, 0.75, 0.5, 0.65, 0.8], dtype=F64).view(-1, 1, 1, 1)
    model = target + spread * torch.randn(6, 3, 9, 10, generator=g, dtype=F64)
    args = (model.to(dtype).to(device), target.to(dtype).to(device))
    kw = dict(beta=0.1, snr_value=100.0, num_train_timesteps=1000)
    metrics, ref_metrics, _, _ = check_against_reference(
        fastpref.mapo_loss, ref.mapo, args, rtol=mapo_rtol(*args, 0.1, 100.0, 1000), **kw
    )
    rtol = 80 * (1e-12 if dtype == F64 else 4e-6)  # e^-x: the rounding of x = s m, times x
    for key in ("win_score", "lose_score"):
        assert float(ref_metrics[key]) < 1e-6
        assert_close(key, metrics[key], ref_metrics[key], rtol)


# ---------------------------------------------------------------- KTO one-class batches


@pytest.mark.parametrize("kl", [None, "float", "tensor"])
@pytest.mark.parametrize("desirable", [True, False])
def test_kto_one_class_batches(desirable, kl, device):
    inputs = make_inputs((5, 3, 9, 10), F32, device, 10, 0.01)
    labels = torch.full((5,), 1 if desirable else 0, device=device)
    kl_baseline = {None: None, "float": 1e-4, "tensor": torch.tensor(-2e-4, device=device)}[kl]
    metrics, ref_metrics, _, _ = check_against_reference(
        fastpref.kto_loss,
        ref.kto,
        inputs,
        (labels,),
        rtol=compute_rtol(inputs, 2000.0),
        beta=1000.0,
        kl_baseline=kl_baseline,
        lambda_d=1.5,
        lambda_u=0.5,
    )
    if kl is None:
        assert float(ref_metrics["kl"]) >= 0.0 and float(metrics["kl"]) >= 0.0
    else:
        assert float(metrics["kl"]) == float(torch.as_tensor(kl_baseline, dtype=F32))  # used as given


def test_kto_baseline_is_clamped_at_zero(device):
    """Policy worse than the reference everywhere: mean g < 0, so z = 0 exactly."""
    model, refp, target = make_inputs((4, 3, 9, 10), F32, device, 11, 0.3)
    _, m = fastpref.kto_loss(model, refp, target, torch.tensor([1, 0, 1, 0], device=device))
    assert float(m["kl"]) == 0.0


# ---------------------------------------------------------------- SDPO and DMPO


SDPO_BASES = [("dpo", {}), ("dspo", dict(dspo_variant="sd15")), ("dspo", dict(dspo_variant="sdxl")), ("dmpo", {})]
SDPO_BASE_IDS = ["dpo", "dspo-sd15", "dspo-sdxl", "dmpo"]


def base_call(base, extra, beta):
    """The plain base loss docs/methods.md names for an SDPO base, with its keyword arguments."""
    if base == "dpo":
        return fastpref.diffusion_dpo_loss, dict(beta=beta)
    if base == "dspo":
        return fastpref.dspo_loss, dict(beta=beta, variant=extra["dspo_variant"])
    return fastpref.dmpo_loss, dict(beta=beta, alpha=0.01)


@pytest.mark.parametrize("base,extra", SDPO_BASES, ids=SDPO_BASE_IDS)
def test_sdpo_without_safeguard_is_the_base_loss(base, extra, device):
    inputs = correlated_inputs((6, 3, 25, 41), F32, device, 12, 0.01, 0.5)
    beta = 0.001 if extra.get("dspo_variant") == "sd15" else 500.0
    fn, kw = base_call(base, extra, beta)
    (loss, m, grad), (bloss, bm, bgrad) = run_both(
        fastpref.sdpo_loss, fn, inputs, inputs, dict(beta=beta, base=base, safeguard=False, **extra), kw
    )
    rtol = compute_rtol(inputs, beta)
    assert torch.equal(loss, bloss), f"loss {float(loss)!r} != base {float(bloss)!r}"  # the same value, exactly
    assert_grad_close(grad, bgrad.double(), F32, rtol)
    assert float(m["loser_grad_scale"]) == 1.0
    assert not any(k.startswith("safeguard_") for k in m), f"safeguard metrics without the safeguard: {sorted(m)}"
    for key in ("implicit_acc", "model_mse", "ref_mse"):
        assert_close(key, m[key], bm[key], rtol)
    if base == "dspo":
        assert int(m["dspo_branch"]) == int(bm["sdxl_branch"])


@pytest.mark.parametrize("base,extra", SDPO_BASES, ids=SDPO_BASE_IDS)
def test_sdpo_edits_only_the_loser_gradient(base, extra, device):
    """Same value as the base and the same winner-row gradient (exactly: λ only rescales the loser
    coefficients); loser rows get λ times the base gradient (up to one rounding)."""
    inputs = correlated_inputs((6, 3, 25, 41), F32, device, 13, 0.01, 0.5)
    beta = 0.001 if extra.get("dspo_variant") == "sd15" else 500.0
    kw = dict(beta=beta, base=base, mu=0.9, **extra)
    (loss, m, grad), (bloss, bm, bgrad) = run_both(
        fastpref.sdpo_loss, fastpref.sdpo_loss, inputs, inputs, kw, dict(kw, safeguard=False)
    )
    lam = float(m["loser_grad_scale"])
    assert 0.05 < lam < 0.5, f"the construction should give λ ≈ 0.2, got {lam}"
    rtol = compute_rtol(inputs, beta)
    assert torch.equal(loss, bloss), f"loss {float(loss)!r} != {float(bloss)!r}: the value must be the base's exactly"
    assert torch.equal(grad[:3], bgrad[:3]), "winner rows must keep the base gradient exactly"
    assert_grad_close(grad[3:], lam * bgrad[3:].double(), F32, rtol)
    assert_close("inside_term", m["inside_term"], bm["inside_term"], rtol, atol=rtol)


@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("eps_over_den", [0.0, 0.5, 2.0])
def test_sdpo_eps_uses_the_local_batch(B, eps_over_den, device):
    """eps is added to den = 4 S_wl / K² with K = B n of this call: set eps comparable to den
    (λ moves by a factor 1 / (1 + eps/den)) for two batch sizes."""
    inputs = correlated_inputs((2 * B, 3, 25, 41), F32, device, 14, 0.01, 0.5)
    _, num, den, _ = ref.sdpo_scale(inputs[0].double(), inputs[2].double())
    eps = eps_over_den * float(den)
    metrics, ref_metrics, _, _ = check_against_reference(
        fastpref.sdpo_loss, ref.sdpo, inputs, rtol=compute_rtol(inputs, 500.0), beta=500.0, mu=0.9, eps=eps
    )
    expected = 0.1 * float(num) / (float(den) * (1 + eps_over_den))
    assert_close("loser_grad_scale", metrics["loser_grad_scale"], torch.tensor(expected), 2e-5)


@pytest.mark.parametrize("max_scale", [0.0, 0.75])
def test_sdpo_orthogonal_errors_give_max_scale(max_scale, device):
    """S_wl = 0 exactly (winner and loser errors on disjoint elements): den = 0 is not > 0, so
    λ = max_scale; max_scale = 0 zeroes every loser-row gradient."""
    target = torch.zeros(4, 2, 3)
    refp = torch.full((4, 2, 3), 0.1)
    model = torch.zeros(4, 2, 3)
    model[:2, 0] = 0.3
    model[2:, 1] = 0.2
    args = [x.to(device) for x in (model, refp, target)]
    loss, m, grad, _ = run(fastpref.sdpo_loss, *args, beta=50.0, max_scale=max_scale)
    assert float(m["safeguard_den"]) == 0.0
    assert float(m["loser_grad_scale"]) == max_scale
    if max_scale == 0.0:
        assert (grad[2:] == 0).all() and (grad[:2] != 0).any()


@pytest.mark.parametrize("alpha", [0.01, 0.3, 0.0, 1.0])
def test_dmpo_is_sdpo_dmpo_without_safeguard(alpha, device):
    """alpha = 0 and 1 hit the clamp of q at 1 - 1e-6 and 1e-6."""
    inputs = make_inputs((6, 3, 9, 10), F32, device, 15, 0.01)
    (loss, m, grad), (sloss, sm, sgrad) = run_both(
        fastpref.dmpo_loss,
        fastpref.sdpo_loss,
        inputs,
        inputs,
        dict(beta=2000.0, alpha=alpha),
        dict(beta=2000.0, base="dmpo", safeguard=False, dmpo_alpha=alpha),
    )
    rtol = compute_rtol(inputs, 2000.0)
    assert_close("loss", loss, sloss, rtol)
    assert_grad_close(grad, sgrad.double(), F32, rtol)
    for key in m:
        assert_close(key, m[key], sm[key], rtol, atol=rtol)
    check_against_reference(fastpref.dmpo_loss, ref.dmpo, inputs, rtol=rtol, beta=2000.0, alpha=alpha)


# ---------------------------------------------------------------- auxiliary tensors


def test_strided_aux_tensors_and_constants_get_no_gradient(device):
    """Embeddings, timesteps and labels as strided views are read through their strides, and
    tensors docs/methods.md calls constants (embeddings, kl_baseline) receive no gradient."""
    inputs = make_inputs((6, 3, 9, 10), F32, device, 16, 0.01)
    rtol = compute_rtol(inputs, 5000.0)
    emb = random_embeddings(8, 3, 17, F32, device).T.requires_grad_(True)  # [3, 8], strides (1, 3)
    emb_l = random_embeddings(3, 16, 18, F32, device)[:, ::2]  # [3, 8], element stride 2
    assert not emb.is_contiguous() and not emb_l.is_contiguous()
    loss, _, _, _ = check_against_reference(fastpref.rpo_loss, ref.rpo, inputs, rtol=rtol, emb_w=emb, emb_l=emb_l)
    assert emb.grad is None
    ts = torch.tensor([999, 0, 500, 1, 979, 7], device=device)[::2]  # [999, 500, 979]
    check_against_reference(fastpref.dense_dpo_loss, ref.dense_dpo, inputs, (ts,), rtol=compute_rtol(inputs, 25000.0))
    labels = torch.tensor([[1, 9], [0, 9], [2, 9], [0, 9], [1, 9], [0, 9]], device=device)[:, 0]
    kl = torch.tensor(1e-4, device=device, requires_grad=True)
    check_against_reference(
        fastpref.kto_loss, ref.kto, inputs, (labels,), rtol=compute_rtol(inputs, 2000.0), kl_baseline=kl
    )
    assert kl.grad is None


# ---------------------------------------------------------------- float64 fractions

FRACTIONS = [  # (function, extra positional builder, keyword arguments, {metric: denominator as a function of B})
    ("rpo", lambda B: (), {}, {"implicit_acc": 1, "pair_acc_all": 2}),
    ("rpo_diagonal", lambda B: (), {}, {"implicit_acc": 1}),
    ("sspo", lambda B: (), {}, {"implicit_acc": 1, "dpo_fraction": 1}),
    ("dense_dpo", lambda B: (torch.arange(B) * 97,), {}, {"implicit_acc": 1}),
    ("kto", lambda B: (torch.arange(2 * B) % 2,), {}, {"acc": "N"}),
    ("mapo", None, {}, {"margin_acc": 1}),
    ("sdpo", lambda B: (), {}, {"implicit_acc": 1}),
    ("dmpo", lambda B: (), {}, {"implicit_acc": 1}),
]


@pytest.mark.parametrize("name,extra,kw,fractions", FRACTIONS, ids=[f[0] for f in FRACTIONS])
def test_float64_fractions_are_exact(name, extra, kw, fractions, device):
    """With float64 inputs the compute dtype is float64 (docs/methods.md §1), so a share k/B of pairs must
    be k/B to float64 precision, not a float32 rounding of it (2/3 -> 0.6666666865)."""
    B = 3
    fn = getattr(fastpref, f"{name}_loss")
    for seed in range(4):
        model, refp, target = make_inputs((2 * B, 3, 5, 5), F64, device, seed, 0.01)
        args = (model, target) if extra is None else (model, refp, target) + tuple(x.to(device) for x in extra(B))
        _, metrics = fn(*args, **kw)
        for key, power in fractions.items():
            count = 2 * B if power == "N" else B**power
            value = float(metrics[key])
            exact = round(value * count) / count
            assert abs(value - exact) <= 1e-15, f"{key} = {value!r}, expected the float64 value {exact!r}"


def test_rpo_with_many_pairs(device):
    """B = 40 (B x B = 1600 logits, past one 1024 tile): every cross-pair term and weight."""
    B = 40
    inputs = make_inputs((2 * B, 2, 3, 5), F32, device, 20, 0.05)
    rtol = compute_rtol(inputs, 50.0)
    check_against_reference(
        fastpref.rpo_loss,
        ref.rpo,
        inputs,
        rtol=rtol,
        beta=50.0,
        emb_w=random_embeddings(B, 8, 21, F32, device),
        tau=0.1,
    )
    check_against_reference(fastpref.rpo_diagonal_loss, ref.rpo_diagonal, inputs, rtol=rtol, beta=50.0)
