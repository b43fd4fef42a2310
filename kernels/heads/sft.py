"""SFT head (docs/methods.md §2.2): plain MSE over the kept rows (all rows, or the winners only)."""

import triton
import triton.language as tl

from .._math import f64
from ..method import Hyper, Layout, Method
from .common import load_model_sums, store_scalar


@triton.jit
def sft_head(
    part_ptr,
    rows,
    splits,
    count,
    inv_n,
    loss_ptr,
    stats_ptr,
    coef_ptr,
    C: tl.constexpr,
    ACC: tl.constexpr,
    NP: tl.constexpr,
    SP: tl.constexpr,
):
    """count: the kept rows (all rows, or the winners 0..N/2-1)."""
    inv_n = f64(inv_n, ACC)
    keep = count
    offs = tl.arange(0, NP)
    spt = load_model_sums(part_ptr, 0, keep, rows, splits, NP, SP, ACC)
    loss = tl.sum(spt, axis=0) * inv_n / keep
    a = tl.where(offs < keep, 2.0 * inv_n / keep, 0.0)
    tl.store(coef_ptr + offs, a, mask=offs < rows)
    tl.store(loss_ptr, loss)
    store_scalar(stats_ptr, C, "loss", loss)


SFT = Method(
    "sft",
    "sft_loss",
    sft_head,
    Layout(("loss",)),
    hypers=(Hyper("winners_only", False, "bool", head=False),),
    paired=False,
    needs_ref=False,
    presets=(("sft", {}), ("sft_winners", {"winners_only": True})),
    loss_types=(("sft", "sft_winners", "supervised fine-tuning on the winners (no reference)"),),
    description="SFT baseline",
    section="2.2",
)
METHODS = (SFT,)
