"""fastpref.kernels: the Triton kernels of the fused preference losses and their launchers.

Three passes serve every method (docs/methods.md §3): `row_sums` (per-row quadratic forms),
`run_head` (a method's loss, metrics and gradient coefficients on those sums) and
`elementwise_grad`. `REGISTRY` holds every method's descriptor (kernels/method.py).
"""

from . import _runtime  # noqa: F401  (must come first: it may turn on the interpreter)
from ._runtime import INTERPRET, poisoned_outputs
from .grad import elementwise_grad
from .head import run_head
from .method import Hyper, Layout, Method, Option
from .reduce import partial_sums, row_sums
from .registry import PRESETS, REGISTRY

__all__ = [
    "INTERPRET",
    "PRESETS",
    "REGISTRY",
    "Hyper",
    "Layout",
    "Method",
    "Option",
    "elementwise_grad",
    "partial_sums",
    "poisoned_outputs",
    "row_sums",
    "run_head",
]
