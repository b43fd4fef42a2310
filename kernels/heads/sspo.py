"""SSPO / SePPO head (docs/methods.md §2.5): rows B..2B-1 are self-samples; the criterion c (indicator or
sign of the winner anchor a = r_w - m_w) is computed from detached values and carries no
gradient."""

import triton
import triton.language as tl

from .._math import f64, sigmoid, softplus
from ..method import Hyper, Layout, Method, Option
from .common import (
    fraction,
    load_pair_sums,
    masked_mean,
    nan_of,
    policy_minus_ref,
    store_pair_coefs,
    store_scalar,
    store_vector,
)


@triton.jit
def sspo_head(
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
    # S_pr and S_ptr of both rows and S_pt, S_rt of the self-sample are not read, but loaded all the
    # same: a non-finite one makes the pair NaN (the non-finite rule, `common.load_row_sums`).
    spt_w, srt_w, _, _, smr_w, _, _, _, _, smr_s = load_pair_sums(part_ptr, B, splits, NP, SP, ACC)
    valid = tl.arange(0, NP) < B
    diff_w = policy_minus_ref(smr_w, inv_n)  # m_w - r_w = -a
    diff_s = policy_minus_ref(smr_s, inv_n)
    anchor = -diff_w
    if C.criterion == "indicator":
        c = tl.where(anchor > 0, 1.0, 0.0)
    else:
        c = tl.where(anchor > 0, 1.0, tl.where(anchor < 0, -1.0, 0.0))
    c += nan_of(anchor)  # NaN on a non-finite pair, not 0
    inside = -0.5 * beta * (diff_w - c * diff_s)
    loss = masked_mean(softplus(-inside), valid, B)
    mu_w = beta * sigmoid(-inside) / (2 * B)
    store_pair_coefs(coef_ptr, B, 2.0 * inv_n * mu_w, -2.0 * inv_n * c * mu_w, NP)
    tl.store(loss_ptr, loss)
    store_scalar(stats_ptr, C, "loss", loss)
    store_scalar(stats_ptr, C, "dpo_fraction", fraction(c > 0, valid, B, inside))
    store_scalar(stats_ptr, C, "implicit_acc", fraction(inside > 0, valid, B, inside))
    store_scalar(stats_ptr, C, "model_mse_w", masked_mean(spt_w, valid, B) * inv_n)
    store_scalar(stats_ptr, C, "ref_mse_w", masked_mean(srt_w, valid, B) * inv_n)
    store_vector(stats_ptr, C, "criterion", B, c, NP)


SSPO = Method(
    "sspo",
    "sspo_loss",
    sspo_head,
    Layout(("loss", "dpo_fraction", "implicit_acc", "model_mse_w", "ref_mse_w"), vectors=("criterion",)),
    hypers=(Hyper("beta", 5000.0, "positive_finite"),),
    options=(Option("criterion", ("indicator", "sign")),),
    presets=(("sspo", {}), ("sspo_sign", {"criterion": "sign"})),
    loss_types=(
        ("sspo", "sspo", "SSPO: winners vs self-samples of a replayed checkpoint, which is also the reference"),
    ),
    data="winners",
    description="SSPO / SePPO",
    section="2.5",
)
METHODS = (SSPO,)
