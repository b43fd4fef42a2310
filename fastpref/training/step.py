"""One preference forward: shared noise and timestep per pair, policy and reference
predictions, and the fastpref loss. Used by ``fastpref.train``."""

from typing import Callable

import torch

from .losses import LossType


def encode_prompts(tokenizer, text_encoder, captions: list[str], device: torch.device) -> torch.Tensor:
    """``[B, L, D]`` last hidden states of the frozen text encoder."""
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids.to(device)
    with torch.no_grad():
        return text_encoder(ids)[0]


def regression_target(scheduler, latents: torch.Tensor, noise: torch.Tensor,
                      timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet regresses under the scheduler config: epsilon or v."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"scheduler prediction_type: expected 'epsilon' or 'v_prediction', got {kind!r}")


def preference_loss(unet: Callable, reference: Callable | None, scheduler, loss_type: LossType,
                    beta: float | None, latents: torch.Tensor, embeddings: torch.Tensor,
                    noise: torch.Tensor, timesteps: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Loss and metrics of one micro-batch of B preference pairs.

    ``latents``: ``[2B, C, h, w]`` scaled VAE latents, winners first; ``embeddings``: ``[B, L, D]``;
    ``noise``: ``[B, C, h, w]`` and ``timesteps``: ``[B]`` int64, both shared by a pair.
    ``unet(noisy, t, emb)`` is the policy forward; ``reference(noisy, t, emb)`` (no grad) the
    reference one, None for loss types without a reference.
    """
    noise2, t2 = noise.repeat(2, 1, 1, 1), timesteps.repeat(2)
    emb2 = embeddings.repeat(2, 1, 1)
    noisy = scheduler.add_noise(latents, noise2, t2)
    target = regression_target(scheduler, latents, noise2, t2)
    model_pred = unet(noisy, t2, emb2)
    ref_pred = None
    if loss_type.needs_reference:
        with torch.no_grad():
            ref_pred = reference(noisy, t2, emb2)
    return loss_type(model_pred, ref_pred, target, beta, timesteps)
