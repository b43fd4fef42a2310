"""Diffusion-KTO head (docs/methods.md §2.7): unpaired rows with labels; x_k = s_k β (g_k - z),
g = r - m, z = max(0, mean g) (detached) or a given baseline."""

import triton
import triton.language as tl

from .._math import f64, sigmoid
from ..method import Hyper, Layout, Method, Option
from .common import fraction, load_row_sums, masked_mean, nan_of, policy_minus_ref, store_scalar


@triton.jit
def kto_head(
    part_ptr,
    rows,
    splits,
    inv_n,
    beta,
    lambda_d,
    lambda_u,
    kl_value,
    labels,
    labels_strides,
    kl_tensor,
    loss_ptr,
    stats_ptr,
    coef_ptr,
    C: tl.constexpr,
    ACC: tl.constexpr,
    NP: tl.constexpr,
    SP: tl.constexpr,
):
    """C.kl_mode: "batch" (z from this batch), "value" (the float kl_value) or "tensor" (kl_tensor)."""
    inv_n = f64(inv_n, ACC)
    beta = f64(beta, ACC)
    lambda_d = f64(lambda_d, ACC)
    lambda_u = f64(lambda_u, ACC)
    kl_value = f64(kl_value, ACC)
    offs = tl.arange(0, NP)
    valid = offs < rows
    spt, _, _, _, smr = load_row_sums(part_ptr, 0, rows, rows, splits, NP, SP, ACC)
    g = -policy_minus_ref(smr, inv_n)  # r - m
    if C.kl_mode == "batch":
        mean_g = masked_mean(g, valid, rows)
        z = tl.maximum(mean_g, 0.0) + nan_of(mean_g)  # a NaN row: NaN (maxNum would drop it on the GPU)
    elif C.kl_mode == "value":
        z = kl_value
    else:
        z = tl.load(kl_tensor).to(ACC)
    desirable = tl.load(labels + offs * labels_strides[0], mask=valid, other=0).to(ACC) != 0
    s = tl.where(desirable, 1.0, -1.0)
    lam = tl.where(desirable, lambda_d, lambda_u)
    x = s * beta * (g - z)
    loss = masked_mean(lam * sigmoid(-x), valid, rows)
    mu = lam * s * beta * sigmoid(x) * sigmoid(-x) / rows
    tl.store(coef_ptr + offs, 2.0 * inv_n * mu, mask=valid)
    tl.store(loss_ptr, loss)
    store_scalar(stats_ptr, C, "loss", loss)
    store_scalar(stats_ptr, C, "kl", z)
    store_scalar(stats_ptr, C, "acc", fraction(x > 0, valid, rows, x))
    store_scalar(stats_ptr, C, "model_mse", masked_mean(spt, valid, rows) * inv_n)


KTO = Method(
    "kto",
    "kto_loss",
    kto_head,
    Layout(("loss", "kl", "acc", "model_mse")),
    hypers=(
        Hyper("beta", 1000.0, "positive_finite"),
        Hyper("lambda_d", 1.0, "nonnegative"),
        Hyper("lambda_u", 1.0, "nonnegative"),
        Hyper("kl_baseline", None, "none", head=False),
    ),
    options=(Option("kl_mode", ("batch", "value", "tensor"), public=False),),
    inputs=("labels", "kl_tensor"),
    paired=False,
    presets=(("kto", {}), ("kto_baseline", {"kl_baseline": 1e-3})),
    loss_types=(("kto", "kto", "Diffusion-KTO: every image a labelled row (unpaired)"),),
    data="images",
    description="Diffusion-KTO",
    section="2.7",
)
METHODS = (KTO,)
