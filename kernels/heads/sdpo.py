"""Diffusion-SDPO head (spec §2.9): a DPO, DSPO or DMPO base whose loser-row gradients are
scaled by the safeguard λ = clamp((1 - μ) num / (den + eps), 0, max_scale) (max_scale when
den <= 0), from the winner/loser output-space gradient proxies of the local micro-batch. The
loss value is the base's exactly; λ is a constant."""
import triton
import triton.language as tl

from .common import (load_pair_sums, load_sum, masked_mean, nan_of, pair_ell, policy_minus_ref,
                     store_loss_acc_mse, store_pair_b, store_pair_coefs, store_vector)
from .dmpo import dmpo_terms
from .dpo import dpo_terms
from .dspo import dspo_terms

BASES = ("dpo", "dspo", "dmpo")
SCALARS = ("loss", "implicit_acc", "model_mse", "ref_mse", "win_diff", "lose_diff", "loser_grad_scale",
           "safeguard_num", "safeguard_den", "safeguard_proxy_grad_cos")
VECTORS = ("inside_term",)
INTS = ("dspo_branch",)


@triton.jit
def sdpo_head(part_ptr, B, splits, inv_n, beta, mu, eps, max_scale, threshold, alpha,
              loss_ptr, stats_ptr, ints_ptr, coef_ptr,
              BASE: tl.constexpr, SAFEGUARD: tl.constexpr, ACC: tl.constexpr, NP: tl.constexpr,
              SP: tl.constexpr):
    spt_w, srt_w, spr_w, sptr_w, smr_w, spt_l, srt_l, spr_l, sptr_l, smr_l = load_pair_sums(
        part_ptr, B, splits, NP, SP, ACC)
    s_wl = load_sum(part_ptr, 5, 0, B, 2 * B, splits, NP, SP, ACC) + nan_of(spt_w)    # the pair's NaN
    valid = tl.arange(0, NP) < B
    diff_w = policy_minus_ref(smr_w, inv_n)
    diff_l = policy_minus_ref(smr_l, inv_n)
    ell = pair_ell(smr_w, smr_l, inv_n)       # Δref - Δθ
    inside = 0.5 * beta * ell
    # BASE: 0 dpo, 1 dspo sd15, 2 dspo sdxl, 3 dmpo
    if BASE == 0:
        loss, mu_w = dpo_terms(inside, ell, beta, valid, B, 0)
        a_w = 2.0 * inv_n * mu_w
        a_l = -a_w
        branch = 0
        store_pair_b(coef_ptr, B, tl.zeros_like(a_w), NP)
    elif BASE == 3:
        loss, mu_w = dmpo_terms(inside, beta, alpha, valid, B)
        a_w = 2.0 * inv_n * mu_w
        a_l = -a_w
        branch = 0
        store_pair_b(coef_ptr, B, tl.zeros_like(a_w), NP)
    else:
        loss, a_w, a_l, b_w, branch, g = dspo_terms(inside, spt_w, spr_w, sptr_w, beta, threshold, inv_n,
                                                    valid, B, BASE - 1)
        store_pair_b(coef_ptr, B, b_w, NP)

    scale = 4.0 * inv_n * inv_n / (B * B)           # 4 / K^2 with K = B n, in floating point
    num = tl.sum(spt_w, axis=0) * scale
    den = tl.sum(s_wl, axis=0) * scale
    s_ll = tl.sum(spt_l, axis=0) * scale
    if SAFEGUARD:
        ratio = (1.0 - mu) * num / tl.where(den > 0, den + eps, 1.0)
        lam = tl.where(den > 0, tl.minimum(tl.maximum(ratio, 0.0), max_scale), max_scale)
        lam += nan_of(num) + nan_of(den)            # a non-finite pair: NaN, not max_scale
    else:
        lam = tl.full([], 1.0, ACC)
    store_pair_coefs(coef_ptr, B, a_w, lam * a_l, NP)

    store_loss_acc_mse(loss_ptr, stats_ptr, loss, inside, spt_w, spt_l, srt_w, srt_l, valid, B, inv_n)
    tl.store(stats_ptr + 4, masked_mean(diff_w, valid, B))
    tl.store(stats_ptr + 5, masked_mean(diff_l, valid, B))
    tl.store(stats_ptr + 6, lam)
    tl.store(stats_ptr + 7, num)
    tl.store(stats_ptr + 8, den)
    tl.store(stats_ptr + 9, den / tl.sqrt(num * s_ll))
    store_vector(stats_ptr, 10, B, inside, NP)
    tl.store(ints_ptr, branch)
