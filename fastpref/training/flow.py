"""Flow matching (rectified flow) for the trainer: the base class of the SD3 and Flux families.

Conventions (docs/methods.md §7): ``Batch.timesteps`` holds float32 scheduler timesteps
``t = σ · T`` (``T = num_train_timesteps`` of the pipeline's ``FlowMatchEulerDiscreteScheduler``,
σ already shifted by the scheduler's shift), drawn as diffusers' SD3/Flux training scripts draw
them: ``u`` from ``compute_density_for_timestep_sampling(--weighting_scheme, --logit_mean,
--logit_std, --mode_scale)``, then ``t = scheduler.timesteps[int(u · T)]``. Noising and target:
``x_t = (1 - σ) x0 + σ ε`` and ``ε - x0`` with ``σ = t / T``. ``sigma_sqrt`` and ``cosmap`` draw
``u`` uniformly and weight each row's squared error by diffusers'
``compute_loss_weighting_for_sd3(σ)`` (``error_weight``). The sampler is the pipeline's Euler
scheduler with classifier-free guidance.
"""

from __future__ import annotations

import math

import torch

from .args import FLOW_MATCHING_DEFAULTS
from .family import ModelFamily

WEIGHTED_SCHEMES = ("sigma_sqrt", "cosmap")  # the schemes whose meaning includes a loss weighting


class FlowMatchingFamily(ModelFamily):
    """A flow-matching family. Subclasses set ``self.scheduler`` (a diffusers
    ``FlowMatchEulerDiscreteScheduler``) in their constructor and implement the encoders and
    ``denoise``; this class supplies the timestep draw, noising, target, error weighting and the
    Euler sampler. ``configure(config)`` takes the flow-matching flags (class defaults: diffusers')."""

    flag_kinds = ("flow matching",)
    weighting_scheme: str = FLOW_MATCHING_DEFAULTS["weighting_scheme"]
    logit_mean: float = FLOW_MATCHING_DEFAULTS["logit_mean"]
    logit_std: float = FLOW_MATCHING_DEFAULTS["logit_std"]
    mode_scale: float = FLOW_MATCHING_DEFAULTS["mode_scale"]

    def configure(self, config) -> None:
        """Take ``--weighting_scheme``, ``--logit_mean``, ``--logit_std``, ``--mode_scale`` from
        ``config`` (any object with those attributes); None or absent keeps diffusers' default."""
        for name, default in FLOW_MATCHING_DEFAULTS.items():
            value = getattr(config, name, None)
            setattr(self, name, default if value is None else value)

    @property
    def num_train_timesteps(self) -> int:
        """``T`` of the scheduler (1000 for SD3 and Flux)."""
        return int(self.scheduler.config.num_train_timesteps)

    def draw_timestep(self, generator: torch.Generator) -> torch.Tensor:
        """One training timestep, a 0-dim float32 ``σ · T`` on the host, drawn from ``generator`` as
        diffusers' ``train_dreambooth_lora_sd3.py`` draws it (index ``int(u · T)``, clamped to
        ``T - 1`` where ``u`` rounds to 1)."""
        from diffusers.training_utils import compute_density_for_timestep_sampling

        u = compute_density_for_timestep_sampling(
            self.weighting_scheme, 1, self.logit_mean, self.logit_std, self.mode_scale, generator=generator
        )
        index = (u * self.num_train_timesteps).long().clamp(0, self.num_train_timesteps - 1)
        return self.scheduler.timesteps[index[0]].to(torch.float32)

    def sigmas(self, timesteps: torch.Tensor, ndim: int) -> torch.Tensor:
        """``σ = t / T`` float32, shaped ``[R, 1, ...]`` (``ndim`` dims in all) to broadcast over a
        latent batch; a 0-dim ``timesteps`` gives a ``[1, 1, ...]`` σ."""
        sigma = timesteps.to(torch.float32) / self.num_train_timesteps
        return sigma.reshape(-1, *[1] * (ndim - 1))

    def add_noise(
        self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x_t, target)``: ``x_t = (1 - σ) x0 + σ ε`` and ``ε - x0``, ``[R, *latent_shape]``
        float32, for float ``timesteps`` ``[R]`` (``σ = t / T``)."""
        sigma = self.sigmas(timesteps, latents.ndim)
        return (1.0 - sigma) * latents + sigma * noise, noise - latents

    def error_weight(self, timesteps: torch.Tensor) -> torch.Tensor | None:
        """``[R]`` float32 weights of each row's squared error: diffusers'
        ``compute_loss_weighting_for_sd3`` for ``sigma_sqrt`` (``σ^-2``) and ``cosmap``
        (``2 / (π (1 - 2σ + 2σ²))``); None (unweighted) for the other schemes."""
        if self.weighting_scheme not in WEIGHTED_SCHEMES:
            return None
        sigma = timesteps.to(torch.float32) / self.num_train_timesteps
        if self.weighting_scheme == "sigma_sqrt":
            return sigma**-2.0
        return 2.0 / (math.pi * (1.0 - 2.0 * sigma + 2.0 * sigma**2))

    def image_seq_len(self, latent_shape: tuple[int, ...]) -> int:
        """Image tokens of one latent ``(C, h, w)``: ``(h / 2) (w / 2)`` for 2x2 patches (SD3's
        default patch size and Flux's packing); the input of resolution-dependent shifting."""
        return (latent_shape[-2] // 2) * (latent_shape[-1] // 2)

    def sampling_sigmas(self, num_steps: int, latent_shape: tuple[int, ...]) -> torch.Tensor:
        """``[num_steps + 1]`` float32 σ of the pipeline's ``num_steps``-step Euler schedule, from
        ``σ_0 = 1`` down to the terminal 0: the scheduler's own ``set_timesteps`` on a copy, with
        ``mu = calculate_shift(image_seq_len)`` as the SD3 / Flux pipelines compute it when the
        scheduler uses resolution-dependent (dynamic) shifting."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler.config)
        kwargs = {}
        if scheduler.config.get("use_dynamic_shifting", False):
            from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

            c = scheduler.config
            kwargs["mu"] = calculate_shift(
                self.image_seq_len(latent_shape),
                c.get("base_image_seq_len", 256),
                c.get("max_image_seq_len", 4096),
                c.get("base_shift", 0.5),
                c.get("max_shift", 1.16),
            )
        scheduler.set_timesteps(num_steps, **kwargs)
        return scheduler.sigmas.to(torch.float32)

    @torch.no_grad()
    def sample(
        self,
        predict,
        embeddings: torch.Tensor,
        pooled: torch.Tensor,
        negative: torch.Tensor,
        negative_pooled: torch.Tensor,
        start: torch.Tensor,
        *,
        num_steps: int,
        guidance_scale: float,
    ) -> torch.Tensor:
        """Euler flow sampling with classifier-free guidance: ``x ← x + (σ_{k+1} - σ_k) v`` with
        ``v = v_u + guidance_scale (v_c - v_u)``, from ``start`` ``[B, *latent_shape]`` (σ_0's noise)
        to σ = 0; returns ``[B, *latent_shape]`` float32 latents. ``predict(x [2B, ...], t, emb
        [2B, L, D], pooled [2B, P])`` gets the unconditional rows first and ``t = σ_k · T``
        (0-dim float32); ``negative [1, L, D]`` / ``negative_pooled [1, P]`` are broadcast."""
        sigmas = self.sampling_sigmas(num_steps, tuple(start.shape[1:])).to(start.device)
        timesteps = sigmas * self.num_train_timesteps  # float32, as the scheduler computes them
        both = torch.cat([negative.expand_as(embeddings), embeddings])
        both_pooled = torch.cat([negative_pooled.expand_as(pooled), pooled])
        latents = start.float()
        for k in range(num_steps):
            uncond, cond = predict(torch.cat([latents, latents]), timesteps[k], both, both_pooled).float().chunk(2)
            latents = latents + (sigmas[k + 1] - sigmas[k]) * (uncond + guidance_scale * (cond - uncond))
        return latents
