"""Pass 2 of the fused family: one single-program kernel that runs a method's head on the
per-row sums and writes the loss, the metrics and the per-row gradient coefficients.

Every method is a `Head` (its metric layout and what it reads) plus a branch of `_head_kernel`
chosen by the constexpr METHOD, so a new method is a new head, not a new kernel family.
"""
import dataclasses

import torch
import triton
import triton.language as tl

from . import _runtime
from ._math import f64
from .heads import dmpo, dpo, dspo, kto, mapo, rpo, sdpo, sft, sspo
from .heads.dmpo import dmpo_head
from .heads.dpo import dense_dpo_head, dpo_head
from .heads.dspo import dspo_head
from .heads.kto import kto_head
from .heads.mapo import mapo_head
from .heads.rpo import rpo_head
from .heads.sdpo import sdpo_head
from .heads.sft import sft_head
from .heads.sspo import sspo_head

NUM_HYPER = 6


@dataclasses.dataclass(frozen=True)
class Head:
    """Metric layout and inputs of one method. The stats buffer holds 0-dim `scalars` (loss
    first), then [B] `vectors`, then [B, B] `matrices`; integer metrics have their own buffer.
    paired: [2B, ...] rows (else unpaired [N, ...]); needs_ref: reads ref_pred; has_b: some
    rows have b != 0 (ref_pred is read in backward); cross: needs the per-pair S_wl sum."""
    name: str
    method_id: int
    scalars: tuple
    vectors: tuple = ()
    matrices: tuple = ()
    ints: tuple = ()
    paired: bool = True
    needs_ref: bool = True
    has_b: bool = False
    cross: bool = False

    def stats_size(self, pairs):
        return len(self.scalars) + len(self.vectors) * pairs + len(self.matrices) * pairs * pairs

    def unpack(self, stats, ints, pairs, drop=()):
        """Metric dict of views into the stats/ints buffers (no copies, no launches)."""
        base = len(self.scalars)
        out = dict(zip(self.scalars, stats[:base].unbind(0)))
        if self.vectors:
            size = len(self.vectors) * pairs
            out.update(zip(self.vectors, stats[base:base + size].view(len(self.vectors), pairs).unbind(0)))
            base += size
        if self.matrices:
            out.update(zip(self.matrices, stats[base:].view(len(self.matrices), pairs, pairs).unbind(0)))
        if self.ints:
            out.update(zip(self.ints, ints.unbind(0)))
        for key in drop:
            del out[key]
        return out


HEADS = {h.name: h for h in [
    Head("dpo", 0, dpo.SCALARS, dpo.VECTORS),
    Head("sft", 1, sft.SCALARS, paired=False, needs_ref=False),
    Head("dspo", 2, dspo.SCALARS, ints=dspo.INTS, has_b=True),
    Head("rpo", 3, rpo.SCALARS, matrices=rpo.MATRICES),
    Head("rpo_diagonal", 4, rpo.DIAGONAL_SCALARS),
    Head("sspo", 5, sspo.SCALARS, sspo.VECTORS),
    Head("dense_dpo", 6, dpo.DENSE_SCALARS),
    Head("kto", 7, kto.SCALARS, paired=False),
    Head("mapo", 8, mapo.SCALARS, needs_ref=False),
    Head("sdpo", 9, sdpo.SCALARS, sdpo.VECTORS, ints=sdpo.INTS, has_b=True, cross=True),
    Head("dmpo", 10, dmpo.SCALARS),
]}


@triton.jit
def _head_kernel(
    part_ptr, rows, B, splits,
    inv_n_hi, inv_n_lo,
    h0_hi, h0_lo, h1_hi, h1_lo, h2_hi, h2_lo, h3_hi, h3_lo, h4_hi, h4_lo, h5_hi, h5_lo,
    aux0_ptr, aux1_ptr, aux_len, a0s0, a0s1, a1s0, a1s1,
    loss_ptr, stats_ptr, ints_ptr, coef_ptr,
    METHOD: tl.constexpr, VARIANT: tl.constexpr, FLAG: tl.constexpr,
    ACC: tl.constexpr, NP: tl.constexpr, SP: tl.constexpr, DC: tl.constexpr,
):
    inv_n = f64(inv_n_hi, inv_n_lo, ACC)
    h0 = f64(h0_hi, h0_lo, ACC)
    h1 = f64(h1_hi, h1_lo, ACC)
    h2 = f64(h2_hi, h2_lo, ACC)
    h3 = f64(h3_hi, h3_lo, ACC)
    h4 = f64(h4_hi, h4_lo, ACC)
    h5 = f64(h5_hi, h5_lo, ACC)
    if METHOD == 0:
        dpo_head(part_ptr, B, splits, inv_n, h0, loss_ptr, stats_ptr, coef_ptr, VARIANT, ACC, NP, SP)
    elif METHOD == 1:
        sft_head(part_ptr, rows, splits, B, inv_n, loss_ptr, stats_ptr, coef_ptr, ACC, NP, SP)
    elif METHOD == 2:
        dspo_head(part_ptr, B, splits, inv_n, h0, h1, loss_ptr, stats_ptr, ints_ptr, coef_ptr, VARIANT, ACC, NP, SP)
    elif METHOD == 3:
        rpo_head(part_ptr, B, splits, inv_n, h0, h1, aux0_ptr, aux1_ptr, aux_len, a0s0, a0s1, a1s0, a1s1,
                 loss_ptr, stats_ptr, coef_ptr, False, FLAG, ACC, NP, SP, DC)
    elif METHOD == 4:
        rpo_head(part_ptr, B, splits, inv_n, h0, h1, aux0_ptr, aux1_ptr, aux_len, a0s0, a0s1, a1s0, a1s1,
                 loss_ptr, stats_ptr, coef_ptr, True, False, ACC, NP, SP, DC)
    elif METHOD == 5:
        sspo_head(part_ptr, B, splits, inv_n, h0, loss_ptr, stats_ptr, coef_ptr, VARIANT, ACC, NP, SP)
    elif METHOD == 6:
        # The step weights are evaluated in float64 whatever the compute dtype (spec §2.6).
        dense_dpo_head(part_ptr, B, splits, inv_n, h0, f64(h1_hi, h1_lo, tl.float64),
                       f64(h2_hi, h2_lo, tl.float64), f64(h3_hi, h3_lo, tl.float64),
                       f64(h4_hi, h4_lo, tl.float64), aux0_ptr, a0s0, loss_ptr, stats_ptr, coef_ptr, ACC, NP, SP)
    elif METHOD == 7:
        kto_head(part_ptr, rows, splits, inv_n, h0, h1, h2, h3, aux0_ptr, a0s0, aux1_ptr,
                 loss_ptr, stats_ptr, coef_ptr, VARIANT, ACC, NP, SP)
    elif METHOD == 8:
        mapo_head(part_ptr, B, splits, inv_n, h0, h1, h2, loss_ptr, stats_ptr, coef_ptr, ACC, NP, SP)
    elif METHOD == 9:
        sdpo_head(part_ptr, B, splits, inv_n, h0, h1, h2, h3, h4, h5, loss_ptr, stats_ptr, ints_ptr, coef_ptr,
                  VARIANT, FLAG, ACC, NP, SP)
    elif METHOD == 10:
        dmpo_head(part_ptr, B, splits, inv_n, h0, h1, loss_ptr, stats_ptr, coef_ptr, ACC, NP, SP)


def run_head(head, partials, splits, rows, count, n, variant=0, hyper=(), aux=(), flag=False):
    """Launch `head` on the partial sums of `rows` rows of `n` elements.

    count: the number of pairs B for paired heads, the rows N (or kept rows) for row heads.
    hyper: up to six float hyperparameters, in the head's order. aux: up to two extra tensors
    the head reads (embeddings, timesteps, labels, a baseline), 1-D or 2-D. Returns (loss,
    stats, ints, coef): a 0-dim loss and the stats buffer in the accumulation dtype, int64
    integer metrics, and the [2, R] gradient coefficients."""
    acc = partials.dtype
    device = partials.device
    pairs = count if head.paired else 0
    loss = _runtime.empty((), acc, device)
    stats = _runtime.empty((head.stats_size(pairs),), acc, device)
    ints = _runtime.empty((max(len(head.ints), 1),), torch.int64, device)
    coef = _runtime.empty((2, rows), acc, device)
    scalars = []
    for value in tuple(hyper) + (0.0,) * (NUM_HYPER - len(hyper)):
        scalars.extend(_runtime.f64_pair(value))
    aux0 = aux[0] if len(aux) > 0 and aux[0] is not None else partials
    aux1 = aux[1] if len(aux) > 1 and aux[1] is not None else aux0
    np_ = _runtime.next_pow2(count if head.paired else rows)
    _head_kernel[(1,)](
        partials, rows, count, splits,
        *_runtime.f64_pair(1.0 / n), *scalars,
        aux0, aux1, aux0.shape[-1] if aux0.dim() == 2 else aux0.numel(), *_strides(aux0), *_strides(aux1),
        loss, stats, ints, coef,
        METHOD=head.method_id, VARIANT=variant, FLAG=flag, ACC=_runtime.tl_dtype(acc),
        NP=np_, SP=_runtime.next_pow2(splits), DC=max(1, min(64, 8192 // (np_ * np_))),
        num_warps=4,
    )
    return loss, stats, ints, coef


def _strides(x):
    """(row stride, element stride) of a 2-D tensor; (element stride, 0) of a 1-D or 0-dim one."""
    if x.dim() == 2:
        return x.stride(0), x.stride(1)
    return (x.stride(0) if x.dim() == 1 else 0), 0
