"""SFT head (spec §2.2): plain MSE over the kept rows (all rows, or the winners only)."""
import triton
import triton.language as tl

from .common import load_model_sums

SCALARS = ("loss",)
VECTORS = ()


@triton.jit
def sft_head(part_ptr, rows, splits, keep, inv_n, loss_ptr, stats_ptr, coef_ptr,
             ACC: tl.constexpr, NP: tl.constexpr, SP: tl.constexpr):
    offs = tl.arange(0, NP)
    spt = load_model_sums(part_ptr, 0, keep, rows, splits, NP, SP, ACC)
    loss = tl.sum(spt, axis=0) * inv_n / keep
    a = tl.where(offs < keep, 2.0 * inv_n / keep, 0.0)
    tl.store(coef_ptr + offs, a, mask=offs < rows)
    tl.store(loss_ptr, loss)
    tl.store(stats_ptr, loss)
