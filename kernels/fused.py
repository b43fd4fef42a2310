"""The opt-in one-launch forward (the design card's "one launch"): the row reduction and the
head in a single kernel. Every program of the row reduction (kernels/reduce.py) stores its
partial sums, then draws a ticket from a per-device counter with an acquire/release atomic;
the program that draws the last ticket (the last to finish) resets the counter and runs the
method's head (kernels/head.py) on the partials. The head adds each row's partials in the same
fixed order as in the two-launch path, so the results are the same bits and deterministic; only
the moment the head starts changes.

Forward + backward is then two launches (this one and kernels/grad.py). Off by default
(`_runtime.set_one_launch`, FASTPREF_ONE_LAUNCH=1) until the GPU stress test
(tests/test_one_launch.py, `bash benchmarks/run_gpu.sh one-launch`) has passed on a GPU: the
interpreter runs programs one after another, so it checks the ticket logic and the results but
cannot show a race.
"""

import triton
import triton.language as tl

from . import _runtime
from .head import HeadPlan, runtime_values
from .reduce import BLOCK, row_partials


@triton.jit
def _row_sums_head_kernel(
    p_ptr,
    r_ptr,
    t_ptr,
    part_ptr,
    ticket_ptr,
    n,
    chunk,
    rows,
    splits,
    stride_p,
    stride_r,
    stride_t,
    args,
    HAS_REF: tl.constexpr,
    CROSS: tl.constexpr,
    BLOCK: tl.constexpr,
    HEAD: tl.constexpr,
    C: tl.constexpr,
    ACC: tl.constexpr,
    NP: tl.constexpr,
    SP: tl.constexpr,
):
    row_partials(
        p_ptr, r_ptr, t_ptr, part_ptr, n, chunk, rows, splits, stride_p, stride_r, stride_t, HAS_REF, CROSS, BLOCK
    )
    # Every thread's stores of this program happen before the release of its ticket.
    tl.debug_barrier()
    last = tl.num_programs(0) * tl.num_programs(1) - 1
    drawn = tl.atomic_add(ticket_ptr, 1, sem="acq_rel", scope="gpu")
    if drawn == last:
        # Every other program has released its partials (acquired above); no program touches
        # the counter again in this launch, so the next launch finds it at zero.
        tl.atomic_xchg(ticket_ptr, 0, sem="relaxed", scope="gpu")
        HEAD(*args, C, ACC, NP, SP)


def row_sums_head(hp: HeadPlan, p, r, t, partials, geo, rows, n, count, float_pairs, inputs, loss, stats, ints, coef):
    """`reduce.row_sums` then `head.run_head` in one launch: same arguments, same outputs."""
    r_arg = r if r is not None else p
    values = runtime_values(partials, rows, count, geo.splits, n, loss, stats, ints, coef, float_pairs)
    head = hp.launch(partials.dtype, count if hp.method.paired else rows, geo.splits)
    _row_sums_head_kernel.run(
        p,
        r_arg,
        t,
        partials,
        _runtime.ticket(p.device),
        n,
        geo.chunk,
        rows,
        geo.splits,
        p.stride()[0],
        r_arg.stride()[0],
        t.stride()[0],
        hp.args(values, inputs),
        HAS_REF=r is not None,
        CROSS=hp.method.cross,
        BLOCK=BLOCK,
        HEAD=head["HEAD"],
        C=head["C"],
        ACC=head["ACC"],
        NP=head["NP"],
        SP=head["SP"],
        num_warps=4,
        grid=geo.grid,
        warmup=False,
    )
