"""MaPO head (docs/methods.md §2.8): reference-free; f(m) = h(s m), h(x) = x / expm1(x),
u = T (f(m_w) - f(m_l)), loss = mean m_w - β mean log σ(u)."""

import triton
import triton.language as tl

from .._math import f64, sigmoid, softplus
from ..method import Hyper, Layout, Method
from .common import fraction, load_model_sums, masked_mean, nan_of, poison_pairs, store_pair_coefs, store_scalar


@triton.jit
def h_and_slope(x, ACC: tl.constexpr):
    """(h(x), h'(x)) for x >= 0: a series near 0, log(u)/(u - 1) with u = e^x (accurate expm1)
    elsewhere, x e^-x beyond 40 (underflowing to 0); h' = h (1 - h - x) / x."""
    if ACC == tl.float64:
        small = 1e-4
    else:
        small = 0.1
    u = tl.exp(tl.minimum(x, 40.0))
    mid = tl.log(u) / tl.where(u == 1.0, 1.0, u - 1.0)
    h = tl.where(x > 40.0, x * tl.exp(-x), mid)
    x2 = x * x
    h = tl.where(x < small, 1.0 - 0.5 * x + x2 / 12.0 - x2 * x2 / 720.0, h)
    slope = h * (1.0 - h - x) / tl.where(x == 0.0, 1.0, x)
    slope = tl.where(x < small, -0.5 + x / 6.0 - x2 * x / 180.0, slope)
    # A NaN x fails every comparison above (and tl.minimum drops it on the GPU): carry it.
    return h + nan_of(x), slope + nan_of(x)


@triton.jit
def mapo_head(
    part_ptr,
    B,
    splits,
    inv_n,
    beta,
    snr_value,
    num_train_timesteps,
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
    snr = f64(snr_value, ACC)
    train_steps = f64(num_train_timesteps, ACC)
    valid = tl.arange(0, NP) < B
    m_w, m_l = poison_pairs(
        load_model_sums(part_ptr, 0, B, 2 * B, splits, NP, SP, ACC) * inv_n,
        load_model_sums(part_ptr, B, B, 2 * B, splits, NP, SP, ACC) * inv_n,
    )
    f_w, slope_w = h_and_slope(snr * m_w, ACC)
    f_l, slope_l = h_and_slope(snr * m_l, ACC)
    u = train_steps * (f_w - f_l)
    or_loss = beta * masked_mean(softplus(-u), valid, B)
    model_w = masked_mean(m_w, valid, B)
    loss = model_w + or_loss
    pull = beta * train_steps / B * sigmoid(-u)
    mu_w = (1.0 - pull * snr * slope_w * B) / B  # 1/B in the compute dtype
    mu_l = pull * snr * slope_l
    store_pair_coefs(coef_ptr, B, 2.0 * inv_n * mu_w, 2.0 * inv_n * mu_l, NP)
    tl.store(loss_ptr, loss)
    store_scalar(stats_ptr, C, "loss", loss)
    store_scalar(stats_ptr, C, "win_score", masked_mean(f_w, valid, B))
    store_scalar(stats_ptr, C, "lose_score", masked_mean(f_l, valid, B))
    store_scalar(stats_ptr, C, "or_loss", or_loss)
    store_scalar(stats_ptr, C, "model_mse_w", model_w)
    store_scalar(stats_ptr, C, "model_mse_l", masked_mean(m_l, valid, B))
    store_scalar(stats_ptr, C, "margin_acc", fraction(f_w > f_l, valid, B, u))


MAPO = Method(
    "mapo",
    "mapo_loss",
    mapo_head,
    Layout(("loss", "win_score", "lose_score", "or_loss", "model_mse_w", "model_mse_l", "margin_acc")),
    hypers=(
        Hyper("beta", 0.1, "positive_finite"),
        Hyper("snr_value", 0.5, "positive_finite"),
        Hyper("num_train_timesteps", 1000, "positive_int"),
    ),
    needs_ref=False,
    presets=(("mapo", {}),),
    loss_types=(("mapo", "mapo", "MaPO (reference-free: no reference forward)"),),
    description="MaPO",
    section="2.8",
)
METHODS = (MAPO,)
