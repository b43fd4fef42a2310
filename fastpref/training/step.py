"""One training step: policy and reference predictions, the fused loss, backward, gradient
clipping and the optimizer step, with no host synchronisation anywhere in it. What depends on
the model (noising, target, the denoiser's conditioning) is the ``ModelFamily``'s.

``TrainStep`` is the step ``fastpref.train`` runs eagerly; ``fastpref.training.graph`` runs
the very same object on static buffers and captures it in a CUDA graph. Metrics come back
as device tensors, read on the host only at logging steps.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from typing import TYPE_CHECKING

import torch

from .losses import LossType

if TYPE_CHECKING:  # batches.py needs the data libraries (pyarrow, PIL), the step does not
    from .batches import Batch
    from .family import ModelFamily


def preference_loss(
    policy: Callable,
    reference: Callable | None,
    family: ModelFamily,
    loss_type: LossType,
    batch: Batch,
    *,
    beta: float | None = None,
    rpo_tau: float = 0.5,
    kl_baseline: Callable | None = None,
) -> tuple[torch.Tensor, dict]:
    """Loss and metrics of one micro-batch (``Batch``: ``[R, *latent_shape]`` latents, per-row
    noise, timesteps and prompt embeddings).

    The family noises the latents and names the target (epsilon, v, flow); ``policy(noisy, t,
    emb, pooled, extra)`` is the policy forward, ``reference(noisy, t, emb, pooled, extra)`` the
    reference one (``extra``: the batch's extra conditioning ``[R, E]``, SDXL's time ids), run
    under no_grad and only when the loss type needs it (never for SFT and MaPO).
    ``kl_baseline(model_pred, ref_pred, target)``, when given, supplies KTO's baseline (the
    cross-process mean of a multi-process run). ``family.error_weight`` (flow matching's
    ``sigma_sqrt`` / ``cosmap``) weights each row's squared error.
    """
    noisy, target = family.add_noise(batch.latents, batch.noise, batch.timesteps)
    extra = getattr(batch, "extra", None)  # absent from a batch-like tuple: no extra conditioning
    model_pred = policy(noisy, batch.timesteps, batch.embeddings, batch.pooled, extra)
    ref_pred = None
    if loss_type.needs_reference:
        with torch.no_grad():
            ref_pred = reference(noisy, batch.timesteps, batch.embeddings, batch.pooled, extra)
    weight = family.error_weight(batch.timesteps)  # None for most families (a Python check, not a tensor's)
    if weight is not None:  # w per row's squared error: scale prediction and target by sqrt(w)
        scale = weight.sqrt().reshape(-1, *[1] * (target.ndim - 1))
        model_pred, target = model_pred * scale.to(model_pred.dtype), target * scale.to(target.dtype)
        ref_pred = None if ref_pred is None else ref_pred * scale.to(ref_pred.dtype)
    baseline = None
    if kl_baseline is not None and loss_type.extra_input == "labels":
        baseline = kl_baseline(model_pred, ref_pred, target)
    return loss_type(model_pred, ref_pred, target, batch, beta=beta, rpo_tau=rpo_tau, kl_baseline=baseline)


class TrainStep:
    """One optimizer step over a list of micro-batches (gradient accumulation).

    ``loss_fn(batch) -> (loss, metrics)`` is one micro-batch's forward. The step zeroes the
    gradients (set to None) first, runs forward and backward on every micro-batch, then clips
    and steps the optimizer. It returns the micro-batch mean of every scalar metric plus
    ``grad_norm``, as device tensors.

    ``scaler`` (fp16) scales the loss and unscales before clipping; ``no_sync()`` (DDP) is
    entered for every micro-batch but the last.
    """

    def __init__(
        self,
        loss_fn: Callable[[Batch], tuple[torch.Tensor, dict]],
        params: list[torch.nn.Parameter],
        optimizer: torch.optim.Optimizer,
        *,
        max_grad_norm: float,
        scaler=None,
        no_sync: Callable | None = None,
    ):
        self.loss_fn, self.params, self.optimizer = loss_fn, params, optimizer
        self.max_grad_norm, self.scaler, self.no_sync = max_grad_norm, scaler, no_sync

    def forward_backward(self, batches: list[Batch]) -> dict[str, torch.Tensor]:
        """Gradients of the mean micro-batch loss in ``.grad``; returns the mean scalar metrics."""
        self.optimizer.zero_grad(set_to_none=True)
        count = len(batches)
        totals: dict[str, torch.Tensor] = {}
        for index, batch in enumerate(batches):
            sync = self.no_sync() if self.no_sync is not None and index < count - 1 else nullcontext()
            with sync:
                loss, metrics = self.loss_fn(batch)
                scaled = loss / count
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            for key, value in metrics.items():
                if value.ndim == 0 and value.is_floating_point():
                    value = value.detach().float() / count
                    totals[key] = totals[key] + value if key in totals else value
        return totals

    def apply_gradients(self) -> torch.Tensor:
        """Clip to ``max_grad_norm`` and step the optimizer; returns the pre-clip gradient norm."""
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        if hasattr(grad_norm, "full_tensor"):  # FSDP2's sharded gradients: the norm is a DTensor
            grad_norm = grad_norm.full_tensor()
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        return grad_norm

    def __call__(self, batches: list[Batch]) -> dict[str, torch.Tensor]:
        metrics = self.forward_backward(batches)
        metrics["grad_norm"] = self.apply_gradients()
        return metrics
