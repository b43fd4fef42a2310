"""Pass 1 of the fused family: per-row quadratic forms (docs/methods.md §3).

For every row k of the [R, n] views of model_pred (p), ref_pred (r) and target (t):

    S_pt = Σ (p - t)^2    S_rt = Σ (r - t)^2    S_pr = Σ (p - r)^2    S_ptr = Σ (p - t)(p - r)
    S_mr = Σ (p - r)((p - t) + (r - t))          (= S_pt - S_rt, formed per element)

S_mr is n (m - r), the quantity β amplifies: each term is e² - f² (e = p - t, f = r - t,
d = p - r) as a product of two differences, so its sum rounds with |e² - f²|, not with
e² + f² (S_pt - S_rt, a cancellation near the reference) nor with 2|e d| + d² (2 S_ptr - S_pr,
up to 4x e² + f² far from it). In the paired CROSS mode (Diffusion-SDPO), per pair i the
winner-row x loser-row product S_wl = Σ (p_w - t_w)(p_l - t_l): there one program reads both
rows of a pair, so nothing is read twice.

Each row is split into `splits` chunks handled by separate programs, so that a small batch
still fills the GPU; each program writes its partial sums to its own slot of a
[NUM_SUMS, R, splits] buffer and the head adds them in a fixed order (deterministic: no
atomics). Elements are upcast before any arithmetic; sums accumulate in ACC (fp32, or fp64
for fp64 inputs: the dtype of the partials buffer).
"""

import functools
from typing import NamedTuple

import triton
import triton.language as tl

from . import _runtime

BLOCK = 1024


@triton.jit
def _accumulate(
    p_row, r_row, t_row, idx, mask, acc_pt, acc_rt, acc_pr, acc_ptr, acc_mr, HAS_REF: tl.constexpr, ACC: tl.constexpr
):
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
        acc_mr += d * (e + f)  # e² - f² as a product: no cancellation
    return e, acc_pt, acc_rt, acc_pr, acc_ptr, acc_mr


@triton.jit
def _store_sums(part_ptr, row, split, plane, splits, acc_pt, acc_rt, acc_pr, acc_ptr, acc_mr, HAS_REF: tl.constexpr):
    slot = part_ptr + row * splits + split
    tl.store(slot, tl.sum(acc_pt, axis=0))
    if HAS_REF:
        tl.store(slot + plane, tl.sum(acc_rt, axis=0))
        tl.store(slot + 2 * plane, tl.sum(acc_pr, axis=0))
        tl.store(slot + 3 * plane, tl.sum(acc_ptr, axis=0))
        tl.store(slot + 4 * plane, tl.sum(acc_mr, axis=0))


@triton.jit
def row_partials(
    p_ptr,
    r_ptr,
    t_ptr,
    part_ptr,
    n,
    chunk,
    rows,
    splits,
    stride_p,
    stride_r,
    stride_t,
    HAS_REF: tl.constexpr,
    CROSS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """The body of one row-sum program (grid (rows or pairs, splits)): its partial sums, stored
    in its slots of the partials buffer (accumulated in that buffer's dtype)."""
    ACC: tl.constexpr = part_ptr.dtype.element_ty
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    start = split * chunk
    end = tl.minimum(start + chunk, n)
    plane = rows * splits
    zero = tl.zeros([BLOCK], ACC)
    acc_pt, acc_rt, acc_pr, acc_ptr, acc_mr = zero, zero, zero, zero, zero
    if CROSS:
        loser = row + rows // 2
        lacc_pt, lacc_rt, lacc_pr, lacc_ptr, lacc_mr, acc_wl = zero, zero, zero, zero, zero, zero
    for off in tl.range(start, end, BLOCK):
        idx = off + tl.arange(0, BLOCK)
        mask = idx < end
        e, acc_pt, acc_rt, acc_pr, acc_ptr, acc_mr = _accumulate(
            p_ptr + row * stride_p,
            r_ptr + row * stride_r,
            t_ptr + row * stride_t,
            idx,
            mask,
            acc_pt,
            acc_rt,
            acc_pr,
            acc_ptr,
            acc_mr,
            HAS_REF,
            ACC,
        )
        if CROSS:
            e_l, lacc_pt, lacc_rt, lacc_pr, lacc_ptr, lacc_mr = _accumulate(
                p_ptr + loser * stride_p,
                r_ptr + loser * stride_r,
                t_ptr + loser * stride_t,
                idx,
                mask,
                lacc_pt,
                lacc_rt,
                lacc_pr,
                lacc_ptr,
                lacc_mr,
                HAS_REF,
                ACC,
            )
            acc_wl += e * e_l
    _store_sums(part_ptr, row, split, plane, splits, acc_pt, acc_rt, acc_pr, acc_ptr, acc_mr, HAS_REF)
    if CROSS:
        _store_sums(part_ptr, loser, split, plane, splits, lacc_pt, lacc_rt, lacc_pr, lacc_ptr, lacc_mr, HAS_REF)
        tl.store(part_ptr + 5 * plane + row * splits + split, tl.sum(acc_wl, axis=0))


@triton.jit
def _row_sums_kernel(
    p_ptr,
    r_ptr,
    t_ptr,
    part_ptr,
    n,
    chunk,
    rows,
    splits,
    stride_p,
    stride_r,
    stride_t,
    HAS_REF: tl.constexpr,
    CROSS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row_partials(
        p_ptr, r_ptr, t_ptr, part_ptr, n, chunk, rows, splits, stride_p, stride_r, stride_t, HAS_REF, CROSS, BLOCK
    )


class RowGeometry(NamedTuple):
    """The launch geometry of one row reduction (`geometry`): `grid` (rows, or pairs in CROSS
    mode) x splits programs, the partials buffer [planes, rows, splits], `chunk` elements per
    program, and `launch`: the launch's constexpr, grid and option keywords, built once."""

    grid: tuple
    planes: int
    splits: int
    chunk: int
    launch: dict


@functools.lru_cache(maxsize=4096)
def geometry(rows, n, has_ref, cross, device):
    """The `RowGeometry` of the row reduction of `rows` rows of `n` elements (paired rows with
    `cross`); cached per shape, so a call computes nothing here."""
    programs_per_split = rows // 2 if cross else rows
    splits, chunk = _runtime.row_split(programs_per_split, n, BLOCK, device)
    planes = 6 if cross else 5 if has_ref else 1
    grid = (programs_per_split, splits)
    launch = dict(HAS_REF=has_ref, CROSS=cross, BLOCK=BLOCK, num_warps=4, grid=grid, warmup=False)
    return RowGeometry(grid, planes, splits, chunk, launch)


def row_sums(p, r, t, partials, geo, rows, n):
    """Partial per-row sums of p, r, t (`rows` rows of `n` elements, each row contiguous, rows
    `stride(0)` apart: a contiguous [R, ...] tensor or an [R, n] view; r may be None), written
    into `partials` ([planes, R, splits] in the accumulation dtype; any tensor whose storage
    starts there: the kernel takes its pointer), with `geo` = `geometry(rows, n, r is not None,
    cross)`.

    cross=True (paired [2B, n] input, r given) adds the per-pair S_wl plane (rows 0..B-1).
    The planes are S_pt, S_rt, S_pr, S_ptr, S_mr, S_wl in that order (`heads.common.S_PT` ...)."""
    r_arg = r if r is not None else p
    _runtime.launcher(_row_sums_kernel, p).run(
        p,
        r_arg,
        t,
        partials,
        n,
        geo.chunk,
        rows,
        geo.splits,
        p.stride()[0],
        r_arg.stride()[0],
        t.stride()[0],
        **geo.launch,
    )


def partial_sums(p, r, t, acc_dtype, cross=False):
    """`row_sums` into a new buffer: (partials [planes, R, splits] in acc_dtype, splits)."""
    rows, n = p.shape
    geo = geometry(rows, n, r is not None, cross, p.device)
    partials = _runtime.empty((geo.planes, rows, geo.splits), acc_dtype, p.device)
    row_sums(p, r, t, partials, geo, rows, n)
    return partials, geo.splits
