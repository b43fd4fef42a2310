"""RPO, RPO-diagonal, SSPO, dense-reward DPO, KTO, MaPO, SDPO and DMPO (docs/methods.md §2.4-2.10)
against the float64 reference: loss, gradient (random incoming gradient), every metric; every
variant, small to large β, fp32/fp16/bf16/fp64 and mixes, 4-D and 5-D, B = 1 where legal, rows
that span several blocks and end in a partial one. Kernel outputs are poisoned (conftest)."""

import pytest
import reference_extended as ref
import torch
from helpers import case_id, compute_dtype, compute_rtol, make_inputs
from helpers_extended import (
    BF16,
    CASES,
    F32,
    F64,
    UNPAIRED_CASES,
    check_against_reference,
    correlated_inputs,
    mapo_rtol,
    random_embeddings,
    random_labels,
)

import fastpref

IDS = [case_id(s, d) for s, d in CASES]
PAIRED_B2 = [(s, d) for s, d in CASES if s[0] >= 4]  # B >= 2 (rpo_diagonal)
IDS_B2 = [case_id(s, d) for s, d in PAIRED_B2]
U_IDS = [case_id(s, d) for s, d in UNPAIRED_CASES]

# (weights, β, policy offset, seed): W all ones, softmax over emb_w only, over (emb_w, emb_l).
RPO_SETTINGS = [
    ("ones", 50.0, 0.1, 0),
    ("emb_w", 5000.0, 0.01, 1),
    ("emb_wl", 5000.0, 0.01, 0),
    ("emb_w_bf16", 500.0, 0.03, 1),
]


@pytest.mark.parametrize("weights,beta,scale,seed", RPO_SETTINGS, ids=[s[0] + f"-beta{s[1]:g}" for s in RPO_SETTINGS])
@pytest.mark.parametrize("shape,dtypes", CASES, ids=IDS)
def test_rpo_matches_spec(shape, dtypes, weights, beta, scale, seed, device):
    inputs = make_inputs(shape, dtypes, device, seed, scale)
    B = shape[0] // 2
    kw = dict(beta=beta, tau=0.5 if seed == 0 else 0.2)
    if weights != "ones":
        kw["emb_w"] = random_embeddings(B, 16, seed + 10, BF16 if "bf16" in weights else F32, device)
    if weights == "emb_wl":
        kw["emb_l"] = random_embeddings(B, 16, seed + 20, F32, device)
    metrics, _, _, _ = check_against_reference(
        fastpref.rpo_loss, ref.rpo, inputs, rtol=compute_rtol(inputs, beta), **kw
    )
    assert metrics["weights"].shape == (B, B)
    if weights != "ones":
        assert_rows_sum_to_one(metrics["weights"])


def assert_rows_sum_to_one(W):
    err = float((W.double().sum(1) - 1).abs().max())
    assert err <= 1e-5, f"softmax rows must sum to 1, off by {err:.2e}"


@pytest.mark.parametrize("diagonal_weight,beta,scale", [(0.8, 5000.0, 0.01), (0.3, 50.0, 0.1)])
@pytest.mark.parametrize("shape,dtypes", PAIRED_B2, ids=IDS_B2)
def test_rpo_diagonal_matches_spec(shape, dtypes, diagonal_weight, beta, scale, device):
    inputs = make_inputs(shape, dtypes, device, 3, scale)
    check_against_reference(
        fastpref.rpo_diagonal_loss,
        ref.rpo_diagonal,
        inputs,
        rtol=compute_rtol(inputs, beta),
        beta=beta,
        diagonal_weight=diagonal_weight,
    )


SSPO_SETTINGS = [
    ("indicator", 5000.0, 0.01, 0),
    ("sign", 5000.0, 0.01, 1),
    ("indicator", 50.0, 0.1, 1),
    ("sign", 1.0, 0.3, 0),
]


@pytest.mark.parametrize(
    "criterion,beta,scale,seed", SSPO_SETTINGS, ids=[f"{c}-beta{b:g}" for c, b, _, _ in SSPO_SETTINGS]
)
@pytest.mark.parametrize("shape,dtypes", CASES, ids=IDS)
def test_sspo_matches_spec(shape, dtypes, criterion, beta, scale, seed, device):
    inputs = make_inputs(shape, dtypes, device, seed, scale)
    metrics, ref_metrics, _, _ = check_against_reference(
        fastpref.sspo_loss, ref.sspo, inputs, rtol=compute_rtol(inputs, beta), beta=beta, criterion=criterion
    )
    c = metrics["criterion"].double().cpu()
    allowed = {0.0, 1.0} if criterion == "indicator" else {-1.0, 0.0, 1.0}
    assert set(c.tolist()) <= allowed, f"criterion values {c.tolist()}"


# (timesteps form, γ, normalize, K, T, β, policy offset)
DENSE_SETTINGS = [
    ("int-B", 0.9, True, 50, 1000, 5000.0, 0.01),
    ("int-2B", 0.5, False, 20, 1000, 50.0, 0.1),
    ("float32-B", 0.8, True, 7, 100, 5000.0, 0.01),
    ("int32-2B", 0.95, True, 50, 1000, 500.0, 0.03),
]


def dense_timesteps(form, B, T, seed, device):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, T, (B,), generator=g)
    if form.startswith("float"):
        # Keep clear of the k(t) steps (multiples of T / K off T - 1) so that the floor is unambiguous.
        t = t.double() + 0.25
    dtype = {"int": torch.int64, "int32": torch.int32, "float32": torch.float32}[form.split("-")[0]]
    t = t.to(dtype)
    return (torch.cat([t, t]) if form.endswith("2B") else t).to(device)


@pytest.mark.parametrize("form,gamma,normalize,K,T,beta,scale", DENSE_SETTINGS, ids=[s[0] for s in DENSE_SETTINGS])
@pytest.mark.parametrize("shape,dtypes", CASES, ids=IDS)
def test_dense_dpo_matches_spec(shape, dtypes, form, gamma, normalize, K, T, beta, scale, device):
    inputs = make_inputs(shape, dtypes, device, 4, scale)
    timesteps = dense_timesteps(form, shape[0] // 2, T, 5, device)
    w_max = K / sum(gamma**j for j in range(K)) if normalize else 1.0
    kw = dict(beta=beta, gamma=gamma, normalize=normalize, num_inference_steps=K, num_train_timesteps=T)
    check_against_reference(
        fastpref.dense_dpo_loss, ref.dense_dpo, inputs, (timesteps,), rtol=compute_rtol(inputs, beta * w_max), **kw
    )


# (labels dtype, kl_baseline, β, λ_d, λ_u, policy offset)
KTO_SETTINGS = [
    (torch.int64, None, 1000.0, 1.0, 1.0, 0.01),
    (torch.bool, 2e-4, 1000.0, 2.0, 0.5, 0.01),
    (torch.float32, "tensor", 50.0, 0.7, 1.3, 0.1),
    (torch.int32, -1e-3, 5.0, 1.0, 1.0, 0.3),
]


@pytest.mark.parametrize(
    "labels_dtype,kl,beta,lambda_d,lambda_u,scale",
    KTO_SETTINGS,
    ids=[f"{str(s[0])[6:]}-kl{s[1] if not isinstance(s[1], float) else 'float'}" for s in KTO_SETTINGS],
)
@pytest.mark.parametrize("shape,dtypes", UNPAIRED_CASES, ids=U_IDS)
def test_kto_matches_spec(shape, dtypes, labels_dtype, kl, beta, lambda_d, lambda_u, scale, device):
    inputs = make_inputs(shape, dtypes, device, 6, scale)
    labels = random_labels(shape[0], 7, labels_dtype, device)
    if kl == "tensor":
        kl = torch.tensor(3e-3, dtype=F32, device=device)
    kw = dict(beta=beta, lambda_d=lambda_d, lambda_u=lambda_u, kl_baseline=kl)
    # x = s β (g - z): β multiplies the error differences without DPO's 0.5.
    check_against_reference(fastpref.kto_loss, ref.kto, inputs, (labels,), rtol=compute_rtol(inputs, 2 * beta), **kw)


# (β, snr_value, T, policy offset from target)
MAPO_SETTINGS = [(0.1, 0.5, 1000, 0.3), (1.0, 2.0, 500, 0.2), (0.5, 20.0, 1000, 1.0)]


@pytest.mark.parametrize("beta,snr,T,scale", MAPO_SETTINGS, ids=[f"beta{b:g}-snr{s:g}" for b, s, _, _ in MAPO_SETTINGS])
@pytest.mark.parametrize("shape,dtypes", CASES, ids=IDS)
def test_mapo_matches_spec(shape, dtypes, beta, snr, T, scale, device):
    model, ref_pred, target = make_inputs(shape, dtypes, device, 8, 0.3)
    model = (target.double() + scale * (model.double() - target.double())).to(model.dtype)
    check_against_reference(
        fastpref.mapo_loss,
        ref.mapo,
        (model, target),
        rtol=mapo_rtol(model, target, beta, snr, T),
        beta=beta,
        snr_value=snr,
        num_train_timesteps=T,
    )


# (base, β, μ, error correlation ρ, policy offset, extra kwargs). ρ = 0.5 gives λ ≈ (1 - μ) / ρ:
# unclamped for μ = 0.9 and 0.6, clamped at max_scale for μ = 0.2; ρ < 0 gives den < 0.
SDPO_SETTINGS = [
    ("dpo", 5000.0, 0.9, 0.5, 0.01, {}),
    ("dpo", 50.0, 0.2, 0.5, 0.1, {}),
    ("dpo", 500.0, 0.9, -0.5, 0.03, dict(max_scale=0.5)),
    ("dpo", 5000.0, 0.6, 0.5, 0.01, {}),
    ("dpo", 5000.0, 0.2, 0.5, 0.01, dict(max_scale=2.5, eps=0.0)),
    ("dspo", 0.001, 0.2, 0.5, 0.3, dict(dspo_variant="sd15")),
    ("dspo", 1.0, 0.9, 0.5, 0.3, dict(dspo_variant="sd15")),
    ("dspo", 5000.0, 0.6, 0.5, 0.01, dict(dspo_variant="sdxl")),
    ("dmpo", 2000.0, 0.9, 0.5, 0.01, {}),
    ("dmpo", 6000.0, 0.6, 0.5, 0.01, dict(dmpo_alpha=0.05)),
]
SDPO_IDS = [
    f"{b}-beta{beta:g}-mu{mu:g}-rho{rho:g}" + "".join(f"-{k}{v}" for k, v in kw.items())
    for b, beta, mu, rho, _, kw in SDPO_SETTINGS
]


def sdpo_rtols(inputs, beta, scale, base):
    """(value rtol, gradient rtol). λ comes from S_ww and S_wl, so its relative error grows as
    S_wl cancels: (S_ww + S_ll) / |S_wl| times the fp32 rounding."""
    rtol = compute_rtol(inputs, beta)
    if base == "dspo":
        rtol *= 1 + 2 * beta * beta * scale * scale  # the β² g² S_pr term, as in test_losses_core
    _, num, den, cos = ref.sdpo_scale(inputs[0].double(), inputs[2].double())
    lam_rtol = (1e-12 if compute_dtype(inputs) == F64 else 4e-6) * (1 + 2 / float(cos.abs()))
    return rtol, rtol + lam_rtol


@pytest.mark.parametrize("base,beta,mu,rho,scale,extra", SDPO_SETTINGS, ids=SDPO_IDS)
@pytest.mark.parametrize("shape,dtypes", CASES, ids=IDS)
def test_sdpo_matches_spec(shape, dtypes, base, beta, mu, rho, scale, extra, device):
    inputs = correlated_inputs(shape, dtypes, device, 9, scale, rho)
    kw = dict(beta=beta, mu=mu, base=base, **extra)
    if extra.get("dspo_variant") == "sdxl":
        # A threshold well clear of q, below it for one dtype case and above for the others.
        q = float(((inputs[0].double() - inputs[1].double())[: shape[0] // 2] ** 2).mean())
        kw["sdxl_threshold"] = q * (0.5 if dtypes == F32 else 2.0)
    rtol, grad_rtol = sdpo_rtols(inputs, beta, scale, base)
    metrics, ref_metrics, _, _ = check_against_reference(
        fastpref.sdpo_loss, ref.sdpo, inputs, rtol=rtol, grad_rtol=grad_rtol, **kw
    )
    lam = float(ref_metrics["loser_grad_scale"])
    if rho < 0:
        assert lam == extra["max_scale"], "den < 0 must give λ = max_scale"
    assert float(metrics["loser_grad_scale"]) <= extra.get("max_scale", 1.0)


@pytest.mark.parametrize("beta,alpha,scale", [(2000.0, 0.01, 0.01), (50.0, 0.5, 0.1), (1.0, 0.2, 0.3)])
@pytest.mark.parametrize("shape,dtypes", CASES, ids=IDS)
def test_dmpo_matches_spec(shape, dtypes, beta, alpha, scale, device):
    inputs = make_inputs(shape, dtypes, device, 10, scale)
    check_against_reference(
        fastpref.dmpo_loss, ref.dmpo, inputs, rtol=compute_rtol(inputs, beta), beta=beta, alpha=alpha
    )
