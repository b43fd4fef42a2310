"""Diffusion-DPO head (spec §2.1): sigmoid, hinge and ipo losses on the paired sums."""
import triton
import triton.language as tl

from .._math import sigmoid, softplus
from .common import load_pair_sums, masked_mean, store_pair_coefs, store_vector

LOSS_TYPES = ("sigmoid", "hinge", "ipo")
SCALARS = ("loss", "implicit_acc", "implicit_acc_ties_half", "model_mse", "ref_mse",
           "model_mse_w", "model_mse_l", "ref_mse_w", "ref_mse_l")
VECTORS = ("inside_term",)


@triton.jit
def dpo_head(part_ptr, B, splits, inv_n, beta, loss_ptr, stats_ptr, coef_ptr,
             LOSS_TYPE: tl.constexpr, ACC: tl.constexpr, NP: tl.constexpr, SP: tl.constexpr):
    spt_w, srt_w, spr_w, sptr_w, spt_l, srt_l, spr_l, sptr_l = load_pair_sums(part_ptr, B, splits, NP, SP, ACC)
    valid = tl.arange(0, NP) < B
    # m - r = (2 S_ptr - S_pr) / n: no cancellation of the large, nearly equal S_pt and S_rt.
    ell = ((2.0 * sptr_l - spr_l) - (2.0 * sptr_w - spr_w)) * inv_n     # Δref - Δθ
    inside = 0.5 * beta * ell
    if LOSS_TYPE == 0:
        term = softplus(-inside)
        mu_w = beta * sigmoid(-inside) / (2 * B)
    elif LOSS_TYPE == 1:
        term = tl.maximum(1.0 - inside, 0.0)
        mu_w = tl.where(inside < 1.0, beta / (2 * B), 0.0)
    else:
        gap = ell - 1.0 / beta
        term = gap * gap
        mu_w = -2.0 * gap / B
    loss = masked_mean(term, valid, B)
    a_w = 2.0 * inv_n * mu_w
    store_pair_coefs(coef_ptr, B, a_w, -a_w, NP)

    model_w = masked_mean(spt_w, valid, B) * inv_n
    model_l = masked_mean(spt_l, valid, B) * inv_n
    ref_w = masked_mean(srt_w, valid, B) * inv_n
    ref_l = masked_mean(srt_l, valid, B) * inv_n
    wins = masked_mean(tl.where(inside > 0, 1.0, 0.0), valid, B)
    ties = masked_mean(tl.where(inside == 0, 1.0, 0.0), valid, B)
    tl.store(loss_ptr, loss)
    tl.store(stats_ptr + 0, loss)
    tl.store(stats_ptr + 1, wins)
    tl.store(stats_ptr + 2, wins + 0.5 * ties)
    tl.store(stats_ptr + 3, 0.5 * (model_w + model_l))
    tl.store(stats_ptr + 4, 0.5 * (ref_w + ref_l))
    tl.store(stats_ptr + 5, model_w)
    tl.store(stats_ptr + 6, model_l)
    tl.store(stats_ptr + 7, ref_w)
    tl.store(stats_ptr + 8, ref_l)
    store_vector(stats_ptr, 9, B, inside, NP)
