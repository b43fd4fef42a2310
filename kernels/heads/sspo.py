"""SSPO / SePPO head (spec §2.5): rows B..2B-1 are self-samples; the criterion c (indicator or
sign of the winner anchor a = r_w - m_w) is computed from detached values and carries no
gradient."""
import triton
import triton.language as tl

from .._math import sigmoid, softplus
from .common import (fraction, load_pair_sums, masked_mean, nan_of, policy_minus_ref, store_pair_coefs,
                     store_vector)

CRITERIA = ("indicator", "sign")
SCALARS = ("loss", "dpo_fraction", "implicit_acc", "model_mse_w", "ref_mse_w")
VECTORS = ("criterion",)


@triton.jit
def sspo_head(part_ptr, B, splits, inv_n, beta, loss_ptr, stats_ptr, coef_ptr,
              CRITERION: tl.constexpr, ACC: tl.constexpr, NP: tl.constexpr, SP: tl.constexpr):
    spt_w, srt_w, spr_w, sptr_w, smr_w, spt_s, srt_s, spr_s, sptr_s, smr_s = load_pair_sums(
        part_ptr, B, splits, NP, SP, ACC)
    valid = tl.arange(0, NP) < B
    diff_w = policy_minus_ref(smr_w, inv_n)       # m_w - r_w = -a
    diff_s = policy_minus_ref(smr_s, inv_n)
    anchor = -diff_w
    if CRITERION == 0:
        c = tl.where(anchor > 0, 1.0, 0.0)
    else:
        c = tl.where(anchor > 0, 1.0, tl.where(anchor < 0, -1.0, 0.0))
    c += nan_of(anchor)                                   # NaN on a non-finite pair, not 0
    inside = -0.5 * beta * (diff_w - c * diff_s)
    loss = masked_mean(softplus(-inside), valid, B)
    mu_w = beta * sigmoid(-inside) / (2 * B)
    store_pair_coefs(coef_ptr, B, 2.0 * inv_n * mu_w, -2.0 * inv_n * c * mu_w, NP)
    tl.store(loss_ptr, loss)
    tl.store(stats_ptr + 0, loss)
    tl.store(stats_ptr + 1, fraction(c > 0, valid, B, inside))
    tl.store(stats_ptr + 2, fraction(inside > 0, valid, B, inside))
    tl.store(stats_ptr + 3, masked_mean(spt_w, valid, B) * inv_n)
    tl.store(stats_ptr + 4, masked_mean(srt_w, valid, B) * inv_n)
    store_vector(stats_ptr, 5, B, c, NP)
