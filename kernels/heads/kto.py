"""Diffusion-KTO head (spec §2.7): unpaired rows with labels; x_k = s_k β (g_k - z),
g = r - m, z = max(0, mean g) (detached) or a given baseline."""
import triton
import triton.language as tl

from .._math import sigmoid
from .common import fraction, load_row_sums, masked_mean, nan_of, policy_minus_ref

SCALARS = ("loss", "kl", "acc", "model_mse")


@triton.jit
def kto_head(part_ptr, rows, splits, inv_n, beta, lambda_d, lambda_u, kl_value, labels_ptr, labels_stride,
             kl_ptr, loss_ptr, stats_ptr, coef_ptr,
             KL_MODE: tl.constexpr, ACC: tl.constexpr, NP: tl.constexpr, SP: tl.constexpr):
    offs = tl.arange(0, NP)
    valid = offs < rows
    spt, srt, spr, sptr, smr = load_row_sums(part_ptr, 0, rows, rows, splits, NP, SP, ACC)
    g = -policy_minus_ref(smr, inv_n)                   # r - m
    if KL_MODE == 0:
        mean_g = masked_mean(g, valid, rows)
        z = tl.maximum(mean_g, 0.0) + nan_of(mean_g)    # a NaN row: NaN (maxNum would drop it on the GPU)
    elif KL_MODE == 1:
        z = kl_value
    else:
        z = tl.load(kl_ptr).to(ACC)
    desirable = tl.load(labels_ptr + offs * labels_stride, mask=valid, other=0).to(ACC) != 0
    s = tl.where(desirable, 1.0, -1.0)
    lam = tl.where(desirable, lambda_d, lambda_u)
    x = s * beta * (g - z)
    loss = masked_mean(lam * sigmoid(-x), valid, rows)
    mu = lam * s * beta * sigmoid(x) * sigmoid(-x) / rows
    tl.store(coef_ptr + offs, 2.0 * inv_n * mu, mask=valid)
    tl.store(loss_ptr, loss)
    tl.store(stats_ptr + 0, loss)
    tl.store(stats_ptr + 1, z)
    tl.store(stats_ptr + 2, fraction(x > 0, valid, rows, x))
    tl.store(stats_ptr + 3, masked_mean(spt, valid, rows) * inv_n)
