"""fastpref.kernels: the Triton kernels of the fused preference losses and their launchers.

Three passes serve every method (spec §3): `row_sums` (per-row quadratic forms), `run_head`
(a method's loss, metrics and gradient coefficients on those sums) and `elementwise_grad`.
"""
from . import _runtime  # noqa: F401  (must come first: it may turn on the interpreter)
from ._runtime import INTERPRET, poisoned_outputs
from .grad import elementwise_grad
from .head import HEADS, Head, run_head
from .reduce import row_sums

__all__ = ["INTERPRET", "HEADS", "Head", "elementwise_grad", "poisoned_outputs", "row_sums", "run_head"]
