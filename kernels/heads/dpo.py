"""Diffusion-DPO head (docs/methods.md §2.1: sigmoid, hinge, ipo) and its temporal-discount variant
(§2.6, dense DPO: β scaled per pair by the timestep weight w(t))."""

import triton
import triton.language as tl

from .._math import f64, sigmoid, softplus
from ..method import Hyper, Layout, Method, Option
from .common import (
    fraction,
    load_pair_sums,
    masked_mean,
    nan_of,
    pair_ell,
    pair_means,
    store_pair_coefs,
    store_scalar,
    store_vector,
)


@triton.jit
def dpo_terms(inside, ell, beta, valid, B, LOSS_TYPE: tl.constexpr):
    """(loss, μ_w = ∂loss/∂m_w per pair) of the DPO loss types; μ_l = -μ_w."""
    if LOSS_TYPE == "sigmoid":
        term = softplus(-inside)
        mu_w = beta * sigmoid(-inside) / (2 * B)
    elif LOSS_TYPE == "hinge":
        term = tl.maximum(1.0 - inside, 0.0) + nan_of(inside)  # maxNum would drop a NaN on the GPU
        mu_w = tl.where(inside < 1.0, beta / (2 * B), 0.0)
    else:
        gap = ell - 1.0 / beta
        term = gap * gap
        mu_w = -2.0 * gap / B
    return masked_mean(term, valid, B), mu_w


@triton.jit
def dpo_head(
    part_ptr,
    B,
    splits,
    inv_n,
    beta,
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
    spt_w, srt_w, _, _, smr_w, spt_l, srt_l, _, _, smr_l = load_pair_sums(part_ptr, B, splits, NP, SP, ACC)
    valid = tl.arange(0, NP) < B
    ell = pair_ell(smr_w, smr_l, inv_n)  # Δref - Δθ
    inside = 0.5 * beta * ell
    loss, mu_w = dpo_terms(inside, ell, beta, valid, B, C.loss_type)
    a_w = 2.0 * inv_n * mu_w
    store_pair_coefs(coef_ptr, B, a_w, -a_w, NP)

    model_w, model_l, ref_w, ref_l = pair_means(spt_w, spt_l, srt_w, srt_l, valid, B, inv_n)
    wins = fraction(inside > 0, valid, B, inside)
    tl.store(loss_ptr, loss)
    store_scalar(stats_ptr, C, "loss", loss)
    store_scalar(stats_ptr, C, "implicit_acc", wins)
    store_scalar(stats_ptr, C, "implicit_acc_ties_half", wins + 0.5 * fraction(inside == 0, valid, B, inside))
    store_scalar(stats_ptr, C, "model_mse", 0.5 * (model_w + model_l))
    store_scalar(stats_ptr, C, "ref_mse", 0.5 * (ref_w + ref_l))
    store_scalar(stats_ptr, C, "model_mse_w", model_w)
    store_scalar(stats_ptr, C, "model_mse_l", model_l)
    store_scalar(stats_ptr, C, "ref_mse_w", ref_w)
    store_scalar(stats_ptr, C, "ref_mse_l", ref_l)
    store_vector(stats_ptr, C, "inside_term", B, inside, NP)


@triton.jit
def step_weights(ts_ptr, ts_stride, B, gamma, steps, train_steps, scale, NP: tl.constexpr):
    """w(t_i) of docs/methods.md §2.6 in float64: k = clamp(floor((T-1-t) K / T), 0, K-1), w = scale γ^k."""
    offs = tl.arange(0, NP)
    t = tl.load(ts_ptr + offs * ts_stride, mask=offs < B, other=0).to(tl.float64)
    T = train_steps.to(tl.float64)
    K = steps.to(tl.float64)
    k = tl.minimum(tl.maximum(tl.floor((T - 1.0 - t) * K / T), 0.0), K - 1.0)
    return scale.to(tl.float64) * tl.exp(k * tl.log(gamma.to(tl.float64)))


@triton.jit
def dense_dpo_head(
    part_ptr,
    B,
    splits,
    inv_n,
    beta,
    gamma,
    num_inference_steps,
    num_train_timesteps,
    weight_scale,
    timesteps,
    timesteps_strides,
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
    # The step weights are evaluated in float64 whatever the compute dtype (docs/methods.md §2.6).
    gamma = f64(gamma, tl.float64)
    steps = f64(num_inference_steps, tl.float64)
    train_steps = f64(num_train_timesteps, tl.float64)
    scale = f64(weight_scale, tl.float64)
    spt_w, srt_w, _, _, smr_w, spt_l, srt_l, _, _, smr_l = load_pair_sums(part_ptr, B, splits, NP, SP, ACC)
    valid = tl.arange(0, NP) < B
    w = step_weights(timesteps, timesteps_strides[0], B, gamma, steps, train_steps, scale, NP).to(ACC)
    ell = pair_ell(smr_w, smr_l, inv_n)
    inside = 0.5 * (beta * w) * ell  # with w == 1: dpo_head's operations, bit for bit
    loss, mu_w = dpo_terms(inside, ell, beta * w, valid, B, "sigmoid")
    a_w = 2.0 * inv_n * mu_w
    store_pair_coefs(coef_ptr, B, a_w, -a_w, NP)
    model_w, model_l, ref_w, ref_l = pair_means(spt_w, spt_l, srt_w, srt_l, valid, B, inv_n)
    tl.store(loss_ptr, loss)
    store_scalar(stats_ptr, C, "loss", loss)
    store_scalar(stats_ptr, C, "implicit_acc", fraction(inside > 0, valid, B, inside))
    store_scalar(stats_ptr, C, "step_weight_mean", masked_mean(w, valid, B))
    store_scalar(stats_ptr, C, "model_mse", 0.5 * (model_w + model_l))
    store_scalar(stats_ptr, C, "ref_mse", 0.5 * (ref_w + ref_l))


DPO = Method(
    "dpo",
    "diffusion_dpo_loss",
    dpo_head,
    Layout(
        (
            "loss",
            "implicit_acc",
            "implicit_acc_ties_half",
            "model_mse",
            "ref_mse",
            "model_mse_w",
            "model_mse_l",
            "ref_mse_w",
            "ref_mse_l",
        ),
        vectors=("inside_term",),
    ),
    hypers=(Hyper("beta", 5000.0, "positive_finite"),),
    options=(Option("loss_type", ("sigmoid", "hinge", "ipo")),),
    presets=(
        ("dpo_sigmoid", {"loss_type": "sigmoid"}),
        ("dpo_hinge", {"loss_type": "hinge"}),
        ("dpo_ipo", {"loss_type": "ipo"}),
    ),
    loss_types=(
        ("dpo", "dpo_sigmoid", "Diffusion-DPO, sigmoid (the paper's loss)"),
        ("dpo_hinge", "dpo_hinge", "Diffusion-DPO, hinge"),
        ("dpo_ipo", "dpo_ipo", "Diffusion-DPO, IPO"),
    ),
    aliases=("diffusion_dpo",),
    description="Diffusion-DPO",
    section="2.1",
)

DENSE_DPO = Method(
    "dense_dpo",
    "dense_dpo_loss",
    dense_dpo_head,
    Layout(("loss", "implicit_acc", "step_weight_mean", "model_mse", "ref_mse")),
    hypers=(
        Hyper("beta", 5000.0, "positive_finite"),
        Hyper("gamma", 0.9, "open_unit_interval"),
        Hyper("num_inference_steps", 50, "positive_int"),
        Hyper("num_train_timesteps", 1000, "positive_int"),
        Hyper("normalize", True, "bool", head=False),
    ),
    inputs=("timesteps",),
    presets=(("dense_dpo", {}),),
    loss_types=(
        (
            "dense_dpo",
            "dense_dpo",
            "Diffusion-DPO with the dense-reward temporal discount (gamma 0.9, 50 sampler steps)",
        ),
    ),
    description="Diffusion-DPO with the dense-reward temporal discount",
    section="2.6",
)
METHODS = (DPO, DENSE_DPO)
