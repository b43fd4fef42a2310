"""Pass 2 of the fused family: one single-program kernel that runs a method's head on the
per-row sums and writes the loss, the metrics and the per-row gradient coefficients.

The head is a constexpr of the kernel (a @triton.jit function: Triton compiles one head kernel
per method and configuration), so a new method is a new head, not a new kernel family, and no
line here names a method. A `HeadPlan` (one per method and option values, cached) knows where
each of the head's runtime parameters comes from (kernels/method.py says which names exist) and
where the outputs live in the call's single output buffer; `run_head` fills the parameters and
passes the constexprs C, ACC, NP, SP.
"""

import operator

import triton
import triton.language as tl

from . import _runtime
from .method import RUNTIME, Method


@triton.jit
def _head_kernel(args, HEAD: tl.constexpr, C: tl.constexpr, ACC: tl.constexpr, NP: tl.constexpr, SP: tl.constexpr):
    HEAD(*args, C, ACC, NP, SP)


def _strides(x):
    """(row stride, element stride) of a 2-D tensor; (element stride, 0) of a 1-D or 0-dim one."""
    if x.dim() == 2:
        return x.stride(0), x.stride(1)
    return (x.stride(0) if x.dim() == 1 else 0), 0


def encode_options(method: Method, options):
    """The option values of a call (name -> value; a missing one takes its default) as one string,
    "|"-joined in the descriptor's order: the form the custom operators take (`HeadPlan` decodes it)."""
    if any(name not in method.option_names for name in options):
        method.config(options)  # raises: names the unknown option and the choices
    return "|".join([str(options.get(o.name, o.default)) for o in method.options])


class HeadPlan:
    """How one method with one set of option values is launched: its `HeadConfig`, the names of
    its float parameters (in head order), the getter that picks the head's arguments out of the
    flat value list, and the output-buffer layout per batch shape."""

    def __init__(self, method: Method, encoded):
        self.method = method
        self.encoded = encoded
        decoded = {}
        for option, text in zip(method.options, encoded.split("|") if method.options else (), strict=True):
            matches = [c for c in option.choices if str(c) == text]
            decoded[option.name] = matches[0] if matches else text  # `config` names a bad value
        self.config = method.config(decoded)
        params = method.head_params()
        self.float_names = method.float_params
        slots = {name: i for i, name in enumerate(RUNTIME)}
        slots.update((name, len(RUNTIME) + i) for i, name in enumerate(self.float_names))
        base = len(RUNTIME) + len(self.float_names)
        for i, name in enumerate(method.inputs):
            slots.update({name: base + 3 * i, f"{name}_strides": base + 3 * i + 1, f"{name}_len": base + 3 * i + 2})
        index = tuple(slots[p] for p in params)
        self.pick = operator.itemgetter(*index) if len(index) > 1 else (lambda values: (values[index[0]],))
        self._buffers = {}
        self._launches = {}

    def pieces(self, pairs, rows, acc, partials=0):
        """`Layout.pieces` of a call's output buffer in the accumulation dtype `acc`, cached."""
        key = (pairs, rows, acc, partials)
        found = self._buffers.get(key)
        if found is None:
            found = self._buffers[key] = self.method.layout.pieces(pairs, rows, acc.itemsize, partials)
        return found

    def launch(self, acc, count, splits):
        """The head launch's keywords (the constexprs HEAD, C, ACC, NP, SP; grid, warps) for
        accumulation dtype `acc`, `count` pairs (paired methods) or rows and `splits` partials
        per row; cached."""
        key = (acc, count, splits)
        found = self._launches.get(key)
        if found is None:
            found = self._launches[key] = dict(
                HEAD=self.method.head,
                C=self.config,
                ACC=_runtime.tl_dtype(acc),
                NP=_runtime.next_pow2(count),
                SP=_runtime.next_pow2(splits),
                num_warps=4,
                grid=(1,),
                warmup=False,
            )
        return found

    def args(self, values, inputs):
        """The head's runtime arguments: `values` the RUNTIME list followed by the float pairs;
        inputs: the extra tensors in descriptor order (None where absent: the partial sums are
        passed instead, which the head then does not read: its options say the input is absent)."""
        for x in inputs:
            x = values[0] if x is None else x
            values += (x, _strides(x), x.shape[-1] if x.dim() == 2 else x.numel())
        return self.pick(values)


_PLANS = {}


def plan(method: Method, encoded) -> HeadPlan:
    """The cached `HeadPlan` of `method` with these encoded option values (`encode_options`)."""
    key = (method.name, encoded)
    found = _PLANS.get(key)
    if found is None or found.method is not method:
        found = _PLANS[key] = HeadPlan(method, encoded)
    return found


def find_plan(name, encoded) -> HeadPlan:
    """The plan of the method called `name` (one that has been planned, else a registered one)."""
    found = _PLANS.get((name, encoded))
    if found is None:
        from .registry import REGISTRY

        found = plan(REGISTRY[name], encoded)
    return found


def run_head(hp: HeadPlan, partials, splits, rows, count, n, float_pairs, inputs, loss, stats, ints, coef):
    """Launch the head of plan `hp` on the partial sums of `rows` rows of `n` elements.

    count: the number of pairs B for paired methods, the rows N (or kept rows) for row methods;
    float_pairs: the hyperparameters as fp32 (hi, lo) pairs in `hp.float_names` order; inputs:
    the extra tensors in descriptor order. Writes the 0-dim `loss`, the `stats` and int64 `ints`
    metrics and the [2, rows] coefficients `coef` (pieces of one buffer: `HeadPlan.pieces`; the
    stats are the buffer itself, they start it)."""
    _head_kernel.run(
        hp.args(runtime_values(partials, rows, count, splits, n, loss, stats, ints, coef, float_pairs), inputs),
        **hp.launch(partials.dtype, count if hp.method.paired else rows, splits),
    )


def runtime_values(partials, rows, count, splits, n, loss, stats, ints, coef, float_pairs):
    """The flat value list a plan picks the head's arguments from: RUNTIME, then the float pairs."""
    return (partials, rows, count, count, splits, _runtime.f64_pair(1.0 / n), loss, stats, ints, coef, *float_pairs)
