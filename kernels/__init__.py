"""fastpref.kernels: the Triton kernels of the fused preference losses and their launchers.

Three passes serve every method (docs/methods.md §3): `row_sums` (per-row quadratic forms),
`run_head` (a method's loss, metrics and gradient coefficients on those sums) and
`elementwise_grad`. `REGISTRY` holds every method's descriptor (kernels/method.py).

This directory installs as `fastpref.kernels` (pyproject.toml's package-dir). A command run
from the repository root (`python -m ...`, `python -c ...`) also puts it on sys.path as a
top-level `kernels`, the name of the Hugging Face kernels package that transformers >= 5.25
imports. Imported under that name, this file hands the name over to the installed package
instead of shadowing it, or, when none is installed, is an empty module without a version.
"""

import sys

if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os

    _root = os.path.realpath(os.path.join(os.path.dirname(__file__), os.pardir))
    _elsewhere = [p for p in sys.path if os.path.realpath(p or os.curdir) != _root]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _elsewhere)
    if _spec is None or _spec.origin is None:
        # None installed: an empty module, as a bare directory (a PEP 420 portion) would give,
        # without a version, so that probes (transformers' is_kernels_available) find no package.
        __path__ = []
        __all__ = []
    else:
        _installed = importlib.util.module_from_spec(_spec)
        sys.modules["kernels"] = _installed  # the import statement returns what sys.modules holds
        _spec.loader.exec_module(_installed)
else:
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
