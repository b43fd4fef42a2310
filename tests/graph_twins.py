"""Twin trainer runs for the CUDA-graph tests: a run whose step is a ``StaticStep`` (replayed
from a CUDA graph, or called on its static buffers) against an eager twin with the same flags,
seed, initial weights and fresh batches every step. ``assert_twins_agree`` compares their
per-step metrics and final weights, and checks that the comparison can fail: on each step
that could reuse stale inputs, the subject's prediction errors must be those of this step's
batch, told apart from every earlier step's, so a step computed on an earlier step's inputs
cannot pass for the fresh one.

The runs go through ``fastpref.train.main``; the hooks replace, for the duration of one run,
three names that the trainer's builders import: ``make_optimizer`` and ``StaticStep`` in
``fastpref.training.run``, ``graph_refusal`` in ``fastpref.training.validation``.
"""

import csv
import math
from dataclasses import dataclass

import pytest
import torch

from fastpref import train
from fastpref.training import run as run_module
from fastpref.training import validation
from fastpref.training.graph import StaticStep, make_optimizer


@dataclass
class Run:
    """One trainer run: metrics.csv rows (floats), and the trainable parameters as float64
    CPU copies when the optimizer was built (``initial``) and when the run returned (``final``)."""

    rows: list[dict[str, float]]
    initial: list[torch.Tensor]
    final: list[torch.Tensor]


@dataclass(frozen=True)
class Tolerance:
    """Relative tolerances of a twin comparison: prediction errors (``*mse*`` metrics), the
    other continuous metrics (loss, grad_norm: beta amplifies error differences in the loss),
    and the final weights (``|w_subject - w_twin| <= weights * |w_twin - w_initial|``, norms
    over every trainable parameter)."""

    errors: float
    other: float
    weights: float


# Subject and twin run the same kernels on the same values; what may differ is the order of
# a few reductions (cuBLAS's algorithm inside a capture, attention backward, cuDNN), i.e.
# float32 rounding, plus at most one rounding of a half-precision output (bf16: 2^-8 = 3.9e-3
# relative, on a few elements, so far less on a mean), amplified by beta in the loss. A stale
# input changes the errors by the step-to-step spread of the data: by 22 % to 94 % in the CPU
# runs of test_train_static_step's twins (bf16 LoRA DPO, fp32 copy KTO, StaleInputs).
TOLERANCES = {
    "no": Tolerance(errors=1e-4, other=1e-4, weights=1e-3),
    "bf16": Tolerance(errors=2e-3, other=2e-2, weights=2e-2),
    "fp16": Tolerance(errors=2e-3, other=2e-2, weights=2e-2),
}
OTHER_METRICS = ("loss", "grad_norm")
DISCRIMINATION = 4.0  # how much closer to its own step's errors than to another step's


def graph_step(use_graph: bool, cls=StaticStep):
    """A stand-in for ``StaticStep`` in ``train``: builds ``cls`` as the trainer asks, with
    ``use_graph`` forced (False: the same static-buffer step, called without capture)."""

    def build(step, **kwargs):
        return cls(step, **{**kwargs, "use_graph": use_graph})

    return build


class StaleInputs(StaticStep):
    """A broken ``StaticStep``: fills its input buffers on the first call only, so every later
    step computes on the first step's batches, as a replay that missed its input copies would.
    The negative control of ``assert_twins_agree``."""

    def _load(self, batches):
        if not getattr(self, "_filled", False):
            self._filled = True
            super()._load(batches)


def read_rows(output_dir) -> list[dict[str, float]]:
    """metrics.csv of a run as float rows."""
    with open(output_dir / "metrics.csv") as f:
        return [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)]


def run_trainer(argv: list[str], output_dir, *, static_step=None, graph_on_cpu: bool = False) -> Run:
    """``train.main(argv + --output_dir output_dir)`` with ``StaticStep`` replaced by
    ``static_step`` (from ``graph_step``) when given; ``graph_on_cpu`` lets ``--cuda_graph``
    through ``validate`` on a machine without CUDA (for ``graph_step(False)``). Returns the run."""
    seen = {}

    def recording_optimizer(params, lr, **kwargs):
        seen["params"] = params
        seen["initial"] = [p.detach().to("cpu", torch.float64, copy=True) for p in params]
        return make_optimizer(params, lr, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(run_module, "make_optimizer", recording_optimizer)
        if static_step is not None:
            patch.setattr(run_module, "StaticStep", static_step)
        if graph_on_cpu:
            patch.setattr(validation, "graph_refusal", lambda **_: None)
        train.main([*argv, "--output_dir", str(output_dir)])
    final = [p.detach().to("cpu", torch.float64, copy=True) for p in seen["params"]]
    return Run(read_rows(output_dir), seen["initial"], final)


def _close(actual: float, expected: float, rtol: float, scale: float) -> bool:
    if not math.isfinite(expected):  # an fp16 step the grad scaler skipped: the same overflow
        return not math.isfinite(actual) and math.isnan(actual) == math.isnan(expected)
    return abs(actual - expected) <= rtol * (abs(expected) + 1e-2 * scale)


def assert_twins_agree(subject: Run, twin: Run, tolerance: Tolerance, *, first: int = 1) -> None:
    """``subject`` took ``twin``'s steps: every ``*mse*`` metric, loss and grad_norm of every
    step agree to ``tolerance``, and so do the final weights, from the same initial weights.
    Steps ``first..`` (0-based rows: a graph's capture step and replays) are also checked to be
    computed on their own inputs rather than an earlier step's: for every earlier step, some
    prediction error of the subject is ``DISCRIMINATION`` times closer to the twin's value at
    this step than the twin's value at that step is (so a metric that repeats across steps,
    with data that do not change, fails)."""
    t_rows, s_rows = twin.rows, subject.rows
    assert [r["step"] for r in s_rows] == [r["step"] for r in t_rows] and len(t_rows) > first, (
        f"the runs logged steps {[r['step'] for r in s_rows]} and {[r['step'] for r in t_rows]}"
    )
    errors = sorted(k for k in t_rows[0] if "mse" in k)
    assert errors, f"no prediction-error metric (*mse*) in {sorted(t_rows[0])}"
    for key in errors + [k for k in OTHER_METRICS if k in t_rows[0]]:
        rtol = tolerance.errors if key in errors else tolerance.other
        scale = max((abs(r[key]) for r in t_rows if math.isfinite(r[key])), default=0.0)
        for t_row, s_row in zip(t_rows, s_rows, strict=True):
            assert _close(s_row[key], t_row[key], rtol, scale), (
                f"step {int(t_row['step'])} {key}: {s_row[key]!r} against the eager twin's {t_row[key]!r} "
                f"(rtol {rtol}); every step: {[r[key] for r in s_rows]} vs {[r[key] for r in t_rows]}"
            )
    for k in range(first, len(t_rows)):
        for j in range(k):
            margins = {
                m: abs(t_rows[k][m] - t_rows[j][m]) - DISCRIMINATION * abs(s_rows[k][m] - t_rows[k][m]) for m in errors
            }
            assert max(margins.values()) > 0, (
                f"step {k + 1}: no prediction error tells the subject's inputs from step {j + 1}'s "
                f"(twin at steps {k + 1} and {j + 1}, subject at {k + 1}: "
                f"{ {m: (t_rows[k][m], t_rows[j][m], s_rows[k][m]) for m in errors} })"
            )
    assert len(subject.initial) == len(twin.initial) and all(
        torch.equal(a, b) for a, b in zip(subject.initial, twin.initial, strict=True)
    ), "the twins started from different weights"
    moved = math.sqrt(sum(float((f - i).square().sum()) for f, i in zip(twin.final, twin.initial, strict=True)))
    apart = math.sqrt(sum(float((s - t).square().sum()) for s, t in zip(subject.final, twin.final, strict=True)))
    assert moved > 0, "the twin's weights did not move"
    assert apart <= tolerance.weights * moved, (
        f"final weights {apart:.3e} apart, {apart / moved:.2e} of what training moved them ({moved:.3e})"
    )
