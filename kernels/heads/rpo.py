"""Diffusion-RPO heads (docs/methods.md §2.4): every winner i against every loser j, ℓ_ij = ρ_w,i - ρ_l,j
with ρ = -(m - r). `rpo`: weights W_ij (softmax over j of the prompt-embedding cosine / τ, or
all ones) inside the sigmoid, mean over all B² pairs. `rpo_diagonal`: weight w_d on the
diagonal and (1 - w_d) on the mean of the off-diagonal terms, outside the sigmoid.

Both are loss = Σ_ij Ω_ij softplus(-u_ij) / B with u_ij = 0.5 β V_ij ℓ_ij, so
μ_w,i = (β/2B) Σ_j Ω_ij V_ij σ(-u_ij) and μ_l,j = -(β/2B) Σ_i Ω_ij V_ij σ(-u_ij)."""

import triton
import triton.language as tl

from .._math import f64, sigmoid, softplus
from ..method import INPUT, Hyper, Layout, Method, Option
from .common import (
    fraction,
    load_pair_sums,
    masked_mean,
    nan_of,
    pair_means,
    policy_minus_ref,
    store_matrix,
    store_pair_coefs,
    store_scalar,
)


@triton.constexpr_function
def embedding_chunk(NP):
    """Embedding elements read per step: a [NP, NP, DC] product of at most 8192 elements."""
    return max(1, min(64, 8192 // (NP * NP)))


@triton.jit
def embedding_weights(
    emb_w_ptr, emb_l_ptr, D, sw0, sw1, sl0, sl1, B, tau, ACC: tl.constexpr, NP: tl.constexpr, DC: tl.constexpr
):
    """W_ij = softmax_j(cos(emb_w[i], emb_l[j]) / τ) over the valid j; norms clamped at 1e-12."""
    offs = tl.arange(0, NP)
    valid = offs < B
    dot = tl.zeros([NP, NP], ACC)
    norm_w = tl.zeros([NP], ACC)
    norm_l = tl.zeros([NP], ACC)
    for d0 in range(0, D, DC):
        dd = d0 + tl.arange(0, DC)
        mask = valid[:, None] & (dd < D)[None, :]
        w = tl.load(emb_w_ptr + offs[:, None] * sw0 + dd[None, :] * sw1, mask=mask, other=0.0).to(ACC)
        l = tl.load(emb_l_ptr + offs[:, None] * sl0 + dd[None, :] * sl1, mask=mask, other=0.0).to(ACC)
        dot += tl.sum(w[:, None, :] * l[None, :, :], axis=2)
        norm_w += tl.sum(w * w, axis=1)
        norm_l += tl.sum(l * l, axis=1)
    cos = dot / (tl.maximum(tl.sqrt(norm_w), 1e-12)[:, None] * tl.maximum(tl.sqrt(norm_l), 1e-12)[None, :])
    logits = tl.where(valid[None, :], cos / tau, -float("inf"))
    e = tl.exp(logits - tl.max(logits, axis=1)[:, None])
    return e / tl.sum(e, axis=1)[:, None]


@triton.jit
def rpo_head(
    part_ptr,
    B,
    splits,
    inv_n,
    beta,
    tau,
    emb_w,
    emb_l,
    emb_w_len,
    emb_w_strides,
    emb_l_strides,
    loss_ptr,
    stats_ptr,
    coef_ptr,
    C: tl.constexpr,
    ACC: tl.constexpr,
    NP: tl.constexpr,
    SP: tl.constexpr,
):
    """C.has_emb: W from the embeddings emb_w, emb_l ([B, D]), else W = 1."""
    rpo_terms(
        part_ptr,
        B,
        splits,
        f64(inv_n, ACC),
        f64(beta, ACC),
        f64(tau, ACC),
        emb_w,
        emb_l,
        emb_w_len,
        emb_w_strides[0],
        emb_w_strides[1],
        emb_l_strides[0],
        emb_l_strides[1],
        loss_ptr,
        stats_ptr,
        coef_ptr,
        C,
        False,
        C.has_emb,
        ACC,
        NP,
        SP,
        embedding_chunk(NP),
    )


@triton.jit
def rpo_diagonal_head(
    part_ptr,
    B,
    splits,
    inv_n,
    beta,
    diagonal_weight,
    loss_ptr,
    stats_ptr,
    coef_ptr,
    C: tl.constexpr,
    ACC: tl.constexpr,
    NP: tl.constexpr,
    SP: tl.constexpr,
):
    rpo_terms(
        part_ptr,
        B,
        splits,
        f64(inv_n, ACC),
        f64(beta, ACC),
        f64(diagonal_weight, ACC),
        part_ptr,
        part_ptr,
        0,
        0,
        0,
        0,
        0,
        loss_ptr,
        stats_ptr,
        coef_ptr,
        C,
        True,
        False,
        ACC,
        NP,
        SP,
        1,
    )


@triton.jit
def rpo_terms(
    part_ptr,
    B,
    splits,
    inv_n,
    beta,
    tau_or_wd,
    emb_w_ptr,
    emb_l_ptr,
    D,
    sw0,
    sw1,
    sl0,
    sl1,
    loss_ptr,
    stats_ptr,
    coef_ptr,
    C: tl.constexpr,
    DIAGONAL: tl.constexpr,
    HAS_EMB: tl.constexpr,
    ACC: tl.constexpr,
    NP: tl.constexpr,
    SP: tl.constexpr,
    DC: tl.constexpr,
):
    spt_w, srt_w, _, _, smr_w, spt_l, srt_l, _, _, smr_l = load_pair_sums(part_ptr, B, splits, NP, SP, ACC)
    offs = tl.arange(0, NP)
    valid = offs < B
    both = valid[:, None] & valid[None, :]
    diag = offs[:, None] == offs[None, :]
    rho_w = -policy_minus_ref(smr_w, inv_n)
    rho_l = -policy_minus_ref(smr_l, inv_n)
    ell = rho_w[:, None] - rho_l[None, :]
    ones = tl.full([NP, NP], 1.0, ACC)
    if DIAGONAL:
        weight = ones
        omega = tl.where(diag, tau_or_wd, (1.0 - tau_or_wd) / (B - 1))
    else:
        if HAS_EMB:
            weight = embedding_weights(emb_w_ptr, emb_l_ptr, D, sw0, sw1, sl0, sl1, B, tau_or_wd, ACC, NP, DC)
        else:
            weight = ones
        omega = ones / B
    weight = tl.where(both, weight, 0.0)
    omega = tl.where(both, omega, 0.0)
    u = 0.5 * beta * weight * ell
    loss = tl.sum(tl.sum(omega * softplus(-u), axis=1), axis=0) / B
    slope = omega * weight * sigmoid(-u) * (beta / (2 * B))
    store_pair_coefs(coef_ptr, B, 2.0 * inv_n * tl.sum(slope, axis=1), -2.0 * inv_n * tl.sum(slope, axis=0), NP)

    diag_ell = tl.sum(tl.where(diag, ell, 0.0), axis=1)
    tl.store(loss_ptr, loss)
    store_scalar(stats_ptr, C, "loss", loss)
    store_scalar(stats_ptr, C, "implicit_acc", fraction(diag_ell > 0, valid, B, diag_ell))
    if not DIAGONAL:
        wins = tl.where(ell > 0, 1.0, 0.0).to(ell.dtype) + nan_of(ell)  # NaN where ell is
        pair_wins = tl.sum(tl.sum(tl.where(both, wins, 0.0), axis=1), axis=0) / (B * B)
        model_w, model_l, ref_w, ref_l = pair_means(spt_w, spt_l, srt_w, srt_l, valid, B, inv_n)
        store_scalar(stats_ptr, C, "pair_acc_all", pair_wins)
        store_scalar(
            stats_ptr, C, "diag_weight_mean", masked_mean(tl.sum(tl.where(diag, weight, 0.0), axis=1), valid, B)
        )
        store_scalar(stats_ptr, C, "model_mse", 0.5 * (model_w + model_l))
        store_scalar(stats_ptr, C, "ref_mse", 0.5 * (ref_w + ref_l))
        store_matrix(stats_ptr, C, "weights", B, weight, NP)


RPO = Method(
    "rpo",
    "rpo_loss",
    rpo_head,
    Layout(("loss", "implicit_acc", "pair_acc_all", "diag_weight_mean", "model_mse", "ref_mse"), matrices=("weights",)),
    hypers=(Hyper("beta", 5000.0, "positive_finite"), Hyper("tau", 0.5, "positive_finite")),
    options=(Option("has_emb", (False, True), public=False),),
    inputs=("emb_w", "emb_l"),
    presets=(("rpo", {"emb_w": INPUT}), ("rpo_uniform", {})),
    loss_types=(
        (
            "rpo",
            "rpo",
            "Diffusion-RPO, all winner x loser pairs weighted by the similarity of their "
            "pooled prompt embeddings (--rpo_tau)",
        ),
        ("rpo_uniform", "rpo_uniform", "Diffusion-RPO, all winner x loser pairs, uniform weights"),
    ),
    description="Diffusion-RPO",
    section="2.4",
)

RPO_DIAGONAL = Method(
    "rpo_diagonal",
    "rpo_diagonal_loss",
    rpo_diagonal_head,
    Layout(("loss", "implicit_acc")),
    hypers=(Hyper("beta", 5000.0, "positive_finite"), Hyper("diagonal_weight", 0.8, "unit_interval")),
    presets=(("rpo_diagonal", {}),),
    loss_types=(("rpo_diagonal", "rpo_diagonal", "Diffusion-RPO, diagonal weight 0.8"),),
    min_pairs=2,
    description="Diffusion-RPO with a diagonal weight",
    section="2.4",
)
METHODS = (RPO, RPO_DIAGONAL)
