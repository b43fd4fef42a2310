"""Diffusion-DPO head (spec §2.1: sigmoid, hinge, ipo) and its temporal-discount variant
(§2.6, dense DPO: β scaled per pair by the timestep weight w(t))."""
import triton
import triton.language as tl

from .._math import sigmoid, softplus
from .common import (fraction, load_pair_sums, masked_mean, nan_of, pair_ell, pair_means, store_pair_coefs,
                     store_vector)

LOSS_TYPES = ("sigmoid", "hinge", "ipo")
SCALARS = ("loss", "implicit_acc", "implicit_acc_ties_half", "model_mse", "ref_mse",
           "model_mse_w", "model_mse_l", "ref_mse_w", "ref_mse_l")
VECTORS = ("inside_term",)
DENSE_SCALARS = ("loss", "implicit_acc", "step_weight_mean", "model_mse", "ref_mse")


@triton.jit
def dpo_terms(inside, ell, beta, valid, B, LOSS_TYPE: tl.constexpr):
    """(loss, μ_w = ∂loss/∂m_w per pair) of the DPO loss types; μ_l = -μ_w."""
    if LOSS_TYPE == 0:
        term = softplus(-inside)
        mu_w = beta * sigmoid(-inside) / (2 * B)
    elif LOSS_TYPE == 1:
        term = tl.maximum(1.0 - inside, 0.0) + nan_of(inside)     # maxNum would drop a NaN on the GPU
        mu_w = tl.where(inside < 1.0, beta / (2 * B), 0.0)
    else:
        gap = ell - 1.0 / beta
        term = gap * gap
        mu_w = -2.0 * gap / B
    return masked_mean(term, valid, B), mu_w


@triton.jit
def dpo_head(part_ptr, B, splits, inv_n, beta, loss_ptr, stats_ptr, coef_ptr,
             LOSS_TYPE: tl.constexpr, ACC: tl.constexpr, NP: tl.constexpr, SP: tl.constexpr):
    spt_w, srt_w, spr_w, sptr_w, smr_w, spt_l, srt_l, spr_l, sptr_l, smr_l = load_pair_sums(
        part_ptr, B, splits, NP, SP, ACC)
    valid = tl.arange(0, NP) < B
    ell = pair_ell(smr_w, smr_l, inv_n)    # Δref - Δθ
    inside = 0.5 * beta * ell
    loss, mu_w = dpo_terms(inside, ell, beta, valid, B, LOSS_TYPE)
    a_w = 2.0 * inv_n * mu_w
    store_pair_coefs(coef_ptr, B, a_w, -a_w, NP)

    model_w, model_l, ref_w, ref_l = pair_means(spt_w, spt_l, srt_w, srt_l, valid, B, inv_n)
    wins = fraction(inside > 0, valid, B, inside)
    tl.store(loss_ptr, loss)
    tl.store(stats_ptr + 0, loss)
    tl.store(stats_ptr + 1, wins)
    tl.store(stats_ptr + 2, wins + 0.5 * fraction(inside == 0, valid, B, inside))
    tl.store(stats_ptr + 3, 0.5 * (model_w + model_l))
    tl.store(stats_ptr + 4, 0.5 * (ref_w + ref_l))
    tl.store(stats_ptr + 5, model_w)
    tl.store(stats_ptr + 6, model_l)
    tl.store(stats_ptr + 7, ref_w)
    tl.store(stats_ptr + 8, ref_l)
    store_vector(stats_ptr, 9, B, inside, NP)


@triton.jit
def step_weights(ts_ptr, ts_stride, B, gamma, steps, train_steps, scale, NP: tl.constexpr):
    """w(t_i) of spec §2.6 in float64: k = clamp(floor((T-1-t) K / T), 0, K-1), w = scale γ^k."""
    offs = tl.arange(0, NP)
    t = tl.load(ts_ptr + offs * ts_stride, mask=offs < B, other=0).to(tl.float64)
    T = train_steps.to(tl.float64)
    K = steps.to(tl.float64)
    k = tl.minimum(tl.maximum(tl.floor((T - 1.0 - t) * K / T), 0.0), K - 1.0)
    return scale.to(tl.float64) * tl.exp(k * tl.log(gamma.to(tl.float64)))


@triton.jit
def dense_dpo_head(part_ptr, B, splits, inv_n, beta, gamma, steps, train_steps, scale, ts_ptr, ts_stride,
                   loss_ptr, stats_ptr, coef_ptr, ACC: tl.constexpr, NP: tl.constexpr, SP: tl.constexpr):
    spt_w, srt_w, spr_w, sptr_w, smr_w, spt_l, srt_l, spr_l, sptr_l, smr_l = load_pair_sums(
        part_ptr, B, splits, NP, SP, ACC)
    valid = tl.arange(0, NP) < B
    w = step_weights(ts_ptr, ts_stride, B, gamma, steps, train_steps, scale, NP).to(ACC)
    ell = pair_ell(smr_w, smr_l, inv_n)
    inside = 0.5 * (beta * w) * ell     # with w == 1: dpo_head's operations, bit for bit
    loss, mu_w = dpo_terms(inside, ell, beta * w, valid, B, 0)
    a_w = 2.0 * inv_n * mu_w
    store_pair_coefs(coef_ptr, B, a_w, -a_w, NP)
    model_w, model_l, ref_w, ref_l = pair_means(spt_w, spt_l, srt_w, srt_l, valid, B, inv_n)
    tl.store(loss_ptr, loss)
    tl.store(stats_ptr + 0, loss)
    tl.store(stats_ptr + 1, fraction(inside > 0, valid, B, inside))
    tl.store(stats_ptr + 2, masked_mean(w, valid, B))
    tl.store(stats_ptr + 3, 0.5 * (model_w + model_l))
    tl.store(stats_ptr + 4, 0.5 * (ref_w + ref_l))
