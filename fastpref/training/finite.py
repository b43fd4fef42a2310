"""Non-finite detection of a training run, at the points where the host reads values anyway.

A step makes no host synchronisation; the loss is read at logging steps (``read_metrics``), so
that is where a non-finite loss stops the run. The weights are checked there too, and before
every checkpoint and the final save (one fused device reduction and one host read each), so a
non-finite tensor is never written: the last good checkpoint stays the newest.
"""

import math

import torch

from .exits import EXIT_NON_FINITE  # noqa: F401  (re-exported: its status lives in exits.py)


class NonFiniteError(RuntimeError):
    """The loss or the trained weights became NaN or infinite."""


def weights_finite(params: list[torch.Tensor]) -> bool:
    """Whether every element of ``params`` (any shapes, dtypes, one device) is finite; one host
    read. Call only where the host synchronises anyway (logging steps, checkpoints)."""
    from .fsdp import _dtensor_local, all_finite_across, is_sharded

    flags = torch.stack([torch.isfinite(_dtensor_local(p.detach())).all() for p in params])
    if is_sharded(params):  # FSDP2: each process checks its shards, every process learns the verdict
        return bool(all_finite_across(flags))  # host-ok: logging or checkpoint step
    return bool(flags.all())  # host-ok: logging or checkpoint step


def check_finite(step: int, values: dict[str, float] | None, params: list[torch.Tensor], *, where: str) -> None:
    """Raise ``NonFiniteError`` naming ``step`` and ``where`` when the ``loss`` in ``values`` (host
    floats read at a logging step; None: none read) or a weight in ``params`` is not finite. Other
    metrics may be NaN legitimately (an fp16 step the grad scaler skips has an infinite grad_norm)."""
    bad = [k for k in ("loss",) if k in (values or {}) and not math.isfinite(values[k])]
    if bad:
        shown = ", ".join(f"{k}={values[k]}" for k in bad)
        raise NonFiniteError(
            f"non-finite loss at step {step} ({shown}); stopped before {where}. The newest "
            f"checkpoint-* of --output_dir holds the last good weights; lower --learning_rate "
            f"or --beta, or raise --adam_epsilon, and resume or restart"
        )
    if not weights_finite(params):
        raise NonFiniteError(
            f"non-finite trained weights at step {step}; stopped before {where}, nothing of "
            f"them written. The newest checkpoint-* of --output_dir holds the last good "
            f"weights; lower --learning_rate and resume or restart"
        )
