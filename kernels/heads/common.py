"""Loads and stores every head shares: per-row sums in, coefficients and metrics out.

Metrics are stored by name: `C` is the launch's `method.HeadConfig`, and the slot of a name is
computed at compile time from the method's `Layout` (constexpr functions below)."""

import triton
import triton.language as tl

# The planes of the row-sum buffer (kernels/reduce.py writes them in this order).
S_PT, S_RT, S_PR, S_PTR, S_MR, S_WL = (
    tl.constexpr(0),
    tl.constexpr(1),
    tl.constexpr(2),
    tl.constexpr(3),
    tl.constexpr(4),
    tl.constexpr(5),
)


@triton.constexpr_function
def scalar_slot(C, name):
    return C.layout.scalar_slot(name)


@triton.constexpr_function
def vector_start(C, name):
    return C.layout.vector_slot(name)[0]


@triton.constexpr_function
def vector_index(C, name):
    return C.layout.vector_slot(name)[1]


@triton.constexpr_function
def matrix_start(C, name):
    return C.layout.matrix_slot(name)[0]


@triton.constexpr_function
def matrix_after_vectors(C, name):
    return C.layout.matrix_slot(name)[1]


@triton.constexpr_function
def matrix_index(C, name):
    return C.layout.matrix_slot(name)[2]


@triton.constexpr_function
def int_slot(C, name):
    return C.layout.int_slot(name)


@triton.jit
def store_scalar(stats_ptr, C: tl.constexpr, NAME: tl.constexpr, x):
    """The 0-dim metric NAME."""
    tl.store(stats_ptr + scalar_slot(C, NAME), x)


@triton.jit
def store_int(ints_ptr, C: tl.constexpr, NAME: tl.constexpr, x):
    """The 0-dim int64 metric NAME."""
    tl.store(ints_ptr + int_slot(C, NAME), x)


@triton.jit
def store_vector(stats_ptr, C: tl.constexpr, NAME: tl.constexpr, B, x, NP: tl.constexpr):
    """The [B] metric vector NAME."""
    offs = tl.arange(0, NP)
    tl.store(stats_ptr + vector_start(C, NAME) + vector_index(C, NAME) * B + offs, x, mask=offs < B)


@triton.jit
def store_matrix(stats_ptr, C: tl.constexpr, NAME: tl.constexpr, B, x, NP: tl.constexpr):
    """The [B, B] metric matrix NAME (row-major)."""
    offs = tl.arange(0, NP)
    valid = offs < B
    base = matrix_start(C, NAME) + matrix_after_vectors(C, NAME) * B + matrix_index(C, NAME) * B * B
    tl.store(stats_ptr + base + offs[:, None] * B + offs[None, :], x, mask=valid[:, None] & valid[None, :])


@triton.jit
def load_sum(part_ptr, which, row0, count, rows, splits, NP: tl.constexpr, SP: tl.constexpr, ACC: tl.constexpr):
    """Sum `which` (S_PT, S_RT, S_PR, S_PTR, S_MR or S_WL: the planes of kernels/reduce.py) of rows
    row0 .. row0+count-1 as an [NP] vector (zero past `count`), adding the row's split partials
    in a fixed order."""
    offs = tl.arange(0, NP)
    s = tl.arange(0, SP)
    mask = (offs < count)[:, None] & (s < splits)[None, :]
    ptrs = part_ptr + which * rows * splits + (row0 + offs)[:, None] * splits + s[None, :]
    return tl.sum(tl.load(ptrs, mask=mask, other=0.0).to(ACC), axis=1)


@triton.jit
def nan_of(x):
    """0 where x is finite, NaN where x is NaN or ±inf (0 * inf = NaN). Added to a value that a
    comparison, a select or a max derived from x, it carries x's NaN through them (they drop
    it: NaN > 0 is false, and tl.maximum is IEEE maxNum on the GPU)."""
    return x * 0.0


@triton.jit
def load_row_sums(part_ptr, row0, count, rows, splits, NP: tl.constexpr, SP: tl.constexpr, ACC: tl.constexpr):
    """The sums (S_pt, S_rt, S_pr, S_ptr, S_mr) of rows row0 .. row0+count-1, [NP] vectors, all
    NaN on a row where any of them is not finite. A non-finite element of model_pred, ref_pred
    or target makes S_pt or S_rt of its row inf or NaN, so from here on every quantity of that
    row is NaN: the rule for non-finite inputs (README, API), in one place for every head."""
    spt = load_sum(part_ptr, S_PT, row0, count, rows, splits, NP, SP, ACC)
    srt = load_sum(part_ptr, S_RT, row0, count, rows, splits, NP, SP, ACC)
    spr = load_sum(part_ptr, S_PR, row0, count, rows, splits, NP, SP, ACC)
    sptr = load_sum(part_ptr, S_PTR, row0, count, rows, splits, NP, SP, ACC)
    smr = load_sum(part_ptr, S_MR, row0, count, rows, splits, NP, SP, ACC)
    bad = nan_of(spt) + nan_of(srt) + nan_of(spr) + nan_of(sptr) + nan_of(smr)
    return spt + bad, srt + bad, spr + bad, sptr + bad, smr + bad


@triton.jit
def load_model_sums(part_ptr, row0, count, rows, splits, NP: tl.constexpr, SP: tl.constexpr, ACC: tl.constexpr):
    """S_pt of rows row0 .. row0+count-1 of a reference-free call, NaN where it is not finite."""
    spt = load_sum(part_ptr, S_PT, row0, count, rows, splits, NP, SP, ACC)
    return spt + nan_of(spt)


@triton.jit
def poison_pairs(x_w, x_l):
    """(x_w, x_l), both NaN on a pair where either is: the pair is the unit of the rule."""
    bad = nan_of(x_w) + nan_of(x_l)
    return x_w + bad, x_l + bad


@triton.jit
def load_pair_sums(part_ptr, B, splits, NP: tl.constexpr, SP: tl.constexpr, ACC: tl.constexpr):
    """The five sums of the winner rows (0..B-1) and of the loser rows (B..2B-1), [NP] vectors:
    (S_pt_w, S_rt_w, S_pr_w, S_ptr_w, S_mr_w, S_pt_l, S_rt_l, S_pr_l, S_ptr_l, S_mr_l), all ten
    NaN on a pair where any element of its two rows is not finite (`load_row_sums`). A head binds
    the sums it does not read to `_`: they are still loaded, since a non-finite one poisons the pair."""
    rows = 2 * B
    spt_w, srt_w, spr_w, sptr_w, smr_w = load_row_sums(part_ptr, 0, B, rows, splits, NP, SP, ACC)
    spt_l, srt_l, spr_l, sptr_l, smr_l = load_row_sums(part_ptr, B, B, rows, splits, NP, SP, ACC)
    bad = nan_of(spt_w) + nan_of(spt_l)  # a row's sums are all NaN or all finite by now
    return (
        spt_w + bad,
        srt_w + bad,
        spr_w + bad,
        sptr_w + bad,
        smr_w + bad,
        spt_l + bad,
        srt_l + bad,
        spr_l + bad,
        sptr_l + bad,
        smr_l + bad,
    )


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
def policy_minus_ref(smr, inv_n):
    """m - r per row: S_mr / n, with S_mr = Σ (p - r)(e + f) = Σ (e² - f²) = S_pt - S_rt
    (e = p - t, f = r - t, d = p - r) accumulated directly by the row pass (kernels/reduce.py).
    Each term is a product of two differences, so the accumulation rounds in proportion to
    |e² - f²|, never more than e² + f², which is what S_pt - S_rt (the eager block's m - r)
    rounds with: near the reference (p ≈ r) that is a cancellation that β then amplifies. The
    former (2 S_ptr - S_pr)/n avoided it too, but its two sums round in proportion to
    2 |e d| + d², up to 4x e² + f² when p is far from r. model_pred == ref_pred on a row gives
    exactly 0 (the tie rules)."""
    return smr * inv_n


@triton.jit
def pair_ell(smr_w, smr_l, inv_n):
    """ℓ = Δref - Δθ = (m_l - r_l) - (m_w - r_w) per pair, from the rows' S_mr (one rounding
    before the 1/n scaling; exactly 0 when model_pred == ref_pred on both rows)."""
    return (smr_l - smr_w) * inv_n


@triton.jit
def pair_means(spt_w, spt_l, srt_w, srt_l, valid, B, inv_n):
    """(mean m_w, mean m_l, mean r_w, mean r_l) over the B pairs."""
    return (
        masked_mean(spt_w, valid, B) * inv_n,
        masked_mean(spt_l, valid, B) * inv_n,
        masked_mean(srt_w, valid, B) * inv_n,
        masked_mean(srt_l, valid, B) * inv_n,
    )


@triton.jit
def fraction(cond, valid, count, like):
    """Share of the valid lanes where cond holds, in the dtype of `like` (the compute dtype:
    a float64 batch gets exact float64 fractions). `like` is the value cond was computed from:
    a NaN in it on a valid lane makes the fraction NaN (a comparison alone would count it as
    false, a plausible accuracy)."""
    return masked_mean(tl.where(cond, 1.0, 0.0).to(like.dtype) + nan_of(like), valid, count)


@triton.jit
def store_loss_acc_mse(loss_ptr, stats_ptr, C: tl.constexpr, loss, inside, spt_w, spt_l, srt_w, srt_l, valid, B, inv_n):
    """The loss, and the metrics that several heads share: loss, implicit_acc, model_mse, ref_mse."""
    model_w, model_l, ref_w, ref_l = pair_means(spt_w, spt_l, srt_w, srt_l, valid, B, inv_n)
    tl.store(loss_ptr, loss)
    store_scalar(stats_ptr, C, "loss", loss)
    store_scalar(stats_ptr, C, "implicit_acc", fraction(inside > 0, valid, B, inside))
    store_scalar(stats_ptr, C, "model_mse", 0.5 * (model_w + model_l))
    store_scalar(stats_ptr, C, "ref_mse", 0.5 * (ref_w + ref_l))
