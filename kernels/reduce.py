"""Pass 1 of the fused family: per-row quadratic forms (spec §3).

For every row k of the [R, n] views of model_pred (p), ref_pred (r) and target (t):

    S_pt = Σ (p - t)^2    S_rt = Σ (r - t)^2    S_pr = Σ (p - r)^2    S_ptr = Σ (p - t)(p - r)

Each row is split into `splits` chunks handled by separate programs, so that a small batch
still fills the GPU; each program writes its partial sums to its own slot of a
[NUM_SUMS, R, splits] buffer and the head adds them in a fixed order (deterministic: no
atomics). Elements are upcast before any arithmetic; sums accumulate in ACC (fp32, or fp64
for fp64 inputs).
"""
import triton
import triton.language as tl

from . import _runtime

SUM_NAMES = ("S_pt", "S_rt", "S_pr", "S_ptr")
BLOCK = 1024


@triton.jit
def _row_sums_kernel(
    p_ptr, r_ptr, t_ptr, part_ptr,
    n, chunk, rows, splits,
    stride_p, stride_r, stride_t,
    HAS_REF: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    start = split * chunk
    end = tl.minimum(start + chunk, n)
    p_row = p_ptr + row * stride_p
    t_row = t_ptr + row * stride_t
    r_row = r_ptr + row * stride_r

    acc_pt = tl.zeros([BLOCK], ACC)
    acc_rt = tl.zeros([BLOCK], ACC)
    acc_pr = tl.zeros([BLOCK], ACC)
    acc_ptr = tl.zeros([BLOCK], ACC)
    for off in tl.range(start, end, BLOCK):
        idx = off + tl.arange(0, BLOCK)
        mask = idx < end
        p = tl.load(p_row + idx, mask=mask, other=0.0).to(ACC)
        t = tl.load(t_row + idx, mask=mask, other=0.0).to(ACC)
        e = p - t
        acc_pt += e * e
        if HAS_REF:
            r = tl.load(r_row + idx, mask=mask, other=0.0).to(ACC)
            f = r - t
            d = p - r
            acc_rt += f * f
            acc_pr += d * d
            acc_ptr += e * d

    slot = part_ptr + row * splits + split
    plane = rows * splits
    tl.store(slot, tl.sum(acc_pt, axis=0))
    if HAS_REF:
        tl.store(slot + plane, tl.sum(acc_rt, axis=0))
        tl.store(slot + 2 * plane, tl.sum(acc_pr, axis=0))
        tl.store(slot + 3 * plane, tl.sum(acc_ptr, axis=0))


def row_sums(p, r, t, acc_dtype):
    """Partial per-row sums of 2-D views p, r, t ([R, n], unit stride along n; r may be None).

    Returns (partials [4 or 1, R, splits] in acc_dtype, splits)."""
    rows, n = p.shape
    has_ref = r is not None
    splits, chunk = _runtime.row_split(rows, n, BLOCK, p.device)
    partials = _runtime.empty((4 if has_ref else 1, rows, splits), acc_dtype, p.device)
    r_arg = r if has_ref else p
    _row_sums_kernel[(rows, splits)](
        p, r_arg, t, partials,
        n, chunk, rows, splits,
        p.stride(0), r_arg.stride(0), t.stride(0),
        HAS_REF=has_ref, ACC=_runtime.tl_dtype(acc_dtype), BLOCK=BLOCK,
        num_warps=4,
    )
    return partials, splits
