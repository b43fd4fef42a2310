"""DSPO head (docs/methods.md §2.3): sd15 and sdxl variants; the sdxl branch is chosen on the device.

With g = σ(-inside) carrying gradient, sd15 is mean_i (S_pt - 2βg S_ptr + β²g² S_pr)/n on the
winner rows; sdxl takes mean_i g² S_pr/n (branch 1, q >= threshold) or mean_i g² (branch 2),
q = mean_i S_pr,i/n. Both branches are computed and one is selected with tl.where, so a
non-finite value in the unused branch cannot leak."""

import triton
import triton.language as tl

from .._math import f64, sigmoid
from ..method import Hyper, Layout, Method, Option
from .common import (
    load_pair_sums,
    masked_mean,
    pair_ell,
    store_int,
    store_loss_acc_mse,
    store_pair_b,
    store_pair_coefs,
    store_scalar,
)


@triton.jit
def dspo_terms(inside, spt_w, spr_w, sptr_w, beta, threshold, inv_n, valid, B, VARIANT: tl.constexpr):
    """(loss, a_w, a_l, b_w, branch, g) of DSPO: row coefficients of winners and losers."""
    g = sigmoid(-inside)
    g_c = sigmoid(inside)  # 1 - g, formed directly
    if VARIANT == "sd15":
        term = (spt_w - 2.0 * beta * g * sptr_w + beta * beta * g * g * spr_w) * inv_n
        loss = masked_mean(term, valid, B)
        kappa = beta * beta * inv_n / B * g * g_c * (beta * g * spr_w - sptr_w)
        a_w = 2.0 * inv_n / B * (1.0 - beta * g) + 2.0 * inv_n * kappa
        b_w = -2.0 * inv_n / B * beta * g * (1.0 - beta * g)
        branch = 0
    else:
        q = masked_mean(spr_w, valid, B) * inv_n
        first = q >= threshold
        loss = tl.where(first, masked_mean(g * g * spr_w, valid, B) * inv_n, masked_mean(g * g, valid, B))
        kappa = tl.where(first, beta * inv_n / B * g * g * g_c * spr_w, beta * g * g * g_c / B)
        a_w = 2.0 * inv_n * kappa
        b_w = tl.where(first, 2.0 * inv_n / B * g * g, 0.0)
        branch = tl.where(first, 1, 2)
    return loss, a_w, -2.0 * inv_n * kappa, b_w, branch, g


@triton.jit
def dspo_head(
    part_ptr,
    B,
    splits,
    inv_n,
    beta,
    sdxl_threshold,
    loss_ptr,
    stats_ptr,
    ints_ptr,
    coef_ptr,
    C: tl.constexpr,
    ACC: tl.constexpr,
    NP: tl.constexpr,
    SP: tl.constexpr,
):
    inv_n = f64(inv_n, ACC)
    beta = f64(beta, ACC)
    threshold = f64(sdxl_threshold, ACC)
    spt_w, srt_w, spr_w, sptr_w, smr_w, spt_l, srt_l, _, _, smr_l = load_pair_sums(part_ptr, B, splits, NP, SP, ACC)
    valid = tl.arange(0, NP) < B
    inside = 0.5 * beta * pair_ell(smr_w, smr_l, inv_n)
    loss, a_w, a_l, b_w, branch, g = dspo_terms(
        inside, spt_w, spr_w, sptr_w, beta, threshold, inv_n, valid, B, C.variant
    )
    store_pair_coefs(coef_ptr, B, a_w, a_l, NP)
    store_pair_b(coef_ptr, B, b_w, NP)
    store_loss_acc_mse(loss_ptr, stats_ptr, C, loss, inside, spt_w, spt_l, srt_w, srt_l, valid, B, inv_n)
    store_scalar(stats_ptr, C, "weight_mean", masked_mean(g, valid, B))
    store_int(ints_ptr, C, "sdxl_branch", branch)


DSPO = Method(
    "dspo",
    "dspo_loss",
    dspo_head,
    Layout(("loss", "implicit_acc", "model_mse", "ref_mse", "weight_mean"), ints=("sdxl_branch",)),
    hypers=(Hyper("beta", 0.001, "positive_finite"), Hyper("sdxl_threshold", 0.1, "finite")),
    options=(Option("variant", ("sd15", "sdxl")),),
    has_b=True,
    presets=(("dspo_sd15", {"variant": "sd15"}), ("dspo_sdxl", {"variant": "sdxl"})),
    loss_types=(
        ("dspo", "dspo_sd15", "DSPO, SD1.5 variant"),
        ("dspo_sdxl", "dspo_sdxl", "DSPO, SDXL variant (the official SDXL launcher passes --beta 5000)"),
    ),
    description="DSPO",
    section="2.3",
)
METHODS = (DSPO,)
