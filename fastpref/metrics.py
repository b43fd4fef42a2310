"""Per-row errors from the fused row reduction, for metrics and for baselines that a trainer
assembles itself (KTO's baseline over every process's rows, say).

One pass over the inputs (the row-sum kernel of every loss), no full-size temporary, no
gradient, no host synchronisation.
"""

from collections.abc import Callable

import torch

from fastpref import _validate as v
from fastpref.kernels.reduce import partial_sums
from fastpref.ops import as_rows


@torch.no_grad()
def row_errors(
    model_pred: torch.Tensor, target: torch.Tensor, *, ref_pred: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row mean squared errors of any ``[N, ...]`` predictions (rank >= 2, float16/bfloat16/
    float32/float64, mixed freely): ``m_k = mean((model_pred_k - target_k)^2)`` and, when
    ``ref_pred`` is given, ``r_k = mean((ref_pred_k - target_k)^2)`` (else None). Returns ``[N]``
    tensors in float32 (float64 if any input is float64), detached: docs/methods.md's m and r."""
    v.check_predictions(False, model_pred, target, ref_pred)
    p, r, t = as_rows(model_pred), as_rows(ref_pred), as_rows(target)
    partials, _ = partial_sums(p, r, t, v.compute_dtype(model_pred, ref_pred, target))
    errors = partials[:2].sum(dim=-1) / p.shape[1]  # [1 or 2, N]: the splits of each row, added
    return errors[0], errors[1] if ref_pred is not None else None


@torch.no_grad()
def kto_baseline(
    model_pred: torch.Tensor,
    target: torch.Tensor,
    *,
    ref_pred: torch.Tensor,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Diffusion-KTO's baseline over several processes (docs/methods.md §2.7): ``z = max(0,
    reduce(mean_k (r_k - m_k)))`` from ``row_errors``, a detached 0-dim tensor to pass as
    ``kto_loss(..., kl_baseline=z)``. ``reduce`` averages a 0-dim tensor over processes (an
    all-reduce mean, ``accelerator.reduce(t, reduction="mean")``); None: this batch alone.
    A non-finite element in any row (of any process) makes z NaN, as it makes kto_loss NaN."""
    model_err, ref_err = row_errors(model_pred, target, ref_pred=ref_pred)
    gap = (ref_err - model_err).mean()
    gap = gap + 0 * gap  # ±inf (a non-finite row) -> NaN, so that no process clamps it into a number
    return (gap if reduce is None else reduce(gap)).clamp(min=0)
