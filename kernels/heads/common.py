"""Loads and stores every head shares: per-row sums in, coefficients and means out."""
import triton
import triton.language as tl


@triton.jit
def load_sum(part_ptr, which, row0, count, rows, splits,
             NP: tl.constexpr, SP: tl.constexpr, ACC: tl.constexpr):
    """Sum `which` (0 S_pt, 1 S_rt, 2 S_pr, 3 S_ptr) of rows row0 .. row0+count-1 as an [NP]
    vector (zero past `count`), adding the row's split partials in a fixed order."""
    offs = tl.arange(0, NP)
    s = tl.arange(0, SP)
    mask = (offs < count)[:, None] & (s < splits)[None, :]
    ptrs = part_ptr + which * rows * splits + (row0 + offs)[:, None] * splits + s[None, :]
    return tl.sum(tl.load(ptrs, mask=mask, other=0.0).to(ACC), axis=1)


@triton.jit
def load_pair_sums(part_ptr, B, splits, NP: tl.constexpr, SP: tl.constexpr, ACC: tl.constexpr):
    """All four sums of the winner rows (0..B-1) and loser rows (B..2B-1), [NP] vectors each:
    (S_pt_w, S_rt_w, S_pr_w, S_ptr_w, S_pt_l, S_rt_l, S_pr_l, S_ptr_l)."""
    rows = 2 * B
    spt_w = load_sum(part_ptr, 0, 0, B, rows, splits, NP, SP, ACC)
    srt_w = load_sum(part_ptr, 1, 0, B, rows, splits, NP, SP, ACC)
    spr_w = load_sum(part_ptr, 2, 0, B, rows, splits, NP, SP, ACC)
    sptr_w = load_sum(part_ptr, 3, 0, B, rows, splits, NP, SP, ACC)
    spt_l = load_sum(part_ptr, 0, B, B, rows, splits, NP, SP, ACC)
    srt_l = load_sum(part_ptr, 1, B, B, rows, splits, NP, SP, ACC)
    spr_l = load_sum(part_ptr, 2, B, B, rows, splits, NP, SP, ACC)
    sptr_l = load_sum(part_ptr, 3, B, B, rows, splits, NP, SP, ACC)
    return spt_w, srt_w, spr_w, sptr_w, spt_l, srt_l, spr_l, sptr_l


@triton.jit
def masked_mean(x, valid, count):
    """Mean of x over the lanes where `valid` holds (count of them)."""
    return tl.sum(tl.where(valid, x, 0.0), axis=0) / count


@triton.jit
def store_pair_coefs(coef_ptr, B, a_w, a_l, NP: tl.constexpr):
    """a coefficients of winner rows (0..B-1) and loser rows (B..2B-1)."""
    offs = tl.arange(0, NP)
    valid = offs < B
    tl.store(coef_ptr + offs, a_w, mask=valid)
    tl.store(coef_ptr + B + offs, a_l, mask=valid)


@triton.jit
def store_pair_b(coef_ptr, B, b_w, NP: tl.constexpr):
    """b coefficients: b_w on winner rows, 0 on loser rows (the [1, :] plane of coef)."""
    offs = tl.arange(0, NP)
    valid = offs < B
    tl.store(coef_ptr + 2 * B + offs, b_w, mask=valid)
    tl.store(coef_ptr + 3 * B + offs, tl.zeros_like(b_w), mask=valid)


@triton.jit
def store_vector(stats_ptr, slot, B, x, NP: tl.constexpr):
    """A [B] metric vector at stats[slot : slot + B]."""
    offs = tl.arange(0, NP)
    tl.store(stats_ptr + slot + offs, x, mask=offs < B)


@triton.jit
def policy_minus_ref(sptr, spr, inv_n):
    """m - r per row, cancellation-free: (S_pt - S_rt)/n = (2 S_ptr - S_pr)/n exactly (spec §3)."""
    return (2.0 * sptr - spr) * inv_n


@triton.jit
def pair_means(spt_w, spt_l, srt_w, srt_l, valid, B, inv_n):
    """(mean m_w, mean m_l, mean r_w, mean r_l) over the B pairs."""
    return (masked_mean(spt_w, valid, B) * inv_n, masked_mean(spt_l, valid, B) * inv_n,
            masked_mean(srt_w, valid, B) * inv_n, masked_mean(srt_l, valid, B) * inv_n)


@triton.jit
def fraction(cond, valid, count, like):
    """Share of the valid lanes where cond holds, in the dtype of `like` (the compute dtype:
    a float64 batch gets exact float64 fractions)."""
    return masked_mean(tl.where(cond, 1.0, 0.0).to(like.dtype), valid, count)


@triton.jit
def store_loss_acc_mse(loss_ptr, stats_ptr, loss, inside, spt_w, spt_l, srt_w, srt_l, valid, B, inv_n):
    """The loss, and stats slots 0-3 that several heads share: loss, implicit_acc, model_mse, ref_mse."""
    model_w, model_l, ref_w, ref_l = pair_means(spt_w, spt_l, srt_w, srt_l, valid, B, inv_n)
    tl.store(loss_ptr, loss)
    tl.store(stats_ptr + 0, loss)
    tl.store(stats_ptr + 1, fraction(inside > 0, valid, B, inside))
    tl.store(stats_ptr + 2, 0.5 * (model_w + model_l))
    tl.store(stats_ptr + 3, 0.5 * (ref_w + ref_l))
