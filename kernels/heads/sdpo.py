"""Diffusion-SDPO head (docs/methods.md §2.9): a DPO, DSPO or DMPO base whose loser-row gradients are
scaled by the safeguard λ = clamp((1 - μ) num / (den + eps), 0, max_scale) (max_scale when
den <= 0), from the winner/loser output-space gradient proxies of the local micro-batch. The
loss value is the base's exactly; λ is a constant."""

import triton
import triton.language as tl

from .._math import f64
from ..method import Hyper, Layout, Method, Option
from .common import (
    S_WL,
    load_pair_sums,
    load_sum,
    masked_mean,
    nan_of,
    pair_ell,
    policy_minus_ref,
    store_int,
    store_loss_acc_mse,
    store_pair_b,
    store_pair_coefs,
    store_scalar,
    store_vector,
)
from .dmpo import dmpo_terms
from .dpo import dpo_terms
from .dspo import DSPO, dspo_terms


@triton.jit
def sdpo_head(
    part_ptr,
    B,
    splits,
    inv_n,
    beta,
    mu,
    eps,
    max_scale,
    sdxl_threshold,
    dmpo_alpha,
    loss_ptr,
    stats_ptr,
    ints_ptr,
    coef_ptr,
    C: tl.constexpr,
    ACC: tl.constexpr,
    NP: tl.constexpr,
    SP: tl.constexpr,
):
    """C.base ("dpo", "dspo" or "dmpo"), C.dspo_variant, C.safeguard (False: λ = 1)."""
    inv_n = f64(inv_n, ACC)
    beta = f64(beta, ACC)
    mu = f64(mu, ACC)
    eps = f64(eps, ACC)
    max_scale = f64(max_scale, ACC)
    threshold = f64(sdxl_threshold, ACC)
    alpha = f64(dmpo_alpha, ACC)
    spt_w, srt_w, spr_w, sptr_w, smr_w, spt_l, srt_l, _, _, smr_l = load_pair_sums(part_ptr, B, splits, NP, SP, ACC)
    s_wl = load_sum(part_ptr, S_WL, 0, B, 2 * B, splits, NP, SP, ACC) + nan_of(spt_w)  # the pair's NaN
    valid = tl.arange(0, NP) < B
    diff_w = policy_minus_ref(smr_w, inv_n)
    diff_l = policy_minus_ref(smr_l, inv_n)
    ell = pair_ell(smr_w, smr_l, inv_n)  # Δref - Δθ
    inside = 0.5 * beta * ell
    if C.base == "dpo":
        loss, mu_w = dpo_terms(inside, ell, beta, valid, B, "sigmoid")
        a_w = 2.0 * inv_n * mu_w
        a_l = -a_w
        branch = 0
        store_pair_b(coef_ptr, B, tl.zeros_like(a_w), NP)
    elif C.base == "dmpo":
        loss, mu_w = dmpo_terms(inside, beta, alpha, valid, B)
        a_w = 2.0 * inv_n * mu_w
        a_l = -a_w
        branch = 0
        store_pair_b(coef_ptr, B, tl.zeros_like(a_w), NP)
    else:
        loss, a_w, a_l, b_w, branch, _ = dspo_terms(
            inside, spt_w, spr_w, sptr_w, beta, threshold, inv_n, valid, B, C.dspo_variant
        )
        store_pair_b(coef_ptr, B, b_w, NP)

    scale = 4.0 * inv_n * inv_n / (B * B)  # 4 / K^2 with K = B n, in floating point
    num = tl.sum(spt_w, axis=0) * scale
    den = tl.sum(s_wl, axis=0) * scale
    s_ll = tl.sum(spt_l, axis=0) * scale
    if C.safeguard:
        ratio = (1.0 - mu) * num / tl.where(den > 0, den + eps, 1.0)
        lam = tl.where(den > 0, tl.minimum(tl.maximum(ratio, 0.0), max_scale), max_scale)
        lam += nan_of(num) + nan_of(den)  # a non-finite pair: NaN, not max_scale
    else:
        lam = tl.full([], 1.0, ACC)
    store_pair_coefs(coef_ptr, B, a_w, lam * a_l, NP)

    store_loss_acc_mse(loss_ptr, stats_ptr, C, loss, inside, spt_w, spt_l, srt_w, srt_l, valid, B, inv_n)
    store_scalar(stats_ptr, C, "win_diff", masked_mean(diff_w, valid, B))
    store_scalar(stats_ptr, C, "lose_diff", masked_mean(diff_l, valid, B))
    store_scalar(stats_ptr, C, "loser_grad_scale", lam)
    store_scalar(stats_ptr, C, "safeguard_num", num)
    store_scalar(stats_ptr, C, "safeguard_den", den)
    store_scalar(stats_ptr, C, "safeguard_proxy_grad_cos", den / tl.sqrt(num * s_ll))
    store_vector(stats_ptr, C, "inside_term", B, inside, NP)
    store_int(ints_ptr, C, "dspo_branch", branch)


SDPO = Method(
    "sdpo",
    "sdpo_loss",
    sdpo_head,
    Layout(
        (
            "loss",
            "implicit_acc",
            "model_mse",
            "ref_mse",
            "win_diff",
            "lose_diff",
            "loser_grad_scale",
            "safeguard_num",
            "safeguard_den",
            "safeguard_proxy_grad_cos",
        ),
        vectors=("inside_term",),
        ints=("dspo_branch",),
    ),
    hypers=(
        Hyper("beta", 5000.0, "positive_finite"),
        Hyper("mu", 0.9, "unit_interval"),
        Hyper("eps", 1e-9, "nonnegative"),
        Hyper("max_scale", 1.0, "nonnegative"),
        Hyper("sdxl_threshold", 0.1, "finite"),
        Hyper("dmpo_alpha", 0.01, "finite"),
        Hyper("safeguard", True, "bool", head=False),
    ),
    options=(
        Option("base", ("dpo", "dspo", "dmpo")),
        Option("dspo_variant", DSPO.options[0].choices),
        Option("safeguard", (True, False), public=False),
    ),
    has_b=True,
    cross=True,
    presets=(
        ("sdpo", {}),
        ("sdpo_off", {"safeguard": False}),
        ("sdpo_dspo_sd15", {"base": "dspo"}),
        ("sdpo_dspo_sdxl", {"base": "dspo", "dspo_variant": "sdxl"}),
        ("sdpo_dmpo", {"base": "dmpo"}),
    ),
    loss_types=(("sdpo", "sdpo", "Diffusion-SDPO: DPO with the safeguarded loser gradient"),),
    description="Diffusion-SDPO",
    section="2.9",
)
METHODS = (SDPO,)
