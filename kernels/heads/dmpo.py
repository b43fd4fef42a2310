"""DMPO head (docs/methods.md §2.10): KL(Bernoulli(σ(inside)) || Bernoulli(q)), q = clamp(1 - α)."""

import triton
import triton.language as tl

from .._math import f64, sigmoid, softplus
from ..method import Hyper, Layout, Method
from .common import load_pair_sums, masked_mean, pair_ell, store_loss_acc_mse, store_pair_coefs


@triton.jit
def dmpo_terms(inside, beta, alpha, valid, B):
    """(loss, μ_w) with log p = -softplus(-inside), log(1-p) = -softplus(inside)."""
    q = tl.minimum(tl.maximum(1.0 - alpha, 1e-6), 1.0 - 1e-6)
    log_q = tl.log(q)
    log_1q = tl.log(1.0 - q)
    p = sigmoid(inside)
    p_c = sigmoid(-inside)
    log_p = -softplus(-inside)
    log_pc = -softplus(inside)
    term = p * (log_p - log_q) + p_c * (log_pc - log_1q)
    mu_w = -beta / (2 * B) * p * p_c * (inside - (log_q - log_1q))
    return masked_mean(term, valid, B), mu_w


@triton.jit
def dmpo_head(
    part_ptr,
    B,
    splits,
    inv_n,
    beta,
    alpha,
    loss_ptr,
    stats_ptr,
    coef_ptr,
    C: tl.constexpr,
    ACC: tl.constexpr,
    NP: tl.constexpr,
    SP: tl.constexpr,
):
    inv_n = f64(inv_n, ACC)
    beta = f64(beta, ACC)
    alpha = f64(alpha, ACC)
    spt_w, srt_w, _, _, smr_w, spt_l, srt_l, _, _, smr_l = load_pair_sums(part_ptr, B, splits, NP, SP, ACC)
    valid = tl.arange(0, NP) < B
    inside = 0.5 * beta * pair_ell(smr_w, smr_l, inv_n)
    loss, mu_w = dmpo_terms(inside, beta, alpha, valid, B)
    a_w = 2.0 * inv_n * mu_w
    store_pair_coefs(coef_ptr, B, a_w, -a_w, NP)
    store_loss_acc_mse(loss_ptr, stats_ptr, C, loss, inside, spt_w, spt_l, srt_w, srt_l, valid, B, inv_n)


DMPO = Method(
    "dmpo",
    "dmpo_loss",
    dmpo_head,
    Layout(("loss", "implicit_acc", "model_mse", "ref_mse")),
    hypers=(Hyper("beta", 2000.0, "positive_finite"), Hyper("alpha", 0.01, "finite")),
    presets=(("dmpo", {}),),
    loss_types=(("dmpo", "dmpo", "DMPO"),),
    description="DMPO",
    section="2.10",
)
METHODS = (DMPO,)
