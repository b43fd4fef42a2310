"""Providers: the implementations a loss method is timed with.

* ``fastpref``: the fused Triton kernels (``fastpref.<fn>``).
* ``eager-diffusers`` / ``eager-official``: the upstream trainers' loss blocks
  (``reference_blocks``); ``eager-flow-grpo`` / ``eager-simpletuner``: the flow-matching DPO
  blocks of flow_grpo and SimpleTuner (Diffusion-DPO sigmoid, β converted);
  ``eager-spec``: eager spec formulas for methods without one.
* ``compile``: ``torch.compile`` (default mode) of the method's ``compile_base`` block.
* ``compile-reduce-overhead``: ``torch.compile(mode="reduce-overhead")`` of the same block.
  This is the mode benchmarked as "what a user tries next": these blocks contain no matmul
  or convolution for ``max-autotune``'s template search to tune, and at training batch
  sizes they are dominated by kernel-launch and host overhead, which is exactly what
  CUDA graphs (reduce-overhead) remove. It is the strongest compile baseline for small
  shapes and costs little extra compile time. ``torch.compiler.cudagraph_mark_step_begin()``
  is called before every call, as the PyTorch docs ask of training loops.
* ``fastpref-cudagraph`` / ``eager-diffusers-cudagraph``: the same call captured once in a
  CUDA graph and replayed (forward and forward+backward modes). fastpref's losses make no
  host sync, so a trainer can capture them (the whole step, in practice); this measures the
  GPU time without Python and launch overhead, the fair match for ``compile-reduce-overhead``.
* ``compile-max-autotune``: opt-in only (``--providers ...,compile-max-autotune``); its
  autotuning makes the full sweep too slow for the GPU time budget.

Compile and autotune time never enter a measurement: drivers warm every provider up first.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

EAGER = ["eager-diffusers", "eager-official", "eager-flow-grpo", "eager-simpletuner", "eager-spec"]
COMPILE_MODES = {
    "compile": "default",
    "compile-reduce-overhead": "reduce-overhead",
    "compile-max-autotune": "max-autotune",
}
GRAPHED = {"fastpref-cudagraph": "fastpref", "eager-diffusers-cudagraph": "eager-diffusers"}
ALL_PROVIDERS = ["fastpref", *EAGER, *COMPILE_MODES, *GRAPHED]
DEFAULT_PROVIDERS = ["fastpref", *EAGER, "compile", "compile-reduce-overhead", *GRAPHED]

_COMPILED: dict = {}


def _bump_recompile_limit(n: int = 64) -> None:
    """Let one compiled block serve every shape/dtype of a sweep without falling back."""
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), n))


def fastpref_fn(method) -> Callable | None:
    """``fastpref.<method.fastpref>`` or ``None`` if fastpref or that function is missing."""
    try:
        import fastpref
    except ImportError:
        return None
    return getattr(fastpref, method.fastpref, None)


def fastpref_version() -> str:
    """Installed fastpref version string (``"missing (<why>)"`` if not importable)."""
    try:
        import fastpref
    except ImportError as e:
        return f"missing ({type(e).__name__}: {e}; install it with `pip install --no-build-isolation --no-deps -e .`)"
    return str(getattr(fastpref, "__version__", "unknown"))


def providers_for(method, requested: list[str]) -> tuple[list[str], list[str]]:
    """Split ``requested`` into (available for ``method``, notes on the skipped ones)."""
    ok, notes = [], []
    for p in requested:
        base = GRAPHED.get(p, p)
        if base in EAGER and base not in method.eager:
            continue
        if p in COMPILE_MODES and method.compile_base is None:
            notes.append(f"SKIP {method.name}/{p}: no eager block to compile")
            continue
        if base == "fastpref":
            if fastpref_fn(method) is None:
                notes.append(
                    f"SKIP {method.name}/fastpref: installed fastpref has no "
                    f"{method.fastpref!r} (fastpref {fastpref_version()})"
                )
                continue
        elif base in EAGER:
            pass
        elif p not in COMPILE_MODES:
            raise SystemExit(f"unknown provider {p!r}; known: {ALL_PROVIDERS}")
        ok.append(p)
    return ok, notes


def build(method, provider: str) -> Callable:
    """A callable ``f(*args, **tensor_kwargs) -> (loss, metrics)`` for ``provider`` (for a
    ``-cudagraph`` provider, the call that ``measure.graphed`` captures)."""
    provider = GRAPHED.get(provider, provider)
    if provider == "fastpref":
        return functools.partial(fastpref_fn(method), **method.fastpref_kwargs)
    if provider in EAGER:
        block, kw = method.eager[provider]
        return functools.partial(block, **kw)
    key = (method.name, provider)
    if key not in _COMPILED:
        _bump_recompile_limit()
        block, kw = method.eager[method.compile_base]

        def eager_block(*args, **tkw):
            return block(*args, **kw, **tkw)

        mode = COMPILE_MODES[provider]
        compiled = torch.compile(eager_block, mode=None if mode == "default" else mode)
        if mode == "default":
            fn = compiled
        else:

            def fn(*args, **tkw):
                torch.compiler.cudagraph_mark_step_begin()
                return compiled(*args, **tkw)

        _COMPILED[key] = fn
    return _COMPILED[key]
