"""The descriptor of one method: everything the library needs to know about it, next to its head.

Each `kernels/heads/<file>.py` defines its head (the @triton.jit function on the per-row sums)
and a `Method` per public loss it serves; `kernels/registry.py` collects them, and the kernel
dispatch (`head.run_head`), the autograd Function, `PreferenceLoss`, the trainer's
``--loss_type`` table, the tests' call table and the benchmark registry are built from them.

How a head is called (docs/methods.md §3, step 2): `run_head` reads the head's parameter names.
Runtime parameters are filled BY NAME from the launch (`part_ptr`, `rows`, `B` / `count`,
`splits`, `inv_n`, `loss_ptr`, `stats_ptr`, `ints_ptr`, `coef_ptr`), from the method's
hyperparameters (each a float passed as an fp32 (hi, lo) pair: `_math.f64` rebuilds it) and
from its extra inputs (`<input>` a tensor, `<input>_strides` its (row, element) strides,
`<input>_len` its last dim). The last four parameters are the constexprs
``C, ACC, NP, SP``: `C` is a `HeadConfig` (the method's options by name, e.g. ``C.loss_type``,
and its metric layout, read through `common.store_scalar` / `store_vector` / `store_matrix`
by metric name), ACC the accumulation dtype, NP / SP the padded pair / split counts.
"""

import dataclasses
import inspect

import torch
import triton.language as tl

CHECKS = ("positive_finite", "finite", "nonnegative", "unit_interval", "open_unit_interval", "positive_int")
"""Hyperparameter checks, each a ``check_<name>`` of fastpref/_validate.py (ValueError/TypeError naming
the argument, expected and actual value)."""


@dataclasses.dataclass(frozen=True)
class Hyper:
    """A float (or int) hyperparameter: its public keyword name, default and check (one of CHECKS).
    head=False: checked and documented, but not passed to the head (the public function turns it
    into other values first, e.g. dense DPO's `normalize` into `weight_scale`)."""

    name: str
    default: object
    check: str
    head: bool = True

    def __post_init__(self):
        if self.check not in CHECKS + ("bool", "none"):
            raise ValueError(f"Hyper {self.name!r}: check must be one of {CHECKS}, got {self.check!r}")


RUNTIME = (
    "part_ptr",
    "rows",
    "B",
    "count",
    "splits",
    "inv_n",
    "loss_ptr",
    "stats_ptr",
    "ints_ptr",
    "coef_ptr",
)
"""The head parameters the launch fills itself (in this order in `head.runtime_values`)."""

OUTPUT_POINTERS = ("part_ptr", "stats_ptr", "coef_ptr", "ints_ptr")
"""The head's pointers into the call's one output buffer (`Layout.pieces`): the launch passes the
buffer itself for each, with the start of each piece (`Layout.starts`), and the head kernel
moves the pointers there (`head.place_outputs`): no tensor view is made per piece."""

POSITIONAL_INPUTS = ("timesteps", "labels")
"""Extra inputs passed positionally after target (in this order); the others are keyword arguments."""

INPUT = "<input>"
"""In a preset's keyword arguments: pass the extra input of that name (a tensor the caller makes)."""


@dataclasses.dataclass(frozen=True)
class Option:
    """A compile-time choice of the head, its default first. public: a keyword argument of the
    public function (loss_type, variant, criterion, base, ...), checked against the choices;
    else the public function derives it (RPO's has_emb, KTO's kl_mode, SDPO's safeguard). The
    head reads it by name as a constexpr: ``if C.loss_type == "hinge"``."""

    name: str
    choices: tuple
    public: bool = True

    @property
    def default(self):
        return self.choices[0]


@dataclasses.dataclass(frozen=True)
class Layout:
    """Metric layout: the stats buffer holds 0-dim `scalars` (loss first), then one [B] plane per
    name of `vectors`, then one [B, B] plane per name of `matrices`; `ints` have their own int64
    buffer. Every slot is computed from these names (the heads store by name)."""

    scalars: tuple
    vectors: tuple = ()
    matrices: tuple = ()
    ints: tuple = ()

    def size(self, pairs):
        return len(self.scalars) + len(self.vectors) * pairs + len(self.matrices) * pairs * pairs

    def scalar_slot(self, name):
        return self.scalars.index(name)

    def vector_slot(self, name):
        """(start, index): the vector `name` is stats[start + index B : start + (index + 1) B]."""
        return len(self.scalars), self.vectors.index(name)

    def matrix_slot(self, name):
        """(start, vectors, index): `name` is stats[start + vectors B + index B² ...] (row-major [B, B])."""
        return len(self.scalars), len(self.vectors), self.matrices.index(name)

    def int_slot(self, name):
        return self.ints.index(name)

    def pieces(self, pairs, rows, acc_bytes, partials=0):
        """Sizes of the pieces of a call's 1-D output buffer (elements of the accumulation dtype,
        `acc_bytes` wide), cut in one `split_with_sizes`: the int64 metrics (bitcast; first, so
        8-byte aligned; only if the method has any), the scalars block, one [B] piece per
        vector, one [B*B] piece per matrix (scalars to matrices: the stats, contiguous, as the
        head indexes them), the [2, rows] gradient coefficients (a then b) and the `partials`
        row sums."""
        ints = (len(self.ints) * (8 // acc_bytes),) if self.ints else ()
        return (
            ints
            + (len(self.scalars),)
            + (pairs,) * len(self.vectors)
            + (pairs * pairs,) * len(self.matrices)
            + (2 * rows, partials)
        )

    def starts(self, pairs, rows, acc_bytes):
        """(partials, stats, coefficients): where those pieces start in the buffer (`pieces`), in
        elements of the accumulation dtype (the int64 metrics, if any, start it)."""
        stats = len(self.ints) * (8 // acc_bytes)
        coef = stats + self.size(pairs)
        return coef + 2 * rows, stats, coef

    def metrics(self, buf, pairs, drop=()):
        """Metric dict of views into a call's output buffer `buf` (`pieces`' layout; its pieces
        after the stats are not read): no copies, no launches."""
        start = len(self.ints) * (8 // buf.element_size())
        ints = buf[:start].view(torch.int64) if self.ints else None
        return self.unpack(buf[start : start + self.size(pairs)], ints, pairs, drop)

    def unpack(self, stats, ints, pairs, drop=()):
        """Metric dict of views into the stats/ints buffers (no copies, no launches); the
        stats/ints form of `FusedLossFunction`'s outputs."""
        base = len(self.scalars)
        out = dict(zip(self.scalars, stats[:base].unbind(0), strict=True))
        if self.vectors:
            size = len(self.vectors) * pairs
            out.update(
                zip(self.vectors, stats[base : base + size].view(len(self.vectors), pairs).unbind(0), strict=True)
            )
            base += size
        if self.matrices:
            out.update(zip(self.matrices, stats[base:].view(len(self.matrices), pairs, pairs).unbind(0), strict=True))
        if self.ints:
            out.update(zip(self.ints, ints.unbind(0), strict=True))
        for key in drop:
            del out[key]
        return out

    @property
    def names(self):
        return self.scalars + self.vectors + self.matrices + self.ints


@dataclasses.dataclass(frozen=True)
class HeadConfig:
    """The compile-time constants of one head launch (the constexpr `C`): the method's name, its
    metric layout, its options as (name, value) pairs, read as attributes (``C.safeguard``), and
    `outputs`: where the head's OUTPUT_POINTERS are among its runtime arguments (-1: a pointer it
    does not take), so the launch can point them into the one output buffer (head.py).
    Hashable with a stable repr, so Triton caches one compiled head per configuration."""

    method: str
    layout: Layout
    options: tuple = ()
    outputs: tuple = ()

    def __getattr__(self, name):
        for key, value in object.__getattribute__(self, "options"):
            if key == name:
                return tl.constexpr(value)  # a constexpr, also where a head passes it on
        raise AttributeError(f"head {self.method!r} has no option {name!r}")


@dataclasses.dataclass(frozen=True)
class Method:
    """One method as the library sees it.

    name: registry name (underscore spelling, also the PreferenceLoss method and the float64
    reference's name in tests/reference*.py); function: the public `fastpref.<function>`;
    head: its @triton.jit head; hypers: float/int hyperparameters (Hyper) in signature order;
    options: string choices (Option); inputs: extra per-batch tensors, positional after target
    ("timesteps", "labels") or keyword (the rest); layout: its metrics; paired: [2B, ...] rows (else
    unpaired [N, ...]); needs_ref: reads ref_pred; has_b: some rows have b != 0 (ref_pred is read
    in backward); cross: needs the per-pair S_wl sum; presets: (run name, keyword arguments)
    pairs, the named calls that the tests and the benchmarks run (underscore names, the first
    is the method's defaults); loss_types: the trainer's ``--loss_type`` entries, (name, preset,
    description) (prompt-weighted RPO: preset kwargs {"emb_w": ...} are filled by the trainer);
    data: the trainer's batch layout ("pairs", "images" or "winners"); aliases: other accepted
    spellings of the name (PreferenceLoss); min_pairs: smallest B the loss accepts;
    description: one line; section: its section of docs/methods.md (the registry's order).
    """

    name: str
    function: str
    head: object
    layout: Layout
    hypers: tuple = ()
    options: tuple = ()
    inputs: tuple = ()
    paired: bool = True
    needs_ref: bool = True
    has_b: bool = False
    cross: bool = False
    presets: tuple = ()
    loss_types: tuple = ()
    data: str = "pairs"
    aliases: tuple = ()
    min_pairs: int = 1
    description: str = ""
    section: str = ""

    @property
    def order(self):
        """Sort key: the method's section of docs/methods.md ("2.4" -> (2, 4)), then its name."""
        return tuple(int(x) for x in self.section.split(".")) if self.section else (99,), self.name

    def __post_init__(self):
        params = tuple(inspect.signature(getattr(self.head, "fn", self.head)).parameters)
        if list(params)[-4:] != ["C", "ACC", "NP", "SP"]:
            raise ValueError(f"{self.name}: a head's last parameters must be C, ACC, NP, SP; got {list(params)}")
        inputs = {f"{name}{suffix}" for name in self.inputs for suffix in ("", "_strides", "_len")}
        object.__setattr__(self, "_params", params[:-4])  # read once: calls then do no inspection
        object.__setattr__(self, "_floats", tuple(p for p in params[:-4] if p not in RUNTIME and p not in inputs))

    @property
    def hyper_names(self):
        return tuple(h.name for h in self.hypers)

    @property
    def option_names(self):
        return tuple(o.name for o in self.options)

    def head_params(self):
        """The head's runtime parameter names, in order (its constexprs C, ACC, NP, SP excluded)."""
        return self._params

    @property
    def float_params(self):
        """The head's float parameters (hyperparameters and derived values, each passed as an fp32
        pair), in head order: its parameters that are neither RUNTIME nor an extra input's."""
        return self._floats

    def config(self, options):
        """The HeadConfig of a launch with these option values (name -> value; a missing option
        takes its default). ValueError for an unknown name or a value outside the choices."""
        merged = {o.name: o.default for o in self.options}
        for name, value in options.items():
            option = next((o for o in self.options if o.name == name), None)
            if option is None or value not in option.choices:
                raise ValueError(
                    f"head {self.name!r}: option {name}={value!r} is not one of "
                    f"{[(o.name, o.choices) for o in self.options]}"
                )
            merged[name] = value
        params = self.head_params()
        outputs = tuple(params.index(name) if name in params else -1 for name in OUTPUT_POINTERS)
        return HeadConfig(self.name, self.layout, tuple(sorted(merged.items())), outputs)

    def preset(self, name):
        """The keyword arguments of preset `name`."""
        return dict(dict(self.presets)[name])
