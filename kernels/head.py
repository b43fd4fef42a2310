"""Pass 2 of the fused family: one single-program kernel that runs a method's head on the
per-row sums and writes the loss, the metrics and the per-row gradient coefficients.

Every method is a `Head` (its metric layout) plus a branch of `_head_kernel` chosen by the
constexpr METHOD, so a new method is a new head, not a new kernel family.
"""
import dataclasses

import torch
import triton
import triton.language as tl

from . import _runtime
from ._math import f64
from .heads import dpo, dspo, sft
from .heads.dpo import dpo_head
from .heads.dspo import dspo_head
from .heads.sft import sft_head


@dataclasses.dataclass(frozen=True)
class Head:
    """Metric layout of one method: 0-dim `scalars` (loss first), then [B] `vectors`, all in
    the stats buffer; integer metrics in their own buffer."""
    name: str
    method_id: int
    scalars: tuple
    vectors: tuple = ()
    ints: tuple = ()
    paired: bool = True
    needs_ref: bool = True
    has_b: bool = False

    def stats_size(self, pairs):
        return len(self.scalars) + len(self.vectors) * pairs

    def unpack(self, stats, ints, pairs):
        """Metric dict of views into the stats/ints buffers (no copies, no launches)."""
        out = {name: stats[i] for i, name in enumerate(self.scalars)}
        base = len(self.scalars)
        for v, name in enumerate(self.vectors):
            out[name] = stats[base + v * pairs: base + (v + 1) * pairs]
        for i, name in enumerate(self.ints):
            out[name] = ints[i]
        return out


HEADS = {
    "dpo": Head("dpo", 0, dpo.SCALARS, dpo.VECTORS),
    "sft": Head("sft", 1, sft.SCALARS, paired=False, needs_ref=False),
    "dspo": Head("dspo", 2, dspo.SCALARS, ints=dspo.INTS, has_b=True),
}


@triton.jit
def _head_kernel(
    part_ptr, rows, B, splits,
    inv_n_hi, inv_n_lo, h0_hi, h0_lo, h1_hi, h1_lo,
    loss_ptr, stats_ptr, ints_ptr, coef_ptr,
    METHOD: tl.constexpr, VARIANT: tl.constexpr, ACC: tl.constexpr, NP: tl.constexpr, SP: tl.constexpr,
):
    inv_n = f64(inv_n_hi, inv_n_lo, ACC)
    h0 = f64(h0_hi, h0_lo, ACC)
    h1 = f64(h1_hi, h1_lo, ACC)
    if METHOD == 0:
        dpo_head(part_ptr, B, splits, inv_n, h0, loss_ptr, stats_ptr, coef_ptr, VARIANT, ACC, NP, SP)
    elif METHOD == 1:
        sft_head(part_ptr, rows, splits, B, inv_n, loss_ptr, stats_ptr, coef_ptr, ACC, NP, SP)
    elif METHOD == 2:
        dspo_head(part_ptr, B, splits, inv_n, h0, h1, loss_ptr, stats_ptr, ints_ptr, coef_ptr, VARIANT, ACC, NP, SP)


def run_head(head, partials, splits, rows, count, n, variant=0, hyper=()):
    """Launch `head` on the partial sums of `rows` rows of `n` elements.

    count: the number of pairs B for paired heads, the kept rows for row heads. hyper: up to
    two float hyperparameters, in the head's order. Returns (loss, stats, ints, coef): a 0-dim
    loss and the stats buffer in the accumulation dtype, int64 integer metrics, and the [2, R]
    gradient coefficients."""
    acc = partials.dtype
    device = partials.device
    pairs = count if head.paired else 0
    loss = _runtime.empty((), acc, device)
    stats = _runtime.empty((head.stats_size(pairs),), acc, device)
    ints = _runtime.empty((max(len(head.ints), 1),), torch.int64, device)
    coef = _runtime.empty((2, rows), acc, device)
    h = list(hyper) + [0.0] * (2 - len(hyper))
    _head_kernel[(1,)](
        partials, rows, count, splits,
        *_runtime.f64_pair(1.0 / n), *_runtime.f64_pair(h[0]), *_runtime.f64_pair(h[1]),
        loss, stats, ints, coef,
        METHOD=head.method_id, VARIANT=variant, ACC=_runtime.tl_dtype(acc),
        NP=_runtime.next_pow2(count if head.paired else rows), SP=_runtime.next_pow2(splits),
        num_warps=4,
    )
    return loss, stats, ints, coef
